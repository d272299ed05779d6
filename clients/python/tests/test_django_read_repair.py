"""Read repair in the Django integration (``FIELDKEY["READ_REPAIR"]``): a row loaded
stale keeps the repaired ciphertext the load returned, and the instance's next save
writes it when the value is unchanged, with no sidecar call; a changed value takes the
normal encrypt path; ``save_repairs`` writes back what a read-only page loaded, only
where the row still holds what was loaded and the instance's scope is unchanged, each
value into its field's own table (multi-table inheritance), all of it or nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import fieldkey
from conftest import CallCounter, new_tenant
from sidecar import Sidecar


@pytest.fixture(autouse=True)
def _django(django_db: str) -> None:
    pass


@pytest.fixture
def shop():  # type: ignore[no-untyped-def]
    from djproject.shop import models

    return models


@pytest.fixture
def repairing(sidecar: Sidecar, counter: CallCounter) -> Iterator[None]:
    from django.test import override_settings

    with override_settings(
        FIELDKEY={"TARGET": sidecar.tcp, "INTERCEPTORS": [counter], "TIMEOUT": 20.0, "READ_REPAIR": True}
    ):
        yield


def stored(pk: Any, column: str = "email") -> str:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT {column} FROM shop_customer WHERE id = %s", [pk])  # noqa: S608
        return str(cur.fetchone()[0])


def version(fk: fieldkey.Client, t: str, c: Any, ct: str) -> int:
    return fk.decrypt_text(t, "shop_customer.email", ct, subject=c.user_id, context=str(c.pk), repair=True).key_version


def test_saving_a_row_loaded_stale_writes_the_repaired_ciphertext_without_a_call(
    shop, fk: fieldkey.Client, calls, repairing  # type: ignore[no-untyped-def]
) -> None:
    t = new_tenant(fk)
    c = shop.Customer.objects.create(tenant=t, user_id="u1", email="a@example.com", note="n")
    before, note_before, bidx = stored(c.pk), stored(c.pk, "note"), stored(c.pk, "email_bidx")
    fk.rotate_tenant_key(t)

    calls.clear()
    loaded = shop.Customer.objects.get(pk=c.pk)
    assert (loaded.email, loaded.note) == ("a@example.com", "n")
    assert dict(calls) == {"DecryptBatch": 1}, "repair comes with the load: one call"
    calls.clear()
    loaded.save()
    assert dict(calls) == {}, "the repaired ciphertexts were known: no sidecar call at save"
    after, note_after = stored(c.pk), stored(c.pk, "note")
    assert after != before and note_after != note_before
    assert version(fk, t, c, before) == 1 and version(fk, t, c, after) == 2
    assert fk.decrypt_text(t, "shop_customer.email", after, subject="u1", context=str(c.pk)) == "a@example.com"
    assert fk.decrypt_text(t, "shop_customer.note", note_after, context=str(c.pk)) == "n"
    assert stored(c.pk, "email_bidx") == bidx, "the blind index is the job's (lookups match every version)"
    assert shop.Customer.objects.blind_filter(t, email="a@example.com").get().pk == c.pk
    # saved once: a second save writes what is stored now, again without a call
    calls.clear()
    loaded.save()
    assert dict(calls) == {} and stored(c.pk) == after
    # a fresh load of the repaired row is current: nothing to repair
    again = shop.Customer.objects.get(pk=c.pk)
    assert again.__dict__.get("_fieldkey_repaired", {}) == {}


def test_a_changed_value_takes_the_normal_encrypt_path(shop, fk: fieldkey.Client, calls, repairing) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    c = shop.Customer.objects.create(tenant=t, user_id="u1", email="a@example.com")
    fk.rotate_tenant_key(t)
    loaded = shop.Customer.objects.get(pk=c.pk)
    repaired = loaded.__dict__["_fieldkey_repaired"]["email"][1]
    loaded.email = "b@example.com"
    calls.clear()
    loaded.save(update_fields=["email"])
    assert calls["EncryptBatch"] == 1 and calls["BlindIndexBatch"] == 1
    now = stored(c.pk)
    assert now != repaired
    assert fk.decrypt_text(t, "shop_customer.email", now, subject="u1", context=str(c.pk)) == "b@example.com"
    assert version(fk, t, c, now) == 2


def test_without_read_repair_a_save_keeps_the_stored_ciphertext(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    c = shop.Customer.objects.create(tenant=t, user_id="u1", email="a@example.com")
    before = stored(c.pk)
    fk.rotate_tenant_key(t)
    loaded = shop.Customer.objects.get(pk=c.pk)
    loaded.save()
    assert stored(c.pk) == before


def test_save_repairs_writes_back_only_rows_unchanged_since_they_were_read(
    shop, fk: fieldkey.Client, calls, repairing  # type: ignore[no-untyped-def]
) -> None:
    from fieldkey.django import save_repairs

    t = new_tenant(fk)
    rows = shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=f"u{i}", email=f"m{i}@example.com") for i in range(5)]
    )
    before = {c.pk: stored(c.pk) for c in rows}
    fk.rotate_tenant_key(t)
    page = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    # another writer changes row 2 after the page was read
    other = shop.Customer.objects.get(pk=page[2].pk)
    other.email = "changed@example.com"
    other.save()
    changed = stored(page[2].pk)
    calls.clear()
    assert save_repairs(page) == 4
    assert dict(calls) == {}
    assert stored(page[2].pk) == changed, "a row written since the read is left alone"
    for i, c in enumerate(page):
        if i == 2:
            continue
        now = stored(c.pk)
        assert now != before[c.pk] and version(fk, t, c, now) == 2
        assert fk.decrypt_text(t, "shop_customer.email", now, subject=c.user_id, context=str(c.pk)) == c.email
    assert save_repairs(page) == 0, "nothing left to write"
    assert shop.Customer.objects.get(pk=page[2].pk).email == "changed@example.com"


def stored_in(table: str, column: str, key: str, pk: Any) -> str:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT {column} FROM {table} WHERE {key} = %s", [pk])  # noqa: S608
        return str(cur.fetchone()[0])


def test_save_repairs_writes_each_field_to_its_own_table_under_multi_table_inheritance(
    shop, fk: fieldkey.Client, calls, repairing  # type: ignore[no-untyped-def]
) -> None:
    """VipCustomer's email and note live in shop_customer (keyed by id), its perk in
    shop_vipcustomer (keyed by customer_ptr_id): each UPDATE goes to its field's table."""
    from fieldkey.django import save_repairs

    t = new_tenant(fk)
    v = shop.VipCustomer.objects.create(tenant=t, user_id="u1", email="v@example.com", note="n", perk="p")
    cols = [
        ("shop_customer", "email", "id"),
        ("shop_customer", "note", "id"),
        ("shop_vipcustomer", "perk", "customer_ptr_id"),
    ]
    before = {c: stored_in(tb, c, k, v.pk) for (tb, c, k) in cols}
    fk.rotate_tenant_key(t)
    loaded = shop.VipCustomer.objects.get(pk=v.pk)
    assert (loaded.email, loaded.note, loaded.perk) == ("v@example.com", "n", "p")
    calls.clear()
    assert save_repairs([loaded]) == 3
    assert dict(calls) == {}
    now = {c: stored_in(tb, c, k, v.pk) for (tb, c, k) in cols}
    for c in now:
        assert now[c] != before[c], c
    ctx = str(v.pk)
    email = fk.decrypt_text(t, "shop_customer.email", now["email"], subject="u1", context=ctx, repair=True)
    note = fk.decrypt_text(t, "shop_customer.note", now["note"], context=ctx, repair=True)
    perk = fk.decrypt_text(t, "shop_vipcustomer.perk", now["perk"], context=ctx, repair=True)
    assert (email.value, note.value, perk.value) == ("v@example.com", "n", "p")
    assert (email.key_version, note.key_version, perk.key_version) == (2, 2, 2)
    assert save_repairs([loaded]) == 0


