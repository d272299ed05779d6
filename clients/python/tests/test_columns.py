"""The columnar calls (encrypt_column, decrypt_column, rewrap_column,
blind_index_column) of the sync and asyncio clients against the real sidecar: round
trips with per-value subjects and contexts, a bad value failing alone at its index with
its named error, COLUMN_MISMATCH, chunking, and agreement with the item batches."""

from __future__ import annotations

import collections

import grpc
import pytest

import fieldkey
from conftest import AsyncCallCounter, CallCounter, new_tenant
from fieldkey import BlindIndexItem, DecryptItem, EncryptItem, Result
from fieldkey.errors import error_from_rpc
from fieldkey.v1 import fieldkey_pb2 as pb
from sidecar import Sidecar


def subject(i: int) -> str | None:
    """Every third value tenant-scoped, the others over five subjects."""
    return None if i % 3 == 0 else f"s{i % 5}"


def test_round_trip_with_per_value_subjects_and_contexts(
    fk: fieldkey.Client, tenant: str, calls: collections.Counter[str]
) -> None:
    values = [f"user{i}@example.com" for i in range(60)]
    subjects = [subject(i) for i in range(60)]
    calls.clear()
    enc = fk.encrypt_column(tenant, "email", values, subjects=subjects, contexts=list(range(60)), text=True)
    assert dict(calls) == {"EncryptColumn": 1}
    cts = fieldkey.unwrap_all(enc)
    assert len(cts) == 60 and all(c.startswith("fk1:") for c in cts)
    assert all(isinstance(r, Result) and r.key_version == 1 for r in enc)
    # each value is bound to its own subject and row: the single call agrees
    for i in (0, 1, 2, 59):
        assert fk.decrypt_text(tenant, "email", cts[i], subject=subjects[i], context=i) == values[i]
    calls.clear()
    dec = fk.decrypt_column(tenant, "email", cts, subjects=subjects, contexts=list(range(60)), as_text=True)
    assert dict(calls) == {"DecryptColumn": 1}
    assert [r.unwrap() for r in dec] == values and all(r.key_version == 1 for r in dec)
    # the same results as the item batch, Result for Result
    batch = fk.decrypt_batch(
        [DecryptItem(tenant, "email", c, subjects[i], i) for i, c in enumerate(cts)], as_text=True
    )
    assert dec == batch
    # and the reverse: batch-encrypted values decrypt as a column; bytes out by default
    benc = fk.encrypt_batch([EncryptItem(tenant, "email", v, subjects[i], i) for i, v in enumerate(values)])
    bdec = fk.decrypt_column(tenant, "email", [r.unwrap() for r in benc], subjects=subjects, contexts=range(60))
    assert [r.unwrap() for r in bdec] == [v.encode() for v in values]
    # one subject for every value, binary form, bytes and str values and contexts
    raw = fk.encrypt_column(tenant, "photo", [b"\x00\xff", "Zoë 😀", b""], subject="u1", contexts=[b"r1", "r2", 3])
    blobs = [r.unwrap() for r in raw]
    assert all(isinstance(b, bytes) and b[:3] == b"fk\x01" for b in blobs)
    assert fk.decrypt(tenant, "photo", blobs[1], subject="u1", context="r2") == "Zoë 😀".encode()
    back = fk.decrypt_column(tenant, "photo", blobs, subject="u1", contexts=[b"r1", b"r2", b"3"], as_text=False)
    assert [r.unwrap() for r in back] == [b"\x00\xff", "Zoë 😀".encode(), b""]
    # the same subject in every entry of subjects is the same as subject=
    same = fk.decrypt_column(tenant, "photo", blobs, subjects=["u1"] * 3, contexts=[b"r1", b"r2", b"3"])
    assert same == back
    # an empty column sends nothing
    calls.clear()
    assert fk.encrypt_column(tenant, "email", [], contexts=[]) == []
    assert fk.decrypt_column(tenant, "email", [], contexts=[]) == [] and sum(calls.values()) == 0


