//! Key Management Service backends: wrap and unwrap 256-bit keys.
//!
//! Owns: the [`Kms`] trait and its implementations, [`local::LocalKms`] (a root key in a
//! passphrase-protected file, for development), [`aws::AwsKms`] (AWS KMS through
//! aws-sdk-kms), [`openbao::OpenBaoKms`] (the Transit engine of OpenBao or HashiCorp
//! Vault, over its HTTP API), [`pkcs11::Pkcs11Kms`] (AES keys on a PKCS#11 token, an
//! HSM, through cryptoki), and the decorators over any of them: [`guarded::GuardedKms`]
//! (circuit breakers) and [`dual::DualKms`] (a disaster-recovery pair). Must not: store
//! anything, cache anything (the keyring's cache does), or
//! log key material. Every call binds an [`EncryptionContext`] so a wrapped key cannot
//! be unwrapped as another tenant's or another version's key.

pub mod aws;
pub mod dual;
pub mod guarded;
pub mod local;
pub mod openbao;
pub mod pkcs11;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crypto::SecretKey;
pub use crate::model::WrappedKey;

/// A freshly generated key: the secret and its wrapped form.
#[derive(Debug)]
pub struct DataKey {
    /// The plaintext key, zeroized on drop.
    pub secret: SecretKey,
    /// The key wrapped by the KMS; this is what gets stored.
    pub wrapped: WrappedKey,
}

/// Non-secret key/value pairs bound to a wrapped key (AWS KMS "encryption context").
/// Decryption succeeds only with exactly the same pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Context of tenant key `version` of `tenant`.
    pub fn tenant_key(tenant: &str, version: u32) -> Self {
        let mut m = BTreeMap::new();
        m.insert("fieldkey:purpose".to_owned(), "tenant-key".to_owned());
        m.insert("fieldkey:tenant".to_owned(), tenant.to_owned());
        m.insert("fieldkey:version".to_owned(), version.to_string());
        Self(m)
    }

    /// Adds or replaces one pair.
    pub fn with(mut self, k: &str, v: &str) -> Self {
        self.0.insert(k.to_owned(), v.to_owned());
        self
    }

    /// The pairs, sorted by key.
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Canonical, unambiguous byte encoding (sorted; each key and value u16
    /// length-prefixed), used as associated data by the local KMS.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            for part in [k.as_bytes(), v.as_bytes()] {
                out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }
}

/// Shared error source kept for logs (never shown to callers verbatim). `Arc` so that
/// one failure can be handed to every caller waiting on the same cache load.
pub type BoxError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a KMS call failed. Each variant is a distinct operational situation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The KMS could not be reached or answered with a server-side failure.
    #[error("KMS unavailable")]
    Unavailable(#[source] BoxError),
    /// The KMS did not answer within the configured deadline.
    #[error("KMS call timed out")]
    Timeout,
    /// The KMS kept throttling the call after the configured retries with backoff.
    #[error("KMS throttled the request (retries exhausted)")]
    Throttled,
    /// The KMS key is disabled.
    #[error("KMS key {key_id} is disabled")]
    KeyDisabled {
        /// KMS key id or ARN.
        key_id: String,
    },
    /// The KMS key is in a state that forbids the operation (for AWS: pending deletion,
    /// pending import, unavailable).
    #[error("KMS key {key_id} is in an invalid state (e.g. pending deletion)")]
    KeyInvalidState {
        /// KMS key id or ARN.
        key_id: String,
    },
    /// The KMS key does not exist.
    #[error("KMS key {key_id} not found")]
    KeyNotFound {
        /// KMS key id or ARN.
        key_id: String,
    },
    /// This identity may not use the KMS key.
    #[error("access to KMS key {key_id} denied")]
    AccessDenied {
        /// KMS key id or ARN.
        key_id: String,
    },
    /// The wrapped key does not decrypt under this KMS key and encryption context
    /// (wrong tenant/version context, wrong key, or altered bytes).
    #[error("wrapped key does not match the KMS key or encryption context")]
    InvalidCiphertext,
    /// The KMS rejected the request for another reason (code from the service).
    #[error("KMS rejected the request: {code}")]
    Rejected {
        /// The service's error code.
        code: String,
    },
    /// The KMS backend is misconfigured (file missing, wrong passphrase, bad settings).
    #[error("KMS misconfigured: {0}")]
    Misconfigured(String),
}

