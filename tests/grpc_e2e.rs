//! End-to-end over real sockets: an in-process server on loopback TCP (and a Unix
//! socket), generated clients, real SQLite / PostgreSQL stores and the local KMS.

mod common;

use common::grpc::{as_id, create_tenant, ids, reason};

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use common::sidecar::InProcess;
use fieldkey::config::Limits;
use fieldkey::kms::Kms;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{
    self, CiphertextFormat, CreateTenantRequest, DecryptBatchRequest, DecryptRequest,
    EncryptBatchRequest, EncryptRequest, GetTenantRequest, RotateTenantKeyRequest, decrypt_result,
    encrypt_result,
};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::wiring::Parts;
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;

/// The sidecar in process on `store` and `kms`, with default limits.
async fn start(store: Arc<dyn KeyStore>, kms: Arc<dyn Kms>) -> Result<InProcess> {
    start_with(store, kms, Limits::default()).await
}

/// The sidecar in process on `store` and `kms`, with `limits`.
async fn start_with(
    store: Arc<dyn KeyStore>,
    kms: Arc<dyn Kms>,
    limits: Limits,
) -> Result<InProcess> {
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    InProcess::start(
        Parts::new(keyring, store, kms)
            .context()
            .with_limits(limits),
    )
    .await
}

fn enc(tenant: &str, subject: &str, field: &str, ctx: &[u8], pt: &[u8]) -> EncryptRequest {
    EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        field: field.into(),
        context: ctx.to_vec().into(),
        plaintext: pt.to_vec().into(),
        format: CiphertextFormat::Binary as i32,
    }
}

fn dec(tenant: &str, subject: &str, field: &str, ctx: &[u8], ct: &[u8]) -> DecryptRequest {
    DecryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        field: field.into(),
        context: ctx.to_vec().into(),
        ciphertext: ct.to_vec().into(),
        repair: false,
    }
}

async fn sqlite_server(dir: &tempfile::TempDir) -> Result<InProcess> {
    let store: Arc<dyn KeyStore> =
        Arc::new(SqlStore::open_sqlite(&dir.path().join("keys.db")).await?);
    start(store, common::local_kms(dir)?).await
}