def test_a_bad_value_fails_alone_at_its_index_with_its_named_error(fk: fieldkey.Client, tenant: str) -> None:
    n = 40
    subjects = [subject(i) for i in range(n)]
    enc0 = fk.encrypt_column(tenant, "email", [f"v{i}" for i in range(n)], subjects=subjects, contexts=range(n), text=True)
    cts: list[str | bytes] = [r.unwrap() for r in enc0]
    contexts: list[object] = list(range(n))
    t3 = str(cts[3])
    cts[3] = t3[:-2] + ("A" if t3[-2] != "A" else "B") + t3[-1]  # tampered
    cts[7] = b"not an envelope"
    contexts[10] = 999  # another row
    subjects[13] = "never-seen"  # a subject without a key
    subjects[16] = None  # a subject-scoped value asked for as tenant-scoped
    cts[19] = fk.encrypt(tenant, "email", "erased", subject="gone", context=19)
    subjects[19] = "gone"
    fk.shred_subject(tenant, "gone")
    res = fk.decrypt_column(tenant, "email", cts, subjects=subjects, contexts=contexts, as_text=True)  # type: ignore[arg-type]
    bad = {3: fieldkey.AuthenticationFailed, 7: fieldkey.MalformedCiphertext, 10: fieldkey.AuthenticationFailed,
           13: fieldkey.SubjectNotFound, 16: fieldkey.ScopeMismatch, 19: fieldkey.KeyDestroyed}
    assert len(res) == n
    for i, r in enumerate(res):
        if i in bad:
            assert type(r.error) is bad[i], (i, r.error)
            assert r.value is None and r.key_version == 0 and not r.ok
        else:
            assert r.value == f"v{i}" and r.ok
    with pytest.raises(fieldkey.BatchError) as e:
        fieldkey.unwrap_all(res)
    assert sorted(e.value.errors) == sorted(bad)
    # the item batch stores the same errors for the same values
    batch = fk.decrypt_batch([DecryptItem(tenant, "email", c, subjects[i], contexts[i]) for i, c in enumerate(cts)], as_text=True)  # type: ignore[arg-type]
    assert [(type(r.error), r.value) for r in batch] == [(type(r.error), r.value) for r in res]
    # encrypt: a value over limits.max_field_bytes and a bad subject id fail alone
    big = b"x" * ((1 << 20) + 1)
    enc = fk.encrypt_column(tenant, "doc", [b"a", big, b"c", b"d"], subjects=["u", "u", "has space", None], contexts=[1, 2, 3, 4])
    assert [type(r.error) for r in enc] == [type(None), fieldkey.ValueTooLarge, fieldkey.InvalidArgument, type(None)]
    assert fk.decrypt(tenant, "doc", enc[3].unwrap(), context=4) == b"d"
    # a non-UTF-8 value asked for as text fails alone with DecodeError and its version
    raw = fk.encrypt_column(tenant, "blob", [b"\xff\xfe", b"ok"], contexts=[1, 2])
    mixed = fk.decrypt_column(tenant, "blob", [r.unwrap() for r in raw], contexts=[1, 2], as_text=True)
    assert isinstance(mixed[0].error, fieldkey.DecodeError) and mixed[0].key_version == 1 and mixed[1].value == "ok"
    # a refusal of the whole column (no such tenant) is every value's error, as in a batch
    res2 = fk.decrypt_column("no-such-tenant", "email", cts[:3], subjects=subjects[:3], contexts=contexts[:3])  # type: ignore[arg-type]
    assert [type(r.error) for r in res2] == [fieldkey.TenantNotFound] * 3


