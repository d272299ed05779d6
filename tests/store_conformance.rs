//! One conformance suite for the `KeyStore` trait, run against a real SQLite file and a
//! real PostgreSQL database.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::Arc;

use anyhow::Result;
use fieldkey::kms::WrappedKey;
use fieldkey::store::prelude::*;
use fieldkey::store::{
    JobControl, JobProgress, JobRecord, JobShardRecord, JobState, JobTotals, JobUpdate, KeyState,
    KeyStore, NewJob, NewKeyVersion, NewShard, NewSubject, SHARDED_OWNER, SqlStore, StoreError,
};

fn wrapped(tag: u8) -> WrappedKey {
    let mut v = common::rand_bytes::<40>().to_vec();
    v[0] = tag;
    WrappedKey::new(v)
}

fn nv(version: u32, tag: u8) -> NewKeyVersion {
    NewKeyVersion {
        version,
        kms_key_id: "kms-1".into(),
        epoch: None,
        wrapped: wrapped(tag),
    }
}

mod suite {
    use super::*;

    pub async fn create_tenant_is_insert_if_absent(s: Arc<dyn KeyStore>) -> Result<()> {
        let first = nv(1, 1);
        let created = s.create_tenant("t1", "kms-1", first.clone()).await?;
        assert!(created.was_created());
        let rec = created.into_inner();
        assert_eq!(rec.versions.len(), 1);
        assert_eq!(rec.versions[0].state, KeyState::Active);
        assert_eq!(rec.versions[0].wrapped.as_ref(), Some(&first.wrapped));
        assert_eq!(rec.versions[0].fingerprint, first.wrapped.fingerprint());
        let again = s.create_tenant("t1", "kms-other", nv(1, 2)).await?;
        assert!(!again.was_created());
        assert_eq!(
            again.into_inner(),
            rec,
            "existing tenant is returned unchanged"
        );
        assert!(s.get_tenant("nope").await?.is_none());
        Ok(())
    }

