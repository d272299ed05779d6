//! Genuine erasure receipts and backup-seal statements, signed by the real code with a
//! fixed fuzzing key, and the seeds of the receipt target.

use ed25519_dalek::SigningKey;
use fieldkey::epochs::seal::{self, BackupSeal, SEAL_FORMAT};
use fieldkey::erasure::receipt::{
    self, DestroyedKey, FORMAT, KIND_SUBJECT_KEY, KIND_TENANT_KEY, KMS_SCHEDULED, KmsKeyDeletion,
    Receipt, SCOPE_SUBJECT, SCOPE_TENANT, rfc3339_ms, subjects_digest,
};

/// The fuzzing key (its seed is public: nothing it signs means anything outside).
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const FP_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn subject_receipt() -> Receipt {
    Receipt {
        format: FORMAT.to_owned(),
        erasure_id: "er-0001".into(),
        scope: SCOPE_SUBJECT.into(),
        tenant_id: "acme".into(),
        subject_id: Some("user-42".into()),
        requested_by: "dpo@acme.example".into(),
        executed_by: "fieldkey-erasure-worker".into(),
        requested_at_unix_ms: 1_764_000_000_000,
        scheduled_for_unix_ms: 1_764_600_000_000,
        executed_at_unix_ms: 1_764_639_635_123,
        requested_at: rfc3339_ms(1_764_000_000_000),
        scheduled_for: rfc3339_ms(1_764_600_000_000),
        executed_at: rfc3339_ms(1_764_639_635_123),
        destroyed: vec![DestroyedKey {
            kind: KIND_SUBJECT_KEY.into(),
            version: None,
            subject_id: Some("user-42".into()),
            fingerprint: FP_A.into(),
        }],
        subject_keys_destroyed: 1,
        subject_keys_digest: None,
        kms_key_deletion: None,
        backups: Some(receipt::BackupGuard {
            epoch: 3,
            kms_key_id: "arn:aws:kms:eu-west-1:111122223333:key/epoch-3".into(),
        }),
        audit_seq: 17,
        audit_prev_hash: FP_B.into(),
        signing_key_id: String::new(),
    }
}

fn tenant_receipt() -> Receipt {
    let subjects = vec![("user-1".to_owned(), FP_A.to_owned())];
    Receipt {
        erasure_id: "er-0002 \u{e9}\u{1F600}\n\"quoted\"\u{1}".into(),
        scope: SCOPE_TENANT.into(),
        subject_id: None,
        destroyed: vec![
            DestroyedKey {
                kind: KIND_TENANT_KEY.into(),
                version: Some(1),
                subject_id: None,
                fingerprint: FP_A.into(),
            },
            DestroyedKey {
                kind: KIND_TENANT_KEY.into(),
                version: Some(2),
                subject_id: None,
                fingerprint: FP_B.into(),
            },
        ],
        subject_keys_destroyed: 1,
        subject_keys_digest: Some(subjects_digest(&subjects)),
        kms_key_deletion: Some(KmsKeyDeletion {
            kms_key_id: "arn:aws:kms:eu-west-1:111122223333:key/abcd".into(),
            status: KMS_SCHEDULED.into(),
            pending_window_days: Some(7),
            deletion_date_unix_ms: Some(1_765_244_435_123),
        }),
        backups: None,
        ..subject_receipt()
    }
}

fn backup_seal() -> BackupSeal {
    BackupSeal {
        format: SEAL_FORMAT.into(),
        epoch: 3,
        kms_key_id: "arn:aws:kms:eu-west-1:111122223333:key/epoch-3".into(),
        kms_status: "scheduled".into(),
        epoch_started_unix_ms: 1_764_000_000_000,
        epoch_ended_unix_ms: Some(1_764_600_000_000),
        scheduled_at_unix_ms: 1_764_600_000_100,
        deletion_date_unix_ms: Some(1_765_204_800_100),
        erasures: vec!["er-0001".into(), "er-0002".into()],
        audit_seq: 40,
        audit_prev_hash: FP_B.into(),
        signing_key_id: String::new(),
    }
}

/// The receipts the fuzzing key signed, as signed.
pub fn receipts() -> Vec<receipt::SignedReceipt> {
    [subject_receipt(), tenant_receipt()]
        .into_iter()
        .map(|r| receipt::sign(r, &key()).expect("sign"))
        .collect()
}

/// The backup-seal statements the fuzzing key signed.
pub fn seals() -> Vec<seal::SignedSeal> {
    vec![seal::sign(backup_seal(), &key()).expect("sign seal")]
}

/// Seeds: the signed receipts (compact and pretty, with a byte order mark), a receipt
/// signed by another key, the seal, the public key in each accepted form, and edge cases.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, s) in receipts().iter().enumerate() {
        out.push((
            format!("receipt-{i}.json"),
            serde_json::to_vec(s).expect("json"),
        ));
        out.push((
            format!("receipt-{i}-pretty.json"),
            serde_json::to_vec_pretty(s).expect("json"),
        ));
        out.push((
            format!("receipt-{i}-unsigned.json"),
            serde_json::to_vec(&s.receipt).expect("json"),
        ));
    }
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(serde_json::to_vec(&receipts()[0]).expect("json"));
    out.push(("receipt-bom.json".into(), bom));
    let other =
        receipt::sign(subject_receipt(), &SigningKey::from_bytes(&[9u8; 32])).expect("sign");
    out.push((
        "receipt-other-key.json".into(),
        serde_json::to_vec(&other).expect("json"),
    ));
    for (i, s) in seals().iter().enumerate() {
        out.push((
            format!("seal-{i}.json"),
            serde_json::to_vec_pretty(s).expect("json"),
        ));
    }
    let vk = key().verifying_key();
    out.push((
        "public-key.pem".into(),
        receipt::public_key_pem(&vk).expect("pem").into_bytes(),
    ));
    out.push((
        "public-key.hex".into(),
        hex::encode(vk.as_bytes()).into_bytes(),
    ));
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(vk.as_bytes());
        out.push(("public-key.b64".into(), b64.into_bytes()));
    }
    out.push(("weak-key.hex".into(), hex::encode([0u8; 32]).into_bytes()));
    out.push((
        "private-key.pem".into(),
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH\n-----END PRIVATE KEY-----\n".to_vec(),
    ));
    out.push(("empty".into(), Vec::new()));
    out.push(("deep.json".into(), "[".repeat(200).into_bytes()));
    out
}
