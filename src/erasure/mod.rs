//! The erasure workflow (GDPR Art. 17 and 18): crypto-shredding a subject or a tenant,
//! with a grace period, a signed receipt chained into the audit log, and protection
//! against restored backups. See `docs/ERASURE.md`.
//!
//! Owns: erasure requests (request, cancel, execute, list), restriction of processing
//! as an audited action (suspend, resume), the receipt signing key (an Ed25519 seed
//! generated and wrapped by the KMS like any other key), the background worker that
//! executes due requests, and reconciliation of a restored key store with the erasure
//! ledger. Uses the keyring for every key change (it owns key states and the cache).
//!
//! Crash safety: execution is a sequence of idempotent steps, each safe to repeat:
//! (1) mark the request executing, (2) record it in the erasure ledger (before any key
//! is touched), (3) destroy the keys, (4) schedule deletion of the tenant's own KMS
//! key, (5) in one transaction: append the audit record, store the signed receipt, mark
//! it completed, (6) record completion in the ledger. A process that dies anywhere
//! leaves the request `executing`; the next attempt (a retried call, or the worker once
//! the request has been idle for `retry_after`) repeats the steps and finishes.

pub mod receipt;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde_json::json;

use crate::audit::AuditEvent;
use crate::crypto::{Scope, validate_id};
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::kms::{KeyDeletion, KmsError};
use crate::signing::Signer;
use crate::store::{ErasureRecord, ErasureState, KeyState, LedgerEntry, NewErasure, now_ms};

use receipt::{DestroyedKey, KmsKeyDeletion, Receipt};

/// The longest grace period a request may have: the 30 days of the agreements.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Purpose of the receipt signing key in the store.
/// Purpose of the key that signs erasure receipts (`fk_signing_keys`).
pub const SIGNING_PURPOSE: &str = "erasure-receipt";

/// Erasure settings.
#[derive(Debug, Clone)]
pub struct ErasureConfig {
    /// Waiting period of a tenant's own KMS key deletion (AWS: 7..=30 days).
    pub kms_key_deletion_days: u32,
    /// An `executing` request untouched this long is taken up again (its executor
    /// crashed).
    pub retry_after: Duration,
    /// How often the worker looks for due requests.
    pub poll: Duration,
    /// How often the worker reconciles the key store with the erasure ledger.
    pub reconcile_every: Duration,
    /// This process's name in receipts and the audit log.
    pub executor: String,
    /// Fault injection for crash tests: abort the process right after this step
    /// (`ledger`, `destroy`, `kms`, `complete`). Never set in production.
    pub abort_after: Option<String>,
}

impl Default for ErasureConfig {
    fn default() -> Self {
        Self {
            kms_key_deletion_days: 7,
            retry_after: Duration::from_secs(30),
            poll: Duration::from_secs(5),
            reconcile_every: Duration::from_secs(600),
            executor: format!("fieldkey pid {}", std::process::id()),
            abort_after: None,
        }
    }
}

/// Who asks: the caller identity and its masked address.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Caller identity (mTLS SAN, or the local identity).
    pub id: String,
    /// Masked caller address, if known.
    pub ip: Option<String>,
}

impl Actor {
    /// fieldkey itself (worker, reconciliation).
    pub fn system(what: &str) -> Self {
        Self {
            id: format!("fieldkey ({what})"),
            ip: None,
        }
    }
}

/// What one reconciliation with the erasure ledger found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Ledger entries examined.
    pub entries: u64,
    /// Requests missing from the key store, re-created.
    pub restored: u64,
    /// Requests the key store had as scheduled though the ledger had them executed:
    /// re-opened for execution (a new receipt will be issued).
    pub reopened: u64,
    /// Requests the key store had as scheduled though the ledger had them cancelled.
    pub cancelled: u64,
    /// Keys found live again (restored) and destroyed again.
    pub keys_destroyed_again: u64,
    /// Key-store requests the ledger lacked or had behind, recorded.
    pub ledger_updated: u64,
}

/// The erasure workflow over a keyring.
pub struct Erasures {
    keyring: Arc<Keyring>,
    cfg: ErasureConfig,
    signer: Signer,
}

