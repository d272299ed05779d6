//! Re-encryption jobs against the real PostgreSQL: a 100,000-row table with two
//! encrypted columns, application writes during the job, a runner killed with SIGKILL
//! half-way, two runners resuming at once; pause, cancel, leftovers and retirement.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::zombie_processes,
    reason = "test code fails by panicking"
)]

mod common;
#[path = "reencrypt_jobs/fixture.rs"]
mod fixture;

use fixture::*;

use common::grpc::{as_id, ids};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use fieldkey::crypto::Aad;
use fieldkey::error::Error;
use fieldkey::keyring::{Keyring, KeyringConfig};
use fieldkey::store::{JobControl, JobProgress, JobState};
use sqlx::postgres::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_survives_sigkill_and_concurrent_runners_without_losing_a_write() -> Result<()> {
    const ROWS: i64 = 100_000;
    let f = Fixture::new().await?;
    let t0 = Instant::now();
    f.populate(ROWS).await?;
    eprintln!("populated {ROWS} rows in {:?}", t0.elapsed());
    for t in TENANTS {
        assert_eq!(f.keyring.rotate_tenant(t).await?.active_version(), Some(2));
    }
    let spec = f.dir_path.join("users.toml");
    std::fs::write(
        &spec,
        f.spec(
            "users-v2",
            "batch_size = 1000\nrate_limit_rows_per_sec = 15000",
        ),
    )?;
    // a copy of a v1 ciphertext, as a stale backup would hold it
    let old: Vec<u8> = sqlx::query_scalar("SELECT email FROM users WHERE id = 1")
        .fetch_one(&f.app)
        .await?;
    // a row the application writes during the job is never overwritten by the job
    // past every replica's revalidation interval (the runner binary's is 1 s), as
    // retirement requires of the job that proves it
    for t in TENANTS {
        common::past_version_change(f.store.as_ref(), t, 1, Duration::from_secs(1)).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = start_app_writer(&f, "users-v2", stop.clone());

    // 1. first runner, killed with SIGKILL half-way
    let mut first = f.runner_process(&spec, 2);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(j) = f.store.get_job("users-v2").await? {
            let p = JobProgress::parse(&j.progress)?;
            if p.rows_scanned >= (ROWS as u64) / 2 {
                break;
            }
        }
        if let Some(status) = first.try_wait()? {
            let out = first.wait_with_output()?;
            panic!(
                "runner exited early: {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "runner made no progress");
    }
    first.kill()?; // SIGKILL
    first.wait()?;
    let (state, killed_at, checkpoint) = f.progress("users-v2").await;
    assert_eq!(
        state,
        JobState::Running,
        "a killed runner leaves the job running"
    );
    let cp: i64 = checkpoint.unwrap().parse()?;
    let split = f.versions().await;
    eprintln!(
        "killed at checkpoint {cp}: scanned {} rewrapped {} conflicts {}; email versions {split:?}",
        killed_at.rows_scanned, killed_at.values_rewrapped, killed_at.conflicts
    );
    assert!(split.get(&1).copied().unwrap_or(0) > 0 && split.get(&2).copied().unwrap_or(0) > 0);

    // 2. two runners started at once resume it: one works, the other stands by
    let a = f.runner_process(&spec, 2);
    let b = f.runner_process(&spec, 2);
    let (oa, ob) = tokio::task::spawn_blocking(move || {
        (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let overrides = writer.await?;
    for o in [&oa, &ob] {
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (state, done, _) = f.progress("users-v2").await;
    eprintln!(
        "resumed: {done:?}; application wrote {} rows",
        overrides.len()
    );
    assert_eq!(state, JobState::Completed);
    assert_eq!(
        done.runs, 2,
        "one run before the kill, one resumed run; the standby never ran"
    );
    assert!(
        done.rows_scanned < ROWS as u64 + 2 * 1000,
        "resumed from the checkpoint, not from the start: {}",
        done.rows_scanned
    );
    assert!(
        done.conflicts > 0,
        "the application wrote into batches in flight"
    );
    assert_eq!(done.values_failed, 0);
    assert!(done.leftovers.is_empty());
    let checked = f.verify_all(2, &overrides).await?;
    assert_eq!(checked as i64, ROWS + ROWS - ROWS / 3);

    // 3. with every ciphertext on v2, v1 can be retired; an old ciphertext then fails
    //    with a distinct error
    for t in TENANTS {
        let info = f.keyring.retire_key_version(t, 1).await?;
        assert_eq!(info.versions[0].state, fieldkey::store::KeyState::Retired);
    }
    let aad = Aad {
        tenant: tenant_of(1),
        subject: Some("user-1"),
        field: "email",
        context: b"1",
    };
    let e = f.keyring.decrypt(&aad, &old).await.unwrap_err();
    assert!(matches!(e, Error::KeyRetired { version: 1, .. }), "{e:?}");
    // subject keys that were wrapped under v1 moved to v2 and still decrypt
    f.verify_all(2, &overrides).await?;
    f.drop_dbs().await
}

/// Pause, resume and cancel through the job record; values that cannot be moved are
/// counted and block retirement; shredded values are left alone; a bad spec fails the
/// job with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_pause_resume_cancel_and_report_what_they_could_not_move() -> Result<()> {
    use fieldkey::jobs::{JobSpec, Runner, RunnerConfig};
    const ROWS: i64 = 2_000;
    let f = Fixture::new().await?;
    f.populate(ROWS).await?;
    for t in TENANTS {
        f.keyring.rotate_tenant(t).await?;
    }
    // row 5's email belongs to another row (moved ciphertext): it cannot authenticate
    sqlx::query("UPDATE users SET email = (SELECT email FROM users WHERE id = 9) WHERE id = 5")
        .execute(&f.app)
        .await?;
    // user-1's key is shredded: rows 1 and 1001 hold data nobody can read any more
    f.keyring.destroy_subject(tenant_of(1), "user-1").await?;
    // the job starts past the keyring's revalidation bound since the rotation
    for t in TENANTS {
        common::past_version_change(f.store.as_ref(), t, 1, REVALIDATE).await;
    }
    let db = PgPool::connect(&f.app_db.dsn).await?;
    let spec =
        JobSpec::from_toml(&f.spec("small", "batch_size = 100\nrate_limit_rows_per_sec = 2000"))?;
    let mut cfg = RunnerConfig::new(Duration::from_secs(5));
    cfg.poll = Duration::from_millis(50);
    let (runner, mut rx) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        spec.clone(),
        cfg.clone(),
    );
    let run = tokio::spawn(async move { runner.run().await });
    // operators follow it through a sidecar on the same key store (WatchJob stream)
    let watched = {
        use fieldkey::proto::pb;
        let server = common::sidecar::InProcess::start(
            fieldkey::wiring::Parts::new(f.keyring.clone(), f.store.clone(), f.kms.clone())
                .context(),
        )
        .await?;
        rx.wait_for(|p| p.rows_scanned > 0).await?;
        let mut c = pb::jobs_client::JobsClient::connect(server.url()).await?;
        let mut stream = c
            .watch_job(as_id(
                ids::OPS,
                pb::WatchJobRequest {
                    job_id: "small".into(),
                    interval_ms: 100,
                },
            ))
            .await?
            .into_inner();
        tokio::spawn(async move {
            let _server = server; // serves until the stream ends
            let mut seen = Vec::new();
            while let Some(j) = tokio_stream::StreamExt::next(&mut stream).await {
                let j = j.unwrap();
                seen.push((j.state, j.rows_scanned));
            }
            seen
        })
    };
    // pause once it has started; it must stop advancing
    rx.wait_for(|p| p.rows_scanned >= 300).await?;
    fieldkey::jobs::control(f.store.as_ref(), "small", JobControl::Pause).await?;
    let mut paused_at = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (state, p, _) = f.progress("small").await;
        if state == JobState::Paused {
            paused_at = Some(p.rows_scanned);
            break;
        }
    }
    let paused_at = paused_at.expect("runner never reported paused");
    // Not a wait for an effect: a paused job must show no progress over a while (ten
    // of the runner's 50 ms polls).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (state, p, _) = f.progress("small").await;
    assert_eq!(
        (state, p.rows_scanned),
        (JobState::Paused, paused_at),
        "paused jobs stand still"
    );
    // a second runner on a paused job stands by instead of taking it over
    let (second, _) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        spec.clone(),
        RunnerConfig::new(Duration::from_secs(5)),
    );
    let standby = tokio::spawn(async move { second.run().await });
    fieldkey::jobs::control(f.store.as_ref(), "small", JobControl::Run).await?;
    let outcome = run.await??;
    assert_eq!(outcome.state, JobState::Completed);
    let seen = watched.await?;
    eprintln!("watched: {} updates, last {:?}", seen.len(), seen.last());
    assert!(seen.iter().any(|(s, _)| s == "paused"), "{seen:?}");
    assert_eq!(seen.last(), Some(&("completed".to_owned(), ROWS as u64)));
    assert!(
        seen.windows(2).all(|w| w[0].1 <= w[1].1),
        "progress only grows"
    );
    let after = standby.await??;
    assert_eq!(
        after.state,
        JobState::Completed,
        "the standby sees the job done"
    );
    let p = outcome.progress;
    eprintln!("{p:?}");
    assert_eq!(p.runs, 1);
    assert_eq!(p.values_failed, 1, "the moved ciphertext");
    assert_eq!(p.values_shredded, 4, "email and name of rows 1 and 1001");
    assert_eq!(
        p.leftovers.get(tenant_of(5)).and_then(|m| m.get(&1)),
        Some(&1)
    );
    assert!(
        p.last_error
            .as_deref()
            .unwrap_or("")
            .contains("authentication failed")
    );
    // the leftover blocks retirement of v1 for that tenant only
    let e = f
        .keyring
        .retire_key_version(tenant_of(5), 1)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RetirementBlocked { .. }), "{e:?}");
    assert_ne!(tenant_of(4), tenant_of(5));
    f.keyring.retire_key_version(tenant_of(4), 1).await?;
    // finished jobs cannot be steered; a different spec under the same name is refused
    let e = fieldkey::jobs::control(f.store.as_ref(), "small", JobControl::Cancel)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::JobConflict { .. }), "{e:?}");
    let mut other = spec.clone();
    other.batch_size = 7;
    let (r, _) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        other,
        cfg.clone(),
    );
    assert!(matches!(r.run().await, Err(Error::JobConflict { .. })));

    // cancel: stops after the current batch, rows done stay done
    for t in TENANTS {
        f.keyring.rotate_tenant(t).await?;
    }
    for t in TENANTS {
        common::past_version_change(f.store.as_ref(), t, 2, REVALIDATE).await;
    }
    let spec3 =
        JobSpec::from_toml(&f.spec("to-v3", "batch_size = 100\nrate_limit_rows_per_sec = 1000"))?;
    let (runner, mut rx) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        spec3,
        cfg.clone(),
    );
    let run = tokio::spawn(async move { runner.run().await });
    rx.wait_for(|p| p.rows_scanned >= 200).await?;
    fieldkey::jobs::control(f.store.as_ref(), "to-v3", JobControl::Cancel).await?;
    let outcome = run.await??;
    assert_eq!(outcome.state, JobState::Cancelled);
    assert!(outcome.progress.rows_scanned < ROWS as u64);
    let v = f.versions().await;
    assert!(
        v.get(&3).copied().unwrap_or(0) > 0 && v.get(&2).copied().unwrap_or(0) > 0,
        "{v:?}"
    );

    // a spec naming a column the table does not have fails the job, with the reason
    let bad = JobSpec::from_toml(
        &f.spec("bad", "")
            .replace("name = \"email\"", "name = \"mail\""),
    )?;
    let (runner, _) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        bad.clone(),
        cfg.clone(),
    );
    let outcome = runner.run().await?;
    assert_eq!(outcome.state, JobState::Failed);
    let rec = f.store.get_job("bad").await?.unwrap();
    assert!(rec.error.unwrap_or_default().contains("no column mail"));
    // the operator fixes the cause and resumes the failed job; the next run finishes it
    sqlx::query("ALTER TABLE users RENAME COLUMN email TO mail")
        .execute(&f.app)
        .await?;
    let reopened = fieldkey::jobs::control(f.store.as_ref(), "bad", JobControl::Run).await?;
    assert_eq!(reopened.record.state, JobState::Pending);
    assert!(reopened.record.error.is_none());
    let (runner, _) = Runner::new(
        f.keyring.clone(),
        f.store.clone(),
        db.clone(),
        bad.clone(),
        cfg.clone(),
    );
    assert_eq!(runner.run().await?.state, JobState::Completed);
    // a rate limit whose per-batch wait could outlast the lease is refused up front
    let slow =
        JobSpec::from_toml(&f.spec("slow", "batch_size = 1000\nrate_limit_rows_per_sec = 10"))?;
    let (runner, _) = Runner::new(f.keyring.clone(), f.store.clone(), db.clone(), slow, cfg);
    let e = runner.run().await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(
        f.store.get_job("slow").await?.is_none(),
        "nothing was created"
    );
    db.close().await;
    f.drop_dbs().await
}

