"""What the sync and the asyncio client share: items, results, chunking, retry policy,
channel configuration and request building. No I/O here."""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, Union

import grpc

from .errors import (
    BatchError,
    ConfigurationError,
    ContextRequired,
    DecodeError,
    FieldkeyError,
    error_from_item,
)
from .v1 import fieldkey_pb2 as pb

T = TypeVar("T")

class Unbound(enum.Enum):
    """The type of :data:`UNBOUND`."""

    UNBOUND = "UNBOUND"

    def __repr__(self) -> str:
        return "fieldkey.UNBOUND"


#: ``context=fieldkey.UNBOUND``: this one value is deliberately not bound to a row (sent
#: without a context) even though the client requires a context (``require_context``).
#: The value can then be copied into any other row of the tenant and still decrypt.
UNBOUND: Final = Unbound.UNBOUND

#: A record context: bytes as they are, ``str`` as UTF-8, ``int`` (a primary key) as its
#: decimal text. ``None`` (or empty) = no context, refused by a client with
#: ``require_context=True`` (the default); :data:`UNBOUND` = deliberately none. Must be
#: the same at decryption.
Context = Union[bytes, str, int, Unbound, None]
PathOrPem = Union[str, bytes, "os.PathLike[str]"]

DEFAULT_TARGET: Final = "127.0.0.1:7450"
#: The sidecar's default limits.max_batch_items.
DEFAULT_MAX_BATCH_ITEMS: Final = 10_000
#: Bytes of item payload per request; the sidecar refuses requests over
#: limits.max_message_bytes (16 MiB by default) with INVALID_ARGUMENT/MESSAGE_TOO_LARGE.
DEFAULT_MAX_BATCH_BYTES: Final = 4 * 1024 * 1024
#: Per-item protobuf overhead assumed when chunking (tags, lengths, the item wrapper).
_ITEM_OVERHEAD: Final = 24
_MAX_RECEIVE: Final = 64 * 1024 * 1024


# --------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class EncryptItem:
    """One value to encrypt in a batch. ``subject=None`` = tenant-scoped. ``context``:
    the row's id (required unless the client has ``require_context=False`` or it is
    :data:`UNBOUND`)."""

    tenant: str
    field: str
    value: str | bytes
    subject: str | None = None
    context: Context = None


@dataclass(frozen=True, slots=True)
class DecryptItem:
    """One envelope (binary ``bytes`` or ``fk1:`` text) to decrypt in a batch, with the
    ``context`` it was encrypted with."""

    tenant: str
    field: str
    ciphertext: str | bytes
    subject: str | None = None
    context: Context = None


@dataclass(frozen=True, slots=True)
class RewrapItem:
    """One envelope to move to the tenant's active key version in a batch, with the
    ``context`` it was encrypted with."""

    tenant: str
    field: str
    ciphertext: str | bytes
    subject: str | None = None
    context: Context = None


@dataclass(frozen=True, slots=True)
class Rewrapped:
    """A rewrapped envelope, in the input's form (``fk1:`` ``str`` for a ``str`` input,
    else ``bytes``): ``key_version`` it is on now, ``previous_key_version`` it was on,
    ``changed`` False when it was already on the active version (returned as it was)."""

    ciphertext: bytes | str
    key_version: int
    previous_key_version: int
    changed: bool


@dataclass(frozen=True, slots=True)
class Decrypted(Generic[T]):
    """A value decrypted with ``repair=True`` (read repair, docs/ROTATION.md).

    ``value``: the plaintext (``bytes``, or ``str`` from the text forms).
    ``key_version``: the tenant key version that had encrypted it.
    ``stale``: it is under a version older than the tenant's active one (due for
    re-encryption).
    ``repaired``: when stale, the same value re-encrypted under the active version,
    bound to the same tenant, subject, field and context, in the input's form (``fk1:``
    ``str`` for a ``str`` input, else ``bytes``): store it in place of the value read,
    but only where the stored value is still the one read (compare-and-set; the Django
    integration writes it on the instance's next save). ``None`` when the value is
    current, or when the sidecar could not repair it (the value is still returned and
    ``stale`` stays True: a re-encryption job will move it).
    ``repaired_key_version``: the version ``repaired`` is under (0: none).

    Repair needs the ``Crypto::Rewrap`` permission besides ``Crypto::Decrypt`` on the
    field: without it the sidecar refuses the call (``PermissionDenied``) whether or
    not the value is stale."""

    value: T
    key_version: int
    stale: bool
    repaired: bytes | str | None = None
    repaired_key_version: int = 0


