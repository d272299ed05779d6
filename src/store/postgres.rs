//! PostgreSQL backend: one store shared by every replica.
//!
//! Migrations run under sqlx's advisory lock, so replicas starting together apply them
//! once. Pool acquisition times out quickly so an outage surfaces as
//! [`StoreError::Unavailable`] instead of a hang.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use secrecy::{ExposeSecret as _, SecretString};
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use super::sql::{SqlStore, classify};
use super::{Change, StoreError};

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
            listen_dsn: Some(std::sync::Arc::new(secrecy::SecretString::from(
                dsn.to_owned(),
            ))),
        })
    }
}

/// The `NOTIFY` channel key-state changes are announced on (payload: tenant id, a tab,
/// the subject id or nothing).
pub(super) const CHANNEL: &str = "fieldkey_keys";

/// Opens a `LISTEN` connection and forwards announced changes. The connection is
/// re-established when lost ([`Change::Lost`] is sent then: notifications may have
/// been missed). The task ends when the receiver is dropped.
pub(super) async fn listen(dsn: &SecretString) -> Result<mpsc::Receiver<Change>, StoreError> {
    let mut listener = PgListener::connect(dsn.expose_secret())
        .await
        .map_err(classify)?;
    listener.listen(CHANNEL).await.map_err(classify)?;
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        loop {
            let change = match listener.try_recv().await {
                Ok(Some(n)) => {
                    let (tenant, subject) =
                        n.payload().split_once('\t').unwrap_or((n.payload(), ""));
                    Change::Key {
                        tenant: tenant.to_owned(),
                        subject: (!subject.is_empty()).then(|| subject.to_owned()),
                    }
                }
                Ok(None) => {
                    tracing::warn!("key-change notifications: connection lost; reconnecting");
                    Change::Lost
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key-change notifications: cannot reconnect; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Change::Lost
                }
            };
            if tx.send(change).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
