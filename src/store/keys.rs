//! Tenant keys in the store: the [`TenantKeyStore`] trait and its SQL.
//!
//! A tenant row and its key versions (wrapped material, state, fingerprint). The
//! keyring decides transitions; this applies them with compare-and-set.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::sql::{
    SqlStore, classify, epoch_active, fingerprint_col, lock_live_tenant, opt_u64_col, state_col,
    u32_col,
};
use crate::model::{
    Created, KeyState, KeyVersionRecord, NewKeyVersion, TenantRecord, WrappedKey, now_ms,
};

/// Tenants and their key versions: creation, states, KEK rewrap, retirement.
#[async_trait]
pub trait TenantKeyStore: Send + Sync + 'static {
    /// Creates `tenant_id` with its first key version unless it exists.
    async fn create_tenant(
        &self,
        tenant_id: &str,
        kms_key_id: &str,
        first: NewKeyVersion,
    ) -> Result<Created<TenantRecord>, StoreError>;

    /// A tenant with all its versions, or `None`.
    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<TenantRecord>, StoreError>;

    /// All tenant ids, ascending.
    async fn list_tenants(&self) -> Result<Vec<String>, StoreError>;

    /// Adds `new` as the active version; the previously active version becomes
    /// decrypt-only in the same transaction. Returns `false` (and changes nothing) if
    /// that version number already exists (a concurrent rotation won).
    async fn add_key_version(
        &self,
        tenant_id: &str,
        new: NewKeyVersion,
    ) -> Result<bool, StoreError>;

    /// Compare-and-set of a version's state: changes it to `new` (recording
    /// `resume_state`) only if it is currently `expected`. Returns whether it changed.
    /// Destruction goes through [`TenantKeyStore::destroy_key_version`] instead.
    async fn update_key_state(
        &self,
        tenant_id: &str,
        version: u32,
        expected: KeyState,
        new: KeyState,
        resume_state: Option<KeyState>,
    ) -> Result<bool, StoreError>;

    /// Suspends (`true`: every active or decrypt-only version becomes suspended,
    /// remembering its state) or resumes (`false`: every suspended version goes back)
    /// a whole tenant, in one transaction holding the tenant row's lock, so that a
    /// rotation (which takes the same lock and refuses a suspended tenant) can never
    /// interleave and leave an active version behind a suspension. Returns the number
    /// of versions changed.
    async fn set_tenant_suspended(
        &self,
        tenant_id: &str,
        suspended: bool,
    ) -> Result<u64, StoreError>;

    /// Erases a version's wrapped material and marks it destroyed (tombstone kept).
    /// Idempotent: returns whether this call destroyed it.
    async fn destroy_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError>;

    /// Replaces a version's wrapped material with the same key wrapped under another KMS
    /// key (KEK rotation), only if it is still wrapped by `expected_kms_key_id` and not
    /// destroyed or retired. The fingerprint (the version's identity) is kept. Returns
    /// whether it changed.
    async fn rewrap_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// Sets the KMS key that wraps a tenant's future versions.
    async fn set_tenant_kms_key(&self, tenant_id: &str, kms_key_id: &str)
    -> Result<(), StoreError>;

    /// Retires a decrypt-only version: erases its material and marks it retired, only
    /// if it is decrypt-only and no live subject key is wrapped under it. Returns
    /// whether it changed.
    async fn retire_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError>;
}

