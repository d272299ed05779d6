//! The compliance evidence report: what a privacy officer or an auditor asks to see
//! proven, read from the key store and the configuration in force.
//!
//! Owns: the report's model ([`Report`], serialized as the JSON of
//! `docs/COMPLIANCE.md`, format [`FORMAT`]), the verdict of every promise of a data
//! processing agreement that fieldkey supports ([`PromiseId`]), and how they are derived:
//! key ages against the rotation policy, ciphertexts left on old key versions by
//! re-encryption jobs, erasure requests against the 30-day limit with their receipts
//! verified and matched to the audit chain, restricted subjects, the audit chain verified
//! to its last signed checkpoint, and the configuration facts. [`html`] renders it.
//!
//! Must not: write anything, call the KMS, or put key material or personal data beyond
//! identifiers in the report (fingerprints of wrapped keys, ids and times only).

mod evidence;
pub mod html;

pub use evidence::Evidence;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::audit::verify::verify_store;
use crate::config::Config;
use crate::erasure::receipt::{self, SignedReceipt, rfc3339_ms};
use crate::error::Result;
use crate::jobs::JobView;
use crate::keyring::TenantInfo;
use crate::policy::RotationPolicy;
use crate::policy::RotationStatus;
use crate::policy::authz::PolicyStatus;
use crate::store::{ErasureRecord, ErasureState, JobState, KeyState, KeyStore};

/// Format tag of the JSON report; changes only with an incompatible change.
pub const FORMAT: &str = "fieldkey-compliance-report/1";

/// The agreements' erasure limit.
pub const ERASURE_LIMIT_DAYS: i64 = 30;

const DAY_MS: i64 = 86_400_000;

/// Key ids of the local development KMS start with this.
const LOCAL_KMS_PREFIX: &str = "local-";

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
    /// Re-encryption jobs in the period.
    pub jobs: Vec<JobEntry>,
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
    fn new(since: Option<i64>, until: Option<i64>) -> Self {
        Self {
            since: since.map(rfc3339_ms),
            since_unix_ms: since,
            until: until.map(rfc3339_ms),
            until_unix_ms: until,
        }
    }

    /// Whether `[start, end]` overlaps the period.
    fn overlaps(&self, start: i64, end: i64) -> bool {
        self.since_unix_ms.is_none_or(|s| end >= s) && self.until_unix_ms.is_none_or(|u| start < u)
    }

    fn contains(&self, t: i64) -> bool {
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

/// Configuration facts that matter to the promises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// The ciphertext envelope and its cipher.
    pub envelope: String,
    /// Key store backend (`sqlite`, `postgres`).
    pub key_store: String,
    /// KMS in use.
    pub kms: KmsFacts,
    /// The rotation policy in force.
    pub rotation_policy: RotationFacts,
    /// Transport security.
    pub tls: TlsFacts,
    /// Authorization.
    pub authorization: AuthzFacts,
    /// Audit aggregation and checkpoints.
    pub audit: AuditFacts,
    /// Where the erasure ledger lives (`separate` from the key store, or `shared`).
    pub erasure_ledger: String,
}

/// The KMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsFacts {
    /// `aws` or `local` (development only).
    pub provider: String,
    /// The default KMS key (tenants may bring their own).
    pub default_key_id: Option<String>,
    /// AWS region, if set.
    pub region: Option<String>,
}

/// The rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFacts {
    /// Maximum age of a tenant's active key version, days.
    pub max_key_age_days: u32,
    /// Warning window, days.
    pub warn_days: u32,
    /// Policy file name, or `default`.
    pub source: String,
}

/// Transport security.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFacts {
    /// The mTLS listener for remote callers, if configured.
    pub mtls_listener: Option<String>,
    /// Protocol versions the mTLS listener accepts.
    pub versions: Vec<String>,
    /// Its preferred cipher suite.
    pub preferred_cipher_suite: String,
    /// Whether a client certificate is required (always, when mTLS is on).
    pub client_certificate_required: bool,
    /// Local (plaintext, in-pod) listeners: loopback TCP and Unix socket.
    pub local_listeners: Vec<String>,
    /// Whether Linkerd's `l5d-client-id` is trusted as the caller identity.
    pub trust_linkerd_identity: bool,
}

/// Authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzFacts {
    /// Whether a policy set is enforced (off = every caller may do everything).
    pub enabled: bool,
    /// Policy files of the set in force.
    pub files: Vec<String>,
    /// Policies in it.
    pub policies: usize,
    /// SHA-256 of the set (names and contents).
    pub digest: Option<String>,
    /// Why the policy directory does not load (or its newest change was refused).
    pub error: Option<String>,
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFacts {
    /// Data operations are counted per window of this many seconds.
    pub window_secs: u64,
    /// A signed checkpoint is appended this often, seconds.
    pub checkpoint_secs: u64,
}

impl Configuration {
    /// The authorization facts of a policy state (`None`: off; `Some(Err)`: the
    /// directory does not load).
    pub fn authorization_of(
        authz: Option<std::result::Result<PolicyStatus, String>>,
    ) -> AuthzFacts {
        match authz {
            None => AuthzFacts {
                enabled: false,
                files: Vec::new(),
                policies: 0,
                digest: None,
                error: None,
            },
            Some(Ok(st)) => AuthzFacts {
                enabled: true,
                files: st.files,
                policies: st.policies,
                digest: Some(st.digest),
                error: st.last_error,
            },
            Some(Err(e)) => AuthzFacts {
                enabled: false,
                files: Vec::new(),
                policies: 0,
                digest: None,
                error: Some(e),
            },
        }
    }

