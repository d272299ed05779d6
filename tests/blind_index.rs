//! Blind indexes and pseudonyms over real gRPC (a real socket, SQLite key store, local
//! KMS): determinism, separation by tenant / field / version / purpose, normalization,
//! Argon2id, lookups across a rotation, errors, restriction and erasure.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use common::grpc::{as_id, ids, reason};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use fieldkey::crypto::{
    Argon2Cost, BlindIndex, IndexAlgorithm, IndexProfile, Normalization, UnicodeForm,
};
use fieldkey::keyring::IndexProfiles;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::erasures_client::ErasuresClient;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{
    self, BlindIndexRequest, IndexFormat, PseudonymizeRequest, blind_index_result,
    pseudonymize_result,
};
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;
use tonic::transport::Channel;

const SMALL_ARGON: Argon2Cost = Argon2Cost {
    memory_kib: 256,
    iterations: 1,
    parallelism: 1,
};

fn profiles() -> IndexProfiles {
    let mut m = HashMap::new();
    m.insert(
        "email".to_owned(),
        IndexProfile::hmac(
            64,
            Normalization {
                form: Some(UnicodeForm::Nfc),
                casefold: true,
                trim: true,
            },
        ),
    );
    m.insert(
        "login".to_owned(),
        IndexProfile::hmac(128, Normalization::default()),
    );
    m.insert(
        "dob".to_owned(),
        IndexProfile {
            algorithm: IndexAlgorithm::Argon2id(SMALL_ARGON),
            bits: 32,
            normalization: Normalization {
                trim: true,
                ..Normalization::default()
            },
        },
    );
    IndexProfiles::new(m, 2)
}

/// An in-process sidecar on its own SQLite store and local KMS, with the index profiles
/// above and 4 KiB fields.
struct Fixture {
    _dir: tempfile::TempDir,
    server: common::sidecar::InProcess,
    keyring: Arc<Keyring>,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = common::sqlite_store(&dir).await?;
        let kms = common::local_kms(&dir)?;
        let keyring = Arc::new(
            Keyring::new(store.clone(), kms.clone(), KeyringConfig::default())
                .with_index_profiles(profiles()),
        );
        let limits = fieldkey::config::Limits {
            max_field_bytes: 4096,
            ..Default::default()
        };
        let server = common::sidecar::InProcess::start(
            fieldkey::wiring::Parts::new(keyring.clone(), store, kms)
                .context()
                .with_limits(limits),
        )
        .await?;
        Ok(Self {
            _dir: dir,
            server,
            keyring,
        })
    }

    async fn channel(&self) -> Result<Channel> {
        self.server.channel().await
    }
}

fn req(tenant: &str, field: &str, value: &[u8]) -> BlindIndexRequest {
    BlindIndexRequest {
        tenant_id: tenant.into(),
        field: field.into(),
        value: value.to_vec(),
        format: IndexFormat::Binary as i32,
        lookup: false,
    }
}

async fn index(c: &mut CryptoClient<Channel>, tenant: &str, field: &str, v: &str) -> Vec<u8> {
    c.blind_index(req(tenant, field, v.as_bytes()))
        .await
        .unwrap()
        .into_inner()
        .index
}

async fn refused(
    c: &mut CryptoClient<Channel>,
    r: BlindIndexRequest,
    code: Code,
    why: &str,
) -> tonic::Status {
    let e = c.blind_index(r).await.unwrap_err();
    assert_eq!((e.code(), reason(&e).as_str()), (code, why), "{e:?}");
    e
}

async fn pseudonym(
    c: &mut CryptoClient<Channel>,
    tenant: &str,
    subject: &str,
    purpose: &str,
) -> Result<String, tonic::Status> {
    c.pseudonymize(PseudonymizeRequest {
        tenant_id: tenant.into(),
        subject_id: subject.into(),
        purpose: purpose.into(),
    })
    .await
    .map(|r| r.into_inner().pseudonym)
}

