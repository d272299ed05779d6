//! The one mapping from keyring errors to gRPC statuses.
//!
//! Each [`Error`] variant gets a status code and a stable reason string (sent as the
//! `fieldkey-error` metadata entry, and as `ItemError.reason` in batches). The message is
//! the error's `Display`, which names the problem and never contains key bytes,
//! plaintext or subject ids. Unexpected errors become INTERNAL with a generic message
//! and are logged in full on the server side only.

use tonic::{Code, Status};

use crate::error::{Error, IdentityRefusal, KmsError, StoreError};
use crate::proto::pb::{self, ItemError};

/// Metadata key carrying the machine-readable reason.
pub use crate::proto::REASON_KEY;

/// Status code and stable reason for an error.
///
/// Exhaustive on purpose, here and in the KMS and store mappings below: no `_` arm, so
/// a new error variant does not compile until it is given its code.
pub fn classify(e: &Error) -> (Code, &'static str) {
    match e {
        Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        Error::TooLarge(_) => (Code::InvalidArgument, "VALUE_TOO_LARGE"),
        Error::MalformedEnvelope(_) => (Code::InvalidArgument, "MALFORMED_CIPHERTEXT"),
        Error::ScopeMismatch { .. } => (Code::InvalidArgument, "SCOPE_MISMATCH"),
        Error::AuthenticationFailed => (Code::DataLoss, "AUTHENTICATION_FAILED"),
        Error::TenantNotFound { .. } => (Code::NotFound, "TENANT_NOT_FOUND"),
        Error::SubjectNotFound { .. } => (Code::NotFound, "SUBJECT_NOT_FOUND"),
        Error::UnknownKeyVersion { .. } => (Code::NotFound, "UNKNOWN_KEY_VERSION"),
        Error::KeyDestroyed { .. } => (Code::FailedPrecondition, "KEY_DESTROYED"),
        Error::KeySuspended { .. } => (Code::FailedPrecondition, "KEY_SUSPENDED"),
        Error::KeyRetired { .. } => (Code::FailedPrecondition, "KEY_RETIRED"),
        Error::RetirementBlocked { .. } => (Code::FailedPrecondition, "RETIREMENT_BLOCKED"),
        Error::JobNotFound { .. } => (Code::NotFound, "JOB_NOT_FOUND"),
        Error::JobConflict { .. } => (Code::FailedPrecondition, "JOB_CONFLICT"),
        Error::RollInProgress { .. } => (Code::Aborted, "EPOCH_ROLL_IN_PROGRESS"),
        Error::EpochStillInUse { .. } => (Code::FailedPrecondition, "EPOCH_STILL_IN_USE"),
        Error::ErasureNotFound { .. } => (Code::NotFound, "ERASURE_NOT_FOUND"),
        Error::PermissionDenied { .. } => (Code::PermissionDenied, "PERMISSION_DENIED"),
        Error::IndexNotConfigured { .. } => (Code::FailedPrecondition, "INDEX_NOT_CONFIGURED"),
        Error::ContextRequired { .. } => (Code::InvalidArgument, "CONTEXT_REQUIRED"),
        Error::KmsKeyNotAllowed { .. } => (Code::PermissionDenied, "KMS_KEY_NOT_ALLOWED"),
        Error::Unauthenticated(r) => (
            Code::Unauthenticated,
            match r {
                IdentityRefusal::HeaderOnUndeclaredListener => "IDENTITY_HEADER_UNTRUSTED",
                IdentityRefusal::NotThroughProxy => "NOT_THROUGH_MESH_PROXY",
            },
        ),
        Error::RateLimited(_) => (Code::ResourceExhausted, "DECRYPT_RATE_LIMITED"),
        Error::IndexRateLimited(_) => (Code::ResourceExhausted, "INDEX_RATE_LIMITED"),
        Error::ErasureNotCancellable { .. } => {
            (Code::FailedPrecondition, "ERASURE_NOT_CANCELLABLE")
        }
        Error::Kms(k) => classify_kms(k),
        Error::Store(s) => classify_store(s),
        Error::Internal(_) => INTERNAL,
    }
}

