//! Test vectors for blind indexes (HMAC-SHA256 and Argon2id) and pseudonyms
//! (`tests/vectors/blind_index_v1.json`).
//!
//! Check: `cargo test --lib crypto::blind_vectors` recomputes every vector from its
//! inputs (tenant or subject key, ids, profile, value) and checks that every `fail_*`
//! vector fails. Regenerate (only when the derivation changes, which it must not for
//! v1): `FIELDKEY_WRITE_VECTORS=1 cargo test --lib crypto::blind_vectors`.
//! `tests/vectors/check_vectors.py` checks the same file with an independent Python
//! implementation (hmac, hashlib, unicodedata, `cryptography`'s HKDF and Argon2id).

use serde_json::{Value, json};

use super::blind::{
    Argon2Cost, BlindIndex, IndexAlgorithm, IndexKey, IndexProfile, Normalization, UnicodeForm,
    pseudonym,
};
use super::{KEY_LEN, SecretKey};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/blind_index_v1.json"
);

fn pattern(seed: u8) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| seed.wrapping_mul(37).wrapping_add(i as u8))
}

fn key_from_hex(h: &str) -> SecretKey {
    SecretKey::try_from_slice(&hex::decode(h).unwrap()).unwrap()
}

fn profile_json(p: &IndexProfile) -> Value {
    let mut steps = Vec::new();
    match p.normalization.form {
        Some(UnicodeForm::Nfc) => steps.push("nfc"),
        Some(UnicodeForm::Nfkc) => steps.push("nfkc"),
        None => {}
    }
    if p.normalization.casefold {
        steps.push("casefold");
    }
    if p.normalization.trim {
        steps.push("trim");
    }
    let mut v = json!({ "bits": p.bits, "normalize": steps });
    match p.algorithm {
        IndexAlgorithm::HmacSha256 => v["algorithm"] = json!("hmac-sha256"),
        IndexAlgorithm::Argon2id(c) => {
            v["algorithm"] = json!("argon2id");
            v["argon2"] = json!({
                "memory_kib": c.memory_kib, "iterations": c.iterations, "parallelism": c.parallelism
            });
        }
    }
    v
}

