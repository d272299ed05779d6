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

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::cache::{CacheConfig, KeyCache, Snapshot, SubjectEntry, TenantEntry, VersionEntry};
use crate::crypto::{
    self, Aad, Envelope, FieldCipher, Plaintext, Scope, SecretKey, unwrap_subject_key, validate_id,
    wrap_subject_key,
};
use crate::error::{Error, Result};
use crate::kms::{EncryptionContext, Kms};
use crate::store::{
    Change, ErasureLedger, KeyState, KeyStore, KeyVersionRecord, NewKeyVersion, NewSubject,
    StoreError, SubjectRecord, TenantRecord,
};

mod index;
mod info;
mod rotation;
pub use index::{IndexProfiles, Indexed, Indexer};
pub use info::{SubjectInfo, TenantInfo, VersionInfo};
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
}

impl Default for KeyringConfig {
    fn default() -> Self {
        Self {
            cache: CacheConfig::default(),
            revalidate_after: Duration::from_secs(1),
            max_stale: Duration::from_secs(300),
            store_retry_after: Duration::from_secs(1),
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
    fn missed_changes_since(&self, fetched: Instant) -> bool {
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

    /// Fails closed if the erasure ledger records `tenant` (or `subject`) as erased;
    /// then destroys the key material again if a restored store brought it back.
    async fn check_not_erased(&self, tenant: &str, subject: Option<&str>) -> Result<()> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        if !ledger.erased(tenant, subject).await? {
            return Ok(());
        }
        let reapplied = match subject {
            Some(s) if !ledger.erased(tenant, None).await? => {
                let tomb = self.store.tombstone_subject(tenant, s).await?;
                u64::from(tomb) + u64::from(self.store.destroy_subject(tenant, s).await?)
            }
            _ => {
                let (v, s) = self.store.shred_tenant(tenant).await?;
                v + s
            }
        };
        if reapplied > 0 {
            tracing::warn!(
                tenant,
                keys = reapplied,
                "erased key material was back in the key store (restored backup?); destroyed it again"
            );
            self.cache.invalidate_tenant(tenant).await;
            self.cache.invalidate_subjects_of(tenant).await;
            self.announce(tenant, None).await;
        }
        Err(Error::KeyDestroyed {
            tenant: tenant.to_owned(),
            scope: if subject.is_some() {
                Scope::Subject
            } else {
                Scope::Tenant
            },
            version: None,
        })
    }

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The KMS.
    pub fn kms(&self) -> &Arc<dyn Kms> {
        &self.kms
    }

    /// The hot-key cache (for metrics).
    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    /// How stale this keyring's view of key versions may be (its
    /// [`KeyringConfig::revalidate_after`]).
    pub fn revalidate_after(&self) -> Duration {
        self.cfg.revalidate_after
    }

    // ---------------------------------------------------------------- administration

    /// Creates a tenant with key version 1, wrapped by `kms_key_id` (bring-your-own-key)
    /// or the KMS's default key. Idempotent: an existing tenant is returned unchanged,
    /// and concurrent creations (tasks or processes) store exactly one key.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad id; [`Error::Kms`]; [`Error::Store`].
    pub async fn create_tenant(
        &self,
        tenant: &str,
        kms_key_id: Option<&str>,
    ) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        if let Some(k) = kms_key_id
            && (k.is_empty() || k.len() > 2048)
        {
            return Err(Error::InvalidArgument(
                "kms_key_id must be 1..=2048 bytes".into(),
            ));
        }
        if let Some(existing) = self.store.get_tenant(tenant).await? {
            return Ok(TenantInfo::from(&existing));
        }
        let key_id = kms_key_id
            .unwrap_or_else(|| self.kms.default_key_id())
            .to_owned();
        let dk = self
            .kms
            .generate_data_key(&key_id, &EncryptionContext::tenant_key(tenant, 1))
            .await?;
        let created = self
            .store
            .create_tenant(
                tenant,
                &key_id,
                NewKeyVersion {
                    version: 1,
                    kms_key_id: key_id.clone(),
                    wrapped: dk.wrapped,
                },
            )
            .await?;
        if created.was_created() {
            tracing::info!(tenant, kms_key_id = %key_id, "tenant created");
        }
        Ok(TenantInfo::from(&created.into_inner()))
    }

    /// A tenant's key versions and their states, read from the store.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn tenant(&self, tenant: &str) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        Ok(TenantInfo::from(&self.load_tenant_record(tenant).await?))
    }