def test_column_mismatch_is_an_invalid_argument_refused_whole(
    fk: fieldkey.Client, tenant: str, sidecar: Sidecar, calls: collections.Counter[str]
) -> None:
    calls.clear()
    # lists given to the client that do not line up: refused before sending
    cases = [
        lambda: fk.encrypt_column(tenant, "email", ["a", "b"], contexts=[1]),
        lambda: fk.decrypt_column(tenant, "email", ["a", "b"], subjects=["u"], contexts=[1, 2]),
        lambda: fk.rewrap_column(tenant, "email", ["a"], subject="u", subjects=["u"], contexts=[1]),
    ]
    for op in cases:
        with pytest.raises(fieldkey.ColumnMismatch) as e:
            op()
        assert isinstance(e.value, fieldkey.InvalidArgument) and isinstance(e.value, ValueError)
        assert e.value.reason == "COLUMN_MISMATCH" and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(calls.values()) == 0
    # the sidecar's refusal (a request built by hand) maps to the same class
    reqs = [
        (fk.crypto.EncryptColumn, pb.EncryptColumnRequest(tenant_id=tenant, field="email", contexts=[b"1"], plaintexts=[b"a", b"b"])),
        (fk.crypto.DecryptColumn, pb.DecryptColumnRequest(tenant_id=tenant, field="email", subject_ids=["u"], ciphertexts=[b"a", b"b"])),
        (fk.crypto.RewrapColumn, pb.RewrapColumnRequest(tenant_id=tenant, field="email", subject_id="u", subject_ids=["u"], ciphertexts=[b"a"])),
    ]
    for method, req in reqs:
        with pytest.raises(grpc.RpcError) as rpc:
            method(req)
        err = error_from_rpc(rpc.value)
        assert type(err) is fieldkey.ColumnMismatch and err.reason == "COLUMN_MISMATCH"
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(fieldkey.ColumnMismatch):  # through the client's call path too
            fk._call(method, req, None)
    # over the sidecar's limits.max_batch_items (10,000): BATCH_TOO_LARGE, whole
    with fieldkey.Client(sidecar.tcp, batch=fieldkey.BatchLimits(max_items=20_000, max_bytes=1 << 30)) as c:
        with pytest.raises(fieldkey.BatchTooLarge):
            c.encrypt_column(tenant, "f", ["x"] * 10_001, contexts=fieldkey.UNBOUND)
    # the default limits split the same column instead
    assert len(fk.encrypt_column(tenant, "f", ["x"] * 10_001, contexts=fieldkey.UNBOUND)) == 10_001


def test_a_column_larger_than_the_limits_is_chunked_in_order(
    fk: fieldkey.Client, tenant: str, sidecar: Sidecar, counter: CallCounter
) -> None:
    n = 2500
    values = [f"v{i}" for i in range(n)]
    subjects = [subject(i) for i in range(n)]
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_items=1000)) as c:
        counter.reset()
        enc = c.encrypt_column(tenant, "email", values, subjects=subjects, contexts=range(n))
        assert dict(counter.calls) == {"EncryptColumn": 3}
        cts = [r.unwrap() for r in enc]
        assert [len(x) for x in cts] == [49 + len(v) for v in values]
        # a bad value in the second and one in the third request: errors at their index
        cts[1500] = b"garbage"
        ctx = list(range(n))
        ctx[2400] = -1
        counter.reset()
        dec = c.decrypt_column(tenant, "email", cts, subjects=subjects, contexts=ctx, as_text=True)
        assert dict(counter.calls) == {"DecryptColumn": 3}
        assert isinstance(dec[1500].error, fieldkey.MalformedCiphertext)
        assert isinstance(dec[2400].error, fieldkey.AuthenticationFailed)
        assert [r.value for i, r in enumerate(dec) if i not in (1500, 2400)] == [
            v for i, v in enumerate(values) if i not in (1500, 2400)
        ]
    # by bytes: 20 values of 100 KiB with a 512 KiB budget -> 5 per request
    big = [bytes([i]) * 100 * 1024 for i in range(20)]
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_bytes=512 * 1024)) as c:
        counter.reset()
        res = c.encrypt_column(tenant, "doc", big, contexts=range(20))
        assert dict(counter.calls) == {"EncryptColumn": 4}
        back = c.decrypt_column(tenant, "doc", [r.unwrap() for r in res], contexts=range(20))
        assert [r.unwrap() for r in back] == big


