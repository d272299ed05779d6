//! The SQL both backends share, run through sqlx's `Any` driver with `$N` placeholders
//! (understood by SQLite and PostgreSQL alike). Dialect differences live only in the
//! migrations and in connection set-up (`sqlite.rs`, `postgres.rs`).

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use super::{
    AuditFn, Change, CompleteFn, Created, ErasureRecord, JobControl, JobRecord, JobUpdate,
    KeyState, KeyStore, KeyVersionRecord, NewErasure, NewJob, NewKeyVersion, NewSubject,
    SigningKeyRecord, StoreError, SubjectRecord, TenantRecord, now_ms,
};
use crate::audit::{AuditEvent, AuditRecord};
use crate::crypto::Fingerprint;
use crate::kms::WrappedKey;

/// A key store over a SQL database (SQLite or PostgreSQL).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(super) pool: AnyPool,
    pub(super) backend: &'static str,
    /// PostgreSQL DSN for the `LISTEN` connection (`None` for SQLite).
    pub(super) listen_dsn: Option<std::sync::Arc<secrecy::SecretString>>,
}

/// Whether a sqlx error means "the database is not there, or busy: retry" rather than
/// "this statement failed". Shared by the key store and the re-encryption runner.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite: 5 BUSY, 6 LOCKED, 10 IOERR, 14 CANTOPEN (and their extended
                // codes). Only for SQLite: PostgreSQL's numeric SQLSTATEs can share the
                // low byte (42501, insufficient privilege, ends in 5).
                code.parse::<i64>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 14))
            } else {
                // PostgreSQL: class 08 connection exception, 53 insufficient resources,
                // 57P01-57P03 shutdown / cannot connect now.
                code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
            }
        }
        _ => false,
    }
}

/// Sorts sqlx errors into "the database is not there / busy" and "the query failed".
pub(super) fn classify(e: sqlx::Error) -> StoreError {
    if is_unavailable(&e) {
        StoreError::Unavailable(std::sync::Arc::new(e))
    } else {
        StoreError::Database(std::sync::Arc::new(e))
    }
}

fn u32_col(row: &AnyRow, col: &str) -> Result<u32, StoreError> {
    let v: i64 = row.try_get(col).map_err(classify)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} out of range: {v}")))
}

fn fingerprint_col(row: &AnyRow) -> Result<Fingerprint, StoreError> {
    let v: Vec<u8> = row.try_get("fingerprint").map_err(classify)?;
    let arr: [u8; 32] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("fingerprint is not 32 bytes".into()))?;
    Ok(Fingerprint::from_bytes(arr))
}

fn state_col(row: &AnyRow, col: &str) -> Result<Option<KeyState>, StoreError> {
    let v: Option<String> = row.try_get(col).map_err(classify)?;
    v.map(|s| s.parse()).transpose()
}

