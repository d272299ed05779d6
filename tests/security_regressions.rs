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

/// A keyring on its own SQLite store and local KMS in `dir`, with `tenants` created:
/// the store, the keyring and the parts services are built from.
async fn parts_with(
    dir: &tempfile::TempDir,
    tenants: &[&str],
) -> Result<(Arc<dyn KeyStore>, Arc<Keyring>, fieldkey::wiring::Parts)> {
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let kms = common::local_kms(dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    for t in tenants {
        keyring.create_tenant(t, None).await?;
    }
    let parts = fieldkey::wiring::Parts::new(keyring.clone(), store.clone(), kms);
    Ok((store, keyring, parts))
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

// ---------------------------------------------------------------------------------
// Finding 4 of the review: a caller denied Decrypt (the analytics identity) could
// invert a low-entropy field by hashing a dictionary through BlindIndexBatch (or
// enumerate subject ids through PseudonymizeBatch) at HMAC speed.

const ANALYTICS: &str = "spiffe://example.org/ns/analytics/sa/export";
const APP: &str = "spiffe://example.org/ns/shop/sa/web";

/// A sidecar over a real socket, serving the shipped example policies and
/// `limits.toml`, whose local listener's identity is `who`.
async fn sidecar_as(
    who: &str,
    tmp: &tempfile::TempDir,
) -> Result<(common::sidecar::InProcess, Arc<Keyring>)> {
    use fieldkey::crypto::{IndexProfile, Normalization};
    use fieldkey::keyring::IndexProfiles;
    use fieldkey::policy::Authorizer;
    use fieldkey::service::gate::{Gate, IdentityConfig};
    let dir = tmp.path();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(shipped)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".cedar") || name == "limits.toml" {
            std::fs::copy(e.path(), policies.join(&*name))?;
        }
    }
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.join("k.db")).await?);
    let kms = common::local_kms(tmp)?;
    let profiles = IndexProfiles::new(
        [(
            "dob".to_owned(),
            IndexProfile::hmac(64, Normalization::default()),
        )]
        .into(),
        2,
    );
    let keyring = Arc::new(
        Keyring::new(store.clone(), kms.clone(), KeyringConfig::default())
            .with_index_profiles(profiles),
    );
    let gate = Arc::new(Gate::new(
        Some(Arc::new(Authorizer::load(&policies)?)),
        None,
        IdentityConfig {
            local_identity: Arc::from(who),
            ..IdentityConfig::default()
        },
    ));
    let ctx = fieldkey::wiring::Parts::new(keyring.clone(), store, kms)
        .context()
        .with_gate(gate);
    Ok((
        common::sidecar::InProcess::start_as_given(ctx).await?,
        keyring,
    ))
}

/// Every birth date of a century as `YYYY-MM-DD`, the dictionary of the attack.
fn birth_dates(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{}-{:02}-{:02}",
                1925 + i / 372,
                i / 31 % 12 + 1,
                i % 31 + 1
            )
        })
        .collect()
}

