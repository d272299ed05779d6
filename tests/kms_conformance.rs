//! One conformance suite for the `Kms` trait, run against every provider on its real
//! server: the local development KMS (files), AWS KMS (moto_server, with AWS's key-state
//! rules enforced in front of it by `common::kms_rules`), OpenBao Transit (`bao server
//! -dev`) and PKCS#11 (a SoftHSM2 token). scripts/test.sh installs what they need.
//!
//! Every provider must behave the same way for the rest of fieldkey: a wrapped key opens
//! only under its own key and exactly its own context; bytes that are not a wrapped key
//! are refused as such (never a panic, never "the KMS is down"); a key scheduled for
//! deletion refuses every use at once with a "key gone" error (what erasure and the
//! epoch roll rely on), reports its deletion date, is reported as already pending on a
//! second request, and comes back when the deletion is cancelled.
//!
//! Besides the trait, each provider carries a tenant through the whole key life: created
//! on a tenant KMS key of its own, rotated, rolled into a new key epoch (whose key the
//! provider makes), and shredded, with the receipt naming the provider's keys.
#![expect(
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use fieldkey::crypto::SecretKey;
use fieldkey::epochs::EpochSettings;
use fieldkey::erasure::{Actor, ErasureConfig};
use fieldkey::kms::{EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use fieldkey::model::ErasureState;
use fieldkey::wiring::Parts;
use fieldkey::{Keyring, KeyringConfig};

/// A provider under test, with whatever keeps its server alive.
struct Provider {
    kms: Arc<dyn Kms>,
    /// The shortest deletion window the provider accepts (AWS: 7 days).
    min_window_days: u32,
    /// A second key the provider has, for "another key" checks and BYOK tenants.
    other_key: String,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

fn ctx(tenant: &str, version: u32) -> EncryptionContext {
    EncryptionContext::tenant_key(tenant, version)
}

/// A key, whatever error names it gone: what erasure and the epoch roll count as "the
/// KMS key no longer opens anything".
fn is_key_gone(e: &KmsError) -> bool {
    matches!(
        e,
        KmsError::KeyDisabled { .. }
            | KmsError::KeyInvalidState { .. }
            | KmsError::KeyNotFound { .. }
    )
}

fn is_unavailable(e: &KmsError) -> bool {
    matches!(
        e,
        KmsError::Unavailable(_) | KmsError::Timeout | KmsError::Throttled
    )
}

// ------------------------------------------------------------------------ providers

async fn local() -> Result<Provider> {
    let dir = tempfile::tempdir()?;
    let keys = tempfile::tempdir()?;
    let kms = Arc::into_inner(common::local_kms(&dir)?)
        .context("fresh local KMS")?
        .with_keys_dir(keys.path())?;
    let other_key = kms.create_epoch_key(900, "conformance").await?;
    Ok(Provider {
        kms: Arc::new(kms),
        min_window_days: 0,
        other_key,
        _keep: Box::new((dir, keys)),
    })
}

async fn aws() -> Result<Provider> {
    use common::kms_rules::KmsRules;
    use fieldkey::kms::aws::AwsKms;
    let moto = common::moto_url();
    let rules = KmsRules::start(common::socket_addr_of(&moto)?).await?;
    let admin = AwsKms::new(common::aws_config(&moto, "unused")).await?;
    let mut keys = Vec::new();
    for what in ["default", "other"] {
        keys.push(
            admin
                .client()
                .create_key()
                .description(format!("fieldkey conformance {what}"))
                .send()
                .await?
                .key_metadata
                .context("no key metadata")?
                .key_id,
        );
    }
    let kms = AwsKms::new(common::aws_config(&rules.url, &keys[0])).await?;
    Ok(Provider {
        kms: Arc::new(kms),
        min_window_days: 7,
        other_key: keys[1].clone(),
        _keep: Box::new(rules),
    })
}

async fn openbao() -> Result<Provider> {
    use common::openbao::BaoServer;
    let bao = BaoServer::start().await;
    let other_key = "fieldkey-conformance-other".to_owned();
    bao.create_key(&other_key, true, "aes256-gcm96").await?;
    let kms = bao.kms().await;
    Ok(Provider {
        kms: Arc::new(kms),
        min_window_days: 0,
        other_key,
        _keep: Box::new(bao),
    })
}

async fn pkcs11() -> Result<Provider> {
    use common::softhsm::{KeySpec, SoftHsm};
    let hsm = tokio::task::spawn_blocking(SoftHsm::init).await?;
    let other_key = "fieldkey-conformance-other".to_owned();
    hsm.create_key(&other_key, KeySpec::default());
    let kms = hsm.kms().await;
    Ok(Provider {
        kms: Arc::new(kms),
        min_window_days: 0,
        other_key,
        _keep: Box::new(hsm),
    })
}

// ------------------------------------------------------------------------ the suite

/// A data key opens under its own key and context, and an existing key wraps and
/// opens to the same bytes.
async fn round_trip(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let key = kms.default_key_id().to_owned();
    let dk = kms.generate_data_key(&key, &ctx("acme", 1)).await?;
    let back = kms.unwrap(&key, &dk.wrapped, &ctx("acme", 1)).await?;
    ensure!(
        back.expose() == dk.secret.expose(),
        "unwrap gave other bytes"
    );
    let mine = SecretKey::generate()?;
    let w = kms.wrap(&key, &mine, &ctx("acme", 2)).await?;
    ensure!(
        !w.as_bytes().windows(32).any(|s| s == mine.expose()),
        "the wrapped form holds the key in the clear"
    );
    let back = kms.unwrap(&key, &w, &ctx("acme", 2)).await?;
    ensure!(
        back.expose() == mine.expose(),
        "wrap/unwrap changed the key"
    );
    // Two wraps of one key differ (fresh randomness per wrap).
    let w2 = kms.wrap(&key, &mine, &ctx("acme", 2)).await?;
    ensure!(
        w.as_bytes() != w2.as_bytes(),
        "two wraps of one key are equal"
    );
    kms.check().await?;
    ensure!(
        kms.canonical_key_id(&key).await? == kms.canonical_key_id(&key).await?,
        "canonical key id not stable"
    );
    Ok(())
}

/// The attack: a wrapped tenant key replayed as another tenant's, another version's, or
/// with an extra context pair, and a wrapped key taken to another KMS key.
async fn context_and_key_binding(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let key = kms.default_key_id().to_owned();
    let dk = kms.generate_data_key(&key, &ctx("acme", 1)).await?;
    for wrong in [
        ctx("evil", 1),
        ctx("acme", 2),
        ctx("acme", 1).with("fieldkey:extra", "x"),
        EncryptionContext::default(),
    ] {
        match kms.unwrap(&key, &dk.wrapped, &wrong).await {
            Err(KmsError::InvalidCiphertext) => {}
            other => panic!("{}: replay under {wrong:?}: {other:?}", kms.provider()),
        }
    }
    // Under another key of the same KMS. (moto answers AccessDeniedException where AWS
    // answers IncorrectKeyException, which the AWS provider maps to InvalidCiphertext.)
    match kms.unwrap(&p.other_key, &dk.wrapped, &ctx("acme", 1)).await {
        Err(KmsError::InvalidCiphertext) => {}
        Err(KmsError::AccessDenied { .. }) if kms.provider() == "aws" => {}
        other => panic!("{}: unwrap under another key: {other:?}", kms.provider()),
    }
    Ok(())
}

/// Altered, truncated, empty and foreign bytes are refused as not a wrapped key of
/// this KMS: never opened, never a panic, never reported as an outage.
async fn tampered_bytes_are_refused(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let key = kms.default_key_id().to_owned();
    let dk = kms.generate_data_key(&key, &ctx("acme", 1)).await?;
    let good = dk.wrapped.as_bytes().to_vec();
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0u8; 1],
        good[..good.len() / 2].to_vec(),
        good[..good.len() - 1].to_vec(),
        vec![0xA5; good.len()],
    ];
    for at in [good.len() - 1, good.len() / 2, good.len() * 3 / 4] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        cases.push(b);
    }
    for bytes in cases {
        let r = kms
            .unwrap(&key, &WrappedKey::new(bytes.clone()), &ctx("acme", 1))
            .await;
        match r {
            Err(KmsError::InvalidCiphertext) => {}
            // A provider that parses its own framing may name the key it found in
            // the bytes, and not find it: still a refusal, not an outage.
            Err(ref e) if is_key_gone(e) => {}
            other => panic!(
                "{}: altered wrapped key ({} bytes): {other:?}",
                kms.provider(),
                bytes.len()
            ),
        }
    }
    Ok(())
}

