//! Unit tests of the receipt format: signing, verification, canonical JSON, digests.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::verify::is_lower_hex_sha256;
use super::*;

const SEED: [u8; 32] = [7u8; 32];
const OTHER_SEED: [u8; 32] = [9u8; 32];
const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FP_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn key() -> SigningKey {
    SigningKey::from_bytes(&SEED)
}

fn subject_receipt() -> Receipt {
    Receipt {
        format: FORMAT.to_owned(),
        erasure_id: "er-0001".into(),
        scope: SCOPE_SUBJECT.into(),
        tenant_id: "acme".into(),
        subject_id: Some("user-42".into()),
        requested_by: "dpo@acme.example".into(),
        executed_by: "fieldkey-erasure-worker".into(),
        requested_at_unix_ms: 1_764_000_000_000,
        scheduled_for_unix_ms: 1_764_600_000_000,
        executed_at_unix_ms: 1_764_639_635_123,
        requested_at: rfc3339_ms(1_764_000_000_000),
        scheduled_for: rfc3339_ms(1_764_600_000_000),
        executed_at: rfc3339_ms(1_764_639_635_123),
        destroyed: vec![DestroyedKey {
            kind: KIND_SUBJECT_KEY.into(),
            version: None,
            subject_id: Some("user-42".into()),
            fingerprint: FP_A.into(),
        }],
        subject_keys_destroyed: 1,
        subject_keys_digest: None,
        kms_key_deletion: None,
        backups: None,
        audit_seq: 17,
        audit_prev_hash: FP_B.into(),
        signing_key_id: String::new(),
    }
}

fn tenant_receipt() -> Receipt {
    let subjects = vec![("user-1".to_owned(), FP_A.to_owned())];
    Receipt {
        scope: SCOPE_TENANT.into(),
        subject_id: None,
        destroyed: vec![
            DestroyedKey {
                kind: KIND_TENANT_KEY.into(),
                version: Some(1),
                subject_id: None,
                fingerprint: FP_A.into(),
            },
            DestroyedKey {
                kind: KIND_TENANT_KEY.into(),
                version: Some(2),
                subject_id: None,
                fingerprint: FP_B.into(),
            },
        ],
        subject_keys_destroyed: 1,
        subject_keys_digest: Some(subjects_digest(&subjects)),
        kms_key_deletion: Some(KmsKeyDeletion {
            kms_key_id: "arn:aws:kms:eu-west-1:111122223333:key/abcd".into(),
            status: KMS_SCHEDULED.into(),
            pending_window_days: Some(7),
            deletion_date_unix_ms: Some(1_765_244_435_123),
        }),
        ..subject_receipt()
    }
}

fn signed_file(r: Receipt) -> Vec<u8> {
    serde_json::to_vec_pretty(&sign(r, &key()).unwrap()).unwrap()
}

/// Parses `file`, applies `edit` to the JSON value, and serialises it back.
fn edited(file: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(file).unwrap();
    edit(&mut v);
    serde_json::to_vec_pretty(&v).unwrap()
}

