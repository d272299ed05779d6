"""Encrypting an existing plaintext column in place (a data migration).

    from fieldkey.django import encrypt_column

    def forwards(apps, schema_editor):
        encrypt_column(
            apps.get_model("shop", "Customer"), "email",
            tenant_field="tenant_id", subject_field="user_id",
            using=schema_editor.connection.alias,
        )

    operations = [
        migrations.AlterField("customer", "email", EncryptedCharField(max_length=254)),
        migrations.AddField("customer", "email_bidx", BlindIndexField(source="email")),
        migrations.RunPython(forwards, migrations.RunPython.noop, atomic=False),
    ]

Historical models in migrations have no custom methods, so the scope is given here by
attribute names (the same ones the model's ``fieldkey_scope`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connections, transaction

from . import _columns
from ._crypto import row_context
from .conf import get_client
from .fields import BlindIndexField, Ciphertext, encrypted_fields

__all__ = ["BackfillReport", "encrypt_column"]

_PREFIX = "fk1:"


@dataclass
class BackfillReport:
    """What :func:`encrypt_column` did."""

    encrypted: int = 0
    already: int = 0
    nulls: int = 0
    conflicts: int = 0


def encrypt_column(
    model: Any,
    field_name: str,
    *,
    tenant_field: str,
    subject_field: str | None = None,
    batch_size: int = 1000,
    using: str = "default",
    client: Any = None,
) -> BackfillReport:
    """Encrypt the plaintext values of one EncryptedTextField/EncryptedCharField column,
    in primary-key order, ``batch_size`` rows at a time (one EncryptColumn per tenant
    of many rows in the batch, one EncryptBatch for the others; blind indexes likewise
    when the model has a BlindIndexField on the column), each batch committed on its own.

    Resumable and safe to run beside the application: values already in the ``fk1:``
    form are left alone, and each row is written only if the column still holds the
    plaintext that was read (``UPDATE ... WHERE pk = %s AND col = %s``); rows changed
    meanwhile are counted as ``conflicts`` (an application writing through the model
    encrypts them itself). Raises the first failed item's exception.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    field = model._meta.get_field(field_name)
    if field not in encrypted_fields(model):
        raise TypeError(f"{model.__name__}.{field_name} is not an encrypted field")
    index = next(
        (b for b in model._meta.concrete_fields if isinstance(b, BlindIndexField) and b.source == field_name), None
    )
    fk = client or get_client()
    conn = connections[using]
    qn = conn.ops.quote_name
    table = qn(model._meta.db_table)
    pk_col = qn(model._meta.pk.column)
    col = qn(field.column)
    cols = ["pk", tenant_field] + ([subject_field] if subject_field else []) + [field.attname]
    report = BackfillReport()
    last: Any = None
    while True:
        qs = model._base_manager.using(using).order_by("pk")
        if last is not None:
            qs = qs.filter(pk__gt=last)
        rows = list(qs.values_list(*cols)[:batch_size])
        if not rows:
            return report
        last = rows[-1][0]
        todo = []
        for row in rows:
            pk, tenant, value = row[0], row[1], row[-1]
            subject = row[2] if subject_field else None
            if value is None:
                report.nulls += 1
            elif str(value).startswith(_PREFIX):
                report.already += 1
            else:
                todo.append((pk, str(tenant), str(subject) if subject not in (None, "") else None, str(value)))
        if not todo:
            continue
        enc = _columns.encrypt(
            fk,
            [
                (t, field.fieldkey_name, v, s if field.per_subject else None, row_context(model, field, pk))
                for (pk, t, s, v) in todo
            ],
        )
        cts = [r.unwrap() for r in enc]
        idx: list[Any] = [None] * len(todo)
        if index is not None:
            res = _columns.blind_index(fk, [(t, field.fieldkey_name, v) for (_, t, _, v) in todo])
            idx = [r.unwrap().index for r in res]
        with transaction.atomic(using=using), conn.cursor() as cur:
            for (pk, _, _, v), ct, ix in zip(todo, cts, idx):
                if index is not None:
                    cur.execute(
                        f"UPDATE {table} SET {col} = %s, {qn(index.column)} = %s WHERE {pk_col} = %s AND {col} = %s",  # noqa: S608
                        [str(Ciphertext(ct)), ix, pk, v],
                    )
                else:
                    cur.execute(
                        f"UPDATE {table} SET {col} = %s WHERE {pk_col} = %s AND {col} = %s",  # noqa: S608
                        [str(Ciphertext(ct)), pk, v],
                    )
                if cur.rowcount == 1:
                    report.encrypted += 1
                else:
                    report.conflicts += 1