    pub async fn concurrent_creates_of_one_tenant_store_one_key(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.create_tenant("race", "kms-1", nv(1, i)).await
            }));
        }
        let mut created = 0;
        let mut seen = Vec::new();
        for t in tasks {
            let r = t.await??;
            created += usize::from(r.was_created());
            seen.push(r.into_inner());
        }
        assert_eq!(created, 1, "exactly one task creates the tenant");
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "every task sees the same key"
        );
        assert_eq!(s.get_tenant("race").await?.unwrap().versions.len(), 1);
        Ok(())
    }

    pub async fn rotation_demotes_previous_and_rejects_duplicate_versions(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        assert!(s.add_key_version("t", nv(2, 2)).await?);
        assert!(!s.add_key_version("t", nv(2, 3)).await?, "version 2 exists");
        let rec = s.get_tenant("t").await?.unwrap();
        let states: Vec<_> = rec.versions.iter().map(|v| (v.version, v.state)).collect();
        assert_eq!(
            states,
            vec![(1, KeyState::DecryptOnly), (2, KeyState::Active)]
        );
        assert_eq!(rec.active().map(|v| v.version), Some(2));
        assert_eq!(rec.latest_version(), 2);
        Ok(())
    }

    pub async fn concurrent_rotations_add_one_version(s: Arc<dyn KeyStore>) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.add_key_version("t", nv(2, i)).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await??);
        }
        assert_eq!(wins, 1);
        let rec = s.get_tenant("t").await?.unwrap();
        assert_eq!(rec.versions.len(), 2);
        assert_eq!(
            rec.versions
                .iter()
                .filter(|v| v.state == KeyState::Active)
                .count(),
            1
        );
        Ok(())
    }

    pub async fn state_changes_are_compare_and_set(s: Arc<dyn KeyStore>) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        assert!(
            s.update_key_state(
                "t",
                1,
                KeyState::Active,
                KeyState::Suspended,
                Some(KeyState::Active)
            )
            .await?
        );
        assert!(
            !s.update_key_state("t", 1, KeyState::Active, KeyState::Suspended, None)
                .await?
        );
        let v = s.get_tenant("t").await?.unwrap().versions[0].clone();
        assert_eq!(
            (v.state, v.resume_state),
            (KeyState::Suspended, Some(KeyState::Active))
        );
        assert!(
            s.update_key_state("t", 1, KeyState::Suspended, KeyState::Active, None)
                .await?
        );
        assert_eq!(
            s.get_tenant("t").await?.unwrap().versions[0].state,
            KeyState::Active
        );
        assert!(
            !s.update_key_state("t", 9, KeyState::Active, KeyState::Suspended, None)
                .await?
        );
        Ok(())
    }

    pub async fn destroyed_versions_keep_a_tombstone_and_never_come_back(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        let first = nv(1, 1);
        s.create_tenant("t", "kms-1", first.clone()).await?;
        assert!(s.destroy_key_version("t", 1).await?);
        assert!(!s.destroy_key_version("t", 1).await?, "idempotent");
        let v = s.get_tenant("t").await?.unwrap().versions[0].clone();
        assert_eq!(v.state, KeyState::Destroyed);
        assert!(v.wrapped.is_none(), "material erased");
        assert_eq!(
            v.fingerprint,
            first.wrapped.fingerprint(),
            "fingerprint kept"
        );
        assert!(matches!(
            s.update_key_state("t", 1, KeyState::Destroyed, KeyState::Active, None)
                .await,
            Err(StoreError::Misconfigured(_))
        ));
        Ok(())
    }

    pub async fn subjects_insert_if_absent_change_state_and_shred(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        let new = |b: u8| NewSubject {
            tenant_id: "t".into(),
            subject_id: "alice".into(),
            wrap_version: 1,
            swk_id: None,
            wrapped: vec![b; 73],
        };
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move { s.create_subject(new(i)).await }));
        }
        let mut created = 0;
        let mut seen = Vec::new();
        for t in tasks {
            let r = t.await??;
            created += usize::from(r.was_created());
            seen.push(r.into_inner());
        }
        assert_eq!(created, 1);
        assert!(seen.windows(2).all(|w| w[0] == w[1]));
        let rec = seen[0].clone();
        assert_eq!(rec.state, KeyState::Active);
        assert!(
            s.update_subject_state("t", "alice", KeyState::Active, KeyState::Suspended)
                .await?
        );
        assert!(
            !s.update_subject_state("t", "alice", KeyState::Active, KeyState::Suspended)
                .await?
        );
        assert!(
            s.update_subject_state("t", "alice", KeyState::Suspended, KeyState::Active)
                .await?
        );
        assert!(s.destroy_subject("t", "alice").await?);
        assert!(!s.destroy_subject("t", "alice").await?);
        let gone = s.get_subject("t", "alice").await?.unwrap();
        assert_eq!(gone.state, KeyState::Destroyed);
        assert!(gone.wrapped.is_none());
        assert_eq!(gone.fingerprint, rec.fingerprint);
        // a destroyed subject is not silently re-created
        let again = s.create_subject(new(99)).await?;
        assert!(!again.was_created());
        assert_eq!(again.into_inner().state, KeyState::Destroyed);
        assert!(s.get_subject("t", "bob").await?.is_none());
        Ok(())
    }

    pub async fn kek_rewrap_is_compare_and_set_and_keeps_the_fingerprint(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        let first = nv(1, 1);
        s.create_tenant("t", "kms-1", first.clone()).await?;
        let new = wrapped(9);
        assert!(
            !s.rewrap_key_version("t", 1, "kms-other", "kms-2", &new)
                .await?,
            "wrong expected KMS key: nothing changes"
        );
        assert!(s.rewrap_key_version("t", 1, "kms-1", "kms-2", &new).await?);
        assert!(
            !s.rewrap_key_version("t", 1, "kms-1", "kms-2", &new).await?,
            "second run is a no-op"
        );
        s.set_tenant_kms_key("t", "kms-2").await?;
        let rec = s.get_tenant("t").await?.unwrap();
        assert_eq!(rec.kms_key_id, "kms-2");
        let v = &rec.versions[0];
        assert_eq!(v.kms_key_id, "kms-2");
        assert_eq!(v.wrapped.as_ref(), Some(&new));
        assert_eq!(
            v.fingerprint,
            first.wrapped.fingerprint(),
            "the fingerprint names the version"
        );
        s.destroy_key_version("t", 1).await?;
        assert!(
            !s.rewrap_key_version("t", 1, "kms-2", "kms-3", &wrapped(3))
                .await?,
            "destroyed material is never written back"
        );
        assert!(
            s.get_tenant("t").await?.unwrap().versions[0]
                .wrapped
                .is_none()
        );
        Ok(())
    }

    pub async fn retirement_needs_decrypt_only_and_no_subject_keys(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        assert!(
            !s.retire_key_version("t", 1).await?,
            "the active version cannot retire"
        );
        s.create_subject(NewSubject {
            tenant_id: "t".into(),
            subject_id: "alice".into(),
            wrap_version: 1,
            swk_id: None,
            wrapped: vec![1; 73],
        })
        .await?;
        s.add_key_version("t", nv(2, 2)).await?;
        assert_eq!(s.subjects_wrapped_under("t", 1, 10).await?.len(), 1);
        assert!(
            !s.retire_key_version("t", 1).await?,
            "a subject key is still wrapped under v1"
        );
        assert!(
            !s.rewrap_subject("t", "alice", 2, 2, &[2; 73]).await?,
            "CAS on version"
        );
        assert!(s.rewrap_subject("t", "alice", 1, 2, &[2; 73]).await?);
        let alice = s.get_subject("t", "alice").await?.unwrap();
        assert_eq!((alice.wrap_version, alice.wrapped), (2, Some(vec![2; 73])));
        assert!(s.subjects_wrapped_under("t", 1, 10).await?.is_empty());
        assert!(s.retire_key_version("t", 1).await?);
        assert!(!s.retire_key_version("t", 1).await?, "idempotent");
        let v1 = s.get_tenant("t").await?.unwrap().versions[0].clone();
        assert_eq!((v1.state, v1.wrapped), (KeyState::Retired, None));
        let r = s
            .update_key_state("t", 1, KeyState::Retired, KeyState::Active, None)
            .await;
        assert!(
            matches!(&r, Err(StoreError::Misconfigured(m)) if m.contains("retired keys cannot change state")),
            "retired is terminal: {r:?}"
        );
        assert!(
            !s.destroy_key_version("t", 1).await?,
            "retired stays retired"
        );
        Ok(())
    }

    /// A stand-in for the jobs layer's totals: completed when every shard is, failed
    /// when every shard is finished and one failed; the rows scanned summed.
    fn totals(_: &JobRecord, shards: &[JobShardRecord], _: i64) -> JobTotals {
        let finished = shards.iter().all(|s| s.state.is_finished());
        let state = if finished && shards.iter().all(|s| s.state == JobState::Completed) {
            JobState::Completed
        } else if finished && shards.iter().any(|s| s.state == JobState::Failed) {
            JobState::Failed
        } else {
            JobState::Running
        };
        let rows: u64 = shards
            .iter()
            .map(|s| JobProgress::parse(&s.progress).unwrap().rows_scanned)
            .sum();
        JobTotals {
            state,
            progress: JobProgress {
                rows_scanned: rows,
                ..JobProgress::default()
            }
            .to_json(),
            checkpoint: shards.first().and_then(|s| s.checkpoint.clone()),
            error: shards.iter().find_map(|s| s.error.clone()),
        }
    }

    fn new_job(id: &str) -> NewJob {
        NewJob {
            job_id: id.into(),
            target: "public.users".into(),
            tenant_id: None,
            spec: "{}".into(),
            progress: JobProgress::default().to_json(),
        }
    }

    fn shard(lo: Option<&str>, hi: Option<&str>) -> NewShard {
        NewShard {
            lo: lo.map(str::to_owned),
            hi: hi.map(str::to_owned),
            state: JobState::Pending,
        }
    }

    pub async fn job_leases_are_exclusive_and_progress_needs_the_lease(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        assert!(s.create_job(new_job("j1")).await?.was_created());
        assert!(!s.create_job(new_job("j1")).await?.was_created());
        assert!(
            s.claim_job_shard("j1", 0, "a", 1_000, 2_000)
                .await?
                .is_none(),
            "nothing to claim before the job is planned"
        );
        // planned once: a second planner (or a second plan) changes nothing
        let plan = [shard(None, Some("100")), shard(Some("100"), None)];
        assert!(s.plan_job("j1", &plan, 500).await?);
        assert!(!s.plan_job("j1", &[shard(None, None)], 600).await?);
        assert_eq!(s.get_job("j1").await?.unwrap().shards, Some(2));
        let shards = s.job_shards("j1").await?;
        let ranges: Vec<_> = shards
            .iter()
            .map(|x| (x.shard, x.lo.as_deref(), x.hi.as_deref(), x.state))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (0, None, Some("100"), JobState::Pending),
                (1, Some("100"), None, JobState::Pending)
            ]
        );
        let a = s
            .claim_job_shard("j1", 0, "a", 1_000, 2_000)
            .await?
            .unwrap();
        assert_eq!(
            (a.state, a.owner.as_deref()),
            (JobState::Running, Some("a"))
        );
        let job = s.get_job("j1").await?.unwrap();
        assert_eq!(
            (job.state, job.started_at),
            (JobState::Running, Some(1_000))
        );
        assert!(
            s.claim_job_shard("j1", 0, "b", 1_500, 2_500)
                .await?
                .is_none(),
            "a's lease is still good"
        );
        assert!(
            s.claim_job_shard("j1", 1, "b", 1_500, 2_500)
                .await?
                .is_some(),
            "the other shard is free"
        );
        assert!(
            !s.renew_job_shard_lease("j1", 0, "b", 9_999).await?,
            "only the holder renews"
        );
        assert!(s.renew_job_shard_lease("j1", 0, "a", 2_000).await?);
        let upd = |state, cp: &str, rows: u64| JobUpdate {
            state,
            checkpoint: Some(cp.into()),
            progress: JobProgress {
                rows_scanned: rows,
                ..JobProgress::default()
            }
            .to_json(),
            error: None,
            lease_until: i64::MAX,
        };
        assert_eq!(
            s.update_job_shard("j1", 0, "b", upd(JobState::Running, "x", 1), &totals)
                .await?,
            None
        );
        assert_eq!(
            s.update_job_shard("j1", 0, "a", upd(JobState::Running, "10", 10), &totals)
                .await?,
            Some(JobControl::Run),
            "the holder learns what operators want"
        );
        assert_eq!(
            s.update_job_shard("j1", 1, "b", upd(JobState::Running, "110", 5), &totals)
                .await?,
            Some(JobControl::Run)
        );
        // the job's totals are written with every shard update
        let job = s.get_job("j1").await?.unwrap();
        assert_eq!(JobProgress::parse(&job.progress)?.rows_scanned, 15);
        assert_eq!(job.checkpoint.as_deref(), Some("10"));
        // a's renewed lease holds
        assert!(
            s.claim_job_shard("j1", 0, "b", 3_000, 4_000)
                .await?
                .is_none()
        );
        // once a's lease has run out, b takes its shard over; a can no longer write
        let a_short = JobUpdate {
            lease_until: 5_000,
            ..upd(JobState::Running, "20", 10)
        };
        assert!(
            s.update_job_shard("j1", 0, "a", a_short, &totals)
                .await?
                .is_some()
        );
        let b = s
            .claim_job_shard("j1", 0, "b", 6_000, 7_000)
            .await?
            .unwrap();
        assert_eq!(b.checkpoint.as_deref(), Some("20"));
        assert_eq!(JobProgress::parse(&b.progress)?.rows_scanned, 10);
        assert_eq!(
            s.update_job_shard("j1", 0, "a", upd(JobState::Running, "30", 10), &totals)
                .await?,
            None
        );
        assert!(s.set_job_control("j1", JobControl::Pause).await?);
        assert_eq!(s.get_job("j1").await?.unwrap().control, JobControl::Pause);
        assert_eq!(
            s.update_job_shard("j1", 0, "b", upd(JobState::Paused, "35", 10), &totals)
                .await?,
            Some(JobControl::Pause)
        );
        assert!(
            s.update_job_shard("j1", 0, "b", upd(JobState::Completed, "40", 12), &totals)
                .await?
                .is_some()
        );
        let half = s.get_job("j1").await?.unwrap();
        assert_eq!(half.state, JobState::Running, "one shard is still running");
        assert!(half.finished_at.is_none());
        assert!(
            s.update_job_shard("j1", 1, "b", upd(JobState::Completed, "200", 7), &totals)
                .await?
                .is_some()
        );
        let done = s.get_job("j1").await?.unwrap();
        assert_eq!(done.state, JobState::Completed);
        assert_eq!(JobProgress::parse(&done.progress)?.rows_scanned, 19);
        assert!(done.owner.as_deref() == Some(SHARDED_OWNER) && done.finished_at.is_some());
        assert!(
            s.job_shards("j1")
                .await?
                .iter()
                .all(|x| x.owner.is_none() && x.lease_until.is_none() && x.finished_at.is_some())
        );
        assert!(
            s.claim_job_shard("j1", 1, "c", 9_000, 10_000)
                .await?
                .is_none(),
            "finished"
        );
        assert!(!s.set_job_control("j1", JobControl::Run).await?);
        assert_eq!(s.list_jobs().await?.len(), 1);
        assert!(s.get_job("nope").await?.is_none());

        // a failed shard fails the job once the others are done; resuming reopens it
        s.create_job(new_job("j2")).await?;
        assert!(s.plan_job("j2", &[shard(None, None)], 1).await?);
        s.claim_job_shard("j2", 0, "a", 1_000, 2_000)
            .await?
            .unwrap();
        let failed = JobUpdate {
            error: Some("no column mail".into()),
            ..upd(JobState::Failed, "5", 5)
        };
        s.update_job_shard("j2", 0, "a", failed, &totals).await?;
        let j2 = s.get_job("j2").await?.unwrap();
        assert_eq!(j2.state, JobState::Failed);
        assert_eq!(j2.error.as_deref(), Some("no column mail"));
        assert!(s.set_job_control("j2", JobControl::Run).await?);
        let j2 = s.get_job("j2").await?.unwrap();
        assert_eq!((j2.state, j2.error), (JobState::Pending, None));
        let sh = s.job_shards("j2").await?;
        assert_eq!(
            (
                sh[0].state,
                sh[0].owner.as_deref(),
                sh[0].checkpoint.as_deref()
            ),
            (JobState::Pending, None, Some("5")),
            "reopened where it stopped"
        );
        assert!(
            s.claim_job_shard("j2", 0, "b", 3_000, 4_000)
                .await?
                .is_some()
        );
        assert!(
            !s.fail_unplanned_job("j2", "x", 5_000).await?,
            "a planned job fails through its shards"
        );
        // a job that cannot be planned fails as a whole
        s.create_job(new_job("j3")).await?;
        assert!(s.fail_unplanned_job("j3", "no column mail", 1).await?);
        let j3 = s.get_job("j3").await?.unwrap();
        assert_eq!(
            (j3.state, j3.error.as_deref()),
            (JobState::Failed, Some("no column mail"))
        );
        assert!(
            !s.plan_job("j3", &[shard(None, None)], 2).await?,
            "a finished job is not planned"
        );
        Ok(())
    }

    pub async fn tenants_are_listed(s: Arc<dyn KeyStore>) -> Result<()> {
        for t in ["b", "a", "c"] {
            s.create_tenant(t, "kms-1", nv(1, 1)).await?;
        }
        assert_eq!(s.list_tenants().await?, vec!["a", "b", "c"]);
        s.ping().await?;
        Ok(())
    }
}