impl std::fmt::Debug for Erasures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Erasures")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn entry_of(r: &ErasureRecord) -> LedgerEntry {
    LedgerEntry {
        erasure_id: r.erasure_id.clone(),
        tenant_id: r.tenant_id.clone(),
        subject_id: r.subject_id.clone(),
        state: r.state,
        requested_by: r.requested_by.clone(),
        requested_at: r.requested_at,
        execute_after: r.execute_after,
    }
}

fn scope_of(subject: Option<&str>) -> (&'static str, Scope) {
    match subject {
        Some(_) => (receipt::SCOPE_SUBJECT, Scope::Subject),
        None => (receipt::SCOPE_TENANT, Scope::Tenant),
    }
}

/// Ledger progress order: scheduled < executing/cancelled < completed.
fn rank(s: ErasureState) -> u8 {
    match s {
        ErasureState::Scheduled => 0,
        ErasureState::Executing | ErasureState::Cancelled => 1,
        ErasureState::Completed => 2,
    }
}

fn new_erasure_id(now: i64) -> Result<String> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd)
        .map_err(|_| Error::Internal("random number generator failure".into()))?;
    // Time first, so ids sort by creation time.
    Ok(format!("er-{:012x}-{}", now.max(0), hex::encode(rnd)))
}

impl Erasures {
    /// The workflow over `keyring` (which should have an erasure ledger).
    pub fn new(keyring: Arc<Keyring>, cfg: ErasureConfig) -> Self {
        Self {
            signer: Signer::new(keyring.clone(), SIGNING_PURPOSE, cfg.executor.clone()),
            keyring,
            cfg,
        }
    }

