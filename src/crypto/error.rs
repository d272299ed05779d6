//! Errors of the pure crypto layer.

/// Why an envelope could not be produced or opened.
///
/// Messages name the problem and never contain key bytes or plaintext.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The bytes are not a well-formed fieldkey envelope (too short, bad magic, bad
    /// text encoding, ...). The static string says which check failed.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// A well-formed header with a format version this build does not implement.
    #[error("unsupported envelope format version {0}")]
    UnsupportedVersion(u8),
    /// A well-formed header naming a cipher suite this build does not implement.
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u8),
    /// The envelope is subject-scoped but no subject was given, or the reverse.
    #[error("envelope is {envelope}-scoped but the request is {request}-scoped")]
    ScopeMismatch {
        /// Scope recorded in the envelope header.
        envelope: super::Scope,
        /// Scope implied by the request (subject present or not).
        request: super::Scope,
    },
    /// AES-GCM authentication failed: wrong tenant, subject, field or context, a
    /// tampered header or body, or the wrong key. Deliberately one variant, so an
    /// attacker learns nothing about which part was wrong.
    #[error(
        "authentication failed: ciphertext does not match this tenant, subject, field and context, or was altered"
    )]
    AuthenticationFailed,
    /// A caller-supplied argument is invalid (empty or over-long id, bad characters,
    /// oversized context or plaintext).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The system random number generator failed.
    #[error("random number generator failure")]
    Rng,
}
