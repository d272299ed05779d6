//! Re-encryption jobs in the store: the [`JobStore`] trait and its SQL.
//!
//! The store keeps the spec and counters as opaque JSON text; `crate::jobs` owns
//! their meaning.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::sql::{SqlStore, classify};
use crate::model::{Created, JobControl, JobRecord, JobUpdate, NewJob, now_ms};

/// Re-encryption jobs: the coordination record runners lease and report progress on.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Creates a job unless one with that id exists; returns the stored job.
    async fn create_job(&self, job: NewJob) -> Result<Created<JobRecord>, StoreError>;

    /// A job, or `None`.
    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// All jobs, newest first.
    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// Takes (or renews) the lease of an unfinished job for `owner` until
    /// `lease_until` (Unix ms): only if it is unowned, already `owner`'s, or its lease
    /// ran out before `now`. Returns the job if this owner now holds it.
    async fn claim_job(
        &self,
        job_id: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Records progress (and renews the lease) only while `owner` holds the job.
    /// Returns what operators want of the job now, or `None` if nothing was recorded
    /// because the lease was lost (or the job is finished).
    async fn update_job(
        &self,
        job_id: &str,
        owner: &str,
        update: JobUpdate,
    ) -> Result<Option<JobControl>, StoreError>;

    /// Extends `owner`'s lease on an unfinished job to `lease_until` (a heartbeat while
    /// a batch takes long). Returns whether `owner` still holds it.
    async fn renew_job_lease(
        &self,
        job_id: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError>;

    /// Sets what operators want of an unfinished job (run, pause, cancel); `Run` on a
    /// failed job also makes it pending again (after the operator fixed the cause), so
    /// the next runner resumes it from its checkpoint. Returns whether it applied.
    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError>;
}

macro_rules! job_columns {
    () => {
        "job_id, target, tenant_id, spec, state, control, owner, lease_until, \
         checkpoint, progress, error, created_at, started_at, updated_at, finished_at"
    };
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state").map_err(classify)?;
    let control: String = row.try_get("control").map_err(classify)?;
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
    })
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

    async fn claim_job(
        &self,
        job_id: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_jobs SET owner = $2, lease_until = $4, updated_at = $3, \
                 started_at = COALESCE(started_at, $3), \
                 state = CASE WHEN state = 'pending' THEN 'running' ELSE state END \
             WHERE job_id = $1 AND state IN ('pending', 'running', 'paused') \
             AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until < $3)",
        )
        .bind(job_id)
        .bind(owner)
        .bind(now)
        .bind(lease_until)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 1 {
            self.get_job(job_id).await
        } else {
            Ok(None)
        }
    }

    async fn update_job(
        &self,
        job_id: &str,
        owner: &str,
        update: JobUpdate,
    ) -> Result<Option<JobControl>, StoreError> {
        let now = now_ms();
        let finished = update.state.is_finished();
        let row = sqlx::query(
            "UPDATE fk_jobs SET state = $3, checkpoint = COALESCE($4, checkpoint), progress = $5, \
                 error = $6, updated_at = $7, \
                 lease_until = CASE WHEN $9 = 1 THEN NULL ELSE $8 END, \
                 owner = CASE WHEN $9 = 1 THEN NULL ELSE owner END, \
                 finished_at = CASE WHEN $9 = 1 THEN $7 ELSE NULL END \
             WHERE job_id = $1 AND owner = $2 AND state IN ('pending', 'running', 'paused') \
             RETURNING control",
        )
        .bind(job_id)
        .bind(owner)
        .bind(update.state.as_str())
        .bind(update.checkpoint.as_deref())
        .bind(&update.progress)
        .bind(update.error.as_deref())
        .bind(now)
        .bind(update.lease_until)
        .bind(i64::from(finished))
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(r.try_get::<String, _>("control")
                .map_err(classify)?
                .parse()?)
        })
        .transpose()
    }

    async fn renew_job_lease(
        &self,
        job_id: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_jobs SET lease_until = $3 \
             WHERE job_id = $1 AND owner = $2 AND state IN ('pending', 'running', 'paused')",
            )
            .bind(job_id)
            .bind(owner)
            .bind(lease_until),
        )
        .await
    }

    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_jobs SET control = $2, updated_at = $3, \
                 state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END, \
                 error = CASE WHEN state = 'failed' THEN NULL ELSE error END, \
                 finished_at = CASE WHEN state = 'failed' THEN NULL ELSE finished_at END \
             WHERE job_id = $1 AND (state IN ('pending', 'running', 'paused') \
                 OR (state = 'failed' AND $2 = 'run'))",
            )
            .bind(job_id)
            .bind(control.as_str())
            .bind(now_ms()),
        )
        .await
    }
}
