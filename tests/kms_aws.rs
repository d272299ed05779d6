//! The AWS KMS backend against moto_server (started by scripts/test.sh), with a
//! fault-injecting HTTP proxy in front of it for the failures moto cannot produce
//! (disabled key, pending deletion, access denied, throttling, slow and dead endpoints).
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use secrecy::SecretString;

use fieldkey::crypto::Aad;
use fieldkey::kms::aws::{AwsKms, AwsKmsConfig, StaticCredentials};
use fieldkey::kms::{EncryptionContext, Kms, KmsError};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::{Error, Keyring, KeyringConfig};

fn config(endpoint: &str, key_id: &str) -> AwsKmsConfig {
    let mut c = AwsKmsConfig::new(key_id);
    c.region = Some("eu-west-1".into());
    c.endpoint_url = Some(endpoint.to_owned());
    c.operation_timeout = Duration::from_secs(3);
    c.attempt_timeout = Duration::from_millis(800);
    c.connect_timeout = Duration::from_millis(500);
    c.max_attempts = 3;
    c.initial_backoff = Duration::from_millis(10);
    c.static_credentials = Some(StaticCredentials {
        access_key_id: "testing".into(),
        secret_access_key: SecretString::from("testing".to_owned()),
    });
    c
}

/// A fresh symmetric key in moto.
async fn moto_key() -> Result<String> {
    // Set-up, not under test: patient with a moto slowed by a parallel test run.
    let mut c = config(&common::moto_url(), "unused");
    c.operation_timeout = Duration::from_secs(30);
    c.attempt_timeout = Duration::from_secs(10);
    let kms = AwsKms::new(c).await?;
    let out = kms
        .client()
        .create_key()
        .description("fieldkey test")
        .send()
        .await?;
    Ok(out.key_metadata().unwrap().key_id().to_owned())
}

/// Review finding 5 (issue 19): CreateTenant took any `kms_key_id`, so a caller could put
/// a tenant on a KMS key fieldkey does not own (another team's, in the same account),
/// and ShredTenant would then schedule that key's deletion. Now a tenant names only the
/// default key or one `kms.tenant_keys` lists; the unrelated key is never touched.
#[tokio::test]
async fn a_tenant_cannot_be_put_on_a_kms_key_the_configuration_does_not_list() -> Result<()> {
    let (default, listed, unrelated) = (moto_key().await?, moto_key().await?, moto_key().await?);
    let kms = Arc::new(AwsKms::new(config(&common::moto_url(), &default)).await?);
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let k = Keyring::new(
        store,
        kms.clone(),
        KeyringConfig {
            tenant_kms_keys: Some(vec![listed.clone()]),
            ..KeyringConfig::default()
        },
    );
    let r = k.create_tenant("acme", Some(&unrelated)).await;
    assert!(
        matches!(&r, Err(Error::KmsKeyNotAllowed { key }) if *key == unrelated),
        "{r:?}"
    );
    assert_eq!(
        k.create_tenant("acme", Some(&listed)).await?.kms_key_id,
        listed
    );
    k.create_tenant("globex", None).await?;
    let r = k.rewrap_kms_key("globex", &unrelated).await;
    assert!(matches!(r, Err(Error::KmsKeyNotAllowed { .. })), "{r:?}");
    // Back onto the default key is always allowed.
    k.rewrap_kms_key("acme", &default).await?;
    let state = kms
        .client()
        .describe_key()
        .key_id(&unrelated)
        .send()
        .await?
        .key_metadata()
        .and_then(|m| m.key_state().cloned());
    assert_eq!(state, Some(aws_sdk_kms::types::KeyState::Enabled));
    Ok(())
}

