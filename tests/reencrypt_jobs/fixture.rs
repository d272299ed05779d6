//! The fixture of the re-encryption job tests: a key store and an application database
//! on the real PostgreSQL, a populated `users` table, job specs, runner processes and
//! an application writer running beside a job.
#![allow(
    dead_code,
    reason = "shared by tests/reencrypt_jobs.rs and tests/reencrypt_shards.rs, each using part of it"
)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use fieldkey::crypto::{Aad, to_text};
use fieldkey::keyring::{Keyring, KeyringConfig};
use fieldkey::store::{JobProgress, JobState, KeyStore, SqlStore};
use sqlx::Executor as _;
use sqlx::postgres::PgPool;

use crate::common;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_fieldkey");
pub(crate) const PASSPHRASE: &str = "test passphrase 123";
pub(crate) const TENANTS: [&str; 2] = ["acme", "globex"];
/// Revalidation bound of the fixture's keyring.
pub(crate) const REVALIDATE: Duration = Duration::from_millis(200);

pub(crate) fn tenant_of(id: i64) -> &'static str {
    TENANTS[(id % 2) as usize]
}

/// Half the rows are subject-scoped (1000 users), half tenant-scoped.
pub(crate) fn subject_of(id: i64) -> Option<String> {
    (id % 4 < 2).then(|| format!("user-{}", id % 1000))
}

pub(crate) fn email_of(id: i64) -> String {
    format!("user{id}@example.com")
}

pub(crate) fn name_of(id: i64) -> String {
    format!("Name Number {id}")
}

pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) dir_path: std::path::PathBuf,
    pub(crate) keys_db: common::PgDb,
    pub(crate) app_db: common::PgDb,
    pub(crate) keyring: Arc<Keyring>,
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) kms: Arc<dyn fieldkey::kms::Kms>,
    pub(crate) app: PgPool,
}

