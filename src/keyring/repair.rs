//! Read repair (docs/ROTATION.md "Read repair"): what a decrypted value's version says
//! about it (stale: under a version older than the tenant's active one) and, when the
//! caller asks, the value sealed again under the active version, by the same reseal as
//! a rewrap ([`super::ColumnKeys::reseal`]). Also the counters the metrics read: stale
//! values read and values repaired, per tenant, with a bound on the number of tenants.
//!
//! Does NOT: decide whether the caller may have a value repaired (the service asks the
//! policies for `Crypto::Rewrap` before anything is decrypted), nor write anything back
//! (the application does, on its next save, if the row is unchanged).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::Error;

use super::Rewrapped;

/// What read repair found for one value that decrypted.
#[derive(Debug)]
pub enum ReadRepair {
    /// On the tenant's active version (or one newer than this view of the tenant, which
    /// only a rotation on another replica within the revalidation interval can cause:
    /// a value is never moved backwards).
    Current,
    /// On an older (decrypt-only) version; not repaired (the caller did not ask).
    Stale,
    /// On an older version; here it is, sealed again under the active version.
    Repaired(Rewrapped),
    /// On an older version; sealing it again failed (the active version's key could
    /// not be had, the subject was suspended meanwhile, ...). The value itself did
    /// decrypt.
    Failed(Error),
}

impl ReadRepair {
    /// Whether the value was under a version older than the active one.
    pub fn is_stale(&self) -> bool {
        !matches!(self, Self::Current)
    }
}

/// Distinct tenants counted apart; beyond, stale reads and repairs are counted under
/// tenant [`OTHER_TENANTS`]. Only tenants that exist reach the counters (a value must
/// decrypt to be counted), so a caller cannot invent label values; the bound keeps a
/// store with very many tenants from making the metrics endpoint unbounded too.
pub const MAX_TENANTS: usize = 1000;

/// The tenant label of the counters beyond [`MAX_TENANTS`]. It has a space, so it is
/// never a tenant id (visible ASCII only, [`crate::crypto::validate_id`]): no real
/// tenant's counts can be confused with it (`(other)` could; review finding).
pub const OTHER_TENANTS: &str = "other tenants";

/// One tenant's read-repair counters.
#[derive(Debug, Default)]
pub struct RepairCounts {
    /// Stale values read (decrypted under a version older than the active one).
    pub stale: AtomicU64,
    /// Stale values returned re-encrypted under the active version.
    pub repaired: AtomicU64,
    /// Stale values whose repair was asked for and failed.
    pub failed: AtomicU64,
}

/// Read-repair counters per tenant (for metrics): see [`MAX_TENANTS`].
#[derive(Debug, Default)]
pub struct ReadRepairStats {
    tenants: RwLock<HashMap<String, Arc<RepairCounts>>>,
    other: Arc<RepairCounts>,
}

/// One tenant's counts as read for an exposition: (tenant, stale, repaired, failed).
pub type RepairSample = (String, u64, u64, u64);

impl ReadRepairStats {
    /// The counters of `tenant` (those of [`OTHER_TENANTS`] once [`MAX_TENANTS`]
    /// tenants have their own).
    pub(super) fn of(&self, tenant: &str) -> Arc<RepairCounts> {
        {
            let known = self.tenants.read().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = known.get(tenant) {
                return c.clone();
            }
        }
        let mut known = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = known.get(tenant) {
            return c.clone();
        }
        if known.len() >= MAX_TENANTS {
            return self.other.clone();
        }
        let c = Arc::new(RepairCounts::default());
        known.insert(tenant.to_owned(), c.clone());
        c
    }

    /// Every tenant's counts, by tenant id, then [`OTHER_TENANTS`] if it counted any.
    pub fn samples(&self) -> Vec<RepairSample> {
        let read = |c: &RepairCounts| {
            (
                c.stale.load(Ordering::Relaxed),
                c.repaired.load(Ordering::Relaxed),
                c.failed.load(Ordering::Relaxed),
            )
        };
        let mut out: Vec<RepairSample> = {
            let known = self.tenants.read().unwrap_or_else(|p| p.into_inner());
            known
                .iter()
                .map(|(t, c)| {
                    let (s, r, f) = read(c);
                    (t.clone(), s, r, f)
                })
                .collect()
        };
        out.sort();
        let (s, r, f) = read(&self.other);
        if s + r + f > 0 {
            out.push((OTHER_TENANTS.to_owned(), s, r, f));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_beyond_the_bound_are_counted_together() {
        let stats = ReadRepairStats::default();
        for i in 0..MAX_TENANTS + 5 {
            stats
                .of(&format!("t{i}"))
                .stale
                .fetch_add(1, Ordering::Relaxed);
        }
        stats.of("t0").stale.fetch_add(1, Ordering::Relaxed);
        let samples = stats.samples();
        assert_eq!(samples.len(), MAX_TENANTS + 1);
        assert!(samples.contains(&("t0".to_owned(), 2, 0, 0)));
        assert_eq!(samples.last(), Some(&(OTHER_TENANTS.to_owned(), 5, 0, 0)));
    }

    /// A tenant named like the overflow label would share its series: the label must
    /// be no valid tenant id.
    #[test]
    fn the_overflow_label_is_no_tenant_id() {
        assert!(crate::crypto::validate_id("tenant_id", OTHER_TENANTS).is_err());
        assert!(crate::crypto::validate_id("tenant_id", "(other)").is_ok());
    }
}
