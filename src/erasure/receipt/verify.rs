//! Offline verification: reading a public key, and checking a receipt file's form,
//! signature and internal consistency.
//!
//! Never signs anything and needs no store or KMS: a privacy officer runs this with
//! nothing but the receipt and the public key.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::{Signature, VerifyingKey};

use super::{
    ALGORITHM, FORMAT, KIND_SUBJECT_KEY, KIND_TENANT_KEY, KMS_ALREADY_DELETED,
    KMS_ALREADY_SCHEDULED, KMS_KEPT_SHARED, KMS_SCHEDULED, MAX_UNIX_MS, MIN_UNIX_MS, Receipt,
    ReceiptError, SCOPE_SUBJECT, SCOPE_TENANT, SignedReceipt, key_id, rfc3339_ms, signing_input,
};

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

/// Every public key of a trust-anchor file: PEM blocks, or one key per line (hex or
/// base64); blank lines and lines starting with `#` are skipped.
///
/// # Errors
/// [`ReceiptError::PublicKey`] for the first key that does not parse, or when there is
/// none.
pub fn parse_public_keys(text: &str) -> Result<Vec<VerifyingKey>, ReceiptError> {
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            break;
        }
        if trimmed.starts_with("-----BEGIN") {
            let (block, after) = match trimmed.find(END) {
                Some(at) => trimmed.split_at(at + END.len()),
                None => (trimmed, ""),
            };
            keys.push(parse_public_key(block)?);
            rest = after;
        } else {
            let (line, after) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
            if !line.trim_start().starts_with('#') {
                keys.push(parse_public_key(line)?);
            }
            rest = after;
        }
    }
    if keys.is_empty() {
        return Err(ReceiptError::PublicKey("no public key in the file".into()));
    }
    Ok(keys)
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

pub(super) fn is_lower_hex_sha256(s: &str) -> bool {
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