#[tokio::test]
async fn encrypt_decrypt_round_trip_over_tcp_in_both_forms() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    create_tenant(&ch, "acme").await?;
    let mut c = CryptoClient::new(ch);
    for format in [CiphertextFormat::Binary, CiphertextFormat::Text] {
        let mut req = enc("acme", "user-1", "email", b"row:1", b"alice@example.com");
        req.format = format as i32;
        let out = c.encrypt(req).await?.into_inner();
        assert_eq!(out.key_version, 1);
        if format == CiphertextFormat::Text {
            assert!(out.ciphertext.starts_with(b"fk1:"));
        }
        let back = c
            .decrypt(dec("acme", "user-1", "email", b"row:1", &out.ciphertext))
            .await?
            .into_inner();
        assert_eq!(&back.plaintext[..], b"alice@example.com");
        assert_eq!(back.key_version, 1);
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn batch_with_a_bad_item_fails_only_that_item() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    create_tenant(&ch, "acme").await?;
    let mut c = CryptoClient::new(ch);
    let items = vec![
        enc("acme", "", "a", b"", b"one"),
        enc("ghost", "", "a", b"", b"two"),
        enc("acme", "", "bad field", b"", b"three"),
        enc("acme", "u", "a", b"", b"four"),
    ];
    let results = c
        .encrypt_batch(EncryptBatchRequest { items })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 4);
    let oks: Vec<_> = results
        .iter()
        .map(|r| match r.result.as_ref().unwrap() {
            encrypt_result::Result::Ok(ok) => Some(ok.ciphertext.clone()),
            encrypt_result::Result::Error(e) => {
                assert!(
                    e.code == Code::NotFound as i32 || e.code == Code::InvalidArgument as i32,
                    "{e:?}"
                );
                None
            }
        })
        .collect();
    assert!(oks[0].is_some() && oks[1].is_none() && oks[2].is_none() && oks[3].is_some());
    let decs = vec![
        dec("acme", "", "a", b"", oks[0].as_ref().unwrap()),
        dec("acme", "", "a", b"", b"garbage"),
        dec("acme", "u", "a", b"", oks[3].as_ref().unwrap()),
    ];
    let results = c
        .decrypt_batch(DecryptBatchRequest { items: decs })
        .await?
        .into_inner()
        .results;
    match results[1].result.as_ref().unwrap() {
        decrypt_result::Result::Error(e) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.reason, "MALFORMED_CIPHERTEXT");
        }
        other => panic!("{other:?}"),
    }
    for (i, want) in [(0, &b"one"[..]), (2, &b"four"[..])] {
        match results[i].result.as_ref().unwrap() {
            decrypt_result::Result::Ok(ok) => assert_eq!(ok.plaintext, want),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn another_tenant_cannot_decrypt_and_gets_its_own_status() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    let mut keys = KeysClient::new(ch.clone());
    for t in ["tenant-a", "tenant-b"] {
        keys.create_tenant(as_id(
            ids::OPS,
            CreateTenantRequest {
                tenant_id: t.into(),
                kms_key_id: String::new(),
            },
        ))
        .await?;
    }
    let mut c = CryptoClient::new(ch);
    let ct = c
        .encrypt(enc("tenant-a", "", "ssn", b"", b"078-05-1120"))
        .await?
        .into_inner()
        .ciphertext;
    let err = c
        .decrypt(dec("tenant-b", "", "ssn", b"", &ct))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert_eq!(reason(&err), "AUTHENTICATION_FAILED");
    assert!(!err.message().contains("078-05"));
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn errors_have_specific_statuses_and_no_secrets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    let mut keys = KeysClient::new(ch.clone());
    keys.create_tenant(as_id(
        ids::OPS,
        CreateTenantRequest {
            tenant_id: "acme".into(),
            kms_key_id: String::new(),
        },
    ))
    .await?;
    let mut c = CryptoClient::new(ch);
    let subj_ct = c
        .encrypt(enc(
            "acme",
            "jane@example.com",
            "f",
            b"",
            b"PLAINTEXT-SECRET",
        ))
        .await?
        .into_inner()
        .ciphertext;
    let cases: Vec<(tonic::Status, Code, &str)> = vec![
        (
            c.encrypt(enc("ghost", "", "f", b"", b"x"))
                .await
                .unwrap_err(),
            Code::NotFound,
            "TENANT_NOT_FOUND",
        ),
        (
            c.encrypt(enc("acme", "", "", b"", b"x")).await.unwrap_err(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            c.decrypt(dec("acme", "", "f", b"", b"not an envelope"))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "MALFORMED_CIPHERTEXT",
        ),
        (
            c.decrypt(dec("acme", "", "f", b"", &subj_ct))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "SCOPE_MISMATCH",
        ),
        (
            c.decrypt(dec("acme", "nobody", "f", b"", &subj_ct))
                .await
                .unwrap_err(),
            Code::NotFound,
            "SUBJECT_NOT_FOUND",
        ),
        (
            keys.get_tenant(as_id(
                ids::OPS,
                GetTenantRequest {
                    tenant_id: "ghost".into(),
                },
            ))
            .await
            .unwrap_err(),
            Code::NotFound,
            "TENANT_NOT_FOUND",
        ),
    ];
    for (status, code, why) in cases {
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(reason(&status), why);
        assert!(
            !status.message().contains("PLAINTEXT-SECRET") && !status.message().contains("jane@"),
            "{status:?}"
        );
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn keys_service_creates_shows_and_rotates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    let mut keys = KeysClient::new(ch.clone());
    let t = keys
        .create_tenant(as_id(
            ids::OPS,
            CreateTenantRequest {
                tenant_id: "acme".into(),
                kms_key_id: String::new(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!((t.active_version, t.versions.len()), (1, 1));
    assert!(t.versions[0].fingerprint.starts_with("sha256:"));
    let r = keys
        .rotate_tenant_key(as_id(
            ids::OPS,
            RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(r.active_version, 2);
    assert_eq!(r.versions[0].state, pb::KeyState::DecryptOnly as i32);
    let g = keys
        .get_tenant(as_id(
            ids::OPS,
            GetTenantRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(g, r);
    let out = CryptoClient::new(ch)
        .encrypt(enc("acme", "", "f", b"", b"x"))
        .await?
        .into_inner();
    assert_eq!(out.key_version, 2, "new writes use the new version at once");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn health_reports_serving_for_both_services() -> Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let mut h = HealthClient::new(server.channel().await?);
    for svc in ["fieldkey.v1.Crypto", "fieldkey.v1.Keys"] {
        let r = h
            .check(HealthCheckRequest {
                service: svc.into(),
            })
            .await?
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{svc}");
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn reflection_lists_the_services() -> Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let mut r = ServerReflectionClient::new(server.channel().await?);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = stream.message().await?.unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "fieldkey.v1.Crypto",
        "fieldkey.v1.Keys",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn unix_socket_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> =
        Arc::new(SqlStore::open_sqlite(&dir.path().join("keys.db")).await?);
    let kms: Arc<dyn Kms> = common::local_kms(&dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    keyring.create_tenant("acme", None).await?;
    let routes =
        fieldkey::service::routes(Parts::new(keyring.clone(), store, kms).context()).await?;
    let path = dir.path().join("fieldkey.sock");
    let listener = fieldkey::transport::bind_unix(&path)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(fieldkey::transport::serve_unix(routes, listener, async {
        let _ = rx.await;
    }));
    let p = path.clone();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await?;
    let mut c = CryptoClient::new(channel);
    let ct = c
        .encrypt(enc("acme", "", "f", b"", b"over a unix socket"))
        .await?
        .into_inner()
        .ciphertext;
    let pt = c
        .decrypt(dec("acme", "", "f", b"", &ct))
        .await?
        .into_inner()
        .plaintext;
    assert_eq!(&pt[..], b"over a unix socket");
    let _ = tx.send(());
    task.await??;
    assert!(Path::new(&path).exists());
    Ok(())
}

async fn restart_round_trip(
    store_a: Arc<dyn KeyStore>,
    store_b: Arc<dyn KeyStore>,
    kms_dir: &tempfile::TempDir,
) -> Result<()> {
    let server = start(store_a, common::local_kms(kms_dir)?).await?;
    let ch = server.channel().await?;
    create_tenant(&ch, "acme").await?;
    let ct = CryptoClient::new(ch)
        .encrypt(enc("acme", "user-9", "email", b"r", b"persisted"))
        .await?
        .into_inner()
        .ciphertext;
    server.stop().await;
    let server = start(store_b, common::local_kms(kms_dir)?).await?;
    let pt = CryptoClient::new(server.channel().await?)
        .decrypt(dec("acme", "user-9", "email", b"r", &ct))
        .await?
        .into_inner()
        .plaintext;
    assert_eq!(&pt[..], b"persisted");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn decrypt_after_restart_with_sqlite_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    let a: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&path).await?);
    let b_path = path.clone();
    let b: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&b_path).await?);
    restart_round_trip(a, b, &dir).await
}

#[tokio::test]
async fn decrypt_after_restart_with_postgres_store() -> Result<()> {
    let db = common::PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    let a: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
    let b: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
    restart_round_trip(a, b, &dir).await?;
    db.drop_db().await
}

// ------------------------------------------------------------------ limits

/// A server on a cold cache whose KMS answers unwraps after `kms_delay_ms`, and that
/// KMS (its `unwraps` count a call as soon as it reaches the KMS).
#[tokio::test]
async fn rewrap_rotation_retirement_and_jobs_over_grpc() -> Result<()> {
    use fieldkey::proto::pb::jobs_client::JobsClient;
    let dir = tempfile::tempdir()?;
    let server = sqlite_server(&dir).await?;
    let ch = server.channel().await?;
    let mut keys = KeysClient::new(ch.clone());
    let mut crypto = CryptoClient::new(ch.clone());
    keys.create_tenant(as_id(
        ids::OPS,
        CreateTenantRequest {
            tenant_id: "acme".into(),
            kms_key_id: String::new(),
        },
    ))
    .await?;
    let mut text_req = enc("acme", "u1", "email", b"r1", b"hello");
    text_req.format = CiphertextFormat::Text as i32;
    let text = crypto.encrypt(text_req).await?.into_inner().ciphertext;
    let bin = crypto
        .encrypt(enc("acme", "", "name", b"r1", b"Ada"))
        .await?
        .into_inner()
        .ciphertext;
    let rw = |subject: &str, field: &str, ct: &[u8]| pb::RewrapRequest {
        tenant_id: "acme".into(),
        subject_id: subject.into(),
        field: field.into(),
        context: b"r1".to_vec(),
        ciphertext: ct.to_vec(),
        verify: false,
    };
    let same = crypto.rewrap(rw("u1", "email", &text)).await?.into_inner();
    assert!(!same.changed && same.ciphertext == text && same.key_version == 1);
    keys.rotate_tenant_key(as_id(
        ids::OPS,
        RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        },
    ))
    .await?;
    let moved = crypto.rewrap(rw("u1", "email", &text)).await?.into_inner();
    assert!(moved.changed);
    assert_eq!((moved.previous_key_version, moved.key_version), (1, 2));
    assert!(moved.ciphertext.starts_with(b"fk1:"), "text stays text");
    let back = crypto
        .decrypt(dec("acme", "u1", "email", b"r1", &moved.ciphertext))
        .await?
        .into_inner();
    assert_eq!((&back.plaintext[..], back.key_version), (&b"hello"[..], 2));
    let batch = crypto
        .rewrap_batch(pb::RewrapBatchRequest {
            items: vec![
                rw("", "name", &bin),
                rw("", "name", b"garbage"),
                rw("u2", "email", &text),
            ],
        })
        .await?
        .into_inner()
        .results;
    match &batch[0].result {
        Some(pb::rewrap_result::Result::Ok(ok)) => assert!(ok.changed && ok.key_version == 2),
        other => panic!("{other:?}"),
    }
    // u2 never had a key: rewrapping u1's value for u2 fails without creating one
    for (i, want) in [(1, "MALFORMED_CIPHERTEXT"), (2, "SUBJECT_NOT_FOUND")] {
        match &batch[i].result {
            Some(pb::rewrap_result::Result::Error(e)) => assert_eq!(e.reason, want),
            other => panic!("{other:?}"),
        }
    }
    let tenants = keys
        .list_tenants(as_id(ids::OPS, pb::ListTenantsRequest {}))
        .await?
        .into_inner();
    assert_eq!(tenants.tenant_ids, vec!["acme"]);
    let check = keys
        .check_rotation(as_id(ids::OPS, pb::CheckRotationRequest { dry_run: true }))
        .await?
        .into_inner();
    assert_eq!((check.max_key_age_days, check.warn_days), (365, 30));
    assert_eq!(check.tenants[0].status, pb::RotationStatus::Ok as i32);
    assert_eq!(check.tenants[0].active_version, 2);
    let e = keys
        .retire_key_version(as_id(
            ids::OPS,
            pb::RetireKeyVersionRequest {
                tenant_id: "acme".into(),
                version: 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "RETIREMENT_BLOCKED")
    );
    assert!(
        e.message().contains("no re-encryption job"),
        "{}",
        e.message()
    );
    let e = keys
        .rewrap_kms_key(as_id(
            ids::OPS,
            pb::RewrapKmsKeyRequest {
                tenant_id: "acme".into(),
                kms_key_id: "some-other-key".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "KMS_KEY_UNUSABLE")
    );

    let mut jobs = JobsClient::new(ch);
    assert!(
        jobs.list_jobs(as_id(ids::OPS, pb::ListJobsRequest {}))
            .await?
            .into_inner()
            .jobs
            .is_empty()
    );
    for e in [
        jobs.get_job(as_id(
            ids::OPS,
            pb::JobRequest {
                job_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err(),
        jobs.pause_job(as_id(
            ids::OPS,
            pb::JobRequest {
                job_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err(),
        jobs.watch_job(as_id(
            ids::OPS,
            pb::WatchJobRequest {
                job_id: "nope".into(),
                interval_ms: 0,
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err(),
    ] {
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::NotFound, "JOB_NOT_FOUND")
        );
    }
    let e = jobs
        .watch_job(as_id(
            ids::OPS,
            pb::WatchJobRequest {
                job_id: "x".into(),
                interval_ms: 5,
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err();
    // refused by the handler itself (interval out of range): no reason entry
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, ""),
        "{e:?}"
    );
    server.stop().await;
    Ok(())
}
