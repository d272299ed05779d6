//! The SQL both backends share, run through sqlx's `Any` driver with `$N` placeholders
//! (understood by SQLite and PostgreSQL alike). Dialect differences live only in the
//! migrations and in connection set-up (`sqlite.rs`, `postgres.rs`).
//!
//! This file holds the store itself ([`SqlStore`]), how sqlx errors are classified, the
//! column decoders more than one concern uses, and the [`KeyStore`] core (backend,
//! reachability, change propagation). Each concern's queries live in its own file.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use super::{Change, ChangeFeedState, KeyStore, StoreError};
use crate::crypto::Fingerprint;
use crate::model::KeyState;

/// A key store over a SQL database (SQLite or PostgreSQL).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(super) pool: AnyPool,
    pub(super) backend: &'static str,
    /// The change feed, PostgreSQL's `LISTEN` connection (`None` for SQLite).
    pub(super) feed: Option<std::sync::Arc<super::postgres::Feed>>,
}

/// A statement with its arguments bound, ready to run.
pub(super) type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Decodes one row into a record.
pub(super) type Decode<T> = fn(&AnyRow) -> Result<T, StoreError>;

impl SqlStore {
    /// Runs a compare-and-set style statement: whether it changed exactly one row.
    pub(super) async fn changed_one(&self, q: Query<'_>) -> Result<bool, StoreError> {
        let n = q
            .execute(&self.pool)
            .await
            .map_err(classify)?
            .rows_affected();
        Ok(n == 1)
    }

    /// The row a query finds, decoded, or `None`.
    pub(super) async fn fetch_one_as<T>(
        &self,
        q: Query<'_>,
        decode: Decode<T>,
    ) -> Result<Option<T>, StoreError> {
        q.fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .as_ref()
            .map(decode)
            .transpose()
    }

    /// Every row a query finds, decoded, in order.
    pub(super) async fn fetch_all_as<T>(
        &self,
        q: Query<'_>,
        decode: Decode<T>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = q.fetch_all(&self.pool).await.map_err(classify)?;
        rows.iter().map(decode).collect()
    }
}

/// Whether a sqlx error means "the database is not there, or busy: retry" rather than
/// "this statement failed". Shared by the key store and the re-encryption runner.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite: 5 BUSY, 6 LOCKED, 10 IOERR, 14 CANTOPEN (and their extended
                // codes). Only for SQLite: PostgreSQL's numeric SQLSTATEs can share the
                // low byte (42501, insufficient privilege, ends in 5).
                code.parse::<i64>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 14))
            } else {
                // PostgreSQL: class 08 connection exception, 53 insufficient resources,
                // 57P01-57P03 shutdown / cannot connect now.
                code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
            }
        }
        _ => false,
    }
}

/// Sorts sqlx errors into "the database is not there / busy" and "the query failed".
pub(super) fn classify(e: sqlx::Error) -> StoreError {
    if is_unavailable(&e) {
        StoreError::Unavailable(std::sync::Arc::new(e))
    } else {
        StoreError::Database(std::sync::Arc::new(e))
    }
}

pub(super) fn u32_col(row: &AnyRow, col: &str) -> Result<u32, StoreError> {
    let v: i64 = row.try_get(col).map_err(classify)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} out of range: {v}")))
}

pub(super) fn fingerprint_col(row: &AnyRow) -> Result<Fingerprint, StoreError> {
    let v: Vec<u8> = row.try_get("fingerprint").map_err(classify)?;
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("fingerprint is not 32 bytes".into()))?;
    Ok(Fingerprint::from_bytes(arr))
}

pub(super) fn state_col(row: &AnyRow, col: &str) -> Result<Option<KeyState>, StoreError> {
    let v: Option<String> = row.try_get(col).map_err(classify)?;
    v.map(|s| s.parse().map_err(StoreError::from)).transpose()
}

