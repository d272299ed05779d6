//! Erasure across real processes: `fieldkey serve` killed half-way through an erasure
//! (fault injection aborts it right after each step) and finishing after a restart;
//! two sidecars sharing one PostgreSQL store, measuring how fast a shred or suspension
//! made on one is enforced by the other, also when the other's change-feed connection
//! died silently; a key-store backup restored after a shred;
//! and `fieldkey erasure verify` on a genuine and an edited receipt.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use common::grpc::{create_tenant, reason};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::grpc::{as_id, ids};
use common::sidecar::{BIN, Sidecar, TRUST_MESH, example_policies_plus};
use fieldkey::proto::pb::{self, crypto_client::CryptoClient, erasures_client::ErasuresClient};
use sqlx::Connection as _;
use tonic::Code;
use tonic::transport::Channel;

const PASSPHRASE: &str = "erasure test passphrase";

/// Test-only grant (with the example policies): the `fieldkey erasure` client commands
/// run in the application pod, over the local listener whose identity is the
/// application's, may shred and fetch receipts there.
const LOCAL_ERASURE_CLI: &str = r#"@id("local-erasure-cli")
permit (
  principal == Identity::"spiffe://example.org/ns/shop/sa/web",
  action in [
    Action::"Erasures::ShredSubject",
    Action::"Erasures::GetErasure",
    Action::"Erasures::GetReceiptKey"
  ],
  resource
)
when { context.transport == "local" };
"#;

/// A `fieldkey serve` process on `config` under the example policies; stderr goes to
/// the log file `log`, and with `fault` it aborts right after that erasure step.
fn start(config: &Path, log: &Path, fault: Option<&str>) -> Sidecar {
    start_with(config, log, fault, None)
}

/// [`start`], under the policies in `policies` when given.
fn start_with(config: &Path, log: &Path, fault: Option<&str>, policies: Option<&Path>) -> Sidecar {
    let b = Sidecar::builder();
    let b = match policies {
        Some(p) => b.policies(p),
        None => b,
    };
    b.config(config)
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
        .env_opt("FIELDKEY_FAULT_ABORT_AFTER_ERASURE_STEP", fault)
        .log_file(log)
        .start()
}