    /// The facts of `cfg`, with the authorization state `authz` (`None`: off;
    /// `Some(Err)`: the directory does not load).
    pub fn from_config(
        cfg: &Config,
        rotation: &RotationPolicy,
        authz: Option<std::result::Result<PolicyStatus, String>>,
    ) -> Self {
        let file_name = |p: &Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        let mut local = Vec::new();
        if let Some(t) = &cfg.listen.tcp {
            local.push(format!("tcp {t}"));
        }
        if let Some(u) = &cfg.listen.unix {
            local.push(format!("unix {}", u.display()));
        }
        let authorization = Self::authorization_of(authz);
        Self {
            envelope: "fk1: XAES-256-GCM (AES-256-GCM under a per-message key derived from \
                       the tenant or subject key; docs/FORMAT.md)"
                .into(),
            key_store: if cfg.store.postgres_url.is_some() {
                "postgres".into()
            } else {
                "sqlite".into()
            },
            kms: KmsFacts {
                provider: if cfg.kms.aws_key_id.is_some() {
                    "aws".into()
                } else {
                    "local".into()
                },
                default_key_id: cfg.kms.aws_key_id.clone(),
                region: cfg.kms.aws_region.clone(),
            },
            rotation_policy: RotationFacts {
                max_key_age_days: rotation.max_key_age_days,
                warn_days: rotation.warn_days,
                source: cfg
                    .policy
                    .rotation
                    .as_deref()
                    .map_or_else(|| "default".into(), file_name),
            },
            tls: TlsFacts {
                mtls_listener: cfg.listen.mtls.as_ref().map(|m| m.listen.clone()),
                versions: vec!["TLS 1.3".into()],
                preferred_cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
                client_certificate_required: cfg.listen.mtls.is_some(),
                local_listeners: local,
                trust_linkerd_identity: cfg.authz.trust_linkerd_identity,
            },
            authorization,
            audit: AuditFacts {
                window_secs: cfg.audit.window_secs,
                checkpoint_secs: cfg.audit.checkpoint_secs,
            },
            erasure_ledger: match (&cfg.erasure.ledger, &cfg.store.postgres_url) {
                (None, Some(_)) => "shared".into(),
                (Some(l), Some(pg)) if l == pg => "shared".into(),
                _ => "separate".into(),
            },
        }
    }
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

/// How an erasure request stands against the 30-day limit.
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
    /// Against the limit.
    pub status: ErasureStatus,
    /// The promise it supports.
    pub promise: PromiseId,
    /// How it stands.
    pub verdict: Verdict,
    /// The receipt check (completed requests).
    pub receipt: Option<ReceiptCheck>,
    /// Why the evidence fails (`proof-failed`, `keys-live`), if it does.
    pub problem: Option<String>,
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
    /// Pinned public keys of the audit checkpoints; `None`: read from the store.
    pub audit_keys: Option<Vec<VerifyingKey>>,
    /// Pinned public keys of erasure receipts; `None`: read from the store.
    pub receipt_keys: Option<Vec<VerifyingKey>>,
}

fn days(ms: i64) -> f64 {
    // Ages in ms fit an f64 exactly far beyond any key's life.
    #[allow(clippy::cast_precision_loss, reason = "see above")]
    let d = ms as f64 / DAY_MS as f64;
    (d * 100.0).round() / 100.0
}

/// The public keys the store records for `purpose`; a malformed one is reported in
/// `unreadable` (and verifies nothing) instead of failing the report.
async fn store_keys(
    store: &dyn KeyStore,
    purpose: &str,
    unreadable: &mut Vec<String>,
) -> Result<Vec<VerifyingKey>> {
    let mut out = Vec::new();
    for rec in store.signing_keys(purpose).await? {
        let key = <[u8; 32]>::try_from(rec.public_key.as_slice())
            .ok()
            .and_then(|b| VerifyingKey::from_bytes(&b).ok());
        match key {
            Some(vk) => out.push(vk),
            None => unreadable.push(format!(
                "signing key {} ({purpose}) is not an Ed25519 public key",
                rec.key_id
            )),
        }
    }
    Ok(out)
}

/// What the audit chain says about erasures and restrictions.
#[derive(Default)]
struct AuditIndex {
    /// erasure id -> (seq, receipt digest) of its `erasure.completed` record.
    completed: HashMap<String, (u64, String)>,
    /// erasure id -> (time, tenant, subject) of its `erasure.requested` record.
    requested: HashMap<String, (i64, String, Option<String>)>,
    /// erasure ids with an `erasure.cancelled` record.
    cancelled: std::collections::HashSet<String>,
    /// erasure ids re-created from the erasure ledger after a restore
    /// (`erasure.restored`): their `erasure.requested` record may be gone with the backup.
    restored: std::collections::HashSet<String>,
    /// (tenant, resource type, resource id) -> seq of the latest suspension record.
    suspended: HashMap<(String, String, String), u64>,
    in_period: u64,
}

