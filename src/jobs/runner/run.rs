//! The run loop: shard after shard (its own first, then those it takes over), the
//! pipeline that reads batch N+1 while batch N is rewrapped and batch N-1 written,
//! advances a shard's checkpoint only past completed writes, retries transient
//! failures with backoff, obeys pause and cancel, and publishes progress.
//!
//! Owns: [`Runner::run`], a shard's run and the steps of one batch. Does not: build
//! SQL (`table`), rewrap values (`rewrap`) or plan, claim and renew shards (`lease`).

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::lease::{Next, Recording};
use super::rewrap::{RowTally, Update, settle, version_of};
use super::table::{DbRow, Reader, Sql, fetch, write_rows};
use super::{BatchError, BatchResult, Outcome, Runner, Task, create};
use crate::error::{Error, Result};
use crate::model::{JobControl, JobProgress, JobShardRecord, JobState};

/// Conflict rounds per batch before the remaining rows are reported as leftovers.
const MAX_CONFLICT_ROUNDS: usize = 8;

/// A batch whose write runs in its own task.
struct InFlight {
    /// The batch's last key.
    last: String,
    task: Task<(Vec<Update>, BatchResult<HashSet<String>>)>,
}

fn abort<T>(h: &mut Option<T>) {
    // Dropping the guard aborts its task.
    h.take();
}

impl Runner {
    /// Runs the job until it completes, is cancelled or fails: plans its shards if no
    /// runner did yet, works this runner's own shard ([`RunnerConfig::shard`]), then
    /// takes over any shard whose lease ran out (a dead runner's) or nobody started,
    /// and stands by while other runners hold the rest, until every shard is finished.
    /// Waits while the job is paused. Creates the job on first use.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the rate limit could outlast the lease, or for a
    /// preferred shard the job does not have; [`Error::JobConflict`] for a spec that
    /// differs from the stored one or a lost lease; [`Error::Store`] if the key store
    /// fails outside a batch.
    ///
    /// [`RunnerConfig::shard`]: super::RunnerConfig::shard
    pub async fn run(&self) -> Result<Outcome> {
        // The rate limit waits up to batch_size / (this runner's share of the rate) per
        // batch without renewing the lease: refuse settings where that could let
        // another runner take over.
        if self.rate_share() > 0 {
            let wait = Duration::from_secs_f64(
                f64::from(self.spec.batch_size) / f64::from(self.rate_share()),
            );
            if wait > self.max_wait() {
                let msg = format!(
                    "batch_size / (rate_limit_rows_per_sec / shards) is {wait:.1?} per batch, \
                     longer than a third of the lease ({:.1?}): lower batch_size or lengthen \
                     the lease",
                    self.max_wait()
                );
                return Err(Error::InvalidArgument(msg));
            }
        }
        if let Some(p) = self.cfg.shard
            && p >= self.spec.shards
        {
            return Err(Error::InvalidArgument(format!(
                "shard {p} of a job of {} shards (shards are numbered from 0)",
                self.spec.shards
            )));
        }
        for c in self.spec.columns.iter().filter(|c| c.blind_index.is_some()) {
            // Checked before the job is even created: a runner without the field's
            // profile would compute index values nobody can match.
            self.keyring.index_profile(&c.field)?;
        }
        create(self.store(), &self.spec).await?;
        let mut sql = None;
        let mut standing_by = false;
        loop {
            match self.next_shard(&mut sql).await? {
                Next::Finished(outcome) => return Ok(outcome),
                Next::Shard(shard) => {
                    standing_by = false;
                    self.run_shard(&mut sql, shard).await?;
                }
                Next::Wait => {
                    if !standing_by {
                        tracing::info!(job = %self.spec.name, owner = %self.cfg.owner, "every unfinished shard is held by another runner; standing by");
                        standing_by = true;
                    }
                    tokio::time::sleep(self.cfg.poll).await;
                }
            }
        }
    }

