//! Rotation beyond "make a new version": moving ciphertexts to the active version
//! ([`Keyring::rewrap`]), moving stored key material to a new KMS key
//! ([`Keyring::rewrap_kms_key`]), checking key ages against the rotation policy
//! ([`Keyring::rotate_due`]) and retiring versions no ciphertext needs any more
//! ([`Keyring::retire_key_version`]).

use std::collections::BTreeSet;

use crate::crypto::{self, Aad, Envelope, unwrap_subject_key, validate_id, wrap_subject_key};
use crate::error::{Error, Result};
use crate::kms::EncryptionContext;
use crate::model::{JobProgress, JobState, KeyState, KeyVersionRecord};
use crate::policy::{KeyAge, RotationPolicy, RotationStatus};

use super::{Keyring, TenantInfo, active_version};

/// A ciphertext moved to the active key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// The envelope, in the same form (binary or `fk1:` text) as the input. The input
    /// itself when it was already on the active version.
    pub ciphertext: Vec<u8>,
    /// The version the input was on.
    pub from_version: u32,
    /// The version the output is on.
    pub to_version: u32,
}

impl Rewrapped {
    /// `envelope`, left as it is on `version` (already current).
    pub(crate) fn unchanged(envelope: &[u8], version: u32) -> Self {
        Self {
            ciphertext: envelope.to_vec(),
            from_version: version,
            to_version: version,
        }
    }

    /// Whether a new ciphertext was made.
    pub fn changed(&self) -> bool {
        self.from_version != self.to_version
    }
}

/// What a KMS-key rewrap of one tenant did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRewrap {
    /// Tenant id.
    pub tenant_id: String,
    /// The KMS key everything is now wrapped under.
    pub kms_key_id: String,
    /// Versions rewrapped by this call.
    pub rewrapped: u32,
    /// Versions already under the new key (an earlier, interrupted run, or a race).
    pub already: u32,
    /// Versions without material (destroyed or retired): nothing to rewrap.
    pub without_material: u32,
}

/// One tenant's line in a rotation check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationCheck {
    /// Age and verdict before any rotation.
    pub age: KeyAge,
    /// The new active version, when this check rotated the tenant.
    pub rotated_to: Option<u32>,
    /// Why rotating this tenant failed (others went on).
    pub error: Option<String>,
}

/// Subject keys moved per store round trip while retiring a version.
const SUBJECT_BATCH: u32 = 500;

impl Keyring {
    /// Moves a ciphertext to the tenant's active key version: decrypts it and encrypts
    /// the same plaintext again with the same tenant, subject, field and context, inside
    /// this process. A ciphertext already on the active version is returned unchanged
    /// (and not checked); the output keeps the input's form (binary or `fk1:` text).
    ///
    /// # Errors
    /// As [`Keyring::decrypt`], and as [`Keyring::encrypt`] for the active version.
    pub async fn rewrap(&self, aad: &Aad<'_>, envelope: &[u8]) -> Result<Rewrapped> {
        self.rewrap_checked(aad, envelope, false).await
    }

    /// [`Keyring::rewrap`], and with `verify` a ciphertext already on the active
    /// version is authenticated too (decrypted, the plaintext discarded) instead of being
    /// returned unchecked: a census that reports misplaced or corrupt values
    /// (`AuthenticationFailed`) rather than passing them as current (review finding 5).
    ///
    /// # Errors
    /// As [`Keyring::rewrap`]; with `verify`, as [`Keyring::decrypt`] for current
    /// ciphertexts too.
    pub async fn rewrap_checked(
        &self,
        aad: &Aad<'_>,
        envelope: &[u8],
        verify: bool,
    ) -> Result<Rewrapped> {
        let from = {
            let bytes = crypto::decode_any(envelope)?;
            Envelope::parse(&bytes)?.key_version()
        };
        aad.validate()?;
        let active = {
            let tentry = self.tenant_entry(aad.tenant).await?;
            let tsnap = self.tenant_snapshot(&tentry, aad.tenant, false).await?;
            active_version(aad.tenant, &tsnap.record)?.version
        };
        if from >= active {
            // Current (or newer than our snapshot, which only a rotation elsewhere in
            // the last revalidation interval can cause): never move a value backwards.
            if verify {
                drop(self.decrypt_versioned(aad, envelope).await?);
            }
            return Ok(Rewrapped::unchanged(envelope, from));
        }
        // Decrypt first: a ciphertext that does not belong here fails before anything
        // (such as a subject key) is created for it.
        let (plaintext, _) = self.decrypt_versioned(aad, envelope).await?;
        self.reseal(aad, envelope, from, &plaintext).await
    }

