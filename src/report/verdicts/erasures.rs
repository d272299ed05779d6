//! The verdict rules of an erasure request: its receipt verified (signature, the request
//! it names, its record in the audit chain), its time against the 30-day limit, the
//! request matched to its own audit records (a row edited to look cancelled, or
//! requested later than it was, must not pass), keys that hold material again, and the
//! key-store backups holding its destroyed keys: met only once they are sealed within
//! the 30 days.
//!
//! Does not: read the store (the collectors hand it the request, the receipt keys, the
//! key epochs judged and the count of live keys) or write anything.

use ed25519_dalek::VerifyingKey;

use crate::erasure::receipt::{self, SignedReceipt, rfc3339_ms};
use crate::model::{ErasureRecord, ErasureState};

use super::super::facts::AuditIndex;
use super::super::model::{
    BackupsStatus, ERASURE_LIMIT_DAYS, ErasureEntry, ErasureStatus, PromiseId, ReceiptCheck,
    Verdict,
};
use super::backups::{JudgedEpoch, backups_sealed};
use super::{DAY_MS, days};

/// An erasure proven erased whose keys hold `live` key material again (a restored
/// backup the erasure ledger has not been reconciled with) is not met.
pub(in crate::report) fn keys_live(entry: &mut ErasureEntry, live: u64) {
    if live > 0 {
        entry.status = ErasureStatus::KeysLive;
        entry.verdict = Verdict::NotMet;
        entry.problem = Some(format!(
            "{live} erased key(s) hold material again (a restored backup?)"
        ));
    }
}

/// The receipt of a completed request, checked; with the receipt when it verifies.
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

/// The backup stage of a completed request: when its key-store backups are sealed, how
/// that stands against the limit, and the problem when late.
struct BackupStage {
    sealed: Option<i64>,
    status: BackupsStatus,
    problem: Option<String>,
}

/// The backup stage of a request made at `requested_at` whose keys were destroyed
/// while `epoch` was active.
fn backup_stage(
    epochs: &[JudgedEpoch],
    epoch: u64,
    requested_at: i64,
    deadline: i64,
    now: i64,
) -> BackupStage {
    let sealed = backups_sealed(epochs, epoch);
    let (status, problem) = match sealed {
        Some(at) if at <= deadline => (BackupsStatus::Sealed, None),
        Some(at) => (
            BackupsStatus::Late,
            Some(format!(
                "key-store backups holding the destroyed keys are sealed {:.1} days after the request ({}), past the {ERASURE_LIMIT_DAYS}-day limit",
                days(at.saturating_sub(requested_at)),
                rfc3339_ms(at)
            )),
        ),
        None if now > deadline => (
            BackupsStatus::Late,
            Some(format!(
                "key-store backups holding the destroyed keys are still not sealed {:.1} days after the request (the KMS key of epoch {epoch} or an older one still opens them), past the {ERASURE_LIMIT_DAYS}-day limit",
                days(now.saturating_sub(requested_at))
            )),
        ),
        None => (BackupsStatus::Pending, None),
    };
    BackupStage {
        sealed,
        status,
        problem,
    }
}

/// The request judged against the 30-day limit and its evidence: the live keys
/// destroyed with a verified receipt, then the key-store backups sealed (`epochs`).
pub(in crate::report) fn erasure_entry(
    e: &ErasureRecord,
    receipt_keys: &[VerifyingKey],
    index: &AuditIndex,
    epochs: &[JudgedEpoch],
    now: i64,
) -> ErasureEntry {
    let deadline = e.requested_at.saturating_add(ERASURE_LIMIT_DAYS * DAY_MS);
    let mut backup_epoch = None;
    let (status, receipt, completed_at, elapsed) = match e.state {
        ErasureState::Completed => {
            let (check, r) = check_receipt(e, receipt_keys, index);
            // The epoch active at destruction, as the signed receipt and the request
            // record it (the later one: more epochs must be sealed).
            let signed = r.as_ref().and_then(|r| r.backups.as_ref()).map(|b| b.epoch);
            backup_epoch = Some(signed.unwrap_or(0).max(e.destroyed_epoch.unwrap_or(0)));
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
    let stage = backup_epoch.map(|ep| backup_stage(epochs, ep, e.requested_at, deadline, now));
    let backups_status = stage.as_ref().map(|b| b.status);
    if status == ErasureStatus::OnTime && problem.is_none() {
        problem = stage.as_ref().and_then(|b| b.problem.clone());
    }
    let verdict = match status {
        ErasureStatus::OnTime => match backups_status {
            Some(BackupsStatus::Sealed) => Verdict::Met,
            Some(BackupsStatus::Late) => Verdict::NotMet,
            Some(BackupsStatus::Pending) | None => Verdict::Attention,
        },
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
        backup_epoch,
        backups_sealed_at: stage.as_ref().and_then(|b| b.sealed).map(rfc3339_ms),
        backups_days: stage
            .as_ref()
            .and_then(|b| b.sealed)
            .map(|at| days(at.saturating_sub(e.requested_at).max(0))),
        backups_status,
        promise: PromiseId::Erasure,
        verdict,
        receipt,
        problem,
    }
}
