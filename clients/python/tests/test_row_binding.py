"""Row binding (issue 19, finding 6): the client requires a context by default and
refuses locally (nothing sent); ``require_context=False`` and ``fieldkey.UNBOUND`` send
unbound values, which a sidecar with ``[row_binding] required`` still refuses; a value
bound to one row fails authentication in another."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import pytest

import fieldkey
from conftest import AsyncCallCounter, CallCounter, new_tenant
from fieldkey import BlindIndexItem, DecryptItem, EncryptItem, PseudonymizeItem, RewrapItem
from sidecar import Sidecar

# Every way of leaving a value without a context: None and empty text or bytes.
MISSING: list[Any] = [None, "", b""]


def _refused(e: pytest.ExceptionInfo[fieldkey.ContextRequired]) -> None:
    err = e.value
    assert isinstance(err, fieldkey.InvalidArgument) and err.reason == "CONTEXT_REQUIRED"
    msg = str(err)
    assert "context=" in msg and "require_context=False" in msg


def _ops(fk: fieldkey.Client, t: str, ctx: Any, ct: str) -> dict[str, Callable[[], object]]:
    """Each encrypt/decrypt form with ``ctx`` (batches: one bad item among good ones)."""
    return {
        "encrypt": lambda: fk.encrypt(t, "email", "v", context=ctx),
        "encrypt_text": lambda: fk.encrypt_text(t, "email", "v", context=ctx),
        "decrypt": lambda: fk.decrypt(t, "email", ct, context=ctx),
        "decrypt_text": lambda: fk.decrypt_text(t, "email", ct, context=ctx),
        "encrypt_batch": lambda: fk.encrypt_batch(
            [EncryptItem(t, "email", "a", context=1), EncryptItem(t, "email", "b", context=ctx)]
        ),
        "encrypt_batch text": lambda: fk.encrypt_batch(
            [EncryptItem(t, "email", "a", context=1), EncryptItem(t, "email", "b", context=ctx)], text=True
        ),
        "decrypt_batch": lambda: fk.decrypt_batch(
            [DecryptItem(t, "email", ct, context=1), DecryptItem(t, "email", ct, context=ctx)]
        ),
        "decrypt_batch as_text": lambda: fk.decrypt_batch(
            [DecryptItem(t, "email", ct, context=1), DecryptItem(t, "email", ct, context=ctx)], as_text=True
        ),
        "rewrap": lambda: fk.rewrap(t, "email", ct, context=ctx),
        "rewrap_batch": lambda: fk.rewrap_batch(
            [RewrapItem(t, "email", ct, context=1), RewrapItem(t, "email", ct, context=ctx)]
        ),
    }


def test_the_default_refuses_a_missing_context_before_sending(
    fk: fieldkey.Client, tenant: str, calls: collections.Counter[str]
) -> None:
    assert fk.require_context is True
    ct = fk.encrypt_text(tenant, "email", "v", context=1)
    for ctx in MISSING:
        for name, op in _ops(fk, tenant, ctx, ct).items():
            calls.clear()
            with pytest.raises(fieldkey.ContextRequired) as e:
                op()
            _refused(e)
            assert sum(calls.values()) == 0, f"{name} with context={ctx!r} sent {dict(calls)}"
            if "batch" in name:
                assert str(e.value).startswith("CONTEXT_REQUIRED: batch item 1: "), name
    # a batch is refused whole even when the bad item comes after a chunk boundary
    small = CallCounter()
    with fieldkey.Client(fk.target, interceptors=[small], batch=fieldkey.BatchLimits(max_items=2)) as c:
        items = [EncryptItem(tenant, "email", "x", context=i + 1) for i in range(5)] + [EncryptItem(tenant, "email", "y")]
        with pytest.raises(fieldkey.ContextRequired, match="batch item 5: "):
            c.encrypt_batch(items)
        assert sum(small.calls.values()) == 0
        assert len(c.encrypt_batch(items[:5])) == 5 and small.calls["EncryptBatch"] == 3
    # the value (plaintext) is never in the message
    with pytest.raises(fieldkey.ContextRequired) as e2:
        fk.encrypt(tenant, "email", "secret-plaintext@example.com")
    assert "secret-plaintext" not in str(e2.value) and "email" in str(e2.value)


def test_blind_indexes_and_pseudonyms_take_no_context(
    fk: fieldkey.Client, tenant: str, calls: collections.Counter[str]
) -> None:
    calls.clear()
    assert fk.blind_index(tenant, "email", "a@b.c", text=True).startswith("fkb1:")
    assert len(fk.blind_index_lookup(tenant, "email", "a@b.c")) == 1
    assert fk.blind_index_batch([BlindIndexItem(tenant, "email", "a@b.c")])[0].ok
    assert len(fk.pseudonymize(tenant, "u1", "analytics")) == 32
    assert fk.pseudonymize_batch([PseudonymizeItem(tenant, "u1", "analytics")])[0].ok
    assert sum(calls.values()) == 5


def test_require_context_false_and_unbound_send_and_the_sidecar_accepts(
    fk: fieldkey.Client, sidecar: Sidecar, tenant: str, calls: collections.Counter[str], counter: CallCounter
) -> None:
    # the session sidecar lists no field in [row_binding] required
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], require_context=False) as c:
        assert "require_context=False" in repr(c)
        calls.clear()
        ct = c.encrypt_text(tenant, "email", "unbound@example.com")
        assert calls["Encrypt"] == 1
        assert c.decrypt_text(tenant, "email", ct, context="") == "unbound@example.com"
        blob = c.encrypt(tenant, "email", b"raw")
        assert c.decrypt(tenant, "email", blob) == b"raw"
        res = c.encrypt_batch([EncryptItem(tenant, "email", f"v{i}") for i in range(3)], text=True)
        dec = c.decrypt_batch([DecryptItem(tenant, "email", r.unwrap()) for r in res], as_text=True)
        assert [d.unwrap() for d in dec] == ["v0", "v1", "v2"]
    # fieldkey.UNBOUND: one deliberately unbound value on a client that requires a context
    calls.clear()
    ct2 = fk.encrypt_text(tenant, "email", "shared", context=fieldkey.UNBOUND)
    assert calls["Encrypt"] == 1 and repr(fieldkey.UNBOUND) == "fieldkey.UNBOUND"
    assert fk.decrypt_text(tenant, "email", ct2, context=fieldkey.UNBOUND) == "shared"
    assert fk.decrypt_text(tenant, "email", ct, context=fieldkey.UNBOUND) == "unbound@example.com"
    res2 = fk.decrypt_batch([DecryptItem(tenant, "email", ct2, context=fieldkey.UNBOUND)], as_text=True)
    assert res2[0].unwrap() == "shared"
    # a value encrypted without a context does not decrypt with one, and the reverse
    with pytest.raises(fieldkey.AuthenticationFailed):
        fk.decrypt_text(tenant, "email", ct2, context=1)


@pytest.mark.asyncio
async def test_async_client_refuses_a_missing_context_before_sending(sidecar: Sidecar, fk: fieldkey.Client) -> None:
    counter = AsyncCallCounter()
    t = new_tenant(fk)
    ct = fk.encrypt_text(t, "email", "v", context=1)
    async with fieldkey.AsyncClient(sidecar.tcp, interceptors=[counter]) as c:
        assert c.require_context is True
        for ctx in MISSING:
            ops = [
                lambda: c.encrypt(t, "email", "v", context=ctx),
                lambda: c.encrypt_text(t, "email", "v", context=ctx),
                lambda: c.decrypt(t, "email", ct, context=ctx),
                lambda: c.decrypt_text(t, "email", ct, context=ctx),
                lambda: c.encrypt_batch([EncryptItem(t, "email", "a", context=1), EncryptItem(t, "email", "b", context=ctx)]),
                lambda: c.encrypt_batch(
                    [EncryptItem(t, "email", "a", context=1), EncryptItem(t, "email", "b", context=ctx)], text=True
                ),
                lambda: c.decrypt_batch([DecryptItem(t, "email", ct, context=1), DecryptItem(t, "email", ct, context=ctx)]),
                lambda: c.decrypt_batch(
                    [DecryptItem(t, "email", ct, context=1), DecryptItem(t, "email", ct, context=ctx)], as_text=True
                ),
                lambda: c.rewrap(t, "email", ct, context=ctx),
                lambda: c.rewrap_batch([RewrapItem(t, "email", ct, context=1), RewrapItem(t, "email", ct, context=ctx)]),
            ]
            for op in ops:
                with pytest.raises(fieldkey.ContextRequired) as e:
                    await op()  # type: ignore[misc]
                _refused(e)
        assert sum(counter.calls.values()) == 0
        assert await c.decrypt_text(t, "email", ct, context=1) == "v"
        assert await c.blind_index(t, "email", "a@b.c", text=True)
    counter.calls.clear()
    async with fieldkey.AsyncClient(sidecar.tcp, interceptors=[counter], require_context=False) as u:
        assert await u.decrypt_text(t, "email", await u.encrypt_text(t, "email", "w")) == "w"
        assert counter.calls["Encrypt"] == 1 and counter.calls["Decrypt"] == 1


# ------------------------------------------------------------------ a sidecar requiring it


def test_a_sidecar_requiring_the_context_refuses_even_an_opted_out_client(bound_sidecar: Sidecar) -> None:
    counter = CallCounter()
    with fieldkey.Client(bound_sidecar.tcp, interceptors=[counter], require_context=False, timeout=20.0) as c:
        t = new_tenant(c)
        counter.reset()
        # the client sends it (opted out) and the sidecar refuses: INVALID_ARGUMENT/CONTEXT_REQUIRED
        with pytest.raises(fieldkey.ContextRequired) as e:
            c.encrypt_text(t, "email", "alice@example.com")
        assert counter.calls["Encrypt"] == 1
        assert e.value.reason == "CONTEXT_REQUIRED" and e.value.code is not None
        assert e.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(fieldkey.ContextRequired):
            c.encrypt(t, "email", b"alice@example.com", context=fieldkey.UNBOUND)
        res = c.encrypt_batch([EncryptItem(t, "email", "a", context=1), EncryptItem(t, "email", "b")])
        assert res[0].ok and isinstance(res[1].error, fieldkey.ContextRequired)
        # Decrypt without a context is refused as well (whatever the envelope)
        victim = c.encrypt_text(t, "email", "victim@example.com", context=1001)
        with pytest.raises(fieldkey.ContextRequired):
            c.decrypt_text(t, "email", victim)
        dres = c.decrypt_batch([DecryptItem(t, "email", victim, context=1001), DecryptItem(t, "email", victim)])
        assert dres[0].unwrap() == b"victim@example.com" and isinstance(dres[1].error, fieldkey.ContextRequired)
        counter.reset()
        with pytest.raises(fieldkey.ContextRequired):
            c.rewrap(t, "email", victim)
        assert counter.calls["Rewrap"] == 1
        rres = c.rewrap_batch([RewrapItem(t, "email", victim, context=1001), RewrapItem(t, "email", victim)])
        assert rres[0].ok and isinstance(rres[1].error, fieldkey.ContextRequired)
        # a field the sidecar does not list stays optional
        note = c.encrypt_text(t, "note", "unbound note")
        assert c.decrypt_text(t, "note", note) == "unbound note"

        # the row swap: an attacker copies their own encrypted email (row 2002) into the
        # victim's row (1001); read as the victim's row, it fails authentication
        attacker = c.encrypt_text(t, "email", "attacker@example.com", context=2002)
        assert c.decrypt_text(t, "email", attacker, context=2002) == "attacker@example.com"
        with pytest.raises(fieldkey.AuthenticationFailed) as e2:
            c.decrypt_text(t, "email", attacker, context=1001)
        assert "attacker" not in str(e2.value)
        swapped = c.decrypt_batch([DecryptItem(t, "email", attacker, context=1001)], as_text=True)
        assert isinstance(swapped[0].error, fieldkey.AuthenticationFailed)
        # nor can a rewrap launder it into the victim's row. On the active version the
        # sidecar may return it as it was (review finding 5: not authenticated), still bound
        # to row 2002; after a rotation the rewrap must decrypt it, and fails.
        try:
            same = c.rewrap(t, "email", attacker, context=1001)
        except fieldkey.AuthenticationFailed:
            pass
        else:
            assert not same.changed
            with pytest.raises(fieldkey.AuthenticationFailed):
                c.decrypt_text(t, "email", same.ciphertext, context=1001)
        c.rotate_tenant_key(t)
        with pytest.raises(fieldkey.AuthenticationFailed):
            c.rewrap(t, "email", attacker, context=1001)
    # the default client refuses the same call without sending it
    with fieldkey.Client(bound_sidecar.tcp, interceptors=[counter]) as d:
        counter.reset()
        with pytest.raises(fieldkey.ContextRequired):
            d.encrypt_text(t, "email", "alice@example.com")
        assert sum(counter.calls.values()) == 0


def test_rewrap_moves_a_bound_value_to_the_active_version(fk: fieldkey.Client, tenant: str) -> None:
    text = fk.encrypt_text(tenant, "email", "r@example.com", subject="u", context=5)
    blob = fk.encrypt(tenant, "email", b"blob", context=6)
    same = fk.rewrap(tenant, "email", text, subject="u", context=5)
    assert same == fieldkey.Rewrapped(text, 1, 1, False)
    fk.rotate_tenant_key(tenant)
    r = fk.rewrap(tenant, "email", text, subject="u", context=5)
    assert isinstance(r.ciphertext, str) and r.ciphertext.startswith("fk1:") and r.ciphertext != text
    assert (r.key_version, r.previous_key_version, r.changed) == (2, 1, True)
    assert fk.decrypt_text(tenant, "email", r.ciphertext, subject="u", context=5) == "r@example.com"
    res = fk.rewrap_batch(
        [
            RewrapItem(tenant, "email", blob, context=6),
            RewrapItem(tenant, "email", r.ciphertext, subject="u", context=5),
            RewrapItem(tenant, "email", blob, context=7),  # another row: fails alone
        ]
    )
    b = res[0].unwrap()
    assert isinstance(b.ciphertext, bytes) and b.changed and res[0].key_version == 2
    assert fk.decrypt(tenant, "email", b.ciphertext, context=6) == b"blob"
    assert res[1].unwrap().changed is False and res[1].unwrap().ciphertext == r.ciphertext
    assert isinstance(res[2].error, fieldkey.AuthenticationFailed)
