//! Genuine audit exports (JSON lines: records, then the signed trailer), written the way
//! the `ExportAudit` RPC writes them, with checkpoints and the trailer signed by a fixed
//! fuzzing key; and the seeds of the audit-export target.

use ed25519_dalek::SigningKey;
use fieldkey::audit::verify::{
    CHECKPOINT_ACTION, Summary, Trailer, checkpoint_details, sign_trailer, trailer_line,
    verify_export,
};
use fieldkey::audit::{AuditEvent, AuditRecord, GENESIS, record_hash};
use serde_json::json;

/// The fuzzing key (its seed is public).
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[11u8; 32])
}

fn event(i: u64, prev: &[u8; 32], key: &SigningKey) -> AuditEvent {
    let base = |action: &str, rtype: &str, rid: &str| AuditEvent {
        action: action.into(),
        resource_type: rtype.into(),
        resource_id: rid.into(),
        actor: "spiffe://example.org/ns/ops/sa/admin".into(),
        tenant_id: Some("acme".into()),
        caller_ip: Some("10.1.2.0/24".into()),
        details: json!({}),
    };
    match i {
        1 => base("tenant.created", "tenant", "acme"),
        2 => AuditEvent {
            details: json!({"grace_days": 7, "reason": "art. 17 \u{e9}\u{1F600} \"x\"\n",
                            "nested": {"b": [1, -2, 3.5, null, true], "a": ""}}),
            ..base("erasure.requested", "erasure", "er-0001")
        },
        4 => AuditEvent {
            tenant_id: None,
            caller_ip: None,
            details: json!({"from_version": 1, "to_version": 2}),
            ..base("key.rotated", "tenant", "acme")
        },
        _ => AuditEvent {
            action: CHECKPOINT_ACTION.into(),
            resource_type: "audit".into(),
            resource_id: "fieldkey".into(),
            actor: "fieldkey".into(),
            tenant_id: None,
            caller_ip: None,
            details: checkpoint_details(i - 1, prev, key),
        },
    }
}

/// Records 1..=5 of a chain: 3 and 5 are signed checkpoints.
pub fn chain() -> Vec<AuditRecord> {
    let key = key();
    let mut prev = GENESIS;
    (1..=5u64)
        .map(|seq| {
            let ts = 1_764_000_000_000 + i64::try_from(seq).expect("seq") * 1000;
            let event = event(seq, &prev, &key);
            let hash = record_hash(seq, ts, &event, &prev);
            let r = AuditRecord {
                seq,
                ts,
                event,
                prev_hash: prev,
                hash,
            };
            prev = hash;
            r
        })
        .collect()
}

/// An export of `records` (consecutive), as the `ExportAudit` RPC writes it.
pub fn export(records: &[AuditRecord], from_seq: u64) -> String {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("record"));
        text.push('\n');
    }
    let last = records.last();
    let t = sign_trailer(
        Trailer {
            from_seq,
            last_seq: last.map_or(0, |r| r.seq),
            last_hash: hex::encode(last.map_or([0; 32], |r| r.hash)),
            records: u64::try_from(records.len()).expect("count"),
            exported_at_unix_ms: 1_764_000_100_000,
            key_id: String::new(),
            signature: String::new(),
        },
        &key(),
    );
    text.push_str(&trailer_line(&t));
    text.push('\n');
    text
}

/// The genuine exports: the whole chain, its tail from record 3, and an empty export.
pub fn exports() -> Vec<(String, String)> {
    let c = chain();
    vec![
        ("whole.jsonl".into(), export(&c, 1)),
        ("from-3.jsonl".into(), export(c.get(2..).expect("tail"), 3)),
        ("empty.jsonl".into(), export(&[], 1)),
    ]
}

/// What verifying each genuine export says (the only summaries the fuzzing key vouches
/// for).
pub fn summaries() -> Vec<Summary> {
    exports()
        .iter()
        .map(|(name, text)| {
            verify_export(text, vec![key().verifying_key()])
                .unwrap_or_else(|e| panic!("genuine export {name} does not verify: {e}"))
        })
        .collect()
}

/// Seeds: the genuine exports, one with CRLF line ends and blank lines, one truncated
/// (no trailer), one whose records are signed by another key, and edge cases.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = exports()
        .into_iter()
        .map(|(n, t)| (n, t.into_bytes()))
        .collect();
    let whole = export(&chain(), 1);
    out.push((
        "crlf-blank-lines.jsonl".into(),
        whole.replace('\n', "\r\n\r\n").into_bytes(),
    ));
    let truncated: String = whole.lines().take(4).map(|l| format!("{l}\n")).collect();
    out.push(("truncated.jsonl".into(), truncated.into_bytes()));
    out.push((
        "trailer-only-garbage.jsonl".into(),
        b"{\"export_end\":{}}\n".to_vec(),
    ));
    out.push(("not-json".into(), b"{\"seq\":1,\n".to_vec()));
    out.push(("empty".into(), Vec::new()));
    out
}
