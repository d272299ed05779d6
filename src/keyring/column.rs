//! Keys resolved once for a column of values: one tenant snapshot, one encryption
//! key per subject, one decryption key per (subject, version), shared by every value
//! of a columnar call (or any batch of one tenant and field, or a single decrypt). The
//! per-value work left is the cipher itself. Also the reseal step shared by
//! `RewrapColumn` and read repair ([`ColumnKeys::reseal`], [`ColumnKeys::read_repair`]):
//! the snapshot that decrypted a value says whether it is stale.
//!
//! Reflects key states at the time it was made: a suspension or shred that lands
//! while a column is being processed takes effect for the next call (as for
//! [`Encryptor`]); do not keep one.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cache::{Snapshot, TenantEntry};
use crate::crypto::{self, Aad, Envelope, FieldCipher, Plaintext};
use crate::error::{Error, Result};
use crate::model::TenantRecord;

use super::repair::{ReadRepair, RepairCounts};
use super::resolution::{active_version, usable_for_decrypt};
use super::{Encryptor, Keyring, Rewrapped};

/// Per-call maps of subjects (ids chosen by callers): foldhash, seeded per map, is
/// several times cheaper than SipHash per lookup; a map holds at most one entry per
/// value of one call.
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A subject (none: tenant-scoped) and a tenant key version.
type VersionKey<'a> = (Option<&'a str>, u32);

/// A tenant's cache entry and the snapshot of its record a column uses throughout.
type TenantKeys = (Arc<TenantEntry>, Arc<Snapshot<TenantRecord>>);

/// The keys of one (tenant, field), resolved once: see [`Keyring::column`].
pub struct ColumnKeys<'k, 'a> {
    keyring: &'k Keyring,
    tenant: &'a str,
    field: &'a str,
    /// The tenant's cache entry and snapshot, read on first use (so that a value's own
    /// faults are found first, in the order [`Keyring::decrypt`] finds them).
    tenant_keys: Option<Result<TenantKeys>>,
    /// A fresher snapshot, read when a ciphertext named a version newer than the
    /// snapshot's latest (a rotation on another replica).
    fresh: Option<Arc<Snapshot<TenantRecord>>>,
    encryptors: Map<Option<&'a str>, Result<Encryptor<'a>>>,
    ciphers: Map<VersionKey<'a>, Result<Arc<FieldCipher>>>,
    /// The (subject, version) of the last value opened and its cipher: a run of values
    /// of one subject and version needs no lookup.
    last: Option<(VersionKey<'a>, Arc<FieldCipher>)>,
    /// The active version of the snapshot, once read (read repair's stale check).
    active: Option<u32>,
    /// The tenant's read-repair counters, once a stale value was seen.
    counts: Option<Arc<RepairCounts>>,
}

impl std::fmt::Debug for ColumnKeys<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColumnKeys")
            .field("tenant", &self.tenant)
            .field("field", &self.field)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// The keys of many values of one tenant and field, each resolved once, on first
    /// use: the tenant's key versions (one snapshot for the whole column), each
    /// subject's key. Errors are each value's (as [`Keyring::encrypt`] and
    /// [`Keyring::decrypt`] would give them), remembered for the next value.
    pub fn column<'a>(&self, tenant: &'a str, field: &'a str) -> ColumnKeys<'_, 'a> {
        ColumnKeys {
            keyring: self,
            tenant,
            field,
            tenant_keys: None,
            fresh: None,
            encryptors: Map::default(),
            ciphers: Map::default(),
            last: None,
            active: None,
            counts: None,
        }
    }
}