/// A batch that takes longer than the lease (a slow KMS) keeps its lease through the
/// heartbeat: a second runner stands by instead of taking the job over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_batch_keeps_its_lease() -> Result<()> {
    use fieldkey::jobs::{JobSpec, Runner, RunnerConfig};
    let f = Fixture::new().await?;
    f.populate(200).await?;
    for t in TENANTS {
        f.keyring.rotate_tenant(t).await?;
    }
    for t in TENANTS {
        common::past_version_change(f.store.as_ref(), t, 1, REVALIDATE).await;
    }
    // a fresh keyring whose every KMS unwrap takes 1.5 s: the first batch needs four
    let slow_kms = common::CountingKms::with_delay(f.kms.clone(), Duration::from_millis(1500));
    let slow = Arc::new(Keyring::new(
        f.store.clone(),
        slow_kms,
        KeyringConfig::default(),
    ));
    let db = PgPool::connect(&f.app_db.dsn).await?;
    let spec = JobSpec::from_toml(&f.spec("slow-kms", "batch_size = 100"))?;
    let mut cfg = RunnerConfig::new(Duration::from_secs(1));
    cfg.poll = Duration::from_millis(50);
    let (a, _) = Runner::new(slow, f.store.clone(), db.clone(), spec.clone(), cfg.clone());
    let t0 = Instant::now();
    let first = tokio::spawn(async move { a.run().await });
    // Not a wait for an effect: the second runner comes past the first one's 1 s lease,
    // which only its renewal during the slow batch keeps.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut cfg_b = RunnerConfig::new(Duration::from_secs(1));
    cfg_b.poll = Duration::from_millis(50);
    let (b, _) = Runner::new(f.keyring.clone(), f.store.clone(), db.clone(), spec, cfg_b);
    let second = tokio::spawn(async move { b.run().await });
    let oa = first.await??;
    let ob = second.await??;
    eprintln!("slow runner finished in {:?}", t0.elapsed());
    assert!(
        t0.elapsed() > Duration::from_secs(2),
        "the batch really outlasted the lease"
    );
    assert_eq!(oa.state, JobState::Completed);
    assert_eq!(ob.state, JobState::Completed, "the standby saw it done");
    assert_eq!(oa.progress.runs, 1, "the standby never took the job over");
    assert_eq!(oa.progress.rows_scanned, 200);
    f.verify_all(2, &HashMap::new()).await?;
    db.close().await;
    f.drop_dbs().await
}
