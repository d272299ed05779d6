"""The values of one page, save or backfill batch sent per (tenant, field).

A (tenant, field) group of at least ``FIELDKEY["COLUMN_MIN_VALUES"]`` values (32 by
default) goes as one columnar call (EncryptColumn, DecryptColumn, BlindIndexColumn:
split only past the client's batch limits); the smaller groups go together in one item
batch (EncryptBatch, ...), which costs one round trip where several small columns would
cost one each. ``None`` sends everything as item batches (the behaviour before the
columnar calls). Results come back in the caller's order, each value's error as the
item batches give it: the two forms return the same results.

A sidecar without the columnar calls (older than the client) answers UNIMPLEMENTED:
that group and every later one of the same client go as item batches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core import BlindIndex, BlindIndexItem, Context, DecryptItem, EncryptItem, Result
from ..errors import FieldkeyError
from .conf import column_min_values

__all__ = ["blind_index", "decrypt", "encrypt"]

#: (tenant, field, value or ciphertext, subject or None, context)
Value = tuple[str, str, str, "str | None", Context]

#: Clients whose sidecar answered UNIMPLEMENTED to a columnar call.
_NO_COLUMNS: weakref.WeakSet[Any] = weakref.WeakSet()


def _grouped(
    client: Any,
    keys: Sequence[tuple[str, str]],
    column: Callable[[str, str, list[int]], list[Result[Any]]],
    batch: Callable[[list[int]], list[Result[Any]]],
) -> list[Result[Any]]:
    """One result per key's value, in order: each large group by ``column``, the rest
    (and groups refused as UNIMPLEMENTED) in one ``batch``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out: list[Result[Any] | None] = [None] * len(keys)
    least = column_min_values()
    rest: list[int] = []
    for (tenant, field), idx in groups.items():
        if least is None or len(idx) < least or client in _NO_COLUMNS:
            rest.extend(idx)
            continue
        try:
            res = column(tenant, field, idx)
        except FieldkeyError as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            _NO_COLUMNS.add(client)
            rest.extend(idx)
            continue
        for i, r in zip(idx, res):
            out[i] = r
    if rest:
        rest.sort()
        for i, r in zip(rest, batch(rest)):
            out[i] = r
    return out  # type: ignore[return-value]


def encrypt(client: Any, values: Sequence[Value]) -> list[Result[str]]:
    """Text envelopes of ``values`` (EncryptColumn per large group)."""
    return _grouped(
        client,
        [(v[0], v[1]) for v in values],
        lambda t, f, idx: client.encrypt_column(
            t,
            f,
            [values[i][2] for i in idx],
            subjects=[values[i][3] for i in idx],
            contexts=[values[i][4] for i in idx],
            text=True,
        ),
        lambda idx: client.encrypt_batch([EncryptItem(*values[i]) for i in idx], text=True),
    )


def decrypt(client: Any, values: Sequence[Value], *, repair: bool = False) -> list[Result[Any]]:
    """Plaintexts (``str``) of the envelopes in ``values`` (DecryptColumn per large
    group); with ``repair``, :class:`~fieldkey.Decrypted` of ``str`` (read repair)."""
    return _grouped(
        client,
        [(v[0], v[1]) for v in values],
        lambda t, f, idx: client.decrypt_column(
            t,
            f,
            [values[i][2] for i in idx],
            subjects=[values[i][3] for i in idx],
            contexts=[values[i][4] for i in idx],
            as_text=True,
            repair=repair,
        ),
        lambda idx: client.decrypt_batch([DecryptItem(*values[i]) for i in idx], as_text=True, repair=repair),
    )


def blind_index(
    client: Any, values: Sequence[tuple[str, str, str | bytes]], *, lookup: bool = False
) -> list[Result[BlindIndex]]:
    """Text blind indexes of ``(tenant, field, value)`` (BlindIndexColumn per large group)."""
    return _grouped(
        client,
        [(v[0], v[1]) for v in values],
        lambda t, f, idx: client.blind_index_column(t, f, [values[i][2] for i in idx], text=True, lookup=lookup),
        lambda idx: client.blind_index_batch([BlindIndexItem(*values[i]) for i in idx], text=True, lookup=lookup),
    )
