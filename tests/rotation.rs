//! Rotation beyond a new version: rewrapping ciphertexts, key-age policy checks,
//! cross-replica rotation, and the evidence retirement requires.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use fieldkey::crypto::{Aad, to_text};
use fieldkey::policy::{RotationPolicy, RotationStatus};
use fieldkey::store::{JobProgress, JobState, JobUpdate, KeyState, KeyStore, NewJob, SqlStore};
use fieldkey::{Error, Keyring, KeyringConfig};

const DAY_MS: i64 = 86_400_000;

async fn sqlite_keyring(dir: &tempfile::TempDir) -> Result<Keyring> {
    Ok(sqlite_keyring_and_store(dir).await?.0)
}

/// A keyring on a fresh SQLite store, with that store and the KMS (for tests that
/// seed or read the store directly).
async fn sqlite_keyring_and_store(
    dir: &tempfile::TempDir,
) -> Result<(Keyring, Arc<dyn KeyStore>, Arc<dyn fieldkey::kms::Kms>)> {
    let store = common::sqlite_store(dir).await?;
    let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(dir)?;
    let k = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    Ok((k, store, kms))
}

fn aad<'a>(subject: Option<&'a str>, ctx: &'a [u8]) -> Aad<'a> {
    Aad {
        tenant: "acme",
        subject,
        field: "email",
        context: ctx,
    }
}

#[tokio::test]
async fn rewrap_moves_values_to_the_active_version_in_the_same_form() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let k = sqlite_keyring(&dir).await?;
    k.create_tenant("acme", None).await?;
    for subject in [None, Some("alice")] {
        let a = aad(subject, b"row-7");
        let bin = k.encrypt(&a, b"secret").await?;
        let text = to_text(&bin).into_bytes();
        let on_v1 = k.rewrap(&a, &bin).await?;
        assert!(!on_v1.changed(), "already current: unchanged");
        assert_eq!(on_v1.ciphertext, bin);
        k.rotate_tenant("acme").await?;
        let v = k.tenant("acme").await?.active_version().unwrap();
        for input in [&bin, &text] {
            let r = k.rewrap(&a, input).await?;
            assert!(r.changed());
            assert_eq!((r.from_version, r.to_version), (v - 1, v));
            assert_eq!(
                r.ciphertext.starts_with(b"fk1:"),
                input.starts_with(b"fk1:"),
                "the form is kept"
            );
            let (pt, ver) = k.decrypt_versioned(&a, &r.ciphertext).await?;
            assert_eq!((&pt[..], ver), (&b"secret"[..], v));
            assert!(!k.rewrap(&a, &r.ciphertext).await?.changed());
        }
        // the plaintext is checked on the way: a moved ciphertext fails as it would
        // on decrypt, and nothing is produced
        let e = k.rewrap(&aad(subject, b"row-8"), &bin).await.unwrap_err();
        assert!(matches!(e, Error::AuthenticationFailed), "{e:?}");
        let e = k.rewrap(&a, b"garbage").await.unwrap_err();
        assert!(matches!(e, Error::MalformedEnvelope(_)), "{e:?}");
    }
    Ok(())
}

#[tokio::test]
async fn rotation_reaches_another_replica_within_the_revalidation_interval() -> Result<()> {
    let db = common::PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    let kms = common::local_kms(&dir)?;
    let cfg = KeyringConfig {
        revalidate_after: Duration::from_millis(200),
        ..KeyringConfig::default()
    };
    let a = Keyring::new(
        Arc::new(SqlStore::connect_postgres(&db.dsn).await?),
        kms.clone(),
        cfg.clone(),
    );
    let b = Keyring::new(
        Arc::new(SqlStore::connect_postgres(&db.dsn).await?),
        kms,
        cfg,
    );
    a.create_tenant("acme", None).await?;
    let x = aad(None, b"");
    assert_eq!(a.encryptor("acme", None, "email").await?.key_version(), 1);
    b.rotate_tenant("acme").await?;
    let t0 = Instant::now();
    loop {
        let v = a.encryptor("acme", None, "email").await?.key_version();
        if v == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "replica never saw v2"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t0.elapsed();
    eprintln!("replica A encrypts with v2 {took:?} after B rotated");
    assert!(took <= Duration::from_millis(800), "{took:?}");
    let ct = a.encrypt(&x, b"v").await?;
    assert_eq!(b.decrypt_versioned(&x, &ct).await?.1, 2);
    db.drop_db().await
}

#[tokio::test]
async fn rotate_due_rotates_only_tenants_past_the_maximum_age() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let k = sqlite_keyring(&dir).await?;
    for t in ["fresh", "old", "older", "stopped"] {
        k.create_tenant(t, None).await?;
    }
    k.suspend_tenant("stopped").await?;
    let policy = RotationPolicy::default();
    let now = k.tenant("fresh").await?.versions[0].created_at + 60_000;
    // the clock moves instead of the keys: judge "old" at +340 days, "older" at +400
    let shift = |t: &str, days: i64| {
        let path = dir.path().join("keys.db");
        let t = t.to_owned();
        async move {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
            sqlx::query(
                "UPDATE fk_tenant_keys SET created_at = created_at - $2 WHERE tenant_id = $1",
            )
            .bind(t)
            .bind(days * DAY_MS)
            .execute(&pool)
            .await?;
            pool.close().await;
            anyhow::Ok(())
        }
    };
    shift("old", 340).await?;
    shift("older", 400).await?;
    let report = k.rotate_due(&policy, now, true).await?;
    let status: Vec<_> = report
        .iter()
        .map(|c| (c.age.tenant_id.as_str(), c.age.status, c.rotated_to))
        .collect();
    assert_eq!(
        status,
        vec![
            ("fresh", RotationStatus::Ok, None),
            ("old", RotationStatus::DueSoon, None),
            ("older", RotationStatus::Overdue, None),
            ("stopped", RotationStatus::NoActiveKey, None),
        ]
    );
    assert!(report[2].age.age_ms >= 400 * DAY_MS);
    assert_eq!(
        k.tenant("older").await?.versions.len(),
        1,
        "dry run rotates nothing"
    );
    let report = k.rotate_due(&policy, now, false).await?;
    assert_eq!(report[2].rotated_to, Some(2));
    assert!(report.iter().all(|c| c.error.is_none()));
    assert_eq!(k.tenant("older").await?.active_version(), Some(2));
    assert_eq!(k.tenant("old").await?.active_version(), Some(1));
    // the next run finds nothing overdue
    let again = k.rotate_due(&policy, now, false).await?;
    assert!(again.iter().all(|c| c.rotated_to.is_none()));
    Ok(())
}

