//! The report's model: the types the JSON of `docs/COMPLIANCE.md` is made of (format
//! [`FORMAT`]), the configuration facts among them ([`Configuration`]), the verdict
//! scale ([`Verdict`]), the promises ([`PromiseId`]) and what a caller asks for
//! ([`Options`]).
//!
//! Does not: read the store or the configuration (the collectors and `facts` do),
//! decide a verdict (the verdict rules do), or render anything (`html` does).

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::erasure::receipt::rfc3339_ms;

mod configuration;
pub use configuration::{AuditFacts, AuthzFacts, Configuration, KmsFacts, RotationFacts, TlsFacts};

/// Format tag of the JSON report; changes only with an incompatible change.
pub const FORMAT: &str = "fieldkey-compliance-report/2";

/// The agreements' erasure limit.
pub const ERASURE_LIMIT_DAYS: i64 = 30;

/// Most restricted subjects listed per tenant (all are counted).
pub const MAX_LISTED_SUBJECTS: usize = 1000;

/// How a promise stands. Ordered from best to worst for [`Verdict::worst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Nothing to assess (no tenant, no erasure in the period, ...).
    NotApplicable,
    /// Met, with the evidence shown.
    Met,
    /// Met, but something needs an operator soon (a key due for rotation, a rotation
    /// not yet completed, an erasure pending).
    Attention,
    /// Not met: the report says which item and why.
    NotMet,
}

impl Verdict {
    /// The worse of two verdicts.
    #[must_use]
    pub fn worst(self, other: Self) -> Self {
        self.max(other)
    }

    /// Stable text form (as in the JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NotApplicable => "not-applicable",
            Verdict::Met => "met",
            Verdict::Attention => "attention",
            Verdict::NotMet => "not-met",
        }
    }
}

/// The promises of a data processing agreement that this report gives evidence for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromiseId {
    /// Personal data encrypted at rest with AES-256-GCM under tenant-specific keys.
    EncryptionAtRest,
    /// Keys protected by a KMS.
    KmsProtection,
    /// Tenant keys rotated every year.
    KeyRotation,
    /// After a rotation, stored ciphertexts move to the new key version.
    RotationCompletion,
    /// Erasure of a user or a tenant within 30 days, with cryptographic proof.
    Erasure,
    /// Restriction of processing (GDPR Art. 18) honoured.
    Restriction,
    /// A tamper-evident audit log.
    AuditLog,
    /// TLS 1.3 with client certificates between services.
    TransportSecurity,
    /// Default-deny access control per caller identity.
    AccessControl,
}

impl PromiseId {
    /// Every promise, in report order.
    pub const ALL: [PromiseId; 9] = [
        PromiseId::EncryptionAtRest,
        PromiseId::KmsProtection,
        PromiseId::KeyRotation,
        PromiseId::RotationCompletion,
        PromiseId::Erasure,
        PromiseId::Restriction,
        PromiseId::AuditLog,
        PromiseId::TransportSecurity,
        PromiseId::AccessControl,
    ];

    /// The promise as an agreement words it.
    pub fn text(self) -> &'static str {
        match self {
            PromiseId::EncryptionAtRest => {
                "Personal data encrypted at rest with AES-256-GCM under tenant-specific keys"
            }
            PromiseId::KmsProtection => "Keys protected by a KMS",
            PromiseId::KeyRotation => "Tenant keys rotated every year",
            PromiseId::RotationCompletion => {
                "After a rotation, stored ciphertexts move to the new key version"
            }
            PromiseId::Erasure => {
                "Erasure of a user or a tenant within 30 days, with cryptographic proof"
            }
            PromiseId::Restriction => "Restriction (suspension) of processing honoured",
            PromiseId::AuditLog => "Tamper-evident audit log",
            PromiseId::TransportSecurity => "TLS 1.3 with client certificates between services",
            PromiseId::AccessControl => "Default-deny access control per caller identity",
        }
    }

    /// The report section that shows the evidence.
    pub fn section(self) -> &'static str {
        match self {
            PromiseId::EncryptionAtRest | PromiseId::KmsProtection => "configuration",
            PromiseId::KeyRotation | PromiseId::RotationCompletion => "tenants",
            PromiseId::Erasure => "erasures",
            PromiseId::Restriction => "tenants",
            PromiseId::AuditLog => "audit_log",
            PromiseId::TransportSecurity | PromiseId::AccessControl => "configuration",
        }
    }

    /// Stable text form (as in the JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            PromiseId::EncryptionAtRest => "encryption-at-rest",
            PromiseId::KmsProtection => "kms-protection",
            PromiseId::KeyRotation => "key-rotation",
            PromiseId::RotationCompletion => "rotation-completion",
            PromiseId::Erasure => "erasure",
            PromiseId::Restriction => "restriction",
            PromiseId::AuditLog => "audit-log",
            PromiseId::TransportSecurity => "transport-security",
            PromiseId::AccessControl => "access-control",
        }
    }
}