/// Writes `v` with object members in reverse-sorted order, tab indentation and
/// CRLF line ends: a differently formatted rendition of the same JSON.
fn write_reordered(v: &Value, depth: usize, out: &mut String) {
    let indent = |d: usize| "\t".repeat(d);
    match v {
        Value::Object(m) => {
            let mut members: Vec<_> = m.iter().collect();
            members.sort_by(|a, b| b.0.cmp(a.0));
            out.push_str("{\r\n");
            for (i, (k, val)) in members.iter().enumerate() {
                if i > 0 {
                    out.push_str(" ,\r\n");
                }
                out.push_str(&indent(depth + 1));
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(" :  ");
                write_reordered(val, depth + 1, out);
            }
            out.push_str("\r\n");
            out.push_str(&indent(depth));
            out.push('}');
        }
        Value::Array(items) => {
            out.push_str("[ ");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_reordered(item, depth + 1, out);
            }
            out.push_str(" ]");
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

#[test]
fn round_trip_subject_and_tenant() {
    for r in [subject_receipt(), tenant_receipt()] {
        let signed = sign(r.clone(), &key()).unwrap();
        assert_eq!(signed.algorithm, "Ed25519");
        assert_eq!(STANDARD.decode(&signed.signature).unwrap().len(), 64);
        assert_eq!(
            signed.receipt.signing_key_id,
            key_id(&key().verifying_key())
        );
        let file = serde_json::to_vec_pretty(&signed).unwrap();
        let back = verify(&file, &key().verifying_key()).unwrap();
        assert_eq!(back, signed.receipt);
        assert_eq!(
            Receipt {
                signing_key_id: String::new(),
                ..back
            },
            r
        );
    }
}

#[test]
fn absent_options_are_omitted_from_file() {
    let file = String::from_utf8(signed_file(subject_receipt())).unwrap();
    assert!(!file.contains("null"), "{file}");
    assert!(!file.contains("kms_key_deletion"));
    assert!(!file.contains("subject_keys_digest"));
    assert!(!file.contains("\"version\""));
}

#[test]
fn verifies_after_reindent_and_key_reorder() {
    let file = signed_file(tenant_receipt());
    let v: Value = serde_json::from_slice(&file).unwrap();
    let mut text = String::new();
    write_reordered(&v, 0, &mut text);
    assert_ne!(text.as_bytes(), &file[..]);
    // The reordered rendition really has a different member order.
    assert!(text.find("\"signing_key_id\"").unwrap() < text.find("\"audit_seq\"").unwrap());
    assert!(verify(text.as_bytes(), &key().verifying_key()).is_ok());

    let compact = serde_json::to_vec(&v).unwrap();
    assert!(verify(&compact, &key().verifying_key()).is_ok());

    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(&compact);
    assert!(verify(&with_bom, &key().verifying_key()).is_ok());
}

fn expect_err(file: &[u8]) -> ReceiptError {
    match verify(file, &key().verifying_key()) {
        Ok(r) => panic!("verification unexpectedly succeeded: {r:?}"),
        Err(e) => e,
    }
}

#[test]
fn changed_fingerprint_is_bad_signature() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]["destroyed"][0]["fingerprint"] = Value::from(FP_B);
    });
    assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
}

#[test]
fn changed_subject_id_is_bad_signature() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]["subject_id"] = Value::from("user-43");
    });
    assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
}

#[test]
fn changed_executed_at_unix_ms_is_bad_signature() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]["executed_at_unix_ms"] = Value::from(1_764_639_635_124_i64);
    });
    assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
}

#[test]
fn dropped_optional_field_is_bad_signature() {
    let file = signed_file(tenant_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]
            .as_object_mut()
            .unwrap()
            .remove("kms_key_deletion");
    });
    assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
}

#[test]
fn unknown_field_is_malformed() {
    let file = signed_file(subject_receipt());
    for edit in [
        (|v: &mut Value| {
            v["receipt"]["note"] = Value::from("hi");
        }) as fn(&mut Value),
        |v| {
            v["comment"] = Value::from("hi");
        },
        |v| {
            v["receipt"]["destroyed"][0]["key_bytes"] = Value::from("00");
        },
    ] {
        let bad = edited(&file, edit);
        match expect_err(&bad) {
            ReceiptError::Malformed(msg) => assert!(msg.contains("unknown field"), "{msg}"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
}

#[test]
fn flipped_signature_byte_is_bad_signature() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        let mut sig = STANDARD.decode(v["signature"].as_str().unwrap()).unwrap();
        sig[10] ^= 0x01;
        v["signature"] = Value::from(STANDARD.encode(sig));
    });
    assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
}

#[test]
fn bad_signature_encoding_is_malformed() {
    let file = signed_file(subject_receipt());
    for sig in ["not base64!", "AAAA", ""] {
        let bad = edited(&file, |v| v["signature"] = Value::from(sig));
        assert!(
            matches!(expect_err(&bad), ReceiptError::Malformed(_)),
            "signature {sig:?}"
        );
    }
}

#[test]
fn other_public_key_is_wrong_key() {
    let file = signed_file(subject_receipt());
    let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
    match verify(&file, &other) {
        Err(ReceiptError::WrongKey { expected, found }) => {
            assert_eq!(expected, key_id(&other));
            assert_eq!(found, key_id(&key().verifying_key()));
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
}

/// Editing `signing_key_id` alone is caught by the key-id check, which runs before
/// the signature check, so it reports `WrongKey`.
#[test]
fn changed_signing_key_id_alone_is_wrong_key() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]["signing_key_id"] = Value::from("ed25519:0000000000000000");
    });
    assert!(matches!(
        expect_err(&bad),
        ReceiptError::WrongKey { ref found, .. } if found == "ed25519:0000000000000000"
    ));
}

