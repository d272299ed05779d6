"""Exceptions: one named class per fieldkey reason, grouped under its gRPC status code.

The sidecar sends a stable reason in the ``fieldkey-error`` trailer (``ItemError.reason``
in batches; the table is at the top of ``proto/fieldkey/v1/fieldkey.proto``). The reason
is mapped first; a status without a known reason (a proxy's, tonic's own, a newer
sidecar's new reason) is mapped by its code, so ``except fieldkey.NotFound`` still
catches a reason this client does not know yet.

Messages come from the sidecar and never contain plaintext, key bytes or subject ids.
"""

from __future__ import annotations

from typing import Final

import grpc

__all__ = [
    "AuthenticationFailed",
    "BatchError",
    "BatchTooLarge",
    "ColumnMismatch",
    "ConfigurationError",
    "ContextRequired",
    "DecodeError",
    "DecryptRateLimited",
    "DeadlineExceeded",
    "ErasureNotCancellable",
    "ErasureNotFound",
    "FailedPrecondition",
    "FieldkeyError",
    "IndexNotConfigured",
    "IndexRateLimited",
    "InternalError",
    "InvalidArgument",
    "JobConflict",
    "JobNotFound",
    "KeyDestroyed",
    "KeyRetired",
    "KeySuspended",
    "KmsKeyNotAllowed",
    "KmsKeyUnusable",
    "KmsThrottled",
    "KmsUnavailable",
    "MalformedCiphertext",
    "MemoryBudgetExceeded",
    "MessageTooLarge",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetirementBlocked",
    "ScopeMismatch",
    "StoreUnavailable",
    "SubjectNotFound",
    "TenantNotFound",
    "TooManyRequests",
    "Unauthenticated",
    "Unavailable",
    "UnknownKeyVersion",
    "ValueTooLarge",
    "error_from_item",
    "error_from_rpc",
]


class FieldkeyError(Exception):
    """Base of every error this package raises for a failed fieldkey operation.

    ``code`` is the gRPC status code (None for errors raised by the client itself),
    ``reason`` the sidecar's stable reason (``""`` when it sent none), ``message`` its
    human-readable text.
    """

    default_code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
    ) -> None:
        self.message = message
        self.code = code if code is not None else self.default_code
        self.reason = reason
        super().__init__(message)

    def __str__(self) -> str:
        tag = self.reason or (self.code.name if self.code is not None else "")
        return f"{tag}: {self.message}" if tag else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, code={self.code}, message={self.message!r})"


# --- client-side -----------------------------------------------------------------------


class ConfigurationError(FieldkeyError, ValueError):
    """The client was configured wrongly (bad target, unreadable TLS files, ...)."""


class DecodeError(FieldkeyError, ValueError):
    """A decrypted value was asked for as text but is not valid UTF-8."""


# --- by status code ----------------------------------------------------------------------


class InvalidArgument(FieldkeyError, ValueError):
    """INVALID_ARGUMENT: bad id syntax, empty field, oversized context, ..."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ValueTooLarge(InvalidArgument):
    """VALUE_TOO_LARGE: plaintext or ciphertext over the sidecar's limits.max_field_bytes."""


class BatchTooLarge(InvalidArgument):
    """BATCH_TOO_LARGE: more items than limits.max_batch_items (lower max_batch_items)."""


class ColumnMismatch(InvalidArgument):
    """COLUMN_MISMATCH: a columnar call's per-value lists (contexts, subjects) are neither
    empty nor one per value, or both one subject and per-value subjects were given (whole
    call refused; the client raises it before sending for lists it was given)."""


class MalformedCiphertext(InvalidArgument):
    """MALFORMED_CIPHERTEXT: not a fieldkey envelope, or an unsupported version/suite."""


class ContextRequired(InvalidArgument):
    """CONTEXT_REQUIRED: the field must be bound to its row: pass context= (the row's id)."""


class ScopeMismatch(InvalidArgument):
    """SCOPE_MISMATCH: subject-scoped ciphertext decrypted without subject, or the reverse."""


class MessageTooLarge(InvalidArgument):
    """MESSAGE_TOO_LARGE: the request message is over limits.max_message_bytes.

    (Sidecars before issue 20 answered OUT_OF_RANGE without a reason; mapped here too.)
    """