@dataclass(frozen=True, slots=True)
class BlindIndexItem:
    """One value to index in a batch (blind indexes are tenant-scoped: no subject)."""

    tenant: str
    field: str
    value: str | bytes


@dataclass(frozen=True, slots=True)
class PseudonymizeItem:
    """One subject to pseudonymize for a purpose."""

    tenant: str
    subject: str
    purpose: str


@dataclass(frozen=True, slots=True)
class BlindIndex:
    """A blind index value. ``index`` is the value under the active key version (store
    it); ``lookup`` (only with lookup=True) holds the values under every usable
    version, active first: match rows holding any of them."""

    index: bytes | str
    key_version: int
    lookup: tuple[bytes | str, ...] = ()


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The outcome of one batch item: either ``value`` or ``error``, never both.

    A bad item fails alone: the other items of the same batch still have their values.
    ``key_version`` is the tenant key version that encrypted (or had encrypted) the item.
    """

    value: T | None = None
    error: FieldkeyError | None = None
    key_version: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        """The value, or raise the item's named exception."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def unwrap_all(results: Sequence[Result[T]]) -> list[T]:
    """Every value, in order; raises :class:`BatchError` (with each failed item's index
    and exception in ``errors``) if any item failed."""
    errors = {i: r.error for i, r in enumerate(results) if r.error is not None}
    if errors:
        raise BatchError(errors, list(results))
    return [r.value for r in results]  # type: ignore[misc]


# --------------------------------------------------------------------------- retry


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls that failed with UNAVAILABLE: the sidecar is restarting or
    unreachable, or its KMS / key store is (KMS_UNAVAILABLE, STORE_UNAVAILABLE); and
    of RESOURCE_EXHAUSTED/MEMORY_BUDGET (the sidecar's memory budget was full and
    nothing of the call was kept). Nothing else. Every fieldkey RPC is safe to repeat (an Encrypt repeated makes
    another valid ciphertext; erasure and tenant calls are idempotent).

    Attempt ``n`` (from 1) that fails waits ``uniform(d/2, d)`` with
    ``d = min(max_backoff, initial_backoff * multiplier**(n-1))`` before the next one,
    within the call's deadline: no retry starts after it. ``max_attempts=1`` disables
    retries.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ConfigurationError("RetryPolicy backoffs must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int) -> float:
        d = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(d / 2, d)


NO_RETRY: Final = RetryPolicy(max_attempts=1)


# --------------------------------------------------------------------------- transport


def _read_pem(what: str, src: PathOrPem) -> bytes:
    if isinstance(src, bytes):
        return src
    if isinstance(src, str) and src.lstrip().startswith("-----BEGIN"):
        return src.encode()
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read the TLS {what} file {os.fspath(src)!r}: {e.strerror}") from e


@dataclass(frozen=True)
class TlsConfig:
    """mTLS to a remote sidecar listener (``[listen.mtls]``): TLS 1.3, client
    certificate required; the sidecar sees the certificate's SAN as the caller identity.

    Each of ``root_ca``, ``client_cert``, ``client_key`` is PEM (``bytes``, or a ``str``
    starting with ``-----BEGIN``) or a file path. Files are read when the channel is made
    (at construction and at :meth:`Client.reconnect`): call ``reconnect()`` after your
    certificate was renewed. ``server_name`` overrides the name checked against the
    server certificate (when the target is an IP address or a service alias).
    """

    root_ca: PathOrPem
    client_cert: PathOrPem
    client_key: PathOrPem
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem("root CA", self.root_ca),
            private_key=_read_pem("client key", self.client_key),
            certificate_chain=_read_pem("client certificate", self.client_cert),
        )


