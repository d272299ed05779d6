//! Re-encryption jobs in the store: the [`JobStore`] trait and its SQL.
//!
//! The store keeps the spec and counters as opaque JSON text; `crate::jobs` owns
//! their meaning.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::StoreError;
use super::sql::{SqlStore, classify};
use crate::model::{
    Created, JobControl, JobRecord, JobShardRecord, JobUpdate, NewJob, NewShard, TotalsFn, now_ms,
};

/// The holder of a planned job's own lease, for ever: its shards have the leases now.
pub const SHARDED_OWNER: &str = "fieldkey:sharded";

/// Re-encryption jobs: the coordination record runners lease and report progress on.
///
/// A job is split into shards (disjoint ranges of its table's primary key), planned
/// once; each shard has its own lease, checkpoint and counters. The job record keeps
/// the whole job: state, control, and totals the caller computes from the shards in
/// the transaction of every shard update.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Creates a job unless one with that id exists; returns the stored job. It has
    /// no shards until [`JobStore::plan_job`].
    async fn create_job(&self, job: NewJob) -> Result<Created<JobRecord>, StoreError>;

    /// A job, or `None`.
    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// All jobs, newest first.
    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// A job's shards, by number (none before it is planned, and for jobs finished
    /// before shards existed).
    async fn job_shards(&self, job_id: &str) -> Result<Vec<JobShardRecord>, StoreError>;

    /// Splits an unfinished, unplanned job into `shards` (numbered in order), once:
    /// only if no shards were planned yet and no runner of the version before shards
    /// holds the job's own lease. The job's own lease is then given for good to
    /// [`SHARDED_OWNER`], so that a runner of that version (during a rolling upgrade)
    /// can never claim the job and run it whole beside the shards. Shard 0 takes
    /// over the job's checkpoint and counters (those of a job that version ran). Returns
    /// whether this call planned it.
    async fn plan_job(
        &self,
        job_id: &str,
        shards: &[NewShard],
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Marks an unfinished job that has no shards yet `failed` with `error` (its table
    /// cannot be planned, e.g. a missing column), unless a runner of the version before
    /// shards holds its lease. Returns whether it applied.
    async fn fail_unplanned_job(
        &self,
        job_id: &str,
        error: &str,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Takes (or renews) the lease of an unfinished shard of an unfinished job for
    /// `owner` until `lease_until` (Unix ms): only if it is unowned, already
    /// `owner`'s, or its lease ran out before `now`. Returns the shard if this owner
    /// now holds it.
    async fn claim_job_shard(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobShardRecord>, StoreError>;

    /// Records a shard's progress (and renews its lease) only while `owner` holds it,
    /// then writes the job's totals as `totals` computes them from the job and all its
    /// shards as they are now, in one transaction (serialized with the job's other
    /// shard updates by the job record's lock). Returns what operators want of the job
    /// now, or `None` if nothing was recorded because the lease was lost (or the shard
    /// or job is finished).
    async fn update_job_shard(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        update: JobUpdate,
        totals: &TotalsFn,
    ) -> Result<Option<JobControl>, StoreError>;

    /// Extends `owner`'s lease on an unfinished shard to `lease_until` (a heartbeat
    /// while a batch takes long). Returns whether `owner` still holds it.
    async fn renew_job_shard_lease(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError>;

    /// Sets what operators want of an unfinished job (run, pause, cancel); `Run` on a
    /// failed job also makes it pending again (after the operator fixed the cause),
    /// with its failed and cancelled shards, so the next runners resume them from
    /// their checkpoints. Returns whether it applied.
    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError>;
}

macro_rules! job_columns {
    () => {
        "job_id, target, tenant_id, spec, state, control, owner, lease_until, \
         checkpoint, progress, error, created_at, started_at, updated_at, finished_at, shards"
    };
}

macro_rules! shard_columns {
    () => {
        "job_id, shard, lo, hi, state, owner, lease_until, checkpoint, progress, error, \
         started_at, updated_at, finished_at"
    };
}

/// The states in which a job or shard can still be claimed and advanced.
const UNFINISHED: &str = "('pending', 'running', 'paused')";

fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state").map_err(classify)?;
    let control: String = row.try_get("control").map_err(classify)?;
    let shards: Option<i64> = row.try_get("shards").map_err(classify)?;
    Ok(JobRecord {
        job_id: row.try_get("job_id").map_err(classify)?,
        target: row.try_get("target").map_err(classify)?,
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        spec: row.try_get("spec").map_err(classify)?,
        state: state.parse()?,
        control: control.parse()?,
        owner: row.try_get("owner").map_err(classify)?,
        lease_until: row.try_get("lease_until").map_err(classify)?,
        checkpoint: row.try_get("checkpoint").map_err(classify)?,
        progress: row.try_get("progress").map_err(classify)?,
        error: row.try_get("error").map_err(classify)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        started_at: row.try_get("started_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
        finished_at: row.try_get("finished_at").map_err(classify)?,
        shards: shards
            .map(|n| u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("job shards {n}"))))
            .transpose()?,
    })
}

fn shard_from_row(row: &AnyRow) -> Result<JobShardRecord, StoreError> {
    let state: String = row.try_get("state").map_err(classify)?;
    let shard: i64 = row.try_get("shard").map_err(classify)?;
    Ok(JobShardRecord {
        job_id: row.try_get("job_id").map_err(classify)?,
        shard: u32::try_from(shard)
            .map_err(|_| StoreError::Corrupt(format!("job shard number {shard}")))?,
        lo: row.try_get("lo").map_err(classify)?,
        hi: row.try_get("hi").map_err(classify)?,
        state: state.parse()?,
        owner: row.try_get("owner").map_err(classify)?,
        lease_until: row.try_get("lease_until").map_err(classify)?,
        checkpoint: row.try_get("checkpoint").map_err(classify)?,
        progress: row.try_get("progress").map_err(classify)?,
        error: row.try_get("error").map_err(classify)?,
        started_at: row.try_get("started_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
        finished_at: row.try_get("finished_at").map_err(classify)?,
    })
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// Takes the job record's lock for the rest of `tx` (a write, as SQLite's transactions
/// must start with) if the job is unfinished; returns it as it is then.
async fn lock_unfinished_job(
    tx: &mut Tx<'_>,
    job_id: &str,
    now: i64,
) -> Result<Option<JobRecord>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "UPDATE fk_jobs SET updated_at = $2 WHERE job_id = $1 AND state IN {UNFINISHED} \
         RETURNING {}",
        job_columns!()
    )))
    .bind(job_id)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await
    .map_err(classify)?;
    row.as_ref().map(job_from_row).transpose()
}