/// Re-pointing `signing_key_id` at another key and verifying with that key gets past
/// the key-id check but not the signature.
#[test]
fn receipt_relabelled_for_other_key_is_bad_signature() {
    let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| {
        v["receipt"]["signing_key_id"] = Value::from(key_id(&other));
    });
    assert!(matches!(
        verify(&bad, &other),
        Err(ReceiptError::BadSignature)
    ));
}

#[test]
fn truncated_file_is_malformed() {
    let file = signed_file(subject_receipt());
    for cut in [0, 1, file.len() / 2, file.len() - 1] {
        assert!(
            matches!(expect_err(&file[..cut]), ReceiptError::Malformed(_)),
            "cut at {cut}"
        );
    }
    assert!(matches!(
        expect_err(b"hello, not json"),
        ReceiptError::Malformed(_)
    ));
}

#[test]
fn wrong_format_and_algorithm() {
    let file = signed_file(subject_receipt());
    let bad = edited(&file, |v| v["algorithm"] = Value::from("RSA"));
    assert!(matches!(
        expect_err(&bad),
        ReceiptError::UnsupportedAlgorithm(ref a) if a == "RSA"
    ));
    let bad = edited(&file, |v| {
        v["receipt"]["format"] = Value::from("fieldkey-erasure-receipt/2");
    });
    assert!(matches!(
        expect_err(&bad),
        ReceiptError::UnsupportedFormat(_)
    ));
    let r = Receipt {
        format: "other".into(),
        ..subject_receipt()
    };
    assert!(matches!(
        sign(r, &key()),
        Err(ReceiptError::UnsupportedFormat(_))
    ));
}

#[test]
fn signed_but_mismatched_timestamp_is_inconsistent() {
    let r = Receipt {
        executed_at: "2025-12-02T01:40:36.123Z".into(),
        ..subject_receipt()
    };
    match expect_err(&signed_file(r)) {
        ReceiptError::Inconsistent(msg) => assert!(msg.contains("executed_at"), "{msg}"),
        other => panic!("expected Inconsistent, got {other:?}"),
    }
}

#[test]
fn signed_but_self_contradictory_receipts_are_inconsistent() {
    let cases: Vec<Receipt> = vec![
        Receipt {
            scope: "user".into(),
            ..subject_receipt()
        },
        Receipt {
            subject_id: None,
            ..subject_receipt()
        },
        Receipt {
            subject_id: Some("user-42".into()),
            ..tenant_receipt()
        },
        {
            let mut r = subject_receipt();
            r.destroyed[0].fingerprint = FP_A.to_uppercase();
            r
        },
        {
            let mut r = subject_receipt();
            r.destroyed[0].fingerprint = "abc".into();
            r
        },
        {
            let mut r = subject_receipt();
            r.destroyed[0].subject_id = Some("user-43".into());
            r
        },
        Receipt {
            subject_keys_destroyed: 0,
            ..subject_receipt()
        },
        Receipt {
            subject_keys_digest: Some("xyz".into()),
            ..tenant_receipt()
        },
        {
            let mut r = tenant_receipt();
            r.destroyed[0].kind = "master-key".into();
            r
        },
        {
            let mut r = tenant_receipt();
            r.destroyed[0].version = None;
            r
        },
        {
            let mut r = tenant_receipt();
            if let Some(k) = r.kms_key_deletion.as_mut() {
                k.status = "deleted".into();
            }
            r
        },
        Receipt {
            requested_at_unix_ms: i64::MAX,
            requested_at: rfc3339_ms(i64::MAX),
            ..subject_receipt()
        },
    ];
    for (i, r) in cases.into_iter().enumerate() {
        match verify(&signed_file(r), &key().verifying_key()) {
            Err(ReceiptError::Inconsistent(_)) => {}
            other => panic!("case {i}: expected Inconsistent, got {other:?}"),
        }
    }
    // A subject who never had a key: empty list, count 0, is fine.
    let r = Receipt {
        destroyed: vec![],
        subject_keys_destroyed: 0,
        ..subject_receipt()
    };
    assert!(verify(&signed_file(r), &key().verifying_key()).is_ok());
}

