//! Offline verification of the audit log: the hash chain, the signed checkpoints in it,
//! and the signed trailer that ends an export (JSON lines). Used by `fieldkey audit
//! verify` on a store or an export file, and by the export itself.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::export_line::Line;
use super::{AuditRecord, GENESIS, record_hash};
use crate::model::canonical_json;
use crate::signing::key_id;
use crate::store::{KeyStore, StoreError};

/// Action of a checkpoint record.
pub const CHECKPOINT_ACTION: &str = "audit.checkpoint";
const CHECKPOINT_DOMAIN: &[u8] = b"fieldkey-audit-checkpoint/1\n";
const TRAILER_DOMAIN: &[u8] = b"fieldkey-audit-export/1\n";

/// The bytes a checkpoint signs: the chain up to and including record `covers_seq`,
/// whose hash is `covers_hash`.
pub fn checkpoint_message(covers_seq: u64, covers_hash: &[u8; 32]) -> Vec<u8> {
    let mut m = CHECKPOINT_DOMAIN.to_vec();
    m.extend_from_slice(&covers_seq.to_be_bytes());
    m.extend_from_slice(covers_hash);
    m
}

/// The details of a checkpoint record signing the chain up to (`seq`, `hash`).
pub fn checkpoint_details(seq: u64, hash: &[u8; 32], key: &SigningKey) -> serde_json::Value {
    let sig = key.sign(&checkpoint_message(seq, hash));
    json!({
        "covers_seq": seq,
        "covers_hash": hex::encode(hash),
        "key_id": key_id(&key.verifying_key()),
        "signature": STANDARD.encode(sig.to_bytes()),
    })
}

/// The last line of an export: what it holds, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trailer {
    /// First record exported.
    pub from_seq: u64,
    /// Last record exported (0 if none).
    pub last_seq: u64,
    /// Its hash, hex.
    pub last_hash: String,
    /// Number of records.
    pub records: u64,
    /// When, Unix ms.
    pub exported_at_unix_ms: i64,
    /// Signing key id.
    pub key_id: String,
    /// Ed25519 signature (base64) over the trailer without this field.
    #[serde(default)]
    pub signature: String,
}

fn trailer_message(t: &Trailer) -> Vec<u8> {
    let mut unsigned = t.clone();
    unsigned.signature = String::new();
    let v = serde_json::to_value(&unsigned).unwrap_or(serde_json::Value::Null);
    let mut m = TRAILER_DOMAIN.to_vec();
    m.extend_from_slice(&canonical_json(&v));
    m
}

/// Signs a trailer (fills `key_id` and `signature`).
pub fn sign_trailer(mut t: Trailer, key: &SigningKey) -> Trailer {
    t.key_id = key_id(&key.verifying_key());
    t.signature = String::new();
    let sig = key.sign(&trailer_message(&t));
    t.signature = STANDARD.encode(sig.to_bytes());
    t
}

/// The trailer as its export line.
pub fn trailer_line(t: &Trailer) -> String {
    json!({ "export_end": t }).to_string()
}

/// What kind of failure a verification found (the reason says the details).
///
/// A forger who edits records must recompute their hashes and re-sign what covers them;
/// without the operator's signing key that ends in [`Failure::UntrustedKey`] or
/// [`Failure::BadSignature`], whatever the hashes say: the keys a verifier trusts are
/// given by the operator (trust anchors), never read from the export or the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// A line of an export is not a record or a trailer (not JSON, unknown fields,
    /// lines after the trailer).
    Syntax,
    /// A record's content does not match its own hash (edited in place).
    Altered,
    /// A record is not the one after its predecessor, or does not chain to it
    /// (deleted, reordered or inserted records; a chain not starting at genesis).
    Chain,
    /// A checkpoint does not cover exactly the records before it.
    CheckpointCoverage,
    /// A checkpoint or trailer names a signing key that is not among the trusted
    /// public keys given to the verifier.
    UntrustedKey,
    /// A checkpoint or trailer signature does not verify under the trusted key it
    /// names (malformed, altered, or made by another key).
    BadSignature,
    /// Records are missing at the start or the end, or were added after the trailer's
    /// count (a truncated or padded export, a store shorter than its chain head).
    Incomplete,
}

