//! AWS KMS's key-state rules, which moto_server (5.2.5, started by scripts/test.sh) does
//! not enforce, and [`common::kms_rules::KmsRules`], the proxy that enforces them in front
//! of moto: a `Disabled` key refuses with `DisabledException`, a key `PendingDeletion`
//! with `KMSInvalidStateException`, for Encrypt, Decrypt, GenerateDataKey(WithoutPlaintext)
//! and ReEncrypt (either key). Tests that need "a deleted-to-be key can no longer unwrap"
//! (key epochs, restored backups) run through it.
//!
//! Also checks the administrative calls upcoming code relies on against moto: CreateKey
//! with tags, aliases, ScheduleKeyDeletion with its deletion date, CancelKeyDeletion.

mod common;

use anyhow::{Context as _, Result};
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState, Tag};

use common::kms_rules::KmsRules;
use fieldkey::kms::aws::{AwsKms, AwsKmsConfig};
use fieldkey::kms::{EncryptionContext, Kms, KmsError};

fn config(endpoint: &str, key_id: &str) -> AwsKmsConfig {
    common::aws_config(endpoint, key_id)
}

/// fieldkey's AWS backend talking to moto directly.
async fn direct(key_id: &str) -> Result<AwsKms> {
    Ok(AwsKms::new(config(&common::moto_url(), key_id)).await?)
}

/// A proxy enforcing the key-state rules in front of moto, and fieldkey's AWS backend
/// talking to moto through it.
async fn through_rules(key_id: &str) -> Result<(AwsKms, KmsRules)> {
    let rules = KmsRules::start(common::socket_addr_of(&common::moto_url())?).await?;
    let kms = AwsKms::new(config(&rules.url, key_id)).await?;
    Ok((kms, rules))
}

/// A fresh symmetric key in moto: (key id, ARN).
async fn new_key(admin: &Client) -> Result<(String, String)> {
    let out = admin
        .create_key()
        .description("fieldkey kms_state_rules test")
        .send()
        .await?;
    let m = out.key_metadata().context("CreateKey: no metadata")?;
    Ok((m.key_id().to_owned(), m.arn().context("no ARN")?.to_owned()))
}

async fn key_state(admin: &Client, key: &str) -> Result<KeyState> {
    let out = admin.describe_key().key_id(key).send().await?;
    out.key_metadata()
        .and_then(|m| m.key_state().cloned())
        .context("DescribeKey: no KeyState")
}

async fn schedule_deletion(admin: &Client, key_id: &str) -> Result<()> {
    admin
        .schedule_key_deletion()
        .key_id(key_id)
        .pending_window_in_days(7)
        .send()
        .await?;
    Ok(())
}

/// The AWS error code of a failed SDK call, or "ok".
fn outcome<T, E, R>(r: Result<T, SdkError<E, R>>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e
            .as_service_error()
            .and_then(ProvideErrorMetadata::code)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}", aws_sdk_kms::error::DisplayErrorContext(&e))),
    }
}

