//! Sharded re-encryption (issue 21): four `fieldkey jobs run` processes on one
//! PostgreSQL table, each started as a Kubernetes Indexed Job starts its pods
//! (`JOB_COMPLETION_INDEX` picks the shard), under live application writes and random
//! SIGKILLs: killed runners come back after a back-off, as a Job's pods do, and one is
//! left dead for good, so that another runner must take its shard over.
//!
//! What must hold at the end: the job and each of its shards completed; the shards'
//! ranges are disjoint and cover every key; every row is on the new version and
//! decrypts to what was last written (no application write lost or overwritten); and
//! every row was moved by the job exactly once, by the shard whose range holds it (a
//! trigger records each job UPDATE of a row with the statement that made it, which
//! names the job's shard and runner); the job's counters are its shards' summed, no
//! larger than what the trigger saw and short of it by no more than the batches the
//! kills cut off; and the old version can be retired.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;
#[path = "reencrypt_jobs/fixture.rs"]
mod fixture;

use fixture::*;

use std::collections::HashMap;
use std::process::Child;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use fieldkey::crypto::Aad;
use fieldkey::store::{JobProgress, JobState};
use sqlx::Executor as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const ROWS: i64 = 24_000;
const SHARDS: u32 = 4;
const BATCH: u64 = 200;
const LEASE_SECS: u32 = 2;
/// The job's rate limit (each runner gets a quarter): it bounds how fast the job can
/// go, so that the kills below land while it is under way even on a fast machine.
const RATE: u64 = 4000;
/// The runner killed once and never started again.
const DEAD_FOR_GOOD: usize = 3;
/// The application's connections, told apart from the job's by the trigger.
const APP: &str = "app-writer";

fn rnd(n: u64) -> u64 {
    u64::from_le_bytes(common::rand_bytes::<8>()) % n.max(1)
}

/// The trigger: every UPDATE of a row of `users`, by whom (`application_name`) and by
/// which statement (the job's carries `/* fieldkey job=.. shard=.. runner=.. */`).
const MOVES: &str = r#"
CREATE TABLE moves (id BIGINT NOT NULL, app TEXT NOT NULL, query TEXT NOT NULL);
CREATE FUNCTION record_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO moves VALUES (NEW.id, current_setting('application_name'), left(current_query(), 300));
    RETURN NEW;
END $$;
CREATE TRIGGER users_moves AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION record_move();
"#;

/// `key=` followed by its value, up to the next space, in `text`.
fn tag<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    text[at..].split_whitespace().next()
}

