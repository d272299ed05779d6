//! Keeping cached key metadata fresh: the cache's tenant and subject entries, their
//! revalidation against the store (stale-while-revalidate: single-flight background
//! re-reads from three quarters of `revalidate_after`, bounded by it; a stale snapshot serves for up to
//! `max_stale` while the store is unreachable, and a call never waits more than
//! [`STALE_WAIT`] on a store that does not answer), reads through a circuit breaker
//! towards the store, and following the store's change feed so other replicas'
//! shreds and suspensions apply here at once (a lost feed revalidates everything).
//!
//! Does not decide which key encrypts or may decrypt (`resolution.rs`) nor change key
//! states (`lifecycle.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, oneshot};

use crate::breaker::Breaker;
use crate::cache::{KeyCache, Snapshot, SubjectEntry, TenantEntry};
use crate::crypto::Scope;
use crate::error::{Error, Result};
use crate::model::{KeyState, SubjectRecord, TenantRecord};
use crate::store::{Change, KeyStore, StoreError};

use super::{Keyring, unshare};

/// What [`Keyring::fresh`] found. (Whether the snapshot was just re-read matters to
/// nobody since the re-read's consequences moved into the background refresh.)
enum Fresh<T> {
    /// The snapshot to use (fresh, just re-read, or stale within `max_stale`).
    Found(Arc<Snapshot<T>>),
    /// The record no longer exists.
    Gone,
}

