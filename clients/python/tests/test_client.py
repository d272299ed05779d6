"""The sync client against a real sidecar: round trips, forms, batches and chunking,
blind indexes, pseudonyms, and the mapping of every kind of failure to its exception."""

from __future__ import annotations

import base64
import re

import pytest

import fieldkey
from fieldkey import BlindIndexItem, DecryptItem, EncryptItem, PseudonymizeItem
from conftest import new_tenant


def test_round_trip_text_and_binary_forms(fk: fieldkey.Client, tenant: str) -> None:
    ct = fk.encrypt_text(tenant, "email", "alice@example.com", subject="u1", context=42)
    assert ct.startswith("fk1:") and "alice" not in ct
    assert fk.decrypt_text(tenant, "email", ct, subject="u1", context=42) == "alice@example.com"
    # int context 42 is the text "42"
    assert fk.decrypt_text(tenant, "email", ct, subject="u1", context="42") == "alice@example.com"

    blob = fk.encrypt(tenant, "photo", b"\x00\xff binary", context=b"row-1")
    assert blob[:3] == b"fk\x01" and len(blob) == 49 + len(b"\x00\xff binary")
    assert fk.decrypt(tenant, "photo", blob, context=b"row-1") == b"\x00\xff binary"
    # the text form of the same envelope decrypts too
    text = "fk1:" + base64.urlsafe_b64encode(blob).decode().rstrip("=")
    assert fk.decrypt(tenant, "photo", text, context=b"row-1") == b"\x00\xff binary"
    # unicode and the empty string
    ct = fk.encrypt_text(tenant, "name", "Zoë 😀", context=1)
    assert fk.decrypt_text(tenant, "name", ct, context=1) == "Zoë 😀"
    assert fk.decrypt_text(tenant, "name", fk.encrypt_text(tenant, "name", "", context=1), context=1) == ""


def test_ciphertext_is_bound_to_tenant_subject_field_and_context(fk: fieldkey.Client, tenant: str) -> None:
    other = new_tenant(fk)
    ct = fk.encrypt_text(tenant, "email", "bob@example.com", subject="u1", context=7)
    # give the subjects keys, so that only the binding can fail
    fk.encrypt(other, "email", "x", subject="u1", context=7)
    fk.encrypt(tenant, "email", "x", subject="u2", context=7)
    with pytest.raises(fieldkey.SubjectNotFound):
        fk.decrypt_text(tenant, "email", ct, subject="never-seen", context=7)
    wrong = [
        dict(tenant=other, field="email", subject="u1", context=7),
        dict(tenant=tenant, field="phone", subject="u1", context=7),
        dict(tenant=tenant, field="email", subject="u2", context=7),
        dict(tenant=tenant, field="email", subject="u1", context=8),
    ]
    for w in wrong:
        with pytest.raises(fieldkey.AuthenticationFailed) as e:
            fk.decrypt_text(w.pop("tenant"), w.pop("field"), ct, **w)  # type: ignore[arg-type]
        assert e.value.reason == "AUTHENTICATION_FAILED"
        assert e.value.code is not None and e.value.code.name == "DATA_LOSS"
        assert "bob" not in str(e.value)
    with pytest.raises(fieldkey.ScopeMismatch):
        fk.decrypt_text(tenant, "email", ct, context=7)
    with pytest.raises(fieldkey.TenantNotFound) as e2:
        fk.decrypt_text("no-such-tenant", "email", ct, subject="u1", context=7)
    assert isinstance(e2.value, fieldkey.NotFound)


def test_tampered_and_malformed_ciphertexts(fk: fieldkey.Client, tenant: str) -> None:
    blob = bytearray(fk.encrypt(tenant, "email", b"carol@example.com", context=1))
    blob[40] ^= 0x01  # a ciphertext byte
    with pytest.raises(fieldkey.AuthenticationFailed):
        fk.decrypt(tenant, "email", bytes(blob), context=1)
    blob[40] ^= 0x01
    blob[10] ^= 0x80  # the nonce, inside the header
    with pytest.raises(fieldkey.AuthenticationFailed):
        fk.decrypt(tenant, "email", bytes(blob), context=1)
    for bad in ("not an envelope", "fk1:!!!", b"fk\x01\x01"):
        with pytest.raises(fieldkey.MalformedCiphertext) as e:
            fk.decrypt(tenant, "email", bad, context=1)
        assert isinstance(e.value, fieldkey.InvalidArgument) and isinstance(e.value, ValueError)


