//! One rule per promise: from the configuration facts and the judged sections (tenants,
//! erasure requests, the audit chain) to the promise's verdict and its findings, the
//! broken items first.
//!
//! Does not: read the store, build alerts (`summarize` does), or change a section.

use crate::policy::RotationPolicy;

use super::super::model::Configuration;
use super::super::model::{
    AuditSection, BackupsStatus, ERASURE_LIMIT_DAYS, ErasureStatus, TenantSection, Verdict,
};
use super::{ErasureEvidence, who};

/// Key ids of the local development KMS start with this.
const LOCAL_KMS_PREFIX: &str = "local-";

/// A promise's verdict and its findings.
pub(super) type Judged = (Verdict, Vec<String>);

/// Met as soon as there is a tenant: every tenant has its own key versions.
/// Fields used without a row context need attention: their values can be moved
/// between rows of the tenant.
pub(super) fn encryption_at_rest(
    cfg: &Configuration,
    tenants: &[TenantSection],
    audit: &AuditSection,
) -> Judged {
    let keyed = tenants.iter().filter(|t| t.state != "erased").count();
    let mut v = if tenants.is_empty() {
        Verdict::NotApplicable
    } else {
        Verdict::Met
    };
    let mut findings = Vec::new();
    for u in &audit.unbound_fields {
        v = v.worst(Verdict::Attention);
        findings.push(format!(
            "{}/{}: {} value(s) encrypted without a row context in the period: any row of the tenant accepts them; bind the row (context) and require it ([row_binding] required)",
            u.tenant_id, u.field, u.encrypted_without_context
        ));
    }
    findings.push(format!(
        "{keyed} tenant(s) with their own key versions; envelope {}",
        cfg.envelope
    ));
    (v, findings)
}

/// The configuration, and what the stored key versions say wraps them: the local
/// development KMS is not a KMS.
pub(super) fn kms_protection(cfg: &Configuration, tenants: &[TenantSection]) -> Judged {
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
    if cfg.kms.provider != "local" {
        findings.push(format!(
            "key material is wrapped by the {} KMS (default key {})",
            cfg.kms.provider,
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
    if let Some(dr) = &cfg.kms.dr_provider {
        let single: Vec<&str> = tenants
            .iter()
            .filter(|t| t.state != "erased" && !t.second_wrapping)
            .map(|t| t.tenant_id.as_str())
            .collect();
        findings.push(if single.is_empty() {
            format!("every live key version is also wrapped by the disaster-recovery KMS ({dr})")
        } else {
            format!(
                "{} tenant(s) have live key versions without a second wrapping by the disaster-recovery KMS ({dr}); a KMS-key rewrap or the next epoch roll adds it: {}",
                single.len(),
                single.iter().take(10).copied().collect::<Vec<_>>().join(", ")
            )
        });
    }
    (v, findings)
}

/// The policy allows at most a year, and every tenant's rotation against it.
pub(super) fn key_rotation(policy: &RotationPolicy, tenants: &[TenantSection]) -> Judged {
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
    (v, findings)
}

/// The old versions of every tenant not erased.
pub(super) fn rotation_completion(tenants: &[TenantSection]) -> Judged {
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    for t in tenants.iter().filter(|t| t.state != "erased") {
        v = v.worst(t.rotation_completion.verdict);
        for o in &t.rotation_completion.old_versions {
            findings.push(format!("{} v{}: {}", t.tenant_id, o.version, o.finding));
        }
    }
    (v, findings)
}

/// Every request of the period (live keys destroyed, then key-store backups sealed),
/// the requests the erasure table lost, and the backup horizon.
pub(super) fn erasure(evidence: &ErasureEvidence<'_>) -> Judged {
    let (erasures, missing_erasures) = (evidence.entries, evidence.missing);
    let mut v = Verdict::NotApplicable;
    let mut findings = Vec::new();
    for e in erasures {
        v = v.worst(e.verdict);
        let who = who(&e.erasure_id, &e.tenant_id, e.subject_id.as_deref());
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
            ErasureStatus::OnTime => match e.backups_status {
                Some(BackupsStatus::Late) => findings.push(format!(
                    "{who}: {}",
                    e.problem.as_deref().unwrap_or("key-store backups sealed late")
                )),
                Some(BackupsStatus::Pending) => findings.push(format!(
                    "{who}: live keys destroyed after {:.1} days; key-store backups not sealed yet (the KMS key of epoch {} or an older one still opens them), due by {}",
                    e.days,
                    e.backup_epoch.unwrap_or(0),
                    e.deadline
                )),
                Some(BackupsStatus::Sealed) | None => {}
            },
            ErasureStatus::Cancelled => {}
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
    let met = erasures
        .iter()
        .filter(|e| e.verdict == Verdict::Met)
        .count();
    if met > 0 {
        findings.push(format!(
            "{met} erasure(s) met: live keys destroyed and key-store backups sealed within {ERASURE_LIMIT_DAYS} days of the request, each with a verified receipt chained into the audit log and verified \"backups sealed\" statements"
        ));
    }
    findings.push(format!("backup horizon: {}", evidence.backups.finding));
    (v, findings)
}

/// Every tenant's restriction.
pub(super) fn restriction(tenants: &[TenantSection]) -> Judged {
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
    (v, findings)
}

/// Why an intact chain still falls short: empty although tenants exist (replaced or
/// truncated), no signed checkpoint yet, or a tail left unsigned for longer than two
/// checkpoint intervals (its records could be rewritten with the head).
pub(in crate::report) fn audit_freshness(
    a: &AuditSection,
    cfg: &Configuration,
    has_tenants: bool,
    now: i64,
) -> Verdict {
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

/// The chain as verified, and why it falls short when it does.
pub(super) fn audit_log(cfg: &Configuration, audit: &AuditSection) -> Judged {
    if !audit.verified {
        return (audit.verdict, vec![audit.error.clone().unwrap_or_default()]);
    }
    if audit.records == 0 && audit.verdict == Verdict::NotMet {
        return (
            audit.verdict,
            vec![
                "the audit log is empty although tenants exist: it was replaced or truncated"
                    .into(),
            ],
        );
    }
    let mut f = vec![format!(
        "{} records verified ({} signed checkpoints, keys {}); last checkpoint {}; {} record(s) after it",
        audit.records,
        audit.checkpoints,
        audit.key_source,
        audit.last_checkpoint_at.as_deref().unwrap_or("none yet"),
        audit.records_after_last_checkpoint
    )];
    if audit.verdict == Verdict::Attention {
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
    }
    (audit.verdict, f)
}

/// Remote callers only over mTLS (or the mesh's), no plaintext listener off loopback.
pub(super) fn transport_security(cfg: &Configuration) -> Judged {
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
    (v, vec![f])
}

/// Default deny, with the policy set in force.
pub(super) fn access_control(cfg: &Configuration) -> Judged {
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
    (v, vec![f])
}
