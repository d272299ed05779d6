//! A `fieldkey serve` process at `RUST_LOG=trace` (every crate, every level) through
//! traffic (encrypt, decrypt, batches, blind index, pseudonyms), client errors
//! (tampered ciphertext, denied identities, unknown tenant, scope mismatch, a shredded
//! subject), a rotation, a key epoch roll and a subject erasure with its receipt. Then
//! every line it logged is scanned for what a log reader must never see
//! (`docs/THREAT_MODEL.md`, "log reader"): the plaintexts, the subject ids, the local
//! KMS passphrase, and every key the test can recover from the data directory the way
//! an owner of the passphrase could: the root key, the epoch keys, every tenant key
//! version, subject-wrapping key, subject key and signing-key seed, and the field keys
//! derived from them (`docs/FORMAT.md` §4), each in hex (both cases), base64 (standard
//! and URL-safe, padded or not), as a Rust byte-array `Debug`, and by prefix.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;
#[path = "logs_leak_nothing/recover.rs"]
mod recover;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use common::grpc::{as_id, create_tenant, ids, reason};
use common::sidecar::{Sidecar, TRUST_MESH};
use fieldkey::kms::aws::AwsKms;
use fieldkey::proto::pb::{
    self, crypto_client::CryptoClient, erasures_client::ErasuresClient, keys_client::KeysClient,
};
use recover::{Backend, Secret, recover_keys};
use tonic::Code;
use tonic::transport::Channel;

const PASSPHRASE: &str = "canary-passphrase-Qx7vR2mK9w";
const TENANT: &str = "acme";
/// Subject ids: shredded, kept, and one only pseudonymized.
const SUBJECTS: [&str; 3] = [
    "subj-canary-alpha-5521",
    "subj-canary-bravo-7734",
    "subj-canary-charlie-9045",
];
const PLAINTEXTS: [&str; 4] = [
    "pt-canary-email-8c41@example.org",
    "pt-canary-phone-+33612349876",
    "pt-canary-tenantwide-3f9e",
    "pt-canary-indexed-b7d2@example.org",
];

/// Every form of `b` that a log line might carry.
fn forms(b: &[u8]) -> Vec<String> {
    let mut out = vec![
        hex::encode(b),
        hex::encode_upper(b),
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
        format!("{b:?}").trim_end_matches(']').to_owned(),
    ];
    if b.len() >= 16 {
        let p = &b[..15];
        out.extend([
            hex::encode(&b[..12]),
            hex::encode_upper(&b[..12]),
            STANDARD.encode(p),
            URL_SAFE.encode(p),
            format!("{:?}", &b[..8]).trim_end_matches(']').to_owned(),
        ]);
    }
    out
}

fn enc(subject: &str, field: &str, context: &[u8], pt: &str) -> pb::EncryptRequest {
    pb::EncryptRequest {
        tenant_id: TENANT.into(),
        subject_id: subject.into(),
        field: field.into(),
        context: context.to_vec().into(),
        plaintext: pt.as_bytes().to_vec().into(),
        format: pb::CiphertextFormat::Text as i32,
    }
}

fn dec(subject: &str, field: &str, context: &[u8], ct: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        tenant_id: TENANT.into(),
        subject_id: subject.into(),
        field: field.into(),
        context: context.to_vec().into(),
        ciphertext: ct.to_vec().into(),
        repair: false,
    }
}

async fn refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    why: &str,
) {
    let s = r.unwrap_err();
    assert_eq!((s.code(), reason(&s).as_str()), (code, why), "{s:?}");
}

