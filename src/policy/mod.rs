//! Policies read from files in `policies/`: what the operators decided, as data.
//!
//! Owns: parsing and validating policy files, and pure decisions on them (is this key
//! too old?). Must not: do I/O beyond reading its files, or act on its decisions (the
//! keyring and the service act).

pub mod authz;
mod rotation;

pub use authz::{
    Action, Authorizer, AuthzRequest, Budget, Decision, DecryptGuard, PolicyStatus, RateLimit,
    RateLimited,
};
pub use rotation::{KeyAge, RotationPolicy, RotationStatus};

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this policy.
    #[error("policy file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}