def test_bad_arguments_raise_named_exceptions(fk: fieldkey.Client, tenant: str) -> None:
    with pytest.raises(fieldkey.InvalidArgument):
        fk.encrypt(tenant, "", "x", context=1)  # empty field
    with pytest.raises(fieldkey.InvalidArgument):
        fk.encrypt(tenant, "email", "x", subject="has space", context=1)
    with pytest.raises(fieldkey.InvalidArgument):
        fk.encrypt(tenant, "email", "x", context=b"c" * 1025)
    with pytest.raises(TypeError, match="value must be str or bytes"):
        fk.encrypt(tenant, "email", 12, context=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch item 1 must be a fieldkey.EncryptItem"):
        fk.encrypt_batch([EncryptItem(tenant, "email", "a", context=1), ("tuple",)])  # type: ignore[list-item]
    with pytest.raises(fieldkey.ConfigurationError):
        fieldkey.Client("unix://relative/path")
    with pytest.raises(fieldkey.ConfigurationError, match="cannot read the TLS root CA"):
        fieldkey.Client("127.0.0.1:1", tls=fieldkey.TlsConfig("/nonexistent/ca.pem", b"", b""))


def test_batch_results_one_per_item_and_a_bad_item_fails_alone(
    fk: fieldkey.Client, tenant: str, calls: dict[str, int]
) -> None:
    values = [f"user{i}@example.com" for i in range(50)]
    enc = fk.encrypt_batch(
        [EncryptItem(tenant, "email", v, subject=f"s{i}", context=i) for i, v in enumerate(values)], text=True
    )
    assert calls["EncryptBatch"] == 1 and calls.get("Encrypt", 0) == 0
    cts = fieldkey.unwrap_all(enc)
    assert all(c.startswith("fk1:") for c in cts) and all(r.key_version == 1 for r in enc)
    items = [DecryptItem(tenant, "email", c, subject=f"s{i}", context=i) for i, c in enumerate(cts)]
    items[3] = DecryptItem(tenant, "email", cts[3], subject="s3", context=999)  # wrong row
    items[7] = DecryptItem(tenant, "email", "garbage", subject="s7", context=7)
    items[9] = DecryptItem("no-such-tenant", "email", cts[9], subject="s9", context=9)
    res = fk.decrypt_batch(items, as_text=True)
    assert len(res) == 50
    assert isinstance(res[3].error, fieldkey.AuthenticationFailed)
    assert isinstance(res[7].error, fieldkey.MalformedCiphertext)
    assert isinstance(res[9].error, fieldkey.TenantNotFound)
    assert [r.value for i, r in enumerate(res) if i not in (3, 7, 9)] == [
        v for i, v in enumerate(values) if i not in (3, 7, 9)
    ]
    assert not res[3].ok and res[0].ok
    with pytest.raises(fieldkey.AuthenticationFailed):
        res[3].unwrap()
    with pytest.raises(fieldkey.BatchError) as e:
        fieldkey.unwrap_all(res)
    assert sorted(e.value.errors) == [3, 7, 9]
    assert "3 of 50 batch items failed" in str(e.value)
    # a non-UTF-8 plaintext asked for as text fails alone too
    raw = fk.encrypt(tenant, "blob", b"\xff\xfe", context=1)
    mixed = fk.decrypt_batch([DecryptItem(tenant, "blob", raw, context=1), DecryptItem(tenant, "email", cts[0], "s0", 0)], as_text=True)
    assert isinstance(mixed[0].error, fieldkey.DecodeError) and mixed[1].value == values[0]


def test_large_batches_are_chunked_by_items_and_bytes(fk: fieldkey.Client, tenant: str, sidecar, counter) -> None:  # type: ignore[no-untyped-def]
    items = [EncryptItem(tenant, "email", f"v{i}", context=i) for i in range(2500)]
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_items=1000)) as c:
        counter.reset()
        res = c.encrypt_batch(items)
        assert counter.calls["EncryptBatch"] == 3
        assert [len(r.unwrap()) for r in res] == [49 + len(f"v{i}") for i in range(2500)]
        dec = c.decrypt_batch([DecryptItem(tenant, "email", r.unwrap(), context=i) for i, r in enumerate(res)])
        assert counter.calls["DecryptBatch"] == 3
        assert [d.unwrap() for d in dec] == [f"v{i}".encode() for i in range(2500)]
    # by bytes: 20 values of 100 KiB with a 512 KiB budget -> 5 per request
    big = [EncryptItem(tenant, "doc", bytes([i]) * 100 * 1024, context=i) for i in range(20)]
    with fieldkey.Client(
        sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_bytes=512 * 1024)
    ) as c:
        counter.reset()
        res = c.encrypt_batch(big)
        assert counter.calls["EncryptBatch"] == 4
        assert all(r.ok for r in res)


