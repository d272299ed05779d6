//! Subject-wrapping keys and the moves of live key material to a key epoch: the
//! [`EpochMoveStore`] trait and its SQL.
//!
//! SWKs (one per tenant and epoch; created by the keyring for new subjects, by the roll
//! for the rest), the classification of tenants (riding epochs or their own KMS key),
//! and the compare-and-set writes with which a roll carries tenant versions, subject
//! keys and signing keys to the epoch's key: each row moves only if it still holds the
//! wrapping it was read with, so material destroyed meanwhile is never carried. The
//! epochs themselves, the lease and the seals are `epochs.rs`.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::sql::{SqlStore, classify, fingerprint_col, i64_of, opt_u64_col, u32_col};
use crate::crypto::Fingerprint;
use crate::model::{
    Created, KeyVersionRecord, NewSwk, RolledSubject, SubjectRecord, SwkRecord, WrappedKey, now_ms,
    swk_id,
};

/// A tenant key version the roll must carry to the target epoch.
#[derive(Debug, Clone)]
pub struct VersionToRoll {
    /// Tenant.
    pub tenant_id: String,
    /// The version as stored.
    pub version: KeyVersionRecord,
}

/// SWKs and the moves of live material to an epoch.
#[async_trait]
pub trait EpochMoveStore: Send + Sync + 'static {
    /// Tenants not yet classified as riding epochs or bringing their own key.
    async fn unclassified_tenants(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Sets whether a tenant brings its own KMS key.
    async fn set_own_kms_key(&self, tenant_id: &str, own: bool) -> Result<(), StoreError>;

    /// Up to `limit` live tenant key versions of tenants riding epochs that are not
    /// under epoch `target`, tenants after `after` (by tenant id, version).
    async fn versions_to_roll(
        &self,
        target: u64,
        limit: u32,
    ) -> Result<Vec<VersionToRoll>, StoreError>;

    /// Moves one version to the epoch key (compare-and-set on the KMS key it was read
    /// with; not if destroyed or retired meanwhile). Whether it changed.
    async fn roll_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        epoch: u64,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError>;

    /// A subject-wrapping key by id.
    async fn swk(&self, swk_id: &str) -> Result<Option<SwkRecord>, StoreError>;

    /// Stores an SWK unless (tenant, epoch) has one; the stored one either way.
    /// [`StoreError::EpochRolled`] if its epoch is no longer active.
    async fn create_swk(&self, new: NewSwk) -> Result<Created<SwkRecord>, StoreError>;

    /// Tenants that have live subject keys not under `target_swk` of their tenant
    /// (`<target>:<tenant>`), or SWKs of epochs below `target`.
    async fn tenants_to_roll(&self, target: u64) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` live subjects of `tenant` not wrapped under `target_swk`, with ids
    /// after `after`, by id.
    async fn subjects_to_roll(
        &self,
        tenant_id: &str,
        target_swk: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError>;

    /// Moves subject keys to `new_swk` in one transaction, each a compare-and-set on
    /// the wrapping it was read with (a subject destroyed meanwhile is not carried).
    /// The number moved.
    async fn roll_subjects(
        &self,
        tenant_id: &str,
        new_swk: &str,
        moved: &[RolledSubject],
    ) -> Result<u64, StoreError>;

    /// Deletes a tenant's SWKs of epochs below `target` that no live subject uses.
    /// The number deleted.
    async fn delete_old_swks(&self, tenant_id: &str, target: u64) -> Result<u64, StoreError>;

    /// Moves a signing key's seed to the epoch key (compare-and-set on the KMS key).
    async fn roll_signing_key(
        &self,
        key_id: &str,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        epoch: u64,
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;
}

fn swk_from_row(row: &AnyRow) -> Result<SwkRecord, StoreError> {
    Ok(SwkRecord {
        swk_id: row.try_get("swk_id").map_err(classify)?,
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        epoch: opt_u64_col(row, "epoch")?
            .ok_or_else(|| StoreError::Corrupt("null SWK epoch".into()))?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        wrapped: row.try_get("wrapped").map_err(classify)?,
        fingerprint: fingerprint_col(row)?,
        created_at: row.try_get("created_at").map_err(classify)?,
    })
}

fn version_to_roll(row: &AnyRow) -> Result<VersionToRoll, StoreError> {
    Ok(VersionToRoll {
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        version: KeyVersionRecord {
            version: u32_col(row, "version")?,
            state: super::sql::state_col(row, "state")?
                .ok_or_else(|| StoreError::Corrupt("null state".into()))?,
            resume_state: super::sql::state_col(row, "resume_state")?,
            kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
            epoch: opt_u64_col(row, "epoch")?,
            wrapped: row
                .try_get::<Option<Vec<u8>>, _>("wrapped")
                .map_err(classify)?
                .map(WrappedKey::new),
            fingerprint: fingerprint_col(row)?,
            created_at: row.try_get("created_at").map_err(classify)?,
            updated_at: row.try_get("updated_at").map_err(classify)?,
        },
    })
}

impl SqlStore {
    /// PostgreSQL: one statement per page (the same compare-and-set per row, through
    /// a VALUES list): a round trip per page instead of one per subject key.
    async fn roll_subjects_pg(
        &self,
        tenant_id: &str,
        new_swk: &str,
        moved: &[RolledSubject],
    ) -> Result<u64, StoreError> {
        let mut sql = String::from(
            "UPDATE fk_subjects AS s SET swk_id = $2, wrap_version = 0, wrapped = v.w FROM (VALUES ",
        );
        for i in 0..moved.len() {
            let b = 3 + i * 4;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${b}, ${}, ${}, ${})", b + 1, b + 2, b + 3));
        }
        sql.push_str(
            ") AS v(sid, exp_swk, exp_wv, w) WHERE s.tenant_id = $1 AND s.subject_id = v.sid \
             AND s.state <> 'destroyed' AND s.swk_id IS NOT DISTINCT FROM v.exp_swk \
             AND (v.exp_swk IS NOT NULL OR s.wrap_version = v.exp_wv)",
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(new_swk);
        for m in moved {
            q = q
                .bind(m.subject_id.clone())
                .bind(m.expected_swk.clone())
                .bind(i64::from(m.expected_wrap_version))
                .bind(m.wrapped.clone());
        }
        Ok(q.execute(&self.pool)
            .await
            .map_err(classify)?
            .rows_affected())
    }
}

#[async_trait]
impl EpochMoveStore for SqlStore {
    async fn unclassified_tenants(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, kms_key_id FROM fk_tenants WHERE own_kms_key IS NULL ORDER BY tenant_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("tenant_id").map_err(classify)?,
                    r.try_get("kms_key_id").map_err(classify)?,
                ))
            })
            .collect()
    }

    async fn set_own_kms_key(&self, tenant_id: &str, own: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE fk_tenants SET own_kms_key = $2 WHERE tenant_id = $1")
            .bind(tenant_id)
            .bind(i64::from(own))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn versions_to_roll(
        &self,
        target: u64,
        limit: u32,
    ) -> Result<Vec<VersionToRoll>, StoreError> {
        self.fetch_all_as(
            sqlx::query(
                "SELECT k.tenant_id, k.version, k.state, k.resume_state, k.kms_key_id, k.epoch, \
                 k.wrapped, k.fingerprint, k.created_at, k.updated_at \
                 FROM fk_tenant_keys k JOIN fk_tenants t ON t.tenant_id = k.tenant_id \
                 WHERE t.own_kms_key = 0 AND k.wrapped IS NOT NULL \
                 AND (k.epoch IS NULL OR k.epoch <> $1) \
                 ORDER BY k.tenant_id, k.version LIMIT $2",
            )
            .bind(i64_of(target)?)
            .bind(i64::from(limit)),
            version_to_roll,
        )
        .await
    }

    async fn roll_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        epoch: u64,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_tenant_keys SET kms_key_id = $4, wrapped = $5, epoch = $6 \
                 WHERE tenant_id = $1 AND version = $2 AND kms_key_id = $3 \
                 AND wrapped IS NOT NULL",
            )
            .bind(tenant_id)
            .bind(i64::from(version))
            .bind(expected_kms_key_id)
            .bind(new_kms_key_id)
            .bind(wrapped.as_bytes().to_vec())
            .bind(i64_of(epoch)?),
        )
        .await
    }

    async fn swk(&self, swk_id: &str) -> Result<Option<SwkRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(
                "SELECT swk_id, tenant_id, epoch, kms_key_id, wrapped, fingerprint, created_at \
                 FROM fk_subject_wrapping_keys WHERE swk_id = $1",
            )
            .bind(swk_id),
            swk_from_row,
        )
        .await
    }

    async fn create_swk(&self, new: NewSwk) -> Result<Created<SwkRecord>, StoreError> {
        let id = swk_id(&new.tenant_id, new.epoch);
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // SQLite: start with a write (see `lock_live_tenant`).
        let live =
            super::sql::lock_live_tenant(&mut tx, &new.tenant_id, Some(self.backend)).await?;
        if !live {
            tx.rollback().await.map_err(classify)?;
            return Err(StoreError::EpochRolled);
        }
        if !super::sql::epoch_active(&mut tx, new.epoch, self.backend).await? {
            tx.rollback().await.map_err(classify)?;
            return Err(StoreError::EpochRolled);
        }
        let n = sqlx::query(
            "INSERT INTO fk_subject_wrapping_keys \
             (swk_id, tenant_id, epoch, kms_key_id, wrapped, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (swk_id) DO NOTHING",
        )
        .bind(&id)
        .bind(&new.tenant_id)
        .bind(i64_of(new.epoch)?)
        .bind(&new.kms_key_id)
        .bind(new.wrapped.clone())
        .bind(Fingerprint::of_wrapped(&new.wrapped).as_bytes().to_vec())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        tx.commit().await.map_err(classify)?;
        let stored = self
            .swk(&id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("SWK vanished after insert".into()))?;
        Ok(if n == 1 {
            Created::Created(stored)
        } else {
            Created::Existing(stored)
        })
    }

    async fn tenants_to_roll(&self, target: u64) -> Result<Vec<String>, StoreError> {
        let t = i64_of(target)?;
        let prefix = format!("{target}:");
        let rows = sqlx::query(
            "SELECT DISTINCT tenant_id FROM fk_subjects WHERE state <> 'destroyed' \
             AND (swk_id IS NULL OR substr(swk_id, 1, length($2)) <> $2) \
             UNION SELECT DISTINCT tenant_id FROM fk_subject_wrapping_keys WHERE epoch < $1 \
             ORDER BY 1",
        )
        .bind(t)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(classify))
            .collect()
    }

    async fn subjects_to_roll(
        &self,
        tenant_id: &str,
        target_swk: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(
                "SELECT tenant_id, subject_id, state, wrap_version, swk_id, wrapped, fingerprint, \
                 created_at, updated_at FROM fk_subjects \
                 WHERE tenant_id = $1 AND subject_id > $3 AND state <> 'destroyed' \
                 AND (swk_id IS NULL OR swk_id <> $2) ORDER BY subject_id LIMIT $4",
            )
            .bind(tenant_id)
            .bind(target_swk)
            .bind(after)
            .bind(i64::from(limit)),
            super::subjects::subject_from_row,
        )
        .await
    }

    async fn roll_subjects(
        &self,
        tenant_id: &str,
        new_swk: &str,
        moved: &[RolledSubject],
    ) -> Result<u64, StoreError> {
        if self.backend == "postgres" && !moved.is_empty() {
            return self.roll_subjects_pg(tenant_id, new_swk, moved).await;
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut n = 0;
        for m in moved {
            // `swk_id IS NOT DISTINCT FROM` would be one statement on PostgreSQL only;
            // the two shapes keep the SQL common to both backends.
            let q = match &m.expected_swk {
                Some(old) => sqlx::query(
                    "UPDATE fk_subjects SET swk_id = $3, wrap_version = 0, wrapped = $4 \
                     WHERE tenant_id = $1 AND subject_id = $2 AND swk_id = $5 \
                     AND state <> 'destroyed'",
                )
                .bind(tenant_id)
                .bind(&m.subject_id)
                .bind(new_swk)
                .bind(m.wrapped.clone())
                .bind(old.clone()),
                None => sqlx::query(
                    "UPDATE fk_subjects SET swk_id = $3, wrap_version = 0, wrapped = $4 \
                     WHERE tenant_id = $1 AND subject_id = $2 AND swk_id IS NULL \
                     AND wrap_version = $5 AND state <> 'destroyed'",
                )
                .bind(tenant_id)
                .bind(&m.subject_id)
                .bind(new_swk)
                .bind(m.wrapped.clone())
                .bind(i64::from(m.expected_wrap_version)),
            };
            n += q.execute(&mut *tx).await.map_err(classify)?.rows_affected();
        }
        tx.commit().await.map_err(classify)?;
        Ok(n)
    }

    async fn delete_old_swks(&self, tenant_id: &str, target: u64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM fk_subject_wrapping_keys WHERE tenant_id = $1 AND epoch < $2 \
             AND NOT EXISTS (SELECT 1 FROM fk_subjects s \
                             WHERE s.swk_id = fk_subject_wrapping_keys.swk_id)",
        )
        .bind(tenant_id)
        .bind(i64_of(target)?)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected())
    }

    async fn roll_signing_key(
        &self,
        key_id: &str,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        epoch: u64,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        self.changed_one(
            sqlx::query(
                "UPDATE fk_signing_keys SET kms_key_id = $3, wrapped = $4, epoch = $5 \
                 WHERE key_id = $1 AND kms_key_id = $2",
            )
            .bind(key_id)
            .bind(expected_kms_key_id)
            .bind(new_kms_key_id)
            .bind(wrapped.to_vec())
            .bind(i64_of(epoch)?),
        )
        .await
    }
}
