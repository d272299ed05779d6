//! The roll: from epoch e to e+1, resumable and idempotent like a re-encryption job.
//!
//! 1. Under the roll's lease (one roller across replicas; a dead one's lease expires):
//!    register e+1 as `creating`, get its KMS key (created, or taken from the pool),
//!    make it active (e becomes `retiring`; writes that raced it are refused by the
//!    store and retried by the keyring under e+1).
//! 2. Move live material: tenant versions of tenants riding epochs (unwrap + wrap:
//!    O(versions) KMS calls), subject keys to the tenant's SWK of e+1 (local AES,
//!    batched; O(tenants) KMS calls), signing keys; delete the old SWKs.
//! 3. Verify in the store that nothing live needs a retiring epoch's key; only then
//!    schedule its deletion, and record a signed "backups sealed" statement chained
//!    into the audit log, in the transaction that marks the epoch sealed.
//!
//! A crash anywhere leaves states from which running the roll again finishes the job:
//! every move is a compare-and-set, the key creation is found again by its alias (AWS)
//! or its `creating` row, and sealing is a compare-and-set on `retiring`.

use serde_json::json;

use crate::error::{Error, Result};
use crate::keyring::ActiveEpoch;
use crate::kms::{KeyDeletion, KeyStatus, KmsError};
use crate::model::{AuditEvent, EpochRecord, EpochState, KEPT_LEGACY, RollProgress, now_ms};
use crate::signing::key_id;

use super::seal::{self, BackupSeal, SEAL_FORMAT};
use super::{EpochStatus, Epochs};

/// Tenant versions read per batch.
const VERSION_BATCH: u32 = 100;
/// Passes over the live material before the roll gives up on an epoch still in use.
const MAX_PASSES: u32 = 3;
/// Purposes of fieldkey's own signing keys (their seeds ride the epoch key too).
const SIGNING_PURPOSES: [&str; 2] = ["erasure-receipt", "audit-checkpoint"];

