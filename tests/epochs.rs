//! Key epochs (docs/ERASURE.md §6): erasure that reaches key-store backups.
//!
//! The attack first, then its end: a key-store backup taken before a shred, restored
//! whole, revives the shredded subject and tenant (the attack is real); after the roll
//! the same restored backup revives nobody, because the KMS key its rows need is
//! pending deletion (the local KMS refuses it at once, like AWS) and the live store
//! keeps nothing that opens them. Backups are made with the real tools: `sqlite3
//! .backup`, and `pg_dump` + `pg_restore` into a fresh database. Also: a store from
//! before epochs migrates with the first roll (no ciphertext changes), a roll survives
//! being cut off at any point and finishes when run again, and live traffic, shreds and
//! rotations racing a roll lose nothing.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use fieldkey::epochs::{EpochSettings, Epochs};
use fieldkey::kms::Kms;
use fieldkey::kms::local::LocalKms;
use fieldkey::model::EpochState;
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::wiring::Parts;
use fieldkey::{Error, Keyring, KeyringConfig};

use common::{FAST_KDF, PgDb, aad};

/// A KMS with its own keys directory (apart from the "data directory" the store lives
/// in: a restore of the data directory does not touch it).
fn kms(kms_dir: &tempfile::TempDir) -> Result<Arc<LocalKms>> {
    let kms = LocalKms::open_or_create(
        &kms_dir.path().join("local-kms.json"),
        &secrecy::SecretString::from("test passphrase 123".to_owned()),
        FAST_KDF,
    )?
    .with_keys_dir(&kms_dir.path().join("keys"))?;
    Ok(Arc::new(kms))
}

fn settings(window_days: u32) -> EpochSettings {
    EpochSettings {
        kms_deletion_days: window_days,
        store_tag: "test".into(),
        ..EpochSettings::default()
    }
}

struct Side {
    keyring: Arc<Keyring>,
    epochs: Arc<Epochs>,
}

fn side(store: Arc<dyn KeyStore>, kms: Arc<dyn Kms>, cfg: EpochSettings) -> Side {
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = Parts::new(keyring.clone(), store, kms);
    Side {
        keyring,
        epochs: Arc::new(parts.epochs(cfg)),
    }
}

async fn roll(s: &Side) -> Result<()> {
    s.epochs.roll(true, &|_| {}).await?;
    Ok(())
}

/// Where a test's store lives, and how it is backed up and restored with real tools.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PgDb),
}

impl Backend {
    async fn open(&self) -> Result<Arc<dyn KeyStore>> {
        Ok(match self {
            Backend::Sqlite(d) => Arc::new(SqlStore::open_sqlite(&d.path().join("keys.db")).await?),
            Backend::Postgres(db) => Arc::new(SqlStore::connect_postgres(&db.dsn).await?),
        })
    }

