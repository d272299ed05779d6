//! Re-encryption job throughput against the real PostgreSQL, beside the floor: a plain
//! UPDATE that rewrites the same two columns of the same rows, in the same run.
//!
//! ```sh
//! cargo bench --bench reencrypt -- --rows 100000 --batch 1000 --shards 1,2
//! ```
//! Options: `--rows N` (100000), `--batch N` job batch size (1000), `--shards LIST`
//! (1): one job per entry, in order, each cut into that many shards and run by as many
//! runners at once in this process (one per shard, as an Indexed Job's pods would); the
//! tenants are rotated again before each job after the first, so every job moves every
//! value once. PostgreSQL from `FIELDKEY_BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); two throwaway databases are created and
//! dropped.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "benchmark driver fails by panicking"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldkey::crypto::{Aad, to_text};
use fieldkey::jobs::{JobSpec, Runner, RunnerConfig};
use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::store::{JobState, KeyStore, SqlStore};
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

/// `--shards 1,2`: the shard counts of the jobs to run, in order.
fn shard_counts() -> Vec<u32> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--shards")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || vec![1],
            |v| v.split(',').map(|n| n.trim().parse().unwrap()).collect(),
        )
}

async fn create_db(base: &str, name: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(base).await.unwrap();
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await
        .unwrap();
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    format!("{}/{name}", &base[..base.rfind('/').unwrap()])
}

async fn drop_db(base: &str, name: &str) {
    let mut admin = sqlx::PgConnection::connect(base).await.unwrap();
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
}

const TENANTS: [&str; 2] = ["acme", "globex"];

async fn populate(k: &Keyring, app: &PgPool, table: &str, rows: i64) {
    app.execute(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, tenant_id TEXT NOT NULL, user_id TEXT, \
         email BYTEA, name TEXT)"
    )))
    .await
    .unwrap();
    let mut id = 1;
    while id <= rows {
        let end = (id + 4999).min(rows);
        let (mut ids, mut ts, mut ss, mut es, mut ns) = (vec![], vec![], vec![], vec![], vec![]);
        for i in id..=end {
            let tenant = TENANTS[(i % 2) as usize];
            let subject = (i % 4 < 2).then(|| format!("user-{}", i % 1000));
            let ctx = i.to_string();
            let aad = |field| Aad {
                tenant,
                subject: subject.as_deref(),
                field,
                context: ctx.as_bytes(),
            };
            es.push(
                k.encrypt(&aad("email"), format!("user{i}@example.com").as_bytes())
                    .await
                    .unwrap(),
            );
            ns.push(to_text(
                &k.encrypt(&aad("name"), format!("Name Number {i}").as_bytes())
                    .await
                    .unwrap(),
            ));
            ids.push(i);
            ts.push(tenant.to_owned());
            ss.push(subject);
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[], $5::text[])"
        )))
        .bind(ids)
        .bind(ts)
        .bind(ss)
        .bind(es)
        .bind(ns)
        .execute(app)
        .await
        .unwrap();
        id = end + 1;
    }
    app.execute(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
        .await
        .unwrap();
}

/// User + system CPU seconds of a process so far, from its `/proc/<pid>/stat` text.
fn stat_cpu_seconds(stat: &str) -> f64 {
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields after the command name: state is 0, utime 11, stime 12 (clock ticks)
    (ticks(11) + ticks(12)) / 100.0
}

/// User + system CPU seconds of this process so far (Linux).
fn cpu_seconds() -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// User + system CPU seconds of every `postgres` process of this machine so far (0
/// where /proc does not show them: a database elsewhere). Backends that exit during a
/// measurement take their share with them; the bench's pools stay open throughout.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| s.contains("(postgres)"))
        .map(|s| stat_cpu_seconds(&s))
        .sum()
}

/// Wall time, this process's CPU and PostgreSQL's CPU over a stretch of the bench.
struct Meter {
    t: Instant,
    cpu: f64,
    pg: f64,
}

