//! Read repair (docs/ROTATION.md "Read repair") over real gRPC: Decrypt, DecryptBatch and
//! DecryptColumn report a value under a decrypt-only version as stale and, when asked,
//! return it re-encrypted under the active version in the same call; the repaired
//! value keeps its tenant/subject/field/context binding and its form; a caller that
//! may decrypt but not rewrap cannot get a repair (the call is refused, nothing is
//! decrypted); restricted and shredded keys are refused as on any decrypt; the audit
//! counts repairs as rewraps; `/metrics` of a real `fieldkey serve` counts stale reads
//! per tenant and repaired values.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use common::grpc::{as_id, create_tenant, ids, reason};
use common::sample;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use fieldkey::audit::{AuditConfig, AuditLog};
use fieldkey::policy::authz::Authorizer;
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{
    self, CiphertextFormat, DecryptBatchRequest, DecryptColumnRequest, DecryptRequest,
    DecryptResponse, EncryptRequest, decrypt_result,
};
use fieldkey::service::gate::{Gate, IdentityConfig};
use fieldkey::store::KeyStore;
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;
use tonic::transport::Channel;

/// An identity that may decrypt every field (over any transport) but neither rewrap
/// nor encrypt: what read repair must not turn into a writer.
const READER: &str = "spiffe://example.org/ns/reports/sa/reader";

const READER_POLICY: &str = r#"
@id("reader-decrypts")
permit (
  principal == Identity::"spiffe://example.org/ns/reports/sa/reader",
  action == Action::"Crypto::Decrypt",
  resource is Field
);
"#;

