//! The keyring's error: what went wrong, phrased for the caller.
//!
//! The gRPC edge maps each variant to one status code in a single exhaustive function
//! (`service::status::classify`; a new variant does not compile until it has one). Messages name tenant ids and key versions (not secret) but never subject
//! ids (they may be personal data), key bytes or plaintext.

use crate::crypto::{CryptoError, Scope};
pub use crate::kms::KmsError;
pub use crate::store::StoreError;

/// Result alias for keyring operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a keyring operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller-supplied argument is invalid (id syntax, sizes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A value exceeds the configured size limit for one field.
    #[error("value too large: {0}")]
    TooLarge(String),
    /// The ciphertext is not a well-formed fieldkey envelope, or uses a format version
    /// or suite this build does not implement.
    #[error("{0}")]
    MalformedEnvelope(#[source] CryptoError),
    /// The envelope is subject-scoped and the request is not, or the reverse.
    #[error("envelope is {envelope}-scoped but the request is {request}-scoped")]
    ScopeMismatch {
        /// Scope in the envelope header.
        envelope: Scope,
        /// Scope of the request.
        request: Scope,
    },
    /// Authentication failed: wrong tenant, subject, field or context, or altered bytes.
    #[error(
        "authentication failed: ciphertext does not match this tenant, subject, field and context, or was altered"
    )]
    AuthenticationFailed,
    /// The tenant does not exist.
    #[error("tenant {tenant} not found")]
    TenantNotFound {
        /// Tenant id.
        tenant: String,
    },
    /// The subject has no key in this tenant (never encrypted for, or unknown).
    #[error("subject not found in tenant {tenant}")]
    SubjectNotFound {
        /// Tenant id.
        tenant: String,
    },
    /// The envelope names a key version the tenant does not have.
    #[error("tenant {tenant} has no key version {version}")]
    UnknownKeyVersion {
        /// Tenant id.
        tenant: String,
        /// Version named by the envelope.
        version: u32,
    },
    /// The key needed was destroyed (crypto-shredded). Irreversible.
    #[error("key destroyed: {scope} key of tenant {tenant}{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    KeyDestroyed {
        /// Tenant id.
        tenant: String,
        /// Whether the tenant version or the subject's key was destroyed.
        scope: Scope,
        /// The tenant key version, when a tenant version was destroyed.
        version: Option<u32>,
    },
    /// The key needed is suspended (processing restricted); reversible by resume.
    #[error("key suspended: {scope} key of tenant {tenant}{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    KeySuspended {
        /// Tenant id.
        tenant: String,
        /// Whether a tenant version or the subject's key is suspended.
        scope: Scope,
        /// The tenant key version, when a tenant version is suspended.
        version: Option<u32>,
    },
    /// The key version was retired after re-encryption moved its data to a newer
    /// version; a ciphertext still on it was missed by re-encryption. Irreversible.
    #[error(
        "key version {version} of tenant {tenant} was retired after re-encryption; this ciphertext was not re-encrypted"
    )]
    KeyRetired {
        /// Tenant id.
        tenant: String,
        /// The retired version.
        version: u32,
    },
    /// A key version cannot be retired yet (still active, still wrapping subject keys,
    /// or re-encryption has not been shown to have moved every ciphertext off it).
    #[error("cannot retire key version {version} of tenant {tenant}: {reason}")]
    RetirementBlocked {
        /// Tenant id.
        tenant: String,
        /// The version.
        version: u32,
        /// Why, for the operator.
        reason: String,
    },
    /// No re-encryption job with this id.
    #[error("re-encryption job {job} not found")]
    JobNotFound {
        /// Job id.
        job: String,
    },
    /// The request conflicts with the job's current state (e.g. a different spec under
    /// an existing id, or resuming a finished job).
    #[error("re-encryption job {job}: {reason}")]
    JobConflict {
        /// Job id.
        job: String,
        /// What conflicts.
        reason: String,
    },
    /// Another process holds the key epoch roll's lease (a roll is running there).
    #[error("a key epoch roll is running on {owner}; try again when it has finished")]
    RollInProgress {
        /// The lease holder.
        owner: String,
    },
    /// A roll stopped short of sealing an old epoch: something live still needs its
    /// KMS key (counts in the message); its deletion was not scheduled.
    #[error("epoch {epoch} is still needed by live key material: {usage}")]
    EpochStillInUse {
        /// The epoch.
        epoch: u64,
        /// What still needs it.
        usage: String,
    },
    /// No erasure request with this id.
    #[error("erasure request {erasure} not found")]
    ErasureNotFound {
        /// Request id.
        erasure: String,
    },
    /// The erasure request cannot be cancelled: execution has started or finished.
    #[error("erasure request {erasure} is {state} and can no longer be cancelled")]
    ErasureNotCancellable {
        /// Request id.
        erasure: String,
        /// Its state.
        state: String,
    },
    /// The field has no blind-index profile in the configuration (`[blind_index]`):
    /// indexing it with a guessed profile could silently never match.
    #[error(
        "field {field} has no blind index configured (add [blind_index.fields.{field}] to the configuration)"
    )]
    IndexNotConfigured {
        /// Field name.
        field: String,
    },
    /// The KMS key named for a tenant is not one the configuration allows
    /// (`kms.tenant_keys`).
    #[error("KMS key {key} is not allowed for tenants (kms.tenant_keys of the configuration)")]
    KmsKeyNotAllowed {
        /// The key named.
        key: String,
    },
    /// The field must be bound to its row (`[row_binding]`), and the request has no
    /// `context`.
    #[error(
        "field {field} requires a context (the row's id) so that its values cannot be moved to another row ([row_binding] of the configuration)"
    )]
    ContextRequired {
        /// Field name.
        field: String,
    },
    /// The caller's identity may not do this (authorization policies, default deny).
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// Which rule decided (identities, tenants and fields only).
        reason: String,
    },
    /// The caller's identity cannot be established as presented: an identity header
    /// where it is not trusted, or a call that bypassed the mesh proxy the listener is
    /// declared behind. Refused before any authorization.
    #[error("unauthenticated: {0}")]
    Unauthenticated(IdentityRefusal),
    /// The caller's decrypt-rate ceiling is exhausted (policy `limits.toml`).
    #[error("{0}")]
    RateLimited(String),
    /// The caller's blind index/pseudonym budget is exhausted (policy `limits.toml`).
    #[error("{0}")]
    IndexRateLimited(String),
    /// The KMS failed (unavailable, timed out, throttled, key disabled, access denied...).
    #[error("KMS error: {0}")]
    Kms(#[source] KmsError),
    /// The key store failed (unavailable, query error, corrupt data).
    #[error("key store error: {0}")]
    Store(#[source] StoreError),
    /// An invariant broke; details are logged server-side only.
    #[error("internal error")]
    Internal(String),
}

impl From<KmsError> for Error {
    fn from(e: KmsError) -> Self {
        Error::Kms(e)
    }
}

impl From<crate::model::DecodeError> for Error {
    fn from(e: crate::model::DecodeError) -> Self {
        Error::Store(StoreError::from(e))
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::AuthenticationFailed => Error::AuthenticationFailed,
            CryptoError::InvalidArgument(m) => Error::InvalidArgument(m),
            CryptoError::ScopeMismatch { envelope, request } => {
                Error::ScopeMismatch { envelope, request }
            }
            CryptoError::Rng => Error::Internal("random number generator failure".into()),
            other => Error::MalformedEnvelope(other),
        }
    }
}

/// Why a plaintext caller's identity was refused (docs/AUDIT.md §1, docs/THREAT_MODEL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityRefusal {
    /// Linkerd's `l5d-client-id` arrived on a plaintext listener that is not declared as
    /// behind the Linkerd proxy (`listen.tcp_behind_linkerd`) while the header is
    /// trusted: anyone reaching that listener could have written it.
    #[error(
        "l5d-client-id is trusted only on the TCP listener declared behind the Linkerd proxy (listen.tcp_behind_linkerd); this listener refuses it"
    )]
    HeaderOnUndeclaredListener,
    /// A call on the listener declared behind the Linkerd proxy came from outside the
    /// pod: the proxy connects from inside it, so this caller bypassed the proxy.
    #[error(
        "this listener is declared behind the Linkerd proxy and serves only connections from inside the pod (the proxy's); the caller is outside it"
    )]
    NotThroughProxy,
}
