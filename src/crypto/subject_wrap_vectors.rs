//! Test vectors for the subject-key wraps of `docs/FORMAT.md` §4.2 (legacy: under a key
//! HKDF-derived from tenant key version `w`) and §4.3 (under the subject-wrapping key
//! SWK of key epoch `e`), in `tests/vectors/subject_wrap.json`.
//!
//! Check: `cargo test --lib crypto::subject_wrap_vectors` recomputes every valid vector
//! from its inputs with a fixed nonce (a reconstruction of the spec written here,
//! [`spec_wrap`]), opens it with the production [`unwrap_subject_key`] /
//! [`unwrap_subject_key_epoch`], checks that the production wrap functions build the
//! same construction (their random nonce put into [`spec_wrap`] gives their blob), and
//! checks that every `fail_*` vector is refused with its named error class. Regenerate
//! (only when the format changes, which it must not):
//! `FIELDKEY_WRITE_VECTORS=1 cargo test --lib crypto::subject_wrap_vectors`.
//! `tests/vectors/check_subject_wrap.py` checks the same file with an independent
//! Python implementation.

use hkdf::Hkdf;
use serde_json::{Value, json};
use sha2::Sha256;

use super::xaes::Xaes256Gcm;
use super::{
    CryptoError, KEY_LEN, SUBJECT_WRAPPED_LEN, SecretKey, unwrap_subject_key,
    unwrap_subject_key_epoch, wrap_subject_key, wrap_subject_key_epoch,
};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/subject_wrap.json"
);

/// Which wrap a vector is for; the number is `w` (legacy) or `e` (epoch).
#[derive(Clone, Copy)]
enum Wrap {
    Legacy(u32),
    Epoch(u64),
}

/// The length prefix of `lp16` (u16, big-endian).
fn len16(b: &[u8]) -> [u8; 2] {
    u16::try_from(b.len()).unwrap().to_be_bytes()
}

fn pattern(seed: u8) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| seed.wrapping_mul(41).wrapping_add(i as u8))
}

fn nonce_for(seed: u8) -> [u8; 24] {
    std::array::from_fn(|i| seed.wrapping_add(i as u8).wrapping_mul(29))
}

/// §4.2: `W = HKDF(salt = "fieldkey/v1 subject-wrap", IKM = TK_w, info = lp16(tenant))`.
fn legacy_wrapping_key(tk: &[u8; KEY_LEN], tenant: &str) -> [u8; KEY_LEN] {
    let t = tenant.as_bytes();
    let mut w = [0u8; KEY_LEN];
    let mut info = len16(t).to_vec();
    info.extend_from_slice(t);
    Hkdf::<Sha256>::new(Some(b"fieldkey/v1 subject-wrap"), tk)
        .expand(&info, &mut w)
        .unwrap();
    w
}

/// The associated data of §4.2 / §4.3.
fn spec_ad(wrap: Wrap, tenant: &str, subject: &str) -> Vec<u8> {
    let (label, number) = match wrap {
        Wrap::Legacy(w) => (&b"fieldkey/v1 subject-key"[..], w.to_be_bytes().to_vec()),
        Wrap::Epoch(e) => (
            &b"fieldkey/v1 subject-key-epoch"[..],
            e.to_be_bytes().to_vec(),
        ),
    };
    let mut ad = label.to_vec();
    for part in [tenant.as_bytes(), subject.as_bytes()] {
        ad.extend_from_slice(&len16(part));
        ad.extend_from_slice(part);
    }
    ad.extend_from_slice(&number);
    ad
}

/// The XAES-256-GCM key of the wrap: `W` (§4.2) or the SWK itself (§4.3).
fn spec_key(wrap: Wrap, key: &[u8; KEY_LEN], tenant: &str) -> [u8; KEY_LEN] {
    match wrap {
        Wrap::Legacy(_) => legacy_wrapping_key(key, tenant),
        Wrap::Epoch(_) => *key,
    }
}

/// The spec's blob with a chosen nonce:
/// `0x01 || nonce || XAES-256-GCM(key, nonce, SK, AD)`.
fn spec_wrap(
    wrap: Wrap,
    key: &[u8; KEY_LEN],
    tenant: &str,
    subject: &str,
    nonce: &[u8; 24],
    sk: &[u8; KEY_LEN],
) -> Vec<u8> {
    let aead = Xaes256Gcm::new(&spec_key(wrap, key, tenant));
    let mut body = *sk;
    let tag = aead
        .encrypt_in_place_detached(nonce, &spec_ad(wrap, tenant, subject), &mut body)
        .unwrap();
    let mut blob = vec![0x01];
    blob.extend_from_slice(nonce);
    blob.extend_from_slice(&body);
    blob.extend_from_slice(&tag);
    blob
}

