"""The Django integration's columnar path: a (tenant, field) of at least
FIELDKEY["COLUMN_MIN_VALUES"] values goes as one columnar call, smaller groups as one
item batch; either way the same values and the same stored errors."""

from __future__ import annotations

from typing import Any

import pytest

import fieldkey
from conftest import new_tenant


@pytest.fixture(autouse=True)
def _django(django_db: str) -> None:
    pass


@pytest.fixture
def shop():  # type: ignore[no-untyped-def]
    from djproject.shop import models

    return models


@pytest.fixture
def columns(sidecar, counter):  # type: ignore[no-untyped-def]
    """Settings with COLUMN_MIN_VALUES set: ``with columns(n): ...``."""
    from django.test import override_settings

    def make(least: int | None) -> Any:
        return override_settings(
            FIELDKEY={"TARGET": sidecar.tcp, "INTERCEPTORS": [counter], "TIMEOUT": 20.0, "COLUMN_MIN_VALUES": least}
        )

    return make


def raw(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def test_pages_writes_and_lookups_take_one_columnar_call_per_tenant_and_field(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    t, other = new_tenant(fk), new_tenant(fk)
    rows = [shop.Customer(tenant=t, user_id=f"u{i % 7}", email=f"c{i}@example.com", note=f"n{i}") for i in range(100)]
    rows += [shop.Customer(tenant=other, user_id="o", email=f"o{i}@example.com") for i in range(5)]
    calls.clear()
    shop.Customer.objects.bulk_create(rows)
    # 100 emails and 100 notes of t: a column each; other's 5 emails: one item batch
    assert dict(calls) == {"EncryptColumn": 2, "BlindIndexColumn": 1, "EncryptBatch": 1, "BlindIndexBatch": 1}
    for c in (rows[0], rows[99], rows[100]):
        email = raw("SELECT email FROM shop_customer WHERE id = %s", [c.pk])[0][0]
        assert fk.decrypt_text(c.tenant, "shop_customer.email", email, subject=c.user_id, context=str(c.pk)) == c.email
    calls.clear()
    got = list(shop.Customer.objects.filter(tenant__in=[t, other]).order_by("id"))
    assert dict(calls) == {"DecryptColumn": 2, "DecryptBatch": 1}
    assert [c.email for c in got] == [c.email for c in rows]
    assert [c.note for c in got] == [f"n{i}" for i in range(100)] + [None] * 5
    # bulk_update of 40 emails: one column, and their indexes follow
    for c in got[:40]:
        c.email = c.email.upper()
    calls.clear()
    shop.Customer.objects.bulk_update(got[:40], ["email"])
    assert dict(calls) == {"EncryptColumn": 1, "BlindIndexColumn": 1}
    calls.clear()
    found = shop.Customer.objects.blind_filter(t, email__in=[f"c{i}@example.com" for i in range(35, 75)])
    assert sorted(c.email for c in found) == sorted([f"C{i}@EXAMPLE.COM" for i in range(35, 40)] + [f"c{i}@example.com" for i in range(40, 75)])
    assert calls["BlindIndexColumn"] == 1 and calls.get("BlindIndexBatch", 0) == 0
    # one row: its two values are small groups, one item batch as before
    calls.clear()
    one = shop.Customer.objects.get(pk=got[0].pk)
    assert (one.email, one.note) == ("C0@EXAMPLE.COM", "n0") and dict(calls) == {"DecryptBatch": 1}
    one.note = "changed"
    calls.clear()
    one.save()
    assert dict(calls) == {"EncryptBatch": 1}


def test_a_bad_value_among_good_ones_fails_alone_and_as_with_item_batches(shop, fk: fieldkey.Client, calls, columns) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    made = shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=f"u{i}", email=f"e{i}@example.com", note=f"n{i}") for i in range(60)]
    )
    ids = [c.pk for c in made]
    fk.shred_subject(t, "u5")  # erased
    ct = raw("SELECT email FROM shop_customer WHERE id = %s", [ids[9]])[0][0]
    i = len(ct) - 5
    raw("UPDATE shop_customer SET email = %s WHERE id = %s", [ct[:i] + ("A" if ct[i] != "A" else "B") + ct[i + 1 :], ids[9]])  # tampered
    raw("UPDATE shop_customer SET email = (SELECT email FROM shop_customer WHERE id = %s), user_id = 'u20' WHERE id = %s", [ids[20], ids[21]])  # moved
    fk.suspend_subject(t, "u30")  # suspended
    raw("UPDATE shop_customer SET note = 'not an envelope' WHERE id = %s", [ids[40]])  # malformed

    def outcome(c: Any, attr: str) -> tuple[Any, Any]:
        try:
            return ("ok", getattr(c, attr))
        except fieldkey.FieldkeyError as e:
            return (type(e), e.reason)

    def page() -> list[tuple[Any, Any]]:
        rows = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
        return [(outcome(c, "email"), outcome(c, "note")) for c in rows]

    calls.clear()
    via_columns = page()
    assert dict(calls) == {"DecryptColumn": 2}
    with columns(None):
        calls.clear()
        via_batch = page()
        assert dict(calls) == {"DecryptBatch": 1}
    with columns(1):
        calls.clear()
        assert page() == via_columns and dict(calls) == {"DecryptColumn": 2}
    assert via_columns == via_batch
    bad = {
        5: (fieldkey.KeyDestroyed, "KEY_DESTROYED"),
        9: (fieldkey.AuthenticationFailed, "AUTHENTICATION_FAILED"),
        21: (fieldkey.AuthenticationFailed, "AUTHENTICATION_FAILED"),
        30: (fieldkey.KeySuspended, "KEY_SUSPENDED"),
    }
    for i, (email, note) in enumerate(via_columns):
        assert email == bad.get(i, ("ok", f"e{i}@example.com")), i
        assert note == ((fieldkey.MalformedCiphertext, "MALFORMED_CIPHERTEXT") if i == 40 else ("ok", f"n{i}")), i
    # a write with a value that cannot be encrypted raises that value's error, writes nothing
    rows = list(shop.Customer.objects.filter(tenant=t, pk__in=ids[:40]).order_by("id"))
    for c in rows:
        c.note = c.note.upper() if c.pk != ids[5] else c.note
    rows[5].email = "new@example.com"  # the erased subject
    calls.clear()
    with pytest.raises(fieldkey.KeyDestroyed):
        shop.Customer.objects.bulk_update(rows[:40], ["note", "email"])
    assert calls["EncryptColumn"] == 1  # the notes went as a column
    assert [c.note for c in shop.Customer.objects.filter(pk__in=ids[:40]).order_by("id")] == [f"n{i}" for i in range(40)]


