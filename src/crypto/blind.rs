//! Blind indexes and pseudonyms: keyed one-way functions of field values and subjects.
//!
//! Owns: the exact derivations of `docs/BLIND_INDEX.md` (index keys from a tenant key
//! version, pseudonym keys from a subject key), the value normalizations, and the
//! blind-index value format (`0xB1 || version || digest`, text form `fkb1:` +
//! base64url). Must not: decide which tenant key version indexes a field (the keyring
//! does), perform I/O, or keep a normalized value longer than one computation.
//!
//! Both functions are keyed: without the tenant's (or subject's) key material nobody
//! can compute or confirm an index or a pseudonym, and neither can be inverted.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::kdf::len16;
use super::{CryptoError, KEY_LEN, SecretKey};

/// HKDF salt of blind-index keys.
const INDEX_KEY_SALT: &[u8] = b"fieldkey/v1 blind-index";
/// HKDF salt of pseudonym keys.
const PSEUDONYM_SALT: &[u8] = b"fieldkey/v1 pseudonym";
/// First byte of a binary blind-index value.
pub const INDEX_FORMAT: u8 = 0xB1;
/// Prefix of the text form of a blind-index value.
pub const INDEX_TEXT_PREFIX: &str = "fkb1:";
/// Bytes of a binary blind-index value before the digest: format byte, key version.
pub const INDEX_HEADER_LEN: usize = 5;
/// Length of a pseudonym, bytes (shown as 32 hex digits).
pub const PSEUDONYM_LEN: usize = 16;
/// Length of the Argon2id salt derived per (tenant, field, version).
const ARGON2_SALT_LEN: usize = 16;

/// Most memory one Argon2id evaluation may be configured to use (1 GiB, in KiB).
pub const ARGON2_MAX_MEMORY_KIB: u32 = 1 << 20;

type HmacSha256 = Hmac<Sha256>;

/// Unicode normalization form applied before indexing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnicodeForm {
    /// Canonical composition (NFC): the same text typed differently indexes the same.
    Nfc,
    /// Compatibility composition (NFKC): also folds compatibility variants
    /// (full-width letters, ligatures, superscripts).
    Nfkc,
}

/// How a value is normalized before it is indexed (fixed order: Unicode form, case
/// folding, the form again, trimming). With any step set, values must be UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Normalization {
    /// Unicode normalization form, if any.
    pub form: Option<UnicodeForm>,
    /// Unicode full case folding (`"Straße"` and `"STRASSE"` index the same).
    pub casefold: bool,
    /// Strip leading and trailing Unicode white space.
    pub trim: bool,
}

impl Normalization {
    fn is_identity(&self) -> bool {
        self.form.is_none() && !self.casefold && !self.trim
    }

    fn flags(&self) -> u8 {
        let form = match self.form {
            None => 0,
            Some(UnicodeForm::Nfc) => 1,
            Some(UnicodeForm::Nfkc) => 2,
        };
        form | (u8::from(self.casefold) << 2) | (u8::from(self.trim) << 3)
    }

