//! The running audit log: one record per key-management action, aggregated counts for
//! data operations (flushed every window), and signed checkpoints at intervals.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde_json::json;

use super::aggregate::Aggregator;
use super::verify::{CHECKPOINT_ACTION, Trailer, checkpoint_details, sign_trailer};
use super::{AuditEvent, AuditRecord};
use crate::error::Result;
use crate::model::now_ms;
use crate::signing::{Signer, SigningKeys};
use crate::store::AuditStore;

/// Purpose of the checkpoint signing key.
pub const CHECKPOINT_PURPOSE: &str = "audit-checkpoint";

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Data operations are counted and written once per window.
    pub window: Duration,
    /// A signed checkpoint is appended this often (when there is anything new).
    pub checkpoint_every: Duration,
    /// This process's name in the records it writes itself.
    pub executor: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            checkpoint_every: Duration::from_secs(60),
            executor: format!("fieldkey pid {}", std::process::id()),
        }
    }
}

/// The audit log of one sidecar.
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    agg: Aggregator,
    signer: Signer,
    cfg: AuditConfig,
    window_start: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The audit log over `store`, its checkpoints signed by a key from `keys`.
    pub fn new(store: Arc<dyn AuditStore>, keys: &SigningKeys, cfg: AuditConfig) -> Self {
        Self {
            signer: keys.signer(CHECKPOINT_PURPOSE, cfg.executor.clone()),
            store,
            agg: Aggregator::default(),
            cfg,
            window_start: std::sync::atomic::AtomicI64::new(now_ms()),
        }
    }

    /// Counts data operations (the hot path: no I/O).
    #[allow(clippy::too_many_arguments, reason = "the counter's key, borrowed")]
    pub fn data(
        &self,
        actor: &str,
        caller_ip: Option<&str>,
        tenant: &str,
        field: &str,
        action: &'static str,
        outcome: &'static str,
        n: u64,
    ) {
        self.agg
            .record(actor, caller_ip, tenant, field, action, outcome, n);
    }

    /// Appends one record now. A failure is logged, not returned: the action it
    /// records has already happened.
    pub async fn event(&self, event: AuditEvent) {
        if let Err(e) = self.store.append_audit(&event).await {
            tracing::error!(error = %e, action = %event.action, "could not append an audit record");
        }
    }

    /// Writes the window's counts (one record each). Returns how many.
    ///
    /// # Errors
    /// Store errors (the counts of that window are lost, and logged).
    pub async fn flush(&self) -> Result<usize> {
        let end = now_ms();
        let start = self
            .window_start
            .swap(end, std::sync::atomic::Ordering::Relaxed);
        let counts = self.agg.drain();
        let n = counts.len();
        for (k, count) in counts {
            let event = AuditEvent {
                action: k.action.into(),
                resource_type: "field".into(),
                resource_id: format!("{}/{}", k.tenant, k.field),
                actor: k.actor,
                tenant_id: Some(k.tenant),
                caller_ip: k.caller_ip,
                details: json!({
                    "outcome": k.outcome,
                    "count": count,
                    "window_start_unix_ms": start,
                    "window_end_unix_ms": end,
                }),
            };
            self.store.append_audit(&event).await?;
        }
        Ok(n)
    }

    /// Appends a signed checkpoint over the chain so far, unless the last record is
    /// already one (or the chain is empty). Returns it.
    ///
    /// # Errors
    /// Store or KMS errors.
    pub async fn checkpoint(&self) -> Result<Option<AuditRecord>> {
        let store = &self.store;
        let (seq, _) = store.audit_head().await?;
        if seq == 0 {
            return Ok(None);
        }
        let last = store.audit_records(seq.saturating_sub(1), 1).await?;
        if last
            .first()
            .is_some_and(|r| r.event.action == CHECKPOINT_ACTION)
        {
            return Ok(None);
        }
        let key = self.signer.get().await?;
        let actor = self.cfg.executor.clone();
        let make = move |new_seq: u64, prev: &[u8; 32]| {
            Ok(AuditEvent {
                action: CHECKPOINT_ACTION.into(),
                resource_type: "audit".into(),
                resource_id: "fieldkey".into(),
                actor: actor.clone(),
                tenant_id: None,
                caller_ip: None,
                details: checkpoint_details(new_seq.saturating_sub(1), prev, &key),
            })
        };
        Ok(Some(store.append_audit_fn(&make).await?))
    }

    /// The export trailer for records `from_seq..=last` (signed).
    ///
    /// # Errors
    /// KMS or store errors getting the signing key.
    pub async fn trailer(
        &self,
        from_seq: u64,
        last: Option<&AuditRecord>,
        records: u64,
    ) -> Result<Trailer> {
        let key = self.signer.get().await?;
        Ok(sign_trailer(
            Trailer {
                from_seq,
                last_seq: last.map_or(0, |r| r.seq),
                last_hash: hex::encode(last.map_or([0; 32], |r| r.hash)),
                records,
                exported_at_unix_ms: now_ms(),
                key_id: String::new(),
                signature: String::new(),
            },
            &key,
        ))
    }

    /// The chain head: the last record's seq and hash ((0, zeros) when empty).
    ///
    /// # Errors
    /// Store errors.
    pub async fn head(&self) -> Result<(u64, [u8; 32])> {
        Ok(self.store.audit_head().await?)
    }

    /// Up to `limit` records after `after_seq`, in order (the export).
    ///
    /// # Errors
    /// Store errors.
    pub async fn records(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        Ok(self.store.audit_records(after_seq, limit).await?)
    }

    /// The public key that verifies checkpoints and export trailers.
    ///
    /// # Errors
    /// Store or KMS errors.
    pub async fn public_key(&self) -> Result<(String, VerifyingKey)> {
        self.signer.public_key().await
    }

    /// Flushes every window and checkpoints every `checkpoint_every`, until aborted.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last_checkpoint = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.cfg.window).await;
                if let Err(e) = self.flush().await {
                    tracing::error!(error = %e, "could not write a window of data-operation counts to the audit log");
                }
                if last_checkpoint.elapsed() >= self.cfg.checkpoint_every {
                    match self.checkpoint().await {
                        Ok(_) => last_checkpoint = tokio::time::Instant::now(),
                        Err(e) => {
                            tracing::error!(error = %e, "could not write an audit checkpoint")
                        }
                    }
                }
            }
        })
    }
}
