//! Carrying an erasure out: the crash-safe sequence of steps (ledger write-ahead,
//! shredding through the keyring, the tenant's own KMS key, then the signed receipt,
//! audit record and completion in one transaction).
//!
//! Does not decide when a request is due (`worker.rs`) nor define the receipt format
//! (`receipt/`).

use std::collections::HashMap;

use serde_json::json;

use crate::error::{Error, Result};
use crate::kms::{KeyDeletion, KmsError};
use crate::model::{ErasureRecord, KeyState, now_ms};

use super::receipt::{self, DestroyedKey, KmsKeyDeletion, Receipt};
use super::{Actor, Erasures, entry_of, scope_of, target_event};

impl Erasures {
    /// Executes a due request (or finishes one a crash interrupted). Idempotent:
    /// returns the request as it is if it is not due, finished or cancelled.
    ///
    /// # Errors
    /// Store, ledger or KMS errors; the request stays `executing` and is retried.
    pub async fn execute(&self, erasure_id: &str) -> Result<ErasureRecord> {
        self.execute_claimed(erasure_id, None).await
    }

    /// [`Erasures::execute`]; with `idle_since`, an executing request is taken over
    /// only if untouched since then (the worker's claim).
    pub(super) async fn execute_claimed(
        &self,
        erasure_id: &str,
        idle_since: Option<i64>,
    ) -> Result<ErasureRecord> {
        let store = &self.store;
        let Some(rec) = store
            .start_erasure(erasure_id, &self.cfg.executor, now_ms(), idle_since)
            .await?
        else {
            return self.get(erasure_id).await;
        };
        match self.carry_out(&rec).await {
            Ok(done) => Ok(done),
            Err(e) => {
                tracing::warn!(erasure = erasure_id, error = %e, "erasure step failed; it will be retried");
                if let Err(e2) = store.note_erasure_error(erasure_id, &e.to_string()).await {
                    tracing::warn!(erasure = erasure_id, error = %e2, "could not record the failure");
                }
                Err(e)
            }
        }
    }

