//! Keyring behaviour over a real SQLite file (and PostgreSQL where replicas matter) and
//! the real local KMS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::aad;
use fieldkey::crypto::{Scope, to_text};
use fieldkey::store::{KeyState, KeyStore, SqlStore};
use fieldkey::{Error, Keyring, KeyringConfig};

struct Fixture {
    _dir: tempfile::TempDir,
    db_path: std::path::PathBuf,
    kms: Arc<common::CountingKms>,
    keyring: Keyring,
}

async fn fixture_with(cfg: KeyringConfig) -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("keys.db");
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&db_path).await?);
    let kms = common::CountingKms::new(common::local_kms(&dir)?);
    let keyring = Keyring::new(store, kms.clone(), cfg);
    Ok(Fixture {
        _dir: dir,
        db_path,
        kms,
        keyring,
    })
}

async fn fixture() -> Result<Fixture> {
    fixture_with(KeyringConfig::default()).await
}

#[tokio::test]
async fn tenant_scoped_round_trip_in_binary_and_text_form() -> Result<()> {
    let f = fixture().await?;
    let info = f.keyring.create_tenant("acme", None).await?;
    assert_eq!(info.active_version(), Some(1));
    let a = aad("acme", None, "email", b"row:42");
    let env = f.keyring.encrypt(&a, b"alice@example.com").await?;
    assert_eq!(&*f.keyring.decrypt(&a, &env).await?, b"alice@example.com");
    let text = to_text(&env);
    assert_eq!(
        &*f.keyring.decrypt(&a, text.as_bytes()).await?,
        b"alice@example.com"
    );
    Ok(())
}

