//! Key epoch rolls through real `fieldkey serve` processes: a roll SIGKILLed at random
//! points and resumed loses nothing and leaves nothing under an old epoch; a roll on one
//! replica while another (same PostgreSQL store) serves, creates subjects and shreds
//! fails no request for a live key and carries no shredded key forward. The roll is
//! driven the way operators drive it: `RollEpoch` / `GetEpochStatus` over gRPC (what
//! `fieldkey epoch roll` calls) and the CLI.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use tonic::transport::Channel;

use common::PgDb;
use common::grpc::{as_id, ids};
use common::sidecar::{Sidecar, TRUST_MESH};
use fieldkey::proto::pb::{
    self, crypto_client::CryptoClient, erasures_client::ErasuresClient, keys_client::KeysClient,
};

fn write_config(dir: &Path, extra: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("fieldkey.toml");
    std::fs::write(
        &path,
        format!(
            "{TRUST_MESH}[epochs]\nauto_roll = false\nlease_secs = 2\nkms_deletion_days = 7\n{extra}"
        ),
    )?;
    Ok(path)
}

async fn status(ch: &Channel) -> Result<(pb::EpochStatus, serde_json::Value)> {
    let st = KeysClient::new(ch.clone())
        .get_epoch_status(as_id(ids::OPS, pb::GetEpochStatusRequest {}))
        .await?
        .into_inner();
    let v = serde_json::from_str(&st.status_json)?;
    Ok((st, v))
}

/// Starts (or resumes) a roll and waits for it; retries while a dead roller's lease
/// has not expired yet.
async fn roll_to_end(ch: &Channel, finish_only: bool) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match KeysClient::new(ch.clone())
            .roll_epoch(as_id(ids::OPS, pb::RollEpochRequest { finish_only }))
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => bail!("RollEpoch: {s}"),
        }
    }
    loop {
        let (st, v) = status(ch).await?;
        if !st.rolling {
            ensure!(st.last_error.is_empty(), "roll stopped: {}", st.last_error);
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "roll did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn every_epoch_active_or_sealed(v: &serde_json::Value) -> Result<()> {
    for e in v["epochs"].as_array().unwrap() {
        let state = e["state"].as_str().unwrap();
        ensure!(
            state == "active" || state == "sealed",
            "epoch {} left {state}: {v}",
            e["epoch"]
        );
    }
    Ok(())
}

fn item(tenant: &str, subject: &str, value: &[u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        field: "email".into(),
        plaintext: value.to_vec().into(),
        context: Vec::new().into(),
        format: pb::CiphertextFormat::Binary as i32,
    }
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
            ciphertext: ct.to_vec().into(),
            context: Vec::new().into(),
            repair: false,
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

#[tokio::test]
async fn a_roll_killed_at_random_points_resumes_and_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = write_config(dir.path(), "")?;
    let start = || {
        Sidecar::builder()
            .any_port()
            .data_dir(&data)
            .config(&config)
            .start()
    };
    let mut sc = start();
    let ch = sc.channel().await;
    // Epoch 1 first, then data under it: 3 tenants x 1,500 subjects.
    roll_to_end(&ch, false).await?;
    let mut samples = Vec::new();
    for t in 0..3 {
        let tenant = format!("t{t}");
        KeysClient::new(ch.clone())
            .create_tenant(as_id(
                ids::OPS,
                pb::CreateTenantRequest {
                    tenant_id: tenant.clone(),
                    kms_key_id: String::new(),
                },
            ))
            .await?;
        for chunk in 0..3 {
            let items: Vec<_> = (0..500)
                .map(|i| item(&tenant, &format!("s{}", chunk * 500 + i), b"v"))
                .collect();
            let out = CryptoClient::new(ch.clone())
                .encrypt_batch(pb::EncryptBatchRequest { items })
                .await?
                .into_inner();
            for (i, r) in out.results.into_iter().enumerate() {
                let Some(pb::encrypt_result::Result::Ok(ok)) = r.result else {
                    bail!("batch item failed: {r:?}");
                };
                let ct = ok.ciphertext;
                if i.is_multiple_of(100) {
                    samples.push((tenant.clone(), format!("s{}", chunk * 500 + i), ct));
                }
            }
        }
    }
    // Kill it mid-roll a few times, at varying points; restart each time.
    let mut rng_state = u64::from_le_bytes(common::rand_bytes::<8>());
    let mut killed_mid_roll = 0;
    for round in 0..4 {
        let mut resumed = false;
        for _ in 0..40 {
            match KeysClient::new(ch_of(&sc).await)
                .roll_epoch(as_id(
                    ids::OPS,
                    pb::RollEpochRequest {
                        finish_only: round > 0,
                    },
                ))
                .await
            {
                Ok(_) => {
                    resumed = true;
                    break;
                }
                Err(s) if s.code() == tonic::Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(s) => bail!("RollEpoch: {s}"),
            }
        }
        ensure!(resumed, "the dead roller's lease never expired");
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        tokio::time::sleep(Duration::from_millis(5 + rng_state % 250)).await;
        if status(&ch_of(&sc).await).await?.0.rolling {
            killed_mid_roll += 1;
        }
        drop(sc); // SIGKILL
        sc = start();
    }
    assert!(
        killed_mid_roll > 0,
        "no kill landed inside a roll: the test proved nothing"
    );
    let ch = sc.channel().await;
    let v = roll_to_end(&ch, true).await?;
    every_epoch_active_or_sealed(&v)?;
    assert!(v["active"].as_u64().unwrap() >= 2, "{v}");
    for (tenant, subject, ct) in &samples {
        let pt = decrypt(&ch, tenant, subject, ct).await?;
        assert_eq!(pt, b"v");
    }
    // Nothing is left under a sealed epoch: the raw rows say so.
    let db =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("keys.db").display())).await?;
    let active: i64 = sqlx::query_scalar("SELECT epoch FROM fk_epochs WHERE state = 'active'")
        .fetch_one(&db)
        .await?;
    let stray: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM fk_subjects s LEFT JOIN fk_subject_wrapping_keys w ON w.swk_id = s.swk_id \
         WHERE s.wrapped IS NOT NULL AND (w.epoch IS NULL OR w.epoch <> $1)",
    )
    .bind(active)
    .fetch_one(&db)
    .await?;
    assert_eq!(stray, 0, "subject keys left outside the active epoch");
    Ok(())
}

