//! Erasure requests: asking for one (with its grace period), cancelling it, reading
//! and listing them. Each change is audited and recorded in the erasure ledger.
//!
//! Does not carry an erasure out (`execution.rs`); a request due at once is handed
//! there.

use std::time::Duration;

use serde_json::json;

use crate::audit::AuditEvent;
use crate::crypto::validate_id;
use crate::error::{Error, Result};
use crate::model::{ErasureRecord, ErasureState, NewErasure, now_ms};

use super::{Actor, Erasures, MAX_GRACE, entry_of, target_event};

impl Erasures {
    /// Requests the erasure of a subject (`subject` set) or a whole tenant, after a
    /// grace period (zero: now, and executed before this returns). Idempotent: a live
    /// request for the same subject or tenant is returned instead of a new one (moved
    /// earlier if this call asks for an earlier time).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for bad ids or a grace period over 30 days;
    /// [`Error::TenantNotFound`]; store, ledger or KMS errors (the request stands and
    /// is retried by the worker; calling again is safe).
    pub async fn request(
        &self,
        actor: &Actor,
        tenant: &str,
        subject: Option<&str>,
        grace: Duration,
    ) -> Result<ErasureRecord> {
        validate_id("tenant_id", tenant)?;
        if let Some(s) = subject {
            validate_id("subject_id", s)?;
        }
        let max = self.cfg.max_grace.min(MAX_GRACE);
        if grace > max {
            return Err(Error::InvalidArgument(format!(
                "grace period must be at most {} days ({} seconds)",
                max.as_secs() / 86_400,
                max.as_secs()
            )));
        }
        let store = &self.store;
        if self.keyring.find_tenant(tenant).await?.is_none() {
            return Err(Error::TenantNotFound {
                tenant: tenant.to_owned(),
            });
        }
        let now = now_ms();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let execute_after = now.saturating_add(grace_ms);
        let erasure_id = new_erasure_id(now)?;
        let event = target_event(
            "erasure.requested",
            actor,
            tenant,
            subject,
            json!({
                "erasure_id": erasure_id,
                "grace_seconds": grace.as_secs(),
                "execute_after_unix_ms": execute_after,
            }),
        );
        let created = store
            .create_erasure(
                NewErasure {
                    erasure_id,
                    tenant_id: tenant.to_owned(),
                    subject_id: subject.map(str::to_owned),
                    requested_by: actor.id.clone(),
                    requested_at: now,
                    execute_after,
                    state: ErasureState::Scheduled,
                },
                Some(&event),
            )
            .await?;
        let mut rec = created.into_inner();
        if rec.state == ErasureState::Scheduled
            && execute_after < rec.execute_after
            && store
                .reschedule_erasure(&rec.erasure_id, execute_after)
                .await?
        {
            store
                .append_audit(&AuditEvent {
                    action: "erasure.rescheduled".into(),
                    details: json!({
                        "erasure_id": rec.erasure_id,
                        "execute_after_unix_ms": execute_after,
                    }),
                    ..event.clone()
                })
                .await?;
            rec = self.get(&rec.erasure_id).await?;
        }
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(&rec)).await?;
        }
        if matches!(rec.state, ErasureState::Scheduled | ErasureState::Executing)
            && rec.execute_after <= now_ms()
        {
            return self.execute(&rec.erasure_id).await;
        }
        Ok(rec)
    }

    /// Cancels a scheduled request (inside its grace period, before execution starts).
    /// Idempotent.
    ///
    /// # Errors
    /// [`Error::ErasureNotFound`]; [`Error::ErasureNotCancellable`] once execution has
    /// started; store errors.
    pub async fn cancel(&self, actor: &Actor, erasure_id: &str) -> Result<ErasureRecord> {
        let rec = self.get(erasure_id).await?;
        match rec.state {
            ErasureState::Cancelled => return Ok(rec),
            ErasureState::Executing | ErasureState::Completed => {
                return Err(Error::ErasureNotCancellable {
                    erasure: erasure_id.to_owned(),
                    state: rec.state.to_string(),
                });
            }
            ErasureState::Scheduled => {}
        }
        let event = target_event(
            "erasure.cancelled",
            actor,
            &rec.tenant_id,
            rec.subject_id.as_deref(),
            json!({ "erasure_id": erasure_id }),
        );
        let store = &self.store;
        if !store
            .cancel_erasure(erasure_id, &actor.id, &event, true)
            .await?
        {
            // Execution started meanwhile (or another cancel won): report what it is.
            let now = self.get(erasure_id).await?;
            if now.state != ErasureState::Cancelled {
                let state = if now.state == ErasureState::Scheduled {
                    "due (its grace period is over)".to_owned()
                } else {
                    now.state.to_string()
                };
                return Err(Error::ErasureNotCancellable {
                    erasure: erasure_id.to_owned(),
                    state,
                });
            }
        }
        let rec = self.get(erasure_id).await?;
        if let Some(ledger) = self.keyring.ledger() {
            ledger.record(&entry_of(&rec)).await?;
        }
        tracing::info!(erasure = erasure_id, tenant = %rec.tenant_id, "erasure cancelled");
        Ok(rec)
    }

    /// One request.
    ///
    /// # Errors
    /// [`Error::ErasureNotFound`]; store errors.
    pub async fn get(&self, erasure_id: &str) -> Result<ErasureRecord> {
        self.store
            .get_erasure(erasure_id)
            .await?
            .ok_or_else(|| Error::ErasureNotFound {
                erasure: erasure_id.to_owned(),
            })
    }

    /// Requests (of one tenant, or all), oldest first, up to `limit` after id `after`.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list(
        &self,
        tenant: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>> {
        Ok(self.store.list_erasures(tenant, after, limit).await?)
    }
}

fn new_erasure_id(now: i64) -> Result<String> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd)
        .map_err(|_| Error::Internal("random number generator failure".into()))?;
    // Time first, so ids sort by creation time.
    Ok(format!("er-{:012x}-{}", now.max(0), hex::encode(rnd)))
}
