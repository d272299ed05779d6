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

mod execution;
mod reconcile;
mod requests;
mod restriction;
mod worker;

pub use reconcile::Reconciled;

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

use crate::crypto::Scope;
use crate::error::Result;
use crate::keyring::Keyring;
use crate::kms::Kms;
use crate::model::{AuditEvent, ErasureRecord};
use crate::signing::{Signer, SigningKeys};
use crate::store::{ErasureStore, LedgerEntry};

/// The longest grace period a request may have: the 30 days of the agreements.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Purpose of the receipt signing key in the store.
/// Purpose of the key that signs erasure receipts (`fk_signing_keys`).
pub const SIGNING_PURPOSE: &str = "erasure-receipt";

/// Erasure settings.
#[derive(Debug, Clone)]
pub struct ErasureConfig {
    /// Longest grace period a request may ask for (at most [`MAX_GRACE`]; the
    /// configuration keeps it short enough that grace + the backup horizon of key
    /// epochs stays within 30 days, `docs/ERASURE.md` §6).
    pub max_grace: Duration,
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
            max_grace: MAX_GRACE,
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

/// The erasure workflow over a keyring.
pub struct Erasures {
    keyring: Arc<Keyring>,
    store: Arc<dyn ErasureStore>,
    kms: Arc<dyn Kms>,
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

/// An audit event about an erasure's target: `subject`, or the whole tenant.
fn target_event(
    action: impl Into<String>,
    actor: &Actor,
    tenant: &str,
    subject: Option<&str>,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        action: action.into(),
        resource_type: scope_of(subject).0.into(),
        resource_id: subject.unwrap_or(tenant).to_owned(),
        actor: actor.id.clone(),
        tenant_id: Some(tenant.to_owned()),
        caller_ip: actor.ip.clone(),
        details,
    }
}

fn scope_of(subject: Option<&str>) -> (&'static str, Scope) {
    match subject {
        Some(_) => (receipt::SCOPE_SUBJECT, Scope::Subject),
        None => (receipt::SCOPE_TENANT, Scope::Tenant),
    }
}

impl Erasures {
    /// The workflow over `keyring` (which should have an erasure ledger): requests kept
    /// in `store`, the tenant's own KMS key scheduled for deletion in `kms`, receipts
    /// signed by a key from `keys`.
    pub fn new(
        keyring: Arc<Keyring>,
        store: Arc<dyn ErasureStore>,
        kms: Arc<dyn Kms>,
        keys: &SigningKeys,
        cfg: ErasureConfig,
    ) -> Self {
        Self {
            signer: keys.signer(SIGNING_PURPOSE, cfg.executor.clone()),
            keyring,
            store,
            kms,
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

    /// The public key that verifies receipts, and its id (created on first use).
    ///
    /// # Errors
    /// Store or KMS errors.
    pub async fn public_key(&self) -> Result<(String, VerifyingKey)> {
        self.signer.public_key().await
    }
}
