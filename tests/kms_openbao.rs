//! The OpenBao / Vault Transit provider against a real OpenBao dev server (one per
//! test, `common::openbao::BaoServer`): wrapping, the attacks a KMS binding must stop
//! (another context, another key, altered bytes, a key that would ignore the context),
//! the failures (sealed, killed, black-holed, throttled, untrusted TLS); in
//! `kms_openbao/auth.rs` authentication (token file, AppRole, Kubernetes, expiry and
//! revocation) and policies; in `kms_openbao/lifecycle.rs` namespaces, the deletion
//! lifecycle and its sweep.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::openbao::{BaoServer, DEFAULT_KEY, MOUNT};
use fieldkey::kms::openbao::{OpenBaoKms, OpenBaoSettings};
use fieldkey::kms::{EncryptionContext, Kms, KmsError, WrappedKey};

fn ctx(tenant: &str, version: u32) -> EncryptionContext {
    EncryptionContext::tenant_key(tenant, version)
}

async fn connect(s: &OpenBaoSettings) -> OpenBaoKms {
    OpenBaoKms::connect(s).await.unwrap()
}

#[tokio::test]
async fn keys_round_trip_and_the_wrapped_form_is_a_transit_ciphertext() {
    let bao = BaoServer::start().await;
    let kms = bao.kms().await;
    assert_eq!(kms.provider(), "openbao");
    assert_eq!(kms.default_key_id(), DEFAULT_KEY);
    kms.check().await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    assert!(dk.wrapped.as_bytes().starts_with(b"vault:v1:"));
    let back = kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.unwrap();
    assert!(back.ct_eq(&dk.secret));
    // Rewrapping an existing key gives a different ciphertext of the same key.
    let again = kms.wrap(DEFAULT_KEY, &dk.secret, &c).await.unwrap();
    assert_ne!(again.as_bytes(), dk.wrapped.as_bytes());
    assert!(
        kms.unwrap(DEFAULT_KEY, &again, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // An operator can unwrap by hand with the documented context.
    let mut raw = b"fieldkey/v1 openbao-transit\0".to_vec();
    raw.extend_from_slice(&c.canonical_bytes());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    let out = bao
        .api_ok(
            "POST",
            &format!("{MOUNT}/decrypt/{DEFAULT_KEY}"),
            Some(serde_json::json!({
                "ciphertext": std::str::from_utf8(dk.wrapped.as_bytes()).unwrap(),
                "context": b64, "associated_data": b64,
            })),
        )
        .await
        .unwrap();
    let plain = base64::engine::general_purpose::STANDARD
        .decode(out["data"]["plaintext"].as_str().unwrap())
        .unwrap();
    assert_eq!(plain.as_slice(), dk.secret.expose());
    assert_eq!(
        kms.canonical_key_id(DEFAULT_KEY).await.unwrap(),
        DEFAULT_KEY
    );
    assert!(matches!(
        kms.canonical_key_id("no-such-key").await,
        Err(KmsError::KeyNotFound { .. })
    ));
}

#[tokio::test]
async fn a_wrapped_key_replayed_under_another_context_does_not_unwrap() {
    let bao = BaoServer::start().await;
    let kms = bao.kms().await;
    let dk = kms
        .generate_data_key(DEFAULT_KEY, &ctx("t1", 1))
        .await
        .unwrap();
    for other in [
        ctx("t2", 1),
        ctx("t1", 2),
        ctx("t1", 1).with("fieldkey:extra", "x"),
        EncryptionContext::default(),
    ] {
        assert!(
            matches!(
                kms.unwrap(DEFAULT_KEY, &dk.wrapped, &other).await,
                Err(KmsError::InvalidCiphertext)
            ),
            "unwrapped under {other:?}"
        );
    }
    // The right context still works: the failures above are the binding, not a break.
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &ctx("t1", 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_altered_wrapped_key_does_not_unwrap() {
    let bao = BaoServer::start().await;
    let kms = bao.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    let good = dk.wrapped.as_bytes().to_vec();
    let prefix = b"vault:v1:".len();
    // A changed character at every fourth position of the body, and in the prefix.
    let mut positions: Vec<usize> = (prefix..good.len()).step_by(4).collect();
    positions.extend([0, 6, prefix - 1, good.len() - 1]);
    for i in positions {
        let mut bad = good.clone();
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let r = kms.unwrap(DEFAULT_KEY, &WrappedKey::new(bad), &c).await;
        assert!(
            matches!(r, Err(KmsError::InvalidCiphertext)),
            "byte {i} changed: {r:?}"
        );
    }
    for bad in [
        &good[..good.len() - 4],
        &good[..prefix],
        b"".as_slice(),
        b"\x01not-transit",
    ] {
        let r = kms
            .unwrap(DEFAULT_KEY, &WrappedKey::new(bad.to_vec()), &c)
            .await;
        assert!(matches!(r, Err(KmsError::InvalidCiphertext)), "{r:?}");
    }
}

#[tokio::test]
async fn a_wrapped_key_does_not_unwrap_under_another_key() {
    let bao = BaoServer::start().await;
    bao.create_key("other", true, "aes256-gcm96").await.unwrap();
    let kms = bao.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    assert!(matches!(
        kms.unwrap("other", &dk.wrapped, &c).await,
        Err(KmsError::InvalidCiphertext)
    ));
    assert!(matches!(
        kms.unwrap("missing", &dk.wrapped, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    for bad_name in ["../sys/seal", "a/b", "", "x y"] {
        assert!(matches!(
            kms.unwrap(bad_name, &dk.wrapped, &c).await,
            Err(KmsError::KeyNotFound { .. })
        ));
    }
    // Wrapping under a missing key makes no key (the root token could create one).
    assert!(matches!(
        kms.wrap("missing", &dk.secret, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(bao.key("missing").await.unwrap().is_none());
}

#[tokio::test]
async fn a_key_that_would_ignore_the_context_is_refused() {
    let bao = BaoServer::start().await;
    bao.create_key("plain", false, "aes256-gcm96")
        .await
        .unwrap();
    bao.create_key("small", true, "aes128-gcm96").await.unwrap();
    bao.create_key("chacha", true, "chacha20-poly1305")
        .await
        .unwrap();
    // Why: Transit ignores the context of a non-derived key. A ciphertext made under
    // context A decrypts under context B.
    let a = base64::engine::general_purpose::STANDARD.encode("tenant a");
    let b = base64::engine::general_purpose::STANDARD.encode("tenant b");
    let ct = bao
        .api_ok(
            "POST",
            &format!("{MOUNT}/encrypt/plain"),
            Some(serde_json::json!({"plaintext": "AAAA", "context": a})),
        )
        .await
        .unwrap()["data"]["ciphertext"]
        .clone();
    let (status, _) = bao
        .api(
            "POST",
            &format!("{MOUNT}/decrypt/plain"),
            Some(serde_json::json!({"ciphertext": ct, "context": b})),
        )
        .await
        .unwrap();
    assert_eq!(
        status, 200,
        "the context of a non-derived key binds nothing"
    );
    let kms = bao.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    for key in ["plain", "small", "chacha"] {
        assert!(
            matches!(
                kms.generate_data_key(key, &c).await,
                Err(KmsError::Misconfigured(_))
            ),
            "{key} wrapped"
        );
        assert!(
            matches!(
                kms.unwrap(key, &dk.wrapped, &c).await,
                Err(KmsError::Misconfigured(_))
            ),
            "{key} unwrapped"
        );
    }
    let mut s = bao.settings();
    s.key = "plain".into();
    let Err(KmsError::Misconfigured(msg)) = connect(&s).await.check().await else {
        panic!("a non-derived default key passed the check");
    };
    assert!(msg.contains("derived"), "{msg}");
}

#[tokio::test]
async fn a_sealed_server_is_unavailable_not_a_refusal() {
    let bao = BaoServer::start().await;
    let mut s = bao.settings();
    s.operation_timeout_ms = 3000;
    s.attempt_timeout_ms = 1000;
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    bao.seal().await.unwrap();
    let r = kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await;
    assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
    assert!(matches!(kms.check().await, Err(KmsError::Unavailable(_))));
    assert!(format!("{:?}", kms.check().await).contains("sealed"));
    bao.unseal().await.unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
}

#[tokio::test]
async fn a_dead_or_silent_server_fails_within_the_deadline() {
    let mut bao = BaoServer::start().await;
    let proxy = common::proxy::TcpProxy::start(common::socket_addr_of(&bao.addr).unwrap())
        .await
        .unwrap();
    let mut s = bao.settings();
    s.address = proxy.via(&bao.addr);
    s.operation_timeout_ms = 1500;
    s.attempt_timeout_ms = 600;
    s.connect_timeout_ms = 300;
    s.max_attempts = 4;
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    let slack = Duration::from_millis(700);
    // A path that swallows everything: a timeout.
    proxy.black_hole();
    let t = Instant::now();
    let r = kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await;
    assert!(matches!(r, Err(KmsError::Timeout)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1500) + slack,
        "{:?}",
        t.elapsed()
    );
    // A server that is gone: unavailable (connections refused), within the deadline.
    proxy.pass();
    bao.kill();
    let t = Instant::now();
    let r = kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await;
    assert!(
        matches!(r, Err(KmsError::Unavailable(_) | KmsError::Timeout)),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500) + slack,
        "{:?}",
        t.elapsed()
    );
    // Connecting to a dead server is not an error (the check reports it).
    let later = connect(&s).await;
    assert!(matches!(
        later.check().await,
        Err(KmsError::Unavailable(_) | KmsError::Timeout)
    ));
}

#[tokio::test]
async fn throttling_is_retried_then_reported() {
    let bao = BaoServer::start().await;
    let kms = bao.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    bao.api_ok(
        "POST",
        "sys/quotas/rate-limit/transit",
        Some(serde_json::json!({ "rate": 1, "interval": "30s", "path": format!("{MOUNT}/") })),
    )
    .await
    .unwrap();
    let mut throttled = false;
    for _ in 0..5 {
        match kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await {
            Ok(_) => {}
            Err(KmsError::Throttled) => {
                throttled = true;
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(throttled);
    bao.api_ok("DELETE", "sys/quotas/rate-limit/transit", None)
        .await
        .unwrap();
    assert!(kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.is_ok());
}

#[tokio::test]
async fn tls_is_verified_against_the_configured_ca_only() {
    let bao = BaoServer::start_tls().await;
    assert!(bao.addr.starts_with("https://"));
    let kms = bao.kms().await;
    kms.check().await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // Without the CA the server's certificate does not verify: refused, not retried.
    let mut s = bao.settings();
    s.ca_file = None;
    let untrusting = connect(&s).await;
    let r = untrusting.check().await;
    let Err(KmsError::Misconfigured(msg)) = r else {
        panic!("an untrusted server was accepted: {r:?}");
    };
    assert!(msg.contains("ca_file"), "{msg}");
    // Another CA does not do either.
    let other = common::pki::ca("not the server's CA");
    s.ca_file = Some(bao.write_file("other-ca.pem", &other.pem));
    assert!(matches!(
        connect(&s).await.check().await,
        Err(KmsError::Misconfigured(_))
    ));
    // Plain http to a non-loopback address is refused at connect.
    let mut s = bao.settings();
    s.address = "http://bao.example:8200".into();
    assert!(matches!(
        OpenBaoKms::connect(&s).await,
        Err(KmsError::Misconfigured(_))
    ));
}

#[tokio::test]
async fn check_reports_a_missing_or_pending_default_key() {
    let bao = BaoServer::start().await;
    let mut s = bao.settings();
    s.key = "not-there".into();
    assert!(matches!(
        connect(&s).await.check().await,
        Err(KmsError::KeyNotFound { .. })
    ));
    let kms = bao.kms().await;
    bao.api_ok(
        "DELETE",
        &format!("{MOUNT}/keys/{DEFAULT_KEY}/soft-delete"),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(
        kms.check().await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    let mut s = bao.settings();
    s.mount = "nothing-here".into();
    assert!(matches!(
        connect(&s).await.check().await,
        Err(KmsError::Misconfigured(_))
    ));
}

#[path = "kms_openbao/auth.rs"]
mod auth;
#[path = "kms_openbao/lifecycle.rs"]
mod lifecycle;