/// The code and reason of an error that is not the caller's to act on.
const INTERNAL: (Code, &str) = (Code::Internal, "INTERNAL");

fn classify_kms(e: &KmsError) -> (Code, &'static str) {
    match e {
        KmsError::Unavailable(_) | KmsError::Timeout => (Code::Unavailable, "KMS_UNAVAILABLE"),
        KmsError::Throttled => (Code::ResourceExhausted, "KMS_THROTTLED"),
        KmsError::KeyDisabled { .. }
        | KmsError::KeyInvalidState { .. }
        | KmsError::KeyNotFound { .. }
        | KmsError::AccessDenied { .. } => (Code::FailedPrecondition, "KMS_KEY_UNUSABLE"),
        KmsError::InvalidCiphertext | KmsError::Rejected { .. } | KmsError::Misconfigured(_) => {
            INTERNAL
        }
    }
}

fn classify_store(e: &StoreError) -> (Code, &'static str) {
    match e {
        StoreError::Unavailable(_) => (Code::Unavailable, "STORE_UNAVAILABLE"),
        // The keyring retries these itself; one that still surfaces lost a race with a
        // roll twice in a row: the call may be repeated as it is.
        StoreError::EpochRolled => (Code::Aborted, "EPOCH_ROLLED"),
        StoreError::Database(_)
        | StoreError::Corrupt(_)
        | StoreError::Migration(_)
        | StoreError::Misconfigured(_)
        // A computation of ours inside a store transaction (signing a receipt or a
        // checkpoint) failed: a server fault, as when it surfaced as corrupt data.
        | StoreError::Aborted(_) => INTERNAL,
    }
}

/// The message a caller sees: the error's own text, or a generic one for INTERNAL
/// (whose details are logged here).
pub fn public_message(e: &Error, code: Code) -> String {
    if code == Code::Internal {
        tracing::error!(error = ?e, "internal error");
        "internal error (details are in the fieldkey log)".to_owned()
    } else {
        e.to_string()
    }
}

/// The error of one batch item: the same code, reason and message as [`to_status`].
pub fn item_error(e: &Error) -> ItemError {
    let (code, reason) = classify(e);
    ItemError {
        code: code as i32,
        reason: reason.to_owned(),
        message: public_message(e, code),
    }
}

/// A batch item's result message, from the item's outcome (its error as [`item_error`]).
pub(super) trait ItemResult<T> {
    /// The message of `result`.
    fn of(result: Result<T, Error>) -> Self;
}

/// `ItemResult` for each batch result message: `(message, its oneof module, the
/// success type)`.
macro_rules! item_results {
    ($(($message:ident, $oneof:ident, $ok:ident)),* $(,)?) => {$(
        impl ItemResult<pb::$ok> for pb::$message {
            fn of(result: Result<pb::$ok, Error>) -> Self {
                Self {
                    result: Some(match result {
                        Ok(ok) => pb::$oneof::Result::Ok(ok),
                        Err(e) => pb::$oneof::Result::Error(item_error(&e)),
                    }),
                }
            }
        }
    )*};
}

item_results!(
    (EncryptResult, encrypt_result, EncryptResponse),
    (DecryptResult, decrypt_result, DecryptResponse),
    (RewrapResult, rewrap_result, RewrapResponse),
    (BlindIndexResult, blind_index_result, BlindIndexResponse),
    (
        PseudonymizeResult,
        pseudonymize_result,
        PseudonymizeResponse
    ),
);

