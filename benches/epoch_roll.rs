//! Key epoch roll cost against the real PostgreSQL: a roll over N subject keys (and
//! their tenants), with the KMS calls it made counted, beside the floor measured in
//! the same run: the same rows read page by page and rewritten with new bytes of the
//! same size (same statements, same transactions, no crypto).
//!
//! ```sh
//! cargo bench --bench epoch_roll -- --subjects 1000000 --tenants 10
//! ```
//! Options: `--subjects N` (1000000), `--tenants N` (10). PostgreSQL from
//! `FIELDKEY_BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`); a
//! throwaway database is created and dropped. The local KMS counts as the KMS here;
//! the count of calls is what an AWS roll would pay (its latency is not modelled).
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "benchmark driver fails by panicking"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use fieldkey::crypto::{SecretKey, wrap_subject_key_epoch};
use fieldkey::epochs::EpochSettings;
use fieldkey::keyring::swk_context;
use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::kms::{
    DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey,
};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::wiring::Parts;
use fieldkey::{Keyring, KeyringConfig};
use secrecy::SecretString;
use sqlx::{Connection as _, Executor as _, PgPool};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap())
        .unwrap_or(default)
}

/// Counts every KMS call (the figure the issue asks for).
struct Counting {
    inner: Arc<dyn Kms>,
    calls: AtomicU64,
}

impl Counting {
    fn hit(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Kms for Counting {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    fn default_key_id(&self) -> &str {
        self.inner.default_key_id()
    }
    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        self.hit();
        self.inner.generate_data_key(key_id, ctx).await
    }
    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.hit();
        self.inner.wrap(key_id, key, ctx).await
    }
    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.hit();
        self.inner.unwrap(key_id, wrapped, ctx).await
    }
    async fn check(&self) -> Result<(), KmsError> {
        self.inner.check().await
    }
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.hit();
        self.inner.schedule_key_deletion(key_id, days).await
    }
    async fn create_epoch_key(&self, epoch: u64, tag: &str) -> Result<String, KmsError> {
        self.hit();
        self.inner.create_epoch_key(epoch, tag).await
    }
    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        self.hit();
        self.inner.key_status(key_id).await
    }
}

async fn admin(base: &str, sql: String) {
    let mut c = sqlx::PgConnection::connect(base).await.unwrap();
    c.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
}

/// Inserts `n` subjects of `tenant` wrapped under its SWK of `epoch` (made by the
/// keyring when the first subject was created), 1,000 rows per statement.
async fn seed(
    pool: &PgPool,
    kms: &dyn Kms,
    store: &dyn KeyStore,
    tenant: &str,
    epoch: u64,
    n: u64,
) {
    let id = fieldkey::model::swk_id(tenant, epoch);
    let rec = store.swk(&id).await.unwrap().unwrap();
    let swk = kms
        .unwrap(
            &rec.kms_key_id,
            &WrappedKey::new(rec.wrapped),
            &swk_context(tenant, epoch),
        )
        .await
        .unwrap();
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let mut sql = String::from(
            "INSERT INTO fk_subjects (tenant_id, subject_id, state, wrap_version, swk_id, wrapped, fingerprint, created_at, updated_at) VALUES ",
        );
        let mut rows = Vec::new();
        for j in i..end {
            let subject = format!("s{j:08}");
            let sk = SecretKey::generate().unwrap();
            let w = wrap_subject_key_epoch(&swk, tenant, &subject, epoch, &sk).unwrap();
            rows.push((subject, w));
        }
        for (k, _) in rows.iter().enumerate() {
            let b = k * 3;
            if k > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "($1, ${}, 'active', 0, $2, ${}, ${}, 0, 0)",
                b + 3,
                b + 4,
                b + 5
            ));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant).bind(&id);
        for (subject, w) in &rows {
            let fp = fieldkey::crypto::Fingerprint::of_wrapped(w);
            q = q
                .bind(subject.clone())
                .bind(w.clone())
                .bind(fp.as_bytes().to_vec());
        }
        q.execute(pool).await.unwrap();
        i = end;
    }
}

