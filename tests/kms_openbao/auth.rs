//! Authentication: AppRole with a policy, token expiry and revocation, token files,
//! a wrong token, Kubernetes login, and what Debug and the logs never show.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::common;
use super::common::openbao::{BaoServer, DEFAULT_KEY, MOUNT, sidecar_policy};
use super::{connect, ctx};
use fieldkey::kms::openbao::{OpenBaoAuth, OpenBaoKms};
use fieldkey::kms::{Kms, KmsError};

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
