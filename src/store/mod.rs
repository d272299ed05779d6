//! Durable key store: wrapped key material, key versions and their states.
//!
//! Owns: the [`KeyStore`] trait and its two backends, SQLite ([`SqlStore::open_sqlite`],
//! the embedded default, one file) and PostgreSQL ([`SqlStore::connect_postgres`],
//! shared by replicas), each with its own schema migrations (`src/store/migrations/`).
//! Both run the same SQL through sqlx's `Any` driver, so they cannot drift apart; one
//! conformance suite (`tests/store_conformance.rs`) runs against both.
//!
//! Must not: see unwrapped keys, call the KMS, or decide state transitions (the keyring
//! decides; the store applies them atomically with compare-and-set).

mod erasure;
mod jobs;
mod ledger;
mod postgres;
mod sql;
mod sqlite;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;

pub use erasure::{AuditFn, CompleteFn, ErasureRecord, ErasureState, NewErasure, SigningKeyRecord};
pub use jobs::{JobControl, JobProgress, JobRecord, JobState, JobUpdate, NewJob};
pub use ledger::{ErasureLedger, LedgerEntry};
pub use sql::SqlStore;
pub(crate) use sql::is_unavailable;

use crate::audit::{AuditEvent, AuditRecord};
use crate::crypto::Fingerprint;
use crate::kms::WrappedKey;

/// The store's clock: now, in Unix milliseconds (every timestamp it keeps, and the
/// lease times of jobs, use it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Lifecycle state of a key version or subject key (NIST SP 800-57 inspired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Encrypts new data and decrypts.
    Active,
    /// Decrypts only (a newer version is active).
    DecryptOnly,
    /// Restricted (GDPR Art. 18): neither encrypts nor decrypts; reversible.
    Suspended,
    /// Shredded: material gone, tombstone kept; irreversible.
    Destroyed,
    /// Retired after re-encryption moved every ciphertext off it: material gone,
    /// tombstone kept; irreversible. Tenant key versions only.
    Retired,
}

impl KeyState {
    /// Stable text form used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Suspended => "suspended",
            KeyState::Destroyed => "destroyed",
            KeyState::Retired => "retired",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => KeyState::Active,
            "decrypt-only" => KeyState::DecryptOnly,
            "suspended" => KeyState::Suspended,
            "destroyed" => KeyState::Destroyed,
            "retired" => KeyState::Retired,
            _ => return Err(StoreError::Corrupt(format!("unknown key state {s:?}"))),
        })
    }
}

/// One version of a tenant key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Current state.
    pub state: KeyState,
    /// State to restore on resume, while suspended.
    pub resume_state: Option<KeyState>,
    /// KMS key that wraps this version.
    pub kms_key_id: String,
    /// Wrapped material; `None` once destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Fingerprint of the wrapped material (kept after destruction).
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

/// A tenant and all its key versions (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Tenant id.
    pub tenant_id: String,
    /// KMS key for new versions (the tenant's own, or the default at creation).
    pub kms_key_id: String,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Key versions, ascending by version.
    pub versions: Vec<KeyVersionRecord>,
}

impl TenantRecord {
    /// The version in state `active`, if any.
    pub fn active(&self) -> Option<&KeyVersionRecord> {
        self.versions.iter().find(|v| v.state == KeyState::Active)
    }

    /// A version by number.
    pub fn version(&self, version: u32) -> Option<&KeyVersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// Highest version number.
    pub fn latest_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0)
    }
}

/// A subject's (user's) key material as stored: wrapped under a tenant key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Tenant id.
    pub tenant_id: String,
    /// Subject id.
    pub subject_id: String,
    /// `Active`, `Suspended` or `Destroyed`.
    pub state: KeyState,
    /// Tenant key version that wraps the material.
    pub wrap_version: u32,
    /// Wrapped material; `None` once destroyed.
    pub wrapped: Option<Vec<u8>>,
    /// Fingerprint of the wrapped material (kept after destruction).
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

/// A key version to insert.
#[derive(Debug, Clone)]
pub struct NewKeyVersion {
    /// Version number.
    pub version: u32,
    /// KMS key that wrapped it.
    pub kms_key_id: String,
    /// Wrapped material.
    pub wrapped: WrappedKey,
}