    /// The normalized value (borrowed when nothing changes).
    ///
    /// # Errors
    /// [`CryptoError::InvalidArgument`] if a text step is set and `value` is not UTF-8.
    pub fn apply<'a>(&self, value: &'a [u8]) -> Result<Cow<'a, [u8]>, CryptoError> {
        if self.is_identity() {
            return Ok(Cow::Borrowed(value));
        }
        let text = std::str::from_utf8(value).map_err(|_| {
            CryptoError::InvalidArgument(
                "value is not UTF-8, but this field's blind index normalizes text".into(),
            )
        })?;
        if text.is_ascii() {
            return Ok(self.apply_ascii(text));
        }
        Ok(self.apply_unicode(text))
    }

    /// The fast path: NFC and NFKC leave ASCII unchanged, and Unicode full case folding
    /// maps only `A-Z` within ASCII (to `a-z`); `str::trim` is the same White_Space trim.
    fn apply_ascii<'a>(&self, text: &'a str) -> Cow<'a, [u8]> {
        let mut s = Cow::Borrowed(text);
        if self.casefold && text.bytes().any(|b| b.is_ascii_uppercase()) {
            s = Cow::Owned(text.to_ascii_lowercase());
        }
        if self.trim {
            s = match s {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                Cow::Owned(o) => Cow::Owned(o.trim().to_owned()),
            };
        }
        match s {
            Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
            Cow::Owned(o) => Cow::Owned(o.into_bytes()),
        }
    }

    fn apply_unicode<'a>(&self, text: &'a str) -> Cow<'a, [u8]> {
        let form = |s: Cow<'a, str>| -> Cow<'a, str> {
            let n = match self.form {
                None => return s,
                Some(UnicodeForm::Nfc) => icu_normalizer::ComposingNormalizerBorrowed::new_nfc(),
                Some(UnicodeForm::Nfkc) => icu_normalizer::ComposingNormalizerBorrowed::new_nfkc(),
            };
            match n.normalize(&s) {
                Cow::Borrowed(_) => s,
                Cow::Owned(o) => Cow::Owned(o),
            }
        };
        let mut s = form(Cow::Borrowed(text));
        if self.casefold {
            let folded = match icu_casemap::CaseMapper::new().fold_string(&s) {
                Cow::Borrowed(_) => None,
                Cow::Owned(o) => Some(o),
            };
            if let Some(f) = folded {
                // Folding can produce text that is no longer in the form: normalize again.
                s = form(Cow::Owned(f));
            }
        }
        if self.trim {
            s = match s {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                Cow::Owned(o) => Cow::Owned(o.trim().to_owned()),
            };
        }
        match s {
            Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
            Cow::Owned(o) => Cow::Owned(o.into_bytes()),
        }
    }
}

/// Argon2id cost parameters of a slow index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Cost {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Argon2Cost {
    /// OWASP's minimum recommendation for Argon2id (19 MiB, 2 passes, 1 lane): the
    /// documented default of `algorithm = "argon2id"`.
    pub const DEFAULT: Argon2Cost = Argon2Cost {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };

    fn params(&self, out_len: usize) -> Result<argon2::Params, CryptoError> {
        argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(out_len),
        )
        .map_err(|e| CryptoError::InvalidArgument(format!("Argon2id parameters: {e}")))
    }
}

/// Which function makes the digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexAlgorithm {
    /// HMAC-SHA256: fast; for values with enough entropy (email addresses, ids).
    HmacSha256,
    /// Argon2id keyed with the index key: slow by design, for low-entropy values
    /// (birth dates, postcodes, phone numbers), so that even someone holding the index
    /// key pays an Argon2id evaluation per guess.
    Argon2id(Argon2Cost),
}

/// How one field is indexed. Part of the key derivation: any change (bits,
/// normalization, algorithm, cost) gives unrelated index values, so a changed profile
/// needs a re-index (docs/BLIND_INDEX.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexProfile {
    /// Digest function.
    pub algorithm: IndexAlgorithm,
    /// Digest length kept, bits (a multiple of 8, 16..=256).
    pub bits: u16,
    /// Normalization applied to values first.
    pub normalization: Normalization,
}

impl IndexProfile {
    /// An HMAC-SHA256 profile.
    pub fn hmac(bits: u16, normalization: Normalization) -> Self {
        Self {
            algorithm: IndexAlgorithm::HmacSha256,
            bits,
            normalization,
        }
    }

