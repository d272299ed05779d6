//! The hot-key cache: unwrapped keys and derived field ciphers, in memory only.
//!
//! Owns: bounded (entry count) and expiring (TTL) moka caches of per-tenant and
//! per-subject entries. An entry holds a snapshot of the stored metadata (states,
//! wrapped keys), the unwrapped key (filled at most once: concurrent misses share one
//! KMS call through `tokio::sync::OnceCell`), and the derived per-field ciphers.
//!
//! Zeroization: unwrapped keys are [`SecretKey`] (zeroized on drop), field ciphers
//! hold XAES-256-GCM key schedules (zeroized on drop) and blind-index keys hold keyed
//! HMAC-SHA256 states (sha2's `zeroize` feature wipes them on drop). When moka evicts or invalidates
//! an entry it drops its `Arc`; the key bytes are wiped as soon as the last in-flight
//! request holding that `Arc` finishes.
//!
//! Must not: talk to the KMS or the store (the keyring passes loaders in), or decide
//! whether a key may be used (the keyring checks states).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use moka::future::Cache;
use tokio::sync::{Mutex, OnceCell};

use crate::crypto::{FieldCipher, IndexKey, SecretKey};
use crate::model::{SubjectRecord, TenantRecord};

/// Bounds of the cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long an unwrapped key stays in memory before it is dropped (and zeroized)
    /// and must be unwrapped by the KMS again. Cached keys keep serving through a KMS
    /// outage for at most this long.
    pub key_ttl: Duration,
    /// Maximum number of tenants with cached keys.
    pub max_tenants: u64,
    /// Maximum number of subjects with cached keys.
    pub max_subjects: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            key_ttl: Duration::from_secs(15 * 60),
            max_tenants: 10_000,
            max_subjects: 100_000,
        }
    }
}

/// A metadata snapshot and when it was read from the store.
#[derive(Debug)]
pub struct Snapshot<T> {
    /// The stored record.
    pub record: T,
    /// When it was read.
    pub fetched: Instant,
    /// When a refresh last failed because the store was unavailable (serve-stale mode).
    pub failed_refresh: Option<Instant>,
}

/// Derived ciphers by field name.
type FieldCiphers = HashMap<Box<str>, Arc<FieldCipher>>;

/// Unwrapped key and derived ciphers of one tenant key version.
#[derive(Default)]
pub struct VersionEntry {
    /// The unwrapped tenant key version, filled by one KMS call.
    pub key: OnceCell<SecretKey>,
    fields: RwLock<FieldCiphers>,
    indexes: RwLock<HashMap<Box<str>, Arc<IndexKey>>>,
}

impl VersionEntry {
    /// The cached blind-index key for `field`, or one built by `make` and cached.
    ///
    /// # Errors
    /// Whatever `make` returns; nothing is cached then.
    pub fn index_key<E>(
        &self,
        field: &str,
        make: impl FnOnce() -> Result<IndexKey, E>,
    ) -> Result<Arc<IndexKey>, E> {
        if let Some(k) = self
            .indexes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(field)
        {
            return Ok(k.clone());
        }
        let made = Arc::new(make()?);
        let mut w = self.indexes.write().unwrap_or_else(|p| p.into_inner());
        Ok(w.entry(field.into()).or_insert(made).clone())
    }

    /// The cached cipher for `field`, or one built by `make` and cached.
    pub fn field_cipher(
        &self,
        field: &str,
        make: impl FnOnce() -> FieldCipher,
    ) -> Arc<FieldCipher> {
        if let Some(c) = self
            .fields
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(field)
        {
            return c.clone();
        }
        let mut w = self.fields.write().unwrap_or_else(|p| p.into_inner());
        w.entry(field.into())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }
}

/// Everything cached about one tenant.
pub struct TenantEntry {
    /// Stored metadata (versions, states, wrapped keys).
    pub meta: ArcSwap<Snapshot<TenantRecord>>,
    /// Single-flight guard for metadata refreshes (owned by a background refresh).
    pub refresh: Arc<Mutex<()>>,
    versions: RwLock<HashMap<u32, Arc<VersionEntry>>>,
    /// Unwrapped subject-wrapping keys by SWK id (`<epoch>:<tenant>`).
    swks: RwLock<HashMap<Box<str>, Arc<OnceCell<SecretKey>>>>,
}

impl TenantEntry {
    /// A new entry around freshly read metadata.
    pub fn new(record: TenantRecord) -> Self {
        Self {
            meta: ArcSwap::from_pointee(Snapshot {
                record,
                fetched: Instant::now(),
                failed_refresh: None,
            }),
            refresh: Arc::new(Mutex::new(())),
            versions: RwLock::new(HashMap::new()),
            swks: RwLock::new(HashMap::new()),
        }
    }

