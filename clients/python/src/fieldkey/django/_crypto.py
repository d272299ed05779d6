"""Batch encryption of model instances before a write, batch decryption after a read."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .._core import UNBOUND, Unbound
from ..errors import FieldkeyError
from . import _columns
from .conf import get_client, read_repair
from .fields import Ciphertext, _EncryptedMixin, _Failed, _Pending, encrypted_fields, index_fields

__all__ = ["MissingScope", "decrypt_instances", "save_repairs", "scope_of", "seal_instances"]

_MISSING = object()
#: (tenant, subject or None, context): the pk's text, or UNBOUND for a bind_pk=False field.
Scope = tuple[str, "str | None", "bytes | Unbound"]


class MissingScope(FieldkeyError, ValueError):
    """A model instance cannot say which tenant (or row) a value belongs to."""


def tenant_of(instance: Any) -> str:
    tenant, _ = instance.fieldkey_scope()
    if not isinstance(tenant, str) or not tenant:
        raise MissingScope(
            f"{type(instance).__name__}.fieldkey_scope() gave no tenant (got {type(tenant).__name__})"
        )
    return tenant


def scope_of(instance: Any, field: _EncryptedMixin) -> Scope:
    """(tenant, subject or None, context bytes) of one encrypted field of an instance."""
    tenant, subject = instance.fieldkey_scope()
    if not isinstance(tenant, str) or not tenant:
        raise MissingScope(
            f"{type(instance).__name__}.fieldkey_scope() gave no tenant (got {type(tenant).__name__})"
        )
    if not field.per_subject or subject is None or subject == "":
        subject = None
    elif not isinstance(subject, str):
        subject = str(subject)
    ctx = row_context(type(instance), field, instance.pk)
    return tenant, subject, ctx


def row_context(model: Any, field: _EncryptedMixin, pk: Any) -> bytes | Unbound:
    """The context of a field's value in the row with primary key ``pk``: the pk's text,
    or :data:`fieldkey.UNBOUND` for a ``bind_pk=False`` field (declared unbound in the
    model). Never an empty context by accident: a pk-bound value of a row without a
    primary key (or with an empty one) raises :class:`MissingScope`."""
    if not field.bind_pk:
        return UNBOUND
    if pk is None:
        raise MissingScope(
            f"{model.__name__}.{field.name} binds the primary key, which is not known yet"  # type: ignore[attr-defined]
        )
    ctx = str(pk).encode()
    if not ctx:
        raise MissingScope(
            f"{model.__name__}.{field.name} binds the primary key, which is empty: its value "  # type: ignore[attr-defined]
            "could be copied into any row"
        )
    return ctx


def reserve_pks(model: Any, n: int, using: str) -> list[Any] | None:
    """On PostgreSQL, ``n`` values from the sequence of the model's auto-increment pk,
    so that pk-bound values can be encrypted before the INSERT (one statement). None
    where that is not possible (other databases, pks without a sequence)."""
    from django.db import connections
    from django.db.models.fields import AutoFieldMixin

    conn = connections[using]
    pk = model._meta.pk
    if conn.vendor != "postgresql" or not isinstance(pk, AutoFieldMixin) or n < 1:
        return None
    with conn.cursor() as cur:
        cur.execute("SELECT pg_get_serial_sequence(%s, %s)", [conn.ops.quote_name(model._meta.db_table), pk.column])
        row = cur.fetchone()
        if not row or not row[0]:
            return None
        cur.execute("SELECT nextval(%s) FROM generate_series(1, %s)", [row[0], n])
        return [r[0] for r in cur.fetchall()]


def _loaded(instance: Any) -> dict[str, tuple[str, str, Scope]]:
    d: dict[str, tuple[str, str, Scope]] | None = instance.__dict__.get("_fieldkey_loaded")
    if d is None:
        d = {}
        instance.__dict__["_fieldkey_loaded"] = d
    return d


def _repaired(instance: Any) -> dict[str, tuple[str, str, Any]]:
    """Read repair's findings (``READ_REPAIR``): for a field loaded stale, (the
    ciphertext loaded, the same value re-encrypted under the active version, the
    instance's primary key at load: the row it was read from, for a field whose scope
    does not bind the pk)."""
    d: dict[str, tuple[str, str, Any]] | None = instance.__dict__.get("_fieldkey_repaired")
    if d is None:
        d = {}
        instance.__dict__["_fieldkey_repaired"] = d
    return d


def _wanted(field: Any, wanted: set[str] | None) -> bool:
    return wanted is None or field.name in wanted or field.attname in wanted


def seal_instances(
    instances: Sequence[Any], fields: Iterable[str] | None, *, placeholder_pk: bool, with_indexes: bool = True
) -> list[Any]:
    """Encrypt what each instance will write, one EncryptColumn per (tenant, field) of
    many values and one EncryptBatch for the rest (blind indexes likewise, see
    :mod:`._columns`); the results wait in ``_fieldkey_sealed`` for the
    fields' ``pre_save``. Unchanged values (same plaintext and scope as loaded) keep
    their stored ciphertext, or, when it was loaded stale with read repair, are written
    as the repaired ciphertext the load returned (no sidecar call); untouched ones
    (never decrypted) are written back as they are. With ``placeholder_pk``, pk-bound values of instances without a primary key
    are sealed as ``""`` and those instances returned: seal them again once the INSERT
    gave them a key. Raises the first failed item's exception (nothing is written)."""
    wanted = None if fields is None else set(fields)
    enc_todo: list[tuple[Any, _EncryptedMixin, str, Scope]] = []
    idx_todo: list[tuple[Any, Any, str, str]] = []
    post: list[Any] = []
    for inst in instances:
        data = inst.__dict__
        sealed: dict[str, Any] = {}
        data["_fieldkey_sealed"] = sealed
        data["_fieldkey_sealing"] = {}
        changed: set[str] = set()
        needs_post = False
        model = type(inst)
        for f in encrypted_fields(model):
            if not _wanted(f, wanted):
                continue
            name = f.attname  # type: ignore[attr-defined]
            if name not in data:
                continue  # deferred: not written
            v = data[name]
            if v is None:
                sealed[name] = None
                continue
            if type(v) is _Pending or type(v) is _Failed:
                sealed[name] = Ciphertext(v.ciphertext)
                continue
            if isinstance(v, Ciphertext):
                sealed[name] = v
                continue
            if not isinstance(v, str):
                raise TypeError(f"{model.__name__}.{f.name} must be str, not {type(v).__name__}")  # type: ignore[attr-defined]
            if f.bind_pk and inst.pk is None:
                if not placeholder_pk:
                    raise MissingScope(
                        f"{model.__name__}.{f.name} binds the primary key, which the database has not "  # type: ignore[attr-defined]
                        "assigned yet: save through FieldkeyModel.save() or the FieldkeyQuerySet"
                    )
                sealed[name] = Ciphertext("")
                changed.add(name)
                needs_post = True
                continue
            scope = scope_of(inst, f)
            prev = _loaded(inst).get(name)
            if prev is not None and prev[1] == v and prev[2] == scope:
                fixed = _repaired(inst).get(name)
                if fixed is not None and fixed[0] == prev[0]:
                    # Read repair: the value as loaded, re-encrypted under the active
                    # version at load time (same tenant, subject, field and pk).
                    sealed[name] = Ciphertext(fixed[1])
                    data["_fieldkey_sealing"][name] = (fixed[1], v, scope)
                else:
                    sealed[name] = Ciphertext(prev[0])
                continue
            enc_todo.append((inst, f, v, scope))
            changed.add(name)
        for b in index_fields(model) if with_indexes else ():
            if not (_wanted(b, wanted) or (wanted is not None and b.source in wanted)):
                continue
            src = b.source_field
            sv = data.get(src.attname, _MISSING)  # type: ignore[attr-defined]
            cur = data.get(b.attname)
            if sv is _MISSING or type(sv) is _Pending or type(sv) is _Failed:
                sealed[b.attname] = cur
            elif sv is None:
                sealed[b.attname] = None
            elif src.attname in changed or cur is None:  # type: ignore[attr-defined]
                idx_todo.append((inst, b, tenant_of(inst), str(sv)))
            else:
                sealed[b.attname] = cur
        if needs_post:
            post.append(inst)
    try:
        client = get_client()
        if enc_todo:
            results = _columns.encrypt(client, [(s[0], f.fieldkey_name, v, s[1], s[2]) for (_, f, v, s) in enc_todo])
            for (inst, f, v, s), r in zip(enc_todo, results):
                if r.error is not None:
                    raise r.error
                ct = r.unwrap()
                inst.__dict__["_fieldkey_sealed"][f.attname] = Ciphertext(ct)  # type: ignore[attr-defined]
                inst.__dict__["_fieldkey_sealing"][f.attname] = (ct, v, s)  # type: ignore[attr-defined]
        if idx_todo:
            iresults = _columns.blind_index(client, [(t, b.source_field.fieldkey_name, v) for (_, b, t, v) in idx_todo])
            for (inst, b, _, _), ir in zip(idx_todo, iresults):
                if ir.error is not None:
                    raise ir.error
                inst.__dict__["_fieldkey_sealed"][b.attname] = ir.unwrap().index
    except BaseException:
        discard(instances)
        raise
    return post


