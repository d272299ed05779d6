//! Shards and their leases: planning the job's shards once, choosing and claiming a
//! shard (this runner's own first, then any whose lease ran out), standing by while
//! others hold them, renewing a lease with every checkpoint and by a heartbeat, and
//! recording a shard's progress (with the job's totals) in the key store.
//!
//! Owns: when a lease ends, how often it is renewed, which shard a runner takes, and a
//! lost lease as an error. Does not: read the table (`table` computes the bounds) or
//! decide a shard's next state (the run loop does).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::jobs::shards;
use crate::model::{JobControl, JobProgress, JobShardRecord, JobState, JobUpdate, now_ms};
use crate::store::JobStore;

use super::table::{self, Sql};
use super::{BatchError, Outcome, Runner, Task};

/// When a lease of length `lease` taken now ends, Unix ms.
fn lease_end(lease: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

/// What looking for work found.
pub(super) enum Next {
    /// This runner holds this shard's lease now.
    Shard(JobShardRecord),
    /// The job is finished: how it ended.
    Finished(Outcome),
    /// Every unfinished shard is held by another runner (or the job cannot be planned
    /// yet): look again after a while.
    Wait,
}

/// The order in which a runner tries a job's shards: its own (`preferred`) alone while
/// that one is unfinished; after it (or without one), every shard from the next one on,
/// round the ring, so that runners spread over the shards they take over.
fn candidates(shards: &[JobShardRecord], preferred: Option<u32>) -> Vec<&JobShardRecord> {
    if let Some(mine) = preferred.and_then(|p| shards.iter().find(|s| s.shard == p))
        && !mine.state.is_finished()
    {
        return vec![mine];
    }
    let start = preferred.map_or(0, |p| p.saturating_add(1));
    let mut all: Vec<&JobShardRecord> = shards.iter().collect();
    all.sort_by_key(|s| (s.shard < start, s.shard));
    all
}

impl Runner {
    /// The next shard for this runner, claimed; or the job's end; or nothing yet.
    /// Plans the job first if it has no shards (building `sql` if needed).
    pub(super) async fn next_shard(&self, sql: &mut Option<Sql>) -> Result<Next> {
        let job = self
            .store()
            .get_job(&self.spec.name)
            .await?
            .ok_or_else(|| Error::JobNotFound {
                job: self.spec.name.clone(),
            })?;
        if job.state.is_finished() {
            return Ok(Next::Finished(Outcome {
                state: job.state,
                progress: JobProgress::parse(&job.progress)?,
            }));
        }
        let all = self.store().job_shards(&self.spec.name).await?;
        if all.is_empty() {
            self.plan(sql).await?;
            return Ok(Next::Wait);
        }
        if let Some(p) = self.cfg.shard
            && usize::try_from(p).map_or(true, |p| p >= all.len())
        {
            return Err(Error::InvalidArgument(format!(
                "shard {p} of a job of {} shards (shards are numbered from 0)",
                all.len()
            )));
        }
        let now = now_ms();
        for s in candidates(&all, self.cfg.shard) {
            if !s.claimable_by(&self.cfg.owner, now) {
                continue;
            }
            if let Some(held) = self
                .store()
                .claim_job_shard(
                    &self.spec.name,
                    s.shard,
                    &self.cfg.owner,
                    now,
                    self.lease_until(),
                )
                .await?
            {
                if s.owner.as_ref().is_some_and(|o| *o != self.cfg.owner) {
                    tracing::info!(job = %self.spec.name, shard = s.shard, previous = ?s.owner, "took over a shard whose lease ran out");
                }
                return Ok(Next::Shard(held));
            }
        }
        Ok(Next::Wait)
    }

    /// Plans the job's shards: the table's keys in scope cut at the quantiles (a job of
    /// one shard needs none). A table that cannot be inspected fails the job (with the
    /// reason) before any shard exists; an unavailable database is tried again later.
    /// One runner plans at a time: the others (every pod of an Indexed Job starts at
    /// once) wait for its plan instead of each sorting the table's keys.
    async fn plan(&self, sql: &mut Option<Sql>) -> Result<()> {
        let n = self.spec.shards;
        let built = match sql.take() {
            Some(s) => Ok(s),
            None => Sql::build(&self.spec, &self.db).await,
        };
        // Held until the plan is recorded (dropping it rolls its transaction back).
        let mut lock = None;
        let bounds = match built {
            Ok(s) if n <= 1 => {
                *sql = Some(s);
                Ok(Some(Vec::new()))
            }
            Ok(s) => {
                let b = match table::planning_lock(&self.db, &self.spec.name).await {
                    Ok(None) => {
                        *sql = Some(s);
                        return Ok(()); // another runner is planning the job
                    }
                    Ok(Some(mut tx)) => {
                        if !self.store().job_shards(&self.spec.name).await?.is_empty() {
                            *sql = Some(s);
                            return Ok(()); // planned while this runner looked
                        }
                        let b = s.bounds(&mut tx, self.spec.tenant.as_deref(), n).await;
                        lock = Some(tx);
                        b
                    }
                    Err(e) => Err(e),
                };
                *sql = Some(s);
                b
            }
            Err(e) => Err(e),
        };
        match bounds {
            Ok(bounds) => {
                let planned = shards::plan(n, bounds);
                if self
                    .store()
                    .plan_job(&self.spec.name, &planned, now_ms())
                    .await?
                {
                    tracing::info!(job = %self.spec.name, shards = n, "job planned");
                }
            }
            Err(BatchError::Fatal(msg)) => {
                tracing::error!(error = %msg, "job failed");
                self.store()
                    .fail_unplanned_job(&self.spec.name, &msg, now_ms())
                    .await?;
            }
            Err(BatchError::Transient(msg)) => {
                tracing::warn!(error = %msg, "cannot plan the job yet; retrying");
            }
        }
        drop(lock);
        Ok(())
    }

    fn lease_until(&self) -> i64 {
        lease_end(self.cfg.lease)
    }

    /// A shard's record: its state, checkpoint, counters and error, with the lease
    /// renewed from now.
    fn update(
        &self,
        state: JobState,
        checkpoint: Option<String>,
        progress: &JobProgress,
        error: Option<String>,
    ) -> JobUpdate {
        JobUpdate {
            state,
            checkpoint,
            progress: progress.to_json(),
            error,
            lease_until: self.lease_until(),
        }
    }

    /// Renews the lease on `shard` every [`Runner::max_wait`] until the returned task
    /// is dropped (a lost or finished lease ends it; the run notices at its next
    /// checkpoint).
    pub(super) fn heartbeat(&self, shard: u32) -> Task<()> {
        let store = self.jobs.clone();
        let (job, owner) = (self.spec.name.clone(), self.cfg.owner.clone());
        let (every, lease) = (self.max_wait(), self.cfg.lease);
        Task::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match store
                    .renew_job_shard_lease(&job, shard, &owner, lease_end(lease))
                    .await
                {
                    Ok(true) => {}
                    // Lost or finished: the run notices at its next checkpoint.
                    Ok(false) => return,
                    Err(e) => tracing::warn!(error = %e, "cannot renew the shard lease; retrying"),
                }
            }
        })
    }

    /// The longest this runner waits between lease renewals: a third of the lease
    /// (at most 30 s), so a slow key store cannot let the lease run out.
    pub(super) fn max_wait(&self) -> Duration {
        (self.cfg.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Records `shard`'s progress (and the job's totals) and renews its lease, after
    /// the record still in flight (`recording`) landed; returns what operators want
    /// next.
    pub(super) async fn renew(
        &self,
        recording: &mut Recording,
        shard: u32,
        state: JobState,
        checkpoint: Option<String>,
        progress: &JobProgress,
        error: Option<String>,
    ) -> Result<JobControl> {
        self.landed(recording).await?;
        self.record(shard, state, checkpoint, progress, error).await
    }

    /// Starts recording `shard`'s progress in its own task, so that the key store's
    /// transaction (the job's totals are rewritten with it) runs while the next batch
    /// is processed instead of between batches; first waits for the record still in
    /// flight, whose answer (what operators want) it returns. Records land in order,
    /// one at a time, so a checkpoint never moves back; a lost lease or a pause is
    /// seen one batch later than with [`Runner::renew`].
    pub(super) async fn renew_later(
        &self,
        recording: &mut Recording,
        shard: u32,
        checkpoint: Option<String>,
        progress: &JobProgress,
    ) -> Result<Option<JobControl>> {
        let control = self.landed(recording).await?;
        let store = self.jobs.clone();
        let (job, owner) = (self.spec.name.clone(), self.cfg.owner.clone());
        let update = self.update(JobState::Running, checkpoint, progress, None);
        *recording = Some(Task::spawn(async move {
            record(store.as_ref(), &job, shard, &owner, update).await
        }));
        Ok(control)
    }

    /// Waits for the record in flight, if any; returns its answer.
    pub(super) async fn landed(&self, recording: &mut Recording) -> Result<Option<JobControl>> {
        match recording.take() {
            None => Ok(None),
            Some(mut t) => match t.join("checkpoint").await {
                Ok(r) => r.map(Some),
                Err(BatchError::Fatal(msg) | BatchError::Transient(msg)) => {
                    Err(Error::Internal(msg))
                }
            },
        }
    }

    async fn record(
        &self,
        shard: u32,
        state: JobState,
        checkpoint: Option<String>,
        progress: &JobProgress,
        error: Option<String>,
    ) -> Result<JobControl> {
        let update = self.update(state, checkpoint, progress, error);
        record(
            self.store(),
            &self.spec.name,
            shard,
            &self.cfg.owner,
            update,
        )
        .await
    }
}