def test_require_context_applies_to_every_value(
    fk: fieldkey.Client, tenant: str, sidecar: Sidecar, calls: collections.Counter[str], counter: CallCounter
) -> None:
    ct = fk.encrypt_text(tenant, "email", "v", context=1)
    calls.clear()
    ops = {
        "encrypt_column": lambda ctx: fk.encrypt_column(tenant, "email", ["a", "b"], contexts=ctx),
        "decrypt_column": lambda ctx: fk.decrypt_column(tenant, "email", [ct, ct], contexts=ctx),
        "rewrap_column": lambda ctx: fk.rewrap_column(tenant, "email", [ct, ct], contexts=ctx),
    }
    for name, op in ops.items():
        with pytest.raises(fieldkey.ContextRequired) as e:
            op(None)
        assert "contexts=" in str(e.value) and "require_context=False" in str(e.value), name
        for missing in (None, "", b""):
            with pytest.raises(fieldkey.ContextRequired, match="column value 1: "):
                op([1, missing])
    assert sum(calls.values()) == 0
    # UNBOUND for one value or for the whole column sends no context for it
    both = fk.encrypt_column(tenant, "email", ["a", "b"], contexts=[1, fieldkey.UNBOUND], text=True)
    assert fk.decrypt_text(tenant, "email", both[1].unwrap(), context=fieldkey.UNBOUND) == "b"
    assert fk.decrypt_text(tenant, "email", both[0].unwrap(), context=1) == "a"
    none = fk.encrypt_column(tenant, "email", ["c"], contexts=fieldkey.UNBOUND, text=True)
    assert fk.decrypt_column(tenant, "email", [none[0].unwrap()], contexts=fieldkey.UNBOUND)[0].unwrap() == b"c"
    # a client that opted out sends a column without contexts
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], require_context=False) as c:
        counter.reset()
        u = c.encrypt_column(tenant, "email", ["x", "y"], text=True)
        assert [r.unwrap() for r in c.decrypt_column(tenant, "email", [r.unwrap() for r in u], as_text=True)] == ["x", "y"]
        assert dict(counter.calls) == {"EncryptColumn": 1, "DecryptColumn": 1}
    # blind indexes take no context; wrong Python types are TypeErrors naming the value
    assert fk.blind_index_column(tenant, "email", ["a@b.c"])[0].ok
    with pytest.raises(TypeError, match="column value 1: value must be str or bytes"):
        fk.encrypt_column(tenant, "email", ["a", 1], contexts=[1, 2])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not str"):
        fk.encrypt_column(tenant, "email", "abc", contexts=[1, 2, 3])
    with pytest.raises(TypeError, match="column value 0: subject must be str"):
        fk.encrypt_column(tenant, "email", ["a", "b"], subjects=[1, "x"], contexts=[1, 2])  # type: ignore[list-item]


def test_rewrap_column_moves_old_values_each_in_its_form(fk: fieldkey.Client, tenant: str) -> None:
    text = fk.encrypt_column(tenant, "email", ["t0", "t1"], subjects=["u", None], contexts=[1, 2], text=True)
    blob = fk.encrypt_column(tenant, "email", ["b0"], contexts=[3])
    cts: list[str | bytes] = [text[0].unwrap(), text[1].unwrap(), blob[0].unwrap()]
    same = fk.rewrap_column(tenant, "email", cts, subjects=["u", None, None], contexts=[1, 2, 3])
    assert [r.unwrap() for r in same] == [fieldkey.Rewrapped(c, 1, 1, False) for c in cts]
    fk.rotate_tenant_key(tenant)
    cts.append(cts[2])
    moved = fk.rewrap_column(tenant, "email", cts, subjects=["u", None, None, None], contexts=[1, 2, 3, 4])
    for i in range(3):
        r = moved[i].unwrap()
        assert (r.key_version, r.previous_key_version, r.changed, moved[i].key_version) == (2, 1, True, 2)
        assert type(r.ciphertext) is type(cts[i]) and r.ciphertext != cts[i]
    assert isinstance(moved[3].error, fieldkey.AuthenticationFailed)  # another row: fails alone
    assert fk.decrypt_text(tenant, "email", moved[0].unwrap().ciphertext, subject="u", context=1) == "t0"
    assert fk.decrypt(tenant, "email", moved[2].unwrap().ciphertext, context=3) == b"b0"
    # verify: a current value in the wrong row fails instead of passing unchecked
    current = moved[2].unwrap().ciphertext
    unchecked = fk.rewrap_column(tenant, "email", [current], contexts=[99])
    assert unchecked[0].unwrap().changed is False
    checked = fk.rewrap_column(tenant, "email", [current, current], contexts=[99, 3], verify=True)
    assert isinstance(checked[0].error, fieldkey.AuthenticationFailed) and checked[1].ok