#[test]
fn signing_input_is_pinned() {
    let r = Receipt {
        signing_key_id: "ed25519:0011223344556677".into(),
        ..subject_receipt()
    };
    let expected = format!(
        "fieldkey-erasure-receipt/1\n{{\"audit_prev_hash\":\"{FP_B}\",\"audit_seq\":17,\
         \"destroyed\":[{{\"fingerprint\":\"{FP_A}\",\"kind\":\"subject-key\",\
         \"subject_id\":\"user-42\"}}],\"erasure_id\":\"er-0001\",\
         \"executed_at\":\"2025-12-02T01:40:35.123Z\",\"executed_at_unix_ms\":1764639635123,\
         \"executed_by\":\"fieldkey-erasure-worker\",\"format\":\"fieldkey-erasure-receipt/1\",\
         \"requested_at\":\"2025-11-24T16:00:00.000Z\",\"requested_at_unix_ms\":1764000000000,\
         \"requested_by\":\"dpo@acme.example\",\"scheduled_for\":\"2025-12-01T14:40:00.000Z\",\
         \"scheduled_for_unix_ms\":1764600000000,\"scope\":\"subject\",\
         \"signing_key_id\":\"ed25519:0011223344556677\",\"subject_id\":\"user-42\",\
         \"subject_keys_destroyed\":1,\"tenant_id\":\"acme\"}}"
    );
    assert_eq!(
        String::from_utf8(signing_input(&r).unwrap()).unwrap(),
        expected
    );
    let d: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    assert_eq!(digest(&r).unwrap(), d);
    // The digest covers every field.
    let r2 = Receipt {
        backups: None,
        audit_seq: 18,
        ..r.clone()
    };
    assert_ne!(digest(&r).unwrap(), digest(&r2).unwrap());
}

#[test]
fn canonical_json_sorts_nested_keys_and_is_stable() {
    let a: Value = serde_json::from_str(
        r#"{ "z": 1, "a": { "y": [ { "d": null, "c": true } ], "b": "x" }, "B": -5, "é": "é", "aa": false }"#,
    )
    .unwrap();
    let b: Value = serde_json::from_str(
        r#"{"aa":false,"é":"é","B":-5,"a":{"b":"x","y":[{"c":true,"d":null}]},"z":1}"#,
    )
    .unwrap();
    let expected = r#"{"B":-5,"a":{"b":"x","y":[{"c":true,"d":null}]},"aa":false,"z":1,"é":"é"}"#;
    assert_eq!(String::from_utf8(canonical_json(&a)).unwrap(), expected);
    assert_eq!(canonical_json(&a), canonical_json(&b));
    assert_eq!(canonical_json(&a), canonical_json(&a));
    // Re-canonicalising the output is a fixed point.
    let again: Value = serde_json::from_slice(&canonical_json(&a)).unwrap();
    assert_eq!(canonical_json(&again), canonical_json(&a));
    // Array order is preserved, not sorted.
    assert_eq!(canonical_json(&serde_json::json!([3, 1, 2])), b"[3,1,2]");
    assert_eq!(
        canonical_json(&serde_json::json!({"n": u64::MAX, "m": i64::MIN})),
        format!("{{\"m\":{},\"n\":{}}}", i64::MIN, u64::MAX).into_bytes()
    );
}

#[test]
fn canonical_json_strings_match_serde_json() {
    let mut s: String = (0u32..0x80).filter_map(char::from_u32).collect();
    s.push_str("é€😀\u{2028}\u{fffd}/");
    let v = Value::from(s.clone());
    assert_eq!(
        String::from_utf8(canonical_json(&v)).unwrap(),
        serde_json::to_string(&s).unwrap()
    );
    assert_eq!(
        canonical_json(&Value::from("\u{1}\u{1f}\"\\\n")),
        br#""\u0001\u001f\"\\\n""#.to_vec()
    );
}