async fn ch_of(sc: &Sidecar) -> Channel {
    sc.channel().await
}

#[tokio::test]
async fn a_roll_on_one_replica_while_the_other_serves_and_shreds() -> Result<()> {
    let db = PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    // One data directory for both: the local KMS (root key, passphrase, key files) is
    // the one thing the replicas must share besides PostgreSQL.
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!("[store]\npostgres_url = \"{}\"\n", db.dsn),
    )?;
    let a = Sidecar::builder()
        .any_port()
        .data_dir(&data)
        .config(&config)
        .start();
    let cha = a.channel().await;
    roll_to_end(&cha, false).await?;
    let b = Sidecar::builder()
        .any_port()
        .data_dir(&data)
        .config(&config)
        .start();
    let chb = b.channel().await;
    KeysClient::new(chb.clone())
        .create_tenant(as_id(
            ids::OPS,
            pb::CreateTenantRequest {
                tenant_id: "shop".into(),
                kms_key_id: String::new(),
            },
        ))
        .await?;
    // 100 per call: each first use of a subject creates its key (a store transaction);
    // keep every call well inside the server's deadline on a loaded machine.
    let mut cts: Vec<Vec<u8>> = Vec::new();
    for chunk in 0..4 {
        let items: Vec<_> = (0..100)
            .map(|i| item("shop", &format!("u{}", chunk * 100 + i), b"v"))
            .collect();
        let out = CryptoClient::new(chb.clone())
            .encrypt_batch(pb::EncryptBatchRequest { items })
            .await?
            .into_inner();
        cts.extend(out.results.into_iter().map(|r| match r.result {
            Some(pb::encrypt_result::Result::Ok(ok)) => ok.ciphertext.to_vec(),
            other => panic!("{other:?}"),
        }));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let traffic = {
        let chb = chb.clone();
        let stop = stop.clone();
        let cts = cts.clone();
        let rounds = rounds.clone();
        tokio::spawn(async move {
            let (mut ok, mut shredded) = (0u32, Vec::new());
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Live subjects u0..u199: decrypt and encrypt must always work.
                let i = n % 200;
                let s = format!("u{i}");
                decrypt(&chb, "shop", &s, &cts[i])
                    .await
                    .map_err(|e| anyhow::anyhow!("live {s}: {e}"))?;
                CryptoClient::new(chb.clone())
                    .encrypt(item("shop", &format!("new{n}"), b"v"))
                    .await
                    .map_err(|e| anyhow::anyhow!("new subject: {e}"))?;
                // Shred u200.. one by one.
                if n.is_multiple_of(5) && 200 + n / 5 < 400 {
                    let victim = format!("u{}", 200 + n / 5);
                    ErasuresClient::new(chb.clone())
                        .shred_subject(as_id(
                            ids::ERASURE,
                            pb::ShredSubjectRequest {
                                tenant_id: "shop".into(),
                                subject_id: victim.clone(),
                                grace_seconds: 0,
                            },
                        ))
                        .await
                        .map_err(|e| anyhow::anyhow!("shred {victim}: {e}"))?;
                    shredded.push(200 + n / 5);
                }
                ok += 1;
                n += 1;
                rounds.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>((ok, shredded))
        })
    };
    // Traffic flowing (a shred done) before the rolls, and still after them.
    let flowing = |at_least: usize| {
        let rounds = rounds.clone();
        common::eventually("traffic is flowing", Duration::from_secs(30), move || {
            let n = rounds.load(std::sync::atomic::Ordering::Relaxed);
            async move { (n >= at_least).then_some(n) }
        })
    };
    flowing(6).await;
    roll_to_end(&cha, false).await?;
    roll_to_end(&cha, false).await?;
    let after_rolls = rounds.load(std::sync::atomic::Ordering::Relaxed);
    flowing(after_rolls + 6).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, shredded) = traffic.await??;
    assert!(ok > 0 && !shredded.is_empty());
    let (_, v) = status(&cha).await?;
    every_epoch_active_or_sealed(&v)?;
    assert_eq!(v["active"].as_u64(), Some(3), "{v}");
    for i in shredded {
        let s = format!("u{i}");
        for ch in [&cha, &chb] {
            let e = decrypt(ch, "shop", &s, &cts[i]).await.unwrap_err();
            assert_eq!(
                (e.code(), common::grpc::reason(&e).as_str()),
                (tonic::Code::FailedPrecondition, "KEY_DESTROYED"),
                "{s}: {e}"
            );
        }
    }
    let pool = sqlx::PgPool::connect(&db.dsn).await?;
    let carried: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM fk_subjects WHERE state = 'destroyed' AND (wrapped IS NOT NULL OR swk_id IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(carried, 0, "a shredded key was carried into a new epoch");
    pool.close().await;
    drop((a, b));
    db.drop_db().await?;
    Ok(())
}

