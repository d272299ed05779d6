//! Prometheus metrics and the health endpoints, on their own port.
//!
//! Owns: the metric families (`docs/OPERATIONS.md` §8 lists them), the tower layer that
//! counts every gRPC call by RPC and status with its latency, the KMS decorator that
//! counts and times every KMS call, the gauges refreshed from the keyring (cache, key
//! ages, re-encryption jobs), and the HTTP server for `GET /metrics` (Prometheus text
//! format 0.0.4), `/healthz` (liveness: the process serves) and `/readyz` (readiness:
//! the KMS and the key store answer).
//!
//! Must not: put anything secret or personal in a label. Labels carry RPC names, status
//! codes, KMS operation names, tenant ids and job ids only (never subject ids, fields'
//! values or key material).
//!
//! The rooms: `histogram` (the lock-free latency histogram), `grpc` (the tower layer
//! over the gRPC routes), `kms` (the KMS decorator), `cache` (the key-cache collector),
//! `feed` (the key store's change-feed collector), `repair` (read repair's counters per
//! tenant, from the keyring),
//! `refresh` (gauges refreshed from the key store) and `endpoints` (the HTTP server and
//! readiness). This file holds the registry and every family.

mod cache;
mod endpoints;
mod feed;
mod grpc;
mod histogram;
mod kms;
mod refresh;
mod repair;

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};
use std::sync::atomic::AtomicU64;

pub use endpoints::{Readiness, serve};
pub use histogram::AtomicHistogram;
pub use kms::MeteredKms;
pub use refresh::spawn_refresh;

use cache::{CacheCollector, CacheSource};
use endpoints::Dependency;
use feed::{FeedCollector, FeedSource};
use grpc::{Rpc, RpcCode, RpcSlot, all_slots};
use histogram::{LatencyFamily, latency_family};
use kms::{KmsOp, KmsOpOutcome};
use refresh::{JobLabel, JobStateLabel, LastRefresh, StatusLabel, TenantLabel};
use repair::RepairCollector;

/// Every metric of one sidecar process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cache_source: CacheSource,
    feed_source: FeedSource,
    requests: Family<RpcCode, Counter>,
    latency: LatencyFamily<Rpc>,
    kms_calls: Family<KmsOpOutcome, Counter>,
    kms_latency: LatencyFamily<KmsOp>,
    key_age: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    tenants_by_status: Family<StatusLabel, Gauge>,
    job_rows_total: Family<JobLabel, Gauge>,
    job_rows_scanned: Family<JobLabel, Gauge>,
    job_values_rewrapped: Family<JobLabel, Gauge>,
    job_values_failed: Family<JobLabel, Gauge>,
    job_state: Family<JobStateLabel, Gauge>,
    up: Family<Dependency, Gauge>,
    epoch_active: Gauge,
    epoch_age: Gauge<f64, AtomicU64>,
    backup_horizon: Gauge<f64, AtomicU64>,
    refreshed: Gauge,
    budget_in_flight: Gauge,
    budget_total: Gauge,
    budget_refused: Counter,
    /// The memory budget the gauges above read at each scrape.
    budget: std::sync::OnceLock<Arc<crate::transport::budget::MemoryBudget>>,
    /// The refusals already added to `budget_refused`.
    budget_refused_seen: std::sync::atomic::AtomicU64,
    /// The series the last refresh set (to remove those that disappear).
    last_refresh: Mutex<LastRefresh>,
    /// Per-RPC handles into `requests` and `latency`, resolved on first use, so that a
    /// call costs atomic adds and no label allocation or family lookup.
    slots: Box<[RpcSlot]>,
}