class DeadlineExceeded(FieldkeyError):
    """DEADLINE_EXCEEDED: the call's deadline (client or sidecar) passed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class AuthenticationFailed(FieldkeyError):
    """AUTHENTICATION_FAILED (DATA_LOSS): the ciphertext does not belong to this tenant,
    subject, field or context, or it was altered."""

    default_code = grpc.StatusCode.DATA_LOSS


class NotFound(FieldkeyError, LookupError):
    """NOT_FOUND."""

    default_code = grpc.StatusCode.NOT_FOUND


class TenantNotFound(NotFound):
    """TENANT_NOT_FOUND: no such tenant."""


class SubjectNotFound(NotFound):
    """SUBJECT_NOT_FOUND: the subject has no key in this tenant."""


class UnknownKeyVersion(NotFound):
    """UNKNOWN_KEY_VERSION: the ciphertext names a key version the tenant does not have."""


class JobNotFound(NotFound):
    """JOB_NOT_FOUND."""


class ErasureNotFound(NotFound):
    """ERASURE_NOT_FOUND."""


class FailedPrecondition(FieldkeyError):
    """FAILED_PRECONDITION."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class KeyDestroyed(FailedPrecondition):
    """KEY_DESTROYED: the key was crypto-shredded; the data is gone for good."""


class KeySuspended(FailedPrecondition):
    """KEY_SUSPENDED: processing is restricted (GDPR Art. 18); resumable."""


class KeyRetired(FailedPrecondition):
    """KEY_RETIRED: the key version was retired after re-encryption; this ciphertext was missed."""


class RetirementBlocked(FailedPrecondition):
    """RETIREMENT_BLOCKED: the version cannot be retired yet (the message says why)."""


class JobConflict(FailedPrecondition):
    """JOB_CONFLICT."""


class ErasureNotCancellable(FailedPrecondition):
    """ERASURE_NOT_CANCELLABLE."""


class IndexNotConfigured(FailedPrecondition):
    """INDEX_NOT_CONFIGURED: the field has no [blind_index.fields.NAME] profile in the sidecar."""


class KmsKeyUnusable(FailedPrecondition):
    """KMS_KEY_UNUSABLE: the KMS key is disabled, pending deletion, missing or denied."""


class PermissionDenied(FieldkeyError):
    """PERMISSION_DENIED: the caller's identity may not do this (sidecar policies)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(FieldkeyError):
    """UNAUTHENTICATED."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(FieldkeyError):
    """RESOURCE_EXHAUSTED (not retried automatically)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyRequests(ResourceExhausted):
    """TOO_MANY_REQUESTS: limits.max_concurrent_requests calls already in flight."""


class MemoryBudgetExceeded(ResourceExhausted):
    """MEMORY_BUDGET: the sidecar's memory budget of requests in flight is full; retry later."""


class DecryptRateLimited(ResourceExhausted):
    """DECRYPT_RATE_LIMITED: the caller's decrypt-rate ceiling is used up."""


class KmsKeyNotAllowed(PermissionDenied):
    """KMS_KEY_NOT_ALLOWED: the kms_key_id named for a tenant is not in the sidecar's kms.tenant_keys."""


class IndexRateLimited(ResourceExhausted):
    """INDEX_RATE_LIMITED: the caller's blind index/pseudonym budget is used up."""


class KmsThrottled(ResourceExhausted):
    """KMS_THROTTLED: the KMS throttled the sidecar after its own retries."""


class Unavailable(FieldkeyError):
    """UNAVAILABLE: the sidecar (or its KMS / key store) cannot be reached. Retried
    automatically (bounded); raised once the retries are used up."""

    default_code = grpc.StatusCode.UNAVAILABLE


class KmsUnavailable(Unavailable):
    """KMS_UNAVAILABLE."""


class StoreUnavailable(Unavailable):
    """STORE_UNAVAILABLE."""


class InternalError(FieldkeyError):
    """INTERNAL (details are in the sidecar's log only), UNKNOWN, or another unexpected code."""

    default_code = grpc.StatusCode.INTERNAL


class BatchError(FieldkeyError):
    """Raised by :func:`fieldkey.unwrap_all` when some items of a batch failed.

    ``errors`` maps each failed item's index (in the input order) to its exception;
    ``results`` is the full list of per-item results.
    """

    def __init__(self, errors: dict[int, FieldkeyError], results: list[object]) -> None:
        self.errors = errors
        self.results = results
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(results)} batch items failed; first: item {first}: {errors[first]}"
        )


