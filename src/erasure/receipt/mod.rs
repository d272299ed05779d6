//! Signed erasure receipts: offline-verifiable proof of crypto-shredding (GDPR Art. 17).
//!
//! When fieldkey crypto-shreds a data subject (scope `"subject"`) or a whole tenant
//! (scope `"tenant"`), it issues a [`SignedReceipt`]: a [`Receipt`] describing what was
//! destroyed, when, on whose request and by whom, plus an Ed25519 signature over it. A
//! privacy officer can check the receipt offline with nothing but the service's public
//! key (see [`verify`], [`parse_public_key`] and [`public_key_pem`]).
//!
//! # File format
//!
//! A receipt file is a JSON object with exactly three members:
//!
//! ```json
//! {
//!   "receipt":   { "format": "fieldkey-erasure-receipt/1", "erasure_id": "...", ... },
//!   "algorithm": "Ed25519",
//!   "signature": "<standard base64, with padding, of the 64-byte signature>"
//! }
//! ```
//!
//! Unknown members are rejected at every level, so nothing can be smuggled into a file
//! next to the signed content. The receipt never contains key material: destroyed keys
//! are named by a fingerprint (SHA-256 of the *wrapped*, i.e. KMS-encrypted, key blob).
//! Every instant is recorded twice, as Unix milliseconds (`*_unix_ms`) and as an
//! RFC 3339 UTC string with milliseconds (see [`rfc3339_ms`]); [`verify`] checks the two
//! agree.
//!
//! # What is signed
//!
//! The signature covers the bytes returned by [`signing_input`]:
//!
//! ```text
//! "fieldkey-erasure-receipt/1" || "\n" || canonical_json(receipt)
//! ```
//!
//! where `canonical_json` ([`canonical_json`]) writes the `receipt` object with its
//! members sorted by key at every level and no whitespace (RFC 8785 / JCS for the values
//! a receipt contains). Absent optional fields are omitted rather than written as
//! `null`. Because the signature is over this canonical form and not over the file's
//! bytes, a receipt still verifies after it has been re-indented or its keys reordered,
//! while any change to a value breaks it. The `algorithm` and `signature` members are
//! not themselves signed; `algorithm` must be `"Ed25519"`.
//!
//! The SHA-256 of the signing input ([`digest`]) is what the audit chain records for an
//! erasure, so the receipt and the audit log can be cross-checked.

mod sign;
mod types;
mod verify;

pub use crate::model::{MAX_UNIX_MS, MIN_UNIX_MS, canonical_json, rfc3339_ms};
pub use sign::{digest, key_id, public_key_pem, sign, signing_input, subjects_digest};
pub use types::{BackupGuard, DestroyedKey, KmsKeyDeletion, Receipt, ReceiptError, SignedReceipt};
pub use verify::{parse_public_key, parse_public_keys, verify};

/// Value of [`Receipt::format`] for this version of the receipt format; also the first
/// line of the signing input (domain separation).
pub const FORMAT: &str = "fieldkey-erasure-receipt/1";

/// Value of [`SignedReceipt::algorithm`].
pub const ALGORITHM: &str = "Ed25519";

/// [`Receipt::scope`] of a subject erasure.
pub const SCOPE_SUBJECT: &str = "subject";
/// [`Receipt::scope`] of a tenant erasure.
pub const SCOPE_TENANT: &str = "tenant";

/// [`DestroyedKey::kind`] of a tenant key version.
pub const KIND_TENANT_KEY: &str = "tenant-key";
/// [`DestroyedKey::kind`] of a subject key.
pub const KIND_SUBJECT_KEY: &str = "subject-key";

/// [`KmsKeyDeletion::status`]: deletion of the KMS key was scheduled by this erasure.
pub const KMS_SCHEDULED: &str = "scheduled";
/// [`KmsKeyDeletion::status`]: deletion of the KMS key had already been scheduled.
pub const KMS_ALREADY_SCHEDULED: &str = "already-scheduled";
/// [`KmsKeyDeletion::status`]: the KMS key was kept because another tenant still uses it.
pub const KMS_KEPT_SHARED: &str = "kept-shared";
/// [`KmsKeyDeletion::status`]: the KMS no longer has the key (deleted after an earlier
/// erasure's waiting period, or by an operator).
pub const KMS_ALREADY_DELETED: &str = "already-deleted";

#[cfg(test)]
mod tests;