    /// A backup, with `sqlite3 .backup` or `pg_dump -Fc`.
    fn backup(&self, to: &std::path::Path) -> Result<()> {
        let out = match self {
            Backend::Sqlite(d) => std::process::Command::new("sqlite3")
                .arg(d.path().join("keys.db"))
                .arg(format!(".backup '{}'", to.display()))
                .output()?,
            Backend::Postgres(db) => std::process::Command::new("pg_dump")
                .args(["-Fc", "-f"])
                .arg(to)
                .arg(&db.dsn)
                .output()?,
        };
        ensure!(
            out.status.success(),
            "backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The backup restored whole into a fresh store (SQLite: a copy of the file;
    /// PostgreSQL: `pg_restore` into a new database).
    async fn restore(&self, from: &std::path::Path) -> Result<(Arc<dyn KeyStore>, Option<PgDb>)> {
        match self {
            Backend::Sqlite(_) => {
                let dir = tempfile::tempdir()?;
                let path = dir.keep().join("restored.db");
                std::fs::copy(from, &path)?;
                Ok((Arc::new(SqlStore::open_sqlite(&path).await?), None))
            }
            Backend::Postgres(_) => {
                let db = PgDb::create().await?;
                let out = std::process::Command::new("pg_restore")
                    .args(["--no-owner", "-d"])
                    .arg(&db.dsn)
                    .arg(from)
                    .output()?;
                ensure!(
                    out.status.success(),
                    "pg_restore failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok((
                    Arc::new(SqlStore::connect_postgres(&db.dsn).await?),
                    Some(db),
                ))
            }
        }
    }
}

async fn seal_reaches_backups(backend: Backend) -> Result<()> {
    let kms_dir = tempfile::tempdir()?;
    let kms: Arc<dyn Kms> = kms(&kms_dir)?;
    let live = side(backend.open().await?, kms.clone(), settings(7));
    roll(&live).await?; // epoch 1
    let k = &live.keyring;
    k.create_tenant("acme", None).await?;
    k.create_tenant("gone", None).await?;
    let ct_alice = k
        .encrypt(&aad("acme", Some("alice"), "email", b"r1"), b"alice@x")
        .await?;
    let ct_bob = k
        .encrypt(&aad("acme", Some("bob"), "email", b"r2"), b"bob@x")
        .await?;
    let ct_gone = k
        .encrypt(&aad("gone", Some("carol"), "email", b"r3"), b"carol@x")
        .await?;
    let ct_tenant = k
        .encrypt(&aad("acme", None, "plan", b"r4"), b"gold")
        .await?;

    let backups = tempfile::tempdir()?;
    let backup = backups.path().join("keys.backup");
    backend.backup(&backup)?;

    k.shred_subject("acme", "alice").await?;
    k.shred_tenant("gone").await?;
    assert!(matches!(
        k.decrypt(&aad("acme", Some("alice"), "email", b"r1"), &ct_alice)
            .await,
        Err(Error::KeyDestroyed { .. })
    ));

    // The attack: the whole backup, restored, with the live KMS: both revive.
    let (restored, db1) = backend.restore(&backup).await?;
    let thief = side(restored, kms.clone(), settings(7));
    let pt = thief
        .keyring
        .decrypt(&aad("acme", Some("alice"), "email", b"r1"), &ct_alice)
        .await?;
    assert_eq!(
        pt.as_bytes(),
        b"alice@x",
        "the attack must be real before the roll"
    );
    let pt = thief
        .keyring
        .decrypt(&aad("gone", Some("carol"), "email", b"r3"), &ct_gone)
        .await?;
    assert_eq!(pt.as_bytes(), b"carol@x");

    // The roll: epoch 2; epoch 1's KMS key is verified unused, then pending deletion.
    roll(&live).await?;
    let epochs = live.epochs.status().await?;
    assert_eq!(epochs.active, Some(2));
    let e1 = &epochs
        .epochs
        .iter()
        .find(|e| e.record.epoch == 1)
        .unwrap()
        .record;
    assert_eq!(e1.state, EpochState::Sealed);
    assert_eq!(e1.kms_status.as_deref(), Some("scheduled"));
    assert!(e1.deletion_date.is_some());
    let seal = epochs.epochs.iter().find(|e| e.record.epoch == 1).unwrap();
    let statement = seal.seal_statement.clone().unwrap();
    let public = Parts::new(live.keyring.clone(), backend.open().await?, kms.clone())
        .signing_keys()
        .signer("erasure-receipt", "test".into())
        .public_key()
        .await?
        .1;
    let verified = fieldkey::epochs::seal::verify(&statement, &public)?;
    assert_eq!(verified.epoch, 1);

    // Live data is untouched: no ciphertext moved, everything live decrypts.
    let pt = k
        .decrypt(&aad("acme", Some("bob"), "email", b"r2"), &ct_bob)
        .await?;
    assert_eq!(pt.as_bytes(), b"bob@x");
    let pt = k
        .decrypt(&aad("acme", None, "plan", b"r4"), &ct_tenant)
        .await?;
    assert_eq!(pt.as_bytes(), b"gold");
    // A fresh keyring on the live store (cold cache) too.
    let cold = side(backend.open().await?, kms.clone(), settings(7));
    let pt = cold
        .keyring
        .decrypt(&aad("acme", Some("bob"), "email", b"r2"), &ct_bob)
        .await?;
    assert_eq!(pt.as_bytes(), b"bob@x");
    assert!(matches!(
        cold.keyring
            .decrypt(&aad("acme", Some("alice"), "email", b"r1"), &ct_alice)
            .await,
        Err(Error::KeyDestroyed { .. })
    ));

    // The same backup restored again: nobody revives.
    let (restored, db2) = backend.restore(&backup).await?;
    let thief = side(restored, kms.clone(), settings(7));
    for (who, ct, ctx) in [
        (("acme", Some("alice")), &ct_alice, b"r1"),
        (("gone", Some("carol")), &ct_gone, b"r3"),
    ] {
        let r = thief
            .keyring
            .decrypt(&aad(who.0, who.1, "email", ctx), ct)
            .await;
        assert!(
            matches!(r, Err(Error::Kms(_))),
            "{who:?} revived from a restored backup after the roll: {r:?}"
        );
    }
    for db in [db1, db2].into_iter().flatten() {
        db.drop_db().await?;
    }
    if let Backend::Postgres(db) = backend {
        db.drop_db().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_restored_sqlite_backup_revives_nobody_after_the_roll() -> Result<()> {
    seal_reaches_backups(Backend::Sqlite(tempfile::tempdir()?)).await
}

#[tokio::test]
async fn a_restored_postgres_backup_revives_nobody_after_the_roll() -> Result<()> {
    seal_reaches_backups(Backend::Postgres(PgDb::create().await?)).await
}

/// A store from before epochs (tenant versions under the default key, subject keys
/// under tenant versions) moves to epochs with the first roll; no ciphertext changes.
#[tokio::test]
async fn a_sqlite_store_from_before_epochs_moves_with_the_first_roll() -> Result<()> {
    let data = tempfile::tempdir()?;
    migrates(Arc::new(
        SqlStore::open_sqlite(&data.path().join("keys.db")).await?,
    ))
    .await
}

#[tokio::test]
async fn a_postgres_store_from_before_epochs_moves_with_the_first_roll() -> Result<()> {
    let db = PgDb::create().await?;
    migrates(Arc::new(SqlStore::connect_postgres(&db.dsn).await?)).await?;
    db.drop_db().await
}

async fn migrates(store: Arc<dyn KeyStore>) -> Result<()> {
    let kms_dir = tempfile::tempdir()?;
    let kms: Arc<dyn Kms> = kms(&kms_dir)?;
    let s = side(store.clone(), kms.clone(), settings(0));
    let k = &s.keyring;
    k.create_tenant("old", None).await?;
    let mut cts = Vec::new();
    for i in 0..20 {
        let who = format!("u{i}");
        cts.push((
            who.clone(),
            k.encrypt(&aad("old", Some(&who), "f", b""), who.as_bytes())
                .await?,
        ));
    }
    k.rotate_tenant("old").await?; // subject keys stay under v1
    let legacy = store.get_subject("old", "u0").await?.unwrap();
    assert!(legacy.swk_id.is_none() && legacy.wrap_version == 1);

    roll(&s).await?;
    let st = s.epochs.status().await?;
    let e0 = &st
        .epochs
        .iter()
        .find(|e| e.record.epoch == 0)
        .unwrap()
        .record;
    assert_eq!(e0.kms_key_id.as_deref(), Some(kms.default_key_id()));
    assert_eq!(e0.kms_status.as_deref(), Some("kept-legacy"));
    assert_eq!(
        st.restorable_backups_since_unix_ms, None,
        "a kept legacy key keeps every old backup restorable (no bound), and the status says so"
    );
    let moved = store.get_subject("old", "u0").await?.unwrap();
    assert_eq!(moved.swk_id.as_deref(), Some("1:old"));
    let t = store.get_tenant("old").await?.unwrap();
    assert!(t.versions.iter().all(|v| v.epoch == Some(1)));
    assert_eq!(t.own_kms_key, Some(false));
    for (who, ct) in &cts {
        let cold = side(store.clone(), kms.clone(), settings(0));
        let pt = cold
            .keyring
            .decrypt(&aad("old", Some(who), "f", b""), ct)
            .await?;
        assert_eq!(pt.as_bytes(), who.as_bytes());
    }
    // Epoch 1 -> 2 with a 0-day window: epoch 1's key file is gone at once.
    roll(&s).await?;
    let st = s.epochs.status().await?;
    let e1 = &st
        .epochs
        .iter()
        .find(|e| e.record.epoch == 1)
        .unwrap()
        .record;
    assert_eq!(
        kms.key_status(e1.kms_key_id.as_deref().unwrap()).await?,
        fieldkey::kms::KeyStatus::Deleted
    );
    let (who, ct) = cts.get(3).unwrap();
    let pt = side(store.clone(), kms.clone(), settings(0))
        .keyring
        .decrypt(&aad("old", Some(who), "f", b""), ct)
        .await?;
    assert_eq!(pt.as_bytes(), who.as_bytes());
    Ok(())
}

/// A roll cut off at any point (its future dropped, as a killed process would) is
/// finished by running it again: nothing lost, nothing left under the old epoch.
#[tokio::test]
async fn a_roll_cut_off_anywhere_finishes_when_run_again() -> Result<()> {
    let data = tempfile::tempdir()?;
    let kms_dir = tempfile::tempdir()?;
    let kms: Arc<dyn Kms> = kms(&kms_dir)?;
    let store: Arc<dyn KeyStore> =
        Arc::new(SqlStore::open_sqlite(&data.path().join("keys.db")).await?);
    let s = side(store.clone(), kms.clone(), settings(7));
    roll(&s).await?;
    let mut cts = Vec::new();
    for t in 0..3 {
        let tenant = format!("t{t}");
        s.keyring.create_tenant(&tenant, None).await?;
        for i in 0u32..300 {
            let who = format!("u{i}");
            if i.is_multiple_of(50) {
                cts.push((
                    tenant.clone(),
                    who.clone(),
                    s.keyring
                        .encrypt(&aad(&tenant, Some(&who), "f", b""), who.as_bytes())
                        .await?,
                ));
            } else {
                s.keyring.ensure_subject(&tenant, &who).await?;
            }
        }
    }
    for cut_ms in [1u64, 3, 7, 15, 30, 60] {
        let r =
            tokio::time::timeout(Duration::from_millis(cut_ms), s.epochs.roll(true, &|_| {})).await;
        if r.is_ok() {
            continue;
        }
        // Cut off: the next run resumes (same owner: the lease is its own).
    }
    s.epochs.roll(false, &|_| {}).await?;
    let st = s.epochs.status().await?;
    for e in &st.epochs {
        assert!(
            matches!(e.record.state, EpochState::Active | EpochState::Sealed),
            "epoch {} left {:?}",
            e.record.epoch,
            e.record.state
        );
        if e.record.state == EpochState::Sealed {
            let u = store
                .epoch_usage(e.record.epoch, e.record.kms_key_id.as_deref().unwrap())
                .await?;
            assert!(
                u.is_empty(),
                "sealed epoch {} still needed: {u:?}",
                e.record.epoch
            );
        }
    }
    for (tenant, who, ct) in &cts {
        let cold = side(store.clone(), kms.clone(), settings(7));
        let pt = cold
            .keyring
            .decrypt(&aad(tenant, Some(who), "f", b""), ct)
            .await?;
        assert_eq!(pt.as_bytes(), who.as_bytes());
    }
    Ok(())
}

/// Live traffic, new subjects, shreds and rotations racing a roll on PostgreSQL: no
/// live call fails, no shredded key is carried into the new epoch.
#[tokio::test]
async fn traffic_shreds_and_rotations_racing_a_roll_lose_nothing() -> Result<()> {
    let db = PgDb::create().await?;
    let kms_dir = tempfile::tempdir()?;
    let kms: Arc<dyn Kms> = kms(&kms_dir)?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
    let roller = side(store.clone(), kms.clone(), settings(7));
    roll(&roller).await?;
    // A second "replica": its own keyring and cache on the same store.
    let other = side(
        Arc::new(SqlStore::connect_postgres(&db.dsn).await?),
        kms.clone(),
        settings(7),
    );
    other.keyring.create_tenant("t", None).await?;
    for i in 0..200 {
        other.keyring.ensure_subject("t", &format!("s{i}")).await?;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let traffic = {
        let k = other.keyring.clone();
        let stop = stop.clone();
        let rounds = rounds.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let who = format!("s{}", n % 100);
                let new = format!("new{n}");
                let ct = k.encrypt(&aad("t", Some(&who), "f", b""), b"v").await?;
                k.decrypt(&aad("t", Some(&who), "f", b""), &ct).await?;
                k.encrypt(&aad("t", Some(&new), "f", b""), b"v").await?;
                if n.is_multiple_of(10) {
                    k.shred_subject("t", &format!("s{}", 100 + n / 10)).await?;
                }
                if n.is_multiple_of(25) {
                    k.rotate_tenant("t").await?;
                }
                n += 1;
                rounds.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, Error>(n)
        })
    };
    // The roll starts once traffic is flowing (its first shred and rotation done).
    common::eventually("traffic is flowing", Duration::from_secs(30), || async {
        (rounds.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    roll(&roller).await?;
    roll(&roller).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = traffic.await??;
    assert!(n > 0);
    let st = roller.epochs.status().await?;
    assert_eq!(st.active, Some(3));
    for e in st
        .epochs
        .iter()
        .filter(|e| e.record.state == EpochState::Sealed)
    {
        let u = store
            .epoch_usage(e.record.epoch, e.record.kms_key_id.as_deref().unwrap())
            .await?;
        assert!(
            u.is_empty(),
            "sealed epoch {} still needed: {u:?}",
            e.record.epoch
        );
    }
    // Shredded subjects were not carried forward: no material, no SWK reference.
    for i in (100..100 + n / 10).take(20) {
        let s = store.get_subject("t", &format!("s{i}")).await?.unwrap();
        assert!(
            s.wrapped.is_none() && s.swk_id.is_none(),
            "s{i} carried forward"
        );
    }
    db.drop_db().await?;
    Ok(())
}

/// A replica whose view of the epochs predates the first roll (revalidation 60 s)
/// rotates a tenant right after the roll: whether the legacy key was kept (the store
/// refuses a new version under it once an epoch is active) or retired (the KMS refuses
/// it), the keyring retries under the epoch key; nothing new needs the legacy key.
#[tokio::test]
async fn a_stale_replica_cannot_wrap_new_keys_under_the_legacy_key_after_the_first_roll()
-> Result<()> {
    for retire in [false, true] {
        let data = tempfile::tempdir()?;
        let kms_dir = tempfile::tempdir()?;
        let kms: Arc<dyn Kms> = kms(&kms_dir)?;
        let store: Arc<dyn KeyStore> =
            Arc::new(SqlStore::open_sqlite(&data.path().join("keys.db")).await?);
        let roller = side(
            store.clone(),
            kms.clone(),
            EpochSettings {
                retire_legacy_key: retire,
                ..settings(7)
            },
        );
        roller.keyring.create_tenant("old", None).await?;
        let stale = Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig {
                revalidate_after: Duration::from_secs(60),
                ..KeyringConfig::default()
            },
        );
        assert_eq!(stale.active_epoch(false).await?, None);
        roll(&roller).await?;
        assert_eq!(stale.active_epoch(false).await?, None, "the view is stale");
        stale.rotate_tenant("old").await?;
        let t = store.get_tenant("old").await?.unwrap();
        let v2 = t.version(2).unwrap();
        assert_eq!(v2.epoch, Some(1), "retire={retire}: v2 must ride epoch 1");
        assert_ne!(v2.kms_key_id, kms.default_key_id());
        let st = roller.epochs.status().await?;
        let e0 = &st
            .epochs
            .iter()
            .find(|e| e.record.epoch == 0)
            .unwrap()
            .record;
        assert_eq!(e0.state, EpochState::Sealed);
        let want = if retire { "scheduled" } else { "kept-legacy" };
        assert_eq!(e0.kms_status.as_deref(), Some(want));
    }
    Ok(())
}
