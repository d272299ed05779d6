//! `fieldkey jobs ...`: run a re-encryption job here, or show and steer jobs through a
//! sidecar.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt as _;

use super::JobsCommand;
use super::client::{CliError, connect};
use crate::jobs::{JobSpec, RunnerConfig};
use crate::model::{JobProgress, JobState};
use crate::proto::pb::{self, jobs_client::JobsClient};

/// A progress bar with rate and ETA on a terminal; a log line every 5 s otherwise.
struct Display {
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl Display {
    fn new(enabled: bool) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (enabled && tty).then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows  {per_sec}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Self {
            bar,
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, total: u64, scanned: u64, msg: String) {
        match &self.bar {
            Some(b) => {
                b.set_length(total.max(scanned));
                b.set_position(scanned);
                b.set_message(msg);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                eprintln!("{scanned}/{total} rows  {msg}");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn summary(p: &JobProgress) -> String {
    format!(
        "rewrapped {}  current {}  conflicts {}  shredded {}  failed {}",
        p.values_rewrapped, p.values_current, p.conflicts, p.values_shredded, p.values_failed
    )
}

/// How `jobs run` runs: the lease, the display, the shards.
struct RunArgs {
    lease_seconds: u64,
    no_progress: bool,
    shards: Option<u32>,
    shard: Option<u32>,
}

async fn run(
    keys: super::KeyArgs,
    spec_path: std::path::PathBuf,
    args: RunArgs,
) -> Result<(), CliError> {
    let other = CliError::Other;
    let text = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("cannot read job spec {}", spec_path.display()))
        .map_err(other)?;
    let mut spec = JobSpec::from_toml(&text).map_err(|e| other(e.into()))?;
    if let Some(n) = args.shards {
        spec.shards = n;
        spec.validate().map_err(|e| other(e.into()))?;
    }
    if let Some(i) = args.shard
        && i >= spec.shards
    {
        return Err(other(anyhow::anyhow!(
            "shard {i} of a job of {} shards (shards are numbered from 0; give --shards)",
            spec.shards
        )));
    }
    let db_url = std::env::var(&spec.database_url_env)
        .with_context(|| {
            format!(
                "the job's database URL is read from ${}, which is not set",
                spec.database_url_env
            )
        })
        .map_err(other)?;
    let cfg = super::serve::key_config(&keys).map_err(other)?;
    crate::harden::harden_and_log();
    let parts = super::serve::build_keyring(&cfg, None)
        .await
        .map_err(other)?;
    let keyring = parts.keyring.clone();
    // Shreds and suspensions made by sidecars apply to this runner as soon as announced.
    let _follow = keyring
        .follow_changes()
        .await
        .map_err(|e| other(e.into()))?;
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&db_url)
        .await
        .context("cannot connect to the job's database")
        .map_err(other)?;
    let mut cfg = RunnerConfig::new(Duration::from_secs(args.lease_seconds));
    cfg.shard = args.shard;
    let (runner, mut rx) = parts.runner(db, spec, cfg);
    let mut display = Display::new(!args.no_progress);
    let shown = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let p = rx.borrow_and_update().clone();
            display.update(p.total_rows, p.rows_scanned, summary(&p));
        }
        display.finish();
    });
    let outcome = runner.run().await;
    drop(runner);
    let _ = shown.await;
    keyring.wipe_cache().await;
    let outcome = outcome.map_err(|e| other(e.into()))?;
    println!(
        "job {}: {} rows scanned, {} rows updated, {}",
        outcome.state,
        outcome.progress.rows_scanned,
        outcome.progress.rows_updated,
        summary(&outcome.progress)
    );
    match outcome.state {
        JobState::Completed => Ok(()),
        JobState::Cancelled => Err(other(anyhow::anyhow!("the job was cancelled"))),
        s => Err(other(anyhow::anyhow!(
            "the job ended {s}: {}",
            outcome.progress.last_error.unwrap_or_default()
        ))),
    }
}

fn print_job(j: &pb::Job) {
    println!(
        "job {}  table {}  tenant {}  state {}  (asked: {})",
        j.job_id,
        j.target,
        if j.tenant_id.is_empty() {
            "*"
        } else {
            &j.tenant_id
        },
        j.state,
        j.control
    );
    println!(
        "  rows {}/{} scanned, {} updated; values: {} rewrapped, {} current, {} shredded, {} failed; {} conflicts; {} run(s)",
        j.rows_scanned,
        j.total_rows,
        j.rows_updated,
        j.values_rewrapped,
        j.values_current,
        j.values_shredded,
        j.values_failed,
        j.conflicts,
        j.runs
    );
    if !j.owner.is_empty() {
        // A job of several shards: `shard i: runner; ...`, one line each.
        for o in j.owner.split("; ") {
            println!("  runner {o}");
        }
    }
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
}

async fn watch(addr: &str, job: String) -> Result<(), CliError> {
    let mut c = JobsClient::new(connect(addr).await?);
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            job_id: job,
            interval_ms: 0,
        })
        .await?
        .into_inner();
    let mut display = Display::new(true);
    let mut last = None;
    while let Some(j) = stream.next().await {
        let j = j?;
        display.update(
            j.total_rows,
            j.rows_scanned,
            format!(
                "{}  rewrapped {}  failed {}",
                j.state, j.values_rewrapped, j.values_failed
            ),
        );
        last = Some(j);
    }
    display.finish();
    if let Some(j) = last {
        print_job(&j);
    }
    Ok(())
}

pub(super) async fn jobs(cmd: JobsCommand) -> Result<(), CliError> {
    let job = match cmd {
        JobsCommand::Run {
            keys,
            spec,
            lease_seconds,
            no_progress,
            shards,
            shard,
        } => {
            let args = RunArgs {
                lease_seconds,
                no_progress,
                shards,
                shard,
            };
            return run(keys, spec, args).await;
        }
        JobsCommand::List { target } => {
            let list = JobsClient::new(connect(&target.addr).await?)
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner();
            for j in &list.jobs {
                print_job(j);
            }
            return Ok(());
        }
        JobsCommand::Watch { target, job } => return watch(&target.addr, job).await,
        JobsCommand::Status { target, job } => {
            JobsClient::new(connect(&target.addr).await?)
                .get_job(pb::JobRequest { job_id: job })
                .await?
        }
        JobsCommand::Pause { target, job } => {
            JobsClient::new(connect(&target.addr).await?)
                .pause_job(pb::JobRequest { job_id: job })
                .await?
        }
        JobsCommand::Resume { target, job } => {
            JobsClient::new(connect(&target.addr).await?)
                .resume_job(pb::JobRequest { job_id: job })
                .await?
        }
        JobsCommand::Cancel { target, job } => {
            JobsClient::new(connect(&target.addr).await?)
                .cancel_job(pb::JobRequest { job_id: job })
                .await?
        }
    };
    print_job(&job.into_inner());
    Ok(())
}
