//! The OpenBao / Vault Transit provider against a real OpenBao dev server (one per
//! test, `common::openbao::BaoServer`): wrapping, the attacks a KMS binding must stop
//! (another context, another key, altered bytes, a key that would ignore the context),
//! authentication (token file, AppRole, Kubernetes, expiry and revocation), policies,
//! namespaces, the deletion lifecycle and its sweep, and the failures (sealed, killed,
//! black-holed, throttled, untrusted TLS).
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::openbao::{BaoServer, DEFAULT_KEY, MOUNT, sidecar_policy};
use fieldkey::kms::openbao::{OpenBaoAuth, OpenBaoKms, OpenBaoSettings};
use fieldkey::kms::{EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};

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
async fn approle_login_and_a_policy_that_allows_one_key() {
    let bao = BaoServer::start().await;
    bao.create_key("key-b", true, "aes256-gcm96").await.unwrap();
    let policy = format!(
        r#"
path "{MOUNT}/keys/{DEFAULT_KEY}" {{ capabilities = ["read"] }}
path "{MOUNT}/encrypt/{DEFAULT_KEY}" {{ capabilities = ["update"] }}
path "{MOUNT}/decrypt/{DEFAULT_KEY}" {{ capabilities = ["update"] }}
"#
    );
    let s = bao.approle("only-a", &policy, None).await.unwrap();
    let kms = connect(&s).await;
    kms.check().await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // Key B exists, but this identity may not use it.
    let root = bao.kms().await;
    let wrapped_b = root.generate_data_key("key-b", &c).await.unwrap().wrapped;
    assert!(matches!(
        kms.generate_data_key("key-b", &c).await,
        Err(KmsError::AccessDenied { .. })
    ));
    assert!(matches!(
        kms.unwrap("key-b", &wrapped_b, &c).await,
        Err(KmsError::AccessDenied { .. })
    ));
    // Nor delete the key it uses.
    assert!(matches!(
        kms.schedule_key_deletion(DEFAULT_KEY, 7).await,
        Err(KmsError::AccessDenied { .. }) | Err(KmsError::Misconfigured(_))
    ));
    assert_eq!(
        bao.key(DEFAULT_KEY).await.unwrap().unwrap()["soft_deleted"],
        false
    );
    // A wrong secret id is a configuration error at connect.
    let mut wrong = s.clone();
    if let OpenBaoAuth::AppRole { secret_id_file, .. } = &mut wrong.auth {
        *secret_id_file = bao.write_file("wrong-secret", "00000000-0000-0000-0000-000000000000");
    }
    let Err(KmsError::Misconfigured(msg)) = OpenBaoKms::connect(&wrong).await else {
        panic!("a wrong secret id connected");
    };
    assert!(msg.contains("refused the login"), "{msg}");
}