/// Where verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", .seq.map(|s| format!("audit record {s}: ")).or_else(|| .line.map(|l| format!("line {l}: "))).unwrap_or_default())]
pub struct VerifyError {
    /// The first bad record, if it is one.
    pub seq: Option<u64>,
    /// The line of an export, if it is a line.
    pub line: Option<usize>,
    /// What kind of failure.
    pub kind: Failure,
    /// What is wrong.
    pub reason: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// First and last record seen.
    pub first_seq: Option<u64>,
    /// Last record seen.
    pub last_seq: u64,
    /// Its hash.
    pub last_hash: [u8; 32],
    /// Records seen.
    pub records: u64,
    /// Signed checkpoints seen (all valid).
    pub checkpoints: u64,
    /// The last checkpoint: (seq of the checkpoint record, time).
    pub last_checkpoint: Option<(u64, i64)>,
}

/// Checks records one by one (in order).
#[derive(Debug)]
pub struct Verifier {
    keys: Vec<VerifyingKey>,
    summary: Summary,
}

fn err(seq: u64, kind: Failure, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        seq: Some(seq),
        line: None,
        kind,
        reason: reason.into(),
    }
}

/// Checks `sig_b64` over `msg` against the trusted key whose id is `kid`. The id only
/// selects among the trusted keys: an id naming no trusted key is refused, whatever
/// the signature.
fn verify_sig(
    keys: &[VerifyingKey],
    kid: &str,
    msg: &[u8],
    sig_b64: &str,
) -> Result<(), (Failure, String)> {
    let key = keys.iter().find(|k| key_id(k) == kid).ok_or_else(|| {
        (
            Failure::UntrustedKey,
            format!("signed by key {kid}, which is not among the trusted public keys given"),
        )
    })?;
    let bad = |why: &str| (Failure::BadSignature, why.to_owned());
    let bytes = STANDARD
        .decode(sig_b64)
        .map_err(|_| bad("signature is not base64"))?;
    let sig = Signature::from_slice(&bytes).map_err(|_| bad("signature is not 64 bytes"))?;
    key.verify_strict(msg, &sig).map_err(|_| {
        bad("signature does not verify under the trusted key it names (altered, or signed by another key)")
    })
}

impl Verifier {
    /// A verifier trusting these public keys for checkpoints and trailers.
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self {
            keys,
            summary: Summary::default(),
        }
    }

    /// Checks the next record.
    ///
    /// # Errors
    /// The record, and what is wrong with it.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), VerifyError> {
        let s = &mut self.summary;
        match s.first_seq {
            None => {
                if r.seq == 1 && r.prev_hash != GENESIS {
                    return Err(err(
                        1,
                        Failure::Chain,
                        "the first record does not start the chain",
                    ));
                }
                s.first_seq = Some(r.seq);
            }
            Some(_) => {
                let expected = s.last_seq.saturating_add(1);
                if r.seq != expected {
                    return Err(err(
                        r.seq,
                        Failure::Chain,
                        format!(
                            "expected record {expected} next (a record was deleted, reordered or inserted)"
                        ),
                    ));
                }
                if r.prev_hash != s.last_hash {
                    return Err(err(
                        r.seq,
                        Failure::Chain,
                        "does not chain to the record before it",
                    ));
                }
            }
        }
        if record_hash(r.seq, r.ts, &r.event, &r.prev_hash) != r.hash {
            return Err(err(
                r.seq,
                Failure::Altered,
                "content does not match its hash (edited)",
            ));
        }
        if r.event.action == CHECKPOINT_ACTION {
            let d = &r.event.details;
            let covers_seq = d["covers_seq"].as_u64().unwrap_or(u64::MAX);
            let covers_hash = d["covers_hash"].as_str().unwrap_or_default();
            if covers_seq != r.seq.saturating_sub(1) || covers_hash != hex::encode(r.prev_hash) {
                return Err(err(
                    r.seq,
                    Failure::CheckpointCoverage,
                    "checkpoint does not cover the records before it",
                ));
            }
            verify_sig(
                &self.keys,
                d["key_id"].as_str().unwrap_or_default(),
                &checkpoint_message(covers_seq, &r.prev_hash),
                d["signature"].as_str().unwrap_or_default(),
            )
            .map_err(|(kind, e)| err(r.seq, kind, format!("checkpoint {e}")))?;
            s.checkpoints += 1;
            s.last_checkpoint = Some((r.seq, r.ts));
        }
        s.last_seq = r.seq;
        s.last_hash = r.hash;
        s.records += 1;
        Ok(())
    }

    /// What was seen so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Ends an export: its trailer must be signed and match what was read.
    ///
    /// # Errors
    /// A missing, altered or mismatching trailer (a truncated or padded export).
    pub fn finish_export(&self, trailer: Option<&Trailer>) -> Result<(), VerifyError> {
        let s = &self.summary;
        let fail = |kind: Failure, reason: String| VerifyError {
            seq: None,
            line: None,
            kind,
            reason,
        };
        let Some(t) = trailer else {
            return Err(fail(
                Failure::Incomplete,
                format!(
                    "the export has no signed trailer after record {}: it was truncated",
                    s.last_seq
                ),
            ));
        };
        verify_sig(&self.keys, &t.key_id, &trailer_message(t), &t.signature)
            .map_err(|(kind, e)| fail(kind, format!("export trailer {e}")))?;
        if s.records > 0 && s.first_seq != Some(t.from_seq) {
            return Err(fail(
                Failure::Incomplete,
                format!(
                    "the export's trailer says it starts at record {}, but the first record is {}: records at the beginning are missing",
                    t.from_seq,
                    s.first_seq.unwrap_or(0)
                ),
            ));
        }
        if t.records != s.records
            || t.last_seq != s.last_seq
            || t.last_hash != hex::encode(s.last_hash)
        {
            return Err(fail(
                Failure::Incomplete,
                format!(
                    "the export's trailer says {} records up to {}, but {} records up to {} were read: records are missing (truncated) or were added",
                    t.records, t.last_seq, s.records, s.last_seq
                ),
            ));
        }
        Ok(())
    }
}

