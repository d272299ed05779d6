//! The re-encryption runner: walks a PostgreSQL table in primary-key order and moves
//! every ciphertext on an old key version to the tenant's active version.
//!
//! Safety rules, in the order they matter:
//! - a row is written only if it is still the version that was read (its `xmin`,
//!   compared in one `UPDATE ... FROM unnest(...)` per batch); a row the application
//!   changed meanwhile is read again and retried, never overwritten;
//! - only the lease holder advances a job; the lease is renewed at every checkpoint
//!   and by a heartbeat every third of its length (so a slow batch keeps it), and a
//!   runner that lost it stops at its next checkpoint;
//! - the checkpoint (last primary key fully processed) names only batches whose write
//!   and conflict retries completed, so a crash re-reads at most the batches after
//!   it, whose values are then current and skipped.
//!
//! Pipeline: batch N+1 is read (in its own task) and rewrapped while batch N's write
//! runs (in its own task); a batch's rewrapping is split over two worker threads.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;

use super::spec::{ColumnSpec, JobSpec, quote};
use crate::crypto::{self, Aad, Envelope};
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::kms::KmsError;
use crate::store::{
    JobControl, JobProgress, JobRecord, JobState, JobUpdate, KeyStore, NewJob, StoreError,
    is_unavailable, now_ms,
};

/// Conflict rounds per batch before the remaining rows are reported as leftovers.
const MAX_CONFLICT_ROUNDS: usize = 8;

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
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Final (or, if another runner holds it, current) state.
    pub state: JobState,
    /// Counters.
    pub progress: JobProgress,
}

#[derive(Clone, Copy)]
enum ColKind {
    Bytes,
    Text,
}

enum Value {
    Bytes(Vec<u8>),
    Text(String),
    /// A recomputed blind index: written in its column's form (binary or `fkb1:`).
    Index(crypto::BlindIndex),
}

impl Value {
    fn bytes(&self) -> &[u8] {
        match self {
            Value::Bytes(b) => b,
            Value::Text(s) => s.as_bytes(),
            Value::Index(i) => i.as_bytes(),
        }
    }
}

struct DbRow {
    pk: String,
    /// The row version (`xmin`) read: the write's compare-and-set token.
    xmin: String,
    tenant: String,
    subject: Option<String>,
    context: Vec<u8>,
    values: Vec<Option<Value>>,
}

/// Why a batch stopped.
enum BatchError {
    /// Retry later (KMS, key store or database unavailable).
    Transient(String),
    /// Needs an operator.
    Fatal(String),
}

type BatchResult<T> = std::result::Result<T, BatchError>;

/// A row after rewrapping: the row as read, its new column values (`None`: nothing
/// to write), its tallies.
type Rewrapped = (DbRow, Option<Vec<Option<Value>>>, RowTally);

/// A row to write: the row as read, its new column values, its tallies.
type Update = (DbRow, Vec<Option<Value>>, RowTally);

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

/// A batch whose write runs in its own task.
struct InFlight {
    /// The batch's last key.
    last: String,
    task: Task<(Vec<Update>, BatchResult<HashSet<String>>)>,
}

/// What reading a batch needs, owned, so the next batch can be read in a task of its
/// own while this one is processed.
struct Reader {
    db: PgPool,
    first: String,
    after: String,
    kinds: Vec<ColKind>,
    tenant: Option<String>,
}

/// The batch after `checkpoint` (the first batch without one).
async fn fetch(r: Reader, checkpoint: Option<String>) -> BatchResult<Vec<DbRow>> {
    let q = if checkpoint.is_some() {
        r.after
    } else {
        r.first
    };
    let rows = sqlx::query(AssertSqlSafe(q))
        .bind(checkpoint)
        .bind(r.tenant.as_deref())
        .fetch_all(&r.db)
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| decode_row(row, &r.kinds, r.tenant.as_deref()))
        .collect()
}

fn abort<T>(h: &mut Option<T>) {
    // Dropping the guard aborts its task.
    h.take();
}