impl Fixture {
    pub(crate) async fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(&dir)?;
        let keys_db = common::PgDb::create().await?;
        let app_db = common::PgDb::create().await?;
        let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&keys_db.dsn).await?);
        let keyring = Arc::new(Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig {
                revalidate_after: REVALIDATE,
                ..KeyringConfig::default()
            },
        ));
        for t in TENANTS {
            keyring.create_tenant(t, None).await?;
        }
        let app = sqlx::postgres::PgPoolOptions::new()
            .max_connections(6)
            .connect(&app_db.dsn)
            .await?;
        app.execute(
            "CREATE TABLE users (id BIGINT PRIMARY KEY, tenant_id TEXT NOT NULL, user_id TEXT, \
             email BYTEA, name TEXT)",
        )
        .await?;
        Ok(Self {
            dir_path: dir.path().to_owned(),
            _dir: dir,
            keys_db,
            app_db,
            keyring,
            store,
            kms,
            app,
        })
    }

    pub(crate) async fn seal(&self, id: i64, field: &str, value: &str) -> Vec<u8> {
        let subject = subject_of(id);
        let ctx = id.to_string();
        let aad = Aad {
            tenant: tenant_of(id),
            subject: subject.as_deref(),
            field,
            context: ctx.as_bytes(),
        };
        self.keyring.encrypt(&aad, value.as_bytes()).await.unwrap()
    }

    /// Inserts rows 1..=n, every third one with a NULL name.
    pub(crate) async fn populate(&self, n: i64) -> Result<()> {
        let mut id = 1;
        while id <= n {
            let end = (id + 4999).min(n);
            let (mut ids, mut tenants, mut subjects, mut emails, mut names) =
                (vec![], vec![], vec![], vec![], vec![]);
            for i in id..=end {
                ids.push(i);
                tenants.push(tenant_of(i).to_owned());
                subjects.push(subject_of(i));
                emails.push(self.seal(i, "email", &email_of(i)).await);
                names.push(if i % 3 == 0 {
                    None
                } else {
                    Some(to_text(&self.seal(i, "name", &name_of(i)).await))
                });
            }
            sqlx::query(
                "INSERT INTO users SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[], $5::text[])",
            )
            .bind(ids)
            .bind(tenants)
            .bind(subjects)
            .bind(emails)
            .bind(names)
            .execute(&self.app)
            .await?;
            id = end + 1;
        }
        Ok(())
    }

    pub(crate) fn spec(&self, name: &str, extra: &str) -> String {
        format!(
            r#"name = "{name}"
database_url_env = "FK_TEST_APP_DB"
table = "public.users"
primary_key = "id"
tenant_column = "tenant_id"
subject_column = "user_id"
context_column = "id"
{extra}
[[columns]]
name = "email"
field = "email"
[[columns]]
name = "name"
field = "name"
"#
        )
    }

    pub(crate) fn write_config(&self) -> std::path::PathBuf {
        let cfg = self.dir_path.join("fieldkey.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[store]\npostgres_url = {:?}\n[kms]\nlocal_key_file = {:?}\n",
                self.dir_path.display().to_string(),
                self.keys_db.dsn,
                self.dir_path.join("local-kms.json").display().to_string(),
            ),
        )
        .unwrap();
        cfg
    }

    /// `fieldkey jobs run` of `spec` with this fixture's key store, KMS and
    /// application database; more arguments and variables can be added before it is
    /// spawned.
    pub(crate) fn runner_command(&self, spec: &Path, lease_secs: u32) -> Command {
        let mut c = Command::new(BIN);
        c.args(["jobs", "run", "--no-progress", "--lease-seconds"])
            .arg(lease_secs.to_string())
            .arg("--config")
            .arg(self.write_config())
            .arg(spec)
            .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
            .env("FK_TEST_APP_DB", &self.app_db.dsn)
            .env("RUST_LOG", "warn")
            .env_remove("JOB_COMPLETION_INDEX")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    pub(crate) fn runner_process(&self, spec: &Path, lease_secs: u32) -> std::process::Child {
        self.runner_command(spec, lease_secs).spawn().unwrap()
    }

    pub(crate) async fn progress(&self, job: &str) -> (JobState, JobProgress, Option<String>) {
        let j = self.store.get_job(job).await.unwrap().unwrap();
        (
            j.state,
            JobProgress::parse(&j.progress).unwrap(),
            j.checkpoint,
        )
    }

    /// Rows per key version of the email column.
    pub(crate) async fn versions(&self) -> HashMap<u32, i64> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT email FROM users")
            .fetch_all(&self.app)
            .await
            .unwrap();
        let mut out = HashMap::new();
        for (e,) in rows {
            let v = fieldkey::crypto::Envelope::parse(&e).unwrap().key_version();
            *out.entry(v).or_default() += 1;
        }
        out
    }

    /// Every row decrypts to its expected plaintext and is on `version`.
    pub(crate) async fn verify_all(
        &self,
        version: u32,
        overrides: &HashMap<i64, String>,
    ) -> Result<usize> {
        let rows: Vec<(i64, Option<Vec<u8>>, Option<String>)> =
            sqlx::query_as("SELECT id, email, name FROM users ORDER BY id")
                .fetch_all(&self.app)
                .await?;
        let mut checked = 0;
        for (id, email, name) in rows {
            let subject = subject_of(id);
            let ctx = id.to_string();
            let aad = |field| Aad {
                tenant: tenant_of(id),
                subject: subject.as_deref(),
                field,
                context: ctx.as_bytes(),
            };
            let (pt, v) = self
                .keyring
                .decrypt_versioned(&aad("email"), &email.unwrap())
                .await?;
            let want = overrides.get(&id).cloned().unwrap_or_else(|| email_of(id));
            assert_eq!(&pt[..], want.as_bytes(), "row {id} email");
            assert_eq!(v, version, "row {id} email version");
            checked += 1;
            match name {
                Some(n) => {
                    assert!(n.starts_with("fk1:"), "text columns stay text");
                    let (pt, v) = self
                        .keyring
                        .decrypt_versioned(&aad("name"), n.as_bytes())
                        .await?;
                    assert_eq!(&pt[..], name_of(id).as_bytes(), "row {id} name");
                    assert_eq!(v, version, "row {id} name version");
                    checked += 1;
                }
                None => assert_eq!(id % 3, 0, "row {id} lost its name"),
            }
        }
        Ok(checked)
    }

    pub(crate) async fn drop_dbs(self) -> Result<()> {
        self.app.close().await;
        self.keys_db.drop_db().await?;
        self.app_db.drop_db().await
    }
}

/// The application: keeps rewriting emails of rows in the batch the job is working on
/// (just past its checkpoint), with fresh ciphertexts, recording what it wrote.
pub(crate) fn start_app_writer(
    f: &Fixture,
    job: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<i64, String>> {
    let keyring = f.keyring.clone();
    let store = f.store.clone();
    let app = f.app.clone();
    tokio::spawn(async move {
        let written = Arc::new(Mutex::new(HashMap::new()));
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let cp = store
                .get_job(job)
                .await
                .ok()
                .flatten()
                .and_then(|j| j.checkpoint)
                .and_then(|c| c.parse::<i64>().ok())
                .unwrap_or(0);
            n += 1;
            let id = (cp + 1 + (n as i64 * 7919) % 500).min(100_000);
            let value = format!("changed-{n}@example.com");
            let subject = subject_of(id);
            let ctx = id.to_string();
            let aad = Aad {
                tenant: tenant_of(id),
                subject: subject.as_deref(),
                field: "email",
                context: ctx.as_bytes(),
            };
            let ct = keyring.encrypt(&aad, value.as_bytes()).await.unwrap();
            sqlx::query("UPDATE users SET email = $2 WHERE id = $1")
                .bind(id)
                .bind(ct)
                .execute(&app)
                .await
                .unwrap();
            written.lock().unwrap().insert(id, value);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Arc::try_unwrap(written).unwrap().into_inner().unwrap()
    })
}
