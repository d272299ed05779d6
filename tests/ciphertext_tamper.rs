//! Every single-bit flip and every truncation of real Encrypt outputs (tenant- and
//! subject-scoped, bound to a row context), sent to a `fieldkey serve` process over
//! gRPC, each answered with exactly the status code and `fieldkey-error` reason that
//! the decoding rules of `docs/FORMAT.md` §6 give for those bytes: MALFORMED_CIPHERTEXT
//! for the magic, the format version, the suite, an unknown scope byte, key version 0
//! and any length below the 49-byte minimum; SCOPE_MISMATCH for the scope bit;
//! UNKNOWN_KEY_VERSION for a version the tenant lacks; AUTHENTICATION_FAILED (one
//! variant whatever was altered: nonce, body, tag, or a key version the tenant does
//! have) for everything else. Never INTERNAL, never a dropped connection, and the
//! sidecar is still serving at the end.
//!
//! The expected outcome comes from [`expected`], written from FORMAT.md §6 alone, not
//! from the decoder. The binary form goes through unary Decrypt (the trailer reason);
//! the text form through DecryptBatch (per-item code and reason).
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::grpc::{as_id, create_tenant, ids, reason};
use common::sidecar::{Sidecar, TRUST_MESH};
use fieldkey::proto::pb::{self, crypto_client::CryptoClient, keys_client::KeysClient};
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "acme";
const SUBJECT: &str = "user-7";
const FIELD: &str = "email";
const CONTEXT: &[u8] = b"users/42";
/// 20 bytes: a 69-byte envelope, 552 bit flips and 69 truncations per form and scope.
const PLAINTEXT: &[u8] = b"tamper-me@example.org";

/// What FORMAT.md §6 says a decoder answers for `b`, sent with (`subject` or not) to a
/// tenant that has key `versions`; `None` when it must decrypt (`b` is the original).
fn expected(
    b: &[u8],
    original: &[u8],
    subject: bool,
    versions: &[u32],
) -> Option<(Code, &'static str)> {
    const MALFORMED: (Code, &str) = (Code::InvalidArgument, "MALFORMED_CIPHERTEXT");
    // 1. text form
    let decoded;
    let b = match b.strip_prefix(b"fk1:") {
        Some(t) => match URL_SAFE_NO_PAD.decode(t) {
            Ok(d) => {
                decoded = d;
                &decoded[..]
            }
            Err(_) => return Some(MALFORMED),
        },
        None => b,
    };
    // 2. length >= 3 and magic; 3. version; 4. length >= 49; 5. suite
    if b.len() < 3 || &b[..2] != b"fk" || b[2] != 0x01 || b.len() < 49 || b[3] != 0x01 {
        return Some(MALFORMED);
    }
    // 6. scope byte and key version
    let scope_subject = match b[4] {
        0x00 => false,
        0x01 => true,
        _ => return Some(MALFORMED),
    };
    let version = u32::from_be_bytes(b[5..9].try_into().unwrap());
    if version == 0 {
        return Some(MALFORMED);
    }
    // 7. scope against the request
    if scope_subject != subject {
        return Some((Code::InvalidArgument, "SCOPE_MISMATCH"));
    }
    // 8. the version exists
    if !versions.contains(&version) {
        return Some((Code::NotFound, "UNKNOWN_KEY_VERSION"));
    }
    // 9. authentication
    (b != original).then_some((Code::DataLoss, "AUTHENTICATION_FAILED"))
}

/// Every single-bit flip of `v`, then every proper prefix (lengths 0..len).
fn mutations(v: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..v.len() {
        for bit in 0..8 {
            let mut m = v.to_vec();
            m[i] ^= 1 << bit;
            out.push((format!("byte {i} bit {bit}"), m));
        }
    }
    for n in 0..v.len() {
        out.push((format!("truncated to {n}"), v[..n].to_vec()));
    }
    out
}

fn request(subject: bool, ciphertext: Vec<u8>) -> pb::DecryptRequest {
    pb::DecryptRequest {
        tenant_id: TENANT.into(),
        subject_id: if subject {
            SUBJECT.into()
        } else {
            String::new()
        },
        field: FIELD.into(),
        context: CONTEXT.to_vec().into(),
        ciphertext: ciphertext.into(),
        repair: false,
    }
}