/// A subject key to insert.
#[derive(Debug, Clone)]
pub struct NewSubject {
    /// Tenant id.
    pub tenant_id: String,
    /// Subject id.
    pub subject_id: String,
    /// Tenant key version that wraps it.
    pub wrap_version: u32,
    /// Wrapped material.
    pub wrapped: Vec<u8>,
}

/// Result of an insert-if-absent: whether this call created the row, and the row that
/// is now stored (the caller's, or the one that won a race).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created<T> {
    /// This call inserted it.
    Created(T),
    /// It already existed (possibly inserted concurrently); the stored value.
    Existing(T),
}

impl<T> Created<T> {
    /// The stored value either way.
    pub fn into_inner(self) -> T {
        match self {
            Created::Created(t) | Created::Existing(t) => t,
        }
    }

    /// Whether this call inserted it.
    pub fn was_created(&self) -> bool {
        matches!(self, Created::Created(_))
    }
}

/// A change to key states announced by another process sharing the store (PostgreSQL
/// `LISTEN/NOTIFY`), so that replicas drop cached state at once instead of waiting for
/// revalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Something about this tenant changed (versions, states); with a subject: only
    /// that subject's key.
    Key {
        /// Tenant.
        tenant: String,
        /// Subject, if only a subject's key changed.
        subject: Option<String>,
    },
    /// The notification connection was lost (and is being re-established):
    /// notifications may have been missed; revalidation bounds the delay.
    Lost,
}