fn version_from_row(row: &AnyRow) -> Result<KeyVersionRecord, StoreError> {
    Ok(KeyVersionRecord {
        version: u32_col(row, "version")?,
        state: state_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("null state".into()))?,
        resume_state: state_col(row, "resume_state")?,
        kms_key_id: row.try_get("kms_key_id").map_err(classify)?,
        wrapped: row
            .try_get::<Option<Vec<u8>>, _>("wrapped")
            .map_err(classify)?
            .map(WrappedKey::new),
        fingerprint: fingerprint_col(row)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

fn subject_from_row(row: &AnyRow) -> Result<SubjectRecord, StoreError> {
    Ok(SubjectRecord {
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        subject_id: row.try_get("subject_id").map_err(classify)?,
        state: state_col(row, "state")?.ok_or_else(|| StoreError::Corrupt("null state".into()))?,
        wrap_version: u32_col(row, "wrap_version")?,
        wrapped: row.try_get("wrapped").map_err(classify)?,
        fingerprint: fingerprint_col(row)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
    })
}

/// The columns `subject_from_row` reads (a macro, so queries stay `&'static str`).
macro_rules! subject_columns {
    () => {
        "tenant_id, subject_id, state, wrap_version, wrapped, fingerprint, created_at, updated_at"
    };
}

macro_rules! job_columns {
    () => {
        "job_id, target, tenant_id, spec, state, control, owner, lease_until, \
         checkpoint, progress, error, created_at, started_at, updated_at, finished_at"
    };
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state").map_err(classify)?;
    let control: String = row.try_get("control").map_err(classify)?;
    Ok(JobRecord {
        job_id: row.try_get("job_id").map_err(classify)?,
        target: row.try_get("target").map_err(classify)?,
        tenant_id: row.try_get("tenant_id").map_err(classify)?,
        spec: row.try_get("spec").map_err(classify)?,
        state: state.parse()?,
        control: control.parse()?,
        owner: row.try_get("owner").map_err(classify)?,
        lease_until: row.try_get("lease_until").map_err(classify)?,
        checkpoint: row.try_get("checkpoint").map_err(classify)?,
        progress: row.try_get("progress").map_err(classify)?,
        error: row.try_get("error").map_err(classify)?,
        created_at: row.try_get("created_at").map_err(classify)?,
        started_at: row.try_get("started_at").map_err(classify)?,
        updated_at: row.try_get("updated_at").map_err(classify)?,
        finished_at: row.try_get("finished_at").map_err(classify)?,
    })
}

const INSERT_VERSION: &str = "INSERT INTO fk_tenant_keys \
    (tenant_id, version, state, resume_state, kms_key_id, wrapped, fingerprint, created_at, updated_at) \
    VALUES ($1, $2, 'active', NULL, $3, $4, $5, $6, $6) \
    ON CONFLICT (tenant_id, version) DO NOTHING";

/// Inserts `new` as the active version unless that version number exists; returns the
/// number of rows inserted (0 or 1).
async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    new: &NewKeyVersion,
    now: i64,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(INSERT_VERSION)
        .bind(tenant_id)
        .bind(i64::from(new.version))
        .bind(&new.kms_key_id)
        .bind(new.wrapped.as_bytes().to_vec())
        .bind(new.wrapped.fingerprint().as_bytes().to_vec())
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(classify)?
        .rows_affected())
}

