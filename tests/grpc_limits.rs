//! The limits every call runs under, end to end over loopback TCP against an
//! in-process server: message size, batch size, field size, the per-call deadline, the
//! in-flight limit and the drain at shutdown, each refused with its own status.

mod common;

use std::sync::Arc;

use anyhow::Result;
use common::grpc::reason;
use common::sidecar::InProcess;
use fieldkey::config::Limits;
use fieldkey::kms::Kms;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::{CiphertextFormat, EncryptBatchRequest, EncryptRequest, encrypt_result};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::wiring::Parts;
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;

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

async fn limited(
    dir: &tempfile::TempDir,
    limits: Limits,
    kms_delay_ms: u64,
) -> Result<(InProcess, Arc<common::CountingKms>)> {
    let store: Arc<dyn KeyStore> =
        Arc::new(SqlStore::open_sqlite(&dir.path().join("keys.db")).await?);
    // Create the tenants through a separate keyring so the server starts cold.
    let setup = Keyring::new(
        store.clone(),
        common::local_kms(dir)?,
        KeyringConfig::default(),
    );
    setup.create_tenant("acme", None).await?;
    let kms = common::CountingKms::with_delay(
        common::local_kms(dir)?,
        std::time::Duration::from_millis(kms_delay_ms),
    );
    Ok((start_with(store, kms.clone(), limits).await?, kms))
}

/// Waits until a call has reached `kms` (and sits in its delay).
async fn in_the_kms(kms: &common::CountingKms) {
    common::eventually(
        "a call reaches the KMS",
        std::time::Duration::from_secs(5),
        || async { (kms.unwraps.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn oversized_request_message_is_refused_before_it_is_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, _kms) = limited(
        &dir,
        Limits {
            max_message_bytes: 64 * 1024,
            ..Limits::default()
        },
        0,
    )
    .await?;
    let mut c = CryptoClient::new(server.channel().await?);
    let err = c
        .encrypt(enc("acme", "", "f", b"", &vec![7u8; 100 * 1024]))
        .await
        .unwrap_err();
    // The frame header's length is enough: INVALID_ARGUMENT (the caller's fault), not
    // tonic's OUT_OF_RANGE without a reason.
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "MESSAGE_TOO_LARGE"),
        "{err:?}"
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn too_many_batch_items_are_refused_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, _kms) = limited(
        &dir,
        Limits {
            max_batch_items: 3,
            ..Limits::default()
        },
        0,
    )
    .await?;
    let mut c = CryptoClient::new(server.channel().await?);
    let items = (0..4).map(|_| enc("acme", "", "f", b"", b"x")).collect();
    let err = c
        .encrypt_batch(EncryptBatchRequest { items })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "BATCH_TOO_LARGE")
    );
    let items = (0..3).map(|_| enc("acme", "", "f", b"", b"x")).collect();
    assert_eq!(
        c.encrypt_batch(EncryptBatchRequest { items })
            .await?
            .into_inner()
            .results
            .len(),
        3
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn oversized_field_value_is_refused_per_item() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, _kms) = limited(
        &dir,
        Limits {
            max_field_bytes: 16,
            ..Limits::default()
        },
        0,
    )
    .await?;
    let mut c = CryptoClient::new(server.channel().await?);
    let err = c
        .encrypt(enc("acme", "", "f", b"", &[1u8; 17]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "VALUE_TOO_LARGE")
    );
    let items = vec![
        enc("acme", "", "f", b"", &[1u8; 16]),
        enc("acme", "", "f", b"", &[1u8; 17]),
    ];
    let r = c
        .encrypt_batch(EncryptBatchRequest { items })
        .await?
        .into_inner()
        .results;
    assert!(matches!(r[0].result, Some(encrypt_result::Result::Ok(_))));
    assert!(
        matches!(&r[1].result, Some(encrypt_result::Result::Error(e)) if e.reason == "VALUE_TOO_LARGE")
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_call_past_the_server_deadline_is_deadline_exceeded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // a cold cache and a KMS that takes 600 ms against a 150 ms deadline
    let (server, _kms) = limited(
        &dir,
        Limits {
            request_timeout_ms: 150,
            ..Limits::default()
        },
        600,
    )
    .await?;
    let mut c = CryptoClient::new(server.channel().await?);
    let started = std::time::Instant::now();
    let err = c
        .encrypt(enc("acme", "", "f", b"", b"x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "DEADLINE_EXCEEDED")
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(550));
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_refused_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, kms) = limited(
        &dir,
        Limits {
            max_concurrent_requests: 1,
            ..Limits::default()
        },
        400,
    )
    .await?;
    let ch = server.channel().await?;
    let mut a = CryptoClient::new(ch.clone());
    let mut b = CryptoClient::new(ch);
    let first = tokio::spawn(async move { a.encrypt(enc("acme", "", "f", b"", b"x")).await });
    in_the_kms(&kms).await; // the first call waits on the KMS
    let err = b
        .encrypt(enc("acme", "", "f", b"", b"y"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::ResourceExhausted, "TOO_MANY_REQUESTS")
    );
    assert!(first.await?.is_ok(), "the call in flight completes");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_drains_calls_in_flight() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // cold cache + a KMS taking 500 ms: the call is in flight when shutdown starts
    let (server, kms) = limited(&dir, Limits::default(), 500).await?;
    let mut c = CryptoClient::new(server.channel().await?);
    let call = tokio::spawn(async move { c.encrypt(enc("acme", "", "f", b"", b"x")).await });
    in_the_kms(&kms).await;
    let addr = server.addr;
    server.stop().await; // returns only after in-flight calls finished
    let out = call.await?;
    assert!(
        out.is_ok(),
        "in-flight call completed during drain: {out:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "no longer accepting after shutdown"
    );
    Ok(())
}
