//! The application table: the SQL of one job (built once from its spec and the
//! table's column types), reading a batch of a shard in primary-key order, reading rows
//! again by key, counting the rows in scope, where to cut the shards, and the guarded
//! batch write.
//!
//! Owns: [`Sql`], the row as read ([`DbRow`], [`Value`]) and how a database error
//! becomes a batch error. Does not: decrypt or rewrap anything (`rewrap` does), decide
//! what to write, or touch the key store.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::{PgConnection, PgPool, PgRow, Postgres};
use sqlx::{AssertSqlSafe, Row};

use super::rewrap::Update;
use super::{BatchError, BatchResult};
use crate::crypto;
use crate::jobs::spec::{ColumnSpec, JobSpec, quote};
use crate::store::is_unavailable;

#[derive(Clone, Copy)]
pub(super) enum ColKind {
    Bytes,
    Text,
}

pub(super) enum Value {
    Bytes(Vec<u8>),
    Text(String),
    /// A recomputed blind index: written in its column's form (binary or `fkb1:`).
    Index(crypto::BlindIndex),
}

impl Value {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Value::Bytes(b) => b,
            Value::Text(s) => s.as_bytes(),
            Value::Index(i) => i.as_bytes(),
        }
    }
}

pub(super) fn same(v: &Value) -> Value {
    match v {
        Value::Bytes(b) => Value::Bytes(b.clone()),
        Value::Text(s) => Value::Text(s.clone()),
        Value::Index(i) => Value::Index(i.clone()),
    }
}

