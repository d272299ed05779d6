//! Re-encryption jobs as stored: the coordination record every runner and every
//! sidecar reads. The store keeps the spec and the counters as opaque JSON text; the
//! `jobs` module owns their meaning.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DecodeError;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Created, not yet started by a runner.
    Pending,
    /// A runner is (or was, until its lease ran out) working on it.
    Running,
    /// Paused by an operator; a runner waits.
    Paused,
    /// Every row was visited.
    Completed,
    /// Cancelled by an operator; rows already rewrapped stay rewrapped.
    Cancelled,
    /// Stopped on an error that needs an operator (see the job's error).
    Failed,
}

impl JobState {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }

    /// Completed, cancelled or failed: no runner will touch it again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Failed
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "paused" => JobState::Paused,
            "completed" => JobState::Completed,
            "cancelled" => JobState::Cancelled,
            "failed" => JobState::Failed,
            _ => return Err(DecodeError(format!("unknown job state {s:?}"))),
        })
    }
}

/// What operators want of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobControl {
    /// Run (or resume).
    Run,
    /// Pause after the current batch.
    Pause,
    /// Cancel after the current batch.
    Cancel,
}

impl JobControl {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            JobControl::Run => "run",
            JobControl::Pause => "pause",
            JobControl::Cancel => "cancel",
        }
    }
}

impl FromStr for JobControl {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "run" => JobControl::Run,
            "pause" => JobControl::Pause,
            "cancel" => JobControl::Cancel,
            _ => return Err(DecodeError(format!("unknown job control {s:?}"))),
        })
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// The table it re-encrypts.
    pub target: String,
    /// The one tenant it covers, or `None` for every tenant in the table.
    pub tenant_id: Option<String>,
    /// The job spec (JSON).
    pub spec: String,
    /// State.
    pub state: JobState,
    /// Operator's wish.
    pub control: JobControl,
    /// Runner holding the lease: for jobs of this version, kept in their shards (see
    /// [`JobShardRecord`]; `crate::jobs` shows them here); a runner of the version
    /// before shards kept its lease here.
    pub owner: Option<String>,
    /// Lease end, Unix ms (as `owner`).
    pub lease_until: Option<i64>,
    /// Last primary key fully processed (text form), for a job of one shard.
    pub checkpoint: Option<String>,
    /// Counters (JSON).
    pub progress: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// First start, Unix ms.
    pub started_at: Option<i64>,
    /// Last update, Unix ms.
    pub updated_at: i64,
    /// End time, Unix ms.
    pub finished_at: Option<i64>,
    /// How many shards the job was planned with; `None` until a runner planned it.
    pub shards: Option<u32>,
}

/// One shard of a job as stored: a disjoint range of the primary key with its own
/// lease, checkpoint and counters. A job's shards are fixed once, when the first runner
/// plans it; together they cover every key (from no lower bound to no upper bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobShardRecord {
    /// Job id.
    pub job_id: String,
    /// Shard number, 0..shards.
    pub shard: u32,
    /// Exclusive lower bound (text form of a primary key); `None`: from the first key.
    pub lo: Option<String>,
    /// Inclusive upper bound (text form of a primary key); `None`: to the last key.
    pub hi: Option<String>,
    /// State of this shard.
    pub state: JobState,
    /// Runner holding the shard's lease.
    pub owner: Option<String>,
    /// Lease end, Unix ms.
    pub lease_until: Option<i64>,
    /// Last primary key of this shard fully processed (text form).
    pub checkpoint: Option<String>,
    /// Counters of this shard (JSON).
    pub progress: String,
    /// Why it failed, or the last transient failure while it lasts.
    pub error: Option<String>,
    /// First claim, Unix ms.
    pub started_at: Option<i64>,
    /// Last update, Unix ms.
    pub updated_at: i64,
    /// End time, Unix ms.
    pub finished_at: Option<i64>,
}

impl JobShardRecord {
    /// Whether `owner` could claim this shard at `now`: unfinished, and unowned, its
    /// own, or its lease ran out.
    pub fn claimable_by(&self, owner: &str, now: i64) -> bool {
        !self.state.is_finished()
            && (self.owner.as_deref().is_none_or(|o| o == owner)
                || self.lease_until.is_none_or(|l| l < now))
    }
}

