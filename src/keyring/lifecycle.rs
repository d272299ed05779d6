//! The life of tenant and subject keys: creating a tenant, rotating it, suspending and
//! resuming (restriction of processing), destroying single keys and crypto-shredding a
//! subject or a tenant, and refusing keys the erasure ledger records as erased.
//!
//! Does not encrypt or decrypt (`resolution.rs`), and does not audit: the erasure
//! workflow and the service record who asked.

use crate::crypto::{Scope, validate_id};
use crate::error::{Error, Result};
use crate::kms::EncryptionContext;
use crate::model::{KeyState, NewKeyVersion};

use super::{Keyring, SubjectInfo, TenantInfo};

impl Keyring {
    /// Whether a tenant may be put on KMS key `key`: the default key always; another
    /// only if `tenant_kms_keys` lists it (or a prefix of it ending in `*`). Review
    /// finding 5: a caller naming any key could have `ShredTenant` schedule the deletion
    /// of a KMS key fieldkey does not own.
    ///
    /// # Errors
    /// [`Error::KmsKeyNotAllowed`].
    pub(super) fn check_tenant_kms_key(&self, key: &str) -> Result<()> {
        // A disaster-recovery pair id names two keys; only fieldkey makes those (epoch
        // keys). A caller naming one could have a tenant wrapped under, and its erasure
        // delete, any secondary key (and a primary key spelled so that the sharing
        // check misses it).
        if crate::kms::dual::split_pair(key).is_some() || key.contains("|dr=") {
            return Err(Error::KmsKeyNotAllowed {
                key: key.to_owned(),
            });
        }
        let Some(allowed) = &self.cfg.tenant_kms_keys else {
            return Ok(());
        };
        let listed = allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => a == key,
        });
        if listed || key == self.kms.default_key_id() {
            Ok(())
        } else {
            Err(Error::KmsKeyNotAllowed {
                key: key.to_owned(),
            })
        }
    }

    /// Fails closed if the erasure ledger records `tenant` (or `subject`) as erased;
    /// then destroys the key material again if a restored store brought it back.
    pub(super) async fn check_not_erased(&self, tenant: &str, subject: Option<&str>) -> Result<()> {
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
        if let Some(k) = kms_key_id {
            self.check_tenant_kms_key(k)?;
        }
        if let Some(existing) = self.store.get_tenant(tenant).await? {
            return Ok(TenantInfo::from(&existing));
        }
        let key_id = kms_key_id
            .unwrap_or_else(|| self.kms.default_key_id())
            .to_owned();
        // A tenant without a key of its own rides the epoch key (once epochs started);
        // a roll racing the insert makes the store refuse it: try the new epoch.
        let rides = key_id == self.kms.default_key_id();
        let mut fresh = false;
        let created = loop {
            let (wrap_key, epoch) = self.key_for_new_version(rides, &key_id, fresh).await?;
            let dk = self
                .kms
                .generate_data_key(&wrap_key, &EncryptionContext::tenant_key(tenant, 1))
                .await
                .map_err(Error::from);
            // Our view of the epoch may predate a roll that sealed its key: look again.
            let dk = match dk {
                Err(e) if !fresh && super::epochs::key_gone(&e) => {
                    fresh = true;
                    continue;
                }
                other => other?,
            };
            match self
                .store
                .create_tenant(
                    tenant,
                    &key_id,
                    NewKeyVersion {
                        version: 1,
                        kms_key_id: wrap_key,
                        epoch,
                        wrapped: dk.wrapped,
                    },
                )
                .await
            {
                Err(crate::store::StoreError::EpochRolled) if !fresh => fresh = true,
                other => break other?,
            }
        };
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

    /// A tenant's key versions and their states as stored, or `None` if there is no
    /// such tenant (no id check: for records that name a tenant, such as erasures).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn find_tenant(&self, tenant: &str) -> Result<Option<TenantInfo>> {
        Ok(self
            .store
            .get_tenant(tenant)
            .await?
            .map(|r| TenantInfo::from(&r)))
    }

    /// A subject's key state as stored, or `None` if it has no key (no id check).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn find_subject(&self, tenant: &str, subject: &str) -> Result<Option<SubjectInfo>> {
        Ok(self
            .store
            .get_subject(tenant, subject)
            .await?
            .map(|r| SubjectInfo::from(&r)))
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
                    crate::model::ErasureState::Executing | crate::model::ErasureState::Completed
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
        let rides = self.rides_epochs(&rec);
        let mut fresh = false;
        let added = loop {
            let (wrap_key, epoch) = self
                .key_for_new_version(rides, &rec.kms_key_id, fresh)
                .await?;
            let dk = self
                .kms
                .generate_data_key(&wrap_key, &EncryptionContext::tenant_key(tenant, next))
                .await
                .map_err(Error::from);
            // Our view of the epoch may predate a roll that sealed its key: look again.
            let dk = match dk {
                Err(e) if !fresh && super::epochs::key_gone(&e) => {
                    fresh = true;
                    continue;
                }
                other => other?,
            };
            match self
                .store
                .add_key_version(
                    tenant,
                    NewKeyVersion {
                        version: next,
                        kms_key_id: wrap_key,
                        epoch,
                        wrapped: dk.wrapped,
                    },
                )
                .await
            {
                Err(crate::store::StoreError::EpochRolled) if !fresh => fresh = true,
                other => break other?,
            }
        };
        if added {
            tracing::info!(tenant, version = next, "tenant key rotated");
        } else if let Some(v) = self
            .load_tenant_record(tenant)
            .await?
            .versions
            .iter()
            .find(|v| v.state == KeyState::Suspended)
        {
            // A suspension won the race (the store refuses a suspended tenant).
            self.tenant_changed(tenant).await;
            return Err(Error::KeySuspended {
                tenant: tenant.to_owned(),
                scope: Scope::Tenant,
                version: Some(v.version),
            });
        }
        self.tenant_changed(tenant).await;
        self.tenant(tenant).await
    }

    /// Suspends every usable version of a tenant (GDPR Art. 18 restriction): nothing of
    /// the tenant encrypts or decrypts until [`Keyring::resume_tenant`]. Idempotent.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn suspend_tenant(&self, tenant: &str) -> Result<TenantInfo> {
        self.set_suspended(tenant, true).await
    }

    /// Lifts a tenant suspension, restoring each version's previous state. Idempotent.
    ///
    /// # Errors
    /// [`Error::TenantNotFound`]; [`Error::Store`].
    pub async fn resume_tenant(&self, tenant: &str) -> Result<TenantInfo> {
        self.set_suspended(tenant, false).await
    }

    /// Suspends or resumes every version of `tenant` in one store transaction
    /// (serialized with rotations by the tenant row lock), then drops the cached entry
    /// and tells other replicas.
    async fn set_suspended(&self, tenant: &str, suspended: bool) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        self.load_tenant_record(tenant).await?;
        self.store.set_tenant_suspended(tenant, suspended).await?;
        self.tenant_changed(tenant).await;
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
        self.tenant_changed(tenant).await;
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

    pub(super) async fn set_subject_state(
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
        self.subject_changed(tenant, subject).await;
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
        self.subject_changed(tenant, subject).await;
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
}