/// A key the KMS does not have is "not found", for use and for its status.
async fn unknown_keys(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let missing = match kms.provider() {
        "aws" => "11111111-2222-3333-4444-555555555555".to_owned(),
        _ => "fieldkey-conformance-no-such-key".to_owned(),
    };
    let k = SecretKey::generate()?;
    match kms.wrap(&missing, &k, &ctx("acme", 1)).await {
        Err(KmsError::KeyNotFound { key_id }) => ensure!(key_id == missing, "{key_id}"),
        other => panic!("{}: wrap under a missing key: {other:?}", kms.provider()),
    }
    ensure!(
        kms.key_status(&missing).await? == KeyStatus::Deleted,
        "status of a missing key"
    );
    Ok(())
}

/// Epoch keys: each call makes a new, distinct, usable key.
async fn epoch_keys(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let tag = format!("c{}", hex::encode(common::rand_bytes::<4>()));
    let k1 = kms.create_epoch_key(1, &tag).await?;
    let k2 = kms.create_epoch_key(2, &tag).await?;
    ensure!(k1 != k2, "two epochs got one key");
    ensure!(
        k1 != kms.default_key_id() && k1 != p.other_key,
        "an existing key adopted"
    );
    for k in [&k1, &k2] {
        ensure!(
            kms.key_status(k).await? == KeyStatus::Enabled,
            "{k} not enabled"
        );
        let dk = kms.generate_data_key(k, &ctx("acme", 1)).await?;
        let back = kms.unwrap(k, &dk.wrapped, &ctx("acme", 1)).await?;
        ensure!(back.expose() == dk.secret.expose());
    }
    Ok(())
}

