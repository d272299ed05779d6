//! Job specs: which PostgreSQL table to re-encrypt, and how its rows map to fieldkey's
//! tenant, subject, field and context. Written as TOML by operators; stored as JSON in
//! the job record so every runner of one job uses the same spec.

use serde::{Deserialize, Serialize};

use crate::crypto::validate_id;
use crate::error::{Error, Result};

fn default_db_env() -> String {
    "FIELDKEY_JOB_DATABASE_URL".to_owned()
}

fn default_batch() -> u32 {
    1000
}

fn default_shards() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Most shards a job may have.
pub const MAX_SHARDS: u32 = 256;

/// One encrypted column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name (`bytea` for binary envelopes, `text`/`varchar` for `fk1:` text).
    pub name: String,
    /// The field name the application encrypted it with.
    pub field: String,
    /// A blind-index column of this column's values (docs/BLIND_INDEX.md §5): the job
    /// recomputes it from each decrypted value under the active key version (with the
    /// field's profile from the configuration), and clears it (NULL) where the value's
    /// key was shredded. `bytea` (binary form) or `text` (`fkb1:` form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_index: Option<String>,
}

/// A re-encryption job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job id: running the same spec again resumes the job.
    pub name: String,
    /// Environment variable holding the application database's URL (never stored).
    #[serde(default = "default_db_env")]
    pub database_url_env: String,
    /// Table, optionally schema-qualified (`public.users`).
    pub table: String,
    /// A single-column unique key (the primary key); rows are walked in its order.
    pub primary_key: String,
    /// Column holding each row's tenant id.
    #[serde(default)]
    pub tenant_column: Option<String>,
    /// Only this tenant (with `tenant_column`), or the tenant of every row (without).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Column holding the subject id for subject-scoped values (NULL or empty: tenant-scoped).
    #[serde(default)]
    pub subject_column: Option<String>,
    /// Column whose text form was the record context at encryption (NULL: empty).
    #[serde(default)]
    pub context_column: Option<String>,
    /// Rows per batch (1..=10000).
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Maximum rows per second (0: unlimited).
    #[serde(default)]
    pub rate_limit_rows_per_sec: u32,
    /// The encrypted columns.
    pub columns: Vec<ColumnSpec>,
    /// A census: authenticate values already on the active version too, so that a
    /// misplaced (copied from another row, tenant or field) or corrupt value is counted
    /// in `values_failed` instead of `values_current`. Costs a decryption per current
    /// value. Columns with a blind index are always decrypted.
    #[serde(default)]
    pub verify: bool,
    /// Shards (1..=256): disjoint ranges of the primary key, fixed when the job is
    /// planned, each with its own lease and checkpoint, so that as many runners work
    /// the table at once (docs/ROTATION.md §4.1). Left out of the stored spec when 1, so
    /// specs stored before shards existed compare equal.
    #[serde(default = "default_shards", skip_serializing_if = "is_one")]
    pub shards: u32,
}

/// Checks a SQL identifier: letters, digits and `_`, not starting with a digit, at
/// most 63 bytes (PostgreSQL's limit). Quoted on use, so case is kept.
fn check_ident(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes().first().is_some_and(u8::is_ascii_digit);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {s:?} is not a plain SQL identifier (letters, digits, _)"
        )))
    }
}

/// `"name"`: a checked identifier, quoted.
pub(super) fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