/// A rewrapped envelope in the form of `like` (binary, or text for a text column).
pub(super) fn in_form_of(like: &Value, bytes: Vec<u8>) -> std::result::Result<Value, BatchError> {
    Ok(match like {
        Value::Bytes(_) | Value::Index(_) => Value::Bytes(bytes),
        Value::Text(_) => Value::Text(
            String::from_utf8(bytes)
                .map_err(|_| BatchError::Fatal("text envelope is not UTF-8".into()))?,
        ),
    })
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        Value::Index(i) => i.to_text(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

pub(super) struct DbRow {
    pub(super) pk: String,
    /// The row version (`xmin`) read: the write's compare-and-set token.
    pub(super) xmin: String,
    pub(super) tenant: String,
    pub(super) subject: Option<String>,
    pub(super) context: Vec<u8>,
    pub(super) values: Vec<Option<Value>>,
}

/// The SQL of one job, built once from its spec and the table's column types.
pub(super) struct Sql {
    /// `SELECT ... FROM table`, without a condition.
    select: String,
    /// The quoted primary key and its type.
    pk: String,
    pk_type: String,
    /// ` AND tenant = $2`, or nothing.
    tenant_filter: String,
    table: String,
    tenant_column: Option<String>,
    limit: u32,
    by_pk: String,
    update: String,
    pub(super) kinds: Vec<ColKind>,
}

/// Keeps of `s` what is safe inside an SQL comment naming a job, shard and runner:
/// letters, digits and `._:-/`; anything else becomes `_` (no `*`, so a comment can
/// neither end nor nest).
fn comment_safe(s: &str) -> String {
    s.chars()
        .take(160)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn column_type(
    db: &PgPool,
    table: &str,
    col: &str,
) -> std::result::Result<String, BatchError> {
    let row = sqlx::query(
        "SELECT format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a \
         WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table)
    .bind(col)
    .fetch_optional(db)
    .await
    .map_err(db_error)?;
    match row {
        Some(r) => r.try_get("t").map_err(db_error),
        None => Err(BatchError::Fatal(format!(
            "table {table} has no column {col}"
        ))),
    }
}

impl Sql {
    pub(super) async fn build(
        spec: &JobSpec,
        db: &PgPool,
    ) -> std::result::Result<Self, BatchError> {
        let table = spec.quoted_table();
        let pk = quote(&spec.primary_key);
        let pk_type = column_type(db, &table, &spec.primary_key).await?;
        let unique: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indnkeyatts = 1 \
               AND i.indpred IS NULL AND a.attnotnull AND a.attname = $2 LIMIT 1",
        )
        .bind(&table)
        .bind(&spec.primary_key)
        .fetch_optional(db)
        .await
        .map_err(db_error)?;
        if unique.is_none() {
            return Err(BatchError::Fatal(format!(
                "{} is not a NOT NULL single-column unique key of {} (a partial index does not count)",
                spec.primary_key, spec.table
            )));
        }
        let mut kinds = Vec::new();
        // The encrypted columns, then their blind-index columns (in the same order).
        let value_cols = value_columns(&spec.columns);
        for name in &value_cols {
            let t = column_type(db, &table, name).await?;
            kinds.push(match t.as_str() {
                "bytea" => ColKind::Bytes,
                t if t == "text" || t.starts_with("character varying") => ColKind::Text,
                other => {
                    return Err(BatchError::Fatal(format!(
                        "column {name} is {other}; encrypted and blind-index columns must be bytea or text"
                    )));
                }
            });
        }
        let tenant_expr = match &spec.tenant_column {
            Some(c) => format!("{}::text", quote(c)),
            None => "$t$$t$".to_owned(),
        };
        let tenant_filter = match (&spec.tenant_column, &spec.tenant) {
            (Some(c), Some(_)) => format!(" AND {}::text = $2", quote(c)),
            _ => String::new(),
        };
        let subject_expr = spec
            .subject_column
            .as_ref()
            .map_or("NULL::text".to_owned(), |c| format!("{}::text", quote(c)));
        let context_expr = spec
            .context_column
            .as_ref()
            .map_or("NULL::text".to_owned(), |c| format!("{}::text", quote(c)));
        let cols: Vec<String> = value_cols.iter().map(|c| quote(c)).collect();
        let select = format!(
            "SELECT {pk}::text AS fk_pk, xmin::text AS fk_xmin, {tenant_expr} AS fk_tenant, {subject_expr} AS fk_subject, \
             {context_expr} AS fk_context, {} FROM {table}",
            cols.join(", ")
        );
        let by_pk = format!("{select} WHERE {pk} = ANY($1::text[]::{pk_type}[])");
        // UPDATE ... FROM unnest(pks, row versions, new1, new2, ...): one statement per
        // batch. Each row is guarded by its version (`xmin`) as read: any change since
        // the read, committed or in flight, makes the guard fail (PostgreSQL re-checks
        // it on the newest row version after waiting for a concurrent writer).
        let mut arrays = vec!["$1::text[]".to_owned(), "$2::text[]".to_owned()];
        let mut names = vec!["pk".to_owned(), "xm".to_owned()];
        let mut sets = Vec::new();
        for (i, (c, k)) in cols.iter().zip(&kinds).enumerate() {
            let ty = match k {
                ColKind::Bytes => "bytea[]",
                ColKind::Text => "text[]",
            };
            arrays.push(format!("${}::{ty}", i + 3));
            names.push(format!("n{i}"));
            sets.push(format!("{c} = v.n{i}"));
        }
        let update = format!(
            "UPDATE {table} AS t SET {} FROM unnest({}) AS v({}) \
             WHERE t.{pk} = v.pk::{pk_type} AND t.xmin = v.xm::xid RETURNING v.pk",
            sets.join(", "),
            arrays.join(", "),
            names.join(", "),
        );
        Ok(Self {
            select,
            pk,
            pk_type,
            tenant_filter,
            table,
            tenant_column: match (&spec.tenant_column, &spec.tenant) {
                (Some(c), Some(_)) => Some(quote(c)),
                _ => None,
            },
            limit: spec.batch_size,
            by_pk,
            update,
            kinds,
        })
    }

    /// ` AND pk <= $3` when a shard has an upper bound (`$1` is the lower bound or
    /// checkpoint, `$2` the tenant, `$3` the upper bound; each bound is a separate
    /// statement rather than a `$n IS NULL OR` condition, so every plan can walk the
    /// key's index from the lower bound).
    fn upper(&self, hi: bool) -> String {
        if hi {
            format!(" AND {} <= $3::text::{}", self.pk, self.pk_type)
        } else {
            String::new()
        }
    }

    /// What reading this job's batches from `db` needs (`tenant`: the spec's tenant;
    /// `hi`: the shard's inclusive upper bound).
    pub(super) fn reader(&self, db: PgPool, tenant: Option<String>, hi: Option<String>) -> Reader {
        let (select, pk, pk_type, tf, limit) = (
            &self.select,
            &self.pk,
            &self.pk_type,
            &self.tenant_filter,
            self.limit,
        );
        let upper = self.upper(hi.is_some());
        // $1 is the checkpoint (unused by `first`, which still binds it so that the
        // tenant filter is always $2 and the upper bound $3).
        Reader {
            db,
            first: format!(
                "{select} WHERE ($1::text IS NULL OR TRUE){tf}{upper} ORDER BY {pk} LIMIT {limit}"
            ),
            after: format!(
                "{select} WHERE {pk} > $1::text::{pk_type}{tf}{upper} ORDER BY {pk} LIMIT {limit}"
            ),
            kinds: self.kinds.clone(),
            tenant,
            hi,
        }
    }

    /// The guarded batch write of `shard`, named in an SQL comment (job, shard and
    /// runner, as `pg_stat_activity` and triggers' `current_query()` show it).
    pub(super) fn tagged_update(&self, job: &str, shard: u32, owner: &str) -> String {
        format!(
            "/* fieldkey job={} shard={shard} runner={} */ {}",
            comment_safe(job),
            comment_safe(owner),
            self.update
        )
    }

    /// The rows in scope of the job (of its tenant, if it names one) in the shard
    /// `(lo, hi]` (an absent bound: none).
    pub(super) async fn count(
        &self,
        db: &PgPool,
        tenant: Option<&str>,
        lo: Option<&str>,
        hi: Option<&str>,
    ) -> BatchResult<u64> {
        let lower = if lo.is_some() {
            format!("{} > $1::text::{}", self.pk, self.pk_type)
        } else {
            "($1::text IS NULL OR TRUE)".to_owned()
        };
        let q = format!(
            "SELECT count(*) FROM {} WHERE {lower}{}{}",
            self.table,
            self.tenant_filter,
            self.upper(hi.is_some())
        );
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(q))
            .bind(lo)
            .bind(tenant)
            .bind(hi)
            .fetch_one(db)
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The keys in scope at the quantiles 1/n .. (n-1)/n (text forms, in key order):
    /// where a job of `n` shards is cut. `None` when nothing is in scope. One pass
    /// over the key column (PostgreSQL sorts it for the ordered-set aggregate), once
    /// per job.
    pub(super) async fn bounds(
        &self,
        db: &mut PgConnection,
        tenant: Option<&str>,
        n: u32,
    ) -> BatchResult<Option<Vec<String>>> {
        let fractions: Vec<f64> = (1..n).map(|i| f64::from(i) / f64::from(n)).collect();
        let filter = match &self.tenant_column {
            Some(c) => format!(" WHERE {c}::text = $2"),
            None => " WHERE ($2::text IS NULL OR TRUE)".to_owned(),
        };
        let q = format!(
            "SELECT (percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY {}))::text[] FROM {}{filter}",
            self.pk, self.table
        );
        let b: Option<Vec<Option<String>>> = sqlx::query_scalar(AssertSqlSafe(q))
            .bind(fractions)
            .bind(tenant)
            .fetch_one(&mut *db)
            .await
            .map_err(db_error)?;
        Ok(b.and_then(|b| b.into_iter().collect()))
    }

    /// The rows with keys `pks`, read again, in the order of `pks` (rows deleted
    /// meanwhile are left out).
    pub(super) async fn reread(
        &self,
        db: &PgPool,
        pks: &[String],
        tenant: Option<&str>,
    ) -> BatchResult<Vec<DbRow>> {
        let rows = sqlx::query(AssertSqlSafe(self.by_pk.clone()))
            .bind(pks)
            .fetch_all(db)
            .await
            .map_err(db_error)?;
        let mut by_pk: HashMap<String, DbRow> = HashMap::new();
        for r in &rows {
            let row = decode_row(r, &self.kinds, tenant)?;
            by_pk.insert(row.pk.clone(), row);
        }
        // Rows deleted meanwhile are simply gone.
        Ok(pks.iter().filter_map(|pk| by_pk.remove(pk)).collect())
    }
}

/// The lock that lets one runner plan `job` at a time: a transaction on the
/// application's database holding `pg_try_advisory_xact_lock` on the job's name (an
/// advisory lock touches no table; it ends with the transaction, or the connection of
/// a killed runner). `None`: another runner holds it.
pub(super) async fn planning_lock(
    db: &PgPool,
    job: &str,
) -> BatchResult<Option<sqlx::Transaction<'static, Postgres>>> {
    let mut tx = db.begin().await.map_err(db_error)?;
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("fieldkey job plan:{job}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    Ok(held.then_some(tx))
}

/// The columns a job reads and writes: the encrypted ones, then their blind-index
/// columns in the same order.
fn value_columns(columns: &[ColumnSpec]) -> Vec<&str> {
    columns
        .iter()
        .map(|c| c.name.as_str())
        .chain(columns.iter().filter_map(|c| c.blind_index.as_deref()))
        .collect()
}

fn decode_row(
    row: &PgRow,
    kinds: &[ColKind],
    fixed_tenant: Option<&str>,
) -> std::result::Result<DbRow, BatchError> {
    let get_err = |e: sqlx::Error| BatchError::Fatal(format!("reading a row: {e}"));
    let pk: String = row.try_get("fk_pk").map_err(get_err)?;
    let xmin: String = row.try_get("fk_xmin").map_err(get_err)?;
    let tenant: Option<String> = row.try_get("fk_tenant").map_err(get_err)?;
    let tenant = match (fixed_tenant, tenant) {
        (_, Some(t)) if !t.is_empty() => t,
        (Some(t), _) => t.to_owned(),
        _ => String::new(),
    };
    let subject: Option<String> = row.try_get("fk_subject").map_err(get_err)?;
    let context: Option<String> = row.try_get("fk_context").map_err(get_err)?;
    let mut values = Vec::with_capacity(kinds.len());
    for (i, k) in kinds.iter().enumerate() {
        let idx = 5 + i;
        values.push(match k {
            ColKind::Bytes => row
                .try_get::<Option<Vec<u8>>, _>(idx)
                .map_err(get_err)?
                .map(Value::Bytes),
            ColKind::Text => row
                .try_get::<Option<String>, _>(idx)
                .map_err(get_err)?
                .map(Value::Text),
        });
    }
    Ok(DbRow {
        pk,
        xmin,
        tenant,
        subject: subject.filter(|s| !s.is_empty()),
        context: context.map(String::into_bytes).unwrap_or_default(),
        values,
    })
}

/// What reading a batch needs, owned, so the next batch can be read in a task of its
/// own while this one is processed.
pub(super) struct Reader {
    db: PgPool,
    first: String,
    after: String,
    kinds: Vec<ColKind>,
    tenant: Option<String>,
    /// The shard's inclusive upper bound.
    hi: Option<String>,
}

/// The batch after `checkpoint` (the first batch without one), up to the shard's
/// upper bound.
pub(super) async fn fetch(r: Reader, checkpoint: Option<String>) -> BatchResult<Vec<DbRow>> {
    let q = if checkpoint.is_some() {
        r.after
    } else {
        r.first
    };
    let rows = sqlx::query(AssertSqlSafe(q))
        .bind(checkpoint)
        .bind(r.tenant.as_deref())
        .bind(r.hi.as_deref())
        .fetch_all(&r.db)
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| decode_row(row, &r.kinds, r.tenant.as_deref()))
        .collect()
}

/// Writes a batch's new values, each row guarded by its version; returns the keys of
/// the rows written.
pub(super) async fn write_rows(
    db: &PgPool,
    update: &str,
    kinds: &[ColKind],
    updates: &[Update],
) -> BatchResult<HashSet<String>> {
    let mut q = sqlx::query(AssertSqlSafe(update.to_owned()))
        .bind(
            updates
                .iter()
                .map(|(r, _, _)| r.pk.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|(r, _, _)| r.xmin.clone())
                .collect::<Vec<_>>(),
        );
    for (i, kind) in kinds.iter().enumerate() {
        let new = updates
            .iter()
            .map(|(_, n, _)| n.get(i).and_then(Option::as_ref));
        q = match kind {
            ColKind::Bytes => q.bind(
                new.map(|v| v.map(|v| v.bytes().to_vec()))
                    .collect::<Vec<_>>(),
            ),
            ColKind::Text => q.bind(new.map(|v| v.map(text_of)).collect::<Vec<_>>()),
        };
    }
    let rows = q.fetch_all(db).await.map_err(db_error)?;
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(db_error))
        .collect()
}

pub(super) fn db_error(e: sqlx::Error) -> BatchError {
    // Beyond an unavailable database, serialization failures and deadlocks (a
    // concurrent application transaction) are worth a retry too.
    let conflict = matches!(&e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c == "40001" || c == "40P01"));
    if is_unavailable(&e) || conflict {
        BatchError::Transient(format!("database: {e}"))
    } else {
        BatchError::Fatal(format!("database: {e}"))
    }
}