    /// The entry for one key version (created empty on first use).
    pub fn version(&self, version: u32) -> Arc<VersionEntry> {
        if let Some(v) = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&version)
        {
            return v.clone();
        }
        let mut w = self.versions.write().unwrap_or_else(|p| p.into_inner());
        w.entry(version).or_default().clone()
    }

    /// The cell of the subject-wrapping key `id` (created empty on first use).
    pub fn swk(&self, id: &str) -> Arc<OnceCell<SecretKey>> {
        if let Some(c) = self.swks.read().unwrap_or_else(|p| p.into_inner()).get(id) {
            return c.clone();
        }
        let mut w = self.swks.write().unwrap_or_else(|p| p.into_inner());
        w.entry(id.into()).or_default().clone()
    }

    /// Drops (and so zeroizes, once unused) the cached subject-wrapping keys of epochs
    /// below `epoch`.
    pub fn forget_swks_below(&self, epoch: u64) {
        self.swks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| {
                id.split_once(':')
                    .and_then(|(e, _)| e.parse::<u64>().ok())
                    .is_some_and(|e| e >= epoch)
            });
    }

    /// Drops (and so zeroizes, once unused) the cached key of `version`. Returns
    /// whether there was one.
    pub fn forget_version(&self, version: u32) -> bool {
        self.versions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&version)
            .is_some()
    }
}

/// Everything cached about one subject.
pub struct SubjectEntry {
    /// Stored subject record.
    pub meta: ArcSwap<Snapshot<SubjectRecord>>,
    /// Single-flight guard for metadata refreshes (owned by a background refresh).
    pub refresh: Arc<Mutex<()>>,
    /// The unwrapped subject key material.
    pub key: OnceCell<SecretKey>,
    fields: RwLock<HashMap<u32, FieldCiphers>>,
}

impl SubjectEntry {
    /// A new entry around a freshly read record.
    pub fn new(record: SubjectRecord) -> Self {
        Self {
            meta: ArcSwap::from_pointee(Snapshot {
                record,
                fetched: Instant::now(),
                failed_refresh: None,
            }),
            refresh: Arc::new(Mutex::new(())),
            key: OnceCell::new(),
            fields: RwLock::new(HashMap::new()),
        }
    }

    /// The cached cipher for (`version`, `field`), or one built by `make` and cached.
    pub fn field_cipher(
        &self,
        version: u32,
        field: &str,
        make: impl FnOnce() -> FieldCipher,
    ) -> Arc<FieldCipher> {
        if let Some(c) = self
            .fields
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&version)
            .and_then(|m| m.get(field))
        {
            return c.clone();
        }
        let mut w = self.fields.write().unwrap_or_else(|p| p.into_inner());
        w.entry(version)
            .or_default()
            .entry(field.into())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }
}

/// Counters for observability and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Tenant entries found in the cache.
    pub hits: AtomicU64,
    /// Tenant entries loaded from the store.
    pub misses: AtomicU64,
    /// Entries evicted or invalidated.
    pub evictions: AtomicU64,
}

/// The hot-key cache (a handle: clones share the same entries).
#[derive(Clone)]
pub struct KeyCache {
    tenants: Cache<String, Arc<TenantEntry>>,
    subjects: Cache<(String, String), Arc<SubjectEntry>>,
    stats: Arc<CacheStats>,
}

impl KeyCache {
    /// A cache with the given bounds.
    pub fn new(cfg: &CacheConfig) -> Self {
        let stats = Arc::new(CacheStats::default());
        let s1 = stats.clone();
        let s2 = stats.clone();
        Self {
            tenants: Cache::builder()
                .max_capacity(cfg.max_tenants)
                .time_to_live(cfg.key_ttl)
                .eviction_listener(move |_k, _v, _cause| {
                    s1.evictions.fetch_add(1, Ordering::Relaxed);
                })
                .build(),
            subjects: Cache::builder()
                .max_capacity(cfg.max_subjects)
                .time_to_live(cfg.key_ttl)
                .eviction_listener(move |_k, _v, _cause| {
                    s2.evictions.fetch_add(1, Ordering::Relaxed);
                })
                .build(),
            stats,
        }
    }

    /// The ids of every cached tenant now (for revalidating them all at once).
    pub fn tenant_keys(&self) -> Vec<String> {
        self.tenants
            .iter()
            .map(|(k, _)| k.as_ref().clone())
            .collect()
    }

