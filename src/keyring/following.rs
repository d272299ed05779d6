//! Keeping cached key metadata fresh: the cache's tenant and subject entries, their
//! revalidation against the store (single-flight, bounded by `revalidate_after`; a
//! stale snapshot serves for up to `max_stale` while the store is unreachable), and
//! following the store's change feed so other replicas' shreds and suspensions apply
//! here at once.
//!
//! Does not decide which key encrypts or may decrypt (`resolution.rs`) nor change key
//! states (`lifecycle.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::cache::{Snapshot, SubjectEntry, TenantEntry};
use crate::crypto::Scope;
use crate::error::{Error, Result};
use crate::model::{KeyState, SubjectRecord, TenantRecord};
use crate::store::{Change, StoreError};

use super::{Keyring, unshare};

enum Fresh<T> {
    /// The snapshot in hand (still fresh, refreshed by another task, or stale during a
    /// store outage).
    Found(Arc<Snapshot<T>>),
    /// A snapshot this call just re-read from the store.
    Refreshed(Arc<Snapshot<T>>),
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
                    // re-read on its next use.
                    Change::Lost => {
                        let ns = u64::try_from(keyring.born.elapsed().as_nanos())
                            .unwrap_or(u64::MAX)
                            .max(1);
                        keyring
                            .notifications_lost
                            .store(ns, std::sync::atomic::Ordering::Release);
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
        self.store
            .get_tenant(tenant)
            .await?
            .ok_or_else(|| Error::TenantNotFound {
                tenant: tenant.to_owned(),
            })
    }

    pub(super) async fn tenant_entry(&self, tenant: &str) -> Result<Arc<TenantEntry>> {
        self.cache
            .tenant(tenant, async {
                self.load_tenant_record(tenant).await.map(TenantEntry::new)
            })
            .await
            .map_err(unshare)
    }

    /// Re-reads a snapshot when older than `revalidate_after` (single-flight); serves a
    /// stale one while the store is unavailable, up to `max_stale`.
    async fn fresh<T, F, Fut>(
        &self,
        meta: &ArcSwap<Snapshot<T>>,
        lock: &Mutex<()>,
        force: bool,
        fetch: F,
    ) -> Result<Fresh<T>>
    where
        T: Clone,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<T>, StoreError>>,
    {
        let snap = meta.load_full();
        let force = force || self.missed_changes_since(snap.fetched);
        if !force && snap.fetched.elapsed() < self.cfg.revalidate_after {
            return Ok(Fresh::Found(snap));
        }
        let started = Instant::now();
        let _guard = lock.lock().await;
        let snap = meta.load_full();
        let refreshed_meanwhile = snap.fetched >= started;
        if refreshed_meanwhile || (!force && snap.fetched.elapsed() < self.cfg.revalidate_after) {
            return Ok(Fresh::Found(snap));
        }
        let stale_ok = snap.fetched.elapsed() < self.cfg.max_stale;
        if let Some(failed) = snap.failed_refresh
            && stale_ok
            && failed.elapsed() < self.cfg.store_retry_after
        {
            return Ok(Fresh::Found(snap));
        }
        match fetch().await {
            Ok(Some(record)) => {
                let new = Arc::new(Snapshot {
                    record,
                    fetched: Instant::now(),
                    failed_refresh: None,
                });
                meta.store(new.clone());
                Ok(Fresh::Refreshed(new))
            }
            Ok(None) => Ok(Fresh::Gone),
            Err(StoreError::Unavailable(e)) if stale_ok => {
                tracing::warn!(error = %e, age_ms = snap.fetched.elapsed().as_millis() as u64,
                    "key store unavailable; serving cached key metadata");
                let stale = Arc::new(Snapshot {
                    record: snap.record.clone(),
                    fetched: snap.fetched,
                    failed_refresh: Some(Instant::now()),
                });
                meta.store(stale.clone());
                Ok(Fresh::Found(stale))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn tenant_snapshot(
        &self,
        entry: &TenantEntry,
        tenant: &str,
        force: bool,
    ) -> Result<Arc<Snapshot<TenantRecord>>> {
        match self
            .fresh(&entry.meta, &entry.refresh, force, || {
                self.store.get_tenant(tenant)
            })
            .await?
        {
            Fresh::Found(snap) => Ok(snap),
            Fresh::Refreshed(snap) => {
                // Only a re-read can reveal a version destroyed elsewhere (local
                // destruction drops the whole entry), so this stays off the hot path.
                let mut newly_destroyed = false;
                for v in &snap.record.versions {
                    if matches!(v.state, KeyState::Destroyed | KeyState::Retired) {
                        newly_destroyed |= entry.forget_version(v.version);
                    }
                }
                if newly_destroyed {
                    // Subject entries hold ciphers derived from that version: drop them
                    // too, so no derived copy of a destroyed key stays in memory.
                    self.cache.invalidate_subjects_of(tenant).await;
                }
                Ok(snap)
            }
            Fresh::Gone => {
                self.cache.invalidate_tenant(tenant).await;
                Err(Error::TenantNotFound {
                    tenant: tenant.to_owned(),
                })
            }
        }
    }

    pub(super) async fn subject_snapshot(
        &self,
        entry: &SubjectEntry,
        tenant: &str,
        subject: &str,
    ) -> Result<Arc<Snapshot<SubjectRecord>>> {
        match self
            .fresh(&entry.meta, &entry.refresh, false, || {
                self.store.get_subject(tenant, subject)
            })
            .await?
        {
            Fresh::Found(snap) | Fresh::Refreshed(snap)
                if snap.record.state == KeyState::Destroyed =>
            {
                // Shredded (possibly on another replica): drop the cached entry so its
                // unwrapped key is wiped, and report the tombstone.
                self.cache.invalidate_subject(tenant, subject).await;
                Err(Error::KeyDestroyed {
                    tenant: tenant.to_owned(),
                    scope: Scope::Subject,
                    version: None,
                })
            }
            Fresh::Found(snap) | Fresh::Refreshed(snap) => Ok(snap),
            Fresh::Gone => {
                self.cache.invalidate_subject(tenant, subject).await;
                Err(Error::SubjectNotFound {
                    tenant: tenant.to_owned(),
                })
            }
        }
    }
}
