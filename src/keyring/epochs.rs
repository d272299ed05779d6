//! Key epochs on the keyring's side (`docs/ERASURE.md` §6): which KMS key wraps new
//! material, the subject-wrapping keys (SWKs) that wrap subject keys, and the moves a
//! roll makes (tenant versions to the new epoch key: O(versions) KMS calls; subject
//! keys to the new SWK: local AES, batched).
//!
//! Does not decide when to roll, nor schedule any key's deletion (`crate::epochs`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OnceCell;

use crate::cache::TenantEntry;
use crate::crypto::{
    SecretKey, unwrap_subject_key, unwrap_subject_key_epoch, wrap_subject_key_epoch,
};
use crate::error::{Error, Result};
use crate::kms::{EncryptionContext, KmsError};
use crate::model::{NewSwk, RolledSubject, SubjectRecord, TenantRecord, swk_id};
use crate::store::StoreError;

use super::Keyring;

/// The active epoch as this keyring last read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// Its KMS key.
    pub kms_key_id: String,
}

/// The cached view of the active epoch and when it was read.
#[derive(Debug, Default)]
pub(super) struct EpochView {
    pub(super) active: Option<ActiveEpoch>,
    pub(super) fetched: Option<Instant>,
}

/// KMS encryption context of the SWK of (`tenant`, `epoch`).
pub fn swk_context(tenant: &str, epoch: u64) -> EncryptionContext {
    EncryptionContext::default()
        .with("fieldkey:purpose", "subject-wrapping-key")
        .with("fieldkey:tenant", tenant)
        .with("fieldkey:epoch", &epoch.to_string())
}

/// Whether a KMS error means "this KMS key is gone or going": the wrapped copy in hand
/// may be stale (a roll moved it to the next epoch's key meanwhile).
pub(super) fn key_gone(e: &Error) -> bool {
    matches!(
        e,
        Error::Kms(
            KmsError::KeyInvalidState { .. }
                | KmsError::KeyNotFound { .. }
                | KmsError::KeyDisabled { .. }
        )
    )
}

/// Subject keys moved per transaction by a roll.
const ROLL_PAGE: u32 = 1000;

