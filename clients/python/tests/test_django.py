"""The Django integration on a real database (PostgreSQL, or SQLite without a server)
and the real sidecar."""

from __future__ import annotations

import io
import time
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


def raw(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def test_save_load_and_what_the_database_holds(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    c = shop.Customer(tenant=t, user_id="u1", email="alice@example.com", note="prefers mail")
    calls.clear()
    c.save()
    # auto pk: bound to the pk all the same (PostgreSQL: taken from the sequence first)
    assert calls["EncryptBatch"] == 1 and calls["BlindIndexBatch"] == 1 and calls.get("Encrypt", 0) == 0
    assert c.pk is not None and c.email == "alice@example.com"
    email, bidx, note = raw("SELECT email, email_bidx, note FROM shop_customer WHERE id = %s", [c.pk])[0]
    assert email.startswith("fk1:") and "alice" not in email
    assert bidx.startswith("fkb1:") and note.startswith("fk1:")
    # bound to tenant, subject, the field name "<table>.<column>" and the pk's text
    assert fk.decrypt_text(t, "shop_customer.email", email, subject="u1", context=str(c.pk)) == "alice@example.com"
    assert fk.decrypt_text(t, "shop_customer.note", note, context=str(c.pk)) == "prefers mail"  # tenant-scoped
    assert bidx == fk.blind_index(t, "shop_customer.email", "alice@example.com", text=True)

    calls.clear()
    loaded = shop.Customer.objects.get(pk=c.pk)
    assert calls["DecryptBatch"] == 1
    assert (loaded.email, loaded.note) == ("alice@example.com", "prefers mail")
    # saving unchanged values re-encrypts nothing
    calls.clear()
    loaded.save()
    assert calls.get("EncryptBatch", 0) == 0 and calls.get("BlindIndexBatch", 0) == 0
    assert raw("SELECT email FROM shop_customer WHERE id = %s", [c.pk])[0][0] == email
    # a changed value: one EncryptBatch, and the index follows
    loaded.email = "alice@new.example"
    calls.clear()
    loaded.save(update_fields=["email"])
    assert calls["EncryptBatch"] == 1 and calls["BlindIndexBatch"] == 1
    again = shop.Customer.objects.get(pk=c.pk)
    assert again.email == "alice@new.example"
    assert again.email_bidx == fk.blind_index(t, "shop_customer.email", "alice@new.example", text=True)
    # an instance loaded outside a FieldkeyQuerySet decrypts on first access
    base = shop.Customer._base_manager.get(pk=c.pk)
    calls.clear()
    assert base.email == "alice@new.example" and calls["DecryptBatch"] == 1
    base.refresh_from_db()
    assert base.note == "prefers mail"
    # None stays NULL
    n = shop.Customer.objects.create(tenant=t, user_id="u2", email="n@example.com", note=None)
    assert raw("SELECT note FROM shop_customer WHERE id = %s", [n.pk])[0][0] is None
    assert shop.Customer.objects.get(pk=n.pk).note is None


def test_pk_bound_insert_without_a_sequence_takes_two_statements(shop, fk: fieldkey.Client, calls, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The path of databases without sequences (and PostgreSQL's, forced here): INSERT
    with placeholders, EncryptBatch bound to the returned pks, UPDATE; one transaction."""
    from django.db import connection

    from fieldkey.django import _crypto

    monkeypatch.setattr(_crypto, "reserve_pks", lambda *a: None)
    t = new_tenant(fk)
    calls.clear()
    one = shop.Customer.objects.create(tenant=t, user_id="u", email="one@example.com")
    assert dict(calls) == {"EncryptBatch": 1, "BlindIndexBatch": 1}
    calls.clear()
    many = shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=f"u{i}", email=f"m{i}@example.com", note="n") for i in range(10)]
    )
    if connection.features.can_return_rows_from_bulk_insert:
        assert dict(calls) == {"EncryptBatch": 1, "BlindIndexBatch": 1}
    for c in [one, *many]:
        email, note = raw("SELECT email, note FROM shop_customer WHERE id = %s", [c.pk])[0]
        assert fk.decrypt_text(t, "shop_customer.email", email, subject=c.user_id, context=str(c.pk)) == c.email
    assert [c.email for c in shop.Customer.objects.filter(tenant=t).order_by("id")] == ["one@example.com"] + [
        f"m{i}@example.com" for i in range(10)
    ]
    assert shop.Customer.objects.blind_filter(t, email="m3@example.com").get().pk == many[3].pk
    # a failure after the INSERT rolls it back: no row with a placeholder is left
    fk.shred_subject(t, "gone")
    with pytest.raises(fieldkey.KeyDestroyed):
        shop.Customer.objects.create(tenant=t, user_id="gone", email="gone@example.com")
    assert not shop.Customer.objects.filter(tenant=t, user_id="gone").exists()
    assert not raw("SELECT 1 FROM shop_customer WHERE email = ''", [])


def test_uuid_pk_and_scope_method_need_one_statement(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    cust = shop.Customer.objects.create(tenant=t, user_id="u1", email="a@example.com")
    calls.clear()
    tk = shop.Ticket.objects.create(customer=cust, org=t, body="printer on fire", summary="fire")
    assert calls["EncryptBatch"] == 1
    body, summary = raw("SELECT body, summary FROM shop_ticket WHERE org = %s", [t])[0]
    # fieldkey_field="ticket-body", context = str(uuid); summary: bind_pk=False
    assert fk.decrypt_text(t, "ticket-body", body, context=str(tk.pk)) == "printer on fire"
    assert fk.decrypt_text(t, "shop_ticket.summary", summary, context=fieldkey.UNBOUND) == "fire"
    # select_related: both models' values in one DecryptBatch
    calls.clear()
    got = list(shop.Ticket.objects.select_related("customer").filter(org=t))
    assert calls["DecryptBatch"] == 1
    assert (got[0].body, got[0].customer.email) == ("printer on fire", "a@example.com")
    assert calls["DecryptBatch"] == 1 and calls.get("Decrypt", 0) == 0
    # related managers and prefetch_related batch too
    calls.clear()
    cs = list(shop.Customer.objects.filter(tenant=t).prefetch_related("tickets"))
    assert [tk2.body for tk2 in cs[0].tickets.all()] == ["printer on fire"]
    assert calls["DecryptBatch"] == 2


def test_blind_index_lookup(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    from fieldkey.django import blind_lookup

    t, other = new_tenant(fk), new_tenant(fk)
    shop.Customer.objects.bulk_create(
        [
            shop.Customer(tenant=t, user_id="a", email="Ann@Example.org"),
            shop.Customer(tenant=t, user_id="b", email="bob@example.org"),
            shop.Customer(tenant=other, user_id="a", email="ann@example.org"),
        ]
    )
    calls.clear()
    found = list(shop.Customer.objects.blind_filter(t, email="  ANN@example.ORG "))
    assert [c.user_id for c in found] == ["a"] and found[0].email == "Ann@Example.org"
    assert calls["BlindIndexBatch"] == 1 and calls["DecryptBatch"] == 1
    assert {c.user_id for c in shop.Customer.objects.blind_filter(t, email__in=["ann@example.org", "BOB@example.org"])} == {"a", "b"}
    assert not shop.Customer.objects.blind_filter(t, email="nobody@example.org").exists()
    assert [c.tenant for c in shop.Customer.objects.blind_filter(other, email="ann@example.org")] == [other]
    assert shop.Customer.objects.filter(**blind_lookup(shop.Customer, t, email="bob@example.org")).count() == 1
    # after a rotation: rows indexed under v1 and v2 are both found (lookup mode)
    fk.rotate_tenant_key(t)
    shop.Customer.objects.create(tenant=t, user_id="c", email="ann@example.org")
    assert sorted(c.user_id for c in shop.Customer.objects.blind_filter(t, email="ann@example.org")) == ["a", "c"]
    with pytest.raises(Exception, match="encrypted: it supports only __isnull"):
        shop.Customer.objects.filter(email="ann@example.org")
    assert shop.Customer.objects.filter(tenant=t, note__isnull=True).count() == 3


def test_bulk_read_of_1000_rows_uses_batch_calls(shop, fk: fieldkey.Client, calls, sidecar, counter) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    rows = [shop.Customer(tenant=t, user_id=f"user-{i}", email=f"user{i}@example.com", note=f"note {i}") for i in range(1000)]
    calls.clear()
    t0 = time.perf_counter()
    shop.Customer.objects.bulk_create(rows)
    t_write = time.perf_counter() - t0
    # 2,000 values encrypted (after the INSERT returned the pks), 1,000 indexed: one
    # columnar call per field (test_django_columns.py: the columnar path)
    assert dict(calls) == {"EncryptColumn": 2, "BlindIndexColumn": 1}
    assert all(r.pk is not None for r in rows)
    calls.clear()
    t0 = time.perf_counter()
    got = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    t_read = time.perf_counter() - t0
    assert dict(calls) == {"DecryptColumn": 2}  # one call per field for 2,000 values, none per row
    assert [c.email for c in got] == [f"user{i}@example.com" for i in range(1000)]
    assert [c.note for c in got] == [f"note {i}" for i in range(1000)]
    assert dict(calls) == {"DecryptColumn": 2}
    # iterator(): one call per field and chunk
    calls.clear()
    assert sum(1 for c in shop.Customer.objects.filter(tenant=t).iterator(chunk_size=400) if c.email) == 1000
    assert dict(calls) == {"DecryptColumn": 6}
    # the client's batch limit splits one evaluation into requests
    from django.test import override_settings

    with override_settings(FIELDKEY={"TARGET": sidecar.tcp, "INTERCEPTORS": [counter], "MAX_BATCH_ITEMS": 500}):
        calls.clear()
        assert len([c.email for c in shop.Customer.objects.filter(tenant=t)]) == 1000
        assert dict(calls) == {"DecryptColumn": 4}
    # bulk_update: one EncryptColumn, indexes follow
    for c in got[:100]:
        c.email = c.email.upper()
    calls.clear()
    shop.Customer.objects.bulk_update(got[:100], ["email"])
    assert dict(calls) == {"EncryptColumn": 1, "BlindIndexColumn": 1}
    assert shop.Customer.objects.blind_filter(t, email="user5@example.com").get().email == "USER5@EXAMPLE.COM"
    print(f"\n1,000 rows: bulk_create {t_write * 1000:.0f} ms, read + decrypt {t_read * 1000:.0f} ms")


def test_shredded_subject_raises_key_destroyed_for_its_rows_only(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    t = new_tenant(fk)
    shop.Customer.objects.bulk_create(
        [shop.Customer(tenant=t, user_id=u, email=f"{u}@example.com", note="n") for u in ("gone", "kept")]
    )
    fk.shred_subject(t, "gone")
    calls.clear()
    rows = {c.user_id: c for c in shop.Customer.objects.filter(tenant=t)}
    assert calls["DecryptBatch"] == 1
    assert rows["kept"].email == "kept@example.com"
    with pytest.raises(fieldkey.KeyDestroyed):
        rows["gone"].email
    assert rows["gone"].note == "n"  # tenant-scoped: not erased with the subject
    # saving the row keeps the unreadable ciphertext as it is; writing a new value is refused
    before = raw("SELECT email FROM shop_customer WHERE tenant = %s AND user_id = 'gone'", [t])[0][0]
    rows["gone"].note = "changed"
    rows["gone"].save()
    assert raw("SELECT email FROM shop_customer WHERE tenant = %s AND user_id = 'gone'", [t])[0][0] == before
    rows["gone"].email = "new@example.com"
    with pytest.raises(fieldkey.KeyDestroyed):
        rows["gone"].save()
    with pytest.raises(fieldkey.KeyDestroyed):
        shop.Customer.objects.create(tenant=t, user_id="gone", email="again@example.com")


def test_errors_wrong_tenant_tampered_moved_and_suspended(shop, fk: fieldkey.Client) -> None:  # type: ignore[no-untyped-def]
    t, other = new_tenant(fk), new_tenant(fk)
    a = shop.Customer.objects.create(tenant=t, user_id="a", email="a@example.com")
    b = shop.Customer.objects.create(tenant=t, user_id="b", email="b@example.com")
    c = shop.Customer.objects.create(tenant=t, user_id="c", email="c@example.com")
    d = shop.Customer.objects.create(tenant=t, user_id="d", email="d@example.com")
    # wrong tenant: the row claims another tenant
    raw("UPDATE shop_customer SET tenant = %s WHERE id = %s", [other, a.pk])
    # tampered: one character of the envelope changed
    ct = raw("SELECT email FROM shop_customer WHERE id = %s", [b.pk])[0][0]
    i = len(ct) - 5
    raw("UPDATE shop_customer SET email = %s WHERE id = %s", [ct[:i] + ("A" if ct[i] != "A" else "B") + ct[i + 1 :], b.pk])
    # moved: d's ciphertext copied into c's row (same tenant and subject would still differ by pk)
    raw("UPDATE shop_customer SET email = (SELECT email FROM shop_customer WHERE id = %s), user_id = 'd' WHERE id = %s", [d.pk, c.pk])
    fk.suspend_subject(t, "d")
    got = {x.pk: x for x in shop.Customer.objects.filter(pk__in=[a.pk, b.pk, c.pk, d.pk])}
    with pytest.raises((fieldkey.AuthenticationFailed, fieldkey.SubjectNotFound)):
        got[a.pk].email
    with pytest.raises((fieldkey.AuthenticationFailed, fieldkey.MalformedCiphertext)):
        got[b.pk].email
    with pytest.raises(fieldkey.KeySuspended):  # c now belongs to d, who is suspended
        got[c.pk].email
    with pytest.raises(fieldkey.KeySuspended):
        got[d.pk].email
    fk.resume_subject(t, "d")
    assert shop.Customer.objects.get(pk=d.pk).email == "d@example.com"
    with pytest.raises(fieldkey.AuthenticationFailed):  # moved to another row: the pk is bound
        shop.Customer.objects.get(pk=c.pk).email
    # a model instance without a tenant
    with pytest.raises(fieldkey.django.MissingScope):
        shop.Customer.objects.create(tenant="", user_id="x", email="x@example.com")


def test_plaintext_never_reaches_the_column_by_mistake(shop, fk: fieldkey.Client) -> None:  # type: ignore[no-untyped-def]
    from fieldkey.django import Ciphertext, PlaintextRefused

    t = new_tenant(fk)
    c = shop.Customer.objects.create(tenant=t, user_id="u", email="u@example.com")
    with pytest.raises(PlaintextRefused):
        shop.Customer.objects.filter(pk=c.pk).update(email="plain@example.com")
    with pytest.raises(TypeError):
        shop.Customer.objects.create(tenant=t, user_id="u", email=b"bytes")
    # an envelope made by the client can be written directly
    ct = fk.encrypt_text(t, "shop_customer.email", "direct@example.com", subject="u", context=str(c.pk))
    shop.Customer.objects.filter(pk=c.pk).update(email=Ciphertext(ct))
    assert shop.Customer.objects.get(pk=c.pk).email == "direct@example.com"
    # values_list gives the stored envelope, not plaintext
    assert shop.Customer.objects.filter(pk=c.pk).values_list("email", flat=True)[0] == ct


def test_encrypt_existing_plaintext_column_in_place(shop, fk: fieldkey.Client, calls) -> None:  # type: ignore[no-untyped-def]
    from fieldkey.django import encrypt_column

    t = new_tenant(fk)
    # rows written before the column was encrypted
    for i in range(30):
        raw("INSERT INTO shop_customer (tenant, user_id, email) VALUES (%s, %s, %s)", [t, f"u{i}", f"legacy{i}@example.com"])
    raw("INSERT INTO shop_customer (tenant, user_id, email) VALUES (%s, %s, %s)", [t, "", "tenant-level@example.com"])
    calls.clear()
    report = encrypt_column(shop.Customer.objects.filter(tenant=t).model, "email", tenant_field="tenant", subject_field="user_id", batch_size=20)
    assert report.encrypted >= 31 and report.conflicts == 0
    assert calls["EncryptBatch"] >= 2 and calls["BlindIndexBatch"] >= 2 and calls.get("Encrypt", 0) == 0
    rows = list(shop.Customer.objects.filter(tenant=t).order_by("id"))
    assert [r.email for r in rows] == [f"legacy{i}@example.com" for i in range(30)] + ["tenant-level@example.com"]
    assert shop.Customer.objects.blind_filter(t, email="LEGACY7@example.com").get().user_id == "u7"
    # resumable / idempotent: nothing left to do
    again = encrypt_column(shop.Customer, "email", tenant_field="tenant", subject_field="user_id")
    assert again.encrypted == 0 and again.already >= 31


def test_migrations_are_in_sync_and_checks_pass() -> None:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("makemigrations", "shop", "--check", "--dry-run", stdout=out)
    call_command("check", stdout=out)


def test_system_check_requires_fieldkey_model() -> None:
    from django.db import models
    from django.test.utils import isolate_apps

    from fieldkey.django import EncryptedTextField

    with isolate_apps("djproject.shop"):

        class Plain(models.Model):
            secret = EncryptedTextField()

            class Meta:
                app_label = "shop"

        ids = {e.id for e in Plain._meta.get_field("secret").check()}
    assert "fieldkey.E001" in ids


def test_scope_from_settings_client_is_reset(shop, sidecar) -> None:  # type: ignore[no-untyped-def]
    from django.test import override_settings

    from fieldkey.django import get_client

    first = get_client()
    with override_settings(FIELDKEY={"TARGET": "unix:" + sidecar.addresses["unix"]}):
        c = get_client()
        assert c is not first and c.target.startswith("unix:")
        assert c.who_am_i() == ("local", "local")
    assert get_client() is not c
    with override_settings(FIELDKEY={"TARGET": sidecar.tcp, "NOPE": 1}):
        from django.core.exceptions import ImproperlyConfigured

        with pytest.raises(ImproperlyConfigured):
            get_client()


def test_the_fields_bind_the_pk_and_never_send_a_value_unbound_by_accident(shop) -> None:  # type: ignore[no-untyped-def]
    from django.core.checks import Warning as CheckWarning

    from fieldkey.django import MissingScope, get_client
    from fieldkey.django._crypto import row_context

    # the settings client keeps the default: a missing context is refused before sending
    assert get_client().require_context is True
    email = shop.Customer._meta.get_field("email")
    summary = shop.Ticket._meta.get_field("summary")
    assert row_context(shop.Customer, email, 17) == b"17"
    for pk in (None, ""):
        with pytest.raises(MissingScope, match="binds the primary key"):
            row_context(shop.Customer, email, pk)
    # bind_pk=False is declared in the model: sent as UNBOUND, flagged by a system check
    assert row_context(shop.Ticket, summary, None) is fieldkey.UNBOUND
    warnings = [m for m in summary.check() if m.id == "fieldkey.W002"]
    assert len(warnings) == 1 and isinstance(warnings[0], CheckWarning)
    assert not [m for m in email.check() if m.id == "fieldkey.W002"]


def test_a_sidecar_requiring_row_binding_accepts_the_fields_and_refuses_bind_pk_false(  # type: ignore[no-untyped-def]
    shop, bound_sidecar, counter
) -> None:
    from django.test import override_settings

    with override_settings(FIELDKEY={"TARGET": bound_sidecar.tcp, "INTERCEPTORS": [counter], "TIMEOUT": 20.0}):
        from fieldkey.django import get_client

        t = new_tenant(get_client())
        # pk-bound on insert (one- or two-step), bulk_create, bulk_update and reads
        a = shop.Customer.objects.create(tenant=t, user_id="a", email="a@example.com")
        made = shop.Customer.objects.bulk_create(
            [shop.Customer(tenant=t, user_id=f"u{i}", email=f"u{i}@example.com") for i in range(3)]
        )
        for m in made:
            m.email = m.email.upper()
        shop.Customer.objects.bulk_update(made, ["email"])
        got = {c.user_id: c.email for c in shop.Customer.objects.filter(tenant=t)}
        assert got == {"a": "a@example.com", **{f"u{i}": f"U{i}@EXAMPLE.COM" for i in range(3)}}
        # a row swap fails authentication
        raw("UPDATE shop_customer SET email = (SELECT email FROM shop_customer WHERE id = %s), user_id = 'a' "
            "WHERE id = %s", [a.pk, made[0].pk])
        with pytest.raises(fieldkey.AuthenticationFailed):
            shop.Customer.objects.get(pk=made[0].pk).email
        # Ticket.summary has bind_pk=False, which this sidecar's [row_binding] refuses
        with pytest.raises(fieldkey.ContextRequired):
            shop.Ticket.objects.create(customer=a, org=t, body="b", summary="s")
        assert not shop.Ticket.objects.filter(org=t).exists()
