//! A second KMS for disaster recovery (`[kms.dr]`, `fieldkey::kms::dual`): the primary is
//! AWS KMS in one region (moto_server, with AWS's key-state rules enforced in front of
//! it, behind a TCP proxy the test cuts), the secondary AWS KMS in another region of
//! the same moto. Each side sits behind its own circuit breakers, as in the sidecar.
//!
//! The promises: a cold tenant is served through the secondary while the primary is
//! down; a primary that refuses (its key disabled) is never bypassed through the
//! secondary; epoch keys and a tenant's own key are made, and deleted, on both sides.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use common::kms_rules::KmsRules;
use common::proxy::TcpProxy;
use fieldkey::epochs::EpochSettings;
use fieldkey::erasure::{Actor, ErasureConfig};
use fieldkey::kms::aws::AwsKms;
use fieldkey::kms::dual::{DualKms, split_pair};
use fieldkey::kms::guarded::GuardedKms;
use fieldkey::kms::{KeyStatus, Kms};
use fieldkey::wiring::Parts;
use fieldkey::{Error, Keyring, KeyringConfig};

const PRIMARY_REGION: &str = "eu-west-1";
const SECONDARY_REGION: &str = "eu-central-1";

struct Env {
    rules: KmsRules,
    proxy: TcpProxy,
    admin_primary: AwsKms,
    admin_secondary: AwsKms,
    dual: Arc<DualKms>,
    /// The primary alone, as before `[kms.dr]` was configured.
    primary: Arc<dyn Kms>,
    /// A tenant's own key in each region, paired in the key map.
    tenant_keys: (String, String),
}

async fn new_key(admin: &AwsKms, what: &str) -> Result<String> {
    Ok(admin
        .client()
        .create_key()
        .description(format!("fieldkey dr test {what}"))
        .send()
        .await?
        .key_metadata
        .context("no key metadata")?
        .key_id)
}

async fn aws_in(endpoint: &str, region: &str, key: &str) -> Result<AwsKms> {
    let mut c = common::aws_config(endpoint, key);
    c.region = Some(region.into());
    // Quick to give up on a cut path: the point is what happens next.
    c.max_attempts = 2;
    Ok(AwsKms::new(c).await?)
}

impl Env {
    async fn new() -> Result<Self> {
        let moto = common::moto_url();
        let rules = KmsRules::start(common::socket_addr_of(&moto)?).await?;
        let proxy = TcpProxy::start(common::socket_addr_of(&rules.url)?).await?;
        let admin_primary = aws_in(&moto, PRIMARY_REGION, "unused").await?;
        let admin_secondary = aws_in(&moto, SECONDARY_REGION, "unused").await?;
        let p_default = new_key(&admin_primary, "primary default").await?;
        let s_default = new_key(&admin_secondary, "secondary default").await?;
        let tenant_keys = (
            new_key(&admin_primary, "tenant own, primary").await?,
            new_key(&admin_secondary, "tenant own, secondary").await?,
        );
        let primary: Arc<dyn Kms> = Arc::new(GuardedKms::new(Arc::new(
            aws_in(&proxy.via(&rules.url), PRIMARY_REGION, &p_default).await?,
        )));
        let secondary: Arc<dyn Kms> = Arc::new(GuardedKms::new(Arc::new(
            aws_in(&moto, SECONDARY_REGION, &s_default).await?,
        )));
        let dual = Arc::new(DualKms::new(
            primary.clone(),
            secondary,
            HashMap::from([(tenant_keys.0.clone(), tenant_keys.1.clone())]),
        ));
        Ok(Self {
            rules,
            proxy,
            admin_primary,
            admin_secondary,
            dual,
            primary,
            tenant_keys,
        })
    }

    fn keyring(&self, store: &Arc<dyn fieldkey::store::KeyStore>) -> Arc<Keyring> {
        Arc::new(Keyring::new(
            store.clone(),
            self.dual.clone(),
            KeyringConfig {
                tenant_kms_keys: Some(vec![self.tenant_keys.0.clone()]),
                ..KeyringConfig::default()
            },
        ))
    }
}