/// Each test of `$suite` named, once on a fresh SQLite store (module `$sqlite`, the
/// fixture `$on_sqlite(&tempdir)`) and once on a fresh PostgreSQL database (module
/// `$postgres`, the fixture `$on_postgres(&db)`), which is dropped afterwards.
macro_rules! on_both_stores {
    ($suite:ident: $sqlite:ident($on_sqlite:path), $postgres:ident($on_postgres:path);
     $($name:ident),* $(,)?) => {
        mod $sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> Result<()> {
                    let dir = tempfile::tempdir()?;
                    $suite::$name($on_sqlite(&dir).await?).await
                }
            )*
        }
        mod $postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> Result<()> {
                    let db = common::PgDb::create().await?;
                    $suite::$name($on_postgres(&db).await?).await?;
                    db.drop_db().await
                }
            )*
        }
    };
}

async fn postgres_store(db: &common::PgDb) -> Result<Arc<dyn KeyStore>> {
    Ok(Arc::new(SqlStore::connect_postgres(&db.dsn).await?))
}

on_both_stores!(
    suite: sqlite(common::sqlite_store), postgres(postgres_store);
    create_tenant_is_insert_if_absent,
    concurrent_creates_of_one_tenant_store_one_key,
    rotation_demotes_previous_and_rejects_duplicate_versions,
    concurrent_rotations_add_one_version,
    state_changes_are_compare_and_set,
    destroyed_versions_keep_a_tombstone_and_never_come_back,
    subjects_insert_if_absent_change_state_and_shred,
    tenants_are_listed,
    kek_rewrap_is_compare_and_set_and_keeps_the_fingerprint,
    retirement_needs_decrypt_only_and_no_subject_keys,
    job_leases_are_exclusive_and_progress_needs_the_lease,
);

