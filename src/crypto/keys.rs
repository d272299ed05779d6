//! Secret and public key types.
//!
//! Owns: the in-memory form of 256-bit key material ([`SecretKey`]) and its public
//! counterpart, the [`Fingerprint`] of a wrapped key. Must not: print, log or compare key
//! bytes in variable time. Turning a secret into a public form is a named function
//! ([`Fingerprint::of_wrapped`]), never a `From` impl.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Length in bytes of every symmetric key fieldkey handles (AES-256).
pub const KEY_LEN: usize = 32;

/// 256-bit secret key material, zeroized when dropped.
///
/// There is no `Debug` that shows the bytes, no `Clone` (copies of a secret are
/// deliberate: see [`SecretKey::duplicate`]) and no `PartialEq` (use
/// [`SecretKey::ct_eq`]).
pub struct SecretKey(SecretBox<[u8; KEY_LEN]>);

impl SecretKey {
    /// Fresh key material from the operating system's CSPRNG.
    ///
    /// # Errors
    /// Fails only if the OS random source fails.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = SecretBox::new(Box::new([0u8; KEY_LEN]));
        getrandom::fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut key))?;
        Ok(Self(key))
    }

    /// Takes ownership of key bytes and zeroizes the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = SecretBox::new(Box::new(*bytes));
        bytes.zeroize();
        Self(key)
    }

    /// Copies key bytes from a slice; `None` unless it is exactly [`KEY_LEN`] long.
    /// The caller remains responsible for zeroizing its slice.
    pub fn try_from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let mut arr = arr;
        Some(Self::from_bytes(&mut arr))
    }

    /// Borrow the key bytes for a cryptographic operation. Never store the result.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// An explicit second copy of the secret (both copies zeroize on drop).
    pub fn duplicate(&self) -> Self {
        let mut copy = *self.expose();
        Self::from_bytes(&mut copy)
    }

    /// Constant-time equality of two keys.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.expose().ct_eq(other.expose()).into()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

/// Public identifier of a wrapped key: SHA-256 over the wrapped (KMS-encrypted) bytes.
///
/// It names a key in receipts and reports without revealing anything about the key
/// material itself (the wrapped blob is already ciphertext).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprint of a wrapped key blob.
    pub fn of_wrapped(wrapped: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(&Sha256::digest(wrapped));
        Self(out)
    }

    /// Rebuilds a fingerprint read back from storage.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let mut bytes = [0xABu8; KEY_LEN];
        let key = SecretKey::from_bytes(&mut bytes);
        assert_eq!(bytes, [0u8; KEY_LEN], "caller copy is zeroized");
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn generated_keys_differ_and_compare_in_constant_time() -> Result<(), getrandom::Error> {
        let a = SecretKey::generate()?;
        let b = SecretKey::generate()?;
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&a.duplicate()));
        Ok(())
    }

    #[test]
    fn fingerprint_is_sha256_of_wrapped_bytes() {
        let fp = Fingerprint::of_wrapped(b"abc");
        assert_eq!(
            fp.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