    /// The keyring.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    fn fault(&self, step: &str) {
        if self.cfg.abort_after.as_deref() == Some(step) {
            tracing::error!(
                step,
                "fault injection: aborting the process after this erasure step"
            );
            std::process::abort();
        }
    }

    // ------------------------------------------------------------------ requests

    /// Requests the erasure of a subject (`subject` set) or a whole tenant, after a
    /// grace period (zero: now, and executed before this returns). Idempotent: a live
    /// request for the same subject or tenant is returned instead of a new one (moved
    /// earlier if this call asks for an earlier time).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for bad ids or a grace period over 30 days;
    /// [`Error::TenantNotFound`]; store, ledger or KMS errors (the request stands and
    /// is retried by the worker; calling again is safe).
    pub async fn request(
        &self,
        actor: &Actor,
        tenant: &str,
        subject: Option<&str>,
        grace: Duration,
    ) -> Result<ErasureRecord> {
        validate_id("tenant_id", tenant)?;
        if let Some(s) = subject {
            validate_id("subject_id", s)?;
        }
        if grace > MAX_GRACE {
            return Err(Error::InvalidArgument(
                "grace period must be at most 30 days (2592000 seconds)".into(),
            ));
        }
        let store = self.keyring.store();
        if store.get_tenant(tenant).await?.is_none() {
            return Err(Error::TenantNotFound {
                tenant: tenant.to_owned(),
            });
        }
        let now = now_ms();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let execute_after = now.saturating_add(grace_ms);
        let erasure_id = new_erasure_id(now)?;
        let (scope, _) = scope_of(subject);
        let event = AuditEvent {
            action: "erasure.requested".into(),
            resource_type: scope.into(),
            resource_id: subject.unwrap_or(tenant).to_owned(),
            actor: actor.id.clone(),
            tenant_id: Some(tenant.to_owned()),
            caller_ip: actor.ip.clone(),
            details: json!({
                "erasure_id": erasure_id,
                "grace_seconds": grace.as_secs(),
                "execute_after_unix_ms": execute_after,
            }),
        };
        let created = store
            .create_erasure(
                NewErasure {
                    erasure_id,
                    tenant_id: tenant.to_owned(),
                    subject_id: subject.map(str::to_owned),
                    requested_by: actor.id.clone(),
                    requested_at: now,
                    execute_after,
                    state: ErasureState::Scheduled,
                },
                Some(&event),
            )
            .await?;
        let mut rec = created.into_inner();
        if rec.state == ErasureState::Scheduled
            && execute_after < rec.execute_after
            && store
                .reschedule_erasure(&rec.erasure_id, execute_after)
                .await?
        {
            store
                .append_audit(&AuditEvent {
                    action: "erasure.rescheduled".into(),
                    details: json!({
                        "erasure_id": rec.erasure_id,
                        "execute_after_unix_ms": execute_after,
                    }),
                    ..event.clone()
                })
                .await?;
            rec = self.get(&rec.erasure_id).await?;
        }
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(&rec)).await?;
        }
        if matches!(rec.state, ErasureState::Scheduled | ErasureState::Executing)
            && rec.execute_after <= now_ms()
        {
            return self.execute(&rec.erasure_id).await;
        }
        Ok(rec)
    }

    /// Cancels a scheduled request (inside its grace period, before execution starts).
    /// Idempotent.
    ///
    /// # Errors
    /// [`Error::ErasureNotFound`]; [`Error::ErasureNotCancellable`] once execution has
    /// started; store errors.
    pub async fn cancel(&self, actor: &Actor, erasure_id: &str) -> Result<ErasureRecord> {
        let rec = self.get(erasure_id).await?;
        match rec.state {
            ErasureState::Cancelled => return Ok(rec),
            ErasureState::Executing | ErasureState::Completed => {
                return Err(Error::ErasureNotCancellable {
                    erasure: erasure_id.to_owned(),
                    state: rec.state.to_string(),
                });
            }
            ErasureState::Scheduled => {}
        }
        let (scope, _) = scope_of(rec.subject_id.as_deref());
        let event = AuditEvent {
            action: "erasure.cancelled".into(),
            resource_type: scope.into(),
            resource_id: rec
                .subject_id
                .clone()
                .unwrap_or_else(|| rec.tenant_id.clone()),
            actor: actor.id.clone(),
            tenant_id: Some(rec.tenant_id.clone()),
            caller_ip: actor.ip.clone(),
            details: json!({ "erasure_id": erasure_id }),
        };
        let store = self.keyring.store();
        if !store
            .cancel_erasure(erasure_id, &actor.id, &event, true)
            .await?
        {
            // Execution started meanwhile (or another cancel won): report what it is.
            let now = self.get(erasure_id).await?;
            if now.state != ErasureState::Cancelled {
                let state = if now.state == ErasureState::Scheduled {
                    "due (its grace period is over)".to_owned()
                } else {
                    now.state.to_string()
                };
                return Err(Error::ErasureNotCancellable {
                    erasure: erasure_id.to_owned(),
                    state,
                });
            }
        }
        let rec = self.get(erasure_id).await?;
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(&rec)).await?;
        }
        tracing::info!(erasure = erasure_id, tenant = %rec.tenant_id, "erasure cancelled");
        Ok(rec)
    }

    /// One request.
    ///
    /// # Errors
    /// [`Error::ErasureNotFound`]; store errors.
    pub async fn get(&self, erasure_id: &str) -> Result<ErasureRecord> {
        self.keyring
            .store()
            .get_erasure(erasure_id)
            .await?
            .ok_or_else(|| Error::ErasureNotFound {
                erasure: erasure_id.to_owned(),
            })
    }

    /// Requests (of one tenant, or all), oldest first, up to `limit` after id `after`.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list(
        &self,
        tenant: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>> {
        Ok(self
            .keyring
            .store()
            .list_erasures(tenant, after, limit)
            .await?)
    }

    // ------------------------------------------------------------------ restriction

    /// Suspends (restricts processing of) a subject, or a whole tenant when `subject`
    /// is `None`: its keys neither encrypt nor decrypt until resumed. Audited.
    /// Idempotent. A subject with no key yet gets one, suspended, so that nothing can
    /// be written for it either.
    ///
    /// # Errors
    /// [`Error::KeyDestroyed`] for a shredded subject; not-found errors; store errors.
    pub async fn suspend(&self, actor: &Actor, tenant: &str, subject: Option<&str>) -> Result<()> {
        self.restrict(actor, tenant, subject, true).await
    }

    /// Lifts a suspension. Audited. Idempotent.
    ///
    /// # Errors
    /// As [`Erasures::suspend`].
    pub async fn resume(&self, actor: &Actor, tenant: &str, subject: Option<&str>) -> Result<()> {
        self.restrict(actor, tenant, subject, false).await
    }

    async fn restrict(
        &self,
        actor: &Actor,
        tenant: &str,
        subject: Option<&str>,
        suspend: bool,
    ) -> Result<()> {
        let k = &self.keyring;
        let before = match subject {
            // Restricting a subject with no data yet: give it a key now, so that its
            // first write is already restricted.
            Some(s) if suspend => match k.subject(tenant, s).await {
                Err(Error::SubjectNotFound { .. }) => k.ensure_subject(tenant, s).await?.state,
                other => other?.state,
            },
            Some(s) => k.subject(tenant, s).await?.state,
            None => {
                let t = k.tenant(tenant).await?;
                let live = t
                    .versions
                    .iter()
                    .any(|v| !matches!(v.state, KeyState::Destroyed | KeyState::Retired));
                if !live {
                    // Nothing left to restrict: the tenant was erased.
                    return Err(Error::KeyDestroyed {
                        tenant: tenant.to_owned(),
                        scope: Scope::Tenant,
                        version: None,
                    });
                }
                tenant_state(&t)
            }
        };
        match (subject, suspend) {
            (Some(s), true) => drop(k.suspend_subject(tenant, s).await?),
            (Some(s), false) => drop(k.resume_subject(tenant, s).await?),
            (None, true) => drop(k.suspend_tenant(tenant).await?),
            (None, false) => drop(k.resume_tenant(tenant).await?),
        }
        let target = suspend == (before != KeyState::Suspended);
        if target {
            let (scope, _) = scope_of(subject);
            k.store()
                .append_audit(&AuditEvent {
                    action: format!("{scope}.{}", if suspend { "suspended" } else { "resumed" }),
                    resource_type: scope.into(),
                    resource_id: subject.unwrap_or(tenant).to_owned(),
                    actor: actor.id.clone(),
                    tenant_id: Some(tenant.to_owned()),
                    caller_ip: actor.ip.clone(),
                    details: json!({}),
                })
                .await?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ execution

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
    async fn execute_claimed(
        &self,
        erasure_id: &str,
        idle_since: Option<i64>,
    ) -> Result<ErasureRecord> {
        let store = self.keyring.store();
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

    async fn carry_out(&self, rec: &ErasureRecord) -> Result<ErasureRecord> {
        let store = self.keyring.store();
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
        let executor = self.cfg.executor.clone();
        let complete = move |seq: u64, prev: &[u8; 32]| {
            let mut r = draft.clone();
            r.audit_seq = seq;
            r.audit_prev_hash = hex::encode(prev);
            let signed = receipt::sign(r, &signer).map_err(|e| e.to_string())?;
            let digest = receipt::digest(&signed.receipt).map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&signed).map_err(|e| e.to_string())?;
            let r = &signed.receipt;
            let event = AuditEvent {
                action: "erasure.completed".into(),
                resource_type: r.scope.clone(),
                resource_id: r.subject_id.clone().unwrap_or_else(|| r.tenant_id.clone()),
                actor: executor.clone(),
                tenant_id: Some(r.tenant_id.clone()),
                caller_ip: None,
                details: json!({
                    "erasure_id": r.erasure_id,
                    "receipt_sha256": hex::encode(digest),
                    "signing_key_id": r.signing_key_id,
                    "keys_destroyed": r.destroyed.len(),
                    "subject_keys_destroyed": r.subject_keys_destroyed,
                }),
            };
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
    async fn delete_tenant_kms_key(&self, tenant: &str) -> Result<Option<KmsKeyDeletion>> {
        let store = self.keyring.store();
        let kms = self.keyring.kms();
        let Some(trec) = store.get_tenant(tenant).await? else {
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
            // re-applied after a restore): nothing left to delete.
            Err(KmsError::KeyNotFound { .. }) => {
                return Ok(Some(deletion(receipt::KMS_ALREADY_DELETED, key)));
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
        Ok(Some(match out {
            KeyDeletion::Scheduled {
                pending_window_days,
                deletion_date_unix_ms,
            } => KmsKeyDeletion {
                kms_key_id: mine.clone(),
                status: receipt::KMS_SCHEDULED.into(),
                pending_window_days: Some(pending_window_days),
                deletion_date_unix_ms,
            },
            KeyDeletion::AlreadyPending {
                deletion_date_unix_ms,
            } => KmsKeyDeletion {
                kms_key_id: mine.clone(),
                status: receipt::KMS_ALREADY_SCHEDULED.into(),
                pending_window_days: None,
                deletion_date_unix_ms,
            },
        }))
    }

    /// The receipt without its audit position (filled in the closing transaction).
    async fn draft_receipt(
        &self,
        rec: &ErasureRecord,
        kms_key_deletion: Option<KmsKeyDeletion>,
    ) -> Result<Receipt> {
        let store = self.keyring.store();
        let tenant = rec.tenant_id.as_str();
        let mut destroyed = Vec::new();
        let (subject_keys_destroyed, subject_keys_digest) = match rec.subject_id.as_deref() {
            Some(s) => {
                if let Some(srec) = store.get_subject(tenant, s).await?
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
                if let Some(trec) = store.get_tenant(tenant).await? {
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
        let executed_at = now_ms();
        Ok(Receipt {
            format: receipt::FORMAT.into(),
            erasure_id: rec.erasure_id.clone(),
            scope: scope_of(rec.subject_id.as_deref()).0.into(),
            tenant_id: tenant.to_owned(),
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
            audit_seq: 0,
            audit_prev_hash: String::new(),
            signing_key_id: String::new(),
        })
    }

    /// The public key that verifies receipts, and its id (created on first use).
    ///
    /// # Errors
    /// Store or KMS errors.
    pub async fn public_key(&self) -> Result<(String, VerifyingKey)> {
        self.signer.public_key().await
    }

    // ------------------------------------------------------------------ worker

    /// Executes every due request once (scheduled ones past their grace period,
    /// executing ones idle for `retry_after`). Returns how many completed.
    ///
    /// # Errors
    /// Store errors listing the requests (individual failures are logged and retried).
    pub async fn run_due(&self) -> Result<usize> {
        let now = now_ms();
        let stale =
            now.saturating_sub(i64::try_from(self.cfg.retry_after.as_millis()).unwrap_or(i64::MAX));
        let due = self.keyring.store().due_erasures(now, stale, 100).await?;
        let mut done = 0;
        for rec in due {
            match self.execute_claimed(&rec.erasure_id, Some(stale)).await {
                Ok(r) if r.state == ErasureState::Completed => done += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(erasure = %rec.erasure_id, error = %e, "erasure not completed; will retry")
                }
            }
        }
        Ok(done)
    }

    /// Brings the key store and the erasure ledger back in step (after a restored
    /// backup of either): requests missing from the store are re-created, requests the
    /// store has behind the ledger are re-opened or cancelled, keys of executed
    /// erasures that are live again are destroyed again, and requests the ledger lacks
    /// are recorded in it. A merge of both, walked in id order.
    ///
    /// # Errors
    /// Store or ledger errors (run again: every step is idempotent).
    pub async fn reconcile(&self) -> Result<Reconciled> {
        let mut out = Reconciled::default();
        let Some(ledger) = self.keyring.ledger().cloned() else {
            return Ok(out);
        };
        let store = self.keyring.store().clone();
        const PAGE: u32 = 500;
        let (mut lbuf, mut sbuf) = (VecDeque::new(), VecDeque::new());
        let (mut lafter, mut safter) = (String::new(), String::new());
        let (mut ldone, mut sdone) = (false, false);
        loop {
            if lbuf.is_empty() && !ldone {
                let page = ledger.entries(&lafter, PAGE).await?;
                ldone = page.len() < PAGE as usize;
                if let Some(last) = page.last() {
                    lafter = last.erasure_id.clone();
                }
                lbuf.extend(page);
            }
            if sbuf.is_empty() && !sdone {
                let page = store.list_erasures(None, &safter, PAGE).await?;
                sdone = page.len() < PAGE as usize;
                if let Some(last) = page.last() {
                    safter = last.erasure_id.clone();
                }
                sbuf.extend(page);
            }
            let take_ledger = match (lbuf.front(), sbuf.front()) {
                (None, None) => break,
                (Some(_), None) => Some(true),
                (None, Some(_)) => Some(false),
                (Some(l), Some(s)) => match l.erasure_id.cmp(&s.erasure_id) {
                    std::cmp::Ordering::Less => Some(true),
                    std::cmp::Ordering::Greater => Some(false),
                    std::cmp::Ordering::Equal => None,
                },
            };
            match take_ledger {
                Some(true) => {
                    if let Some(l) = lbuf.pop_front() {
                        self.reconcile_entry(&l, None, &mut out).await?;
                    }
                }
                Some(false) => {
                    if let Some(s) = sbuf.pop_front() {
                        ledger.record(&entry_of(&s)).await?;
                        out.ledger_updated += 1;
                    }
                }
                None => {
                    if let (Some(l), Some(s)) = (lbuf.pop_front(), sbuf.pop_front()) {
                        if rank(s.state) > rank(l.state) {
                            ledger.record(&entry_of(&s)).await?;
                            out.ledger_updated += 1;
                        }
                        self.reconcile_entry(&l, Some(&s), &mut out).await?;
                    }
                }
            }
        }
        if out.restored + out.reopened + out.cancelled + out.keys_destroyed_again > 0 {
            tracing::warn!(
                ?out,
                "key store was behind the erasure ledger (restored backup?); erasures re-applied"
            );
        }
        Ok(out)
    }

    async fn reconcile_entry(
        &self,
        l: &LedgerEntry,
        s: Option<&ErasureRecord>,
        out: &mut Reconciled,
    ) -> Result<()> {
        out.entries += 1;
        let store = self.keyring.store();
        let actor = Actor::system("erasure ledger");
        let (scope, _) = scope_of(l.subject_id.as_deref());
        let event = |action: &str| AuditEvent {
            action: action.into(),
            resource_type: scope.into(),
            resource_id: l.subject_id.clone().unwrap_or_else(|| l.tenant_id.clone()),
            actor: actor.id.clone(),
            tenant_id: Some(l.tenant_id.clone()),
            caller_ip: None,
            details: json!({ "erasure_id": l.erasure_id }),
        };
        let executed = matches!(l.state, ErasureState::Executing | ErasureState::Completed);
        match (l.state, s) {
            (ErasureState::Cancelled, Some(s)) if s.state == ErasureState::Scheduled => {
                let cancelled = store
                    .cancel_erasure(&l.erasure_id, &actor.id, &event("erasure.cancelled"), false)
                    .await?;
                out.cancelled += u64::from(cancelled);
            }
            (ErasureState::Cancelled, _) => {}
            (state, None) => {
                let created = store
                    .create_erasure(
                        NewErasure {
                            erasure_id: l.erasure_id.clone(),
                            tenant_id: l.tenant_id.clone(),
                            subject_id: l.subject_id.clone(),
                            requested_by: l.requested_by.clone(),
                            requested_at: l.requested_at,
                            execute_after: l.execute_after,
                            state: if rank(state) > 0 {
                                ErasureState::Executing
                            } else {
                                ErasureState::Scheduled
                            },
                        },
                        Some(&event("erasure.restored")),
                    )
                    .await?;
                if created.was_created() {
                    out.restored += 1;
                    if rank(state) > 0 {
                        // Picked up by the worker at once (idle since "0").
                        store.reopen_erasure(&l.erasure_id, l.execute_after).await?;
                    }
                }
            }
            (_, Some(s)) if executed && s.state == ErasureState::Scheduled => {
                out.reopened +=
                    u64::from(store.reopen_erasure(&l.erasure_id, l.execute_after).await?);
            }
            _ => {}
        }
        if executed {
            let k = &self.keyring;
            out.keys_destroyed_again += match l.subject_id.as_deref() {
                Some(subj) => {
                    let tombstone_or_key = k.shred_subject(&l.tenant_id, subj).await?;
                    u64::from(tombstone_or_key)
                }
                None => {
                    let (v, s) = k.shred_tenant(&l.tenant_id).await?;
                    v + s
                }
            };
        }
        Ok(())
    }

    /// Runs the worker until the task is aborted: reconciles with the ledger at once
    /// and every `reconcile_every`, and executes due requests every `poll`.
    pub fn spawn_worker(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_reconcile: Option<tokio::time::Instant> = None;
            loop {
                if last_reconcile.is_none_or(|t| t.elapsed() >= self.cfg.reconcile_every) {
                    match self.reconcile().await {
                        Ok(_) => last_reconcile = Some(tokio::time::Instant::now()),
                        Err(e) => {
                            tracing::warn!(error = %e, "erasure ledger reconciliation failed; will retry")
                        }
                    }
                }
                if let Err(e) = self.run_due().await {
                    tracing::warn!(error = %e, "cannot list due erasures; will retry");
                }
                tokio::time::sleep(self.cfg.poll).await;
            }
        })
    }
}

/// A tenant's restriction state for auditing: suspended if any version is.
fn tenant_state(t: &crate::keyring::TenantInfo) -> KeyState {
    if t.versions.iter().any(|v| v.state == KeyState::Suspended) {
        KeyState::Suspended
    } else {
        KeyState::Active
    }
}