/// An in-process sidecar (SQLite, local KMS) with the example policies and the READER
/// grant, callers named by `l5d-client-id`, data operations audited.
struct Fixture {
    _dir: tempfile::TempDir,
    _server: common::sidecar::InProcess,
    keyring: Arc<Keyring>,
    store: Arc<dyn KeyStore>,
    audit: Arc<AuditLog>,
    ch: Channel,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = common::sqlite_store(&dir).await?;
        let kms = common::local_kms(&dir)?;
        let keyring = Arc::new(Keyring::new(
            store.clone(),
            kms.clone(),
            KeyringConfig::default(),
        ));
        let parts = fieldkey::wiring::Parts::new(keyring.clone(), store.clone(), kms);
        let policies =
            common::sidecar::example_policies_plus(dir.path(), &[("reader.cedar", READER_POLICY)]);
        let authz = Arc::new(Authorizer::load(&policies)?);
        let audit = Arc::new(parts.audit_log(AuditConfig {
            window: Duration::from_secs(3600),
            checkpoint_every: Duration::from_secs(3600),
            executor: "test".into(),
        }));
        let gate = Arc::new(Gate::new(
            Some(authz),
            Some(audit.clone()),
            IdentityConfig {
                local_identity: Arc::from(ids::APP),
                trust_linkerd: true,
            },
        ));
        let mut ctx = parts.context().with_gate(gate);
        ctx.audit = audit.clone();
        let server = common::sidecar::InProcess::start_behind_linkerd(ctx).await?;
        let ch = server.channel().await?;
        create_tenant(&ch, "acme").await?;
        create_tenant(&ch, "other").await?;
        Ok(Self {
            _dir: dir,
            _server: server,
            keyring,
            store,
            audit,
            ch,
        })
    }

    fn client(&self) -> CryptoClient<Channel> {
        CryptoClient::new(self.ch.clone())
    }

    /// One value of `acme/email` encrypted (as the application) under the active version.
    async fn encrypt(&self, subject: &str, context: &str, value: &str, text: bool) -> Bytes {
        let format = if text {
            CiphertextFormat::Text
        } else {
            CiphertextFormat::Binary
        };
        self.client()
            .encrypt(EncryptRequest {
                tenant_id: "acme".into(),
                subject_id: subject.into(),
                field: "email".into(),
                context: Bytes::from(context.to_owned()),
                plaintext: Bytes::from(value.to_owned()),
                format: format as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .ciphertext
    }

    /// Rotates acme: the version in use becomes decrypt-only. Returns the new version.
    async fn rotate(&self) -> u32 {
        let t = self.keyring.rotate_tenant("acme").await.unwrap();
        t.active_version().unwrap()
    }

    /// The audit window's count of (actor, action, outcome), after a flush.
    async fn audit_count(&self, actor: &str, action: &str, outcome: &str) -> u64 {
        self.audit.flush().await.unwrap();
        let recs = self.store.audit_records(0, 100_000).await.unwrap();
        recs.iter()
            .filter(|r| {
                r.event.actor == actor
                    && r.event.action == action
                    && r.event.details["outcome"] == outcome
            })
            .map(|r| r.event.details["count"].as_u64().unwrap())
            .sum()
    }
}

fn req(subject: &str, context: &str, ct: &Bytes, repair: bool) -> DecryptRequest {
    DecryptRequest {
        tenant_id: "acme".into(),
        subject_id: subject.into(),
        field: "email".into(),
        context: Bytes::from(context.to_owned()),
        ciphertext: ct.clone(),
        repair,
    }
}

async fn decrypt(c: &mut CryptoClient<Channel>, r: DecryptRequest) -> DecryptResponse {
    c.decrypt(r).await.unwrap().into_inner()
}

fn is_text(ct: &[u8]) -> bool {
    ct.starts_with(b"fk1:")
}

/// Single Decrypt, tenant- and subject-scoped, binary and text: a v1 value after the
/// rotation to v2 is stale; without repair nothing else comes back; with repair the
/// value re-encrypted under v2, in the input's form, which decrypts to the same
/// plaintext with the same context and is current; a current value is not stale and
/// gets no repair.
#[tokio::test]
async fn decrypt_reports_a_stale_value_and_repairs_it_when_asked() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let mut old = Vec::new();
    for subject in ["", "alice"] {
        for text in [false, true] {
            old.push((
                subject,
                text,
                f.encrypt(subject, "row-1", "a@x.org", text).await,
            ));
        }
    }
    let active = f.rotate().await;
    assert_eq!(active, 2);
    for (subject, text, ct) in &old {
        assert_eq!(is_text(ct), *text);
        let plain = decrypt(&mut c, req(subject, "row-1", ct, false)).await;
        assert_eq!(&plain.plaintext[..], b"a@x.org");
        assert_eq!(plain.key_version, 1);
        assert!(plain.stale, "a v1 value after rotation is stale");
        assert!(
            plain.repaired_ciphertext.is_empty(),
            "no repair unless asked"
        );
        assert_eq!(plain.repaired_key_version, 0);

        let fixed = decrypt(&mut c, req(subject, "row-1", ct, true)).await;
        assert_eq!(&fixed.plaintext[..], b"a@x.org");
        assert!(fixed.stale);
        assert_eq!(fixed.repaired_key_version, active);
        let new = fixed.repaired_ciphertext;
        assert!(!new.is_empty());
        assert_ne!(&new, ct);
        assert_eq!(
            is_text(&new),
            *text,
            "the repaired value keeps the input's form"
        );
        let back = decrypt(&mut c, req(subject, "row-1", &new, true)).await;
        assert_eq!(&back.plaintext[..], b"a@x.org");
        assert_eq!(back.key_version, active, "under the active version");
        assert!(!back.stale, "a current value is not stale");
        assert!(back.repaired_ciphertext.is_empty(), "and gets no repair");
        assert_eq!(back.repaired_key_version, 0);
    }
    Ok(())
}