async fn completed_job(
    store: &dyn KeyStore,
    id: &str,
    target: &str,
    tenant: Option<&str>,
    leftovers: &[(&str, u32)],
) -> Result<()> {
    completed_job_over(store, id, target, tenant, leftovers, "{}").await
}

async fn completed_job_over(
    store: &dyn KeyStore,
    id: &str,
    target: &str,
    tenant: Option<&str>,
    leftovers: &[(&str, u32)],
    spec: &str,
) -> Result<()> {
    completed_job_full(store, id, target, tenant, leftovers, spec, 0).await
}

async fn completed_job_full(
    store: &dyn KeyStore,
    id: &str,
    target: &str,
    tenant: Option<&str>,
    leftovers: &[(&str, u32)],
    spec: &str,
    runner_revalidate_ms: u64,
) -> Result<()> {
    store
        .create_job(NewJob {
            job_id: id.into(),
            target: target.into(),
            tenant_id: tenant.map(str::to_owned),
            spec: spec.into(),
            progress: "{}".into(),
        })
        .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let one = fieldkey::store::NewShard {
        lo: None,
        hi: None,
        state: JobState::Pending,
    };
    assert!(store.plan_job(id, &[one], now).await?);
    store
        .claim_job_shard(id, 0, "t", now, now + 10_000)
        .await?
        .unwrap();
    let mut p = JobProgress {
        revalidate_ms: runner_revalidate_ms,
        ..JobProgress::default()
    };
    for (t, v) in leftovers {
        p.leftovers
            .entry((*t).to_owned())
            .or_default()
            .insert(*v, 1);
    }
    assert!(
        store
            .update_job_shard(
                id,
                0,
                "t",
                JobUpdate {
                    state: JobState::Completed,
                    checkpoint: None,
                    progress: p.to_json(),
                    error: None,
                    lease_until: 0,
                },
                &fieldkey::jobs::totals,
            )
            .await?
            .is_some()
    );
    Ok(())
}

/// Waits until the clock is `ms` past the creation of acme's key `version` (the
/// runners' revalidation bound that retirement checks a job against).
async fn past_rotation(store: &dyn KeyStore, version: u32, ms: i64) -> Result<()> {
    let t = store.get_tenant("acme").await?.unwrap();
    let v = t.versions.iter().find(|v| v.version == version).unwrap();
    common::clock_past(v.created_at + ms).await;
    Ok(())
}