/// The floor: the same pages read and rewritten with new bytes of the same size, in
/// the same statement shape as the roll on PostgreSQL (one UPDATE ... FROM (VALUES ...)
/// per page of 1,000), with no crypto and no KMS.
async fn floor(pool: &PgPool, tenants: &[String]) -> (u64, f64) {
    let started = Instant::now();
    let mut n = 0u64;
    for t in tenants {
        let mut after = String::new();
        loop {
            let rows: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT subject_id, swk_id FROM fk_subjects WHERE tenant_id = $1 AND subject_id > $2 \
                 AND state <> 'destroyed' ORDER BY subject_id LIMIT 1000",
            )
            .bind(t)
            .bind(&after)
            .fetch_all(pool)
            .await
            .unwrap();
            let Some(last) = rows.last() else { break };
            after = last.0.clone();
            let mut sql = String::from(
                "UPDATE fk_subjects AS s SET swk_id = v.exp_swk, wrap_version = 0, wrapped = v.w FROM (VALUES ",
            );
            for i in 0..rows.len() {
                let b = 2 + i * 3;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("(${b}, ${}, ${})", b + 1, b + 2));
            }
            sql.push_str(
                ") AS v(sid, exp_swk, w) WHERE s.tenant_id = $1 AND s.subject_id = v.sid \
                 AND s.state <> 'destroyed' AND s.swk_id IS NOT DISTINCT FROM v.exp_swk",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(t);
            for (s, swk) in &rows {
                q = q.bind(s.clone()).bind(swk.clone()).bind(vec![7u8; 73]);
            }
            n += q.execute(pool).await.unwrap().rows_affected();
        }
    }
    (n, started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let subjects = arg("--subjects", 1_000_000);
    let tenants_n = arg("--tenants", 10);
    let base = std::env::var("FIELDKEY_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = "fk_bench_epoch_roll";
    admin(
        &base,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
    admin(&base, format!("CREATE DATABASE {name}")).await;
    let dsn = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);

    let dir = tempfile::tempdir().unwrap();
    let local = LocalKms::open_or_create(
        &dir.path().join("kms.json"),
        &SecretString::from("bench passphrase 123".to_owned()),
        KdfParams {
            m_cost_kib: 256,
            t_cost: 1,
            p_cost: 1,
        },
    )
    .unwrap()
    .with_keys_dir(&dir.path().join("keys"))
    .unwrap();
    let kms = Arc::new(Counting {
        inner: Arc::new(local),
        calls: AtomicU64::new(0),
    });
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&dsn).await.unwrap());
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let epochs = Parts::new(keyring.clone(), store.clone(), kms.clone()).epochs(EpochSettings {
        kms_deletion_days: 0,
        ..EpochSettings::default()
    });
    epochs.roll(true, &|_| {}).await.unwrap();
    let pool = PgPool::connect(&dsn).await.unwrap();
    let tenants: Vec<String> = (0..tenants_n).map(|t| format!("tenant{t:03}")).collect();
    let seeded = Instant::now();
    for t in &tenants {
        keyring.create_tenant(t, None).await.unwrap();
        keyring.ensure_subject(t, "a-first").await.unwrap();
        seed(
            &pool,
            kms.as_ref(),
            store.as_ref(),
            t,
            1,
            subjects / tenants_n,
        )
        .await;
    }
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    eprintln!(
        "seeded {} subject keys under epoch 1 in {:.1} s",
        subjects,
        seeded.elapsed().as_secs_f64()
    );

    let before = kms.calls.load(Ordering::Relaxed);
    let started = Instant::now();
    let st = epochs.roll(true, &|_| {}).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    let calls = kms.calls.load(Ordering::Relaxed) - before;
    let p = &st.progress;
    println!(
        "roll 1 -> 2: {} subject keys, {} tenant versions, {} SWKs made, {} deleted, {} signing keys in {secs:.1} s = {:.0} subject keys/s; KMS calls {calls} (roll's own count {})",
        p.subjects_rewrapped,
        p.versions_rewrapped,
        p.swks_created,
        p.swks_deleted,
        p.signing_keys_rewrapped,
        p.subjects_rewrapped as f64 / secs,
        p.kms_calls
    );
    let (n, fsecs) = floor(&pool, &tenants).await;
    println!(
        "floor (same pages read + rewritten, no crypto): {n} rows in {fsecs:.1} s = {:.0} rows/s; roll / floor = {:.2}",
        n as f64 / fsecs,
        (p.subjects_rewrapped as f64 / secs) / (n as f64 / fsecs)
    );
    pool.close().await;
    drop(store);
    admin(
        &base,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
}