/// A shard to plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewShard {
    /// Exclusive lower bound; `None`: from the first key.
    pub lo: Option<String>,
    /// Inclusive upper bound; `None`: to the last key.
    pub hi: Option<String>,
    /// `Pending`, or `Completed` for a shard known to be empty when planned.
    pub state: JobState,
}

/// The whole job as its shards make it, written to the job record with every shard
/// update (computed by `crate::jobs`, inside the store's transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTotals {
    /// The job's state.
    pub state: JobState,
    /// Counters summed over the shards (JSON).
    pub progress: String,
    /// The single shard's checkpoint for a job of one shard, else `None`.
    pub checkpoint: Option<String>,
    /// The shards' errors, if any.
    pub error: Option<String>,
}

/// How the store computes a job's totals from its record and its shards (as they are
/// after a shard update, read in the same transaction) at a time (Unix ms).
pub type TotalsFn = dyn Fn(&JobRecord, &[JobShardRecord], i64) -> JobTotals + Send + Sync;

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Job id.
    pub job_id: String,
    /// The table it re-encrypts.
    pub target: String,
    /// The one tenant it covers, or `None`.
    pub tenant_id: Option<String>,
    /// Spec (JSON).
    pub spec: String,
    /// Initial counters (JSON).
    pub progress: String,
}

/// Progress a lease holder records.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    /// New state.
    pub state: JobState,
    /// New checkpoint (`None` keeps the current one).
    pub checkpoint: Option<String>,
    /// Counters (JSON).
    pub progress: String,
    /// Error, for `Failed`.
    pub error: Option<String>,
    /// Lease renewal, Unix ms (ignored for finished states, which release the lease).
    pub lease_until: i64,
}

/// A job's counters, stored as JSON in [`JobRecord::progress`]. Counters of a batch
/// that was written but not yet checkpointed when a runner died are lost; on resume
/// those rows are read again and counted under `values_current`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobProgress {
    /// Rows in scope when the job (re)started (an estimate for ETAs).
    pub total_rows: u64,
    /// Rows read so far.
    pub rows_scanned: u64,
    /// Rows written with rewrapped values.
    pub rows_updated: u64,
    /// Values moved to the active key version.
    pub values_rewrapped: u64,
    /// Values already on the active key version (nothing to do).
    pub values_current: u64,
    /// Rows the application changed between our read and our write; re-read and
    /// retried, never overwritten.
    pub conflicts: u64,
    /// Values whose key was crypto-shredded: unreadable already, left as they are.
    pub values_shredded: u64,
    /// Values that could not be rewrapped for another reason (see `leftovers`).
    pub values_failed: u64,
    /// Blind-index values (re)computed under the active version (missing, stale, or
    /// made by another profile).
    pub indexes_recomputed: u64,
    /// Blind-index values already current.
    pub indexes_current: u64,
    /// Blind-index values cleared (NULL) because their value's key was shredded.
    pub indexes_cleared: u64,
    /// Values left on an old key version, per tenant and version. Any entry at or
    /// below a version blocks that version's retirement.
    pub leftovers: BTreeMap<String, BTreeMap<u32, u64>>,
    /// How many times a runner started or resumed the job.
    pub runs: u32,
    /// The largest metadata revalidation interval (ms) of the runners that worked on
    /// it: how long after a rotation a runner may still have treated the old version
    /// as current. Retirement waits at least this long after the rotation.
    pub revalidate_ms: u64,
    /// The last per-value error (no plaintext, no subject ids).
    pub last_error: Option<String>,
}

impl JobProgress {
    /// Parses stored counters.
    ///
    /// # Errors
    /// [`DecodeError`] if the JSON does not decode.
    pub fn parse(json: &str) -> Result<Self, DecodeError> {
        serde_json::from_str(json)
            .map_err(|e| DecodeError(format!("job progress does not decode: {e}")))
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        // A struct of integers, strings and maps with string keys always serializes.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Values of `tenant` left on `version` or older.
    pub fn left_at_or_below(&self, tenant: &str, version: u32) -> u64 {
        self.leftovers
            .get(tenant)
            .map(|m| m.range(..=version).map(|(_, n)| n).sum())
            .unwrap_or(0)
    }
}
