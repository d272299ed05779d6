"""Read repair (docs/ROTATION.md) through the sync and asyncio clients against a real
sidecar: ``repair=True`` on decrypt, decrypt_text, decrypt_batch and decrypt_column
gives :class:`fieldkey.Decrypted` values that say whether a value is stale and carry it
re-encrypted under the active version, in the input's form, bound as before."""

from __future__ import annotations

import pytest

import fieldkey
from fieldkey import Decrypted, DecryptItem
from conftest import AsyncCallCounter, new_tenant
from sidecar import Sidecar


def test_decrypt_with_repair_returns_the_value_under_the_active_version(fk: fieldkey.Client, tenant: str) -> None:
    text = fk.encrypt_text(tenant, "email", "alice@example.com", subject="u1", context=7)
    blob = fk.encrypt(tenant, "photo", b"\x00\xff", context=b"row-1")
    fk.rotate_tenant_key(tenant)
    # without repair: the plain value, as before
    assert fk.decrypt_text(tenant, "email", text, subject="u1", context=7) == "alice@example.com"
    assert fk.decrypt(tenant, "photo", blob, context=b"row-1") == b"\x00\xff"

    d = fk.decrypt_text(tenant, "email", text, subject="u1", context=7, repair=True)
    assert isinstance(d, Decrypted)
    assert (d.value, d.key_version, d.stale, d.repaired_key_version) == ("alice@example.com", 1, True, 2)
    assert isinstance(d.repaired, str) and d.repaired.startswith("fk1:"), "a str input gets a str back"
    again = fk.decrypt_text(tenant, "email", d.repaired, subject="u1", context=7, repair=True)
    assert (again.value, again.key_version, again.stale, again.repaired) == ("alice@example.com", 2, False, None)
    # bound as the value it replaces
    for wrong in (dict(subject="u1", context=8), dict(subject="u2", context=7)):
        fk.encrypt(tenant, "email", "x", subject="u2", context=7)  # u2 has a key
        with pytest.raises(fieldkey.AuthenticationFailed):
            fk.decrypt_text(tenant, "email", d.repaired, **wrong)  # type: ignore[arg-type]

    b = fk.decrypt(tenant, "photo", blob, context=b"row-1", repair=True)
    assert b.value == b"\x00\xff" and b.stale
    assert isinstance(b.repaired, bytes) and b.repaired[:3] == b"fk\x01", "a bytes input gets bytes back"
    assert fk.decrypt(tenant, "photo", b.repaired, context=b"row-1") == b"\x00\xff"


def test_batch_and_column_repair_per_value_in_order(fk: fieldkey.Client, tenant: str) -> None:
    old = [fk.encrypt_text(tenant, "email", f"v{i}", subject=f"s{i % 2}", context=i) for i in range(4)]
    fk.rotate_tenant_key(tenant)
    new = fk.encrypt_text(tenant, "email", "v4", subject="s0", context=4)
    cts: list[str | bytes] = [*old, new, "fk1:garbage"]
    cts[1] = fk.decrypt_text(tenant, "email", old[1], subject="s1", context=1, repair=True).repaired or ""
    cts[3] = old[3].encode()  # bytes of the text form: repaired comes back as bytes
    subjects = [f"s{i % 2}" for i in range(6)]
    expect_stale = [True, False, True, True, False]

    batch = fk.decrypt_batch(
        [DecryptItem(tenant, "email", ct, subject=s, context=i) for i, (ct, s) in enumerate(zip(cts, subjects))],
        as_text=True,
        repair=True,
    )
    column = fk.decrypt_column(tenant, "email", cts, subjects=subjects, contexts=range(6), as_text=True, repair=True)
    # a column split into several requests keeps each value's input form
    small = fieldkey.Client(fk.target, batch=fieldkey.BatchLimits(max_items=2))
    split = small.decrypt_column(tenant, "email", cts, subjects=subjects, contexts=range(6), as_text=True, repair=True)
    small.close()
    for got in (batch, column, split):
        assert isinstance(got[5].error, fieldkey.MalformedCiphertext)
        values = [r.unwrap() for r in got[:5]]
        assert [v.value for v in values] == [f"v{i}" for i in range(5)]
        assert [v.stale for v in values] == expect_stale
        assert [v.key_version for v in values] == [1, 2, 1, 1, 2]
        for i, v in enumerate(values):
            if not v.stale:
                assert v.repaired is None and v.repaired_key_version == 0
                continue
            assert v.repaired_key_version == 2
            assert isinstance(v.repaired, bytes if i == 3 else str)
            assert fk.decrypt_text(tenant, "email", v.repaired, subject=subjects[i], context=i) == f"v{i}"
    # bytes values without as_text
    raw = fk.decrypt_column(tenant, "email", cts[:1], subjects=subjects[:1], contexts=[0], repair=True)
    assert raw[0].unwrap().value == b"v0"


@pytest.mark.asyncio
async def test_async_client_repairs_too(sidecar: Sidecar, fk: fieldkey.Client) -> None:
    t = new_tenant(fk)
    ct = fk.encrypt_text(t, "email", "a@x.org", subject="u", context=1)
    fk.rotate_tenant_key(t)
    async with fieldkey.AsyncClient(sidecar.tcp, interceptors=[AsyncCallCounter()]) as c:
        d = await c.decrypt_text(t, "email", ct, subject="u", context=1, repair=True)
        assert d.value == "a@x.org" and d.stale and isinstance(d.repaired, str)
        assert await c.decrypt_text(t, "email", d.repaired, subject="u", context=1) == "a@x.org"
        b = await c.decrypt(t, "email", ct.encode(), subject="u", context=1, repair=True)
        assert b.value == b"a@x.org" and isinstance(b.repaired, bytes)
        batch = await c.decrypt_batch([DecryptItem(t, "email", ct, subject="u", context=1)], repair=True)
        assert batch[0].unwrap().stale and isinstance(batch[0].unwrap().repaired, str)
        col = await c.decrypt_column(t, "email", [ct, d.repaired], subject="u", contexts=[1, 1], as_text=True, repair=True)
        assert [r.unwrap().stale for r in col] == [True, False]
        assert col[1].unwrap().repaired is None


def test_a_repaired_ciphertext_that_is_not_text_is_a_client_error() -> None:
    """A malformed answer (a repaired text-form ciphertext that is not ASCII) is the
    client's error for a bad sidecar answer, not a stray UnicodeDecodeError; in binary
    form the bytes are returned as they are."""
    from fieldkey._core import decrypt_results, decrypted
    from fieldkey.v1 import fieldkey_pb2 as pb

    ok = pb.DecryptResponse(
        plaintext=b"v", key_version=1, stale=True, repaired_ciphertext=b"fk1:\xff", repaired_key_version=2
    )
    with pytest.raises(fieldkey.FieldkeyError, match="not ASCII") as e:
        decrypted(ok, "v", True)
    assert not isinstance(e.value, UnicodeDecodeError)
    assert decrypted(ok, b"v", False).repaired == b"fk1:\xff"
    batch = pb.DecryptBatchResponse(results=[pb.DecryptResult(ok=ok)])
    with pytest.raises(fieldkey.FieldkeyError, match="not ASCII"):
        decrypt_results(batch, True, [], texts=[True])