/// The production unwrap for `wrap`.
fn production_unwrap(
    wrap: Wrap,
    key: &SecretKey,
    tenant: &str,
    subject: &str,
    blob: &[u8],
) -> Result<SecretKey, CryptoError> {
    match wrap {
        Wrap::Legacy(w) => unwrap_subject_key(key, tenant, subject, w, blob),
        Wrap::Epoch(e) => unwrap_subject_key_epoch(key, tenant, subject, e, blob),
    }
}

/// The production wrap for `wrap` (random nonce).
fn production_wrap(
    wrap: Wrap,
    key: &SecretKey,
    tenant: &str,
    subject: &str,
    sk: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    match wrap {
        Wrap::Legacy(w) => wrap_subject_key(key, tenant, subject, w, sk),
        Wrap::Epoch(e) => wrap_subject_key_epoch(key, tenant, subject, e, sk),
    }
}

/// The JSON fields that name the wrap, its key and its number.
fn wrap_fields(wrap: Wrap, key: &[u8; KEY_LEN]) -> Value {
    match wrap {
        Wrap::Legacy(w) => {
            json!({ "kind": "legacy", "tenant_key": hex::encode(key), "wrap_version": w })
        }
        Wrap::Epoch(e) => json!({ "kind": "epoch", "swk": hex::encode(key), "epoch": e }),
    }
}

/// A vector: its name, then the wrap's fields, then `rest`.
fn vector(name: &str, wrap: Wrap, key: &[u8; KEY_LEN], rest: Value) -> Value {
    let mut v = json!({ "name": name });
    for part in [wrap_fields(wrap, key), rest] {
        if let (Some(out), Value::Object(fields)) = (v.as_object_mut(), part) {
            out.extend(fields);
        }
    }
    v
}

const AUTH: &str = "authentication";

/// A failure vector's inputs: a valid vector's with one thing changed.
#[derive(Clone)]
struct Fail {
    wrap: Wrap,
    key: [u8; KEY_LEN],
    tenant: String,
    subject: String,
    blob: Vec<u8>,
    error: &'static str,
}

struct Case {
    name: &'static str,
    wrap: Wrap,
    tenant: String,
    subject: String,
    seed: u8,
}

fn cases() -> Vec<Case> {
    let c = |name, wrap, tenant: &str, subject: &str, seed| Case {
        name,
        wrap,
        tenant: tenant.to_owned(),
        subject: subject.to_owned(),
        seed,
    };
    vec![
        c("legacy_v1", Wrap::Legacy(1), "acme", "user-123", 1),
        c("legacy_v7", Wrap::Legacy(7), "tenant-0001", "learner:77", 2),
        c(
            "legacy_max_version",
            Wrap::Legacy(u32::MAX),
            "edx-host",
            "s",
            3,
        ),
        c("epoch_1", Wrap::Epoch(1), "acme", "user-123", 4),
        c("epoch_2", Wrap::Epoch(2), "tenant-0001", "learner:77", 5),
        // > 2^32: the epoch is a u64 in the AD, not a u32
        c(
            "epoch_above_2_32",
            Wrap::Epoch((1 << 32) + 1),
            "acme",
            "user-123",
            6,
        ),
        // > 2^53: a JSON reader that goes through doubles loses it
        c(
            "epoch_above_2_53",
            Wrap::Epoch((1 << 53) + 1),
            "edx-host",
            &"x".repeat(255),
            7,
        ),
    ]
}