def commit(instances: Iterable[Any]) -> None:
    """After a successful write: remember what the rows now hold."""
    for inst in instances:
        data = inst.__dict__
        sealing = data.pop("_fieldkey_sealing", None) or {}
        sealed = data.pop("_fieldkey_sealed", None) or {}
        _loaded(inst).update(sealing)
        for b in index_fields(type(inst)):
            if b.attname in sealed:
                data[b.attname] = sealed[b.attname]


def discard(instances: Iterable[Any]) -> None:
    for inst in instances:
        inst.__dict__.pop("_fieldkey_sealed", None)
        inst.__dict__.pop("_fieldkey_sealing", None)


def _walk(instances: Iterable[Any]) -> Iterator[Any]:
    """The instances and the related instances cached in them (select_related)."""
    seen: set[int] = set()
    stack = list(instances)
    while stack:
        inst = stack.pop()
        if inst is None or id(inst) in seen:
            continue
        seen.add(id(inst))
        yield inst
        state = getattr(inst, "_state", None)
        cache = getattr(state, "fields_cache", None)
        if cache:
            stack.extend(v for v in cache.values() if hasattr(v, "_meta"))


def decrypt_instances(instances: Iterable[Any]) -> int:
    """Decrypt every pending encrypted value of the instances (and of their
    select_related instances): one DecryptColumn per (tenant, field) of many values, one
    DecryptBatch for the rest (see :mod:`._columns`; split into requests by the client's
    batch limits); with ``FIELDKEY["READ_REPAIR"]``, a stale value's repaired
    ciphertext is kept for the next save. A value that fails (shredded, suspended, altered, moved) stores its
    exception, raised when the attribute is read: the other rows load normally.
    Returns the number of values decrypted."""
    todo: list[tuple[Any, _EncryptedMixin, str, Scope]] = []
    for inst in _walk(instances):
        for f in encrypted_fields(type(inst)):
            v = inst.__dict__.get(f.attname)  # type: ignore[attr-defined]
            if type(v) is not _Pending:
                continue
            try:
                scope = scope_of(inst, f)
            except Exception as e:  # noqa: BLE001 - kept for the attribute's reader
                inst.__dict__[f.attname] = _Failed(v.ciphertext, e)  # type: ignore[attr-defined]
                continue
            todo.append((inst, f, v.ciphertext, scope))
    if not todo:
        return 0
    repair = read_repair()
    values = [(s[0], f.fieldkey_name, ct, s[1], s[2]) for (_, f, ct, s) in todo]
    results = _columns.decrypt(get_client(), values, repair=repair)
    for (inst, f, ct, s), r in zip(todo, results):
        name = f.attname  # type: ignore[attr-defined]
        if r.error is None:
            pt = r.unwrap()
            if repair:
                if pt.repaired is not None:
                    _repaired(inst)[name] = (ct, pt.repaired, inst.pk)
                pt = pt.value
            inst.__dict__[name] = pt
            _loaded(inst)[name] = (ct, pt, s)
        else:
            inst.__dict__[name] = _Failed(ct, r.error)
    return len(todo)


