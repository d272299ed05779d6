//! HKDF-SHA256 derivations from tenant and subject keys, and wrapping of subject keys.
//!
//! Owns: the exact labels and info encodings of `docs/FORMAT.md` §4. Every variable-length
//! input is length-prefixed (u16 big-endian), so no two (tenant, subject, field) triples
//! can produce the same info string.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::xaes::Xaes256Gcm;
use super::{CryptoError, KEY_LEN, SecretKey, envelope::NONCE_LEN, envelope::TAG_LEN};

/// HKDF salt for per-field data keys.
pub(crate) const FIELD_KEY_SALT: &[u8] = b"fieldkey/v1 field-key";
/// HKDF salt for the key that wraps subject key material.
pub(crate) const SUBJECT_WRAP_SALT: &[u8] = b"fieldkey/v1 subject-wrap";
/// Associated-data label for wrapped subject keys.
const SUBJECT_WRAP_AD_LABEL: &[u8] = b"fieldkey/v1 subject-key";
/// Associated-data label for subject keys wrapped under a subject-wrapping key of a
/// key epoch (`docs/FORMAT.md` §4.3).
const SUBJECT_EPOCH_WRAP_AD_LABEL: &[u8] = b"fieldkey/v1 subject-key-epoch";
/// Format byte of a wrapped key ([`seal_key`]).
const KEY_WRAP_FORMAT: u8 = 0x01;
/// Length of a wrapped key ([`seal_key`], subject keys and local-KMS keys alike):
/// format byte, nonce, key, tag.
pub const SUBJECT_WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;

/// Info-string scope tags.
const INFO_TENANT: u8 = 0x00;
const INFO_SUBJECT: u8 = 0x01;

pub(crate) fn len16(s: &[u8]) -> [u8; 2] {
    // Ids are validated to <= 255 bytes before they get here; saturate defensively.
    u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes()
}

/// Derives the 32-byte per-field key. `subject` is `(subject_id, subject_key)`.
pub(crate) fn derive_field_key_bytes(
    tenant_key: &SecretKey,
    subject: Option<(&str, &SecretKey)>,
    tenant: &str,
    field: &str,
) -> Zeroizing<[u8; KEY_LEN]> {
    let mut okm = Zeroizing::new([0u8; KEY_LEN]);
    let t = tenant.as_bytes();
    let f = field.as_bytes();
    let expanded = match subject {
        None => Hkdf::<Sha256>::new(Some(FIELD_KEY_SALT), tenant_key.expose())
            .expand_multi_info(&[&[INFO_TENANT], &len16(t), t, &len16(f), f], okm.as_mut()),
        Some((subject_id, subject_key)) => {
            let mut ikm = Zeroizing::new([0u8; 2 * KEY_LEN]);
            let (a, b) = ikm.split_at_mut(KEY_LEN);
            a.copy_from_slice(tenant_key.expose());
            b.copy_from_slice(subject_key.expose());
            let s = subject_id.as_bytes();
            Hkdf::<Sha256>::new(Some(FIELD_KEY_SALT), ikm.as_ref()).expand_multi_info(
                &[&[INFO_SUBJECT], &len16(t), t, &len16(s), s, &len16(f), f],
                okm.as_mut(),
            )
        }
    };
    // 32 bytes is far below HKDF-SHA256's 255*32 limit, so expand cannot fail.
    debug_assert!(expanded.is_ok());
    okm
}

fn subject_wrap_cipher(tenant_key: &SecretKey, tenant: &str) -> Xaes256Gcm {
    let mut okm = Zeroizing::new([0u8; KEY_LEN]);
    let t = tenant.as_bytes();
    let expanded = Hkdf::<Sha256>::new(Some(SUBJECT_WRAP_SALT), tenant_key.expose())
        .expand_multi_info(&[&len16(t), t], okm.as_mut());
    debug_assert!(expanded.is_ok());
    Xaes256Gcm::new(&okm)
}