fn write_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "data_dir = {data:?}\n\
         [kms]\nlocal_key_file = {kms:?}\n\
         {TRUST_MESH}tcp = \"127.0.0.1:0\"\n{extra}\n",
        data = dir.join("data").display().to_string(),
        kms = dir.join("local-kms.json").display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn init_kms(dir: &Path) {
    let out = Command::new(BIN)
        .args(["kms", "init-local", "--path"])
        .arg(dir.join("local-kms.json"))
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn encrypt(ch: &Channel, tenant: &str, subject: &str, value: &str) -> Vec<u8> {
    CryptoClient::new(ch.clone())
        .encrypt(pb::EncryptRequest {
            tenant_id: tenant.into(),
            subject_id: subject.into(),
            field: "email".into(),
            context: b"row-1".to_vec().into(),
            plaintext: value.as_bytes().to_vec().into(),
            format: pb::CiphertextFormat::Binary as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext
        .to_vec()
}

async fn decrypt(
    ch: &Channel,
    tenant: &str,
    subject: &str,
    ct: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    CryptoClient::new(ch.clone())
        .decrypt(pb::DecryptRequest {
            tenant_id: tenant.into(),
            subject_id: subject.into(),
            field: "email".into(),
            context: b"row-1".to_vec().into(),
            ciphertext: ct.to_vec().into(),
            repair: false,
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

async fn get_erasure(ch: &Channel, id: &str) -> pb::Erasure {
    ErasuresClient::new(ch.clone())
        .get_erasure(as_id(
            ids::ERASURE,
            pb::ErasureIdRequest {
                erasure_id: id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn sqlite(path: &Path) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

/// Runs the CLI against a sidecar (or offline) and returns (exit code, stdout, stderr).
fn cli(addr: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let out = common::sidecar::run_cli(addr, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fieldkey erasure verify receipt --public-key pem`, offline.
fn verify_receipt(receipt: &Path, pem: &Path) -> (i32, String, String) {
    cli(
        None,
        &[
            "erasure",
            "verify",
            receipt.to_str().unwrap(),
            "--public-key",
            pem.to_str().unwrap(),
        ],
    )
}

/// ShredTenant (no `subject`) or ShredSubject, with no grace period.
async fn shred_now(
    ch: &Channel,
    tenant: &str,
    subject: Option<&str>,
) -> Result<pb::Erasure, tonic::Status> {
    let mut client = ErasuresClient::new(ch.clone());
    match subject {
        None => {
            client
                .shred_tenant(as_id(
                    ids::ERASURE,
                    pb::ShredTenantRequest {
                        tenant_id: tenant.into(),
                        grace_seconds: 0,
                    },
                ))
                .await
        }
        Some(subject) => {
            client
                .shred_subject(as_id(
                    ids::ERASURE,
                    pb::ShredSubjectRequest {
                        tenant_id: tenant.into(),
                        subject_id: subject.into(),
                        grace_seconds: 0,
                    },
                ))
                .await
        }
    }
    .map(tonic::Response::into_inner)
}

const FAST_WORKER: &str = "[erasure]\nretry_after_secs = 1\npoll_ms = 100\n";

/// The process is aborted right after each step of an erasure; after a restart the
/// erasure completes by itself (the worker takes up the abandoned request), with one
/// receipt and one completion record in the audit chain, and the key is gone.
#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_interrupted_after_any_step_completes_after_a_restart() -> Result<()> {
    for (i, step) in ["ledger", "destroy", "kms", "complete"].iter().enumerate() {
        let dir = tempfile::tempdir()?;
        init_kms(dir.path());
        let config = write_config(dir.path(), "sidecar", FAST_WORKER);
        let tenant = format!("crash-{i}");
        let tenant_scope = *step == "kms";

        let a = start(&config, &dir.path().join("a.log"), None);
        let ch = a.channel().await;
        create_tenant(&ch, &tenant).await?;
        let ct = encrypt(&ch, &tenant, "alice", "alice@example.org").await;
        a.stop();

        let b = start(&config, &dir.path().join("b.log"), Some(step));
        let ch = b.channel().await;
        let subject = (!tenant_scope).then_some("alice");
        let call = shred_now(&ch, &tenant, subject).await;
        // Dies with the process: the transport fails, no answer (no reason) came back.
        let st = call.expect_err("the call should die with the process");
        assert!(
            reason(&st).is_empty()
                && matches!(
                    st.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
            "step {step}: {st:?}"
        );
        let status = b.wait_dead();
        assert!(!status.success(), "step {step}: {status:?}");
        let log = std::fs::read_to_string(dir.path().join("b.log"))?;
        assert!(log.contains("fault injection"), "step {step}: {log}");

        // What the crash left behind, read from the database file.
        let db = dir.path().join("data/keys.db");
        let mut conn = sqlite(&db).await;
        let (id, state): (String, String) =
            sqlx::query_as("SELECT erasure_id, state FROM fk_erasures WHERE tenant_id = $1")
                .bind(&tenant)
                .fetch_one(&mut conn)
                .await?;
        let expected_state = if *step == "complete" {
            "completed"
        } else {
            "executing"
        };
        assert_eq!(state, expected_state, "step {step}");
        let wrapped: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT wrapped FROM fk_subjects WHERE tenant_id = $1 AND subject_id = 'alice'",
        )
        .bind(&tenant)
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(
            wrapped.is_none(),
            *step != "ledger",
            "step {step}: keys are destroyed only after the ledger step"
        );
        conn.close().await?;

        // Restart without the fault: the worker finishes the abandoned request.
        // Its receipt key is fetched with the CLI, as the local identity.
        let policies = example_policies_plus(
            dir.path(),
            &[("local-erasure-cli.cedar", LOCAL_ERASURE_CLI)],
        );
        let c = start_with(&config, &dir.path().join("c.log"), None, Some(&policies));
        let ch = c.channel().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let done = loop {
            let e = get_erasure(&ch, &id).await;
            if e.state == pb::ErasureState::Completed as i32 {
                break e;
            }
            assert!(
                Instant::now() < deadline,
                "step {step}: not completed: {e:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(!done.receipt.is_empty());
        // Retrying the original call is safe: same request, nothing new.
        let again = shred_now(&ch, &tenant, subject).await?;
        assert_eq!(again.erasure_id, id);
        assert_eq!(again.receipt, done.receipt);

        let err = decrypt(&ch, &tenant, "alice", &ct).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "step {step}");
        assert_eq!(reason(&err), "KEY_DESTROYED");

        let mut conn = sqlite(&db).await;
        let completions: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM fk_audit WHERE action = 'erasure.completed' AND details LIKE $1",
        )
        .bind(format!("%{id}%"))
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(completions, 1, "step {step}: exactly one completion record");
        conn.close().await?;

        // The receipt verifies offline with the published key.
        let receipt = dir.path().join("receipt.json");
        std::fs::write(&receipt, &done.receipt)?;
        let pem = dir.path().join("receipt-key.pem");
        let (code, _, err) = cli(
            Some(&c.addr),
            &["erasure", "public-key", "--out", pem.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = verify_receipt(&receipt, &pem);
        assert_eq!(code, 0, "step {step}: {out}{err}");
        assert!(out.contains("receipt OK"), "{out}");
        eprintln!("step {step}: request {id} completed after restart; receipt verified");
        c.stop();
    }
    Ok(())
}

/// `fieldkey erasure verify` accepts the receipt as issued and refuses it after any
/// edit (exit 4, "INVALID").
#[tokio::test(flavor = "multi_thread")]
async fn an_edited_receipt_fails_verification() -> Result<()> {
    let dir = tempfile::tempdir()?;
    init_kms(dir.path());
    let config = write_config(dir.path(), "sidecar", FAST_WORKER);
    // The CLI shreds and fetches the receipt key as the local identity.
    let policies = example_policies_plus(
        dir.path(),
        &[("local-erasure-cli.cedar", LOCAL_ERASURE_CLI)],
    );
    let s = start_with(&config, &dir.path().join("s.log"), None, Some(&policies));
    let ch = s.channel().await;
    create_tenant(&ch, "acme").await?;
    encrypt(&ch, "acme", "bob", "bob@example.org").await;
    let receipt = dir.path().join("receipt.json");
    let pem = dir.path().join("key.pem");
    let (code, out, err) = cli(
        Some(&s.addr),
        &[
            "erasure",
            "shred-subject",
            "acme",
            "bob",
            "--receipt-out",
            receipt.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("completed"), "{out}");
    let (code, _, err) = cli(
        Some(&s.addr),
        &["erasure", "public-key", "--out", pem.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let verify = |path: &Path| verify_receipt(path, &pem);
    let (code, out, _) = verify(&receipt);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("subject bob of tenant acme"), "{out}");

    let original = std::fs::read_to_string(&receipt)?;
    let json: serde_json::Value = serde_json::from_str(&original)?;
    let fingerprint = json["receipt"]["destroyed"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut flipped = fingerprint.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let edits = [
        (
            "fingerprint",
            original.replace(&fingerprint, std::str::from_utf8(&flipped)?),
        ),
        (
            "subject",
            original.replace("\"subject_id\": \"bob\"", "\"subject_id\": \"eve\""),
        ),
        (
            "executed_by",
            original.replace("\"executed_by\": \"", "\"executed_by\": \"x"),
        ),
        ("truncated", original[..original.len() / 2].to_owned()),
    ];
    for (what, text) in edits {
        assert_ne!(text, original, "{what}: the edit changed nothing");
        let edited = dir.path().join(format!("edited-{what}.json"));
        std::fs::write(&edited, text)?;
        let (code, out, err) = verify(&edited);
        assert_eq!(code, 4, "{what}: {out}{err}");
        assert!(err.contains("INVALID"), "{what}: {err}");
    }
    s.stop();
    Ok(())
}

/// How long after `from` a decrypt of `ct` (tenant acme) through `chb` first answers
/// `want` (a reason code, or success for `None`); fails the test after 10 s.
async fn until(
    chb: &Channel,
    subject: &str,
    ct: &[u8],
    want: Option<&str>,
    from: Instant,
) -> Duration {
    loop {
        let r = decrypt(chb, "acme", subject, ct).await;
        let reached = match (&r, want) {
            (Ok(_), None) => true,
            (Err(e), Some(w)) => reason(e) == w,
            _ => false,
        };
        if reached {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < Duration::from_secs(10),
            "never reached {want:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Two sidecars on one PostgreSQL store: a shred, a suspension and a resumption made
/// through one are enforced by the other within 1 s. Both revalidate cached state only
/// every 60 s here, so only the LISTEN/NOTIFY path can explain a fast effect.
#[tokio::test(flavor = "multi_thread")]
async fn shred_and_suspend_reach_the_other_sidecar_within_a_second() -> Result<()> {
    let db = common::PgDb::create().await?;
    // The erasure ledger in its own database, shared by both sidecars (as deployed).
    let ledger_db = common::PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    init_kms(dir.path());
    let extra = format!(
        "[store]\npostgres_url = {:?}\n[cache]\nrevalidate_ms = 60000\n{FAST_WORKER}ledger = {:?}\n",
        db.dsn, ledger_db.dsn
    );
    let config = write_config(dir.path(), "sidecar", &extra);
    let a = start(&config, &dir.path().join("a.log"), None);
    let b = start(&config, &dir.path().join("b.log"), None);
    let (cha, chb) = (a.channel().await, b.channel().await);
    create_tenant(&cha, "acme").await?;
    let ct1 = encrypt(&cha, "acme", "u1", "one").await;
    let ct2 = encrypt(&cha, "acme", "u2", "two").await;
    let ctt = encrypt(&cha, "acme", "", "tenant data").await;
    // B has everything cached.
    for (s, ct) in [("u1", &ct1), ("u2", &ct2), ("", &ctt)] {
        decrypt(&chb, "acme", s, ct).await.unwrap();
    }

    let mut ea = ErasuresClient::new(cha.clone());
    shred_now(&cha, "acme", Some("u1")).await?;
    let shred = until(&chb, "u1", &ct1, Some("KEY_DESTROYED"), Instant::now()).await;

    ea.suspend_subject(as_id(
        ids::ERASURE,
        pb::RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: "u2".into(),
        },
    ))
    .await?;
    let suspend = until(&chb, "u2", &ct2, Some("KEY_SUSPENDED"), Instant::now()).await;
    ea.resume_subject(as_id(
        ids::ERASURE,
        pb::RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: "u2".into(),
        },
    ))
    .await?;
    let resume = until(&chb, "u2", &ct2, None, Instant::now()).await;

    shred_now(&cha, "acme", None).await?;
    let tenant = until(&chb, "", &ctt, Some("KEY_DESTROYED"), Instant::now()).await;

    eprintln!(
        "propagation to the other sidecar (after the call returned): shred {} ms, suspend {} ms, resume {} ms, tenant shred {} ms",
        shred.as_secs_f64() * 1e3,
        suspend.as_secs_f64() * 1e3,
        resume.as_secs_f64() * 1e3,
        tenant.as_secs_f64() * 1e3
    );
    for (what, d) in [
        ("shred", shred),
        ("suspend", suspend),
        ("resume", resume),
        ("tenant shred", tenant),
    ] {
        assert!(
            d < Duration::from_secs(1),
            "{what} took {d:?} to reach the other sidecar"
        );
    }
    a.stop();
    b.stop();
    db.drop_db().await?;
    ledger_db.drop_db().await?;
    Ok(())
}

/// The value of the sample `name` (a family without labels) in `s`'s metrics.
fn metric(s: &Sidecar, name: &str) -> Option<f64> {
    let (_, text) = s.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A sidecar whose change-feed connection died silently (its path to PostgreSQL
/// black-holes that connection: no reset, no error, as when a firewall forgets it)
/// notices by pinging the connection, counts it lost and re-reads what it cached, so a
/// shred made through the other sidecar is enforced within seconds, not at the 60 s
/// revalidation configured here. When the path comes back, the feed reconnects and a
/// later shred arrives by notification again (within 1 s, as in
/// `shred_and_suspend_reach_the_other_sidecar_within_a_second`). While the store is
/// unreachable, attempts to reconnect back off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_listen_connection_is_noticed_and_replaced() -> Result<()> {
    let db = common::PgDb::create().await?;
    let ledger_db = common::PgDb::create().await?;
    // B reaches the key store through the proxy, A directly.
    let proxy = common::proxy::TcpProxy::start(common::socket_addr_of(&db.dsn)?).await?;
    let dir = tempfile::tempdir()?;
    init_kms(dir.path());
    let config = |name: &str, dsn: &str, worker: &str, more: &str| {
        let extra = format!(
            "[store]\npostgres_url = {dsn:?}\n[cache]\nrevalidate_ms = 60000\n{worker}ledger = {:?}\n{more}",
            ledger_db.dsn
        );
        write_config(dir.path(), name, &extra)
    };
    let a = start(
        &config("a", &db.dsn, FAST_WORKER, ""),
        &dir.path().join("a.log"),
        None,
    );
    // B's erasure worker polls too rarely to take up A's erasure: had B executed the
    // shred itself, it would know without its change feed (seen once under load).
    let b = Sidecar::builder()
        .config(&config(
            "b",
            &proxy.via(&db.dsn),
            "[erasure]\nretry_after_secs = 1\npoll_ms = 3600000\n",
            "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        ))
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
        .log_file(&dir.path().join("b.log"))
        .with_metrics()
        .start();
    let (cha, chb) = (a.channel().await, b.channel().await);
    create_tenant(&cha, "acme").await?;
    let ct1 = encrypt(&cha, "acme", "u1", "one").await;
    let ct2 = encrypt(&cha, "acme", "u2", "two").await;
    // B has both subjects cached.
    decrypt(&chb, "acme", "u1", &ct1).await.unwrap();
    decrypt(&chb, "acme", "u2", &ct2).await.unwrap();

    // B's LISTEN connection goes silent; its other connections to the store work.
    proxy.black_hole_matching(b"LISTEN");
    shred_now(&cha, "acme", Some("u1")).await?;
    let noticed = until(&chb, "u1", &ct1, Some("KEY_DESTROYED"), Instant::now()).await;
    let lost = metric(&b, "fieldkey_change_feed_lost_total").unwrap();
    assert!(lost >= 1.0, "{lost}");
    // Still black-holed: every new connection goes silent at its LISTEN.
    assert_eq!(metric(&b, "fieldkey_change_feed_up"), Some(0.0));

    // The path comes back: the feed reconnects by itself.
    proxy.pass();
    let from = Instant::now();
    common::eventually(
        "B's change feed reconnects",
        Duration::from_secs(20),
        || async { (metric(&b, "fieldkey_change_feed_up") == Some(1.0)).then_some(()) },
    )
    .await;
    let reconnected = from.elapsed();
    // u2 read again after the reconnection; then shredded through A: with revalidation
    // at 60 s, only a notification can tell B now.
    decrypt(&chb, "acme", "u2", &ct2).await.unwrap();
    shred_now(&cha, "acme", Some("u2")).await?;
    let notified = until(&chb, "u2", &ct2, Some("KEY_DESTROYED"), Instant::now()).await;
    eprintln!(
        "dead LISTEN connection: shred enforced by B after {} ms (lost {lost}); feed back {} ms after the path; next shred by notification in {} ms",
        noticed.as_secs_f64() * 1e3,
        reconnected.as_secs_f64() * 1e3,
        notified.as_secs_f64() * 1e3,
    );
    assert!(
        notified < Duration::from_secs(1),
        "after reconnecting, a shred took {notified:?} to reach B"
    );
    assert!(metric(&b, "fieldkey_change_feed_reconnects_total").unwrap() >= 1.0);

    // The store unreachable for B (every connection reset at once): B tries again with
    // back-off, it does not spin.
    let attempts = |b: &Sidecar| b.log().matches("cannot reconnect").count();
    let before = attempts(&b);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failed = attempts(&b) - before;
    proxy.pass();
    eprintln!("store cut for 4 s: {failed} failed attempts to reconnect the change feed");
    assert!(
        (1..=12).contains(&failed),
        "{failed} attempts to reconnect in 4 s"
    );
    a.stop();
    b.stop();
    proxy.stop().await;
    db.drop_db().await?;
    ledger_db.drop_db().await?;
    Ok(())
}

fn copy_store(from_dir: &Path, to_dir: &Path) {
    std::fs::create_dir_all(to_dir).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("keys.db{suffix}");
        let to = to_dir.join(&name);
        let _ = std::fs::remove_file(&to);
        let from = from_dir.join(&name);
        if from.exists() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// A key-store backup taken before a shred and restored after it does not bring the
/// keys back: the erasure ledger (a separate file, not restored) makes the restarted
/// sidecar destroy them again, re-create the lost request and issue a new receipt.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_key_store_backup_does_not_bring_shredded_keys_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    init_kms(dir.path());
    let config = write_config(dir.path(), "sidecar", FAST_WORKER);
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");

    let s = start(&config, &dir.path().join("1.log"), None);
    let ch = s.channel().await;
    create_tenant(&ch, "acme").await?;
    let ct = encrypt(&ch, "acme", "carol", "carol@example.org").await;
    let ct_other = encrypt(&ch, "acme", "dave", "dave@example.org").await;
    s.stop();
    copy_store(&data, &backup);

    let s = start(&config, &dir.path().join("2.log"), None);
    let ch = s.channel().await;
    let shred = shred_now(&ch, "acme", Some("carol")).await?;
    assert_eq!(shred.state, pb::ErasureState::Completed as i32);
    s.stop();

    // Restore the key store from the backup; the ledger file stays as it is.
    copy_store(&backup, &data);
    let db = data.join("keys.db");
    let mut conn = sqlite(&db).await;
    let restored: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT wrapped FROM fk_subjects WHERE tenant_id = 'acme' AND subject_id = 'carol'",
    )
    .fetch_one(&mut conn)
    .await?;
    let requests: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM fk_erasures")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    assert!(restored.is_some(), "the backup holds carol's wrapped key");
    assert_eq!(requests, 0, "the backup predates the erasure request");
    eprintln!(
        "restored backup: carol's wrapped key is back ({} bytes), no erasure request",
        restored.as_ref().map_or(0, Vec::len)
    );

    let s = start(&config, &dir.path().join("3.log"), None);
    let ch = s.channel().await;
    let err = decrypt(&ch, "acme", "carol", &ct).await.unwrap_err();
    assert_eq!(reason(&err), "KEY_DESTROYED", "{err:?}");
    assert_eq!(
        decrypt(&ch, "acme", "dave", &ct_other).await?,
        b"dave@example.org"
    );
    // The request is back and completes again, with a new receipt.
    let deadline = Instant::now() + Duration::from_secs(15);
    let again = loop {
        let e = ErasuresClient::new(ch.clone())
            .get_erasure(as_id(
                ids::ERASURE,
                pb::ErasureIdRequest {
                    erasure_id: shred.erasure_id.clone(),
                },
            ))
            .await;
        if let Ok(e) = e
            && e.get_ref().state == pb::ErasureState::Completed as i32
        {
            break e.into_inner();
        }
        assert!(Instant::now() < deadline, "restored request not completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!again.receipt.is_empty());
    let mut conn = sqlite(&db).await;
    let after: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT wrapped FROM fk_subjects WHERE tenant_id = 'acme' AND subject_id = 'carol'",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    assert!(after.is_none(), "carol's key material is destroyed again");
    let log = std::fs::read_to_string(dir.path().join("3.log"))?;
    assert!(
        log.contains("erasures re-applied") || log.contains("destroyed it again"),
        "{log}"
    );
    eprintln!(
        "after restart: decrypt of carol's data -> KEY_DESTROYED; raw row wrapped = NULL; request {} re-completed",
        again.erasure_id
    );
    s.stop();
    Ok(())
}
