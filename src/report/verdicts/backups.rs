//! The verdict rules of key-store backups (`docs/ERASURE.md` §6): each sealed epoch's
//! signed "backups sealed" statement verified (signature with a receipt key, the epoch
//! it names, its `epoch.sealed` record in the audit chain), the backup horizon, and when
//! the backups holding an erasure's destroyed keys are sealed.
//!
//! Does not: read the store (the collectors hand it the epochs and their statements)
//! or write anything.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::erasure::receipt::{self, canonical_json, rfc3339_ms};
use crate::model::{EpochState, KEPT_LEGACY};

use super::super::facts::{AuditIndex, EpochFacts};
use super::super::model::{BackupsSection, EpochEntry, PromiseId};

/// Format of a "backups sealed" statement; the first line of its signing input.
const SEAL_FORMAT: &str = "fieldkey-backup-seal/1";

/// `kms_status` of a key the KMS had already deleted when its epoch was sealed.
const ALREADY_DELETED: &str = "already-deleted";

/// An epoch judged: its entry, and when backups that need its key are sealed (proven
/// by its verified statement), Unix ms.
pub(in crate::report) struct JudgedEpoch {
    /// As the report shows it.
    pub(in crate::report) entry: EpochEntry,
    /// When its key is (or was) deleted, proven; `None`: it still opens backups.
    pub(in crate::report) sealed_unix_ms: Option<i64>,
}

/// A statement file: the signed content (kept as JSON: the signature covers its
/// canonical form), the algorithm and the signature.
#[derive(Deserialize)]
struct SignedSeal {
    seal: serde_json::Value,
    algorithm: String,
    signature: String,
}

/// The fields of a statement the report checks.
#[derive(Deserialize)]
struct Seal {
    format: String,
    epoch: u64,
    kms_key_id: String,
    kms_status: String,
    scheduled_at_unix_ms: i64,
    deletion_date_unix_ms: Option<i64>,
    audit_seq: u64,
    signing_key_id: String,
}

/// The statement of a sealed epoch checked against the receipt keys, its record and
/// the audit chain; when backups that need its key are sealed.
fn check_seal(
    f: &EpochFacts,
    keys: &[VerifyingKey],
    index: &AuditIndex,
) -> std::result::Result<i64, String> {
    let rec = &f.record;
    let text = f
        .statement
        .as_deref()
        .ok_or("sealed, but no signed statement is stored")?;
    let signed: SignedSeal =
        serde_json::from_str(text).map_err(|e| format!("the statement does not parse: {e}"))?;
    let s: Seal = serde_json::from_value(signed.seal.clone())
        .map_err(|e| format!("the statement does not parse: {e}"))?;
    if s.format != SEAL_FORMAT || signed.algorithm != "Ed25519" {
        return Err(format!(
            "unsupported statement format {} / algorithm {}",
            s.format, signed.algorithm
        ));
    }
    let key = keys
        .iter()
        .find(|k| receipt::key_id(k) == s.signing_key_id)
        .ok_or_else(|| {
            format!(
                "signed by key {}, which is not among the receipt keys",
                s.signing_key_id
            )
        })?;
    let mut input = SEAL_FORMAT.as_bytes().to_vec();
    input.push(b'\n');
    input.extend_from_slice(&canonical_json(&signed.seal));
    let sig = STANDARD
        .decode(&signed.signature)
        .ok()
        .and_then(|raw| Signature::from_slice(&raw).ok())
        .ok_or("the statement's signature is not 64 bytes of base64")?;
    key.verify_strict(&input, &sig)
        .map_err(|_| "the statement's signature does not match its content")?;
    if s.epoch != rec.epoch
        || rec.kms_key_id.as_deref() != Some(s.kms_key_id.as_str())
        || rec.kms_status.as_deref() != Some(s.kms_status.as_str())
        || rec.deletion_date != s.deletion_date_unix_ms
    {
        return Err(
            "the statement does not match the epoch's record (epoch, KMS key, status or deletion date)"
                .into(),
        );
    }
    let digest: [u8; 32] = Sha256::digest(&input).into();
    if index.sealed.get(&rec.epoch) != Some(&(s.audit_seq, hex::encode(digest))) {
        return Err(format!(
            "audit record {} does not record this statement (epoch.sealed with its digest)",
            s.audit_seq
        ));
    }
    match (s.deletion_date_unix_ms, s.kms_status.as_str()) {
        (Some(d), _) => Ok(d),
        // Already gone when the roll looked: sealed by then at the latest.
        (None, ALREADY_DELETED) => Ok(s.scheduled_at_unix_ms),
        (None, _) => Err("the statement states no deletion date".into()),
    }
}

