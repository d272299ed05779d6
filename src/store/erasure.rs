//! Storage of erasure requests, the audit chain and fieldkey's signing keys (the SQL is
//! shared by both backends, as in `sql.rs`). The `erasure` module owns what the
//! records mean; the store only keeps them and applies state changes atomically.

use std::fmt;
use std::str::FromStr;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::sql::{SqlStore, classify};
use super::{StoreError, now_ms};
use crate::audit::{AuditEvent, AuditRecord, record_hash};

/// Where an erasure request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErasureState {
    /// Waiting for its grace period to end (cancellable).
    Scheduled,
    /// Being carried out (keys may already be destroyed); finishes on retry after a crash.
    Executing,
    /// Keys destroyed, receipt issued.
    Completed,
    /// Cancelled inside the grace period; nothing was destroyed.
    Cancelled,
}

impl ErasureState {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            ErasureState::Scheduled => "scheduled",
            ErasureState::Executing => "executing",
            ErasureState::Completed => "completed",
            ErasureState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErasureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErasureState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "scheduled" => ErasureState::Scheduled,
            "executing" => ErasureState::Executing,
            "completed" => ErasureState::Completed,
            "cancelled" => ErasureState::Cancelled,
            _ => return Err(StoreError::Corrupt(format!("unknown erasure state {s:?}"))),
        })
    }
}

/// An erasure request as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRecord {
    /// Request id.
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject; `None` erases the whole tenant.
    pub subject_id: Option<String>,
    /// State.
    pub state: ErasureState,
    /// Who asked.
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at: i64,
    /// End of the grace period: not executed before, Unix ms.
    pub execute_after: i64,
    /// When execution started.
    pub started_at: Option<i64>,
    /// When it completed.
    pub completed_at: Option<i64>,
    /// Who (which process) executed it.
    pub executed_by: Option<String>,
    /// Who cancelled it.
    pub cancelled_by: Option<String>,
    /// When it was cancelled.
    pub cancelled_at: Option<i64>,
    /// Execution attempts (more than one after a crash or an outage).
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// The signed receipt (JSON), once completed.
    pub receipt: Option<String>,
    /// The receipt's record in the audit chain.
    pub audit_seq: Option<u64>,
    /// Last change, Unix ms.
    pub updated_at: i64,
}

/// A new erasure request.
#[derive(Debug, Clone)]
pub struct NewErasure {
    /// Request id.
    pub erasure_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subject; `None` for the whole tenant.
    pub subject_id: Option<String>,
    /// Who asked.
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at: i64,
    /// End of the grace period, Unix ms.
    pub execute_after: i64,
    /// Initial state: `Scheduled`, or `Executing` when re-applying a restored erasure.
    pub state: ErasureState,
}

/// A signing key as stored: the public key in the clear, the Ed25519 seed wrapped by
/// the KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// Key id (derived from the public key).
    pub key_id: String,
    /// What it signs (`erasure-receipt`).
    pub purpose: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// KMS key that wraps the seed.
    pub kms_key_id: String,
    /// The wrapped seed.
    pub wrapped: Vec<u8>,
    /// Creation time, Unix ms.
    pub created_at: i64,
}

/// What the closing transaction of an erasure computes from the audit chain's head
/// (`seq` the new record takes, `prev_hash` of the record before it): the receipt to
/// store and the audit event recording it.
/// Builds an audit event from the chain head it will follow (`seq` it takes,
/// `prev_hash` of the record before it): for records that sign the chain (checkpoints).
pub type AuditFn<'a> = dyn Fn(u64, &[u8; 32]) -> Result<AuditEvent, String> + Send + Sync + 'a;

/// The closing computation of an erasure: see [`crate::store::KeyStore::complete_erasure`].
pub type CompleteFn<'a> =
    dyn Fn(u64, &[u8; 32]) -> Result<(String, AuditEvent), String> + Send + Sync + 'a;

macro_rules! signing_key_columns {
    () => {
        "key_id, purpose, public_key, kms_key_id, wrapped, created_at"
    };
}

fn signing_key_from_row(row: &sqlx::any::AnyRow) -> Result<SigningKeyRecord, StoreError> {
    Ok(SigningKeyRecord {
        key_id: row.try_get("key_id").map_err(classify)?,
        purpose: row.try_get("purpose").map_err(classify)?,
        public_key: row.try_get("public_key").map_err(classify)?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        wrapped: row.try_get("wrapped").map_err(classify)?,
        created_at: row.try_get("created_at").map_err(classify)?,
    })
}