/// A shard's record in flight (see [`Runner::renew_later`]).
pub(super) type Recording = Option<Task<Result<JobControl>>>;

/// Records a shard's progress (and the job's totals) and renews its lease; returns
/// what operators want next, or the lost lease as [`Error::JobConflict`].
async fn record(
    store: &dyn JobStore,
    job: &str,
    shard: u32,
    owner: &str,
    update: JobUpdate,
) -> Result<JobControl> {
    match store
        .update_job_shard(job, shard, owner, update, &shards::totals)
        .await?
    {
        Some(c) => Ok(c),
        None => Err(Error::JobConflict {
            job: job.to_owned(),
            reason: format!("this runner lost the lease of shard {shard} to another one; stopping"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(n: u32, state: JobState) -> JobShardRecord {
        JobShardRecord {
            job_id: "j".into(),
            shard: n,
            lo: None,
            hi: None,
            state,
            owner: None,
            lease_until: None,
            checkpoint: None,
            progress: "{}".into(),
            error: None,
            started_at: None,
            updated_at: 0,
            finished_at: None,
        }
    }

    fn order(shards: &[JobShardRecord], p: Option<u32>) -> Vec<u32> {
        candidates(shards, p).iter().map(|s| s.shard).collect()
    }

    #[test]
    fn a_runner_works_its_own_shard_first_then_takes_over_round_the_ring() {
        let mut s: Vec<_> = (0..4).map(|i| shard(i, JobState::Running)).collect();
        assert_eq!(
            order(&s, Some(2)),
            vec![2],
            "only its own while it is unfinished"
        );
        assert_eq!(order(&s, None), vec![0, 1, 2, 3]);
        s.get_mut(2).unwrap().state = JobState::Completed;
        assert_eq!(order(&s, Some(2)), vec![3, 0, 1, 2]);
        assert_eq!(order(&s, Some(3)), vec![3], "its own is still unfinished");
        s.get_mut(3).unwrap().state = JobState::Completed;
        assert_eq!(
            order(&s, Some(3)),
            vec![0, 1, 2, 3],
            "round the ring from 0"
        );
    }
}