/// The attack on the binding: a repaired ciphertext is bound exactly as the value it
/// replaces; it does not decrypt for another row (context), subject, field or tenant.
#[tokio::test]
async fn a_repaired_value_keeps_its_binding() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let ct = f.encrypt("alice", "row-1", "a@x.org", false).await;
    f.encrypt("bob", "row-1", "b@x.org", false).await; // bob has a key
    f.rotate().await;
    let new = decrypt(&mut c, req("alice", "row-1", &ct, true))
        .await
        .repaired_ciphertext;
    assert!(!new.is_empty());
    let attempts = [
        ("another row", req("alice", "row-2", &new, false)),
        ("no row", req("alice", "", &new, false)),
        ("another subject", req("bob", "row-1", &new, false)),
        (
            "another field",
            DecryptRequest {
                field: "phone".into(),
                ..req("alice", "row-1", &new, false)
            },
        ),
    ];
    for (what, r) in attempts {
        let e = c.decrypt(r).await.unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::DataLoss, "AUTHENTICATION_FAILED"),
            "{what}: {e:?}"
        );
    }
    // Another tenant: its keys do not open it either (whatever the reason given).
    let mut other = req("alice", "row-1", &new, false);
    other.tenant_id = "other".into();
    assert!(c.decrypt(other).await.is_err(), "another tenant");
    // A tenant-scoped request for a subject-scoped value: refused as on any decrypt.
    let e = c.decrypt(req("", "row-1", &new, false)).await.unwrap_err();
    assert_eq!(reason(&e), "SCOPE_MISMATCH");
    Ok(())
}

/// DecryptBatch: read repair per item, positionally: a stale item with repair, a
/// current one with repair, a stale one without, a corrupt one with repair, a stale
/// text one with repair.
#[tokio::test]
async fn a_batch_repairs_per_item_in_order() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let v1 = f.encrypt("alice", "row-1", "one", false).await;
    let v1_text = f.encrypt("bob", "row-5", "five", true).await;
    let active = f.rotate().await;
    let v2 = f.encrypt("alice", "row-2", "two", false).await;
    let items = vec![
        req("alice", "row-1", &v1, true),
        req("alice", "row-2", &v2, true),
        req("alice", "row-1", &v1, false),
        req("alice", "row-3", &Bytes::from_static(b"garbage"), true),
        req("bob", "row-5", &v1_text, true),
    ];
    let out = c
        .decrypt_batch(DecryptBatchRequest {
            items: items.clone(),
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(out.len(), 5);
    let ok = |i: usize| match &out[i].result {
        Some(decrypt_result::Result::Ok(r)) => r.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let (r0, r1, r2, r4) = (ok(0), ok(1), ok(2), ok(4));
    assert_eq!(&r0.plaintext[..], b"one");
    assert!(r0.stale && !r0.repaired_ciphertext.is_empty());
    assert_eq!(r0.repaired_key_version, active);
    assert_eq!(&r1.plaintext[..], b"two");
    assert!(!r1.stale && r1.repaired_ciphertext.is_empty());
    assert_eq!(&r2.plaintext[..], b"one");
    assert!(r2.stale && r2.repaired_ciphertext.is_empty());
    match &out[3].result {
        Some(decrypt_result::Result::Error(e)) => assert_eq!(e.reason, "MALFORMED_CIPHERTEXT"),
        other => panic!("item 3: {other:?}"),
    }
    assert_eq!(&r4.plaintext[..], b"five");
    assert!(r4.stale && is_text(&r4.repaired_ciphertext));
    for (r, subject, context, value) in [
        (&r0, "alice", "row-1", "one"),
        (&r4, "bob", "row-5", "five"),
    ] {
        let back = decrypt(&mut c, req(subject, context, &r.repaired_ciphertext, false)).await;
        assert_eq!(back.plaintext, Bytes::from(value));
        assert_eq!(back.key_version, active);
    }
    Ok(())
}

/// DecryptColumn: stale, current and failing values mixed, per-value subjects and
/// contexts; every list is positional, the repaired values decrypt under the active
/// version with their own row, in the column's forms.
#[tokio::test]
async fn a_column_repairs_its_stale_values_at_their_positions() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let n = 6;
    let subject = |i: usize| format!("s{}", i % 2);
    let row = |i: usize| format!("row-{i}");
    let value = |i: usize| format!("value {i}");
    let mut cts = Vec::new();
    for i in 0..n {
        // 0, 2, 4 before the rotation (2 in text form); 1, 3, 5 after
        if i % 2 == 0 {
            cts.push(f.encrypt(&subject(i), &row(i), &value(i), i == 2).await);
        } else {
            cts.push(Bytes::new());
        }
    }
    let active = f.rotate().await;
    for i in (1..n).step_by(2) {
        cts[i] = f.encrypt(&subject(i), &row(i), &value(i), false).await;
    }
    let mut contexts: Vec<Bytes> = (0..n).map(|i| Bytes::from(row(i))).collect();
    contexts[4] = Bytes::from("row-elsewhere"); // value 4 moved to another row: fails
    let column = |repair: bool| DecryptColumnRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        subject_ids: (0..n).map(subject).collect(),
        contexts: contexts.clone(),
        ciphertexts: cts.clone(),
        repair,
        ..Default::default()
    };
    let plain = c.decrypt_column(column(false)).await?.into_inner();
    assert_eq!(plain.stale, [true, false, true, false, false, false]);
    assert!(
        plain.repaired_ciphertexts.is_empty(),
        "no repair unless asked"
    );
    assert_eq!(plain.repaired_key_version, 0);

    let out = c.decrypt_column(column(true)).await?.into_inner();
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert_eq!(out.errors[0].index, 4);
    assert_eq!(
        out.errors[0].error.as_ref().unwrap().reason,
        "AUTHENTICATION_FAILED"
    );
    assert_eq!(out.key_versions, [1, active, 1, active, 0, active]);
    assert_eq!(out.stale, [true, false, true, false, false, false]);
    assert_eq!(out.repaired_ciphertexts.len(), n, "one entry per value");
    assert_eq!(out.repaired_key_version, active);
    for i in 0..n {
        let repaired = &out.repaired_ciphertexts[i];
        if !out.stale[i] {
            assert!(repaired.is_empty(), "value {i}: current or failed");
            continue;
        }
        assert_eq!(out.plaintexts[i], Bytes::from(value(i)));
        assert_eq!(is_text(repaired), i == 2, "value {i} keeps its form");
        let back = decrypt(&mut c, req(&subject(i), &row(i), repaired, false)).await;
        assert_eq!(back.plaintext, Bytes::from(value(i)));
        assert_eq!(back.key_version, active);
        // bound to its own row and subject, not its neighbour's
        let e = c
            .decrypt(req(&subject(i + 1), &row(i + 1), repaired, false))
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "AUTHENTICATION_FAILED");
    }
    Ok(())
}