/// Builds the report from `store` (read only) and the configuration facts.
///
/// # Errors
/// [`crate::error::Error::Store`] if the store cannot be read. Everything the store
/// holds that does not verify is reported, not returned as an error.
pub async fn build(
    store: &dyn KeyStore,
    configuration: Configuration,
    rotation: &RotationPolicy,
    opts: &Options,
) -> Result<Report> {
    let period = Period::new(opts.since_ms, opts.until_ms);
    let now = opts.now_ms;
    // Store records that do not decode: shown as alerts, never fatal.
    let mut unreadable = Vec::new();

    // The audit chain, with what later sections look up in it.
    let (audit_keys, key_source) = match &opts.audit_keys {
        Some(k) => (k.clone(), "pinned"),
        None => (
            store_keys(store, crate::audit::CHECKPOINT_PURPOSE, &mut unreadable).await?,
            "key-store",
        ),
    };
    let mut index = AuditIndex::default();
    let verified = verify_store(store, audit_keys.clone(), |r: &AuditRecord| {
        if period.contains(r.ts) {
            index.in_period += 1;
        }
        let erasure_id = r.event.details.get("erasure_id").and_then(|v| v.as_str());
        let resource = || {
            (
                r.event.tenant_id.clone().unwrap_or_default(),
                r.event.resource_type.clone(),
                r.event.resource_id.clone(),
            )
        };
        match (r.event.action.as_str(), erasure_id) {
            ("erasure.completed", Some(id)) => {
                if let Some(digest) = r
                    .event
                    .details
                    .get("receipt_sha256")
                    .and_then(|v| v.as_str())
                {
                    index
                        .completed
                        .insert(id.to_owned(), (r.seq, digest.to_owned()));
                }
            }
            ("erasure.requested", Some(id)) => {
                let tenant = r.event.tenant_id.clone().unwrap_or_default();
                let subject =
                    (r.event.resource_type == "subject").then(|| r.event.resource_id.clone());
                index
                    .requested
                    .insert(id.to_owned(), (r.ts, tenant, subject));
            }
            ("erasure.cancelled", Some(id)) => {
                index.cancelled.insert(id.to_owned());
            }
            ("erasure.restored", Some(id)) => {
                index.restored.insert(id.to_owned());
            }
            ("subject.suspended" | "tenant.suspended", _) => {
                index.suspended.insert(resource(), r.seq);
            }
            // A later resumption voids the suspension record: a new suspension needs
            // its own.
            ("subject.resumed" | "tenant.resumed", _) => {
                index.suspended.remove(&resource());
            }
            _ => {}
        }
    })
    .await?;
    let all_tenants = store.list_tenants().await?;
    let mut audit_log = audit_section(verified, key_source, &audit_keys, index.in_period);
    audit_log.verdict = audit_freshness(&audit_log, &configuration, !all_tenants.is_empty(), now);

    // A job whose counters do not decode is reported, not fatal.
    let mut jobs = Vec::new();
    for record in store.list_jobs().await? {
        match crate::store::JobProgress::parse(&record.progress) {
            Ok(progress) => jobs.push(JobView { record, progress }),
            Err(e) => unreadable.push(format!("re-encryption job {}: {e}", record.job_id)),
        }
    }
    // Tenants.
    let mut tenant_ids = all_tenants;
    if let Some(t) = &opts.tenant {
        tenant_ids.retain(|id| id == t);
        if tenant_ids.is_empty() {
            // A report on nothing must not read as "all met".
            return Err(crate::error::Error::TenantNotFound { tenant: t.clone() });
        }
    }
    let mut tenants = Vec::with_capacity(tenant_ids.len());
    for id in &tenant_ids {
        let Some(rec) = store.get_tenant(id).await? else {
            continue;
        };
        let info = TenantInfo::from(&rec);
        let restriction = restriction(store, &info, &index).await?;
        tenants.push(tenant_section(&info, rotation, &jobs, restriction, now));
    }

    // Erasures.
    let receipt_keys = match &opts.receipt_keys {
        Some(k) => k.clone(),
        None => store_keys(store, crate::erasure::SIGNING_PURPOSE, &mut unreadable).await?,
    };
    let mut erasures = Vec::new();
    let mut rows = std::collections::HashSet::new();
    let mut after = String::new();
    loop {
        let page = store
            .list_erasures(opts.tenant.as_deref(), &after, 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.erasure_id.clone();
        for e in &page {
            rows.insert(e.erasure_id.clone());
            let end = e.completed_at.or(e.cancelled_at).unwrap_or(now);
            if !period.overlaps(e.requested_at, end) {
                continue;
            }
            let mut entry = erasure_entry(e, &receipt_keys, &index, now);
            // Proven erased: the keys must still be gone (a restored backup brings
            // them back until the erasure ledger is reconciled).
            if entry.status == ErasureStatus::OnTime || entry.status == ErasureStatus::Late {
                let live = store
                    .live_key_count(&e.tenant_id, e.subject_id.as_deref())
                    .await?;
                if live > 0 {
                    entry.status = ErasureStatus::KeysLive;
                    entry.verdict = Verdict::NotMet;
                    entry.problem = Some(format!(
                        "{live} erased key(s) hold material again (a restored backup?)"
                    ));
                }
            }
            erasures.push(entry);
        }
    }
    // Requests the audit log knows that the erasure table lost.
    let mut missing: Vec<String> = index
        .requested
        .iter()
        .filter(|(id, (ts, t, _))| {
            !rows.contains(*id)
                && opts.tenant.as_ref().is_none_or(|f| f == t)
                && period.overlaps(*ts, now)
        })
        .map(|(id, (_, t, subj))| {
            format!(
                "{id} ({t}{})",
                subj.as_deref().map(|x| format!("/{x}")).unwrap_or_default()
            )
        })
        .collect();
    missing.sort();

    let jobs = jobs
        .iter()
        .filter(|j| {
            opts.tenant
                .as_ref()
                .is_none_or(|t| j.record.tenant_id.as_ref().is_none_or(|jt| jt == t))
                && period.overlaps(j.record.created_at, j.record.finished_at.unwrap_or(now))
        })
        .map(|j| job_entry(j, opts.tenant.as_deref()))
        .collect();

    let summary = summarize(
        &configuration,
        rotation,
        &audit_log,
        &tenants,
        &erasures,
        &missing,
        &unreadable,
    );
    Ok(Report {
        format: FORMAT.into(),
        generated_at: rfc3339_ms(now),
        generated_at_unix_ms: now,
        period,
        tenant_filter: opts.tenant.clone(),
        summary,
        configuration,
        audit_log,
        tenants,
        erasures,
        jobs,
    })
}

fn audit_section(
    verified: std::result::Result<crate::audit::verify::Summary, crate::audit::verify::VerifyError>,
    key_source: &str,
    keys: &[VerifyingKey],
    in_period: u64,
) -> AuditSection {
    let key_ids = keys.iter().map(receipt::key_id).collect();
    match verified {
        Ok(s) => {
            let (cp_seq, cp_at, cp_ms) = match s.last_checkpoint {
                Some((seq, ts)) => (Some(seq), Some(rfc3339_ms(ts)), Some(ts)),
                None => (None, None, None),
            };
            AuditSection {
                promise: PromiseId::AuditLog,
                // Refined by `audit_freshness` (checkpoints, empty log).
                verdict: Verdict::Met,
                verified: true,
                error: None,
                records: s.records,
                last_seq: s.last_seq,
                checkpoints: s.checkpoints,
                last_checkpoint_seq: cp_seq,
                last_checkpoint_at: cp_at,
                last_checkpoint_unix_ms: cp_ms,
                records_after_last_checkpoint: s.last_seq.saturating_sub(cp_seq.unwrap_or(0)),
                records_in_period: in_period,
                key_source: key_source.into(),
                key_ids,
            }
        }
        Err(e) => AuditSection {
            promise: PromiseId::AuditLog,
            verdict: Verdict::NotMet,
            verified: false,
            error: Some(e.to_string()),
            records: 0,
            last_seq: 0,
            checkpoints: 0,
            last_checkpoint_seq: None,
            last_checkpoint_at: None,
            last_checkpoint_unix_ms: None,
            records_after_last_checkpoint: 0,
            records_in_period: in_period,
            key_source: key_source.into(),
            key_ids,
        },
    }
}

/// Why an intact chain still falls short: empty although tenants exist (replaced or
/// truncated), no signed checkpoint yet, or a tail left unsigned for longer than two
/// checkpoint intervals (its records could be rewritten with the head).
fn audit_freshness(a: &AuditSection, cfg: &Configuration, has_tenants: bool, now: i64) -> Verdict {
    if !a.verified {
        return Verdict::NotMet;
    }
    if a.records == 0 {
        return if has_tenants {
            Verdict::NotMet
        } else {
            Verdict::NotApplicable
        };
    }
    if a.checkpoints == 0 {
        return Verdict::Attention;
    }
    let interval_ms =
        i64::try_from(cfg.audit.checkpoint_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let stale = a.last_checkpoint_unix_ms.is_some_and(|at| {
        a.records_after_last_checkpoint > 0
            && now.saturating_sub(at) > interval_ms.saturating_mul(2)
    });
    if stale {
        Verdict::Attention
    } else {
        Verdict::Met
    }
}

fn tenant_state(t: &TenantInfo) -> &'static str {
    if t.versions.iter().any(|v| v.state == KeyState::Suspended) {
        "suspended"
    } else if t
        .versions
        .iter()
        .all(|v| matches!(v.state, KeyState::Destroyed | KeyState::Retired))
    {
        "erased"
    } else {
        "active"
    }
}

fn tenant_section(
    t: &TenantInfo,
    policy: &RotationPolicy,
    jobs: &[JobView],
    restriction: RestrictionEntry,
    now: i64,
) -> TenantSection {
    let state = tenant_state(t);
    // A suspended tenant's keys are all suspended; the newest version is the one that
    // becomes active again on resumption, and its age is what rotation is about.
    let assessed = if state == "suspended" {
        let mut as_active = t.clone();
        if let Some(v) = as_active
            .versions
            .iter_mut()
            .filter(|v| v.state == KeyState::Suspended)
            .max_by_key(|v| v.version)
        {
            v.state = KeyState::Active;
        }
        as_active
    } else {
        t.clone()
    };
    let age = policy.assess(&assessed, now);
    let (verdict, finding) = match age.status {
        RotationStatus::Ok => (
            Verdict::Met,
            format!(
                "active key v{} is {:.0} days old (limit {})",
                age.active_version.unwrap_or(0),
                days(age.age_ms),
                policy.max_key_age_days
            ),
        ),
        RotationStatus::DueSoon => (
            Verdict::Attention,
            format!(
                "active key v{} is {:.0} days old: rotation due within {} days",
                age.active_version.unwrap_or(0),
                days(age.age_ms),
                (i64::from(policy.max_key_age_days) * DAY_MS - age.age_ms).max(0) / DAY_MS + 1
            ),
        ),
        RotationStatus::Overdue => (
            Verdict::NotMet,
            format!(
                "active key v{} is {:.0} days old, past the {}-day limit",
                age.active_version.unwrap_or(0),
                days(age.age_ms),
                policy.max_key_age_days
            ),
        ),
        RotationStatus::NoActiveKey => (
            Verdict::NotApplicable,
            if state == "erased" {
                "no active key: the tenant is erased".to_owned()
            } else {
                "no active key: processing is restricted (suspended)".to_owned()
            },
        ),
    };
    let finding = if state == "suspended" && age.active_version.is_some() {
        format!("suspended (the key that resumes): {finding}")
    } else {
        finding
    };
    let rotation = RotationEntry {
        promise: PromiseId::KeyRotation,
        verdict,
        status: age.status.as_str().into(),
        active_version: age.active_version,
        age_days: age.active_version.map(|_| days(age.age_ms)),
        max_key_age_days: policy.max_key_age_days,
        finding,
    };
    TenantSection {
        tenant_id: t.tenant_id.clone(),
        state: state.into(),
        created_at: rfc3339_ms(t.created_at),
        kms_key_id: t.kms_key_id.clone(),
        versions: t
            .versions
            .iter()
            .map(|v| VersionEntry {
                version: v.version,
                state: v.state.as_str().into(),
                created_at: rfc3339_ms(v.created_at),
                age_days: days(now.saturating_sub(v.created_at).max(0)),
                updated_at: rfc3339_ms(v.updated_at),
                kms_key_id: v.kms_key_id.clone(),
                fingerprint: v.fingerprint.to_string(),
            })
            .collect(),
        rotation,
        rotation_completion: completion(t, jobs),
        restriction,
    }
}

/// Old versions and what the jobs since their rotation left on them.
fn completion(t: &TenantInfo, jobs: &[JobView]) -> CompletionEntry {
    let mut old_versions = Vec::new();
    for v in t
        .versions
        .iter()
        .filter(|v| v.state == KeyState::DecryptOnly)
    {
        // The rotation away from v: the creation of the next version.
        let rotated_at = t
            .versions
            .iter()
            .find(|n| n.version > v.version)
            .map_or(v.updated_at, |n| n.created_at);
        let covering: Vec<&JobView> = jobs
            .iter()
            .filter(|j| {
                j.record.created_at >= rotated_at
                    && j.record
                        .tenant_id
                        .as_ref()
                        .is_none_or(|jt| *jt == t.tenant_id)
            })
            .collect();
        // The latest completed job of each table.
        let mut latest: BTreeMap<&str, &JobView> = BTreeMap::new();
        for j in covering
            .iter()
            .filter(|j| j.record.state == JobState::Completed)
        {
            let slot = latest.entry(j.record.target.as_str()).or_insert(j);
            if j.record.finished_at > slot.record.finished_at {
                *slot = j;
            }
        }
        let running: Vec<&str> = covering
            .iter()
            .filter(|j| !j.record.state.is_finished())
            .map(|j| j.record.job_id.as_str())
            .collect();
        let left = (!latest.is_empty()).then(|| {
            latest
                .values()
                .map(|j| j.progress.left_at_or_below(&t.tenant_id, v.version))
                .sum::<u64>()
        });
        let finding = match (left, running.is_empty()) {
            (_, false) => format!(
                "rotation in progress: re-encryption job {} running",
                running.join(", ")
            ),
            (None, true) => format!(
                "no re-encryption job has completed since the rotation away from v{}",
                v.version
            ),
            (Some(0), true) => format!(
                "no ciphertext left on v{}: it can be retired (fieldkey tenant retire {} {})",
                v.version, t.tenant_id, v.version
            ),
            (Some(n), true) => format!(
                "{n} ciphertext(s) left on v{} or older after the latest jobs",
                v.version
            ),
        };
        old_versions.push(OldVersion {
            version: v.version,
            ciphertexts_left: left,
            jobs: covering.iter().map(|j| j.record.job_id.clone()).collect(),
            finding,
        });
    }
    CompletionEntry {
        promise: PromiseId::RotationCompletion,
        verdict: if old_versions.is_empty() {
            Verdict::Met
        } else {
            Verdict::Attention
        },
        old_versions,
    }
}

async fn restriction(
    store: &dyn KeyStore,
    t: &TenantInfo,
    index: &AuditIndex,
) -> Result<RestrictionEntry> {
    let tenant_suspended = tenant_state(t) == "suspended";
    let mut subjects = Vec::new();
    let mut count = 0u64;
    let mut unrecorded_count = 0u64;
    let mut after = String::new();
    loop {
        let page = store
            .subjects_in_state(&t.tenant_id, KeyState::Suspended, &after, 1000)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.subject_id.clone();
        count += page.len() as u64;
        for s in page {
            let audit_seq = index
                .suspended
                .get(&(
                    t.tenant_id.clone(),
                    "subject".to_owned(),
                    s.subject_id.clone(),
                ))
                .copied();
            if audit_seq.is_none() {
                unrecorded_count += 1;
            }
            if subjects.len() < MAX_LISTED_SUBJECTS {
                subjects.push(RestrictedSubject {
                    since: rfc3339_ms(s.updated_at),
                    subject_id: s.subject_id,
                    audit_seq,
                });
            }
        }
    }
    let unrecorded = unrecorded_count > 0
        || (tenant_suspended
            && !index.suspended.contains_key(&(
                t.tenant_id.clone(),
                "tenant".to_owned(),
                t.tenant_id.clone(),
            )));
    let verdict = if unrecorded {
        Verdict::Attention
    } else if tenant_suspended || count > 0 {
        Verdict::Met
    } else {
        Verdict::NotApplicable
    };
    Ok(RestrictionEntry {
        promise: PromiseId::Restriction,
        verdict,
        tenant_suspended,
        suspended_subjects: count,
        subjects,
    })
}

fn check_receipt(
    e: &ErasureRecord,
    keys: &[VerifyingKey],
    index: &AuditIndex,
) -> (ReceiptCheck, Option<receipt::Receipt>) {
    let fail = |error: String, kid: Option<String>| ReceiptCheck {
        verified: false,
        chained: false,
        error: Some(error),
        signing_key_id: kid,
        audit_seq: e.audit_seq,
        keys_destroyed: 0,
    };
    let Some(json) = e.receipt.as_deref() else {
        return (
            fail("the completed erasure has no receipt".into(), None),
            None,
        );
    };
    let signed: SignedReceipt = match serde_json::from_str(json) {
        Ok(s) => s,
        Err(err) => {
            return (
                fail(format!("the receipt does not parse: {err}"), None),
                None,
            );
        }
    };
    let kid = signed.receipt.signing_key_id.clone();
    let Some(key) = keys.iter().find(|k| receipt::key_id(k) == kid) else {
        return (
            fail(
                format!("signed by key {kid}, which is not among the receipt keys"),
                Some(kid),
            ),
            None,
        );
    };
    let r = match receipt::verify(json.as_bytes(), key) {
        Ok(r) => r,
        Err(err) => return (fail(err.to_string(), Some(kid)), None),
    };
    let mismatch = if r.erasure_id != e.erasure_id {
        Some("names another erasure request")
    } else if r.tenant_id != e.tenant_id || r.subject_id != e.subject_id {
        Some("names another tenant or subject than its request")
    } else if r.requested_at_unix_ms != e.requested_at {
        Some("states another request time than its request")
    } else {
        None
    };
    if let Some(m) = mismatch {
        return (fail(format!("the receipt {m}"), Some(kid)), None);
    }
    let digest = receipt::digest(&r).map(hex::encode).unwrap_or_default();
    let chained = index
        .completed
        .get(&e.erasure_id)
        .is_some_and(|(seq, d)| *seq == r.audit_seq && *d == digest);
    // Subject scope: `destroyed` is the subject key itself; tenant scope: the tenant's
    // versions, plus its subjects' keys counted apart.
    let destroyed = r.destroyed.len() as u64
        + if r.scope == receipt::SCOPE_TENANT {
            r.subject_keys_destroyed
        } else {
            0
        };
    let check = ReceiptCheck {
        verified: true,
        chained,
        error: (!chained).then(|| {
            format!(
                "audit record {} does not record this receipt (erasure.completed with its digest)",
                r.audit_seq
            )
        }),
        signing_key_id: Some(kid),
        audit_seq: Some(r.audit_seq),
        keys_destroyed: destroyed,
    };
    (check, Some(r))
}

fn erasure_entry(
    e: &ErasureRecord,
    receipt_keys: &[VerifyingKey],
    index: &AuditIndex,
    now: i64,
) -> ErasureEntry {
    let deadline = e.requested_at.saturating_add(ERASURE_LIMIT_DAYS * DAY_MS);
    let (status, receipt, completed_at, elapsed) = match e.state {
        ErasureState::Completed => {
            let (check, r) = check_receipt(e, receipt_keys, index);
            // Times come from the signed receipt when it verifies.
            let done = r
                .as_ref()
                .map_or(e.completed_at.unwrap_or(now), |r| r.executed_at_unix_ms);
            let status = if !(check.verified && check.chained) {
                ErasureStatus::ProofFailed
            } else if done <= deadline {
                ErasureStatus::OnTime
            } else {
                ErasureStatus::Late
            };
            (
                status,
                Some(check),
                Some(done),
                done.saturating_sub(e.requested_at),
            )
        }
        ErasureState::Cancelled => (
            ErasureStatus::Cancelled,
            None,
            None,
            e.cancelled_at.unwrap_or(now).saturating_sub(e.requested_at),
        ),
        ErasureState::Scheduled | ErasureState::Executing => (
            if now > deadline {
                ErasureStatus::Overdue
            } else {
                ErasureStatus::Pending
            },
            None,
            None,
            now.saturating_sub(e.requested_at),
        ),
    };
    // The request against its audit records: a row edited to look cancelled, or
    // requested later than it was, must not pass.
    let mut problem = receipt
        .as_ref()
        .filter(|c| !(c.verified && c.chained))
        .and_then(|c| c.error.clone());
    let recorded = index.requested.get(&e.erasure_id);
    let check = match recorded {
        None if index.restored.contains(&e.erasure_id) => None,
        None => Some("no erasure.requested record in the audit log for this request".to_owned()),
        Some((_, t, subj)) if *t != e.tenant_id || *subj != e.subject_id => {
            Some("the audit log records this request for another tenant or subject".to_owned())
        }
        // (The record is appended right after the row; a minute covers any delay.)
        Some((ts, _, _)) if e.requested_at > ts.saturating_add(60_000) => Some(format!(
            "the request time was moved later than the audit log records it ({})",
            rfc3339_ms(*ts)
        )),
        Some(_) => None,
    };
    let check = check.or_else(|| {
        (e.state == ErasureState::Cancelled && !index.cancelled.contains(&e.erasure_id))
            .then(|| "cancelled, but no erasure.cancelled record in the audit log".to_owned())
    });
    let status = match check {
        Some(c) => {
            problem = Some(c);
            ErasureStatus::ProofFailed
        }
        None => status,
    };
    let verdict = match status {
        ErasureStatus::OnTime => Verdict::Met,
        ErasureStatus::Pending => Verdict::Attention,
        ErasureStatus::Cancelled => Verdict::NotApplicable,
        ErasureStatus::Late
        | ErasureStatus::Overdue
        | ErasureStatus::ProofFailed
        | ErasureStatus::KeysLive => Verdict::NotMet,
    };
    ErasureEntry {
        erasure_id: e.erasure_id.clone(),
        tenant_id: e.tenant_id.clone(),
        subject_id: e.subject_id.clone(),
        scope: if e.subject_id.is_some() {
            receipt::SCOPE_SUBJECT.into()
        } else {
            receipt::SCOPE_TENANT.into()
        },
        state: e.state.as_str().into(),
        requested_by: e.requested_by.clone(),
        requested_at: rfc3339_ms(e.requested_at),
        scheduled_for: rfc3339_ms(e.execute_after),
        deadline: rfc3339_ms(deadline),
        completed_at: completed_at.map(rfc3339_ms),
        cancelled_at: e.cancelled_at.map(rfc3339_ms),
        days: days(elapsed.max(0)),
        attempts: e.attempts,
        status,
        promise: PromiseId::Erasure,
        verdict,
        receipt,
        problem,
    }
}

fn job_entry(j: &JobView, tenant: Option<&str>) -> JobEntry {
    let p = &j.progress;
    let leftovers = p
        .leftovers
        .iter()
        .filter(|(t, _)| tenant.is_none_or(|f| f == t.as_str()))
        .map(|(t, m)| (t.clone(), m.clone()))
        .collect();
    JobEntry {
        job_id: j.record.job_id.clone(),
        target: j.record.target.clone(),
        tenant_id: j.record.tenant_id.clone(),
        state: j.record.state.to_string(),
        created_at: rfc3339_ms(j.record.created_at),
        finished_at: j.record.finished_at.map(rfc3339_ms),
        total_rows: p.total_rows,
        rows_scanned: p.rows_scanned,
        values_rewrapped: p.values_rewrapped,
        values_shredded: p.values_shredded,
        values_failed: p.values_failed,
        leftovers,
    }
}

fn summarize(
    cfg: &Configuration,
    policy: &RotationPolicy,
    audit: &AuditSection,
    tenants: &[TenantSection],
    erasures: &[ErasureEntry],
    missing_erasures: &[String],
    unreadable: &[String],
) -> Summary {
    let mut alerts = Vec::new();
    let mut promises = Vec::new();
    let mut push = |id: PromiseId, verdict: Verdict, findings: Vec<String>| {
        promises.push(PromiseResult {
            id,
            promise: id.text().into(),
            verdict,
            section: id.section().into(),
            findings,
        });
    };

    // Integrity first.
    if !audit.verified {
        alerts.push(format!(
            "AUDIT LOG DOES NOT VERIFY: {}",
            audit.error.as_deref().unwrap_or("unknown")
        ));
    }
    for e in erasures.iter().filter(|e| {
        matches!(
            e.status,
            ErasureStatus::ProofFailed | ErasureStatus::KeysLive
        )
    }) {
        let what = if e.status == ErasureStatus::KeysLive {
            "ERASED KEYS ARE LIVE AGAIN"
        } else {
            "ERASURE EVIDENCE FAILED VERIFICATION"
        };
        alerts.push(format!(
            "{what}: {} ({}{}): {}",
            e.erasure_id,
            e.tenant_id,
            e.subject_id
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default(),
            e.problem.as_deref().unwrap_or("no receipt")
        ));
    }
    for u in unreadable {
        alerts.push(format!("KEY STORE RECORD UNREADABLE: {u}"));
    }
    for m in missing_erasures {
        alerts.push(format!(
            "ERASURE REQUEST MISSING FROM THE ERASURE TABLE: {m} is in the audit log"
        ));
    }

    // Encryption at rest.
    let keyed = tenants.iter().filter(|t| t.state != "erased").count();
    push(
        PromiseId::EncryptionAtRest,
        if tenants.is_empty() {
            Verdict::NotApplicable
        } else {
            Verdict::Met
        },
        vec![format!(
            "{keyed} tenant(s) with their own key versions; envelope {}",
            cfg.envelope
        )],
    );

    // KMS: the configuration, and what the stored key versions say wraps them.
    let local_wrapped: Vec<String> = tenants
        .iter()
        .flat_map(|t| {
            t.versions
                .iter()
                .filter(|v| {
                    !matches!(v.state.as_str(), "destroyed" | "retired")
                        && v.kms_key_id.starts_with(LOCAL_KMS_PREFIX)
                })
                .map(move |v| format!("{} v{}", t.tenant_id, v.version))
        })
        .collect();
    let mut findings = Vec::new();
    let mut v = Verdict::Met;
    if cfg.kms.provider == "aws" {
        findings.push(format!(
            "key material is wrapped by AWS KMS (default key {})",
            cfg.kms.default_key_id.as_deref().unwrap_or("-")
        ));
    } else {
        v = Verdict::NotMet;
        findings.push(
            "the configuration uses the LOCAL development KMS (a passphrase-protected key file), not a KMS"
                .to_owned(),
        );
    }
    if !local_wrapped.is_empty() {
        v = Verdict::NotMet;
        findings.push(format!(
            "{} live key version(s) are wrapped by the local development KMS: {}",
            local_wrapped.len(),
            local_wrapped
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    push(PromiseId::KmsProtection, v, findings);

    // Rotation.
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    if policy.max_key_age_days > 365 {
        v = Verdict::NotMet;
        findings.push(format!(
            "the rotation policy in force allows keys {} days old, more than a year",
            policy.max_key_age_days
        ));
    }
    // Broken promises first, then what needs attention.
    for level in [Verdict::NotMet, Verdict::Attention] {
        for t in tenants.iter().filter(|t| t.rotation.verdict == level) {
            findings.push(format!("{}: {}", t.tenant_id, t.rotation.finding));
        }
    }
    for t in tenants {
        v = v.worst(t.rotation.verdict);
    }
    if findings.is_empty() && v == Verdict::Met {
        findings.push(format!(
            "every active tenant key is younger than {} days",
            policy.max_key_age_days
        ));
    }
    push(PromiseId::KeyRotation, v, findings);

    // Rotation completion.
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    for t in tenants.iter().filter(|t| t.state != "erased") {
        v = v.worst(t.rotation_completion.verdict);
        for o in &t.rotation_completion.old_versions {
            findings.push(format!("{} v{}: {}", t.tenant_id, o.version, o.finding));
        }
    }
    push(PromiseId::RotationCompletion, v, findings);

    // Erasure.
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    for e in erasures {
        v = v.worst(e.verdict);
        let who = format!(
            "{} ({}{})",
            e.erasure_id,
            e.tenant_id,
            e.subject_id
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        );
        match e.status {
            ErasureStatus::Late => findings.push(format!(
                "{who}: completed {:.1} days after the request, past the {ERASURE_LIMIT_DAYS}-day limit",
                e.days
            )),
            ErasureStatus::Overdue => findings.push(format!(
                "{who}: still {} {:.1} days after the request, past the {ERASURE_LIMIT_DAYS}-day limit",
                e.state, e.days
            )),
            ErasureStatus::ProofFailed => findings.push(format!(
                "{who}: the evidence does not prove the erasure: {}",
                e.problem.as_deref().unwrap_or("-")
            )),
            ErasureStatus::KeysLive => findings.push(format!(
                "{who}: {}",
                e.problem.as_deref().unwrap_or("keys live again")
            )),
            ErasureStatus::Pending => {
                findings.push(format!("{who}: pending, due by {}", e.deadline));
            }
            ErasureStatus::OnTime | ErasureStatus::Cancelled => {}
        }
    }
    if !missing_erasures.is_empty() {
        v = Verdict::NotMet;
        findings.push(format!(
            "{} request(s) recorded in the audit log are missing from the erasure table: {}",
            missing_erasures.len(),
            missing_erasures.join(", ")
        ));
    }
    let on_time = erasures
        .iter()
        .filter(|e| e.status == ErasureStatus::OnTime)
        .count();
    if on_time > 0 {
        findings.push(format!(
            "{on_time} erasure(s) completed within {ERASURE_LIMIT_DAYS} days, each with a verified receipt chained into the audit log"
        ));
    }
    push(PromiseId::Erasure, v, findings);

    // Restriction.
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    for t in tenants {
        let r = &t.restriction;
        v = v.worst(r.verdict);
        if r.tenant_suspended {
            findings.push(format!("{}: the whole tenant is suspended", t.tenant_id));
        }
        if r.suspended_subjects > 0 {
            findings.push(format!(
                "{}: {} subject(s) suspended; their keys refuse every operation",
                t.tenant_id, r.suspended_subjects
            ));
        }
        for s in r.subjects.iter().filter(|s| s.audit_seq.is_none()) {
            findings.push(format!(
                "{}/{}: suspended, but no suspension record found in the audit log",
                t.tenant_id, s.subject_id
            ));
        }
    }
    push(PromiseId::Restriction, v, findings);

    // Audit log.
    let f = if audit.verified {
        vec![format!(
            "{} records verified ({} signed checkpoints, keys {}); last checkpoint {}; {} record(s) after it",
            audit.records,
            audit.checkpoints,
            audit.key_source,
            audit.last_checkpoint_at.as_deref().unwrap_or("none yet"),
            audit.records_after_last_checkpoint
        )]
    } else {
        vec![audit.error.clone().unwrap_or_default()]
    };
    let f = if !audit.verified {
        f
    } else if audit.records == 0 && audit.verdict == Verdict::NotMet {
        vec!["the audit log is empty although tenants exist: it was replaced or truncated".into()]
    } else if audit.verdict == Verdict::Attention {
        let mut f = f;
        f.insert(
            0,
            if audit.checkpoints == 0 {
                "no signed checkpoint yet: the whole log is chained but unsigned".to_owned()
            } else {
                format!(
                    "the last checkpoint is more than two intervals ({} s) old and {} record(s) after it are unsigned",
                    2 * cfg.audit.checkpoint_secs,
                    audit.records_after_last_checkpoint
                )
            },
        );
        f
    } else {
        f
    };
    push(PromiseId::AuditLog, audit.verdict, f);

    // Transport.
    let exposed: Vec<&String> = cfg
        .tls
        .local_listeners
        .iter()
        .filter(|l| {
            l.strip_prefix("tcp ").is_some_and(|a| {
                !a.parse::<std::net::SocketAddr>()
                    .is_ok_and(|sa| sa.ip().is_loopback())
                    && !a.starts_with("localhost:")
            })
        })
        .collect();
    let (v, f) = match &cfg.tls.mtls_listener {
        _ if !exposed.is_empty() => (
            Verdict::NotMet,
            format!(
                "plaintext gRPC listener not on loopback: {}",
                exposed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Some(l) => (
            Verdict::Met,
            format!(
                "remote callers: mTLS on {l}, TLS 1.3 only ({} preferred), client certificate required",
                cfg.tls.preferred_cipher_suite
            ),
        ),
        None if cfg.tls.trust_linkerd_identity => (
            Verdict::Attention,
            "remote callers arrive through the Linkerd proxy (mTLS terminated by the mesh; \
             identity from l5d-client-id): holds only if nothing but the proxy can reach \
             the local listener (docs/OPERATIONS.md: fieldkey-admin)"
                .to_owned(),
        ),
        None => (
            Verdict::NotApplicable,
            "no remote listener: only in-pod callers (loopback, Unix socket)".to_owned(),
        ),
    };
    push(PromiseId::TransportSecurity, v, vec![f]);

    // Access control.
    let a = &cfg.authorization;
    let (v, f) = match (&a.error, a.enabled) {
        (Some(e), false) => (
            Verdict::NotMet,
            format!("the authorization policies do not load: {e}"),
        ),
        (_, false) => (
            Verdict::NotMet,
            "authorization is OFF: every caller may call every RPC".to_owned(),
        ),
        (Some(e), true) => (
            Verdict::Attention,
            format!(
                "{} policies in force (set {}); the newest change was refused: {e}",
                a.policies,
                a.digest.as_deref().unwrap_or("-")
            ),
        ),
        (None, true) => (
            Verdict::Met,
            format!(
                "default deny; {} policies from {} file(s) in force (set sha256 {})",
                a.policies,
                a.files.len(),
                a.digest.as_deref().unwrap_or("-")
            ),
        ),
    };
    push(PromiseId::AccessControl, v, vec![f]);

    let verdict = promises
        .iter()
        .fold(Verdict::NotApplicable, |acc, p| acc.worst(p.verdict));
    // (A log that does not verify is already the first alert.)
    for p in promises
        .iter()
        .filter(|p| p.verdict == Verdict::NotMet)
        .filter(|p| p.id != PromiseId::AuditLog || audit.verified)
    {
        alerts.push(format!(
            "NOT MET: {}: {}",
            p.promise,
            p.findings.first().cloned().unwrap_or_default()
        ));
    }
    Summary {
        all_met: verdict < Verdict::NotMet && alerts.is_empty(),
        verdict,
        alerts,
        promises,
    }
}