/// A key store written by the previous schema (0001 only) keeps every key, state and
/// tombstone through migration 0002, which rebuilds `fk_tenant_keys` on SQLite.
#[tokio::test]
async fn sqlite_upgrade_from_schema_1_keeps_every_key() -> Result<()> {
    use sqlx::Executor as _;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    // A store as the previous release left it: only migration 0001 applied.
    let v1_dir = dir.path().join("v1");
    std::fs::create_dir(&v1_dir)?;
    std::fs::write(
        v1_dir.join("0001_keys.sql"),
        include_str!("../src/store/migrations/sqlite/0001_keys.sql"),
    )?;
    {
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
        sqlx::migrate::Migrator::new(v1_dir.as_path())
            .await?
            .run(&pool)
            .await?;
        pool.execute(
            "INSERT INTO fk_tenants VALUES ('t', 'kms-1', 1); \
             INSERT INTO fk_tenant_keys VALUES ('t', 1, 'destroyed', NULL, 'kms-1', NULL, zeroblob(32), 1, 2); \
             INSERT INTO fk_tenant_keys VALUES ('t', 2, 'suspended', 'decrypt-only', 'kms-1', x'0203', zeroblob(32), 3, 4); \
             INSERT INTO fk_tenant_keys VALUES ('t', 3, 'active', NULL, 'kms-1', x'0405', zeroblob(32), 5, 6);",
        )
        .await?;
        pool.close().await;
    }
    let s = SqlStore::open_sqlite(&path).await?;
    let rec = s.get_tenant("t").await?.unwrap();
    let got: Vec<_> = rec
        .versions
        .iter()
        .map(|v| (v.version, v.state, v.resume_state, v.wrapped.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, KeyState::Destroyed, None, None),
            (
                2,
                KeyState::Suspended,
                Some(KeyState::DecryptOnly),
                Some(WrappedKey::new(vec![2, 3]))
            ),
            (3, KeyState::Active, None, Some(WrappedKey::new(vec![4, 5]))),
        ]
    );
    // the rebuilt table keeps its rules: one active version, retirement only from
    // decrypt-only, and the new job table exists
    assert!(
        s.add_key_version("t", nv(3, 9))
            .await
            .is_ok_and(|added| !added)
    );
    assert!(!s.retire_key_version("t", 2).await?);
    s.update_key_state("t", 2, KeyState::Suspended, KeyState::DecryptOnly, None)
        .await?;
    assert!(s.retire_key_version("t", 2).await?);
    s.create_job(NewJob {
        job_id: "j".into(),
        target: "x".into(),
        tenant_id: None,
        spec: "{}".into(),
        progress: "{}".into(),
    })
    .await?;
    Ok(())
}