/// The whole report (`docs/COMPLIANCE.md` documents every field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`FORMAT`].
    pub format: String,
    /// When the report was made (RFC 3339 UTC).
    pub generated_at: String,
    /// The same, Unix ms.
    pub generated_at_unix_ms: i64,
    /// The period the erasure, job and audit sections cover.
    pub period: Period,
    /// The one tenant reported on, if the report was limited to one.
    pub tenant_filter: Option<String>,
    /// Verdicts first: what a reader must see.
    pub summary: Summary,
    /// The configuration in force.
    pub configuration: Configuration,
    /// The audit chain, verified.
    pub audit_log: AuditSection,
    /// Each tenant's keys, rotation, re-encryption and restrictions.
    pub tenants: Vec<TenantSection>,
    /// Erasure requests in the period.
    pub erasures: Vec<ErasureEntry>,
    /// Key epochs and the key-store backup horizon (`docs/ERASURE.md` §6): which
    /// key-store backups can still be restored.
    pub backups: BackupsSection,
    /// Re-encryption jobs in the period.
    pub jobs: Vec<JobEntry>,
    /// Where the public keys that verified the signatures came from.
    pub trust_anchors: TrustAnchors,
}

/// A field used without a row context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnboundField {
    /// Tenant.
    pub tenant_id: String,
    /// Field.
    pub field: String,
    /// Values encrypted without a context in the period.
    pub encrypted_without_context: u64,
}

/// `pinned`: public keys given by the operator (configuration or command line),
/// trusted independently of the key store. `key-store`: read from the store the report
/// checks, so a writer of that store could have added a key and signed with it.
pub const ANCHORS_PINNED: &str = "pinned";
/// See [`ANCHORS_PINNED`].
pub const ANCHORS_KEY_STORE: &str = "key-store";

/// The keys signatures were verified with, and where they came from. A promise whose
/// evidence is signed is never met on keys read from the key store alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchors {
    /// Source of the audit checkpoint keys: [`ANCHORS_PINNED`] or
    /// [`ANCHORS_KEY_STORE`].
    pub audit: String,
    /// Their key ids (`ed25519:` and the first 8 bytes of the key's SHA-256, hex).
    pub audit_key_ids: Vec<String>,
    /// Source of the keys of erasure receipts and "backups sealed" statements.
    pub receipts: String,
    /// Their key ids.
    pub receipt_key_ids: Vec<String>,
}

/// A time range; either end open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    /// Start (RFC 3339), inclusive.
    pub since: Option<String>,
    /// Start, Unix ms.
    pub since_unix_ms: Option<i64>,
    /// End (RFC 3339), exclusive.
    pub until: Option<String>,
    /// End, Unix ms.
    pub until_unix_ms: Option<i64>,
}

impl Period {
    pub(super) fn new(since: Option<i64>, until: Option<i64>) -> Self {
        Self {
            since: since.map(rfc3339_ms),
            since_unix_ms: since,
            until: until.map(rfc3339_ms),
            until_unix_ms: until,
        }
    }

    /// Whether `[start, end]` overlaps the period.
    pub(super) fn overlaps(&self, start: i64, end: i64) -> bool {
        self.since_unix_ms.is_none_or(|s| end >= s) && self.until_unix_ms.is_none_or(|u| start < u)
    }