async fn encrypt(ch: &Channel, subject: bool, text: bool) -> pb::EncryptResponse {
    CryptoClient::new(ch.clone())
        .encrypt(as_id(
            ids::APP,
            pb::EncryptRequest {
                tenant_id: TENANT.into(),
                subject_id: if subject {
                    SUBJECT.into()
                } else {
                    String::new()
                },
                field: FIELD.into(),
                context: CONTEXT.to_vec().into(),
                plaintext: PLAINTEXT.to_vec().into(),
                format: if text {
                    pb::CiphertextFormat::Text as i32
                } else {
                    pb::CiphertextFormat::Binary as i32
                },
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bit_flip_and_truncation_gets_its_exact_status_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let sc = Sidecar::builder()
        .any_port()
        .data_dir(&dir.path().join("data"))
        .config_text(dir.path(), TRUST_MESH)
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", "tamper test passphrase")
        .start();
    let ch = sc.channel().await;
    create_tenant(&ch, TENANT).await.unwrap();
    // Versions 1, 2 and 3, encrypting under 3 (0b11): flipping either low bit of the
    // version names a version the tenant has (authentication must fail), any other
    // bit one it lacks.
    for _ in 0..2 {
        KeysClient::new(ch.clone())
            .rotate_tenant_key(as_id(
                ids::OPS,
                pb::RotateTenantKeyRequest {
                    tenant_id: TENANT.into(),
                },
            ))
            .await
            .unwrap();
    }
    let versions = [1, 2, 3];
    let mut crypto = CryptoClient::new(ch.clone());
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut calls = 0usize;

    for subject in [false, true] {
        // Binary form, one unary Decrypt per mutation: the code and the trailer.
        let enc = encrypt(&ch, subject, false).await;
        assert_eq!(enc.key_version, 3);
        let original = enc.ciphertext.to_vec();
        assert_eq!(original.len(), 49 + PLAINTEXT.len());
        let ok = crypto
            .decrypt(as_id(ids::APP, request(subject, original.clone())))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.plaintext, PLAINTEXT);
        for (what, m) in mutations(&original) {
            let (code, why) = expected(&m, &original, subject, &versions)
                .unwrap_or_else(|| panic!("{what}: a mutation must not be the original"));
            let st = crypto
                .decrypt(as_id(ids::APP, request(subject, m)))
                .await
                .expect_err(&what);
            assert_eq!(
                (st.code(), reason(&st).as_str()),
                (code, why),
                "binary, subject {subject}, {what}: {st:?}"
            );
            assert!(
                !st.message()
                    .as_bytes()
                    .windows(8)
                    .any(|w| PLAINTEXT.starts_with(w)),
                "{what}: the message leaks the plaintext"
            );
            *counts.entry(why).or_default() += 1;
            calls += 1;
        }

        // Text form, the same mutations of its characters, through DecryptBatch.
        let text = encrypt(&ch, subject, true).await.ciphertext;
        assert!(text.starts_with(b"fk1:"));
        let muts = mutations(&text);
        for chunk in muts.chunks(500) {
            let items = chunk
                .iter()
                .map(|(_, m)| request(subject, m.clone()))
                .collect();
            let res = crypto
                .decrypt_batch(as_id(ids::APP, pb::DecryptBatchRequest { items }))
                .await
                .unwrap()
                .into_inner()
                .results;
            assert_eq!(res.len(), chunk.len());
            for ((what, m), r) in chunk.iter().zip(res) {
                let exp = expected(m, &original_of(&text), subject, &versions);
                match (r.result.unwrap(), exp) {
                    (pb::decrypt_result::Result::Ok(ok), None) => {
                        // A flip in the last character's padding bits is not canonical
                        // (refused above); nothing else decodes to the original.
                        assert_eq!(ok.plaintext, PLAINTEXT, "text, {what}");
                    }
                    (pb::decrypt_result::Result::Error(e), Some((code, why))) => {
                        assert_eq!(
                            (Code::from_i32(e.code), e.reason.as_str()),
                            (code, why),
                            "text, subject {subject}, {what}: {e:?}"
                        );
                        *counts.entry(why).or_default() += 1;
                    }
                    (got, exp) => {
                        panic!("text, subject {subject}, {what}: {got:?}, expected {exp:?}")
                    }
                }
                calls += 1;
            }
        }
    }
    eprintln!("{calls} tampered ciphertexts: {counts:?}");
    for r in [
        "MALFORMED_CIPHERTEXT",
        "SCOPE_MISMATCH",
        "UNKNOWN_KEY_VERSION",
        "AUTHENTICATION_FAILED",
    ] {
        assert!(counts.get(r).copied().unwrap_or(0) > 0, "{r} never seen");
    }
    assert!(!counts.contains_key("INTERNAL"));
    // Still serving, and the log has no panic.
    let again = encrypt(&ch, true, false).await;
    assert_eq!(again.key_version, 3);
    let (status, log) = sc.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The binary envelope of a text-form one.
fn original_of(text: &[u8]) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text.strip_prefix(b"fk1:").unwrap())
        .unwrap()
}
