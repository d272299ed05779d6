//! PostgreSQL backend: one store shared by every replica.
//!
//! Migrations run under sqlx's advisory lock, so replicas starting together apply them
//! once. Pool acquisition times out quickly so an outage surfaces as
//! [`StoreError::Unavailable`] instead of a hang.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use super::StoreError;
use super::sql::{SqlStore, classify};

static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/postgres");

impl SqlStore {
    /// Connects to PostgreSQL at `dsn` (`postgres://user@host:port/db`) and applies
    /// migrations.
    ///
    /// # Errors
    /// [`StoreError::Misconfigured`] for a DSN that is not PostgreSQL,
    /// [`StoreError::Unavailable`] if the server cannot be reached,
    /// [`StoreError::Migration`] if the schema cannot be brought up to date.
    pub async fn connect_postgres(dsn: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        if !(dsn.starts_with("postgres://") || dsn.starts_with("postgresql://")) {
            return Err(StoreError::Misconfigured(
                "PostgreSQL DSN must start with postgres:// or postgresql://".into(),
            ));
        }
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect(dsn)
            .await
            .map_err(classify)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(std::sync::Arc::new(e)))?;
        Ok(Self {
            pool,
            backend: "postgres",
        })
    }
}
