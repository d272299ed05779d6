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