    pub(super) fn contains(&self, t: i64) -> bool {
        self.overlaps(t, t)
    }
}

/// The verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// True when no promise is `not-met` and no integrity check failed.
    pub all_met: bool,
    /// The worst verdict of all promises.
    pub verdict: Verdict,
    /// Integrity failures (a broken audit chain, a receipt that does not verify) and
    /// broken promises, most serious first: shown at the top, never buried.
    pub alerts: Vec<String>,
    /// One entry per promise, in [`PromiseId::ALL`] order.
    pub promises: Vec<PromiseResult>,
}

/// One promise and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseResult {
    /// Stable id.
    pub id: PromiseId,
    /// The promise as an agreement words it.
    pub promise: String,
    /// How it stands.
    pub verdict: Verdict,
    /// The report section with the evidence.
    pub section: String,
    /// Why (the items that are not met or need attention, or what shows it is met).
    pub findings: Vec<String>,
}

/// The audit chain, verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSection {
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// Whether the whole chain verified (hashes, order, checkpoints, head).
    pub verified: bool,
    /// The first problem, if it did not.
    pub error: Option<String>,
    /// Records in the log.
    pub records: u64,
    /// Last record.
    pub last_seq: u64,
    /// Valid signed checkpoints.
    pub checkpoints: u64,
    /// The last checkpoint record, and when it was written.
    pub last_checkpoint_seq: Option<u64>,
    /// When (RFC 3339).
    pub last_checkpoint_at: Option<String>,
    /// The same, Unix ms (not serialized: `last_checkpoint_at` is).
    #[serde(skip)]
    pub last_checkpoint_unix_ms: Option<i64>,
    /// Records after the last checkpoint (chained, not yet signed).
    pub records_after_last_checkpoint: u64,
    /// Records written in the period.
    pub records_in_period: u64,
    /// Where the public keys that verified the checkpoints came from: `pinned` (given
    /// to the report) or `key-store` (read from the store being verified).
    pub key_source: String,
    /// Their ids.
    pub key_ids: Vec<String>,
    /// Fields whose values were encrypted without a row context in the period (any
    /// row of the tenant accepts such a value: docs/FORMAT.md §3).
    pub unbound_fields: Vec<UnboundField>,
}

/// One tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSection {
    /// Tenant id.
    pub tenant_id: String,
    /// `active`, `suspended` or `erased`.
    pub state: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// KMS key that wraps new versions.
    pub kms_key_id: String,
    /// Every live key version is wrapped under a disaster-recovery KMS key too.
    #[serde(default)]
    pub second_wrapping: bool,
    /// Key versions, ascending.
    pub versions: Vec<VersionEntry>,
    /// Rotation against the policy.
    pub rotation: RotationEntry,
    /// Ciphertexts left on older versions.
    pub rotation_completion: CompletionEntry,
    /// Restriction of processing.
    pub restriction: RestrictionEntry,
}

/// One key version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Version number.
    pub version: u32,
    /// State (`active`, `decrypt-only`, `suspended`, `destroyed`, `retired`).
    pub state: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Age, days.
    pub age_days: f64,
    /// Last state change (RFC 3339).
    pub updated_at: String,
    /// The KMS key that wraps it.
    pub kms_key_id: String,
    /// SHA-256 of the wrapped (KMS-encrypted) key: names it, reveals nothing.
    pub fingerprint: String,
    /// A disaster-recovery KMS key wraps it too (`[kms.dr]`).
    #[serde(default)]
    pub second_wrapping: bool,
}

/// A tenant's rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationEntry {
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// `ok`, `due-soon`, `overdue` or `no-active-key`.
    pub status: String,
    /// The active version.
    pub active_version: Option<u32>,
    /// Its age, days.
    pub age_days: Option<f64>,
    /// The policy's limit, days.
    pub max_key_age_days: u32,
    /// In words.
    pub finding: String,
}

/// What re-encryption jobs say about older key versions still in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionEntry {
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// Decrypt-only versions (still readable, waiting for retirement).
    pub old_versions: Vec<OldVersion>,
}