    /// For re-encryption jobs with a blind-index column: [`Keyring::rewrap`], and the
    /// blind index of the value under the active version (docs/BLIND_INDEX.md §5),
    /// the plaintext never leaving this process. Unlike `rewrap`, a current ciphertext
    /// is decrypted too (its index may be stale or missing).
    ///
    /// # Errors
    /// As [`Keyring::rewrap`] and [`Keyring::indexer`].
    pub async fn rewrap_and_index(
        &self,
        aad: &Aad<'_>,
        envelope: &[u8],
    ) -> Result<(Rewrapped, crypto::BlindIndex)> {
        let indexer = self.indexer(aad.tenant, aad.field, false).await?;
        let (plaintext, from) = self.decrypt_versioned(aad, envelope).await?;
        let index = indexer.compute(&plaintext, false).await?.index;
        let rewrapped = if from >= indexer.key_version() {
            Rewrapped::unchanged(envelope, from)
        } else {
            self.reseal(aad, envelope, from, &plaintext).await?
        };
        Ok((rewrapped, index))
    }

    /// Encrypts `plaintext` (which `envelope`, on version `from`, held) under the
    /// active version, in the envelope's form.
    async fn reseal(
        &self,
        aad: &Aad<'_>,
        envelope: &[u8],
        from: u32,
        plaintext: &[u8],
    ) -> Result<Rewrapped> {
        let enc = self.encryptor(aad.tenant, aad.subject, aad.field).await?;
        let to = enc.key_version();
        let sealed = enc.seal(aad.context, plaintext)?;
        Ok(Rewrapped {
            ciphertext: crypto::in_form_of(envelope, sealed),
            from_version: from,
            to_version: to,
        })
    }

    /// Tenant ids, ascending.
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn list_tenants(&self) -> Result<Vec<String>> {
        Ok(self.store.list_tenants().await?)
    }

    /// KEK rotation: rewraps every stored key version of `tenant` under
    /// `new_kms_key_id`, and makes it the key for the tenant's future versions. No
    /// application data is touched and no key changes: ciphertexts stay valid. Each
    /// version is switched with a compare-and-set after the new wrapping has been
    /// unwrapped once as a check, so an interrupted run is resumed by running it again.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]; [`Error::TenantNotFound`]; [`Error::Kms`] (e.g. no
    /// access to the new key); [`Error::Store`].
    pub async fn rewrap_kms_key(&self, tenant: &str, new_kms_key_id: &str) -> Result<KekRewrap> {
        validate_id("tenant_id", tenant)?;
        if new_kms_key_id.is_empty() || new_kms_key_id.len() > 2048 {
            return Err(Error::InvalidArgument(
                "kms_key_id must be 1..=2048 bytes".into(),
            ));
        }
        self.check_tenant_kms_key(new_kms_key_id)?;
        let rec = self.load_tenant_record(tenant).await?;
        if rec.kms_key_id != new_kms_key_id {
            self.store
                .set_tenant_kms_key(tenant, new_kms_key_id)
                .await?;
        }
        // Moved to a key of its own: its versions stay there instead of riding the
        // epoch key. Moved back to the default key: it rides epochs again (the next
        // roll carries its versions to the epoch key).
        self.store
            .set_own_kms_key(tenant, new_kms_key_id != self.kms.default_key_id())
            .await?;
        let mut out = KekRewrap {
            tenant_id: tenant.to_owned(),
            kms_key_id: new_kms_key_id.to_owned(),
            rewrapped: 0,
            already: 0,
            without_material: 0,
        };
        for v in &rec.versions {
            let Some(wrapped) = &v.wrapped else {
                out.without_material += 1;
                continue;
            };
            // Same key: done, unless a disaster-recovery KMS now wraps under it too and
            // this version was wrapped before it was configured.
            if v.kms_key_id == new_kms_key_id
                && (wrapped.has_second_wrapping() || !self.kms.wraps_twice(new_kms_key_id))
            {
                out.already += 1;
                continue;
            }
            let ctx = EncryptionContext::tenant_key(tenant, v.version);
            let key = self.kms.unwrap(&v.kms_key_id, wrapped, &ctx).await?;
            let new_wrapped = self.kms.wrap(new_kms_key_id, &key, &ctx).await?;
            let check = self.kms.unwrap(new_kms_key_id, &new_wrapped, &ctx).await?;
            if !check.ct_eq(&key) {
                return Err(Error::Internal(format!(
                    "KMS key {new_kms_key_id} returned a different key on unwrap; nothing replaced"
                )));
            }
            if self
                .store
                .rewrap_key_version(
                    tenant,
                    v.version,
                    &v.kms_key_id,
                    new_kms_key_id,
                    &new_wrapped,
                )
                .await?
            {
                out.rewrapped += 1;
            } else {
                // A concurrent run did it, or the version was destroyed meanwhile.
                out.already += 1;
            }
        }
        self.tenant_changed(tenant).await;
        tracing::info!(
            tenant,
            kms_key_id = new_kms_key_id,
            rewrapped = out.rewrapped,
            already = out.already,
            "tenant key material rewrapped under a new KMS key"
        );
        Ok(out)
    }