/// The authorization attack: an identity that may decrypt but not rewrap asks for
/// repair. Producing a ciphertext is a write: the call is refused (PERMISSION_DENIED,
/// naming read repair), nothing decrypted, whether or not the value is stale; in a
/// batch the item is refused even right after an item of the same tenant and field was
/// allowed to decrypt (the batch's decision memo is per action); a column is refused
/// whole. Without repair the same identity decrypts and sees `stale`. The audit counts
/// the refusals and the application's repairs as Crypto::Rewrap, and no Decrypt
/// denial for a call refused only for its repair (its Decrypt was allowed).
#[tokio::test]
async fn a_caller_that_may_not_rewrap_gets_no_repair() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let ct = f.encrypt("alice", "row-1", "a@x.org", false).await;
    f.rotate().await;
    let current = f.encrypt("alice", "row-2", "b@x.org", false).await;

    let read = c
        .decrypt(as_id(READER, req("alice", "row-1", &ct, false)))
        .await?
        .into_inner();
    assert!(read.stale && read.repaired_ciphertext.is_empty());
    for (what, value, context) in [("stale", &ct, "row-1"), ("current", &current, "row-2")] {
        let e = c
            .decrypt(as_id(READER, req("alice", context, value, true)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::PermissionDenied, "PERMISSION_DENIED"),
            "{what} value: {e:?}"
        );
        assert!(e.message().contains("read repair"), "{}", e.message());
        assert!(e.message().contains("Crypto::Rewrap"), "{}", e.message());
    }
    let batch = c
        .decrypt_batch(as_id(
            READER,
            DecryptBatchRequest {
                items: vec![
                    req("alice", "row-1", &ct, false),
                    req("alice", "row-1", &ct, true),
                ],
            },
        ))
        .await?
        .into_inner()
        .results;
    match &batch[0].result {
        Some(decrypt_result::Result::Ok(r)) => assert!(r.stale),
        other => panic!("item 0: {other:?}"),
    }
    match &batch[1].result {
        Some(decrypt_result::Result::Error(e)) => assert_eq!(e.reason, "PERMISSION_DENIED"),
        other => panic!("item 1 must be refused: {other:?}"),
    }
    let column = c
        .decrypt_column(as_id(
            READER,
            DecryptColumnRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                subject_id: "alice".into(),
                contexts: vec![Bytes::from("row-1"), Bytes::from("row-2")],
                ciphertexts: vec![ct.clone(), current.clone()],
                repair: true,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    assert_eq!(column.errors.len(), 2, "{:?}", column.errors);
    assert!(
        column
            .errors
            .iter()
            .all(|e| e.error.as_ref().unwrap().reason == "PERMISSION_DENIED")
    );
    assert!(
        column.plaintexts.iter().all(Bytes::is_empty),
        "nothing decrypted"
    );
    assert!(column.repaired_ciphertexts.iter().all(Bytes::is_empty));

    // The application may rewrap: its repair goes through and is audited as one.
    let fixed = decrypt(&mut c, req("alice", "row-1", &ct, true)).await;
    assert!(!fixed.repaired_ciphertext.is_empty());
    assert_eq!(
        f.audit_count(READER, "Crypto::Rewrap", "denied").await,
        1 + 1 + 1 + 2
    );
    assert_eq!(f.audit_count(READER, "Crypto::Rewrap", "ok").await, 0);
    assert_eq!(f.audit_count(READER, "Crypto::Decrypt", "ok").await, 2);
    // The decrypts were allowed: a call refused only for its repair is no Decrypt
    // denial (review finding: the audit said so, per item and per column value).
    assert_eq!(f.audit_count(READER, "Crypto::Decrypt", "denied").await, 0);
    assert_eq!(f.audit_count(ids::APP, "Crypto::Rewrap", "ok").await, 1);
    assert_eq!(
        f.audit_count(ids::APP, "Crypto::Rewrap", "read_repair")
            .await,
        1
    );
    assert_eq!(f.audit_count(ids::APP, "Crypto::Decrypt", "ok").await, 1);
    Ok(())
}

/// Restriction and erasure as on any decrypt: a suspended subject or tenant gets
/// neither the value nor a repaired one (KEY_SUSPENDED), in a column too (the others
/// are repaired); after resumption repair works; a shredded subject's value fails
/// with KEY_DESTROYED.
#[tokio::test]
async fn restricted_and_shredded_keys_get_no_repair() -> Result<()> {
    let f = Fixture::start().await?;
    let mut c = f.client();
    let alice = f.encrypt("alice", "row-1", "a@x.org", false).await;
    let bob = f.encrypt("bob", "row-2", "b@x.org", false).await;
    f.rotate().await;

    f.keyring.suspend_subject("acme", "alice").await?;
    let e = c
        .decrypt(req("alice", "row-1", &alice, true))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_SUSPENDED");
    let column = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            subject_ids: vec!["alice".into(), "bob".into()],
            contexts: vec![Bytes::from("row-1"), Bytes::from("row-2")],
            ciphertexts: vec![alice.clone(), bob.clone()],
            repair: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(column.errors.len(), 1);
    assert_eq!(column.errors[0].index, 0);
    assert_eq!(
        column.errors[0].error.as_ref().unwrap().reason,
        "KEY_SUSPENDED"
    );
    assert!(column.plaintexts[0].is_empty() && column.repaired_ciphertexts[0].is_empty());
    assert!(
        !column.repaired_ciphertexts[1].is_empty(),
        "bob is repaired"
    );
    f.keyring.resume_subject("acme", "alice").await?;
    assert!(
        !decrypt(&mut c, req("alice", "row-1", &alice, true))
            .await
            .repaired_ciphertext
            .is_empty()
    );

    f.keyring.suspend_tenant("acme").await?;
    for (s, ctx, ct) in [("alice", "row-1", &alice), ("bob", "row-2", &bob)] {
        let e = c.decrypt(req(s, ctx, ct, true)).await.unwrap_err();
        assert_eq!(reason(&e), "KEY_SUSPENDED", "{s}");
    }
    f.keyring.resume_tenant("acme").await?;

    assert!(f.keyring.shred_subject("acme", "bob").await?);
    let e = c
        .decrypt(req("bob", "row-2", &bob, true))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "KEY_DESTROYED");
    Ok(())
}