    /// Rotates: a new version becomes active (new writes use it at once on this
    /// replica, within `revalidate_after` on others); the previous one becomes
    /// decrypt-only. If another rotation wins a race, its version is the result.
    ///
    /// # Errors
    /// [`Error::KeySuspended`] while the tenant is suspended; [`Error::TenantNotFound`];
    /// [`Error::Kms`]; [`Error::Store`].
    pub async fn rotate_tenant(&self, tenant: &str) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        let rec = self.load_tenant_record(tenant).await?;
        if self
            .store
            .live_erasure(tenant, None)
            .await?
            .is_some_and(|e| {
                matches!(
                    e.state,
                    crate::store::ErasureState::Executing | crate::store::ErasureState::Completed
                )
            })
        {
            // Erased: no new key generation, ever (the store refuses too).
            return Err(Error::KeyDestroyed {
                tenant: tenant.to_owned(),
                scope: Scope::Tenant,
                version: None,
            });
        }
        if let Some(v) = rec.versions.iter().find(|v| v.state == KeyState::Suspended) {
            return Err(Error::KeySuspended {
                tenant: tenant.to_owned(),
                scope: Scope::Tenant,
                version: Some(v.version),
            });
        }
        let next = rec
            .latest_version()
            .checked_add(1)
            .ok_or_else(|| Error::Internal("key version space exhausted".into()))?;
        let dk = self
            .kms
            .generate_data_key(
                &rec.kms_key_id,
                &EncryptionContext::tenant_key(tenant, next),
            )
            .await?;
        let added = self
            .store
            .add_key_version(
                tenant,
                NewKeyVersion {
                    version: next,
                    kms_key_id: rec.kms_key_id.clone(),
                    wrapped: dk.wrapped,
                },
            )
            .await?;
        if added {
            tracing::info!(tenant, version = next, "tenant key rotated");
        }
        self.cache.invalidate_tenant(tenant).await;
        self.announce(tenant, None).await;
        self.tenant(tenant).await
    }

    /// Suspends every usable version of a tenant (GDPR Art. 18 restriction): nothing of
    /// the tenant encrypts or decrypts until [`Keyring::resume_tenant`]. Idempotent.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn suspend_tenant(&self, tenant: &str) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        let rec = self.load_tenant_record(tenant).await?;
        for v in &rec.versions {
            if matches!(v.state, KeyState::Active | KeyState::DecryptOnly) {
                self.store
                    .update_key_state(
                        tenant,
                        v.version,
                        v.state,
                        KeyState::Suspended,
                        Some(v.state),
                    )
                    .await?;
            }
        }
        self.cache.invalidate_tenant(tenant).await;
        self.announce(tenant, None).await;
        self.tenant(tenant).await
    }

    /// Lifts a tenant suspension, restoring each version's previous state. Idempotent.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn resume_tenant(&self, tenant: &str) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        let rec = self.load_tenant_record(tenant).await?;
        for v in &rec.versions {
            if v.state == KeyState::Suspended {
                let back = v.resume_state.unwrap_or(KeyState::DecryptOnly);
                self.store
                    .update_key_state(tenant, v.version, KeyState::Suspended, back, None)
                    .await?;
            }
        }
        self.cache.invalidate_tenant(tenant).await;
        self.announce(tenant, None).await;
        self.tenant(tenant).await
    }

    /// Destroys one tenant key version: its wrapped material is erased from the store
    /// (a tombstone with its fingerprint stays) and cached copies are dropped and
    /// zeroized. Irreversible and idempotent. Returns whether this call destroyed it.
    ///
    /// # Errors
    /// [`Error::UnknownKeyVersion`]; [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn destroy_key_version(&self, tenant: &str, version: u32) -> Result<bool> {
        validate_id("tenant_id", tenant)?;
        let rec = self.load_tenant_record(tenant).await?;
        if rec.version(version).is_none() {
            return Err(Error::UnknownKeyVersion {
                tenant: tenant.to_owned(),
                version,
            });
        }
        let destroyed = self.store.destroy_key_version(tenant, version).await?;
        self.cache.invalidate_tenant(tenant).await;
        self.announce(tenant, None).await;
        if destroyed {
            tracing::info!(tenant, version, "tenant key version destroyed");
        }
        Ok(destroyed)
    }

    /// A subject's key state, read from the store.
    ///
    /// # Errors
    /// [`Error::SubjectNotFound`]; [`Error::Store`].
    pub async fn subject(&self, tenant: &str, subject: &str) -> Result<SubjectInfo> {
        validate_id("tenant_id", tenant)?;
        validate_id("subject_id", subject)?;
        self.store
            .get_subject(tenant, subject)
            .await?
            .map(|r| SubjectInfo::from(&r))
            .ok_or_else(|| Error::SubjectNotFound {
                tenant: tenant.to_owned(),
            })
    }

    /// Makes sure a subject has a key (created under the tenant's active version if it
    /// has none yet), e.g. to restrict processing before any data was written.
    ///
    /// # Errors
    /// As [`Keyring::encrypt`] for the subject.
    pub async fn ensure_subject(&self, tenant: &str, subject: &str) -> Result<SubjectInfo> {
        validate_id("tenant_id", tenant)?;
        validate_id("subject_id", subject)?;
        let tentry = self.tenant_entry(tenant).await?;
        let tsnap = self.tenant_snapshot(&tentry, tenant, false).await?;
        self.subject_entry(&tentry, &tsnap, tenant, subject, true)
            .await?;
        self.subject(tenant, subject).await
    }

    /// Suspends a subject's key (restriction of processing). Idempotent.
    ///
    /// # Errors
    /// [`Error::KeyDestroyed`] for a shredded subject; [`Error::SubjectNotFound`];
    /// [`Error::Store`].
    pub async fn suspend_subject(&self, tenant: &str, subject: &str) -> Result<SubjectInfo> {
        self.set_subject_state(tenant, subject, KeyState::Active, KeyState::Suspended)
            .await
    }

    /// Lifts a subject's suspension. Idempotent.
    ///
    /// # Errors
    /// As [`Keyring::suspend_subject`].
    pub async fn resume_subject(&self, tenant: &str, subject: &str) -> Result<SubjectInfo> {
        self.set_subject_state(tenant, subject, KeyState::Suspended, KeyState::Active)
            .await
    }

    async fn set_subject_state(
        &self,
        tenant: &str,
        subject: &str,
        from: KeyState,
        to: KeyState,
    ) -> Result<SubjectInfo> {
        let current = self.subject(tenant, subject).await?;
        if current.state == KeyState::Destroyed {
            return Err(Error::KeyDestroyed {
                tenant: tenant.to_owned(),
                scope: Scope::Subject,
                version: None,
            });
        }
        if current.state == from {
            self.store
                .update_subject_state(tenant, subject, from, to)
                .await?;
        }
        self.cache.invalidate_subject(tenant, subject).await;
        self.announce(tenant, Some(subject)).await;
        self.subject(tenant, subject).await
    }

    /// Destroys (crypto-shreds) a subject's key material: erased from the store
    /// (tombstone kept, so it is never silently re-created) and dropped from the cache.
    /// Irreversible and idempotent. Returns whether this call destroyed it.
    ///
    /// # Errors
    /// [`Error::SubjectNotFound`]; [`Error::Store`].
    pub async fn destroy_subject(&self, tenant: &str, subject: &str) -> Result<bool> {
        self.subject(tenant, subject).await?;
        let destroyed = self.store.destroy_subject(tenant, subject).await?;
        self.cache.invalidate_subject(tenant, subject).await;
        self.announce(tenant, Some(subject)).await;
        if destroyed {
            tracing::info!(tenant, "subject key destroyed");
        }
        Ok(destroyed)
    }

    /// Crypto-shreds a subject for an erasure: its key material is erased (a tombstone
    /// is inserted if it never had a key, so none is ever created for it), cached
    /// copies are dropped and zeroized, and other replicas are told (when anything
    /// changed). Idempotent.
    /// Returns whether this call destroyed anything.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn shred_subject(&self, tenant: &str, subject: &str) -> Result<bool> {
        validate_id("tenant_id", tenant)?;
        validate_id("subject_id", subject)?;
        let tomb = self.store.tombstone_subject(tenant, subject).await?;
        let destroyed = self.store.destroy_subject(tenant, subject).await?;
        self.cache.invalidate_subject(tenant, subject).await;
        if destroyed || tomb {
            self.announce(tenant, Some(subject)).await;
        }
        if destroyed {
            tracing::info!(tenant, "subject key shredded");
        }
        Ok(destroyed || tomb)
    }

    /// Crypto-shreds a whole tenant: every key version and every subject key (one
    /// transaction), cached copies dropped and zeroized, other replicas told (when
    /// anything changed).
    /// Idempotent. Returns (versions, subjects) destroyed by this call.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn shred_tenant(&self, tenant: &str) -> Result<(u64, u64)> {
        validate_id("tenant_id", tenant)?;
        let counts = self.store.shred_tenant(tenant).await?;
        self.cache.invalidate_tenant(tenant).await;
        self.cache.invalidate_subjects_of(tenant).await;
        if counts != (0, 0) {
            self.announce(tenant, None).await;
            tracing::info!(
                tenant,
                versions = counts.0,
                subjects = counts.1,
                "tenant keys shredded"
            );
        }
        Ok(counts)
    }

    // ---------------------------------------------------------------- data path

    /// Encrypts one field value under the tenant's active key version (and the
    /// subject's key, when `aad.subject` is set; a subject's key is created on first
    /// use). Returns a binary v1 envelope (see [`crypto::to_text`] for the text form).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]; [`Error::TenantNotFound`]; [`Error::KeySuspended`] /
    /// [`Error::KeyDestroyed`] for the tenant's current version or the subject;
    /// [`Error::Kms`] / [`Error::Store`] on a cache miss during an outage.
    pub async fn encrypt(&self, aad: &Aad<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.encryptor(aad.tenant, aad.subject, aad.field)
            .await?
            .seal(aad.context, plaintext)
    }

    /// Resolves, once, everything needed to encrypt many values of one (tenant,
    /// subject, field): the active key version and its field cipher. For batches; the
    /// result reflects key states at the time of the call and should not be kept.
    ///
    /// # Errors
    /// As [`Keyring::encrypt`].
    pub async fn encryptor<'a>(
        &self,
        tenant: &'a str,
        subject: Option<&'a str>,
        field: &'a str,
    ) -> Result<Encryptor<'a>> {
        let probe = Aad {
            tenant,
            subject,
            field,
            context: &[],
        };
        probe.validate()?;
        let tentry = self.tenant_entry(tenant).await?;
        let tsnap = self.tenant_snapshot(&tentry, tenant, false).await?;
        let active = active_version(tenant, &tsnap.record)?;
        let cipher = self.cipher(&tentry, &tsnap, active, &probe, true).await?;
        Ok(Encryptor {
            cipher,
            version: active.version,
            tenant,
            subject,
            field,
        })
    }

    /// Decrypts an envelope (binary or `fk1:` text form) for the same tenant, subject,
    /// field and context it was encrypted with.
    ///
    /// # Errors
    /// [`Error::MalformedEnvelope`]; [`Error::ScopeMismatch`];
    /// [`Error::AuthenticationFailed`] for a wrong tenant/subject/field/context or any
    /// altered byte; [`Error::UnknownKeyVersion`]; [`Error::KeyDestroyed`];
    /// [`Error::KeySuspended`]; [`Error::TenantNotFound`]; [`Error::SubjectNotFound`];
    /// [`Error::Kms`] / [`Error::Store`] on a cache miss during an outage.
    pub async fn decrypt(&self, aad: &Aad<'_>, envelope: &[u8]) -> Result<Plaintext> {
        self.decrypt_versioned(aad, envelope)
            .await
            .map(|(pt, _)| pt)
    }

    /// [`Keyring::decrypt`], also returning the tenant key version that had encrypted
    /// the value (below the active version: due for re-encryption).
    ///
    /// # Errors
    /// As [`Keyring::decrypt`].
    pub async fn decrypt_versioned(
        &self,
        aad: &Aad<'_>,
        envelope: &[u8],
    ) -> Result<(Plaintext, u32)> {
        let bytes = crypto::decode_any(envelope)?;
        let env = Envelope::parse(&bytes)?;
        aad.validate()?;
        if env.scope() != aad.scope() {
            return Err(Error::ScopeMismatch {
                envelope: env.scope(),
                request: aad.scope(),
            });
        }
        let tentry = self.tenant_entry(aad.tenant).await?;
        let mut tsnap = self.tenant_snapshot(&tentry, aad.tenant, false).await?;
        if tsnap.record.version(env.key_version()).is_none()
            && env.key_version() > tsnap.record.latest_version()
        {
            // Possibly rotated on another replica since our snapshot: look again.
            tsnap = self.tenant_snapshot(&tentry, aad.tenant, true).await?;
        }
        let version =
            tsnap
                .record
                .version(env.key_version())
                .ok_or_else(|| Error::UnknownKeyVersion {
                    tenant: aad.tenant.to_owned(),
                    version: env.key_version(),
                })?;
        usable_for_decrypt(aad.tenant, version)?;
        let cipher = self.cipher(&tentry, &tsnap, version, aad, false).await?;
        Ok((crypto::open(&cipher, &env, aad)?, env.key_version()))
    }

    // ---------------------------------------------------------------- internals

    async fn load_tenant_record(&self, tenant: &str) -> Result<TenantRecord> {
        self.store
            .get_tenant(tenant)
            .await?
            .ok_or_else(|| Error::TenantNotFound {
                tenant: tenant.to_owned(),
            })
    }

    async fn tenant_entry(&self, tenant: &str) -> Result<Arc<TenantEntry>> {
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

    async fn tenant_snapshot(
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

    async fn subject_snapshot(
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

    /// The unwrapped tenant key of `version`: one KMS call per cache entry, shared by
    /// concurrent callers.
    async fn version_key<'a>(
        &self,
        tenant: &str,
        ventry: &'a VersionEntry,
        version: &KeyVersionRecord,
    ) -> Result<&'a SecretKey> {
        ventry
            .key
            .get_or_try_init(|| async {
                let wrapped = version
                    .wrapped
                    .as_ref()
                    .ok_or_else(|| Error::KeyDestroyed {
                        tenant: tenant.to_owned(),
                        scope: Scope::Tenant,
                        version: Some(version.version),
                    })?;
                self.check_not_erased(tenant, None).await?;
                let ctx = EncryptionContext::tenant_key(tenant, version.version);
                Ok(self.kms.unwrap(&version.kms_key_id, wrapped, &ctx).await?)
            })
            .await
    }

    async fn subject_entry(
        &self,
        tentry: &TenantEntry,
        tsnap: &Snapshot<TenantRecord>,
        tenant: &str,
        subject: &str,
        create: bool,
    ) -> Result<Arc<SubjectEntry>> {
        self.cache
            .subject(tenant, subject, async {
                if let Some(r) = self.store.get_subject(tenant, subject).await? {
                    return Ok(SubjectEntry::new(r));
                }
                if !create {
                    return Err(Error::SubjectNotFound {
                        tenant: tenant.to_owned(),
                    });
                }
                // Never create a key for an erased subject whose tombstone a restored
                // backup lost.
                self.check_not_erased(tenant, Some(subject)).await?;
                let active = active_version(tenant, &tsnap.record)?;
                let ventry = tentry.version(active.version);
                let tkey = self.version_key(tenant, &ventry, active).await?;
                let skey = SecretKey::generate()
                    .map_err(|_| Error::Internal("random number generator failure".into()))?;
                let wrapped = wrap_subject_key(tkey, tenant, subject, active.version, &skey)?;
                let created = self
                    .store
                    .create_subject(NewSubject {
                        tenant_id: tenant.to_owned(),
                        subject_id: subject.to_owned(),
                        wrap_version: active.version,
                        wrapped,
                    })
                    .await?;
                Ok(SubjectEntry::new(created.into_inner()))
            })
            .await
            .map_err(unshare)
    }

    async fn cipher(
        &self,
        tentry: &TenantEntry,
        tsnap: &Snapshot<TenantRecord>,
        version: &KeyVersionRecord,
        aad: &Aad<'_>,
        create_subject: bool,
    ) -> Result<Arc<FieldCipher>> {
        let tenant = aad.tenant;
        let Some(subject) = aad.subject else {
            let ventry = tentry.version(version.version);
            let tkey = self.version_key(tenant, &ventry, version).await?;
            return Ok(ventry.field_cipher(aad.field, || {
                FieldCipher::for_tenant(tkey, tenant, aad.field)
            }));
        };
        let sentry = self
            .subject_entry(tentry, tsnap, tenant, subject, create_subject)
            .await?;
        let ssnap = self.subject_snapshot(&sentry, tenant, subject).await?;
        subject_usable(tenant, &ssnap.record)?;
        let ventry = tentry.version(version.version);
        let tkey = self.version_key(tenant, &ventry, version).await?;
        let skey = self
            .subject_key(tentry, tsnap, &sentry, &ssnap.record, tenant, subject)
            .await?;
        Ok(sentry.field_cipher(version.version, aad.field, || {
            FieldCipher::for_subject(tkey, skey, tenant, subject, aad.field)
        }))
    }

    /// The unwrapped key of a usable subject (one KMS call per cache entry at most:
    /// its wrapping tenant version's key).
    async fn subject_key<'e>(
        &self,
        tentry: &TenantEntry,
        tsnap: &Snapshot<TenantRecord>,
        sentry: &'e SubjectEntry,
        srec: &SubjectRecord,
        tenant: &str,
        subject: &str,
    ) -> Result<&'e SecretKey> {
        sentry
            .key
            .get_or_try_init(|| async {
                let wrapped = srec.wrapped.as_ref().ok_or_else(|| Error::KeyDestroyed {
                    tenant: tenant.to_owned(),
                    scope: Scope::Subject,
                    version: None,
                })?;
                let wv = tsnap.record.version(srec.wrap_version).ok_or_else(|| {
                    Error::Internal(format!(
                        "subject key wrapped under missing version {}",
                        srec.wrap_version
                    ))
                })?;
                self.check_not_erased(tenant, Some(subject)).await?;
                let wentry = tentry.version(wv.version);
                let wkey = self.version_key(tenant, &wentry, wv).await?;
                unwrap_subject_key(wkey, tenant, subject, wv.version, wrapped)
                    .map_err(|_| Error::Internal("stored subject key does not unwrap".into()))
            })
            .await
    }
}

