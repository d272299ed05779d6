//! The shared vocabulary, on the ground floor: key, subject, erasure and job states
//! and their records, the wrapped form of a key, the clock, canonical JSON and the
//! audit record with its hash.
//!
//! Owns: plain data types and pure functions that several rooms above speak in
//! (the store persists them, the keyring, erasure workflow, jobs, report and service
//! read them). Must not: do I/O, hold unwrapped key material, or import any room but
//! `crypto` (it sits below everything else).

pub mod audit;
pub mod epochs;
pub mod erasure;
pub mod info;
pub mod jobs;
pub mod json;
pub mod keys;
pub mod time;

pub use audit::{AuditEvent, AuditRecord, GENESIS, record_hash};
pub use epochs::{
    EpochRecord, EpochState, EpochUsage, KEPT_LEGACY, NewSwk, RollLease, RollProgress,
    RolledSubject, SwkRecord, swk_id,
};
pub use erasure::{ErasureRecord, ErasureState, NewErasure};
pub use info::{SubjectInfo, TenantInfo, VersionInfo};
pub use jobs::{
    JobControl, JobProgress, JobRecord, JobShardRecord, JobState, JobTotals, JobUpdate, NewJob,
    NewShard, TotalsFn,
};
pub use json::canonical_json;
pub use keys::{
    Created, DualWrap, KeyState, KeyVersionRecord, NewKeyVersion, NewSubject, SigningKeyRecord,
    SubjectRecord, TenantRecord, WrappedKey,
};
pub use time::{MAX_UNIX_MS, MIN_UNIX_MS, now_ms, rfc3339_ms};

/// A stored value that does not decode into its type (an unknown state name, bad
/// progress JSON). The store reports it as corrupt data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);
