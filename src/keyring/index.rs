//! Blind indexes and pseudonyms: which key indexes a field, and which key a pseudonym
//! comes from.
//!
//! Index keys derive from tenant key versions (docs/BLIND_INDEX.md §4): new index
//! values use the active version, exactly like new ciphertexts; a lookup also computes
//! the value under every decrypt-only version, because rows written before a rotation
//! keep their old index until a re-encryption job recomputes it. Retiring a version
//! (after jobs proved nothing needs it, index columns included) ends its index key too.
//! Pseudonyms derive from subject keys, which tenant rotation does not change.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use zeroize::Zeroize as _;

use super::{Keyring, active_version, subject_usable};
use crate::crypto::{
    self, BlindIndex, IndexKey, IndexProfile, PSEUDONYM_LEN, SecretKey, validate_id,
};
use crate::error::{Error, Result};
use crate::model::KeyState;

/// The blind-index profile of each field that has one, and the bound on how many slow
/// (Argon2id) index computations run at once.
#[derive(Debug, Clone)]
pub struct IndexProfiles {
    fields: Arc<HashMap<String, IndexProfile>>,
    slow: Arc<Semaphore>,
}

impl Default for IndexProfiles {
    fn default() -> Self {
        Self::new(HashMap::new(), 1)
    }
}

impl IndexProfiles {
    /// Profiles by field name; at most `slow_concurrency` (>= 1) Argon2id evaluations
    /// at once (each holds its memory cost while it runs).
    pub fn new(fields: HashMap<String, IndexProfile>, slow_concurrency: usize) -> Self {
        Self {
            fields: Arc::new(fields),
            slow: Arc::new(Semaphore::new(slow_concurrency.max(1))),
        }
    }

    /// The profile of `field`.
    ///
    /// # Errors
    /// [`Error::IndexNotConfigured`] if the field has none.
    pub fn get(&self, field: &str) -> Result<&IndexProfile> {
        self.fields
            .get(field)
            .ok_or_else(|| Error::IndexNotConfigured {
                field: field.to_owned(),
            })
    }
}

/// The index keys of one (tenant, field), resolved once: see [`Keyring::indexer`].
/// Reflects key states at the time of the call; do not keep it.
#[derive(Debug, Clone)]
pub struct Indexer {
    /// Active version's key first, then decrypt-only versions' keys, newest first.
    keys: Vec<Arc<IndexKey>>,
    slow: Option<Arc<Semaphore>>,
}

/// One value's blind index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// Under the active version: the value to store.
    pub index: BlindIndex,
    /// With a lookup: the value under every usable version (active first), any of
    /// which a stored row may hold until its re-index. Empty otherwise.
    pub lookup: Vec<BlindIndex>,
}

impl Indexer {
    /// The tenant key version new index values use.
    pub fn key_version(&self) -> u32 {
        self.keys.first().map_or(0, |k| k.version())
    }

    /// The versions of the keys a lookup computes, active first.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.version()).collect()
    }

    /// Whether computing a value is slow (Argon2id).
    pub fn is_slow(&self) -> bool {
        self.slow.is_some()
    }

    /// The blind index of `value` (and, with `lookup`, its value under every usable
    /// version). An Argon2id profile runs on a blocking thread, at most
    /// `slow_concurrency` at once.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a value the field's normalization refuses.
    pub async fn compute(&self, value: &[u8], lookup: bool) -> Result<Indexed> {
        let keys: &[Arc<IndexKey>] = if lookup {
            &self.keys
        } else {
            self.keys.get(..1).unwrap_or_default()
        };
        let Some(slow) = &self.slow else {
            return assemble(keys, lookup, |k| Ok(k.compute(value)?));
        };
        let _permit = slow
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("index semaphore closed".into()))?;
        let keys: Vec<Arc<IndexKey>> = keys.to_vec();
        let mut owned = value.to_vec();
        tokio::task::spawn_blocking(move || {
            let r = assemble(&keys, lookup, |k| Ok(k.compute(&owned)?));
            owned.zeroize();
            r
        })
        .await
        .map_err(|e| Error::Internal(format!("index task: {e}")))?
    }
}

fn assemble(
    keys: &[Arc<IndexKey>],
    lookup: bool,
    f: impl Fn(&IndexKey) -> Result<BlindIndex>,
) -> Result<Indexed> {
    let mut it = keys.iter();
    let first = it
        .next()
        .ok_or_else(|| Error::Internal("indexer without keys".into()))?;
    let index = f(first)?;
    let lookup = if lookup {
        let mut all = Vec::with_capacity(keys.len());
        all.push(index.clone());
        for k in it {
            all.push(f(k)?);
        }
        all
    } else {
        Vec::new()
    };
    Ok(Indexed { index, lookup })
}

