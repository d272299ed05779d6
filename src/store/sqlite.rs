//! SQLite backend: the embedded default, one file beside the sidecar.
//!
//! WAL journal, `synchronous = FULL` (a committed key survives power loss), foreign keys
//! on, and a busy timeout so concurrent writers (tasks or processes) queue instead of
//! failing.

use std::path::Path;
use std::time::Duration;

use sqlx::Executor as _;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use super::StoreError;
use super::sql::{SqlStore, classify};

static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/sqlite");

impl SqlStore {
    /// Opens (creating if needed) the SQLite key store at `path` and applies migrations.
    ///
    /// # Errors
    /// [`StoreError::Misconfigured`] for a path that is not UTF-8,
    /// [`StoreError::Unavailable`] if the file cannot be opened,
    /// [`StoreError::Migration`] if the schema cannot be brought up to date.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let p = path
            .to_str()
            .ok_or_else(|| StoreError::Misconfigured("SQLite path is not valid UTF-8".into()))?;
        if p.contains('?') || p.contains('#') {
            return Err(StoreError::Misconfigured(
                "SQLite path must not contain '?' or '#'".into(),
            ));
        }
        let url = format!("sqlite://{p}?mode=rwc");
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                         PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(classify)?;
        // Two processes opening a fresh file at once can race on the first migration;
        // the loser sees "already exists" and succeeds on the next pass.
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "SQLite migration raced; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(StoreError::Migration(std::sync::Arc::new(e))),
            }
        }
        Ok(Self {
            pool,
            backend: "sqlite",
            feed: None,
        })
    }
}