/// A job that a runner of the version before shards was working on (its lease and
/// checkpoint in `fk_jobs`) gets its one shard, with that checkpoint and its counters,
/// once that runner's lease has run out, and not before.
#[tokio::test]
async fn a_job_from_before_shards_resumes_from_its_checkpoint_once_the_old_lease_ran_out()
-> Result<()> {
    use sqlx::Executor as _;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    // A store as the previous release left it: migrations 0001..=0004.
    let old_dir = dir.path().join("old");
    std::fs::create_dir(&old_dir)?;
    let migrations =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/migrations/sqlite");
    for f in [
        "0001_keys.sql",
        "0002_rotation_jobs.sql",
        "0003_erasure_audit.sql",
        "0004_epochs.sql",
    ] {
        std::fs::copy(migrations.join(f), old_dir.join(f))?;
    }
    {
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
        sqlx::migrate::Migrator::new(old_dir.as_path())
            .await?
            .run(&pool)
            .await?;
        pool.execute(
            "INSERT INTO fk_jobs (job_id, target, tenant_id, spec, state, control, owner, \
                 lease_until, checkpoint, progress, error, created_at, started_at, updated_at, \
                 finished_at) \
             VALUES ('old', 'E:public.users', NULL, '{}', 'running', 'run', 'old-runner', 5000, \
                 '42', '{\"rows_scanned\":42,\"runs\":1}', NULL, 1, 2, 3, NULL)",
        )
        .await?;
        pool.close().await;
    }
    let s = SqlStore::open_sqlite(&path).await?;
    let one = [NewShard {
        lo: None,
        hi: None,
        state: JobState::Pending,
    }];
    assert!(
        !s.plan_job("old", &one, 4_000).await?,
        "the old runner's lease is still good"
    );
    assert!(s.job_shards("old").await?.is_empty());
    assert!(s.plan_job("old", &one, 6_000).await?);
    let shards = s.job_shards("old").await?;
    assert_eq!(shards.len(), 1);
    assert_eq!(shards[0].checkpoint.as_deref(), Some("42"));
    assert_eq!(JobProgress::parse(&shards[0].progress)?.rows_scanned, 42);
    let job = s.get_job("old").await?.unwrap();
    assert_eq!(
        (job.owner.as_deref(), job.lease_until, job.shards),
        (Some(SHARDED_OWNER), Some(i64::MAX), Some(1))
    );
    // A runner of the version before shards (a rolling upgrade) tries to claim the job
    // with its own statement (as that release had it): the planned job is not its to run.
    {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
        let claimed = sqlx::query(
            "UPDATE fk_jobs SET owner = $2, lease_until = $4, updated_at = $3, \
                 started_at = COALESCE(started_at, $3), \
                 state = CASE WHEN state = 'pending' THEN 'running' ELSE state END \
             WHERE job_id = $1 AND state IN ('pending', 'running', 'paused') \
             AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until < $3)",
        )
        .bind("old")
        .bind("old-runner-2")
        .bind(7_000_i64)
        .bind(9_000_i64)
        .execute(&pool)
        .await?
        .rows_affected();
        assert_eq!(claimed, 0, "an old runner claimed a sharded job");
        pool.close().await;
    }
    assert!(
        s.claim_job_shard("old", 0, "new", 6_000, 9_000)
            .await?
            .is_some()
    );
    Ok(())
}

