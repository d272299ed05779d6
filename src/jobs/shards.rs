//! Shards of a job: how a table's primary-key range is cut into disjoint ranges
//! (planned once, from the keys in scope), and what the whole job is, as its shards
//! make it (the totals written to the job record with every shard update, and the
//! operators' view).
//!
//! Owns: the shard ranges' meaning (`(lo, hi]`, open at both ends of the key space),
//! the job's state from its shards' states, the counters summed over shards. Does not:
//! read the table (the runner computes the bounds) or touch the store.

use crate::model::{
    JobControl, JobProgress, JobRecord, JobShardRecord, JobState, JobTotals, NewShard,
};

/// The shards of a job of `n` shards cut at `bounds` (the keys in scope at the
/// quantiles 1/n, 2/n, ..., (n-1)/n, in key order; `None` when nothing was in scope).
/// Shard i covers keys in `(bounds[i-1], bounds[i]]`; the first has no lower bound and
/// the last no upper bound, so together they cover every key, present or future, once.
/// With nothing in scope, shard 0 covers every key and the others are planned completed.
pub(crate) fn plan(n: u32, bounds: Option<Vec<String>>) -> Vec<NewShard> {
    let bounds = bounds.filter(|b| b.len() + 1 == n as usize);
    let Some(bounds) = bounds else {
        return (0..n)
            .map(|i| NewShard {
                lo: None,
                hi: None,
                state: if i == 0 {
                    JobState::Pending
                } else {
                    JobState::Completed
                },
            })
            .collect();
    };
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lo: Option<String> = None;
    for b in bounds {
        out.push(NewShard {
            lo: lo.take(),
            hi: Some(b.clone()),
            state: JobState::Pending,
        });
        lo = Some(b);
    }
    out.push(NewShard {
        lo,
        hi: None,
        state: JobState::Pending,
    });
    out
}

/// Adds one shard's counters to the job's.
fn add(sum: &mut JobProgress, p: &JobProgress) {
    sum.total_rows += p.total_rows;
    sum.rows_scanned += p.rows_scanned;
    sum.rows_updated += p.rows_updated;
    sum.values_rewrapped += p.values_rewrapped;
    sum.values_current += p.values_current;
    sum.conflicts += p.conflicts;
    sum.values_shredded += p.values_shredded;
    sum.values_failed += p.values_failed;
    sum.indexes_recomputed += p.indexes_recomputed;
    sum.indexes_current += p.indexes_current;
    sum.indexes_cleared += p.indexes_cleared;
    for (tenant, versions) in &p.leftovers {
        let into = sum.leftovers.entry(tenant.clone()).or_default();
        for (v, n) in versions {
            *into.entry(*v).or_default() += n;
        }
    }
    sum.runs = sum.runs.saturating_add(p.runs);
    sum.revalidate_ms = sum.revalidate_ms.max(p.revalidate_ms);
}