#[tokio::test]
async fn an_expired_login_token_is_replaced_and_calls_keep_working() {
    let bao = BaoServer::start().await;
    let s = bao
        .approle("short", &sidecar_policy("s1"), Some("2s"))
        .await
        .unwrap();
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let mut calls = 0;
    while Instant::now() < until {
        assert!(
            kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
                .await
                .unwrap()
                .ct_eq(&dk.secret)
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(calls >= 10);
}

#[tokio::test]
async fn a_revoked_login_token_is_replaced_after_the_server_refuses_it() {
    let bao = BaoServer::start().await;
    let s = bao
        .approle("long", &sidecar_policy("s1"), Some("1h"))
        .await
        .unwrap();
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    // Every token the AppRole ever issued is revoked: the next call is refused once,
    // the provider logs in again and the call succeeds.
    bao.api_ok("PUT", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await
        .unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // A token file is re-read when its token is refused (an agent renewed it).
    let tok = |j: serde_json::Value| j["auth"]["client_token"].as_str().unwrap().to_owned();
    let policy_body = serde_json::json!({ "policies": ["long"], "ttl": "1h" });
    let first = tok(bao
        .api_ok("POST", "auth/token/create", Some(policy_body.clone()))
        .await
        .unwrap());
    let file = bao.write_file("agent-token", &first);
    let mut ts = bao.settings();
    ts.auth = OpenBaoAuth::Token {
        token_file: Some(file.clone()),
    };
    let kms = connect(&ts).await;
    assert!(kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.is_ok());
    bao.api_ok(
        "POST",
        "auth/token/revoke",
        Some(serde_json::json!({ "token": first })),
    )
    .await
    .unwrap();
    let second = tok(bao
        .api_ok("POST", "auth/token/create", Some(policy_body))
        .await
        .unwrap());
    std::fs::write(&file, &second).unwrap();
    assert!(kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.is_ok());
}

#[tokio::test]
async fn a_wrong_token_is_access_denied_and_no_debug_shows_a_token() {
    let bao = BaoServer::start().await;
    let good = bao.kms().await;
    let c = ctx("t1", 1);
    let dk = good.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    let mut s = bao.settings();
    s.auth = OpenBaoAuth::Token {
        token_file: Some(bao.write_file("bad-token", "s.not-a-token\n")),
    };
    let kms = connect(&s).await;
    assert!(matches!(
        kms.check().await,
        Err(KmsError::AccessDenied { .. })
    ));
    assert!(matches!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await,
        Err(KmsError::AccessDenied { .. })
    ));
    // The root token never shows in a Debug of the settings, the provider or an error.
    let shown = format!(
        "{:?} {:?} {:?} {:?}",
        bao.settings(),
        good,
        good.unwrap("missing", &dk.wrapped, &c).await,
        kms.check().await
    );
    assert!(!shown.contains(&bao.root_token), "{shown}");
    assert!(!shown.contains("not-a-token"), "{shown}");
    // Nor does an AppRole's secret id (it is only ever in its file).
    let ar = bao
        .approle("dbg", &sidecar_policy("s1"), None)
        .await
        .unwrap();
    let OpenBaoAuth::AppRole { secret_id_file, .. } = &ar.auth else {
        panic!()
    };
    let secret = std::fs::read_to_string(secret_id_file).unwrap();
    let shown = format!("{ar:?} {:?}", connect(&ar).await);
    assert!(!shown.contains(secret.trim()), "{shown}");
}

#[tokio::test]
async fn the_namespace_header_is_sent() {
    let bao = BaoServer::start().await;
    bao.api_ok("POST", "sys/namespaces/team-a", None)
        .await
        .unwrap();
    let ns = Some("team-a");
    for (path, body) in [
        (
            format!("sys/mounts/{MOUNT}"),
            serde_json::json!({"type": "transit"}),
        ),
        (
            "sys/mounts/secret".to_owned(),
            serde_json::json!({"type": "kv", "options": {"version": "2"}}),
        ),
        (
            format!("{MOUNT}/keys/ns-key"),
            serde_json::json!({"derived": true}),
        ),
    ] {
        let (status, json) = bao.api_in(ns, "POST", &path, Some(body)).await.unwrap();
        assert!((200..300).contains(&status), "{path}: {status} {json}");
    }
    let mut s = bao.settings();
    s.key = "ns-key".into();
    s.namespace = Some("team-a".into());
    let kms = connect(&s).await;
    kms.check().await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key("ns-key", &c).await.unwrap();
    assert!(
        kms.unwrap("ns-key", &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // The deletion records live in the namespace too.
    kms.schedule_key_deletion("ns-key", 7).await.unwrap();
    assert!(matches!(
        kms.key_status("ns-key").await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(_)
        }
    ));
    kms.cancel_key_deletion("ns-key").await.unwrap();
    // Without the header the key is not found: it exists only in the namespace.
    s.namespace = None;
    let root_ns = connect(&s).await;
    assert!(matches!(
        root_ns.check().await,
        Err(KmsError::KeyNotFound { .. })
    ));
}

#[tokio::test]
async fn deletion_refuses_at_once_is_idempotent_cancellable_and_final() {
    let bao = BaoServer::start().await;
    let kms = connect(
        &bao.approle("sidecar", &sidecar_policy("s1"), None)
            .await
            .unwrap(),
    )
    .await;
    let id = kms.create_epoch_key(1, "s1").await.unwrap();
    assert!(id.starts_with("fieldkey-s1-epoch-1-"), "{id}");
    let cfg = bao.key(&id).await.unwrap().unwrap();
    assert_eq!(
        (cfg["derived"].clone(), cfg["type"].clone()),
        (true.into(), "aes256-gcm96".into())
    );
    // Never the same key twice, even for the same epoch.
    let id2 = kms.create_epoch_key(1, "s1").await.unwrap();
    assert_ne!(id, id2);
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);

    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(&id, &c).await.unwrap();
    let before = common::now_ms();
    let KeyDeletion::Scheduled {
        pending_window_days: 7,
        deletion_date_unix_ms: Some(date),
    } = kms.schedule_key_deletion(&id, 7).await.unwrap()
    else {
        panic!("not scheduled");
    };
    assert!((date - before - 7 * 86_400_000).abs() < 60_000, "{date}");
    // Refused at once, by every use.
    assert!(matches!(
        kms.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert!(matches!(
        kms.wrap(&id, &dk.secret, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert!(matches!(
        kms.generate_data_key(&id, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    // ... by another replica's provider too (it never saw the key before).
    let other = connect(&bao.settings()).await;
    assert!(matches!(
        other.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert_eq!(
        kms.key_status(&id).await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(date)
        }
    );
    assert_eq!(
        kms.schedule_key_deletion(&id, 7).await.unwrap(),
        KeyDeletion::AlreadyPending {
            deletion_date_unix_ms: Some(date)
        }
    );
    // Cancelled inside the window: usable again, no record left.
    kms.cancel_key_deletion(&id).await.unwrap();
    assert!(
        kms.unwrap(&id, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);
    assert!(bao.deletion_record(&id).await.unwrap().is_null());
    kms.cancel_key_deletion(&id).await.unwrap();

    // Window 0: deleted now.
    assert!(matches!(
        kms.schedule_key_deletion(&id, 0).await.unwrap(),
        KeyDeletion::Scheduled {
            pending_window_days: 0,
            ..
        }
    ));
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Deleted);
    assert!(bao.key(&id).await.unwrap().is_none());
    assert!(bao.deletion_record(&id).await.unwrap().is_null());
    assert!(matches!(
        kms.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.schedule_key_deletion(&id, 7).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.cancel_key_deletion(&id).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.schedule_key_deletion(&id2, 31).await,
        Err(KmsError::Misconfigured(_))
    ));
    assert_eq!(
        kms.key_status("no-such-key").await.unwrap(),
        KeyStatus::Deleted
    );
}

#[tokio::test]
async fn keys_past_their_window_are_deleted_by_whoever_looks_first() {
    let bao = BaoServer::start().await;
    // Under the least-privilege policy throughout: its KV rights must cover the sweep.
    let sidecar = bao
        .approle("sidecar", &sidecar_policy("s1"), None)
        .await
        .unwrap();
    let kms = connect(&sidecar).await;
    let c = ctx("t1", 1);
    let mut keys = Vec::new();
    for _ in 0..4 {
        let id = kms.create_epoch_key(2, "s1").await.unwrap();
        let wrapped = kms.generate_data_key(&id, &c).await.unwrap().wrapped;
        kms.schedule_key_deletion(&id, 7).await.unwrap();
        bao.backdate_deletion(&id).await.unwrap();
        keys.push((id, wrapped));
    }
    // A use of the key.
    let (a, wa) = &keys[0];
    assert!(matches!(
        kms.unwrap(a, wa, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(bao.key(a).await.unwrap().is_none());
    // Its state.
    assert_eq!(
        kms.key_status(&keys[1].0).await.unwrap(),
        KeyStatus::Deleted
    );
    assert!(bao.key(&keys[1].0).await.unwrap().is_none());
    // A late cancellation finds it gone.
    assert!(matches!(
        kms.cancel_key_deletion(&keys[2].0).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    // A provider that connects sweeps the rest.
    assert!(bao.key(&keys[3].0).await.unwrap().is_some());
    let _fresh = connect(&sidecar).await;
    assert!(bao.key(&keys[3].0).await.unwrap().is_none());
    for (id, _) in &keys {
        assert!(
            bao.deletion_record(id).await.unwrap().is_null(),
            "record of {id} left"
        );
    }

    // A record never destroys a key in use: one restored by hand outside fieldkey
    // loses its record at the sweep, and lives.
    let live = kms.create_epoch_key(3, "s1").await.unwrap();
    kms.schedule_key_deletion(&live, 7).await.unwrap();
    bao.backdate_deletion(&live).await.unwrap();
    bao.api_ok(
        "POST",
        &format!("{MOUNT}/keys/{live}/soft-delete-restore"),
        None,
    )
    .await
    .unwrap();
    let _fresh = connect(&sidecar).await;
    assert!(bao.key(&live).await.unwrap().is_some());
    assert!(bao.deletion_record(&live).await.unwrap().is_null());
    assert_eq!(kms.key_status(&live).await.unwrap(), KeyStatus::Enabled);

    // A key soft-deleted by hand has no date; scheduling gives it one.
    bao.api_ok("DELETE", &format!("{MOUNT}/keys/{live}/soft-delete"), None)
        .await
        .unwrap();
    assert_eq!(
        kms.key_status(&live).await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: None
        }
    );
    assert!(matches!(
        kms.schedule_key_deletion(&live, 3).await.unwrap(),
        KeyDeletion::Scheduled {
            pending_window_days: 3,
            deletion_date_unix_ms: Some(_)
        }
    ));
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

#[tokio::test]
async fn kubernetes_login_with_the_service_account_token() {
    use axum::routing::post;
    let bao = BaoServer::start().await;
    // Kubernetes cannot run here: its TokenReview endpoint is a stand-in that answers
    // as the API server does, authenticating exactly the JWT below.
    let claims = serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:apps:fieldkey",
        "kubernetes.io/serviceaccount/namespace": "apps",
        "kubernetes.io/serviceaccount/service-account.name": "fieldkey",
        "kubernetes.io/serviceaccount/service-account.uid": "uid-1",
    });
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let jwt = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes()),
        b64(&[7u8; 256])
    );
    let expected = jwt.clone();
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        post(move |body: axum::body::Bytes| {
            let expected = expected.clone();
            async move {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let ok = req["spec"]["token"] == serde_json::Value::String(expected);
                let review = serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "status": {
                        "authenticated": ok,
                        "user": { "username": "system:serviceaccount:apps:fieldkey", "uid": "uid-1" }
                    }
                });
                ([("content-type", "application/json")], review.to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let k8s = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    bao.api_ok(
        "POST",
        "sys/auth/kubernetes",
        Some(serde_json::json!({"type": "kubernetes"})),
    )
    .await
    .unwrap();
    bao.api_ok(
        "POST",
        "auth/kubernetes/config",
        Some(serde_json::json!({
            "kubernetes_host": k8s,
            "kubernetes_ca_cert": common::pki::ca("stand-in API server").pem,
            "disable_local_ca_jwt": true,
        })),
    )
    .await
    .unwrap();
    bao.api_ok(
        "PUT",
        "sys/policies/acl/sidecar",
        Some(serde_json::json!({ "policy": &sidecar_policy("s1") })),
    )
    .await
    .unwrap();
    bao.api_ok(
        "POST",
        "auth/kubernetes/role/fieldkey",
        Some(serde_json::json!({
            "bound_service_account_names": ["fieldkey"],
            "bound_service_account_namespaces": ["apps"],
            "token_policies": ["sidecar"],
        })),
    )
    .await
    .unwrap();
    let mut s = bao.settings();
    s.auth = OpenBaoAuth::Kubernetes {
        role: "fieldkey".into(),
        jwt_file: bao.write_file("sa-token", &jwt),
        mount: "kubernetes".into(),
    };
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // A token Kubernetes does not vouch for is refused at connect.
    let mut bad = s.clone();
    bad.auth = OpenBaoAuth::Kubernetes {
        role: "fieldkey".into(),
        jwt_file: bao.write_file("other-token", &format!("{}x", &jwt[..jwt.len() - 1])),
        mount: "kubernetes".into(),
    };
    assert!(matches!(
        OpenBaoKms::connect(&bad).await,
        Err(KmsError::Misconfigured(_))
    ));
}

/// A `MakeWriter` that appends every log line to a shared buffer.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn the_logs_show_no_token_secret_id_or_key() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let bao = BaoServer::start().await;
    let s = bao
        .approle("sidecar", &sidecar_policy("s1"), Some("2s"))
        .await
        .unwrap();
    let OpenBaoAuth::AppRole { secret_id_file, .. } = &s.auth else {
        panic!()
    };
    let secret_id = std::fs::read_to_string(secret_id_file).unwrap();
    let kms = connect(&s).await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY, &c).await.unwrap();
    kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.unwrap();
    // Refusals, a revoked token with its re-login, an expired token, a wrong token.
    let _ = kms.unwrap(DEFAULT_KEY, &dk.wrapped, &ctx("t2", 1)).await;
    let _ = kms.unwrap("missing", &dk.wrapped, &c).await;
    bao.api_ok("PUT", "sys/leases/revoke-prefix/auth/approle/login", None)
        .await
        .unwrap();
    kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    kms.unwrap(DEFAULT_KEY, &dk.wrapped, &c).await.unwrap();
    let id = kms.create_epoch_key(1, "s1").await.unwrap();
    kms.schedule_key_deletion(&id, 0).await.unwrap();
    let mut root = bao.settings();
    root.auth = OpenBaoAuth::Token {
        token_file: Some(bao.write_file("wrong", &format!("{}x", bao.root_token))),
    };
    let _ = connect(&root).await.check().await;
    drop(kms);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("OpenBao"),
        "nothing was logged: the test would prove nothing"
    );
    let key = dk.secret.expose();
    let b64 = base64::engine::general_purpose::STANDARD;
    for (what, secret) in [
        ("root token", bao.root_token.clone()),
        ("secret id", secret_id.trim().to_owned()),
        ("key (base64)", b64.encode(key)),
        ("key (hex)", hex::encode(key)),
        (
            "key (Debug)",
            format!("{:?}", &key[..8]).trim_end_matches(']').to_owned(),
        ),
    ] {
        assert!(!text.contains(&secret), "the logs show the {what}");
    }
}