fn subject_wrap_ad(tenant: &str, subject: &str, wrap_version: u32) -> Vec<u8> {
    let (t, s) = (tenant.as_bytes(), subject.as_bytes());
    let mut ad = Vec::with_capacity(SUBJECT_WRAP_AD_LABEL.len() + 8 + t.len() + s.len());
    ad.extend_from_slice(SUBJECT_WRAP_AD_LABEL);
    ad.extend_from_slice(&len16(t));
    ad.extend_from_slice(t);
    ad.extend_from_slice(&len16(s));
    ad.extend_from_slice(s);
    ad.extend_from_slice(&wrap_version.to_be_bytes());
    ad
}

/// Wraps subject key material under the tenant key version `wrap_version`
/// (XAES-256-GCM with a random 192-bit nonce; AD binds tenant, subject and version).
///
/// # Errors
/// [`CryptoError::Rng`] if the random source fails.
pub fn wrap_subject_key(
    tenant_key: &SecretKey,
    tenant: &str,
    subject: &str,
    wrap_version: u32,
    subject_key: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    let ad = subject_wrap_ad(tenant, subject, wrap_version);
    seal_key(&subject_wrap_cipher(tenant_key, tenant), &ad, subject_key)
}

/// Unwraps subject key material produced by [`wrap_subject_key`].
///
/// # Errors
/// [`CryptoError::Malformed`] for a blob of the wrong shape;
/// [`CryptoError::AuthenticationFailed`] for the wrong tenant key, tenant, subject or
/// version, or a tampered blob.
pub fn unwrap_subject_key(
    tenant_key: &SecretKey,
    tenant: &str,
    subject: &str,
    wrap_version: u32,
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    let ad = subject_wrap_ad(tenant, subject, wrap_version);
    open_key(&subject_wrap_cipher(tenant_key, tenant), &ad, wrapped)
}

fn subject_epoch_wrap_ad(tenant: &str, subject: &str, epoch: u64) -> Vec<u8> {
    let (t, s) = (tenant.as_bytes(), subject.as_bytes());
    let mut ad = Vec::with_capacity(SUBJECT_EPOCH_WRAP_AD_LABEL.len() + 12 + t.len() + s.len());
    ad.extend_from_slice(SUBJECT_EPOCH_WRAP_AD_LABEL);
    ad.extend_from_slice(&len16(t));
    ad.extend_from_slice(t);
    ad.extend_from_slice(&len16(s));
    ad.extend_from_slice(s);
    ad.extend_from_slice(&epoch.to_be_bytes());
    ad
}

/// Wraps subject key material under the subject-wrapping key `swk` of (`tenant`,
/// `epoch`): XAES-256-GCM keyed by the SWK itself, random 192-bit nonce, AD binding
/// tenant, subject and epoch. Destroying the SWK (and the KMS key of its epoch, which
/// wraps it in the store) makes every copy of the blob, in every backup, noise.
///
/// # Errors
/// [`CryptoError::Rng`] if the random source fails.
pub fn wrap_subject_key_epoch(
    swk: &SecretKey,
    tenant: &str,
    subject: &str,
    epoch: u64,
    subject_key: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    let ad = subject_epoch_wrap_ad(tenant, subject, epoch);
    seal_key(&Xaes256Gcm::new(swk.expose()), &ad, subject_key)
}

/// Unwraps subject key material produced by [`wrap_subject_key_epoch`].
///
/// # Errors
/// [`CryptoError::Malformed`] for a blob of the wrong shape;
/// [`CryptoError::AuthenticationFailed`] for the wrong SWK, tenant, subject or epoch,
/// or a tampered blob.
pub fn unwrap_subject_key_epoch(
    swk: &SecretKey,
    tenant: &str,
    subject: &str,
    epoch: u64,
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    let ad = subject_epoch_wrap_ad(tenant, subject, epoch);
    open_key(&Xaes256Gcm::new(swk.expose()), &ad, wrapped)
}

