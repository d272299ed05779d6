//! Rewrapping the values of one row (re-encryption jobs): the row's tenant and subject
//! are resolved once ([`Keyring::row_keys`]) and every value of the row is moved with
//! what was resolved, instead of resolving (tenant, subject, field) three times per
//! value as [`Keyring::rewrap`] does (the active version, then to decrypt, then to
//! encrypt).
//!
//! Same rules and the same errors, value by value, as [`Keyring::rewrap_checked`] and
//! [`Keyring::rewrap_and_index`]: a value on the active version (or newer) is returned
//! unchanged and not decrypted unless asked to verify; an older one is decrypted first
//! (so nothing is created for a value that does not belong) and sealed again under the
//! active version, in its own form. An error in resolving the tenant or the subject is
//! the error of every value that needs it, as it would have been value by value.
//!
//! Must not: outlive the row. A [`RowKeys`] reflects key states when it was made (and
//! the subject's when first needed), like an [`super::Encryptor`]; a suspension or
//! shred that lands while a row is being rewrapped applies from the next row on.

use std::sync::Arc;

use tokio::sync::OnceCell;

use crate::cache::{Snapshot, SubjectEntry, TenantEntry};
use crate::crypto::{self, Aad, BlindIndex, Envelope, FieldCipher, Plaintext};
use crate::error::{Error, Result};
use crate::model::{KeyVersionRecord, SubjectRecord, TenantRecord};

use super::resolution::{subject_usable, usable_for_decrypt};
use super::{Keyring, Rewrapped, active_version};

type Resolved<E, R> = std::result::Result<(Arc<E>, Arc<Snapshot<R>>), Error>;

/// The keys of one row's (tenant, subject), resolved once for all its values: see
/// [`Keyring::row_keys`].
pub struct RowKeys<'k, 'a> {
    keyring: &'k Keyring,
    tenant: &'a str,
    subject: Option<&'a str>,
    /// The tenant's cache entry and metadata snapshot, or why there is none.
    tenant_keys: Resolved<TenantEntry, TenantRecord>,
    /// The subject's, resolved when a value first needs it (never created here: a
    /// value is decrypted before anything is encrypted for its subject).
    subject_keys: OnceCell<Resolved<SubjectEntry, SubjectRecord>>,
}

impl std::fmt::Debug for RowKeys<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowKeys").finish_non_exhaustive()
    }
}

impl Keyring {
    /// Resolves, once, the keys of one row's `tenant` (and `subject`, for
    /// subject-scoped values) for moving every value of the row to the tenant's active
    /// version: [`RowKeys::rewrap`] and [`RowKeys::rewrap_and_index`]. Never fails:
    /// what could not be resolved is the error of each value that needs it.
    pub async fn row_keys<'a>(&self, tenant: &'a str, subject: Option<&'a str>) -> RowKeys<'_, 'a> {
        let tenant_keys = match self.tenant_entry(tenant).await {
            Ok(entry) => match self.tenant_snapshot(&entry, tenant, false).await {
                Ok(snap) => Ok((entry, snap)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        RowKeys {
            keyring: self,
            tenant,
            subject,
            tenant_keys,
            subject_keys: OnceCell::new(),
        }
    }
}

impl RowKeys<'_, '_> {
    fn aad<'b>(&'b self, field: &'b str, context: &'b [u8]) -> Aad<'b> {
        Aad {
            tenant: self.tenant,
            subject: self.subject,
            field,
            context,
        }
    }

    fn tenant(&self) -> Result<(&Arc<TenantEntry>, &Arc<Snapshot<TenantRecord>>)> {
        match &self.tenant_keys {
            Ok((entry, snap)) => Ok((entry, snap)),
            Err(e) => Err(e.clone()),
        }
    }

    /// As [`Keyring::rewrap_checked`] for the value `envelope` of `field` in this row,
    /// whose record context is `context`.
    ///
    /// # Errors
    /// As [`Keyring::rewrap_checked`].
    pub async fn rewrap(
        &self,
        field: &str,
        context: &[u8],
        envelope: &[u8],
        verify: bool,
    ) -> Result<Rewrapped> {
        let bytes = crypto::decode_any(envelope)?;
        let env = Envelope::parse(&bytes)?;
        let from = env.key_version();
        let aad = self.aad(field, context);
        aad.validate()?;
        let (_, snap) = self.tenant()?;
        let active = active_version(self.tenant, &snap.record)?;
        if from >= active.version {
            // Current (or newer than our snapshot, which only a rotation elsewhere in
            // the last revalidation interval can cause): never move a value backwards.
            if verify {
                drop(self.open(&aad, &env, envelope).await?);
            }
            return Ok(Rewrapped::unchanged(envelope, from));
        }
        // Decrypt first: a ciphertext that does not belong here fails before anything
        // is encrypted for it.
        let plaintext = self.open(&aad, &env, envelope).await?;
        self.reseal(&aad, envelope, from, active, &plaintext).await
    }