def normalize_target(target: str) -> str:
    """gRPC target from what fieldkey prints (``tcp://``, ``unix://``, ``mtls://``) or
    what gRPC takes (``host:port``, ``unix:/path``, ``unix:///path``)."""
    if not target or not isinstance(target, str):
        raise ConfigurationError("target must be 'host:port', 'unix:/path' or 'unix:///path'")
    for prefix in ("tcp://", "mtls://", "http://", "https://"):
        if target.startswith(prefix):
            return target[len(prefix) :]
    if target.startswith("unix://") and not target.startswith("unix:///"):
        raise ConfigurationError("a Unix socket target needs an absolute path: 'unix:/path' or 'unix:///path'")
    return target


def channel_options(
    target: str, tls: TlsConfig | None, extra: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", _MAX_RECEIVE),
        # A sidecar on localhost comes back in well under a second after a restart:
        # reconnect quickly instead of gRPC's default 1 s .. 120 s backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
        opts.append(("grpc.default_authority", tls.server_name))
    elif target.startswith("unix:"):
        # gRPC core sends the socket path as :authority, which the sidecar's HTTP/2
        # server refuses (RST_STREAM PROTOCOL_ERROR); Go's gRPC sends "localhost".
        opts.append(("grpc.default_authority", "localhost"))
    opts.extend(extra)
    return opts


# --------------------------------------------------------------------------- requests


def _bytes(what: str, v: str | bytes) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise TypeError(f"{what} must be str or bytes, not {type(v).__name__}")


def context_bytes(ctx: Context) -> bytes:
    if ctx is None or ctx is UNBOUND:
        return b""
    if isinstance(ctx, bool):
        raise TypeError("context must be bytes, str or int, not bool")
    if isinstance(ctx, int):
        return str(ctx).encode()
    return _bytes("context", ctx)


def check_context(
    op: str, tenant: str, field: str, ctx: Context, item: int | None = None, unit: str = "batch item"
) -> None:
    """Raise :class:`ContextRequired` for a missing (None or empty) context; the caller
    checks every item before sending anything. ``unit`` names what ``item`` counts
    (``"column value"`` for a columnar call)."""
    if ctx is UNBOUND:
        return
    if ctx is None or (isinstance(ctx, (str, bytes, bytearray, memoryview)) and len(ctx) == 0):
        where = f"{unit} {item}: " if item is not None else ""
        raise ContextRequired(
            f"{where}{op} of field {field!r} (tenant {tenant!r}) without a context: pass context= "
            "(the row's id) to bind the value to its row, or construct the client with "
            "require_context=False (or pass context=fieldkey.UNBOUND) for a deliberately unbound value",
            reason="CONTEXT_REQUIRED",
        )


def _id(what: str, v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{what} must be str, not {type(v).__name__}")
    return v


def _subject(v: str | None) -> str:
    return "" if v is None else _id("subject", v)


_TEXT = pb.CIPHERTEXT_FORMAT_TEXT
_BINARY = pb.CIPHERTEXT_FORMAT_BINARY


def encrypt_request(
    tenant: str,
    field: str,
    value: str | bytes,
    subject: str | None,
    context: Context,
    text: bool,
    require: bool,
    item: int | None = None,
) -> Any:
    if require:
        check_context("Encrypt", tenant, field, context, item)
    return pb.EncryptRequest(
        tenant_id=_id("tenant", tenant),
        subject_id=_subject(subject),
        field=_id("field", field),
        context=context_bytes(context),
        plaintext=_bytes("value", value),
        format=_TEXT if text else _BINARY,
    )


def decrypt_request(
    tenant: str,
    field: str,
    ciphertext: str | bytes,
    subject: str | None,
    context: Context,
    require: bool,
    item: int | None = None,
    repair: bool = False,
) -> Any:
    if require:
        check_context("Decrypt", tenant, field, context, item)
    return pb.DecryptRequest(
        tenant_id=_id("tenant", tenant),
        subject_id=_subject(subject),
        field=_id("field", field),
        context=context_bytes(context),
        ciphertext=_bytes("ciphertext", ciphertext),
        repair=bool(repair),
    )


def rewrap_request(
    tenant: str,
    field: str,
    ciphertext: str | bytes,
    subject: str | None,
    context: Context,
    require: bool,
    item: int | None = None,
) -> Any:
    if require:
        check_context("Rewrap", tenant, field, context, item)
    return pb.RewrapRequest(
        tenant_id=_id("tenant", tenant),
        subject_id=_subject(subject),
        field=_id("field", field),
        context=context_bytes(context),
        ciphertext=_bytes("ciphertext", ciphertext),
    )


def blind_index_request(tenant: str, field: str, value: str | bytes, text: bool, lookup: bool) -> Any:
    return pb.BlindIndexRequest(
        tenant_id=_id("tenant", tenant),
        field=_id("field", field),
        value=_bytes("value", value),
        format=pb.INDEX_FORMAT_TEXT if text else pb.INDEX_FORMAT_BINARY,
        lookup=lookup,
    )


def pseudonymize_request(tenant: str, subject: str, purpose: str) -> Any:
    return pb.PseudonymizeRequest(
        tenant_id=_id("tenant", tenant),
        subject_id=_id("subject", subject),
        purpose=_id("purpose", purpose),
    )


def _item(items: Iterable[object], cls: type[T]) -> Iterator[T]:
    for i, it in enumerate(items):
        if not isinstance(it, cls):
            raise TypeError(f"batch item {i} must be a fieldkey.{cls.__name__}, not {type(it).__name__}")
        yield it


def encrypt_requests(items: Iterable[EncryptItem], text: bool, require: bool) -> list[Any]:
    """Every item's request (all checked before the caller sends any)."""
    return [
        encrypt_request(it.tenant, it.field, it.value, it.subject, it.context, text, require, i)
        for i, it in enumerate(_item(items, EncryptItem))
    ]


def decrypt_requests(items: Iterable[DecryptItem], require: bool, repair: bool = False) -> list[Any]:
    """Every item's request (all checked before the caller sends any)."""
    return [
        decrypt_request(it.tenant, it.field, it.ciphertext, it.subject, it.context, require, i, repair)
        for i, it in enumerate(_item(items, DecryptItem))
    ]


def rewrap_requests(items: Iterable[RewrapItem], require: bool) -> list[Any]:
    """Every item's request (all checked before the caller sends any)."""
    return [
        rewrap_request(it.tenant, it.field, it.ciphertext, it.subject, it.context, require, i)
        for i, it in enumerate(_item(items, RewrapItem))
    ]


def blind_index_requests(items: Iterable[BlindIndexItem], text: bool, lookup: bool) -> list[Any]:
    return [blind_index_request(it.tenant, it.field, it.value, text, lookup) for it in _item(items, BlindIndexItem)]


def pseudonymize_requests(items: Iterable[PseudonymizeItem]) -> list[Any]:
    return [pseudonymize_request(it.tenant, it.subject, it.purpose) for it in _item(items, PseudonymizeItem)]


def _size(req: Any) -> int:
    n = _ITEM_OVERHEAD
    for name in _SIZED:
        v = getattr(req, name, None)
        if v:
            n += len(v)
    return n


_SIZED: Final = ("tenant_id", "subject_id", "field", "context", "plaintext", "ciphertext", "value", "purpose")


def chunks(requests: list[Any], max_items: int, max_bytes: int) -> Iterator[list[Any]]:
    """Consecutive runs of at most ``max_items`` requests and about ``max_bytes`` of
    payload (an item larger than that goes alone; the sidecar judges it)."""
    start, size = 0, 0
    for i, req in enumerate(requests):
        s = _size(req)
        if i > start and (i - start >= max_items or size + s > max_bytes):
            yield requests[start:i]
            start, size = i, 0
        size += s
    if start < len(requests):
        yield requests[start:]


# --------------------------------------------------------------------------- results


def _fail(res: Any) -> FieldkeyError:
    e = res.error
    return error_from_item(e.code, e.reason, e.message)


def encrypt_results(resp: Any, text: bool, out: list[Result[Any]]) -> None:
    for r in resp.results:
        if r.WhichOneof("result") == "ok":
            ct = r.ok.ciphertext
            out.append(Result(ct.decode("ascii") if text else ct, None, r.ok.key_version))
        else:
            out.append(Result(None, _fail(r)))


def decode_text(plaintext: bytes) -> str:
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("the decrypted value is not valid UTF-8 text (decrypt it as bytes)") from None


def repaired_form(ct: bytes, text: bool) -> bytes | str | None:
    """A repaired ciphertext from the sidecar in the input's form (None: none). A text
    form that is not ASCII is a malformed answer: :class:`FieldkeyError`, as for the
    client's other checks of what the sidecar answered."""
    if not ct:
        return None
    if not text:
        return bytes(ct)
    try:
        return ct.decode("ascii")
    except UnicodeDecodeError:
        raise FieldkeyError("the sidecar answered a repaired ciphertext in text form that is not ASCII") from None


def decrypted(resp: Any, value: Any, text_input: bool) -> Decrypted[Any]:
    """A DecryptResponse of a call with repair, ``value`` its (converted) plaintext."""
    return Decrypted(
        value,
        resp.key_version,
        bool(resp.stale),
        repaired_form(resp.repaired_ciphertext, text_input),
        resp.repaired_key_version,
    )


def decrypt_results(
    resp: Any, as_text: bool, out: list[Result[Any]], texts: Sequence[bool] | None = None
) -> None:
    """``texts`` (a call with repair): for each item of the whole call, whether its
    input was ``str``; the values are then :class:`Decrypted`."""
    for r in resp.results:
        if r.WhichOneof("result") == "ok" and texts is not None:
            text = texts[len(out)]
            pt = r.ok.plaintext
            if as_text:
                try:
                    out.append(Result(decrypted(r.ok, pt.decode("utf-8"), text), None, r.ok.key_version))
                except UnicodeDecodeError:
                    out.append(
                        Result(None, DecodeError("the decrypted value is not valid UTF-8 text"), r.ok.key_version)
                    )
            else:
                out.append(Result(decrypted(r.ok, pt, text), None, r.ok.key_version))
        elif r.WhichOneof("result") == "ok":
            pt = r.ok.plaintext
            if as_text:
                try:
                    out.append(Result(pt.decode("utf-8"), None, r.ok.key_version))
                except UnicodeDecodeError:
                    out.append(
                        Result(None, DecodeError("the decrypted value is not valid UTF-8 text"), r.ok.key_version)
                    )
            else:
                out.append(Result(pt, None, r.ok.key_version))
        else:
            out.append(Result(None, _fail(r)))


def rewrapped(resp: Any, text: bool) -> Rewrapped:
    ct = bytes(resp.ciphertext)
    return Rewrapped(
        ct.decode("ascii") if text else ct, resp.key_version, resp.previous_key_version, bool(resp.changed)
    )


def rewrap_results(resp: Any, texts: Sequence[bool], out: list[Result[Any]]) -> None:
    """``texts``: for each item of the whole call, whether its input was ``str``."""
    for r in resp.results:
        text = texts[len(out)]
        if r.WhichOneof("result") == "ok":
            out.append(Result(rewrapped(r.ok, text), None, r.ok.key_version))
        else:
            out.append(Result(None, _fail(r)))


def blind_index_value(resp: Any, text: bool) -> BlindIndex:
    conv: Callable[[bytes], bytes | str] = (lambda b: b.decode("ascii")) if text else (lambda b: b)
    return BlindIndex(conv(resp.index), resp.key_version, tuple(conv(x) for x in resp.lookup_indexes))


def blind_index_results(resp: Any, text: bool, out: list[Result[Any]]) -> None:
    for r in resp.results:
        if r.WhichOneof("result") == "ok":
            out.append(Result(blind_index_value(r.ok, text), None, r.ok.key_version))
        else:
            out.append(Result(None, _fail(r)))


def pseudonymize_results(resp: Any, out: list[Result[Any]]) -> None:
    for r in resp.results:
        if r.WhichOneof("result") == "ok":
            out.append(Result(r.ok.pseudonym, None))
        else:
            out.append(Result(None, _fail(r)))


@dataclass
class BatchLimits:
    """How batch calls are split: at most ``max_items`` items (the sidecar's
    limits.max_batch_items) and about ``max_bytes`` of payload per request."""

    max_items: int = DEFAULT_MAX_BATCH_ITEMS
    max_bytes: int = DEFAULT_MAX_BATCH_BYTES

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1:
            raise ConfigurationError("batch limits must be positive")
