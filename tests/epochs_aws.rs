//! Key epochs against AWS KMS: moto_server with AWS's key-state rules enforced in front
//! of it (`common::kms_rules`; moto 5.2.5 alone lets a key pending deletion decrypt).
//!
//! The attack is made with a recovery tool written from docs/FORMAT.md §4 alone
//! (`tests/tools/recover_subject_key.py`), given a restored backup of the key store
//! (`sqlite3 .backup`) and the sidecar's own KMS credentials: it opens a shredded
//! subject's key before the roll, and cannot after it.

mod common;

use std::sync::Arc;

use anyhow::{Context as _, Result, ensure};

use common::kms_rules::KmsRules;
use fieldkey::epochs::EpochSettings;
use fieldkey::kms::Kms;
use fieldkey::kms::aws::{AwsKms, AwsKmsConfig};
use fieldkey::model::EpochState;
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::wiring::Parts;
use fieldkey::{Error, Keyring, KeyringConfig};

fn config(endpoint: &str, key_id: &str) -> AwsKmsConfig {
    common::aws_config(endpoint, key_id)
}

/// Runs the recovery tool on a backup; `Ok(true)` if it opened the subject's key.
fn recover(
    db: &std::path::Path,
    tenant: &str,
    subject: &str,
    kms_url: &str,
) -> Result<(bool, String)> {
    let python = std::env::var("FIELDKEY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let tool = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tools/recover_subject_key.py"
    );
    let out = std::process::Command::new(python)
        .arg(tool)
        .arg("--db")
        .arg(db)
        .args([
            "--tenant",
            tenant,
            "--subject",
            subject,
            "--kms-endpoint",
            kms_url,
        ])
        .args(["--region", "eu-west-1"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .context("running the recovery tool")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        matches!(out.status.code(), Some(0 | 3)),
        "recovery tool failed to run: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), stdout))
}

// Multi-threaded: the recovery tool (a child process) talks to the in-process proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_tool_opens_a_shredded_subject_from_a_backup_until_the_roll() -> Result<()> {
    let moto = common::moto_url();
    let rules = KmsRules::start(common::socket_addr_of(&moto)?).await?;
    let admin = AwsKms::new(config(&moto, "unused")).await?;
    let default_key = admin
        .client()
        .create_key()
        .description("fieldkey legacy default")
        .send()
        .await?
        .key_metadata
        .context("no metadata")?
        .key_id;
    let kms: Arc<dyn Kms> = Arc::new(AwsKms::new(config(&rules.url, &default_key)).await?);
    let data = tempfile::tempdir()?;
    let store: Arc<dyn KeyStore> =
        Arc::new(SqlStore::open_sqlite(&data.path().join("keys.db")).await?);
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let tag = format!("t{}", hex::encode(common::rand_bytes::<4>()));
    let epochs = Parts::new(keyring.clone(), store.clone(), kms.clone()).epochs(EpochSettings {
        kms_deletion_days: 7,
        store_tag: tag.clone(),
        ..EpochSettings::default()
    });
    epochs.roll(true, &|_| {}).await?;
    let st = epochs.status().await?;
    let e1 = st
        .epochs
        .iter()
        .find(|e| e.record.epoch == 1)
        .context("epoch 1")?;
    let e1_key = e1.record.kms_key_id.clone().context("epoch 1 key")?;
    // fieldkey made the key, tagged and aliased.
    let alias = fieldkey::kms::aws::epoch_alias(&tag, 1);
    let by_alias = admin.client().describe_key().key_id(&alias).send().await?;
    assert_eq!(
        by_alias.key_metadata.and_then(|m| m.arn).as_deref(),
        Some(e1_key.as_str())
    );

    keyring.create_tenant("acme", None).await?;
    let aad = |s| common::aad("acme", Some(s), "email", b"");
    let ct_alice = keyring.encrypt(&aad("alice"), b"alice@x").await?;
    let ct_bob = keyring.encrypt(&aad("bob"), b"bob@x").await?;

    let backups = tempfile::tempdir()?;
    let backup = backups.path().join("keys.backup.db");
    let out = std::process::Command::new("sqlite3")
        .arg(data.path().join("keys.db"))
        .arg(format!(".backup '{}'", backup.display()))
        .output()?;
    ensure!(out.status.success(), "sqlite3 .backup failed");

    keyring.shred_subject("acme", "alice").await?;
    let run = |url: String, backup: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || recover(&backup, "acme", "alice", &url))
    };
    let (opened, said) = run(rules.url.clone(), backup.clone()).await??;
    assert!(opened, "the attack must be real before the roll: {said}");

    epochs.roll(true, &|_| {}).await?;
    let st = epochs.status().await?;
    let e1 = &st
        .epochs
        .iter()
        .find(|e| e.record.epoch == 1)
        .context("epoch 1")?
        .record;
    assert_eq!(e1.state, EpochState::Sealed);
    assert_eq!(e1.kms_status.as_deref(), Some("scheduled"));
    let (opened, said) = run(rules.url.clone(), backup.clone()).await??;
    assert!(
        !opened,
        "a backup revived a shredded subject after the roll: {said}"
    );
    assert!(
        said.contains("\"stage\": \"kms\"") || said.contains("\"stage\":\"kms\""),
        "{said}"
    );
    assert!(
        rules.refused() > 0,
        "AWS's key-state rule is what stopped it"
    );

    // Live: bob decrypts through a cold keyring; alice is destroyed.
    let cold = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    assert_eq!(
        cold.decrypt(&aad("bob"), &ct_bob).await?.as_bytes(),
        b"bob@x"
    );
    assert!(matches!(
        cold.decrypt(&aad("alice"), &ct_alice).await,
        Err(Error::KeyDestroyed { .. })
    ));
    // What epochs do NOT protect against (ERASURE.md §6.2): whoever may cancel the
    // deletion inside its window revives the backup. The IAM policy denies it.
    kms.cancel_key_deletion(&e1_key).await?;
    let (opened, said) = run(rules.url.clone(), backup.clone()).await??;
    assert!(
        opened,
        "a cancelled deletion must make the backup readable again: {said}"
    );
    rules.stop().await;
    Ok(())
}