    pub(super) async fn carry_out(&self, rec: &ErasureRecord) -> Result<ErasureRecord> {
        let store = &self.store;
        let tenant = rec.tenant_id.as_str();
        let subject = rec.subject_id.as_deref();
        // (2) Write-ahead: the ledger knows before any key is touched.
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(rec)).await?;
        }
        self.fault("ledger");
        // (3) Destroy.
        match subject {
            Some(s) => drop(self.keyring.shred_subject(tenant, s).await?),
            None => drop(self.keyring.shred_tenant(tenant).await?),
        }
        // Nothing of the target may hold material any more (a rotation or a subject
        // creation that raced the shred is serialized by the store; check anyway before
        // a receipt says so).
        if store.live_key_count(tenant, subject).await? > 0 {
            match subject {
                Some(s) => drop(self.keyring.shred_subject(tenant, s).await?),
                None => drop(self.keyring.shred_tenant(tenant).await?),
            }
            let left = store.live_key_count(tenant, subject).await?;
            if left > 0 {
                return Err(Error::Internal(format!(
                    "{left} key(s) still live after shredding; will retry"
                )));
            }
        }
        // Tell other replicas even if a crashed attempt already destroyed the keys.
        self.keyring.announce(tenant, subject).await;
        // Which epoch key guards the backup copies of what was just destroyed.
        let epoch = self
            .keyring
            .active_epoch(true)
            .await?
            .map_or(0, |e| e.epoch);
        store.note_destroyed_epoch(&rec.erasure_id, epoch).await?;
        self.fault("destroy");
        // (4) The tenant's own KMS key.
        let kms_deletion = match subject {
            Some(_) => None,
            None => self.delete_tenant_kms_key(tenant).await?,
        };
        self.fault("kms");
        // (5) Receipt + audit + completed, atomically.
        let signer = self.signer.get().await?;
        let draft = self.draft_receipt(rec, kms_deletion).await?;
        let executor = Actor {
            id: self.cfg.executor.clone(),
            ip: None,
        };
        let complete = move |seq: u64, prev: &[u8; 32]| {
            let mut r = draft.clone();
            r.audit_seq = seq;
            r.audit_prev_hash = hex::encode(prev);
            let signed = receipt::sign(r, &signer).map_err(|e| e.to_string())?;
            let digest = receipt::digest(&signed.receipt).map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&signed).map_err(|e| e.to_string())?;
            let r = &signed.receipt;
            let event = target_event(
                "erasure.completed",
                &executor,
                &r.tenant_id,
                r.subject_id.as_deref(),
                json!({
                    "erasure_id": r.erasure_id,
                    "receipt_sha256": hex::encode(digest),
                    "signing_key_id": r.signing_key_id,
                    "keys_destroyed": r.destroyed.len(),
                    "subject_keys_destroyed": r.subject_keys_destroyed,
                }),
            );
            Ok((json, event))
        };
        let done = match store.complete_erasure(&rec.erasure_id, &complete).await? {
            Some(done) => done,
            // Another executor completed it first; its receipt stands.
            None => self.get(&rec.erasure_id).await?,
        };
        self.fault("complete");
        // (6)
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(&done)).await?;
        }
        tracing::info!(erasure = %done.erasure_id, tenant, scope = scope_of(subject).0, "erasure completed");
        Ok(done)
    }

    /// Schedules deletion of the tenant's own KMS key, unless it is the default key or
    /// still wraps anything live (compared by the KMS's canonical key name, so an
    /// alias and an ARN of the same key count as the same).
    pub(super) async fn delete_tenant_kms_key(
        &self,
        tenant: &str,
    ) -> Result<Option<KmsKeyDeletion>> {
        let store = &self.store;
        let kms = &self.kms;
        let Some(trec) = self.keyring.find_tenant(tenant).await? else {
            return Ok(None);
        };
        let key = trec.kms_key_id.as_str();
        if key == kms.default_key_id() {
            return Ok(None);
        }
        let deletion = |status: &str, mine: &str| KmsKeyDeletion {
            kms_key_id: mine.to_owned(),
            status: status.into(),
            pending_window_days: None,
            deletion_date_unix_ms: None,
        };
        let mine = match kms.canonical_key_id(key).await {
            Ok(c) => c,
            // Gone from the KMS (an earlier erasure's deletion ran; this one is being
            // re-applied after a restore): nothing left to delete, unless a
            // disaster-recovery KMS still has its counterpart, which the deletion
            // reaches (`kms::dual`).
            Err(KmsError::KeyNotFound { .. }) => {
                return Ok(Some(
                    match kms
                        .schedule_key_deletion(key, self.cfg.kms_key_deletion_days)
                        .await
                    {
                        Ok(out) => scheduled(out, key),
                        Err(KmsError::KeyNotFound { .. }) => {
                            deletion(receipt::KMS_ALREADY_DELETED, key)
                        }
                        Err(e) => return Err(e.into()),
                    },
                ));
            }
            Err(e) => return Err(e.into()),
        };
        // Never the default key, under any of its names.
        let default = kms
            .canonical_key_id(kms.default_key_id())
            .await
            .unwrap_or_else(|_| kms.default_key_id().to_owned());
        if mine == default {
            return Ok(None);
        }
        let mut shared = false;
        let mut canon: HashMap<String, String> = HashMap::new();
        for other in store.live_kms_key_ids().await? {
            // A disaster-recovery pair (an epoch key) is compared by its primary half:
            // a tenant key that is one of them is shared with everything the epoch
            // wraps.
            let other = match crate::kms::dual::split_pair(&other) {
                Some((primary, _)) => primary.to_owned(),
                None => other,
            };
            if other == key || other == mine {
                shared = true;
                break;
            }
            let c = match canon.get(&other) {
                Some(c) => c.clone(),
                None => {
                    // A key the KMS cannot describe (deleted elsewhere) is compared by
                    // its stored name only: it cannot be ours under another name.
                    let c = kms
                        .canonical_key_id(&other)
                        .await
                        .unwrap_or_else(|_| other.clone());
                    canon.insert(other.clone(), c.clone());
                    c
                }
            };
            if c == mine {
                shared = true;
                break;
            }
        }
        if shared {
            tracing::warn!(
                tenant,
                kms_key_id = key,
                "tenant KMS key still wraps other live keys; not scheduling its deletion"
            );
            return Ok(Some(deletion(receipt::KMS_KEPT_SHARED, &mine)));
        }
        let out = match kms
            .schedule_key_deletion(key, self.cfg.kms_key_deletion_days)
            .await
        {
            Ok(out) => out,
            Err(KmsError::KeyNotFound { .. }) => {
                return Ok(Some(deletion(receipt::KMS_ALREADY_DELETED, &mine)));
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(
            tenant,
            kms_key_id = key,
            "tenant KMS key deletion scheduled"
        );
        Ok(Some(scheduled(out, &mine)))
    }

    /// The receipt without its audit position (filled in the closing transaction).
    pub(super) async fn draft_receipt(
        &self,
        rec: &ErasureRecord,
        kms_key_deletion: Option<KmsKeyDeletion>,
    ) -> Result<Receipt> {
        let (destroyed, subject_keys_destroyed, subject_keys_digest) =
            self.destroyed_keys(rec).await?;
        let executed_at = now_ms();
        Ok(Receipt {
            format: receipt::FORMAT.into(),
            erasure_id: rec.erasure_id.clone(),
            scope: scope_of(rec.subject_id.as_deref()).0.into(),
            tenant_id: rec.tenant_id.clone(),
            subject_id: rec.subject_id.clone(),
            requested_by: rec.requested_by.clone(),
            executed_by: self.cfg.executor.clone(),
            requested_at_unix_ms: rec.requested_at,
            scheduled_for_unix_ms: rec.execute_after,
            executed_at_unix_ms: executed_at,
            requested_at: receipt::rfc3339_ms(rec.requested_at),
            scheduled_for: receipt::rfc3339_ms(rec.execute_after),
            executed_at: receipt::rfc3339_ms(executed_at),
            destroyed,
            subject_keys_destroyed,
            subject_keys_digest,
            kms_key_deletion,
            backups: Some(match self.keyring.active_epoch_now().await? {
                Some(e) => receipt::BackupGuard {
                    epoch: e.epoch,
                    kms_key_id: e.kms_key_id,
                },
                None => receipt::BackupGuard {
                    epoch: 0,
                    kms_key_id: self.kms.default_key_id().to_owned(),
                },
            }),
            audit_seq: 0,
            audit_prev_hash: String::new(),
            signing_key_id: String::new(),
        })
    }

    /// What the receipt lists as destroyed: the keys (subject scope: the subject key;
    /// tenant scope: every destroyed or retired version), the number of subject keys,
    /// and (tenant scope) the digest over the subject keys that ever held material.
    async fn destroyed_keys(
        &self,
        rec: &ErasureRecord,
    ) -> Result<(Vec<DestroyedKey>, u64, Option<String>)> {
        let store = &self.store;
        let tenant = rec.tenant_id.as_str();
        let mut destroyed = Vec::new();
        let (subject_keys_destroyed, subject_keys_digest) = match rec.subject_id.as_deref() {
            Some(s) => {
                if let Some(srec) = self.keyring.find_subject(tenant, s).await?
                    && srec.state == KeyState::Destroyed
                    && srec.fingerprint.as_bytes() != &[0u8; 32]
                {
                    destroyed.push(DestroyedKey {
                        kind: receipt::KIND_SUBJECT_KEY.into(),
                        version: None,
                        subject_id: Some(s.to_owned()),
                        fingerprint: hex::encode(srec.fingerprint.as_bytes()),
                    });
                }
                (u64::try_from(destroyed.len()).unwrap_or(u64::MAX), None)
            }
            None => {
                if let Some(trec) = self.keyring.find_tenant(tenant).await? {
                    for v in trec
                        .versions
                        .iter()
                        .filter(|v| matches!(v.state, KeyState::Destroyed | KeyState::Retired))
                    {
                        destroyed.push(DestroyedKey {
                            kind: receipt::KIND_TENANT_KEY.into(),
                            version: Some(v.version),
                            subject_id: None,
                            fingerprint: hex::encode(v.fingerprint.as_bytes()),
                        });
                    }
                }
                let mut items = Vec::new();
                let mut after = String::new();
                loop {
                    let page = store.subject_fingerprints(tenant, &after, 10_000).await?;
                    let Some((last, _)) = page.last() else { break };
                    after = last.clone();
                    items.extend(
                        page.into_iter()
                            .filter(|(_, fp)| fp.as_slice() != [0u8; 32])
                            .map(|(id, fp)| (id, hex::encode(fp))),
                    );
                }
                let n = u64::try_from(items.len()).unwrap_or(u64::MAX);
                (n, Some(receipt::subjects_digest(&items)))
            }
        };
        Ok((destroyed, subject_keys_destroyed, subject_keys_digest))
    }
}

/// The receipt's account of a scheduled deletion of `kms_key_id`.
fn scheduled(out: KeyDeletion, kms_key_id: &str) -> KmsKeyDeletion {
    match out {
        KeyDeletion::Scheduled {
            pending_window_days,
            deletion_date_unix_ms,
        } => KmsKeyDeletion {
            kms_key_id: kms_key_id.to_owned(),
            status: receipt::KMS_SCHEDULED.into(),
            pending_window_days: Some(pending_window_days),
            deletion_date_unix_ms,
        },
        KeyDeletion::AlreadyPending {
            deletion_date_unix_ms,
        } => KmsKeyDeletion {
            kms_key_id: kms_key_id.to_owned(),
            status: receipt::KMS_ALREADY_SCHEDULED.into(),
            pending_window_days: None,
            deletion_date_unix_ms,
        },
    }
}
