//! One test per attack on stored ciphertexts, so none can come back silently.
//! Each runs against the real keyring (SQLite file, local KMS).

mod common;

use std::sync::Arc;

use anyhow::Result;
use common::aad;
use fieldkey::crypto::{Aad, to_text};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::{Error, Keyring, KeyringConfig};

async fn keyring() -> Result<(tempfile::TempDir, Keyring)> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let k = Keyring::new(store, common::local_kms(&dir)?, KeyringConfig::default());
    k.create_tenant("acme", None).await?;
    k.create_tenant("rival", None).await?;
    Ok((dir, k))
}

async fn assert_auth_fails(k: &Keyring, a: &Aad<'_>, env: &[u8]) {
    let r = k.decrypt(a, env).await;
    assert!(
        matches!(r, Err(Error::AuthenticationFailed)),
        "{a:?}: {r:?}"
    );
}

#[tokio::test]
async fn cross_tenant_copy_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let env = k.encrypt(&aad("acme", None, "email", b"r1"), b"x").await?;
    assert_auth_fails(&k, &aad("rival", None, "email", b"r1"), &env).await;
    Ok(())
}

#[tokio::test]
async fn cross_subject_copy_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let env = k
        .encrypt(&aad("acme", Some("alice"), "email", b"r1"), b"x")
        .await?;
    k.encrypt(&aad("acme", Some("mallory"), "email", b"r1"), b"m")
        .await?;
    assert_auth_fails(&k, &aad("acme", Some("mallory"), "email", b"r1"), &env).await;
    Ok(())
}

#[tokio::test]
async fn cross_field_copy_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let env = k.encrypt(&aad("acme", None, "ssn", b"r1"), b"x").await?;
    assert_auth_fails(&k, &aad("acme", None, "nickname", b"r1"), &env).await;
    Ok(())
}

#[tokio::test]
async fn replay_into_another_row_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let env = k
        .encrypt(&aad("acme", None, "email", b"users:1"), b"x")
        .await?;
    assert_auth_fails(&k, &aad("acme", None, "email", b"users:2"), &env).await;
    assert_auth_fails(&k, &aad("acme", None, "email", b""), &env).await;
    Ok(())
}

#[tokio::test]
async fn header_version_rewritten_to_another_existing_version_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let a = aad("acme", None, "email", b"");
    let v1 = k.encrypt(&a, b"x").await?;
    k.rotate_tenant("acme").await?;
    let mut forged = v1.clone();
    forged[5..9].copy_from_slice(&2u32.to_be_bytes()); // claim version 2
    assert_auth_fails(&k, &a, &forged).await;
    let v2 = k.encrypt(&a, b"y").await?;
    let mut down = v2.clone();
    down[5..9].copy_from_slice(&1u32.to_be_bytes()); // downgrade to version 1
    assert_auth_fails(&k, &a, &down).await;
    Ok(())
}

#[tokio::test]
async fn truncation_and_extension_fail() -> Result<()> {
    let (_d, k) = keyring().await?;
    let a = aad("acme", None, "email", b"");
    let env = k.encrypt(&a, b"a longer secret value").await?;
    for cut in 1..=16 {
        let r = k.decrypt(&a, &env[..env.len() - cut]).await;
        assert!(
            matches!(
                r,
                Err(Error::AuthenticationFailed | Error::MalformedEnvelope(_))
            ),
            "cut {cut}: {r:?}"
        );
    }
    let mut longer = env.clone();
    longer.push(0);
    assert_auth_fails(&k, &a, &longer).await;
    Ok(())
}

#[tokio::test]
async fn nonce_edit_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let a = aad("acme", None, "email", b"");
    let mut env = k.encrypt(&a, b"x").await?;
    env[10] ^= 0x80;
    assert_auth_fails(&k, &a, &env).await;
    Ok(())
}

#[tokio::test]
async fn scope_flip_does_not_decrypt() -> Result<()> {
    let (_d, k) = keyring().await?;
    let t = aad("acme", None, "email", b"");
    let s = aad("acme", Some("alice"), "email", b"");
    let mut env = k.encrypt(&t, b"x").await?;
    k.encrypt(&s, b"alice").await?;
    env[4] = 1; // claim subject scope
    assert_auth_fails(&k, &s, &env).await;
    Ok(())
}

#[tokio::test]
async fn text_form_tampering_fails() -> Result<()> {
    let (_d, k) = keyring().await?;
    let a = aad("acme", None, "email", b"");
    let text = to_text(&k.encrypt(&a, b"x").await?);
    let mut chars: Vec<char> = text.chars().collect();
    let i = chars.len() - 3;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let forged: String = chars.into_iter().collect();
    let r = k.decrypt(&a, forged.as_bytes()).await;
    assert!(
        matches!(
            r,
            Err(Error::AuthenticationFailed | Error::MalformedEnvelope(_))
        ),
        "{r:?}"
    );
    Ok(())
}

/// Review finding 1 (issue 19): a rotation racing a suspension (the daily rotate-due
/// CronJob against an Art. 18 restriction) must never leave the tenant with an active
/// version while the suspension is reported done. 1,000 racing pairs on PostgreSQL,
/// two keyrings (replicas) on one store: after both calls return, a tenant whose
/// suspension succeeded has no active version and refuses Encrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_racing_a_suspension_never_leaves_an_active_version() -> Result<()> {
    let db = common::PgDb::create().await?;
    let dir = tempfile::tempdir()?;
    let kms = common::local_kms(&dir)?;
    let open = || async {
        let store: Arc<dyn KeyStore> = Arc::new(SqlStore::connect_postgres(&db.dsn).await?);
        Ok::<_, anyhow::Error>(Arc::new(Keyring::new(
            store,
            kms.clone(),
            KeyringConfig::default(),
        )))
    };
    let (a, b) = (open().await?, open().await?);
    let n = 1000;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let t = format!("t{i}");
            a.create_tenant(&t, None).await?;
            let (s, r) = tokio::join!(a.suspend_tenant(&t), b.rotate_tenant(&t));
            Ok::<_, Error>((t, s.is_ok(), r))
        }));
    }
    let mut broken = Vec::new();
    let mut suspended = 0;
    for task in tasks {
        let (t, suspended_ok, _rotation) = task.await??;
        if !suspended_ok {
            continue;
        }
        suspended += 1;
        let info = a.tenant(&t).await?;
        let active: Vec<u32> = info
            .versions
            .iter()
            .filter(|v| v.state == fieldkey::store::KeyState::Active)
            .map(|v| v.version)
            .collect();
        let enc = b.encrypt(&aad(&t, None, "f", b""), b"x").await;
        if !active.is_empty() || enc.is_ok() {
            broken.push(format!(
                "{t}: active {active:?}, encrypt ok: {}",
                enc.is_ok()
            ));
        }
    }
    assert!(suspended > 0);
    assert!(
        broken.is_empty(),
        "{} of {suspended} suspended tenants still usable: {:?}",
        broken.len(),
        broken.iter().take(5).collect::<Vec<_>>()
    );
    db.drop_db().await?;
    Ok(())
}