def test_whole_call_errors_raise(fk: fieldkey.Client, tenant: str, sidecar) -> None:  # type: ignore[no-untyped-def]
    # More items than the sidecar's limits.max_batch_items (10,000): refused as a whole.
    with fieldkey.Client(sidecar.tcp, batch=fieldkey.BatchLimits(max_items=20_000, max_bytes=1 << 30)) as c:
        with pytest.raises(fieldkey.BatchTooLarge) as e:
            c.encrypt_batch([EncryptItem(tenant, "f", "x", context=1)] * 10_001)
        assert e.value.reason == "BATCH_TOO_LARGE"
    # the default limits split the same input instead
    assert len(fk.encrypt_batch([EncryptItem(tenant, "f", "x", context=1)] * 10_001)) == 10_001


def test_blind_indexes_normalize_and_follow_rotation(fk: fieldkey.Client, tenant: str) -> None:
    a = fk.blind_index(tenant, "email", " Alice@Example.COM ", text=True)
    b = fk.blind_index(tenant, "email", "alice@example.com", text=True)
    assert a == b and re.fullmatch(r"fkb1:[A-Za-z0-9_-]+", a)
    raw = fk.blind_index(tenant, "email", "alice@example.com")
    assert raw[0] == 0xB1 and len(raw) == 1 + 4 + 8
    assert fk.blind_index(new_tenant(fk), "email", "alice@example.com", text=True) != a
    assert fk.blind_index_lookup(tenant, "email", "alice@example.com", text=True) == [a]
    fk.rotate_tenant_key(tenant)
    look = fk.blind_index_lookup(tenant, "email", "ALICE@example.com", text=True)
    assert len(look) == 2 and look[1] == a and look[0] != a
    res = fk.blind_index_batch(
        [BlindIndexItem(tenant, "email", "x@y.z"), BlindIndexItem(tenant, "unconfigured", "v")], text=True, lookup=True
    )
    assert res[0].ok and res[0].key_version == 2 and len(res[0].unwrap().lookup) == 2
    assert isinstance(res[1].error, fieldkey.IndexNotConfigured)
    with pytest.raises(fieldkey.IndexNotConfigured):
        fk.blind_index(tenant, "unconfigured", "v")


def test_pseudonyms(fk: fieldkey.Client, tenant: str) -> None:
    p = fk.pseudonymize(tenant, "user-1", "analytics")
    assert re.fullmatch(r"[0-9a-f]{32}", p)
    assert fk.pseudonymize(tenant, "user-1", "analytics") == p
    assert fk.pseudonymize(tenant, "user-1", "billing") != p
    res = fk.pseudonymize_batch(
        [PseudonymizeItem(tenant, "user-1", "analytics"), PseudonymizeItem(tenant, "bad subject", "analytics")]
    )
    assert res[0].value == p and isinstance(res[1].error, fieldkey.InvalidArgument)


