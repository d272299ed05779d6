//! Which key encrypts and which may decrypt: the data path. Resolves the tenant's active
//! version (or the envelope's version), the subject key (created on first use), unwraps
//! them through the cache (one KMS call per cache entry) and seals or opens values.
//!
//! Does not change key states (`lifecycle.rs`) nor decide when cached metadata is
//! re-read (`following.rs`).

use std::sync::Arc;

use crate::cache::{Snapshot, SubjectEntry, TenantEntry, VersionEntry};
use crate::crypto::{
    self, Aad, Envelope, FieldCipher, Plaintext, Scope, SecretKey, wrap_subject_key,
    wrap_subject_key_epoch,
};
use crate::error::{Error, Result};
use crate::kms::EncryptionContext;
use crate::model::{KeyState, KeyVersionRecord, NewSubject, SubjectRecord, TenantRecord};

use super::{Keyring, unshare};

impl Keyring {
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

    /// The unwrapped tenant key of `version`: one KMS call per cache entry, shared by
    /// concurrent callers.
    pub(super) async fn version_key<'a>(
        &self,
        tenant: &str,
        ventry: &'a VersionEntry,
        version: &KeyVersionRecord,
    ) -> Result<&'a SecretKey> {
        if let Some(k) = ventry.key.get() {
            return Ok(k);
        }
        // The miss path (KMS unwrap) is boxed: see `KeyCache::subject`.
        Box::pin(ventry.key.get_or_try_init(|| async {
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
            match self.kms.unwrap(&version.kms_key_id, wrapped, &ctx).await {
                Ok(k) => Ok(k),
                Err(e) => {
                    let e = Error::from(e);
                    if !super::epochs::key_gone(&e) {
                        return Err(e);
                    }
                    // The snapshot may predate an epoch roll that moved this
                    // version to the next epoch's key: look at the store again.
                    let fresh = self.load_tenant_record(tenant).await?;
                    match fresh.version(version.version) {
                        Some(v) if v.kms_key_id != version.kms_key_id => {
                            let w = v.wrapped.as_ref().ok_or_else(|| Error::KeyDestroyed {
                                tenant: tenant.to_owned(),
                                scope: Scope::Tenant,
                                version: Some(version.version),
                            })?;
                            Ok(self.kms.unwrap(&v.kms_key_id, w, &ctx).await?)
                        }
                        _ => Err(e),
                    }
                }
            }
        }))
        .await
    }

    pub(super) async fn subject_entry(
        &self,
        tentry: &TenantEntry,
        tsnap: &Snapshot<TenantRecord>,
        tenant: &str,
        subject: &str,
        create: bool,
    ) -> Result<Arc<SubjectEntry>> {
        self.cache
            .subject(tenant, subject, || async {
                let read = self.store.get_subject(tenant, subject);
                if let Some(r) = super::following::read_through(&self.store_breaker, read).await? {
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
                let skey = SecretKey::generate()
                    .map_err(|_| Error::Internal("random number generator failure".into()))?;
                // Under the SWK of the active epoch; a roll racing the insert makes the
                // store refuse it, and the next try uses the new epoch.
                let mut fresh = false;
                for _ in 0..3 {
                    let new = match self.active_epoch(fresh).await? {
                        Some(epoch) => {
                            let (id, cell) = match self.swk_for(tentry, tenant, &epoch).await {
                                Ok(v) => v,
                                // A roll moved on since our view (the SWK's epoch is no
                                // longer active, or its key already pending deletion).
                                Err(e)
                                    if matches!(
                                        e,
                                        Error::Store(crate::store::StoreError::EpochRolled)
                                    ) || super::epochs::key_gone(&e) =>
                                {
                                    fresh = true;
                                    continue;
                                }
                                Err(e) => return Err(e),
                            };
                            let swk = cell.get().ok_or_else(|| {
                                Error::Internal("SWK cell empty after init".into())
                            })?;
                            NewSubject {
                                tenant_id: tenant.to_owned(),
                                subject_id: subject.to_owned(),
                                wrap_version: 0,
                                swk_id: Some(id),
                                wrapped: wrap_subject_key_epoch(
                                    swk,
                                    tenant,
                                    subject,
                                    epoch.epoch,
                                    &skey,
                                )?,
                            }
                        }
                        None => {
                            let active = active_version(tenant, &tsnap.record)?;
                            let ventry = tentry.version(active.version);
                            let tkey = self.version_key(tenant, &ventry, active).await?;
                            NewSubject {
                                tenant_id: tenant.to_owned(),
                                subject_id: subject.to_owned(),
                                wrap_version: active.version,
                                swk_id: None,
                                wrapped: wrap_subject_key(
                                    tkey,
                                    tenant,
                                    subject,
                                    active.version,
                                    &skey,
                                )?,
                            }
                        }
                    };
                    match self.store.create_subject(new).await {
                        Ok(created) => return Ok(SubjectEntry::new(created.into_inner())),
                        Err(crate::store::StoreError::EpochRolled) => fresh = true,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Error::Store(crate::store::StoreError::EpochRolled))
            })
            .await
            .map_err(unshare)
    }

    pub(super) async fn cipher(
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
    pub(super) async fn subject_key<'e>(
        &self,
        tentry: &TenantEntry,
        tsnap: &Snapshot<TenantRecord>,
        sentry: &'e SubjectEntry,
        srec: &SubjectRecord,
        tenant: &str,
        subject: &str,
    ) -> Result<&'e SecretKey> {
        if let Some(k) = sentry.key.get() {
            return Ok(k);
        }
        // The miss path (unwrap under the tenant key or the epoch's SWK) is boxed: see
        // `KeyCache::subject`.
        Box::pin(sentry.key.get_or_try_init(|| async {
            let wrapped = srec.wrapped.as_ref().ok_or_else(|| Error::KeyDestroyed {
                tenant: tenant.to_owned(),
                scope: Scope::Subject,
                version: None,
            })?;
            self.check_not_erased(tenant, Some(subject)).await?;
            match self
                .open_subject_key(tentry, &tsnap.record, tenant, srec, wrapped)
                .await
            {
                Ok(k) => Ok(k),
                // The record in hand may predate a roll that moved this key to a
                // new SWK (and deleted the old one): read it again, once.
                Err(e)
                    if matches!(e, Error::Store(crate::store::StoreError::EpochRolled))
                        || super::epochs::key_gone(&e) =>
                {
                    let fresh =
                        self.store
                            .get_subject(tenant, subject)
                            .await?
                            .ok_or_else(|| Error::SubjectNotFound {
                                tenant: tenant.to_owned(),
                            })?;
                    subject_usable(tenant, &fresh)?;
                    let w = fresh.wrapped.as_ref().ok_or_else(|| Error::KeyDestroyed {
                        tenant: tenant.to_owned(),
                        scope: Scope::Subject,
                        version: None,
                    })?;
                    let trec = self.load_tenant_record(tenant).await?;
                    self.open_subject_key(tentry, &trec, tenant, &fresh, w)
                        .await
                }
                Err(e) => Err(e),
            }
        }))
        .await
    }
}