/// A decrypt-only version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldVersion {
    /// Version number.
    pub version: u32,
    /// Ciphertexts left on it (or older) by the latest completed job of each table
    /// since the rotation; `None` when no job has completed since.
    pub ciphertexts_left: Option<u64>,
    /// Jobs since the rotation that cover this tenant.
    pub jobs: Vec<String>,
    /// In words.
    pub finding: String,
}

/// A tenant's restricted processing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestrictionEntry {
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// Whether the whole tenant is suspended.
    pub tenant_suspended: bool,
    /// Suspended subjects (all counted).
    pub suspended_subjects: u64,
    /// The first [`MAX_LISTED_SUBJECTS`], by id.
    pub subjects: Vec<RestrictedSubject>,
}

/// A suspended subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestrictedSubject {
    /// Subject id.
    pub subject_id: String,
    /// Since when (its key's last state change, RFC 3339).
    pub since: String,
    /// The audit record of its suspension, if found.
    pub audit_seq: Option<u64>,
}

/// How an erasure request stands against the 30-day limit: its live-key stage (the
/// keys destroyed and the receipt issued). The backup stage is [`BackupsStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErasureStatus {
    /// Completed within 30 days of the request, receipt verified.
    OnTime,
    /// Completed more than 30 days after the request.
    Late,
    /// Not yet carried out; its 30 days are not over.
    Pending,
    /// Not yet carried out and its 30 days are over.
    Overdue,
    /// Cancelled inside its grace period (nothing destroyed).
    Cancelled,
    /// Completed, but its receipt is missing, does not verify, or does not match the
    /// request or the audit chain; or the request does not match its audit records.
    ProofFailed,
    /// Completed with a valid receipt, but the erased keys hold material again (a
    /// restored key-store backup the erasure ledger has not been reconciled with).
    KeysLive,
}

/// The backup stage of a completed erasure: the key-store backups that hold copies of
/// the destroyed keys are sealed once the KMS key of the epoch active at destruction,
/// and of every older epoch, is scheduled for deletion (`docs/ERASURE.md` §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupsStatus {
    /// Sealed within 30 days of the request, by verified "backups sealed" statements.
    Sealed,
    /// Not sealed yet; the 30 days are not over.
    Pending,
    /// Sealed more than 30 days after the request, or not sealed and the 30 days are
    /// over.
    Late,
}

/// One erasure request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasureEntry {
    /// Request id.
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject (absent for a whole tenant).
    pub subject_id: Option<String>,
    /// `subject` or `tenant`.
    pub scope: String,
    /// Stored state.
    pub state: String,
    /// Who asked.
    pub requested_by: String,
    /// When (RFC 3339).
    pub requested_at: String,
    /// End of the grace period (RFC 3339).
    pub scheduled_for: String,
    /// The 30-day limit (RFC 3339).
    pub deadline: String,
    /// When the keys were destroyed (RFC 3339; from the verified receipt).
    pub completed_at: Option<String>,
    /// When it was cancelled (RFC 3339).
    pub cancelled_at: Option<String>,
    /// Days from request to completion (or to now, while open).
    pub days: f64,
    /// Execution attempts.
    pub attempts: u32,
    /// The live-key stage against the limit.
    pub status: ErasureStatus,
    /// Completed requests: the key epoch active when the keys were destroyed (the
    /// larger of the verified receipt's and the request's; 0 before epochs). Key-store
    /// backups hold copies of the destroyed keys under that epoch's key or an older one.
    pub backup_epoch: Option<u64>,
    /// When those backups are sealed (RFC 3339): the latest deletion date of the KMS
    /// keys of epochs 0 to `backup_epoch`, once every one of them is sealed by a
    /// verified statement (a date in the future: scheduled).
    pub backups_sealed_at: Option<String>,
    /// Days from request to `backups_sealed_at`.
    pub backups_days: Option<f64>,
    /// The backup stage against the limit (completed requests).
    pub backups_status: Option<BackupsStatus>,
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// The receipt check (completed requests).
    pub receipt: Option<ReceiptCheck>,
    /// Why the evidence fails (`proof-failed`, `keys-live`), or why the backups are
    /// late, if they are.
    pub problem: Option<String>,
}