/// The application: keeps rewriting the emails of rows just ahead of a random shard's
/// checkpoint (only rows with a name, so that every row still needs the job once), with
/// fresh ciphertexts under the active version, recording what it wrote.
fn start_writer(
    f: &Fixture,
    app: PgPool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<i64, String>> {
    let keyring = f.keyring.clone();
    let store = f.store.clone();
    tokio::spawn(async move {
        let mut written = HashMap::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let shards = store.job_shards("users-sharded").await.unwrap_or_default();
            let open: Vec<_> = shards.iter().filter(|s| !s.state.is_finished()).collect();
            if open.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let s = open[rnd(open.len() as u64) as usize];
            let from: i64 = s
                .checkpoint
                .as_ref()
                .or(s.lo.as_ref())
                .map_or(0, |c| c.parse().unwrap());
            let hi: i64 = s.hi.as_ref().map_or(ROWS, |h| h.parse().unwrap());
            let mut id = (from + 1 + rnd(BATCH) as i64).min(hi);
            if id % 3 == 0 {
                id -= 1; // rows without a name are left to the job alone
            }
            if id <= from {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            n += 1;
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
            written.insert(id, value);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        written
    })
}

/// One runner slot (an Indexed Job's index): its process, if running, and every pid it
/// ran under.
struct Slot {
    child: Option<Child>,
    pids: Vec<u32>,
    restart_at: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_runners_under_writes_and_sigkills_move_every_row_exactly_once() -> Result<()> {
    let t0 = Instant::now();
    let f = Fixture::new().await?;
    f.populate(ROWS).await?;
    eprintln!("populated {ROWS} rows in {:?}", t0.elapsed());
    for t in TENANTS {
        assert_eq!(f.keyring.rotate_tenant(t).await?.active_version(), Some(2));
    }
    f.app.execute(MOVES).await?;
    // past every replica's revalidation interval (the runner binary's is 1 s), as
    // retirement requires of the job that proves it
    for t in TENANTS {
        common::past_version_change(f.store.as_ref(), t, 1, Duration::from_secs(1)).await;
    }
    let spec = f.dir_path.join("users.toml");
    std::fs::write(
        &spec,
        f.spec(
            "users-sharded",
            &format!("batch_size = {BATCH}\nrate_limit_rows_per_sec = {RATE}\nshards = {SHARDS}"),
        ),
    )?;
    let app = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(PgConnectOptions::from_str(&f.app_db.dsn)?.application_name(APP))
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&f, app.clone(), stop.clone());

    let spawn = |i: usize| -> Child {
        f.runner_command(&spec, LEASE_SECS)
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .spawn()
            .unwrap()
    };
    let mut slots: Vec<Slot> = (0..SHARDS as usize)
        .map(|i| {
            let c = spawn(i);
            Slot {
                pids: vec![c.id()],
                child: Some(c),
                restart_at: None,
            }
        })
        .collect();
    let mut kills = 0u64;
    // Runners that stopped on their own after finding their lease taken (a stall
    // longer than the lease on a loaded machine): their last batches' counts are lost
    // as a killed runner's are.
    let mut self_stops = 0u64;
    let mut dead_for_good = false;
    let mut next_kill = Instant::now() + Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(100);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(Instant::now() < deadline, "the job did not finish in time");
        let job = f.store.get_job("users-sharded").await?;
        let (scanned, state) = job.as_ref().map_or((0, JobState::Pending), |j| {
            (
                JobProgress::parse(&j.progress).unwrap().rows_scanned,
                j.state,
            )
        });
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Some(c) = slot.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                let out = slot.child.take().unwrap().wait_with_output()?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !status.success() {
                    // Only a runner that lost a lease (a stall longer than the lease on
                    // a loaded machine) may stop on its own; a Job would start it again.
                    assert!(
                        stderr.contains("lost the lease"),
                        "runner {i} failed: {stderr}"
                    );
                    eprintln!("runner {i} stopped on its own: {stderr}");
                    self_stops += 1;
                    slot.restart_at = Some(Instant::now());
                }
            }
            if slot.restart_at.is_some_and(|at| Instant::now() >= at) && !state.is_finished() {
                slot.restart_at = None;
                let c = spawn(i);
                slot.pids.push(c.id());
                slot.child = Some(c);
            }
        }
        if state.is_finished() && slots.iter().all(|s| s.child.is_none()) {
            break;
        }
        // Random SIGKILLs while the job is under way (at least three, whatever the
        // machine's pace: the rate limit keeps the job longer than three kills' time):
        // the first one ends runner 3 for good once its shard has a checkpoint; the
        // others hit a random runner, restarted after a back-off of 0.3 to 0.8 s.
        if Instant::now() >= next_kill
            && !state.is_finished()
            && (scanned < (ROWS as u64) * 3 / 4 || kills < 3)
        {
            let shards = f.store.job_shards("users-sharded").await?;
            let victim = if !dead_for_good {
                (slots[DEAD_FOR_GOOD].child.is_some()
                    && shards
                        .get(DEAD_FOR_GOOD)
                        .is_some_and(|s| s.checkpoint.is_some() && !s.state.is_finished()))
                .then_some(DEAD_FOR_GOOD)
            } else {
                Some(rnd(3) as usize)
            };
            if let Some(v) = victim
                && let Some(mut c) = slots[v].child.take()
            {
                c.kill()?; // SIGKILL
                c.wait()?;
                kills += 1;
                eprintln!(
                    "{:?}: killed runner {v} at {scanned} rows scanned",
                    t0.elapsed()
                );
                if v == DEAD_FOR_GOOD {
                    dead_for_good = true;
                } else {
                    slots[v].restart_at =
                        Some(Instant::now() + Duration::from_millis(300 + rnd(500)));
                }
                next_kill = Instant::now() + Duration::from_millis(400 + rnd(800));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let overrides = writer.await?;
    eprintln!(
        "job done in {:?} with {kills} kills; the application wrote {} rows",
        t0.elapsed(),
        overrides.len()
    );
    assert!(kills >= 3, "the runs were cut {kills} times only");
    assert!(
        dead_for_good,
        "runner {DEAD_FOR_GOOD} was never killed for good"
    );

    // The job and every shard completed; the shards cover every key once.
    let job = f.store.get_job("users-sharded").await?.unwrap();
    assert_eq!(job.state, JobState::Completed, "{:?}", job.error);
    assert_eq!(job.shards, Some(SHARDS));
    let shards = f.store.job_shards("users-sharded").await?;
    assert_eq!(shards.len(), SHARDS as usize);
    assert!(shards.iter().all(|s| s.state == JobState::Completed));
    assert_eq!(shards[0].lo, None);
    assert_eq!(shards[SHARDS as usize - 1].hi, None);
    for w in shards.windows(2) {
        assert_eq!(w[0].hi, w[1].lo, "adjacent shards meet");
    }
    let bound = |b: &Option<String>| b.as_ref().map(|b| b.parse::<i64>().unwrap());
    let ranges: Vec<(Option<i64>, Option<i64>)> = shards
        .iter()
        .map(|s| (bound(&s.lo), bound(&s.hi)))
        .collect();
    for (lo, hi) in &ranges {
        if let (Some(lo), Some(hi)) = (lo, hi) {
            assert!(lo < hi, "non-empty, ordered: {ranges:?}");
        }
    }
    let shard_of = |id: i64| -> u32 {
        let holding: Vec<u32> = (0..SHARDS)
            .filter(|&i| {
                let (lo, hi) = ranges[i as usize];
                lo.is_none_or(|lo| id > lo) && hi.is_none_or(|hi| id <= hi)
            })
            .collect();
        assert_eq!(holding.len(), 1, "row {id} is in shards {holding:?}");
        holding[0]
    };
    eprintln!("shards: {ranges:?}");

    // Every row on v2, decrypting to what was last written.
    let checked = f.verify_all(2, &overrides).await?;
    assert_eq!(checked as i64, ROWS + ROWS - ROWS / 3);

    // Every row moved by the job exactly once, by the shard that holds it.
    let moves: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, query FROM moves WHERE app <> $1 ORDER BY id")
            .bind(APP)
            .fetch_all(&f.app)
            .await?;
    let mut per_row: HashMap<i64, Vec<(u32, String)>> = HashMap::new();
    for (id, q) in &moves {
        assert_eq!(tag(q, "job="), Some("users-sharded"), "{q}");
        let shard: u32 = tag(q, "shard=").unwrap().parse()?;
        let runner = tag(q, "runner=").unwrap().to_owned();
        per_row.entry(*id).or_default().push((shard, runner));
    }
    for id in 1..=ROWS {
        let m = per_row.get(&id).map_or(&[][..], Vec::as_slice);
        assert_eq!(m.len(), 1, "row {id} was moved {} times: {m:?}", m.len());
        assert_eq!(m[0].0, shard_of(id), "row {id} moved by shard {}", m[0].0);
    }
    assert_eq!(moves.len() as i64, ROWS);

    // The dead runner's shard was finished by another runner.
    let pid_of = |runner: &str| -> u32 { runner.split('/').nth(1).unwrap().parse().unwrap() };
    let slot_of = |pid: u32| slots.iter().position(|s| s.pids.contains(&pid)).unwrap();
    let takers: std::collections::BTreeSet<usize> = per_row
        .values()
        .flatten()
        .filter(|(s, _)| *s == DEAD_FOR_GOOD as u32)
        .map(|(_, r)| slot_of(pid_of(r)))
        .collect();
    eprintln!("shard {DEAD_FOR_GOOD} was moved by the runners of slots {takers:?}");
    assert!(
        takers.contains(&DEAD_FOR_GOOD) && takers.len() >= 2,
        "{takers:?}"
    );

    // The job's counters are its shards' summed; no larger than what was moved, short
    // of it by at most the batches cut off by each kill or lost lease (three: the one
    // whose checkpoint was being recorded, the one written, the one in flight).
    let total = JobProgress::parse(&job.progress)?;
    let parts: Vec<JobProgress> = shards
        .iter()
        .map(|s| JobProgress::parse(&s.progress).unwrap())
        .collect();
    let sum = |f: fn(&JobProgress) -> u64| parts.iter().map(f).sum::<u64>();
    assert_eq!(total.rows_updated, sum(|p| p.rows_updated));
    assert_eq!(total.rows_scanned, sum(|p| p.rows_scanned));
    assert_eq!(total.values_rewrapped, sum(|p| p.values_rewrapped));
    assert_eq!(total.conflicts, sum(|p| p.conflicts));
    assert_eq!(
        u64::from(total.runs),
        parts.iter().map(|p| u64::from(p.runs)).sum::<u64>()
    );
    assert!(
        parts[DEAD_FOR_GOOD].runs >= 2,
        "taken over: {:?}",
        parts[DEAD_FOR_GOOD]
    );
    assert!(total.rows_updated <= ROWS as u64);
    assert!(
        ROWS as u64 - total.rows_updated <= (kills + self_stops) * 3 * BATCH,
        "counted {} of {ROWS} moves after {kills} kills and {self_stops} lost leases",
        total.rows_updated
    );
    assert!(total.rows_scanned >= ROWS as u64);
    assert_eq!((total.values_failed, total.values_shredded), (0, 0));
    assert!(total.leftovers.is_empty());
    assert!(
        total.conflicts > 0,
        "the application wrote into batches in flight"
    );
    eprintln!("{total:?}");

    // The census proves the job: v1 retires.
    for t in TENANTS {
        f.keyring.retire_key_version(t, 1).await?;
    }
    app.close().await;
    f.drop_dbs().await
}

/// Planning is one runner's: while another holds the job's planning lock (here the
/// test, on the table's database), a runner plans nothing and waits; once the lock is
/// free it plans the job and runs it. (Without the lock every pod of an Indexed Job
/// sorts the key column at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_waits_while_another_plans_the_job() -> Result<()> {
    use sqlx::Connection as _;
    let f = Fixture::new().await?;
    f.populate(300).await?;
    for t in TENANTS {
        f.keyring.rotate_tenant(t).await?;
        common::past_version_change(f.store.as_ref(), t, 1, Duration::from_secs(1)).await;
    }
    let spec = f.dir_path.join("wait.toml");
    std::fs::write(&spec, f.spec("users-wait", "batch_size = 50\nshards = 2"))?;
    let mut planner = sqlx::PgConnection::connect(&f.app_db.dsn).await?;
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind("fieldkey job plan:users-wait")
        .execute(&mut planner)
        .await?;

    let mut runner = f
        .runner_command(&spec, 5)
        .env("JOB_COMPLETION_INDEX", "0")
        .spawn()?;
    let until = Instant::now() + Duration::from_secs(3);
    while f.store.get_job("users-wait").await?.is_none() {
        assert!(Instant::now() < until, "the runner did not create the job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(runner.try_wait()?.is_none(), "the runner stopped");
    assert!(
        f.store.job_shards("users-wait").await?.is_empty(),
        "planned while another runner held the planning lock"
    );

    planner.close().await?; // ends the session, and its lock
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = runner.try_wait()? {
            break s;
        }
        assert!(Instant::now() < until, "the runner did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = runner.wait_with_output()?;
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shards = f.store.job_shards("users-wait").await?;
    assert_eq!(shards.len(), 2);
    assert!(shards.iter().all(|s| s.state == JobState::Completed));
    f.drop_dbs().await
}