/// Why a key-store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached, timed out, or is busy/locked.
    #[error("key store unavailable")]
    Unavailable(#[source] std::sync::Arc<sqlx::Error>),
    /// A query failed for a reason other than availability.
    #[error("key store query failed")]
    Database(#[source] std::sync::Arc<sqlx::Error>),
    /// A stored row does not decode (unknown state, bad length, ...).
    #[error("key store data is corrupt: {0}")]
    Corrupt(String),
    /// Schema migration failed.
    #[error("key store migration failed")]
    Migration(#[source] std::sync::Arc<sqlx::migrate::MigrateError>),
    /// Bad store configuration (path, DSN).
    #[error("key store misconfigured: {0}")]
    Misconfigured(String),
}

/// Durable storage of wrapped keys and their states.
///
/// Every mutating method is atomic. Insert-if-absent methods are safe under
/// concurrency across tasks and processes: exactly one caller creates, everyone gets
/// the stored row.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Backend name (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Cheap reachability check (for readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates `tenant_id` with its first key version unless it exists.
    async fn create_tenant(
        &self,
        tenant_id: &str,
        kms_key_id: &str,
        first: NewKeyVersion,
    ) -> Result<Created<TenantRecord>, StoreError>;

    /// A tenant with all its versions, or `None`.
    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<TenantRecord>, StoreError>;

    /// All tenant ids, ascending.
    async fn list_tenants(&self) -> Result<Vec<String>, StoreError>;

    /// Adds `new` as the active version; the previously active version becomes
    /// decrypt-only in the same transaction. Returns `false` (and changes nothing) if
    /// that version number already exists (a concurrent rotation won).
    async fn add_key_version(
        &self,
        tenant_id: &str,
        new: NewKeyVersion,
    ) -> Result<bool, StoreError>;

    /// Compare-and-set of a version's state: changes it to `new` (recording
    /// `resume_state`) only if it is currently `expected`. Returns whether it changed.
    /// Destruction goes through [`KeyStore::destroy_key_version`] instead.
    async fn update_key_state(
        &self,
        tenant_id: &str,
        version: u32,
        expected: KeyState,
        new: KeyState,
        resume_state: Option<KeyState>,
    ) -> Result<bool, StoreError>;

    /// Erases a version's wrapped material and marks it destroyed (tombstone kept).
    /// Idempotent: returns whether this call destroyed it.
    async fn destroy_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError>;

    /// Creates a subject key unless one exists (in any state, including destroyed).
    async fn create_subject(&self, new: NewSubject) -> Result<Created<SubjectRecord>, StoreError>;

    /// A subject record, or `None`.
    async fn get_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<Option<SubjectRecord>, StoreError>;

    /// Compare-and-set of a subject's state (not for destruction).
    async fn update_subject_state(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected: KeyState,
        new: KeyState,
    ) -> Result<bool, StoreError>;

    /// Erases a subject's wrapped material and marks it destroyed (tombstone kept).
    /// Idempotent: returns whether this call destroyed it.
    async fn destroy_subject(&self, tenant_id: &str, subject_id: &str) -> Result<bool, StoreError>;

    // ------------------------------------------------------------ rotation

    /// Replaces a version's wrapped material with the same key wrapped under another KMS
    /// key (KEK rotation), only if it is still wrapped by `expected_kms_key_id` and not
    /// destroyed or retired. The fingerprint (the version's identity) is kept. Returns
    /// whether it changed.
    async fn rewrap_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// Sets the KMS key that wraps a tenant's future versions.
    async fn set_tenant_kms_key(&self, tenant_id: &str, kms_key_id: &str)
    -> Result<(), StoreError>;

    /// Up to `limit` subjects of a tenant whose (non-destroyed) key material is wrapped
    /// under tenant key `version`.
    async fn subjects_wrapped_under(
        &self,
        tenant_id: &str,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Up to `limit` subjects of a tenant in `state`, with ids after `after`, by id
    /// (compliance report: the restricted subjects).
    async fn subjects_in_state(
        &self,
        tenant_id: &str,
        state: KeyState,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Replaces a subject's wrapped material with the same key wrapped under another
    /// tenant key version, only if it is still wrapped under `expected_version` and not
    /// destroyed. The fingerprint is kept. Returns whether it changed.
    async fn rewrap_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected_version: u32,
        new_version: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;

    /// Retires a decrypt-only version: erases its material and marks it retired, only
    /// if it is decrypt-only and no live subject key is wrapped under it. Returns
    /// whether it changed.
    async fn retire_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError>;

    // ------------------------------------------------------------ jobs

    /// Creates a job unless one with that id exists; returns the stored job.
    async fn create_job(&self, job: NewJob) -> Result<Created<JobRecord>, StoreError>;

    /// A job, or `None`.
    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// All jobs, newest first.
    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// Takes (or renews) the lease of an unfinished job for `owner` until
    /// `lease_until` (Unix ms): only if it is unowned, already `owner`'s, or its lease
    /// ran out before `now`. Returns the job if this owner now holds it.
    async fn claim_job(
        &self,
        job_id: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Records progress (and renews the lease) only while `owner` holds the job.
    /// Returns what operators want of the job now, or `None` if nothing was recorded
    /// because the lease was lost (or the job is finished).
    async fn update_job(
        &self,
        job_id: &str,
        owner: &str,
        update: JobUpdate,
    ) -> Result<Option<JobControl>, StoreError>;

    /// Extends `owner`'s lease on an unfinished job to `lease_until` (a heartbeat while
    /// a batch takes long). Returns whether `owner` still holds it.
    async fn renew_job_lease(
        &self,
        job_id: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError>;

    /// Sets what operators want of an unfinished job (run, pause, cancel); `Run` on a
    /// failed job also makes it pending again (after the operator fixed the cause), so
    /// the next runner resumes it from its checkpoint. Returns whether it applied.
    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError>;

    // ------------------------------------------------------------ erasure

    /// Creates an erasure request unless one with its id, or a live (not cancelled)
    /// one for the same tenant/subject, exists; returns the stored request. `event` is
    /// appended to the audit chain in the same transaction, only if this call created it.
    async fn create_erasure(
        &self,
        new: NewErasure,
        event: Option<&AuditEvent>,
    ) -> Result<Created<ErasureRecord>, StoreError>;

    /// An erasure request, or `None`.
    async fn get_erasure(&self, erasure_id: &str) -> Result<Option<ErasureRecord>, StoreError>;

    /// The live (not cancelled) erasure of a tenant (`subject` `None`) or subject.
    async fn live_erasure(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<Option<ErasureRecord>, StoreError>;

    /// Up to `limit` requests (of one tenant, or all) with ids after `after`, by id
    /// (ids sort by creation time).
    async fn list_erasures(
        &self,
        tenant_id: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError>;

    /// Requests to execute now: scheduled ones whose grace period ended by `now`, and
    /// executing ones not touched since `stale_before` (a crashed executor); fewest
    /// attempts first, so requests that keep failing do not starve new ones.
    async fn due_erasures(
        &self,
        now: i64,
        stale_before: i64,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError>;

    /// Marks a request executing (a due scheduled one, or an executing one again: any,
    /// or with `idle_since` only one untouched since then, so that workers polling
    /// together claim each abandoned request once); returns it, or `None` if it is not
    /// executable (not due, finished, cancelled, or claimed by another worker).
    async fn start_erasure(
        &self,
        erasure_id: &str,
        executed_by: &str,
        now: i64,
        idle_since: Option<i64>,
    ) -> Result<Option<ErasureRecord>, StoreError>;

    /// Makes a scheduled (or executing) request executable at once, regardless of its
    /// grace period or of a live executor (re-applying an erasure a restored backup had
    /// rolled back), taking `execute_after` if it is earlier (the time the request had
    /// been brought forward to). Returns whether it changed.
    async fn reopen_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError>;

    /// Moves a scheduled request's execution earlier (never later).
    async fn reschedule_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError>;

    /// Cancels a scheduled request (with `in_grace_only`, only while its grace period
    /// runs), appending `event` in the same transaction. Returns whether it was
    /// cancelled (false: not scheduled any more, or due).
    async fn cancel_erasure(
        &self,
        erasure_id: &str,
        cancelled_by: &str,
        event: &AuditEvent,
        in_grace_only: bool,
    ) -> Result<bool, StoreError>;

    /// Records why an execution attempt failed (it is retried).
    async fn note_erasure_error(&self, erasure_id: &str, error: &str) -> Result<(), StoreError>;

    /// Completes an executing request in one transaction: appends the audit record
    /// `complete` builds from the chain head, stores the receipt, marks it completed.
    /// Returns `None` (and appends nothing) if it was not executing (completed by
    /// another executor).
    async fn complete_erasure(
        &self,
        erasure_id: &str,
        complete: &CompleteFn<'_>,
    ) -> Result<Option<ErasureRecord>, StoreError>;

    /// Destroys every key version and every subject key of a tenant (tombstones kept),
    /// in one transaction. Returns (versions, subjects) destroyed by this call.
    async fn shred_tenant(&self, tenant_id: &str) -> Result<(u64, u64), StoreError>;

    /// Inserts a destroyed tombstone for a subject that has no key yet, so that none is
    /// ever created for it. Returns whether it inserted one.
    async fn tombstone_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<bool, StoreError>;

    /// Key rows of a tenant (all of them) or of one subject that still hold material or
    /// a live state: 0 once an erasure's destruction is complete.
    async fn live_key_count(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` (subject id, fingerprint) of a tenant's destroyed subject keys, ids
    /// after `after`, by id.
    async fn subject_fingerprints(
        &self,
        tenant_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Every KMS key id that still wraps live material (tenant keys, signing keys),
    /// or is the key of a tenant with live versions.
    async fn live_kms_key_ids(&self) -> Result<Vec<String>, StoreError>;

    // ------------------------------------------------------------ audit, signing

    /// Appends one record to the audit chain.
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError>;

    /// Appends the record `make` builds from the chain head it follows (checkpoints
    /// sign the chain up to that head).
    async fn append_audit_fn(&self, make: &AuditFn<'_>) -> Result<AuditRecord, StoreError>;

    /// The chain head: the last record's seq and hash ((0, zeros) when empty).
    async fn audit_head(&self) -> Result<(u64, [u8; 32]), StoreError>;

    /// Up to `limit` audit records after `after_seq`, in order.
    async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// The active signing key for `purpose`, if any.
    async fn signing_key(&self, purpose: &str) -> Result<Option<SigningKeyRecord>, StoreError>;

    /// Every signing key for `purpose`, the active one and the retired ones (their
    /// signatures stay valid), oldest first: what verifies receipts and checkpoints.
    async fn signing_keys(&self, purpose: &str) -> Result<Vec<SigningKeyRecord>, StoreError>;

    /// Retires an active signing key (its KMS key became unusable); receipts it signed
    /// still verify with its public key. Returns whether it changed.
    async fn retire_signing_key(&self, key_id: &str) -> Result<bool, StoreError>;

    /// Stores `key` as the active signing key for its purpose unless one exists;
    /// returns the active one (this, or the one that won a race).
    async fn create_signing_key(
        &self,
        key: &SigningKeyRecord,
    ) -> Result<SigningKeyRecord, StoreError>;

    // ------------------------------------------------------------ propagation

    /// Tells other processes sharing the store that a tenant's (or subject's) keys
    /// changed. A no-op where there is nobody to tell (SQLite).
    async fn announce(&self, tenant_id: &str, subject_id: Option<&str>) -> Result<(), StoreError>;

    /// A stream of changes announced by other processes, or `None` if this backend
    /// has none (SQLite: revalidation alone bounds propagation).
    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>, StoreError>;
}