/// Takes the tenant row's lock for the rest of `tx` and says whether the tenant is live
/// (exists and was not erased). Rotation and subject creation call it first, so they
/// serialize with a tenant shred (which sets `erased_at` in its first statement).
///
/// `shared` (PostgreSQL only): a share lock, so that many subject creations of one tenant
/// do not queue behind each other, while a shred (an exclusive row lock) still waits
/// for them and they for it. SQLite serializes writers anyway, and its transaction must
/// start with a write (a read-then-write transaction can fail to upgrade its lock).
async fn lock_live_tenant(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    shared_on: Option<&'static str>,
) -> Result<bool, StoreError> {
    if shared_on == Some("postgres") {
        let row = sqlx::query(
            "SELECT 1 FROM fk_tenants WHERE tenant_id = $1 AND erased_at IS NULL FOR SHARE",
        )
        .bind(tenant_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?;
        return Ok(row.is_some());
    }
    let n = sqlx::query(
        "UPDATE fk_tenants SET erased_at = erased_at WHERE tenant_id = $1 AND erased_at IS NULL",
    )
    .bind(tenant_id)
    .execute(&mut **tx)
    .await
    .map_err(classify)?
    .rows_affected();
    Ok(n == 1)
}

#[async_trait]
impl KeyStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn create_tenant(
        &self,
        tenant_id: &str,
        kms_key_id: &str,
        first: NewKeyVersion,
    ) -> Result<Created<TenantRecord>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let inserted = sqlx::query(
            "INSERT INTO fk_tenants (tenant_id, kms_key_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(kms_key_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        if inserted == 1 {
            insert_version(&mut tx, tenant_id, &first, now).await?;
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
            "SELECT tenant_id, kms_key_id, created_at FROM fk_tenants WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT version, state, resume_state, kms_key_id, wrapped, fingerprint, created_at, updated_at \
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
        let inserted = insert_version(&mut tx, tenant_id, &new, now).await?;
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
        let n = sqlx::query(
            "UPDATE fk_tenant_keys SET state = $4, resume_state = $5, updated_at = $6 \
             WHERE tenant_id = $1 AND version = $2 AND state = $3",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(expected.as_str())
        .bind(new.as_str())
        .bind(resume_state.map(KeyState::as_str))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn destroy_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'destroyed', resume_state = NULL, wrapped = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND version = $2 AND state NOT IN ('destroyed', 'retired')",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn create_subject(&self, new: NewSubject) -> Result<Created<SubjectRecord>, StoreError> {
        let now = now_ms();
        let fp = Fingerprint::of_wrapped(&new.wrapped);
        let mut tx = self.pool.begin().await.map_err(classify)?;
        // An erased tenant gets a tombstone, never live material (the tenant row lock
        // serializes this with a tenant shred).
        let live = lock_live_tenant(&mut tx, &new.tenant_id, Some(self.backend)).await?;
        let (state, wrapped, fp) = if live {
            ("active", Some(new.wrapped.clone()), fp.as_bytes().to_vec())
        } else {
            ("destroyed", None, vec![0u8; 32])
        };
        let n = sqlx::query(
            "INSERT INTO fk_subjects (tenant_id, subject_id, state, wrap_version, wrapped, fingerprint, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT (tenant_id, subject_id) DO NOTHING",
        )
        .bind(&new.tenant_id)
        .bind(&new.subject_id)
        .bind(state)
        .bind(i64::from(new.wrap_version))
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
        sqlx::query(concat!(
            "SELECT ",
            subject_columns!(),
            " FROM fk_subjects WHERE tenant_id = $1 AND subject_id = $2"
        ))
        .bind(tenant_id)
        .bind(subject_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(subject_from_row)
        .transpose()
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
        let n = sqlx::query(
            "UPDATE fk_subjects SET state = $4, updated_at = $5 \
             WHERE tenant_id = $1 AND subject_id = $2 AND state = $3",
        )
        .bind(tenant_id)
        .bind(subject_id)
        .bind(expected.as_str())
        .bind(new.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn destroy_subject(&self, tenant_id: &str, subject_id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_subjects SET state = 'destroyed', wrapped = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND subject_id = $2 AND state <> 'destroyed'",
        )
        .bind(tenant_id)
        .bind(subject_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn rewrap_key_version(
        &self,
        tenant_id: &str,
        version: u32,
        expected_kms_key_id: &str,
        new_kms_key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_tenant_keys SET kms_key_id = $4, wrapped = $5 \
             WHERE tenant_id = $1 AND version = $2 AND kms_key_id = $3 \
             AND state NOT IN ('destroyed', 'retired')",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(expected_kms_key_id)
        .bind(new_kms_key_id)
        .bind(wrapped.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
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

    async fn subjects_wrapped_under(
        &self,
        tenant_id: &str,
        version: u32,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            subject_columns!(),
            " FROM fk_subjects WHERE tenant_id = $1 AND wrap_version = $2 \
             AND state <> 'destroyed' ORDER BY subject_id LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(subject_from_row).collect()
    }

    async fn subjects_in_state(
        &self,
        tenant_id: &str,
        state: KeyState,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SubjectRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            subject_columns!(),
            " FROM fk_subjects WHERE tenant_id = $1 AND state = $2 AND subject_id > $3 \
             ORDER BY subject_id LIMIT $4"
        ))
        .bind(tenant_id)
        .bind(state.as_str())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(subject_from_row).collect()
    }

    async fn rewrap_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
        expected_version: u32,
        new_version: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_subjects SET wrap_version = $4, wrapped = $5 \
             WHERE tenant_id = $1 AND subject_id = $2 AND wrap_version = $3 AND state <> 'destroyed'",
        )
        .bind(tenant_id)
        .bind(subject_id)
        .bind(i64::from(expected_version))
        .bind(i64::from(new_version))
        .bind(wrapped.to_vec())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn retire_key_version(&self, tenant_id: &str, version: u32) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_tenant_keys SET state = 'retired', resume_state = NULL, wrapped = NULL, updated_at = $3 \
             WHERE tenant_id = $1 AND version = $2 AND state = 'decrypt-only' \
             AND NOT EXISTS (SELECT 1 FROM fk_subjects s WHERE s.tenant_id = $1 \
                             AND s.wrap_version = $2 AND s.state <> 'destroyed')",
        )
        .bind(tenant_id)
        .bind(i64::from(version))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn create_job(&self, job: NewJob) -> Result<Created<JobRecord>, StoreError> {
        let now = now_ms();
        let n = sqlx::query(
            "INSERT INTO fk_jobs (job_id, target, tenant_id, spec, state, control, progress, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'pending', 'run', $5, $6, $6) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(&job.job_id)
        .bind(&job.target)
        .bind(job.tenant_id.as_deref())
        .bind(&job.spec)
        .bind(&job.progress)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        let record = self
            .get_job(&job.job_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("job vanished after insert".into()))?;
        Ok(if n == 1 {
            Created::Created(record)
        } else {
            Created::Existing(record)
        })
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM fk_jobs WHERE job_id = $1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(job_from_row)
        .transpose()
    }

    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM fk_jobs ORDER BY created_at DESC, job_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn claim_job(
        &self,
        job_id: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_jobs SET owner = $2, lease_until = $4, updated_at = $3, \
                 started_at = COALESCE(started_at, $3), \
                 state = CASE WHEN state = 'pending' THEN 'running' ELSE state END \
             WHERE job_id = $1 AND state IN ('pending', 'running', 'paused') \
             AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until < $3)",
        )
        .bind(job_id)
        .bind(owner)
        .bind(now)
        .bind(lease_until)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        if n == 1 {
            self.get_job(job_id).await
        } else {
            Ok(None)
        }
    }

    async fn update_job(
        &self,
        job_id: &str,
        owner: &str,
        update: JobUpdate,
    ) -> Result<Option<JobControl>, StoreError> {
        let now = now_ms();
        let finished = update.state.is_finished();
        let row = sqlx::query(
            "UPDATE fk_jobs SET state = $3, checkpoint = COALESCE($4, checkpoint), progress = $5, \
                 error = $6, updated_at = $7, \
                 lease_until = CASE WHEN $9 = 1 THEN NULL ELSE $8 END, \
                 owner = CASE WHEN $9 = 1 THEN NULL ELSE owner END, \
                 finished_at = CASE WHEN $9 = 1 THEN $7 ELSE NULL END \
             WHERE job_id = $1 AND owner = $2 AND state IN ('pending', 'running', 'paused') \
             RETURNING control",
        )
        .bind(job_id)
        .bind(owner)
        .bind(update.state.as_str())
        .bind(update.checkpoint.as_deref())
        .bind(&update.progress)
        .bind(update.error.as_deref())
        .bind(now)
        .bind(update.lease_until)
        .bind(i64::from(finished))
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.map(|r| r.try_get::<String, _>("control").map_err(classify)?.parse())
            .transpose()
    }

    async fn renew_job_lease(
        &self,
        job_id: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_jobs SET lease_until = $3 \
             WHERE job_id = $1 AND owner = $2 AND state IN ('pending', 'running', 'paused')",
        )
        .bind(job_id)
        .bind(owner)
        .bind(lease_until)
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn set_job_control(&self, job_id: &str, control: JobControl) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE fk_jobs SET control = $2, updated_at = $3, \
                 state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END, \
                 error = CASE WHEN state = 'failed' THEN NULL ELSE error END, \
                 finished_at = CASE WHEN state = 'failed' THEN NULL ELSE finished_at END \
             WHERE job_id = $1 AND (state IN ('pending', 'running', 'paused') \
                 OR (state = 'failed' AND $2 = 'run'))",
        )
        .bind(job_id)
        .bind(control.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(classify)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn create_erasure(
        &self,
        new: NewErasure,
        event: Option<&AuditEvent>,
    ) -> Result<Created<ErasureRecord>, StoreError> {
        let (created, rec) = self.create_erasure_impl(&new, event).await?;
        Ok(if created {
            Created::Created(rec)
        } else {
            Created::Existing(rec)
        })
    }

    async fn get_erasure(&self, erasure_id: &str) -> Result<Option<ErasureRecord>, StoreError> {
        self.get_erasure_impl(erasure_id).await
    }

    async fn live_erasure(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        self.live_erasure_impl(tenant_id, subject_id).await
    }

    async fn list_erasures(
        &self,
        tenant_id: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        self.list_erasures_impl(tenant_id, after, limit).await
    }

    async fn due_erasures(
        &self,
        now: i64,
        stale_before: i64,
        limit: u32,
    ) -> Result<Vec<ErasureRecord>, StoreError> {
        self.due_erasures_impl(now, stale_before, limit).await
    }

    async fn start_erasure(
        &self,
        erasure_id: &str,
        executed_by: &str,
        now: i64,
        idle_since: Option<i64>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        self.start_erasure_impl(erasure_id, executed_by, now, idle_since)
            .await
    }

    async fn reopen_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        self.reopen_erasure_impl(erasure_id, execute_after).await
    }

    async fn reschedule_erasure(
        &self,
        erasure_id: &str,
        execute_after: i64,
    ) -> Result<bool, StoreError> {
        self.reschedule_erasure_impl(erasure_id, execute_after)
            .await
    }

    async fn cancel_erasure(
        &self,
        erasure_id: &str,
        cancelled_by: &str,
        event: &AuditEvent,
        in_grace_only: bool,
    ) -> Result<bool, StoreError> {
        self.cancel_erasure_impl(erasure_id, cancelled_by, event, in_grace_only)
            .await
    }

    async fn note_erasure_error(&self, erasure_id: &str, error: &str) -> Result<(), StoreError> {
        self.note_erasure_error_impl(erasure_id, error).await
    }

    async fn complete_erasure(
        &self,
        erasure_id: &str,
        complete: &CompleteFn<'_>,
    ) -> Result<Option<ErasureRecord>, StoreError> {
        self.complete_erasure_impl(erasure_id, complete).await
    }

    async fn shred_tenant(&self, tenant_id: &str) -> Result<(u64, u64), StoreError> {
        self.shred_tenant_impl(tenant_id).await
    }

    async fn tombstone_subject(
        &self,
        tenant_id: &str,
        subject_id: &str,
    ) -> Result<bool, StoreError> {
        self.tombstone_subject_impl(tenant_id, subject_id).await
    }

    async fn subject_fingerprints(
        &self,
        tenant_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.subject_fingerprints_impl(tenant_id, after, limit)
            .await
    }

    async fn live_key_count(
        &self,
        tenant_id: &str,
        subject_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.live_key_count_impl(tenant_id, subject_id).await
    }

    async fn live_kms_key_ids(&self) -> Result<Vec<String>, StoreError> {
        self.live_kms_key_ids_impl().await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        self.append_audit_impl(event).await
    }

    async fn append_audit_fn(&self, make: &AuditFn<'_>) -> Result<AuditRecord, StoreError> {
        self.append_audit_fn_impl(make).await
    }

    async fn audit_head(&self) -> Result<(u64, [u8; 32]), StoreError> {
        self.audit_head_impl().await
    }

    async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_records_impl(after_seq, limit).await
    }

    async fn signing_key(&self, purpose: &str) -> Result<Option<SigningKeyRecord>, StoreError> {
        self.signing_key_impl(purpose).await
    }

    async fn signing_keys(&self, purpose: &str) -> Result<Vec<SigningKeyRecord>, StoreError> {
        self.signing_keys_impl(purpose).await
    }

    async fn retire_signing_key(&self, key_id: &str) -> Result<bool, StoreError> {
        self.retire_signing_key_impl(key_id).await
    }

    async fn create_signing_key(
        &self,
        key: &SigningKeyRecord,
    ) -> Result<SigningKeyRecord, StoreError> {
        self.create_signing_key_impl(key).await
    }

    async fn announce(&self, tenant_id: &str, subject_id: Option<&str>) -> Result<(), StoreError> {
        if self.listen_dsn.is_none() {
            return Ok(());
        }
        let payload = format!("{tenant_id}\t{}", subject_id.unwrap_or(""));
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::postgres::CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Change>>, StoreError> {
        match &self.listen_dsn {
            None => Ok(None),
            Some(dsn) => super::postgres::listen(dsn).await.map(Some),
        }
    }
}
