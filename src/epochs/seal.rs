//! The signed "backups sealed" statement (`fieldkey-backup-seal/1`): issued when an
//! epoch key's deletion is scheduled, chained into the audit log, and verifiable
//! offline with the receipts' public key (`fieldkey epoch verify-seal`).
//!
//! Signature: Ed25519 over `"fieldkey-backup-seal/1\n"` followed by the statement in
//! canonical JSON, exactly as erasure receipts are signed (`docs/ERASURE.md` §7).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::erasure::receipt::{ReceiptError, key_id};
use crate::model::canonical_json;

/// Format of the statement.
pub const SEAL_FORMAT: &str = "fieldkey-backup-seal/1";

/// What a sealed epoch means for backups, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSeal {
    /// Always [`SEAL_FORMAT`].
    pub format: String,
    /// The epoch whose KMS key's deletion was scheduled.
    pub epoch: u64,
    /// That KMS key (every key-store backup taken while the epoch was active needs it).
    pub kms_key_id: String,
    /// `scheduled`, `already-scheduled` or `already-deleted`.
    pub kms_status: String,
    /// When the epoch became active (backups taken from then on need its key), Unix ms.
    pub epoch_started_unix_ms: i64,
    /// When the next epoch replaced it, Unix ms.
    pub epoch_ended_unix_ms: Option<i64>,
    /// When fieldkey scheduled the key's deletion, Unix ms.
    pub scheduled_at_unix_ms: i64,
    /// When the KMS deletes the key (from then on no backup that needs it can be
    /// restored), Unix ms, if the KMS said.
    pub deletion_date_unix_ms: Option<i64>,
    /// Erasures whose keys were destroyed while this epoch was active: their backup
    /// copies are sealed by this key's deletion (and those of older epochs).
    pub erasures: Vec<String>,
    /// Position of this statement's record in the audit chain.
    pub audit_seq: u64,
    /// Hex hash of the audit record before it.
    pub audit_prev_hash: String,
    /// Id of the public key that verifies it (the receipts' key).
    pub signing_key_id: String,
}

/// A [`BackupSeal`] with its signature: the statement file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedSeal {
    /// The signed content.
    pub seal: BackupSeal,
    /// Always `"Ed25519"`.
    pub algorithm: String,
    /// Standard base64 of the 64-byte signature over [`signing_input`].
    pub signature: String,
}

/// The bytes the signature covers.
///
/// # Errors
/// [`ReceiptError::Encode`].
pub fn signing_input(s: &BackupSeal) -> Result<Vec<u8>, ReceiptError> {
    let value = serde_json::to_value(s).map_err(|e| ReceiptError::Encode(e.to_string()))?;
    let mut out = SEAL_FORMAT.as_bytes().to_vec();
    out.push(b'\n');
    out.extend_from_slice(&canonical_json(&value));
    Ok(out)
}

/// Signs a statement (its `signing_key_id` is set from `key`).
///
/// # Errors
/// [`ReceiptError::Encode`].
pub fn sign(mut s: BackupSeal, key: &SigningKey) -> Result<SignedSeal, ReceiptError> {
    s.signing_key_id = key_id(&key.verifying_key());
    let sig = key.sign(&signing_input(&s)?);
    Ok(SignedSeal {
        seal: s,
        algorithm: "Ed25519".into(),
        signature: STANDARD.encode(sig.to_bytes()),
    })
}

/// SHA-256 of the signing input: what the audit record carries.
///
/// # Errors
/// [`ReceiptError::Encode`].
pub fn digest(s: &BackupSeal) -> Result<[u8; 32], ReceiptError> {
    Ok(Sha256::digest(signing_input(s)?).into())
}

/// Checks a statement file against a public key, offline.
///
/// # Errors
/// [`ReceiptError`] naming what is wrong (malformed, wrong key, bad signature).
pub fn verify(json: &str, key: &VerifyingKey) -> Result<BackupSeal, ReceiptError> {
    let signed: SignedSeal =
        serde_json::from_str(json).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    if signed.seal.format != SEAL_FORMAT {
        return Err(ReceiptError::UnsupportedFormat(signed.seal.format));
    }
    if signed.algorithm != "Ed25519" {
        return Err(ReceiptError::UnsupportedAlgorithm(signed.algorithm));
    }
    let expected = key_id(key);
    if signed.seal.signing_key_id != expected {
        return Err(ReceiptError::WrongKey {
            expected,
            found: signed.seal.signing_key_id,
        });
    }
    let raw = STANDARD
        .decode(&signed.signature)
        .map_err(|_| ReceiptError::Malformed("signature is not base64".into()))?;
    let sig = Signature::from_slice(&raw)
        .map_err(|_| ReceiptError::Malformed("signature is not 64 bytes".into()))?;
    key.verify_strict(&signing_input(&signed.seal)?, &sig)
        .map_err(|_| ReceiptError::BadSignature)?;
    Ok(signed.seal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> BackupSeal {
        BackupSeal {
            format: SEAL_FORMAT.into(),
            epoch: 3,
            kms_key_id: "arn:aws:kms:eu-west-1:1:key/x".into(),
            kms_status: "scheduled".into(),
            epoch_started_unix_ms: 1,
            epoch_ended_unix_ms: Some(2),
            scheduled_at_unix_ms: 3,
            deletion_date_unix_ms: Some(4),
            erasures: vec!["er-1".into()],
            audit_seq: 9,
            audit_prev_hash: "00".into(),
            signing_key_id: String::new(),
        }
    }

    #[test]
    fn a_signed_seal_verifies_and_an_edited_one_does_not() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let signed = sign(seal(), &key).unwrap();
        let json = serde_json::to_string_pretty(&signed).unwrap();
        assert_eq!(verify(&json, &key.verifying_key()).unwrap().epoch, 3);
        let edited = json.replace("\"epoch\": 3", "\"epoch\": 4");
        assert!(matches!(
            verify(&edited, &key.verifying_key()),
            Err(ReceiptError::BadSignature)
        ));
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(matches!(
            verify(&json, &other.verifying_key()),
            Err(ReceiptError::WrongKey { .. })
        ));
    }
}