impl Keyring {
    /// Follows key-state changes announced by other processes sharing the store
    /// (PostgreSQL `LISTEN/NOTIFY`), dropping the affected cache entries (and their
    /// unwrapped keys) as each arrives, so a shred or suspension elsewhere applies here
    /// within milliseconds rather than within `revalidate_after`. Returns `None` where
    /// the store has no notifications (SQLite). The task stops when the keyring is
    /// dropped.
    ///
    /// # Errors
    /// [`Error::Store`] if the notification connection cannot be opened.
    pub async fn follow_changes(self: &Arc<Self>) -> Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(mut rx) = self.store.changes().await? else {
            return Ok(None);
        };
        let weak = Arc::downgrade(self);
        Ok(Some(tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let Some(keyring) = weak.upgrade() else { break };
                match change {
                    Change::Key {
                        tenant,
                        subject: Some(subject),
                    } => keyring.cache.invalidate_subject(&tenant, &subject).await,
                    Change::Key {
                        tenant,
                        subject: None,
                    } => {
                        keyring.cache.invalidate_tenant(&tenant).await;
                        keyring.cache.invalidate_subjects_of(&tenant).await;
                    }
                    // Notifications may have been missed: every cached snapshot is
                    // re-read before its next use serves it, and all of them now.
                    Change::Lost => {
                        let ns = u64::try_from(keyring.born.elapsed().as_nanos())
                            .unwrap_or(u64::MAX)
                            .max(1);
                        keyring
                            .notifications_lost
                            .store(ns, std::sync::atomic::Ordering::Release);
                        keyring.revalidate_all();
                    }
                }
            }
        })))
    }

    /// Whether change notifications were lost after `fetched` (so a snapshot read then
    /// may have missed a shred or suspension).
    pub(super) fn missed_changes_since(&self, fetched: Instant) -> bool {
        let lost = self
            .notifications_lost
            .load(std::sync::atomic::Ordering::Acquire);
        lost != 0
            && u64::try_from(fetched.saturating_duration_since(self.born).as_nanos())
                .unwrap_or(u64::MAX)
                < lost
    }

    /// Announces a change to other processes (best effort: revalidation covers a lost
    /// announcement).
    pub async fn announce(&self, tenant: &str, subject: Option<&str>) {
        if let Err(e) = self.store.announce(tenant, subject).await {
            tracing::warn!(error = %e, tenant, "could not announce a key change to other replicas");
        }
    }

    /// After a change to `tenant`'s versions made here: drops the cached entry (and
    /// its unwrapped keys) and tells other replicas.
    pub(super) async fn tenant_changed(&self, tenant: &str) {
        self.cache.invalidate_tenant(tenant).await;
        self.announce(tenant, None).await;
    }

    /// After a change to a subject's key made here: drops the cached entry (and its
    /// unwrapped key) and tells other replicas.
    pub(super) async fn subject_changed(&self, tenant: &str, subject: &str) {
        self.cache.invalidate_subject(tenant, subject).await;
        self.announce(tenant, Some(subject)).await;
    }

    pub(super) async fn load_tenant_record(&self, tenant: &str) -> Result<TenantRecord> {
        read_through(&self.store_breaker, self.store.get_tenant(tenant))
            .await?
            .ok_or_else(|| Error::TenantNotFound {
                tenant: tenant.to_owned(),
            })
    }

    pub(super) async fn tenant_entry(&self, tenant: &str) -> Result<Arc<TenantEntry>> {
        self.cache
            .tenant(tenant, || async {
                self.load_tenant_record(tenant).await.map(TenantEntry::new)
            })
            .await
            .map_err(unshare)
    }

    /// Every cached tenant and subject read before the loss re-read from the store now,
    /// in the background, one after the other: after notifications were lost, a shred or
    /// suspension made elsewhere meanwhile applies as soon as the store answers, not on
    /// each entry's next use. One sweep at a time (a loss during a sweep is covered by
    /// it: entries are looked up as it reaches them and skipped if read since the loss);
    /// it stops at the first store failure (each entry's own re-reads take over then,
    /// through the breaker).
    pub(super) fn revalidate_all(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(k) = weak.upgrade() else { return };
            let tenants = k.cache.tenant_keys();
            let subjects = k.cache.subject_keys();
            drop(k);
            let _ = sweep(&weak, tenants, subjects).await;
            if let Some(k) = weak.upgrade() {
                k.sweeping.store(false, Ordering::Release);
            }
        });
    }

    /// The snapshot to use now, with stale-while-revalidate:
    ///
    /// - younger than three quarters of `revalidate_after`: as it is;
    /// - older: still served, and re-read in the background (one read per entry at a
    ///   time), so that entries in use are refreshed before they expire;
    /// - older than `revalidate_after`, or fetched before notifications were lost, or
    ///   `force`d: the call starts (or joins) a re-read and waits for it, but while a
    ///   stale snapshot may serve (younger than `max_stale`, not forced) for at most
    ///   [`STALE_WAIT`]: a store that does not answer that fast keeps being waited for
    ///   in the background, never on the request path. Once a read has failed, calls
    ///   serve the stale snapshot at once until `store_retry_after` has passed.
    async fn fresh<E: Followed>(
        &self,
        entry: &Arc<E>,
        key: &EntryKey,
        force: bool,
    ) -> Result<Fresh<E::Record>> {
        let snap = entry.meta().load_full();
        let age = snap.fetched.elapsed();
        let hard =
            force || self.missed_changes_since(snap.fetched) || age >= self.cfg.revalidate_after;
        let stale_ok = !force && age < self.cfg.max_stale;
        let failed_recently = snap
            .failed_refresh
            .is_some_and(|f| f.elapsed() < self.cfg.store_retry_after);
        if !hard {
            if age >= self.cfg.revalidate_after * 3 / 4 && !failed_recently {
                // Refresh-ahead; nobody waits for it.
                drop(self.start_refresh(entry, key));
            }
            return Ok(Fresh::Found(snap));
        }
        if stale_ok && failed_recently {
            return Ok(Fresh::Found(snap));
        }
        let Some(done) = self.start_refresh(entry, key) else {
            // A re-read is already under way.
            if stale_ok {
                return Ok(Fresh::Found(snap));
            }
            // Nothing stale may serve: wait for that read, then use what it stored.
            let started = Instant::now();
            drop(entry.refresh_lock().lock().await);
            let now = entry.meta().load_full();
            return match now.failed_refresh {
                Some(f) if f >= started => {
                    Err(Error::Store(StoreError::no_answer(STORE_READ_TIMEOUT)))
                }
                _ => Ok(Fresh::Found(now)),
            };
        };
        let outcome = if stale_ok {
            match tokio::time::timeout(STALE_WAIT, done).await {
                Ok(o) => o,
                Err(_) => return Ok(Fresh::Found(snap)),
            }
        } else {
            done.await
        };
        match outcome {
            Ok(Refreshed::Record(new)) => Ok(Fresh::Found(new)),
            Ok(Refreshed::Gone) => Ok(Fresh::Gone),
            Ok(Refreshed::Failed(StoreError::Unavailable(_))) if stale_ok => Ok(Fresh::Found(snap)),
            Ok(Refreshed::Failed(e)) => Err(e.into()),
            // The refresh task was dropped (runtime shutting down).
            Err(_) => Ok(Fresh::Found(snap)),
        }
    }

    /// Starts a background re-read of `entry` unless one is under way; the receiver
    /// gets its outcome.
    fn start_refresh<E: Followed>(
        &self,
        entry: &Arc<E>,
        key: &EntryKey,
    ) -> Option<oneshot::Receiver<Refreshed<E::Record>>> {
        let guard = entry.refresh_lock().clone().try_lock_owned().ok()?;
        let (tx, rx) = oneshot::channel();
        let (entry, key) = (entry.clone(), key.clone());
        let (store, breaker, cache) = (
            self.store.clone(),
            self.store_breaker.clone(),
            self.cache.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            let read = E::read(&store, &key);
            let outcome = match read_through(&breaker, read).await {
                Ok(Some(record)) => {
                    let new = Arc::new(Snapshot {
                        record,
                        fetched: Instant::now(),
                        failed_refresh: None,
                    });
                    entry.meta().store(new.clone());
                    entry.after_refresh(&new.record, &cache, &key).await;
                    Refreshed::Record(new)
                }
                Ok(None) => {
                    E::forget(&cache, &key).await;
                    Refreshed::Gone
                }
                // Unavailable: the snapshot may serve stale (within max_stale) and the store
                // is left alone until store_retry_after. Any other failure (a query
                // error, corrupt data) is no reason to serve stale: the next use re-reads.
                Err(e @ StoreError::Unavailable(_)) => {
                    let old = entry.meta().load_full();
                    tracing::warn!(error = %e, age_ms = old.fetched.elapsed().as_millis() as u64,
                        "key store unavailable; serving cached key metadata");
                    entry.meta().store(Arc::new(Snapshot {
                        record: old.record.clone(),
                        fetched: old.fetched,
                        failed_refresh: Some(Instant::now()),
                    }));
                    Refreshed::Failed(e)
                }
                Err(e) => Refreshed::Failed(e),
            };
            let _ = tx.send(outcome);
        });
        Some(rx)
    }

    pub(super) async fn tenant_snapshot(
        &self,
        entry: &Arc<TenantEntry>,
        tenant: &str,
        force: bool,
    ) -> Result<Arc<Snapshot<TenantRecord>>> {
        let key = EntryKey {
            tenant: tenant.to_owned(),
            subject: None,
        };
        match self.fresh(entry, &key, force).await? {
            Fresh::Found(snap) => Ok(snap),
            Fresh::Gone => Err(Error::TenantNotFound {
                tenant: tenant.to_owned(),
            }),
        }
    }

    pub(super) async fn subject_snapshot(
        &self,
        entry: &Arc<SubjectEntry>,
        tenant: &str,
        subject: &str,
    ) -> Result<Arc<Snapshot<SubjectRecord>>> {
        let key = EntryKey {
            tenant: tenant.to_owned(),
            subject: Some(subject.to_owned()),
        };
        match self.fresh(entry, &key, false).await? {
            Fresh::Found(snap) if snap.record.state == KeyState::Destroyed => {
                // Shredded (possibly on another replica): drop the cached entry so its
                // unwrapped key is wiped, and report the tombstone.
                self.cache.invalidate_subject(tenant, subject).await;
                Err(Error::KeyDestroyed {
                    tenant: tenant.to_owned(),
                    scope: Scope::Subject,
                    version: None,
                })
            }
            Fresh::Found(snap) => Ok(snap),
            Fresh::Gone => Err(Error::SubjectNotFound {
                tenant: tenant.to_owned(),
            }),
        }
    }
}

