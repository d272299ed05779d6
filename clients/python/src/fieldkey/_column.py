"""What the sync and the asyncio client share for the columnar calls (EncryptColumn,
DecryptColumn, RewrapColumn, BlindIndexColumn): checking and converting a column's
lists, splitting it under :class:`~fieldkey.BatchLimits`, building each request from
slices of the lists (no protobuf message per value: the lists go straight into the
repeated fields), and turning each reply into one :class:`~fieldkey.Result` per value.
No I/O here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, Union

from ._core import (
    _BINARY,
    _TEXT,
    UNBOUND,
    BlindIndex,
    Context,
    Decrypted,
    Result,
    Rewrapped,
    Unbound,
    _bytes,
    _id,
    _subject,
    check_context,
    context_bytes,
    repaired_form,
)
from .errors import ColumnMismatch, ContextRequired, DecodeError, FieldkeyError, error_from_item
from .v1 import fieldkey_pb2 as pb

#: One record context per value, or :data:`~fieldkey.UNBOUND` (every value deliberately
#: unbound), or None (none given: refused by a client with ``require_context``).
Contexts = Union[Sequence[Context], Unbound, None]
#: One subject per value (None or ``""``: that value is tenant-scoped), or None.
Subjects = Union[Sequence[Union[str, None]], None]

#: Per-value protobuf overhead assumed when splitting a column (tag and length of each
#: list entry).
_VALUE_OVERHEAD: Final = 8

# Result is a frozen dataclass: its generated __init__ sets each slot through
# object.__setattr__, which costs about twice what the slot descriptors do. The
# successful results of a column (the hot path: thousands per call) are made with the
# descriptors; the object is the same as Result(value, None, key_version).
_new = object.__new__
_SET_VALUE: Final = vars(Result)["value"].__set__
_SET_ERROR: Final = vars(Result)["error"].__set__
_SET_VERSION: Final = vars(Result)["key_version"].__set__


class Column:
    """A checked column: tenant and field, the subject of all values or one per value,
    the contexts (empty: none) and the values, as the requests' fields take them."""

    __slots__ = ("tenant", "field", "subject", "subjects", "contexts", "values", "n")

    def __init__(
        self, tenant: str, field: str, subject: str, subjects: list[str], contexts: list[bytes], values: list[bytes]
    ) -> None:
        self.tenant = tenant
        self.field = field
        self.subject = subject
        self.subjects = subjects
        self.contexts = contexts
        self.values = values
        self.n = len(values)

    def ranges(self, max_items: int, max_bytes: int) -> list[tuple[int, int]]:
        """Consecutive runs of at most ``max_items`` values and about ``max_bytes`` of
        payload (a value larger than that goes alone; the sidecar judges it)."""
        n = self.n
        if n == 0:
            return []
        lists: list[Sequence[Any]] = [self.values]
        if self.contexts:
            lists.append(self.contexts)
        if self.subjects:
            lists.append(self.subjects)
        total = n * _VALUE_OVERHEAD + sum(sum(map(len, xs)) for xs in lists)
        if n <= max_items and total <= max_bytes:
            return [(0, n)]
        out: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, sizes in enumerate(zip(*(map(len, xs) for xs in lists))):
            s = _VALUE_OVERHEAD + sum(sizes)
            if i > start and (i - start >= max_items or size + s > max_bytes):
                out.append((start, i))
                start, size = i, 0
            size += s
        out.append((start, n))
        return out

    def fields(self, s: int, e: int) -> dict[str, Any]:
        """The request fields every columnar request has, for values ``s..e``."""
        whole = s == 0 and e == self.n
        kw: dict[str, Any] = {"tenant_id": self.tenant, "field": self.field, "subject_id": self.subject}
        if self.subjects:
            kw["subject_ids"] = self.subjects if whole else self.subjects[s:e]
        if self.contexts:
            kw["contexts"] = self.contexts if whole else self.contexts[s:e]
        return kw

    def slice(self, s: int, e: int) -> list[bytes]:
        return self.values if s == 0 and e == self.n else self.values[s:e]