async fn state(admin: &AwsKms, key: &str) -> Result<String> {
    Ok(admin
        .client()
        .describe_key()
        .key_id(key)
        .send()
        .await?
        .key_metadata
        .and_then(|m| m.key_state)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_tenant_is_served_through_the_secondary_while_the_primary_is_down() -> Result<()> {
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let keyring = env.keyring(&store);
    keyring.create_tenant("acme", None).await?;
    keyring
        .create_tenant("byok", Some(&env.tenant_keys.0))
        .await?;
    let aad = |t| common::aad(t, Some("alice"), "email", b"row-1");
    let c_acme = keyring.encrypt(&aad("acme"), b"alice@acme").await?;
    let c_byok = keyring.encrypt(&aad("byok"), b"alice@byok").await?;
    // Every live version is wrapped under both KMS keys.
    for t in ["acme", "byok"] {
        let rec = store.get_tenant(t).await?.context("tenant")?;
        ensure!(
            rec.versions
                .iter()
                .all(|v| v.wrapped.as_ref().is_some_and(|w| w.has_second_wrapping())),
            "{t}: a version without its second wrapping"
        );
    }

    // The primary region goes away. A cold keyring (another replica, a restart) still
    // opens both tenants, through the secondary.
    env.proxy.cut();
    let cold = env.keyring(&store);
    ensure!(&*cold.decrypt(&aad("acme"), &c_acme).await? == b"alice@acme");
    ensure!(&*cold.decrypt(&aad("byok"), &c_byok).await? == b"alice@byok");
    ensure!(
        env.dual.served_by_secondary() >= 2,
        "served by the secondary: {}",
        env.dual.served_by_secondary()
    );
    let metrics = fieldkey::metrics::Metrics::new();
    metrics.attach(&cold);
    let text = metrics.render_current().await;
    let served = common::sample(&text, "fieldkey_kms_dr_unwraps_total");
    ensure!(served >= Some(2.0), "metric: {served:?}");
    // New keys need the primary: creating a tenant fails as unavailable, not refused.
    match keyring.create_tenant("new", None).await {
        Err(Error::Kms(e)) if e.is_unavailable() => {}
        other => panic!("create_tenant with the primary down: {other:?}"),
    }
    env.proxy.pass();
    env.rules.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_shows_which_tenants_have_a_second_wrapping() -> Result<()> {
    use fieldkey::config::{Config, DrKmsConfig, KmsProvider};
    use fieldkey::policy::RotationPolicy;
    use fieldkey::report;
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    // A tenant from before the DR KMS was configured: its key is wrapped once.
    let before = Keyring::new(store.clone(), env.primary.clone(), KeyringConfig::default());
    before.create_tenant("legacy", None).await?;
    env.keyring(&store).create_tenant("acme", None).await?;
    let mut cfg = Config::default();
    cfg.kms.provider = Some(KmsProvider::Aws);
    cfg.kms.aws_key_id = Some(env.primary.default_key_id().to_owned());
    cfg.kms.dr = Some(DrKmsConfig {
        aws_key_id: Some("secondary".into()),
        aws_region: Some(SECONDARY_REGION.into()),
        ..DrKmsConfig::new(KmsProvider::Aws)
    });
    let r = report::build(
        &*store,
        report::Configuration::from_config(&cfg, &RotationPolicy::default(), None),
        &RotationPolicy::default(),
        &report::Options::default(),
    )
    .await?;
    let t = |id: &str| {
        r.tenants
            .iter()
            .find(|t| t.tenant_id == id)
            .context("tenant")
    };
    ensure!(t("acme")?.second_wrapping && t("acme")?.versions.iter().all(|v| v.second_wrapping));
    ensure!(!t("legacy")?.second_wrapping);
    let kms = r
        .summary
        .promises
        .iter()
        .find(|p| p.id.as_str() == "kms-protection")
        .context("kms promise")?;
    ensure!(
        kms.findings
            .iter()
            .any(|f| f.contains("without a second wrapping")
                && f.contains("legacy")
                && !f.contains("acme")),
        "{:?}",
        kms.findings
    );
    ensure!(r.configuration.kms.dr_provider.as_deref() == Some("aws"));
    let html = report::html::render(&r);
    ensure!(
        html.contains("data-second-wrapping=\"yes\"")
            && html.contains("data-second-wrapping=\"no\"")
    );
    env.rules.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_refuses_is_not_bypassed_through_the_secondary() -> Result<()> {
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let keyring = env.keyring(&store);
    keyring
        .create_tenant("byok", Some(&env.tenant_keys.0))
        .await?;
    let aad = common::aad("byok", Some("alice"), "email", b"row-1");
    let ct = keyring.encrypt(&aad, b"alice@byok").await?;
    // The tenant's key is disabled in the primary KMS (an operator, or AWS on a
    // compromise): the primary answers no, and that answer stands.
    env.admin_primary
        .client()
        .disable_key()
        .key_id(&env.tenant_keys.0)
        .send()
        .await?;
    let cold = env.keyring(&store);
    let r = cold.decrypt(&aad, &ct).await;
    ensure!(
        matches!(
            &r,
            Err(Error::Kms(fieldkey::kms::KmsError::KeyDisabled { .. }))
        ),
        "decrypt with the primary key disabled: {r:?}"
    );
    ensure!(
        env.dual.served_by_secondary() == 0,
        "the secondary was used to bypass a refusal"
    );
    ensure!(
        env.rules.refused() > 0,
        "the primary's refusal is what stopped it"
    );
    env.rules.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_and_shredding_reach_both_kms() -> Result<()> {
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let keyring = env.keyring(&store);
    let kms: Arc<dyn Kms> = env.dual.clone();
    let parts = Parts::new(keyring.clone(), store.clone(), kms.clone());
    let epochs = parts.epochs(EpochSettings {
        kms_deletion_days: 7,
        store_tag: format!("dr{}", hex::encode(common::rand_bytes::<4>())),
        ..EpochSettings::default()
    });
    let erasures = parts.erasures(ErasureConfig {
        executor: "dr-test".into(),
        ..ErasureConfig::default()
    });
    epochs.roll(true, &|_| {}).await?;
    keyring
        .create_tenant("byok", Some(&env.tenant_keys.0))
        .await?;
    keyring.create_tenant("acme", None).await?;
    let epoch_key = |st: &fieldkey::epochs::EpochStatus, n: u64| {
        st.epochs
            .iter()
            .find(|e| e.record.epoch == n)
            .and_then(|e| e.record.kms_key_id.clone())
    };
    let e1 = epoch_key(&epochs.status().await?, 1).context("epoch 1 key")?;
    let (p1, s1) = split_pair(&e1).context("epoch 1 key is not a pair")?;
    ensure!(state(&env.admin_primary, p1).await? == "Enabled");
    ensure!(state(&env.admin_secondary, s1).await? == "Enabled");

    // Rolling on seals epoch 1: both of its keys are scheduled for deletion.
    epochs.roll(true, &|_| {}).await?;
    let e2 = epoch_key(&epochs.status().await?, 2).context("epoch 2 key")?;
    ensure!(split_pair(&e2).is_some(), "epoch 2 key is not a pair");
    ensure!(state(&env.admin_primary, p1).await? == "PendingDeletion");
    ensure!(state(&env.admin_secondary, s1).await? == "PendingDeletion");
    ensure!(matches!(
        kms.key_status(&e1).await?,
        KeyStatus::PendingDeletion { .. }
    ));

    // The tenant with its own key is erased: both of its keys are scheduled for
    // deletion, and the receipt names the pair's primary.
    let dpo = Actor {
        id: "spiffe://example.org/dpo".into(),
        ip: None,
    };
    let done = erasures.request(&dpo, "byok", None, Duration::ZERO).await?;
    let done = erasures.get(&done.erasure_id).await?;
    let receipt: serde_json::Value =
        serde_json::from_str(done.receipt.as_deref().context("no receipt")?)?;
    let named = receipt
        .pointer("/receipt/kms_key_deletion/kms_key_id")
        .and_then(|v| v.as_str())
        .context("receipt names no KMS key")?;
    ensure!(named.ends_with(&env.tenant_keys.0), "receipt names {named}");
    ensure!(
        receipt
            .pointer("/receipt/backups/kms_key_id")
            .and_then(|v| v.as_str())
            == Some(e2.as_str()),
        "receipt backup guard: {receipt}"
    );
    ensure!(state(&env.admin_primary, &env.tenant_keys.0).await? == "PendingDeletion");
    ensure!(state(&env.admin_secondary, &env.tenant_keys.1).await? == "PendingDeletion");
    env.rules.stop().await;
    Ok(())
}

/// Review findings on the pair (issue 22): a caller naming a pair id, or the primary
/// half of an epoch pair as a tenant's own key, must not reach keys it does not own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_name_a_pair_or_shred_an_epoch_key() -> Result<()> {
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms: Arc<dyn Kms> = env.dual.clone();
    // The allowlist of the documented example: every key of the account and region.
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig {
            tenant_kms_keys: Some(vec!["arn:aws:kms:eu-west-1:123456789012:key/*".into()]),
            ..KeyringConfig::default()
        },
    ));
    let parts = Parts::new(keyring.clone(), store.clone(), kms.clone());
    let epochs = parts.epochs(EpochSettings {
        kms_deletion_days: 7,
        store_tag: format!("dr{}", hex::encode(common::rand_bytes::<4>())),
        ..EpochSettings::default()
    });
    let erasures = parts.erasures(ErasureConfig {
        executor: "dr-test".into(),
        ..ErasureConfig::default()
    });
    epochs.roll(true, &|_| {}).await?;
    let e1 = epochs
        .status()
        .await?
        .epochs
        .iter()
        .find(|e| e.record.epoch == 1)
        .and_then(|e| e.record.kms_key_id.clone())
        .context("epoch 1 key")?;
    let (p1, s1) = split_pair(&e1).context("a pair")?;
    // A pair id, even one the allowlist's prefix matches: refused.
    let crafted = format!(
        "arn:aws:kms:eu-west-1:123456789012:key/{}|dr={s1}",
        env.tenant_keys.0
    );
    for bad in [e1.as_str(), crafted.as_str()] {
        let r = keyring.create_tenant("evil", Some(bad)).await;
        ensure!(
            matches!(r, Err(Error::KmsKeyNotAllowed { .. })),
            "pair id {bad}: {r:?}"
        );
    }
    // The epoch's primary half as a tenant's own key: allowed by the prefix, but its
    // erasure keeps the key (shared with everything the epoch wraps).
    keyring.create_tenant("evil", Some(p1)).await?;
    let dpo = Actor {
        id: "spiffe://example.org/dpo".into(),
        ip: None,
    };
    let done = erasures.request(&dpo, "evil", None, Duration::ZERO).await?;
    let done = erasures.get(&done.erasure_id).await?;
    let receipt: serde_json::Value =
        serde_json::from_str(done.receipt.as_deref().context("no receipt")?)?;
    ensure!(
        receipt
            .pointer("/receipt/kms_key_deletion/status")
            .and_then(|v| v.as_str())
            == Some("kept-shared"),
        "{receipt}"
    );
    ensure!(state(&env.admin_primary, p1).await? == "Enabled");
    ensure!(state(&env.admin_secondary, s1).await? == "Enabled");
    env.rules.stop().await;
    Ok(())
}

/// A tenant on its own key from before `[kms.dr]` gets its second wrapping by a rewrap
/// onto the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_onto_the_same_key_adds_the_second_wrapping() -> Result<()> {
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let before = Keyring::new(
        store.clone(),
        env.primary.clone(),
        KeyringConfig {
            tenant_kms_keys: Some(vec![env.tenant_keys.0.clone()]),
            ..KeyringConfig::default()
        },
    );
    before
        .create_tenant("byok", Some(&env.tenant_keys.0))
        .await?;
    let aad = common::aad("byok", Some("alice"), "email", b"row-1");
    let ct = before.encrypt(&aad, b"alice@byok").await?;
    let second = |s: fieldkey::model::TenantRecord| {
        s.versions
            .iter()
            .all(|v| v.wrapped.as_ref().is_some_and(|w| w.has_second_wrapping()))
    };
    ensure!(!second(store.get_tenant("byok").await?.context("tenant")?));
    let after = env.keyring(&store);
    let out = after.rewrap_kms_key("byok", &env.tenant_keys.0).await?;
    ensure!(out.rewrapped == 1, "{out:?}");
    ensure!(second(store.get_tenant("byok").await?.context("tenant")?));
    // And it is what serves the tenant while the primary is down.
    env.proxy.cut();
    let cold = env.keyring(&store);
    ensure!(&*cold.decrypt(&aad, &ct).await? == b"alice@byok");
    ensure!(env.dual.served_by_secondary() >= 1);
    env.proxy.pass();
    env.rules.stop().await;
    Ok(())
}

/// A writer of the key store replaces a version's second wrapping with one under
/// another secondary key (one the sidecar's secondary identity may use, holding a key
/// the attacker chose). With the primary down, the failover must not use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_only_uses_the_keys_own_secondary_counterpart() -> Result<()> {
    use fieldkey::kms::{EncryptionContext, WrappedKey};
    let env = Env::new().await?;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let keyring = env.keyring(&store);
    keyring.create_tenant("acme", None).await?;
    let rec = store.get_tenant("acme").await?.context("tenant")?;
    let v = rec.versions.first().context("v1")?;
    let stored = v.wrapped.clone().context("wrapped")?;
    let parts = stored.split_dual().context("a pair")?;
    // The attacker's key, wrapped under another secondary key with the right context.
    let attacker_secondary =
        aws_in(&common::moto_url(), SECONDARY_REGION, &env.tenant_keys.1).await?;
    let chosen = fieldkey::crypto::SecretKey::generate()?;
    let ctx = EncryptionContext::tenant_key("acme", v.version);
    let theirs = attacker_secondary
        .wrap(&env.tenant_keys.1, &chosen, &ctx)
        .await?;
    let forged =
        WrappedKey::dual(parts.primary, &env.tenant_keys.1, theirs.as_bytes()).context("frame")?;
    ensure!(
        store
            .rewrap_key_version("acme", v.version, &v.kms_key_id, &v.kms_key_id, &forged)
            .await?
    );
    env.proxy.cut();
    let cold = env.keyring(&store);
    let r = cold
        .encrypt(&common::aad("acme", None, "email", b""), b"x")
        .await;
    ensure!(
        matches!(&r, Err(Error::Kms(e)) if e.is_unavailable()),
        "with the primary down, a forged second wrapping was used: {r:?}"
    );
    ensure!(env.dual.served_by_secondary() == 0);
    env.proxy.pass();
    env.rules.stop().await;
    Ok(())
}
