//! Subject (per-user) keys in the store: the [`SubjectStore`] trait and its SQL.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::sql::{SqlStore, classify, fingerprint_col, lock_live_tenant, state_col, u32_col};
use crate::crypto::Fingerprint;
use crate::model::EpochState;
use crate::model::{Created, KeyState, NewSubject, SubjectRecord, now_ms};

/// Subject (per-user) keys: creation, states, rewrap under a newer tenant version.
#[async_trait]
pub trait SubjectStore: Send + Sync + 'static {
    /// Creates a subject key unless one exists (in any state, including destroyed).
    async fn create_subject(&self, new: NewSubject) -> Result<Created<SubjectRecord>, StoreError>;

    /// A subject record, or `None`.
    async fn get_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<Option<SubjectRecord>, StoreError>;

    /// Compare-and-set of a subject's state (not for destruction).
    async fn update_subject_state(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected: KeyState,
        new: KeyState,
    ) -> Result<bool, StoreError>;

    /// Erases a subject's wrapped material and marks it destroyed (tombstone kept).
    /// Idempotent: returns whether this call destroyed it.
    async fn destroy_subject(&self, tenant_id: &str, subject_id: &str) -> Result<bool, StoreError>;

    /// Up to `limit` subjects of a tenant whose (non-destroyed) key material is wrapped
    /// under tenant key `version`.
    async fn subjects_wrapped_under(
        &self,
        tenant_id: &str,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Up to `limit` subjects of a tenant in `state`, with ids after `after`, by id
    /// (compliance report: the restricted subjects).
    async fn subjects_in_state(
        &self,
        tenant_id: &str,
        state: KeyState,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Replaces a subject's wrapped material with the same key wrapped under another
    /// tenant key version, only if it is still wrapped under `expected_version` and not
    /// destroyed. The fingerprint is kept. Returns whether it changed.
    async fn rewrap_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected_version: u32,
        new_version: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;
}

pub(super) fn subject_from_row(row: &AnyRow) -> Result<SubjectRecord, StoreError> {
    Ok(SubjectRecord {
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        subject_id: row.try_get("subject_id").map_err(classify)?,
        state: state_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("null state".into()))?,
        wrap_version: u32_col(row, "wrap_version")?,
        swk_id: row.try_get("swk_id").map_err(classify)?,
        wrapped: row.try_get("wrapped").map_err(classify)?,
        fingerprint: fingerprint_col(row)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

/// The columns `subject_from_row` reads (a macro, so queries stay `&'static str`).
macro_rules! subject_columns {
    () => {
        "tenant_id, subject_id, state, wrap_version, swk_id, wrapped, fingerprint, created_at, updated_at"
    };
}

#[async_trait]
impl SubjectStore for SqlStore {
    async fn create_subject(&self, new: NewSubject) -> Result<Created<SubjectRecord>, StoreError> {
        let now = now_ms();
        let fp = Fingerprint::of_wrapped(&new.wrapped);
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // An erased tenant gets a tombstone, never live material (the tenant row lock
        // serializes this with a tenant shred).
        let live = lock_live_tenant(&mut tx, &new.tenant_id, Some(self.backend)).await?;
        if live && let Some(swk) = &new.swk_id {
            // The SWK must belong to the active epoch (share-locked on PostgreSQL, so a
            // roll activating the next epoch waits for this insert, and its sweep sees
            // it): a replica with a stale view of the epoch retries with the new one.
            let q = if self.backend == "postgres" {
                "SELECT e.state FROM fk_subject_wrapping_keys w JOIN fk_epochs e ON e.epoch = w.epoch \
                 WHERE w.swk_id = $1 FOR SHARE"
            } else {
                "SELECT e.state FROM fk_subject_wrapping_keys w JOIN fk_epochs e ON e.epoch = w.epoch \
                 WHERE w.swk_id = $1"
            };
            let state: Option<String> = sqlx::query_scalar(q)
                .bind(swk)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            if state.as_deref() != Some(EpochState::Active.as_str()) {
                tx.rollback().await.map_err(classify)?;
                return Err(StoreError::EpochRolled);
            }
        }
        let (state, wrapped, fp, swk_id) = if live {
            (
                "active",
                Some(new.wrapped.clone()),
                fp.as_bytes().to_vec(),
                new.swk_id.clone(),
            )
        } else {
            ("destroyed", None, vec![0u8; 32], None)
        };
        let n = sqlx::query(
            "INSERT INTO fk_subjects (tenant_id, subject_id, state, wrap_version, swk_id, wrapped, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) ON CONFLICT (tenant_id, subject_id) DO NOTHING",
        )
        .bind(&new.tenant_id)
        .bind(&new.subject_id)
        .bind(state)
        .bind(i64::from(new.wrap_version))
        .bind(swk_id)
        .bind(wrapped)
        .bind(fp)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        tx.commit().await.map_err(classify)?;
        let record = self
            .get_subject(&new.tenant_id, &new.subject_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("subject vanished after insert".into()))?;
        Ok(if n == 1 {
            Created::Created(record)
        } else {
            Created::Existing(record)
        })
    }

    async fn get_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<Option<SubjectRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                subject_columns!(),
                " FROM fk_subjects WHERE tenant_id = $1 AND subject_id = $2"
            ))
            .bind(tenant_id)
            .bind(subject_id),
            subject_from_row,
        )
        .await
    }

    async fn update_subject_state(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected: KeyState,
        new: KeyState,
    ) -> Result<bool, StoreError> {
        if new == KeyState::Destroyed || expected == KeyState::Destroyed {
            return Err(StoreError::Misconfigured(
                "destroyed subject keys cannot change state; use destroy_subject to destroy".into(),
            ));
        }
        self.changed_one(
            sqlx::query(
                "UPDATE fk_subjects SET state = $4, updated_at = $5 \
             WHERE tenant_id = $1 AND subject_id = $2 AND state = $3",
            )
            .bind(tenant_id)
            .bind(subject_id)
            .bind(expected.as_str())
            .bind(new.as_str())
            .bind(now_ms()),
        )
        .await
    }

    async fn destroy_subject(&self, tenant_id: &str, subject_id: &str) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_subjects SET state = 'destroyed', wrapped = NULL, swk_id = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND subject_id = $2 AND state <> 'destroyed'",
            )
            .bind(tenant_id)
            .bind(subject_id)
            .bind(now_ms()),
        )
        .await
    }

    async fn subjects_wrapped_under(
        &self,
        tenant_id: &str,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                subject_columns!(),
                " FROM fk_subjects WHERE tenant_id = $1 AND wrap_version = $2 \
             AND swk_id IS NULL AND state <> 'destroyed' ORDER BY subject_id LIMIT $3"
            ))
            .bind(tenant_id)
            .bind(i64::from(version))
            .bind(i64::from(limit)),
            subject_from_row,
        )
        .await
    }

    async fn subjects_in_state(
        &self,
        tenant_id: &str,
        state: KeyState,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                subject_columns!(),
                " FROM fk_subjects WHERE tenant_id = $1 AND state = $2 AND subject_id > $3 \
             ORDER BY subject_id LIMIT $4"
            ))
            .bind(tenant_id)
            .bind(state.as_str())
            .bind(after)
            .bind(i64::from(limit)),
            subject_from_row,
        )
        .await
    }

    async fn rewrap_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected_version: u32,
        new_version: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_subjects SET wrap_version = $4, wrapped = $5 \
             WHERE tenant_id = $1 AND subject_id = $2 AND wrap_version = $3 AND swk_id IS NULL \
             AND state <> 'destroyed'",
            )
            .bind(tenant_id)
            .bind(subject_id)
            .bind(i64::from(expected_version))
            .bind(i64::from(new_version))
            .bind(wrapped.to_vec()),
        )
        .await
    }
}