def sequence(what: str, xs: Iterable[Any]) -> Sequence[Any]:
    if isinstance(xs, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a sequence with one entry per value, not {type(xs).__name__}")
    return xs if isinstance(xs, (list, tuple)) else list(xs)


def _values(what: str, values: Iterable[str | bytes]) -> list[bytes]:
    seq = sequence(what + "s", values)
    try:
        return [v if type(v) is bytes else v.encode() if type(v) is str else _bytes(what, v) for v in seq]
    except TypeError:
        for i, v in enumerate(seq):
            try:
                _bytes(what, v)
            except TypeError as e:
                raise TypeError(f"column value {i}: {e}") from None
        raise


def _subjects(subject: str | None, subjects: Subjects, n: int) -> tuple[str, list[str]]:
    """(subject_id, subject_ids): one subject for all (subject_ids empty) or one each."""
    if subjects is None:
        return _subject(subject), []
    if subject is not None:
        raise ColumnMismatch(
            "give subject= (one subject for every value) or subjects= (one per value), not both",
            reason="COLUMN_MISMATCH",
        )
    seq = sequence("subjects", subjects)
    if len(seq) != n:
        raise ColumnMismatch(
            f"subjects has {len(seq)} entries for {n} values (give one per value)", reason="COLUMN_MISMATCH"
        )
    subs = ["" if s is None else s for s in seq]
    if not set(map(type, subs)) <= {str}:
        for i, s in enumerate(subs):
            if not isinstance(s, str):
                raise TypeError(f"column value {i}: subject must be str or None, not {type(s).__name__}")
        subs = [str(s) for s in subs]
    first = subs[0] if n else ""
    if subs.count(first) == n:
        return first, []  # the same subject for all: sent once
    return "", subs


def _contexts(op: str, tenant: str, field: str, contexts: Contexts, n: int, require: bool) -> list[bytes]:
    """One context per value, or ``[]`` when no value has one."""
    if contexts is UNBOUND:
        return []
    if contexts is None:
        if require and n:
            raise ContextRequired(
                f"column: {op} of field {field!r} (tenant {tenant!r}) without contexts: pass contexts= "
                "(one row id per value) to bind the values to their rows, or construct the client with "
                "require_context=False (or pass contexts=fieldkey.UNBOUND) for deliberately unbound values",
                reason="CONTEXT_REQUIRED",
            )
        return []
    seq = sequence("contexts", contexts)
    if len(seq) != n:
        raise ColumnMismatch(
            f"contexts has {len(seq)} entries for {n} values (give one per value)", reason="COLUMN_MISMATCH"
        )
    # the common types inline (a function call per value costs more than the conversion)
    out = [
        c
        if type(c) is bytes
        else c.encode()
        if type(c) is str
        else str(c).encode()
        if type(c) is int
        else context_bytes(c)
        for c in seq
    ]
    if not all(out):
        if require:
            for i, (c, raw) in enumerate(zip(out, seq)):
                if not c:
                    check_context(op, tenant, field, raw, i, "column value")
        if not any(out):
            return []
    return out


def prepare(
    op: str,
    tenant: str,
    field: str,
    values: Iterable[str | bytes],
    subject: str | None,
    subjects: Subjects,
    contexts: Contexts,
    require: bool,
    what: str = "value",
) -> Column:
    """A column checked whole (types, list lengths, contexts) before anything is sent."""
    t, f = _id("tenant", tenant), _id("field", field)
    vals = _values(what, values)
    n = len(vals)
    sub, subs = _subjects(subject, subjects, n)
    return Column(t, f, sub, subs, _contexts(op, t, f, contexts, n, require), vals)


# --------------------------------------------------------------------------- requests


def encrypt_request(col: Column, s: int, e: int, text: bool) -> Any:
    return pb.EncryptColumnRequest(plaintexts=col.slice(s, e), format=_TEXT if text else _BINARY, **col.fields(s, e))


def decrypt_request(col: Column, s: int, e: int, repair: bool = False) -> Any:
    return pb.DecryptColumnRequest(ciphertexts=col.slice(s, e), repair=repair, **col.fields(s, e))


def rewrap_request(col: Column, s: int, e: int, verify: bool) -> Any:
    return pb.RewrapColumnRequest(ciphertexts=col.slice(s, e), verify=verify, **col.fields(s, e))


def blind_index_request(col: Column, s: int, e: int, text: bool, lookup: bool) -> Any:
    return pb.BlindIndexColumnRequest(
        tenant_id=col.tenant,
        field=col.field,
        values=col.slice(s, e),
        format=pb.INDEX_FORMAT_TEXT if text else pb.INDEX_FORMAT_BINARY,
        lookup=lookup,
    )


# --------------------------------------------------------------------------- results


def _errors(resp: Any, n: int) -> dict[int, FieldkeyError]:
    out: dict[int, FieldkeyError] = {}
    for ce in resp.errors:
        if ce.index >= n:
            raise FieldkeyError(f"the sidecar reported an error for value {ce.index} of {n}")
        e = ce.error
        out[ce.index] = error_from_item(e.code, e.reason, e.message)
    return out


def _check(what: str, got: int, n: int) -> None:
    if got != n:
        raise FieldkeyError(f"the sidecar answered {got} {what} for {n} values")


def _ok(values: Iterable[Any], version: int, out: list[Result[Any]]) -> None:
    append = out.append
    for v in values:
        r = _new(Result)
        _SET_VALUE(r, v)
        _SET_ERROR(r, None)
        _SET_VERSION(r, version)
        append(r)


def _ok_versions(values: Iterable[Any], versions: Iterable[int], out: list[Result[Any]]) -> None:
    append = out.append
    for v, k in zip(values, versions):
        r = _new(Result)
        _SET_VALUE(r, v)
        _SET_ERROR(r, None)
        _SET_VERSION(r, k)
        append(r)


def _failed(errors: dict[int, FieldkeyError], base: int, out: list[Result[Any]]) -> None:
    for i, err in errors.items():
        out[base + i] = Result(None, err)


def encrypt_results(resp: Any, n: int, text: bool, out: list[Result[Any]]) -> None:
    cts = list(resp.ciphertexts)
    _check("ciphertexts", len(cts), n)
    errors = _errors(resp, n)
    base = len(out)
    _ok([c.decode("ascii") for c in cts] if text else cts, resp.key_version, out)
    _failed(errors, base, out)


def decrypt_results(
    resp: Any, n: int, as_text: bool, out: list[Result[Any]], texts: Sequence[bool] | None = None
) -> None:
    """``texts`` (a call with repair): for each value of this request, whether its input
    was ``str``; the values are then :class:`~fieldkey.Decrypted`."""
    pts = list(resp.plaintexts)
    versions = list(resp.key_versions)
    _check("plaintexts", len(pts), n)
    _check("key versions", len(versions), n)
    errors = _errors(resp, n)
    base = len(out)
    if texts is not None:
        _repaired_results(resp, pts, versions, as_text, texts, out)
        _failed(errors, base, out)
        return
    if not as_text:
        _ok_versions(pts, versions, out)
    else:
        try:
            _ok_versions([p.decode("utf-8") for p in pts], versions, out)
        except UnicodeDecodeError:
            del out[base:]
            for p, k in zip(pts, versions):
                try:
                    out.append(Result(p.decode("utf-8"), None, k))
                except UnicodeDecodeError:
                    out.append(Result(None, DecodeError("the decrypted value is not valid UTF-8 text"), k))
    _failed(errors, base, out)


def _repaired_results(
    resp: Any, pts: list[bytes], versions: list[int], as_text: bool, texts: Sequence[bool], out: list[Result[Any]]
) -> None:
    """The values of a DecryptColumn with repair, as :class:`~fieldkey.Decrypted`."""
    n = len(texts)
    stale = list(resp.stale)
    fixed = list(resp.repaired_ciphertexts)
    _check("stale flags", len(stale), n)
    _check("repaired ciphertexts", len(fixed), n)
    to = resp.repaired_key_version
    for p, k, st, ct, text in zip(pts, versions, stale, fixed, texts):
        value: Any = p
        if as_text:
            try:
                value = p.decode("utf-8")
            except UnicodeDecodeError:
                out.append(Result(None, DecodeError("the decrypted value is not valid UTF-8 text"), k))
                continue
        repaired = repaired_form(ct, text)
        out.append(Result(Decrypted(value, k, bool(st), repaired, to if repaired is not None else 0), None, k))


def rewrap_results(resp: Any, texts: Sequence[bool], out: list[Result[Any]]) -> None:
    """``texts``: for each value of this request, whether its input was ``str``."""
    n = len(texts)
    cts, tos, froms = list(resp.ciphertexts), list(resp.key_versions), list(resp.previous_key_versions)
    _check("ciphertexts", len(cts), n)
    _check("key versions", len(tos), n)
    _check("previous key versions", len(froms), n)
    errors = _errors(resp, n)
    base = len(out)
    for ct, to, frm, text in zip(cts, tos, froms, texts):
        out.append(Result(Rewrapped(ct.decode("ascii") if text else ct, to, frm, to != frm), None, to))
    _failed(errors, base, out)


def blind_index_results(resp: Any, n: int, text: bool, out: list[Result[Any]]) -> None:
    idx = list(resp.indexes)
    _check("indexes", len(idx), n)
    errors = _errors(resp, n)
    k = len(resp.lookup_key_versions)
    look = list(resp.lookup_indexes)
    _check("lookup indexes", len(look), n * k)
    if text:
        idx = [x.decode("ascii") for x in idx]
        look = [x.decode("ascii") for x in look]
    version = resp.key_version
    base = len(out)
    if k:
        _ok((BlindIndex(x, version, tuple(look[i * k : i * k + k])) for i, x in enumerate(idx)), version, out)
    else:
        _ok((BlindIndex(x, version) for x in idx), version, out)
    _failed(errors, base, out)
