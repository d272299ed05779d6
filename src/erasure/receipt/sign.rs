//! Building the signed form of a receipt: the signing input, the Ed25519 signature, the
//! digest the audit chain records, the subject-keys digest, and the public key's id and
//! PEM form.
//!
//! Does not check a receipt's consistency (that is `verify.rs`) nor decide what a
//! receipt says (the erasure workflow drafts it).

pub use crate::signing::key_id;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::EncodePublicKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use super::{ALGORITHM, FORMAT, Receipt, ReceiptError, SignedReceipt, canonical_json};

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
/// it is not checked for internal consistency (that is [`verify`](super::verify)'s job), but `format`
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

/// The public key as a PEM-encoded SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`),
/// LF line endings: the form to hand to a privacy officer.
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, ReceiptError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| ReceiptError::Encode(format!("public key as PEM: {e}")))
}