impl JobSpec {
    /// Parses and validates a TOML spec.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the problem.
    pub fn from_toml(text: &str) -> Result<Self> {
        let spec: JobSpec = toml::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("job spec: {}", e.message())))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a stored (JSON) spec.
    ///
    /// # Errors
    /// [`Error::Internal`] if it does not decode.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Internal(format!("stored job spec: {e}")))
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Validates names, identifiers and bounds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the problem.
    pub fn validate(&self) -> Result<()> {
        validate_id("job name", &self.name)?;
        if self.name.len() > 128 {
            return Err(Error::InvalidArgument(
                "job name must be at most 128 bytes".into(),
            ));
        }
        check_ident("database_url_env", &self.database_url_env)?;
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 {
            return Err(Error::InvalidArgument(
                "table must be `table` or `schema.table`".into(),
            ));
        }
        for p in &parts {
            check_ident("table", p)?;
        }
        check_ident("primary_key", &self.primary_key)?;
        for c in [
            &self.tenant_column,
            &self.subject_column,
            &self.context_column,
        ]
        .into_iter()
        .flatten()
        {
            check_ident("column", c)?;
        }
        match (&self.tenant_column, &self.tenant) {
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "job spec needs tenant_column, tenant, or both".into(),
                ));
            }
            (_, Some(t)) => validate_id("tenant", t)?,
            _ => {}
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(Error::InvalidArgument(
                "batch_size must be 1..=10000".into(),
            ));
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(Error::InvalidArgument(format!(
                "shards must be 1..={MAX_SHARDS}"
            )));
        }
        if self.columns.is_empty() || self.columns.len() > 16 {
            return Err(Error::InvalidArgument(
                "a job re-encrypts 1..=16 columns".into(),
            ));
        }
        for (i, c) in self.columns.iter().enumerate() {
            check_ident("column", &c.name)?;
            validate_id("field", &c.field)?;
            if self.columns.iter().skip(i + 1).any(|d| d.name == c.name) {
                return Err(Error::InvalidArgument(format!(
                    "column {} is listed twice",
                    c.name
                )));
            }
            if c.name == self.primary_key {
                return Err(Error::InvalidArgument(
                    "the primary key cannot be an encrypted column".into(),
                ));
            }
            if let Some(ix) = &c.blind_index {
                check_ident("blind_index", ix)?;
                let taken = ix == &self.primary_key
                    || self.columns.iter().enumerate().any(|(j, d)| {
                        d.name == *ix || (j != i && d.blind_index.as_deref() == Some(ix))
                    })
                    || [
                        &self.tenant_column,
                        &self.subject_column,
                        &self.context_column,
                    ]
                    .into_iter()
                    .flatten()
                    .any(|k| k == ix);
                if taken {
                    return Err(Error::InvalidArgument(format!(
                        "blind_index column {ix} is also used for something else"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The table, quoted (`"schema"."table"`).
    pub(super) fn quoted_table(&self) -> String {
        self.table
            .split('.')
            .map(quote)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// What the job covers, for retirement bookkeeping: the database (named by its
    /// URL's environment variable) and the table, as `ENV:table`. The columns are in
    /// the stored spec.
    pub fn target(&self) -> String {
        format!("{}:{}", self.database_url_env, self.table)
    }

    /// The one tenant the job covers, if restricted to one.
    pub fn tenant_scope(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
        name = "users-2026"
        table = "public.users"
        primary_key = "id"
        tenant_column = "tenant_id"
        subject_column = "user_id"
        [[columns]]
        name = "email"
        field = "email"
    "#;

    #[test]
    fn a_minimal_spec_parses_with_defaults() {
        let s = JobSpec::from_toml(OK).unwrap();
        assert_eq!(s.batch_size, 1000);
        assert_eq!(s.database_url_env, "FIELDKEY_JOB_DATABASE_URL");
        assert_eq!(s.quoted_table(), "\"public\".\"users\"");
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn identifiers_that_could_inject_sql_are_refused() {
        for bad in [
            "users; drop table x",
            "users\"",
            "a.b.c",
            "1users",
            "",
            "us ers",
        ] {
            let t = OK.replace("public.users", bad);
            assert!(JobSpec::from_toml(&t).is_err(), "{bad:?} accepted");
        }
        let t = OK.replace("\"email\"\n        field", "\"em'ail\"\n        field");
        assert!(JobSpec::from_toml(&t).is_err());
    }

    #[test]
    fn blind_index_columns_parse_and_must_not_collide() {
        let with = OK.replace(
            "field = \"email\"",
            "field = \"email\"\n        blind_index = \"email_bidx\"",
        );
        let s = JobSpec::from_toml(&with).unwrap();
        assert_eq!(s.columns[0].blind_index.as_deref(), Some("email_bidx"));
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        // an old stored spec (no blind_index key) still reads back equal
        let plain = JobSpec::from_toml(OK).unwrap();
        assert!(!plain.to_json().contains("blind_index"));
        for bad in ["email", "id", "user_id", "tenant_id", "em;ail"] {
            let t = OK.replace(
                "field = \"email\"",
                &format!("field = \"email\"\n        blind_index = \"{bad}\""),
            );
            assert!(JobSpec::from_toml(&t).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn specs_without_a_tenant_or_with_bad_bounds_are_refused() {
        assert!(JobSpec::from_toml(&OK.replace("tenant_column = \"tenant_id\"", "")).is_err());
        assert!(JobSpec::from_toml(&format!("batch_size = 0\n{OK}")).is_err());
        assert!(JobSpec::from_toml(&format!("surprise = 1\n{OK}")).is_err());
        assert!(JobSpec::from_toml(&format!("shards = 0\n{OK}")).is_err());
        assert!(JobSpec::from_toml(&format!("shards = 257\n{OK}")).is_err());
    }

    #[test]
    fn shards_default_to_one_and_are_left_out_of_the_stored_spec() {
        let one = JobSpec::from_toml(OK).unwrap();
        assert_eq!(one.shards, 1);
        assert!(
            !one.to_json().contains("shards"),
            "specs stored before shards compare equal"
        );
        let four = JobSpec::from_toml(&format!("shards = 4\n{OK}")).unwrap();
        assert_eq!(four.shards, 4);
        assert_eq!(JobSpec::from_json(&four.to_json()).unwrap(), four);
        assert_ne!(four, one, "a runner with another shard count conflicts");
    }
}