    /// Checks bit length and Argon2id parameters.
    ///
    /// # Errors
    /// [`CryptoError::InvalidArgument`] naming the bad setting.
    pub fn validate(&self) -> Result<(), CryptoError> {
        if !(16..=256).contains(&self.bits) || !self.bits.is_multiple_of(8) {
            return Err(CryptoError::InvalidArgument(format!(
                "blind index bits must be a multiple of 8 in 16..=256, not {}",
                self.bits
            )));
        }
        if let IndexAlgorithm::Argon2id(c) = self.algorithm {
            if c.memory_kib > ARGON2_MAX_MEMORY_KIB {
                return Err(CryptoError::InvalidArgument(format!(
                    "Argon2id memory_kib must be at most {ARGON2_MAX_MEMORY_KIB}"
                )));
            }
            c.params(self.out_len().max(argon2::Params::MIN_OUTPUT_LEN))?;
        }
        Ok(())
    }

    /// Digest bytes kept.
    pub fn out_len(&self) -> usize {
        usize::from(self.bits / 8)
    }

    /// Whether computing one value is slow (Argon2id): callers run it off the async
    /// executor and bound how many run at once.
    pub fn is_slow(&self) -> bool {
        matches!(self.algorithm, IndexAlgorithm::Argon2id(_))
    }

    /// The profile's encoding bound into the key derivation (docs/BLIND_INDEX.md §3):
    /// algorithm (1), bits (2), normalization flags (1), Argon2id m, t, p (4 each;
    /// zero for HMAC).
    fn encode(&self) -> [u8; 16] {
        let (alg, c) = match self.algorithm {
            IndexAlgorithm::HmacSha256 => (1u8, [0u32; 3]),
            IndexAlgorithm::Argon2id(c) => (2u8, [c.memory_kib, c.iterations, c.parallelism]),
        };
        let [b0, b1] = self.bits.to_be_bytes();
        let [m, t, p] = c.map(u32::to_be_bytes);
        let mut out = [0u8; 16];
        let bytes = [alg, b0, b1, self.normalization.flags()]
            .into_iter()
            .chain(m)
            .chain(t)
            .chain(p);
        for (dst, src) in out.iter_mut().zip(bytes) {
            *dst = src;
        }
        out
    }
}

/// The key that indexes one field of one tenant under one tenant key version, with
/// its profile. Holds a keyed HMAC state and (for Argon2id) the secret and salt; all
/// zeroized on drop. No `Debug` that shows them.
pub struct IndexKey {
    mac: HmacSha256,
    argon: Option<(
        Zeroizing<[u8; KEY_LEN]>,
        [u8; ARGON2_SALT_LEN],
        argon2::Params,
    )>,
    profile: IndexProfile,
    version: u32,
}

