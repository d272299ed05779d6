//! Test vectors for envelope v1 (`tests/vectors/envelope_v1.json`).
//!
//! Check: `cargo test --lib crypto::vectors` recomputes every valid vector from its
//! inputs (field key, associated data, envelope, text form, plaintext) and checks that
//! every `fail_*` vector fails with its named error. Regenerate (only when the format
//! changes, which it must not for v1): `FIELDKEY_WRITE_VECTORS=1 cargo test --lib
//! crypto::vectors`. `tests/vectors/check_vectors.py` checks the same file with an
//! independent Python implementation.

use serde_json::{Value, json};

use super::envelope::{Aad, Envelope, FieldCipher, decode_any, open, seal_with_nonce, to_text};
use super::kdf::derive_field_key_bytes;
use super::{CryptoError, KEY_LEN, SecretKey};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/envelope_v1.json"
);

fn key_from_hex(h: &str) -> SecretKey {
    SecretKey::try_from_slice(&hex::decode(h).unwrap()).unwrap()
}

fn pattern(seed: u8) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
}

struct Case {
    name: &'static str,
    tenant: &'static str,
    subject: Option<&'static str>,
    field: &'static str,
    context: &'static [u8],
    version: u32,
    plaintext: Vec<u8>,
    seed: u8,
}

fn cipher_for(tk: &SecretKey, sk: Option<&SecretKey>, a: &Aad<'_>) -> FieldCipher {
    match (a.subject, sk) {
        (Some(s), Some(sk)) => FieldCipher::for_subject(tk, sk, a.tenant, s, a.field),
        _ => FieldCipher::for_tenant(tk, a.tenant, a.field),
    }
}

fn generate() -> Value {
    let cases = vec![
        Case {
            name: "tenant_scope_short",
            tenant: "acme",
            subject: None,
            field: "email",
            context: b"",
            version: 1,
            plaintext: b"alice@example.com".to_vec(),
            seed: 1,
        },
        Case {
            name: "tenant_scope_with_context",
            tenant: "tenant-0001",
            subject: None,
            field: "users.phone",
            context: b"users:42",
            version: 7,
            plaintext: b"+44 20 7946 0958".to_vec(),
            seed: 2,
        },
        Case {
            name: "tenant_scope_empty_plaintext",
            tenant: "acme",
            subject: None,
            field: "note",
            context: b"",
            version: 1,
            plaintext: vec![],
            seed: 3,
        },
        Case {
            name: "subject_scope",
            tenant: "acme",
            subject: Some("user-123"),
            field: "email",
            context: b"row-9",
            version: 2,
            plaintext: b"bob@example.org".to_vec(),
            seed: 4,
        },
        Case {
            name: "subject_scope_binary_1k",
            tenant: "edx-host",
            subject: Some("learner:77"),
            field: "essay",
            context: &[0, 1, 2, 255],
            version: 4294967295,
            plaintext: (0..1024u32).map(|i| (i * 7 % 256) as u8).collect(),
            seed: 5,
        },
    ];
    let mut valid = Vec::new();
    let mut first_env = None;
    for c in &cases {
        let tk_bytes = pattern(c.seed);
        let sk_bytes = pattern(c.seed.wrapping_add(100));
        let tk = SecretKey::try_from_slice(&tk_bytes).unwrap();
        let sk = SecretKey::try_from_slice(&sk_bytes).unwrap();
        let nonce: [u8; 24] =
            std::array::from_fn(|i| c.seed.wrapping_add(i as u8).wrapping_mul(13));
        let a = Aad {
            tenant: c.tenant,
            subject: c.subject,
            field: c.field,
            context: c.context,
        };
        let fk = derive_field_key_bytes(&tk, c.subject.map(|s| (s, &sk)), c.tenant, c.field);
        let env = seal_with_nonce(
            &cipher_for(&tk, Some(&sk), &a),
            c.version,
            &a,
            &c.plaintext,
            &nonce,
        )
        .unwrap();
        let ad = a.encode(&env[..super::HEADER_LEN]);
        if first_env.is_none() {
            first_env = Some((env.clone(), c.seed));
        }
        valid.push(json!({
            "name": c.name,
            "tenant_key": hex::encode(tk_bytes),
            "subject_key": c.subject.map(|_| hex::encode(sk_bytes)),
            "tenant": c.tenant,
            "subject": c.subject,
            "field": c.field,
            "context": hex::encode(c.context),
            "key_version": c.version,
            "nonce": hex::encode(nonce),
            "plaintext": hex::encode(&c.plaintext),
            "field_key": hex::encode(*fk),
            "associated_data": hex::encode(ad),
            "envelope": hex::encode(&env),
            "text": to_text(&env),
        }));
    }
    // Failure vectors, all derived from the first valid vector.
    let (env, seed) = first_env.unwrap();
    let base = |name: &str,
                envelope: Vec<u8>,
                error: &str,
                tenant: &str,
                subject: Option<&str>,
                field: &str,
                context: &[u8]| {
        json!({
            "name": name, "tenant_key": hex::encode(pattern(seed)),
            "subject_key": subject.map(|_| hex::encode(pattern(seed.wrapping_add(100)))),
            "tenant": tenant, "subject": subject, "field": field, "context": hex::encode(context),
            "envelope": hex::encode(envelope), "error": error,
        })
    };
    let flip = |i: usize| {
        let mut e = env.clone();
        e[i] ^= 0x01;
        e
    };
    let invalid = vec![
        base(
            "fail_wrong_tenant",
            env.clone(),
            "authentication",
            "acme2",
            None,
            "email",
            b"",
        ),
        base(
            "fail_wrong_field",
            env.clone(),
            "authentication",
            "acme",
            None,
            "name",
            b"",
        ),
        base(
            "fail_wrong_context",
            env.clone(),
            "authentication",
            "acme",
            None,
            "email",
            b"row-1",
        ),
        base(
            "fail_header_nonce_edited",
            flip(20),
            "authentication",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_body_edited",
            flip(super::HEADER_LEN),
            "authentication",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_tag_edited",
            flip(env.len() - 1),
            "authentication",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_version_edited",
            flip(7),
            "authentication",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_truncated",
            env[..env.len() - 1].to_vec(),
            "authentication",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_too_short",
            env[..super::OVERHEAD - 1].to_vec(),
            "malformed",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_bad_magic",
            flip(0),
            "malformed",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_unknown_format_version",
            {
                let mut e = env.clone();
                e[2] = 2;
                e
            },
            "unsupported-version",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_unknown_suite",
            {
                let mut e = env.clone();
                e[3] = 9;
                e
            },
            "unsupported-suite",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_unknown_scope",
            {
                let mut e = env.clone();
                e[4] = 7;
                e
            },
            "malformed",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_scope_edited",
            {
                let mut e = env.clone();
                e[4] = 1;
                e
            },
            "scope-mismatch",
            "acme",
            None,
            "email",
            b"",
        ),
        base(
            "fail_key_version_zero",
            {
                let mut e = env.clone();
                e[5..9].copy_from_slice(&[0; 4]);
                e
            },
            "malformed",
            "acme",
            None,
            "email",
            b"",
        ),
    ];
    json!({
        "format": "fieldkey envelope v1",
        "spec": "docs/FORMAT.md",
        "generator": "FIELDKEY_WRITE_VECTORS=1 cargo test --lib crypto::vectors",
        "notes": "All byte strings are hex. field_key is the HKDF-SHA256 output (FORMAT.md section 4); associated_data is the full GCM AAD (section 3); text is the text form of envelope. subject_key is null for tenant-scoped vectors. Failure vectors name the error class an implementation must return.",
        "valid": valid,
        "invalid": invalid,
    })
}