/// Verifies an export (JSON lines: records, then the trailer). Each line is read
/// strictly (`export_line.rs`): no unknown or repeated members, hashes in lowercase hex.
///
/// # Errors
/// The first bad line or record.
pub fn verify_export(text: &str, keys: Vec<VerifyingKey>) -> Result<Summary, VerifyError> {
    let mut v = Verifier::new(keys);
    let mut trailer: Option<Trailer> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| VerifyError {
            seq: None,
            line: Some(n),
            kind: Failure::Syntax,
            reason,
        };
        if trailer.is_some() {
            return Err(bad("lines after the export trailer".into()));
        }
        match super::export_line::parse(line).map_err(bad)? {
            Line::Trailer(t) => trailer = Some(t),
            Line::Record(rec) => v.push(&rec)?,
        }
    }
    v.finish_export(trailer.as_ref())?;
    Ok(v.summary().clone())
}

/// Verifies the audit chain a key store holds: every record in order, its signed
/// checkpoints, that the log starts at record 1 and that it ends at the chain head.
/// `visit` sees every record read, also those after the first bad one (the compliance
/// report indexes them). The outer error is the store failing; the inner one is the
/// log not verifying.
///
/// # Errors
/// [`StoreError`] if the store cannot be read.
pub async fn verify_store(
    store: &dyn KeyStore,
    keys: Vec<VerifyingKey>,
    mut visit: impl FnMut(&AuditRecord) + Send,
) -> Result<Result<Summary, VerifyError>, StoreError> {
    const PAGE: u32 = 1000;
    let mut v = Verifier::new(keys);
    let mut first_error = None;
    let mut after = 0;
    loop {
        let page = store.audit_records(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            if first_error.is_none()
                && let Err(e) = v.push(r)
            {
                first_error = Some(e);
            }
            visit(r);
        }
    }
    if let Some(e) = first_error {
        return Ok(Err(e));
    }
    let (head_seq, head_hash) = store.audit_head().await?;
    let s = v.summary();
    if s.records > 0 && s.first_seq != Some(1) {
        return Ok(Err(VerifyError {
            seq: s.first_seq,
            line: None,
            kind: Failure::Incomplete,
            reason: format!(
                "the log starts at record {} instead of 1: records at the beginning were deleted",
                s.first_seq.unwrap_or(0)
            ),
        }));
    }
    if s.last_seq != head_seq || (head_seq > 0 && s.last_hash != head_hash) {
        return Ok(Err(VerifyError {
            seq: Some(s.last_seq.saturating_add(1)),
            line: None,
            kind: Failure::Incomplete,
            reason: format!(
                "missing: the chain head says {head_seq} records, the log ends at {} (truncated)",
                s.last_seq
            ),
        }));
    }
    Ok(Ok(s.clone()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use serde_json::Value;

    use super::*;
    use crate::audit::AuditEvent;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[11u8; 32])
    }

    /// An export of three records (the third a checkpoint) with its signed trailer, one
    /// JSON line each, as `ExportAudit` writes it.
    fn export() -> Vec<String> {
        let mut prev = GENESIS;
        let mut lines = Vec::new();
        for seq in 1..=3u64 {
            let event = AuditEvent {
                action: if seq == 3 {
                    CHECKPOINT_ACTION
                } else {
                    "tenant.created"
                }
                .into(),
                resource_type: "tenant".into(),
                resource_id: "acme".into(),
                actor: "admin".into(),
                tenant_id: Some("acme".into()),
                caller_ip: None,
                details: if seq == 3 {
                    checkpoint_details(2, &prev, &key())
                } else {
                    json!({"reason": "onboarding", "n": seq})
                },
            };
            let hash = record_hash(seq, 1000, &event, &prev);
            let r = AuditRecord {
                seq,
                ts: 1000,
                event,
                prev_hash: prev,
                hash,
            };
            lines.push(serde_json::to_string(&r).unwrap());
            prev = hash;
        }
        let t = Trailer {
            from_seq: 1,
            last_seq: 3,
            last_hash: hex::encode(prev),
            records: 3,
            exported_at_unix_ms: 2000,
            key_id: String::new(),
            signature: String::new(),
        };
        lines.push(trailer_line(&sign_trailer(t, &key())));
        lines
    }

    fn verify(lines: &[String]) -> Result<Summary, VerifyError> {
        verify_export(&lines.join("\n"), vec![key().verifying_key()])
    }

    /// Line `i` with `edit` applied to its text.
    fn edited(i: usize, edit: impl Fn(&str) -> String) -> Vec<String> {
        let mut lines = export();
        lines[i] = edit(&lines[i]);
        lines
    }

    #[test]
    fn a_verified_export_carries_nothing_that_was_not_verified() {
        assert_eq!(verify(&export()).unwrap().records, 3);
        let hash_of_2 = serde_json::from_str::<Value>(&export()[1]).unwrap()["hash"]
            .as_str()
            .unwrap()
            .to_owned();
        let cases: Vec<(&str, usize, Vec<String>)> = vec![
            // The fuzz target's first find: a hash spelled in uppercase hex verified.
            (
                "a hash in uppercase hex",
                2,
                edited(1, |l| l.replace(&hash_of_2, &hash_of_2.to_uppercase())),
            ),
            (
                "a member the hash does not cover",
                1,
                edited(0, |l| {
                    l.replacen('{', r#"{"note":"approved by the DPO","#, 1)
                }),
            ),
            (
                "an unknown member set to null",
                1,
                edited(0, |l| l.replacen('{', r#"{"calli_rep":null,"#, 1)),
            ),
            (
                "a member repeated (read as its first value elsewhere)",
                1,
                edited(0, |l| l.replacen('{', r#"{"actor":"mallory","#, 1)),
            ),
            (
                "a member repeated inside details",
                2,
                edited(1, |l| {
                    l.replacen(r#""reason":"#, r#""reason":"fraud","reason":"#, 1)
                }),
            ),
            (
                "a member beside the trailer",
                4,
                edited(3, |l| l.replacen('{', r#"{"note":"all good","#, 1)),
            ),
        ];
        let mut accepted = Vec::new();
        for (what, line, lines) in cases {
            match verify(&lines) {
                Ok(_) => accepted.push(what),
                Err(e) => assert_eq!(e.line, Some(line), "{what}: {e}"),
            }
        }
        assert!(accepted.is_empty(), "verified: {accepted:?}");
    }
}