/// (served, refused with INDEX_RATE_LIMITED) of a dictionary run as `who`; any other
/// outcome fails the test.
async fn invert_dictionary(ch: tonic::transport::Channel, n: usize) -> Result<(usize, usize)> {
    use fieldkey::proto::pb::{
        self, BlindIndexRequest, IndexFormat, PseudonymizeRequest, blind_index_result,
        pseudonymize_result,
    };
    let mut c = pb::crypto_client::CryptoClient::new(ch);
    // Each item's outcome: None (served) or the reason it failed.
    let mut outcomes: Vec<Option<String>> = Vec::new();
    let dates = birth_dates(n);
    for chunk in dates.chunks(1000) {
        let items = chunk
            .iter()
            .map(|d| BlindIndexRequest {
                tenant_id: "acme".into(),
                field: "dob".into(),
                value: d.as_bytes().to_vec(),
                format: IndexFormat::Binary as i32,
                lookup: false,
            })
            .collect();
        let out = c
            .blind_index_batch(pb::BlindIndexBatchRequest { items })
            .await?
            .into_inner();
        for r in out.results {
            match r.result {
                Some(blind_index_result::Result::Ok(_)) => outcomes.push(None),
                Some(blind_index_result::Result::Error(e)) => outcomes.push(Some(e.reason)),
                None => anyhow::bail!("an empty result"),
            }
        }
        let items = chunk
            .iter()
            .map(|d| PseudonymizeRequest {
                tenant_id: "acme".into(),
                subject_id: d.clone(),
                purpose: "analytics".into(),
            })
            .collect();
        let out = c
            .pseudonymize_batch(pb::PseudonymizeBatchRequest { items })
            .await?
            .into_inner();
        for r in out.results {
            match r.result {
                Some(pseudonymize_result::Result::Ok(_)) => outcomes.push(None),
                Some(pseudonymize_result::Result::Error(e)) => outcomes.push(Some(e.reason)),
                None => anyhow::bail!("an empty result"),
            }
        }
    }
    let served = outcomes.iter().filter(|o| o.is_none()).count();
    let refused = outcomes
        .iter()
        .filter(|o| o.as_deref() == Some("INDEX_RATE_LIMITED"))
        .count();
    if let Some(other) = outcomes
        .iter()
        .flatten()
        .find(|r| *r != "INDEX_RATE_LIMITED")
    {
        anyhow::bail!("an item failed with {other}");
    }
    Ok((served, refused))
}