/// `fieldkey serve` counts stale reads per tenant and repaired values on `/metrics`:
/// a current read counts nothing, a stale read one, a repair one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_stale_reads_per_tenant_and_repairs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = common::sidecar::Sidecar::builder()
        .any_port()
        .config_text(
            dir.path(),
            &format!(
                "data_dir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n{}",
                dir.path(),
                common::sidecar::TRUST_MESH
            ),
        )
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", "read repair passphrase")
        .with_metrics()
        .start();
    let ch = s.channel().await;
    create_tenant(&ch, "acme").await?;
    let mut c = CryptoClient::new(ch.clone());
    let mut cts = Vec::new();
    for i in 0..3 {
        let r = c
            .encrypt(EncryptRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                context: Bytes::from(format!("row-{i}")),
                plaintext: Bytes::from(format!("v{i}")),
                ..Default::default()
            })
            .await?
            .into_inner();
        cts.push(r.ciphertext);
    }
    let single = |i: usize, repair: bool| DecryptRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        context: Bytes::from(format!("row-{i}")),
        ciphertext: cts[i].clone(),
        repair,
        ..Default::default()
    };
    // Before the rotation: current, nothing counted.
    assert!(!c.decrypt(single(0, true)).await?.into_inner().stale);
    let before = s.get("/metrics").1;
    assert_eq!(
        sample(&before, "fieldkey_stale_reads_total{tenant=\"acme\"}"),
        None,
        "{before}"
    );
    KeysClient::new(ch.clone())
        .rotate_tenant_key(as_id(
            ids::OPS,
            pb::RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await?;
    // Two stale reads without repair, one with, and a column of three with repair.
    assert!(c.decrypt(single(0, false)).await?.into_inner().stale);
    assert!(c.decrypt(single(1, false)).await?.into_inner().stale);
    let fixed = c.decrypt(single(2, true)).await?.into_inner();
    assert!(!fixed.repaired_ciphertext.is_empty());
    let col = c
        .decrypt_column(DecryptColumnRequest {
            tenant_id: "acme".into(),
            field: "email".into(),
            contexts: (0..3).map(|i| Bytes::from(format!("row-{i}"))).collect(),
            ciphertexts: cts.clone(),
            repair: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(col.errors.is_empty(), "{:?}", col.errors);
    // A current value (the repaired one) counts nothing.
    let mut current = single(2, true);
    current.ciphertext = fixed.repaired_ciphertext;
    assert!(!c.decrypt(current).await?.into_inner().stale);

    let text = s.get("/metrics").1;
    assert_eq!(
        sample(&text, "fieldkey_stale_reads_total{tenant=\"acme\"}"),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "fieldkey_read_repairs_total{tenant=\"acme\",outcome=\"repaired\"}"
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "fieldkey_read_repairs_total{tenant=\"acme\",outcome=\"failed\"}"
        ),
        Some(0.0),
        "{text}"
    );
    s.stop();
    Ok(())
}