fn db_error(e: sqlx::Error) -> BatchError {
    // Beyond an unavailable database, serialization failures and deadlocks (a
    // concurrent application transaction) are worth a retry too.
    let conflict = matches!(&e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c == "40001" || c == "40P01"));
    if is_unavailable(&e) || conflict {
        BatchError::Transient(format!("database: {e}"))
    } else {
        BatchError::Fatal(format!("database: {e}"))
    }
}

fn is_transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Kms(KmsError::Unavailable(_) | KmsError::Timeout | KmsError::Throttled)
            | Error::Store(StoreError::Unavailable(_))
    )
}

/// Per-row tallies, added to the job's counters once the row is settled.
#[derive(Default)]
struct RowTally {
    rewrapped: u64,
    current: u64,
    shredded: u64,
    indexes_recomputed: u64,
    indexes_current: u64,
    indexes_cleared: u64,
    failed: Vec<(Option<u32>, String)>,
}

/// The SQL of one job, built once from its spec and the table's column types.
struct Sql {
    first: String,
    after: String,
    by_pk: String,
    update: String,
    count: String,
    kinds: Vec<ColKind>,
}

async fn column_type(
    db: &PgPool,
    table: &str,
    col: &str,
) -> std::result::Result<String, BatchError> {
    let row = sqlx::query(
        "SELECT format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a \
         WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table)
    .bind(col)
    .fetch_optional(db)
    .await
    .map_err(db_error)?;
    match row {
        Some(r) => r.try_get("t").map_err(db_error),
        None => Err(BatchError::Fatal(format!(
            "table {table} has no column {col}"
        ))),
    }
}

impl Sql {
    async fn build(spec: &JobSpec, db: &PgPool) -> std::result::Result<Self, BatchError> {
        let table = spec.quoted_table();
        let pk = quote(&spec.primary_key);
        let pk_type = column_type(db, &table, &spec.primary_key).await?;
        let unique: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indnkeyatts = 1 \
               AND i.indpred IS NULL AND a.attnotnull AND a.attname = $2 LIMIT 1",
        )
        .bind(&table)
        .bind(&spec.primary_key)
        .fetch_optional(db)
        .await
        .map_err(db_error)?;
        if unique.is_none() {
            return Err(BatchError::Fatal(format!(
                "{} is not a NOT NULL single-column unique key of {} (a partial index does not count)",
                spec.primary_key, spec.table
            )));
        }
        let mut kinds = Vec::new();
        // The encrypted columns, then their blind-index columns (in the same order).
        let value_cols = value_columns(&spec.columns);
        for name in &value_cols {
            let t = column_type(db, &table, name).await?;
            kinds.push(match t.as_str() {
                "bytea" => ColKind::Bytes,
                t if t == "text" || t.starts_with("character varying") => ColKind::Text,
                other => {
                    return Err(BatchError::Fatal(format!(
                        "column {name} is {other}; encrypted and blind-index columns must be bytea or text"
                    )));
                }
            });
        }
        let tenant_expr = match &spec.tenant_column {
            Some(c) => format!("{}::text", quote(c)),
            None => "$t$$t$".to_owned(),
        };
        let tenant_filter = match (&spec.tenant_column, &spec.tenant) {
            (Some(c), Some(_)) => format!(" AND {}::text = $2", quote(c)),
            _ => String::new(),
        };
        let subject_expr = spec
            .subject_column
            .as_ref()
            .map_or("NULL::text".to_owned(), |c| format!("{}::text", quote(c)));
        let context_expr = spec
            .context_column
            .as_ref()
            .map_or("NULL::text".to_owned(), |c| format!("{}::text", quote(c)));
        let cols: Vec<String> = value_cols.iter().map(|c| quote(c)).collect();
        let select = format!(
            "SELECT {pk}::text AS fk_pk, xmin::text AS fk_xmin, {tenant_expr} AS fk_tenant, {subject_expr} AS fk_subject, \
             {context_expr} AS fk_context, {} FROM {table}",
            cols.join(", ")
        );
        let limit = spec.batch_size;
        // $1 is the checkpoint (unused by `first`, which still binds it so that the
        // tenant filter is always $2).
        let first = format!(
            "{select} WHERE ($1::text IS NULL OR TRUE){tenant_filter} ORDER BY {pk} LIMIT {limit}"
        );
        let after = format!(
            "{select} WHERE {pk} > $1::text::{pk_type}{tenant_filter} ORDER BY {pk} LIMIT {limit}"
        );
        let by_pk = format!("{select} WHERE {pk} = ANY($1::text[]::{pk_type}[])");
        let count = match (&spec.tenant_column, &spec.tenant) {
            (Some(c), Some(_)) => {
                format!("SELECT count(*) FROM {table} WHERE {}::text = $1", quote(c))
            }
            _ => format!("SELECT count(*) FROM {table} WHERE $1::text IS NULL OR TRUE"),
        };
        // UPDATE ... FROM unnest(pks, row versions, new1, new2, ...): one statement per
        // batch. Each row is guarded by its version (`xmin`) as read: any change since
        // the read, committed or in flight, makes the guard fail (PostgreSQL re-checks
        // it on the newest row version after waiting for a concurrent writer).
        let mut arrays = vec!["$1::text[]".to_owned(), "$2::text[]".to_owned()];
        let mut names = vec!["pk".to_owned(), "xm".to_owned()];
        let mut sets = Vec::new();
        for (i, (c, k)) in cols.iter().zip(&kinds).enumerate() {
            let ty = match k {
                ColKind::Bytes => "bytea[]",
                ColKind::Text => "text[]",
            };
            arrays.push(format!("${}::{ty}", i + 3));
            names.push(format!("n{i}"));
            sets.push(format!("{c} = v.n{i}"));
        }
        let update = format!(
            "UPDATE {table} AS t SET {} FROM unnest({}) AS v({}) \
             WHERE t.{pk} = v.pk::{pk_type} AND t.xmin = v.xm::xid RETURNING v.pk",
            sets.join(", "),
            arrays.join(", "),
            names.join(", "),
        );
        Ok(Self {
            first,
            after,
            by_pk,
            update,
            count,
            kinds,
        })
    }
}