/// The whole job from its record and its shards at `now` (Unix ms): written to the
/// job record in the transaction of every shard update (`JobStore::update_job_shard`).
///
/// - counters: summed (leftovers per tenant and version too; `runs` is the runs of
///   every shard; `revalidate_ms` the largest); the last error is the most recently
///   updated shard's;
/// - state: `completed` once every shard completed; once every shard is finished
///   otherwise, `failed` if one failed, else `cancelled`; before that `paused` when
///   operators asked for it, a shard is paused and no shard is running under a live
///   lease; else `running` once a shard started, `pending` before;
/// - a shard whose counters do not decode keeps the job from completing (its
///   leftovers would be lost to retirement's check): the job ends `failed`.
pub fn totals(job: &JobRecord, shards: &[JobShardRecord], now: i64) -> JobTotals {
    let mut sum = JobProgress::default();
    let mut unreadable = Vec::new();
    let mut last_error: Option<(i64, String)> = None;
    for s in shards {
        match JobProgress::parse(&s.progress) {
            Ok(p) => {
                add(&mut sum, &p);
                if let Some(e) = p.last_error
                    && last_error
                        .as_ref()
                        .is_none_or(|(at, _)| s.updated_at >= *at)
                {
                    last_error = Some((s.updated_at, e));
                }
            }
            Err(_) => unreadable.push(s.shard),
        }
    }
    sum.last_error = last_error.map(|(_, e)| e);
    let all = |st: JobState| shards.iter().all(|s| s.state == st);
    let any = |st: JobState| shards.iter().any(|s| s.state == st);
    let finished = !shards.is_empty() && shards.iter().all(|s| s.state.is_finished());
    let state = if finished {
        if !unreadable.is_empty() || any(JobState::Failed) {
            JobState::Failed
        } else if all(JobState::Completed) {
            JobState::Completed
        } else {
            JobState::Cancelled
        }
    } else {
        let live = |s: &JobShardRecord| {
            s.state == JobState::Running && s.lease_until.is_some_and(|l| l >= now)
        };
        if job.control == JobControl::Pause && any(JobState::Paused) && !shards.iter().any(live) {
            JobState::Paused
        } else if shards.iter().any(|s| s.started_at.is_some()) {
            JobState::Running
        } else {
            JobState::Pending
        }
    };
    let single = shards.len() == 1;
    let mut errors: Vec<String> = shards
        .iter()
        .filter_map(|s| {
            s.error.as_ref().map(|e| {
                if single {
                    e.clone()
                } else {
                    format!("shard {}: {e}", s.shard)
                }
            })
        })
        .collect();
    if !unreadable.is_empty() {
        errors.push(format!(
            "the counters of shard(s) {unreadable:?} do not decode; the job cannot complete"
        ));
    }
    JobTotals {
        state,
        progress: sum.to_json(),
        checkpoint: if single {
            shards.first().and_then(|s| s.checkpoint.clone())
        } else {
            None
        },
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// One shard as operators see it.
#[derive(Debug, Clone)]
pub struct ShardView {
    /// The stored shard.
    pub record: JobShardRecord,
    /// Its counters (default when they do not decode).
    pub progress: JobProgress,
}

impl ShardView {
    pub(crate) fn from_record(record: JobShardRecord) -> Self {
        let progress = JobProgress::parse(&record.progress).unwrap_or_default();
        Self { record, progress }
    }
}

/// Who holds a job's shards, as the job's `owner` shows it: the runner of a job of one
/// shard; `shard i: runner` for each held shard of a job of several.
pub(crate) fn owners(shards: &[ShardView]) -> Option<String> {
    if let [one] = shards {
        return one.record.owner.clone();
    }
    let held: Vec<String> = shards
        .iter()
        .filter_map(|s| {
            s.record
                .owner
                .as_ref()
                .map(|o| format!("shard {}: {o}", s.record.shard))
        })
        .collect();
    (!held.is_empty()).then(|| held.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(control: JobControl) -> JobRecord {
        JobRecord {
            job_id: "j".into(),
            target: "E:t".into(),
            tenant_id: None,
            spec: "{}".into(),
            state: JobState::Running,
            control,
            owner: None,
            lease_until: None,
            checkpoint: None,
            progress: "{}".into(),
            error: None,
            created_at: 0,
            started_at: Some(1),
            updated_at: 1,
            finished_at: None,
            shards: Some(2),
        }
    }

    fn shard(n: u32, state: JobState, p: &JobProgress) -> JobShardRecord {
        JobShardRecord {
            job_id: "j".into(),
            shard: n,
            lo: None,
            hi: None,
            state,
            owner: Some(format!("r{n}")),
            lease_until: Some(100),
            checkpoint: Some(format!("{n}0")),
            progress: p.to_json(),
            error: None,
            started_at: Some(1),
            updated_at: i64::from(n),
            finished_at: None,
        }
    }

    #[test]
    fn shards_are_disjoint_and_cover_every_key() {
        let s = plan(3, Some(vec!["10".into(), "20".into()]));
        let ranges: Vec<_> = s.iter().map(|s| (s.lo.clone(), s.hi.clone())).collect();
        assert_eq!(
            ranges,
            vec![
                (None, Some("10".into())),
                (Some("10".into()), Some("20".into())),
                (Some("20".into()), None)
            ]
        );
        assert_eq!(plan(1, Some(vec![])).len(), 1);
        // nothing in scope, or bounds that do not fit: shard 0 takes every key
        for b in [None, Some(vec!["1".into()])] {
            let s = plan(3, b);
            assert_eq!((s[0].lo.clone(), s[0].hi.clone()), (None, None));
            assert_eq!(s[0].state, JobState::Pending);
            assert!(s[1..].iter().all(|s| s.state == JobState::Completed));
        }
    }

    #[test]
    fn totals_sum_the_shards_and_complete_only_with_all_of_them() {
        let mut a = JobProgress {
            rows_scanned: 5,
            values_rewrapped: 7,
            runs: 1,
            revalidate_ms: 1000,
            ..JobProgress::default()
        };
        a.leftovers.entry("t".into()).or_default().insert(1, 2);
        let mut b = JobProgress {
            rows_scanned: 3,
            runs: 2,
            revalidate_ms: 200,
            last_error: Some("late".into()),
            ..JobProgress::default()
        };
        b.leftovers.entry("t".into()).or_default().insert(1, 1);
        let j = job(JobControl::Run);
        let shards = [
            shard(0, JobState::Completed, &a),
            shard(1, JobState::Running, &b),
        ];
        let t = totals(&j, &shards, 50);
        assert_eq!(t.state, JobState::Running, "one shard still runs");
        assert_eq!(
            t.checkpoint, None,
            "no single checkpoint for several shards"
        );
        let p = JobProgress::parse(&t.progress).unwrap();
        assert_eq!((p.rows_scanned, p.values_rewrapped, p.runs), (8, 7, 3));
        assert_eq!(p.revalidate_ms, 1000);
        assert_eq!(p.left_at_or_below("t", 1), 3, "leftovers add up");
        assert_eq!(p.last_error.as_deref(), Some("late"));
        let done = [
            shard(0, JobState::Completed, &a),
            shard(1, JobState::Completed, &b),
        ];
        assert_eq!(totals(&j, &done, 50).state, JobState::Completed);
        let failed = [
            shard(0, JobState::Completed, &a),
            shard(1, JobState::Failed, &b),
        ];
        assert_eq!(totals(&j, &failed, 50).state, JobState::Failed);
        let cancelled = [
            shard(0, JobState::Completed, &a),
            shard(1, JobState::Cancelled, &b),
        ];
        assert_eq!(totals(&j, &cancelled, 50).state, JobState::Cancelled);
        // a shard whose counters are unreadable never lets the job complete
        let mut bad = shard(1, JobState::Completed, &b);
        bad.progress = "not json".into();
        let t = totals(&j, &[shard(0, JobState::Completed, &a), bad], 50);
        assert_eq!(t.state, JobState::Failed);
        assert!(t.error.unwrap().contains("do not decode"));
    }

    #[test]
    fn a_job_is_paused_once_no_shard_runs_under_a_live_lease() {
        let p = JobProgress::default();
        let j = job(JobControl::Pause);
        let both = [
            shard(0, JobState::Paused, &p),
            shard(1, JobState::Running, &p),
        ];
        assert_eq!(totals(&j, &both, 50).state, JobState::Running);
        // the running shard's runner died: its lease ran out
        assert_eq!(totals(&j, &both, 500).state, JobState::Paused);
        let one = [shard(0, JobState::Running, &p)];
        let t = totals(&job(JobControl::Run), &one, 50);
        assert_eq!(
            t.checkpoint.as_deref(),
            Some("00"),
            "one shard: its checkpoint"
        );
    }
}
