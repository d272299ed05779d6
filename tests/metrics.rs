//! Metrics, health and hardening of a real `fieldkey serve` process: the counters move
//! with traffic, readiness follows the key store (PostgreSQL behind a proxy that the
//! test stops) while liveness does not, and core dumps are off.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use common::sample;

use std::time::Duration;

use anyhow::Result;
use common::sidecar::Sidecar;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::{self, DecryptRequest, EncryptRequest};

/// `fieldkey serve` on PostgreSQL at `pg`, with metrics on a free port refreshed every
/// second and no stale cache.
fn start(dir: &std::path::Path, pg: &str) -> Sidecar {
    let cfg = dir.join("fieldkey.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[store]\npostgres_url = {pg:?}\n[erasure]\nledger = {:?}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\nrefresh_secs = 1\n[cache]\nmax_stale_ms = 0\n\
             {}",
            dir,
            dir.join("ledger.db"),
            common::sidecar::TRUST_MESH,
        ),
    )
    .unwrap();
    Sidecar::builder()
        .any_port()
        .config(&cfg)
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", "test passphrase 123")
        .with_metrics()
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_readiness_follows_the_key_store() -> Result<()> {
    let keys_db = common::PgDb::create().await?;
    let proxy = common::proxy::TcpProxy::start(common::socket_addr_of(&keys_db.dsn)?).await?;
    let dsn = keys_db.dsn.replacen(
        &common::socket_addr_of(&keys_db.dsn)?.to_string(),
        &format!("127.0.0.1:{}", proxy.port),
        1,
    );
    let dir = tempfile::tempdir()?;
    let s = start(dir.path(), &dsn);

    // liveness and readiness before any traffic
    assert_eq!(s.get("/healthz").0, 200);
    let (code, body) = s.get("/readyz");
    assert_eq!(code, 200, "{body}");
    let before = s.get("/metrics").1;
    assert_eq!(
        sample(
            &before,
            "fieldkey_requests_total{rpc=\"Crypto/Encrypt\",code=\"Ok\"}"
        ),
        None
    );
    assert_eq!(
        sample(&before, "fieldkey_dependency_up{dependency=\"key_store\"}"),
        Some(1.0)
    );

    // traffic: a tenant, five encryptions, one refused decryption
    let ch = tonic::transport::Channel::from_shared(s.addr.clone())?
        .connect()
        .await?;
    common::grpc::create_tenant(&ch, "acme").await?;
    let mut c = CryptoClient::new(ch);
    for i in 0..5 {
        c.encrypt(EncryptRequest {
            tenant_id: "acme".into(),
            subject_id: String::new(),
            field: "email".into(),
            context: vec![].into(),
            plaintext: format!("v{i}").into_bytes().into(),
            format: pb::CiphertextFormat::Binary as i32,
        })
        .await?;
    }
    let e = c
        .decrypt(DecryptRequest {
            tenant_id: "nobody".into(),
            subject_id: String::new(),
            field: "email".into(),
            context: vec![].into(),
            ciphertext: b"garbage".to_vec().into(),
            repair: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), common::grpc::reason(&e).as_str()),
        (tonic::Code::InvalidArgument, "MALFORMED_CIPHERTEXT")
    );

    // key ages are refreshed every second
    let text = common::eventually("the key age gauge", Duration::from_secs(10), || {
        let t = s.get("/metrics").1;
        async move { sample(&t, "fieldkey_key_age_seconds{tenant=\"acme\"}").map(|_| t) }
    })
    .await;
    eprintln!("{text}");
    let enc_ok = sample(
        &text,
        "fieldkey_requests_total{rpc=\"Crypto/Encrypt\",code=\"Ok\"}",
    );
    assert_eq!(enc_ok, Some(5.0));
    assert_eq!(
        sample(
            &text,
            "fieldkey_requests_total{rpc=\"Crypto/Decrypt\",code=\"InvalidArgument\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "fieldkey_requests_total{rpc=\"Keys/CreateTenant\",code=\"Ok\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "fieldkey_request_duration_seconds_count{rpc=\"Crypto/Encrypt\"}"
        ),
        Some(5.0)
    );
    assert!(
        sample(
            &text,
            "fieldkey_kms_calls_total{op=\"generate_data_key\",outcome=\"ok\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        sample(
            &text,
            "fieldkey_kms_duration_seconds_count{op=\"generate_data_key\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        sample(&text, "fieldkey_cache_hits_total").unwrap_or(0.0) >= 4.0,
        "4 of 5 encryptions hit"
    );
    assert!(sample(&text, "fieldkey_cache_misses_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        sample(&text, "fieldkey_cache_entries{kind=\"tenant\"}"),
        Some(1.0)
    );
    let age = sample(&text, "fieldkey_key_age_seconds{tenant=\"acme\"}").expect("key age of acme");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(sample(&text, "fieldkey_tenants{status=\"ok\"}"), Some(1.0));
    // No epoch rolled in this sidecar: epochs not started, horizon unbounded.
    assert_eq!(sample(&text, "fieldkey_epoch_active"), Some(0.0));
    assert_eq!(
        sample(&text, "fieldkey_backup_horizon_seconds"),
        Some(f64::INFINITY)
    );
    // nothing secret or personal in the exposition
    for bad in ["v0", "v1", "garbage", "passphrase"] {
        assert!(!text.contains(&format!("\"{bad}\"")), "{bad} in metrics");
    }

    // hardening: no core dumps
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.child.id()))?;
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert!(
        s.log().contains("core dumps off, not dumpable"),
        "{}",
        s.log()
    );

    // the key store goes away: not ready (and says why), still live
    proxy.stop().await;
    // once the cached verdict (a few seconds) has run out
    let (code, body) = common::eventually("/readyz reports 503", Duration::from_secs(15), || {
        let r = s.get("/readyz");
        async move { (r.0 == 503).then_some(r) }
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("key store"), "{body}");
    assert_eq!(s.get("/healthz").0, 200);
    let text = s.get("/metrics").1;
    assert_eq!(
        sample(&text, "fieldkey_dependency_up{dependency=\"key_store\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "fieldkey_dependency_up{dependency=\"kms\"}"),
        Some(1.0)
    );
    drop(s);
    keys_db.drop_db().await
}

/// A refresh sets the new values before it removes what disappeared: a tenant whose key
/// is no longer active loses its age series, the status counts move, nothing else goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshed_gauges_drop_series_that_disappear() -> Result<()> {
    use fieldkey::metrics::Metrics;
    use fieldkey::policy::RotationPolicy;
    use fieldkey::{Keyring, KeyringConfig};
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms = common::local_kms(&dir)?;
    let keyring = std::sync::Arc::new(Keyring::new(store.clone(), kms, KeyringConfig::default()));
    let jobs = fieldkey::jobs::JobBoard::new(store);
    keyring.create_tenant("a", None).await?;
    keyring.create_tenant("b", None).await?;
    let m = Metrics::new();
    m.refresh(&keyring, &jobs, &RotationPolicy::default())
        .await?;
    let t = m.render();
    assert!(
        sample(&t, "fieldkey_key_age_seconds{tenant=\"b\"}").is_some(),
        "{t}"
    );
    assert_eq!(sample(&t, "fieldkey_tenants{status=\"ok\"}"), Some(2.0));
    assert_eq!(
        sample(&t, "fieldkey_tenants{status=\"overdue\"}"),
        Some(0.0)
    );
    keyring.suspend_tenant("b").await?;
    m.refresh(&keyring, &jobs, &RotationPolicy::default())
        .await?;
    let t = m.render();
    assert_eq!(
        sample(&t, "fieldkey_key_age_seconds{tenant=\"b\"}"),
        None,
        "{t}"
    );
    assert!(sample(&t, "fieldkey_key_age_seconds{tenant=\"a\"}").is_some());
    assert_eq!(sample(&t, "fieldkey_tenants{status=\"ok\"}"), Some(1.0));
    assert_eq!(
        sample(&t, "fieldkey_tenants{status=\"no-active-key\"}"),
        Some(1.0)
    );
    Ok(())
}
