//! Tenant keys, subject keys and signing keys as the store keeps them: their states,
//! their records, what is inserted, and the wrapped (KMS-encrypted) form of a key.
//!
//! Plain data: nothing here does I/O, holds an unwrapped key or decides a transition
//! (the keyring decides; the store applies).

use std::fmt;
use std::str::FromStr;

use super::DecodeError;
use crate::crypto::Fingerprint;

/// A key encrypted ("wrapped") by a KMS key. Opaque ciphertext; safe to store and log
/// by fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    /// Wraps stored bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The wrapped bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// SHA-256 fingerprint of the wrapped bytes.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_wrapped(&self.0)
    }
}

/// Leading bytes of a key wrapped under two KMS keys, a disaster-recovery pair
/// (`docs/FORMAT.md` §4.1): no provider's own wrapped form starts with them (AWS KMS
/// blobs start with 0x01 0x02, the local and PKCS#11 forms with 0x01, OpenBao's with
/// `vault:`).
const DUAL_MAGIC: &[u8; 4] = b"FKD\x01";

/// The parts of a key wrapped under two KMS keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualWrap<'a> {
    /// The primary KMS's wrapped form.
    pub primary: &'a [u8],
    /// The secondary KMS key that wrapped `secondary`.
    pub secondary_key_id: &'a str,
    /// The secondary KMS's wrapped form.
    pub secondary: &'a [u8],
}

impl WrappedKey {
    /// A key wrapped under two KMS keys: `magic(4) || u16 len || secondary key id ||
    /// u32 len || primary || secondary`, all lengths big-endian. `None` if a part is
    /// too long for its length field.
    pub fn dual(primary: &[u8], secondary_key_id: &str, secondary: &[u8]) -> Option<Self> {
        let id_len = u16::try_from(secondary_key_id.len()).ok()?;
        let p_len = u32::try_from(primary.len()).ok()?;
        let mut b =
            Vec::with_capacity(10 + secondary_key_id.len() + primary.len() + secondary.len());
        b.extend_from_slice(DUAL_MAGIC);
        b.extend_from_slice(&id_len.to_be_bytes());
        b.extend_from_slice(secondary_key_id.as_bytes());
        b.extend_from_slice(&p_len.to_be_bytes());
        b.extend_from_slice(primary);
        b.extend_from_slice(secondary);
        Some(Self(b))
    }

    /// The parts of a key wrapped under two KMS keys; `None` for a key wrapped under
    /// one (or bytes that do not parse as two: those are handed to the primary KMS,
    /// which refuses them).
    pub fn split_dual(&self) -> Option<DualWrap<'_>> {
        let rest = self.0.strip_prefix(DUAL_MAGIC.as_slice())?;
        let (id_len, rest) = rest.split_first_chunk::<2>()?;
        let (id, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*id_len)))?;
        let (p_len, rest) = rest.split_first_chunk::<4>()?;
        let p_len = usize::try_from(u32::from_be_bytes(*p_len)).ok()?;
        let (primary, secondary) = rest.split_at_checked(p_len)?;
        Some(DualWrap {
            primary,
            secondary_key_id: std::str::from_utf8(id).ok()?,
            secondary,
        })
    }

    /// Whether a second KMS key (disaster recovery) also wraps this key.
    pub fn has_second_wrapping(&self) -> bool {
        self.split_dual().is_some()
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({})", self.fingerprint())
    }
}
/// Lifecycle state of a key version or subject key (NIST SP 800-57 inspired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Encrypts new data and decrypts.
    Active,
    /// Decrypts only (a newer version is active).
    DecryptOnly,
    /// Restricted (GDPR Art. 18): neither encrypts nor decrypts; reversible.
    Suspended,
    /// Shredded: material gone, tombstone kept; irreversible.
    Destroyed,
    /// Retired after re-encryption moved every ciphertext off it: material gone,
    /// tombstone kept; irreversible. Tenant key versions only.
    Retired,
}

impl KeyState {
    /// Stable text form used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Suspended => "suspended",
            KeyState::Destroyed => "destroyed",
            KeyState::Retired => "retired",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "active" => KeyState::Active,
            "decrypt-only" => KeyState::DecryptOnly,
            "suspended" => KeyState::Suspended,
            "destroyed" => KeyState::Destroyed,
            "retired" => KeyState::Retired,
            _ => return Err(DecodeError(format!("unknown key state {s:?}"))),
        })
    }
}

