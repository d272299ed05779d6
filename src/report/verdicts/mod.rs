//! The verdict rules: how the facts the collectors gathered become the verdict of each
//! promise ([`summarize`]), with the integrity alerts first and the broken promises
//! after them. The rules of a tenant live in [`tenants`], of an erasure request in
//! [`erasures`], of key epochs and backups in [`backups`], of each promise in
//! `promises`.
//!
//! Does not: read the store or the configuration (the collectors and `facts` do), or
//! render anything.

pub(super) mod backups;
pub(super) mod erasures;
mod promises;
pub(super) mod tenants;

use crate::policy::RotationPolicy;

use super::model::Configuration;
use super::model::{
    ANCHORS_PINNED, AuditSection, BackupsSection, ErasureEntry, ErasureStatus, PromiseId,
    PromiseResult, Summary, TenantSection, TrustAnchors, Verdict,
};
pub(super) use promises::audit_freshness;

/// A day, ms.
const DAY_MS: i64 = 86_400_000;

/// `ms` in days, to two decimals.
fn days(ms: i64) -> f64 {
    // Ages in ms fit an f64 exactly far beyond any key's life.
    #[allow(clippy::cast_precision_loss, reason = "see above")]
    let d = ms as f64 / DAY_MS as f64;
    (d * 100.0).round() / 100.0
}

/// An erasure request as the findings and alerts name it: `id (tenant[/subject])`.
pub(super) fn who(erasure_id: &str, tenant: &str, subject: Option<&str>) -> String {
    format!(
        "{erasure_id} ({tenant}{})",
        subject.map(|s| format!("/{s}")).unwrap_or_default()
    )
}

/// The erasure evidence judged: the requests of the period, the requests the audit log
/// records that the erasure table lost (`id (tenant[/subject])`), and the key-store
/// backups.
pub(super) struct ErasureEvidence<'a> {
    /// The requests.
    pub(super) entries: &'a [ErasureEntry],
    /// The lost ones.
    pub(super) missing: &'a [String],
    /// Key epochs and the backup horizon.
    pub(super) backups: &'a BackupsSection,
}

/// The verdicts: every promise in [`PromiseId::ALL`] order, integrity failures first
/// among the alerts, then the broken promises.
pub(super) fn summarize(
    cfg: &Configuration,
    policy: &RotationPolicy,
    audit: &AuditSection,
    tenants: &[TenantSection],
    erasures: &ErasureEvidence<'_>,
    anchors: &TrustAnchors,
    unreadable: &[String],
) -> Summary {
    let mut alerts = integrity_alerts(audit, erasures, unreadable);
    let promises: Vec<PromiseResult> = PromiseId::ALL
        .into_iter()
        .map(|id| {
            let (verdict, findings) = match id {
                PromiseId::EncryptionAtRest => promises::encryption_at_rest(cfg, tenants, audit),
                PromiseId::KmsProtection => promises::kms_protection(cfg, tenants),
                PromiseId::KeyRotation => promises::key_rotation(policy, tenants),
                PromiseId::RotationCompletion => promises::rotation_completion(tenants),
                PromiseId::Erasure => promises::erasure(erasures),
                PromiseId::Restriction => promises::restriction(tenants),
                PromiseId::AuditLog => promises::audit_log(cfg, audit),
                PromiseId::TransportSecurity => promises::transport_security(cfg),
                PromiseId::AccessControl => promises::access_control(cfg),
            };
            let (verdict, findings) = anchored(id, (verdict, findings), anchors, audit, erasures);
            PromiseResult {
                id,
                promise: id.text().into(),
                verdict,
                section: id.section().into(),
                findings,
            }
        })
        .collect();

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

/// Integrity failures, most serious first: a chain that does not verify, erasure
/// evidence that fails, "backups sealed" statements that fail, store records that do
/// not decode, requests the erasure table lost.
/// A promise proven by signatures is never met when the signatures were verified only
/// with keys read from the key store under examination: a writer of that store could
/// have added a signing key and forged the checkpoints, receipts or "backups sealed"
/// statements (review finding 3). `Met` becomes `NotMet`, with the reason first.
fn anchored(
    id: PromiseId,
    (verdict, mut findings): promises::Judged,
    anchors: &TrustAnchors,
    audit: &AuditSection,
    erasures: &ErasureEvidence<'_>,
) -> promises::Judged {
    let unanchored = match id {
        PromiseId::AuditLog => anchors.audit != ANCHORS_PINNED && audit.records > 0,
        PromiseId::Erasure => {
            anchors.receipts != ANCHORS_PINNED
                && (erasures.entries.iter().any(|e| e.receipt.is_some())
                    || erasures
                        .backups
                        .epochs
                        .iter()
                        .any(|e| e.seal_verified.is_some()))
        }
        _ => false,
    };
    if !unanchored || verdict == Verdict::NotMet {
        return (verdict, findings);
    }
    let (what, setting, flag) = if id == PromiseId::AuditLog {
        (
            "audit checkpoint signatures",
            "audit.checkpoint_public_keys",
            "--audit-public-key",
        )
    } else {
        (
            "erasure receipt and \"backups sealed\" signatures",
            "audit.receipt_public_keys",
            "--receipt-public-key",
        )
    };
    findings.insert(
        0,
        format!(
            "{what} were verified only with keys read from the key store under examination, which a writer of the store could have added: pin the trust anchors ({setting} in the configuration, {flag} on the command line)"
        ),
    );
    (Verdict::NotMet.worst(verdict), findings)
}

fn integrity_alerts(
    audit: &AuditSection,
    erasures: &ErasureEvidence<'_>,
    unreadable: &[String],
) -> Vec<String> {
    let mut alerts = Vec::new();
    if !audit.verified {
        alerts.push(format!(
            "AUDIT LOG DOES NOT VERIFY: {}",
            audit.error.as_deref().unwrap_or("unknown")
        ));
    }
    for e in erasures.entries.iter().filter(|e| {
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
            "{what}: {}: {}",
            who(&e.erasure_id, &e.tenant_id, e.subject_id.as_deref()),
            e.problem.as_deref().unwrap_or("no receipt")
        ));
    }
    for e in erasures
        .backups
        .epochs
        .iter()
        .filter(|e| e.seal_verified == Some(false))
    {
        alerts.push(format!(
            "BACKUP SEAL FAILED VERIFICATION: key epoch {}: {}",
            e.epoch,
            e.seal_error.as_deref().unwrap_or("-")
        ));
    }
    for u in unreadable {
        alerts.push(format!("KEY STORE RECORD UNREADABLE: {u}"));
    }
    for m in erasures.missing {
        alerts.push(format!(
            "ERASURE REQUEST MISSING FROM THE ERASURE TABLE: {m} is in the audit log"
        ));
    }
    alerts
}
