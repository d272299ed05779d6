//! Key epochs as the store keeps them (`docs/ERASURE.md` §6): the epoch records and
//! their states, subject-wrapping keys, the roll's lease and progress, and what still
//! needs an epoch's KMS key.
//!
//! Plain data: the keyring and the epoch roller decide; the store applies.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DecodeError;
use crate::crypto::Fingerprint;

/// Lifecycle of an epoch's KMS key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EpochState {
    /// Registered by a roll that has not yet recorded its KMS key.
    Creating,
    /// Wraps everything new (exactly one epoch at a time).
    Active,
    /// Superseded: the roll is moving live material off it; backups taken while it
    /// was active are restorable until it is sealed.
    Retiring,
    /// Nothing live needs it and its deletion is scheduled in the KMS: backups that
    /// need it are sealed once the KMS deletes it.
    Sealed,
}

impl EpochState {
    /// Stable text form used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            EpochState::Creating => "creating",
            EpochState::Active => "active",
            EpochState::Retiring => "retiring",
            EpochState::Sealed => "sealed",
        }
    }
}

impl fmt::Display for EpochState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EpochState {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "creating" => EpochState::Creating,
            "active" => EpochState::Active,
            "retiring" => EpochState::Retiring,
            "sealed" => EpochState::Sealed,
            _ => return Err(DecodeError(format!("unknown epoch state {s:?}"))),
        })
    }
}

/// One epoch as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number; 0 is the legacy wrapping key of a store from before epochs.
    pub epoch: u64,
    /// The epoch's KMS key (`None` only while [`EpochState::Creating`]).
    pub kms_key_id: Option<String>,
    /// State.
    pub state: EpochState,
    /// When it was registered, Unix ms.
    pub created_at: i64,
    /// When its successor became active, Unix ms.
    pub rolled_at: Option<i64>,
    /// When its deletion was scheduled, Unix ms.
    pub sealed_at: Option<i64>,
    /// When the KMS deletes it, Unix ms (if the KMS said).
    pub deletion_date: Option<i64>,
    /// What scheduling its deletion did (`scheduled`, `already-scheduled`,
    /// `already-deleted`, `kept-legacy`).
    pub kms_status: Option<String>,
}

impl EpochRecord {
    /// Whether backups that need this epoch's key can still be restored with it
    /// (its deletion is not scheduled).
    pub fn opens_backups(&self) -> bool {
        !matches!(self.state, EpochState::Sealed) || self.kms_status.as_deref() == Some(KEPT_LEGACY)
    }
}

/// `kms_status` of a legacy key (epoch 0) that the configuration keeps alive
/// (`epochs.retire_legacy_key = false`): nothing live needs it, but it still opens
/// backups from before the first roll.
pub const KEPT_LEGACY: &str = "kept-legacy";

/// A subject-wrapping key as stored: a random 256-bit key per (tenant, epoch),
/// wrapped by the epoch's KMS key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwkRecord {
    /// `"<epoch>:<tenant>"` ([`swk_id`]).
    pub swk_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Epoch.
    pub epoch: u64,
    /// The epoch's KMS key that wraps it.
    pub kms_key_id: String,
    /// KMS-wrapped key material.
    pub wrapped: Vec<u8>,
    /// SHA-256 of `wrapped`.
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
}

/// The id of the subject-wrapping key of (`tenant`, `epoch`).
pub fn swk_id(tenant: &str, epoch: u64) -> String {
    format!("{epoch}:{tenant}")
}

/// A subject-wrapping key to insert.
#[derive(Debug, Clone)]
pub struct NewSwk {
    /// Tenant.
    pub tenant_id: String,
    /// Epoch (must be the active one when inserted).
    pub epoch: u64,
    /// The epoch's KMS key.
    pub kms_key_id: String,
    /// KMS-wrapped key material.
    pub wrapped: Vec<u8>,
}

/// A subject key moved to another wrapping by a roll: compare-and-set on the wrapping
/// it was read with.
#[derive(Debug, Clone)]
pub struct RolledSubject {
    /// Subject.
    pub subject_id: String,
    /// The SWK it was wrapped under when read (`None`: legacy, under a tenant version).
    pub expected_swk: Option<String>,
    /// The tenant version it was wrapped under when read (legacy rows).
    pub expected_wrap_version: u32,
    /// The same key wrapped under the new SWK.
    pub wrapped: Vec<u8>,
}

/// Counters of a roll, kept with its lease so that `epoch status` on any replica sees
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RollProgress {
    /// What the roll is doing (`create-key`, `tenants`, `signing-keys`, `verify`,
    /// `seal`, `done`).
    pub phase: String,
    /// Tenants in the store when the roll started.
    pub tenants_total: u64,
    /// Tenants whose material is under the new epoch.
    pub tenants_done: u64,
    /// Tenant key versions rewrapped (KMS calls: two each).
    pub versions_rewrapped: u64,
    /// Subject keys rewrapped (local AES, no KMS call).
    pub subjects_rewrapped: u64,
    /// Subject-wrapping keys created (one KMS call each).
    pub swks_created: u64,
    /// Subject-wrapping keys of old epochs deleted.
    pub swks_deleted: u64,
    /// Signing keys rewrapped.
    pub signing_keys_rewrapped: u64,
    /// KMS calls made by this roll, estimated from its steps (an upper bound: an SWK
    /// already cached counts as one call; `benches/epoch_roll.rs` counts them exactly).
    pub kms_calls: u64,
}

/// The roll's lease row: who rolls, to which epoch, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollLease {
    /// Holder (`host pid`), if any.
    pub owner: Option<String>,
    /// Lease expiry, Unix ms.
    pub lease_until: Option<i64>,
    /// Epoch being rolled to.
    pub target: Option<u64>,
    /// Counters.
    pub progress: RollProgress,
    /// Last update, Unix ms.
    pub updated_at: i64,
}

/// What in the live store still needs an epoch's KMS key (all zero: its deletion can
/// be scheduled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochUsage {
    /// Live tenant key versions wrapped by the key.
    pub tenant_versions: u64,
    /// Subject-wrapping keys of the epoch.
    pub swks: u64,
    /// Live subject keys wrapped under those SWKs, or (epoch 0) under tenant versions.
    pub subjects: u64,
    /// Signing keys wrapped by the key.
    pub signing_keys: u64,
}

impl EpochUsage {
    /// Whether nothing live needs the key.
    pub fn is_empty(&self) -> bool {
        self.tenant_versions == 0 && self.swks == 0 && self.subjects == 0 && self.signing_keys == 0
    }
}
