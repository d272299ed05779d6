//! Audit exports as the offline verifier reads them (`fieldkey audit verify --export`):
//! `audit::verify::verify_export` over JSON lines, with the fuzzing key trusted.
//!
//! Properties:
//! - nothing panics;
//! - an export verifies only if it is one the fuzzing key signed: its summary (records,
//!   first and last record, last hash, checkpoints) is one of the genuine exports';
//! - what verifies is all there is: every member of every line of a verified export is
//!   part of what the record hash or the trailer signature covers (a line re-encoded
//!   from what was verified equals the line as read), so nothing can be added to an
//!   export beside the verified content.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use ed25519_dalek::VerifyingKey;
use fieldkey::audit::AuditRecord;
use fieldkey::audit::verify::{Summary, Trailer, verify_export};
use fieldkey_fuzz::audit::{key, seeds, summaries};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

static VK: LazyLock<VerifyingKey> = LazyLock::new(|| key().verifying_key());
static GENUINE: LazyLock<Vec<Summary>> = LazyLock::new(summaries);

/// The members of a line's object, with `tenant_id` and `caller_ip` dropped when `null`
/// (an absent optional member and a `null` one read the same).
fn top_level(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, v)| !(v.is_null() && (k == "tenant_id" || k == "caller_ip")))
                .collect(),
        ),
        other => other,
    }
}

fn check_lines(text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let read: Value = serde_json::from_str(line).expect("a verified line is JSON");
        let verified = match read.get("export_end") {
            Some(t) => {
                let t: Trailer = serde_json::from_value(t.clone()).expect("trailer");
                json!({ "export_end": t })
            }
            None => {
                let r: AuditRecord = serde_json::from_value(read.clone()).expect("record");
                serde_json::to_value(&r).expect("record")
            }
        };
        assert_eq!(
            top_level(read),
            top_level(verified),
            "a verified export line carries members nothing verified"
        );
    }
}

fuzz_target!(
    init: {
        fieldkey_fuzz::write_seeds(&seeds());
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(summary) = verify_export(text, vec![*VK]) {
            assert!(
                GENUINE.contains(&summary),
                "an export the key never signed verified: {summary:?}"
            );
            check_lines(text);
        }
    }
);
