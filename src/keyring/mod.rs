//! The keyring: the one place that decides which key encrypts and which may decrypt.
//!
//! Owns: tenant key versions and subject keys as described in `docs/ARCHITECTURE.md`
//! (KMS key -> tenant key version -> per-field key; subject key material wrapped under a
//! tenant key version), their state rules (active / decrypt-only / suspended /
//! destroyed), and the freshness of cached metadata.
//!
//! Must not: know about gRPC (the service maps [`Error`] to statuses), log plaintext or
//! key material, or encrypt with anything but the tenant's single active version.
//!
//! Freshness: cached metadata (versions, states) is re-read from the store when it is
//! older than [`KeyringConfig::revalidate_after`], so a suspension or destruction made
//! by another replica is enforced here within that bound. Changes made through this
//! keyring take effect on it at once. If the store is unreachable, the last snapshot
//! keeps serving for at most [`KeyringConfig::max_stale`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{CacheConfig, CacheStats, KeyCache};
use crate::error::Error;
use crate::kms::Kms;
use crate::store::{ErasureLedger, KeyStore};

mod column;
mod epochs;
mod following;
mod index;
mod lifecycle;
pub mod repair;
mod resolution;
mod rotation;
pub mod rows;
pub use crate::model::{SubjectInfo, TenantInfo, VersionInfo};
pub use column::ColumnKeys;
pub use epochs::{ActiveEpoch, swk_context};
pub use index::{IndexProfiles, Indexed, Indexer};
pub use repair::{ReadRepair, ReadRepairStats};
pub use resolution::Encryptor;
use resolution::{active_version, subject_usable};
pub use rotation::{KekRewrap, Rewrapped};

/// Keyring settings.
#[derive(Debug, Clone)]
pub struct KeyringConfig {
    /// Cache bounds and key TTL.
    pub cache: CacheConfig,
    /// Cached metadata older than this is re-read before use (the cross-replica
    /// propagation bound for suspend and shred).
    pub revalidate_after: Duration,
    /// While the store is unreachable, metadata up to this old keeps serving.
    pub max_stale: Duration,
    /// After a failed refresh, wait this long before trying the store again
    /// (requests meanwhile use the stale snapshot instead of each waiting on a timeout).
    pub store_retry_after: Duration,
    /// KMS keys a tenant may be created on or moved to besides the default key (exact
    /// ids, or prefixes ending in `*`); `None`: any (the library's default; `fieldkey
    /// serve` always sets it from `kms.tenant_keys`).
    pub tenant_kms_keys: Option<Vec<String>>,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        Self {
            cache: CacheConfig::default(),
            revalidate_after: Duration::from_secs(1),
            max_stale: Duration::from_secs(300),
            store_retry_after: Duration::from_secs(1),
            tenant_kms_keys: None,
        }
    }
}

/// Tenant keys, subject keys and the rules for using them.
pub struct Keyring {
    store: Arc<dyn KeyStore>,
    kms: Arc<dyn Kms>,
    cache: KeyCache,
    cfg: KeyringConfig,
    ledger: Option<Arc<ErasureLedger>>,
    /// Blind-index profiles per field, and the bound on concurrent slow indexes.
    indexes: IndexProfiles,
    /// When change notifications were last lost (ns after `born`; 0 = never): cached
    /// snapshots fetched before then are re-read on next use.
    notifications_lost: std::sync::atomic::AtomicU64,
    born: Instant,
    /// The active key epoch as last read (`epochs.rs`).
    epoch: arc_swap::ArcSwap<epochs::EpochView>,
    /// Circuit breaker of the keyring's reads of key metadata (`following.rs`).
    store_breaker: Arc<crate::breaker::Breaker>,
    /// A sweep of every cached entry after a lost change feed is under way.
    sweeping: std::sync::atomic::AtomicBool,
    /// Stale values read and repaired, per tenant (`repair.rs`, for metrics).
    repairs: ReadRepairStats,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("store", &self.store.backend())
            .field("kms", &self.kms.provider())
            .finish_non_exhaustive()
    }
}

fn unshare(e: Arc<Error>) -> Error {
    Arc::unwrap_or_clone(e)
}

impl Keyring {
    /// A keyring over a store and a KMS.
    pub fn new(store: Arc<dyn KeyStore>, kms: Arc<dyn Kms>, cfg: KeyringConfig) -> Self {
        let cache = KeyCache::new(&cfg.cache);
        Self {
            store,
            kms,
            cache,
            cfg,
            ledger: None,
            indexes: IndexProfiles::default(),
            notifications_lost: std::sync::atomic::AtomicU64::new(0),
            born: Instant::now(),
            epoch: arc_swap::ArcSwap::from_pointee(epochs::EpochView::default()),
            store_breaker: Arc::new(crate::breaker::Breaker::new(
                crate::breaker::BreakerConfig::default(),
            )),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            repairs: ReadRepairStats::default(),
        }
    }

    /// Consults `ledger` whenever key material is loaded: keys it records as erased
    /// are refused (and destroyed again in the store), even if a restored key-store
    /// backup brought them back. `fieldkey serve` always sets one.
    #[must_use]
    pub fn with_ledger(mut self, ledger: Arc<ErasureLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The erasure ledger, if any.
    pub fn ledger(&self) -> Option<&Arc<ErasureLedger>> {
        self.ledger.as_ref()
    }

    /// The hot-key cache's counters (hits, misses, loads), for metrics and tests.
    pub fn cache_stats(&self) -> &CacheStats {
        self.cache.stats()
    }

    /// Read repair's counters: stale values read and repaired per tenant (metrics).
    pub fn read_repair_stats(&self) -> &ReadRepairStats {
        &self.repairs
    }

    /// Circuit breakers open now: KMS keys, and whether the key store's is (metrics).
    pub fn open_breakers(&self) -> (usize, bool) {
        (self.kms.open_breakers(), self.store_breaker.is_open())
    }

    /// Unwraps the disaster-recovery KMS served while the primary could not (metrics).
    pub fn kms_dr_unwraps(&self) -> u64 {
        self.kms.dr_unwraps()
    }

    /// Number of cached tenants and subjects (approximate, for metrics).
    pub fn cache_sizes(&self) -> (u64, u64) {
        self.cache.sizes()
    }

    /// Runs the cache's pending maintenance (evictions) now, so that sizes read next
    /// are current; normally it runs lazily.
    pub async fn settle_cache(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Drops every cached key (each is wiped once in-flight requests release it): on
    /// shutdown, and after a job that rewrapped many subjects.
    pub async fn wipe_cache(&self) {
        self.cache.clear().await;
    }

    /// How stale this keyring's view of key versions may be (its
    /// [`KeyringConfig::revalidate_after`]).
    pub fn revalidate_after(&self) -> Duration {
        self.cfg.revalidate_after
    }
}
