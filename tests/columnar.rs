//! The columnar batches (EncryptColumn, DecryptColumn, RewrapColumn, BlindIndexColumn)
//! over real gRPC against an in-process sidecar (SQLite, local KMS): they give exactly
//! the results of the item-per-message calls, fail a bad value alone at its position,
//! refuse a malformed shape as a whole, and cannot be used to get around what a single
//! call refuses (another subject's or row's value, a shredded subject, a version that
//! is not usable, the row-binding rule).
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;
#[path = "blind_index/profiles.rs"]
mod profiles;

use common::grpc::{create_tenant, reason};

use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::{
    self, BlindIndexColumnRequest, CiphertextFormat, ColumnError, DecryptColumnRequest,
    DecryptRequest, EncryptColumnRequest, EncryptRequest, IndexFormat, RewrapColumnRequest,
};
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;
use tonic::transport::Channel;

struct Fixture {
    _dir: tempfile::TempDir,
    server: common::sidecar::InProcess,
    keyring: Arc<Keyring>,
    ch: Channel,
}

impl Fixture {
    async fn start(row_binding: Option<&str>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = common::sqlite_store(&dir).await?;
        let kms = common::local_kms(&dir)?;
        let keyring = Arc::new(
            Keyring::new(store.clone(), kms.clone(), KeyringConfig::default())
                .with_index_profiles(profiles::profiles()),
        );
        let limits = fieldkey::config::Limits {
            max_field_bytes: 4096,
            max_batch_items: 500,
            ..Default::default()
        };
        let mut ctx = fieldkey::wiring::Parts::new(keyring.clone(), store, kms)
            .context()
            .with_limits(limits);
        if let Some(field) = row_binding {
            ctx = ctx.with_row_binding(fieldkey::config::RowBindingSettings {
                required: vec![field.to_owned()],
            });
        }
        let server = common::sidecar::InProcess::start(ctx).await?;
        let ch = server.channel().await?;
        create_tenant(&ch, "acme").await?;
        create_tenant(&ch, "other").await?;
        Ok(Self {
            _dir: dir,
            server,
            keyring,
            ch,
        })
    }

    fn client(&self) -> CryptoClient<Channel> {
        CryptoClient::new(self.ch.clone())
    }
}

fn b(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

fn row(i: usize) -> Bytes {
    Bytes::from(format!("row:{i}"))
}

fn value(i: usize) -> Bytes {
    Bytes::from(format!("user{i}@example.org"))
}

fn subject(i: usize) -> String {
    format!("user-{}", i % 7)
}

fn failures(errors: &[ColumnError]) -> Vec<(u32, String, i32)> {
    errors
        .iter()
        .map(|e| {
            let ie = e.error.as_ref().unwrap();
            (e.index, ie.reason.clone(), ie.code)
        })
        .collect()
}

/// A column of 200 values with per-value subjects and contexts, in both forms: each
/// ciphertext decrypts with the single Decrypt call, and the DecryptColumn of values
/// made by single Encrypt calls gives back every value.
#[tokio::test]
async fn columns_agree_with_single_calls_in_both_directions() -> Result<()> {
    let f = Fixture::start(None).await?;
    let mut c = f.client();
    for format in [CiphertextFormat::Binary, CiphertextFormat::Text] {
        let n = 200;
        let out = c
            .encrypt_column(EncryptColumnRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                subject_id: String::new(),
                subject_ids: (0..n).map(subject).collect(),
                contexts: (0..n).map(row).collect(),
                plaintexts: (0..n).map(value).collect(),
                format: format as i32,
            })
            .await?
            .into_inner();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.key_version, 1);
        assert_eq!(out.ciphertexts.len(), n);
        for (i, ct) in out.ciphertexts.iter().enumerate() {
            if format == CiphertextFormat::Text {
                assert!(ct.starts_with(b"fk1:"));
            }
            let back = c
                .decrypt(DecryptRequest {
                    tenant_id: "acme".into(),
                    subject_id: subject(i),
                    field: "email".into(),
                    context: row(i).to_vec().into(),
                    ciphertext: ct.to_vec().into(),
                    repair: false,
                })
                .await?
                .into_inner();
            assert_eq!(back.plaintext, value(i));
        }
    }
    // The other direction: single Encrypts (one subject for all), one DecryptColumn.
    let mut cts = Vec::new();
    for i in 0..50 {
        let r = c
            .encrypt(EncryptRequest {
                tenant_id: "acme".into(),
                subject_id: "user-9".into(),
                field: "email".into(),
                context: row(i).to_vec().into(),
                plaintext: value(i).to_vec().into(),
                format: 0,
            })
            .await?
            .into_inner();
        cts.push(r.ciphertext);
    }
    let back = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            subject_id: "user-9".into(),
            subject_ids: vec![],
            contexts: (0..50).map(row).collect(),
            ciphertexts: cts,
            repair: false,
        })
        .await?
        .into_inner();
    assert!(back.errors.is_empty(), "{:?}", back.errors);
    assert_eq!(back.plaintexts, (0..50).map(value).collect::<Vec<_>>());
    assert_eq!(back.key_versions, vec![1; 50]);
    f.server.stop().await;
    Ok(())
}

