//! Erasure requests in the store: the [`ErasureStore`] trait and its SQL.
//!
//! Requests move scheduled -> executing -> completed (or cancelled) atomically, with
//! their audit records in the same transaction; the tenant shred and the facts an
//! erasure receipt states (what is still live, which fingerprints were destroyed)
//! are read here. `crate::erasure` owns what the records mean.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{append_in, seq_i64};
use super::sql::{SqlStore, classify};
use super::{AuditStore, StoreError};
use crate::model::{AuditEvent, Created, ErasureRecord, NewErasure, now_ms};

/// What the closing transaction of an erasure computes from the audit chain's head
/// (`seq` the new record takes, `prev_hash` of the record before it): the receipt to
/// store and the audit event recording it.
pub type CompleteFn<'a> =
    dyn Fn(u64, &[u8; 32]) -> Result<(String, AuditEvent), super::CallerError> + Send + Sync + 'a;

/// Erasure requests, and the destruction of key material they carry out.
///
/// An erasure store is an audit store: a request's state changes and their audit
/// records are written in one transaction, and the workflow records its other
/// actions (restriction, reconciliation) in the same chain.
#[async_trait]
pub trait ErasureStore: AuditStore + Send + Sync + 'static {
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

    /// Records, on an erasure, the key epoch that was active when its keys were
    /// destroyed (the first one recorded is kept): backups taken up to then hold the
    /// material under that epoch's key or an older one.
    async fn note_destroyed_epoch(&self, erasure_id: &str, epoch: u64) -> Result<(), StoreError>;

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
}

macro_rules! erasure_columns {
    () => {
        "erasure_id, tenant_id, subject_id, state, requested_by, requested_at, execute_after, \
         started_at, completed_at, executed_by, cancelled_by, cancelled_at, attempts, \
         last_error, receipt, audit_seq, destroyed_epoch, updated_at"
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
        destroyed_epoch: super::sql::opt_u64_col(row, "destroyed_epoch")?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

#[async_trait]
impl ErasureStore for SqlStore {
    async fn create_erasure(
        &self,
        new: NewErasure,
        event: Option<&AuditEvent>,
    ) -> Result<Created<ErasureRecord>, StoreError> {
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
                .get_erasure(&new.erasure_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt("erasure vanished after insert".into()))?;
            return Ok(Created::Created(rec));
        }
        drop(tx);
        // Either this id exists, or a live request for the same target does.
        if let Some(rec) = self.get_erasure(&new.erasure_id).await? {
            return Ok(Created::Existing(rec));
        }
        self.live_erasure(&new.tenant_id, new.subject_id.as_deref())
            .await?
            .map(Created::Existing)
            .ok_or_else(|| StoreError::Corrupt("erasure insert conflicted with nothing".into()))
    }

    async fn get_erasure(&self, erasure_id: &str) -> Result<Option<ErasureRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                erasure_columns!(),
                " FROM fk_erasures WHERE erasure_id = $1"
            ))
            .bind(erasure_id),
            erasure_from_row,
        )
        .await
    }

    async fn live_erasure(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                erasure_columns!(),
                " FROM fk_erasures WHERE tenant_id = $1 AND COALESCE(subject_id, '') = $2 \
              AND state <> 'cancelled'"
            ))
            .bind(tenant_id)
            .bind(subject_id.unwrap_or("")),
            erasure_from_row,
        )
        .await
    }

    async fn list_erasures(
        &self,
        tenant_id: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                erasure_columns!(),
                " FROM fk_erasures WHERE ($1 = '' OR tenant_id = $1) AND erasure_id > $2 \
              ORDER BY erasure_id LIMIT $3"
            ))
            .bind(tenant_id.unwrap_or(""))
            .bind(after)
            .bind(i64::from(limit)),
            erasure_from_row,
        )
        .await
    }

    async fn due_erasures(
        &self,
        now: i64,
        stale_before: i64,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                erasure_columns!(),
                " FROM fk_erasures WHERE (state = 'scheduled' AND execute_after <= $1) \
              OR (state = 'executing' AND updated_at < $2) \
              ORDER BY attempts, execute_after, erasure_id LIMIT $3"
            ))
            .bind(now)
            .bind(stale_before)
            .bind(i64::from(limit)),
            erasure_from_row,
        )
        .await
    }

    async fn start_erasure(
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
        self.get_erasure(erasure_id).await
    }

    async fn reopen_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_erasures SET state = 'executing', updated_at = 0, \
                 execute_after = CASE WHEN $2 < execute_after THEN $2 ELSE execute_after END \
             WHERE erasure_id = $1 AND state IN ('scheduled', 'executing')",
            )
            .bind(erasure_id)
            .bind(execute_after),
        )
        .await
    }

    async fn reschedule_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_erasures SET execute_after = $2, updated_at = $3 \
             WHERE erasure_id = $1 AND state = 'scheduled' AND execute_after > $2",
            )
            .bind(erasure_id)
            .bind(execute_after)
            .bind(now_ms()),
        )
        .await
    }

    async fn cancel_erasure(
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

    async fn note_erasure_error(&self, erasure_id: &str, error: &str) -> Result<(), StoreError> {
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

    async fn complete_erasure(
        &self,
        erasure_id: &str,
        complete: &CompleteFn<'_>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut receipt = String::new();
        // The head's row lock is taken first (the first statement writes), so concurrent
        // completions of the same request queue here; the loser finds it completed.
        let record = append_in(&mut tx, |seq, prev| {
            let (r, event) = complete(seq, prev).map_err(StoreError::aborted)?;
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
        self.get_erasure(erasure_id).await
    }

    async fn note_destroyed_epoch(&self, erasure_id: &str, epoch: u64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE fk_erasures SET destroyed_epoch = COALESCE(destroyed_epoch, $2) \
             WHERE erasure_id = $1",
        )
        .bind(erasure_id)
        .bind(super::sql::i64_of(epoch)?)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn shred_tenant(&self, tenant_id: &str) -> Result<(u64, u64), StoreError> {
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
            "UPDATE fk_subjects SET state = 'destroyed', wrapped = NULL, swk_id = NULL, updated_at = $2 \
             WHERE tenant_id = $1 AND state <> 'destroyed'",
        )
        .bind(tenant_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        // The tenant's subject-wrapping keys guard nothing live any more.
        sqlx::query("DELETE FROM fk_subject_wrapping_keys WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok((versions, subjects))
    }

    async fn tombstone_subject(
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

    async fn live_key_count(
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

    async fn subject_fingerprints(
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

    async fn live_kms_key_ids(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "SELECT t.kms_key_id FROM fk_tenants t WHERE EXISTS (SELECT 1 FROM fk_tenant_keys k \
               WHERE k.tenant_id = t.tenant_id AND k.state NOT IN ('destroyed', 'retired')) \
             UNION SELECT kms_key_id FROM fk_tenant_keys WHERE state NOT IN ('destroyed', 'retired') \
             UNION SELECT kms_key_id FROM fk_signing_keys \
             UNION SELECT kms_key_id FROM fk_subject_wrapping_keys \
             UNION SELECT kms_key_id FROM fk_epochs WHERE state IN ('creating', 'active', 'retiring') \
               AND kms_key_id IS NOT NULL \
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?
        .iter()
        .map(|row| row.try_get::<String, _>(0).map_err(classify))
        .collect()
    }
}
