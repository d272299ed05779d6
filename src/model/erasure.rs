//! Erasure requests as the store keeps them: their states and records.
//!
//! Plain data: the erasure workflow (`crate::erasure`) gives them meaning.

use std::fmt;
use std::str::FromStr;

use super::DecodeError;

/// Where an erasure request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErasureState {
    /// Waiting for its grace period to end (cancellable).
    Scheduled,
    /// Being carried out (keys may already be destroyed); finishes on retry after a crash.
    Executing,
    /// Keys destroyed, receipt issued.
    Completed,
    /// Cancelled inside the grace period; nothing was destroyed.
    Cancelled,
}

impl ErasureState {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            ErasureState::Scheduled => "scheduled",
            ErasureState::Executing => "executing",
            ErasureState::Completed => "completed",
            ErasureState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErasureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErasureState {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "scheduled" => ErasureState::Scheduled,
            "executing" => ErasureState::Executing,
            "completed" => ErasureState::Completed,
            "cancelled" => ErasureState::Cancelled,
            _ => return Err(DecodeError(format!("unknown erasure state {s:?}"))),
        })
    }
}

/// An erasure request as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRecord {
    /// Request id.
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject; `None` erases the whole tenant.
    pub subject_id: Option<String>,
    /// State.
    pub state: ErasureState,
    /// Who asked.
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at: i64,
    /// End of the grace period: not executed before, Unix ms.
    pub execute_after: i64,
    /// When execution started.
    pub started_at: Option<i64>,
    /// When it completed.
    pub completed_at: Option<i64>,
    /// Who (which process) executed it.
    pub executed_by: Option<String>,
    /// Who cancelled it.
    pub cancelled_by: Option<String>,
    /// When it was cancelled.
    pub cancelled_at: Option<i64>,
    /// Execution attempts (more than one after a crash or an outage).
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// The signed receipt (JSON), once completed.
    pub receipt: Option<String>,
    /// The receipt's record in the audit chain.
    pub audit_seq: Option<u64>,
    /// The key epoch active when the keys were destroyed (`docs/ERASURE.md` §6): backup
    /// copies are sealed once that epoch's key (and every older one) is deleted.
    pub destroyed_epoch: Option<u64>,
    /// Last change, Unix ms.
    pub updated_at: i64,
}

/// A new erasure request.
#[derive(Debug, Clone)]
pub struct NewErasure {
    /// Request id.
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject; `None` for the whole tenant.
    pub subject_id: Option<String>,
    /// Who asked.
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at: i64,
    /// End of the grace period, Unix ms.
    pub execute_after: i64,
    /// Initial state: `Scheduled`, or `Executing` when re-applying a restored erasure.
    pub state: ErasureState,
}