def test_small_groups_share_one_batch_and_the_threshold_is_a_setting(shop, fk: fieldkey.Client, calls, columns) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    with columns(1):
        calls.clear()
        c = shop.Customer.objects.create(tenant=t, user_id="u", email="one@example.com", note="x")
        assert dict(calls) == {"EncryptColumn": 2, "BlindIndexColumn": 1}
        calls.clear()
        assert shop.Customer.objects.get(pk=c.pk).email == "one@example.com"
        assert dict(calls) == {"DecryptColumn": 2}
    with columns(None):
        shop.Customer.objects.bulk_create([shop.Customer(tenant=t, user_id="v", email=f"m{i}@example.com") for i in range(50)])
        calls.clear()
        assert len([c.email for c in shop.Customer.objects.filter(tenant=t)]) == 51
        assert dict(calls) == {"DecryptBatch": 1}
    from django.core.exceptions import ImproperlyConfigured

    for bad in (0, -1, "32", True):
        with columns(bad):  # type: ignore[arg-type]
            with pytest.raises(ImproperlyConfigured, match="COLUMN_MIN_VALUES"):
                list(shop.Customer.objects.filter(tenant=t))


def test_a_sidecar_without_columnar_calls_gets_item_batches(shop, fk: fieldkey.Client, calls, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from fieldkey.django import _columns, get_client

    t = new_tenant(fk)
    shop.Customer.objects.bulk_create([shop.Customer(tenant=t, user_id="u", email=f"x{i}@example.com") for i in range(40)])
    client = get_client()

    def unimplemented(*a: Any, **k: Any) -> Any:
        raise fieldkey.FieldkeyError("Method not found: fieldkey.v1.Crypto/DecryptColumn", code=grpc.StatusCode.UNIMPLEMENTED)

    monkeypatch.setattr(client, "decrypt_column", unimplemented)
    try:
        calls.clear()
        assert [c.email for c in shop.Customer.objects.filter(tenant=t).order_by("id")] == [f"x{i}@example.com" for i in range(40)]
        assert dict(calls) == {"DecryptBatch": 1} and client in _columns._NO_COLUMNS
        calls.clear()
        shop.Customer.objects.bulk_create([shop.Customer(tenant=t, user_id="u", email=f"y{i}@example.com") for i in range(40)])
        assert dict(calls) == {"EncryptBatch": 1, "BlindIndexBatch": 1}  # remembered for this client
    finally:
        _columns._NO_COLUMNS.discard(client)


def test_encrypt_column_backfill_sends_columns_per_tenant(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    from fieldkey.django import encrypt_column

    t, other = new_tenant(fk), new_tenant(fk)
    for i in range(70):
        raw("INSERT INTO shop_customer (tenant, user_id, email) VALUES (%s, %s, %s)", [t, f"u{i % 4}", f"legacy{i}@example.com"])
    for i in range(3):
        raw("INSERT INTO shop_customer (tenant, user_id, email) VALUES (%s, %s, %s)", [other, "", f"o{i}@example.com"])
    calls.clear()
    report = encrypt_column(shop.Customer, "email", tenant_field="tenant", subject_field="user_id", batch_size=1000)
    assert report.encrypted >= 73 and report.conflicts == 0
    assert calls["EncryptColumn"] >= 1 and calls["BlindIndexColumn"] >= 1
    rows = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    assert [r.email for r in rows] == [f"legacy{i}@example.com" for i in range(70)]
    assert [r.email for r in shop.Customer.objects.filter(tenant=other).order_by("id")] == [f"o{i}@example.com" for i in range(3)]
    assert shop.Customer.objects.blind_filter(t, email="LEGACY7@example.com").get().user_id == "u3"