/// Copies the key store and the erasure ledger with `sqlite3 .backup` (a live,
/// consistent copy, as a backup agent would take it).
fn backup_files(data: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for f in ["keys.db", "erasure-ledger.db"] {
        let out = std::process::Command::new("sqlite3")
            .arg(data.join(f))
            .arg(format!(".backup '{}'", to.join(f).display()))
            .output()?;
        ensure!(
            out.status.success(),
            "sqlite3 .backup {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Puts files back into the data directory (the sidecar is stopped), dropping the
/// SQLite journals of the files they replace.
fn restore_files(from: &Path, data: &Path) -> Result<()> {
    for f in ["keys.db", "erasure-ledger.db"] {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(data.join(format!("{f}{suffix}")));
        }
        std::fs::copy(from.join(f), data.join(f))?;
    }
    Ok(())
}

/// The attack through real processes: the whole data directory's key store and ledger,
/// backed up before a shred of a subject and of a tenant and restored, revive both
/// before the roll, and neither after it (the local KMS's keys directory is beside the
/// data directory, not in its backup).
// Multi-threaded: a clean stop (blocking the test's thread) waits for our connections
// to close, which their tasks must be able to do meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_of_the_data_directory_revives_nobody_after_the_roll() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = write_config(dir.path(), "")?;
    let log = std::env::var("FIELDKEY_DEBUG_LOG").ok();
    let start = || {
        let b = Sidecar::builder()
            .any_port()
            .data_dir(&data)
            .config(&config);
        match &log {
            Some(l) => b.log_file(Path::new(l)).start(),
            None => b.start(),
        }
    };
    let sc = start();
    let ch = sc.channel().await;
    roll_to_end(&ch, false).await?;
    for t in ["acme", "gone"] {
        KeysClient::new(ch.clone())
            .create_tenant(as_id(
                ids::OPS,
                pb::CreateTenantRequest {
                    tenant_id: t.into(),
                    kms_key_id: String::new(),
                },
            ))
            .await?;
    }
    let encrypt = |t: &'static str, s: &'static str| {
        let ch = ch.clone();
        async move {
            Ok::<_, anyhow::Error>(
                CryptoClient::new(ch)
                    .encrypt(item(t, s, b"personal"))
                    .await?
                    .into_inner()
                    .ciphertext,
            )
        }
    };
    let alice = encrypt("acme", "alice").await?;
    let carol = encrypt("gone", "carol").await?;
    let backup = dir.path().join("backup");
    backup_files(&data, &backup)?;
    ErasuresClient::new(ch.clone())
        .shred_subject(as_id(
            ids::ERASURE,
            pb::ShredSubjectRequest {
                tenant_id: "acme".into(),
                subject_id: "alice".into(),
                grace_seconds: 0,
            },
        ))
        .await?;
    ErasuresClient::new(ch.clone())
        .shred_tenant(as_id(
            ids::ERASURE,
            pb::ShredTenantRequest {
                tenant_id: "gone".into(),
                grace_seconds: 0,
            },
        ))
        .await?;
    // A clean stop waits for open connections: close ours first.
    drop(ch);
    sc.stop();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live)?;
    for f in ["keys.db", "erasure-ledger.db"] {
        let out = std::process::Command::new("sqlite3")
            .arg(data.join(f))
            .arg(format!(".backup '{}'", live.join(f).display()))
            .output()?;
        ensure!(out.status.success());
    }

    // The attack: restore the whole backup, start: both come back.
    restore_files(&backup, &data)?;
    let sc = start();
    let ch = sc.channel().await;
    assert_eq!(
        decrypt(&ch, "acme", "alice", &alice).await?,
        b"personal",
        "the attack must be real"
    );
    assert_eq!(decrypt(&ch, "gone", "carol", &carol).await?, b"personal");
    drop(ch);
    sc.stop();

    // Back to the live store; the roll seals epoch 1.
    restore_files(&live, &data)?;
    let sc = start();
    let ch = sc.channel().await;
    let v = roll_to_end(&ch, false).await?;
    let e1 = v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["epoch"] == 1)
        .unwrap();
    assert_eq!(e1["state"], "sealed", "{v}");
    drop(ch);
    sc.stop();

    // The same backup, restored again: nobody revives.
    restore_files(&backup, &data)?;
    let sc = start();
    let ch = sc.channel().await;
    for (t, s, ct) in [("acme", "alice", &alice), ("gone", "carol", &carol)] {
        let e = decrypt(&ch, t, s, ct).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::FailedPrecondition,
            "{t}/{s} revived? {e}"
        );
    }
    drop(ch);
    sc.stop();
    Ok(())
}
