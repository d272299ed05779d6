//! Re-encryption jobs: moving stored ciphertexts in application tables to the active
//! key version, so that old versions can be retired.
//!
//! Owns: job specs ([`JobSpec`]), the runner ([`Runner`]) and the operator view of a job
//! ([`JobView`]). The job record in the key store is the coordination point: the runner
//! holding its lease advances it; any sidecar on the same store can show, pause or
//! cancel it. Must not: see plaintext outside [`crate::keyring::Keyring::rewrap`], or
//! write a row that changed since it was read.

mod runner;
mod spec;

pub use runner::{Outcome, Runner, RunnerConfig, create};
pub use spec::{ColumnSpec, JobSpec};

use crate::error::{Error, Result};
use crate::store::{JobControl, JobProgress, JobRecord, KeyStore};

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
pub async fn get(store: &dyn KeyStore, job_id: &str) -> Result<JobView> {
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
pub async fn list(store: &dyn KeyStore) -> Result<Vec<JobView>> {
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
pub async fn control(store: &dyn KeyStore, job_id: &str, c: JobControl) -> Result<JobView> {
    if !store.set_job_control(job_id, c).await? {
        let job = get(store, job_id).await?;
        return Err(Error::JobConflict {
            job: job_id.to_owned(),
            reason: format!("the job is {}", job.record.state),
        });
    }
    get(store, job_id).await
}
