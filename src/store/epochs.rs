//! Key epochs in the store: the [`EpochStore`] trait and its SQL.
//!
//! The epochs and their states, subject-wrapping keys (SWKs), the roll's lease, and the
//! compare-and-set writes with which a roll moves live material to the next epoch.
//! The roller decides (`crate::epochs`); this applies.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::audit::append_in;
use super::erasures::CompleteFn;
use super::sql::{Query, SqlStore, classify, fingerprint_col, i64_of, opt_u64_col, u32_col};
use crate::crypto::Fingerprint;
use crate::model::{
    Created, EpochRecord, EpochUsage, KeyVersionRecord, NewSwk, RollLease, RollProgress,
    RolledSubject, SubjectRecord, SwkRecord, WrappedKey, now_ms, swk_id,
};

/// A tenant key version the roll must carry to the target epoch.
#[derive(Debug, Clone)]
pub struct VersionToRoll {
    /// Tenant.
    pub tenant_id: String,
    /// The version as stored.
    pub version: KeyVersionRecord,
}

/// Key epochs: their records, SWKs, the roll's lease and moves.
#[async_trait]
pub trait EpochStore: Send + Sync + 'static {
    /// Every epoch, ascending.
    async fn epochs(&self) -> Result<Vec<EpochRecord>, StoreError>;

    /// The active epoch, if epochs have started.
    async fn active_epoch(&self) -> Result<Option<EpochRecord>, StoreError>;

    /// Registers `epoch` as `creating` unless it exists; the stored record.
    async fn begin_epoch(&self, epoch: u64) -> Result<EpochRecord, StoreError>;

    /// Registers the legacy wrapping key as epoch 0 (`retiring`) unless present: a
    /// store from before epochs holds material under it.
    async fn register_legacy_epoch(&self, kms_key_id: &str) -> Result<(), StoreError>;

    /// Records the KMS key just made (or taken from the pool) for a `creating` epoch,
    /// unless one is recorded already; the recorded one either way. A roll resumed
    /// after a crash uses it instead of making another.
    async fn record_epoch_key(&self, epoch: u64, kms_key_id: &str) -> Result<String, StoreError>;

    /// Gives a `creating` epoch its KMS key and makes it the active one; the epoch
    /// active before becomes `retiring`. Atomic; `false` if `epoch` is not creating.
    async fn activate_epoch(&self, epoch: u64, kms_key_id: &str) -> Result<bool, StoreError>;

    /// Marks a `retiring` epoch `sealed` (deletion scheduled, or the legacy key kept),
    /// and, with `statement`, stores the signed statement `statement` builds, chained
    /// into the audit log in the same transaction. `false` if it was not retiring.
    async fn seal_epoch(
        &self,
        epoch: u64,
        kms_status: &str,
        deletion_date: Option<i64>,
        statement: Option<&CompleteFn<'_>>,
    ) -> Result<bool, StoreError>;

    /// Makes a kept legacy key (epoch 0, `kept-legacy`) `retiring` again, so that the
    /// next roll schedules its deletion (`epochs.retire_legacy_key` turned on later).
    async fn reopen_kept_legacy(&self) -> Result<(), StoreError>;

    /// The signed "backups sealed" statement of an epoch, if any.
    async fn epoch_seal(&self, epoch: u64) -> Result<Option<String>, StoreError>;

    /// Takes (or renews) the roll's lease for `owner` until `until` (Unix ms), rolling
    /// to `target`; `false` if another owner holds an unexpired lease.
    async fn take_roll_lease(
        &self,
        owner: &str,
        until: i64,
        target: u64,
    ) -> Result<bool, StoreError>;

    /// Records the roll's progress (only by the lease holder).
    async fn note_roll_progress(
        &self,
        owner: &str,
        progress: &RollProgress,
    ) -> Result<(), StoreError>;

    /// Releases the lease (keeping the last progress).
    async fn release_roll_lease(&self, owner: &str) -> Result<(), StoreError>;

    /// The lease row.
    async fn roll_lease(&self) -> Result<RollLease, StoreError>;

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

    /// What in the live store still needs epoch `epoch`, whose KMS key is `kms_key_id`.
    async fn epoch_usage(&self, epoch: u64, kms_key_id: &str) -> Result<EpochUsage, StoreError>;

    /// Ids of completed erasures whose keys were destroyed while `epoch` was active
    /// (epoch 0: also those from before epochs, which recorded none).
    async fn erasures_destroyed_in(&self, epoch: u64) -> Result<Vec<String>, StoreError>;
}

fn epoch_from_row(row: &AnyRow) -> Result<EpochRecord, StoreError> {
    let epoch: i64 = row.try_get("epoch").map_err(classify)?;
    let state: String = row.try_get("state").map_err(classify)?;
    Ok(EpochRecord {
        epoch: u64::try_from(epoch)
            .map_err(|_| StoreError::Corrupt(format!("epoch out of range: {epoch}")))?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        state: state.parse()?,
        created_at: row.try_get("created_at").map_err(classify)?,
        rolled_at: row.try_get("rolled_at").map_err(classify)?,
        sealed_at: row.try_get("sealed_at").map_err(classify)?,
        deletion_date: row.try_get("deletion_date").map_err(classify)?,
        kms_status: row.try_get("kms_status").map_err(classify)?,
    })
}