async fn shards_in(tx: &mut Tx<'_>, job_id: &str) -> Result<Vec<JobShardRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        shard_columns!(),
        " FROM fk_job_shards WHERE job_id = $1 ORDER BY shard"
    ))
    .bind(job_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(classify)?;
    rows.iter().map(shard_from_row).collect()
}

#[async_trait]
impl JobStore for SqlStore {
    async fn create_job(&self, job: NewJob) -> Result<Created<JobRecord>, StoreError> {
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO fk_jobs (job_id, target, tenant_id, spec, state, control, progress, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'pending', 'run', $5, $6, $6) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(&job.job_id)
        .bind(&job.target)
        .bind(job.tenant_id.as_deref())
        .bind(&job.spec)
        .bind(&job.progress)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        let record = self
            .get_job(&job.job_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("job vanished after insert".into()))?;
        Ok(if n == 1 {
            Created::Created(record)
        } else {
            Created::Existing(record)
        })
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                job_columns!(),
                " FROM fk_jobs WHERE job_id = $1"
            ))
            .bind(job_id),
            job_from_row,
        )
        .await
    }

    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                job_columns!(),
                " FROM fk_jobs ORDER BY created_at DESC, job_id"
            )),
            job_from_row,
        )
        .await
    }

    async fn job_shards(&self, job_id: &str) -> Result<Vec<JobShardRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                shard_columns!(),
                " FROM fk_job_shards WHERE job_id = $1 ORDER BY shard"
            ))
            .bind(job_id),
            shard_from_row,
        )
        .await
    }

    async fn plan_job(
        &self,
        job_id: &str,
        shards: &[NewShard],
        now: i64,
    ) -> Result<bool, StoreError> {
        let count = i64::try_from(shards.len())
            .map_err(|_| StoreError::Corrupt("too many shards".into()))?;
        if count == 0 {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // The compare-and-set on `shards` (not a look at fk_job_shards) is what makes
        // concurrent planners agree: PostgreSQL re-checks it on the row the first one
        // committed.
        let n = sqlx::query(AssertSqlSafe(format!(
            "UPDATE fk_jobs SET shards = $3, owner = $4, lease_until = $5, updated_at = $2 \
             WHERE job_id = $1 AND shards IS NULL AND state IN {UNFINISHED} \
             AND (owner IS NULL OR lease_until IS NULL OR lease_until < $2)"
        )))
        .bind(job_id)
        .bind(now)
        .bind(count)
        .bind(SHARDED_OWNER)
        .bind(i64::MAX)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n != 1 {
            tx.rollback().await.map_err(classify)?;
            return Ok(false);
        }
        for (i, s) in (0i64..).zip(shards) {
            sqlx::query(
                "INSERT INTO fk_job_shards (job_id, shard, lo, hi, state, checkpoint, progress, \
                     updated_at, finished_at) \
                 SELECT job_id, $2, $3, $4, $5, CASE WHEN $2 = 0 THEN checkpoint END, \
                     CASE WHEN $2 = 0 THEN progress ELSE '{}' END, $6, \
                     CASE WHEN $5 = 'completed' THEN $6 END \
                 FROM fk_jobs WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(i)
            .bind(s.lo.as_deref())
            .bind(s.hi.as_deref())
            .bind(s.state.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn fail_unplanned_job(
        &self,
        job_id: &str,
        error: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE fk_jobs SET state = 'failed', error = $2, updated_at = $3, finished_at = $3 \
                 WHERE job_id = $1 AND shards IS NULL AND state IN {UNFINISHED} \
                 AND (owner IS NULL OR lease_until IS NULL OR lease_until < $3)"
            )))
            .bind(job_id)
            .bind(error)
            .bind(now),
        )
        .await
    }

    async fn claim_job_shard(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobShardRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let job = sqlx::query(AssertSqlSafe(format!(
            "UPDATE fk_jobs SET updated_at = $2, started_at = COALESCE(started_at, $2), \
                 state = CASE WHEN state = 'pending' THEN 'running' ELSE state END \
             WHERE job_id = $1 AND state IN {UNFINISHED}"
        )))
        .bind(job_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        let row = if job == 1 {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE fk_job_shards SET owner = $3, lease_until = $5, updated_at = $4, \
                     started_at = COALESCE(started_at, $4), \
                     state = CASE WHEN state = 'pending' THEN 'running' ELSE state END \
                 WHERE job_id = $1 AND shard = $2 AND state IN {UNFINISHED} \
                 AND (owner IS NULL OR owner = $3 OR lease_until IS NULL OR lease_until < $4) \
                 RETURNING {}",
                shard_columns!()
            )))
            .bind(job_id)
            .bind(i64::from(shard))
            .bind(owner)
            .bind(now)
            .bind(lease_until)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
        } else {
            None
        };
        match row {
            Some(r) => {
                let rec = shard_from_row(&r)?;
                tx.commit().await.map_err(classify)?;
                Ok(Some(rec))
            }
            None => {
                tx.rollback().await.map_err(classify)?;
                Ok(None)
            }
        }
    }

    async fn update_job_shard(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        update: JobUpdate,
        totals: &TotalsFn,
    ) -> Result<Option<JobControl>, StoreError> {
        let now = now_ms();
        let finished = update.state.is_finished();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let Some(job) = lock_unfinished_job(&mut tx, job_id, now).await? else {
            tx.rollback().await.map_err(classify)?;
            return Ok(None);
        };
        let n = sqlx::query(AssertSqlSafe(format!(
            "UPDATE fk_job_shards SET state = $4, checkpoint = COALESCE($5, checkpoint), \
                 progress = $6, error = $7, updated_at = $8, \
                 lease_until = CASE WHEN $10 = 1 THEN NULL ELSE $9 END, \
                 owner = CASE WHEN $10 = 1 THEN NULL ELSE owner END, \
                 finished_at = CASE WHEN $10 = 1 THEN $8 ELSE NULL END \
             WHERE job_id = $1 AND shard = $2 AND owner = $3 AND state IN {UNFINISHED}"
        )))
        .bind(job_id)
        .bind(i64::from(shard))
        .bind(owner)
        .bind(update.state.as_str())
        .bind(update.checkpoint.as_deref())
        .bind(&update.progress)
        .bind(update.error.as_deref())
        .bind(now)
        .bind(update.lease_until)
        .bind(i64::from(finished))
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n != 1 {
            tx.rollback().await.map_err(classify)?;
            return Ok(None);
        }
        let shards = shards_in(&mut tx, job_id).await?;
        let t = totals(&job, &shards, now);
        sqlx::query(
            "UPDATE fk_jobs SET state = $2, progress = $3, checkpoint = $4, error = $5, \
                 finished_at = CASE WHEN $6 = 1 THEN $7 ELSE NULL END \
             WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(t.state.as_str())
        .bind(&t.progress)
        .bind(t.checkpoint.as_deref())
        .bind(t.error.as_deref())
        .bind(i64::from(t.state.is_finished()))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Some(job.control))
    }

    async fn renew_job_shard_lease(
        &self,
        job_id: &str,
        shard: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE fk_job_shards SET lease_until = $4 \
                 WHERE job_id = $1 AND shard = $2 AND owner = $3 AND state IN {UNFINISHED}"
            )))
            .bind(job_id)
            .bind(i64::from(shard))
            .bind(owner)
            .bind(lease_until),
        )
        .await
    }

    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // Shards first (a write, as SQLite's transactions must start with): resuming a
        // failed job reopens what did not complete.
        sqlx::query(
            "UPDATE fk_job_shards SET state = 'pending', error = NULL, finished_at = NULL, \
                 owner = NULL, lease_until = NULL, updated_at = $3 \
             WHERE job_id = $1 AND $2 = 'run' AND state IN ('failed', 'cancelled') \
             AND EXISTS (SELECT 1 FROM fk_jobs WHERE job_id = $1 AND state = 'failed')",
        )
        .bind(job_id)
        .bind(control.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let n = sqlx::query(
            "UPDATE fk_jobs SET control = $2, updated_at = $3, \
                 state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END, \
                 error = CASE WHEN state = 'failed' THEN NULL ELSE error END, \
                 finished_at = CASE WHEN state = 'failed' THEN NULL ELSE finished_at END \
             WHERE job_id = $1 AND (state IN ('pending', 'running', 'paused') \
                 OR (state = 'failed' AND $2 = 'run'))",
        )
        .bind(job_id)
        .bind(control.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 1 {
            tx.commit().await.map_err(classify)?;
            Ok(true)
        } else {
            tx.rollback().await.map_err(classify)?;
            Ok(false)
        }
    }
}
