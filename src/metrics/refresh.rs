//! The gauges refreshed from the key store: key ages and rotation status per tenant,
//! and each re-encryption job's progress and state.
//!
//! Owns: one refresh (new values first, then the series that disappeared removed) and
//! the task that repeats it. Does not: decide rotation status (the keyring does against
//! the policy) or touch a job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::Metrics;
use crate::jobs::JobBoard;
use crate::keyring::Keyring;
use crate::model::now_ms;
use crate::policy::RotationPolicy;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct JobLabel {
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct JobStateLabel {
    job_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StatusLabel {
    status: &'static str,
}

/// Labels of the gauges set by the last [`Metrics::refresh`].
#[derive(Debug, Default)]
pub(super) struct LastRefresh {
    tenants: HashSet<String>,
    job_ids: HashSet<String>,
    job_states: HashSet<JobStateLabel>,
}

impl Metrics {
    /// Refreshes key ages (against `policy`, from `keyring`) and job gauges (from
    /// `jobs`).
    ///
    /// # Errors
    /// What the keyring or the store returns.
    pub async fn refresh(
        &self,
        keyring: &Keyring,
        jobs: &JobBoard,
        policy: &RotationPolicy,
    ) -> crate::error::Result<()> {
        // New values are set first and only the series that disappeared are removed
        // afterwards, so that a scrape never sees a family half refilled.
        let checks = keyring.rotate_due(policy, now_ms(), true).await?;
        let mut by_status: HashMap<&'static str, i64> = HashMap::new();
        let mut tenants = HashSet::new();
        for c in &checks {
            *by_status.entry(c.age.status.as_str()).or_default() += 1;
            if c.age.active_version.is_some() {
                #[allow(clippy::cast_precision_loss, reason = "ages in ms fit an f64")]
                let secs = c.age.age_ms as f64 / 1000.0;
                self.key_age
                    .get_or_create(&TenantLabel {
                        tenant: c.age.tenant_id.clone(),
                    })
                    .set(secs);
                tenants.insert(c.age.tenant_id.clone());
            }
        }
        for status in ["ok", "due-soon", "overdue", "no-active-key"] {
            self.tenants_by_status
                .get_or_create(&StatusLabel { status })
                .set(by_status.get(status).copied().unwrap_or(0));
        }
        let jobs = jobs.list().await?;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (mut job_ids, mut job_states) = (HashSet::new(), HashSet::new());
        for j in jobs {
            let job = JobLabel {
                job_id: j.record.job_id.clone(),
            };
            let p = &j.progress;
            let values = [
                p.total_rows,
                p.rows_scanned,
                p.values_rewrapped,
                p.values_failed,
            ];
            for (f, v) in self.job_counts().into_iter().zip(values) {
                f.get_or_create(&job).set(g(v));
            }
            let state = JobStateLabel {
                job_id: j.record.job_id.clone(),
                state: j.record.state.to_string(),
            };
            self.job_state.get_or_create(&state).set(1);
            job_ids.insert(j.record.job_id);
            job_states.insert(state);
        }
        self.refresh_epochs(keyring).await?;
        let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
        for tenant in last.tenants.difference(&tenants) {
            self.key_age.remove(&TenantLabel {
                tenant: tenant.clone(),
            });
        }
        for id in last.job_ids.difference(&job_ids) {
            let job = JobLabel { job_id: id.clone() };
            for f in self.job_counts() {
                f.remove(&job);
            }
        }
        for st in last.job_states.difference(&job_states) {
            self.job_state.remove(st);
        }
        *last = LastRefresh {
            tenants,
            job_ids,
            job_states,
        };
        self.refreshed.set(now_ms() / 1000);
        Ok(())
    }

    /// The key epoch gauges: the active epoch, its age, and the backup horizon.
    async fn refresh_epochs(&self, keyring: &Keyring) -> crate::error::Result<()> {
        use crate::model::EpochState;
        let epochs = keyring.epoch_records().await?;
        let now = now_ms();
        #[allow(clippy::cast_precision_loss, reason = "ages in ms fit an f64")]
        let secs = |t: i64| now.saturating_sub(t) as f64 / 1000.0;
        let active = epochs.iter().find(|e| e.state == EpochState::Active);
        self.epoch_active
            .set(active.map_or(0, |a| i64::try_from(a.epoch).unwrap_or(i64::MAX)));
        self.epoch_age
            .set(active.map_or(0.0, |a| secs(a.created_at)));
        let legacy_open = epochs.iter().any(|e| e.epoch == 0 && e.opens_backups());
        let oldest = epochs
            .iter()
            .filter(|e| e.opens_backups())
            .map(|e| e.created_at)
            .min();
        self.backup_horizon.set(match oldest {
            Some(t) if !legacy_open => secs(t),
            _ => f64::INFINITY,
        });
        Ok(())
    }

    /// The per-job count gauges: rows in scope, rows scanned, values rewrapped, values
    /// failed.
    fn job_counts(&self) -> [&Family<JobLabel, Gauge>; 4] {
        [
            &self.job_rows_total,
            &self.job_rows_scanned,
            &self.job_values_rewrapped,
            &self.job_values_failed,
        ]
    }
}

/// Refreshes the key-age and job gauges every `every` until the task is aborted.
pub fn spawn_refresh(
    metrics: Arc<Metrics>,
    keyring: Arc<Keyring>,
    jobs: JobBoard,
    policy: RotationPolicy,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = metrics.refresh(&keyring, &jobs, &policy).await {
                tracing::warn!(error = %e, "cannot refresh key-age and job metrics");
            }
        }
    })
}