    /// Works one shard this runner holds until it completes, is cancelled or fails
    /// (waiting while the job is paused).
    async fn run_shard(&self, sql: &mut Option<Sql>, shard: JobShardRecord) -> Result<()> {
        let id = shard.shard;
        // Keep the lease alive while a batch takes long (a slow KMS or database):
        // renewed every third of its length until this shard's run returns.
        let _heartbeat = self.heartbeat(id);
        // The shard's record in flight: see `renew_later`.
        let mut recording: Recording = None;
        let mut progress = JobProgress::parse(&shard.progress)?;
        progress.runs += 1;
        let reval = u64::try_from(self.keyring.revalidate_after().as_millis()).unwrap_or(u64::MAX);
        progress.revalidate_ms = progress.revalidate_ms.max(reval);
        let lo = shard.lo.clone();
        let hi = shard.hi.clone();
        // Where reading resumes: past the checkpoint, or past the shard's lower bound.
        let start = |cp: &Option<String>| cp.clone().or_else(|| lo.clone());
        let mut checkpoint = shard.checkpoint.clone();
        tracing::info!(job = %self.spec.name, shard = id, owner = %self.cfg.owner, checkpoint = ?checkpoint.is_some(), run = progress.runs, "shard started");
        while sql.is_none() {
            match Sql::build(&self.spec, &self.db).await {
                Ok(s) => *sql = Some(s),
                Err(BatchError::Fatal(msg)) => {
                    return self
                        .finish(&mut recording, id, JobState::Failed, progress, Some(msg))
                        .await;
                }
                Err(BatchError::Transient(msg)) => {
                    tracing::warn!(error = %msg, "cannot inspect the table yet; retrying");
                    self.renew(
                        &mut recording,
                        id,
                        JobState::Running,
                        None,
                        &progress,
                        Some(msg),
                    )
                    .await?;
                    tokio::time::sleep(self.cfg.poll).await;
                }
            }
        }
        let Some(sql) = sql.as_ref() else {
            return Err(Error::Internal("job SQL missing after it was built".into()));
        };
        if progress.total_rows == 0 {
            match sql
                .count(
                    &self.db,
                    self.spec.tenant.as_deref(),
                    lo.as_deref(),
                    hi.as_deref(),
                )
                .await
            {
                Ok(n) => progress.total_rows = n,
                Err(BatchError::Fatal(msg)) => {
                    return self
                        .finish(&mut recording, id, JobState::Failed, progress, Some(msg))
                        .await;
                }
                Err(BatchError::Transient(_)) => {}
            }
        }
        let mut control = self
            .renew(&mut recording, id, JobState::Running, None, &progress, None)
            .await?;
        let limiter = self.limiter();
        let mut backoff = self.cfg.poll;
        let mut state = JobState::Running;
        let update = sql.tagged_update(&self.spec.name, id, &self.cfg.owner);
        let reader = || self.reader(sql, hi.clone());
        // The next batch is read while this one is rewrapped and written (its rows are
        // past this batch's, so the two never overlap; the compare-and-set covers rows
        // that change in between).
        let mut prefetch: Option<Task<BatchResult<Vec<DbRow>>>> = None;
        // This batch's write runs while the next batch is rewrapped; the checkpoint
        // only ever names a batch whose write (and conflict retries) completed.
        let mut inflight: Option<InFlight> = None;
        let mut cursor = start(&checkpoint);
        loop {
            if control != JobControl::Run && inflight.is_some() {
                // Finish what is in flight before pausing or cancelling.
                abort(&mut prefetch);
                match self
                    .complete(sql, &update, inflight.take(), &mut progress)
                    .await
                {
                    Ok(done) => checkpoint = done.or(checkpoint),
                    Err(BatchError::Fatal(msg)) => {
                        return self
                            .finish(&mut recording, id, JobState::Failed, progress, Some(msg))
                            .await;
                    }
                    Err(BatchError::Transient(msg)) => {
                        tracing::warn!(error = %msg, "write failed; the batch will be read again")
                    }
                }
                cursor = start(&checkpoint);
                control = self
                    .renew(
                        &mut recording,
                        id,
                        JobState::Running,
                        checkpoint.clone(),
                        &progress,
                        None,
                    )
                    .await?;
                continue;
            }
            match control {
                JobControl::Cancel => {
                    return self
                        .finish(&mut recording, id, JobState::Cancelled, progress, None)
                        .await;
                }
                JobControl::Pause => {
                    if state != JobState::Paused {
                        tracing::info!(job = %self.spec.name, shard = id, "job paused");
                        state = JobState::Paused;
                    }
                    control = self
                        .renew(&mut recording, id, state, None, &progress, None)
                        .await?;
                    tokio::time::sleep(self.cfg.poll).await;
                    continue;
                }
                JobControl::Run => {
                    if state == JobState::Paused {
                        tracing::info!(job = %self.spec.name, shard = id, "job resumed");
                    }
                    state = JobState::Running;
                }
            }
            let rows = match prefetch.take() {
                Some(mut h) => h.join("reader").await.and_then(|rows| rows),
                None => fetch(reader(), cursor.clone()).await,
            };
            let result = match rows {
                Ok(rows) => match rows.last().map(|r| r.pk.clone()) {
                    None => match self
                        .complete(sql, &update, inflight.take(), &mut progress)
                        .await
                    {
                        Ok(_) => {
                            return self
                                .finish(&mut recording, id, JobState::Completed, progress, None)
                                .await;
                        }
                        Err(e) => Err(e),
                    },
                    Some(last) => {
                        prefetch = Some(Task::spawn(fetch(reader(), Some(last.clone()))));
                        cursor = Some(last);
                        // A step that fails leaves no counts behind: its rows are read,
                        // and counted, again.
                        let mut trial = progress.clone();
                        let r = self
                            .step(
                                sql,
                                &update,
                                rows,
                                &mut inflight,
                                &mut trial,
                                limiter.as_ref(),
                            )
                            .await;
                        if r.is_ok() {
                            progress = trial;
                        }
                        r
                    }
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(done) => {
                    backoff = self.cfg.poll;
                    if done.is_some() {
                        checkpoint = done;
                    }
                    // Recorded while the next batch is processed.
                    if let Some(c) = self
                        .renew_later(&mut recording, id, checkpoint.clone(), &progress)
                        .await?
                    {
                        control = c;
                    }
                }
                Err(e) => {
                    abort(&mut prefetch);
                    // Let the write in flight land (it is complete or it is not; either
                    // way its rows are read again if the checkpoint does not cover them).
                    if let Ok(Some(done)) = self
                        .complete(sql, &update, inflight.take(), &mut progress)
                        .await
                    {
                        checkpoint = Some(done);
                    }
                    cursor = start(&checkpoint);
                    match e {
                        BatchError::Fatal(msg) => {
                            tracing::error!(error = %msg, shard = id, "shard failed");
                            return self
                                .finish(&mut recording, id, JobState::Failed, progress, Some(msg))
                                .await;
                        }
                        BatchError::Transient(msg) => {
                            tracing::warn!(error = %msg, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying from the checkpoint");
                            // Shown as the job's error until a batch succeeds again.
                            control = self
                                .renew(
                                    &mut recording,
                                    id,
                                    JobState::Running,
                                    checkpoint.clone(),
                                    &progress,
                                    Some(msg),
                                )
                                .await?;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(self.max_wait());
                        }
                    }
                }
            }
            self.progress_tx.send_replace(progress.clone());
        }
    }

    fn reader(&self, sql: &Sql, hi: Option<String>) -> Reader {
        sql.reader(self.db.clone(), self.spec.tenant.clone(), hi)
    }

    /// This runner's rows per second (0: unlimited). The job's rate limit is the
    /// whole job's: each of its `shards` runners gets its share (rounded up), so N
    /// runners put on the database what one would.
    fn rate_share(&self) -> u32 {
        (self.spec.rate_limit_rows_per_sec).div_ceil(self.spec.shards.max(1))
    }

    fn limiter(&self) -> Option<DefaultDirectRateLimiter> {
        let rate = NonZeroU32::new(self.rate_share())?;
        let burst = NonZeroU32::new(self.spec.batch_size.max(rate.get())).unwrap_or(rate);
        Some(RateLimiter::direct(
            Quota::per_second(rate).allow_burst(burst),
        ))
    }

    /// Ends this runner's work on `shard` in `state` (and releases its lease), after
    /// the record in flight.
    async fn finish(
        &self,
        recording: &mut Recording,
        shard: u32,
        state: JobState,
        progress: JobProgress,
        error: Option<String>,
    ) -> Result<()> {
        self.renew(recording, shard, state, None, &progress, error)
            .await?;
        self.progress_tx.send_replace(progress.clone());
        tracing::info!(job = %self.spec.name, shard, state = %state, rewrapped = progress.values_rewrapped, "shard finished");
        Ok(())
    }

    /// Settles the rows a write changed; rows it did not change (the application wrote
    /// them meanwhile) are read again, rewrapped and written again, for at most
    /// [`MAX_CONFLICT_ROUNDS`] rounds; what still fails is reported as leftovers.
    async fn settle_writes(
        &self,
        sql: &Sql,
        update: &str,
        mut updates: Vec<Update>,
        mut written: HashSet<String>,
        progress: &mut JobProgress,
    ) -> BatchResult<()> {
        for round in 0.. {
            let mut retry = Vec::new();
            for (row, _, tally) in updates {
                if written.contains(&row.pk) {
                    progress.rows_updated += 1;
                    settle(progress, &row, tally);
                } else {
                    progress.conflicts += 1;
                    retry.push(row.pk);
                }
            }
            if retry.is_empty() {
                return Ok(());
            }
            let pending = sql
                .reread(&self.db, &retry, self.spec.tenant.as_deref())
                .await?;
            if round + 1 >= MAX_CONFLICT_ROUNDS {
                for row in &pending {
                    let mut tally = RowTally::default();
                    for v in row.values.iter().flatten() {
                        tally.failed.push((
                            version_of(v.bytes()),
                            "row kept changing under the job".into(),
                        ));
                    }
                    settle(progress, row, tally);
                }
                return Ok(());
            }
            updates = self.prepare(pending, progress).await?;
            if updates.is_empty() {
                return Ok(());
            }
            written = write_rows(&self.db, update, &sql.kinds, &updates).await?;
        }
        Ok(())
    }

    /// One pipeline step: rewraps `rows` (non-empty) while the previous batch's write
    /// is in flight, then completes that write and starts this batch's. Returns the
    /// last key of the batch now complete (the new checkpoint), if any.
    async fn step(
        &self,
        sql: &Sql,
        update: &str,
        rows: Vec<DbRow>,
        inflight: &mut Option<InFlight>,
        progress: &mut JobProgress,
        limiter: Option<&DefaultDirectRateLimiter>,
    ) -> BatchResult<Option<String>> {
        if let Some(l) = limiter
            && let Some(n) = u32::try_from(rows.len()).ok().and_then(NonZeroU32::new)
        {
            // n <= batch_size <= burst, so this cannot be refused.
            let _ = l.until_n_ready(n).await;
        }
        progress.rows_scanned += rows.len() as u64;
        let last = rows.last().map(|r| r.pk.clone()).unwrap_or_default();
        let updates = self.prepare(rows, progress).await?;
        let done = self
            .complete(sql, update, inflight.take(), progress)
            .await?;
        let (db, q, kinds) = (self.db.clone(), update.to_owned(), sql.kinds.clone());
        *inflight = Some(InFlight {
            last,
            task: Task::spawn(async move {
                let w = write_rows(&db, &q, &kinds, &updates).await;
                (updates, w)
            }),
        });
        Ok(done)
    }

    /// Waits for a batch's write and settles it (conflicts included). Returns its last
    /// key: everything up to it is done.
    async fn complete(
        &self,
        sql: &Sql,
        update: &str,
        inflight: Option<InFlight>,
        progress: &mut JobProgress,
    ) -> BatchResult<Option<String>> {
        let Some(mut f) = inflight else {
            return Ok(None);
        };
        let (updates, written) = f.task.join("writer").await?;
        self.settle_writes(sql, update, updates, written?, progress)
            .await?;
        Ok(Some(std::mem::take(&mut f.last)))
    }
}