def _refuse_updates_of(vendor: str, pk: int) -> tuple[list[str], list[str]]:
    """A real write failure: a trigger refusing UPDATEs of one shop_customer row.
    (statements to create it, statements to drop it)."""
    if vendor == "postgresql":
        return (
            [
                "CREATE FUNCTION fk_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                f"CREATE TRIGGER fk_test_refuse BEFORE UPDATE ON shop_customer FOR EACH ROW "
                f"WHEN (NEW.id = {int(pk)}) EXECUTE FUNCTION fk_test_refuse()",
            ],
            ["DROP TRIGGER fk_test_refuse ON shop_customer", "DROP FUNCTION fk_test_refuse()"],
        )
    return (
        [
            f"CREATE TRIGGER fk_test_refuse BEFORE UPDATE ON shop_customer WHEN NEW.id = {int(pk)} "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ],
        ["DROP TRIGGER fk_test_refuse"],
    )


def test_save_repairs_writes_all_or_nothing(
    shop, fk: fieldkey.Client, django_db: str, repairing  # type: ignore[no-untyped-def]
) -> None:
    """An UPDATE failing partway rolls back the ones before it, and the instances still
    hold their repairs: once the failure is gone, every value is written."""
    from django.db import DatabaseError, connection

    from fieldkey.django import save_repairs

    t = new_tenant(fk)
    rows = shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=f"u{i}", email=f"m{i}@example.com") for i in range(2)]
    )
    before = {c.pk: stored(c.pk) for c in rows}
    fk.rotate_tenant_key(t)
    page = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    create, drop = _refuse_updates_of(django_db, page[1].pk)
    with connection.cursor() as cur:
        for s in create:
            cur.execute(s)
    try:
        with pytest.raises(DatabaseError, match="refused by the test"):
            save_repairs(page)
        assert stored(page[0].pk) == before[page[0].pk], "the first row's UPDATE was rolled back"
    finally:
        with connection.cursor() as cur:
            for s in drop:
                cur.execute(s)
    assert save_repairs(page) == 2
    for c in page:
        assert version(fk, t, c, stored(c.pk)) == 2


def test_save_repairs_skips_values_whose_scope_changed_since_the_load(
    shop, fk: fieldkey.Client, repairing  # type: ignore[no-untyped-def]
) -> None:
    """A repaired value is bound to the tenant, subject and row it was loaded with: an
    instance whose subject or pk has changed in memory since gets none of the values
    bound to them written (here: row 1's ciphertext copied into row 0, then row 1's
    instance pointed at row 0)."""
    from django.db import connection

    from fieldkey.django import save_repairs

    t = new_tenant(fk)
    rows = shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=f"u{i}", email=f"m{i}@example.com", note=f"n{i}") for i in range(2)]
    )
    fk.rotate_tenant_key(t)
    page = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    email0, note0 = stored(page[0].pk), stored(page[0].pk, "note")
    copied = stored(page[1].pk)
    with connection.cursor() as cur:
        cur.execute("UPDATE shop_customer SET email = %s WHERE id = %s", [copied, page[0].pk])
    page[0].user_id = "someone-else"  # the email's subject: note is per tenant, still in scope
    page[1].id = page[0].pk  # another row: both its values are bound to row 1
    assert save_repairs(page) == 1
    assert stored(page[0].pk) == copied, "row 1's value is not repaired into row 0"
    now = stored(page[0].pk, "note")
    assert now != note0
    assert fk.decrypt_text(t, "shop_customer.note", now, context=str(page[0].pk)) == "n0"
    assert email0 != copied