macro_rules! erasure_columns {
    () => {
        "erasure_id, tenant_id, subject_id, state, requested_by, requested_at, execute_after, \
         started_at, completed_at, executed_by, cancelled_by, cancelled_at, attempts, \
         last_error, receipt, audit_seq, updated_at"
    };
}

fn erasure_from_row(row: &AnyRow) -> Result<ErasureRecord, StoreError> {
    let state: String = row.try_get("state").map_err(classify)?;
    let attempts: i64 = row.try_get("attempts").map_err(classify)?;
    let audit_seq: Option<i64> = row.try_get("audit_seq").map_err(classify)?;
    Ok(ErasureRecord {
        erasure_id: row.try_get("erasure_id").map_err(classify)?,
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        subject_id: row.try_get("subject_id").map_err(classify)?,
        state: state.parse()?,
        requested_by: row.try_get("requested_by").map_err(classify)?,
        requested_at: row.try_get("requested_at").map_err(classify)?,
        execute_after: row.try_get("execute_after").map_err(classify)?,
        started_at: row.try_get("started_at").map_err(classify)?,
        completed_at: row.try_get("completed_at").map_err(classify)?,
        executed_by: row.try_get("executed_by").map_err(classify)?,
        cancelled_by: row.try_get("cancelled_by").map_err(classify)?,
        cancelled_at: row.try_get("cancelled_at").map_err(classify)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error: row.try_get("last_error").map_err(classify)?,
        receipt: row.try_get("receipt").map_err(classify)?,
        audit_seq: audit_seq.and_then(|s| u64::try_from(s).ok()),
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

fn hash_col(row: &AnyRow, col: &str) -> Result<[u8; 32], StoreError> {
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

fn seq_i64(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt("audit seq out of range".into()))
}

/// Takes the chain head's row lock (serializing appenders across processes), appends
/// the record `make` builds from the head, and advances the head. Runs inside `tx`.
async fn append_in(
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

impl SqlStore {
    pub(super) async fn create_erasure_impl(
        &self,
        new: &NewErasure,
        event: Option<&AuditEvent>,
    ) -> Result<(bool, ErasureRecord), StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let n = sqlx::query(
            "INSERT INTO fk_erasures (erasure_id, tenant_id, subject_id, state, requested_by, requested_at, execute_after, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&new.erasure_id)
        .bind(&new.tenant_id)
        .bind(new.subject_id.as_deref())
        .bind(new.state.as_str())
        .bind(&new.requested_by)
        .bind(new.requested_at)
        .bind(new.execute_after)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 1 {
            if let Some(event) = event {
                append_in(&mut tx, |_, _| Ok(event.clone())).await?;
            }
            tx.commit().await.map_err(classify)?;
            let rec = self
                .get_erasure_impl(&new.erasure_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("erasure vanished after insert".into()))?;
            return Ok((true, rec));
        }
        drop(tx);
        // Either this id exists, or a live request for the same target does.
        if let Some(rec) = self.get_erasure_impl(&new.erasure_id).await? {
            return Ok((false, rec));
        }
        self.live_erasure_impl(&new.tenant_id, new.subject_id.as_deref())
            .await?
            .map(|r| (false, r))
            .ok_or_else(|| StoreError::Corrupt("erasure insert conflicted with nothing".into()))
    }

    pub(super) async fn get_erasure_impl(
        &self,
        erasure_id: &str,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            erasure_columns!(),
            " FROM fk_erasures WHERE erasure_id = $1"
        ))
        .bind(erasure_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(erasure_from_row)
        .transpose()
    }

    pub(super) async fn live_erasure_impl(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            erasure_columns!(),
            " FROM fk_erasures WHERE tenant_id = $1 AND COALESCE(subject_id, '') = $2 \
              AND state <> 'cancelled'"
        ))
        .bind(tenant_id)
        .bind(subject_id.unwrap_or(""))
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(erasure_from_row)
        .transpose()
    }

    pub(super) async fn list_erasures_impl(
        &self,
        tenant_id: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            erasure_columns!(),
            " FROM fk_erasures WHERE ($1 = '' OR tenant_id = $1) AND erasure_id > $2 \
              ORDER BY erasure_id LIMIT $3"
        ))
        .bind(tenant_id.unwrap_or(""))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(erasure_from_row)
        .collect()
    }

    pub(super) async fn reopen_erasure_impl(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_erasures SET state = 'executing', updated_at = 0, \
                 execute_after = CASE WHEN $2 < execute_after THEN $2 ELSE execute_after END \
             WHERE erasure_id = $1 AND state IN ('scheduled', 'executing')",
        )
        .bind(erasure_id)
        .bind(execute_after)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    pub(super) async fn due_erasures_impl(
        &self,
        now: i64,
        stale_before: i64,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            erasure_columns!(),
            " FROM fk_erasures WHERE (state = 'scheduled' AND execute_after <= $1) \
              OR (state = 'executing' AND updated_at < $2) \
              ORDER BY attempts, execute_after, erasure_id LIMIT $3"
        ))
        .bind(now)
        .bind(stale_before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(erasure_from_row)
        .collect()
    }

    pub(super) async fn start_erasure_impl(
        &self,
        erasure_id: &str,
        executed_by: &str,
        now: i64,
        idle_since: Option<i64>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_erasures SET state = 'executing', started_at = COALESCE(started_at, $3), \
             executed_by = $2, attempts = attempts + 1, updated_at = $3 \
             WHERE erasure_id = $1 AND ((state = 'executing' AND updated_at < $4) \
                OR (state = 'scheduled' AND execute_after <= $3))",
        )
        .bind(erasure_id)
        .bind(executed_by)
        .bind(now)
        .bind(idle_since.unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        self.get_erasure_impl(erasure_id).await
    }

    pub(super) async fn reschedule_erasure_impl(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_erasures SET execute_after = $2, updated_at = $3 \
             WHERE erasure_id = $1 AND state = 'scheduled' AND execute_after > $2",
        )
        .bind(erasure_id)
        .bind(execute_after)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    pub(super) async fn cancel_erasure_impl(
        &self,
        erasure_id: &str,
        cancelled_by: &str,
        event: &AuditEvent,
        in_grace_only: bool,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let n = sqlx::query(
            "UPDATE fk_erasures SET state = 'cancelled', cancelled_by = $2, cancelled_at = $3, updated_at = $3 \
             WHERE erasure_id = $1 AND state = 'scheduled' AND ($4 = 0 OR execute_after > $3)",
        )
        .bind(erasure_id)
        .bind(cancelled_by)
        .bind(now)
        .bind(i64::from(in_grace_only))
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        append_in(&mut tx, |_, _| Ok(event.clone())).await?;
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    pub(super) async fn note_erasure_error_impl(
        &self,
        erasure_id: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE fk_erasures SET last_error = $2, updated_at = $3 \
             WHERE erasure_id = $1 AND state = 'executing'",
        )
        .bind(erasure_id)
        .bind(error)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    pub(super) async fn complete_erasure_impl(
        &self,
        erasure_id: &str,
        complete: &CompleteFn<'_>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut receipt = String::new();
        // The head's row lock is taken first (the first statement writes), so concurrent
        // completions of the same request queue here; the loser finds it completed.
        let record = append_in(&mut tx, |seq, prev| {
            let (r, event) = complete(seq, prev).map_err(StoreError::Corrupt)?;
            receipt = r;
            Ok(event)
        })
        .await?;
        let n = sqlx::query(
            "UPDATE fk_erasures SET state = 'completed', completed_at = $2, receipt = $3, \
             audit_seq = $4, last_error = NULL, updated_at = $2 \
             WHERE erasure_id = $1 AND state = 'executing'",
        )
        .bind(erasure_id)
        .bind(record.ts)
        .bind(&receipt)
        .bind(seq_i64(record.seq)?)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 0 {
            // Completed (or never started) elsewhere: the audit record is rolled back.
            return Ok(None);
        }
        tx.commit().await.map_err(classify)?;
        self.get_erasure_impl(erasure_id).await
    }

    pub(super) async fn append_audit_impl(
        &self,
        event: &AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rec = append_in(&mut tx, |_, _| Ok(event.clone())).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    pub(super) async fn append_audit_fn_impl(
        &self,
        make: &AuditFn<'_>,
    ) -> Result<AuditRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rec = append_in(&mut tx, |seq, prev| {
            make(seq, prev).map_err(StoreError::Corrupt)
        })
        .await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    pub(super) async fn audit_head_impl(&self) -> Result<(u64, [u8; 32]), StoreError> {
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

    pub(super) async fn audit_records_impl(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query(
            "SELECT seq, ts, action, resource_type, resource_id, actor, tenant_id, caller_ip, details, prev_hash, hash \
             FROM fk_audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq_i64(after_seq)?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    pub(super) async fn signing_key_impl(
        &self,
        purpose: &str,
    ) -> Result<Option<SigningKeyRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            signing_key_columns!(),
            " FROM fk_signing_keys WHERE purpose = $1 AND state = 'active'"
        ))
        .bind(purpose)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.as_ref().map(signing_key_from_row).transpose()
    }

    pub(super) async fn signing_keys_impl(
        &self,
        purpose: &str,
    ) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            signing_key_columns!(),
            " FROM fk_signing_keys WHERE purpose = $1 ORDER BY created_at, key_id"
        ))
        .bind(purpose)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(signing_key_from_row).collect()
    }

    pub(super) async fn create_signing_key_impl(
        &self,
        key: &SigningKeyRecord,
    ) -> Result<SigningKeyRecord, StoreError> {
        sqlx::query(
            "INSERT INTO fk_signing_keys (key_id, purpose, state, public_key, kms_key_id, wrapped, created_at) \
             VALUES ($1, $2, 'active', $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.purpose)
        .bind(key.public_key.clone())
        .bind(&key.kms_key_id)
        .bind(key.wrapped.clone())
        .bind(key.created_at)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        self.signing_key_impl(&key.purpose)
            .await?
            .ok_or_else(|| StoreError::Corrupt("signing key vanished after insert".into()))
    }

    pub(super) async fn shred_tenant_impl(
        &self,
        tenant_id: &str,
    ) -> Result<(u64, u64), StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // First: mark the tenant erased (and take its row lock, so a rotation or a
        // subject creation in flight finishes before this transaction reads its rows,
        // and any later one sees the mark and refuses).
        sqlx::query(
            "UPDATE fk_tenants SET erased_at = COALESCE(erased_at, $2) WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let versions = sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'destroyed', resume_state = NULL, wrapped = NULL, updated_at = $2 \
             WHERE tenant_id = $1 AND state NOT IN ('destroyed', 'retired')",
        )
        .bind(tenant_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        let subjects = sqlx::query(
            "UPDATE fk_subjects SET state = 'destroyed', wrapped = NULL, updated_at = $2 \
             WHERE tenant_id = $1 AND state <> 'destroyed'",
        )
        .bind(tenant_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        tx.commit().await.map_err(classify)?;
        Ok((versions, subjects))
    }

    pub(super) async fn tombstone_subject_impl(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO fk_subjects (tenant_id, subject_id, state, wrap_version, wrapped, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, 'destroyed', 0, NULL, $3, $4, $4) ON CONFLICT (tenant_id, subject_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(subject_id)
        .bind(vec![0u8; 32])
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    pub(super) async fn subject_fingerprints_impl(
        &self,
        tenant_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        sqlx::query(
            "SELECT subject_id, fingerprint FROM fk_subjects WHERE tenant_id = $1 AND subject_id > $2 \
             AND state = 'destroyed' ORDER BY subject_id LIMIT $3",
        )
        .bind(tenant_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("subject_id").map_err(classify)?,
                row.try_get("fingerprint").map_err(classify)?,
            ))
        })
        .collect()
    }

    pub(super) async fn live_kms_key_ids_impl(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "SELECT t.kms_key_id FROM fk_tenants t WHERE EXISTS (SELECT 1 FROM fk_tenant_keys k \
               WHERE k.tenant_id = t.tenant_id AND k.state NOT IN ('destroyed', 'retired')) \
             UNION SELECT kms_key_id FROM fk_tenant_keys WHERE state NOT IN ('destroyed', 'retired') \
             UNION SELECT kms_key_id FROM fk_signing_keys \
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| row.try_get::<String, _>(0).map_err(classify))
        .collect()
    }

    pub(super) async fn live_key_count_impl(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let n: i64 = match subject_id {
            Some(s) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM fk_subjects WHERE tenant_id = $1 AND subject_id = $2 \
                 AND (wrapped IS NOT NULL OR state <> 'destroyed')",
            )
            .bind(tenant_id)
            .bind(s)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?,
            None => sqlx::query_scalar(
                "SELECT (SELECT COUNT(*) FROM fk_tenant_keys WHERE tenant_id = $1 \
                   AND (wrapped IS NOT NULL OR state NOT IN ('destroyed', 'retired'))) + \
                 (SELECT COUNT(*) FROM fk_subjects WHERE tenant_id = $1 \
                   AND (wrapped IS NOT NULL OR state <> 'destroyed'))",
            )
            .bind(tenant_id)
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn retire_signing_key_impl(&self, key_id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_signing_keys SET state = 'retired' WHERE key_id = $1 AND state = 'active'",
        )
        .bind(key_id)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }
}