/// Every epoch judged: a sealed epoch whose key is not kept counts as sealed only when
/// its statement verifies; otherwise its key is taken to open backups still.
pub(in crate::report) fn judge_epochs(
    facts: &[EpochFacts],
    keys: &[VerifyingKey],
    index: &AuditIndex,
) -> Vec<JudgedEpoch> {
    facts
        .iter()
        .map(|f| {
            let r = &f.record;
            let proven = (r.state == EpochState::Sealed
                && r.kms_status.as_deref() != Some(KEPT_LEGACY))
            .then(|| check_seal(f, keys, index));
            let sealed_unix_ms = proven.as_ref().and_then(|p| p.as_ref().ok().copied());
            JudgedEpoch {
                entry: EpochEntry {
                    epoch: r.epoch,
                    kms_key_id: r.kms_key_id.clone(),
                    state: r.state.as_str().into(),
                    created_at: rfc3339_ms(r.created_at),
                    rolled_at: r.rolled_at.map(rfc3339_ms),
                    sealed_at: r.sealed_at.map(rfc3339_ms),
                    deletion_date: r.deletion_date.map(rfc3339_ms),
                    kms_status: r.kms_status.clone(),
                    opens_backups: sealed_unix_ms.is_none(),
                    seal_verified: proven.as_ref().map(std::result::Result::is_ok),
                    seal_error: proven.and_then(std::result::Result::err),
                },
                sealed_unix_ms,
            }
        })
        .collect()
}

/// The backup horizon: key-store backups taken since the oldest epoch whose key still
/// opens backups became active; unbounded before the first roll, or while the legacy
/// key (epoch 0) opens them (backups from before the first roll need it too).
pub(in crate::report) fn backups_section(epochs: &[JudgedEpoch]) -> BackupsSection {
    let active_epoch = epochs
        .iter()
        .find(|e| e.entry.state == EpochState::Active.as_str())
        .map(|e| e.entry.epoch);
    let oldest_open = epochs.iter().find(|e| e.sealed_unix_ms.is_none());
    let (restorable_since, finding) = match oldest_open {
        _ if epochs.is_empty() => (
            None,
            "unbounded: no key epoch yet, so every key-store backup can be restored while \
             the KMS key that wraps it lives (run `fieldkey epoch roll`)"
                .to_owned(),
        ),
        Some(e) if e.entry.epoch == 0 => (
            None,
            format!(
                "unbounded: the legacy key of epoch 0 still opens backups ({}), so key-store \
                 backups from before the first roll stay restorable",
                e.entry.kms_status.as_deref().unwrap_or(&e.entry.state)
            ),
        ),
        Some(e) => (
            Some(e.entry.created_at.clone()),
            format!(
                "key-store backups taken since {} (epoch {}) can be restored; the keys of \
                 older epochs are deleted or scheduled for deletion",
                e.entry.created_at, e.entry.epoch
            ),
        ),
        None => (
            None,
            "no epoch key opens backups (no active epoch)".to_owned(),
        ),
    };
    BackupsSection {
        promise: PromiseId::Erasure,
        restorable_since,
        finding,
        active_epoch,
        epochs: epochs.iter().map(|e| e.entry.clone()).collect(),
    }
}

/// When key-store backups that hold keys destroyed while `epoch` was active are sealed:
/// the latest proven deletion of the keys of epochs 0 to `epoch`, once every one of them
/// is proven; epochs the store never had (no epoch 0 in a store whose first roll found
/// nothing under the default key) hold nothing. `None` while any still opens backups,
/// or when `epoch` itself is unknown (0: before epochs, the default key, which no roll
/// deletes).
pub(in crate::report) fn backups_sealed(epochs: &[JudgedEpoch], epoch: u64) -> Option<i64> {
    epochs.iter().find(|e| e.entry.epoch == epoch)?;
    epochs
        .iter()
        .filter(|e| e.entry.epoch <= epoch)
        .map(|e| e.sealed_unix_ms)
        .try_fold(i64::MIN, |acc, s| s.map(|s| acc.max(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoch judged sealed at `sealed` (`None`: still opens backups).
    fn judged(epoch: u64, sealed: Option<i64>) -> JudgedEpoch {
        JudgedEpoch {
            entry: EpochEntry {
                epoch,
                kms_key_id: Some(format!("k{epoch}")),
                state: if sealed.is_some() { "sealed" } else { "active" }.into(),
                created_at: rfc3339_ms(0),
                rolled_at: None,
                sealed_at: None,
                deletion_date: sealed.map(rfc3339_ms),
                kms_status: None,
                opens_backups: sealed.is_none(),
                seal_verified: sealed.map(|_| true),
                seal_error: None,
            },
            sealed_unix_ms: sealed,
        }
    }

    #[test]
    fn backups_are_sealed_when_every_epoch_up_to_the_destruction_is() {
        // No epoch 0 (a store that started with epochs): skipped.
        let e = [judged(1, Some(10)), judged(2, Some(20)), judged(3, None)];
        assert_eq!(backups_sealed(&e, 1), Some(10));
        assert_eq!(backups_sealed(&e, 2), Some(20), "the latest deletion");
        assert_eq!(backups_sealed(&e, 3), None, "epoch 3 still opens them");
        // Before epochs, and no epoch 0: the default key, which no roll deletes.
        assert_eq!(backups_sealed(&e, 0), None);
        assert_eq!(backups_sealed(&[], 0), None);
        // An older epoch that still opens backups (a kept legacy key) keeps them open.
        let e = [judged(0, None), judged(1, Some(10)), judged(2, None)];
        assert_eq!(backups_sealed(&e, 1), None);
        let s = backups_section(&e);
        assert_eq!(s.restorable_since, None, "epoch 0 opens backups: unbounded");
        let s = backups_section(&[judged(0, Some(5)), judged(1, None)]);
        assert_eq!(s.restorable_since, Some(rfc3339_ms(0)));
        assert_eq!(s.active_epoch, Some(1));
    }
}
