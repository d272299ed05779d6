//! Data operations (encrypt, decrypt, ...) are not one audit record each: the hot path
//! only bumps a counter per (actor, caller address, tenant, field, action, outcome), and
//! the audit log appends one record per counter at the end of each window. The
//! trade-off, documented in `docs/AUDIT.md`: the log says how many values each identity
//! processed per field and window, not which row; a crash loses at most one window of
//! counts.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKey {
    /// Caller identity.
    pub actor: String,
    /// Masked caller address.
    pub caller_ip: Option<String>,
    /// Tenant.
    pub tenant: String,
    /// Field.
    pub field: String,
    /// Action (`Crypto::Encrypt`, ...).
    pub action: &'static str,
    /// Outcome (`ok`, `denied`, `rate_limited`, `failed`).
    pub outcome: &'static str,
}

struct Slot {
    key: DataKey,
    count: AtomicU64,
}

/// Distinct counters per window at most; beyond, operations are counted under tenant
/// and field [`OTHER`] (a caller sending endless distinct tenant or field names cannot
/// grow memory without bound; the overflow record says how many were folded).
pub const MAX_KEYS: usize = 50_000;

/// Tenant and field of the overflow counter. It holds a space, so no tenant id or field
/// name (1..=255 bytes of visible ASCII) can be it: a tenant named like the overflow
/// label would otherwise have its counts merged with everyone's overflow.
pub const OTHER: &str = "(other names)";

/// Counters of data operations for the current window.
#[derive(Default)]
pub struct Aggregator {
    slots: RwLock<HashMap<u64, Vec<Slot>>>,
    keys: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").finish_non_exhaustive()
    }
}

fn hash_parts(
    actor: &str,
    ip: Option<&str>,
    tenant: &str,
    field: &str,
    action: &str,
    outcome: &str,
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (actor, ip, tenant, field, action, outcome).hash(&mut h);
    h.finish()
}

impl Aggregator {
    /// Counts `n` operations. Allocation-free once the counter exists.
    #[allow(clippy::too_many_arguments, reason = "the counter's key, borrowed")]
    pub fn record(
        &self,
        actor: &str,
        caller_ip: Option<&str>,
        tenant: &str,
        field: &str,
        action: &'static str,
        outcome: &'static str,
        n: u64,
    ) {
        let h = hash_parts(actor, caller_ip, tenant, field, action, outcome);
        let matches = |s: &Slot| {
            s.key.actor == actor
                && s.key.caller_ip.as_deref() == caller_ip
                && s.key.tenant == tenant
                && s.key.field == field
                && s.key.action == action
                && s.key.outcome == outcome
        };
        {
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = slots.get(&h).and_then(|v| v.iter().find(|s| matches(s))) {
                slot.count.fetch_add(n, Ordering::Relaxed);
                return;
            }
        }
        if self.keys.load(Ordering::Relaxed) >= MAX_KEYS && (tenant, field) != (OTHER, OTHER) {
            return self.record(actor, caller_ip, OTHER, OTHER, action, outcome, n);
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let bucket = slots.entry(h).or_default();
        if let Some(slot) = bucket.iter().find(|s| matches(s)) {
            slot.count.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.keys.fetch_add(1, Ordering::Relaxed);
        bucket.push(Slot {
            key: DataKey {
                actor: actor.to_owned(),
                caller_ip: caller_ip.map(str::to_owned),
                tenant: tenant.to_owned(),
                field: field.to_owned(),
                action,
                outcome,
            },
            count: AtomicU64::new(n),
        });
    }

    /// Takes the window's counts (non-zero), leaving the aggregator empty.
    pub fn drain(&self) -> Vec<(DataKey, u64)> {
        let taken = {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            self.keys.store(0, Ordering::Relaxed);
            std::mem::take(&mut *slots)
        };
        let mut out: Vec<(DataKey, u64)> = taken
            .into_values()
            .flatten()
            .map(|s| (s.key, s.count.into_inner()))
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort_by(|a, b| {
            (&a.0.tenant, &a.0.field, &a.0.actor, a.0.action, a.0.outcome).cmp(&(
                &b.0.tenant,
                &b.0.field,
                &b.0.actor,
                b.0.action,
                b.0.outcome,
            ))
        });
        out
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_overflow_label_is_no_tenant_id_or_field_name() {
        // Ids and field names are visible ASCII only (crypto::validate_id).
        assert!(OTHER.bytes().any(|b| !b.is_ascii_graphic()));
    }

    use super::*;

    #[test]
    fn counts_per_key_and_drains() {
        let a = Aggregator::default();
        for _ in 0..3 {
            a.record(
                "app",
                Some("10.0.0.0/24"),
                "acme",
                "email",
                "Crypto::Encrypt",
                "ok",
                1,
            );
        }
        a.record(
            "app",
            Some("10.0.0.0/24"),
            "acme",
            "email",
            "Crypto::Decrypt",
            "ok",
            100,
        );
        a.record(
            "app",
            Some("10.0.0.0/24"),
            "acme",
            "phone",
            "Crypto::Encrypt",
            "ok",
            1,
        );
        a.record("app", None, "acme", "email", "Crypto::Encrypt", "denied", 2);
        let d = a.drain();
        assert_eq!(d.len(), 4);
        let enc = d
            .iter()
            .find(|(k, _)| k.field == "email" && k.action == "Crypto::Encrypt" && k.outcome == "ok")
            .unwrap();
        assert_eq!(enc.1, 3);
        assert!(a.drain().is_empty());
    }

    #[test]
    fn distinct_keys_are_bounded_and_the_rest_is_folded() {
        let a = Aggregator::default();
        for i in 0..MAX_KEYS + 10 {
            a.record(
                "x",
                None,
                &format!("t{i}"),
                "f",
                "Crypto::Encrypt",
                "denied",
                1,
            );
        }
        let d = a.drain();
        assert_eq!(d.len(), MAX_KEYS + 1);
        let other = d.iter().find(|(k, _)| k.tenant == OTHER).unwrap();
        assert_eq!(other.1, 10);
    }
}