/// A statement PostgreSQL refuses (insufficient privilege, SQLSTATE 42501) is a query
/// failure, not an outage to retry: SQLite's numeric busy codes are not read into
/// PostgreSQL's SQLSTATEs.
#[tokio::test]
async fn a_postgres_permission_error_is_a_query_failure_not_an_outage() -> Result<()> {
    use sqlx::{Connection as _, Executor as _};
    let db = common::PgDb::create().await?;
    SqlStore::connect_postgres(&db.dsn).await?; // schema created by the owner
    let role = format!("fk_noperm_{}", hex::encode(common::rand_bytes::<4>()));
    {
        let mut admin = sqlx::PgConnection::connect(&db.dsn).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
            .await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
                 GRANT SELECT ON _sqlx_migrations TO {role}"
            )))
            .await?;
    }
    let (scheme, rest) = db.dsn.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    let limited = SqlStore::connect_postgres(&format!("{scheme}://{role}@{host}")).await?;
    let r = limited.get_tenant("t").await;
    assert!(matches!(r, Err(StoreError::Database(_))), "{r:?}");
    drop(limited);
    db.drop_db().await?;
    let mut base = sqlx::PgConnection::connect(&common::pg_base_dsn()).await?;
    base.execute(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .await?;
    Ok(())
}

// ------------------------------------------------------------------ erasure, audit, ledger

/// What the erasure conformance tests need besides the store: a raw connection pool to
/// the same database (for statements fieldkey never runs) and an erasure ledger of the
/// same backend.
struct ErasureCtx {
    store: Arc<dyn KeyStore>,
    raw: sqlx::AnyPool,
    ledger: fieldkey::store::ErasureLedger,
}

mod erasure_suite {
    use super::*;
    use fieldkey::audit::{AuditEvent, GENESIS, verify_chain};
    use fieldkey::store::{Created, ErasureState, LedgerEntry, NewErasure};

    fn event(action: &str, n: usize) -> AuditEvent {
        AuditEvent {
            action: action.into(),
            resource_type: "subject".into(),
            resource_id: format!("user-{n}"),
            actor: "spiffe://example.org/test".into(),
            tenant_id: Some("t".into()),
            caller_ip: None,
            details: serde_json::json!({ "n": n }),
        }
    }

    fn new_erasure(id: &str, tenant: &str, subject: Option<&str>) -> NewErasure {
        NewErasure {
            erasure_id: id.into(),
            tenant_id: tenant.into(),
            subject_id: subject.map(str::to_owned),
            requested_by: "dpo".into(),
            requested_at: 1_000,
            execute_after: 2_000,
            state: ErasureState::Scheduled,
        }
    }

