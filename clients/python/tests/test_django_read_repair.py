"""Read repair in the Django integration (``FIELDKEY["READ_REPAIR"]``): a row loaded
stale keeps the repaired ciphertext the load returned, and the instance's next save
writes it when the value is unchanged, with no sidecar call; a changed value takes the
normal encrypt path; ``save_repairs`` writes back what a read-only page loaded, only
where the row still holds what was loaded."""

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