impl Keyring {
    /// The active epoch (re-read from the store when older than `revalidate_after`, or
    /// with `fresh`); `None` before the first roll. A store error keeps the last view.
    ///
    /// # Errors
    /// [`Error::Store`] if the store cannot be read and nothing was read before.
    pub async fn active_epoch(&self, fresh: bool) -> Result<Option<ActiveEpoch>> {
        {
            let view = self.epoch.load();
            if !fresh
                && let Some(at) = view.fetched
                && at.elapsed() < self.cfg.revalidate_after
            {
                return Ok(view.active.clone());
            }
        }
        match self.active_epoch_now().await {
            Ok(active) => Ok(active),
            Err(e) => {
                let view = self.epoch.load();
                if view.fetched.is_some() {
                    Ok(view.active.clone())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The active epoch read from the store now, without falling back on the last
    /// view (for what is recorded as evidence: the epoch of an erasure).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn active_epoch_now(&self) -> Result<Option<ActiveEpoch>> {
        let rec = self.store.active_epoch().await?;
        let active = rec.and_then(|r| {
            r.kms_key_id.map(|k| ActiveEpoch {
                epoch: r.epoch,
                kms_key_id: k,
            })
        });
        self.epoch.store(Arc::new(EpochView {
            active: active.clone(),
            fetched: Some(Instant::now()),
        }));
        Ok(active)
    }

    /// Every key epoch as stored (for gauges and status).
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn epoch_records(&self) -> Result<Vec<crate::model::EpochRecord>> {
        Ok(self.store.epochs().await?)
    }

    /// Whether a tenant's versions ride the epoch key (rather than its own KMS key).
    pub(super) fn rides_epochs(&self, rec: &TenantRecord) -> bool {
        rec.own_kms_key
            .map_or_else(|| rec.kms_key_id == self.kms.default_key_id(), |own| !own)
    }

    /// The KMS key (and epoch) that wraps a new version of a tenant: the epoch key for
    /// a tenant riding epochs once epochs have started, else `own_key`.
    pub(super) async fn key_for_new_version(
        &self,
        rides: bool,
        own_key: &str,
        fresh: bool,
    ) -> Result<(String, Option<u64>)> {
        if rides && let Some(a) = self.active_epoch(fresh).await? {
            return Ok((a.kms_key_id, Some(a.epoch)));
        }
        Ok((own_key.to_owned(), None))
    }

    /// The unwrapped SWK `id` of `tenant` (one KMS call per cache entry).
    pub(super) async fn swk_by_id(
        &self,
        tentry: &TenantEntry,
        tenant: &str,
        id: &str,
    ) -> Result<Arc<OnceCell<SecretKey>>> {
        let cell = tentry.swk(id);
        cell.get_or_try_init(|| async {
            let rec = self
                .store
                .swk(id)
                .await?
                .ok_or_else(|| Error::Store(StoreError::EpochRolled))?;
            if rec.tenant_id != tenant {
                return Err(Error::Internal(
                    "subject-wrapping key of another tenant".into(),
                ));
            }
            self.check_not_erased(tenant, None).await?;
            self.open_swk(tenant, rec).await
        })
        .await?;
        Ok(cell)
    }

    /// Unwraps a stored SWK with the KMS (its context binds tenant and epoch).
    async fn open_swk(&self, tenant: &str, rec: crate::model::SwkRecord) -> Result<SecretKey> {
        let ctx = swk_context(tenant, rec.epoch);
        let wrapped = crate::model::WrappedKey::new(rec.wrapped);
        Ok(self.kms.unwrap(&rec.kms_key_id, &wrapped, &ctx).await?)
    }

    /// The SWK of (`tenant`, `epoch`), created (one KMS GenerateDataKey under the
    /// epoch key) if the tenant has none yet. [`StoreError::EpochRolled`] if `epoch`
    /// is no longer active.
    pub(super) async fn swk_for(
        &self,
        tentry: &TenantEntry,
        tenant: &str,
        epoch: &ActiveEpoch,
    ) -> Result<(String, Arc<OnceCell<SecretKey>>)> {
        let id = swk_id(tenant, epoch.epoch);
        let cell = tentry.swk(&id);
        cell.get_or_try_init(|| async {
            let ctx = swk_context(tenant, epoch.epoch);
            if let Some(rec) = self.store.swk(&id).await? {
                return self.open_swk(tenant, rec).await;
            }
            let dk = self.kms.generate_data_key(&epoch.kms_key_id, &ctx).await?;
            let stored = self
                .store
                .create_swk(NewSwk {
                    tenant_id: tenant.to_owned(),
                    epoch: epoch.epoch,
                    kms_key_id: epoch.kms_key_id.clone(),
                    wrapped: dk.wrapped.as_bytes().to_vec(),
                })
                .await?;
            if stored.was_created() {
                Ok(dk.secret)
            } else {
                // Another replica made it first: use the stored one.
                self.open_swk(tenant, stored.into_inner()).await
            }
        })
        .await?;
        Ok((id, cell))
    }

    /// Unwraps a stored subject key, under its SWK or (legacy) its tenant version.
    pub(super) async fn open_subject_key(
        &self,
        tentry: &TenantEntry,
        trec: &TenantRecord,
        tenant: &str,
        srec: &SubjectRecord,
        wrapped: &[u8],
    ) -> Result<SecretKey> {
        let subject = srec.subject_id.as_str();
        if let Some(id) = &srec.swk_id {
            let epoch = epoch_of_swk(id)?;
            let cell = self.swk_by_id(tentry, tenant, id).await?;
            let swk = cell
                .get()
                .ok_or_else(|| Error::Internal("SWK cell empty after init".into()))?;
            return unwrap_subject_key_epoch(swk, tenant, subject, epoch, wrapped)
                .map_err(|_| Error::Internal("stored subject key does not unwrap".into()));
        }
        let wv = trec.version(srec.wrap_version).ok_or_else(|| {
            Error::Internal(format!(
                "subject key wrapped under missing version {}",
                srec.wrap_version
            ))
        })?;
        let wentry = tentry.version(wv.version);
        let wkey = self.version_key(tenant, &wentry, wv).await?;
        unwrap_subject_key(wkey, tenant, subject, wv.version, wrapped)
            .map_err(|_| Error::Internal("stored subject key does not unwrap".into()))
    }

    /// Roll step: moves up to `limit` live tenant versions of tenants riding epochs
    /// onto the key of `target` (unwrap under the old key, wrap under the new one,
    /// compare-and-set). Returns (versions looked at, moved); 0 looked at: done.
    ///
    /// # Errors
    /// KMS and store errors (the roll stops and is resumed later).
    pub async fn roll_versions(&self, target: &ActiveEpoch, limit: u32) -> Result<(u64, u64)> {
        let todo = self.store.versions_to_roll(target.epoch, limit).await?;
        let mut moved = 0;
        for v in &todo {
            let Some(wrapped) = &v.version.wrapped else {
                continue;
            };
            let ctx = EncryptionContext::tenant_key(&v.tenant_id, v.version.version);
            let key = self
                .kms
                .unwrap(&v.version.kms_key_id, wrapped, &ctx)
                .await?;
            let new = self.kms.wrap(&target.kms_key_id, &key, &ctx).await?;
            if self
                .store
                .roll_key_version(
                    &v.tenant_id,
                    v.version.version,
                    &v.version.kms_key_id,
                    &target.kms_key_id,
                    target.epoch,
                    &new,
                )
                .await?
            {
                moved += 1;
            }
        }
        Ok((u64::try_from(todo.len()).unwrap_or(u64::MAX), moved))
    }

    /// Roll step: moves every live subject key of `tenant` under its SWK of `target`
    /// (created if needed), then deletes the tenant's SWKs of older epochs. Returns
    /// (subjects moved, SWKs created, SWKs deleted). Local AES only, but the SWKs:
    /// one KMS call for the new one and one per old one read.
    ///
    /// # Errors
    /// KMS and store errors (the roll stops and is resumed later).
    pub async fn roll_subjects_of(
        &self,
        tenant: &str,
        target: &ActiveEpoch,
    ) -> Result<(u64, u64, u64)> {
        let tentry = self.tenant_entry(tenant).await?;
        let trec = self.load_tenant_record(tenant).await?;
        let target_id = swk_id(tenant, target.epoch);
        let existed = self.store.swk(&target_id).await?.is_some();
        let mut created = 0;
        let mut moved = 0;
        let mut after = String::new();
        loop {
            let page = self
                .store
                .subjects_to_roll(tenant, &target_id, &after, ROLL_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after.clone_from(&last.subject_id);
            let (id, cell) = self.swk_for(&tentry, tenant, target).await?;
            if !existed && created == 0 {
                created = 1;
            }
            let swk = cell
                .get()
                .ok_or_else(|| Error::Internal("SWK cell empty after init".into()))?;
            let mut batch = Vec::with_capacity(page.len());
            for s in &page {
                let Some(wrapped) = &s.wrapped else { continue };
                let sk = self
                    .open_subject_key(&tentry, &trec, tenant, s, wrapped)
                    .await?;
                batch.push(RolledSubject {
                    subject_id: s.subject_id.clone(),
                    expected_swk: s.swk_id.clone(),
                    expected_wrap_version: s.wrap_version,
                    wrapped: wrap_subject_key_epoch(swk, tenant, &s.subject_id, target.epoch, &sk)?,
                });
            }
            moved += self.store.roll_subjects(tenant, &id, &batch).await?;
        }
        let deleted = self.store.delete_old_swks(tenant, target.epoch).await?;
        if deleted > 0 {
            tentry.forget_swks_below(target.epoch);
        }
        Ok((moved, created, deleted))
    }
}

/// The epoch of an SWK id (`<epoch>:<tenant>`).
fn epoch_of_swk(id: &str) -> Result<u64> {
    id.split_once(':')
        .and_then(|(e, _)| e.parse().ok())
        .ok_or_else(|| Error::Internal(format!("malformed SWK id {id:?}")))
}
