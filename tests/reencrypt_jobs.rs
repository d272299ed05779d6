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

use common::grpc::{as_id, ids};

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use fieldkey::crypto::{Aad, to_text};
use fieldkey::error::Error;
use fieldkey::keyring::{Keyring, KeyringConfig};
use fieldkey::store::{JobControl, JobProgress, JobState, KeyStore, SqlStore};
use sqlx::Executor as _;
use sqlx::postgres::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_fieldkey");
const PASSPHRASE: &str = "test passphrase 123";
const TENANTS: [&str; 2] = ["acme", "globex"];
/// Revalidation bound of the fixture's keyring.
const REVALIDATE: Duration = Duration::from_millis(200);

fn tenant_of(id: i64) -> &'static str {
    TENANTS[(id % 2) as usize]
}

/// Half the rows are subject-scoped (1000 users), half tenant-scoped.
fn subject_of(id: i64) -> Option<String> {
    (id % 4 < 2).then(|| format!("user-{}", id % 1000))
}

fn email_of(id: i64) -> String {
    format!("user{id}@example.com")
}

fn name_of(id: i64) -> String {
    format!("Name Number {id}")
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir_path: std::path::PathBuf,
    keys_db: common::PgDb,
    app_db: common::PgDb,
    keyring: Arc<Keyring>,
    store: Arc<dyn KeyStore>,
    kms: Arc<dyn fieldkey::kms::Kms>,
    app: PgPool,
}

