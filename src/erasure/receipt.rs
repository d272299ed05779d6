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

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

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

/// Earliest instant RFC 3339 can express: `0000-01-01T00:00:00.000Z`, in Unix ms.
pub const MIN_UNIX_MS: i64 = -62_167_219_200_000;
/// Latest instant RFC 3339 can express: `9999-12-31T23:59:59.999Z`, in Unix ms.
pub const MAX_UNIX_MS: i64 = 253_402_300_799_999;

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
    /// `requested_at_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`]).
    pub requested_at: String,
    /// `scheduled_for_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`]).
    pub scheduled_for: String,
    /// `executed_at_unix_ms` as RFC 3339 UTC with milliseconds ([`rfc3339_ms`]).
    pub executed_at: String,
    /// Tenant scope: every tenant key version. Subject scope: the subject key, or empty
    /// if the subject never had a key.
    pub destroyed: Vec<DestroyedKey>,
    /// Tenant scope: number of subject keys the tenant had (that ever held material),
    /// every one destroyed now, including any erased earlier on its own. Subject
    /// scope: 0 or 1.
    pub subject_keys_destroyed: u64,
    /// Tenant scope: [`subjects_digest`] over the destroyed subject keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_keys_digest: Option<String>,
    /// Tenant scope: what happened to the tenant's KMS key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_deletion: Option<KmsKeyDeletion>,
    /// Position of this erasure's record in the audit chain.
    pub audit_seq: u64,
    /// Hex hash of the audit record before it.
    pub audit_prev_hash: String,
    /// [`key_id`] of the public key that verifies this receipt.
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
    /// [`signing_input`] of `receipt`.
    pub signature: String,
}

/// Why a receipt could not be produced or verified.
///
/// The messages are written for a privacy officer reading command-line output.
#[derive(Debug, thiserror::Error)]
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
        /// [`key_id`] of the public key supplied to [`verify`].
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

/// Formats Unix milliseconds as RFC 3339 UTC with exactly three fractional digits,
/// e.g. `1764639635123` → `"2025-12-02T01:40:35.123Z"`.
///
/// Never panics: inputs outside the range RFC 3339 can express (years 0000 to 9999,
/// i.e. [`MIN_UNIX_MS`]..=[`MAX_UNIX_MS`]) are clamped to the nearest end of that range.
/// [`verify`] rejects receipts whose timestamps lie outside it.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let ms = unix_ms.clamp(MIN_UNIX_MS, MAX_UNIX_MS);
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        // Unreachable: the clamped range lies inside `time`'s supported range.
        Err(_) => String::from("1970-01-01T00:00:00.000Z"),
    }
}

