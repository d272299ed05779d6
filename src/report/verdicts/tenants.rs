//! The verdict rules of a tenant: its state, its key rotation against the policy
//! (a suspended tenant judged by the key that resumes), the completion of its
//! rotations (what re-encryption jobs left on decrypt-only versions), and its
//! restriction of processing (every suspension recorded in the audit chain).
//!
//! Does not: read the store (the collectors hand it the tenant and its suspended
//! subjects) or write anything.

use std::collections::BTreeMap;

use crate::erasure::receipt::rfc3339_ms;
use crate::jobs::JobView;
use crate::keyring::TenantInfo;
use crate::model::{JobState, KeyState};
use crate::policy::{RotationPolicy, RotationStatus};

use super::super::facts::{AuditIndex, SuspendedSubjects};
use super::super::model::{
    CompletionEntry, OldVersion, PromiseId, RestrictionEntry, RotationEntry, TenantSection,
    Verdict, VersionEntry,
};
use super::{DAY_MS, days};

/// `suspended`, `erased` or `active`.
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

/// The tenant's section: its versions, rotation, rotation completion and restriction.
pub(in crate::report) fn tenant_section(
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
        second_wrapping: t
            .versions
            .iter()
            .filter(|v| !matches!(v.state, KeyState::Destroyed | KeyState::Retired))
            .all(|v| v.second_wrapping)
            && t.versions.iter().any(|v| v.second_wrapping),
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
                second_wrapping: v.second_wrapping,
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

/// The tenant's restriction: met when every suspension (of the tenant, of each subject)
/// is recorded in the audit chain, attention when one is not.
pub(in crate::report) fn restriction(
    t: &TenantInfo,
    index: &AuditIndex,
    subjects: SuspendedSubjects,
) -> RestrictionEntry {
    let tenant_suspended = tenant_state(t) == "suspended";
    let unrecorded = subjects.unrecorded > 0
        || (tenant_suspended
            && index
                .suspension(&t.tenant_id, "tenant", &t.tenant_id)
                .is_none());
    let verdict = if unrecorded {
        Verdict::Attention
    } else if tenant_suspended || subjects.count > 0 {
        Verdict::Met
    } else {
        Verdict::NotApplicable
    };
    RestrictionEntry {
        promise: PromiseId::Restriction,
        verdict,
        tenant_suspended,
        suspended_subjects: subjects.count,
        subjects: subjects.listed,
    }
}