fn decode_row(
    row: &PgRow,
    kinds: &[ColKind],
    fixed_tenant: Option<&str>,
) -> std::result::Result<DbRow, BatchError> {
    let get_err = |e: sqlx::Error| BatchError::Fatal(format!("reading a row: {e}"));
    let pk: String = row.try_get("fk_pk").map_err(get_err)?;
    let xmin: String = row.try_get("fk_xmin").map_err(get_err)?;
    let tenant: Option<String> = row.try_get("fk_tenant").map_err(get_err)?;
    let tenant = match (fixed_tenant, tenant) {
        (_, Some(t)) if !t.is_empty() => t,
        (Some(t), _) => t.to_owned(),
        _ => String::new(),
    };
    let subject: Option<String> = row.try_get("fk_subject").map_err(get_err)?;
    let context: Option<String> = row.try_get("fk_context").map_err(get_err)?;
    let mut values = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        let idx = 5 + i;
        values.push(match k {
            ColKind::Bytes => row
                .try_get::<Option<Vec<u8>>, _>(idx)
                .map_err(get_err)?
                .map(Value::Bytes),
            ColKind::Text => row
                .try_get::<Option<String>, _>(idx)
                .map_err(get_err)?
                .map(Value::Text),
        });
    }
    Ok(DbRow {
        pk,
        xmin,
        tenant,
        subject: subject.filter(|s| !s.is_empty()),
        context: context.map(String::into_bytes).unwrap_or_default(),
        values,
    })
}

/// Creates the job for `spec` unless it exists (then the stored spec must be the same).
///
/// # Errors
/// [`Error::JobConflict`] if the id is taken by another spec; [`Error::Store`].
pub async fn create(store: &dyn KeyStore, spec: &JobSpec) -> Result<JobRecord> {
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
    db: PgPool,
    spec: JobSpec,
    columns: Arc<[ColumnSpec]>,
    cfg: RunnerConfig,
    progress_tx: watch::Sender<JobProgress>,
}