fn profile_from(v: &Value) -> IndexProfile {
    let steps: Vec<&str> = v["normalize"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let normalization = Normalization {
        form: if steps.contains(&"nfc") {
            Some(UnicodeForm::Nfc)
        } else if steps.contains(&"nfkc") {
            Some(UnicodeForm::Nfkc)
        } else {
            None
        },
        casefold: steps.contains(&"casefold"),
        trim: steps.contains(&"trim"),
    };
    let algorithm = match v["algorithm"].as_str().unwrap() {
        "hmac-sha256" => IndexAlgorithm::HmacSha256,
        "argon2id" => {
            let a = &v["argon2"];
            IndexAlgorithm::Argon2id(Argon2Cost {
                memory_kib: a["memory_kib"].as_u64().unwrap() as u32,
                iterations: a["iterations"].as_u64().unwrap() as u32,
                parallelism: a["parallelism"].as_u64().unwrap() as u32,
            })
        }
        other => panic!("algorithm {other}"),
    };
    IndexProfile {
        algorithm,
        bits: v["bits"].as_u64().unwrap() as u16,
        normalization,
    }
}

fn generate() -> Value {
    let email = IndexProfile::hmac(
        64,
        Normalization {
            form: Some(UnicodeForm::Nfc),
            casefold: true,
            trim: true,
        },
    );
    let raw128 = IndexProfile::hmac(128, Normalization::default());
    let full = IndexProfile::hmac(256, Normalization::default());
    let nfkc16 = IndexProfile::hmac(
        16,
        Normalization {
            form: Some(UnicodeForm::Nfkc),
            casefold: true,
            trim: false,
        },
    );
    let argon_small = IndexProfile {
        algorithm: IndexAlgorithm::Argon2id(Argon2Cost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }),
        bits: 32,
        normalization: Normalization {
            trim: true,
            ..Normalization::default()
        },
    };
    let argon_lanes = IndexProfile {
        algorithm: IndexAlgorithm::Argon2id(Argon2Cost {
            memory_kib: 256,
            iterations: 2,
            parallelism: 2,
        }),
        bits: 64,
        normalization: Normalization::default(),
    };
    let argon_default = IndexProfile {
        algorithm: IndexAlgorithm::Argon2id(Argon2Cost::DEFAULT),
        bits: 64,
        normalization: Normalization {
            form: Some(UnicodeForm::Nfc),
            casefold: false,
            trim: true,
        },
    };
    // (name, tenant, field, version, profile, value, tenant-key seed)
    type Case<'a> = (&'a str, &'a str, &'a str, u32, IndexProfile, &'a [u8], u8);
    let cases: Vec<Case<'_>> = vec![
        (
            "hmac_email_plain",
            "acme",
            "email",
            1,
            email,
            b"ann@example.org",
            1,
        ),
        (
            "hmac_email_normalized",
            "acme",
            "email",
            1,
            email,
            "  Ann@EXAMPLE.org\t\n".as_bytes(),
            1,
        ),
        (
            "hmac_email_combining_accent",
            "acme",
            "email",
            1,
            email,
            "JOSE\u{301}@example.org".as_bytes(),
            1,
        ),
        (
            "hmac_email_sharp_s_folds",
            "acme",
            "email",
            1,
            email,
            "Stra\u{df}e@example.org".as_bytes(),
            1,
        ),
        (
            "hmac_email_unicode_spaces",
            "acme",
            "email",
            1,
            email,
            "\u{a0}ann@example.org\u{3000}".as_bytes(),
            1,
        ),
        (
            "hmac_email_version_2",
            "acme",
            "email",
            2,
            email,
            b"ann@example.org",
            2,
        ),
        (
            "hmac_other_tenant",
            "globex",
            "email",
            1,
            email,
            b"ann@example.org",
            1,
        ),
        (
            "hmac_raw_128_bytes",
            "acme",
            "token",
            7,
            raw128,
            b"\x00\xff binary \x80",
            3,
        ),
        ("hmac_raw_empty", "acme", "token", 1, raw128, b"", 3),
        ("hmac_full_256", "t", "f", 4294967295, full, b"x", 4),
        (
            "hmac_nfkc_16_bits",
            "acme",
            "name",
            1,
            nfkc16,
            "\u{ff21}\u{fb01}x".as_bytes(),
            5,
        ),
        (
            "argon2id_small_dob",
            "acme",
            "birth_date",
            1,
            argon_small,
            b" 1990-01-31 ",
            6,
        ),
        (
            "argon2id_two_lanes",
            "acme",
            "postcode",
            3,
            argon_lanes,
            b"SW1A 1AA",
            6,
        ),
        (
            "argon2id_default_cost",
            "acme",
            "phone",
            1,
            argon_default,
            b"+44 20 7946 0958",
            7,
        ),
    ];
    let mut valid = Vec::new();
    for (name, tenant, field, version, profile, value, seed) in cases {
        let tk_bytes = pattern(seed);
        let tk = SecretKey::try_from_slice(&tk_bytes).unwrap();
        let k = IndexKey::derive(&tk, tenant, field, version, &profile).unwrap();
        let normalized = profile.normalization.apply(value).unwrap().into_owned();
        let ix = k.compute(value).unwrap();
        valid.push(json!({
            "name": name,
            "tenant_key": hex::encode(tk_bytes),
            "tenant": tenant,
            "field": field,
            "version": version,
            "profile": profile_json(&profile),
            "value": hex::encode(value),
            "normalized": hex::encode(normalized),
            "index": hex::encode(ix.as_bytes()),
            "text": ix.to_text(),
        }));
    }
    let invalid = vec![json!({
        "name": "fail_not_utf8_with_normalization",
        "tenant_key": hex::encode(pattern(1)),
        "tenant": "acme",
        "field": "email",
        "version": 1,
        "profile": profile_json(&email),
        "value": "ff616e6e",
        "error": "invalid_argument",
    })];
    let malformed: Vec<Value> = [
        ("fail_empty", ""),
        ("fail_wrong_format_byte", "b2000000016162"),
        ("fail_header_only", "b100000001"),
        ("fail_text_not_base64url", hex::encode("fkb1:!!").as_str()),
    ]
    .iter()
    .map(|(n, v)| json!({ "name": n, "stored": v, "error": "malformed" }))
    .collect();
    let mut pseudonyms = Vec::new();
    for (name, tenant, subject, purpose, seed) in [
        ("pseudonym_analytics", "acme", "user-42", "analytics", 11u8),
        (
            "pseudonym_other_purpose",
            "acme",
            "user-42",
            "marketing",
            11,
        ),
        (
            "pseudonym_other_subject_key",
            "acme",
            "user-42",
            "analytics",
            12,
        ),
        (
            "pseudonym_other_tenant",
            "globex",
            "user-42",
            "analytics",
            13,
        ),
        ("pseudonym_length_prefixes", "ab", "c", "d", 14),
        ("pseudonym_length_prefixes_shifted", "a", "bc", "d", 14),
    ] {
        let sk_bytes = pattern(seed);
        let sk = SecretKey::try_from_slice(&sk_bytes).unwrap();
        pseudonyms.push(json!({
            "name": name,
            "subject_key": hex::encode(sk_bytes),
            "tenant": tenant,
            "subject": subject,
            "purpose": purpose,
            "pseudonym": hex::encode(pseudonym(&sk, tenant, subject, purpose)),
        }));
    }
    json!({
        "format": "fieldkey blind index v1 and pseudonyms (docs/BLIND_INDEX.md)",
        "generator": "FIELDKEY_WRITE_VECTORS=1 cargo test --lib crypto::blind_vectors",
        "valid": valid,
        "invalid": invalid,
        "malformed": malformed,
        "pseudonyms": pseudonyms,
    })
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap()
}