/// Refuses a suspended or destroyed subject.
fn subject_usable(tenant: &str, srec: &SubjectRecord) -> Result<()> {
    match srec.state {
        KeyState::Active => Ok(()),
        KeyState::Suspended => Err(Error::KeySuspended {
            tenant: tenant.to_owned(),
            scope: Scope::Subject,
            version: None,
        }),
        _ => Err(Error::KeyDestroyed {
            tenant: tenant.to_owned(),
            scope: Scope::Subject,
            version: None,
        }),
    }
}

/// A resolved (tenant, subject, field) encryption key: see [`Keyring::encryptor`].
#[derive(Debug, Clone)]
pub struct Encryptor<'a> {
    cipher: Arc<FieldCipher>,
    version: u32,
    tenant: &'a str,
    subject: Option<&'a str>,
    field: &'a str,
}

impl Encryptor<'_> {
    /// The tenant key version new envelopes carry.
    pub fn key_version(&self) -> u32 {
        self.version
    }

    /// Encrypts one value with this record `context`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an oversized context or value.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let aad = Aad {
            tenant: self.tenant,
            subject: self.subject,
            field: self.field,
            context,
        };
        Ok(crypto::seal(&self.cipher, self.version, &aad, plaintext)?)
    }
}

fn active_version<'a>(tenant: &str, rec: &'a TenantRecord) -> Result<&'a KeyVersionRecord> {
    if let Some(v) = rec.active() {
        return Ok(v);
    }
    // No active version: report what the newest version is.
    match rec.versions.last() {
        Some(v) if v.state == KeyState::Suspended => Err(Error::KeySuspended {
            tenant: tenant.to_owned(),
            scope: Scope::Tenant,
            version: Some(v.version),
        }),
        Some(v) => Err(Error::KeyDestroyed {
            tenant: tenant.to_owned(),
            scope: Scope::Tenant,
            version: Some(v.version),
        }),
        None => Err(Error::Internal(format!(
            "tenant {tenant} has no key versions"
        ))),
    }
}

fn usable_for_decrypt(tenant: &str, v: &KeyVersionRecord) -> Result<()> {
    match v.state {
        KeyState::Active | KeyState::DecryptOnly => Ok(()),
        KeyState::Suspended => Err(Error::KeySuspended {
            tenant: tenant.to_owned(),
            scope: Scope::Tenant,
            version: Some(v.version),
        }),
        KeyState::Destroyed => Err(Error::KeyDestroyed {
            tenant: tenant.to_owned(),
            scope: Scope::Tenant,
            version: Some(v.version),
        }),
        KeyState::Retired => Err(Error::KeyRetired {
            tenant: tenant.to_owned(),
            version: v.version,
        }),
    }
}