impl KmsError {
    /// Whether the KMS could not answer (unreachable, timed out, throttled after the
    /// retries), as opposed to answering no. Only these open a circuit breaker, are
    /// retried by jobs, and send a cache miss to a disaster-recovery KMS.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout | Self::Throttled)
    }
}

/// What scheduling a KMS key's deletion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDeletion {
    /// Deletion is now scheduled.
    Scheduled {
        /// Waiting period before the KMS deletes the key (during which it is unusable).
        pending_window_days: u32,
        /// When the KMS will delete it, Unix ms, if it said.
        deletion_date_unix_ms: Option<i64>,
    },
    /// The key was already pending deletion (an earlier attempt, or an operator).
    AlreadyPending {
        /// When the KMS will delete it, Unix ms, if it said.
        deletion_date_unix_ms: Option<i64>,
    },
}

/// What a KMS says of one of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// Usable.
    Enabled,
    /// Disabled: refuses every use until enabled.
    Disabled,
    /// Pending deletion: refuses every use; the deletion can still be cancelled.
    PendingDeletion {
        /// When the KMS deletes it, Unix ms, if it said.
        deletion_date_unix_ms: Option<i64>,
    },
    /// The KMS no longer has it (deleted) or never had it.
    Deleted,
}

/// A key management service that wraps and unwraps 256-bit keys.
#[async_trait]
pub trait Kms: Send + Sync + 'static {
    /// Short provider name for logs and metrics (`local`, `aws`).
    fn provider(&self) -> &'static str;

    /// KMS key used when a tenant does not bring its own.
    fn default_key_id(&self) -> &str;

    /// Generates a new 256-bit key and its wrapped form under `key_id`, bound to `ctx`.
    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError>;

    /// Wraps an existing key under `key_id` (used to move keys to a new KMS key).
    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError>;

    /// Unwraps `wrapped`, which must have been produced under `key_id` with exactly `ctx`.
    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError>;

    /// Cheap reachability check of the default key (for readiness).
    async fn check(&self) -> Result<(), KmsError>;

    /// KMS keys whose circuit breaker is open now ([`guarded::GuardedKms`]; a provider
    /// without breakers: 0). For metrics.
    fn open_breakers(&self) -> usize {
        0
    }

    /// Whether a wrap under `key_id` is made under a second (disaster-recovery) KMS key
    /// too ([`dual::DualKms`]; others: false): a stored key without its second wrapping
    /// then needs a rewrap even under the same key id.
    fn wraps_twice(&self, key_id: &str) -> bool {
        let _ = key_id;
        false
    }

    /// Unwraps served by a disaster-recovery KMS because the primary could not answer
    /// ([`dual::DualKms`]; others: 0). For metrics.
    fn dr_unwraps(&self) -> u64 {
        0
    }

    /// The KMS's own name for a key id (AWS: the key ARN behind an alias, id or ARN),
    /// to tell whether two ids name the same key. Default: the id itself.
    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        Ok(key_id.to_owned())
    }

    /// Schedules deletion of a KMS key (a tenant's own key, after the tenant was
    /// erased) with a waiting period of `pending_window_days` (AWS: 7..=30).
    /// Idempotent: a key already pending deletion is reported as such.
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError>;

    /// Creates a new symmetric key for key epoch `epoch` and returns its id
    /// (`docs/ERASURE.md` §6). `store_tag` names the key store it serves, so keys of
    /// several stores in one account stay apart. Idempotent per (store, epoch) where
    /// the provider can find a key it made before (AWS: by alias).
    ///
    /// Default: [`KmsError::Rejected`] (a provider that cannot create keys takes them
    /// from a pool named in the configuration).
    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        let _ = (epoch, store_tag);
        Err(KmsError::Rejected {
            code: format!("the {} KMS provider cannot create keys", self.provider()),
        })
    }

    /// The state of a key. Default: [`KeyStatus::Enabled`] if it unwraps at all is not
    /// knowable; providers override it.
    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        let _ = key_id;
        Err(KmsError::Rejected {
            code: format!(
                "the {} KMS provider cannot report key states",
                self.provider()
            ),
        })
    }

    /// Cancels a scheduled deletion (inside its waiting period) and makes the key
    /// usable again. Default: [`KmsError::Rejected`].
    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        let _ = key_id;
        Err(KmsError::Rejected {
            code: format!(
                "the {} KMS provider cannot cancel deletions",
                self.provider()
            ),
        })
    }
}