fn version_from_row(row: &AnyRow) -> Result<KeyVersionRecord, StoreError> {
    Ok(KeyVersionRecord {
        version: u32_col(row, "version")?,
        state: state_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("null state".into()))?,
        resume_state: state_col(row, "resume_state")?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        epoch: opt_u64_col(row, "epoch")?,
        wrapped: row
            .try_get::<Option<Vec<u8>>, _>("wrapped")
            .map_err(classify)?
            .map(WrappedKey::new),
        fingerprint: fingerprint_col(row)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

const INSERT_VERSION: &str = "INSERT INTO fk_tenant_keys \
    (tenant_id, version, state, resume_state, kms_key_id, wrapped, fingerprint, created_at, updated_at, epoch) \
    VALUES ($1, $2, 'active', NULL, $3, $4, $5, $6, $6, $7) \
    ON CONFLICT (tenant_id, version) DO NOTHING";

/// Inserts `new` as the active version unless that version number exists; returns the
/// number of rows inserted (0 or 1). [`StoreError::EpochRolled`] if `new` is wrapped
/// under an epoch that is no longer the active one.
async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: &'static str,
    tenant_id: &str,
    new: &NewKeyVersion,
    now: i64,
) -> Result<u64, StoreError> {
    match new.epoch {
        Some(e) if !epoch_active(tx, e, backend).await? => return Err(StoreError::EpochRolled),
        Some(_) => {}
        // Not under an epoch key: refused if it is the legacy key and epochs started
        // (a replica whose view predates the first roll), so that nothing new appears
        // under a key a roll may retire after counting what needs it.
        None if super::sql::legacy_key_retiring(tx, &new.kms_key_id, backend).await? => {
            return Err(StoreError::EpochRolled);
        }
        None => {}
    }
    Ok(sqlx::query(INSERT_VERSION)
        .bind(tenant_id)
        .bind(i64::from(new.version))
        .bind(&new.kms_key_id)
        .bind(new.wrapped.as_bytes().to_vec())
        .bind(new.wrapped.fingerprint().as_bytes().to_vec())
        .bind(now)
        .bind(
            new.epoch
                .map(i64::try_from)
                .transpose()
                .map_err(|_| StoreError::Corrupt("epoch out of range".into()))?,
        )
        .execute(&mut **tx)
        .await
        .map_err(classify)?
        .rows_affected())
}

#[async_trait]
impl TenantKeyStore for SqlStore {
    async fn create_tenant(
        &self,
        tenant_id: &str,
        kms_key_id: &str,
        first: NewKeyVersion,
    ) -> Result<Created<TenantRecord>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let inserted = sqlx::query(
            "INSERT INTO fk_tenants (tenant_id, kms_key_id, created_at, own_kms_key) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(kms_key_id)
        .bind(now)
        // Wrapped under an epoch key: rides epochs. Otherwise the first roll decides
        // (the tenant's own key, or the legacy default key).
        .bind(first.epoch.map(|_| 0i64))
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if inserted == 1 {
            insert_version(&mut tx, self.backend, tenant_id, &first, now).await?;
            tx.commit().await.map_err(classify)?;
        } else {
            tx.rollback().await.map_err(classify)?;
        }
        let record = self
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("tenant vanished after insert".into()))?;
        Ok(if inserted == 1 {
            Created::Created(record)
        } else {
            Created::Existing(record)
        })
    }

    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<TenantRecord>, StoreError> {
        let Some(t) = sqlx::query(
            "SELECT tenant_id, kms_key_id, created_at, own_kms_key FROM fk_tenants WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT version, state, resume_state, kms_key_id, epoch, wrapped, fingerprint, created_at, updated_at \
             FROM fk_tenant_keys WHERE tenant_id = $1 ORDER BY version",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let versions = rows
            .iter()
            .map(version_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(TenantRecord {
            tenant_id: t.try_get("tenant_id").map_err(classify)?,
            kms_key_id: t.try_get("kms_key_id").map_err(classify)?,
            own_kms_key: t
                .try_get::<Option<i64>, _>("own_kms_key")
                .map_err(classify)?
                .map(|v| v != 0),
            created_at: t.try_get("created_at").map_err(classify)?,
            versions,
        }))
    }

    async fn list_tenants(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT tenant_id FROM fk_tenants ORDER BY tenant_id")
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter()
            .map(|r| r.try_get("tenant_id").map_err(classify))
            .collect()
    }

    async fn add_key_version(
        &self,
        tenant_id: &str,
        new: NewKeyVersion,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // Lock the tenant row (serializing with a tenant shred) and refuse an erased tenant.
        if !lock_live_tenant(&mut tx, tenant_id, None).await? {
            tx.rollback().await.map_err(classify)?;
            return Ok(false);
        }
        // A suspended tenant gets no new version (a rotation racing a suspension is
        // serialized with it by the tenant row lock taken above).
        let suspended = sqlx::query(
            "SELECT 1 FROM fk_tenant_keys WHERE tenant_id = $1 AND state = 'suspended'",
        )
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?
        .is_some();
        if suspended {
            tx.rollback().await.map_err(classify)?;
            return Ok(false);
        }
        // Demote first: the partial unique index allows one active version per tenant.
        sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'decrypt-only', updated_at = $3 \
             WHERE tenant_id = $1 AND state = 'active' AND version < $2",
        )
        .bind(tenant_id)
        .bind(i64::from(new.version))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "UPDATE fk_tenant_keys SET resume_state = 'decrypt-only' \
             WHERE tenant_id = $1 AND resume_state = 'active' AND version < $2",
        )
        .bind(tenant_id)
        .bind(i64::from(new.version))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let inserted = insert_version(&mut tx, self.backend, tenant_id, &new, now).await?;
        if inserted == 1 {
            tx.commit().await.map_err(classify)?;
            Ok(true)
        } else {
            tx.rollback().await.map_err(classify)?;
            Ok(false)
        }
    }

    async fn update_key_state(
        &self,
        tenant_id: &str,
        version: u32,
        expected: KeyState,
        new: KeyState,
        resume_state: Option<KeyState>,
    ) -> Result<bool, StoreError> {
        let terminal = |s: KeyState| matches!(s, KeyState::Destroyed | KeyState::Retired);
        if terminal(new) || terminal(expected) {
            return Err(StoreError::Misconfigured(
                "destroyed and retired keys cannot change state; use destroy_key_version or \
                 retire_key_version"
                    .into(),
            ));
        }
        self.changed_one(
            sqlx::query(
                "UPDATE fk_tenant_keys SET state = $4, resume_state = $5, updated_at = $6 \
             WHERE tenant_id = $1 AND version = $2 AND state = $3",
            )
            .bind(tenant_id)
            .bind(i64::from(version))
            .bind(expected.as_str())
            .bind(new.as_str())
            .bind(resume_state.map(KeyState::as_str))
            .bind(now_ms()),
        )
        .await
    }

    async fn set_tenant_suspended(
        &self,
        tenant_id: &str,
        suspended: bool,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        if !lock_live_tenant(&mut tx, tenant_id, None).await? {
            tx.rollback().await.map_err(classify)?;
            return Ok(0);
        }
        let sql = if suspended {
            "UPDATE fk_tenant_keys SET resume_state = state, state = 'suspended', updated_at = $2 \
             WHERE tenant_id = $1 AND state IN ('active', 'decrypt-only')"
        } else {
            "UPDATE fk_tenant_keys SET state = COALESCE(resume_state, 'decrypt-only'), \
             resume_state = NULL, updated_at = $2 WHERE tenant_id = $1 AND state = 'suspended'"
        };
        let n = sqlx::query(sql)
            .bind(tenant_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        tx.commit().await.map_err(classify)?;
        Ok(n)
    }

    async fn destroy_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError> {
        self.changed_one(sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'destroyed', resume_state = NULL, wrapped = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND version = $2 AND state NOT IN ('destroyed', 'retired')",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(now_ms()))
        .await
    }

    async fn rewrap_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_tenant_keys SET kms_key_id = $4, wrapped = $5, epoch = NULL \
             WHERE tenant_id = $1 AND version = $2 AND kms_key_id = $3 \
             AND state NOT IN ('destroyed', 'retired')",
            )
            .bind(tenant_id)
            .bind(i64::from(version))
            .bind(expected_kms_key_id)
            .bind(new_kms_key_id)
            .bind(wrapped.as_bytes().to_vec()),
        )
        .await
    }

    async fn set_tenant_kms_key(
        &self,
        tenant_id: &str,
        kms_key_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE fk_tenants SET kms_key_id = $2 WHERE tenant_id = $1")
            .bind(tenant_id)
            .bind(kms_key_id)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn retire_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError> {
        self.changed_one(sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'retired', resume_state = NULL, wrapped = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND version = $2 AND state = 'decrypt-only' \
             AND NOT EXISTS (SELECT 1 FROM fk_subjects s WHERE s.tenant_id = $1 \
                             AND s.wrap_version = $2 AND s.state <> 'destroyed')",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(now_ms()))
        .await
    }
}