impl Epochs {
    /// Rolls to a new epoch (or, with `new_epoch` false, only finishes a roll that an
    /// earlier run left unfinished), calling `report` with the counters as it goes.
    ///
    /// # Errors
    /// [`Error::RollInProgress`] if another process holds the lease;
    /// [`Error::EpochStillInUse`] if live material still needs an old epoch's key
    /// after [`MAX_PASSES`] passes (nothing is deleted then); KMS and store errors
    /// (run it again to resume).
    pub async fn roll(
        &self,
        new_epoch: bool,
        report: &(dyn Fn(&RollProgress) + Send + Sync),
    ) -> Result<EpochStatus> {
        let store = &self.store;
        if self.cfg.retire_legacy_key {
            // Turned on after the legacy key was kept: retire it now.
            store.reopen_kept_legacy().await?;
        }
        let mut epochs = store.epochs().await?;
        if epochs.is_empty() {
            // A store from before epochs: if anything is wrapped under the default
            // key, it becomes the legacy epoch 0 that this roll retires.
            let usage = store.epoch_usage(0, self.kms.default_key_id()).await?;
            if !usage.is_empty() {
                store
                    .register_legacy_epoch(self.kms.default_key_id())
                    .await?;
            }
            epochs = store.epochs().await?;
        }
        let creating = epochs.iter().find(|e| e.state == EpochState::Creating);
        let active = epochs.iter().find(|e| e.state == EpochState::Active);
        let retiring = epochs.iter().any(|e| e.state == EpochState::Retiring);
        let target = match (creating, active) {
            (Some(c), _) => c.epoch,
            (None, Some(a)) if retiring || !new_epoch => a.epoch,
            (None, a) => {
                let next = epochs.iter().map(|e| e.epoch).max().map_or(1, |m| m + 1);
                if a.is_none() && !new_epoch && !retiring {
                    return self.status().await;
                }
                next
            }
        };
        let until =
            || now_ms().saturating_add(i64::try_from(self.cfg.lease.as_millis()).unwrap_or(60_000));
        if !store
            .take_roll_lease(&self.cfg.owner, until(), target)
            .await?
        {
            let lease = store.roll_lease().await?;
            return Err(Error::RollInProgress {
                owner: lease.owner.unwrap_or_default(),
            });
        }
        // Keep the lease while a long step (one tenant's million subject keys) runs.
        let renew = {
            let store = self.store.clone();
            let owner = self.cfg.owner.clone();
            let lease = self.cfg.lease;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let until =
                        now_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(60_000));
                    if !matches!(store.take_roll_lease(&owner, until, target).await, Ok(true)) {
                        break;
                    }
                }
            })
        };
        let result = self.roll_under_lease(target, report, &until).await;
        renew.abort();
        if let Err(e) = store.release_roll_lease(&self.cfg.owner).await {
            tracing::warn!(error = %e, "could not release the epoch roll lease");
        }
        result?;
        self.status().await
    }

    async fn roll_under_lease(
        &self,
        target: u64,
        report: &(dyn Fn(&RollProgress) + Send + Sync),
        until: &(dyn Fn() -> i64 + Send + Sync),
    ) -> Result<()> {
        let store = &self.store;
        let mut p = store.roll_lease().await?.progress;
        let note = |p: RollProgress| async move {
            report(&p);
            store.note_roll_progress(&self.cfg.owner, &p).await?;
            // Renew the lease; a roller that lost it (it stalled past the lease and
            // another took over) stops here.
            if !store
                .take_roll_lease(&self.cfg.owner, until(), target)
                .await?
            {
                return Err(Error::RollInProgress {
                    owner: store.roll_lease().await?.owner.unwrap_or_default(),
                });
            }
            Ok::<_, Error>(())
        };
        // 1. The new epoch and its key.
        let rec = store.begin_epoch(target).await?;
        let kms_key_id = match (rec.state, rec.kms_key_id) {
            (EpochState::Creating, recorded) => {
                p.phase = "create-key".into();
                note(p.clone()).await?;
                // A key recorded by a run that died before activating is used as is;
                // otherwise a new one, recorded at once (fieldkey never adopts a key
                // it did not record: an alias is only a label for operators).
                let key = match recorded {
                    Some(k) => k,
                    None => {
                        let made = self.new_epoch_key(target).await?;
                        p.kms_calls += 1;
                        store.record_epoch_key(target, &made).await?
                    }
                };
                store.activate_epoch(target, &key).await?;
                tracing::info!(epoch = target, kms_key_id = %key, "key epoch active");
                key
            }
            (_, Some(k)) => k,
            (_, None) => {
                return Err(Error::Internal(format!("epoch {target} has no KMS key")));
            }
        };
        let epoch = ActiveEpoch {
            epoch: target,
            kms_key_id,
        };
        // Everything new is wrapped under the new epoch from here on (on this keyring
        // at once, on others within `revalidate_after`; the store refuses stragglers).
        self.keyring.active_epoch(true).await?;
        self.classify_tenants().await?;
        for pass in 0..MAX_PASSES {
            // 2. Move live material.
            p.phase = "tenant-versions".into();
            note(p.clone()).await?;
            loop {
                let (looked, moved) = self.keyring.roll_versions(&epoch, VERSION_BATCH).await?;
                p.versions_rewrapped += moved;
                p.kms_calls += 2 * moved;
                note(p.clone()).await?;
                if looked == 0 || moved == 0 {
                    break;
                }
            }
            p.phase = "subject-keys".into();
            let tenants = store.tenants_to_roll(target).await?;
            p.tenants_total = p.tenants_done + u64::try_from(tenants.len()).unwrap_or(0);
            for t in &tenants {
                let (moved, created, deleted) = match self.keyring.roll_subjects_of(t, &epoch).await
                {
                    Ok(r) => r,
                    // Erased (or a newer roll) meanwhile: nothing of it to carry; the
                    // next pass and the verification look again.
                    Err(
                        Error::Store(crate::store::StoreError::EpochRolled)
                        | Error::KeyDestroyed { .. }
                        | Error::TenantNotFound { .. },
                    ) => (0, 0, 0),
                    Err(e) => return Err(e),
                };
                p.subjects_rewrapped += moved;
                p.swks_created += created;
                p.swks_deleted += deleted;
                p.kms_calls += created + u64::from(moved > 0);
                p.tenants_done += 1;
                note(p.clone()).await?;
            }
            p.phase = "signing-keys".into();
            p.signing_keys_rewrapped += self.roll_signing_keys(&epoch).await?;
            note(p.clone()).await?;
            // 3. Verify, then seal.
            p.phase = "verify".into();
            note(p.clone()).await?;
            let mut busy = Vec::new();
            for old in store.epochs().await? {
                if old.state != EpochState::Retiring {
                    continue;
                }
                let key = old.kms_key_id.clone().unwrap_or_default();
                let usage = store.epoch_usage(old.epoch, &key).await?;
                if !usage.is_empty() {
                    busy.push((old.epoch, usage));
                    continue;
                }
                p.phase = "seal".into();
                note(p.clone()).await?;
                self.seal(&old).await?;
                p.kms_calls += 2;
            }
            if busy.is_empty() {
                p.phase = "done".into();
                note(p.clone()).await?;
                return Ok(());
            }
            tracing::info!(pass, ?busy, "old epochs still needed; another pass");
            if pass + 1 == MAX_PASSES
                && let Some((e, u)) = busy.first()
            {
                return Err(Error::EpochStillInUse {
                    epoch: *e,
                    usage: format!(
                        "{} tenant version(s), {} SWK(s), {} subject key(s), {} signing key(s)",
                        u.tenant_versions, u.swks, u.subjects, u.signing_keys
                    ),
                });
            }
        }
        Ok(())
    }

    /// The KMS key of a new epoch: the first unused key of the pool, else a new one.
    async fn new_epoch_key(&self, epoch: u64) -> Result<String> {
        if self.cfg.key_pool.is_empty() {
            return Ok(self
                .kms
                .create_epoch_key(epoch, &self.cfg.store_tag)
                .await?);
        }
        let used: Vec<String> = self
            .store
            .epochs()
            .await?
            .into_iter()
            .filter_map(|e| e.kms_key_id)
            .collect();
        for k in &self.cfg.key_pool {
            if used.contains(k) {
                continue;
            }
            if self.kms.key_status(k).await? == KeyStatus::Enabled {
                return Ok(k.clone());
            }
        }
        Err(Error::Kms(KmsError::Misconfigured(
            "the epoch key pool (epochs.key_pool) has no unused, enabled key left".into(),
        )))
    }

    /// Decides, once, whether tenants from before epochs ride them: those whose KMS
    /// key is the default key (by the KMS's own name) do; the others brought their own.
    async fn classify_tenants(&self) -> Result<()> {
        let todo = self.store.unclassified_tenants().await?;
        if todo.is_empty() {
            return Ok(());
        }
        let default = self.kms.default_key_id().to_owned();
        // A KMS error stops the roll (it is decided once and kept): never guess.
        let canonical_default = self.kms.canonical_key_id(&default).await?;
        for (tenant, key) in todo {
            let own = key != default && self.kms.canonical_key_id(&key).await? != canonical_default;
            self.store.set_own_kms_key(&tenant, own).await?;
        }
        Ok(())
    }

    async fn roll_signing_keys(&self, epoch: &ActiveEpoch) -> Result<u64> {
        let mut moved = 0;
        for purpose in SIGNING_PURPOSES {
            let Some(rec) = self.store.signing_key(purpose).await? else {
                continue;
            };
            if rec.kms_key_id == epoch.kms_key_id {
                continue;
            }
            let ctx = crate::kms::EncryptionContext::default()
                .with("fieldkey:purpose", "signing-key")
                .with("fieldkey:usage", purpose);
            let wrapped = crate::model::WrappedKey::new(rec.wrapped.clone());
            let seed = match self.kms.unwrap(&rec.kms_key_id, &wrapped, &ctx).await {
                Ok(s) => s,
                // Its key is gone already: the signer rotates it on next use.
                Err(KmsError::KeyInvalidState { .. } | KmsError::KeyNotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let new = self.kms.wrap(&epoch.kms_key_id, &seed, &ctx).await?;
            if self
                .store
                .roll_signing_key(
                    &rec.key_id,
                    &rec.kms_key_id,
                    &epoch.kms_key_id,
                    epoch.epoch,
                    new.as_bytes(),
                )
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Schedules the deletion of a retiring epoch's key (verified unused) and marks it
    /// sealed with a signed statement chained into the audit log. The legacy key is
    /// kept unless `retire_legacy_key`.
    async fn seal(&self, old: &EpochRecord) -> Result<()> {
        let key = old.kms_key_id.clone().unwrap_or_default();
        if old.epoch == 0 && !self.cfg.retire_legacy_key {
            self.store.seal_epoch(0, KEPT_LEGACY, None, None).await?;
            tracing::warn!(kms_key_id = %key, "legacy KMS key kept (epochs.retire_legacy_key = false): key-store backups from before the first roll stay restorable while it lives");
            return Ok(());
        }
        let (status, date) = match self.kms.key_status(&key).await? {
            KeyStatus::PendingDeletion {
                deletion_date_unix_ms,
            } => ("already-scheduled", deletion_date_unix_ms),
            KeyStatus::Deleted => ("already-deleted", None),
            KeyStatus::Enabled | KeyStatus::Disabled => {
                match self
                    .kms
                    .schedule_key_deletion(&key, self.cfg.kms_deletion_days)
                    .await?
                {
                    KeyDeletion::Scheduled {
                        deletion_date_unix_ms,
                        ..
                    } => ("scheduled", deletion_date_unix_ms),
                    KeyDeletion::AlreadyPending {
                        deletion_date_unix_ms,
                    } => ("already-scheduled", deletion_date_unix_ms),
                }
            }
        };
        let signer = self.signer.get().await?;
        let erasures = self.store.erasures_destroyed_in(old.epoch).await?;
        let draft = BackupSeal {
            format: SEAL_FORMAT.into(),
            epoch: old.epoch,
            kms_key_id: key.clone(),
            kms_status: status.into(),
            epoch_started_unix_ms: old.created_at,
            epoch_ended_unix_ms: old.rolled_at,
            scheduled_at_unix_ms: now_ms(),
            deletion_date_unix_ms: date,
            erasures,
            audit_seq: 0,
            audit_prev_hash: String::new(),
            signing_key_id: key_id(&signer.verifying_key()),
        };
        let actor = self.cfg.owner.clone();
        let make = move |seq: u64, prev: &[u8; 32]| {
            let mut s = draft.clone();
            s.audit_seq = seq;
            s.audit_prev_hash = hex::encode(prev);
            let signed = seal::sign(s, &signer).map_err(|e| e.to_string())?;
            let digest = seal::digest(&signed.seal).map_err(|e| e.to_string())?;
            let text = serde_json::to_string_pretty(&signed).map_err(|e| e.to_string())?;
            let event = AuditEvent {
                action: "epoch.sealed".into(),
                resource_type: "key-epoch".into(),
                resource_id: signed.seal.epoch.to_string(),
                actor: actor.clone(),
                tenant_id: None,
                caller_ip: None,
                details: json!({
                    "kms_key_id": signed.seal.kms_key_id,
                    "kms_status": signed.seal.kms_status,
                    "deletion_date_unix_ms": signed.seal.deletion_date_unix_ms,
                    "erasures": signed.seal.erasures.len(),
                    "seal_sha256": hex::encode(digest),
                    "signing_key_id": signed.seal.signing_key_id,
                }),
            };
            Ok((text, event))
        };
        self.store
            .seal_epoch(old.epoch, status, date, Some(&make))
            .await?;
        tracing::info!(epoch = old.epoch, kms_key_id = %key, status, "key epoch sealed: its KMS key's deletion is scheduled");
        Ok(())
    }
}
