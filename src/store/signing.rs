//! Signing keys in the store: the [`SigningKeyStore`] trait and its SQL.

use async_trait::async_trait;
use sqlx::Row;

use super::StoreError;
use super::sql::{SqlStore, classify};
use crate::model::SigningKeyRecord;

/// fieldkey's own signing keys (receipts, checkpoints): public key in the clear, seed wrapped.
#[async_trait]
pub trait SigningKeyStore: Send + Sync + 'static {
    /// The active signing key for `purpose`, if any.
    async fn signing_key(&self, purpose: &str) -> Result<Option<SigningKeyRecord>, StoreError>;

    /// Every signing key for `purpose`, the active one and the retired ones (their
    /// signatures stay valid), oldest first: what verifies receipts and checkpoints.
    async fn signing_keys(&self, purpose: &str) -> Result<Vec<SigningKeyRecord>, StoreError>;

    /// Retires an active signing key (its KMS key became unusable); receipts it signed
    /// still verify with its public key. Returns whether it changed.
    async fn retire_signing_key(&self, key_id: &str) -> Result<bool, StoreError>;

    /// The active key epoch and its KMS key, if epochs have started: new signing keys
    /// are wrapped under it.
    async fn active_epoch_key(&self) -> Result<Option<(u64, String)>, StoreError>;

    /// Stores `key` as the active signing key for its purpose unless one exists;
    /// returns the active one (this, or the one that won a race).
    async fn create_signing_key(
        &self,
        key: &SigningKeyRecord,
    ) -> Result<SigningKeyRecord, StoreError>;
}

macro_rules! signing_key_columns {
    () => {
        "key_id, purpose, public_key, kms_key_id, epoch, wrapped, created_at"
    };
}

fn signing_key_from_row(row: &sqlx::any::AnyRow) -> Result<SigningKeyRecord, StoreError> {
    Ok(SigningKeyRecord {
        key_id: row.try_get("key_id").map_err(classify)?,
        purpose: row.try_get("purpose").map_err(classify)?,
        public_key: row.try_get("public_key").map_err(classify)?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        epoch: super::sql::opt_u64_col(row, "epoch")?,
        wrapped: row.try_get("wrapped").map_err(classify)?,
        created_at: row.try_get("created_at").map_err(classify)?,
    })
}

#[async_trait]
impl SigningKeyStore for SqlStore {
    async fn signing_key(&self, purpose: &str) -> Result<Option<SigningKeyRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                signing_key_columns!(),
                " FROM fk_signing_keys WHERE purpose = $1 AND state = 'active'"
            ))
            .bind(purpose),
            signing_key_from_row,
        )
        .await
    }

    async fn signing_keys(&self, purpose: &str) -> Result<Vec<SigningKeyRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                signing_key_columns!(),
                " FROM fk_signing_keys WHERE purpose = $1 ORDER BY created_at, key_id"
            ))
            .bind(purpose),
            signing_key_from_row,
        )
        .await
    }

    async fn retire_signing_key(&self, key_id: &str) -> Result<bool, StoreError> {
        self.changed_one(sqlx::query(
            "UPDATE fk_signing_keys SET state = 'retired' WHERE key_id = $1 AND state = 'active'",
        )
        .bind(key_id))
        .await
    }

    async fn active_epoch_key(&self) -> Result<Option<(u64, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT epoch, kms_key_id FROM fk_epochs WHERE state = 'active' AND kms_key_id IS NOT NULL",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok((
                super::sql::opt_u64_col(&r, "epoch")?.unwrap_or(0),
                r.try_get("kms_key_id").map_err(classify)?,
            ))
        })
        .transpose()
    }

    async fn create_signing_key(
        &self,
        key: &SigningKeyRecord,
    ) -> Result<SigningKeyRecord, StoreError> {
        sqlx::query(
            "INSERT INTO fk_signing_keys (key_id, purpose, state, public_key, kms_key_id, wrapped, created_at, epoch) \
             VALUES ($1, $2, 'active', $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.purpose)
        .bind(key.public_key.clone())
        .bind(&key.kms_key_id)
        .bind(key.wrapped.clone())
        .bind(key.created_at)
        .bind(key.epoch.map(super::sql::i64_of).transpose()?)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        self.signing_key(&key.purpose)
            .await?
            .ok_or_else(|| StoreError::Corrupt("signing key vanished after insert".into()))
    }
}