/// Key epochs and the key-store backup horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupsSection {
    /// The promise it supports.
    pub promise: PromiseId,
    /// Key-store backups taken at or after this time (RFC 3339) can be restored: the
    /// oldest epoch whose key still opens backups became active then. `None`:
    /// unbounded (no epoch yet, or the legacy key of epoch 0 still opens backups).
    pub restorable_since: Option<String>,
    /// The horizon in words.
    pub finding: String,
    /// The active epoch, if epochs have started.
    pub active_epoch: Option<u64>,
    /// Every epoch, ascending.
    pub epochs: Vec<EpochEntry>,
}

/// One key epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEntry {
    /// Epoch number (0: the legacy default key of a store from before epochs).
    pub epoch: u64,
    /// Its KMS key.
    pub kms_key_id: Option<String>,
    /// `creating`, `active`, `retiring` or `sealed`.
    pub state: String,
    /// When it became active (RFC 3339): backups taken from then on need its key.
    pub created_at: String,
    /// When the next epoch replaced it (RFC 3339).
    pub rolled_at: Option<String>,
    /// When its key's deletion was scheduled (RFC 3339).
    pub sealed_at: Option<String>,
    /// When the KMS deletes its key (RFC 3339).
    pub deletion_date: Option<String>,
    /// What scheduling the deletion did (`scheduled`, `already-scheduled`,
    /// `already-deleted`, `kept-legacy`).
    pub kms_status: Option<String>,
    /// Whether backups that need its key can still be restored: true unless its
    /// deletion is scheduled and proven by a verified statement.
    pub opens_backups: bool,
    /// Sealed epochs whose key is deleted: whether the signed "backups sealed"
    /// statement verifies with a receipt key, matches this epoch and is recorded in the
    /// audit chain (`epoch.sealed` with its digest). `None`: not sealed, or kept.
    pub seal_verified: Option<bool>,
    /// Why it does not.
    pub seal_error: Option<String>,
}

/// A receipt, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptCheck {
    /// Signature valid, consistent, and matching the request.
    pub verified: bool,
    /// Its erasure record is in the audit chain with the receipt's digest.
    pub chained: bool,
    /// What failed.
    pub error: Option<String>,
    /// The key that signed it.
    pub signing_key_id: Option<String>,
    /// Its audit record.
    pub audit_seq: Option<u64>,
    /// Keys it says were destroyed (tenant versions or the subject key, plus subject
    /// keys of an erased tenant).
    pub keys_destroyed: u64,
}

/// A re-encryption job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEntry {
    /// Job id.
    pub job_id: String,
    /// The table.
    pub target: String,
    /// The tenant it covers (`None`: every tenant of the table).
    pub tenant_id: Option<String>,
    /// State.
    pub state: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Rows in scope (estimate) and read.
    pub total_rows: u64,
    /// Rows read.
    pub rows_scanned: u64,
    /// Values moved to the active version.
    pub values_rewrapped: u64,
    /// Values whose key was shredded (left unreadable).
    pub values_shredded: u64,
    /// Values that could not be moved.
    pub values_failed: u64,
    /// Values left on old versions: tenant -> version -> count.
    pub leftovers: BTreeMap<String, BTreeMap<u32, u64>>,
}

/// What to report on.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One tenant only.
    pub tenant: Option<String>,
    /// Period start, Unix ms.
    pub since_ms: Option<i64>,
    /// Period end, Unix ms.
    pub until_ms: Option<i64>,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Trust anchors: the public keys of the audit checkpoints, from the
    /// configuration or the command line; `None`: read from the store (and then the
    /// audit promise is never met).
    pub audit_keys: Option<Vec<VerifyingKey>>,
    /// Trust anchors: the public keys of erasure receipts and "backups sealed"
    /// statements; `None`: read from the store (and then the erasure promise is never
    /// met).
    pub receipt_keys: Option<Vec<VerifyingKey>>,
}