/// Every guarded operation against key `bad`, as raw SDK calls: `blob_bad` was encrypted
/// under `bad` and `blob_good` under `good` (an enabled key), both with `ctx`. Returns
/// (operation, AWS error code or "ok").
async fn probe(
    c: &Client,
    bad: &str,
    good: &str,
    blob_bad: &[u8],
    blob_good: &[u8],
    ctx: &EncryptionContext,
) -> Vec<(&'static str, String)> {
    let ctx = ctx
        .pairs()
        .clone()
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();
    let ctx = Some(ctx);
    vec![
        (
            "Encrypt",
            outcome(
                c.encrypt()
                    .key_id(bad)
                    .plaintext(Blob::new(vec![7u8; 32]))
                    .set_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "GenerateDataKey",
            outcome(
                c.generate_data_key()
                    .key_id(bad)
                    .key_spec(DataKeySpec::Aes256)
                    .set_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "GenerateDataKeyWithoutPlaintext",
            outcome(
                c.generate_data_key_without_plaintext()
                    .key_id(bad)
                    .key_spec(DataKeySpec::Aes256)
                    .set_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "Decrypt with KeyId",
            outcome(
                c.decrypt()
                    .key_id(bad)
                    .ciphertext_blob(Blob::new(blob_bad))
                    .set_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "Decrypt without KeyId",
            outcome(
                c.decrypt()
                    .ciphertext_blob(Blob::new(blob_bad))
                    .set_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "ReEncrypt from the key",
            outcome(
                c.re_encrypt()
                    .ciphertext_blob(Blob::new(blob_bad))
                    .set_source_encryption_context(ctx.clone())
                    .destination_key_id(good)
                    .set_destination_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "ReEncrypt from the key, SourceKeyId given",
            outcome(
                c.re_encrypt()
                    .ciphertext_blob(Blob::new(blob_bad))
                    .source_key_id(bad)
                    .set_source_encryption_context(ctx.clone())
                    .destination_key_id(good)
                    .set_destination_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
        (
            "ReEncrypt to the key",
            outcome(
                c.re_encrypt()
                    .ciphertext_blob(Blob::new(blob_good))
                    .set_source_encryption_context(ctx.clone())
                    .destination_key_id(bad)
                    .set_destination_encryption_context(ctx.clone())
                    .send()
                    .await,
            ),
        ),
    ]
}

/// The moto gap, measured, and the same calls through [`KmsRules`]: for a key that is
/// Disabled and one PendingDeletion, every guarded operation succeeds against moto alone
/// and is refused through the proxy with AWS's error code.
#[tokio::test]
async fn moto_alone_ignores_key_state_and_kms_rules_refuses_like_aws() -> Result<()> {
    let admin = direct("unused").await?;
    let admin = admin.client();
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let (good, _) = new_key(admin).await?;
    let (ruled, rules) = through_rules(&good).await?;
    let blob_good = direct(&good)
        .await?
        .generate_data_key(&good, &ctx)
        .await?
        .wrapped;

    for (state, code) in [
        (KeyState::Disabled, "DisabledException"),
        (KeyState::PendingDeletion, "KMSInvalidStateException"),
    ] {
        let (bad, _) = new_key(admin).await?;
        let blob_bad = direct(&bad)
            .await?
            .generate_data_key(&bad, &ctx)
            .await?
            .wrapped;
        match state {
            KeyState::Disabled => {
                admin.disable_key().key_id(&bad).send().await?;
            }
            _ => schedule_deletion(admin, &bad).await?,
        }
        assert_eq!(key_state(admin, &bad).await?, state);

        let moto = probe(
            admin,
            &bad,
            &good,
            blob_bad.as_bytes(),
            blob_good.as_bytes(),
            &ctx,
        )
        .await;
        println!("moto alone, key {state:?}: {moto:?}");
        for (op, got) in &moto {
            assert_eq!(
                got, "ok",
                "moto now refuses {op} on a {state:?} key ({got}): the gap this proxy closes \
                 is (partly) gone in this moto; KmsRules is harmless but may be redundant"
            );
        }

        let before = rules.refused();
        let proxied = probe(
            ruled.client(),
            &bad,
            &good,
            blob_bad.as_bytes(),
            blob_good.as_bytes(),
            &ctx,
        )
        .await;
        println!("through KmsRules, key {state:?}: {proxied:?}");
        for (op, got) in &proxied {
            assert_eq!(got, code, "{op} on a {state:?} key through KmsRules");
        }
        assert_eq!(
            rules.refused() - before,
            proxied.len(),
            "one refusal per call: the SDK does not retry them"
        );
    }
    // The enabled key is untouched by the rules.
    let dk = ruled.generate_data_key(&good, &ctx).await?;
    assert!(
        ruled
            .unwrap(&good, &dk.wrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    rules.stop().await;
    Ok(())
}

/// (a) moto alone: a key scheduled for deletion still unwraps what it wrapped before.
/// (b) through KmsRules the same unwrap is refused, and fieldkey's AWS backend reports
/// `KeyInvalidState`; wrapping and generating under it are refused too.
#[tokio::test]
async fn key_pending_deletion_unwraps_in_moto_but_not_through_kms_rules() -> Result<()> {
    let admin = direct("unused").await?;
    let (key_id, arn) = new_key(admin.client()).await?;
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let moto = direct(&key_id).await?;
    let (kms, rules) = through_rules(&key_id).await?;
    let dk = kms.generate_data_key(&key_id, &ctx).await?; // enabled: passes
    assert_eq!(rules.refused(), 0);

    schedule_deletion(admin.client(), &key_id).await?;
    assert_eq!(
        key_state(admin.client(), &key_id).await?,
        KeyState::PendingDeletion
    );

    // (a) the moto gap: AWS would refuse this.
    let secret = moto.unwrap(&key_id, &dk.wrapped, &ctx).await?;
    assert!(
        secret.ct_eq(&dk.secret),
        "moto 5.2.5 decrypts under a key pending deletion"
    );

    // (b) through the rules: refused, as AWS does.
    let r = kms.unwrap(&key_id, &dk.wrapped, &ctx).await;
    assert!(
        matches!(&r, Err(KmsError::KeyInvalidState { key_id: k }) if *k == key_id),
        "{r:?}"
    );
    let r = kms.wrap(&key_id, &dk.secret, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyInvalidState { .. })), "{r:?}");
    let r = kms.generate_data_key(&key_id, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyInvalidState { .. })), "{r:?}");
    assert_eq!(rules.refused(), 3);
    let ops: Vec<_> = rules
        .refusals()
        .into_iter()
        .map(|r| {
            assert_eq!(r.key_arn, arn);
            assert_eq!(r.key_state, "PendingDeletion");
            assert_eq!(r.code, "KMSInvalidStateException");
            r.operation
        })
        .collect();
    assert_eq!(ops, ["Decrypt", "Encrypt", "GenerateDataKey"]);

    // AWS's message, through the raw SDK error.
    let e = kms
        .client()
        .decrypt()
        .ciphertext_blob(Blob::new(dk.wrapped.as_bytes()))
        .set_encryption_context(Some(ctx.pairs().clone().into_iter().collect()))
        .send()
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("KMSInvalidStateException"));
    assert_eq!(
        e.message(),
        Some(format!("{arn} is pending deletion.").as_str())
    );
    rules.stop().await;
    Ok(())
}

/// (c) A disabled key: `KeyDisabled` through the rules for unwrap, wrap and generate.
#[tokio::test]
async fn disabled_key_is_refused_as_key_disabled() -> Result<()> {
    let admin = direct("unused").await?;
    let (key_id, arn) = new_key(admin.client()).await?;
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let (kms, rules) = through_rules(&key_id).await?;
    let dk = kms.generate_data_key(&key_id, &ctx).await?;

    admin.client().disable_key().key_id(&key_id).send().await?;
    // moto alone still decrypts under it
    assert!(
        direct(&key_id)
            .await?
            .unwrap(&key_id, &dk.wrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );

    let r = kms.unwrap(&key_id, &dk.wrapped, &ctx).await;
    assert!(
        matches!(&r, Err(KmsError::KeyDisabled { key_id: k }) if *k == key_id),
        "{r:?}"
    );
    let r = kms.wrap(&key_id, &dk.secret, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyDisabled { .. })), "{r:?}");
    let r = kms.generate_data_key(&key_id, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyDisabled { .. })), "{r:?}");
    assert_eq!(rules.refused(), 3);

    let e = kms
        .client()
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(vec![1u8; 32]))
        .send()
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some("DisabledException"));
    assert_eq!(e.message(), Some(format!("{arn} is disabled.").as_str()));
    rules.stop().await;
    Ok(())
}