/// Refuses a suspended or destroyed subject.
pub(super) fn subject_usable(tenant: &str, srec: &SubjectRecord) -> Result<()> {
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

impl<'a> Encryptor<'a> {
    pub(super) fn new(
        cipher: Arc<FieldCipher>,
        version: u32,
        tenant: &'a str,
        subject: Option<&'a str>,
        field: &'a str,
    ) -> Self {
        Self {
            cipher,
            version,
            tenant,
            subject,
            field,
        }
    }

    /// [`Encryptor::seal`], appending the envelope to `out`, with the next of `nonces`.
    ///
    /// # Errors
    /// As [`Encryptor::seal`]; `out` is then as it was.
    pub fn seal_into(
        &self,
        nonces: &mut crypto::Nonces,
        context: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let aad = Aad {
            tenant: self.tenant,
            subject: self.subject,
            field: self.field,
            context,
        };
        Ok(crypto::seal_into(
            &self.cipher,
            self.version,
            &aad,
            plaintext,
            nonces,
            out,
        )?)
    }

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

pub(super) fn active_version<'a>(
    tenant: &str,
    rec: &'a TenantRecord,
) -> Result<&'a KeyVersionRecord> {
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

pub(super) fn usable_for_decrypt(tenant: &str, v: &KeyVersionRecord) -> Result<()> {
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
