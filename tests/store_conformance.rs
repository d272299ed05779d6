//! One conformance suite for the `KeyStore` trait, run against a real SQLite file and a
//! real PostgreSQL database.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::Arc;

use anyhow::Result;
use fieldkey::kms::WrappedKey;
use fieldkey::store::{KeyState, KeyStore, NewKeyVersion, NewSubject, SqlStore, StoreError};

fn wrapped(tag: u8) -> WrappedKey {
    let mut v = common::rand_bytes::<40>().to_vec();
    v[0] = tag;
    WrappedKey::new(v)
}

fn nv(version: u32, tag: u8) -> NewKeyVersion {
    NewKeyVersion {
        version,
        kms_key_id: "kms-1".into(),
        wrapped: wrapped(tag),
    }
}

mod suite {
    use super::*;

    pub async fn create_tenant_is_insert_if_absent(s: Arc<dyn KeyStore>) -> Result<()> {
        let first = nv(1, 1);
        let created = s.create_tenant("t1", "kms-1", first.clone()).await?;
        assert!(created.was_created());
        let rec = created.into_inner();
        assert_eq!(rec.versions.len(), 1);
        assert_eq!(rec.versions[0].state, KeyState::Active);
        assert_eq!(rec.versions[0].wrapped.as_ref(), Some(&first.wrapped));
        assert_eq!(rec.versions[0].fingerprint, first.wrapped.fingerprint());
        let again = s.create_tenant("t1", "kms-other", nv(1, 2)).await?;
        assert!(!again.was_created());
        assert_eq!(
            again.into_inner(),
            rec,
            "existing tenant is returned unchanged"
        );
        assert!(s.get_tenant("nope").await?.is_none());
        Ok(())
    }