def test_blind_index_column_matches_the_item_batch(fk: fieldkey.Client, tenant: str) -> None:
    values = [f" User{i}@Example.COM " for i in range(50)]
    col = fk.blind_index_column(tenant, "email", values, text=True)
    batch = fk.blind_index_batch([BlindIndexItem(tenant, "email", v) for v in values], text=True)
    assert col == batch and col[0].unwrap().index == fk.blind_index(tenant, "email", "user0@example.com", text=True)
    raw = fk.blind_index_column(tenant, "email", [b"user0@example.com"])
    assert isinstance(raw[0].unwrap().index, bytes) and raw[0].unwrap().index[0] == 0xB1
    fk.rotate_tenant_key(tenant)
    look = fk.blind_index_column(tenant, "email", values[:3] + [b"x" * ((1 << 20) + 1)], text=True, lookup=True)
    for i in range(3):
        bi = look[i].unwrap()
        assert bi.key_version == 2 and len(bi.lookup) == 2 and bi.lookup[1] == col[i].unwrap().index
        assert bi.lookup[0] == bi.index
    assert isinstance(look[3].error, fieldkey.ValueTooLarge)
    assert look[:3] == fk.blind_index_batch([BlindIndexItem(tenant, "email", v) for v in values[:3]], text=True, lookup=True)
    res = fk.blind_index_column(tenant, "unconfigured", ["a", "b"])
    assert [type(r.error) for r in res] == [fieldkey.IndexNotConfigured] * 2


@pytest.mark.asyncio
async def test_async_client_columns(sidecar: Sidecar, fk: fieldkey.Client) -> None:
    counter = AsyncCallCounter()
    t = new_tenant(fk)
    n = 250
    values = [f"a{i}" for i in range(n)]
    subjects = [subject(i) for i in range(n)]
    async with fieldkey.AsyncClient(sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_items=100)) as c:
        enc = await c.encrypt_column(t, "email", values, subjects=subjects, contexts=range(n), text=True)
        assert counter.calls["EncryptColumn"] == 3
        cts = [r.unwrap() for r in enc]
        cts[150] = "fk1:garbage"
        dec = await c.decrypt_column(t, "email", cts, subjects=subjects, contexts=range(n), as_text=True)
        assert counter.calls["DecryptColumn"] == 3
        assert isinstance(dec[150].error, fieldkey.MalformedCiphertext)
        assert [r.value for i, r in enumerate(dec) if i != 150] == [v for i, v in enumerate(values) if i != 150]
        # the sync client reads what the async one wrote
        assert fk.decrypt_text(t, "email", cts[1], subject=subjects[1], context=1) == "a1"
        await c.rotate_tenant_key(t)
        rw = await c.rewrap_column(t, "email", cts[:2], subjects=subjects[:2], contexts=[0, 1])
        assert [r.unwrap().changed for r in rw] == [True, True] and isinstance(rw[0].unwrap().ciphertext, str)
        bi = await c.blind_index_column(t, "email", ["x@y.z", "X@Y.Z"], text=True, lookup=True)
        assert bi[0] == bi[1] and len(bi[0].unwrap().lookup) == 2
        with pytest.raises(fieldkey.ContextRequired):
            await c.decrypt_column(t, "email", cts[:1])
        with pytest.raises(fieldkey.ColumnMismatch):
            await c.encrypt_column(t, "email", ["a"], contexts=[1, 2])
