"""The asyncio client (grpc.aio); the same methods as :class:`fieldkey.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

import grpc

from . import _column as cc
from . import _core as c
from ._column import Contexts, Subjects
from ._core import (
    BatchLimits,
    BlindIndex,
    BlindIndexItem,
    Context,
    Decrypted,
    DecryptItem,
    EncryptItem,
    PseudonymizeItem,
    Result,
    RetryPolicy,
    RewrapItem,
    Rewrapped,
    TlsConfig,
)
from .errors import RETRYABLE, DeadlineExceeded, FieldkeyError, error_from_rpc
from .v1 import fieldkey_pb2 as pb
from .v1 import fieldkey_pb2_grpc as pbg

__all__ = ["AsyncClient"]


class AsyncClient:
    """An asyncio connection to a fieldkey sidecar; use it from one event loop.

    Same arguments and methods as :class:`fieldkey.Client`, every call awaited;
    ``interceptors`` are ``grpc.aio`` client interceptors.

    ``target``: ``"127.0.0.1:7450"`` (the sidecar's default), ``"unix:/run/fieldkey/fieldkey.sock"``,
    or ``"host:port"`` with ``tls=TlsConfig(...)`` for an mTLS listener.

    ``timeout``: seconds for each RPC, retries included (``None``: no deadline); every
    method also takes ``timeout=``. A batch split into several requests gives each
    request this budget.

    ``retry``: :class:`RetryPolicy` for UNAVAILABLE (the only status retried).

    ``batch``: :class:`BatchLimits`: how batch methods split large inputs (at most the
    sidecar's ``limits.max_batch_items``, 10,000 by default, and about 4 MiB per request).

    ``interceptors``: ``grpc`` client interceptors (metrics, tracing, call counting);
    they see every attempt. ``options``: extra gRPC channel options.

    ``require_context`` (default True): encrypt, decrypt, rewrap and their text and batch
    forms refuse a value without a ``context`` (None or empty; in a batch, any item without
    one) with :class:`fieldkey.ContextRequired`, raised here before anything is sent.
    Pass the row's id as ``context=`` so that a ciphertext copied into another row fails
    to decrypt (AuthenticationFailed). ``require_context=False`` (or
    ``context=fieldkey.UNBOUND`` for one value) sends values without a context, which a
    sidecar whose ``[row_binding] required`` lists the field still refuses
    (ContextRequired). Blind indexes and pseudonyms take no context.

    Errors: every failure raises a subclass of :class:`fieldkey.FieldkeyError` named
    after the sidecar's reason (``KeyDestroyed``, ``AuthenticationFailed``, ...).
    Batch methods return one :class:`Result` per item instead: a bad item fails alone.
    """

    def __init__(
        self,
        target: str = c.DEFAULT_TARGET,
        *,
        tls: TlsConfig | None = None,
        timeout: float | None = 10.0,
        retry: RetryPolicy | None = None,
        batch: BatchLimits | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        require_context: bool = True,
    ) -> None:
        self.target = c.normalize_target(target)
        self.tls = tls
        self.timeout = timeout
        self.require_context = require_context
        self.retry = retry if retry is not None else RetryPolicy()
        self.batch = batch if batch is not None else BatchLimits()
        self._interceptors = tuple(interceptors)
        self._options = c.channel_options(self.target, tls, options)
        self._metadata = tuple(metadata) or None
        self._channel: grpc.aio.Channel | None = None
        self._old: list[grpc.aio.Channel] = []
        self._connect()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        icp = list(self._interceptors) or None
        if self.tls is not None:
            ch = grpc.aio.secure_channel(self.target, self.tls.credentials(), options=self._options, interceptors=icp)
        else:
            ch = grpc.aio.insecure_channel(self.target, options=self._options, interceptors=icp)
        base = ch
        crypto = pbg.CryptoStub(ch)
        keys = pbg.KeysStub(ch)
        erasures = pbg.ErasuresStub(ch)
        old = self._channel
        self._channel = base
        self.crypto: Any = crypto
        """The generated ``fieldkey.v1.Crypto`` stub (no retries, no error mapping)."""
        self.keys: Any = keys
        """The generated ``fieldkey.v1.Keys`` stub."""
        self.erasures: Any = erasures
        """The generated ``fieldkey.v1.Erasures`` stub."""
        self.jobs: Any = pbg.JobsStub(ch)
        """The generated ``fieldkey.v1.Jobs`` stub."""
        self.audit: Any = pbg.AuditStub(ch)
        """The generated ``fieldkey.v1.Audit`` stub."""
        if old is not None:
            self._old.append(old)

    async def reconnect(self) -> None:
        """Make a new channel (re-reading TLS files); the old one closes with a grace period."""
        self._connect()
        old, self._old = self._old, []
        for ch in old:
            await ch.close(grace=5.0)

    async def close(self) -> None:
        chans = self._old + ([self._channel] if self._channel is not None else [])
        self._old, self._channel = [], None
        for ch in chans:
            await ch.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(target={self.target!r}, tls={self.tls is not None}, require_context={self.require_context})"

    # ------------------------------------------------------------------ calls

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        budget = self.timeout if timeout is None else timeout
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline of {budget} s passed after {attempt - 1} attempts")
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                err = error_from_rpc(e)
                err.attempts = attempt  # type: ignore[attr-defined]
                if not isinstance(err, RETRYABLE) or attempt >= self.retry.max_attempts:
                    raise err from e
                delay = self.retry.backoff(attempt)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise err from e
                await asyncio.sleep(delay)

    async def _batch(
        self,
        method: Callable[..., Any],
        wrap: Callable[[list[Any]], Any],
        requests: list[Any],
        parse: Callable[[Any, list[Result[Any]]], None],
        timeout: float | None,
    ) -> list[Result[Any]]:
        out: list[Result[Any]] = []
        for chunk in c.chunks(requests, self.batch.max_items, self.batch.max_bytes):
            resp = await self._call(method, wrap(chunk), timeout)
            if len(resp.results) != len(chunk):
                raise FieldkeyError(f"the sidecar answered {len(resp.results)} results for {len(chunk)} items")
            parse(resp, out)
        return out

    async def _column(
        self,
        method: Callable[..., Any],
        col: cc.Column,
        build: Callable[[int, int], Any],
        parse: Callable[[Any, int, int, list[Result[Any]]], None],
        timeout: float | None,
    ) -> list[Result[Any]]:
        out: list[Result[Any]] = []
        for s, e in col.ranges(self.batch.max_items, self.batch.max_bytes):
            parse(await self._call(method, build(s, e), timeout), s, e, out)
        return out

    # ------------------------------------------------------------------ encrypt / decrypt

    async def encrypt(
        self,
        tenant: str,
        field: str,
        value: str | bytes,
        *,
        subject: str | None = None,
        context: Context = None,
        timeout: float | None = None,
    ) -> bytes:
        """Encrypt one value (``str`` as UTF-8) to a binary envelope (for BYTEA/BLOB)."""
        req = c.encrypt_request(tenant, field, value, subject, context, False, self.require_context)
        return bytes((await self._call(self.crypto.Encrypt, req, timeout)).ciphertext)

    async def encrypt_text(
        self,
        tenant: str,
        field: str,
        value: str | bytes,
        *,
        subject: str | None = None,
        context: Context = None,
        timeout: float | None = None,
    ) -> str:
        """Encrypt one value to the text envelope ``fk1:...`` (for text columns)."""
        req = c.encrypt_request(tenant, field, value, subject, context, True, self.require_context)
        return str((await self._call(self.crypto.Encrypt, req, timeout)).ciphertext.decode("ascii"))

    @overload
    async def decrypt(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> bytes: ...
    @overload
    async def decrypt(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> Decrypted[bytes]: ...
    @overload
    async def decrypt(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: bool,
        timeout: float | None = ...,
    ) -> bytes | Decrypted[bytes]: ...
    async def decrypt(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = None,
        context: Context = None,
        repair: bool = False,
        timeout: float | None = None,
    ) -> bytes | Decrypted[bytes]:
        """Decrypt an envelope (binary or ``fk1:`` text) to bytes. Tenant, subject, field
        and context must be those it was encrypted with (else AuthenticationFailed).

        ``repair=True`` (read repair, docs/ROTATION.md): returns a :class:`Decrypted`
        that says whether the value is stale (under a decrypt-only key version) and,
        if so, carries it re-encrypted under the active version in ``repaired`` (in the
        input's form) for you to store in place of the value read. Needs the
        ``Crypto::Rewrap`` permission too (else PermissionDenied, for every call)."""
        req = c.decrypt_request(tenant, field, ciphertext, subject, context, self.require_context, None, repair)
        resp = await self._call(self.crypto.Decrypt, req, timeout)
        if not repair:
            return bytes(resp.plaintext)
        return c.decrypted(resp, bytes(resp.plaintext), isinstance(ciphertext, str))

    @overload
    async def decrypt_text(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> str: ...
    @overload
    async def decrypt_text(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> Decrypted[str]: ...
    @overload
    async def decrypt_text(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = ...,
        context: Context = ...,
        repair: bool,
        timeout: float | None = ...,
    ) -> str | Decrypted[str]: ...
    async def decrypt_text(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = None,
        context: Context = None,
        repair: bool = False,
        timeout: float | None = None,
    ) -> str | Decrypted[str]:
        """Decrypt to ``str`` (UTF-8; DecodeError if it is not); ``repair`` as for
        :meth:`decrypt` (a :class:`Decrypted` whose ``value`` is the ``str``)."""
        if not repair:
            return c.decode_text(
                await self.decrypt(tenant, field, ciphertext, subject=subject, context=context, timeout=timeout)
            )
        d = await self.decrypt(tenant, field, ciphertext, subject=subject, context=context, repair=True, timeout=timeout)
        return Decrypted(c.decode_text(d.value), d.key_version, d.stale, d.repaired, d.repaired_key_version)

    @overload
    async def encrypt_batch(
        self, items: Iterable[EncryptItem], *, text: Literal[False] = ..., timeout: float | None = ...
    ) -> list[Result[bytes]]: ...
    @overload
    async def encrypt_batch(
        self, items: Iterable[EncryptItem], *, text: Literal[True], timeout: float | None = ...
    ) -> list[Result[str]]: ...
    async def encrypt_batch(
        self, items: Iterable[EncryptItem], *, text: bool = False, timeout: float | None = None
    ) -> list[Result[Any]]:
        """Encrypt many values (EncryptBatch, split into requests as ``batch`` says).
        One :class:`Result` per item, in order; ``text=True`` gives ``fk1:`` strings."""
        return await self._batch(
            self.crypto.EncryptBatch,
            lambda ch: pb.EncryptBatchRequest(items=ch),
            c.encrypt_requests(items, text, self.require_context),
            lambda r, out: c.encrypt_results(r, text, out),
            timeout,
        )

    @overload
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: Literal[False] = ...,
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> list[Result[bytes]]: ...
    @overload
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: Literal[True],
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> list[Result[str]]: ...
    @overload
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: Literal[False] = ...,
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> list[Result[Decrypted[bytes]]]: ...
    @overload
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: Literal[True],
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> list[Result[Decrypted[str]]]: ...
    @overload
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: bool = ...,
        repair: bool = ...,
        timeout: float | None = ...,
    ) -> list[Result[Any]]: ...
    async def decrypt_batch(
        self,
        items: Iterable[DecryptItem],
        *,
        as_text: bool = False,
        repair: bool = False,
        timeout: float | None = None,
    ) -> list[Result[Any]]:
        """Decrypt many envelopes. One :class:`Result` per item, in order: a wrong,
        altered or shredded item has its exception in ``error`` and the others their
        plaintext. ``as_text=True`` decodes UTF-8 (a non-UTF-8 item gets DecodeError).
        ``repair=True``: read repair for every item, as :meth:`decrypt` (the values are
        :class:`Decrypted`; each ``repaired`` in its item's input form)."""
        todo = list(items)
        reqs = c.decrypt_requests(todo, self.require_context, repair)
        texts = [isinstance(it.ciphertext, str) for it in todo] if repair else None
        return await self._batch(
            self.crypto.DecryptBatch,
            lambda ch: pb.DecryptBatchRequest(items=ch),
            reqs,
            lambda r, out: c.decrypt_results(r, as_text, out, texts),
            timeout,
        )

    async def rewrap(
        self,
        tenant: str,
        field: str,
        ciphertext: str | bytes,
        *,
        subject: str | None = None,
        context: Context = None,
        timeout: float | None = None,
    ) -> Rewrapped:
        """Move an envelope to the tenant's active key version inside the sidecar (the
        plaintext never leaves it); same scope and context as :meth:`decrypt`. The result
        has the input's form (``str`` in, ``fk1:`` ``str`` out)."""
        req = c.rewrap_request(tenant, field, ciphertext, subject, context, self.require_context)
        return c.rewrapped(await self._call(self.crypto.Rewrap, req, timeout), isinstance(ciphertext, str))

    async def rewrap_batch(self, items: Iterable[RewrapItem], *, timeout: float | None = None) -> list[Result[Rewrapped]]:
        """Rewrap many envelopes; one :class:`Result` of :class:`Rewrapped` per item."""
        todo = list(items)
        reqs = c.rewrap_requests(todo, self.require_context)
        texts = [isinstance(it.ciphertext, str) for it in todo]
        return await self._batch(
            self.crypto.RewrapBatch,
            lambda ch: pb.RewrapBatchRequest(items=ch),
            reqs,
            lambda r, out: c.rewrap_results(r, texts, out),
            timeout,
        )

    # ------------------------------------------------------------------ columns

    @overload
    async def encrypt_column(
        self,
        tenant: str,
        field: str,
        values: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        text: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> list[Result[bytes]]: ...
    @overload
    async def encrypt_column(
        self,
        tenant: str,
        field: str,
        values: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        text: Literal[True],
        timeout: float | None = ...,
    ) -> list[Result[str]]: ...
    async def encrypt_column(
        self,
        tenant: str,
        field: str,
        values: Sequence[str | bytes],
        *,
        subject: str | None = None,
        subjects: Subjects = None,
        contexts: Contexts = None,
        text: bool = False,
        timeout: float | None = None,
    ) -> list[Result[Any]]:
        """Encrypt a column of values of one tenant and field (EncryptColumn, split into
        requests as ``batch`` says): ``subject`` for all values or ``subjects`` one per
        value (None: tenant-scoped), ``contexts`` one per value (required by default;
        ``fieldkey.UNBOUND``: all deliberately unbound). One :class:`Result` per value, in
        order, as :meth:`encrypt_batch` returns; a bad value fails alone."""
        col = cc.prepare("Encrypt", tenant, field, values, subject, subjects, contexts, self.require_context)
        return await self._column(
            self.crypto.EncryptColumn,
            col,
            lambda s, e: cc.encrypt_request(col, s, e, text),
            lambda r, s, e, out: cc.encrypt_results(r, e - s, text, out),
            timeout,
        )

    @overload
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        as_text: Literal[False] = ...,
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> list[Result[bytes]]: ...
    @overload
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        as_text: Literal[True],
        repair: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> list[Result[str]]: ...
    @overload
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        as_text: Literal[False] = ...,
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> list[Result[Decrypted[bytes]]]: ...
    @overload
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        as_text: Literal[True],
        repair: Literal[True],
        timeout: float | None = ...,
    ) -> list[Result[Decrypted[str]]]: ...
    @overload
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = ...,
        subjects: Subjects = ...,
        contexts: Contexts = ...,
        as_text: bool = ...,
        repair: bool = ...,
        timeout: float | None = ...,
    ) -> list[Result[Any]]: ...
    async def decrypt_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = None,
        subjects: Subjects = None,
        contexts: Contexts = None,
        as_text: bool = False,
        repair: bool = False,
        timeout: float | None = None,
    ) -> list[Result[Any]]:
        """Decrypt a column of envelopes (binary or ``fk1:`` text) of one tenant and
        field (DecryptColumn); scope as :meth:`encrypt_column`. One :class:`Result` per
        value, in order, as :meth:`decrypt_batch` returns. The sidecar authorizes the
        column once and counts all its values against the decrypt rate at once.
        ``repair=True``: read repair for every value, as :meth:`decrypt` (the values are
        :class:`Decrypted`); the column is refused whole without ``Crypto::Rewrap``."""
        cts = cc.sequence("ciphertexts", ciphertexts)
        col = cc.prepare("Decrypt", tenant, field, cts, subject, subjects, contexts, self.require_context, "ciphertext")
        texts = [isinstance(x, str) for x in cts] if repair else None
        return await self._column(
            self.crypto.DecryptColumn,
            col,
            lambda s, e: cc.decrypt_request(col, s, e, repair),
            lambda r, s, e, out: cc.decrypt_results(r, e - s, as_text, out, None if texts is None else texts[s:e]),
            timeout,
        )

    async def rewrap_column(
        self,
        tenant: str,
        field: str,
        ciphertexts: Sequence[str | bytes],
        *,
        subject: str | None = None,
        subjects: Subjects = None,
        contexts: Contexts = None,
        verify: bool = False,
        timeout: float | None = None,
    ) -> list[Result[Rewrapped]]:
        """Rewrap a column of envelopes (RewrapColumn); one :class:`Result` of
        :class:`Rewrapped` per value, each in its input's form. ``verify``: authenticate
        values already on the active version too (else returned unchecked)."""
        cts = cc.sequence("ciphertexts", ciphertexts)
        col = cc.prepare("Rewrap", tenant, field, cts, subject, subjects, contexts, self.require_context, "ciphertext")
        texts = [isinstance(x, str) for x in cts]
        return await self._column(
            self.crypto.RewrapColumn,
            col,
            lambda s, e: cc.rewrap_request(col, s, e, verify),
            lambda r, s, e, out: cc.rewrap_results(r, texts[s:e], out),
            timeout,
        )

    async def blind_index_column(
        self,
        tenant: str,
        field: str,
        values: Sequence[str | bytes],
        *,
        text: bool = False,
        lookup: bool = False,
        timeout: float | None = None,
    ) -> list[Result[BlindIndex]]:
        """Blind indexes of a column of values of one tenant and field
        (BlindIndexColumn); one :class:`Result` of :class:`BlindIndex` per value, as
        :meth:`blind_index_batch` returns."""
        col = cc.prepare("BlindIndex", tenant, field, values, None, None, c.UNBOUND, False)
        return await self._column(
            self.crypto.BlindIndexColumn,
            col,
            lambda s, e: cc.blind_index_request(col, s, e, text, lookup),
            lambda r, s, e, out: cc.blind_index_results(r, e - s, text, out),
            timeout,
        )

    # ------------------------------------------------------------------ blind indexes

    @overload
    async def blind_index(
        self, tenant: str, field: str, value: str | bytes, *, text: Literal[False] = ..., timeout: float | None = ...
    ) -> bytes: ...
    @overload
    async def blind_index(
        self, tenant: str, field: str, value: str | bytes, *, text: Literal[True], timeout: float | None = ...
    ) -> str: ...
    async def blind_index(
        self, tenant: str, field: str, value: str | bytes, *, text: bool = False, timeout: float | None = None
    ) -> bytes | str:
        """The blind index to store beside the ciphertext (``fkb1:`` text with text=True).
        The field needs a profile in the sidecar (else IndexNotConfigured)."""
        req = c.blind_index_request(tenant, field, value, text, False)
        return c.blind_index_value((await self._call(self.crypto.BlindIndex, req, timeout)), text).index

    @overload
    async def blind_index_lookup(
        self, tenant: str, field: str, value: str | bytes, *, text: Literal[False] = ..., timeout: float | None = ...
    ) -> list[bytes]: ...
    @overload
    async def blind_index_lookup(
        self, tenant: str, field: str, value: str | bytes, *, text: Literal[True], timeout: float | None = ...
    ) -> list[str]: ...
    async def blind_index_lookup(
        self, tenant: str, field: str, value: str | bytes, *, text: bool = False, timeout: float | None = None
    ) -> list[bytes] | list[str]:
        """Every index value to match when searching (one per usable key version,
        active first: 2 between a rotation and the old version's retirement)."""
        req = c.blind_index_request(tenant, field, value, text, True)
        return list(c.blind_index_value((await self._call(self.crypto.BlindIndex, req, timeout)), text).lookup)  # type: ignore[return-value]

    async def blind_index_batch(
        self,
        items: Iterable[BlindIndexItem],
        *,
        text: bool = False,
        lookup: bool = False,
        timeout: float | None = None,
    ) -> list[Result[BlindIndex]]:
        """Blind indexes of many values; one :class:`Result` of :class:`BlindIndex` per item."""
        return await self._batch(
            self.crypto.BlindIndexBatch,
            lambda ch: pb.BlindIndexBatchRequest(items=ch),
            c.blind_index_requests(items, text, lookup),
            lambda r, out: c.blind_index_results(r, text, out),
            timeout,
        )

    # ------------------------------------------------------------------ pseudonyms

    async def pseudonymize(self, tenant: str, subject: str, purpose: str, *, timeout: float | None = None) -> str:
        """A stable pseudonymous id (32 hex digits) of a subject for a purpose."""
        req = c.pseudonymize_request(tenant, subject, purpose)
        return str((await self._call(self.crypto.Pseudonymize, req, timeout)).pseudonym)

    async def pseudonymize_batch(
        self, items: Iterable[PseudonymizeItem], *, timeout: float | None = None
    ) -> list[Result[str]]:
        """Pseudonyms of many subjects; one :class:`Result` per item."""
        return await self._batch(
            self.crypto.PseudonymizeBatch,
            lambda ch: pb.PseudonymizeBatchRequest(items=ch),
            c.pseudonymize_requests(items),
            c.pseudonymize_results,
            timeout,
        )

    # ------------------------------------------------------------------ administration

    async def create_tenant(self, tenant: str, *, kms_key_id: str = "", timeout: float | None = None) -> Any:
        """Create a tenant (idempotent); returns the ``fieldkey.v1.Tenant`` message."""
        return (await self._call(self.keys.CreateTenant, pb.CreateTenantRequest(tenant_id=tenant, kms_key_id=kms_key_id), timeout))

    async def get_tenant(self, tenant: str, *, timeout: float | None = None) -> Any:
        return (await self._call(self.keys.GetTenant, pb.GetTenantRequest(tenant_id=tenant), timeout))

    async def rotate_tenant_key(self, tenant: str, *, timeout: float | None = None) -> Any:
        return (await self._call(self.keys.RotateTenantKey, pb.RotateTenantKeyRequest(tenant_id=tenant), timeout))

    async def roll_epoch(self, *, finish_only: bool = False, timeout: float | None = None) -> Any:
        """Start a key epoch roll in the sidecar; returns the ``EpochStatus``."""
        return await self._call(self.keys.RollEpoch, pb.RollEpochRequest(finish_only=finish_only), timeout)

    async def epoch_status(self, *, timeout: float | None = None) -> Any:
        """Key epochs and the restorable backup horizon (``EpochStatus``)."""
        return await self._call(self.keys.GetEpochStatus, pb.GetEpochStatusRequest(), timeout)

    async def who_am_i(self, *, timeout: float | None = None) -> tuple[str, str]:
        """(identity, transport) as the sidecar sees this client."""
        r = (await self._call(self.keys.WhoAmI, pb.WhoAmIRequest(), timeout))
        return str(r.identity), str(r.transport)

    async def shred_subject(
        self, tenant: str, subject: str, *, grace_seconds: int = 0, timeout: float | None = None
    ) -> Any:
        """Crypto-shred a subject (now, or after a grace period); returns the ``Erasure``."""
        req = pb.ShredSubjectRequest(tenant_id=tenant, subject_id=subject, grace_seconds=grace_seconds)
        return (await self._call(self.erasures.ShredSubject, req, timeout))

    async def suspend_subject(self, tenant: str, subject: str | None = None, *, timeout: float | None = None) -> Any:
        """Restrict processing of a subject (or the whole tenant with subject=None)."""
        req = pb.RestrictionRequest(tenant_id=tenant, subject_id=subject or "")
        return (await self._call(self.erasures.SuspendSubject, req, timeout))

    async def resume_subject(self, tenant: str, subject: str | None = None, *, timeout: float | None = None) -> Any:
        req = pb.RestrictionRequest(tenant_id=tenant, subject_id=subject or "")
        return (await self._call(self.erasures.ResumeSubject, req, timeout))