fn generate() -> Value {
    let cases = cases();
    let mut valid = Vec::new();
    for c in &cases {
        let key = pattern(c.seed);
        let sk = pattern(c.seed.wrapping_add(100));
        let nonce = nonce_for(c.seed);
        let blob = spec_wrap(c.wrap, &key, &c.tenant, &c.subject, &nonce, &sk);
        assert_eq!(blob.len(), SUBJECT_WRAPPED_LEN);
        valid.push(vector(
            c.name,
            c.wrap,
            &key,
            json!({
                "tenant": c.tenant,
                "subject": c.subject,
                "nonce": hex::encode(nonce),
                "subject_key": hex::encode(sk),
                "aead_key": hex::encode(spec_key(c.wrap, &key, &c.tenant)),
                "associated_data": hex::encode(spec_ad(c.wrap, &c.tenant, &c.subject)),
                "blob": hex::encode(&blob),
            }),
        ));
    }

    // Failure vectors, derived from one legacy and one epoch vector (above 2^32).
    let mut invalid = Vec::new();
    for base in [&cases[0], &cases[5]] {
        let key = pattern(base.seed);
        let sk = pattern(base.seed.wrapping_add(100));
        let blob = spec_wrap(
            base.wrap,
            &key,
            &base.tenant,
            &base.subject,
            &nonce_for(base.seed),
            &sk,
        );
        let prefix = match base.wrap {
            Wrap::Legacy(_) => "fail_legacy",
            Wrap::Epoch(_) => "fail_epoch",
        };
        let flip = |i: usize| {
            let mut b = blob.clone();
            b[i] ^= 0x01;
            b
        };
        let other_number = match base.wrap {
            Wrap::Legacy(w) => Wrap::Legacy(w + 1),
            Wrap::Epoch(e) => Wrap::Epoch(e + 1),
        };
        let (t, s) = (base.tenant.as_str(), base.subject.as_str());
        let same = Fail {
            wrap: base.wrap,
            key,
            tenant: t.to_owned(),
            subject: s.to_owned(),
            blob: blob.clone(),
            error: AUTH,
        };
        let with_blob = |blob: Vec<u8>, error| Fail {
            blob,
            error,
            ..same.clone()
        };
        let mut format_byte = blob.clone();
        format_byte[0] = 0x02;
        let mut list = vec![
            (
                "wrong_tenant",
                Fail {
                    tenant: format!("{t}2"),
                    ..same.clone()
                },
            ),
            (
                "wrong_subject",
                Fail {
                    subject: format!("{s}x"),
                    ..same.clone()
                },
            ),
            (
                "wrong_number",
                Fail {
                    wrap: other_number,
                    ..same.clone()
                },
            ),
            (
                "wrong_key",
                Fail {
                    key: pattern(base.seed.wrapping_add(1)),
                    ..same.clone()
                },
            ),
            // tenant/subject boundary moved: only the length prefixes tell them apart
            (
                "boundary_shift",
                Fail {
                    tenant: format!("{t}{}", &s[..1]),
                    subject: s[1..].to_owned(),
                    ..same.clone()
                },
            ),
            ("nonce_edited", with_blob(flip(1), AUTH)),
            ("nonce_tail_edited", with_blob(flip(24), AUTH)),
            ("ciphertext_edited", with_blob(flip(25), AUTH)),
            ("tag_edited", with_blob(flip(SUBJECT_WRAPPED_LEN - 1), AUTH)),
            (
                "truncated",
                with_blob(blob[..blob.len() - 1].to_vec(), "malformed"),
            ),
            (
                "extended",
                with_blob([blob.as_slice(), &[0]].concat(), "malformed"),
            ),
            ("empty", with_blob(vec![], "malformed")),
            (
                "unknown_format_byte",
                with_blob(format_byte, "unsupported-version"),
            ),
        ];
        list.push(match base.wrap {
            // the epoch's high 32 bits matter: a u32 encoding would accept this
            Wrap::Epoch(e) => (
                "epoch_low_32_bits",
                Fail {
                    wrap: Wrap::Epoch(e & 0xffff_ffff),
                    ..same.clone()
                },
            ),
            // the same AEAD key, nonce and number read as the other wrap: the AD labels
            // (and widths) keep the two apart
            Wrap::Legacy(w) => (
                "read_as_epoch_wrap",
                Fail {
                    wrap: Wrap::Epoch(u64::from(w)),
                    key: spec_key(base.wrap, &key, t),
                    ..same.clone()
                },
            ),
        });
        for (name, f) in list {
            invalid.push(vector(
                &format!("{prefix}_{name}"),
                f.wrap,
                &f.key,
                json!({
                    "tenant": f.tenant,
                    "subject": f.subject,
                    "blob": hex::encode(f.blob),
                    "error": f.error,
                }),
            ));
        }
    }
    json!({
        "format": "fieldkey subject-key wrap (legacy and epoch)",
        "spec": "docs/FORMAT.md sections 4.2 and 4.3",
        "generator": "FIELDKEY_WRITE_VECTORS=1 cargo test --lib crypto::subject_wrap_vectors",
        "notes": "All byte strings are hex. kind \"legacy\" (section 4.2): tenant_key is TK_w, wrap_version is w, aead_key is W = HKDF(salt \"fieldkey/v1 subject-wrap\", TK_w, lp16(tenant)). kind \"epoch\" (section 4.3): swk is SWK_{t,e}, epoch is e (a u64: some exceed 2^32 and 2^53), aead_key is the SWK. associated_data is the XAES-256-GCM AD; blob = 0x01 || nonce || ciphertext || tag. Failure vectors name the error class an implementation must return: malformed (wrong length), unsupported-version (unknown first byte), authentication.",
        "valid": valid,
        "invalid": invalid,
    })
}

