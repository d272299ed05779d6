//! The re-encryption runner: walks a PostgreSQL table in primary-key order and moves
//! every ciphertext on an old key version to the tenant's active version.
//!
//! Safety rules, in the order they matter:
//! - a row is written only if it is still the version that was read (its `xmin`,
//!   compared in one `UPDATE ... FROM unnest(...)` per batch); a row the application
//!   changed meanwhile is read again and retried, never overwritten;
//! - a job is cut into shards (disjoint primary-key ranges, fixed once when the job is
//!   planned); only a shard's lease holder advances it; the lease is renewed at every
//!   checkpoint and by a heartbeat every third of its length (so a slow batch keeps
//!   it), and a runner that lost it stops at its next checkpoint;
//! - a shard's checkpoint (last primary key fully processed) names only batches whose
//!   write and conflict retries completed, so a crash re-reads at most the batches
//!   after it, whose values are then current and skipped;
//! - the job completes only when every shard did (the job record's totals, which
//!   retirement reads, are summed over all shards in the transaction of every update).
//!
//! Pipeline: batch N+1 is read (in its own task) and rewrapped while batch N's write
//! runs (in its own task); a batch's rewrapping is split over two worker threads.
//!
//! The rooms: `table` (the job's SQL, reads, shard bounds and the guarded write),
//! `rewrap` (per-row rewrapping and tallies), `lease` (planning shards, claiming and
//! renewing their leases) and `run` (the run loop and its progress). This file holds
//! the runner, its settings and what they share.

mod lease;
mod rewrap;
mod run;
mod table;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::watch;

use super::spec::{ColumnSpec, JobSpec};
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::model::{JobProgress, JobRecord, JobState, NewJob};
use crate::store::JobStore;

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This runner's name in the lease.
    pub owner: String,
    /// Lease length; another runner takes over a job whose lease ran out.
    pub lease: Duration,
    /// How often to look again while paused, waiting for a lease, or after a
    /// transient failure (doubled up to 30 s while failures last).
    pub poll: Duration,
    /// This runner's own shard (a Kubernetes Indexed Job's completion index): worked
    /// first, waiting for its lease if another runner holds it; then the runner takes
    /// over others. `None`: any shard, lowest first.
    pub shard: Option<u32>,
}

impl RunnerConfig {
    /// An owner name from the host name, process id and a random suffix.
    pub fn new(lease: Duration) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".to_owned());
        let mut r = [0u8; 4];
        let _ = getrandom::fill(&mut r);
        Self {
            owner: format!("{host}/{}/{}", std::process::id(), hex::encode(r)),
            lease,
            poll: Duration::from_millis(500),
            shard: None,
        }
    }
}

/// How a run ended: the whole job (every shard finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The job's final state.
    pub state: JobState,
    /// The job's counters, summed over its shards.
    pub progress: JobProgress,
}

/// Why a batch stopped.
enum BatchError {
    /// Retry later (KMS, key store or database unavailable).
    Transient(String),
    /// Needs an operator.
    Fatal(String),
}

type BatchResult<T> = std::result::Result<T, BatchError>;

/// A task of this runner: aborted when dropped unawaited, so no read, write or
/// heartbeat outlives the run that started it.
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    fn spawn(fut: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(fut))
    }

    /// Waits for the task; a panicked or aborted task is a fatal batch error.
    async fn join(&mut self, what: &str) -> BatchResult<T> {
        (&mut self.0)
            .await
            .map_err(|e| BatchError::Fatal(format!("{what} task: {e}")))
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Creates the job for `spec` unless it exists (then the stored spec must be the same).
///
/// # Errors
/// [`Error::JobConflict`] if the id is taken by another spec; [`Error::Store`].
pub async fn create(store: &dyn JobStore, spec: &JobSpec) -> Result<JobRecord> {
    let created = store
        .create_job(NewJob {
            job_id: spec.name.clone(),
            target: spec.target(),
            tenant_id: spec.tenant_scope().map(str::to_owned),
            spec: spec.to_json(),
            progress: JobProgress::default().to_json(),
        })
        .await?;
    let rec = created.into_inner();
    if JobSpec::from_json(&rec.spec)? != *spec {
        return Err(Error::JobConflict {
            job: spec.name.clone(),
            reason:
                "a job with this name exists with a different spec; give the new one another name"
                    .into(),
        });
    }
    Ok(rec)
}

/// A re-encryption run of one job.
pub struct Runner {
    keyring: Arc<Keyring>,
    jobs: Arc<dyn JobStore>,
    db: PgPool,
    spec: JobSpec,
    columns: Arc<[ColumnSpec]>,
    /// Authenticate current values too (`verify` of the spec: a census).
    verify: bool,
    cfg: RunnerConfig,
    /// The counters of the shard this runner works on, after every batch.
    progress_tx: watch::Sender<JobProgress>,
}

impl Runner {
    /// A runner for `spec` over the application database `db`, rewrapping through
    /// `keyring`, its job record and shards (leases, checkpoints, counters) kept in
    /// `jobs`. The progress of the shard it works on is published on the returned
    /// receiver after every batch.
    pub fn new(
        keyring: Arc<Keyring>,
        jobs: Arc<dyn JobStore>,
        db: PgPool,
        spec: JobSpec,
        cfg: RunnerConfig,
    ) -> (Self, watch::Receiver<JobProgress>) {
        let (progress_tx, rx) = watch::channel(JobProgress::default());
        (
            Self {
                keyring,
                jobs,
                db,
                columns: spec.columns.clone().into(),
                verify: spec.verify,
                spec,
                cfg,
                progress_tx,
            },
            rx,
        )
    }

    fn store(&self) -> &dyn JobStore {
        self.jobs.as_ref()
    }
}
