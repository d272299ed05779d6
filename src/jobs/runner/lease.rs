//! The job's lease: claiming the job (or standing by while another runner holds it),
//! renewing the lease with every checkpoint and by a heartbeat, and recording progress
//! in the job record.
//!
//! Owns: when a lease ends, how often it is renewed, and a lost lease as an error.
//! Does not: read the table or decide the job's next state (the run loop does).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::{JobControl, JobProgress, JobRecord, JobState, JobUpdate, now_ms};

use super::{Outcome, Runner, Task};

/// When a lease of length `lease` taken now ends, Unix ms.
fn lease_end(lease: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

/// What claiming the job found.
pub(super) enum Claim {
    /// This runner holds the job's lease now.
    Held(JobRecord),
    /// The job is finished: how it ended.
    Finished(Outcome),
}

impl Runner {
    /// Claims the job's lease, standing by while another runner holds it (and taking
    /// over once that runner's lease runs out).
    pub(super) async fn claim(&self) -> Result<Claim> {
        loop {
            match self
                .store()
                .claim_job(
                    &self.spec.name,
                    &self.cfg.owner,
                    now_ms(),
                    self.lease_until(),
                )
                .await?
            {
                Some(job) => return Ok(Claim::Held(job)),
                None => {
                    let job = self
                        .store()
                        .get_job(&self.spec.name)
                        .await?
                        .ok_or_else(|| Error::JobNotFound {
                            job: self.spec.name.clone(),
                        })?;
                    if job.state.is_finished() {
                        return Ok(Claim::Finished(Outcome {
                            state: job.state,
                            progress: JobProgress::parse(&job.progress)?,
                        }));
                    }
                    tracing::info!(job = %job.job_id, owner = ?job.owner, "job is held by another runner; standing by");
                    tokio::time::sleep(self.cfg.poll).await;
                }
            }
        }
    }

    fn lease_until(&self) -> i64 {
        lease_end(self.cfg.lease)
    }

    /// Renews the lease every [`Runner::max_wait`] until the returned task is dropped
    /// (a lost or finished lease ends it; the run notices at its next checkpoint).
    pub(super) fn heartbeat(&self) -> Task<()> {
        let store = self.jobs.clone();
        let (job, owner) = (self.spec.name.clone(), self.cfg.owner.clone());
        let (every, lease) = (self.max_wait(), self.cfg.lease);
        Task::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match store.renew_job_lease(&job, &owner, lease_end(lease)).await {
                    Ok(true) => {}
                    // Lost or finished: the run notices at its next checkpoint.
                    Ok(false) => return,
                    Err(e) => tracing::warn!(error = %e, "cannot renew the job lease; retrying"),
                }
            }
        })
    }

    /// The longest this runner waits between lease renewals: a third of the lease
    /// (at most 30 s), so a slow key store cannot let the lease run out.
    pub(super) fn max_wait(&self) -> Duration {
        (self.cfg.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Records progress and renews the lease; returns what operators want next.
    pub(super) async fn renew(
        &self,
        state: JobState,
        checkpoint: Option<String>,
        progress: &JobProgress,
        error: Option<String>,
    ) -> Result<JobControl> {
        let control = self
            .store()
            .update_job(
                &self.spec.name,
                &self.cfg.owner,
                JobUpdate {
                    state,
                    checkpoint,
                    progress: progress.to_json(),
                    error,
                    lease_until: self.lease_until(),
                },
            )
            .await?;
        match control {
            Some(c) => Ok(c),
            None => Err(Error::JobConflict {
                job: self.spec.name.clone(),
                reason: "this runner lost its lease to another one; stopping".into(),
            }),
        }
    }
}
