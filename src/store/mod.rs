//! Durable key store: wrapped key material, key versions and their states.
//!
//! Owns: one trait per concern, each in its own file with its SQL —
//! [`TenantKeyStore`] (`keys.rs`), [`SubjectStore`] (`subjects.rs`), [`JobStore`]
//! (`jobs.rs`), [`ErasureStore`] (`erasures.rs`, with the [`ErasureLedger`] in
//! `ledger.rs`), [`AuditStore`] (`audit.rs`), [`SigningKeyStore`] (`signing.rs`),
//! [`EpochStore`] (`epochs.rs`), [`EpochMoveStore`] (`moves.rs`) —
//! and [`KeyStore`], all of them together plus reachability and change propagation,
//! with its two backends, SQLite ([`SqlStore::open_sqlite`],
//! the embedded default, one file) and PostgreSQL ([`SqlStore::connect_postgres`],
//! shared by replicas), each with its own schema migrations (`src/store/migrations/`).
//! Both run the same SQL through sqlx's `Any` driver, so they cannot drift apart; one
//! conformance suite (`tests/store_conformance.rs`) runs against both.
//!
//! Must not: see unwrapped keys, call the KMS, or decide state transitions (the keyring
//! decides; the store applies them atomically with compare-and-set).

mod audit;
mod epochs;
mod erasures;
mod jobs;
mod keys;
mod ledger;
mod moves;
mod postgres;
mod signing;
mod sql;
mod sqlite;
mod subjects;

use async_trait::async_trait;

pub use crate::model::{
    Created, ErasureRecord, ErasureState, JobControl, JobProgress, JobRecord, JobShardRecord,
    JobState, JobTotals, JobUpdate, KeyState, KeyVersionRecord, NewErasure, NewJob, NewKeyVersion,
    NewShard, NewSubject, SigningKeyRecord, SubjectRecord, TenantRecord, TotalsFn, now_ms,
};
pub use audit::{AuditFn, AuditStore};
pub use epochs::EpochStore;
pub use erasures::{CompleteFn, ErasureStore};
pub use jobs::{JobStore, SHARDED_OWNER};
pub use keys::TenantKeyStore;
pub use ledger::{ErasureLedger, LedgerEntry};
pub use moves::{EpochMoveStore, VersionToRoll};
pub use postgres::FeedHealth;
pub use signing::SigningKeyStore;
pub use sql::SqlStore;
pub(crate) use sql::is_unavailable;
pub use subjects::SubjectStore;

use crate::model::DecodeError;

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
    /// Notifications may have been missed: the notification connection was lost
    /// (closed, failed, or a ping went unanswered), an attempt to replace it failed, or
    /// it has just been replaced. Sent at each of these, so that what was read from the
    /// store before is not trusted to be current.
    Lost,
}

/// What the change feed's connection went through since the process started (for the
/// metrics): whether it is connected now, how often it was lost (closed, failed, or a
/// ping unanswered) and how often a new one was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeFeedState {
    /// Connected and listening (and answering pings).
    pub up: bool,
    /// Connections lost.
    pub lost: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
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
    /// The caller's computation inside a store transaction failed (signing a receipt
    /// or a checkpoint, say); the transaction was rolled back. Carries the caller's own
    /// error, so it is reported as what it is, not as corrupt data.
    #[error("aborted by the caller: {0}")]
    Aborted(#[source] std::sync::Arc<dyn std::error::Error + Send + Sync>),
    /// The write was refused because a key epoch roll superseded what it was based on
    /// (new material wrapped under an epoch that is no longer the active one). Nothing
    /// was written; the caller re-reads the active epoch and tries again.
    #[error("a key epoch roll superseded this write; retry")]
    EpochRolled,
}

/// The error a caller's computation inside a store transaction returns (see
/// [`AuditFn`], [`CompleteFn`]); it comes back as [`StoreError::Aborted`].
pub type CallerError = Box<dyn std::error::Error + Send + Sync>;

impl StoreError {
    /// The caller's error, as the store reports it.
    pub fn aborted(e: CallerError) -> Self {
        StoreError::Aborted(std::sync::Arc::from(e))
    }
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        StoreError::Corrupt(e.0)
    }
}

/// The traits of the store, for `use crate::store::prelude::*` where a caller holds
/// the whole [`KeyStore`] and calls methods of several concerns.
pub mod prelude {
    pub use super::{
        AuditStore, EpochMoveStore, EpochStore, ErasureStore, JobStore, KeyStore, SigningKeyStore,
        SubjectStore, TenantKeyStore,
    };
}

/// The whole store: every concern's trait, plus reachability and change propagation.
///
/// Every mutating method is atomic. Insert-if-absent methods are safe under
/// concurrency across tasks and processes: exactly one caller creates, everyone gets
/// the stored row.
#[async_trait]
pub trait KeyStore:
    TenantKeyStore
    + SubjectStore
    + JobStore
    + ErasureStore
    + AuditStore
    + SigningKeyStore
    + EpochStore
    + EpochMoveStore
    + Send
    + Sync
    + 'static
{
    /// Backend name (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Cheap reachability check (for readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Tells other processes sharing the store that a tenant's (or subject's) keys
    /// changed. A no-op where there is nobody to tell (SQLite).
    async fn announce(&self, tenant_id: &str, subject_id: Option<&str>) -> Result<(), StoreError>;

    /// A stream of changes announced by other processes, or `None` if this backend
    /// has none (SQLite: revalidation alone bounds propagation).
    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>, StoreError>;

    /// The state of the change feed, or `None` if this backend has none.
    fn change_feed_state(&self) -> Option<ChangeFeedState> {
        None
    }
}

impl StoreError {
    /// A read refused at once because the reader's circuit breaker towards the store is
    /// open (the store failed repeatedly; one probe at a time finds out when it is
    /// back). Reported as unavailability: the caller retries later.
    pub fn circuit_open(retry_after: std::time::Duration) -> Self {
        Self::unavailable(format!(
            "circuit open: the key store failed repeatedly; next attempt in {} ms",
            retry_after.as_millis()
        ))
    }

    /// A read that got no answer in time (a connection that died silently, a store
    /// that stopped answering): unavailability.
    pub fn no_answer(within: std::time::Duration) -> Self {
        Self::unavailable(format!(
            "the key store did not answer within {} ms",
            within.as_millis()
        ))
    }

    fn unavailable(why: String) -> Self {
        Self::Unavailable(std::sync::Arc::new(sqlx::Error::Io(std::io::Error::other(
            why,
        ))))
    }
}