#[tokio::test]
async fn a_caller_denied_decrypt_cannot_invert_an_index_at_hmac_speed() -> Result<()> {
    const DICTIONARY: usize = 3_000;
    let dir = tempfile::tempdir()?;
    let (analytics, keyring) = sidecar_as(ANALYTICS, &dir).await?;
    keyring.create_tenant("acme", None).await?;
    let started = std::time::Instant::now();
    let (served, refused) = invert_dictionary(analytics.channel().await?, DICTIONARY).await?;
    let elapsed = started.elapsed().as_secs_f64();
    // limits.toml: analytics 200/s with a burst of 2000, index and pseudonym items
    // from one budget.
    let ceiling = 2000.0 + 200.0 * elapsed + 1.0;
    assert!(
        (served as f64) <= ceiling,
        "{served} items served in {elapsed:.2}s, over the budget's {ceiling:.0}"
    );
    assert_eq!(served + refused, 2 * DICTIONARY);
    assert!(refused >= 2 * DICTIONARY - ceiling as usize);

    // The application, which may decrypt the field, is not held by the index budget.
    let app_dir = tempfile::tempdir()?;
    let (app, keyring) = sidecar_as(APP, &app_dir).await?;
    keyring.create_tenant("acme", None).await?;
    let (served, refused) = invert_dictionary(app.channel().await?, DICTIONARY).await?;
    assert_eq!((served, refused), (2 * DICTIONARY, 0));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Finding 6 of the review: without a context, a tenant-scoped value fits every row of
// the tenant: a writer swaps their own encrypted email into a victim's row, and the
// password reset goes to them.

/// Encrypt then Decrypt over gRPC as a client of `server`: mallory's email, encrypted
/// for mallory's row, read back as if it were the victim's. `Ok(plaintext)` when the
/// swap works.
async fn swap_into_victims_row(
    server: &common::sidecar::InProcess,
    mallory_row: &[u8],
    victim_row: &[u8],
) -> Result<std::result::Result<Vec<u8>, tonic::Status>> {
    use fieldkey::proto::pb::{self, DecryptRequest, EncryptRequest};
    let mut c = pb::crypto_client::CryptoClient::new(server.channel().await?);
    let ct = match c
        .encrypt(EncryptRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            plaintext: b"mallory@evil.example".to_vec().into(),
            context: mallory_row.to_vec().into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().ciphertext,
        Err(s) => return Ok(Err(s)),
    };
    Ok(c.decrypt(DecryptRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        ciphertext: ct,
        context: victim_row.to_vec().into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().plaintext.to_vec()))
}

#[tokio::test]
async fn a_field_bound_to_its_row_cannot_be_swapped_into_another_row() -> Result<()> {
    use fieldkey::config::RowBindingSettings;
    let dir = tempfile::tempdir()?;
    let (store, _, parts) = parts_with(&dir, &["acme"]).await?;
    let audit = Arc::new(parts.audit_log(fieldkey::audit::AuditConfig::default()));
    let gate = Arc::new(fieldkey::service::gate::Gate::new(
        None,
        Some(audit.clone()),
        fieldkey::service::gate::IdentityConfig::default(),
    ));

    // Unbound (the field not required to carry a context): the swap works.
    let open =
        common::sidecar::InProcess::start_as_given(parts.context().with_gate(gate.clone())).await?;
    let swapped = swap_into_victims_row(&open, b"", b"").await?;
    assert_eq!(
        swapped.as_deref().ok(),
        Some(&b"mallory@evil.example"[..]),
        "the attack this defends against"
    );
    // ... and the compliance report says the field is used without a row context.
    audit.flush().await?;
    let r = fieldkey::report::build(
        store.as_ref(),
        fieldkey::report::Configuration::from_config(
            &fieldkey::config::Config::default(),
            &fieldkey::policy::RotationPolicy::default(),
            None,
        ),
        &fieldkey::policy::RotationPolicy::default(),
        &fieldkey::report::Options {
            now_ms: fieldkey::store::now_ms(),
            ..Default::default()
        },
    )
    .await?;
    let at_rest = r
        .summary
        .promises
        .iter()
        .find(|p| p.id.as_str() == "encryption-at-rest")
        .ok_or_else(|| anyhow::anyhow!("no encryption-at-rest promise"))?;
    assert_eq!(at_rest.verdict, fieldkey::report::Verdict::Attention);
    assert!(
        at_rest.findings[0].starts_with("acme/email: 1 value(s) encrypted without a row context"),
        "{:?}",
        at_rest.findings
    );

    // Bound: a request without a context is refused, for Encrypt and Decrypt alike...
    let bound = common::sidecar::InProcess::start_as_given(
        parts
            .context()
            .with_gate(gate)
            .with_row_binding(RowBindingSettings {
                required: vec!["email".into()],
            }),
    )
    .await?;
    let refused = swap_into_victims_row(&bound, b"", b"").await?.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(common::grpc::reason(&refused), "CONTEXT_REQUIRED");
    let refused = swap_into_victims_row(&bound, b"row-mallory", b"")
        .await?
        .unwrap_err();
    assert_eq!(
        common::grpc::reason(&refused),
        "CONTEXT_REQUIRED",
        "{refused:?}"
    );
    // ... and a value bound to mallory's row does not open in the victim's.
    let refused = swap_into_victims_row(&bound, b"row-mallory", b"row-victim")
        .await?
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::DataLoss);
    assert_eq!(common::grpc::reason(&refused), "AUTHENTICATION_FAILED");
    // Its own row still reads it.
    let own = swap_into_victims_row(&bound, b"row-mallory", b"row-mallory").await?;
    assert_eq!(own.as_deref().ok(), Some(&b"mallory@evil.example"[..]));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Finding 5 of the review (authorization): restricting a whole tenant was reachable
// through SuspendSubject with an empty subject under the subject action, and erasures
// were read and cancelled service-wide, whatever tenant they belong to.

const TENANT_OPS: &str = "spiffe://example.org/ns/acme/sa/privacy";

/// A policy for an identity that handles acme's data subjects, and nothing else.
const ACME_ONLY: &str = r#"
@id("acme-subjects")
permit (
  principal == Identity::"spiffe://example.org/ns/acme/sa/privacy",
  action in [
    Action::"Erasures::ShredSubject",
    Action::"Erasures::GetErasure",
    Action::"Erasures::CancelErasure",
    Action::"Erasures::SuspendSubject",
    Action::"Erasures::ResumeSubject"
  ],
  resource in Tenant::"acme"
);
"#;

#[tokio::test]
async fn subject_grants_reach_neither_the_whole_tenant_nor_other_tenants_erasures() -> Result<()> {
    use fieldkey::policy::Authorizer;
    use fieldkey::proto::pb::{self, ErasureIdRequest, RestrictionRequest, ShredSubjectRequest};
    use fieldkey::service::gate::{Gate, IdentityConfig};
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("acme.cedar"), ACME_ONLY)?;
    let (_, keyring, parts) = parts_with(&dir, &["acme", "rival"]).await?;
    let open = common::sidecar::InProcess::start_as_given(parts.context()).await?;
    let gate = Arc::new(Gate::new(
        Some(Arc::new(Authorizer::load(&policies)?)),
        None,
        IdentityConfig {
            local_identity: Arc::from(TENANT_OPS),
            ..IdentityConfig::default()
        },
    ));
    let guarded =
        common::sidecar::InProcess::start_as_given(parts.context().with_gate(gate)).await?;
    let mut admin = pb::erasures_client::ErasuresClient::new(open.channel().await?);
    let mut acme_ops = pb::erasures_client::ErasuresClient::new(guarded.channel().await?);
    let shred = |tenant: &str| ShredSubjectRequest {
        tenant_id: tenant.into(),
        subject_id: "u-1".into(),
        grace_seconds: 86_400,
    };
    let rivals = admin.shred_subject(shred("rival")).await?.into_inner();
    let own = acme_ops.shred_subject(shred("acme")).await?.into_inner();
    let id = |e: &pb::Erasure| ErasureIdRequest {
        erasure_id: e.erasure_id.clone(),
    };

    // Its own tenant's erasure: readable.
    acme_ops.get_erasure(id(&own)).await?;
    // Another tenant's: neither readable nor cancellable, and still pending.
    for refused in [
        acme_ops.get_erasure(id(&rivals)).await.unwrap_err(),
        acme_ops.cancel_erasure(id(&rivals)).await.unwrap_err(),
    ] {
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert_eq!(common::grpc::reason(&refused), "PERMISSION_DENIED");
    }
    let still = admin.get_erasure(id(&rivals)).await?.into_inner();
    assert_eq!(still.state, rivals.state, "not cancelled");

    // A subject of its tenant: may be restricted. The whole tenant: not with a grant
    // for subjects.
    acme_ops
        .suspend_subject(RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: "u-2".into(),
        })
        .await?;
    let refused = acme_ops
        .suspend_subject(RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("Erasures::SuspendTenant"),
        "{refused:?}"
    );
    keyring
        .encrypt(&aad("acme", None, "email", b"r1"), b"still served")
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Finding 5 of the review (census): Rewrap returns a ciphertext that names the active
// version unchanged without authenticating it, so a value copied into another row
// passes a re-encryption as "current". `verify` authenticates it.