/// Seals a 256-bit key under `aead` in the key-wrap format shared by subject keys and
/// the local KMS: `0x01 || nonce(24, random) || ciphertext(32) || tag(16)`.
///
/// # Errors
/// [`CryptoError::Rng`] if the random source fails.
pub fn seal_key(aead: &Xaes256Gcm, ad: &[u8], key: &SecretKey) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| CryptoError::Rng)?;
    let mut out = Vec::with_capacity(SUBJECT_WRAPPED_LEN);
    out.push(KEY_WRAP_FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(key.expose());
    let body = out
        .get_mut(1 + NONCE_LEN..)
        .ok_or(CryptoError::Malformed("wrap"))?;
    let tag = aead
        .encrypt_in_place_detached(&nonce, ad, body)
        .map_err(|_| CryptoError::AuthenticationFailed)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a blob made by [`seal_key`].
///
/// # Errors
/// [`CryptoError::Malformed`] for a blob of the wrong length,
/// [`CryptoError::UnsupportedVersion`] for an unknown format byte,
/// [`CryptoError::AuthenticationFailed`] for the wrong key or associated data, or a
/// tampered blob.
pub fn open_key(aead: &Xaes256Gcm, ad: &[u8], wrapped: &[u8]) -> Result<SecretKey, CryptoError> {
    if wrapped.len() != SUBJECT_WRAPPED_LEN {
        return Err(CryptoError::Malformed("wrapped key has the wrong length"));
    }
    let (format, rest) = wrapped
        .split_first()
        .ok_or(CryptoError::Malformed("empty wrapped key"))?;
    if *format != KEY_WRAP_FORMAT {
        return Err(CryptoError::UnsupportedVersion(*format));
    }
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(KEY_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| CryptoError::Malformed("nonce"))?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Malformed("tag"))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(ct);
    aead.decrypt_in_place_detached(&nonce, ad, key.as_mut(), &tag)
        .map_err(|_| CryptoError::AuthenticationFailed)?;
    Ok(SecretKey::from_bytes(&mut key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(&mut [b; KEY_LEN])
    }

    #[test]
    fn field_keys_are_separated_by_tenant_subject_and_field() {
        let tk = key(1);
        let sk = key(2);
        let base = derive_field_key_bytes(&tk, None, "t", "email");
        assert_ne!(*base, *derive_field_key_bytes(&tk, None, "u", "email"));
        assert_ne!(*base, *derive_field_key_bytes(&tk, None, "t", "name"));
        assert_ne!(
            *base,
            *derive_field_key_bytes(&tk, Some(("s", &sk)), "t", "email")
        );
        // length prefixes: ("ab","c") and ("a","bc") differ
        assert_ne!(
            *derive_field_key_bytes(&tk, None, "ab", "c"),
            *derive_field_key_bytes(&tk, None, "a", "bc")
        );
    }

    #[test]
    fn subject_key_wrap_round_trips_and_binds_its_context() -> Result<(), CryptoError> {
        let tk = key(7);
        let sk = key(9);
        let w = wrap_subject_key(&tk, "t", "alice", 3, &sk)?;
        assert_eq!(w.len(), SUBJECT_WRAPPED_LEN);
        assert!(unwrap_subject_key(&tk, "t", "alice", 3, &w)?.ct_eq(&sk));
        for (t, s, v) in [("u", "alice", 3), ("t", "bob", 3), ("t", "alice", 4)] {
            assert_eq!(
                unwrap_subject_key(&tk, t, s, v, &w).err(),
                Some(CryptoError::AuthenticationFailed)
            );
        }
        assert_eq!(
            unwrap_subject_key(&key(8), "t", "alice", 3, &w).err(),
            Some(CryptoError::AuthenticationFailed)
        );
        Ok(())
    }
}