/// Registers `metric` in `registry` under `name` and returns a handle to it.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// The metric families. Cache metrics appear once a keyring is attached.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::default();
        let cache_source = CacheSource::default();
        let feed_source = FeedSource::default();
        // Fields are evaluated in the order written: the exposition lists the families
        // in this order, then the change feed's and the cache's.
        Arc::new(Self {
            requests: registered(
                &mut r,
                "fieldkey_requests",
                "gRPC calls by RPC and status code",
                Family::default(),
            ),
            latency: registered(
                &mut r,
                "fieldkey_request_duration_seconds",
                "gRPC call latency by RPC (server side, until the last response byte)",
                latency_family(),
            ),
            kms_calls: registered(
                &mut r,
                "fieldkey_kms_calls",
                "KMS calls by operation and outcome",
                Family::default(),
            ),
            kms_latency: registered(
                &mut r,
                "fieldkey_kms_duration_seconds",
                "KMS call latency by operation",
                latency_family(),
            ),
            key_age: registered(
                &mut r,
                "fieldkey_key_age_seconds",
                "Age of each tenant's active key version",
                Family::default(),
            ),
            tenants_by_status: registered(
                &mut r,
                "fieldkey_tenants",
                "Tenants by rotation status of their active key against the rotation policy",
                Family::default(),
            ),
            job_rows_total: registered(
                &mut r,
                "fieldkey_job_rows_in_scope",
                "Rows in scope of a re-encryption job",
                Family::default(),
            ),
            job_rows_scanned: registered(
                &mut r,
                "fieldkey_job_rows_scanned",
                "Rows a re-encryption job has read",
                Family::default(),
            ),
            job_values_rewrapped: registered(
                &mut r,
                "fieldkey_job_values_rewrapped",
                "Values a re-encryption job moved to the active key version",
                Family::default(),
            ),
            job_values_failed: registered(
                &mut r,
                "fieldkey_job_values_failed",
                "Values a re-encryption job could not move (they block retirement)",
                Family::default(),
            ),
            job_state: registered(
                &mut r,
                "fieldkey_job_state",
                "1 for each re-encryption job's current state",
                Family::default(),
            ),
            up: registered(
                &mut r,
                "fieldkey_dependency_up",
                "Whether the KMS and the key store answered the last readiness check",
                Family::default(),
            ),
            epoch_active: registered(
                &mut r,
                "fieldkey_epoch_active",
                "The active key epoch (0: epochs not started)",
                Gauge::default(),
            ),
            epoch_age: registered(
                &mut r,
                "fieldkey_epoch_age_seconds",
                "Age of the active key epoch (a roll is due at epochs.length_days)",
                Gauge::default(),
            ),
            backup_horizon: registered(
                &mut r,
                "fieldkey_backup_horizon_seconds",
                "Age of the oldest key-store backup that can still be restored (+Inf: unbounded, before the first roll or while the legacy key is kept)",
                Gauge::default(),
            ),
            refreshed: registered(
                &mut r,
                "fieldkey_gauges_refreshed_timestamp_seconds",
                "When key ages and job gauges were last refreshed from the key store",
                Gauge::default(),
            ),
            budget_in_flight: registered(
                &mut r,
                "fieldkey_request_bytes_in_flight",
                "Bytes of request messages held in memory now (charged to the memory budget)",
                Gauge::default(),
            ),
            budget_total: registered(
                &mut r,
                "fieldkey_request_bytes_budget",
                "The memory budget of request messages (limits.memory_budget_bytes)",
                Gauge::default(),
            ),
            budget_refused: registered(
                &mut r,
                "fieldkey_requests_over_memory_budget",
                "Request messages refused because the memory budget was full (RESOURCE_EXHAUSTED, MEMORY_BUDGET)",
                Counter::default(),
            ),
            budget: std::sync::OnceLock::new(),
            budget_refused_seen: std::sync::atomic::AtomicU64::new(0),
            registry: {
                r.register_collector(Box::new(FeedCollector(feed_source.clone())));
                r.register_collector(Box::new(CacheCollector(cache_source.clone())));
                r.register_collector(Box::new(RepairCollector(cache_source.clone())));
                r
            },
            cache_source,
            feed_source,
            slots: all_slots(),
            last_refresh: Mutex::new(LastRefresh::default()),
        })
    }

    /// Reports the use of `budget` (the serving routes' memory budget) at each scrape.
    pub fn watch_budget(&self, budget: Arc<crate::transport::budget::MemoryBudget>) {
        let _ = self.budget.set(budget);
    }

    /// Copies the memory budget's counters into its metrics.
    fn read_budget(&self) {
        let Some(b) = self.budget.get() else { return };
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.budget_in_flight.set(as_i64(b.in_flight()));
        self.budget_total.set(as_i64(b.total()));
        let now = b.refused();
        let seen = self
            .budget_refused_seen
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        self.budget_refused.inc_by(now.saturating_sub(seen));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.read_budget();
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::grpc::slot_of;
    use super::*;

    #[test]
    fn the_exposition_is_prometheus_text() {
        let m = Metrics::new();
        m.record(
            slot_of("/fieldkey.v1.Crypto/Encrypt"),
            0,
            Duration::from_millis(2),
        );
        let text = m.render();
        assert!(
            text.contains("fieldkey_requests_total{rpc=\"Crypto/Encrypt\",code=\"Ok\"} 1"),
            "{text}"
        );
        // cumulative buckets, ending with +Inf; the sum in seconds
        assert!(
            text.contains(
                "fieldkey_request_duration_seconds_bucket{le=\"0.0016\",rpc=\"Crypto/Encrypt\"} 0"
            ) || text.contains(
                "fieldkey_request_duration_seconds_bucket{rpc=\"Crypto/Encrypt\",le=\"0.0016\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("le=\"0.0032\"} 1") && text.contains("le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fieldkey_request_duration_seconds_sum{rpc=\"Crypto/Encrypt\"} 0.002\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fieldkey_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF"),
            "classic text format, not OpenMetrics"
        );
    }
}