def test_shredded_subject_raises_key_destroyed(fk: fieldkey.Client, tenant: str, calls: dict[str, int]) -> None:
    ct = fk.encrypt_text(tenant, "email", "dave@example.com", subject="dave", context=1)
    keep = fk.encrypt_text(tenant, "email", "erin@example.com", subject="erin", context=2)
    erasure = fk.shred_subject(tenant, "dave")
    assert erasure.receipt
    calls.clear()
    with pytest.raises(fieldkey.KeyDestroyed) as e:
        fk.decrypt_text(tenant, "email", ct, subject="dave", context=1)
    assert isinstance(e.value, fieldkey.FailedPrecondition) and e.value.reason == "KEY_DESTROYED"
    assert calls["Decrypt"] == 1  # not retried
    with pytest.raises(fieldkey.KeyDestroyed):
        fk.encrypt_text(tenant, "email", "new", subject="dave", context=1)
    with pytest.raises(fieldkey.KeyDestroyed):
        fk.pseudonymize(tenant, "dave", "analytics")
    res = fk.decrypt_batch(
        [
            DecryptItem(tenant, "email", ct, subject="dave", context=1),
            DecryptItem(tenant, "email", keep, subject="erin", context=2),
        ],
        as_text=True,
    )
    assert isinstance(res[0].error, fieldkey.KeyDestroyed) and res[1].value == "erin@example.com"


def test_suspended_subject_and_tenant(fk: fieldkey.Client, tenant: str) -> None:
    ct = fk.encrypt_text(tenant, "email", "frank@example.com", subject="frank", context=1)
    fk.suspend_subject(tenant, "frank")
    with pytest.raises(fieldkey.KeySuspended):
        fk.decrypt_text(tenant, "email", ct, subject="frank", context=1)
    fk.resume_subject(tenant, "frank")
    assert fk.decrypt_text(tenant, "email", ct, subject="frank", context=1) == "frank@example.com"
    tct = fk.encrypt_text(tenant, "note", "tenant-scoped", context=1)
    fk.suspend_subject(tenant)
    with pytest.raises(fieldkey.KeySuspended):
        fk.decrypt_text(tenant, "note", tct, context=1)
    fk.resume_subject(tenant)
    assert fk.decrypt_text(tenant, "note", tct, context=1) == "tenant-scoped"


def test_rotation_keeps_old_ciphertexts_readable(fk: fieldkey.Client, tenant: str) -> None:
    old = fk.encrypt_batch([EncryptItem(tenant, "email", "v1", context=1)])[0]
    assert old.key_version == 1
    fk.rotate_tenant_key(tenant)
    new = fk.encrypt_batch([EncryptItem(tenant, "email", "v2", context=2)])[0]
    assert new.key_version == 2
    res = fk.decrypt_batch(
        [DecryptItem(tenant, "email", old.unwrap(), context=1), DecryptItem(tenant, "email", new.unwrap(), context=2)]
    )
    assert [(r.value, r.key_version) for r in res] == [(b"v1", 1), (b"v2", 2)]


def test_deadline(fk: fieldkey.Client, tenant: str) -> None:
    with pytest.raises(fieldkey.DeadlineExceeded):
        fk.encrypt_batch([EncryptItem(tenant, "f", "x" * 1000, context=1)] * 5000, timeout=0.0001)


def test_unix_socket(sidecar) -> None:  # type: ignore[no-untyped-def]
    with fieldkey.Client("unix:" + sidecar.addresses["unix"]) as c:
        assert c.who_am_i() == ("local", "local")
        t = new_tenant(c)
        ct = c.encrypt_text(t, "email", "over a socket", context=1)
        assert c.decrypt_text(t, "email", ct, context=1) == "over a socket"
    # the form the sidecar prints works as well
    with fieldkey.Client("unix://" + sidecar.addresses["unix"]) as c:
        assert c.who_am_i()[1] == "local"


def test_an_epoch_roll_keeps_every_live_ciphertext_readable(fk: fieldkey.Client, tenant: str) -> None:
    import json
    import time

    ct = fk.encrypt(tenant, "email", b"alice@example.com", subject="alice", context=1)
    fk.roll_epoch()
    deadline = time.time() + 60
    while True:
        st = fk.epoch_status()
        if not st.rolling:
            break
        assert time.time() < deadline, "the roll did not finish"
        time.sleep(0.1)
    assert st.last_error == ""
    assert st.active_epoch >= 1
    status = json.loads(st.status_json)
    assert any(e["state"] == "active" for e in status["epochs"])
    assert fk.decrypt(tenant, "email", ct, subject="alice", context=1) == b"alice@example.com"