def save_repairs(instances: Iterable[Any], *, using: str | None = None) -> int:
    """Write back the repaired ciphertexts that loading with ``FIELDKEY["READ_REPAIR"]``
    obtained, for instances that will not be saved (a page that is only read): one
    ``UPDATE`` per stale value, in the table of the model that declares its field (under
    multi-table inheritance, a parent's fields are in the parent's table), which changes
    the column only where it still holds the ciphertext that was loaded (compare-and-set:
    a row written by anyone since is left as it is, and its value stays for a
    re-encryption job). A value is skipped when its instance's scope has changed in
    memory since the load (tenant, subject, or primary key: the repaired value is bound
    to those it was loaded with). All of a database's UPDATEs are one transaction
    (``transaction.atomic``): an error rolls them all back and is raised, and the
    instances keep their repairs for a later call (not atomic across databases). No
    sidecar call. Returns the number of values written; each written value counts as
    loaded (a later ``save()`` keeps it)."""
    from django.db import connections, router, transaction

    # Per database, in order: (instance, attname, SQL, parameters).
    planned: dict[str, list[tuple[Any, str, str, list[Any]]]] = {}
    for inst in instances:
        fixed = inst.__dict__.get("_fieldkey_repaired") or {}
        if not fixed:
            continue
        model = type(inst)
        loaded = _loaded(inst)
        db = using or router.db_for_write(model, instance=inst)
        conn = connections[db]
        q = conn.ops.quote_name
        for f in encrypted_fields(model):
            name = f.attname  # type: ignore[attr-defined]
            pair = fixed.get(name)
            prev = loaded.get(name)
            if pair is None or prev is None or prev[0] != pair[0] or inst.pk != pair[2]:
                continue
            try:
                scope = scope_of(inst, f)
            except MissingScope:
                continue
            if scope != prev[2]:
                continue
            # The model whose table holds the column: a parent's under multi-table
            # inheritance (its pk has the same value as the child's).
            owner = f.model._meta.concrete_model._meta  # type: ignore[attr-defined]
            sql = "UPDATE {} SET {} = %s WHERE {} = %s AND {} = %s".format(  # noqa: S608 - quoted names
                q(owner.db_table), q(f.column), q(owner.pk.column), q(f.column)  # type: ignore[attr-defined]
            )
            params = [pair[1], owner.pk.get_db_prep_value(inst.pk, conn), pair[0]]
            planned.setdefault(db, []).append((inst, name, sql, params))
    written = 0
    for db, updates in planned.items():
        done: list[tuple[Any, str]] = []
        with transaction.atomic(using=db), connections[db].cursor() as cur:
            for inst, name, sql, params in updates:
                cur.execute(sql, params)
                if cur.rowcount == 1:
                    done.append((inst, name))
        # Committed (or released into the caller's transaction): now they are loaded.
        for inst, name in done:
            loaded = _loaded(inst)
            prev = loaded[name]
            loaded[name] = (inst.__dict__["_fieldkey_repaired"][name][1], prev[1], prev[2])
            written += 1
    return written