/// A status for a refused request (limits), with its reason.
pub fn limit_status(code: Code, reason: &'static str, message: String) -> Status {
    let mut status = Status::new(code, message);
    status.metadata_mut().insert(
        REASON_KEY,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

/// A request a handler refuses on its own, before any keyring call (an interval or a
/// report format out of range, an empty period): INVALID_ARGUMENT with `message` as it
/// is and, unlike [`to_status`], no reason entry (the wire these refusals always had).
pub fn bad_request(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

/// A handler's error as the status the call answers with: a keyring [`Error`] through
/// [`to_status`], a [`Status`] (already mapped) as it is.
pub trait IntoStatus {
    /// The status.
    fn into_status(self) -> Status;
}

impl IntoStatus for Status {
    fn into_status(self) -> Status {
        self
    }
}

impl IntoStatus for Error {
    fn into_status(self) -> Status {
        to_status(&self)
    }
}

/// Maps a keyring error to the status returned to the caller.
pub fn to_status(e: &Error) -> Status {
    let (code, reason) = classify(e);
    let mut status = Status::new(code, public_message(e, code));
    status.metadata_mut().insert(
        REASON_KEY,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail by panicking")]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{CryptoError, Scope};

    /// Pins the mapping: a change here is an API change. One row per variant of
    /// [`Error`], and of the [`KmsError`] and [`StoreError`] it carries (a new variant
    /// fails to compile in `classify` and then wants its row here).
    #[test]
    fn every_error_has_a_pinned_status() {
        let t = || "acme".to_owned();
        let cases: Vec<(Error, Code, &str)> = vec![
            (
                Error::InvalidArgument("x".into()),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                Error::TooLarge("x".into()),
                Code::InvalidArgument,
                "VALUE_TOO_LARGE",
            ),
            (
                Error::MalformedEnvelope(CryptoError::Malformed("m")),
                Code::InvalidArgument,
                "MALFORMED_CIPHERTEXT",
            ),
            (
                Error::ScopeMismatch {
                    envelope: Scope::Subject,
                    request: Scope::Tenant,
                },
                Code::InvalidArgument,
                "SCOPE_MISMATCH",
            ),
            (
                Error::AuthenticationFailed,
                Code::DataLoss,
                "AUTHENTICATION_FAILED",
            ),
            (
                Error::TenantNotFound { tenant: t() },
                Code::NotFound,
                "TENANT_NOT_FOUND",
            ),
            (
                Error::SubjectNotFound { tenant: t() },
                Code::NotFound,
                "SUBJECT_NOT_FOUND",
            ),
            (
                Error::UnknownKeyVersion {
                    tenant: t(),
                    version: 9,
                },
                Code::NotFound,
                "UNKNOWN_KEY_VERSION",
            ),
            (
                Error::KeyDestroyed {
                    tenant: t(),
                    scope: Scope::Subject,
                    version: None,
                },
                Code::FailedPrecondition,
                "KEY_DESTROYED",
            ),
            (
                Error::KeySuspended {
                    tenant: t(),
                    scope: Scope::Tenant,
                    version: Some(1),
                },
                Code::FailedPrecondition,
                "KEY_SUSPENDED",
            ),
            (
                Error::KeyRetired {
                    tenant: t(),
                    version: 1,
                },
                Code::FailedPrecondition,
                "KEY_RETIRED",
            ),
            (
                Error::RetirementBlocked {
                    tenant: t(),
                    version: 1,
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
                "RETIREMENT_BLOCKED",
            ),
            (
                Error::JobNotFound { job: "j".into() },
                Code::NotFound,
                "JOB_NOT_FOUND",
            ),
            (
                Error::RollInProgress {
                    owner: "host pid 1".into(),
                },
                Code::Aborted,
                "EPOCH_ROLL_IN_PROGRESS",
            ),
            (
                Error::EpochStillInUse {
                    epoch: 2,
                    usage: "1 subject".into(),
                },
                Code::FailedPrecondition,
                "EPOCH_STILL_IN_USE",
            ),
            (
                Error::JobConflict {
                    job: "j".into(),
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
                "JOB_CONFLICT",
            ),
            (
                Error::PermissionDenied { reason: "r".into() },
                Code::PermissionDenied,
                "PERMISSION_DENIED",
            ),
            (
                Error::Unauthenticated(IdentityRefusal::HeaderOnUndeclaredListener),
                Code::Unauthenticated,
                "IDENTITY_HEADER_UNTRUSTED",
            ),
            (
                Error::Unauthenticated(IdentityRefusal::NotThroughProxy),
                Code::Unauthenticated,
                "NOT_THROUGH_MESH_PROXY",
            ),
            (
                Error::RateLimited("r".into()),
                Code::ResourceExhausted,
                "DECRYPT_RATE_LIMITED",
            ),
            (
                Error::IndexRateLimited("r".into()),
                Code::ResourceExhausted,
                "INDEX_RATE_LIMITED",
            ),
            (
                Error::ContextRequired {
                    field: "email".into(),
                },
                Code::InvalidArgument,
                "CONTEXT_REQUIRED",
            ),
            (
                Error::KmsKeyNotAllowed { key: "k".into() },
                Code::PermissionDenied,
                "KMS_KEY_NOT_ALLOWED",
            ),
            (
                Error::IndexNotConfigured {
                    field: "email".into(),
                },
                Code::FailedPrecondition,
                "INDEX_NOT_CONFIGURED",
            ),
            (
                Error::ErasureNotFound {
                    erasure: "e".into(),
                },
                Code::NotFound,
                "ERASURE_NOT_FOUND",
            ),
            (
                Error::ErasureNotCancellable {
                    erasure: "e".into(),
                    state: "completed".into(),
                },
                Code::FailedPrecondition,
                "ERASURE_NOT_CANCELLABLE",
            ),
            (
                Error::Kms(KmsError::Timeout),
                Code::Unavailable,
                "KMS_UNAVAILABLE",
            ),
            (
                Error::Kms(KmsError::Unavailable(Arc::new(std::io::Error::other("x")))),
                Code::Unavailable,
                "KMS_UNAVAILABLE",
            ),
            (
                Error::Kms(KmsError::Throttled),
                Code::ResourceExhausted,
                "KMS_THROTTLED",
            ),
            (
                Error::Kms(KmsError::KeyDisabled { key_id: "k".into() }),
                Code::FailedPrecondition,
                "KMS_KEY_UNUSABLE",
            ),
            (
                Error::Kms(KmsError::KeyInvalidState { key_id: "k".into() }),
                Code::FailedPrecondition,
                "KMS_KEY_UNUSABLE",
            ),
            (
                Error::Kms(KmsError::KeyNotFound { key_id: "k".into() }),
                Code::FailedPrecondition,
                "KMS_KEY_UNUSABLE",
            ),
            (
                Error::Kms(KmsError::AccessDenied { key_id: "k".into() }),
                Code::FailedPrecondition,
                "KMS_KEY_UNUSABLE",
            ),
            (
                Error::Kms(KmsError::InvalidCiphertext),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Kms(KmsError::Rejected { code: "c".into() }),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Kms(KmsError::Misconfigured("secret detail".into())),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::Unavailable(Arc::new(sqlx::Error::PoolTimedOut))),
                Code::Unavailable,
                "STORE_UNAVAILABLE",
            ),
            (
                Error::Store(StoreError::Database(Arc::new(sqlx::Error::RowNotFound))),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::Migration(Arc::new(
                    sqlx::migrate::MigrateError::VersionMissing(1),
                ))),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::Misconfigured("secret detail".into())),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::Corrupt("x".into())),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::aborted("signing failed".into())),
                Code::Internal,
                "INTERNAL",
            ),
            (
                Error::Store(StoreError::EpochRolled),
                Code::Aborted,
                "EPOCH_ROLLED",
            ),
            (
                Error::Internal("secret detail".into()),
                Code::Internal,
                "INTERNAL",
            ),
        ];
        for (e, code, reason) in cases {
            let s = to_status(&e);
            assert_eq!(s.code(), code, "{e:?}");
            assert_eq!(
                s.metadata().get(REASON_KEY).unwrap().to_str().unwrap(),
                reason
            );
            if code == Code::Internal {
                assert!(
                    !s.message().contains("secret"),
                    "internal details stay in the log"
                );
            }
        }
    }
}