fn error_class(e: &CryptoError) -> &'static str {
    match e {
        CryptoError::Malformed(_) => "malformed",
        CryptoError::UnsupportedVersion(_) => "unsupported-version",
        CryptoError::UnsupportedSuite(_) => "unsupported-suite",
        CryptoError::AuthenticationFailed => "authentication",
        CryptoError::ScopeMismatch { .. } => "scope-mismatch",
        _ => "other",
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("missing {k}"))
}

#[test]
fn envelope_v1_vectors() {
    if std::env::var_os("FIELDKEY_WRITE_VECTORS").is_some() {
        std::fs::write(
            PATH,
            serde_json::to_string_pretty(&generate()).unwrap() + "\n",
        )
        .unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let valid = file["valid"].as_array().unwrap();
    let invalid = file["invalid"].as_array().unwrap();
    assert!(valid.len() >= 5 && invalid.len() >= 10);
    for v in valid {
        let name = s(v, "name");
        let tk = key_from_hex(s(v, "tenant_key"));
        let sk = v["subject_key"].as_str().map(key_from_hex);
        let subject = v["subject"].as_str();
        let ctx = hex::decode(s(v, "context")).unwrap();
        let a = Aad {
            tenant: s(v, "tenant"),
            subject,
            field: s(v, "field"),
            context: &ctx,
        };
        let pt = hex::decode(s(v, "plaintext")).unwrap();
        let nonce: [u8; 24] = hex::decode(s(v, "nonce")).unwrap().try_into().unwrap();
        let version = u32::try_from(v["key_version"].as_u64().unwrap()).unwrap();
        let fk = derive_field_key_bytes(&tk, subject.zip(sk.as_ref()), a.tenant, a.field);
        assert_eq!(hex::encode(*fk), s(v, "field_key"), "{name}: field key");
        let cipher = cipher_for(&tk, sk.as_ref(), &a);
        let env = seal_with_nonce(&cipher, version, &a, &pt, &nonce).unwrap();
        assert_eq!(hex::encode(&env), s(v, "envelope"), "{name}: envelope");
        assert_eq!(
            hex::encode(a.encode(&env[..super::HEADER_LEN])),
            s(v, "associated_data"),
            "{name}: AD"
        );
        assert_eq!(to_text(&env), s(v, "text"), "{name}: text form");
        let from_text = decode_any(s(v, "text").as_bytes()).unwrap();
        let opened = open(&cipher, &Envelope::parse(&from_text).unwrap(), &a).unwrap();
        assert_eq!(&*opened, pt.as_slice(), "{name}: plaintext");
    }
    for v in invalid {
        let name = s(v, "name");
        let tk = key_from_hex(s(v, "tenant_key"));
        let sk = v["subject_key"].as_str().map(key_from_hex);
        let ctx = hex::decode(s(v, "context")).unwrap();
        let a = Aad {
            tenant: s(v, "tenant"),
            subject: v["subject"].as_str(),
            field: s(v, "field"),
            context: &ctx,
        };
        let env = hex::decode(s(v, "envelope")).unwrap();
        let r = Envelope::parse(&env).and_then(|e| open(&cipher_for(&tk, sk.as_ref(), &a), &e, &a));
        let err = r.err().unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(error_class(&err), s(v, "error"), "{name}: {err}");
    }
}
