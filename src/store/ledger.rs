//! The erasure ledger: a write-ahead record of erasure requests kept **outside** the key
//! store, so that restoring a key-store backup cannot bring erased keys back.
//!
//! Every erasure is written here before its keys are destroyed. The keyring consults
//! the ledger whenever it loads key material (a cache miss), and refuses, and destroys
//! again, any key the ledger says was erased; `erasure::Erasures::reconcile` replays
//! the ledger into a restored key store (requests that vanished are re-created, keys
//! that came back are destroyed again, and receipts are re-issued). See
//! `docs/ERASURE.md`.
//!
//! It holds ids and times only: no key material, no fingerprints needed to be secret.
//! Default location: a SQLite file beside the embedded key store
//! (`erasure-ledger.db`); with PostgreSQL, a separate database given by
//! `erasure.ledger` (when unset, a table in the key store's database, with a
//! warning at start, since a restore of that database rolls both back together).

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor as _, Row};

use super::sql::classify;
use super::{ErasureState, StoreError};

const DDL: &str = "CREATE TABLE IF NOT EXISTS fk_erasure_ledger (
    erasure_id    TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    subject_id    TEXT NULL,
    state         TEXT NOT NULL CHECK (state IN ('scheduled', 'executing', 'completed', 'cancelled')),
    requested_by  TEXT NOT NULL,
    requested_at  BIGINT NOT NULL,
    execute_after BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
)";
const INDEX: &str = "CREATE INDEX IF NOT EXISTS fk_erasure_ledger_target \
    ON fk_erasure_ledger (tenant_id, subject_id)";

/// One erasure as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Request id (the same as in the key store).
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject; `None` for the whole tenant.
    pub subject_id: Option<String>,
    /// Furthest state reached.
    pub state: ErasureState,
    /// Who asked.
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at: i64,
    /// End of the grace period, Unix ms.
    pub execute_after: i64,
}

/// The erasure ledger (see the module documentation).
#[derive(Debug, Clone)]
pub struct ErasureLedger {
    pool: AnyPool,
    location: &'static str,
}

impl ErasureLedger {
    /// Opens (creating if needed) a SQLite ledger file.
    ///
    /// # Errors
    /// [`StoreError::Misconfigured`] for a bad path; [`StoreError::Unavailable`] if it
    /// cannot be opened.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let p = path
            .to_str()
            .ok_or_else(|| StoreError::Misconfigured("ledger path is not valid UTF-8".into()))?;
        if p.contains('?') || p.contains('#') {
            return Err(StoreError::Misconfigured(
                "ledger path must not contain '?' or '#'".into(),
            ));
        }
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                         PRAGMA synchronous = FULL;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&format!("sqlite://{p}?mode=rwc"))
            .await
            .map_err(classify)?;
        Self::init(pool, "sqlite").await
    }

    /// Connects to a PostgreSQL ledger (its own database, ideally on other storage than
    /// the key store's).
    ///
    /// # Errors
    /// [`StoreError::Misconfigured`] for a DSN that is not PostgreSQL;
    /// [`StoreError::Unavailable`] if it cannot be reached.
    pub async fn connect_postgres(dsn: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        if !(dsn.starts_with("postgres://") || dsn.starts_with("postgresql://")) {
            return Err(StoreError::Misconfigured(
                "ledger DSN must start with postgres:// or postgresql://".into(),
            ));
        }
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect(dsn)
            .await
            .map_err(classify)?;
        Self::init(pool, "postgres").await
    }

    async fn init(pool: AnyPool, location: &'static str) -> Result<Self, StoreError> {
        // Two processes creating the table at once can race in PostgreSQL's catalog;
        // the loser succeeds on the next pass.
        let mut attempt = 0;
        loop {
            let r = async {
                sqlx::query(DDL).execute(&pool).await?;
                sqlx::query(INDEX).execute(&pool).await
            }
            .await;
            match r {
                Ok(_) => break,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "erasure ledger set-up raced; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(classify(e)),
            }
        }
        Ok(Self { pool, location })
    }

    /// Backend name (`sqlite`, `postgres`).
    pub fn backend(&self) -> &'static str {
        self.location
    }

    /// Records an entry, or advances a recorded one; never moves one back
    /// (scheduled < executing/cancelled < completed). A scheduled entry also takes an
    /// earlier `execute_after`.
    ///
    /// # Errors
    /// [`StoreError`] from the database.
    pub async fn record(&self, e: &LedgerEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO fk_erasure_ledger (erasure_id, tenant_id, subject_id, state, requested_by, requested_at, execute_after, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (erasure_id) DO UPDATE SET state = excluded.state, \
                 execute_after = excluded.execute_after, updated_at = excluded.updated_at \
             WHERE (CASE excluded.state WHEN 'scheduled' THEN 0 WHEN 'completed' THEN 2 ELSE 1 END) > \
                   (CASE fk_erasure_ledger.state WHEN 'scheduled' THEN 0 WHEN 'completed' THEN 2 ELSE 1 END) \
                OR (excluded.state = 'scheduled' AND fk_erasure_ledger.state = 'scheduled' \
                    AND excluded.execute_after < fk_erasure_ledger.execute_after)",
        )
        .bind(&e.erasure_id)
        .bind(&e.tenant_id)
        .bind(e.subject_id.as_deref())
        .bind(e.state.as_str())
        .bind(&e.requested_by)
        .bind(e.requested_at)
        .bind(e.execute_after)
        .bind(super::now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// Whether key material of `tenant` (with `subject`: that subject's, which a
    /// tenant-wide erasure also covers; without: the tenant's own key versions) was
    /// erased: an erasure of it is executing or completed.
    ///
    /// # Errors
    /// [`StoreError`] from the database (callers fail closed).
    pub async fn erased(&self, tenant: &str, subject: Option<&str>) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM fk_erasure_ledger WHERE tenant_id = $1 \
             AND state IN ('executing', 'completed') \
             AND (subject_id IS NULL OR ($2 <> '' AND subject_id = $2)) LIMIT 1",
        )
        .bind(tenant)
        .bind(subject.unwrap_or(""))
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.is_some())
    }

    /// Up to `limit` entries with ids after `after`, by id.
    ///
    /// # Errors
    /// [`StoreError`] from the database.
    pub async fn entries(&self, after: &str, limit: u32) -> Result<Vec<LedgerEntry>, StoreError> {
        sqlx::query(
            "SELECT erasure_id, tenant_id, subject_id, state, requested_by, requested_at, execute_after \
             FROM fk_erasure_ledger WHERE erasure_id > $1 ORDER BY erasure_id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| {
            let state: String = row.try_get("state").map_err(classify)?;
            Ok(LedgerEntry {
                erasure_id: row.try_get("erasure_id").map_err(classify)?,
                tenant_id: row.try_get("tenant_id").map_err(classify)?,
                subject_id: row.try_get("subject_id").map_err(classify)?,
                state: state.parse()?,
                requested_by: row.try_get("requested_by").map_err(classify)?,
                requested_at: row.try_get("requested_at").map_err(classify)?,
                execute_after: row.try_get("execute_after").map_err(classify)?,
            })
        })
        .collect()
    }
}