    pub async fn concurrent_audit_appends_form_one_chain_without_gaps(c: ErasureCtx) -> Result<()> {
        let mut tasks = Vec::new();
        for t in 0..4usize {
            let s = c.store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..25usize {
                    let rec = s.append_audit(&event("test.append", t * 100 + i)).await?;
                    seqs.push(rec.seq);
                }
                Ok::<_, StoreError>(seqs)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await??;
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "one task's appends are in order"
            );
            all.extend(seqs);
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=100).collect::<Vec<u64>>(),
            "seqs 1..=100, no gaps"
        );
        let records = c.store.audit_records(0, 1000).await?;
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<u64>>()
        );
        assert_eq!(verify_chain(&records, 0, GENESIS)?.0, 100);
        // every event made it, once
        let mut ns: Vec<u64> = records
            .iter()
            .map(|r| r.event.details["n"].as_u64().unwrap())
            .collect();
        ns.sort_unstable();
        ns.dedup();
        assert_eq!(ns.len(), 100);
        // paging
        let page = c.store.audit_records(40, 10).await?;
        assert_eq!(
            page.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (41..=50).collect::<Vec<u64>>()
        );
        verify_chain(&page, 40, records[39].hash)?;
        Ok(())
    }

    pub async fn the_audit_table_refuses_update_and_delete(c: ErasureCtx) -> Result<()> {
        for i in 0..3 {
            c.store.append_audit(&event("test.append", i)).await?;
        }
        let before = c.store.audit_records(0, 100).await?;
        for sql in [
            "UPDATE fk_audit SET actor = 'mallory' WHERE seq = 2",
            "UPDATE fk_audit SET details = '{}'",
            "DELETE FROM fk_audit WHERE seq = 3",
            "DELETE FROM fk_audit",
        ] {
            let r = sqlx::query(sql).execute(&c.raw).await;
            let err = r.expect_err(sql);
            assert!(
                err.to_string().contains("append-only"),
                "{sql}: refused by the trigger, got {err}"
            );
        }
        let after = c.store.audit_records(0, 100).await?;
        assert_eq!(after, before, "nothing changed");
        verify_chain(&after, 0, GENESIS)?;
        // appending still works after the refusals
        let next = c.store.append_audit(&event("test.append", 9)).await?;
        assert_eq!(next.seq, 4);
        assert_eq!(next.prev_hash, before[2].hash);
        Ok(())
    }

    pub async fn one_live_erasure_per_target(c: ErasureCtx) -> Result<()> {
        let s = &c.store;
        let ev = event("erasure.requested", 0);
        let first = s
            .create_erasure(new_erasure("er-1", "t", Some("alice")), Some(&ev))
            .await?;
        assert!(first.was_created());
        let first = first.into_inner();
        assert_eq!(first.state, ErasureState::Scheduled);
        let second = s
            .create_erasure(new_erasure("er-2", "t", Some("alice")), Some(&ev))
            .await?;
        assert_eq!(
            second,
            Created::Existing(first.clone()),
            "the first, live request is returned"
        );
        assert!(s.get_erasure("er-2").await?.is_none());
        assert_eq!(
            s.audit_records(0, 100).await?.len(),
            1,
            "the event is appended only by the call that created the request"
        );
        // same id again: that request
        let same = s
            .create_erasure(new_erasure("er-1", "t", Some("bob")), None)
            .await?;
        assert_eq!(same, Created::Existing(first.clone()));
        // other targets are independent: the tenant itself, another tenant's alice
        assert!(
            s.create_erasure(new_erasure("er-3", "t", None), None)
                .await?
                .was_created()
        );
        assert!(
            s.create_erasure(new_erasure("er-4", "u", Some("alice")), None)
                .await?
                .was_created()
        );
        let dup_tenant = s
            .create_erasure(new_erasure("er-5", "t", None), None)
            .await?;
        assert!(!dup_tenant.was_created());
        assert_eq!(dup_tenant.into_inner().erasure_id, "er-3");
        assert_eq!(
            s.live_erasure("t", Some("alice"))
                .await?
                .unwrap()
                .erasure_id,
            "er-1"
        );
        assert_eq!(s.live_erasure("t", None).await?.unwrap().erasure_id, "er-3");
        // once cancelled, a new request for the target can be made
        // its execution time (1970) has passed: no longer cancellable by a caller...
        assert!(!s.cancel_erasure("er-1", "dpo", &ev, true).await?);
        // ...but reconciliation with the ledger may still cancel it
        assert!(s.cancel_erasure("er-1", "dpo", &ev, false).await?);
        assert!(
            !s.cancel_erasure("er-1", "dpo", &ev, false).await?,
            "already cancelled"
        );
        let again = s
            .create_erasure(new_erasure("er-6", "t", Some("alice")), None)
            .await?;
        assert!(again.was_created());
        assert_eq!(
            s.live_erasure("t", Some("alice"))
                .await?
                .unwrap()
                .erasure_id,
            "er-6"
        );
        assert_eq!(
            s.get_erasure("er-1").await?.unwrap().state,
            ErasureState::Cancelled
        );
        let ids: Vec<String> = s
            .list_erasures(Some("t"), "", 100)
            .await?
            .into_iter()
            .map(|r| r.erasure_id)
            .collect();
        assert_eq!(ids, vec!["er-1", "er-3", "er-6"]);
        Ok(())
    }

    fn entry(
        id: &str,
        tenant: &str,
        subject: Option<&str>,
        state: ErasureState,
        at: i64,
    ) -> LedgerEntry {
        LedgerEntry {
            erasure_id: id.into(),
            tenant_id: tenant.into(),
            subject_id: subject.map(str::to_owned),
            state,
            requested_by: "dpo".into(),
            requested_at: 1_000,
            execute_after: at,
        }
    }

    pub async fn the_ledger_never_moves_back_and_knows_what_was_erased(
        c: ErasureCtx,
    ) -> Result<()> {
        use ErasureState::{Cancelled, Completed, Executing, Scheduled};
        let l = &c.ledger;
        let state_of = |entries: &[LedgerEntry], id: &str| {
            entries
                .iter()
                .find(|e| e.erasure_id == id)
                .map(|e| (e.state, e.execute_after))
        };

        // Completed, then a late Scheduled: still completed.
        l.record(&entry("er-a", "t", Some("alice"), Completed, 5_000))
            .await?;
        l.record(&entry("er-a", "t", Some("alice"), Scheduled, 4_000))
            .await?;
        l.record(&entry("er-a", "t", Some("alice"), Executing, 4_000))
            .await?;
        // Scheduled: a later time does not replace an earlier one; an earlier one does.
        l.record(&entry("er-b", "t", Some("bob"), Scheduled, 5_000))
            .await?;
        l.record(&entry("er-b", "t", Some("bob"), Scheduled, 9_000))
            .await?;
        let e = l.entries("", 100).await?;
        assert_eq!(state_of(&e, "er-a"), Some((Completed, 5_000)));
        assert_eq!(state_of(&e, "er-b"), Some((Scheduled, 5_000)));
        l.record(&entry("er-b", "t", Some("bob"), Scheduled, 3_000))
            .await?;
        assert_eq!(
            state_of(&l.entries("", 100).await?, "er-b"),
            Some((Scheduled, 3_000))
        );
        // Cancelled is final for a request that never ran.
        l.record(&entry("er-c", "t", Some("carol"), Scheduled, 5_000))
            .await?;
        l.record(&entry("er-c", "t", Some("carol"), Cancelled, 5_000))
            .await?;
        l.record(&entry("er-c", "t", Some("carol"), Scheduled, 1_000))
            .await?;
        assert_eq!(
            state_of(&l.entries("", 100).await?, "er-c").map(|s| s.0),
            Some(Cancelled)
        );
        l.record(&entry("er-d", "t", Some("dave"), Executing, 5_000))
            .await?;

        // erased(): executing and completed subject entries only.
        assert!(l.erased("t", Some("alice")).await?, "completed");
        assert!(l.erased("t", Some("dave")).await?, "executing");
        assert!(!l.erased("t", Some("bob")).await?, "scheduled");
        assert!(!l.erased("t", Some("carol")).await?, "cancelled");
        assert!(!l.erased("t", Some("erin")).await?, "never requested");
        assert!(
            !l.erased("t", None).await?,
            "subject erasures do not erase the tenant's own keys"
        );
        assert!(
            !l.erased("u", Some("alice")).await?,
            "another tenant's alice"
        );

        // A tenant-wide erasure covers every subject of that tenant.
        l.record(&entry("er-e", "w", None, Scheduled, 5_000))
            .await?;
        assert!(!l.erased("w", None).await?, "scheduled");
        assert!(!l.erased("w", Some("anyone")).await?);
        l.record(&entry("er-e", "w", None, Completed, 5_000))
            .await?;
        assert!(l.erased("w", None).await?);
        assert!(l.erased("w", Some("anyone")).await?);
        assert!(l.erased("w", Some("alice")).await?);
        assert!(!l.erased("t", Some("anyone")).await?, "only that tenant");
        l.record(&entry("er-f", "x", None, Cancelled, 5_000))
            .await?;
        assert!(!l.erased("x", None).await?);
        assert!(!l.erased("x", Some("anyone")).await?);

        // entries: by id, paged.
        let all = l.entries("", 100).await?;
        let ids: Vec<&str> = all.iter().map(|e| e.erasure_id.as_str()).collect();
        assert_eq!(ids, vec!["er-a", "er-b", "er-c", "er-d", "er-e", "er-f"]);
        let page = l.entries("er-b", 2).await?;
        assert_eq!(
            page.iter()
                .map(|e| e.erasure_id.as_str())
                .collect::<Vec<_>>(),
            vec!["er-c", "er-d"]
        );
        assert_eq!(all[4].subject_id, None);
        assert_eq!(all[0].subject_id.as_deref(), Some("alice"));
        Ok(())
    }
}

