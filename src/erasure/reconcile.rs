//! Reconciling the key store with the erasure ledger after a restored backup of
//! either: re-creating, re-opening or cancelling requests, destroying keys that came
//! back, and recording in the ledger what it lacks.
//!
//! Does not run on its own: the worker (`worker.rs`) calls it.

use std::collections::VecDeque;

use serde_json::json;

use crate::error::Result;
use crate::model::{ErasureRecord, ErasureState, NewErasure};
use crate::store::LedgerEntry;

use super::{Actor, Erasures, entry_of, target_event};

/// What one reconciliation with the erasure ledger found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Ledger entries examined.
    pub entries: u64,
    /// Requests missing from the key store, re-created.
    pub restored: u64,
    /// Requests the key store had as scheduled though the ledger had them executed:
    /// re-opened for execution (a new receipt will be issued).
    pub reopened: u64,
    /// Requests the key store had as scheduled though the ledger had them cancelled.
    pub cancelled: u64,
    /// Keys found live again (restored) and destroyed again.
    pub keys_destroyed_again: u64,
    /// Key-store requests the ledger lacked or had behind, recorded.
    pub ledger_updated: u64,
}

/// Ledger progress order: scheduled < executing/cancelled < completed.
fn rank(s: ErasureState) -> u8 {
    match s {
        ErasureState::Scheduled => 0,
        ErasureState::Executing | ErasureState::Cancelled => 1,
        ErasureState::Completed => 2,
    }
}

impl Erasures {
    /// Brings the key store and the erasure ledger back in step (after a restored
    /// backup of either): requests missing from the store are re-created, requests the
    /// store has behind the ledger are re-opened or cancelled, keys of executed
    /// erasures that are live again are destroyed again, and requests the ledger lacks
    /// are recorded in it. A merge of both, walked in id order.
    ///
    /// # Errors
    /// Store or ledger errors (run again: every step is idempotent).
    pub async fn reconcile(&self) -> Result<Reconciled> {
        let mut out = Reconciled::default();
        let Some(ledger) = self.keyring.ledger().cloned() else {
            return Ok(out);
        };
        let store = self.store.clone();
        const PAGE: u32 = 500;
        let (mut lbuf, mut sbuf) = (VecDeque::new(), VecDeque::new());
        let (mut lafter, mut safter) = (String::new(), String::new());
        let (mut ldone, mut sdone) = (false, false);
        loop {
            if lbuf.is_empty() && !ldone {
                let page = ledger.entries(&lafter, PAGE).await?;
                ldone = page.len() < PAGE as usize;
                if let Some(last) = page.last() {
                    lafter = last.erasure_id.clone();
                }
                lbuf.extend(page);
            }
            if sbuf.is_empty() && !sdone {
                let page = store.list_erasures(None, &safter, PAGE).await?;
                sdone = page.len() < PAGE as usize;
                if let Some(last) = page.last() {
                    safter = last.erasure_id.clone();
                }
                sbuf.extend(page);
            }
            let take_ledger = match (lbuf.front(), sbuf.front()) {
                (None, None) => break,
                (Some(_), None) => Some(true),
                (None, Some(_)) => Some(false),
                (Some(l), Some(s)) => match l.erasure_id.cmp(&s.erasure_id) {
                    std::cmp::Ordering::Less => Some(true),
                    std::cmp::Ordering::Greater => Some(false),
                    std::cmp::Ordering::Equal => None,
                },
            };
            match take_ledger {
                Some(true) => {
                    if let Some(l) = lbuf.pop_front() {
                        self.reconcile_entry(&l, None, &mut out).await?;
                    }
                }
                Some(false) => {
                    if let Some(s) = sbuf.pop_front() {
                        ledger.record(&entry_of(&s)).await?;
                        out.ledger_updated += 1;
                    }
                }
                None => {
                    if let (Some(l), Some(s)) = (lbuf.pop_front(), sbuf.pop_front()) {
                        if rank(s.state) > rank(l.state) {
                            ledger.record(&entry_of(&s)).await?;
                            out.ledger_updated += 1;
                        }
                        self.reconcile_entry(&l, Some(&s), &mut out).await?;
                    }
                }
            }
        }
        if out.restored + out.reopened + out.cancelled + out.keys_destroyed_again > 0 {
            tracing::warn!(
                ?out,
                "key store was behind the erasure ledger (restored backup?); erasures re-applied"
            );
        }
        Ok(out)
    }

    pub(super) async fn reconcile_entry(
        &self,
        l: &LedgerEntry,
        s: Option<&ErasureRecord>,
        out: &mut Reconciled,
    ) -> Result<()> {
        out.entries += 1;
        let store = &self.store;
        let actor = Actor::system("erasure ledger");
        let event = |action: &str| {
            let details = json!({ "erasure_id": l.erasure_id });
            target_event(
                action,
                &actor,
                &l.tenant_id,
                l.subject_id.as_deref(),
                details,
            )
        };
        let executed = matches!(l.state, ErasureState::Executing | ErasureState::Completed);
        match (l.state, s) {
            (ErasureState::Cancelled, Some(s)) if s.state == ErasureState::Scheduled => {
                let cancelled = store
                    .cancel_erasure(&l.erasure_id, &actor.id, &event("erasure.cancelled"), false)
                    .await?;
                out.cancelled += u64::from(cancelled);
            }
            (ErasureState::Cancelled, _) => {}
            (state, None) => {
                let created = store
                    .create_erasure(
                        NewErasure {
                            erasure_id: l.erasure_id.clone(),
                            tenant_id: l.tenant_id.clone(),
                            subject_id: l.subject_id.clone(),
                            requested_by: l.requested_by.clone(),
                            requested_at: l.requested_at,
                            execute_after: l.execute_after,
                            state: if rank(state) > 0 {
                                ErasureState::Executing
                            } else {
                                ErasureState::Scheduled
                            },
                        },
                        Some(&event("erasure.restored")),
                    )
                    .await?;
                if created.was_created() {
                    out.restored += 1;
                    if rank(state) > 0 {
                        // Picked up by the worker at once (idle since "0").
                        store.reopen_erasure(&l.erasure_id, l.execute_after).await?;
                    }
                }
            }
            (_, Some(s)) if executed && s.state == ErasureState::Scheduled => {
                out.reopened +=
                    u64::from(store.reopen_erasure(&l.erasure_id, l.execute_after).await?);
            }
            _ => {}
        }
        if executed {
            let k = &self.keyring;
            out.keys_destroyed_again += match l.subject_id.as_deref() {
                Some(subj) => {
                    let tombstone_or_key = k.shred_subject(&l.tenant_id, subj).await?;
                    u64::from(tombstone_or_key)
                }
                None => {
                    let (v, s) = k.shred_tenant(&l.tenant_id).await?;
                    v + s
                }
            };
        }
        Ok(())
    }
}