/// Scheduling a key's deletion: refused at once, dated, idempotent, cancellable.
async fn deletion_lifecycle(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let tag = format!("c{}", hex::encode(common::rand_bytes::<4>()));
    let key = kms.create_epoch_key(1, &tag).await?;
    let dk = kms.generate_data_key(&key, &ctx("acme", 1)).await?;
    let days = p.min_window_days.max(7);
    let before = common::now_ms();
    let date = match kms.schedule_key_deletion(&key, days).await? {
        KeyDeletion::Scheduled {
            pending_window_days,
            deletion_date_unix_ms,
        } => {
            ensure!(pending_window_days == days, "window {pending_window_days}");
            let d = deletion_date_unix_ms.context("no deletion date")?;
            let want = before + i64::from(days) * 86_400_000;
            ensure!(
                (d - want).abs() < 86_400_000 + 60_000,
                "deletion date {d} is not ~{days} days away"
            );
            d
        }
        other => panic!("{}: first schedule: {other:?}", kms.provider()),
    };
    match kms.key_status(&key).await? {
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(d),
        } => ensure!(d == date, "status date {d} != {date}"),
        other => panic!("{}: status while pending: {other:?}", kms.provider()),
    }
    // Every use is refused at once, with a "key gone" error.
    match kms.unwrap(&key, &dk.wrapped, &ctx("acme", 1)).await {
        Err(e) if is_key_gone(&e) => {}
        other => panic!("{}: unwrap while pending: {other:?}", kms.provider()),
    }
    match kms.generate_data_key(&key, &ctx("acme", 2)).await {
        Err(e) if is_key_gone(&e) => {}
        other => panic!("{}: new key while pending: {other:?}", kms.provider()),
    }
    match kms.schedule_key_deletion(&key, days).await? {
        KeyDeletion::AlreadyPending {
            deletion_date_unix_ms: Some(d),
        } => ensure!(d == date, "second schedule date {d} != {date}"),
        other => panic!("{}: second schedule: {other:?}", kms.provider()),
    }
    kms.cancel_key_deletion(&key).await?;
    ensure!(
        kms.key_status(&key).await? == KeyStatus::Enabled,
        "not enabled after cancel"
    );
    let back = kms.unwrap(&key, &dk.wrapped, &ctx("acme", 1)).await?;
    ensure!(
        back.expose() == dk.secret.expose(),
        "cancelled key lost its material"
    );
    // Out-of-range windows are the caller's mistake, refused before anything happens.
    match kms.schedule_key_deletion(&key, 31).await {
        Err(KmsError::Misconfigured(_)) => {}
        other => panic!("{}: 31-day window: {other:?}", kms.provider()),
    }
    ensure!(
        kms.key_status(&key).await? == KeyStatus::Enabled,
        "a refused schedule changed the key"
    );
    Ok(())
}

/// A zero-day window deletes the key at once where the provider allows one (every
/// provider but AWS, whose floor is 7 days and which refuses less).
async fn immediate_deletion(p: Provider) -> Result<()> {
    let kms = &p.kms;
    let tag = format!("c{}", hex::encode(common::rand_bytes::<4>()));
    let key = kms.create_epoch_key(1, &tag).await?;
    let dk = kms.generate_data_key(&key, &ctx("acme", 1)).await?;
    if p.min_window_days > 0 {
        match kms.schedule_key_deletion(&key, 0).await {
            Err(KmsError::Misconfigured(_)) => return Ok(()),
            other => panic!("{}: window below the floor: {other:?}", kms.provider()),
        }
    }
    kms.schedule_key_deletion(&key, 0).await?;
    ensure!(
        kms.key_status(&key).await? == KeyStatus::Deleted,
        "not deleted"
    );
    match kms.unwrap(&key, &dk.wrapped, &ctx("acme", 1)).await {
        Err(e) if is_key_gone(&e) => {}
        other => panic!("{}: unwrap after deletion: {other:?}", kms.provider()),
    }
    match kms.cancel_key_deletion(&key).await {
        Err(e) if !is_unavailable(&e) => {}
        other => panic!("{}: cancel after deletion: {other:?}", kms.provider()),
    }
    Ok(())
}