/// (d) CancelKeyDeletion leaves the key Disabled (as AWS does): still refused, now as
/// `KeyDisabled`; EnableKey makes it usable again and it unwraps what it wrapped before.
#[tokio::test]
async fn cancelled_deletion_and_enable_make_the_key_usable_again() -> Result<()> {
    let admin = direct("unused").await?;
    let admin = admin.client();
    let (key_id, _) = new_key(admin).await?;
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let (kms, rules) = through_rules(&key_id).await?;
    let dk = kms.generate_data_key(&key_id, &ctx).await?;

    schedule_deletion(admin, &key_id).await?;
    let r = kms.unwrap(&key_id, &dk.wrapped, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyInvalidState { .. })), "{r:?}");

    admin.cancel_key_deletion().key_id(&key_id).send().await?;
    assert_eq!(key_state(admin, &key_id).await?, KeyState::Disabled);
    let r = kms.unwrap(&key_id, &dk.wrapped, &ctx).await;
    assert!(matches!(r, Err(KmsError::KeyDisabled { .. })), "{r:?}");

    admin.enable_key().key_id(&key_id).send().await?;
    assert_eq!(key_state(admin, &key_id).await?, KeyState::Enabled);
    assert!(
        kms.unwrap(&key_id, &dk.wrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    let rewrapped = kms.wrap(&key_id, &dk.secret, &ctx).await?;
    assert!(
        kms.unwrap(&key_id, &rewrapped, &ctx)
            .await?
            .ct_eq(&dk.secret)
    );
    assert_eq!(rules.refused(), 2);
    rules.stop().await;
    Ok(())
}

/// (e) A key named by alias (name or ARN) is resolved to its key and refused as well; the
/// refusal names the alias as asked and the key's ARN.
#[tokio::test]
async fn key_named_by_alias_is_resolved_and_refused() -> Result<()> {
    let admin = direct("unused").await?;
    let admin = admin.client();
    let (key_id, arn) = new_key(admin).await?;
    let alias = format!(
        "alias/fieldkey-rules-{}",
        hex::encode(common::rand_bytes::<6>())
    );
    admin
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&key_id)
        .send()
        .await?;
    let alias_arn = admin
        .list_aliases()
        .key_id(&key_id)
        .send()
        .await?
        .aliases()
        .iter()
        .find(|a| a.alias_name() == Some(alias.as_str()))
        .and_then(|a| a.alias_arn().map(str::to_owned))
        .context("ListAliases: no ARN for the alias")?;
    let ctx = EncryptionContext::tenant_key("acme", 1);
    let (kms, rules) = through_rules(&alias).await?;
    let by_alias = kms.generate_data_key(&alias, &ctx).await?;
    let by_alias_arn = kms.wrap(&alias_arn, &by_alias.secret, &ctx).await?;

    schedule_deletion(admin, &key_id).await?;
    for name in [&alias, &alias_arn, &arn, &key_id] {
        let r = kms.unwrap(name, &by_alias.wrapped, &ctx).await;
        assert!(
            matches!(&r, Err(KmsError::KeyInvalidState { key_id: k }) if k == name),
            "{name}: {r:?}"
        );
        let r = kms.unwrap(name, &by_alias_arn, &ctx).await;
        assert!(
            matches!(r, Err(KmsError::KeyInvalidState { .. })),
            "{name}: {r:?}"
        );
        let r = kms.generate_data_key(name, &ctx).await;
        assert!(
            matches!(r, Err(KmsError::KeyInvalidState { .. })),
            "{name}: {r:?}"
        );
    }
    let refusals = rules.refusals();
    assert_eq!(refusals.len(), 12);
    assert_eq!(
        (refusals[0].key_ref.as_str(), refusals[0].key_arn.as_str()),
        (alias.as_str(), arn.as_str())
    );
    assert!(refusals.iter().all(|r| r.key_arn == arn));
    rules.stop().await;
    Ok(())
}