/// The traffic: data operations, errors, a rotation, a roll, a shred with its receipt.
/// The keys in the data directory are recovered into `secrets` at three points:
/// before the rotation, after the roll, after the shred.
async fn traffic(
    ch: &Channel,
    data: &Path,
    keys_dir: &Path,
    backend: &Backend,
    db_url: &str,
    secrets: &mut Vec<Secret>,
) {
    let mut c = CryptoClient::new(ch.clone());
    let mut keys = KeysClient::new(ch.clone());
    create_tenant(ch, TENANT).await.unwrap();
    let mut made = Vec::new();
    for (s, field, pt) in [
        (SUBJECTS[0], "email", PLAINTEXTS[0]),
        (SUBJECTS[1], "phone", PLAINTEXTS[1]),
        ("", "notes", PLAINTEXTS[2]),
    ] {
        let ct = c
            .encrypt(as_id(ids::APP, enc(s, field, b"row-1", pt)))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        let back = c
            .decrypt(as_id(ids::APP, dec(s, field, b"row-1", &ct)))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(back, pt.as_bytes());
        made.push((s, field, ct));
    }
    let batch = c
        .encrypt_batch(as_id(
            ids::APP,
            pb::EncryptBatchRequest {
                items: vec![
                    enc(SUBJECTS[1], "email", b"row-2", PLAINTEXTS[0]),
                    enc(SUBJECTS[1], "email", &[0xff; 2000], PLAINTEXTS[1]),
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(pb::encrypt_result::Result::Ok(ok)) = &batch[0].result else {
        panic!("{batch:?}")
    };
    let items = vec![
        dec(SUBJECTS[1], "email", b"row-2", &ok.ciphertext),
        dec(SUBJECTS[1], "email", b"row-3", &ok.ciphertext),
    ];
    c.decrypt_batch(as_id(ids::APP, pb::DecryptBatchRequest { items }))
        .await
        .unwrap();
    c.blind_index(as_id(
        ids::APP,
        pb::BlindIndexRequest {
            tenant_id: TENANT.into(),
            field: "email".into(),
            value: PLAINTEXTS[3].as_bytes().to_vec(),
            format: 0,
            lookup: true,
        },
    ))
    .await
    .unwrap();
    c.blind_index_batch(as_id(
        ids::ANALYTICS,
        pb::BlindIndexBatchRequest {
            items: vec![pb::BlindIndexRequest {
                tenant_id: TENANT.into(),
                field: "email".into(),
                value: PLAINTEXTS[0].as_bytes().to_vec(),
                format: 1,
                lookup: false,
            }],
        },
    ))
    .await
    .unwrap();
    for s in SUBJECTS {
        c.pseudonymize(as_id(
            ids::ANALYTICS,
            pb::PseudonymizeRequest {
                tenant_id: TENANT.into(),
                subject_id: s.into(),
                purpose: "analytics".into(),
            },
        ))
        .await
        .unwrap();
    }
    // Client errors.
    let (s0, f0, ct0) = &made[0];
    let mut bad = ct0.to_vec();
    let last = bad.len() - 2;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    refused(
        c.decrypt(as_id(ids::APP, dec(s0, f0, b"row-1", &bad)))
            .await,
        Code::DataLoss,
        "AUTHENTICATION_FAILED",
    )
    .await;
    refused(
        c.decrypt(as_id(ids::APP, dec(s0, f0, b"row-9", ct0))).await,
        Code::DataLoss,
        "AUTHENTICATION_FAILED",
    )
    .await;
    refused(
        c.decrypt(as_id(ids::APP, dec("", f0, b"row-1", ct0))).await,
        Code::InvalidArgument,
        "SCOPE_MISMATCH",
    )
    .await;
    refused(
        c.decrypt(as_id(ids::ANALYTICS, dec(s0, f0, b"row-1", ct0)))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    )
    .await;
    refused(
        c.encrypt(as_id(ids::STRANGER, enc(s0, f0, b"", PLAINTEXTS[0])))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    )
    .await;
    let mut other = enc(s0, f0, b"", PLAINTEXTS[0]);
    other.tenant_id = "no-such-tenant".into();
    refused(
        c.encrypt(as_id(ids::APP, other)).await,
        Code::NotFound,
        "TENANT_NOT_FOUND",
    )
    .await;
    refused(
        c.encrypt(as_id(
            ids::APP,
            enc(s0, "unindexed field", b"", PLAINTEXTS[0]),
        ))
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    )
    .await;
    recover_keys(data, keys_dir, backend, db_url, secrets).await;

    // A rotation and an epoch roll (everything rewrapped under a new epoch key).
    keys.rotate_tenant_key(as_id(
        ids::OPS,
        pb::RotateTenantKeyRequest {
            tenant_id: TENANT.into(),
        },
    ))
    .await
    .unwrap();
    c.encrypt(as_id(
        ids::APP,
        enc(SUBJECTS[1], "email", b"row-4", PLAINTEXTS[0]),
    ))
    .await
    .unwrap();
    keys.roll_epoch(as_id(ids::OPS, pb::RollEpochRequest { finish_only: false }))
        .await
        .unwrap();
    common::eventually("the epoch roll finishes", Duration::from_secs(60), || {
        let mut keys = keys.clone();
        async move {
            let st = keys
                .get_epoch_status(as_id(ids::OPS, pb::GetEpochStatusRequest {}))
                .await
                .unwrap()
                .into_inner();
            assert!(st.last_error.is_empty(), "{}", st.last_error);
            (!st.rolling && st.active_epoch >= 1).then_some(())
        }
    })
    .await;
    recover_keys(data, keys_dir, backend, db_url, secrets).await;

    // Erasure of the first subject, with its receipt.
    let mut er = ErasuresClient::new(ch.clone());
    let e = er
        .shred_subject(as_id(
            ids::ERASURE,
            pb::ShredSubjectRequest {
                tenant_id: TENANT.into(),
                subject_id: SUBJECTS[0].into(),
                grace_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let done = common::eventually("the erasure completes", Duration::from_secs(60), || {
        let mut er = er.clone();
        let id = e.erasure_id.clone();
        async move {
            let g = er
                .get_erasure(as_id(ids::ERASURE, pb::ErasureIdRequest { erasure_id: id }))
                .await
                .unwrap()
                .into_inner();
            (g.state == pb::ErasureState::Completed as i32).then_some(g)
        }
    })
    .await;
    assert!(!done.receipt.is_empty());
    refused(
        c.decrypt(as_id(ids::APP, dec(s0, f0, b"row-1", ct0))).await,
        Code::FailedPrecondition,
        "KEY_DESTROYED",
    )
    .await;
    refused(
        c.pseudonymize(as_id(
            ids::ANALYTICS,
            pb::PseudonymizeRequest {
                tenant_id: TENANT.into(),
                subject_id: SUBJECTS[0].into(),
                purpose: "analytics".into(),
            },
        ))
        .await,
        Code::FailedPrecondition,
        "KEY_DESTROYED",
    )
    .await;
    recover_keys(data, keys_dir, backend, db_url, secrets).await;
}

/// AWS credentials given to the sidecar (moto checks none): they must not be logged.
const AWS_ACCESS_KEY_ID: &str = "AKIACANARY7Q2W3E4R5T";
const AWS_SECRET_ACCESS_KEY: &str = "canary-aws-secret/Zk8Vb3Nq5Xw7Ty1Lp4Hr6Jd9";
const AWS_SESSION_TOKEN: &str = "canary-aws-session-token-Mf2Ka7Qs4Wc9";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_level_log_holds_no_plaintext_subject_id_passphrase_or_key() {
    scan("text", Backend::Local, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_level_json_log_holds_no_plaintext_subject_id_passphrase_or_key() {
    scan("json", Backend::Local, None).await;
}

/// With the key store on PostgreSQL: key changes are announced with NOTIFY, whose
/// payload names the subject, and the driver logs at trace level too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_level_log_with_postgresql_holds_no_subject_id_or_key() {
    let db = common::PgDb::create().await.unwrap();
    scan("text", Backend::Local, Some(&db.dsn)).await;
    db.drop_db().await.unwrap();
}

/// With AWS KMS (moto_server; run through scripts/test.sh): the SDK at trace level sees
/// every GenerateDataKey and Decrypt response, whose `Plaintext` is a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_level_log_with_aws_kms_holds_no_key_or_credential() {
    let url = common::moto_url();
    let admin = AwsKms::new(common::aws_config(&url, "unused"))
        .await
        .unwrap();
    let key = admin
        .client()
        .create_key()
        .description("fieldkey log scan")
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    scan("text", Backend::Aws { url, key }, None).await;
}

/// Serves at trace level with the log format `format`, the KMS `backend` and the key
/// store on PostgreSQL at `postgres` (else SQLite) through [`traffic`], then scans
/// every line.
async fn scan(format: &str, backend: Backend, postgres: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys_dir = dir.path().join("kms-keys");
    std::fs::create_dir_all(&data).unwrap();
    let config = format!(
        "{TRUST_MESH}\n[epochs]\nauto_roll = false\nlocal_keys_dir = \"{}\"\n\n[blind_index.fields.email]\nbits = 64\n",
        keys_dir.display()
    );
    let log = dir.path().join("sidecar.log");
    let mut b = Sidecar::builder()
        .any_port()
        .data_dir(&data)
        .config_text(dir.path(), &config)
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", PASSPHRASE)
        .log_level("trace")
        .arg("--log-format")
        .arg(format)
        .log_file(&log);
    let db_url = match postgres {
        Some(dsn) => {
            b = b.arg("--postgres-url").arg(dsn);
            dsn.to_owned()
        }
        None => format!("sqlite://{}?mode=ro", data.join("keys.db").display()),
    };
    if let Backend::Aws { url, key } = &backend {
        b = b
            .arg("--aws-kms-key-id")
            .arg(key)
            .arg("--aws-region")
            .arg("eu-west-1")
            .arg("--aws-kms-endpoint")
            .arg(url)
            .env("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
            .env("AWS_SESSION_TOKEN", AWS_SESSION_TOKEN);
    }
    let sc = b.start();
    let ch = sc.channel().await;
    let mut secrets: Vec<Secret> = Vec::new();
    traffic(&ch, &data, &keys_dir, &backend, &db_url, &mut secrets).await;
    drop(ch);
    let (status, text) = sc.terminate();
    assert!(status.success(), "exit {status:?}");
    secrets.sort();
    secrets.dedup();

    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > 1000 && lines.iter().any(|l| l.contains("TRACE")),
        "the log is at trace level: {} lines",
        lines.len()
    );
    let mut needles: Vec<(String, String)> = Vec::new();
    for pt in PLAINTEXTS {
        needles.push((format!("plaintext {pt}"), pt.to_owned()));
        for f in forms(pt.as_bytes()) {
            needles.push((format!("plaintext {pt} encoded"), f));
        }
    }
    for s in SUBJECTS {
        needles.push((format!("subject id {s}"), s.to_owned()));
        for f in forms(s.as_bytes()) {
            needles.push((format!("subject id {s} encoded"), f));
        }
    }
    needles.push(("the passphrase".into(), PASSPHRASE.into()));
    for (what, v) in [
        ("the AWS secret access key", AWS_SECRET_ACCESS_KEY),
        ("the AWS session token", AWS_SESSION_TOKEN),
    ] {
        needles.push((what.into(), v.into()));
    }
    let kinds: std::collections::BTreeSet<&str> = secrets
        .iter()
        .map(|(n, _)| n.split(' ').next().unwrap())
        .collect();
    for (name, bytes) in &secrets {
        for f in forms(bytes) {
            needles.push((name.clone(), f));
        }
    }
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        for (what, needle) in &needles {
            if line.contains(needle.as_str()) {
                found.push(format!("line {}: {what} ({needle}): {line}", i + 1));
            }
        }
    }
    eprintln!(
        "{} log lines ({} bytes) scanned for {} needles from {} keys ({kinds:?}), 4 plaintexts, 3 subject ids and the passphrase",
        lines.len(),
        text.len(),
        needles.len(),
        secrets.len()
    );
    assert!(
        secrets.len() >= 15,
        "keys recovered: {:?}",
        secrets.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    assert!(
        found.is_empty(),
        "{} leaks, first ones:\n{}",
        found.len(),
        found
            .iter()
            .take(20)
            .map(|f| f.chars().take(600).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