/// One version of a tenant key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Current state.
    pub state: KeyState,
    /// State to restore on resume, while suspended.
    pub resume_state: Option<KeyState>,
    /// KMS key that wraps this version.
    pub kms_key_id: String,
    /// The key epoch whose KMS key wraps it (`None`: the tenant's own key, or a
    /// store from before epochs).
    pub epoch: Option<u64>,
    /// Wrapped material; `None` once destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Fingerprint of the wrapped material (kept after destruction).
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

/// A tenant and all its key versions (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Tenant id.
    pub tenant_id: String,
    /// KMS key for new versions (the tenant's own, or the default at creation).
    pub kms_key_id: String,
    /// Whether the tenant brings its own KMS key (its versions stay under it instead
    /// of riding the epoch key); `None`: not classified yet (before the first roll).
    pub own_kms_key: Option<bool>,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Key versions, ascending by version.
    pub versions: Vec<KeyVersionRecord>,
}

impl TenantRecord {
    /// The version in state `active`, if any.
    pub fn active(&self) -> Option<&KeyVersionRecord> {
        self.versions.iter().find(|v| v.state == KeyState::Active)
    }

    /// A version by number.
    pub fn version(&self, version: u32) -> Option<&KeyVersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// Highest version number.
    pub fn latest_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0)
    }
}

/// A subject's (user's) key material as stored: wrapped under a tenant key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Tenant id.
    pub tenant_id: String,
    /// Subject id.
    pub subject_id: String,
    /// `Active`, `Suspended` or `Destroyed`.
    pub state: KeyState,
    /// Tenant key version that wraps the material (legacy rows; 0 when an SWK does).
    pub wrap_version: u32,
    /// The subject-wrapping key (of a key epoch) that wraps the material; `None`:
    /// legacy (under tenant version `wrap_version`) or destroyed.
    pub swk_id: Option<String>,
    /// Wrapped material; `None` once destroyed.
    pub wrapped: Option<Vec<u8>>,
    /// Fingerprint of the wrapped material (kept after destruction).
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

/// A key version to insert.
#[derive(Debug, Clone)]
pub struct NewKeyVersion {
    /// Version number.
    pub version: u32,
    /// KMS key that wrapped it.
    pub kms_key_id: String,
    /// The epoch whose key `kms_key_id` is; the store refuses the insert unless that
    /// epoch is still the active one (a roll raced it). `None`: the tenant's own key.
    pub epoch: Option<u64>,
    /// Wrapped material.
    pub wrapped: WrappedKey,
}

/// A subject key to insert.
#[derive(Debug, Clone)]
pub struct NewSubject {
    /// Tenant id.
    pub tenant_id: String,
    /// Subject id.
    pub subject_id: String,
    /// Tenant key version that wraps it (0 when `swk_id` does).
    pub wrap_version: u32,
    /// The subject-wrapping key that wraps it; the store refuses the insert unless its
    /// epoch is still the active one. `None`: legacy wrapping under `wrap_version`.
    pub swk_id: Option<String>,
    /// Wrapped material.
    pub wrapped: Vec<u8>,
}

/// Result of an insert-if-absent: whether this call created the row, and the row that
/// is now stored (the caller's, or the one that won a race).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created<T> {
    /// This call inserted it.
    Created(T),
    /// It already existed (possibly inserted concurrently); the stored value.
    Existing(T),
}

impl<T> Created<T> {
    /// The stored value either way.
    pub fn into_inner(self) -> T {
        match self {
            Created::Created(t) | Created::Existing(t) => t,
        }
    }

    /// Whether this call inserted it.
    pub fn was_created(&self) -> bool {
        matches!(self, Created::Created(_))
    }
}

/// A signing key as stored: the public key in the clear, the Ed25519 seed wrapped by
/// the KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// Key id (derived from the public key).
    pub key_id: String,
    /// What it signs (`erasure-receipt`).
    pub purpose: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// KMS key that wraps the seed.
    pub kms_key_id: String,
    /// The epoch whose key `kms_key_id` is (`None`: legacy default key).
    pub epoch: Option<u64>,
    /// The wrapped seed.
    pub wrapped: Vec<u8>,
    /// Creation time, Unix ms.
    pub created_at: i64,
}