fn blocked(r: Result<fieldkey::keyring::TenantInfo, Error>, needle: &str) {
    match r {
        Err(Error::RetirementBlocked { reason, .. }) => {
            assert!(
                reason.contains(needle),
                "{reason:?} does not say {needle:?}"
            )
        }
        other => panic!("expected RetirementBlocked ({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn retirement_requires_a_clean_completed_job_for_every_table() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (k, store, kms) = sqlite_keyring_and_store(&dir).await?;
    k.create_tenant("acme", None).await?;
    let old = k.encrypt(&aad(Some("alice"), b""), b"x").await?;
    // a job finished before the rotation proves nothing about v1
    completed_job(store.as_ref(), "early", "public.users", None, &[]).await?;
    common::clock_past(common::now_ms()).await; // the rotation comes a millisecond later
    k.rotate_tenant("acme").await?;
    blocked(k.retire_key_version("acme", 2).await, "active version");
    blocked(k.retire_key_version("acme", 1).await, "public.users");
    let e = k.retire_key_version("acme", 9).await.unwrap_err();
    assert!(matches!(e, Error::UnknownKeyVersion { .. }), "{e:?}");
    // wait out the revalidation interval: writes by stale replicas may still use v1
    past_rotation(store.as_ref(), 2, 1000).await?;
    // a job that left a v1 ciphertext of acme behind does not count
    completed_job(
        store.as_ref(),
        "dirty",
        "public.users",
        None,
        &[("acme", 1)],
    )
    .await?;
    blocked(k.retire_key_version("acme", 1).await, "public.users");
    // another tenant's leftovers do not matter; but every table seen must be covered
    completed_job(
        store.as_ref(),
        "users",
        "public.users",
        None,
        &[("other", 1)],
    )
    .await?;
    completed_job(store.as_ref(), "notes", "public.notes", Some("globex"), &[]).await?;
    completed_job(store.as_ref(), "posts-a", "public.posts", Some("acme"), &[]).await?;
    let unfinished = NewJob {
        job_id: "orders".into(),
        target: "public.orders".into(),
        tenant_id: None,
        spec: "{}".into(),
        progress: "{}".into(),
    };
    store.create_job(unfinished).await?;
    blocked(k.retire_key_version("acme", 1).await, "public.orders");
    completed_job(
        store.as_ref(),
        "orders-2",
        "public.orders",
        Some("acme"),
        &[],
    )
    .await?;
    let info = k.retire_key_version("acme", 1).await?;
    assert_eq!(info.versions[0].state, KeyState::Retired);
    assert!(k.retire_key_version("acme", 1).await.is_ok(), "idempotent");
    // alice's key was wrapped under v1: it moved to v2 first, so her data survives
    assert_eq!(k.subject("acme", "alice").await?.wrap_version, 2);
    let fresh = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    let new = fresh.encrypt(&aad(Some("alice"), b""), b"y").await?;
    assert_eq!(&*fresh.decrypt(&aad(Some("alice"), b""), &new).await?, b"y");
    // a ciphertext still on v1 now fails with its own error, here and elsewhere
    for kr in [&k, &fresh] {
        let e = kr
            .decrypt(&aad(Some("alice"), b""), &old)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::KeyRetired { version: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("retired"), "{e}");
    }
    let e = k
        .suspend_tenant("acme")
        .await
        .and(k.retire_key_version("acme", 2).await);
    assert!(matches!(e, Err(Error::KeySuspended { .. })), "{e:?}");
    Ok(())
}

#[tokio::test]
async fn retirement_needs_a_clean_job_for_every_column_ever_covered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (k, store, _) = sqlite_keyring_and_store(&dir).await?;
    k.create_tenant("acme", None).await?;
    let cols = |names: &[&str]| {
        let c: Vec<String> = names
            .iter()
            .map(|n| format!(r#"{{"name":"{n}","field":"{n}"}}"#))
            .collect();
        format!(r#"{{"columns":[{}]}}"#, c.join(","))
    };
    // an earlier job walked email and phone of DB:users
    completed_job_over(
        store.as_ref(),
        "old",
        "DB:users",
        None,
        &[],
        &cols(&["email", "phone"]),
    )
    .await?;
    common::clock_past(common::now_ms()).await; // the rotation comes a millisecond later
    k.rotate_tenant("acme").await?;
    past_rotation(store.as_ref(), 2, 1000).await?;
    // re-encrypting email alone does not prove phone moved
    completed_job_over(
        store.as_ref(),
        "email",
        "DB:users",
        None,
        &[],
        &cols(&["email"]),
    )
    .await?;
    blocked(
        k.retire_key_version("acme", 1).await,
        "column phone of DB:users",
    );
    // the same table name in another database is another target
    completed_job_over(
        store.as_ref(),
        "phone-other-db",
        "OTHER:users",
        None,
        &[],
        &cols(&["phone"]),
    )
    .await?;
    blocked(
        k.retire_key_version("acme", 1).await,
        "column phone of DB:users",
    );
    completed_job_over(
        store.as_ref(),
        "phone",
        "DB:users",
        Some("acme"),
        &[],
        &cols(&["phone"]),
    )
    .await?;
    k.retire_key_version("acme", 1).await?;
    Ok(())
}

#[tokio::test]
async fn retirement_waits_out_the_runners_own_staleness_bound() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (k, store, _) = sqlite_keyring_and_store(&dir).await?;
    k.create_tenant("acme", None).await?;
    k.rotate_tenant("acme").await?;
    past_rotation(store.as_ref(), 2, 1000).await?;
    // a runner that revalidates only every 60 s may have missed the rotation
    completed_job_full(store.as_ref(), "lazy", "DB:t", None, &[], "{}", 60_000).await?;
    blocked(k.retire_key_version("acme", 1).await, "table DB:t");
    completed_job_full(store.as_ref(), "eager", "DB:t", None, &[], "{}", 1_000).await?;
    k.retire_key_version("acme", 1).await?;
    Ok(())
}