#[tokio::test]
async fn a_verifying_rewrap_reports_a_value_moved_to_another_row() -> Result<()> {
    use fieldkey::proto::pb::{self, EncryptRequest, RewrapRequest};
    let dir = tempfile::tempdir()?;
    let (_, _, parts) = parts_with(&dir, &["acme"]).await?;
    // No authorization: this is about what Rewrap checks, not who may call it.
    let server = common::sidecar::InProcess::start_as_given(parts.context()).await?;
    let mut c = pb::crypto_client::CryptoClient::new(server.channel().await?);
    let ct = c
        .encrypt(EncryptRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            plaintext: b"mallory@evil.example".to_vec().into(),
            context: b"row-mallory".to_vec().into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .ciphertext;
    let moved = |verify| RewrapRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        context: b"row-victim".to_vec(),
        ciphertext: ct.clone().into(),
        verify,
        ..Default::default()
    };
    // Without verify: "current", unchanged, although it belongs to another row.
    let unchecked = c.rewrap(moved(false)).await?.into_inner();
    assert!(!unchecked.changed);
    // With verify: refused as what it is.
    let e = c.rewrap(moved(true)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
    assert_eq!(common::grpc::reason(&e), "AUTHENTICATION_FAILED");
    // In its own row it verifies and stays as it is.
    let own = c
        .rewrap(RewrapRequest {
            context: b"row-mallory".to_vec(),
            ..moved(true)
        })
        .await?
        .into_inner();
    assert!(!own.changed);
    assert_eq!(own.ciphertext, ct);
    Ok(())
}
