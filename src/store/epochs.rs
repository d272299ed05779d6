//! Key epochs in the store: the [`EpochStore`] trait and its SQL.
//!
//! The epochs and their states, the roll's lease and progress, the signed seals, and
//! what in the live store still needs an epoch's key. SWKs and the moves of live
//! material are `moves.rs`. The roller decides (`crate::epochs`); this applies.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::StoreError;
use super::audit::append_in;
use super::erasures::CompleteFn;
use super::sql::{Query, SqlStore, classify, i64_of, opt_u64_col};
use crate::model::{EpochRecord, EpochUsage, RollLease, RollProgress, now_ms};

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