/// A tenant on this provider, through its whole key life: created on a KMS key of its
/// own, rotated, rolled into a new epoch whose key the provider made, and shredded;
/// the receipt names the provider's keys, and the tenant's own key is pending deletion.
async fn tenant_life(p: Provider) -> Result<()> {
    let kms = p.kms.clone();
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig {
            tenant_kms_keys: Some(vec![p.other_key.clone()]),
            ..KeyringConfig::default()
        },
    ));
    let parts = Parts::new(keyring.clone(), store.clone(), kms.clone());
    let tag = format!("c{}", hex::encode(common::rand_bytes::<4>()));
    let epochs = parts.epochs(EpochSettings {
        kms_deletion_days: p.min_window_days.max(7),
        store_tag: tag,
        ..EpochSettings::default()
    });
    let erasures = parts.erasures(ErasureConfig {
        executor: "conformance".into(),
        kms_key_deletion_days: p.min_window_days.max(7),
        ..ErasureConfig::default()
    });
    epochs.roll(true, &|_| {}).await?;
    let t = keyring.create_tenant("acme", Some(&p.other_key)).await?;
    ensure!(t.kms_key_id == p.other_key, "tenant key {}", t.kms_key_id);
    let aad = |s| common::aad("acme", Some(s), "email", b"row-1");
    let c1 = keyring.encrypt(&aad("alice"), b"alice@example.org").await?;
    keyring.rotate_tenant("acme").await?;
    let c2 = keyring.encrypt(&aad("bob"), b"bob@example.org").await?;
    epochs.roll(true, &|_| {}).await?;
    let st = epochs.status().await?;
    let active = st
        .epochs
        .iter()
        .max_by_key(|e| e.record.epoch)
        .context("an epoch")?
        .record
        .clone();
    let epoch_key = active.kms_key_id.clone().context("epoch key")?;
    ensure!(
        kms.key_status(&epoch_key).await? == KeyStatus::Enabled,
        "the active epoch key is not enabled on the provider"
    );
    // A cold keyring (no cache) opens both versions through the provider.
    let cold = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    ensure!(&*cold.decrypt(&aad("alice"), &c1).await? == b"alice@example.org");
    ensure!(&*cold.decrypt(&aad("bob"), &c2).await? == b"bob@example.org");

    let dpo = Actor {
        id: "spiffe://example.org/dpo".into(),
        ip: None,
    };
    let done = erasures.request(&dpo, "acme", None, Duration::ZERO).await?;
    let done = erasures.get(&done.erasure_id).await?;
    ensure!(done.state == ErasureState::Completed, "{:?}", done.state);
    let receipt: serde_json::Value =
        serde_json::from_str(done.receipt.as_deref().context("no receipt")?)?;
    let named = |ptr: &str| {
        receipt
            .pointer(ptr)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    ensure!(
        named("/receipt/backups/kms_key_id").as_deref() == Some(epoch_key.as_str()),
        "receipt backup guard: {receipt}"
    );
    let deleted = named("/receipt/kms_key_deletion/kms_key_id").context("no kms_key_deletion")?;
    ensure!(
        deleted
            == kms
                .canonical_key_id(&p.other_key)
                .await
                .unwrap_or(p.other_key.clone()),
        "receipt names {deleted}"
    );
    ensure!(
        named("/receipt/kms_key_deletion/status").as_deref() == Some("scheduled"),
        "{receipt}"
    );
    ensure!(
        matches!(
            kms.key_status(&p.other_key).await?,
            KeyStatus::PendingDeletion { .. } | KeyStatus::Deleted
        ),
        "the tenant's own key is not pending deletion"
    );
    let cold = Keyring::new(store.clone(), kms.clone(), KeyringConfig::default());
    ensure!(
        cold.decrypt(&aad("bob"), &c2).await.is_err(),
        "shredded tenant still opens"
    );
    Ok(())
}

macro_rules! conformance {
    ($provider:ident) => {
        mod $provider {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trip() -> Result<()> {
                super::round_trip(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn context_and_key_binding() -> Result<()> {
                super::context_and_key_binding(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tampered_bytes_are_refused() -> Result<()> {
                super::tampered_bytes_are_refused(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_keys() -> Result<()> {
                super::unknown_keys(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn epoch_keys() -> Result<()> {
                super::epoch_keys(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deletion_lifecycle() -> Result<()> {
                super::deletion_lifecycle(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn immediate_deletion() -> Result<()> {
                super::immediate_deletion(super::$provider().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tenant_life() -> Result<()> {
                super::tenant_life(super::$provider().await?).await
            }
        }
    };
}

conformance!(local);
conformance!(aws);
conformance!(openbao);
conformance!(pkcs11);
