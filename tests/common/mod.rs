//! Shared test fixtures: real SQLite files, real PostgreSQL databases, the local KMS,
//! moto_server, a SoftHSM2 token per test ([`softhsm`]), the sidecar itself
//! ([`sidecar`]) and a TCP proxy that cuts or black-holes the path to a real server
//! ([`proxy`]). Nothing here mocks a component that can run for real.
#![allow(
    dead_code,
    reason = "each test crate compiles all of common and uses only some of it, so an unused item in one crate is not dead"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

pub mod grpc;
pub mod kms_rules;
pub mod openbao;
pub mod pki;
pub mod proxy;
pub mod sidecar;
pub mod softhsm;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use secrecy::SecretString;
use sqlx::Connection as _;
use sqlx::Executor as _;

use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::store::{KeyStore, SqlStore};

/// The associated data of a field: `tenant`, `subject`, `field` and the row `ctx`.
pub fn aad<'a>(
    tenant: &'a str,
    subject: Option<&'a str>,
    field: &'a str,
    ctx: &'a [u8],
) -> fieldkey::crypto::Aad<'a> {
    fieldkey::crypto::Aad {
        tenant,
        subject,
        field,
        context: ctx,
    }
}

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
        // Creation time in the name: scripts/test.sh drops only databases left behind
        // long ago, never those of a run still going on this machine.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let name = format!("fk_test_{secs}_{}", hex::encode(rand_bytes::<6>()));
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await?;
        let dsn = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => anyhow::bail!("DSN without database: {base}"),
        };
        Ok(Self { dsn, name })
    }

    pub async fn drop_db(self) -> Result<()> {
        let mut admin = sqlx::PgConnection::connect(&pg_base_dsn()).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .await?;
        Ok(())
    }
}

/// How often [`eventually`] looks again.
pub const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Polls `check` until it returns `Some` (its value is returned) or `within` has
/// passed, then fails the test naming `what`. For waiting on an effect another task or
/// process brings about (a job finished, a file picked up, a checkpoint written): no
/// fixed sleep that is too short on a loaded machine and too long everywhere else.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The wall clock, Unix ms.
pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Waits until the wall clock is past `unix_ms` (a time the code under test compares
/// with the clock: a grace period's end, a rotation plus a staleness bound). Exact,
/// unlike a fixed sleep guessed to be long enough.
pub async fn clock_past(unix_ms: i64) {
    loop {
        let now = now_ms();
        if now > unix_ms {
            return;
        }
        let left = u64::try_from(unix_ms - now).unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(left + 1)).await;
    }
}

/// Waits until the clock is `bound` past the last state change of `tenant`'s key
/// `version` (when it stopped encrypting, at the rotation): a re-encryption job started
/// later, by a runner whose keyring revalidates within `bound`, counts towards the
/// version's retirement (`Keyring::retire_key_version`).
pub async fn past_version_change(
    store: &dyn KeyStore,
    tenant: &str,
    version: u32,
    bound: std::time::Duration,
) {
    let t = store.get_tenant(tenant).await.unwrap().unwrap();
    let v = t.versions.iter().find(|v| v.version == version).unwrap();
    clock_past(v.updated_at + i64::try_from(bound.as_millis()).unwrap()).await;
}

/// [`eventually`] for blocking code (threads, child processes).
pub fn eventually_blocking<T>(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        std::thread::sleep(POLL_EVERY);
    }
}

pub fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("rng");
    b
}

pub async fn sqlite_store(dir: &tempfile::TempDir) -> Result<Arc<dyn KeyStore>> {
    Ok(Arc::new(
        SqlStore::open_sqlite(&dir.path().join("keys.db")).await?,
    ))
}

/// Argon2id costs small enough for tests; the production default is 64 MiB / 3 passes.
pub const FAST_KDF: KdfParams = KdfParams {
    m_cost_kib: 256,
    t_cost: 1,
    p_cost: 1,
};

pub fn local_kms(dir: &tempfile::TempDir) -> Result<Arc<LocalKms>> {
    let path: PathBuf = dir.path().join("local-kms.json");
    Ok(Arc::new(LocalKms::open_or_create(
        &path,
        &SecretString::from("test passphrase 123".to_owned()),
        FAST_KDF,
    )?))
}

