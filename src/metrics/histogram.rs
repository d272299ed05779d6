//! The latency histogram: fixed exponential buckets with atomic counters, encoded in
//! the Prometheus text format.
//!
//! Owns: [`AtomicHistogram`], the latency bucket bounds and the family type that makes
//! one histogram per label set. Does not: decide what is timed (the gRPC layer and the
//! KMS decorator do) or register anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::exponential_buckets;

/// A family of latency histograms, one per label set `L`.
pub(super) type LatencyFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

/// An empty [`LatencyFamily`] whose histograms have the latency buckets.
pub(super) fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    LatencyFamily::new_with_constructor(latency_histogram as fn() -> AtomicHistogram)
}

/// Upper bounds of the latency buckets: 50 µs doubling to ~26 s.
fn latency_bounds() -> Arc<[f64]> {
    exponential_buckets(0.000_05, 2.0, 20).collect()
}

fn latency_histogram() -> AtomicHistogram {
    AtomicHistogram::new(latency_bounds())
}

/// A histogram with fixed buckets and atomic counters: observing is a few atomic adds
/// and takes no lock (prometheus-client's `Histogram` takes a mutex per observation,
/// which every call of one RPC would contend for).
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    bounds: Arc<[f64]>,
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observations in nanoseconds.
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: Arc<[f64]>) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramCells {
            bounds,
            buckets,
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let c = &self.0;
        let secs = d.as_secs_f64();
        let i = c.bounds.partition_point(|b| *b < secs);
        if let Some(b) = c.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        c.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = c
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(c.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        #[allow(clippy::cast_precision_loss, reason = "a sum of latencies in seconds")]
        let sum = c.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // The count from the buckets read, so that it equals the +Inf bucket even while
        // observations land during the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
