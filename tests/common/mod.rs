//! Shared test fixtures: real SQLite files, real PostgreSQL databases, the local KMS and
//! moto_server. Nothing here mocks a component that can run for real.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use secrecy::SecretString;
use sqlx::Connection as _;
use sqlx::Executor as _;

use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::store::{KeyStore, SqlStore};

/// DSN of the PostgreSQL server tests use. `scripts/test.sh` exports it; the default is
/// the machine's server. A PostgreSQL test never skips: no server means a failure.
pub fn pg_base_dsn() -> String {
    std::env::var("FIELDKEY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A throwaway PostgreSQL database, created for one test.
pub struct PgDb {
    pub dsn: String,
    name: String,
}

impl PgDb {
    pub async fn create() -> Result<Self> {
        let base = pg_base_dsn();
        let mut admin = sqlx::PgConnection::connect(&base).await.with_context(|| {
            format!(
                "cannot reach PostgreSQL at {base} (set FIELDKEY_TEST_DATABASE_URL or run scripts/test.sh)"
            )
        })?;
        let name = format!("fk_test_{}", hex::encode(rand_bytes::<6>()));
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
        let dsn = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => anyhow::bail!("DSN without database: {base}"),
        };
        Ok(Self { dsn, name })
    }

    pub async fn drop_db(self) -> Result<()> {
        let mut admin = sqlx::PgConnection::connect(&pg_base_dsn()).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .await?;
        Ok(())
    }
}

pub fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("rng");
    b
}

pub async fn sqlite_store(dir: &tempfile::TempDir) -> Result<Arc<dyn KeyStore>> {
    Ok(Arc::new(SqlStore::open_sqlite(&dir.path().join("keys.db")).await?))
}

/// Argon2id costs small enough for tests; the production default is 64 MiB / 3 passes.
pub const FAST_KDF: KdfParams = KdfParams { m_cost_kib: 256, t_cost: 1, p_cost: 1 };

pub fn local_kms(dir: &tempfile::TempDir) -> Result<Arc<LocalKms>> {
    let path: PathBuf = dir.path().join("local-kms.json");
    Ok(Arc::new(LocalKms::open_or_create(
        &path,
        &SecretString::from("test passphrase 123".to_owned()),
        FAST_KDF,
    )?))
}

/// Endpoint of moto_server, started by `scripts/test.sh`.
pub fn moto_url() -> String {
    std::env::var("FIELDKEY_TEST_MOTO_URL").expect(
        "FIELDKEY_TEST_MOTO_URL is not set: run the tests through scripts/test.sh, which starts moto_server",
    )
}