macro_rules! epoch_columns {
    () => {
        "epoch, kms_key_id, state, created_at, rolled_at, sealed_at, deletion_date, kms_status"
    };
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

fn lease_from_row(row: &AnyRow) -> Result<RollLease, StoreError> {
    let progress: String = row.try_get("progress").map_err(classify)?;
    Ok(RollLease {
        owner: row.try_get("owner").map_err(classify)?,
        lease_until: row.try_get("lease_until").map_err(classify)?,
        target: opt_u64_col(row, "target")?,
        progress: serde_json::from_str(&progress)
            .map_err(|e| StoreError::Corrupt(format!("roll progress: {e}")))?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

async fn count(q: Query<'_>, pool: &sqlx::AnyPool) -> Result<u64, StoreError> {
    let row = q.fetch_one(pool).await.map_err(classify)?;
    let n: i64 = row.try_get(0).map_err(classify)?;
    Ok(u64::try_from(n).unwrap_or(0))
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
impl EpochStore for SqlStore {
    async fn epochs(&self) -> Result<Vec<EpochRecord>, StoreError> {
        self.fetch_all_as(
            sqlx::query(concat!(
                "SELECT ",
                epoch_columns!(),
                " FROM fk_epochs ORDER BY epoch"
            )),
            epoch_from_row,
        )
        .await
    }

    async fn active_epoch(&self) -> Result<Option<EpochRecord>, StoreError> {
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                epoch_columns!(),
                " FROM fk_epochs WHERE state = 'active'"
            )),
            epoch_from_row,
        )
        .await
    }

    async fn begin_epoch(&self, epoch: u64) -> Result<EpochRecord, StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO fk_epochs (epoch, kms_key_id, state, created_at, updated_at) \
             VALUES ($1, NULL, 'creating', $2, $2) ON CONFLICT (epoch) DO NOTHING",
        )
        .bind(i64_of(epoch)?)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        self.fetch_one_as(
            sqlx::query(concat!(
                "SELECT ",
                epoch_columns!(),
                " FROM fk_epochs WHERE epoch = $1"
            ))
            .bind(i64_of(epoch)?),
            epoch_from_row,
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("epoch vanished after insert".into()))
    }

    async fn register_legacy_epoch(&self, kms_key_id: &str) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO fk_epochs (epoch, kms_key_id, state, created_at, rolled_at, updated_at) \
             VALUES (0, $1, 'retiring', $2, $2, $2) ON CONFLICT (epoch) DO NOTHING",
        )
        .bind(kms_key_id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn record_epoch_key(&self, epoch: u64, kms_key_id: &str) -> Result<String, StoreError> {
        sqlx::query(
            "UPDATE fk_epochs SET kms_key_id = $2, updated_at = $3 \
             WHERE epoch = $1 AND state = 'creating' AND kms_key_id IS NULL",
        )
        .bind(i64_of(epoch)?)
        .bind(kms_key_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        let key: Option<String> =
            sqlx::query_scalar("SELECT kms_key_id FROM fk_epochs WHERE epoch = $1")
                .bind(i64_of(epoch)?)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?
                .flatten();
        key.ok_or_else(|| StoreError::Corrupt(format!("epoch {epoch} has no KMS key recorded")))
    }

    async fn activate_epoch(&self, epoch: u64, kms_key_id: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // First the legacy row (writes under the legacy key share-lock it, see
        // `legacy_key_retiring`), then the old active row (its exclusive row lock waits
        // for writes that share-locked it, see `epoch_active`), then the new one.
        sqlx::query("UPDATE fk_epochs SET updated_at = updated_at WHERE epoch = 0")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        sqlx::query(
            "UPDATE fk_epochs SET state = 'retiring', rolled_at = $2, updated_at = $2 \
             WHERE state = 'active' AND epoch < $1",
        )
        .bind(i64_of(epoch)?)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let n = sqlx::query(
            "UPDATE fk_epochs SET state = 'active', kms_key_id = $2, updated_at = $3 \
             WHERE epoch = $1 AND state = 'creating'",
        )
        .bind(i64_of(epoch)?)
        .bind(kms_key_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 1 {
            tx.commit().await.map_err(classify)?;
            Ok(true)
        } else {
            tx.rollback().await.map_err(classify)?;
            Ok(false)
        }
    }

    async fn seal_epoch(
        &self,
        epoch: u64,
        kms_status: &str,
        deletion_date: Option<i64>,
        statement: Option<&CompleteFn<'_>>,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let n = sqlx::query(
            "UPDATE fk_epochs SET state = 'sealed', sealed_at = $2, deletion_date = $3, \
             kms_status = $4, updated_at = $2 WHERE epoch = $1 AND state = 'retiring'",
        )
        .bind(i64_of(epoch)?)
        .bind(now)
        .bind(deletion_date)
        .bind(kms_status)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if n != 1 {
            tx.rollback().await.map_err(classify)?;
            return Ok(false);
        }
        if let Some(make) = statement {
            let mut text = String::new();
            let record = append_in(&mut tx, |seq, prev| {
                let (t, event) = make(seq, prev).map_err(StoreError::aborted)?;
                text = t;
                Ok(event)
            })
            .await?;
            sqlx::query(
                "INSERT INTO fk_epoch_seals (epoch, statement, audit_seq, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(i64_of(epoch)?)
            .bind(text)
            .bind(i64_of(record.seq)?)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(true)
    }

    async fn reopen_kept_legacy(&self) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE fk_epochs SET state = 'retiring', sealed_at = NULL, kms_status = NULL, \
             updated_at = $1 WHERE epoch = 0 AND state = 'sealed' AND kms_status = 'kept-legacy'",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn epoch_seal(&self, epoch: u64) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT statement FROM fk_epoch_seals WHERE epoch = $1")
            .bind(i64_of(epoch)?)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)
    }

    async fn take_roll_lease(
        &self,
        owner: &str,
        until: i64,
        target: u64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        self.changed_one(
            sqlx::query(
                "UPDATE fk_epoch_roll SET owner = $1, lease_until = $2, \
                 progress = CASE WHEN target = $3 THEN progress ELSE '{}' END, \
                 target = $3, updated_at = $4 \
                 WHERE id = 1 AND (owner IS NULL OR owner = $1 OR lease_until < $4)",
            )
            .bind(owner)
            .bind(until)
            .bind(i64_of(target)?)
            .bind(now),
        )
        .await
    }

    async fn note_roll_progress(
        &self,
        owner: &str,
        progress: &RollProgress,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(progress)
            .map_err(|e| StoreError::Corrupt(format!("roll progress: {e}")))?;
        sqlx::query(
            "UPDATE fk_epoch_roll SET progress = $2, updated_at = $3 WHERE id = 1 AND owner = $1",
        )
        .bind(owner)
        .bind(json)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn release_roll_lease(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE fk_epoch_roll SET owner = NULL, lease_until = NULL, updated_at = $2 \
             WHERE id = 1 AND owner = $1",
        )
        .bind(owner)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn roll_lease(&self) -> Result<RollLease, StoreError> {
        self.fetch_one_as(
            sqlx::query(
                "SELECT owner, lease_until, target, progress, updated_at FROM fk_epoch_roll WHERE id = 1",
            ),
            lease_from_row,
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("the epoch roll row is missing".into()))
    }

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

    async fn epoch_usage(&self, epoch: u64, kms_key_id: &str) -> Result<EpochUsage, StoreError> {
        let e = i64_of(epoch)?;
        let p = &self.pool;
        // Versions and signing keys by KMS key (a tenant's own key that happens to be
        // the legacy key needs it too).
        let tenant_versions = count(
            sqlx::query(
                "SELECT COUNT(*) FROM fk_tenant_keys WHERE wrapped IS NOT NULL AND kms_key_id = $1",
            )
            .bind(kms_key_id),
            p,
        )
        .await?;
        let swks = count(
            sqlx::query("SELECT COUNT(*) FROM fk_subject_wrapping_keys WHERE epoch = $1").bind(e),
            p,
        )
        .await?;
        let subjects = if epoch == 0 {
            // Legacy subject keys are wrapped under tenant versions, which the legacy
            // key wraps.
            count(
                sqlx::query(
                    "SELECT COUNT(*) FROM fk_subjects WHERE swk_id IS NULL AND wrapped IS NOT NULL",
                ),
                p,
            )
            .await?
        } else {
            count(
                sqlx::query(
                    "SELECT COUNT(*) FROM fk_subjects s JOIN fk_subject_wrapping_keys w \
                     ON w.swk_id = s.swk_id WHERE w.epoch = $1 AND s.wrapped IS NOT NULL",
                )
                .bind(e),
                p,
            )
            .await?
        };
        let signing_keys = count(
            sqlx::query(
                "SELECT COUNT(*) FROM fk_signing_keys WHERE state = 'active' AND kms_key_id = $1",
            )
            .bind(kms_key_id),
            p,
        )
        .await?;
        Ok(EpochUsage {
            tenant_versions,
            swks,
            subjects,
            signing_keys,
        })
    }

    async fn erasures_destroyed_in(&self, epoch: u64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT erasure_id FROM fk_erasures WHERE state = 'completed' \
             AND (destroyed_epoch = $1 OR ($1 = 0 AND destroyed_epoch IS NULL)) ORDER BY erasure_id",
        )
        .bind(i64_of(epoch)?)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("erasure_id").map_err(classify))
            .collect()
    }
}
