//! Re-encryption jobs: moving stored ciphertexts in application tables to the active
//! key version, so that old versions can be retired.
//!
//! Owns: job specs ([`JobSpec`]), the runner ([`Runner`]) and the operator view of a job
//! ([`JobView`], through a [`JobBoard`]). The job record in the key store is the coordination point: the runner
//! holding its lease advances it; any sidecar on the same store can show, pause or
//! cancel it. Must not: see plaintext outside [`crate::keyring::Keyring::rewrap`], or
//! write a row that changed since it was read.

mod runner;
mod spec;

pub use runner::{Outcome, Runner, RunnerConfig, create};
pub use spec::{ColumnSpec, JobSpec};

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

/// A job and its decoded counters.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The stored record.
    pub record: JobRecord,
    /// Its counters.
    pub progress: JobProgress,
}

impl JobView {
    fn from_record(record: JobRecord) -> Result<Self> {
        let progress = JobProgress::parse(&record.progress)?;
        Ok(Self { record, progress })
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
    JobView::from_record(rec)
}

/// All jobs, newest first.
///
/// # Errors
/// [`Error::Store`].
pub async fn list(store: &dyn JobStore) -> Result<Vec<JobView>> {
    store
        .list_jobs()
        .await?
        .into_iter()
        .map(JobView::from_record)
        .collect()
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