#[tokio::test]
async fn create_tenant_is_idempotent_and_validates_ids() -> Result<()> {
    let f = fixture().await?;
    let a = f.keyring.create_tenant("acme", None).await?;
    let b = f.keyring.create_tenant("acme", None).await?;
    assert_eq!(a, b);
    assert!(matches!(
        f.keyring.create_tenant("bad id", None).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        f.keyring.tenant("ghost").await,
        Err(Error::TenantNotFound { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn concurrent_create_tenant_calls_store_one_key() -> Result<()> {
    let f = Arc::new(fixture().await?);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            f.keyring.create_tenant("acme", None).await
        }));
    }
    let mut infos = Vec::new();
    for t in tasks {
        infos.push(t.await??);
    }
    assert!(infos.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(f.keyring.tenant("acme").await?.versions.len(), 1);
    Ok(())
}

#[tokio::test]
async fn envelope_scope_must_match_the_request() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let subj_env = f
        .keyring
        .encrypt(&aad("acme", Some("alice"), "email", b"row:1"), b"x")
        .await?;
    let r = f
        .keyring
        .decrypt(&aad("acme", None, "email", b"row:1"), &subj_env)
        .await;
    assert!(
        matches!(
            r,
            Err(Error::ScopeMismatch {
                envelope: Scope::Subject,
                ..
            })
        ),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn rotation_moves_new_writes_and_keeps_old_versions_decryptable() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let a = aad("acme", None, "email", b"");
    let s = aad("acme", Some("alice"), "email", b"");
    let old = f.keyring.encrypt(&a, b"old").await?;
    let old_s = f.keyring.encrypt(&s, b"old-s").await?;
    let info = f.keyring.rotate_tenant("acme").await?;
    assert_eq!(info.active_version(), Some(2));
    assert_eq!(info.versions[0].state, KeyState::DecryptOnly);
    let new = f.keyring.encrypt(&a, b"new").await?;
    let new_s = f.keyring.encrypt(&s, b"new-s").await?;
    assert_eq!(
        fieldkey::crypto::Envelope::parse(&new)?.key_version(),
        2,
        "new writes use v2 at once"
    );
    assert_eq!(fieldkey::crypto::Envelope::parse(&new_s)?.key_version(), 2);
    assert_eq!(&*f.keyring.decrypt(&a, &old).await?, b"old");
    assert_eq!(&*f.keyring.decrypt(&a, &new).await?, b"new");
    assert_eq!(&*f.keyring.decrypt(&s, &old_s).await?, b"old-s");
    assert_eq!(&*f.keyring.decrypt(&s, &new_s).await?, b"new-s");
    Ok(())
}

#[tokio::test]
async fn unknown_key_version_is_reported_as_such() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let a = aad("acme", None, "email", b"");
    let mut env = f.keyring.encrypt(&a, b"x").await?;
    env[5..9].copy_from_slice(&77u32.to_be_bytes());
    let r = f.keyring.decrypt(&a, &env).await;
    assert!(
        matches!(r, Err(Error::UnknownKeyVersion { version: 77, .. })),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn destroyed_version_gives_key_destroyed_and_refuses_new_writes() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let a = aad("acme", None, "email", b"");
    let env = f.keyring.encrypt(&a, b"x").await?;
    assert!(f.keyring.destroy_key_version("acme", 1).await?);
    assert!(
        !f.keyring.destroy_key_version("acme", 1).await?,
        "idempotent"
    );
    let r = f.keyring.decrypt(&a, &env).await;
    assert!(
        matches!(
            r,
            Err(Error::KeyDestroyed {
                scope: Scope::Tenant,
                version: Some(1),
                ..
            })
        ),
        "{r:?}"
    );
    let r = f.keyring.encrypt(&a, b"y").await;
    assert!(matches!(r, Err(Error::KeyDestroyed { .. })), "{r:?}");
    // a rotation gives the tenant a usable key again; the old data stays shredded
    f.keyring.rotate_tenant("acme").await?;
    let env2 = f.keyring.encrypt(&a, b"y").await?;
    assert_eq!(&*f.keyring.decrypt(&a, &env2).await?, b"y");
    assert!(matches!(
        f.keyring.decrypt(&a, &env).await,
        Err(Error::KeyDestroyed { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn suspended_tenant_refuses_both_directions_until_resumed() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    f.keyring.rotate_tenant("acme").await?;
    let a = aad("acme", None, "email", b"");
    let env = f.keyring.encrypt(&a, b"x").await?;
    let info = f.keyring.suspend_tenant("acme").await?;
    assert!(info.versions.iter().all(|v| v.state == KeyState::Suspended));
    assert!(matches!(
        f.keyring.decrypt(&a, &env).await,
        Err(Error::KeySuspended {
            scope: Scope::Tenant,
            ..
        })
    ));
    assert!(matches!(
        f.keyring.encrypt(&a, b"y").await,
        Err(Error::KeySuspended { .. })
    ));
    assert!(matches!(
        f.keyring.rotate_tenant("acme").await,
        Err(Error::KeySuspended { .. })
    ));
    let info = f.keyring.resume_tenant("acme").await?;
    let states: Vec<_> = info.versions.iter().map(|v| v.state).collect();
    assert_eq!(
        states,
        vec![KeyState::DecryptOnly, KeyState::Active],
        "previous states restored"
    );
    assert_eq!(&*f.keyring.decrypt(&a, &env).await?, b"x");
    Ok(())
}

#[tokio::test]
async fn subject_suspend_resume_and_shred() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let alice = aad("acme", Some("alice"), "email", b"");
    let bob = aad("acme", Some("bob"), "email", b"");
    let ea = f.keyring.encrypt(&alice, b"alice@x").await?;
    let eb = f.keyring.encrypt(&bob, b"bob@x").await?;
    assert_eq!(
        f.keyring.subject("acme", "alice").await?.state,
        KeyState::Active
    );

    f.keyring.suspend_subject("acme", "alice").await?;
    f.keyring.suspend_subject("acme", "alice").await?; // idempotent
    assert!(matches!(
        f.keyring.decrypt(&alice, &ea).await,
        Err(Error::KeySuspended {
            scope: Scope::Subject,
            ..
        })
    ));
    assert!(matches!(
        f.keyring.encrypt(&alice, b"z").await,
        Err(Error::KeySuspended { .. })
    ));
    assert_eq!(
        &*f.keyring.decrypt(&bob, &eb).await?,
        b"bob@x",
        "others unaffected"
    );
    f.keyring.resume_subject("acme", "alice").await?;
    assert_eq!(&*f.keyring.decrypt(&alice, &ea).await?, b"alice@x");

    assert!(f.keyring.destroy_subject("acme", "alice").await?);
    assert!(!f.keyring.destroy_subject("acme", "alice").await?);
    assert!(matches!(
        f.keyring.decrypt(&alice, &ea).await,
        Err(Error::KeyDestroyed {
            scope: Scope::Subject,
            ..
        })
    ));
    assert!(
        matches!(
            f.keyring.encrypt(&alice, b"again").await,
            Err(Error::KeyDestroyed { .. })
        ),
        "a shredded subject is not silently given a new key"
    );
    assert!(matches!(
        f.keyring.resume_subject("acme", "alice").await,
        Err(Error::KeyDestroyed { .. })
    ));
    assert_eq!(&*f.keyring.decrypt(&bob, &eb).await?, b"bob@x");

    // the wrapped material is gone from the database itself
    use sqlx::{Connection, Row};
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", f.db_path.display())).await?;
    let row = sqlx::query("SELECT state, wrapped FROM fk_subjects WHERE subject_id = 'alice'")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(row.get::<String, _>("state"), "destroyed");
    assert!(row.get::<Option<Vec<u8>>, _>("wrapped").is_none());
    Ok(())
}

#[tokio::test]
async fn decrypt_for_unknown_subject_or_tenant_is_not_found() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let env = f
        .keyring
        .encrypt(&aad("acme", Some("alice"), "f", b""), b"x")
        .await?;
    assert!(matches!(
        f.keyring
            .decrypt(&aad("acme", Some("carol"), "f", b""), &env)
            .await,
        Err(Error::SubjectNotFound { .. })
    ));
    assert!(matches!(
        f.keyring
            .decrypt(&aad("ghost", Some("alice"), "f", b""), &env)
            .await,
        Err(Error::TenantNotFound { .. })
    ));
    assert!(matches!(
        f.keyring.encrypt(&aad("ghost", None, "f", b""), b"x").await,
        Err(Error::TenantNotFound { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cache_misses_make_exactly_one_kms_call() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    // Encrypt with a second keyring over the same store so this one starts cold.
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&f.db_path).await?);
    let env = Keyring::new(store.clone(), f.kms.clone(), KeyringConfig::default())
        .encrypt(&aad("acme", None, "email", b""), b"x")
        .await?;
    let cold = Arc::new(Keyring::new(store, f.kms.clone(), KeyringConfig::default()));
    let before = f.kms.unwrap_calls();
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (k, e) = (cold.clone(), env.clone());
        tasks.push(tokio::spawn(async move {
            k.decrypt(&aad("acme", None, "email", b""), &e).await
        }));
    }
    for t in tasks {
        assert_eq!(&*t.await??, b"x");
    }
    assert_eq!(
        f.kms.unwrap_calls() - before,
        1,
        "64 concurrent misses, one KMS unwrap"
    );
    Ok(())
}

#[tokio::test]
async fn state_changes_on_another_replica_are_enforced_within_revalidate_after() -> Result<()> {
    let db = common::PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    let kms = common::local_kms(&dir)?;
    let cfg = KeyringConfig {
        revalidate_after: Duration::from_millis(200),
        ..Default::default()
    };
    let a_store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
    let b_store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
    let a = Keyring::new(a_store, kms.clone(), cfg.clone());
    let b = Keyring::new(b_store, kms, cfg);
    a.create_tenant("acme", None).await?;
    let s = aad("acme", Some("alice"), "email", b"");
    let env = a.encrypt(&s, b"x").await?;
    assert_eq!(&*b.decrypt(&s, &env).await?, b"x", "b has it cached now");
    a.destroy_subject("acme", "alice").await?;
    let start = std::time::Instant::now();
    loop {
        match b.decrypt(&s, &env).await {
            Err(Error::KeyDestroyed { .. }) => break,
            Ok(_) if start.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!(
                "replica b still decrypts after {:?}: {other:?}",
                start.elapsed()
            ),
        }
    }
    // bound: revalidate_after (200 ms) plus one store read; slack for a loaded CI host
    assert!(
        start.elapsed() <= Duration::from_millis(800),
        "took {:?}",
        start.elapsed()
    );
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_serving_through_a_key_store_outage() -> Result<()> {
    let db = common::PgDb::create().await?;
    let upstream = common::socket_addr_of(&db.dsn)?;
    let proxy = common::proxy::TcpProxy::start(upstream).await?;
    let dsn_via_proxy = db
        .dsn
        .replace(&format!("{}", upstream.port()), &proxy.port.to_string());
    let dir = tempfile::tempdir()?;
    let cfg = KeyringConfig {
        revalidate_after: Duration::from_millis(50),
        ..Default::default()
    };
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&dsn_via_proxy).await?);
    let k = Keyring::new(store.clone(), common::local_kms(&dir)?, cfg);
    k.create_tenant("acme", None).await?;
    let a = aad("acme", None, "email", b"");
    let env = k.encrypt(&a, b"x").await?;
    proxy.stop().await;
    assert!(
        matches!(
            store.ping().await,
            Err(fieldkey::store::StoreError::Unavailable(_))
        ),
        "store is down"
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // metadata is now past revalidate_after
    assert_eq!(
        &*k.decrypt(&a, &env).await?,
        b"x",
        "cached tenant keeps decrypting"
    );
    let env2 = k.encrypt(&a, b"y").await?;
    assert_eq!(&*k.decrypt(&a, &env2).await?, b"y", "and encrypting");
    // an uncached tenant cannot be served
    let r = k.encrypt(&aad("other", None, "email", b""), b"z").await;
    assert!(
        matches!(
            r,
            Err(Error::Store(fieldkey::store::StoreError::Unavailable(_)))
        ),
        "{r:?}"
    );
    db.drop_db().await
}

/// Child half of `two_processes_creating_one_tenant_store_one_key`: does nothing unless
/// started by it.
#[tokio::test]
async fn child_process_create_tenant() -> Result<()> {
    let Ok(target) = std::env::var("FIELDKEY_CHILD_STORE") else {
        return Ok(());
    };
    let start_at: u64 = std::env::var("FIELDKEY_CHILD_START_AT")?.parse()?;
    let kms_path = std::env::var("FIELDKEY_CHILD_KMS")?;
    let store: Arc<dyn KeyStore> = if target.starts_with("postgres") {
        Arc::new(SqlStore::connect_postgres(&target).await?)
    } else {
        Arc::new(SqlStore::open_sqlite(std::path::Path::new(&target)).await?)
    };
    let kms = Arc::new(fieldkey::kms::local::LocalKms::open(
        std::path::Path::new(&kms_path),
        &secrecy::SecretString::from("test passphrase 123".to_owned()),
    )?);
    let k = Keyring::new(store, kms, KeyringConfig::default());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(now))).await;
    let info = k.create_tenant("shared", None).await?;
    println!("FINGERPRINT={}", info.versions[0].fingerprint);
    Ok(())
}

#[tokio::test]
async fn two_processes_creating_one_tenant_store_one_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::local_kms(&dir)?; // creates the key file both children open
    let db = common::PgDb::create().await?;
    let sqlite_path = dir.path().join("shared.db");
    for target in [sqlite_path.display().to_string(), db.dsn.clone()] {
        let start_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64
            + 1500;
        let spawn = || {
            std::process::Command::new(std::env::current_exe()?)
                .args([
                    "--exact",
                    "child_process_create_tenant",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("FIELDKEY_CHILD_STORE", &target)
                .env("FIELDKEY_CHILD_START_AT", start_at.to_string())
                .env("FIELDKEY_CHILD_KMS", dir.path().join("local-kms.json"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        };
        let (c1, c2) = (spawn()?, spawn()?);
        let outs = [c1.wait_with_output()?, c2.wait_with_output()?];
        let mut fps = Vec::new();
        for o in &outs {
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "child failed: {stdout}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            let fp = stdout
                .lines()
                .find_map(|l| l.split("FINGERPRINT=").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("no fingerprint line in: {stdout}"));
            fps.push(fp.to_owned());
        }
        assert_eq!(fps[0], fps[1], "{target}: both processes see the same key");
        let store: Arc<dyn KeyStore> = if target.starts_with("postgres") {
            Arc::new(SqlStore::connect_postgres(&target).await?)
        } else {
            Arc::new(SqlStore::open_sqlite(std::path::Path::new(&target)).await?)
        };
        assert_eq!(store.get_tenant("shared").await?.unwrap().versions.len(), 1);
    }
    db.drop_db().await
}

#[tokio::test]
async fn error_messages_never_contain_plaintext_or_subject_ids() -> Result<()> {
    let f = fixture().await?;
    f.keyring.create_tenant("acme", None).await?;
    let a = aad("acme", Some("jane.doe@example.com"), "email", b"");
    let env = f.keyring.encrypt(&a, b"TOP-SECRET-PLAINTEXT").await?;
    f.keyring
        .suspend_subject("acme", "jane.doe@example.com")
        .await?;
    let errs = vec![
        f.keyring.decrypt(&a, &env).await.unwrap_err(),
        f.keyring
            .decrypt(&aad("acme", Some("other"), "email", b""), &env)
            .await
            .unwrap_err(),
        f.keyring.decrypt(&a, b"garbage").await.unwrap_err(),
    ];
    for e in errs {
        let shown = format!("{e} / {e:?}");
        assert!(!shown.contains("TOP-SECRET"), "{shown}");
        assert!(!shown.contains("jane.doe"), "{shown}");
    }
    Ok(())
}

#[tokio::test]
async fn cached_keys_expire_after_key_ttl_and_are_unwrapped_again() -> Result<()> {
    let mut cfg = KeyringConfig::default();
    cfg.cache.key_ttl = Duration::from_millis(300);
    let f = fixture_with(cfg).await?;
    f.keyring.create_tenant("acme", None).await?;
    let a = aad("acme", None, "email", b"");
    let env = f.keyring.encrypt(&a, b"x").await?;
    let after_first = f.kms.unwrap_calls();
    f.keyring.decrypt(&a, &env).await?;
    assert_eq!(f.kms.unwrap_calls(), after_first, "served from cache");
    let cached_at = std::time::Instant::now();
    // Decrypt until the KMS is asked again: only once the entry has expired.
    common::eventually("the entry expires", Duration::from_secs(10), || async {
        f.keyring.decrypt(&a, &env).await.unwrap();
        (f.kms.unwrap_calls() > after_first).then_some(())
    })
    .await;
    assert!(
        cached_at.elapsed() >= Duration::from_millis(250),
        "expired early: {:?}",
        cached_at.elapsed()
    );
    assert_eq!(
        f.kms.unwrap_calls(),
        after_first + 1,
        "expired entry was dropped and unwrapped again"
    );
    Ok(())
}

#[tokio::test]
async fn cache_is_bounded_by_entry_count() -> Result<()> {
    let mut cfg = KeyringConfig::default();
    cfg.cache.max_tenants = 3;
    let f = fixture_with(cfg).await?;
    for i in 0..20 {
        let t = format!("t{i}");
        f.keyring.create_tenant(&t, None).await?;
        f.keyring.encrypt(&aad(&t, None, "f", b""), b"x").await?;
    }
    f.keyring.settle_cache().await;
    let (tenants, _) = f.keyring.cache_sizes();
    assert!(tenants <= 3, "{tenants} tenants cached");
    assert!(
        f.keyring
            .cache_stats()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 17
    );
    Ok(())
}
