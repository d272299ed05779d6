//! Blind indexes through a re-encryption job (real PostgreSQL application table, SQLite
//! key store, local KMS): the job re-indexes rows to the active version, lookups find
//! rows before and after it, a shredded subject's row stays unsearchable, and the old
//! version can be retired once the job proves it.

mod common;
#[path = "blind_index/profiles.rs"]
mod profiles;

use std::sync::Arc;

use anyhow::Result;
use fieldkey::crypto::BlindIndex;
use fieldkey::{Keyring, KeyringConfig};
use profiles::profiles;

/// The re-encryption job recomputes blind-index columns (binary and text form) under
/// the active version, fills missing ones, clears those of shredded values, and the
/// old version can then be retired: search keeps working through the whole rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reencryption_job_reindexes_and_search_survives_rotation_and_retirement() -> Result<()> {
    use fieldkey::crypto::{Aad, to_text};
    use fieldkey::jobs::{JobSpec, Runner, RunnerConfig};
    use sqlx::Executor as _;
    use sqlx::Row as _;
    const ROWS: i64 = 400;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(&dir)?;
    let keyring = Arc::new(
        Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig {
                revalidate_after: std::time::Duration::from_millis(100),
                ..KeyringConfig::default()
            },
        )
        .with_index_profiles(profiles()),
    );
    let app_db = common::PgDb::create().await?;
    let app = sqlx::PgPool::connect(&app_db.dsn).await?;
    app.execute(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, tenant_id TEXT NOT NULL, user_id TEXT, \
         email BYTEA, email_bidx TEXT, login TEXT, login_bidx BYTEA)",
    )
    .await?;
    let tenant_of = |id: i64| if id % 2 == 0 { "acme" } else { "globex" };
    for t in ["acme", "globex"] {
        keyring.create_tenant(t, None).await?;
    }
    let email_of = |id: i64| format!("User{id}@Example.org");
    for id in 1..=ROWS {
        let t = tenant_of(id);
        let subject = format!("user-{id}");
        let ctx = id.to_string();
        let aad = |field| Aad {
            tenant: t,
            subject: Some(&subject),
            field,
            context: ctx.as_bytes(),
        };
        let email = keyring
            .encrypt(&aad("email"), email_of(id).as_bytes())
            .await?;
        let login = to_text(
            &keyring
                .encrypt(&aad("login"), format!("u{id}").as_bytes())
                .await?,
        );
        // every 10th row has no index yet (the column was added after the data)
        let email_bidx = (id % 10 != 0).then_some(
            keyring
                .blind_index(t, "email", email_of(id).as_bytes(), false)
                .await?
                .index
                .to_text(),
        );
        let login_bidx = keyring
            .blind_index(t, "login", format!("u{id}").as_bytes(), false)
            .await?
            .index
            .into_bytes();
        sqlx::query("INSERT INTO users VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(id)
            .bind(t)
            .bind(&subject)
            .bind(email)
            .bind(email_bidx)
            .bind(login)
            .bind(login_bidx)
            .execute(&app)
            .await?;
    }
    for t in ["acme", "globex"] {
        keyring.rotate_tenant(t).await?;
    }
    // user-7 is erased: its row's indexes must not stay computable
    keyring.shred_subject("globex", "user-7").await?;
    // before the job: a lookup finds old rows by their v1 index
    let find = |t: &'static str, id: i64| {
        let keyring = keyring.clone();
        let app = app.clone();
        async move {
            let li = keyring
                .blind_index(t, "email", email_of(id).to_lowercase().as_bytes(), true)
                .await
                .unwrap();
            let texts: Vec<String> = li.lookup.iter().map(BlindIndex::to_text).collect();
            let rows =
                sqlx::query("SELECT id FROM users WHERE tenant_id = $1 AND email_bidx = ANY($2)")
                    .bind(t)
                    .bind(&texts)
                    .fetch_all(&app)
                    .await
                    .unwrap();
            (
                texts.len(),
                rows.iter().map(|r| r.get::<i64, _>(0)).collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(find("acme", 42).await, (2, vec![42]));
    // The job starts once the keyring's revalidation bound (100 ms) has passed since
    // v1 stopped encrypting, so that it counts for v1's retirement below.
    for t in ["acme", "globex"] {
        common::past_version_change(store.as_ref(), t, 1, std::time::Duration::from_millis(100))
            .await;
    }

    let spec_text = |name: &str| {
        format!(
            r#"
name = "{name}"
database_url_env = "FK_TEST_APP_DB"
table = "users"
primary_key = "id"
tenant_column = "tenant_id"
subject_column = "user_id"
context_column = "id"
batch_size = 64
[[columns]]
name = "email"
field = "email"
blind_index = "email_bidx"
[[columns]]
name = "login"
field = "login"
blind_index = "login_bidx"
"#
        )
    };
    let spec = JobSpec::from_toml(&spec_text("users-reindex"))?;
    // a runner without the field's profile refuses before doing anything
    let bare = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let (r, _) = Runner::new(
        bare,
        store.clone(),
        app.clone(),
        spec.clone(),
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let e = r.run().await.unwrap_err();
    assert!(
        matches!(e, fieldkey::error::Error::IndexNotConfigured { .. }),
        "{e:?}"
    );
    assert!(store.get_job("users-reindex").await?.is_none());

    let (runner, _) = Runner::new(
        keyring.clone(),
        store.clone(),
        app.clone(),
        spec,
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let out = runner.run().await?;
    let p = &out.progress;
    eprintln!("reindex job: {p:?}");
    assert_eq!(out.state, fieldkey::store::JobState::Completed);
    assert_eq!(p.values_shredded, 2, "user-7's email and login");
    assert_eq!(p.indexes_cleared, 2);
    assert_eq!(p.values_rewrapped, 2 * (ROWS as u64 - 1));
    assert_eq!(
        p.indexes_recomputed,
        2 * (ROWS as u64 - 1),
        "stale and missing ones"
    );
    assert_eq!(p.values_failed, 0);
    assert!(p.leftovers.is_empty());

    // every index is now the v2 value of its row's plaintext, in its column's form
    let rows = sqlx::query("SELECT id, tenant_id, email_bidx, login_bidx FROM users ORDER BY id")
        .fetch_all(&app)
        .await?;
    for r in &rows {
        let id: i64 = r.get(0);
        let t: String = r.get(1);
        let eb: Option<String> = r.get(2);
        let lb: Option<Vec<u8>> = r.get(3);
        if id == 7 {
            assert_eq!((eb, lb), (None, None), "shredded row's indexes cleared");
            continue;
        }
        let want = keyring
            .blind_index(&t, "email", email_of(id).as_bytes(), false)
            .await?
            .index;
        assert_eq!(want.version(), 2);
        assert_eq!(eb.as_deref(), Some(want.to_text().as_str()), "row {id}");
        let want = keyring
            .blind_index(&t, "login", format!("u{id}").as_bytes(), false)
            .await?
            .index;
        assert_eq!(lb.as_deref(), Some(want.as_bytes()), "row {id}");
    }
    // a second job finds everything current and writes nothing
    let (again, _) = Runner::new(
        keyring.clone(),
        store.clone(),
        app.clone(),
        JobSpec::from_toml(&spec_text("users-reindex-check"))?,
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let p = again.run().await?.progress;
    assert_eq!(p.indexes_current, 2 * (ROWS as u64 - 1));
    assert_eq!(
        (p.indexes_recomputed, p.indexes_cleared, p.rows_updated),
        (0, 0, 0)
    );
    // the old version can be retired; lookups then compute v2 only, and still match
    for t in ["acme", "globex"] {
        keyring.retire_key_version(t, 1).await?;
    }
    assert_eq!(find("acme", 42).await, (1, vec![42]));
    assert_eq!(find("globex", 41).await, (1, vec![41]));
    assert_eq!(
        find("acme", 40).await,
        (1, vec![40]),
        "a row whose index was missing"
    );
    assert_eq!(
        find("globex", 7).await,
        (1, vec![]),
        "the erased user is not found"
    );
    drop(app);
    app_db.drop_db().await
}