/// The sweep of [`Keyring::revalidate_all`]: each entry still cached and read before
/// the loss, re-read and waited for. `Err` at the first store failure.
async fn sweep(
    weak: &std::sync::Weak<Keyring>,
    tenants: Vec<String>,
    subjects: Vec<(String, String)>,
) -> Result<()> {
    for tenant in tenants {
        let Some(k) = weak.upgrade() else {
            return Ok(());
        };
        if let Some(entry) = k.cache.tenant_if_cached(&tenant).await
            && k.missed_changes_since(entry.meta.load().fetched)
        {
            let key = EntryKey {
                tenant,
                subject: None,
            };
            if let Err(e @ Error::Store(_)) = k.fresh(&entry, &key, true).await {
                return Err(e);
            }
        }
    }
    for (tenant, subject) in subjects {
        let Some(k) = weak.upgrade() else {
            return Ok(());
        };
        if let Some(entry) = k.cache.subject_if_cached(&tenant, &subject).await
            && k.missed_changes_since(entry.meta.load().fetched)
        {
            let key = EntryKey {
                tenant,
                subject: Some(subject),
            };
            if let Err(e @ Error::Store(_)) = k.fresh(&entry, &key, true).await {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// How long a call waits for a re-read of a snapshot it could serve stale (the
/// store's normal answer takes about a millisecond).
pub const STALE_WAIT: Duration = Duration::from_millis(5);

/// Which entry a refresh reads.
#[derive(Debug, Clone)]
pub(super) struct EntryKey {
    tenant: String,
    subject: Option<String>,
}

/// The outcome of a background re-read.
enum Refreshed<T> {
    Record(Arc<Snapshot<T>>),
    Gone,
    Failed(StoreError),
}

type StoreRead<T> =
    Pin<Box<dyn Future<Output = std::result::Result<Option<T>, StoreError>> + Send>>;

/// How long a keyring read of key metadata may take: past it the read counts as
/// unavailable (a pooled connection that died silently would otherwise hold it until
/// TCP gives up).
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A store read through the keyring's breaker towards the store, within
/// [`STORE_READ_TIMEOUT`]: refused at once while the breaker is open; unavailability
/// (and no answer in time) counts against it, any answer closes it.
pub(super) async fn read_through<T>(
    breaker: &Breaker,
    read: impl Future<Output = std::result::Result<T, StoreError>>,
) -> std::result::Result<T, StoreError> {
    let ticket = breaker
        .admit()
        .map_err(|o| StoreError::circuit_open(o.retry_after))?;
    let out = tokio::time::timeout(STORE_READ_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(StoreError::no_answer(STORE_READ_TIMEOUT)));
    match &out {
        Err(StoreError::Unavailable(_)) => ticket.failed(),
        _ => ticket.succeeded(),
    }
    out
}

/// A cache entry whose metadata snapshot is kept fresh from the store.
trait Followed: Send + Sync + 'static {
    type Record: Clone + Send + Sync + 'static;
    fn meta(&self) -> &ArcSwap<Snapshot<Self::Record>>;
    fn refresh_lock(&self) -> &Arc<Mutex<()>>;
    /// The store read of this entry's record.
    fn read(store: &Arc<dyn KeyStore>, key: &EntryKey) -> StoreRead<Self::Record>;
    /// After a re-read: drop what the new record makes obsolete.
    fn after_refresh(
        &self,
        record: &Self::Record,
        cache: &KeyCache,
        key: &EntryKey,
    ) -> impl Future<Output = ()> + Send;
    /// The record no longer exists: drop the entry.
    fn forget(cache: &KeyCache, key: &EntryKey) -> impl Future<Output = ()> + Send;
}

impl Followed for TenantEntry {
    type Record = TenantRecord;

    fn meta(&self) -> &ArcSwap<Snapshot<TenantRecord>> {
        &self.meta
    }

    fn refresh_lock(&self) -> &Arc<Mutex<()>> {
        &self.refresh
    }

    fn read(store: &Arc<dyn KeyStore>, key: &EntryKey) -> StoreRead<TenantRecord> {
        let (store, tenant) = (store.clone(), key.tenant.clone());
        Box::pin(async move { store.get_tenant(&tenant).await })
    }

    async fn after_refresh(&self, record: &TenantRecord, cache: &KeyCache, key: &EntryKey) {
        // Only a re-read can reveal a version destroyed elsewhere (local destruction
        // drops the whole entry), so this stays off the hot path.
        let mut newly_destroyed = false;
        for v in &record.versions {
            if matches!(v.state, KeyState::Destroyed | KeyState::Retired) {
                newly_destroyed |= self.forget_version(v.version);
            }
        }
        if newly_destroyed {
            // Subject entries hold ciphers derived from that version: drop them too, so
            // no derived copy of a destroyed key stays in memory.
            cache.invalidate_subjects_of(&key.tenant).await;
        }
    }

    async fn forget(cache: &KeyCache, key: &EntryKey) {
        cache.invalidate_tenant(&key.tenant).await;
    }
}

impl Followed for SubjectEntry {
    type Record = SubjectRecord;

    fn meta(&self) -> &ArcSwap<Snapshot<SubjectRecord>> {
        &self.meta
    }

    fn refresh_lock(&self) -> &Arc<Mutex<()>> {
        &self.refresh
    }

    fn read(store: &Arc<dyn KeyStore>, key: &EntryKey) -> StoreRead<SubjectRecord> {
        let (store, tenant, subject) = (
            store.clone(),
            key.tenant.clone(),
            key.subject.clone().unwrap_or_default(),
        );
        Box::pin(async move { store.get_subject(&tenant, &subject).await })
    }

    async fn after_refresh(&self, record: &SubjectRecord, cache: &KeyCache, key: &EntryKey) {
        if record.state == KeyState::Destroyed {
            Self::forget(cache, key).await;
        }
    }

    async fn forget(cache: &KeyCache, key: &EntryKey) {
        if let Some(subject) = &key.subject {
            cache.invalidate_subject(&key.tenant, subject).await;
        }
    }
}