#[test]
fn parse_public_key_accepts_pem_hex_base64() {
    let vk = key().verifying_key();
    let pem = public_key_pem(&vk).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    let hex_form = hex::encode(vk.as_bytes());
    let b64 = STANDARD.encode(vk.as_bytes());
    let b64_url_nopad = URL_SAFE_NO_PAD.encode(vk.as_bytes());
    for text in [
        pem.clone(),
        format!("\n  {pem}\n\n"),
        hex_form.clone(),
        hex_form.to_uppercase(),
        format!("  {hex_form}\n"),
        b64,
        format!("\t{b64_url_nopad}\r\n"),
    ] {
        assert_eq!(parse_public_key(&text).unwrap(), vk, "{text:?}");
    }
    let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
    assert_ne!(
        parse_public_key(&hex::encode(other.as_bytes())).unwrap(),
        vk
    );
}

#[test]
fn parse_public_key_rejects_garbage() {
    let vk = key().verifying_key();
    let hex_form = hex::encode(vk.as_bytes());
    let private_pem = {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        key().to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
    };
    let identity = {
        // The identity point (small order): encoded y = 1.
        let mut b = [0u8; 32];
        b[0] = 1;
        hex::encode(b)
    };
    for text in [
        String::new(),
        "   ".into(),
        "hello world".into(),
        hex_form[..62].to_owned(),
        format!("{hex_form}00"),
        STANDARD.encode([1u8; 31]),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
        private_pem,
        identity,
    ] {
        match parse_public_key(&text) {
            Err(ReceiptError::PublicKey(msg)) => {
                assert!(!msg.contains(&hex_form), "message echoes the input: {msg}");
            }
            other => panic!("{text:?}: expected PublicKey error, got {other:?}"),
        }
    }
}

#[test]
fn key_id_format() {
    let vk = key().verifying_key();
    let id = key_id(&vk);
    let full = hex::encode(Sha256::digest(vk.as_bytes()));
    assert_eq!(id, format!("ed25519:{}", &full[..16]));
    assert_eq!(id.len(), "ed25519:".len() + 16);
    assert_ne!(
        id,
        key_id(&SigningKey::from_bytes(&OTHER_SEED).verifying_key())
    );
}

#[test]
fn rfc3339_known_instants() {
    assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(1_764_639_635_123), "2025-12-02T01:40:35.123Z");
    assert_eq!(rfc3339_ms(1_764_639_635_000), "2025-12-02T01:40:35.000Z");
    assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
    assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_ms(MIN_UNIX_MS), "0000-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(MAX_UNIX_MS), "9999-12-31T23:59:59.999Z");
    // Out of range: clamped, no panic.
    assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_ms(i64::MIN), "0000-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(MAX_UNIX_MS + 1), "9999-12-31T23:59:59.999Z");
}

#[test]
fn subjects_digest_is_order_independent_and_unambiguous() {
    let a = ("user-1".to_owned(), FP_A.to_owned());
    let b = ("user-2".to_owned(), FP_B.to_owned());
    let d1 = subjects_digest(&[a.clone(), b.clone()]);
    let d2 = subjects_digest(&[b.clone(), a.clone()]);
    assert_eq!(d1, d2);
    assert!(is_lower_hex_sha256(&d1));
    assert_ne!(d1, subjects_digest(std::slice::from_ref(&a)));
    // Shifting bytes between id and fingerprint changes the digest.
    assert_ne!(
        subjects_digest(&[("ab".into(), "c".into())]),
        subjects_digest(&[("a".into(), "bc".into())])
    );
    // Pinned encoding: u32 BE length + bytes, for id then fingerprint.
    let mut enc = Vec::new();
    for s in ["u", "ff"] {
        enc.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        enc.extend_from_slice(s.as_bytes());
    }
    assert_eq!(
        subjects_digest(&[("u".into(), "ff".into())]),
        hex::encode(Sha256::digest(&enc))
    );
    assert_eq!(
        subjects_digest(&[]),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn error_messages_are_readable() {
    assert_eq!(
        ReceiptError::BadSignature.to_string(),
        "signature does not match: the receipt was altered or signed by another key"
    );
    let e = ReceiptError::WrongKey {
        expected: "ed25519:aaaa".into(),
        found: "ed25519:bbbb".into(),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("ed25519:aaaa") && msg.contains("ed25519:bbbb"),
        "{msg}"
    );
}