#[tokio::test]
async fn generate_and_unwrap_round_trip_with_encryption_context() -> Result<()> {
    let key_id = moto_key().await?;
    let kms = AwsKms::new(config(&common::moto_url(), &key_id)).await?;
    kms.check().await?;
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let dk = kms.generate_data_key(&key_id, &ctx).await?;
    assert!(
        kms.unwrap(&key_id, &dk.wrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    // wrap of an existing key (KEK rotation) round-trips too
    let rewrapped = kms.wrap(&key_id, &dk.secret, &ctx).await?;
    assert!(
        kms.unwrap(&key_id, &rewrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    Ok(())
}

#[tokio::test]
async fn wrong_encryption_context_fails_to_unwrap() -> Result<()> {
    let key_id = moto_key().await?;
    let kms = AwsKms::new(config(&common::moto_url(), &key_id)).await?;
    let dk = kms
        .generate_data_key(&key_id, &EncryptionContext::tenant_key("acme", 1))
        .await?;
    for wrong in [
        EncryptionContext::tenant_key("acme", 2),
        EncryptionContext::tenant_key("evil", 1),
    ] {
        let r = kms.unwrap(&key_id, &dk.wrapped, &wrong).await;
        assert!(matches!(r, Err(KmsError::InvalidCiphertext)), "{r:?}");
    }
    Ok(())
}

#[tokio::test]
async fn keyring_over_aws_kms_with_bring_your_own_key_per_tenant() -> Result<()> {
    let default_key = moto_key().await?;
    let byok = moto_key().await?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let kms = Arc::new(AwsKms::new(config(&common::moto_url(), &default_key)).await?);
    let k = Keyring::new(store, kms, KeyringConfig::default());
    assert_eq!(
        k.create_tenant("plain", None).await?.kms_key_id,
        default_key
    );
    let info = k.create_tenant("byok", Some(&byok)).await?;
    assert_eq!(info.kms_key_id, byok);
    assert_eq!(info.versions[0].kms_key_id, byok);
    let rotated = k.rotate_tenant("byok").await?;
    assert_eq!(
        rotated.versions[1].kms_key_id, byok,
        "rotation stays on the tenant's own key"
    );
    let a = Aad {
        tenant: "byok",
        subject: Some("u1"),
        field: "email",
        context: b"",
    };
    let env = k.encrypt(&a, b"hello").await?;
    assert_eq!(&*k.decrypt(&a, &env).await?, b"hello");
    Ok(())
}

/// KEK rotation: every stored version moves to a new KMS key without touching data; an
/// interrupted run resumes; after it the old KMS key can be disabled.
#[tokio::test]
async fn kms_key_rotation_rewraps_every_version_and_frees_the_old_key() -> Result<()> {
    let old_key = moto_key().await?;
    let new_key = moto_key().await?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let kms = Arc::new(AwsKms::new(config(&common::moto_url(), &old_key)).await?);
    let k = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    k.create_tenant("acme", None).await?;
    let a = Aad {
        tenant: "acme",
        subject: Some("u1"),
        field: "email",
        context: b"row-1",
    };
    let v1 = k.encrypt(&a, b"one").await?;
    k.rotate_tenant("acme").await?;
    let v2 = k.encrypt(&a, b"two").await?;
    k.rotate_tenant("acme").await?;
    k.destroy_key_version("acme", 3).await?;
    let before = k.tenant("acme").await?;

    // an earlier run was interrupted after moving version 1 only
    let rec = store.get_tenant("acme").await?.unwrap();
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let key = kms
        .unwrap(&old_key, rec.versions[0].wrapped.as_ref().unwrap(), &ctx)
        .await?;
    let moved = kms.wrap(&new_key, &key, &ctx).await?;
    assert!(
        store
            .rewrap_key_version("acme", 1, &old_key, &new_key, &moved)
            .await?
    );

    let out = k.rewrap_kms_key("acme", &new_key).await?;
    assert_eq!(
        (out.rewrapped, out.already, out.without_material),
        (1, 1, 1)
    );
    let again = k.rewrap_kms_key("acme", &new_key).await?;
    assert_eq!((again.rewrapped, again.already), (0, 2), "idempotent");
    let after = k.tenant("acme").await?;
    assert_eq!(after.kms_key_id, new_key);
    for (b, a) in before.versions.iter().zip(&after.versions) {
        assert_eq!(b.fingerprint, a.fingerprint, "versions keep their identity");
        assert_eq!(b.state, a.state);
        if a.state != fieldkey::store::KeyState::Destroyed {
            assert_eq!(a.kms_key_id, new_key);
        }
    }

    // with every cached key dropped, the data decrypts through the new KMS key
    let fresh = Keyring::new(store, kms, KeyringConfig::default());
    assert_eq!(&*fresh.decrypt(&a, &v1).await?, b"one");
    assert_eq!(&*fresh.decrypt(&a, &v2).await?, b"two");
    let rotated = fresh.rotate_tenant("acme").await?;
    assert_eq!(
        rotated.versions[3].kms_key_id, new_key,
        "new versions use the new key"
    );
    // a KMS key the sidecar cannot use is refused before anything is replaced
    let missing = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let r = fresh.rewrap_kms_key("acme", missing).await;
    assert!(matches!(r, Err(Error::Kms(_))), "{r:?}");
    assert!(
        fresh
            .tenant("acme")
            .await?
            .versions
            .iter()
            .all(|v| v.kms_key_id == new_key || v.state == fieldkey::store::KeyState::Destroyed),
        "a failed rewrap leaves every version where it was"
    );
    Ok(())
}

// ------------------------------------------------------------------ fault proxy

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Forward to moto.
    Pass,
    /// Answer with this AWS error code (HTTP 400, JSON 1.1 error body).
    Error(&'static str),
    /// Answer `ThrottlingException` to the first N requests, then forward.
    ThrottleFirst(usize),
    /// Hold every request this long, then forward.
    Delay(Duration),
}

struct FaultProxy {
    url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: std::net::SocketAddr,
) -> Result<Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        Full::new(body.collect().await?.to_bytes()),
    ))
}

fn aws_error(code: &str) -> Response<Full<Bytes>> {
    let body = format!(r#"{{"__type":"{code}","message":"injected by fieldkey test proxy"}}"#);
    Response::builder()
        .status(400)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", "00000000-0000-0000-0000-000000000000")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn fault_proxy(fault: Fault) -> Result<FaultProxy> {
    let upstream = common::socket_addr_of(&common::moto_url())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let resp = match fault {
                            Fault::Pass => forward(req, upstream).await,
                            Fault::Error(code) => Ok(aws_error(code)),
                            Fault::ThrottleFirst(k) if n < k => {
                                Ok(aws_error("ThrottlingException"))
                            }
                            Fault::ThrottleFirst(_) => forward(req, upstream).await,
                            Fault::Delay(d) => {
                                tokio::time::sleep(d).await;
                                forward(req, upstream).await
                            }
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_else(|_| {
                            Response::builder()
                                .status(502)
                                .body(Full::new(Bytes::new()))
                                .unwrap()
                        }))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(FaultProxy {
        url,
        requests,
        task,
    })
}

async fn kms_through(fault: Fault) -> Result<(AwsKms, String, FaultProxy)> {
    let key_id = moto_key().await?;
    let proxy = fault_proxy(fault).await?;
    let kms = AwsKms::new(config(&proxy.url, &key_id)).await?;
    Ok((kms, key_id, proxy))
}

#[tokio::test]
async fn the_proxy_passes_real_traffic_through() -> Result<()> {
    let (kms, key_id, proxy) = kms_through(Fault::Pass).await?;
    let ctx = EncryptionContext::tenant_key("t", 1);
    let dk = kms.generate_data_key(&key_id, &ctx).await?;
    assert!(
        kms.unwrap(&key_id, &dk.wrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    assert_eq!(proxy.requests.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn each_kms_fault_becomes_its_own_error() -> Result<()> {
    let ctx = EncryptionContext::tenant_key("t", 1);
    for (code, check) in [
        (
            "DisabledException",
            (|e: &KmsError| matches!(e, KmsError::KeyDisabled { .. })) as fn(&KmsError) -> bool,
        ),
        ("KMSInvalidStateException", |e| {
            matches!(e, KmsError::KeyInvalidState { .. })
        }),
        ("AccessDeniedException", |e| {
            matches!(e, KmsError::AccessDenied { .. })
        }),
        ("NotFoundException", |e| {
            matches!(e, KmsError::KeyNotFound { .. })
        }),
        ("InvalidCiphertextException", |e| {
            matches!(e, KmsError::InvalidCiphertext)
        }),
        ("KMSInternalException", |e| {
            matches!(e, KmsError::Unavailable(_))
        }),
    ] {
        let (kms, key_id, _proxy) = kms_through(Fault::Error(code)).await?;
        let err = kms.generate_data_key(&key_id, &ctx).await.unwrap_err();
        assert!(check(&err), "{code} became {err:?}");
        assert!(!err.to_string().is_empty());
    }
    Ok(())
}

#[tokio::test]
async fn throttling_is_retried_with_backoff_then_succeeds() -> Result<()> {
    let (kms, key_id, proxy) = kms_through(Fault::ThrottleFirst(2)).await?;
    let started = std::time::Instant::now();
    kms.generate_data_key(&key_id, &EncryptionContext::tenant_key("t", 1))
        .await?;
    assert_eq!(
        proxy.requests.load(Ordering::SeqCst),
        3,
        "two throttled attempts, then success"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(10),
        "backed off between attempts"
    );
    Ok(())
}

#[tokio::test]
async fn persistent_throttling_gives_throttled_after_max_attempts() -> Result<()> {
    let (kms, key_id, proxy) = kms_through(Fault::ThrottleFirst(usize::MAX)).await?;
    let r = kms
        .generate_data_key(&key_id, &EncryptionContext::tenant_key("t", 1))
        .await;
    assert!(matches!(r, Err(KmsError::Throttled)), "{r:?}");
    assert_eq!(proxy.requests.load(Ordering::SeqCst), 3, "max_attempts = 3");
    Ok(())
}

#[tokio::test]
async fn slow_endpoint_past_the_deadline_times_out() -> Result<()> {
    let (kms, key_id, _proxy) = kms_through(Fault::Delay(Duration::from_secs(10))).await?;
    let started = std::time::Instant::now();
    let r = kms
        .generate_data_key(&key_id, &EncryptionContext::tenant_key("t", 1))
        .await;
    assert!(matches!(r, Err(KmsError::Timeout)), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "deadline honoured: {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn dead_endpoint_is_unavailable() -> Result<()> {
    // bind then drop a listener: nothing listens on that port any more
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?
        .port();
    let kms = AwsKms::new(config(&format!("http://127.0.0.1:{port}"), "k")).await?;
    let r = kms
        .generate_data_key("k", &EncryptionContext::tenant_key("t", 1))
        .await;
    assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_serving_while_the_kms_is_down() -> Result<()> {
    let key_id = moto_key().await?;
    let proxy =
        common::proxy::TcpProxy::start(common::socket_addr_of(&common::moto_url())?).await?;
    let kms =
        Arc::new(AwsKms::new(config(&format!("http://127.0.0.1:{}", proxy.port), &key_id)).await?);
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let k = Keyring::new(store, kms, KeyringConfig::default());
    k.create_tenant("acme", None).await?;
    k.create_tenant("cold", None).await?;
    let a = Aad {
        tenant: "acme",
        subject: Some("u1"),
        field: "email",
        context: b"",
    };
    let env = k.encrypt(&a, b"before outage").await?;
    proxy.stop().await; // the KMS endpoint is gone
    assert_eq!(&*k.decrypt(&a, &env).await?, b"before outage");
    let env2 = k.encrypt(&a, b"during outage").await?;
    assert_eq!(&*k.decrypt(&a, &env2).await?, b"during outage");
    // a tenant whose key is not cached cannot be served, with a clear KMS error
    let r = k
        .encrypt(
            &Aad {
                tenant: "cold",
                subject: None,
                field: "f",
                context: b"",
            },
            b"x",
        )
        .await;
    assert!(
        matches!(r, Err(Error::Kms(KmsError::Unavailable(_)))),
        "{r:?}"
    );
    Ok(())
}

/// Erasing a tenant that has its own KMS key schedules that key's deletion (7 days),
/// once; a key another live tenant still uses (named by id or by ARN) is kept, and the
/// default key (which also wraps the receipt signing key) is never scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_erasure_schedules_deletion_of_its_own_kms_key_only() -> Result<()> {
    use aws_sdk_kms::types::KeyState as AwsKeyState;
    use fieldkey::erasure::receipt::{self, KmsKeyDeletion};
    use fieldkey::erasure::{Actor, ErasureConfig};
    use fieldkey::store::{ErasureLedger, ErasureState};

    let default_key = moto_key().await?;
    let own = moto_key().await?;
    let shared = moto_key().await?;
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let ledger = Arc::new(ErasureLedger::open_sqlite(&dir.path().join("ledger.db")).await?);
    let kms = Arc::new(AwsKms::new(config(&common::moto_url(), &default_key)).await?);
    let keyring = Arc::new(
        Keyring::new(store.clone(), kms.clone(), KeyringConfig::default()).with_ledger(ledger),
    );
    let parts = fieldkey::wiring::Parts::new(keyring.clone(), store.clone(), kms.clone());
    let erasures = parts.erasures(ErasureConfig {
        kms_key_deletion_days: 7,
        executor: "kms-test".into(),
        ..ErasureConfig::default()
    });
    let actor = Actor {
        id: "spiffe://example.org/dpo".into(),
        ip: None,
    };
    let describe = |key: String| {
        let kms = kms.clone();
        async move {
            let out = kms.client().describe_key().key_id(key).send().await?;
            let m = out.key_metadata().unwrap();
            Ok::<_, anyhow::Error>((m.key_state().cloned().unwrap(), m.arn().unwrap().to_owned()))
        }
    };
    let (_, shared_arn) = describe(shared.clone()).await?;
    let (_, default_arn) = describe(default_key.clone()).await?;
    let aad = |tenant| Aad {
        tenant,
        subject: Some("u1"),
        field: "email",
        context: b"",
    };

    keyring.create_tenant("byok", Some(&own)).await?;
    keyring.rotate_tenant("byok").await?;
    let c_byok = keyring.encrypt(&aad("byok"), b"byok data").await?;
    // The same key, by ARN and by id. (By ARN only for the tenant whose erasure keeps
    // it: moto's ScheduleKeyDeletion does not accept an ARN, unlike AWS.)
    keyring.create_tenant("b", Some(&shared_arn)).await?;
    keyring.create_tenant("c", Some(&shared)).await?;
    let c_c = keyring.encrypt(&aad("c"), b"c data").await?;
    keyring.create_tenant("plain", None).await?;
    keyring
        .create_tenant("plain-arn", Some(&default_arn))
        .await?;

    // The tenant's own key: scheduled for deletion.
    let started = fieldkey::store::now_ms();
    let rec = erasures
        .request(&actor, "byok", None, Duration::ZERO)
        .await?;
    assert_eq!(rec.state, ErasureState::Completed);
    let (_, vk) = erasures.public_key().await?;
    let r = receipt::verify(rec.receipt.as_deref().unwrap().as_bytes(), &vk)?;
    assert_eq!(r.destroyed.len(), 2);
    let del = r.kms_key_deletion.clone().expect("a KMS key deletion");
    // Named by the KMS's canonical name (the ARN), not the alias or id stored.
    assert!(del.kms_key_id.ends_with(&own), "{}", del.kms_key_id);
    assert_eq!(del.status, receipt::KMS_SCHEDULED);
    assert_eq!(del.pending_window_days, Some(7));
    if let Some(when) = del.deletion_date_unix_ms {
        let week = 7 * 86_400_000;
        assert!(
            (started + week - 86_400_000..=fieldkey::store::now_ms() + week + 86_400_000)
                .contains(&when),
            "deletion date {when} is about 7 days away"
        );
    }
    assert_eq!(describe(own.clone()).await?.0, AwsKeyState::PendingDeletion);
    let d = keyring.decrypt(&aad("byok"), &c_byok).await;
    assert!(matches!(d, Err(Error::KeyDestroyed { .. })), "{d:?}");

    // Executing (or requesting) it again is harmless: same record, same receipt.
    let again = erasures.execute(&rec.erasure_id).await?;
    assert_eq!(again.state, ErasureState::Completed);
    assert_eq!(again.receipt, rec.receipt);
    assert_eq!(again.attempts, rec.attempts);
    let again = erasures
        .request(&actor, "byok", None, Duration::ZERO)
        .await?;
    assert_eq!(again.erasure_id, rec.erasure_id);
    assert_eq!(again.receipt, rec.receipt);
    assert_eq!(describe(own.clone()).await?.0, AwsKeyState::PendingDeletion);

    // A key another live tenant still uses (there by id, here by ARN): kept.
    let rb = erasures.request(&actor, "b", None, Duration::ZERO).await?;
    let r = receipt::verify(rb.receipt.as_deref().unwrap().as_bytes(), &vk)?;
    assert_eq!(
        r.kms_key_deletion,
        Some(KmsKeyDeletion {
            kms_key_id: shared_arn.clone(),
            status: receipt::KMS_KEPT_SHARED.into(),
            pending_window_days: None,
            deletion_date_unix_ms: None,
        })
    );
    assert_eq!(describe(shared.clone()).await?.0, AwsKeyState::Enabled);
    assert_eq!(&*keyring.decrypt(&aad("c"), &c_c).await?, b"c data");

    // The default key, by id or by ARN: never scheduled.
    for tenant in ["plain", "plain-arn"] {
        let rp = erasures
            .request(&actor, tenant, None, Duration::ZERO)
            .await?;
        assert_eq!(rp.state, ErasureState::Completed);
        let r = receipt::verify(rp.receipt.as_deref().unwrap().as_bytes(), &vk)?;
        assert_eq!(r.kms_key_deletion, None, "{tenant}");
    }
    assert_eq!(describe(default_key.clone()).await?.0, AwsKeyState::Enabled);
    // ... and the last tenant on the shared key goes: now it is scheduled.
    let rc = erasures.request(&actor, "c", None, Duration::ZERO).await?;
    let r = receipt::verify(rc.receipt.as_deref().unwrap().as_bytes(), &vk)?;
    let del = r.kms_key_deletion.expect("a KMS key deletion");
    assert_eq!(
        (del.kms_key_id.as_str(), del.status.as_str()),
        (shared_arn.as_str(), receipt::KMS_SCHEDULED)
    );
    assert_eq!(describe(shared).await?.0, AwsKeyState::PendingDeletion);
    // The receipt signing key still unwraps (it is wrapped by the default key): a new
    // process signs with it.
    let fresh = parts.erasures(ErasureConfig::default());
    keyring.create_tenant("later", None).await?;
    let rl = fresh
        .request(&actor, "later", Some("u1"), Duration::ZERO)
        .await?;
    assert_eq!(rl.state, ErasureState::Completed);
    receipt::verify(rl.receipt.as_deref().unwrap().as_bytes(), &vk)?;
    Ok(())
}