/// Whatever is not a guarded operation on a disabled or deleted-to-be key reaches moto
/// unchanged: administrative calls, and moto's own errors (an unknown key).
#[tokio::test]
async fn everything_else_passes_through_unchanged() -> Result<()> {
    let admin = direct("unused").await?;
    let (key_id, _) = new_key(admin.client()).await?;
    let (kms, rules) = through_rules(&key_id).await?;
    kms.check().await?;
    schedule_deletion(kms.client(), &key_id).await?; // through the proxy
    assert_eq!(
        key_state(kms.client(), &key_id).await?,
        KeyState::PendingDeletion
    );
    let unknown = "00000000-0000-4000-8000-000000000000";
    let r = kms
        .generate_data_key(unknown, &EncryptionContext::tenant_key("t", 1))
        .await;
    assert!(matches!(r, Err(KmsError::KeyNotFound { .. })), "{r:?}");
    let r = kms.check().await; // DescribeKey of a key pending deletion: allowed
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(rules.refused(), 0);
    rules.stop().await;
    Ok(())
}

/// The administrative calls upcoming code (key epochs) relies on, against moto:
/// CreateKey with tags, CreateAlias and DescribeKey by alias name and alias ARN,
/// ScheduleKeyDeletion answering a DeletionDate that DescribeKey then shows with
/// KeyState PendingDeletion, CancelKeyDeletion (back to Disabled), EnableKey.
#[tokio::test]
async fn moto_supports_the_key_lifecycle_calls_fieldkey_needs() -> Result<()> {
    let admin = direct("unused").await?;
    let c = admin.client();
    let out = c
        .create_key()
        .description("fieldkey epoch key")
        .tags(
            Tag::builder()
                .tag_key("fieldkey:epoch")
                .tag_value("3")
                .build()?,
        )
        .tags(
            Tag::builder()
                .tag_key("fieldkey:deployment")
                .tag_value("test")
                .build()?,
        )
        .send()
        .await?;
    let meta = out.key_metadata().context("no metadata")?;
    let key_id = meta.key_id().to_owned();
    let arn = meta.arn().context("no ARN")?.to_owned();
    assert_eq!(meta.key_state(), Some(&KeyState::Enabled));

    let tags = c.list_resource_tags().key_id(&key_id).send().await?;
    let mut tags: Vec<(String, String)> = tags
        .tags()
        .iter()
        .map(|t| (t.tag_key().to_owned(), t.tag_value().to_owned()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            ("fieldkey:deployment".to_owned(), "test".to_owned()),
            ("fieldkey:epoch".to_owned(), "3".to_owned())
        ]
    );

    let alias = format!(
        "alias/fieldkey-epoch-{}",
        hex::encode(common::rand_bytes::<6>())
    );
    c.create_alias()
        .alias_name(&alias)
        .target_key_id(&key_id)
        .send()
        .await?;
    let alias_arn = format!(
        "{}alias/{}",
        arn.split("key/").next().context("ARN")?,
        alias.trim_start_matches("alias/")
    );
    for name in [&alias, &alias_arn, &arn, &key_id] {
        let d = c.describe_key().key_id(name).send().await?;
        let m = d.key_metadata().context("no metadata")?;
        assert_eq!(
            (m.key_id(), m.arn()),
            (key_id.as_str(), Some(arn.as_str())),
            "DescribeKey {name}"
        );
    }

    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    let sched = c
        .schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await?;
    let when = sched
        .deletion_date()
        .context("ScheduleKeyDeletion: no DeletionDate")?
        .secs();
    let week = 7 * 86_400;
    assert!(
        (now + week - 60..=now + week + 3_600).contains(&when),
        "deletion date {when} is 7 days after {now}"
    );
    let d = c.describe_key().key_id(&key_id).send().await?;
    let m = d.key_metadata().context("no metadata")?;
    assert_eq!(m.key_state(), Some(&KeyState::PendingDeletion));
    assert!(!m.enabled());
    assert_eq!(m.deletion_date().map(|d| d.secs()), Some(when));
    // by alias too: an epoch's key is found by its alias while pending deletion
    assert_eq!(key_state(c, &alias).await?, KeyState::PendingDeletion);
    // Where moto 5.2.5 differs from AWS here (KmsRules does not change these): it
    // accepts scheduling a key already pending deletion again and moves its deletion
    // date (AWS: KMSInvalidStateException), and it fails ScheduleKeyDeletion,
    // CancelKeyDeletion and DisableKey named by ARN (HTTP 500; AWS accepts an ARN).
    let again = c
        .schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await;
    assert!(
        again.is_ok(),
        "moto now refuses a second ScheduleKeyDeletion: {again:?}"
    );
    let by_arn = c
        .schedule_key_deletion()
        .key_id(&arn)
        .pending_window_in_days(7)
        .send()
        .await;
    assert!(by_arn.is_err(), "moto now schedules by ARN");

    c.cancel_key_deletion().key_id(&key_id).send().await?;
    let d = c.describe_key().key_id(&key_id).send().await?;
    let m = d.key_metadata().context("no metadata")?;
    assert_eq!(m.key_state(), Some(&KeyState::Disabled));
    assert_eq!(m.deletion_date(), None);
    c.enable_key().key_id(&key_id).send().await?;
    assert_eq!(key_state(c, &key_id).await?, KeyState::Enabled);
    Ok(())
}
