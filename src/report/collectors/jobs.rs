//! Reads the re-encryption jobs: every job with its decoded counters (a job whose
//! counters do not decode is reported as unreadable, not fatal), and the jobs of the
//! period as the report lists them.
//!
//! Does not: judge rotation completion (the verdict rules do) or write anything.

use crate::erasure::receipt::rfc3339_ms;
use crate::error::Result;
use crate::jobs::JobView;
use crate::model::JobProgress;
use crate::store::KeyStore;

use super::super::model::{JobEntry, Options, Period};

/// Every job whose counters decode; the others are named in `unreadable`.
pub(in crate::report) async fn read_jobs(
    store: &dyn KeyStore,
    unreadable: &mut Vec<String>,
) -> Result<Vec<JobView>> {
    let mut jobs = Vec::new();
    for record in store.list_jobs().await? {
        match JobProgress::parse(&record.progress) {
            Ok(progress) => jobs.push(JobView {
                record,
                progress,
                shards: Vec::new(),
            }),
            Err(e) => unreadable.push(format!("re-encryption job {}: {e}", record.job_id)),
        }
    }
    Ok(jobs)
}

/// The jobs of the tenant asked for (and those of every tenant) that ran in `period`.
pub(in crate::report) fn job_entries(
    jobs: &[JobView],
    opts: &Options,
    period: &Period,
) -> Vec<JobEntry> {
    let now = opts.now_ms;
    jobs.iter()
        .filter(|j| {
            opts.tenant
                .as_ref()
                .is_none_or(|t| j.record.tenant_id.as_ref().is_none_or(|jt| jt == t))
                && period.overlaps(j.record.created_at, j.record.finished_at.unwrap_or(now))
        })
        .map(|j| job_entry(j, opts.tenant.as_deref()))
        .collect()
}

fn job_entry(j: &JobView, tenant: Option<&str>) -> JobEntry {
    let p = &j.progress;
    let leftovers = p
        .leftovers
        .iter()
        .filter(|(t, _)| tenant.is_none_or(|f| f == t.as_str()))
        .map(|(t, m)| (t.clone(), m.clone()))
        .collect();
    JobEntry {
        job_id: j.record.job_id.clone(),
        target: j.record.target.clone(),
        tenant_id: j.record.tenant_id.clone(),
        state: j.record.state.to_string(),
        created_at: rfc3339_ms(j.record.created_at),
        finished_at: j.record.finished_at.map(rfc3339_ms),
        total_rows: p.total_rows,
        rows_scanned: p.rows_scanned,
        values_rewrapped: p.values_rewrapped,
        values_shredded: p.values_shredded,
        values_failed: p.values_failed,
        leftovers,
    }
}