/// Deterministic JSON encoding used for signing.
///
/// Object members are sorted by the UTF-8 bytes of their keys at every level (done
/// here explicitly, so the result does not depend on whether serde_json's
/// `preserve_order` feature is enabled anywhere in the build); there is no whitespace;
/// strings are escaped exactly as serde_json writes them (`\"`, `\\`, `\b`, `\f`, `\n`,
/// `\r`, `\t`, other control characters as lowercase `\u00xx`, everything else
/// including non-ASCII written as-is); numbers are written as serde_json writes them.
///
/// For the values a receipt contains (strings, integers of magnitude at most 2^53,
/// booleans, null, arrays and objects whose keys are ASCII) this is exactly the
/// RFC 8785 JSON Canonicalization Scheme (JCS). Outside that domain it stays
/// deterministic but may differ from JCS: JCS sorts keys by UTF-16 code units (differs
/// from UTF-8 order only for keys mixing characters U+E000..U+FFFF with characters above
/// U+FFFF), writes integers beyond 2^53 and floats in ECMAScript number form. Receipts
/// contain no floats.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(key, out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c);
                out.extend_from_slice(b"\\u00");
                for nibble in [b >> 4, b & 0xf] {
                    let digit = HEX.get(nibble as usize).copied().unwrap_or(b'0');
                    out.push(digit);
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// The exact bytes the signature covers: [`FORMAT`], a newline, then
/// [`canonical_json`] of the receipt (absent optional fields omitted).
pub fn signing_input(r: &Receipt) -> Result<Vec<u8>, ReceiptError> {
    let value = serde_json::to_value(r).map_err(|e| ReceiptError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(FORMAT.len() + 1 + 1024);
    out.extend_from_slice(FORMAT.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&canonical_json(&value));
    Ok(out)
}

/// Signs a receipt with Ed25519.
///
/// `signing_key_id` is always set to [`key_id`] of `key`'s public key (whatever the
/// caller put there), so the returned [`SignedReceipt::receipt`] may differ from the
/// input in that field. The receipt's other contents are signed as given; in particular
/// it is not checked for internal consistency (that is [`verify`]'s job), but `format`
/// must be [`FORMAT`].
pub fn sign(mut r: Receipt, key: &SigningKey) -> Result<SignedReceipt, ReceiptError> {
    if r.format != FORMAT {
        return Err(ReceiptError::UnsupportedFormat(r.format));
    }
    r.signing_key_id = key_id(&key.verifying_key());
    let message = signing_input(&r)?;
    let signature = key.sign(&message);
    Ok(SignedReceipt {
        receipt: r,
        algorithm: ALGORITHM.to_owned(),
        signature: STANDARD.encode(signature.to_bytes()),
    })
}

/// SHA-256 of [`signing_input`]: the value the audit chain records for an erasure.
///
/// Compute it on the receipt as signed ([`SignedReceipt::receipt`], after [`sign`]
/// filled in `signing_key_id`), otherwise it will not match.
pub fn digest(r: &Receipt) -> Result<[u8; 32], ReceiptError> {
    let input = signing_input(r)?;
    Ok(Sha256::digest(&input).into())
}

/// Lowercase hex SHA-256 over the (subject_id, fingerprint) pairs of the subject keys
/// destroyed with a tenant.
///
/// The pairs are sorted by subject id (bytewise; ties by fingerprint), so the result
/// does not depend on input order. Each pair is encoded as
/// `len(id) || id || len(fingerprint) || fingerprint`, lengths as u32 big-endian byte
/// counts; the encodings are concatenated with nothing before, between or after. An
/// empty list gives the SHA-256 of the empty string. (Strings longer than 4 GiB, which
/// never occur, would have their length saturated at `u32::MAX`.)
pub fn subjects_digest(items: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = items.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for (id, fingerprint) in sorted {
        for part in [id, fingerprint] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            hasher.update(len.to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// Short identifier of a public key: `"ed25519:"` followed by the first 16 lowercase hex
/// characters (8 bytes) of the SHA-256 of the 32 raw public key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let prefix = hash.first_chunk::<8>().copied().unwrap_or_default();
    format!("ed25519:{}", hex::encode(prefix))
}

/// The public key as a PEM-encoded SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`),
/// LF line endings: the form to hand to a privacy officer.
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, ReceiptError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| ReceiptError::Encode(format!("public key as PEM: {e}")))
}

/// Reads an Ed25519 public key given as an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as
/// the 32 raw bytes in 64 hex characters, or as the 32 raw bytes in base64 (standard or
/// URL-safe alphabet, padded or not). Surrounding whitespace is ignored.
///
/// Rejects anything else, points not on the curve and weak (small-order) keys. Error
/// messages never echo the input, in case a private key was pasted by mistake.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ReceiptError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ReceiptError::PublicKey("the key is empty".into()));
    }
    let key = if text.starts_with("-----BEGIN") {
        if text.contains("PRIVATE KEY") {
            return Err(ReceiptError::PublicKey(
                "this is a private key; supply the public key (-----BEGIN PUBLIC KEY-----)".into(),
            ));
        }
        VerifyingKey::from_public_key_pem(text).map_err(|e| {
            ReceiptError::PublicKey(format!("not an Ed25519 public key in PEM form: {e}"))
        })?
    } else {
        let raw = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|e| ReceiptError::PublicKey(format!("bad hex: {e}")))?
        } else {
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .ok_or_else(|| {
                    ReceiptError::PublicKey(
                        "expected a PEM public key (-----BEGIN PUBLIC KEY-----), 64 hex \
                         characters, or base64 of the 32 key bytes"
                            .into(),
                    )
                })?
        };
        let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
            ReceiptError::PublicKey(format!(
                "an Ed25519 public key is 32 bytes, this one decodes to {} bytes",
                raw.len()
            ))
        })?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| {
            ReceiptError::PublicKey("the 32 bytes are not a valid Ed25519 public key".into())
        })?
    };
    if key.is_weak() {
        return Err(ReceiptError::PublicKey(
            "weak (small-order) Ed25519 public key; it cannot vouch for anything".into(),
        ));
    }
    Ok(key)
}