/// The attacks a column could hide: a value moved to another row, to another subject,
/// to another tenant's column, a shredded subject's value among others, a corrupt
/// value, an oversized one: each fails alone, at its position, with the single call's
/// reason; the others decrypt.
#[tokio::test]
async fn a_bad_value_fails_alone_and_at_its_position() -> Result<()> {
    let f = Fixture::start(None).await?;
    let mut c = f.client();
    let n = 8;
    let enc = c
        .encrypt_column(EncryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            subject_ids: (0..n).map(|i| format!("s{i}")).collect(),
            contexts: (0..n).map(row).collect(),
            plaintexts: (0..n).map(value).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut cts = enc.ciphertexts.clone();
    let mut contexts: Vec<Bytes> = (0..n).map(row).collect();
    let mut subjects: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    contexts[1] = row(2); // moved to another row
    subjects[2] = "s3".into(); // claimed for another subject
    assert!(f.keyring.shred_subject("acme", "s4").await?); // erased
    let mut corrupt = cts[5].to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    cts[5] = Bytes::from(corrupt);
    cts[6] = b(b"not an envelope");
    cts[7] = Bytes::from(vec![0u8; 5000]); // over max_field_bytes
    let out = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            subject_ids: subjects,
            contexts,
            ciphertexts: cts.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        failures(&out.errors),
        vec![
            (1, "AUTHENTICATION_FAILED".into(), Code::DataLoss as i32),
            (2, "AUTHENTICATION_FAILED".into(), Code::DataLoss as i32),
            (4, "KEY_DESTROYED".into(), Code::FailedPrecondition as i32),
            (5, "AUTHENTICATION_FAILED".into(), Code::DataLoss as i32),
            (
                6,
                "MALFORMED_CIPHERTEXT".into(),
                Code::InvalidArgument as i32
            ),
            (7, "VALUE_TOO_LARGE".into(), Code::InvalidArgument as i32),
        ]
    );
    assert_eq!(out.plaintexts[0], value(0));
    assert_eq!(out.plaintexts[3], value(3));
    for i in [1, 2, 4, 5, 6, 7] {
        assert!(out.plaintexts[i].is_empty(), "value {i} leaked");
        assert_eq!(out.key_versions[i], 0);
    }
    // Another tenant's column does not open acme's values (its subject s0 exists).
    f.keyring.ensure_subject("other", "s0").await?;
    let other = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "other".into(),
            field: "email".into(),
            subject_id: "s0".into(),
            contexts: vec![row(0)],
            ciphertexts: vec![enc.ciphertexts[0].clone()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(failures(&other.errors)[0].1, "AUTHENTICATION_FAILED");
    // A tenant that does not exist: every value's error, not the call's.
    let ghost = c
        .encrypt_column(EncryptColumnRequest {
            tenant_id: "ghost".into(),
            field: "email".into(),
            plaintexts: vec![value(0), value(1)],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        failures(&ghost.errors),
        vec![
            (0, "TENANT_NOT_FOUND".into(), Code::NotFound as i32),
            (1, "TENANT_NOT_FOUND".into(), Code::NotFound as i32)
        ]
    );
    assert_eq!(ghost.ciphertexts, vec![Bytes::new(), Bytes::new()]);
    f.server.stop().await;
    Ok(())
}

/// A column whose lists do not line up is refused as a whole (COLUMN_MISMATCH), as is
/// one over limits.max_batch_items (BATCH_TOO_LARGE); nothing is encrypted.
#[tokio::test]
async fn a_malformed_column_is_refused_as_a_whole() -> Result<()> {
    let f = Fixture::start(None).await?;
    let mut c = f.client();
    let base = EncryptColumnRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        plaintexts: (0..3).map(value).collect(),
        ..Default::default()
    };
    let cases = [
        (
            "contexts short",
            EncryptColumnRequest {
                contexts: vec![row(0)],
                ..base.clone()
            },
            "COLUMN_MISMATCH",
        ),
        (
            "subject_ids long",
            EncryptColumnRequest {
                subject_ids: (0..4).map(subject).collect(),
                ..base.clone()
            },
            "COLUMN_MISMATCH",
        ),
        (
            "both subject forms",
            EncryptColumnRequest {
                subject_id: "u".into(),
                subject_ids: (0..3).map(subject).collect(),
                ..base.clone()
            },
            "COLUMN_MISMATCH",
        ),
        (
            "too many values",
            EncryptColumnRequest {
                plaintexts: (0..501).map(value).collect(),
                ..base.clone()
            },
            "BATCH_TOO_LARGE",
        ),
    ];
    for (what, req, want) in cases {
        let err = c.encrypt_column(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(reason(&err), want, "{what}");
    }
    let err = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            contexts: vec![row(0)],
            ciphertexts: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "COLUMN_MISMATCH");
    let ok = c.encrypt_column(base).await?.into_inner();
    assert_eq!(ok.ciphertexts.len(), 3);
    f.server.stop().await;
    Ok(())
}

/// Row binding holds for columns: a field that must be bound to its row refuses the
/// values that came without a context, one by one.
#[tokio::test]
async fn row_binding_applies_to_each_value_of_a_column() -> Result<()> {
    let f = Fixture::start(Some("ssn")).await?;
    let mut c = f.client();
    let out = c
        .encrypt_column(EncryptColumnRequest {
            tenant_id: "acme".into(),
            field: "ssn".into(),
            contexts: vec![row(0), Bytes::new(), row(2)],
            plaintexts: (0..3).map(value).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        failures(&out.errors),
        vec![(1, "CONTEXT_REQUIRED".into(), Code::InvalidArgument as i32)]
    );
    assert!(!out.ciphertexts[0].is_empty() && out.ciphertexts[1].is_empty());
    f.server.stop().await;
    Ok(())
}

/// RewrapColumn after a rotation: values on v1 move to v2 in their own form, values
/// already on v2 come back as they were, `verify` catches a current value moved to
/// another row; every result decrypts.
#[tokio::test]
async fn rewrap_column_moves_old_values_and_verifies_current_ones() -> Result<()> {
    let f = Fixture::start(None).await?;
    let mut c = f.client();
    let enc = |format: CiphertextFormat, range: std::ops::Range<usize>| EncryptColumnRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        subject_ids: range.clone().map(subject).collect(),
        contexts: range.clone().map(row).collect(),
        plaintexts: range.map(value).collect(),
        format: format as i32,
        ..Default::default()
    };
    let v1 = c
        .encrypt_column(enc(CiphertextFormat::Binary, 0..4))
        .await?
        .into_inner();
    let v1_text = c
        .encrypt_column(enc(CiphertextFormat::Text, 4..6))
        .await?
        .into_inner();
    f.keyring.rotate_tenant("acme").await?;
    let v2 = c
        .encrypt_column(enc(CiphertextFormat::Binary, 6..8))
        .await?
        .into_inner();
    assert_eq!(v2.key_version, 2);
    let all: Vec<Bytes> = [v1.ciphertexts, v1_text.ciphertexts, v2.ciphertexts].concat();
    let req = RewrapColumnRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        subject_ids: (0..8).map(subject).collect(),
        contexts: (0..8).map(row).collect(),
        ciphertexts: all.clone(),
        ..Default::default()
    };
    let out = c.rewrap_column(req.clone()).await?.into_inner();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.previous_key_versions, vec![1, 1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(out.key_versions, vec![2; 8]);
    assert!(out.ciphertexts[4].starts_with(b"fk1:") && !out.ciphertexts[0].starts_with(b"fk1:"));
    assert_eq!(
        out.ciphertexts[6..],
        all[6..],
        "current values come back as they were"
    );
    let back = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            subject_ids: (0..8).map(subject).collect(),
            contexts: (0..8).map(row).collect(),
            ciphertexts: out.ciphertexts.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(back.plaintexts, (0..8).map(value).collect::<Vec<_>>());
    assert_eq!(back.key_versions, vec![2; 8]);
    // A current value in the wrong row: unchecked it passes, verified it fails.
    let mut moved = req.clone();
    moved.contexts[7] = row(6);
    let unchecked = c.rewrap_column(moved.clone()).await?.into_inner();
    assert!(unchecked.errors.is_empty());
    moved.verify = true;
    let verified = c.rewrap_column(moved).await?.into_inner();
    assert_eq!(
        failures(&verified.errors),
        vec![(7, "AUTHENTICATION_FAILED".into(), Code::DataLoss as i32)]
    );
    f.server.stop().await;
    Ok(())
}

/// BlindIndexColumn gives the BlindIndexBatch's indexes, in both forms and with
/// lookups (k indexes per value after a rotation, active first); a value the profile
/// refuses fails alone; a field without a profile fails every value.
#[tokio::test]
async fn blind_index_column_matches_the_item_batch() -> Result<()> {
    let f = Fixture::start(None).await?;
    let mut c = f.client();
    f.keyring.rotate_tenant("acme").await?;
    let values: Vec<Bytes> = vec![b(b"Alice@Example.org"), b(b"bob@example.org"), b(b"x")];
    for format in [IndexFormat::Binary, IndexFormat::Text] {
        let col = c
            .blind_index_column(BlindIndexColumnRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                values: values.clone(),
                format: format as i32,
                lookup: true,
            })
            .await?
            .into_inner();
        assert!(col.errors.is_empty(), "{:?}", col.errors);
        assert_eq!(col.key_version, 2);
        assert_eq!(col.lookup_key_versions, vec![2, 1]);
        assert_eq!(col.lookup_indexes.len(), values.len() * 2);
        let items = values
            .iter()
            .map(|v| pb::BlindIndexRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                value: v.to_vec(),
                format: format as i32,
                lookup: true,
            })
            .collect();
        let batch = c
            .blind_index_batch(pb::BlindIndexBatchRequest { items })
            .await?
            .into_inner();
        for (i, r) in batch.results.iter().enumerate() {
            let Some(pb::blind_index_result::Result::Ok(ok)) = &r.result else {
                panic!("item {i}: {r:?}");
            };
            assert_eq!(col.indexes[i], ok.index);
            assert_eq!(col.lookup_indexes[i * 2..i * 2 + 2], ok.lookup_indexes[..]);
        }
    }
    let none = c
        .blind_index_column(BlindIndexColumnRequest {
            tenant_id: "acme".into(),
            field: "no-profile".into(),
            values: values.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(none.errors.len(), 3);
    assert_eq!(failures(&none.errors)[0].1, "INDEX_NOT_CONFIGURED");
    f.server.stop().await;
    Ok(())
}
