//! The configuration facts of the report ([`Configuration`]): what the configuration in
//! force says about each promise, as the report shows it.
//!
//! Does not: read the configuration (`facts` does) or judge it (the verdict rules do).

use serde::{Deserialize, Serialize};

/// Configuration facts that matter to the promises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// The ciphertext envelope and its cipher.
    pub envelope: String,
    /// Key store backend (`sqlite`, `postgres`).
    pub key_store: String,
    /// KMS in use.
    pub kms: KmsFacts,
    /// The rotation policy in force.
    pub rotation_policy: RotationFacts,
    /// Transport security.
    pub tls: TlsFacts,
    /// Authorization.
    pub authorization: AuthzFacts,
    /// Audit aggregation and checkpoints.
    pub audit: AuditFacts,
    /// Where the erasure ledger lives (`separate` from the key store, or `shared`).
    pub erasure_ledger: String,
}

/// The KMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsFacts {
    /// `aws`, `openbao`, `pkcs11` or `local` (development only).
    pub provider: String,
    /// The default KMS key (tenants may bring their own).
    pub default_key_id: Option<String>,
    /// AWS region, if set.
    pub region: Option<String>,
    /// The disaster-recovery KMS's provider (`[kms.dr]`), if one is configured.
    #[serde(default)]
    pub dr_provider: Option<String>,
}

/// The rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFacts {
    /// Maximum age of a tenant's active key version, days.
    pub max_key_age_days: u32,
    /// Warning window, days.
    pub warn_days: u32,
    /// Policy file name, or `default`.
    pub source: String,
}

/// Transport security.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFacts {
    /// The mTLS listener for remote callers, if configured.
    pub mtls_listener: Option<String>,
    /// Protocol versions the mTLS listener accepts.
    pub versions: Vec<String>,
    /// Its preferred cipher suite.
    pub preferred_cipher_suite: String,
    /// Whether a client certificate is required (always, when mTLS is on).
    pub client_certificate_required: bool,
    /// Local (plaintext, in-pod) listeners: loopback TCP and Unix socket.
    pub local_listeners: Vec<String>,
    /// Whether Linkerd's `l5d-client-id` is trusted as the caller identity.
    pub trust_linkerd_identity: bool,
}

/// Authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzFacts {
    /// Whether a policy set is enforced (off = every caller may do everything).
    pub enabled: bool,
    /// Policy files of the set in force.
    pub files: Vec<String>,
    /// Policies in it.
    pub policies: usize,
    /// SHA-256 of the set (names and contents).
    pub digest: Option<String>,
    /// Why the policy directory does not load (or its newest change was refused).
    pub error: Option<String>,
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFacts {
    /// Data operations are counted per window of this many seconds.
    pub window_secs: u64,
    /// A signed checkpoint is appended this often, seconds.
    pub checkpoint_secs: u64,
}
