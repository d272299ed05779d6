//! Outages of the key store and the KMS, through real processes (issue 20, findings 3
//! and 4): `fieldkey serve` reaches PostgreSQL or moto through a TCP proxy the test
//! breaks (black-holed: nothing answers; cut: connections reset).
//!
//! - Cached calls never wait on a store that stopped answering: the metadata is
//!   re-read in the background and a stale snapshot serves (within `max_stale`).
//!   Before, a call stalled for the pool's 3 s acquire timeout at each revalidation
//!   (max 3.0 s tenant-scoped, 6.0 s subject-scoped).
//! - A cold tenant during a KMS outage costs a few probes, not a KMS attempt per call:
//!   the KMS key's breaker opens after 3 failures and lets one probe through per
//!   back-off; calls fail at once with UNAVAILABLE/KMS_UNAVAILABLE and work again once
//!   the KMS is back. Before, each call made its own attempt (1,654 in 20 s from two
//!   client threads).
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::grpc::{create_tenant, reason};
use common::proxy::TcpProxy;
use common::sidecar::{Sidecar, TRUST_MESH};
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::{CiphertextFormat, DecryptRequest, EncryptRequest};
use tonic::Code;
use tonic::transport::Channel;

fn enc(subject: &str) -> EncryptRequest {
    EncryptRequest {
        tenant_id: "acme".into(),
        subject_id: subject.into(),
        field: "email".into(),
        context: b"row-1".to_vec().into(),
        plaintext: b"a@example.org".to_vec().into(),
        format: CiphertextFormat::Binary as i32,
    }
}

fn dec(subject: &str, ciphertext: &[u8]) -> DecryptRequest {
    DecryptRequest {
        tenant_id: "acme".into(),
        subject_id: subject.into(),
        field: "email".into(),
        context: b"row-1".to_vec().into(),
        ciphertext: ciphertext.to_vec().into(),
        repair: false,
    }
}

fn start(dir: &Path, extra: &str) -> Sidecar {
    Sidecar::builder()
        .any_port()
        .config_text(
            dir,
            &format!(
                "data_dir = {dir:?}\n[erasure]\nledger = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}\n{TRUST_MESH}",
                dir.join("ledger.db"),
            ),
        )
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", "outage test passphrase")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .with_metrics()
        .start()
}

/// Decrypts both values from two tasks for `secs`; every call must succeed. Returns
/// the latencies.
async fn decrypt_for(ch: &Channel, values: &[(String, Vec<u8>)], secs: u64) -> Vec<Duration> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (ch, values) = (ch.clone(), values.to_vec());
        tasks.spawn(async move {
            let mut c = CryptoClient::new(ch);
            let mut lat = Vec::new();
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                for (subject, ct) in &values {
                    let t = Instant::now();
                    let r = c.decrypt(dec(subject, ct)).await;
                    lat.push(t.elapsed());
                    assert!(r.is_ok(), "a cached call failed during the outage: {r:?}");
                }
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.unwrap());
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_calls_never_wait_on_a_key_store_that_stopped_answering() -> Result<()> {
    let pg = common::PgDb::create().await?;
    let proxy = TcpProxy::start(common::socket_addr_of(&pg.dsn)?).await?;
    let dir = tempfile::tempdir()?;
    let s = start(
        dir.path(),
        &format!("[store]\npostgres_url = {:?}", proxy.via(&pg.dsn)),
    );
    let ch = s.channel().await;
    create_tenant(&ch, "acme").await?;
    let mut c = CryptoClient::new(ch.clone());
    let mut values = Vec::new();
    for subject in ["", "user-1"] {
        let ct = c
            .encrypt(enc(subject))
            .await?
            .into_inner()
            .ciphertext
            .to_vec();
        c.decrypt(dec(subject, &ct)).await?;
        values.push((subject.to_owned(), ct));
    }
    for (what, breaks) in [
        ("black-holed", TcpProxy::black_hole as fn(&TcpProxy)),
        ("cut", TcpProxy::cut),
    ] {
        breaks(&proxy);
        // Long enough for several revalidations (every second by default).
        let lat = decrypt_for(&ch, &values, 4).await;
        let (p50, p99, max) = (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0));
        eprintln!(
            "store {what}: {} calls, p50 {p50:?}, p99 {p99:?}, max {max:?}",
            lat.len()
        );
        assert!(
            max < Duration::from_secs(1),
            "store {what}: a cached call waited {max:?} on the store"
        );
        proxy.pass();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.stop();
    proxy.stop().await;
    pg.drop_db().await?;
    Ok(())
}

/// The sum of every sample of `name` whose labels contain `label`.
fn sum_of(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_tenant_during_a_kms_outage_costs_a_few_probes_not_an_attempt_per_call() -> Result<()>
{
    let moto = common::moto_url();
    let admin = fieldkey::kms::aws::AwsKms::new(common::aws_config(&moto, "unused")).await?;
    let key = admin
        .client()
        .create_key()
        .description("fieldkey outage test")
        .send()
        .await?
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();
    let proxy = TcpProxy::start(common::socket_addr_of(&moto)?).await?;
    let dir = tempfile::tempdir()?;
    let kms = format!(
        "[kms]\naws_key_id = {key:?}\naws_region = \"eu-west-1\"\naws_endpoint_url = {:?}",
        proxy.via(&moto)
    );
    // The tenant is made by one process; a second one starts cold.
    let first = start(dir.path(), &kms);
    create_tenant(&first.channel().await, "acme").await?;
    first.stop();
    let s = start(dir.path(), &kms);
    let ch = s.channel().await;
    proxy.cut();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let ch = ch.clone();
        tasks.spawn(async move {
            let mut c = CryptoClient::new(ch);
            let (mut calls, end) = (0u32, Instant::now() + Duration::from_secs(8));
            while Instant::now() < end {
                let e = c.encrypt(enc("")).await.unwrap_err();
                assert_eq!(
                    (e.code(), reason(&e).as_str()),
                    (Code::Unavailable, "KMS_UNAVAILABLE"),
                    "{e:?}"
                );
                calls += 1;
            }
            calls
        });
    }
    let mut calls = 0;
    while let Some(n) = tasks.join_next().await {
        calls += n?;
    }
    let text = s.get("/metrics").1;
    let attempts = sum_of(&text, "fieldkey_kms_calls_total", "op=\"unwrap\"");
    eprintln!("{calls} calls during the outage made {attempts} KMS unwrap attempts");
    assert!(calls >= 100, "the calls failed at once ({calls} in 8 s)");
    // 3 failures open the breaker, then one probe per back-off (250 ms doubling, jittered)
    assert!(
        attempts <= 15.0,
        "{attempts} KMS attempts for {calls} calls: no back-off"
    );
    assert!(
        text.contains("fieldkey_breaker_open{dependency=\"kms\"} 1"),
        "{text}"
    );
    proxy.pass();
    let mut c = CryptoClient::new(ch);
    common::eventually(
        "the tenant works once the KMS is back",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move { c.encrypt(enc("")).await.ok() }
        },
    )
    .await;
    c.encrypt(enc("")).await?;
    s.stop();
    proxy.stop().await;
    Ok(())
}