pub(super) fn opt_u64_col(row: &AnyRow, col: &str) -> Result<Option<u64>, StoreError> {
    let v: Option<i64> = row.try_get(col).map_err(classify)?;
    v.map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} out of range: {v}"))))
        .transpose()
}

pub(super) fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("value out of range: {v}")))
}

/// Whether `epoch` is the active key epoch, holding (PostgreSQL) a share lock on its row
/// for the rest of `tx`: a roll activating the next epoch (an exclusive row lock) waits
/// for writes that wrap material under this one to commit, and they for it, so that
/// everything the roll's sweep reads afterwards is all there is.
pub(super) async fn epoch_active(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    epoch: u64,
    backend: &'static str,
) -> Result<bool, StoreError> {
    let q = if backend == "postgres" {
        "SELECT state FROM fk_epochs WHERE epoch = $1 FOR SHARE"
    } else {
        "SELECT state FROM fk_epochs WHERE epoch = $1"
    };
    let state: Option<String> = sqlx::query_scalar(q)
        .bind(i64_of(epoch)?)
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?;
    Ok(state.as_deref() == Some("active"))
}

/// Whether `kms_key_id` is the legacy key (epoch 0) while an epoch is active: then
/// nothing new may be wrapped under it. Holds (PostgreSQL) a share lock on the legacy
/// row, which the roll's activation takes exclusively first, so the two serialize.
pub(super) async fn legacy_key_retiring(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kms_key_id: &str,
    backend: &'static str,
) -> Result<bool, StoreError> {
    let q = if backend == "postgres" {
        "SELECT 1 FROM fk_epochs WHERE epoch = 0 AND kms_key_id = $1 FOR SHARE"
    } else {
        "SELECT 1 FROM fk_epochs WHERE epoch = 0 AND kms_key_id = $1"
    };
    let legacy = sqlx::query(q)
        .bind(kms_key_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?
        .is_some();
    if !legacy {
        return Ok(false);
    }
    let active = sqlx::query("SELECT 1 FROM fk_epochs WHERE state = 'active'")
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?
        .is_some();
    Ok(active)
}

/// Takes the tenant row's lock for the rest of `tx` and says whether the tenant is live
/// (exists and was not erased). Rotation and subject creation call it first, so they
/// serialize with a tenant shred (which sets `erased_at` in its first statement).
///
/// `shared` (PostgreSQL only): a share lock, so that many subject creations of one tenant
/// do not queue behind each other, while a shred (an exclusive row lock) still waits
/// for them and they for it. SQLite serializes writers anyway, and its transaction must
/// start with a write (a read-then-write transaction can fail to upgrade its lock).
pub(super) async fn lock_live_tenant(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    shared_on: Option<&'static str>,
) -> Result<bool, StoreError> {
    if shared_on == Some("postgres") {
        let row = sqlx::query(
            "SELECT 1 FROM fk_tenants WHERE tenant_id = $1 AND erased_at IS NULL FOR SHARE",
        )
        .bind(tenant_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?;
        return Ok(row.is_some());
    }
    let n = sqlx::query(
        "UPDATE fk_tenants SET erased_at = erased_at WHERE tenant_id = $1 AND erased_at IS NULL",
    )
    .bind(tenant_id)
    .execute(&mut **tx)
    .await
    .map_err(classify)?
    .rows_affected();
    Ok(n == 1)
}

#[async_trait]
#[async_trait]
impl KeyStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn announce(&self, tenant_id: &str, subject_id: Option<&str>) -> Result<(), StoreError> {
        if self.feed.is_none() {
            return Ok(());
        }
        let payload = format!("{tenant_id}\t{}", subject_id.unwrap_or(""));
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::postgres::CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>, StoreError> {
        match &self.feed {
            None => Ok(None),
            Some(feed) => super::postgres::listen(feed.clone()).await.map(Some),
        }
    }

    fn change_feed_state(&self) -> Option<ChangeFeedState> {
        self.feed.as_ref().map(|f| f.state())
    }
}
