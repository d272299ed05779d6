//! Pure cryptography: the v1 envelope, AEAD, and HKDF key derivations.
//!
//! Owns: the byte-exact format specified in `docs/FORMAT.md`, and every derivation from a
//! tenant or subject key to the key that actually encrypts a field. Must not: perform I/O,
//! know about gRPC, databases or the KMS, or decide *which* key version to use (that is
//! the keyring's job).

mod blind;
#[cfg(test)]
mod blind_vectors;
mod envelope;
mod error;
mod ids;
mod kdf;
mod keys;
#[cfg(test)]
mod subject_wrap_vectors;
#[cfg(test)]
mod vectors;
mod xaes;

pub use blind::{
    ARGON2_MAX_MEMORY_KIB, Argon2Cost, BlindIndex, INDEX_TEXT_PREFIX, IndexAlgorithm, IndexKey,
    IndexProfile, Normalization, PSEUDONYM_LEN, UnicodeForm, pseudonym,
};
pub use envelope::{
    Aad, Envelope, FieldCipher, HEADER_LEN, MAX_PLAINTEXT_LEN, NONCE_LEN, Nonces, OVERHEAD,
    Plaintext, Scope, TAG_LEN, TEXT_PREFIX, decode_any, in_form_of, open, open_into, seal,
    seal_into, to_text,
};
pub use error::CryptoError;
pub use ids::{MAX_CONTEXT_LEN, MAX_ID_LEN, validate_id};
pub use kdf::{
    SUBJECT_WRAPPED_LEN, open_key, seal_key, unwrap_subject_key, unwrap_subject_key_epoch,
    wrap_subject_key, wrap_subject_key_epoch,
};
pub use keys::{Fingerprint, KEY_LEN, SecretKey};
pub use xaes::{AeadError, Xaes256Gcm};