fn error_class(e: &CryptoError) -> &'static str {
    match e {
        CryptoError::Malformed(_) => "malformed",
        CryptoError::UnsupportedVersion(_) => "unsupported-version",
        CryptoError::AuthenticationFailed => "authentication",
        _ => "other",
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("missing {k}"))
}

fn key32(h: &str) -> [u8; KEY_LEN] {
    hex::decode(h).unwrap().try_into().unwrap()
}

/// The wrap and its key, as a vector gives them.
fn wrap_of(v: &Value) -> (Wrap, [u8; KEY_LEN]) {
    match s(v, "kind") {
        "legacy" => (
            Wrap::Legacy(u32::try_from(v["wrap_version"].as_u64().unwrap()).unwrap()),
            key32(s(v, "tenant_key")),
        ),
        "epoch" => (
            Wrap::Epoch(v["epoch"].as_u64().unwrap()),
            key32(s(v, "swk")),
        ),
        k => panic!("unknown kind {k}"),
    }
}

#[test]
fn subject_wrap_vectors() {
    if std::env::var_os("FIELDKEY_WRITE_VECTORS").is_some() {
        std::fs::write(
            PATH,
            serde_json::to_string_pretty(&generate()).unwrap() + "\n",
        )
        .unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    assert_eq!(file, generate(), "{PATH} differs from the generator");
    let valid = file["valid"].as_array().unwrap();
    let invalid = file["invalid"].as_array().unwrap();
    assert!(valid.len() >= 6 && invalid.len() >= 20);
    for kind in ["legacy", "epoch"] {
        assert!(valid.iter().any(|v| v["kind"] == kind));
        assert!(invalid.iter().any(|v| v["kind"] == kind));
    }
    assert!(valid.iter().any(|v| v["epoch"].as_u64() > Some(1 << 32)));

    for v in valid {
        let name = s(v, "name");
        let (wrap, key) = wrap_of(v);
        let (tenant, subject) = (s(v, "tenant"), s(v, "subject"));
        let nonce: [u8; 24] = hex::decode(s(v, "nonce")).unwrap().try_into().unwrap();
        let sk = key32(s(v, "subject_key"));
        let blob = hex::decode(s(v, "blob")).unwrap();
        assert_eq!(
            hex::encode(spec_key(wrap, &key, tenant)),
            s(v, "aead_key"),
            "{name}: aead key"
        );
        assert_eq!(
            hex::encode(spec_ad(wrap, tenant, subject)),
            s(v, "associated_data"),
            "{name}: AD"
        );
        assert_eq!(
            spec_wrap(wrap, &key, tenant, subject, &nonce, &sk),
            blob,
            "{name}: blob"
        );

        // production code opens the vector ...
        let key = SecretKey::try_from_slice(&key).unwrap();
        let opened = production_unwrap(wrap, &key, tenant, subject, &blob)
            .unwrap_or_else(|e| panic!("{name}: production unwrap refused: {e}"));
        assert_eq!(opened.expose(), &sk, "{name}: subject key");
        // ... and its own wrap is the spec's construction under its random nonce
        let sk = SecretKey::try_from_slice(&sk).unwrap();
        let fresh = production_wrap(wrap, &key, tenant, subject, &sk).unwrap();
        assert_eq!(fresh.len(), SUBJECT_WRAPPED_LEN, "{name}: length");
        let fresh_nonce: [u8; 24] = fresh[1..25].try_into().unwrap();
        assert_eq!(
            spec_wrap(
                wrap,
                key.expose(),
                tenant,
                subject,
                &fresh_nonce,
                sk.expose()
            ),
            fresh,
            "{name}: production wrap"
        );
    }

    for v in invalid {
        let name = s(v, "name");
        assert!(name.starts_with("fail_"), "{name}");
        let (wrap, key) = wrap_of(v);
        let key = SecretKey::try_from_slice(&key).unwrap();
        let blob = hex::decode(s(v, "blob")).unwrap();
        let err = production_unwrap(wrap, &key, s(v, "tenant"), s(v, "subject"), &blob)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(error_class(&err), s(v, "error"), "{name}: {err}");
    }
}