    pub async fn concurrent_creates_of_one_tenant_store_one_key(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.create_tenant("race", "kms-1", nv(1, i)).await
            }));
        }
        let mut created = 0;
        let mut seen = Vec::new();
        for t in tasks {
            let r = t.await??;
            created += usize::from(r.was_created());
            seen.push(r.into_inner());
        }
        assert_eq!(created, 1, "exactly one task creates the tenant");
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "every task sees the same key"
        );
        assert_eq!(s.get_tenant("race").await?.unwrap().versions.len(), 1);
        Ok(())
    }

    pub async fn rotation_demotes_previous_and_rejects_duplicate_versions(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        assert!(s.add_key_version("t", nv(2, 2)).await?);
        assert!(!s.add_key_version("t", nv(2, 3)).await?, "version 2 exists");
        let rec = s.get_tenant("t").await?.unwrap();
        let states: Vec<_> = rec.versions.iter().map(|v| (v.version, v.state)).collect();
        assert_eq!(
            states,
            vec![(1, KeyState::DecryptOnly), (2, KeyState::Active)]
        );
        assert_eq!(rec.active().map(|v| v.version), Some(2));
        assert_eq!(rec.latest_version(), 2);
        Ok(())
    }

    pub async fn concurrent_rotations_add_one_version(s: Arc<dyn KeyStore>) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.add_key_version("t", nv(2, i)).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await??);
        }
        assert_eq!(wins, 1);
        let rec = s.get_tenant("t").await?.unwrap();
        assert_eq!(rec.versions.len(), 2);
        assert_eq!(
            rec.versions
                .iter()
                .filter(|v| v.state == KeyState::Active)
                .count(),
            1
        );
        Ok(())
    }

    pub async fn state_changes_are_compare_and_set(s: Arc<dyn KeyStore>) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        assert!(
            s.update_key_state(
                "t",
                1,
                KeyState::Active,
                KeyState::Suspended,
                Some(KeyState::Active)
            )
            .await?
        );
        assert!(
            !s.update_key_state("t", 1, KeyState::Active, KeyState::Suspended, None)
                .await?
        );
        let v = s.get_tenant("t").await?.unwrap().versions[0].clone();
        assert_eq!(
            (v.state, v.resume_state),
            (KeyState::Suspended, Some(KeyState::Active))
        );
        assert!(
            s.update_key_state("t", 1, KeyState::Suspended, KeyState::Active, None)
                .await?
        );
        assert_eq!(
            s.get_tenant("t").await?.unwrap().versions[0].state,
            KeyState::Active
        );
        assert!(
            !s.update_key_state("t", 9, KeyState::Active, KeyState::Suspended, None)
                .await?
        );
        Ok(())
    }

    pub async fn destroyed_versions_keep_a_tombstone_and_never_come_back(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        let first = nv(1, 1);
        s.create_tenant("t", "kms-1", first.clone()).await?;
        assert!(s.destroy_key_version("t", 1).await?);
        assert!(!s.destroy_key_version("t", 1).await?, "idempotent");
        let v = s.get_tenant("t").await?.unwrap().versions[0].clone();
        assert_eq!(v.state, KeyState::Destroyed);
        assert!(v.wrapped.is_none(), "material erased");
        assert_eq!(
            v.fingerprint,
            first.wrapped.fingerprint(),
            "fingerprint kept"
        );
        assert!(matches!(
            s.update_key_state("t", 1, KeyState::Destroyed, KeyState::Active, None)
                .await,
            Err(StoreError::Misconfigured(_))
        ));
        Ok(())
    }

    pub async fn subjects_insert_if_absent_change_state_and_shred(
        s: Arc<dyn KeyStore>,
    ) -> Result<()> {
        s.create_tenant("t", "kms-1", nv(1, 1)).await?;
        let new = |b: u8| NewSubject {
            tenant_id: "t".into(),
            subject_id: "alice".into(),
            wrap_version: 1,
            wrapped: vec![b; 73],
        };
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move { s.create_subject(new(i)).await }));
        }
        let mut created = 0;
        let mut seen = Vec::new();
        for t in tasks {
            let r = t.await??;
            created += usize::from(r.was_created());
            seen.push(r.into_inner());
        }
        assert_eq!(created, 1);
        assert!(seen.windows(2).all(|w| w[0] == w[1]));
        let rec = seen[0].clone();
        assert_eq!(rec.state, KeyState::Active);
        assert!(
            s.update_subject_state("t", "alice", KeyState::Active, KeyState::Suspended)
                .await?
        );
        assert!(
            !s.update_subject_state("t", "alice", KeyState::Active, KeyState::Suspended)
                .await?
        );
        assert!(
            s.update_subject_state("t", "alice", KeyState::Suspended, KeyState::Active)
                .await?
        );
        assert!(s.destroy_subject("t", "alice").await?);
        assert!(!s.destroy_subject("t", "alice").await?);
        let gone = s.get_subject("t", "alice").await?.unwrap();
        assert_eq!(gone.state, KeyState::Destroyed);
        assert!(gone.wrapped.is_none());
        assert_eq!(gone.fingerprint, rec.fingerprint);
        // a destroyed subject is not silently re-created
        let again = s.create_subject(new(99)).await?;
        assert!(!again.was_created());
        assert_eq!(again.into_inner().state, KeyState::Destroyed);
        assert!(s.get_subject("t", "bob").await?.is_none());
        Ok(())
    }

    pub async fn tenants_are_listed(s: Arc<dyn KeyStore>) -> Result<()> {
        for t in ["b", "a", "c"] {
            s.create_tenant(t, "kms-1", nv(1, 1)).await?;
        }
        assert_eq!(s.list_tenants().await?, vec!["a", "b", "c"]);
        s.ping().await?;
        Ok(())
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> Result<()> {
                    let dir = tempfile::tempdir()?;
                    let store = common::sqlite_store(&dir).await?;
                    suite::$name(store).await
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> Result<()> {
                    let db = common::PgDb::create().await?;
                    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
                    suite::$name(store).await?;
                    db.drop_db().await
                }
            )*
        }
    };
}

conformance!(
    create_tenant_is_insert_if_absent,
    concurrent_creates_of_one_tenant_store_one_key,
    rotation_demotes_previous_and_rejects_duplicate_versions,
    concurrent_rotations_add_one_version,
    state_changes_are_compare_and_set,
    destroyed_versions_keep_a_tombstone_and_never_come_back,
    subjects_insert_if_absent_change_state_and_shred,
    tenants_are_listed,
);

#[tokio::test]
async fn unreachable_postgres_is_reported_as_unavailable() {
    let r = SqlStore::connect_postgres("postgres://postgres@127.0.0.1:1/none").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn unopenable_sqlite_file_is_reported_as_unavailable() {
    let r = SqlStore::open_sqlite(std::path::Path::new("/nonexistent-dir/x/keys.db")).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn migrations_are_idempotent_on_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    SqlStore::open_sqlite(&path)
        .await?
        .create_tenant("t", "k", nv(1, 1))
        .await?;
    let again = SqlStore::open_sqlite(&path).await?;
    assert!(again.get_tenant("t").await?.is_some());
    Ok(())
}
