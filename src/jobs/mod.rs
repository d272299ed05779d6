//! Re-encryption jobs: moving stored ciphertexts in application tables to the active
//! key version, so that old versions can be retired.
//!
//! Owns: job specs ([`JobSpec`]), the runner ([`Runner`]) and the operator view of a job
//! ([`JobView`], through a [`JobBoard`]). The job record in the key store is the
//! coordination point: a job is split into shards (`shards.rs`: disjoint primary-key
//! ranges), the runner holding a shard's lease advances that shard, and the job record
//! holds the whole job, summed over its shards; any sidecar on the same store can show,
//! pause or cancel it. Must not: see plaintext outside the keyring's rewrap calls
//! ([`crate::keyring::Keyring::row_keys`]), or write a row that changed since it was
//! read.

mod runner;
mod shards;
mod spec;

pub use runner::{Outcome, Runner, RunnerConfig, create};
pub use shards::{ShardView, totals};
pub use spec::{ColumnSpec, JobSpec, MAX_SHARDS};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{JobControl, JobProgress, JobRecord};
use crate::store::JobStore;

/// The operators' handle on jobs: show, list and control them (the Jobs service and
/// the metrics hold one). Cheap to clone; never touches application tables.
#[derive(Clone)]
pub struct JobBoard(Arc<dyn JobStore>);

impl std::fmt::Debug for JobBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobBoard").finish_non_exhaustive()
    }
}

impl JobBoard {
    /// The jobs kept in `store`.
    pub fn new(store: Arc<dyn JobStore>) -> Self {
        Self(store)
    }

    /// One job: see [`get`].
    ///
    /// # Errors
    /// [`Error::JobNotFound`]; [`Error::Store`].
    pub async fn get(&self, job_id: &str) -> Result<JobView> {
        get(self.0.as_ref(), job_id).await
    }

    /// All jobs, newest first: see [`list`].
    ///
    /// # Errors
    /// [`Error::Store`].
    pub async fn list(&self) -> Result<Vec<JobView>> {
        list(self.0.as_ref()).await
    }

    /// Asks a job's runner to run, pause or cancel: see [`control`].
    ///
    /// # Errors
    /// [`Error::JobNotFound`]; [`Error::JobConflict`] for a finished job; [`Error::Store`].
    pub async fn control(&self, job_id: &str, c: JobControl) -> Result<JobView> {
        control(self.0.as_ref(), job_id, c).await
    }
}

/// A job and its decoded counters (summed over its shards).
#[derive(Debug, Clone)]
pub struct JobView {
    /// The stored record; while the job is unfinished, `owner` and `lease_until` show
    /// who holds its shards (`shard i: runner; ...` for several shards).
    pub record: JobRecord,
    /// Its counters.
    pub progress: JobProgress,
    /// Its shards, by number (empty before the job is planned, and for jobs that
    /// finished before shards existed). Filled by [`get`]; [`list`] fills them for
    /// unfinished jobs only.
    pub shards: Vec<ShardView>,
}

impl JobView {
    /// A job as stored, without its shards.
    ///
    /// # Errors
    /// [`Error::Store`] if its counters do not decode.
    pub fn from_record(record: JobRecord) -> Result<Self> {
        let progress = JobProgress::parse(&record.progress)?;
        Ok(Self {
            record,
            progress,
            shards: Vec::new(),
        })
    }

    async fn with_shards(mut self, store: &dyn JobStore) -> Result<Self> {
        if self.record.shards.is_none() {
            return Ok(self);
        }
        self.shards = store
            .job_shards(&self.record.job_id)
            .await?
            .into_iter()
            .map(ShardView::from_record)
            .collect();
        if !self.record.state.is_finished() {
            self.record.owner = shards::owners(&self.shards);
            self.record.lease_until = self
                .shards
                .iter()
                .filter(|s| s.record.owner.is_some())
                .filter_map(|s| s.record.lease_until)
                .max();
        }
        Ok(self)
    }
}

/// One job.
///
/// # Errors
/// [`Error::JobNotFound`]; [`Error::Store`].
pub async fn get(store: &dyn JobStore, job_id: &str) -> Result<JobView> {
    let rec = store
        .get_job(job_id)
        .await?
        .ok_or_else(|| Error::JobNotFound {
            job: job_id.to_owned(),
        })?;
    JobView::from_record(rec)?.with_shards(store).await
}

/// All jobs, newest first.
///
/// # Errors
/// [`Error::Store`].
pub async fn list(store: &dyn JobStore) -> Result<Vec<JobView>> {
    let mut out = Vec::new();
    for rec in store.list_jobs().await? {
        let view = JobView::from_record(rec)?;
        out.push(if view.record.state.is_finished() {
            view
        } else {
            view.with_shards(store).await?
        });
    }
    Ok(out)
}

/// Asks the runner of a job to run, pause or cancel (after its current batch).
///
/// # Errors
/// [`Error::JobNotFound`]; [`Error::JobConflict`] for a finished job; [`Error::Store`].
pub async fn control(store: &dyn JobStore, job_id: &str, c: JobControl) -> Result<JobView> {
    if !store.set_job_control(job_id, c).await? {
        let job = get(store, job_id).await?;
        return Err(Error::JobConflict {
            job: job_id.to_owned(),
            reason: format!("the job is {}", job.record.state),
        });
    }
    get(store, job_id).await
}
