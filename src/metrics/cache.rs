//! The key-cache metrics: hits, misses, evictions and entry counts, read from the
//! attached keyring's cache at every scrape.
//!
//! Owns: the collector and the weak link to the keyring. Does not: keep any count of
//! its own (the cache counts) or hold the keyring alive.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Metrics;
use crate::keyring::Keyring;

/// Where the collector finds the keyring once [`Metrics::attach`] has set it.
pub(super) type CacheSource = Arc<OnceLock<Weak<Keyring>>>;

/// Cache counters and sizes, read at every scrape from the keyring attached with
/// [`Metrics::attach`] (weakly: the keyring's KMS holds these metrics).
#[derive(Debug, Default)]
pub(super) struct CacheCollector(pub(super) CacheSource);

impl prometheus_client::collector::Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(keyring) = self.0.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let stats = keyring.cache_stats();
        for (name, help, v) in [
            (
                "fieldkey_cache_hits",
                "Tenant key-cache lookups that found the entry.",
                &stats.hits,
            ),
            (
                "fieldkey_cache_misses",
                "Tenant key-cache lookups that loaded from the key store (and the KMS).",
                &stats.misses,
            ),
            (
                "fieldkey_cache_evictions",
                "Cache entries evicted or invalidated (their keys zeroized).",
                &stats.evictions,
            ),
        ] {
            let c = ConstCounter::new(v.load(Ordering::Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let (tenants, subjects) = keyring.cache_sizes();
        let mut e = encoder.encode_descriptor(
            "fieldkey_cache_entries",
            "Cached entries (each holds unwrapped key material).",
            None,
            MetricType::Gauge,
        )?;
        for (kind, n) in [("tenant", tenants), ("subject", subjects)] {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Kind {
                kind: &'static str,
            }
            let labels = Kind { kind };
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(e.encode_family(&labels)?)?;
        }
        let dr = ConstCounter::new(keyring.kms_dr_unwraps());
        dr.encode(encoder.encode_descriptor(
            "fieldkey_kms_dr_unwraps",
            "Keys unwrapped by the disaster-recovery KMS ([kms.dr]) because the primary KMS could not answer.",
            None,
            dr.metric_type(),
        )?)?;
        let (kms_open, store_open) = keyring.open_breakers();
        let mut e = encoder.encode_descriptor(
            "fieldkey_breaker_open",
            "Circuit breakers open now: KMS keys whose calls fail at once, and the key store's (0 or 1)",
            None,
            MetricType::Gauge,
        )?;
        for (dependency, n) in [("kms", kms_open), ("key_store", usize::from(store_open))] {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Dependency {
                dependency: &'static str,
            }
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(e.encode_family(&Dependency { dependency })?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Reports `keyring`'s cache (its hits, misses, evictions and sizes).
    pub fn attach(&self, keyring: &Arc<Keyring>) {
        let _ = self.cache_source.set(Arc::downgrade(keyring));
    }

    /// The exposition after moka's pending maintenance, so that the cache sizes count
    /// every insert and eviction so far (moka updates them lazily).
    pub async fn render_current(&self) -> String {
        let keyring = self.cache_source.get().and_then(Weak::upgrade);
        if let Some(k) = keyring {
            k.settle_cache().await;
        }
        self.render()
    }
}