/// The store, a raw pool on its database and the erasure ledger, on SQLite files in `dir`.
async fn erasure_sqlite_ctx(dir: &tempfile::TempDir) -> Result<ErasureCtx> {
    let path = dir.path().join("keys.db");
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&path).await?);
    let raw = sqlx::AnyPool::connect(&format!("sqlite://{}", path.display())).await?;
    let ledger =
        fieldkey::store::ErasureLedger::open_sqlite(&dir.path().join("erasure-ledger.db")).await?;
    Ok(ErasureCtx { store, raw, ledger })
}

/// The store, a raw pool on its database and the erasure ledger, all on PostgreSQL `db`.
async fn erasure_postgres_ctx(db: &common::PgDb) -> Result<ErasureCtx> {
    let store = postgres_store(db).await?;
    let raw = sqlx::AnyPool::connect(&db.dsn).await?;
    let ledger = fieldkey::store::ErasureLedger::connect_postgres(&db.dsn).await?;
    Ok(ErasureCtx { store, raw, ledger })
}

on_both_stores!(
    erasure_suite: erasure_sqlite(erasure_sqlite_ctx), erasure_postgres(erasure_postgres_ctx);
    concurrent_audit_appends_form_one_chain_without_gaps,
    the_audit_table_refuses_update_and_delete,
    one_live_erasure_per_target,
    the_ledger_never_moves_back_and_knows_what_was_erased,
);

/// `TRUNCATE` removes every row without firing row-level `DELETE` triggers, so the
/// append-only rule of the PostgreSQL audit table (0003_erasure_audit.sql: a `BEFORE
/// UPDATE OR DELETE ... FOR EACH ROW` trigger) does not stop it; a `BEFORE TRUNCATE`
/// statement trigger would. (The chain head keeps its seq, so `verify_chain` over what
/// is left reports a gap afterwards: detected, but not prevented.)
#[tokio::test]
async fn postgres_audit_table_refuses_truncate() -> Result<()> {
    use fieldkey::audit::AuditEvent;
    let db = common::PgDb::create().await?;
    let store = SqlStore::connect_postgres(&db.dsn).await?;
    store
        .append_audit(&AuditEvent {
            action: "test.append".into(),
            resource_type: "subject".into(),
            resource_id: "user-1".into(),
            actor: "test".into(),
            tenant_id: Some("t".into()),
            caller_ip: None,
            details: serde_json::json!({}),
        })
        .await?;
    let raw = sqlx::AnyPool::connect(&db.dsn).await?;
    let r = sqlx::query("TRUNCATE fk_audit").execute(&raw).await;
    let left = store.audit_records(0, 10).await?.len();
    raw.close().await;
    drop(store);
    db.drop_db().await?;
    let e = r.expect_err("TRUNCATE fk_audit was allowed");
    assert!(
        e.to_string().contains("fk_audit is append-only"),
        "refused by the append-only trigger, not by something else: {e}"
    );
    assert_eq!(left, 1, "the audit record was removed");
    Ok(())
}