    /// Checks every tenant's active key age against `policy` at `now_ms`; unless
    /// `dry_run`, rotates each overdue tenant. A tenant that fails to rotate is reported
    /// with its error and the others go on.
    ///
    /// # Errors
    /// [`Error::Store`] if the tenants cannot be listed.
    pub async fn rotate_due(
        &self,
        policy: &RotationPolicy,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<RotationCheck>> {
        let mut out = Vec::new();
        for tenant in self.list_tenants().await? {
            let info = match self.tenant(&tenant).await {
                Ok(i) => i,
                Err(Error::TenantNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let age = policy.assess(&info, now_ms);
            let mut check = RotationCheck {
                age,
                rotated_to: None,
                error: None,
            };
            if check.age.status == RotationStatus::Overdue && !dry_run {
                match self.rotate_tenant(&tenant).await {
                    Ok(t) => check.rotated_to = t.active_version(),
                    Err(e) => check.error = Some(e.to_string()),
                }
            }
            out.push(check);
        }
        Ok(out)
    }

    /// Retires a decrypt-only key version once re-encryption has moved every ciphertext
    /// off it: subject keys wrapped under it are first rewrapped under the active
    /// version, then its material is erased (tombstone kept) and decrypting with it
    /// fails with [`Error::KeyRetired`]. Idempotent.
    ///
    /// The evidence required: every table that any re-encryption job has covered for
    /// this tenant has a completed job, started after this version stopped encrypting
    /// (plus the revalidation interval), that left no ciphertext of the tenant on this
    /// version or an older one.
    ///
    /// # Errors
    /// [`Error::RetirementBlocked`] with the reason; [`Error::UnknownKeyVersion`];
    /// [`Error::KeySuspended`]; [`Error::KeyDestroyed`]; [`Error::TenantNotFound`];
    /// [`Error::Kms`]; [`Error::Store`].
    pub async fn retire_key_version(&self, tenant: &str, version: u32) -> Result<TenantInfo> {
        validate_id("tenant_id", tenant)?;
        let rec = self.load_tenant_record(tenant).await?;
        let v = rec
            .version(version)
            .ok_or_else(|| Error::UnknownKeyVersion {
                tenant: tenant.to_owned(),
                version,
            })?;
        let blocked = |reason: String| Error::RetirementBlocked {
            tenant: tenant.to_owned(),
            version,
            reason,
        };
        match v.state {
            KeyState::Retired => return Ok(TenantInfo::from(&rec)),
            KeyState::Destroyed => {
                return Err(Error::KeyDestroyed {
                    tenant: tenant.to_owned(),
                    scope: crypto::Scope::Tenant,
                    version: Some(version),
                });
            }
            KeyState::Suspended => {
                return Err(Error::KeySuspended {
                    tenant: tenant.to_owned(),
                    scope: crypto::Scope::Tenant,
                    version: Some(version),
                });
            }
            KeyState::Active => {
                return Err(blocked(
                    "it is the active version; rotate first and re-encrypt".into(),
                ));
            }
            KeyState::DecryptOnly => {}
        }
        self.check_reencrypted(tenant, v).await.map_err(blocked)?;
        let active = active_version(tenant, &rec)?;
        self.move_subject_keys(tenant, v, active).await?;
        if !self.store.retire_key_version(tenant, version).await? {
            let now = self.load_tenant_record(tenant).await?;
            if now.version(version).map(|v| v.state) != Some(KeyState::Retired) {
                return Err(blocked(
                    "its state or its subject keys changed meanwhile; try again".into(),
                ));
            }
        } else {
            tracing::info!(tenant, version, "tenant key version retired");
        }
        self.cache.invalidate_tenant(tenant).await;
        self.cache.invalidate_subjects_of(tenant).await;
        self.announce(tenant, None).await;
        self.tenant(tenant).await
    }

    /// The re-encryption evidence for retiring `v` (see
    /// [`Keyring::retire_key_version`]); `Err` says what is missing.
    async fn check_reencrypted(
        &self,
        tenant: &str,
        v: &KeyVersionRecord,
    ) -> std::result::Result<(), String> {
        let jobs = self
            .store
            .list_jobs()
            .await
            .map_err(|e| format!("cannot read re-encryption jobs: {e}"))?;
        let covering: Vec<_> = jobs
            .iter()
            .filter(|j| j.tenant_id.as_deref().is_none_or(|t| t == tenant))
            .collect();
        if covering.is_empty() {
            return Err(
                "no re-encryption job has covered this tenant; run one for every \
                        table that holds its ciphertexts"
                    .into(),
            );
        }
        let grace = i64::try_from(self.cfg.revalidate_after.as_millis()).unwrap_or(i64::MAX);
        let since = v.updated_at.saturating_add(grace);
        // Every (table, column) any job has covered for this tenant needs a clean,
        // completed job over that column; a spec without readable columns stands for
        // its whole table ("*").
        let columns = |spec: &str| -> BTreeSet<String> {
            let cols: BTreeSet<String> = serde_json::from_str::<serde_json::Value>(spec)
                .ok()
                .and_then(|v| v.get("columns").and_then(|c| c.as_array()).cloned())
                .unwrap_or_default()
                .iter()
                .flat_map(|c| {
                    // a column and its blind-index column (docs/BLIND_INDEX.md §5)
                    ["name", "blind_index"]
                        .into_iter()
                        .filter_map(|k| c.get(k).and_then(|n| n.as_str()).map(str::to_owned))
                })
                .collect();
            if cols.is_empty() {
                BTreeSet::from(["*".to_owned()])
            } else {
                cols
            }
        };
        // Each job read once: what it covers, and whether it proves anything.
        let covered: Vec<(&str, BTreeSet<String>, bool)> = covering
            .iter()
            .map(|j| {
                let proves = j.state == JobState::Completed
                    && JobProgress::parse(&j.progress).is_ok_and(|p| {
                        // The runner's own staleness bound counts too: until it ran
                        // out, the runner may have taken old values for current.
                        let runner_grace = i64::try_from(p.revalidate_ms).unwrap_or(i64::MAX);
                        let since = since.max(v.updated_at.saturating_add(runner_grace));
                        j.started_at.is_some_and(|s| s >= since)
                            && p.left_at_or_below(tenant, v.version) == 0
                    });
                (j.target.as_str(), columns(&j.spec), proves)
            })
            .collect();
        let needed: BTreeSet<(&str, &String)> = covered
            .iter()
            .flat_map(|(target, cols, _)| cols.iter().map(|c| (*target, c)))
            .collect();
        for (target, column) in needed {
            let proven = covered
                .iter()
                .any(|(t, cols, proves)| *proves && *t == target && cols.contains(column));
            if !proven {
                let what = if column == "*" {
                    format!("table {target}")
                } else {
                    format!("column {column} of {target}")
                };
                return Err(format!(
                    "{what} has no completed re-encryption job that started after \
                     version {} stopped encrypting and left no ciphertext on it",
                    v.version
                ));
            }
        }
        Ok(())
    }

    /// Rewraps every live subject key wrapped under `from` under `to`.
    async fn move_subject_keys(
        &self,
        tenant: &str,
        from: &KeyVersionRecord,
        to: &KeyVersionRecord,
    ) -> Result<()> {
        let tentry = self.tenant_entry(tenant).await?;
        let fentry = tentry.version(from.version);
        let toentry = tentry.version(to.version);
        let from_key = self.version_key(tenant, &fentry, from).await?;
        let to_key = self.version_key(tenant, &toentry, to).await?;
        loop {
            let batch = self
                .store
                .subjects_wrapped_under(tenant, from.version, SUBJECT_BATCH)
                .await?;
            if batch.is_empty() {
                return Ok(());
            }
            for s in batch {
                let Some(wrapped) = &s.wrapped else { continue };
                let key =
                    unwrap_subject_key(from_key, tenant, &s.subject_id, from.version, wrapped)
                        .map_err(|_| {
                            Error::Internal("stored subject key does not unwrap".into())
                        })?;
                let rewrapped = wrap_subject_key(to_key, tenant, &s.subject_id, to.version, &key)?;
                self.store
                    .rewrap_subject(tenant, &s.subject_id, from.version, to.version, &rewrapped)
                    .await?;
            }
        }
    }
}