#[derive(Clone, Copy)]
struct Measured {
    wall: Duration,
    cpu: f64,
    pg: f64,
}

impl Meter {
    fn start() -> Self {
        Self {
            t: Instant::now(),
            cpu: cpu_seconds(),
            pg: postgres_cpu_seconds(),
        }
    }

    fn stop(self) -> Measured {
        Measured {
            wall: self.t.elapsed(),
            cpu: cpu_seconds() - self.cpu,
            pg: postgres_cpu_seconds() - self.pg,
        }
    }
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 100_000) as i64;
    let batch = arg("--batch", 1000) as u32;
    let base = std::env::var("FIELDKEY_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let keys_dsn = create_db(&base, "fk_bench_keys").await;
    let app_dsn = create_db(&base, "fk_bench_app").await;
    let dir = tempfile::tempdir().unwrap();
    let kms = Arc::new(
        LocalKms::open_or_create(
            &dir.path().join("kms.json"),
            &SecretString::from("bench passphrase 123".to_owned()),
            KdfParams {
                m_cost_kib: 256,
                t_cost: 1,
                p_cost: 1,
            },
        )
        .unwrap(),
    );
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&keys_dsn).await.unwrap());
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms,
        KeyringConfig {
            revalidate_after: Duration::from_secs(
                std::env::var("FK_REVAL")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
            ),
            ..KeyringConfig::default()
        },
    ));
    for t in TENANTS {
        keyring.create_tenant(t, None).await.unwrap();
    }
    let app = sqlx::postgres::PgPoolOptions::new()
        // four per runner, as `fieldkey jobs run` opens
        .max_connections(4 * shard_counts().into_iter().max().unwrap_or(1))
        .connect(&app_dsn)
        .await
        .unwrap();
    let t = Instant::now();
    populate(&keyring, &app, "users_plain", rows).await;
    populate(&keyring, &app, "users", rows).await;
    eprintln!("populated 2 x {rows} rows in {:.1?}", t.elapsed());
    for t in TENANTS {
        keyring.rotate_tenant(t).await.unwrap();
    }

    // Floor 1: one statement rewriting both columns of every row.
    let t = Instant::now();
    let n = sqlx::query("UPDATE users_plain SET email = email, name = name")
        .execute(&app)
        .await
        .unwrap()
        .rows_affected();
    let plain = t.elapsed();
    assert_eq!(n as i64, rows);
    app.execute("VACUUM ANALYZE users_plain").await.unwrap();
    // Floor 2: the same, in primary-key batches of the job's size (one statement each).
    let t = Instant::now();
    let mut lo = 0i64;
    while lo < rows {
        sqlx::query("UPDATE users_plain SET email = email, name = name WHERE id > $1 AND id <= $2")
            .bind(lo)
            .bind(lo + i64::from(batch))
            .execute(&app)
            .await
            .unwrap();
        lo += i64::from(batch);
    }
    let plain_batched = t.elapsed();
    // Floor 3: batches of the job's size shipping new values of the same size (the
    // stored bytes, one byte changed), as the job's write does, without crypto or
    // compare-and-set: the database's share of the job.
    let m = Meter::start();
    let mut lo = 0i64;
    while lo < rows {
        let batch_rows: Vec<(i64, Vec<u8>, String)> = sqlx::query_as(
            "SELECT id, email, name FROM users_plain WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(lo)
        .bind(i64::from(batch))
        .fetch_all(&app)
        .await
        .unwrap();
        let Some(last) = batch_rows.last().map(|r| r.0) else {
            break;
        };
        let (mut ids, mut es, mut ns) = (vec![], vec![], vec![]);
        for (id, mut e, n) in batch_rows {
            e[0] ^= 1;
            ids.push(id);
            es.push(e);
            ns.push(n.replace("fk1:", "fk2:"));
        }
        sqlx::query(
            "UPDATE users_plain AS t SET email = v.e, name = v.n \
             FROM unnest($1::bigint[], $2::bytea[], $3::text[]) AS v(id, e, n) WHERE t.id = v.id",
        )
        .bind(ids)
        .bind(es)
        .bind(ns)
        .execute(&app)
        .await
        .unwrap();
        lo = last;
    }
    let floor = m.stop();
    let plain_new_values = floor.wall;

    // The jobs: read, rewrap 2 values per row (decrypt + encrypt), compare-and-set
    // write, checkpoint in the key store, per batch; with n shards, n runners at once.
    let mut jobs = Vec::new();
    for (k, shards) in shard_counts().into_iter().enumerate() {
        if k > 0 {
            // Every value on an old version again, and the table as fresh as the first
            // job found it.
            for t in TENANTS {
                keyring.rotate_tenant(t).await.unwrap();
            }
            app.execute("VACUUM ANALYZE users").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let spec = JobSpec::from_toml(&format!(
            r#"name = "bench-{k}-{shards}"
table = "users"
primary_key = "id"
tenant_column = "tenant_id"
subject_column = "user_id"
context_column = "id"
batch_size = {batch}
shards = {shards}
[[columns]]
name = "email"
field = "email"
[[columns]]
name = "name"
field = "name"
"#
        ))
        .unwrap();
        let runners: Vec<Arc<Runner>> = (0..shards)
            .map(|i| {
                let mut cfg = RunnerConfig::new(Duration::from_secs(30));
                cfg.shard = Some(i);
                let (r, _) = Runner::new(
                    keyring.clone(),
                    store.clone(),
                    app.clone(),
                    spec.clone(),
                    cfg,
                );
                Arc::new(r)
            })
            .collect();
        let m = Meter::start();
        let tasks: Vec<_> = runners
            .iter()
            .map(|r| {
                let r = r.clone();
                tokio::spawn(async move { r.run().await })
            })
            .collect();
        let mut outs = Vec::new();
        for task in tasks {
            outs.push(task.await.unwrap());
        }
        let measured = m.stop();
        for out in &outs {
            let out = out.as_ref().unwrap();
            assert_eq!(out.state, JobState::Completed);
            assert_eq!(out.progress.rows_updated as i64, rows);
        }
        let values = outs[0].as_ref().unwrap().progress.values_rewrapped;
        jobs.push((shards, measured, values));
    }

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!("re-encryption of {rows} rows x 2 encrypted columns (PostgreSQL, same run)");
    println!("{:<50} {:>10} {:>12}", "scenario", "seconds", "rows/s");
    let mut lines: Vec<(String, Duration)> = vec![
        ("plain UPDATE, one statement (floor)".into(), plain),
        (format!("plain UPDATE, batches of {batch}"), plain_batched),
        (
            format!("read + UPDATE new bytes, batches of {batch}"),
            plain_new_values,
        ),
    ];
    for (shards, m, _) in &jobs {
        lines.push((
            format!("re-encryption job, {shards} shard(s), batches of {batch}"),
            m.wall,
        ));
    }
    for (name, d) in &lines {
        println!("{name:<50} {:>10.2} {:>12.0}", d.as_secs_f64(), rate(*d));
    }
    println!(
        "CPU seconds (this process / PostgreSQL) for read + UPDATE new bytes: {:.2} / {:.2} in {:.2} s wall",
        floor.cpu,
        floor.pg,
        floor.wall.as_secs_f64()
    );
    for (shards, m, values) in &jobs {
        println!(
            "{shards} shard(s): job / plain UPDATE (one statement) {:.2}; job / read+UPDATE new bytes {:.2}; \
             values rewrapped {values}; CPU seconds (this process / PostgreSQL) {:.2} / {:.2} in {:.2} s wall; \
             {:.2} us of this process's CPU per value",
            rate(m.wall) / rate(plain),
            rate(m.wall) / rate(plain_new_values),
            m.cpu,
            m.pg,
            m.wall.as_secs_f64(),
            m.cpu * 1e6 / (*values).max(1) as f64,
        );
    }
    app.close().await;
    drop_db(&base, "fk_bench_app").await;
    drop_db(&base, "fk_bench_keys").await;
}
