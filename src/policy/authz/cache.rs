//! The decision cache: (identity, transport, action, tenant, field) → decision.
//!
//! One cache belongs to one loaded policy set (a reload installs a new set with an
//! empty cache, so no decision outlives the policies that made it). A lookup hashes the
//! borrowed request once (SipHash, randomly keyed: tenant and field names come from
//! callers), picks one of [`SHARDS`] read-write locks by the hash, and probes that
//! shard's map with the same hash: no allocation, one uncontended read lock. A shard
//! that reaches its share of [`CAPACITY`] is emptied.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{PoisonError, RwLock};

use super::{Action, AuthzRequest, Decision};

/// Number of independently locked shards.
pub(super) const SHARDS: usize = 16;
/// Decisions kept at most (over all shards).
pub(super) const CAPACITY: usize = 100_000;
const SHARD_CAPACITY: usize = CAPACITY / SHARDS;

/// The parts of a key, borrowed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Parts<'a> {
    identity: &'a str,
    transport: &'a str,
    action: Action,
    tenant: Option<&'a str>,
    field: Option<&'a str>,
}

/// A key, owned or borrowed, seen through its parts and its precomputed hash.
trait KeyView {
    fn hash64(&self) -> u64;
    fn parts(&self) -> Parts<'_>;
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash64() == other.hash64() && self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

struct OwnedKey {
    hash: u64,
    identity: Box<str>,
    transport: Box<str>,
    action: Action,
    tenant: Option<Box<str>>,
    field: Option<Box<str>>,
}

impl KeyView for OwnedKey {
    fn hash64(&self) -> u64 {
        self.hash
    }
    fn parts(&self) -> Parts<'_> {
        Parts {
            identity: &self.identity,
            transport: &self.transport,
            action: self.action,
            tenant: self.tenant.as_deref(),
            field: self.field.as_deref(),
        }
    }
}

impl Hash for OwnedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for OwnedKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.parts() == other.parts()
    }
}

impl Eq for OwnedKey {}

impl<'a> Borrow<dyn KeyView + 'a> for OwnedKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

struct Probe<'r> {
    hash: u64,
    parts: Parts<'r>,
}

impl KeyView for Probe<'_> {
    fn hash64(&self) -> u64 {
        self.hash
    }
    fn parts(&self) -> Parts<'_> {
        self.parts
    }
}

/// Hands the precomputed 64-bit hash through unchanged.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by the keys above; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Shard = HashMap<OwnedKey, Decision, BuildHasherDefault<PassThrough>>;

/// A bounded, sharded map of decisions.
pub(super) struct DecisionCache {
    hasher: RandomState,
    shards: [RwLock<Shard>; SHARDS],
}

impl DecisionCache {
    pub(super) fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| RwLock::new(Shard::default())),
        }
    }

    fn probe<'r>(&self, req: &'r AuthzRequest<'_>) -> Probe<'r> {
        let parts = Parts {
            identity: req.identity,
            transport: req.transport,
            action: req.action,
            tenant: req.tenant,
            field: req.field,
        };
        Probe {
            hash: self.hasher.hash_one(parts),
            parts,
        }
    }

    fn shard(&self, hash: u64) -> Option<&RwLock<Shard>> {
        // The top bits pick the shard; hashbrown uses the low bits and the top 7.
        let i = (hash >> 40) as usize % SHARDS;
        self.shards.get(i)
    }

    /// The cached decision for `req`, if any.
    pub(super) fn get(&self, req: &AuthzRequest<'_>) -> Option<Decision> {
        let probe = self.probe(req);
        let shard = self.shard(probe.hash)?;
        let map = shard.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&probe as &dyn KeyView).cloned()
    }

    /// Remembers `decision` for `req`.
    pub(super) fn insert(&self, req: &AuthzRequest<'_>, decision: Decision) {
        let probe = self.probe(req);
        let Some(shard) = self.shard(probe.hash) else {
            return;
        };
        let key = OwnedKey {
            hash: probe.hash,
            identity: req.identity.into(),
            transport: req.transport.into(),
            action: req.action,
            tenant: req.tenant.map(Into::into),
            field: req.field.map(Into::into),
        };
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SHARD_CAPACITY {
            map.clear();
        }
        map.insert(key, decision);
    }

    /// Decisions held (for tests and status).
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn req<'a>(id: &'a str, tenant: Option<&'a str>, field: Option<&'a str>) -> AuthzRequest<'a> {
        AuthzRequest {
            identity: id,
            transport: "local",
            action: Action::Encrypt,
            tenant,
            field,
        }
    }

    fn d(allowed: bool, reason: &str) -> Decision {
        Decision {
            allowed,
            reason: Arc::from(reason),
        }
    }

    #[test]
    fn keys_tell_every_part_apart() {
        let c = DecisionCache::new();
        c.insert(&req("a", Some("t"), Some("f")), d(true, "1"));
        assert_eq!(
            c.get(&req("a", Some("t"), Some("f")))
                .unwrap()
                .reason
                .as_ref(),
            "1"
        );
        // Same concatenation, different split: distinct keys.
        assert!(c.get(&req("a", Some("t/f"), None)).is_none());
        assert!(c.get(&req("a", Some("t"), None)).is_none());
        assert!(c.get(&req("a", None, Some("f"))).is_none());
        assert!(c.get(&req("b", Some("t"), Some("f"))).is_none());
        let mut other_action = req("a", Some("t"), Some("f"));
        other_action.action = Action::Decrypt;
        assert!(c.get(&other_action).is_none());
        let mut other_transport = req("a", Some("t"), Some("f"));
        other_transport.transport = "mtls";
        assert!(c.get(&other_transport).is_none());
        c.insert(&req("a", Some("t"), Some("f")), d(false, "2"));
        assert!(!c.get(&req("a", Some("t"), Some("f"))).unwrap().allowed);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = DecisionCache::new();
        let names: Vec<String> = (0..CAPACITY + 5_000).map(|i| format!("f{i}")).collect();
        for n in &names {
            c.insert(&req("a", Some("t"), Some(n)), d(true, ""));
        }
        // Every shard filled up once and was emptied.
        assert!(c.len() < CAPACITY / 4, "{} entries", c.len());
        let last = names.last().unwrap();
        assert!(c.get(&req("a", Some("t"), Some(last))).is_some());
        for n in &names[..SHARD_CAPACITY] {
            c.insert(&req("a", Some("t"), Some(n)), d(true, ""));
        }
        assert!(c.len() <= CAPACITY, "{} entries", c.len());
    }
}
