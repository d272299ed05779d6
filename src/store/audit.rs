//! The audit chain in the store: the [`AuditStore`] trait and its SQL.
//!
//! Appends take the head row's lock, so appenders across processes are serialized and
//! the chain has no gaps. `crate::audit` owns what a record means and how it verifies.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::sql::{SqlStore, classify};
use crate::model::{AuditEvent, AuditRecord, now_ms, record_hash};

/// Builds an audit event from the chain head it will follow (`seq` it takes,
/// `prev_hash` of the record before it): for records that sign the chain (checkpoints).
pub type AuditFn<'a> =
    dyn Fn(u64, &[u8; 32]) -> Result<AuditEvent, super::CallerError> + Send + Sync + 'a;

/// The audit chain: append (atomically, chained to the head) and read back.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
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
}

pub(super) fn hash_col(row: &AnyRow, col: &str) -> Result<[u8; 32], StoreError> {
    let v: Vec<u8> = row.try_get(col).map_err(classify)?;
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{col} is not 32 bytes")))
}

fn audit_from_row(row: &AnyRow) -> Result<AuditRecord, StoreError> {
    let seq: i64 = row.try_get("seq").map_err(classify)?;
    let details: String = row.try_get("details").map_err(classify)?;
    Ok(AuditRecord {
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt("negative audit seq".into()))?,
        ts: row.try_get("ts").map_err(classify)?,
        event: AuditEvent {
            action: row.try_get("action").map_err(classify)?,
            resource_type: row.try_get("resource_type").map_err(classify)?,
            resource_id: row.try_get("resource_id").map_err(classify)?,
            actor: row.try_get("actor").map_err(classify)?,
            tenant_id: row.try_get("tenant_id").map_err(classify)?,
            caller_ip: row.try_get("caller_ip").map_err(classify)?,
            details: serde_json::from_str(&details)
                .map_err(|e| StoreError::Corrupt(format!("audit details: {e}")))?,
        },
        prev_hash: hash_col(row, "prev_hash")?,
        hash: hash_col(row, "hash")?,
    })
}

pub(super) fn seq_i64(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt("audit seq out of range".into()))
}

/// Takes the chain head's row lock (serializing appenders across processes), appends
/// the record `make` builds from the head, and advances the head. Runs inside `tx`.
pub(super) async fn append_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    make: impl FnOnce(u64, &[u8; 32]) -> Result<AuditEvent, StoreError>,
) -> Result<AuditRecord, StoreError> {
    let row =
        sqlx::query("UPDATE fk_audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut **tx)
            .await
            .map_err(classify)?;
    let seq: i64 = row.try_get("seq").map_err(classify)?;
    let seq = u64::try_from(seq).map_err(|_| StoreError::Corrupt("audit head seq".into()))?;
    let prev_hash = hash_col(&row, "hash")?;
    let event = make(seq, &prev_hash)?;
    let ts = now_ms();
    let hash = record_hash(seq, ts, &event, &prev_hash);
    sqlx::query(
        "INSERT INTO fk_audit (seq, ts, action, resource_type, resource_id, actor, tenant_id, caller_ip, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(seq_i64(seq)?)
    .bind(ts)
    .bind(&event.action)
    .bind(&event.resource_type)
    .bind(&event.resource_id)
    .bind(&event.actor)
    .bind(event.tenant_id.as_deref())
    .bind(event.caller_ip.as_deref())
    .bind(event.details.to_string())
    .bind(prev_hash.to_vec())
    .bind(hash.to_vec())
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    sqlx::query("UPDATE fk_audit_head SET hash = $1 WHERE id = 1")
        .bind(hash.to_vec())
        .execute(&mut **tx)
        .await
        .map_err(classify)?;
    Ok(AuditRecord {
        seq,
        ts,
        event,
        prev_hash,
        hash,
    })
}

#[async_trait]
impl AuditStore for SqlStore {
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rec = append_in(&mut tx, |_, _| Ok(event.clone())).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn append_audit_fn(&self, make: &AuditFn<'_>) -> Result<AuditRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rec = append_in(&mut tx, |seq, prev| {
            make(seq, prev).map_err(StoreError::aborted)
        })
        .await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn audit_head(&self) -> Result<(u64, [u8; 32]), StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM fk_audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        let seq: i64 = row.try_get("seq").map_err(classify)?;
        Ok((
            u64::try_from(seq).map_err(|_| StoreError::Corrupt("audit head seq".into()))?,
            hash_col(&row, "hash")?,
        ))
    }

    async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.fetch_all_as(sqlx::query(
            "SELECT seq, ts, action, resource_type, resource_id, actor, tenant_id, caller_ip, details, prev_hash, hash \
             FROM fk_audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq_i64(after_seq)?)
        .bind(i64::from(limit)), audit_from_row).await
    }
}