impl fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexKey")
            .field("version", &self.version)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl IndexKey {
    /// Derives the index key of (`tenant`, `field`) from tenant key `version`:
    /// 48 bytes of HKDF-SHA256(salt = `"fieldkey/v1 blind-index"`, ikm = tenant key,
    /// info = `len16 tenant || tenant || len16 field || field || version (u32) ||
    /// profile (16)`); the first 32 are the HMAC key (and the Argon2id secret), the
    /// last 16 the Argon2id salt.
    ///
    /// # Errors
    /// [`CryptoError::InvalidArgument`] for an invalid profile.
    pub fn derive(
        tenant_key: &SecretKey,
        tenant: &str,
        field: &str,
        version: u32,
        profile: &IndexProfile,
    ) -> Result<Self, CryptoError> {
        profile.validate()?;
        let (t, f) = (tenant.as_bytes(), field.as_bytes());
        let mut okm = Zeroizing::new([0u8; KEY_LEN + ARGON2_SALT_LEN]);
        Hkdf::<Sha256>::new(Some(INDEX_KEY_SALT), tenant_key.expose())
            .expand_multi_info(
                &[
                    &len16(t),
                    t,
                    &len16(f),
                    f,
                    &version.to_be_bytes(),
                    &profile.encode(),
                ],
                okm.as_mut(),
            )
            .map_err(|_| CryptoError::InvalidArgument("index key derivation".into()))?;
        let (key, salt) = okm.split_at(KEY_LEN);
        let mac = <HmacSha256 as KeyInit>::new_from_slice(key)
            .map_err(|_| CryptoError::InvalidArgument("index key length".into()))?;
        let argon = match profile.algorithm {
            IndexAlgorithm::HmacSha256 => None,
            IndexAlgorithm::Argon2id(c) => {
                let mut secret = Zeroizing::new([0u8; KEY_LEN]);
                secret.copy_from_slice(key);
                let mut s = [0u8; ARGON2_SALT_LEN];
                s.copy_from_slice(salt);
                let params = c.params(profile.out_len().max(argon2::Params::MIN_OUTPUT_LEN))?;
                Some((secret, s, params))
            }
        };
        Ok(Self {
            mac,
            argon,
            profile: *profile,
            version,
        })
    }

    /// The tenant key version this key derives from.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The profile.
    pub fn profile(&self) -> &IndexProfile {
        &self.profile
    }

    /// The blind index of `value`: normalized, then HMAC-SHA256 (or Argon2id), the
    /// digest truncated to the profile's bits, in the binary index format. An Argon2id
    /// profile takes tens of milliseconds: call it off the async executor.
    ///
    /// # Errors
    /// [`CryptoError::InvalidArgument`] for a value the normalization refuses (not
    /// UTF-8) or one Argon2id refuses (over 4 GiB).
    pub fn compute(&self, value: &[u8]) -> Result<BlindIndex, CryptoError> {
        let normalized = WipedCow(self.profile.normalization.apply(value)?);
        let normalized: &[u8] = &normalized.0;
        let n = self.profile.out_len();
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + n);
        out.push(INDEX_FORMAT);
        out.extend_from_slice(&self.version.to_be_bytes());
        match &self.argon {
            None => {
                let mut mac = self.mac.clone();
                mac.update(normalized);
                let tag = mac.finalize().into_bytes();
                out.extend_from_slice(tag.get(..n).unwrap_or(&tag));
            }
            Some((secret, salt, params)) => {
                let a = argon2::Argon2::new_with_secret(
                    secret.as_ref(),
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params.clone(),
                )
                .map_err(|e| CryptoError::InvalidArgument(format!("Argon2id: {e}")))?;
                let mut digest = Zeroizing::new(vec![0u8; n.max(argon2::Params::MIN_OUTPUT_LEN)]);
                a.hash_password_into(normalized, salt, &mut digest)
                    .map_err(|e| CryptoError::InvalidArgument(format!("Argon2id: {e}")))?;
                out.extend_from_slice(digest.get(..n).unwrap_or(&digest));
            }
        }
        Ok(BlindIndex(out))
    }
}

/// A normalized copy of a value, wiped when dropped (a borrowed value is the
/// caller's to wipe).
struct WipedCow<'a>(Cow<'a, [u8]>);

impl Drop for WipedCow<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(o) = &mut self.0 {
            zeroize::Zeroize::zeroize(o);
        }
    }
}

/// A blind-index value in the binary format: `0xB1 || version (u32 BE) || digest`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BlindIndex(Vec<u8>);

impl BlindIndex {
    /// Parses a stored index value (binary, or `fkb1:` text form).
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] if it is neither.
    pub fn parse(stored: &[u8]) -> Result<Self, CryptoError> {
        let bytes = match stored.strip_prefix(INDEX_TEXT_PREFIX.as_bytes()) {
            Some(b64) => URL_SAFE_NO_PAD
                .decode(b64)
                .map_err(|_| CryptoError::Malformed("blind index text form is not base64url"))?,
            None => stored.to_vec(),
        };
        if bytes.len() < INDEX_HEADER_LEN + 2 || bytes.first() != Some(&INDEX_FORMAT) {
            return Err(CryptoError::Malformed("not a fieldkey blind index value"));
        }
        Ok(Self(bytes))
    }

    /// The tenant key version whose index key made it.
    pub fn version(&self) -> u32 {
        let mut v = [0u8; 4];
        if let Some(b) = self.0.get(1..INDEX_HEADER_LEN) {
            v.copy_from_slice(b);
        }
        u32::from_be_bytes(v)
    }

    /// The binary form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The binary form, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The text form: `fkb1:` + base64url (no padding) of the binary form.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(INDEX_TEXT_PREFIX.len() + (self.0.len() * 4).div_ceil(3));
        s.push_str(INDEX_TEXT_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&self.0, &mut s);
        s
    }
}