/// Verifies a receipt file and returns the receipt it vouches for.
///
/// Accepts any whitespace and member order (and a leading UTF-8 byte order mark);
/// rejects unknown members. Checks, in this order, each failure with its own variant:
///
/// 1. the file parses as a [`SignedReceipt`] ([`ReceiptError::Malformed`]);
/// 2. `algorithm` is `"Ed25519"` ([`ReceiptError::UnsupportedAlgorithm`]) and `format`
///    is [`FORMAT`] ([`ReceiptError::UnsupportedFormat`]);
/// 3. `signing_key_id` is [`key_id`] of `key` ([`ReceiptError::WrongKey`]). A receipt
///    whose `signing_key_id` alone was edited therefore fails here, with `WrongKey`,
///    before the signature is looked at;
/// 4. `signature` is base64 of exactly 64 bytes ([`ReceiptError::Malformed`]);
/// 5. the signature verifies under `key` with `verify_strict` over [`signing_input`]
///    ([`ReceiptError::BadSignature`]);
/// 6. the receipt is internally consistent ([`ReceiptError::Inconsistent`]): scope is
///    `"subject"` or `"tenant"`; `subject_id` is present exactly for subject scope;
///    timestamps are within RFC 3339's range and each RFC 3339 string equals
///    [`rfc3339_ms`] of its `_unix_ms` field; fingerprints (and `subject_keys_digest`)
///    are 64 lowercase hex characters; destroyed keys have a known `kind` with the
///    matching `version`/`subject_id` field (tenant keys in tenant scope; at most one
///    key, of the erased subject, in subject scope, with `subject_keys_destroyed` equal
///    to the number listed); the KMS status is a known value.
///
/// Tampering with any signed value is reported as `BadSignature`, since step 5 runs
/// before the consistency checks.
pub fn verify(json: &[u8], key: &VerifyingKey) -> Result<Receipt, ReceiptError> {
    let json = json.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(json);
    let signed: SignedReceipt =
        serde_json::from_slice(json).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    if signed.algorithm != ALGORITHM {
        return Err(ReceiptError::UnsupportedAlgorithm(signed.algorithm));
    }
    let receipt = signed.receipt;
    if receipt.format != FORMAT {
        return Err(ReceiptError::UnsupportedFormat(receipt.format));
    }
    let expected = key_id(key);
    if receipt.signing_key_id != expected {
        return Err(ReceiptError::WrongKey {
            expected,
            found: receipt.signing_key_id,
        });
    }
    let sig_bytes = STANDARD.decode(signed.signature.trim()).map_err(|_| {
        ReceiptError::Malformed("the signature is not valid standard base64".into())
    })?;
    let sig_bytes: [u8; 64] = sig_bytes.as_slice().try_into().map_err(|_| {
        ReceiptError::Malformed(format!(
            "the signature is {} bytes long, an Ed25519 signature is 64 bytes",
            sig_bytes.len()
        ))
    })?;
    let signature = Signature::from_bytes(&sig_bytes);
    let message = signing_input(&receipt)?;
    key.verify_strict(&message, &signature)
        .map_err(|_| ReceiptError::BadSignature)?;
    check_consistency(&receipt)?;
    Ok(receipt)
}

fn inconsistent(msg: impl Into<String>) -> ReceiptError {
    ReceiptError::Inconsistent(msg.into())
}