    /// As [`Keyring::rewrap_and_index`] for the value `envelope` of `field` in this
    /// row: the value moved (a current one is decrypted too, its index may be stale)
    /// and its blind index under the active version.
    ///
    /// # Errors
    /// As [`Keyring::rewrap_and_index`].
    pub async fn rewrap_and_index(
        &self,
        field: &str,
        context: &[u8],
        envelope: &[u8],
    ) -> Result<(Rewrapped, BlindIndex)> {
        let indexer = self.keyring.indexer(self.tenant, field, false).await?;
        let bytes = crypto::decode_any(envelope)?;
        let env = Envelope::parse(&bytes)?;
        let from = env.key_version();
        let aad = self.aad(field, context);
        aad.validate()?;
        let plaintext = self.open(&aad, &env, envelope).await?;
        let index = indexer.compute(&plaintext, false).await?.index;
        let rewrapped = if from >= indexer.key_version() {
            Rewrapped::unchanged(envelope, from)
        } else {
            let (_, snap) = self.tenant()?;
            let active = active_version(self.tenant, &snap.record)?;
            self.reseal(&aad, envelope, from, active, &plaintext)
                .await?
        };
        Ok((rewrapped, index))
    }

    /// Decrypts `env` (the parsed `envelope`), as [`Keyring::decrypt`] would.
    async fn open(&self, aad: &Aad<'_>, env: &Envelope<'_>, envelope: &[u8]) -> Result<Plaintext> {
        if env.scope() != aad.scope() {
            return Err(Error::ScopeMismatch {
                envelope: env.scope(),
                request: aad.scope(),
            });
        }
        let (_, snap) = self.tenant()?;
        let Some(version) = snap.record.version(env.key_version()) else {
            // Not in our snapshot (a version made elsewhere since, or none): the
            // keyring's own path looks again and reports it.
            return self.keyring.decrypt(aad, envelope).await;
        };
        usable_for_decrypt(self.tenant, version)?;
        let cipher = self.cipher(version, aad.field).await?;
        Ok(crypto::open(&cipher, env, aad)?)
    }

    /// `plaintext` (which `envelope`, on version `from`, held) sealed under `active`,
    /// in the envelope's form.
    async fn reseal(
        &self,
        aad: &Aad<'_>,
        envelope: &[u8],
        from: u32,
        active: &KeyVersionRecord,
        plaintext: &[u8],
    ) -> Result<Rewrapped> {
        let cipher = self.cipher(active, aad.field).await?;
        let sealed = crypto::seal(&cipher, active.version, aad, plaintext)?;
        Ok(Rewrapped {
            ciphertext: crypto::in_form_of(envelope, sealed),
            from_version: from,
            to_version: active.version,
        })
    }

    /// The field cipher of `version` for this row's tenant (and subject), from the
    /// cache (one KMS call per cache entry at most, as on the keyring's own path).
    async fn cipher(&self, version: &KeyVersionRecord, field: &str) -> Result<Arc<FieldCipher>> {
        let k = self.keyring;
        let tenant = self.tenant;
        let (tentry, tsnap) = self.tenant()?;
        let Some(subject) = self.subject else {
            let ventry = tentry.version(version.version);
            let tkey = k.version_key(tenant, &ventry, version).await?;
            return Ok(ventry.field_cipher(field, || FieldCipher::for_tenant(tkey, tenant, field)));
        };
        let resolved = self
            .subject_keys
            .get_or_init(|| async {
                let sentry = k
                    .subject_entry(tentry, tsnap, tenant, subject, false)
                    .await?;
                let ssnap = k.subject_snapshot(&sentry, tenant, subject).await?;
                Ok((sentry, ssnap))
            })
            .await;
        let (sentry, ssnap) = match resolved {
            Ok(v) => v,
            Err(e) => return Err(e.clone()),
        };
        subject_usable(tenant, &ssnap.record)?;
        let ventry = tentry.version(version.version);
        let tkey = k.version_key(tenant, &ventry, version).await?;
        let skey = k
            .subject_key(tentry, tsnap, sentry, &ssnap.record, tenant, subject)
            .await?;
        Ok(sentry.field_cipher(version.version, field, || {
            FieldCipher::for_subject(tkey, skey, tenant, subject, field)
        }))
    }
}