impl Runner {
    /// A runner for `spec` over the application database `db`. Progress is published
    /// on the returned receiver after every batch.
    pub fn new(
        keyring: Arc<Keyring>,
        db: PgPool,
        spec: JobSpec,
        cfg: RunnerConfig,
    ) -> (Self, watch::Receiver<JobProgress>) {
        let (progress_tx, rx) = watch::channel(JobProgress::default());
        (
            Self {
                keyring,
                db,
                columns: spec.columns.clone().into(),
                spec,
                cfg,
                progress_tx,
            },
            rx,
        )
    }

    fn store(&self) -> &dyn KeyStore {
        self.keyring.store().as_ref()
    }

    fn lease_until(&self) -> i64 {
        lease_end(self.cfg.lease)
    }

    /// Runs the job until it completes, is cancelled or fails; waits while it is
    /// paused or another runner holds it (and takes over if that runner's lease runs
    /// out). Creates the job on first use.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the rate limit could outlast the lease;
    /// [`Error::JobConflict`] for a spec that differs from the stored one or a lost
    /// lease; [`Error::Store`] if the key store fails outside a batch.
    pub async fn run(&self) -> Result<Outcome> {
        // The rate limit waits up to batch_size / rate per batch without renewing the
        // lease: refuse settings where that could let another runner take over.
        if self.spec.rate_limit_rows_per_sec > 0 {
            let wait = Duration::from_secs_f64(
                f64::from(self.spec.batch_size) / f64::from(self.spec.rate_limit_rows_per_sec),
            );
            if wait > self.max_wait() {
                let msg = format!(
                    "batch_size / rate_limit_rows_per_sec is {wait:.1?} per batch, longer than \
                     a third of the lease ({:.1?}): lower batch_size or lengthen the lease",
                    self.max_wait()
                );
                return Err(Error::InvalidArgument(msg));
            }
        }
        for c in self.spec.columns.iter().filter(|c| c.blind_index.is_some()) {
            // Checked before the job is even created: a runner without the field's
            // profile would compute index values nobody can match.
            self.keyring.index_profile(&c.field)?;
        }
        create(self.store(), &self.spec).await?;
        let job = loop {
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
                Some(job) => break job,
                None => {
                    let job = self
                        .store()
                        .get_job(&self.spec.name)
                        .await?
                        .ok_or_else(|| Error::JobNotFound {
                            job: self.spec.name.clone(),
                        })?;
                    if job.state.is_finished() {
                        return Ok(Outcome {
                            state: job.state,
                            progress: JobProgress::parse(&job.progress)?,
                        });
                    }
                    tracing::info!(job = %job.job_id, owner = ?job.owner, "job is held by another runner; standing by");
                    tokio::time::sleep(self.cfg.poll).await;
                }
            }
        };
        // Keep the lease alive while a batch takes long (a slow KMS or database):
        // renewed every third of its length until this run returns.
        let _heartbeat = self.heartbeat();
        let mut progress = JobProgress::parse(&job.progress)?;
        progress.runs += 1;
        let reval = u64::try_from(self.keyring.revalidate_after().as_millis()).unwrap_or(u64::MAX);
        progress.revalidate_ms = progress.revalidate_ms.max(reval);
        let mut checkpoint = job.checkpoint.clone();
        tracing::info!(job = %job.job_id, owner = %self.cfg.owner, checkpoint = ?checkpoint.is_some(), run = progress.runs, "job started");
        let sql = loop {
            match Sql::build(&self.spec, &self.db).await {
                Ok(s) => break s,
                Err(BatchError::Fatal(msg)) => {
                    return self.finish(JobState::Failed, progress, Some(msg)).await;
                }
                Err(BatchError::Transient(msg)) => {
                    tracing::warn!(error = %msg, "cannot inspect the table yet; retrying");
                    self.renew(JobState::Running, None, &progress, Some(msg))
                        .await?;
                    tokio::time::sleep(self.cfg.poll).await;
                }
            }
        };
        if progress.total_rows == 0 {
            match self.count(&sql).await {
                Ok(n) => progress.total_rows = n,
                Err(BatchError::Fatal(msg)) => {
                    return self.finish(JobState::Failed, progress, Some(msg)).await;
                }
                Err(BatchError::Transient(_)) => {}
            }
        }
        let mut control = self.renew(JobState::Running, None, &progress, None).await?;
        let limiter = self.limiter();
        let mut backoff = self.cfg.poll;
        let mut state = JobState::Running;
        // The next batch is read while this one is rewrapped and written (its rows are
        // past this batch's, so the two never overlap; the compare-and-set covers rows
        // that change in between).
        let mut prefetch: Option<Task<BatchResult<Vec<DbRow>>>> = None;
        // This batch's write runs while the next batch is rewrapped; the checkpoint
        // only ever names a batch whose write (and conflict retries) completed.
        let mut inflight: Option<InFlight> = None;
        let mut cursor = checkpoint.clone();
        loop {
            if control != JobControl::Run && inflight.is_some() {
                // Finish what is in flight before pausing or cancelling.
                abort(&mut prefetch);
                match self.complete(&sql, inflight.take(), &mut progress).await {
                    Ok(done) => checkpoint = done.or(checkpoint),
                    Err(BatchError::Fatal(msg)) => {
                        return self.finish(JobState::Failed, progress, Some(msg)).await;
                    }
                    Err(BatchError::Transient(msg)) => {
                        tracing::warn!(error = %msg, "write failed; the batch will be read again")
                    }
                }
                cursor = checkpoint.clone();
                control = self
                    .renew(JobState::Running, checkpoint.clone(), &progress, None)
                    .await?;
                continue;
            }
            match control {
                JobControl::Cancel => {
                    return self.finish(JobState::Cancelled, progress, None).await;
                }
                JobControl::Pause => {
                    if state != JobState::Paused {
                        tracing::info!(job = %self.spec.name, "job paused");
                        state = JobState::Paused;
                    }
                    control = self.renew(state, None, &progress, None).await?;
                    tokio::time::sleep(self.cfg.poll).await;
                    continue;
                }
                JobControl::Run => {
                    if state == JobState::Paused {
                        tracing::info!(job = %self.spec.name, "job resumed");
                    }
                    state = JobState::Running;
                }
            }
            let rows = match prefetch.take() {
                Some(mut h) => h.join("reader").await.and_then(|rows| rows),
                None => fetch(self.reader(&sql), cursor.clone()).await,
            };
            let result = match rows {
                Ok(rows) => match rows.last().map(|r| r.pk.clone()) {
                    None => match self.complete(&sql, inflight.take(), &mut progress).await {
                        Ok(_) => return self.finish(JobState::Completed, progress, None).await,
                        Err(e) => Err(e),
                    },
                    Some(last) => {
                        prefetch = Some(Task::spawn(fetch(self.reader(&sql), Some(last.clone()))));
                        cursor = Some(last);
                        // A step that fails leaves no counts behind: its rows are read,
                        // and counted, again.
                        let mut trial = progress.clone();
                        let r = self
                            .step(&sql, rows, &mut inflight, &mut trial, limiter.as_ref())
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
                    control = self
                        .renew(JobState::Running, checkpoint.clone(), &progress, None)
                        .await?;
                }
                Err(e) => {
                    abort(&mut prefetch);
                    // Let the write in flight land (it is complete or it is not; either
                    // way its rows are read again if the checkpoint does not cover them).
                    if let Ok(Some(done)) =
                        self.complete(&sql, inflight.take(), &mut progress).await
                    {
                        checkpoint = Some(done);
                    }
                    cursor = checkpoint.clone();
                    match e {
                        BatchError::Fatal(msg) => {
                            tracing::error!(error = %msg, "job failed");
                            return self.finish(JobState::Failed, progress, Some(msg)).await;
                        }
                        BatchError::Transient(msg) => {
                            tracing::warn!(error = %msg, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying from the checkpoint");
                            // Shown as the job's error until a batch succeeds again.
                            control = self
                                .renew(JobState::Running, checkpoint.clone(), &progress, Some(msg))
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

    fn reader(&self, sql: &Sql) -> Reader {
        Reader {
            db: self.db.clone(),
            first: sql.first.clone(),
            after: sql.after.clone(),
            kinds: sql.kinds.clone(),
            tenant: self.spec.tenant.clone(),
        }
    }

    fn heartbeat(&self) -> Task<()> {
        let store = self.keyring.store().clone();
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
    fn max_wait(&self) -> Duration {
        (self.cfg.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    fn limiter(&self) -> Option<DefaultDirectRateLimiter> {
        let rate = NonZeroU32::new(self.spec.rate_limit_rows_per_sec)?;
        let burst = NonZeroU32::new(self.spec.batch_size.max(rate.get())).unwrap_or(rate);
        Some(RateLimiter::direct(
            Quota::per_second(rate).allow_burst(burst),
        ))
    }

    async fn count(&self, sql: &Sql) -> std::result::Result<u64, BatchError> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.count.clone()))
            .bind(self.spec.tenant.as_deref())
            .fetch_one(&self.db)
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Records progress and renews the lease; returns what operators want next.
    async fn renew(
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

    async fn finish(
        &self,
        state: JobState,
        progress: JobProgress,
        error: Option<String>,
    ) -> Result<Outcome> {
        self.renew(state, None, &progress, error).await?;
        self.progress_tx.send_replace(progress.clone());
        tracing::info!(job = %self.spec.name, state = %state, rewrapped = progress.values_rewrapped, "job finished");
        Ok(Outcome { state, progress })
    }

    /// One batch after `checkpoint`. Returns the new checkpoint, or `None` at the end.
    /// Reads nothing, writes nothing: rewraps `rows`, settles those that need no
    /// write, and returns the others with their new values.
    async fn prepare(
        &self,
        mut rows: Vec<DbRow>,
        progress: &mut JobProgress,
    ) -> BatchResult<Vec<Update>> {
        // Rewrapping is CPU work: the second half of a batch goes to another worker
        // thread, so both cores are used while the database is busy with the write.
        let second = if rows.len() >= PARALLEL_MIN_ROWS {
            let tail = rows.split_off(rows.len() / 2);
            let (k, cols) = (self.keyring.clone(), self.columns.clone());
            Some(Task::spawn(
                async move { rewrap_rows(&k, &cols, tail).await },
            ))
        } else {
            None
        };
        let mut done = rewrap_rows(&self.keyring, &self.columns, rows).await?;
        if let Some(mut h) = second {
            let more = h.join("rewrap").await??;
            done.extend(more);
        }
        let mut updates = Vec::new();
        for (row, new_values, tally) in done {
            match new_values {
                Some(nv) => updates.push((row, nv, tally)),
                None => settle(progress, &row, tally),
            }
        }
        Ok(updates)
    }

    /// Settles the rows a write changed; rows it did not change (the application wrote
    /// them meanwhile) are read again, rewrapped and written again, for at most
    /// [`MAX_CONFLICT_ROUNDS`] rounds; what still fails is reported as leftovers.
    async fn settle_writes(
        &self,
        sql: &Sql,
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
            let pending = self.reread(sql, &retry).await?;
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
            written = write_rows(&self.db, &sql.update, &sql.kinds, &updates).await?;
        }
        Ok(())
    }

    /// One pipeline step: rewraps `rows` (non-empty) while the previous batch's write
    /// is in flight, then completes that write and starts this batch's. Returns the
    /// last key of the batch now complete (the new checkpoint), if any.
    async fn step(
        &self,
        sql: &Sql,
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
        let done = self.complete(sql, inflight.take(), progress).await?;
        let (db, q, kinds) = (self.db.clone(), sql.update.clone(), sql.kinds.clone());
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
        inflight: Option<InFlight>,
        progress: &mut JobProgress,
    ) -> BatchResult<Option<String>> {
        let Some(mut f) = inflight else {
            return Ok(None);
        };
        let (updates, written) = f.task.join("writer").await?;
        self.settle_writes(sql, updates, written?, progress).await?;
        Ok(Some(std::mem::take(&mut f.last)))
    }

    async fn reread(
        &self,
        sql: &Sql,
        pks: &[String],
    ) -> std::result::Result<Vec<DbRow>, BatchError> {
        let rows = sqlx::query(AssertSqlSafe(sql.by_pk.clone()))
            .bind(pks)
            .fetch_all(&self.db)
            .await
            .map_err(db_error)?;
        let mut by_pk: HashMap<String, DbRow> = HashMap::new();
        for r in &rows {
            let row = decode_row(r, &sql.kinds, self.spec.tenant.as_deref())?;
            by_pk.insert(row.pk.clone(), row);
        }
        // Rows deleted meanwhile are simply gone.
        Ok(pks.iter().filter_map(|pk| by_pk.remove(pk)).collect())
    }
}

/// Writes a batch's new values, each row guarded by its version; returns the keys of
/// the rows written.
async fn write_rows(
    db: &PgPool,
    update: &str,
    kinds: &[ColKind],
    updates: &[Update],
) -> BatchResult<HashSet<String>> {
    let mut q = sqlx::query(AssertSqlSafe(update.to_owned()))
        .bind(
            updates
                .iter()
                .map(|(r, _, _)| r.pk.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|(r, _, _)| r.xmin.clone())
                .collect::<Vec<_>>(),
        );
    for (i, kind) in kinds.iter().enumerate() {
        let new = updates
            .iter()
            .map(|(_, n, _)| n.get(i).and_then(Option::as_ref));
        q = match kind {
            ColKind::Bytes => q.bind(
                new.map(|v| v.map(|v| v.bytes().to_vec()))
                    .collect::<Vec<_>>(),
            ),
            ColKind::Text => q.bind(new.map(|v| v.map(text_of)).collect::<Vec<_>>()),
        };
    }
    let rows = q.fetch_all(db).await.map_err(db_error)?;
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(db_error))
        .collect()
}

/// The columns a job reads and writes: the encrypted ones, then their blind-index
/// columns in the same order.
fn value_columns(columns: &[ColumnSpec]) -> Vec<&str> {
    columns
        .iter()
        .map(|c| c.name.as_str())
        .chain(columns.iter().filter_map(|c| c.blind_index.as_deref()))
        .collect()
}

fn same(v: &Value) -> Value {
    match v {
        Value::Bytes(b) => Value::Bytes(b.clone()),
        Value::Text(s) => Value::Text(s.clone()),
        Value::Index(i) => Value::Index(i.clone()),
    }
}

/// A rewrapped envelope in the form of `like` (binary, or text for a text column).
fn in_form_of(like: &Value, bytes: Vec<u8>) -> std::result::Result<Value, BatchError> {
    Ok(match like {
        Value::Bytes(_) | Value::Index(_) => Value::Bytes(bytes),
        Value::Text(_) => Value::Text(
            String::from_utf8(bytes)
                .map_err(|_| BatchError::Fatal("text envelope is not UTF-8".into()))?,
        ),
    })
}

/// What became of one value's blind index.
enum IndexOutcome {
    /// Recomputed under the active version: write this (in the column's form).
    Set(crypto::BlindIndex),
    /// The value's key is shredded: clear the index.
    Clear,
    /// Could not be recomputed: leave it.
    Keep,
}

/// New values for a row's columns (`None` if nothing changes), and its tallies.
/// `row.values` holds the encrypted columns, then the blind-index columns.
async fn rewrap_row(
    keyring: &Keyring,
    columns: &[ColumnSpec],
    row: &DbRow,
) -> std::result::Result<(Option<Vec<Option<Value>>>, RowTally), BatchError> {
    let mut tally = RowTally::default();
    let mut out: Vec<Option<Value>> = Vec::with_capacity(row.values.len());
    let mut index_out: Vec<Option<Value>> = Vec::new();
    let mut changed = false;
    let mut index_values = row.values.iter().skip(columns.len());
    for (col, v) in columns.iter().zip(&row.values) {
        let stored_index = if col.blind_index.is_some() {
            Some(index_values.next().and_then(Option::as_ref))
        } else {
            None
        };
        let Some(v) = v else {
            out.push(None);
            if let Some(ix) = stored_index {
                index_out.push(ix.map(same));
            }
            continue;
        };
        let aad = Aad {
            tenant: &row.tenant,
            subject: row.subject.as_deref(),
            field: &col.field,
            context: &row.context,
        };
        let (rewrapped, index) = match stored_index {
            None => (keyring.rewrap(&aad, v.bytes()).await, IndexOutcome::Keep),
            Some(_) => match keyring.rewrap_and_index(&aad, v.bytes()).await {
                Ok((r, ix)) => (Ok(r), IndexOutcome::Set(ix)),
                Err(e @ Error::KeyDestroyed { .. }) => (Err(e), IndexOutcome::Clear),
                Err(e) => (Err(e), IndexOutcome::Keep),
            },
        };
        match rewrapped {
            Ok(r) if r.changed() => {
                tally.rewrapped += 1;
                changed = true;
                out.push(Some(in_form_of(v, r.ciphertext)?));
            }
            Ok(_) => {
                tally.current += 1;
                out.push(Some(same(v)));
            }
            Err(e) if is_transient(&e) => return Err(BatchError::Transient(e.to_string())),
            Err(Error::KeyDestroyed { .. }) => {
                tally.shredded += 1;
                out.push(Some(same(v)));
            }
            Err(e) => {
                tally.failed.push((version_of(v.bytes()), e.to_string()));
                out.push(Some(same(v)));
            }
        }
        let Some(stored) = stored_index else { continue };
        match index {
            IndexOutcome::Set(ix) => {
                let is_current = stored
                    .is_some_and(|s| crypto::BlindIndex::parse(s.bytes()).is_ok_and(|p| p == ix));
                if is_current {
                    tally.indexes_current += 1;
                    index_out.push(stored.map(same));
                } else {
                    tally.indexes_recomputed += 1;
                    changed = true;
                    index_out.push(Some(Value::Index(ix)));
                }
            }
            IndexOutcome::Clear => {
                if stored.is_some() {
                    tally.indexes_cleared += 1;
                    changed = true;
                }
                index_out.push(None);
            }
            IndexOutcome::Keep => {
                // Not recomputed: an index still on an old version blocks that
                // version's retirement like a ciphertext would.
                if let Some(ix) = stored.and_then(|s| crypto::BlindIndex::parse(s.bytes()).ok()) {
                    tally.failed.push((
                        Some(ix.version()),
                        "blind index not recomputed (its value could not be decrypted)".into(),
                    ));
                }
                index_out.push(stored.map(same));
            }
        }
    }
    out.extend(index_out);
    Ok((changed.then_some(out), tally))
}

/// Rewraps rows in order; see [`rewrap_row`].
async fn rewrap_rows(
    keyring: &Keyring,
    columns: &[ColumnSpec],
    rows: Vec<DbRow>,
) -> BatchResult<Vec<Rewrapped>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (nv, tally) = rewrap_row(keyring, columns, &row).await?;
        out.push((row, nv, tally));
    }
    Ok(out)
}

/// Rows per batch below which rewrapping stays on one task.
const PARALLEL_MIN_ROWS: usize = 64;

fn text_of(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Index(i) => i.to_text(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// The key version an envelope names, if it parses.
fn version_of(v: &[u8]) -> Option<u32> {
    let bytes = crypto::decode_any(v).ok()?;
    Envelope::parse(&bytes).ok().map(|e| e.key_version())
}

fn settle(progress: &mut JobProgress, row: &DbRow, tally: RowTally) {
    progress.values_rewrapped += tally.rewrapped;
    progress.values_current += tally.current;
    progress.values_shredded += tally.shredded;
    progress.indexes_recomputed += tally.indexes_recomputed;
    progress.indexes_current += tally.indexes_current;
    progress.indexes_cleared += tally.indexes_cleared;
    for (version, err) in tally.failed {
        progress.values_failed += 1;
        if let Some(v) = version {
            *progress
                .leftovers
                .entry(row.tenant.clone())
                .or_default()
                .entry(v)
                .or_default() += 1;
        }
        progress.last_error = Some(err);
    }
}

/// When a lease of length `lease` taken now ends, Unix ms.
fn lease_end(lease: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}
