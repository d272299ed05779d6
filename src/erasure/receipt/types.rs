//! The receipt file's shapes: [`Receipt`] (the signed content), [`SignedReceipt`] (the
//! file), the destroyed-key and KMS-deletion entries, and [`ReceiptError`].
//!
//! Only data and its serde form live here; building and signing a receipt is in
//! `sign.rs`, checking one in `verify.rs`.

use serde::{Deserialize, Serialize};

use super::{ALGORITHM, FORMAT};

/// One key destroyed by an erasure, named by its fingerprint (never its bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyedKey {
    /// `"tenant-key"` or `"subject-key"`.
    pub kind: String,
    /// Tenant key version (for a `"tenant-key"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Subject the key belonged to (for a `"subject-key"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_id: Option<String>,
    /// Lowercase hex SHA-256 of the wrapped (KMS-encrypted) key material.
    pub fingerprint: String,
}

/// What happened to the tenant's KMS key during a tenant erasure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsKeyDeletion {
    /// KMS key identifier (ARN or key id).
    pub kms_key_id: String,
    /// `"scheduled"`, `"already-scheduled"` or `"kept-shared"` (still used by another
    /// tenant, so not deleted).
    pub status: String,
    /// Waiting period the KMS applies before deleting the key, in days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_window_days: Option<u32>,
    /// When the KMS will delete the key, in Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_date_unix_ms: Option<i64>,
}

/// Which KMS key guards the copies of the destroyed keys that key-store backups hold
/// (`docs/ERASURE.md` §6): those copies open only through it (or an older epoch's key)
/// until its deletion. A signed "backups sealed" statement of that epoch
/// (`fieldkey epoch verify-seal`) says when the roll after it scheduled the deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupGuard {
    /// The key epoch active when the live keys were destroyed (0: before epochs: the
    /// legacy default key).
    pub epoch: u64,
    /// Its KMS key.
    pub kms_key_id: String,
}

/// The signed content of an erasure receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Always [`FORMAT`].
    pub format: String,
    /// Identifier of the erasure request.
    pub erasure_id: String,
    /// `"subject"` or `"tenant"`.
    pub scope: String,
    /// Tenant the erasure applies to.
    pub tenant_id: String,
    /// Erased subject; present exactly when `scope` is `"subject"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_id: Option<String>,
    /// Actor who asked for the erasure.
    pub requested_by: String,
    /// Actor or process that executed it.
    pub executed_by: String,
    /// When the erasure was requested, Unix milliseconds.
    pub requested_at_unix_ms: i64,
    /// When the erasure was scheduled to run, Unix milliseconds.
    pub scheduled_for_unix_ms: i64,
    /// When the keys were destroyed, Unix milliseconds.
    pub executed_at_unix_ms: i64,
    /// `requested_at_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`](super::rfc3339_ms)).
    pub requested_at: String,
    /// `scheduled_for_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`](super::rfc3339_ms)).
    pub scheduled_for: String,
    /// `executed_at_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`](super::rfc3339_ms)).
    pub executed_at: String,
    /// Tenant scope: every tenant key version. Subject scope: the subject key, or empty
    /// if the subject never had a key.
    pub destroyed: Vec<DestroyedKey>,
    /// Tenant scope: number of subject keys the tenant had (that ever held material),
    /// every one destroyed now, including any erased earlier on its own. Subject
    /// scope: 0 or 1.
    pub subject_keys_destroyed: u64,
    /// Tenant scope: [`subjects_digest`](super::subjects_digest) over the destroyed subject keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_keys_digest: Option<String>,
    /// Tenant scope: what happened to the tenant's KMS key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_deletion: Option<KmsKeyDeletion>,
    /// The KMS key that guards the backup copies of what was destroyed (absent in
    /// receipts from before key epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupGuard>,
    /// Position of this erasure's record in the audit chain.
    pub audit_seq: u64,
    /// Hex hash of the audit record before it.
    pub audit_prev_hash: String,
    /// [`key_id`](super::key_id) of the public key that verifies this receipt.
    pub signing_key_id: String,
}

/// A [`Receipt`] with its Ed25519 signature: the content of a receipt file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    /// The signed content.
    pub receipt: Receipt,
    /// Always [`ALGORITHM`] (`"Ed25519"`).
    pub algorithm: String,
    /// Standard base64 (with padding) of the 64-byte Ed25519 signature over
    /// [`signing_input`](super::signing_input) of `receipt`.
    pub signature: String,
}

/// Why a receipt could not be produced or verified.
///
/// The messages are written for a privacy officer reading command-line output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The file is not JSON, or not shaped like a signed erasure receipt (missing or
    /// unknown fields, wrong types, bad signature encoding).
    #[error("the file is not a well-formed signed erasure receipt: {0}")]
    Malformed(String),
    /// The receipt declares a format version this code does not understand.
    #[error(
        "unsupported receipt format {0:?}: this version of fieldkey only understands \"{FORMAT}\""
    )]
    UnsupportedFormat(String),
    /// The signature algorithm is not Ed25519.
    #[error("unsupported signature algorithm {0:?}: only \"{ALGORITHM}\" receipts are supported")]
    UnsupportedAlgorithm(String),
    /// The receipt names a signing key other than the public key supplied.
    #[error(
        "wrong public key: the receipt says it was signed by key {found}, but the public key \
         supplied is {expected}; it was signed by another key (or its signing_key_id was altered)"
    )]
    WrongKey {
        /// [`key_id`](super::key_id) of the public key supplied to [`verify`](super::verify).
        expected: String,
        /// `signing_key_id` written in the receipt.
        found: String,
    },
    /// The Ed25519 signature does not verify.
    #[error("signature does not match: the receipt was altered or signed by another key")]
    BadSignature,
    /// The signature is valid but the receipt contradicts itself (an issuer bug).
    #[error("the signature is valid but the receipt contradicts itself: {0}")]
    Inconsistent(String),
    /// The public key could not be read.
    #[error("cannot read the public key: {0}")]
    PublicKey(String),
    /// The receipt or key could not be encoded.
    #[error("cannot encode the receipt: {0}")]
    Encode(String),
}