impl fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlindIndex({})", self.to_text())
    }
}

/// The pseudonym of `subject` in `tenant` for `purpose`: HKDF-SHA256(salt =
/// `"fieldkey/v1 pseudonym"`, ikm = the subject's key, info = `len16 tenant || tenant ||
/// len16 subject || subject || len16 purpose || purpose`), 16 bytes. Stable while the
/// subject's key exists (tenant key rotation does not change it); unlinkable across
/// tenants (each has its own subject keys) and purposes; not invertible. Once the
/// subject key is shredded nobody can compute it again.
pub fn pseudonym(
    subject_key: &SecretKey,
    tenant: &str,
    subject: &str,
    purpose: &str,
) -> [u8; PSEUDONYM_LEN] {
    let (t, s, p) = (tenant.as_bytes(), subject.as_bytes(), purpose.as_bytes());
    let mut out = [0u8; PSEUDONYM_LEN];
    let expanded = Hkdf::<Sha256>::new(Some(PSEUDONYM_SALT), subject_key.expose())
        .expand_multi_info(&[&len16(t), t, &len16(s), s, &len16(p), p], &mut out);
    // 16 bytes is far below HKDF-SHA256's limit, so expand cannot fail.
    debug_assert!(expanded.is_ok());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes(&mut [b; KEY_LEN])
    }

    fn email() -> IndexProfile {
        IndexProfile::hmac(
            64,
            Normalization {
                form: Some(UnicodeForm::Nfc),
                casefold: true,
                trim: true,
            },
        )
    }

    fn idx(k: &IndexKey, v: &str) -> Vec<u8> {
        k.compute(v.as_bytes()).unwrap().into_bytes()
    }

    #[test]
    fn equal_values_index_equal_and_unequal_values_differ() {
        let k = IndexKey::derive(&key(1), "acme", "email", 1, &email()).unwrap();
        assert_eq!(idx(&k, "ann@example.org"), idx(&k, "ann@example.org"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            assert!(seen.insert(idx(&k, &format!("user{i}@example.org"))));
        }
        let v = k.compute(b"ann@example.org").unwrap();
        assert_eq!(v.as_bytes().len(), INDEX_HEADER_LEN + 8);
        assert_eq!(v.version(), 1);
        assert_eq!(BlindIndex::parse(v.to_text().as_bytes()).unwrap(), v);
        assert_eq!(BlindIndex::parse(v.as_bytes()).unwrap(), v);
        assert!(v.to_text().starts_with("fkb1:"));
    }

    #[test]
    fn tenants_fields_versions_and_profiles_give_unrelated_indexes() {
        let p = email();
        let base = IndexKey::derive(&key(1), "acme", "email", 1, &p).unwrap();
        let v = "ann@example.org";
        let others = [
            IndexKey::derive(&key(1), "globex", "email", 1, &p).unwrap(),
            IndexKey::derive(&key(1), "acme", "login", 1, &p).unwrap(),
            IndexKey::derive(&key(2), "acme", "email", 1, &p).unwrap(),
            IndexKey::derive(&key(1), "acme", "email", 2, &p).unwrap(),
            IndexKey::derive(&key(1), "acme", "email", 1, &IndexProfile { bits: 72, ..p }).unwrap(),
            IndexKey::derive(
                &key(1),
                "acme",
                "email",
                1,
                &IndexProfile::hmac(64, Normalization::default()),
            )
            .unwrap(),
        ];
        let d = |k: &IndexKey| idx(k, v)[INDEX_HEADER_LEN..INDEX_HEADER_LEN + 8].to_vec();
        for o in &others {
            assert_ne!(d(&base), d(o));
        }
        // length prefixes: ("ab","c") and ("a","bc") differ
        assert_ne!(
            d(&IndexKey::derive(&key(1), "ab", "c", 1, &p).unwrap()),
            d(&IndexKey::derive(&key(1), "a", "bc", 1, &p).unwrap())
        );
    }

    #[test]
    fn normalization_cases() {
        let n = email().normalization;
        let norm =
            |s: &str| String::from_utf8(n.apply(s.as_bytes()).unwrap().into_owned()).unwrap();
        assert_eq!(norm("  Ann@Example.ORG \t\n"), "ann@example.org");
        // NFC: precomposed and combining forms are the same text
        assert_eq!(norm("Jos\u{e9}"), norm("Jose\u{301}"));
        // full case folding, not lower-casing: ß folds to ss
        assert_eq!(norm("STRASSE"), norm("Stra\u{df}e"));
        // Unicode white space (no-break space, ideographic space) is trimmed
        assert_eq!(norm("\u{a0}ann\u{3000}"), "ann");
        // inner white space is kept
        assert_eq!(norm("a  b"), "a  b");
        // NFKC folds compatibility forms that NFC keeps
        let nfkc = Normalization {
            form: Some(UnicodeForm::Nfkc),
            ..Normalization::default()
        };
        let nfc = Normalization {
            form: Some(UnicodeForm::Nfc),
            ..Normalization::default()
        };
        assert_eq!(
            nfkc.apply("\u{ff21}\u{fb01}".as_bytes()).unwrap().as_ref(),
            b"Afi"
        );
        assert_eq!(
            nfc.apply("\u{ff21}".as_bytes()).unwrap().as_ref(),
            "\u{ff21}".as_bytes()
        );
        // without normalization, bytes are indexed as they are (not even UTF-8 needed)
        let none = Normalization::default();
        assert_eq!(none.apply(b"\xff A ").unwrap().as_ref(), b"\xff A ");
        assert!(matches!(
            n.apply(b"\xff"),
            Err(CryptoError::InvalidArgument(_))
        ));
        // casefold alone, then indexing: distinct spellings meet
        let k = IndexKey::derive(&key(3), "acme", "email", 1, &email()).unwrap();
        assert_eq!(idx(&k, " ANN@example.org"), idx(&k, "ann@EXAMPLE.org "));
        let raw =
            IndexKey::derive(&key(3), "acme", "email", 1, &IndexProfile::hmac(64, none)).unwrap();
        assert_ne!(idx(&raw, " ANN@example.org"), idx(&raw, "ann@EXAMPLE.org "));
    }

    #[test]
    fn the_ascii_fast_path_equals_full_unicode_normalization() {
        let all: String = (0u8..128).map(char::from).collect();
        let samples = [
            all.clone(),
            format!("  {all}\t"),
            "\x0b\x0c ANN@Example.ORG \r\n\x1c".to_owned(),
            "plain".to_owned(),
            String::new(),
        ];
        for form in [None, Some(UnicodeForm::Nfc), Some(UnicodeForm::Nfkc)] {
            for casefold in [false, true] {
                for trim in [false, true] {
                    let n = Normalization {
                        form,
                        casefold,
                        trim,
                    };
                    for s in &samples {
                        assert_eq!(n.apply_ascii(s), n.apply_unicode(s), "{n:?} {s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn bits_and_argon2_parameters_are_checked() {
        for bits in [0u16, 8, 15, 20, 264] {
            assert!(
                IndexProfile::hmac(bits, Normalization::default())
                    .validate()
                    .is_err(),
                "{bits}"
            );
        }
        for bits in [16u16, 32, 64, 128, 256] {
            let p = IndexProfile::hmac(bits, Normalization::default());
            let k = IndexKey::derive(&key(1), "t", "f", 1, &p).unwrap();
            assert_eq!(
                k.compute(b"x").unwrap().as_bytes().len(),
                INDEX_HEADER_LEN + usize::from(bits / 8)
            );
        }
        let bad = |c: Argon2Cost| {
            IndexProfile {
                algorithm: IndexAlgorithm::Argon2id(c),
                bits: 32,
                normalization: Normalization::default(),
            }
            .validate()
            .is_err()
        };
        assert!(bad(Argon2Cost {
            memory_kib: 4,
            iterations: 1,
            parallelism: 1
        }));
        assert!(bad(Argon2Cost {
            memory_kib: 64,
            iterations: 0,
            parallelism: 1
        }));
        assert!(bad(Argon2Cost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 0
        }));
        assert!(bad(Argon2Cost {
            memory_kib: ARGON2_MAX_MEMORY_KIB + 1,
            iterations: 1,
            parallelism: 1
        }));
        assert!(!bad(Argon2Cost::DEFAULT));
    }

    #[test]
    fn argon2_parameters_are_honoured() {
        // The same key and value under different costs give different digests, and
        // each equals Argon2id computed directly with exactly those parameters.
        let tk = key(5);
        let mut digests = std::collections::HashSet::new();
        for (m, t, p) in [(64u32, 1u32, 1u32), (128, 1, 1), (64, 2, 1), (64, 1, 2)] {
            let prof = IndexProfile {
                algorithm: IndexAlgorithm::Argon2id(Argon2Cost {
                    memory_kib: m,
                    iterations: t,
                    parallelism: p,
                }),
                bits: 32,
                normalization: Normalization::default(),
            };
            let k = IndexKey::derive(&tk, "acme", "dob", 1, &prof).unwrap();
            let got = k.compute(b"1990-01-01").unwrap();
            // recompute independently
            let mut okm = [0u8; 48];
            Hkdf::<Sha256>::new(Some(INDEX_KEY_SALT), tk.expose())
                .expand_multi_info(
                    &[
                        &[0, 4],
                        b"acme",
                        &[0, 3],
                        b"dob",
                        &1u32.to_be_bytes(),
                        &prof.encode(),
                    ],
                    &mut okm,
                )
                .unwrap();
            let a = argon2::Argon2::new_with_secret(
                &okm[..32],
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon2::Params::new(m, t, p, Some(4)).unwrap(),
            )
            .unwrap();
            let mut want = [0u8; 4];
            a.hash_password_into(b"1990-01-01", &okm[32..], &mut want)
                .unwrap();
            assert_eq!(&got.as_bytes()[INDEX_HEADER_LEN..], &want);
            assert!(digests.insert(want));
        }
    }

    #[test]
    fn pseudonyms_are_stable_and_separated() {
        let sk = key(9);
        let a = pseudonym(&sk, "acme", "u1", "analytics");
        assert_eq!(a, pseudonym(&sk, "acme", "u1", "analytics"));
        assert_ne!(a, pseudonym(&sk, "acme", "u1", "marketing"));
        assert_ne!(a, pseudonym(&sk, "acme", "u2", "analytics"));
        assert_ne!(a, pseudonym(&sk, "globex", "u1", "analytics"));
        assert_ne!(a, pseudonym(&key(8), "acme", "u1", "analytics"));
    }

    #[test]
    fn malformed_index_values_are_refused() {
        for bad in [
            &b""[..],
            b"\xb1\0\0",
            b"\xb2\0\0\0\x01ab",
            b"fkb1:!!",
            b"fkb1:",
        ] {
            assert!(BlindIndex::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let k = IndexKey::derive(&key(0xAB), "t", "f", 1, &email()).unwrap();
        let s = format!("{k:?}");
        assert!(s.contains("version") && !s.contains("171"), "{s}");
    }
}