impl<'a> ColumnKeys<'_, 'a> {
    /// The active version's encryptor for `subject` (created on first use, as for
    /// [`Keyring::encryptor`]), all subjects on the same tenant version.
    ///
    /// # Errors
    /// As [`Keyring::encryptor`].
    pub async fn encryptor(&mut self, subject: Option<&'a str>) -> Result<&Encryptor<'a>> {
        if !self.encryptors.contains_key(&subject) {
            let made = self.make_encryptor(subject).await;
            self.encryptors.insert(subject, made);
        }
        match self.encryptors.get(&subject) {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Error::Internal("column encryptor lost".into())),
        }
    }

    async fn make_encryptor(&mut self, subject: Option<&'a str>) -> Result<Encryptor<'a>> {
        let probe = Aad {
            tenant: self.tenant,
            subject,
            field: self.field,
            context: &[],
        };
        probe.validate()?;
        let (tentry, tsnap) = self.tenant_keys().await?;
        let active = active_version(self.tenant, &tsnap.record)?;
        let cipher = (self.keyring)
            .cipher(&tentry, &tsnap, active, &probe, true)
            .await?;
        Ok(Encryptor::new(
            cipher,
            active.version,
            self.tenant,
            subject,
            self.field,
        ))
    }

    /// Checks the ids and `context` of a value of `subject` (as every call does first).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`].
    pub fn check(&self, subject: Option<&str>, context: &[u8]) -> Result<()> {
        Aad {
            tenant: self.tenant,
            subject,
            field: self.field,
            context,
        }
        .validate()?;
        Ok(())
    }

    /// The tenant's entry and snapshot, read once.
    async fn tenant_keys(&mut self) -> Result<TenantKeys> {
        if let Some(known) = &self.tenant_keys {
            return known.clone();
        }
        let read = async {
            let tentry = self.keyring.tenant_entry(self.tenant).await?;
            let tsnap = (self.keyring)
                .tenant_snapshot(&tentry, self.tenant, false)
                .await?;
            Ok((tentry, tsnap))
        }
        .await;
        self.tenant_keys = Some(read.clone());
        read
    }

    /// The tenant's active version in this column's snapshot.
    ///
    /// # Errors
    /// As [`Keyring::encryptor`] for the tenant: [`Error::TenantNotFound`],
    /// [`Error::KeySuspended`] / [`Error::KeyDestroyed`] when no version is active.
    pub async fn active_version(&mut self) -> Result<u32> {
        if let Some(v) = self.active {
            return Ok(v);
        }
        let (_, tsnap) = self.tenant_keys().await?;
        let v = active_version(self.tenant, &tsnap.record)?.version;
        self.active = Some(v);
        Ok(v)
    }

    /// `plaintext`, which `envelope` (on version `from`) of `subject` with `context`
    /// held, sealed again under the active version, in the envelope's form (binary or
    /// `fk1:` text): the reseal step of a rewrap, shared by `RewrapColumn` and read
    /// repair. The caller has decrypted `envelope` with these keys first (so nothing is
    /// created for a value that does not belong) and found `from` older than the
    /// active version.
    ///
    /// # Errors
    /// As [`Keyring::encryptor`] (a suspended or shredded subject or tenant, the active
    /// version's key unavailable).
    pub async fn reseal(
        &mut self,
        subject: Option<&'a str>,
        context: &[u8],
        envelope: &[u8],
        from: u32,
        plaintext: &[u8],
    ) -> Result<Rewrapped> {
        let enc = self.encryptor(subject).await?;
        let sealed = enc.seal(context, plaintext)?;
        Ok(Rewrapped {
            ciphertext: crypto::in_form_of(envelope, sealed),
            from_version: from,
            to_version: enc.key_version(),
        })
    }

    /// Read repair of a value just decrypted with these keys ([`ColumnKeys::open_into`]):
    /// `envelope` of `subject` with `context`, on `version`, whose plaintext is
    /// `plaintext`. Stale when `version` is older than the active version of this
    /// column's snapshot (no store round trip: the snapshot that decrypted it); with
    /// `repair`, a stale value is sealed again under the active version
    /// ([`ColumnKeys::reseal`], as a rewrap does), keeping its tenant, subject, field
    /// and context binding and its form. Counted in [`Keyring::read_repair_stats`].
    ///
    /// The caller decides first whether the caller of the sidecar may have values
    /// repaired (it is a write: `Crypto::Rewrap`).
    pub async fn read_repair(
        &mut self,
        subject: Option<&'a str>,
        context: &[u8],
        envelope: &[u8],
        version: u32,
        plaintext: &[u8],
        repair: bool,
    ) -> ReadRepair {
        // No active version: the tenant is suspended or shredded, and nothing decrypts
        // (so this is not reached); nothing to move a value to either.
        let Ok(active) = self.active_version().await else {
            return ReadRepair::Current;
        };
        if version >= active {
            return ReadRepair::Current;
        }
        let counts = self
            .counts
            .get_or_insert_with(|| self.keyring.repairs.of(self.tenant))
            .clone();
        counts.stale.fetch_add(1, Ordering::Relaxed);
        if !repair {
            return ReadRepair::Stale;
        }
        match self
            .reseal(subject, context, envelope, version, plaintext)
            .await
        {
            Ok(rw) => {
                counts.repaired.fetch_add(1, Ordering::Relaxed);
                ReadRepair::Repaired(rw)
            }
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                ReadRepair::Failed(e)
            }
        }
    }

    /// Decrypts `envelope` (binary or `fk1:` text) of `subject` with `context`,
    /// appending the plaintext to `out`; returns where it is and the version that had
    /// encrypted it.
    ///
    /// # Errors
    /// As [`Keyring::decrypt`].
    pub async fn open_into(
        &mut self,
        subject: Option<&'a str>,
        context: &[u8],
        envelope: &[u8],
        out: &mut Plaintext,
    ) -> Result<(Range<usize>, u32)> {
        let bytes = crypto::decode_any(envelope)?;
        let env = Envelope::parse(&bytes)?;
        let aad = Aad {
            tenant: self.tenant,
            subject,
            field: self.field,
            context,
        };
        aad.validate()?;
        if env.scope() != aad.scope() {
            return Err(Error::ScopeMismatch {
                envelope: env.scope(),
                request: aad.scope(),
            });
        }
        let version = env.key_version();
        let key = (subject, version);
        if self.last.as_ref().is_none_or(|(k, _)| *k != key) {
            let cipher = match self.ciphers.get(&key) {
                Some(known) => known.clone()?,
                None => {
                    // At most one entry per value of the call: bounded by its size.
                    let resolved = self.version_cipher(&aad, version).await;
                    self.ciphers.insert(key, resolved.clone());
                    resolved?
                }
            };
            self.last = Some((key, cipher));
        }
        let cipher = self
            .last
            .as_ref()
            .map(|(_, c)| c)
            .ok_or_else(|| Error::Internal("column cipher lost".into()))?;
        let range = crypto::open_into(cipher, &env, &aad, out)?;
        Ok((range, version))
    }

    /// The field cipher of `version` for `aad`'s subject, as [`Keyring::decrypt`]
    /// resolves it.
    async fn version_cipher(&mut self, aad: &Aad<'_>, version: u32) -> Result<Arc<FieldCipher>> {
        let (tentry, tsnap) = self.tenant_keys().await?;
        let mut snap = self.fresh.clone().unwrap_or(tsnap);
        if snap.record.version(version).is_none()
            && version > snap.record.latest_version()
            && self.fresh.is_none()
        {
            // Possibly rotated on another replica since our snapshot: look again, once.
            snap = (self.keyring)
                .tenant_snapshot(&tentry, self.tenant, true)
                .await?;
            self.fresh = Some(snap.clone());
        }
        let record = snap
            .record
            .version(version)
            .ok_or_else(|| Error::UnknownKeyVersion {
                tenant: self.tenant.to_owned(),
                version,
            })?;
        usable_for_decrypt(self.tenant, record)?;
        (self.keyring)
            .cipher(&tentry, &snap, record, aad, false)
            .await
    }
}
