//! Blind indexes and pseudonyms over real gRPC (a real socket, SQLite key store, local
//! KMS): determinism, separation by tenant / field / version / purpose, normalization,
//! Argon2id, lookups across a rotation, errors, restriction and erasure.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;
#[path = "blind_index/profiles.rs"]
mod profiles;

use profiles::profiles;

use common::grpc::{as_id, ids, reason};

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Result;
use fieldkey::crypto::BlindIndex;
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