#[test]
fn blind_index_v1_vectors() {
    if std::env::var_os("FIELDKEY_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let valid = file["valid"].as_array().unwrap();
    assert!(valid.len() >= 14);
    for v in valid {
        let name = s(v, "name");
        let tk = key_from_hex(s(v, "tenant_key"));
        let profile = profile_from(&v["profile"]);
        let version = v["version"].as_u64().unwrap() as u32;
        let value = hex::decode(s(v, "value")).unwrap();
        let k = IndexKey::derive(&tk, s(v, "tenant"), s(v, "field"), version, &profile).unwrap();
        let ix = k.compute(&value).unwrap();
        assert_eq!(hex::encode(ix.as_bytes()), s(v, "index"), "{name}");
        assert_eq!(ix.to_text(), s(v, "text"), "{name}");
        assert_eq!(
            hex::encode(profile.normalization.apply(&value).unwrap()),
            s(v, "normalized"),
            "{name}"
        );
        assert_eq!(BlindIndex::parse(s(v, "text").as_bytes()).unwrap(), ix);
        assert_eq!(ix.version(), version);
    }
    // normalization makes these equal, and the version / tenant separate them
    let by: std::collections::HashMap<&str, &str> = valid
        .iter()
        .map(|v| (s(v, "name"), s(v, "index")))
        .collect();
    assert_eq!(by["hmac_email_plain"], by["hmac_email_normalized"]);
    assert_eq!(by["hmac_email_plain"], by["hmac_email_unicode_spaces"]);
    assert_ne!(
        by["hmac_email_plain"][10..],
        by["hmac_email_version_2"][10..]
    );
    assert_ne!(by["hmac_email_plain"][10..], by["hmac_other_tenant"][10..]);
    for v in file["invalid"].as_array().unwrap() {
        let tk = key_from_hex(s(v, "tenant_key"));
        let profile = profile_from(&v["profile"]);
        let k = IndexKey::derive(&tk, s(v, "tenant"), s(v, "field"), 1, &profile).unwrap();
        assert!(
            k.compute(&hex::decode(s(v, "value")).unwrap()).is_err(),
            "{}",
            s(v, "name")
        );
    }
    for v in file["malformed"].as_array().unwrap() {
        let stored = hex::decode(s(v, "stored")).unwrap();
        assert!(BlindIndex::parse(&stored).is_err(), "{}", s(v, "name"));
    }
    let ps = file["pseudonyms"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for v in ps {
        let sk = key_from_hex(s(v, "subject_key"));
        let p = pseudonym(&sk, s(v, "tenant"), s(v, "subject"), s(v, "purpose"));
        assert_eq!(hex::encode(p), s(v, "pseudonym"), "{}", s(v, "name"));
        assert!(seen.insert(p), "{}", s(v, "name"));
    }
}
