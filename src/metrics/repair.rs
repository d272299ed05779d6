//! Read repair's metrics (docs/ROTATION.md "Read repair"): stale values read and
//! values repaired (or whose repair failed), per tenant, read from the attached
//! keyring's counters at every scrape.
//!
//! Owns: the collector. Does not: keep counts of its own (the keyring counts, in
//! `keyring::repair`) or hold the keyring alive. The tenant label is bounded there:
//! only tenants whose values decrypted are counted (a caller cannot invent label
//! values), at most `keyring::repair::MAX_TENANTS` of them apart, the rest together
//! under `keyring::repair::OTHER_TENANTS` (`tenant="other tenants"`: a space, so never
//! a tenant id).

use std::sync::Weak;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::cache::CacheSource;

/// Read-repair counters per tenant, read at every scrape from the keyring attached
/// with [`super::Metrics::attach`].
#[derive(Debug, Default)]
pub(super) struct RepairCollector(pub(super) CacheSource);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantOnly {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantOutcome {
    tenant: String,
    outcome: &'static str,
}

impl prometheus_client::collector::Collector for RepairCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(keyring) = self.0.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let samples = keyring.read_repair_stats().samples();
        let mut e = encoder.encode_descriptor(
            "fieldkey_stale_reads",
            "Values decrypted under a key version older than the tenant's active one (due for re-encryption), per tenant.",
            None,
            MetricType::Counter,
        )?;
        for (tenant, stale, _, _) in &samples {
            let labels = TenantOnly {
                tenant: tenant.clone(),
            };
            ConstCounter::new(*stale).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "fieldkey_read_repairs",
            "Stale values a Decrypt with repair returned re-encrypted under the active version (repaired) or could not (failed), per tenant.",
            None,
            MetricType::Counter,
        )?;
        for (tenant, _, repaired, failed) in &samples {
            for (outcome, n) in [("repaired", *repaired), ("failed", *failed)] {
                let labels = TenantOutcome {
                    tenant: tenant.clone(),
                    outcome,
                };
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