impl Keyring {
    /// With these blind-index profiles (`fieldkey serve` and `jobs run` set them from
    /// the configuration's `[blind_index]`).
    #[must_use]
    pub fn with_index_profiles(mut self, profiles: IndexProfiles) -> Self {
        self.indexes = profiles;
        self
    }

    /// The blind-index profile of `field`.
    ///
    /// # Errors
    /// [`Error::IndexNotConfigured`].
    pub fn index_profile(&self, field: &str) -> Result<&IndexProfile> {
        self.indexes.get(field)
    }

    /// Resolves the index keys of (`tenant`, `field`): the active version's, and with
    /// `lookup` every decrypt-only version's too (newest first). Derived keys are
    /// cached beside the tenant version's key.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]; [`Error::IndexNotConfigured`];
    /// [`Error::TenantNotFound`]; [`Error::KeySuspended`] / [`Error::KeyDestroyed`]
    /// for a tenant without an active version; [`Error::Kms`] / [`Error::Store`] on a
    /// cache miss during an outage.
    pub async fn indexer(&self, tenant: &str, field: &str, lookup: bool) -> Result<Indexer> {
        validate_id("tenant_id", tenant)?;
        validate_id("field", field)?;
        let profile = *self.index_profile(field)?;
        let tentry = self.tenant_entry(tenant).await?;
        let tsnap = self.tenant_snapshot(&tentry, tenant, false).await?;
        let active = active_version(tenant, &tsnap.record)?;
        let mut versions = vec![active];
        if lookup {
            let mut older: Vec<_> = tsnap
                .record
                .versions
                .iter()
                .filter(|v| v.state == KeyState::DecryptOnly)
                .collect();
            older.sort_by_key(|v| std::cmp::Reverse(v.version));
            versions.extend(older);
        }
        let mut keys = Vec::with_capacity(versions.len());
        for v in versions {
            let ventry = tentry.version(v.version);
            let tkey: &SecretKey = self.version_key(tenant, &ventry, v).await?;
            keys.push(ventry.index_key(field, || {
                IndexKey::derive(tkey, tenant, field, v.version, &profile)
            })?);
        }
        Ok(Indexer {
            keys,
            slow: profile.is_slow().then(|| self.indexes.slow.clone()),
        })
    }

    /// The blind index of one value of (`tenant`, `field`); see [`Keyring::indexer`].
    ///
    /// # Errors
    /// As [`Keyring::indexer`] and [`Indexer::compute`].
    pub async fn blind_index(
        &self,
        tenant: &str,
        field: &str,
        value: &[u8],
        lookup: bool,
    ) -> Result<Indexed> {
        self.indexer(tenant, field, lookup)
            .await?
            .compute(value, lookup)
            .await
    }

    /// The pseudonym of `subject` in `tenant` for `purpose` (docs/BLIND_INDEX.md §7),
    /// derived from the subject's key (created on first use, as by an encryption).
    /// Stable across tenant key rotations; refused once the subject is shredded, so a
    /// shredded subject's pseudonyms can never be computed again or linked to new data.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]; [`Error::TenantNotFound`]; [`Error::KeyDestroyed`]
    /// for a shredded subject or tenant; [`Error::KeySuspended`] while processing is
    /// restricted; [`Error::Kms`] / [`Error::Store`] on a cache miss during an outage.
    pub async fn pseudonymize(
        &self,
        tenant: &str,
        subject: &str,
        purpose: &str,
    ) -> Result<[u8; PSEUDONYM_LEN]> {
        validate_id("tenant_id", tenant)?;
        validate_id("subject_id", subject)?;
        validate_id("purpose", purpose)?;
        let tentry = self.tenant_entry(tenant).await?;
        let tsnap = self.tenant_snapshot(&tentry, tenant, false).await?;
        // A suspended or erased tenant computes nothing.
        active_version(tenant, &tsnap.record)?;
        let sentry = self
            .subject_entry(&tentry, &tsnap, tenant, subject, true)
            .await?;
        let ssnap = self.subject_snapshot(&sentry, tenant, subject).await?;
        subject_usable(tenant, &ssnap.record)?;
        let skey = self
            .subject_key(&tentry, &tsnap, &sentry, &ssnap.record, tenant, subject)
            .await?;
        Ok(crypto::pseudonym(skey, tenant, subject, purpose))
    }
}