async fn create(keys: &mut KeysClient<Channel>, t: &str) {
    keys.create_tenant(as_id(
        ids::OPS,
        pb::CreateTenantRequest {
            tenant_id: t.into(),
            kms_key_id: String::new(),
        },
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn blind_indexes_are_deterministic_separated_and_normalized() -> Result<()> {
    let s = Fixture::start().await?;
    let mut c = CryptoClient::new(s.channel().await?);
    let mut keys = KeysClient::new(s.channel().await?);
    create(&mut keys, "acme").await;
    create(&mut keys, "globex").await;

    // equal inputs, equal indexes; normalization makes spellings meet
    let a = index(&mut c, "acme", "email", "ann@example.org").await;
    assert_eq!(a, index(&mut c, "acme", "email", "ann@example.org").await);
    assert_eq!(
        a,
        index(&mut c, "acme", "email", "  Ann@EXAMPLE.org\n").await
    );
    assert_eq!(
        index(&mut c, "acme", "email", "Jos\u{e9}@example.org").await,
        index(&mut c, "acme", "email", "JOSE\u{301}@example.org").await
    );
    // the value format: 0xB1, version 1, 8 digest bytes (64 bits)
    assert_eq!(a.len(), 5 + 8);
    assert_eq!(&a[..5], &[0xB1, 0, 0, 0, 1]);
    // unequal inputs, (almost always) unequal indexes: 2,000 distinct at 64 bits
    let mut seen = HashSet::new();
    let items: Vec<_> = (0..2000)
        .map(|i| req("acme", "email", format!("user{i}@example.org").as_bytes()))
        .collect();
    let out = c
        .blind_index_batch(pb::BlindIndexBatchRequest {
            items: items.clone(),
        })
        .await?
        .into_inner();
    for r in out.results {
        let Some(blind_index_result::Result::Ok(ok)) = r.result else {
            panic!("{r:?}")
        };
        assert!(seen.insert(ok.index));
    }
    assert_eq!(seen.len(), 2000);
    // other tenants and fields: unrelated indexes (digests differ)
    let digest = |v: &[u8]| v[5..].to_vec();
    let g = index(&mut c, "globex", "email", "ann@example.org").await;
    let l = index(&mut c, "acme", "login", "ann@example.org").await;
    assert_ne!(digest(&a), digest(&g));
    assert_ne!(digest(&a), digest(&l)[..8].to_vec());
    assert_eq!(l.len(), 5 + 16, "login keeps 128 bits");
    // login has no normalization: case matters
    assert_ne!(l, index(&mut c, "acme", "login", "Ann@example.org").await);
    // text form is the binary form in base64url behind fkb1:
    let mut t = req("acme", "email", b"ann@example.org");
    t.format = IndexFormat::Text as i32;
    let text = c.blind_index(t).await?.into_inner().index;
    assert!(text.starts_with(b"fkb1:"));
    assert_eq!(BlindIndex::parse(&text)?.as_bytes(), &a[..]);

    // Argon2id field: deterministic, 32 bits, normalization applied, and a batch of
    // them (computed concurrently) equals single calls
    let d = index(&mut c, "acme", "dob", "1990-01-31").await;
    assert_eq!(d.len(), 5 + 4);
    assert_eq!(d, index(&mut c, "acme", "dob", " 1990-01-31 ").await);
    assert_ne!(d, index(&mut c, "acme", "dob", "1990-01-30").await);
    let batch: Vec<_> = (1..=12)
        .map(|day| req("acme", "dob", format!("1990-01-{day:02}").as_bytes()))
        .chain([req("acme", "email", b"ann@example.org")])
        .collect();
    let out = c
        .blind_index_batch(pb::BlindIndexBatchRequest {
            items: batch.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(out.results.len(), batch.len());
    for (r, item) in out.results.iter().zip(&batch) {
        let Some(blind_index_result::Result::Ok(ok)) = &r.result else {
            panic!("{r:?}")
        };
        let single = c.blind_index(item.clone()).await?.into_inner().index;
        assert_eq!(ok.index, single);
    }
    Ok(())
}

#[tokio::test]
async fn bad_blind_index_requests_get_specific_errors_and_fail_alone_in_batches() -> Result<()> {
    let s = Fixture::start().await?;
    let mut c = CryptoClient::new(s.channel().await?);
    let mut keys = KeysClient::new(s.channel().await?);
    create(&mut keys, "acme").await;
    let e = refused(
        &mut c,
        req("acme", "phone", b"+4412345"),
        Code::FailedPrecondition,
        "INDEX_NOT_CONFIGURED",
    )
    .await;
    assert!(e.message().contains("[blind_index.fields.phone]"), "{e:?}");
    refused(
        &mut c,
        req("acme", "email", b"\xff\xfe"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    )
    .await;
    // without normalization any bytes are fine
    c.blind_index(req("acme", "login", b"\xff\xfe")).await?;
    refused(
        &mut c,
        req("nobody", "email", b"x"),
        Code::NotFound,
        "TENANT_NOT_FOUND",
    )
    .await;
    refused(
        &mut c,
        req("bad tenant", "email", b"x"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    )
    .await;
    refused(
        &mut c,
        req("acme", "", b"x"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    )
    .await;
    refused(
        &mut c,
        req("acme", "email", &[b'a'; 5000]),
        Code::InvalidArgument,
        "VALUE_TOO_LARGE",
    )
    .await;
    let items = vec![
        req("acme", "email", b"ann@example.org"),
        req("acme", "phone", b"1"),
        req("nobody", "email", b"x"),
        req("acme", "email", b"\xff"),
        req("acme", "dob", b"2000-02-29"),
    ];
    let out = c
        .blind_index_batch(pb::BlindIndexBatchRequest { items })
        .await?
        .into_inner();
    let reasons: Vec<String> = out
        .results
        .iter()
        .map(|r| match &r.result {
            Some(blind_index_result::Result::Ok(_)) => "ok".to_owned(),
            Some(blind_index_result::Result::Error(e)) => e.reason.clone(),
            None => "none".to_owned(),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "ok",
            "INDEX_NOT_CONFIGURED",
            "TENANT_NOT_FOUND",
            "INVALID_ARGUMENT",
            "ok"
        ]
    );
    // a batch over the item limit is refused whole
    let e = c
        .blind_index_batch(pb::BlindIndexBatchRequest {
            items: vec![req("acme", "email", b"x"); 10_001],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "BATCH_TOO_LARGE");
    Ok(())
}

/// Rotation does not break search: new values index under the new version, a lookup
/// returns the index under every usable version (so rows not yet re-indexed match),
/// and a suspended or shredded tenant computes nothing.
#[tokio::test]
async fn lookups_span_key_versions_and_key_states_are_honoured() -> Result<()> {
    let s = Fixture::start().await?;
    let mut c = CryptoClient::new(s.channel().await?);
    let mut keys = KeysClient::new(s.channel().await?);
    create(&mut keys, "acme").await;
    let v1 = index(&mut c, "acme", "email", "ann@example.org").await;
    let mut lookup = req("acme", "email", b"ann@example.org");
    lookup.lookup = true;
    let before = c.blind_index(lookup.clone()).await?.into_inner();
    assert_eq!(before.lookup_indexes, vec![v1.clone()]);
    keys.rotate_tenant_key(as_id(
        ids::OPS,
        pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        },
    ))
    .await?;
    let after = c
        .blind_index(req("acme", "email", b"ann@example.org"))
        .await?
        .into_inner();
    assert_eq!(after.key_version, 2);
    assert_ne!(after.index, v1);
    assert_eq!(&after.index[..5], &[0xB1, 0, 0, 0, 2]);
    assert!(
        after.lookup_indexes.is_empty(),
        "no lookup: only the value to store"
    );
    let both = c.blind_index(lookup.clone()).await?.into_inner();
    assert_eq!(both.lookup_indexes, vec![after.index.clone(), v1.clone()]);
    // the Argon2id field too
    let mut dob = req("acme", "dob", b"1990-01-31");
    dob.lookup = true;
    assert_eq!(
        c.blind_index(dob.clone())
            .await?
            .into_inner()
            .lookup_indexes
            .len(),
        2
    );

    // restriction of the tenant: nothing indexes; lifted: same values again
    let mut er = ErasuresClient::new(s.channel().await?);
    er.suspend_subject(as_id(
        ids::ERASURE,
        pb::RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: String::new(),
        },
    ))
    .await?;
    refused(
        &mut c,
        lookup.clone(),
        Code::FailedPrecondition,
        "KEY_SUSPENDED",
    )
    .await;
    er.resume_subject(as_id(
        ids::ERASURE,
        pb::RestrictionRequest {
            tenant_id: "acme".into(),
            subject_id: String::new(),
        },
    ))
    .await?;
    assert_eq!(c.blind_index(lookup.clone()).await?.into_inner(), both);

    // erasure of the tenant: index keys are gone with its key versions
    let e = er
        .shred_tenant(as_id(
            ids::ERASURE,
            pb::ShredTenantRequest {
                tenant_id: "acme".into(),
                grace_seconds: 0,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(e.state, pb::ErasureState::Completed as i32);
    refused(&mut c, lookup, Code::FailedPrecondition, "KEY_DESTROYED").await;
    refused(
        &mut c,
        req("acme", "dob", b"1990-01-31"),
        Code::FailedPrecondition,
        "KEY_DESTROYED",
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn pseudonyms_are_stable_unlinkable_and_end_with_the_subject_key() -> Result<()> {
    let s = Fixture::start().await?;
    let mut c = CryptoClient::new(s.channel().await?);
    let mut keys = KeysClient::new(s.channel().await?);
    create(&mut keys, "acme").await;
    create(&mut keys, "globex").await;

    let p = pseudonym(&mut c, "acme", "user-1", "analytics").await?;
    assert_eq!(p.len(), 32);
    assert!(
        p.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(p, pseudonym(&mut c, "acme", "user-1", "analytics").await?);
    // unlinkable across purposes, subjects and tenants
    let others = [
        pseudonym(&mut c, "acme", "user-1", "marketing").await?,
        pseudonym(&mut c, "acme", "user-2", "analytics").await?,
        pseudonym(&mut c, "globex", "user-1", "analytics").await?,
    ];
    for o in &others {
        assert_ne!(&p, o);
    }
    // the subject's key was created on first use, and it is what the pseudonym
    // derives from: encrypting for the subject later does not change it
    s.keyring.subject("acme", "user-1").await?;
    // stable across a tenant key rotation (subject keys are only rewrapped)
    keys.rotate_tenant_key(as_id(
        ids::OPS,
        pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        },
    ))
    .await?;
    assert_eq!(p, pseudonym(&mut c, "acme", "user-1", "analytics").await?);

    // bad input
    for (t, subj, purpose, why) in [
        ("acme", "", "analytics", "INVALID_ARGUMENT"),
        ("acme", "user-1", "", "INVALID_ARGUMENT"),
        ("acme", "user 1", "analytics", "INVALID_ARGUMENT"),
        ("nobody", "user-1", "analytics", "TENANT_NOT_FOUND"),
    ] {
        let e = pseudonym(&mut c, t, subj, purpose).await.unwrap_err();
        assert_eq!(reason(&e), why, "{t} {subj} {purpose}: {e:?}");
    }

    // restriction (Art. 18): refused while suspended, the same pseudonym once lifted
    let mut er = ErasuresClient::new(s.channel().await?);
    let r = pb::RestrictionRequest {
        tenant_id: "acme".into(),
        subject_id: "user-1".into(),
    };
    er.suspend_subject(as_id(ids::ERASURE, r.clone())).await?;
    let e = pseudonym(&mut c, "acme", "user-1", "analytics")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "KEY_SUSPENDED")
    );
    er.resume_subject(as_id(ids::ERASURE, r)).await?;
    assert_eq!(p, pseudonym(&mut c, "acme", "user-1", "analytics").await?);

    // erasure: once shredded the pseudonym can never be computed again, for any
    // purpose, so it cannot be linked to new data; other subjects are unaffected
    let e = er
        .shred_subject(as_id(
            ids::ERASURE,
            pb::ShredSubjectRequest {
                tenant_id: "acme".into(),
                subject_id: "user-1".into(),
                grace_seconds: 0,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(e.state, pb::ErasureState::Completed as i32);
    for purpose in ["analytics", "marketing", "new-purpose"] {
        let e = pseudonym(&mut c, "acme", "user-1", purpose)
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::FailedPrecondition, "KEY_DESTROYED")
        );
    }
    // a subject erased before it ever had a key never gets one either
    er.shred_subject(as_id(
        ids::ERASURE,
        pb::ShredSubjectRequest {
            tenant_id: "acme".into(),
            subject_id: "user-9".into(),
            grace_seconds: 0,
        },
    ))
    .await?;
    let e = pseudonym(&mut c, "acme", "user-9", "analytics")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_DESTROYED");
    assert_eq!(
        others[1],
        pseudonym(&mut c, "acme", "user-2", "analytics").await?
    );

    // batch: one result per item, a shredded subject fails alone
    let items: Vec<_> = ["user-1", "user-2", "user-3"]
        .iter()
        .map(|u| PseudonymizeRequest {
            tenant_id: "acme".into(),
            subject_id: (*u).into(),
            purpose: "analytics".into(),
        })
        .collect();
    let out = c
        .pseudonymize_batch(pb::PseudonymizeBatchRequest { items })
        .await?
        .into_inner();
    let got: Vec<String> = out
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pseudonymize_result::Result::Ok(ok)) => ok.pseudonym,
            Some(pseudonymize_result::Result::Error(e)) => e.reason,
            None => "none".into(),
        })
        .collect();
    assert_eq!(got[0], "KEY_DESTROYED");
    assert_eq!(got[1], others[1]);
    assert_eq!(
        got[2],
        pseudonym(&mut c, "acme", "user-3", "analytics").await?
    );
    Ok(())
}

/// The re-encryption job recomputes blind-index columns (binary and text form) under
/// the active version, fills missing ones, clears those of shredded values, and the
/// old version can then be retired: search keeps working through the whole rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reencryption_job_reindexes_and_search_survives_rotation_and_retirement() -> Result<()> {
    use fieldkey::crypto::{Aad, to_text};
    use fieldkey::jobs::{JobSpec, Runner, RunnerConfig};
    use sqlx::Executor as _;
    use sqlx::Row as _;
    const ROWS: i64 = 400;
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(&dir)?;
    let keyring = Arc::new(
        Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig {
                revalidate_after: std::time::Duration::from_millis(100),
                ..KeyringConfig::default()
            },
        )
        .with_index_profiles(profiles()),
    );
    let app_db = common::PgDb::create().await?;
    let app = sqlx::PgPool::connect(&app_db.dsn).await?;
    app.execute(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, tenant_id TEXT NOT NULL, user_id TEXT, \
         email BYTEA, email_bidx TEXT, login TEXT, login_bidx BYTEA)",
    )
    .await?;
    let tenant_of = |id: i64| if id % 2 == 0 { "acme" } else { "globex" };
    for t in ["acme", "globex"] {
        keyring.create_tenant(t, None).await?;
    }
    let email_of = |id: i64| format!("User{id}@Example.org");
    for id in 1..=ROWS {
        let t = tenant_of(id);
        let subject = format!("user-{id}");
        let ctx = id.to_string();
        let aad = |field| Aad {
            tenant: t,
            subject: Some(&subject),
            field,
            context: ctx.as_bytes(),
        };
        let email = keyring
            .encrypt(&aad("email"), email_of(id).as_bytes())
            .await?;
        let login = to_text(
            &keyring
                .encrypt(&aad("login"), format!("u{id}").as_bytes())
                .await?,
        );
        // every 10th row has no index yet (the column was added after the data)
        let email_bidx = (id % 10 != 0).then_some(
            keyring
                .blind_index(t, "email", email_of(id).as_bytes(), false)
                .await?
                .index
                .to_text(),
        );
        let login_bidx = keyring
            .blind_index(t, "login", format!("u{id}").as_bytes(), false)
            .await?
            .index
            .into_bytes();
        sqlx::query("INSERT INTO users VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(id)
            .bind(t)
            .bind(&subject)
            .bind(email)
            .bind(email_bidx)
            .bind(login)
            .bind(login_bidx)
            .execute(&app)
            .await?;
    }
    for t in ["acme", "globex"] {
        keyring.rotate_tenant(t).await?;
    }
    // user-7 is erased: its row's indexes must not stay computable
    keyring.shred_subject("globex", "user-7").await?;
    // before the job: a lookup finds old rows by their v1 index
    let find = |t: &'static str, id: i64| {
        let keyring = keyring.clone();
        let app = app.clone();
        async move {
            let li = keyring
                .blind_index(t, "email", email_of(id).to_lowercase().as_bytes(), true)
                .await
                .unwrap();
            let texts: Vec<String> = li.lookup.iter().map(BlindIndex::to_text).collect();
            let rows =
                sqlx::query("SELECT id FROM users WHERE tenant_id = $1 AND email_bidx = ANY($2)")
                    .bind(t)
                    .bind(&texts)
                    .fetch_all(&app)
                    .await
                    .unwrap();
            (
                texts.len(),
                rows.iter().map(|r| r.get::<i64, _>(0)).collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(find("acme", 42).await, (2, vec![42]));
    // The job starts once the keyring's revalidation bound (100 ms) has passed since
    // v1 stopped encrypting, so that it counts for v1's retirement below.
    for t in ["acme", "globex"] {
        common::past_version_change(store.as_ref(), t, 1, std::time::Duration::from_millis(100))
            .await;
    }

    let spec_text = |name: &str| {
        format!(
            r#"
name = "{name}"
database_url_env = "FK_TEST_APP_DB"
table = "users"
primary_key = "id"
tenant_column = "tenant_id"
subject_column = "user_id"
context_column = "id"
batch_size = 64
[[columns]]
name = "email"
field = "email"
blind_index = "email_bidx"
[[columns]]
name = "login"
field = "login"
blind_index = "login_bidx"
"#
        )
    };
    let spec = JobSpec::from_toml(&spec_text("users-reindex"))?;
    // a runner without the field's profile refuses before doing anything
    let bare = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let (r, _) = Runner::new(
        bare,
        store.clone(),
        app.clone(),
        spec.clone(),
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let e = r.run().await.unwrap_err();
    assert!(
        matches!(e, fieldkey::error::Error::IndexNotConfigured { .. }),
        "{e:?}"
    );
    assert!(store.get_job("users-reindex").await?.is_none());

    let (runner, _) = Runner::new(
        keyring.clone(),
        store.clone(),
        app.clone(),
        spec,
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let out = runner.run().await?;
    let p = &out.progress;
    eprintln!("reindex job: {p:?}");
    assert_eq!(out.state, fieldkey::store::JobState::Completed);
    assert_eq!(p.values_shredded, 2, "user-7's email and login");
    assert_eq!(p.indexes_cleared, 2);
    assert_eq!(p.values_rewrapped, 2 * (ROWS as u64 - 1));
    assert_eq!(
        p.indexes_recomputed,
        2 * (ROWS as u64 - 1),
        "stale and missing ones"
    );
    assert_eq!(p.values_failed, 0);
    assert!(p.leftovers.is_empty());

    // every index is now the v2 value of its row's plaintext, in its column's form
    let rows = sqlx::query("SELECT id, tenant_id, email_bidx, login_bidx FROM users ORDER BY id")
        .fetch_all(&app)
        .await?;
    for r in &rows {
        let id: i64 = r.get(0);
        let t: String = r.get(1);
        let eb: Option<String> = r.get(2);
        let lb: Option<Vec<u8>> = r.get(3);
        if id == 7 {
            assert_eq!((eb, lb), (None, None), "shredded row's indexes cleared");
            continue;
        }
        let want = keyring
            .blind_index(&t, "email", email_of(id).as_bytes(), false)
            .await?
            .index;
        assert_eq!(want.version(), 2);
        assert_eq!(eb.as_deref(), Some(want.to_text().as_str()), "row {id}");
        let want = keyring
            .blind_index(&t, "login", format!("u{id}").as_bytes(), false)
            .await?
            .index;
        assert_eq!(lb.as_deref(), Some(want.as_bytes()), "row {id}");
    }
    // a second job finds everything current and writes nothing
    let (again, _) = Runner::new(
        keyring.clone(),
        store.clone(),
        app.clone(),
        JobSpec::from_toml(&spec_text("users-reindex-check"))?,
        RunnerConfig::new(std::time::Duration::from_secs(5)),
    );
    let p = again.run().await?.progress;
    assert_eq!(p.indexes_current, 2 * (ROWS as u64 - 1));
    assert_eq!(
        (p.indexes_recomputed, p.indexes_cleared, p.rows_updated),
        (0, 0, 0)
    );
    // the old version can be retired; lookups then compute v2 only, and still match
    for t in ["acme", "globex"] {
        keyring.retire_key_version(t, 1).await?;
    }
    assert_eq!(find("acme", 42).await, (1, vec![42]));
    assert_eq!(find("globex", 41).await, (1, vec![41]));
    assert_eq!(
        find("acme", 40).await,
        (1, vec![40]),
        "a row whose index was missing"
    );
    assert_eq!(
        find("globex", 7).await,
        (1, vec![]),
        "the erased user is not found"
    );
    drop(app);
    app_db.drop_db().await
}
