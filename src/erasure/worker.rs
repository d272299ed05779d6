//! The background worker: executes due requests every `poll` and reconciles with the
//! ledger every `reconcile_every`.
//!
//! Holds no workflow logic of its own: each step is `execution.rs` or `reconcile.rs`.

use std::sync::Arc;

use crate::error::Result;
use crate::model::{ErasureState, now_ms};

use super::Erasures;

impl Erasures {
    /// Executes every due request once (scheduled ones past their grace period,
    /// executing ones idle for `retry_after`). Returns how many completed.
    ///
    /// # Errors
    /// Store errors listing the requests (individual failures are logged and retried).
    pub async fn run_due(&self) -> Result<usize> {
        let now = now_ms();
        let stale =
            now.saturating_sub(i64::try_from(self.cfg.retry_after.as_millis()).unwrap_or(i64::MAX));
        let due = self.store.due_erasures(now, stale, 100).await?;
        let mut done = 0;
        for rec in due {
            match self.execute_claimed(&rec.erasure_id, Some(stale)).await {
                Ok(r) if r.state == ErasureState::Completed => done += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(erasure = %rec.erasure_id, error = %e, "erasure not completed; will retry")
                }
            }
        }
        Ok(done)
    }

    /// Runs the worker until the task is aborted: reconciles with the ledger at once
    /// and every `reconcile_every`, and executes due requests every `poll`.
    pub fn spawn_worker(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_reconcile: Option<tokio::time::Instant> = None;
            loop {
                if last_reconcile.is_none_or(|t| t.elapsed() >= self.cfg.reconcile_every) {
                    match self.reconcile().await {
                        Ok(_) => last_reconcile = Some(tokio::time::Instant::now()),
                        Err(e) => {
                            tracing::warn!(error = %e, "erasure ledger reconciliation failed; will retry")
                        }
                    }
                }
                if let Err(e) = self.run_due().await {
                    tracing::warn!(error = %e, "cannot list due erasures; will retry");
                }
                tokio::time::sleep(self.cfg.poll).await;
            }
        })
    }
}