impl Fixture {
    async fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(&dir)?;
        let keys_db = common::PgDb::create().await?;
        let app_db = common::PgDb::create().await?;
        let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&keys_db.dsn).await?);
        let keyring = Arc::new(Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig {
                revalidate_after: REVALIDATE,
                ..KeyringConfig::default()
            },
        ));
        for t in TENANTS {
            keyring.create_tenant(t, None).await?;
        }
        let app = sqlx::postgres::PgPoolOptions::new()
            .max_connections(6)
            .connect(&app_db.dsn)
            .await?;
        app.execute(
            "CREATE TABLE users (id BIGINT PRIMARY KEY, tenant_id TEXT NOT NULL, user_id TEXT, \
             email BYTEA, name TEXT)",
        )
        .await?;
        Ok(Self {
            dir_path: dir.path().to_owned(),
            _dir: dir,
            keys_db,
            app_db,
            keyring,
            store,
            kms,
            app,
        })
    }

    async fn seal(&self, id: i64, field: &str, value: &str) -> Vec<u8> {
        let subject = subject_of(id);
        let ctx = id.to_string();
        let aad = Aad {
            tenant: tenant_of(id),
            subject: subject.as_deref(),
            field,
            context: ctx.as_bytes(),
        };
        self.keyring.encrypt(&aad, value.as_bytes()).await.unwrap()
    }

    /// Inserts rows 1..=n, every third one with a NULL name.
    async fn populate(&self, n: i64) -> Result<()> {
        let mut id = 1;
        while id <= n {
            let end = (id + 4999).min(n);
            let (mut ids, mut tenants, mut subjects, mut emails, mut names) =
                (vec![], vec![], vec![], vec![], vec![]);
            for i in id..=end {
                ids.push(i);
                tenants.push(tenant_of(i).to_owned());
                subjects.push(subject_of(i));
                emails.push(self.seal(i, "email", &email_of(i)).await);
                names.push(if i % 3 == 0 {
                    None
                } else {
                    Some(to_text(&self.seal(i, "name", &name_of(i)).await))
                });
            }
            sqlx::query(
                "INSERT INTO users SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[], $5::text[])",
            )
            .bind(ids)
            .bind(tenants)
            .bind(subjects)
            .bind(emails)
            .bind(names)
            .execute(&self.app)
            .await?;
            id = end + 1;
        }
        Ok(())
    }

    fn spec(&self, name: &str, extra: &str) -> String {
        format!(
            r#"name = "{name}"
database_url_env = "FK_TEST_APP_DB"
table = "public.users"
primary_key = "id"
tenant_column = "tenant_id"
subject_column = "user_id"
context_column = "id"
{extra}
[[columns]]
name = "email"
field = "email"
[[columns]]
name = "name"
field = "name"
"#
        )
    }

    fn write_config(&self) -> std::path::PathBuf {
        let cfg = self.dir_path.join("fieldkey.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[store]\npostgres_url = {:?}\n[kms]\nlocal_key_file = {:?}\n",
                self.dir_path.display().to_string(),
                self.keys_db.dsn,
                self.dir_path.join("local-kms.json").display().to_string(),
            ),
        )
        .unwrap();
        cfg
    }

    fn runner_process(&self, spec: &Path, lease_secs: u32) -> std::process::Child {
        Command::new(BIN)
            .args(["jobs", "run", "--no-progress", "--lease-seconds"])
            .arg(lease_secs.to_string())
            .arg("--config")
            .arg(self.write_config())
            .arg(spec)
            .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
            .env("FK_TEST_APP_DB", &self.app_db.dsn)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    async fn progress(&self, job: &str) -> (JobState, JobProgress, Option<String>) {
        let j = self.store.get_job(job).await.unwrap().unwrap();
        (
            j.state,
            JobProgress::parse(&j.progress).unwrap(),
            j.checkpoint,
        )
    }

    /// Rows per key version of the email column.
    async fn versions(&self) -> HashMap<u32, i64> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT email FROM users")
            .fetch_all(&self.app)
            .await
            .unwrap();
        let mut out = HashMap::new();
        for (e,) in rows {
            let v = fieldkey::crypto::Envelope::parse(&e).unwrap().key_version();
            *out.entry(v).or_default() += 1;
        }
        out
    }

    /// Every row decrypts to its expected plaintext and is on `version`.
    async fn verify_all(&self, version: u32, overrides: &HashMap<i64, String>) -> Result<usize> {
        let rows: Vec<(i64, Option<Vec<u8>>, Option<String>)> =
            sqlx::query_as("SELECT id, email, name FROM users ORDER BY id")
                .fetch_all(&self.app)
                .await?;
        let mut checked = 0;
        for (id, email, name) in rows {
            let subject = subject_of(id);
            let ctx = id.to_string();
            let aad = |field| Aad {
                tenant: tenant_of(id),
                subject: subject.as_deref(),
                field,
                context: ctx.as_bytes(),
            };
            let (pt, v) = self
                .keyring
                .decrypt_versioned(&aad("email"), &email.unwrap())
                .await?;
            let want = overrides.get(&id).cloned().unwrap_or_else(|| email_of(id));
            assert_eq!(&pt[..], want.as_bytes(), "row {id} email");
            assert_eq!(v, version, "row {id} email version");
            checked += 1;
            match name {
                Some(n) => {
                    assert!(n.starts_with("fk1:"), "text columns stay text");
                    let (pt, v) = self
                        .keyring
                        .decrypt_versioned(&aad("name"), n.as_bytes())
                        .await?;
                    assert_eq!(&pt[..], name_of(id).as_bytes(), "row {id} name");
                    assert_eq!(v, version, "row {id} name version");
                    checked += 1;
                }
                None => assert_eq!(id % 3, 0, "row {id} lost its name"),
            }
        }
        Ok(checked)
    }

    async fn drop_dbs(self) -> Result<()> {
        self.app.close().await;
        self.keys_db.drop_db().await?;
        self.app_db.drop_db().await
    }
}

/// The application: keeps rewriting emails of rows in the batch the job is working on
/// (just past its checkpoint), with fresh ciphertexts, recording what it wrote.
fn start_app_writer(
    f: &Fixture,
    job: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<i64, String>> {
    let keyring = f.keyring.clone();
    let store = f.store.clone();
    let app = f.app.clone();
    tokio::spawn(async move {
        let written = Arc::new(Mutex::new(HashMap::new()));
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let cp = store
                .get_job(job)
                .await
                .ok()
                .flatten()
                .and_then(|j| j.checkpoint)
                .and_then(|c| c.parse::<i64>().ok())
                .unwrap_or(0);
            n += 1;
            let id = (cp + 1 + (n as i64 * 7919) % 500).min(100_000);
            let value = format!("changed-{n}@example.com");
            let subject = subject_of(id);
            let ctx = id.to_string();
            let aad = Aad {
                tenant: tenant_of(id),
                subject: subject.as_deref(),
                field: "email",
                context: ctx.as_bytes(),
            };
            let ct = keyring.encrypt(&aad, value.as_bytes()).await.unwrap();
            sqlx::query("UPDATE users SET email = $2 WHERE id = $1")
                .bind(id)
                .bind(ct)
                .execute(&app)
                .await
                .unwrap();
            written.lock().unwrap().insert(id, value);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Arc::try_unwrap(written).unwrap().into_inner().unwrap()
    })
}

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