    /// The (tenant, subject) ids of every cached subject now.
    pub fn subject_keys(&self) -> Vec<(String, String)> {
        self.subjects
            .iter()
            .map(|(k, _)| k.as_ref().clone())
            .collect()
    }

    /// The tenant's entry if it is cached (never loads).
    pub async fn tenant_if_cached(&self, tenant: &str) -> Option<Arc<TenantEntry>> {
        self.tenants.get(tenant).await
    }

    /// The subject's entry if it is cached (never loads).
    pub async fn subject_if_cached(
        &self,
        tenant: &str,
        subject: &str,
    ) -> Option<Arc<SubjectEntry>> {
        self.subjects
            .get(&(tenant.to_owned(), subject.to_owned()))
            .await
    }

    /// Counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The tenant's entry, loading it with `load` on a miss. Concurrent misses for one
    /// tenant share a single load.
    ///
    /// # Errors
    /// Whatever `load` returns; nothing is cached on error.
    pub async fn tenant<E, F>(
        &self,
        tenant: &str,
        load: impl FnOnce() -> F,
    ) -> Result<Arc<TenantEntry>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: std::future::Future<Output = Result<TenantEntry, E>>,
    {
        if let Some(e) = self.tenants.get(tenant).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        // The miss path (a store read, a KMS call) is boxed, so that the hit path's
        // future, which every call's future embeds, stays small (see `subject`).
        Box::pin(
            self.tenants
                .try_get_with(tenant.to_owned(), async { load().await.map(Arc::new) }),
        )
        .await
    }

    /// The subject's entry, loading it with `load` on a miss (single-flight).
    ///
    /// # Errors
    /// Whatever `load` returns; nothing is cached on error.
    pub async fn subject<E, F>(
        &self,
        tenant: &str,
        subject: &str,
        load: impl FnOnce() -> F,
    ) -> Result<Arc<SubjectEntry>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: std::future::Future<Output = Result<SubjectEntry, E>>,
    {
        let key = (tenant.to_owned(), subject.to_owned());
        if let Some(e) = self.subjects.get(&key).await {
            return Ok(e);
        }
        // The loader is made, and the miss path boxed, only on a miss: an async
        // function's future is as large as its largest state, and a subject's load
        // (store read, epoch key, KMS, insert) made every Encrypt's future ~10 KiB,
        // copied several times per call (memmove was ~8% of a served Encrypt).
        Box::pin(
            self.subjects
                .try_get_with(key, async { load().await.map(Arc::new) }),
        )
        .await
    }

    /// Drops a tenant's entry and all its subjects' entries (keys zeroized once unused).
    pub async fn invalidate_tenant(&self, tenant: &str) {
        self.tenants.invalidate(tenant).await;
        self.invalidate_subjects_of(tenant).await;
    }

    /// Drops the entries of every subject of `tenant`.
    pub async fn invalidate_subjects_of(&self, tenant: &str) {
        let t = tenant.to_owned();
        // Subjects of the tenant: moka's invalidate_entries_if needs a closure-enabled
        // cache; a scan is fine here (administrative path, bounded cache).
        let keys: Vec<_> = self
            .subjects
            .iter()
            .filter(|(k, _)| k.0 == t)
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in keys {
            self.subjects.invalidate(&k).await;
        }
    }

    /// Drops one subject's entry.
    pub async fn invalidate_subject(&self, tenant: &str, subject: &str) {
        self.subjects
            .invalidate(&(tenant.to_owned(), subject.to_owned()))
            .await;
    }

    /// Drops every entry (their keys are wiped once in-flight requests release them).
    pub async fn clear(&self) {
        self.tenants.invalidate_all();
        self.subjects.invalidate_all();
        self.run_pending_tasks().await;
    }

    /// Runs moka's pending maintenance (evictions) now; normally it runs lazily.
    pub async fn run_pending_tasks(&self) {
        self.tenants.run_pending_tasks().await;
        self.subjects.run_pending_tasks().await;
    }

    /// Number of cached tenants and subjects (approximate, for metrics).
    pub fn sizes(&self) -> (u64, u64) {
        (self.tenants.entry_count(), self.subjects.entry_count())
    }
}

#[cfg(test)]
mod tests {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}

    /// What the cache holds wipes itself when moka drops it: the unwrapped key's
    /// `SecretBox` and the field cipher's AES key schedule.
    #[test]
    fn cached_key_material_types_zeroize_on_drop() {
        wiped_on_drop::<secrecy::SecretBox<[u8; crate::crypto::KEY_LEN]>>();
        wiped_on_drop::<crate::crypto::Xaes256Gcm>();
    }
}