fn is_lower_hex_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_consistency(r: &Receipt) -> Result<(), ReceiptError> {
    let subject_scope = match r.scope.as_str() {
        SCOPE_SUBJECT => true,
        SCOPE_TENANT => false,
        other => {
            return Err(inconsistent(format!(
                "scope is {other:?}, expected \"subject\" or \"tenant\""
            )));
        }
    };
    match (subject_scope, &r.subject_id) {
        (true, None) => return Err(inconsistent("a subject erasure must name its subject_id")),
        (false, Some(_)) => {
            return Err(inconsistent("a tenant erasure must not have a subject_id"));
        }
        _ => {}
    }

    for (name, unix_ms, text) in [
        ("requested_at", r.requested_at_unix_ms, &r.requested_at),
        ("scheduled_for", r.scheduled_for_unix_ms, &r.scheduled_for),
        ("executed_at", r.executed_at_unix_ms, &r.executed_at),
    ] {
        if !(MIN_UNIX_MS..=MAX_UNIX_MS).contains(&unix_ms) {
            return Err(inconsistent(format!(
                "{name}_unix_ms ({unix_ms}) is outside the years 0000 to 9999"
            )));
        }
        let expected = rfc3339_ms(unix_ms);
        if *text != expected {
            return Err(inconsistent(format!(
                "{name} is {text:?} but {name}_unix_ms ({unix_ms}) is {expected}"
            )));
        }
    }

    for (i, k) in r.destroyed.iter().enumerate() {
        if !is_lower_hex_sha256(&k.fingerprint) {
            return Err(inconsistent(format!(
                "destroyed[{i}].fingerprint is not 64 lowercase hex characters"
            )));
        }
        match k.kind.as_str() {
            KIND_TENANT_KEY => {
                if k.version.is_none() || k.subject_id.is_some() {
                    return Err(inconsistent(format!(
                        "destroyed[{i}] is a tenant key: it must have a version and no subject_id"
                    )));
                }
                if subject_scope {
                    return Err(inconsistent(format!(
                        "destroyed[{i}] is a tenant key, but this is a subject erasure"
                    )));
                }
            }
            KIND_SUBJECT_KEY => {
                if k.subject_id.is_none() || k.version.is_some() {
                    return Err(inconsistent(format!(
                        "destroyed[{i}] is a subject key: it must have a subject_id and no version"
                    )));
                }
                if !subject_scope {
                    return Err(inconsistent(format!(
                        "destroyed[{i}] is a subject key, but this is a tenant erasure \
                         (subject keys are counted in subject_keys_destroyed)"
                    )));
                }
                if k.subject_id != r.subject_id {
                    return Err(inconsistent(format!(
                        "destroyed[{i}] belongs to another subject than the one erased"
                    )));
                }
            }
            other => {
                return Err(inconsistent(format!(
                    "destroyed[{i}].kind is {other:?}, expected \"tenant-key\" or \"subject-key\""
                )));
            }
        }
    }

    if let Some(d) = &r.subject_keys_digest {
        if subject_scope {
            return Err(inconsistent(
                "a subject erasure must not have a subject_keys_digest",
            ));
        }
        if !is_lower_hex_sha256(d) {
            return Err(inconsistent(
                "subject_keys_digest is not 64 lowercase hex characters",
            ));
        }
    }
    if subject_scope {
        let listed = u64::try_from(r.destroyed.len()).unwrap_or(u64::MAX);
        if listed > 1 || r.subject_keys_destroyed != listed {
            return Err(inconsistent(format!(
                "a subject erasure destroys 0 or 1 subject key; it lists {listed} and counts {}",
                r.subject_keys_destroyed
            )));
        }
    }

    if let Some(kms) = &r.kms_key_deletion {
        match kms.status.as_str() {
            KMS_SCHEDULED | KMS_ALREADY_SCHEDULED | KMS_KEPT_SHARED | KMS_ALREADY_DELETED => {}
            other => {
                return Err(inconsistent(format!(
                    "kms_key_deletion.status is {other:?}, expected \"scheduled\", \
                     \"already-scheduled\" or \"kept-shared\""
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail loudly on unexpected values"
)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7u8; 32];
    const OTHER_SEED: [u8; 32] = [9u8; 32];
    const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const FP_B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn key() -> SigningKey {
        SigningKey::from_bytes(&SEED)
    }

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
            audit_seq: 17,
            audit_prev_hash: FP_B.into(),
            signing_key_id: String::new(),
        }
    }

    fn tenant_receipt() -> Receipt {
        let subjects = vec![("user-1".to_owned(), FP_A.to_owned())];
        Receipt {
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
            ..subject_receipt()
        }
    }

    fn signed_file(r: Receipt) -> Vec<u8> {
        serde_json::to_vec_pretty(&sign(r, &key()).unwrap()).unwrap()
    }

    /// Parses `file`, applies `edit` to the JSON value, and serialises it back.
    fn edited(file: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(file).unwrap();
        edit(&mut v);
        serde_json::to_vec_pretty(&v).unwrap()
    }

    /// Writes `v` with object members in reverse-sorted order, tab indentation and
    /// CRLF line ends: a differently formatted rendition of the same JSON.
    fn write_reordered(v: &Value, depth: usize, out: &mut String) {
        let indent = |d: usize| "\t".repeat(d);
        match v {
            Value::Object(m) => {
                let mut members: Vec<_> = m.iter().collect();
                members.sort_by(|a, b| b.0.cmp(a.0));
                out.push_str("{\r\n");
                for (i, (k, val)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" ,\r\n");
                    }
                    out.push_str(&indent(depth + 1));
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(" :  ");
                    write_reordered(val, depth + 1, out);
                }
                out.push_str("\r\n");
                out.push_str(&indent(depth));
                out.push('}');
            }
            Value::Array(items) => {
                out.push_str("[ ");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_reordered(item, depth + 1, out);
                }
                out.push_str(" ]");
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    #[test]
    fn round_trip_subject_and_tenant() {
        for r in [subject_receipt(), tenant_receipt()] {
            let signed = sign(r.clone(), &key()).unwrap();
            assert_eq!(signed.algorithm, "Ed25519");
            assert_eq!(STANDARD.decode(&signed.signature).unwrap().len(), 64);
            assert_eq!(
                signed.receipt.signing_key_id,
                key_id(&key().verifying_key())
            );
            let file = serde_json::to_vec_pretty(&signed).unwrap();
            let back = verify(&file, &key().verifying_key()).unwrap();
            assert_eq!(back, signed.receipt);
            assert_eq!(
                Receipt {
                    signing_key_id: String::new(),
                    ..back
                },
                r
            );
        }
    }

    #[test]
    fn absent_options_are_omitted_from_file() {
        let file = String::from_utf8(signed_file(subject_receipt())).unwrap();
        assert!(!file.contains("null"), "{file}");
        assert!(!file.contains("kms_key_deletion"));
        assert!(!file.contains("subject_keys_digest"));
        assert!(!file.contains("\"version\""));
    }

    #[test]
    fn verifies_after_reindent_and_key_reorder() {
        let file = signed_file(tenant_receipt());
        let v: Value = serde_json::from_slice(&file).unwrap();
        let mut text = String::new();
        write_reordered(&v, 0, &mut text);
        assert_ne!(text.as_bytes(), &file[..]);
        // The reordered rendition really has a different member order.
        assert!(text.find("\"signing_key_id\"").unwrap() < text.find("\"audit_seq\"").unwrap());
        assert!(verify(text.as_bytes(), &key().verifying_key()).is_ok());

        let compact = serde_json::to_vec(&v).unwrap();
        assert!(verify(&compact, &key().verifying_key()).is_ok());

        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(&compact);
        assert!(verify(&with_bom, &key().verifying_key()).is_ok());
    }

    fn expect_err(file: &[u8]) -> ReceiptError {
        match verify(file, &key().verifying_key()) {
            Ok(r) => panic!("verification unexpectedly succeeded: {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn changed_fingerprint_is_bad_signature() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]["destroyed"][0]["fingerprint"] = Value::from(FP_B);
        });
        assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
    }

    #[test]
    fn changed_subject_id_is_bad_signature() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]["subject_id"] = Value::from("user-43");
        });
        assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
    }

    #[test]
    fn changed_executed_at_unix_ms_is_bad_signature() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]["executed_at_unix_ms"] = Value::from(1_764_639_635_124_i64);
        });
        assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
    }

    #[test]
    fn dropped_optional_field_is_bad_signature() {
        let file = signed_file(tenant_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]
                .as_object_mut()
                .unwrap()
                .remove("kms_key_deletion");
        });
        assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
    }

    #[test]
    fn unknown_field_is_malformed() {
        let file = signed_file(subject_receipt());
        for edit in [
            (|v: &mut Value| {
                v["receipt"]["note"] = Value::from("hi");
            }) as fn(&mut Value),
            |v| {
                v["comment"] = Value::from("hi");
            },
            |v| {
                v["receipt"]["destroyed"][0]["key_bytes"] = Value::from("00");
            },
        ] {
            let bad = edited(&file, edit);
            match expect_err(&bad) {
                ReceiptError::Malformed(msg) => assert!(msg.contains("unknown field"), "{msg}"),
                other => panic!("expected Malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn flipped_signature_byte_is_bad_signature() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            let mut sig = STANDARD.decode(v["signature"].as_str().unwrap()).unwrap();
            sig[10] ^= 0x01;
            v["signature"] = Value::from(STANDARD.encode(sig));
        });
        assert!(matches!(expect_err(&bad), ReceiptError::BadSignature));
    }

    #[test]
    fn bad_signature_encoding_is_malformed() {
        let file = signed_file(subject_receipt());
        for sig in ["not base64!", "AAAA", ""] {
            let bad = edited(&file, |v| v["signature"] = Value::from(sig));
            assert!(
                matches!(expect_err(&bad), ReceiptError::Malformed(_)),
                "signature {sig:?}"
            );
        }
    }

    #[test]
    fn other_public_key_is_wrong_key() {
        let file = signed_file(subject_receipt());
        let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
        match verify(&file, &other) {
            Err(ReceiptError::WrongKey { expected, found }) => {
                assert_eq!(expected, key_id(&other));
                assert_eq!(found, key_id(&key().verifying_key()));
            }
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }

    /// Editing `signing_key_id` alone is caught by the key-id check, which runs before
    /// the signature check, so it reports `WrongKey`.
    #[test]
    fn changed_signing_key_id_alone_is_wrong_key() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]["signing_key_id"] = Value::from("ed25519:0000000000000000");
        });
        assert!(matches!(
            expect_err(&bad),
            ReceiptError::WrongKey { ref found, .. } if found == "ed25519:0000000000000000"
        ));
    }

    /// Re-pointing `signing_key_id` at another key and verifying with that key gets past
    /// the key-id check but not the signature.
    #[test]
    fn receipt_relabelled_for_other_key_is_bad_signature() {
        let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| {
            v["receipt"]["signing_key_id"] = Value::from(key_id(&other));
        });
        assert!(matches!(
            verify(&bad, &other),
            Err(ReceiptError::BadSignature)
        ));
    }

    #[test]
    fn truncated_file_is_malformed() {
        let file = signed_file(subject_receipt());
        for cut in [0, 1, file.len() / 2, file.len() - 1] {
            assert!(
                matches!(expect_err(&file[..cut]), ReceiptError::Malformed(_)),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            expect_err(b"hello, not json"),
            ReceiptError::Malformed(_)
        ));
    }

    #[test]
    fn wrong_format_and_algorithm() {
        let file = signed_file(subject_receipt());
        let bad = edited(&file, |v| v["algorithm"] = Value::from("RSA"));
        assert!(matches!(
            expect_err(&bad),
            ReceiptError::UnsupportedAlgorithm(ref a) if a == "RSA"
        ));
        let bad = edited(&file, |v| {
            v["receipt"]["format"] = Value::from("fieldkey-erasure-receipt/2");
        });
        assert!(matches!(
            expect_err(&bad),
            ReceiptError::UnsupportedFormat(_)
        ));
        let r = Receipt {
            format: "other".into(),
            ..subject_receipt()
        };
        assert!(matches!(
            sign(r, &key()),
            Err(ReceiptError::UnsupportedFormat(_))
        ));
    }

    #[test]
    fn signed_but_mismatched_timestamp_is_inconsistent() {
        let r = Receipt {
            executed_at: "2025-12-02T01:40:36.123Z".into(),
            ..subject_receipt()
        };
        match expect_err(&signed_file(r)) {
            ReceiptError::Inconsistent(msg) => assert!(msg.contains("executed_at"), "{msg}"),
            other => panic!("expected Inconsistent, got {other:?}"),
        }
    }

    #[test]
    fn signed_but_self_contradictory_receipts_are_inconsistent() {
        let cases: Vec<Receipt> = vec![
            Receipt {
                scope: "user".into(),
                ..subject_receipt()
            },
            Receipt {
                subject_id: None,
                ..subject_receipt()
            },
            Receipt {
                subject_id: Some("user-42".into()),
                ..tenant_receipt()
            },
            {
                let mut r = subject_receipt();
                r.destroyed[0].fingerprint = FP_A.to_uppercase();
                r
            },
            {
                let mut r = subject_receipt();
                r.destroyed[0].fingerprint = "abc".into();
                r
            },
            {
                let mut r = subject_receipt();
                r.destroyed[0].subject_id = Some("user-43".into());
                r
            },
            Receipt {
                subject_keys_destroyed: 0,
                ..subject_receipt()
            },
            Receipt {
                subject_keys_digest: Some("xyz".into()),
                ..tenant_receipt()
            },
            {
                let mut r = tenant_receipt();
                r.destroyed[0].kind = "master-key".into();
                r
            },
            {
                let mut r = tenant_receipt();
                r.destroyed[0].version = None;
                r
            },
            {
                let mut r = tenant_receipt();
                if let Some(k) = r.kms_key_deletion.as_mut() {
                    k.status = "deleted".into();
                }
                r
            },
            Receipt {
                requested_at_unix_ms: i64::MAX,
                requested_at: rfc3339_ms(i64::MAX),
                ..subject_receipt()
            },
        ];
        for (i, r) in cases.into_iter().enumerate() {
            match verify(&signed_file(r), &key().verifying_key()) {
                Err(ReceiptError::Inconsistent(_)) => {}
                other => panic!("case {i}: expected Inconsistent, got {other:?}"),
            }
        }
        // A subject who never had a key: empty list, count 0, is fine.
        let r = Receipt {
            destroyed: vec![],
            subject_keys_destroyed: 0,
            ..subject_receipt()
        };
        assert!(verify(&signed_file(r), &key().verifying_key()).is_ok());
    }

    #[test]
    fn signing_input_is_pinned() {
        let r = Receipt {
            signing_key_id: "ed25519:0011223344556677".into(),
            ..subject_receipt()
        };
        let expected = format!(
            "fieldkey-erasure-receipt/1\n{{\"audit_prev_hash\":\"{FP_B}\",\"audit_seq\":17,\
             \"destroyed\":[{{\"fingerprint\":\"{FP_A}\",\"kind\":\"subject-key\",\
             \"subject_id\":\"user-42\"}}],\"erasure_id\":\"er-0001\",\
             \"executed_at\":\"2025-12-02T01:40:35.123Z\",\"executed_at_unix_ms\":1764639635123,\
             \"executed_by\":\"fieldkey-erasure-worker\",\"format\":\"fieldkey-erasure-receipt/1\",\
             \"requested_at\":\"2025-11-24T16:00:00.000Z\",\"requested_at_unix_ms\":1764000000000,\
             \"requested_by\":\"dpo@acme.example\",\"scheduled_for\":\"2025-12-01T14:40:00.000Z\",\
             \"scheduled_for_unix_ms\":1764600000000,\"scope\":\"subject\",\
             \"signing_key_id\":\"ed25519:0011223344556677\",\"subject_id\":\"user-42\",\
             \"subject_keys_destroyed\":1,\"tenant_id\":\"acme\"}}"
        );
        assert_eq!(
            String::from_utf8(signing_input(&r).unwrap()).unwrap(),
            expected
        );
        let d: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
        assert_eq!(digest(&r).unwrap(), d);
        // The digest covers every field.
        let r2 = Receipt {
            audit_seq: 18,
            ..r.clone()
        };
        assert_ne!(digest(&r).unwrap(), digest(&r2).unwrap());
    }

    #[test]
    fn canonical_json_sorts_nested_keys_and_is_stable() {
        let a: Value = serde_json::from_str(
            r#"{ "z": 1, "a": { "y": [ { "d": null, "c": true } ], "b": "x" }, "B": -5, "é": "é", "aa": false }"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"aa":false,"é":"é","B":-5,"a":{"b":"x","y":[{"c":true,"d":null}]},"z":1}"#,
        )
        .unwrap();
        let expected =
            r#"{"B":-5,"a":{"b":"x","y":[{"c":true,"d":null}]},"aa":false,"z":1,"é":"é"}"#;
        assert_eq!(String::from_utf8(canonical_json(&a)).unwrap(), expected);
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), canonical_json(&a));
        // Re-canonicalising the output is a fixed point.
        let again: Value = serde_json::from_slice(&canonical_json(&a)).unwrap();
        assert_eq!(canonical_json(&again), canonical_json(&a));
        // Array order is preserved, not sorted.
        assert_eq!(canonical_json(&serde_json::json!([3, 1, 2])), b"[3,1,2]");
        assert_eq!(
            canonical_json(&serde_json::json!({"n": u64::MAX, "m": i64::MIN})),
            format!("{{\"m\":{},\"n\":{}}}", i64::MIN, u64::MAX).into_bytes()
        );
    }

    #[test]
    fn canonical_json_strings_match_serde_json() {
        let mut s: String = (0u32..0x80).filter_map(char::from_u32).collect();
        s.push_str("é€😀\u{2028}\u{fffd}/");
        let v = Value::from(s.clone());
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        assert_eq!(
            canonical_json(&Value::from("\u{1}\u{1f}\"\\\n")),
            br#""\u0001\u001f\"\\\n""#.to_vec()
        );
    }

    #[test]
    fn parse_public_key_accepts_pem_hex_base64() {
        let vk = key().verifying_key();
        let pem = public_key_pem(&vk).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        let hex_form = hex::encode(vk.as_bytes());
        let b64 = STANDARD.encode(vk.as_bytes());
        let b64_url_nopad = URL_SAFE_NO_PAD.encode(vk.as_bytes());
        for text in [
            pem.clone(),
            format!("\n  {pem}\n\n"),
            hex_form.clone(),
            hex_form.to_uppercase(),
            format!("  {hex_form}\n"),
            b64,
            format!("\t{b64_url_nopad}\r\n"),
        ] {
            assert_eq!(parse_public_key(&text).unwrap(), vk, "{text:?}");
        }
        let other = SigningKey::from_bytes(&OTHER_SEED).verifying_key();
        assert_ne!(
            parse_public_key(&hex::encode(other.as_bytes())).unwrap(),
            vk
        );
    }

    #[test]
    fn parse_public_key_rejects_garbage() {
        let vk = key().verifying_key();
        let hex_form = hex::encode(vk.as_bytes());
        let private_pem = {
            use ed25519_dalek::pkcs8::EncodePrivateKey as _;
            key().to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
        };
        let identity = {
            // The identity point (small order): encoded y = 1.
            let mut b = [0u8; 32];
            b[0] = 1;
            hex::encode(b)
        };
        for text in [
            String::new(),
            "   ".into(),
            "hello world".into(),
            hex_form[..62].to_owned(),
            format!("{hex_form}00"),
            STANDARD.encode([1u8; 31]),
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
            private_pem,
            identity,
        ] {
            match parse_public_key(&text) {
                Err(ReceiptError::PublicKey(msg)) => {
                    assert!(!msg.contains(&hex_form), "message echoes the input: {msg}");
                }
                other => panic!("{text:?}: expected PublicKey error, got {other:?}"),
            }
        }
    }

    #[test]
    fn key_id_format() {
        let vk = key().verifying_key();
        let id = key_id(&vk);
        let full = hex::encode(Sha256::digest(vk.as_bytes()));
        assert_eq!(id, format!("ed25519:{}", &full[..16]));
        assert_eq!(id.len(), "ed25519:".len() + 16);
        assert_ne!(
            id,
            key_id(&SigningKey::from_bytes(&OTHER_SEED).verifying_key())
        );
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_639_635_123), "2025-12-02T01:40:35.123Z");
        assert_eq!(rfc3339_ms(1_764_639_635_000), "2025-12-02T01:40:35.000Z");
        assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(MIN_UNIX_MS), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(MAX_UNIX_MS), "9999-12-31T23:59:59.999Z");
        // Out of range: clamped, no panic.
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MIN), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(MAX_UNIX_MS + 1), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn subjects_digest_is_order_independent_and_unambiguous() {
        let a = ("user-1".to_owned(), FP_A.to_owned());
        let b = ("user-2".to_owned(), FP_B.to_owned());
        let d1 = subjects_digest(&[a.clone(), b.clone()]);
        let d2 = subjects_digest(&[b.clone(), a.clone()]);
        assert_eq!(d1, d2);
        assert!(is_lower_hex_sha256(&d1));
        assert_ne!(d1, subjects_digest(std::slice::from_ref(&a)));
        // Shifting bytes between id and fingerprint changes the digest.
        assert_ne!(
            subjects_digest(&[("ab".into(), "c".into())]),
            subjects_digest(&[("a".into(), "bc".into())])
        );
        // Pinned encoding: u32 BE length + bytes, for id then fingerprint.
        let mut enc = Vec::new();
        for s in ["u", "ff"] {
            enc.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
            enc.extend_from_slice(s.as_bytes());
        }
        assert_eq!(
            subjects_digest(&[("u".into(), "ff".into())]),
            hex::encode(Sha256::digest(&enc))
        );
        assert_eq!(
            subjects_digest(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            ReceiptError::BadSignature.to_string(),
            "signature does not match: the receipt was altered or signed by another key"
        );
        let e = ReceiptError::WrongKey {
            expected: "ed25519:aaaa".into(),
            found: "ed25519:bbbb".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("ed25519:aaaa") && msg.contains("ed25519:bbbb"),
            "{msg}"
        );
    }
}