REASONS: Final[dict[str, type[FieldkeyError]]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "VALUE_TOO_LARGE": ValueTooLarge,
    "BATCH_TOO_LARGE": BatchTooLarge,
    "COLUMN_MISMATCH": ColumnMismatch,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "TOO_MANY_REQUESTS": TooManyRequests,
    "MEMORY_BUDGET": MemoryBudgetExceeded,
    "MESSAGE_TOO_LARGE": MessageTooLarge,
    "DECODE_FAILED": InvalidArgument,
    "COMPRESSED_MESSAGE": InvalidArgument,
    "TRUNCATED_MESSAGE": InvalidArgument,
    "MISSING_MESSAGE": InvalidArgument,
    "REQUEST_BODY_TIMEOUT": DeadlineExceeded,
    "MALFORMED_CIPHERTEXT": MalformedCiphertext,
    "SCOPE_MISMATCH": ScopeMismatch,
    "AUTHENTICATION_FAILED": AuthenticationFailed,
    "TENANT_NOT_FOUND": TenantNotFound,
    "SUBJECT_NOT_FOUND": SubjectNotFound,
    "UNKNOWN_KEY_VERSION": UnknownKeyVersion,
    "KEY_DESTROYED": KeyDestroyed,
    "KEY_SUSPENDED": KeySuspended,
    "KEY_RETIRED": KeyRetired,
    "RETIREMENT_BLOCKED": RetirementBlocked,
    "JOB_NOT_FOUND": JobNotFound,
    "JOB_CONFLICT": JobConflict,
    "ERASURE_NOT_FOUND": ErasureNotFound,
    "ERASURE_NOT_CANCELLABLE": ErasureNotCancellable,
    "INDEX_NOT_CONFIGURED": IndexNotConfigured,
    "CONTEXT_REQUIRED": ContextRequired,
    "PERMISSION_DENIED": PermissionDenied,
    "KMS_KEY_NOT_ALLOWED": KmsKeyNotAllowed,
    "DECRYPT_RATE_LIMITED": DecryptRateLimited,
    "INDEX_RATE_LIMITED": IndexRateLimited,
    "KMS_UNAVAILABLE": KmsUnavailable,
    "KMS_THROTTLED": KmsThrottled,
    "KMS_KEY_UNUSABLE": KmsKeyUnusable,
    "STORE_UNAVAILABLE": StoreUnavailable,
    "INTERNAL": InternalError,
}

CODES: Final[dict[grpc.StatusCode, type[FieldkeyError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: MessageTooLarge,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: AuthenticationFailed,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
}

_CODE_BY_NUMBER: Final[dict[int, grpc.StatusCode]] = {c.value[0]: c for c in grpc.StatusCode}

REASON_TRAILER: Final = "fieldkey-error"

#: What a client's RetryPolicy retries: the sidecar (or its KMS / key store) is
#: unreachable, or its memory budget is full (nothing of the call was kept): both pass.
RETRYABLE: Final = (Unavailable, MemoryBudgetExceeded)


def make_error(code: grpc.StatusCode | None, reason: str, message: str) -> FieldkeyError:
    """The exception for a status: by reason first, then by code."""
    cls = REASONS.get(reason)
    if cls is None and code is not None:
        cls = CODES.get(code)
    if cls is None:
        cls = InternalError if code is not None else FieldkeyError
    return cls(message or (code.name if code is not None else "error"), code=code, reason=reason)


def _reason(metadata: object) -> str:
    if not metadata:
        return ""
    try:
        for key, value in metadata:  # type: ignore[attr-defined]
            if key == REASON_TRAILER:
                return value.decode() if isinstance(value, bytes) else str(value)
    except (TypeError, ValueError):
        return ""
    return ""


def error_from_rpc(err: grpc.RpcError) -> FieldkeyError:
    """The named exception for a failed RPC (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code: grpc.StatusCode | None = err.code() if hasattr(err, "code") else None
    message = err.details() if hasattr(err, "details") else str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return make_error(code, _reason(trailers), message or "")


def error_from_item(code: int, reason: str, message: str) -> FieldkeyError:
    """The named exception for a failed batch item (``ItemError``)."""
    return make_error(_CODE_BY_NUMBER.get(code), reason, message)