/// AWS KMS client settings for moto (region eu-west-1, static test credentials),
/// patient with a moto slowed by a parallel test run: for tests that are not about
/// deadlines (tests/kms_aws.rs has its own, tight ones).
pub fn aws_config(endpoint: &str, key_id: &str) -> fieldkey::kms::aws::AwsKmsConfig {
    let mut c = fieldkey::kms::aws::AwsKmsConfig::new(key_id);
    c.region = Some("eu-west-1".into());
    c.endpoint_url = Some(endpoint.to_owned());
    c.operation_timeout = std::time::Duration::from_secs(30);
    c.attempt_timeout = std::time::Duration::from_secs(10);
    c.connect_timeout = std::time::Duration::from_secs(2);
    c.max_attempts = 3;
    c.initial_backoff = std::time::Duration::from_millis(10);
    c.static_credentials = Some(fieldkey::kms::aws::StaticCredentials {
        access_key_id: "testing".into(),
        secret_access_key: SecretString::from("testing".to_owned()),
    });
    c
}

/// Endpoint of moto_server, started by `scripts/test.sh`.
pub fn moto_url() -> String {
    std::env::var("FIELDKEY_TEST_MOTO_URL").expect(
        "FIELDKEY_TEST_MOTO_URL is not set: run the tests through scripts/test.sh, which starts moto_server",
    )
}

/// A decorator that counts calls to a real KMS (used to prove single-flight unwraps).
/// It also adds latency to unwraps (a KMS across a network is not instant), 20 ms by
/// default, to widen the window in which concurrent misses overlap.
pub struct CountingKms {
    pub inner: Arc<dyn fieldkey::kms::Kms>,
    pub unwraps: std::sync::atomic::AtomicUsize,
    pub generates: std::sync::atomic::AtomicUsize,
    pub delay: std::time::Duration,
}

impl CountingKms {
    pub fn new(inner: Arc<dyn fieldkey::kms::Kms>) -> Arc<Self> {
        Self::with_delay(inner, std::time::Duration::from_millis(20))
    }
    pub fn with_delay(inner: Arc<dyn fieldkey::kms::Kms>, delay: std::time::Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            unwraps: Default::default(),
            generates: Default::default(),
            delay,
        })
    }
    pub fn unwrap_calls(&self) -> usize {
        self.unwraps.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl fieldkey::kms::Kms for CountingKms {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    fn default_key_id(&self) -> &str {
        self.inner.default_key_id()
    }
    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &fieldkey::kms::EncryptionContext,
    ) -> Result<fieldkey::kms::DataKey, fieldkey::kms::KmsError> {
        self.generates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.generate_data_key(key_id, ctx).await
    }
    async fn wrap(
        &self,
        key_id: &str,
        key: &fieldkey::crypto::SecretKey,
        ctx: &fieldkey::kms::EncryptionContext,
    ) -> Result<fieldkey::kms::WrappedKey, fieldkey::kms::KmsError> {
        self.inner.wrap(key_id, key, ctx).await
    }
    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &fieldkey::kms::WrappedKey,
        ctx: &fieldkey::kms::EncryptionContext,
    ) -> Result<fieldkey::crypto::SecretKey, fieldkey::kms::KmsError> {
        self.unwraps
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.unwrap(key_id, wrapped, ctx).await
    }
    async fn check(&self) -> Result<(), fieldkey::kms::KmsError> {
        self.inner.check().await
    }
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        days: u32,
    ) -> Result<fieldkey::kms::KeyDeletion, fieldkey::kms::KmsError> {
        self.inner.schedule_key_deletion(key_id, days).await
    }
}

/// The value of the metrics sample `name{labels}` (labels exactly as exposed) in a
/// Prometheus text exposition, if present.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

/// host:port of a DSN or URL such as postgres://u@127.0.0.1:5432/db or http://127.0.0.1:5000
pub fn socket_addr_of(url: &str) -> Result<std::net::SocketAddr> {
    let after_scheme = url.split("://").nth(1).context("no scheme")?;
    let host_port = after_scheme.split('/').next().context("no host")?;
    let host_port = host_port.rsplit('@').next().context("no host")?;
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs()?.next().context("unresolvable")
}
