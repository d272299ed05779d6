"""FieldkeyModel (the scope hook and pk-bound inserts), FieldkeyQuerySet (one batch call
per evaluation) and blind-index lookups."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import models, router, transaction
from django.db.models.query import ModelIterable

from . import _columns, _crypto
from .conf import get_client
from .fields import BlindIndexField, encrypted_fields, index_fields

__all__ = ["FieldkeyManager", "FieldkeyModel", "FieldkeyQuerySet", "blind_lookup"]


def _index_for(model: Any, source: str) -> BlindIndexField:
    for b in index_fields(model):
        if b.source == source:
            return b
    raise FieldError(f"{model.__name__}.{source} has no BlindIndexField(source={source!r})")


def blind_lookup(model: Any, tenant: str, **values: Any) -> dict[str, Any]:
    """Filter arguments that find rows by encrypted value through their blind index:
    ``Customer.objects.filter(**blind_lookup(Customer, "acme", email="a@example.org"))``.

    ``<field>=value`` matches one value, ``<field>__in=[...]`` any of several (one
    BlindIndexBatch, or a BlindIndexColumn per field of many values). Each value is matched under every usable key version (lookup
    mode: 2 index values between a rotation and the old version's retirement). Adds
    ``<tenant field>=tenant`` when the model sets ``fieldkey_tenant_field``.
    """
    if not values:
        raise TypeError("blind_lookup needs a field=value (or field__in=[...]) argument")
    out: dict[str, Any] = {}
    items: list[tuple[str, str, str | bytes]] = []
    targets: list[str] = []
    for key, value in values.items():
        source, _, op = key.partition("__")
        if op not in ("", "in"):
            raise FieldError(f"blind_lookup supports only exact and __in lookups, not {key}")
        b = _index_for(model, source)
        field_name = b.source_field.fieldkey_name
        vals = list(value) if op == "in" else [value]
        for v in vals:
            if not isinstance(v, (str, bytes)):
                raise TypeError(f"blind_lookup value for {key} must be str, not {type(v).__name__}")
            items.append((tenant, field_name, v))
            targets.append(b.attname)
    results = _columns.blind_index(get_client(), items, lookup=True)
    for attname, r in zip(targets, results):
        out.setdefault(f"{attname}__in", []).extend(r.unwrap().lookup)
    for k in list(out):
        if not out[k]:
            out[k] = [""]  # __in=[] raises EmptyResultSet: keep the query valid, matching nothing
    tenant_field = getattr(model, "fieldkey_tenant_field", None)
    if tenant_field:
        out[tenant_field] = tenant
    return out


class FieldkeyQuerySet(models.QuerySet):
    """Decrypts the rows of an evaluation with one DecryptColumn per (tenant, field) of
    many values and one DecryptBatch for the rest (chunked by the client's batch
    limits); encrypts bulk_create / bulk_update the same way (EncryptColumn,
    EncryptBatch)."""

    _result_cache: list[Any] | None

    def _fetch_all(self) -> None:
        fresh = self._result_cache is None
        super()._fetch_all()
        cache = self._result_cache
        if fresh and cache and issubclass(self._iterable_class, ModelIterable):
            try:
                _crypto.decrypt_instances(cache)
            except BaseException:
                self._result_cache = None
                self._prefetch_done = False
                raise

    def iterator(self, chunk_size: int | None = None) -> Iterator[Any]:
        it = super().iterator(chunk_size)
        if not issubclass(self._iterable_class, ModelIterable):
            return it
        return self._decrypting(it, chunk_size or 2000)

    @staticmethod
    def _decrypting(it: Iterator[Any], n: int) -> Iterator[Any]:
        buf: list[Any] = []
        for obj in it:
            buf.append(obj)
            if len(buf) >= n:
                _crypto.decrypt_instances(buf)
                yield from buf
                buf = []
        if buf:
            _crypto.decrypt_instances(buf)
            yield from buf

    def bulk_create(self, objs: Iterable[Any], *args: Any, **kwargs: Any) -> list[Any]:
        objs = list(objs)
        if not objs:
            return super().bulk_create(objs, *args, **kwargs)
        with transaction.atomic(using=self.db, savepoint=False):
            if any(f.bind_pk for f in encrypted_fields(self.model)):
                missing = [o for o in objs if o.pk is None]
                pks = _crypto.reserve_pks(self.model, len(missing), self.db) if missing else None
                if pks is not None:
                    for o, pk in zip(missing, pks):
                        o.pk = pk
            post = _crypto.seal_instances(objs, None, placeholder_pk=True)
            try:
                created = super().bulk_create(objs, *args, **kwargs)
            except BaseException:
                _crypto.discard(objs)
                raise
            _crypto.commit(objs)
            if post:
                if any(o.pk is None for o in post):
                    raise ImproperlyConfigured(
                        f"{self.model.__name__}: bulk_create did not return primary keys on this database, "
                        "so pk-bound encrypted fields cannot be sealed; set the pks before bulk_create "
                        "(e.g. a UUID pk) or use bind_pk=False"
                    )
                names = [f.attname for f in encrypted_fields(self.model) if f.bind_pk]  # type: ignore[attr-defined]
                self._write_sealed(post, names, None, batch_size=200)
        return created

    def bulk_update(self, objs: Iterable[Any], fields: Iterable[str], *args: Any, **kwargs: Any) -> int:
        objs = list(objs)
        fields = list(fields)
        enc = {f.name for f in encrypted_fields(self.model)} | {f.attname for f in encrypted_fields(self.model)}  # type: ignore[attr-defined]
        idx = {b.name: b for b in index_fields(self.model)}
        # an index follows its source
        extra = [n for n, b in idx.items() if b.source in fields and n not in fields]
        all_fields = fields + extra
        if not (set(all_fields) & (enc | set(idx))) or not objs:
            return int(super().bulk_update(objs, fields, *args, **kwargs))
        with transaction.atomic(using=self.db, savepoint=False):
            _crypto.seal_instances(objs, all_fields, placeholder_pk=False)
            return self._write_sealed(objs, None, all_fields, *args, **kwargs)

    def _write_sealed(
        self, objs: list[Any], attnames: list[str] | None, fields: list[str] | None = None, *args: Any, **kwargs: Any
    ) -> int:
        """bulk_update with the sealed values standing in for the plaintexts."""
        if attnames is not None:
            # the second step of a pk-bound insert: the INSERT wrote the indexes already
            _crypto.seal_instances(objs, attnames, placeholder_pk=False, with_indexes=False)
            fields = attnames
        assert fields is not None
        saved: list[dict[str, Any]] = []
        try:
            for o in objs:
                sealed = o.__dict__["_fieldkey_sealed"]
                saved.append({k: o.__dict__.get(k) for k in sealed})
                o.__dict__.update(sealed)
            n = int(super().bulk_update(objs, fields, *args, **kwargs))
        except BaseException:
            for o, old in zip(objs, saved):
                o.__dict__.update(old)
            _crypto.discard(objs)
            raise
        for o, old in zip(objs, saved):
            o.__dict__.update(old)
        _crypto.commit(objs)
        return n

    def blind_filter(self, tenant: str, **values: Any) -> FieldkeyQuerySet:
        """Rows whose encrypted ``<field>`` equals a value (or ``<field>__in`` one of
        several), found through the field's BlindIndexField; see :func:`blind_lookup`.

        Below 128 index bits a match may rarely be a false positive (about N / 2**bits
        per lookup for N distinct values); compare the decrypted value when it matters.
        """
        return self.filter(**blind_lookup(self.model, tenant, **values))

    def decrypt(self) -> FieldkeyQuerySet:
        """Evaluate now (one batch call) and return self; for clarity at call sites."""
        self._fetch_all()
        return self


class FieldkeyManager(models.Manager.from_queryset(FieldkeyQuerySet)):  # type: ignore[misc]
    """The default manager of a FieldkeyModel. Also used for related managers, so
    ``customer.tickets.all()`` and prefetch_related batch too."""


class FieldkeyModel(models.Model):
    """Base of models with encrypted fields.

    Tenant and subject come from :meth:`fieldkey_scope`: set ``fieldkey_tenant_field``
    (and, for per-user erasure, ``fieldkey_subject_field``) to attribute names, or
    override the method. A subject that is None or empty makes that row's values
    tenant-scoped.

    Inserting a row whose primary key the database assigns (AutoField), with pk-bound
    encrypted fields: on PostgreSQL the pk is taken from the column's sequence first
    (``nextval``; bulk_create takes one per row in one query), then the values are
    encrypted bound to it and the row is inserted in one statement. On other databases,
    ``save()``/``bulk_create`` run, in one transaction, the INSERT with an empty
    placeholder in those columns, one EncryptBatch bound to the new pks, and an UPDATE
    of those columns. A pk set before saving (a UUID default, an explicit id) needs
    neither.
    """

    fieldkey_tenant_field: ClassVar[str | None] = None
    fieldkey_subject_field: ClassVar[str | None] = None

    objects = FieldkeyManager()

    class Meta:
        abstract = True

    def fieldkey_scope(self) -> tuple[str | None, str | None]:
        """(tenant id, subject id or None) that this row's values are encrypted for."""
        if not self.fieldkey_tenant_field:
            raise ImproperlyConfigured(
                f"{type(self).__name__}: set fieldkey_tenant_field (and fieldkey_subject_field) "
                "or override fieldkey_scope()"
            )
        tenant = getattr(self, self.fieldkey_tenant_field)
        subject = getattr(self, self.fieldkey_subject_field) if self.fieldkey_subject_field else None
        return (
            tenant if tenant is None or isinstance(tenant, str) else str(tenant),
            subject if subject is None or isinstance(subject, str) else str(subject),
        )

    def save(self, *args: Any, **kwargs: Any) -> None:
        update_fields = kwargs.get("update_fields")
        if update_fields is not None:
            update_fields = list(update_fields)
            idx_sources = {b.source: b.name for b in index_fields(type(self))}
            extra = [idx_sources[f] for f in update_fields if f in idx_sources and idx_sources[f] not in update_fields]
            if extra:
                kwargs["update_fields"] = update_fields = update_fields + extra
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=using, savepoint=False):
            if self.pk is None and any(f.bind_pk for f in encrypted_fields(type(self))):  # type: ignore[has-type]
                pks = _crypto.reserve_pks(type(self), 1, using)
                if pks is not None:
                    self.pk = pks[0]
                    kwargs.setdefault("force_insert", True)
            post = _crypto.seal_instances([self], update_fields, placeholder_pk=True)
            try:
                super().save(*args, **kwargs)
            except BaseException:
                _crypto.discard([self])
                raise
            _crypto.commit([self])
            if post:
                names = [
                    f.attname  # type: ignore[attr-defined]
                    for f in encrypted_fields(type(self))
                    if f.bind_pk and (update_fields is None or f.name in update_fields)  # type: ignore[attr-defined]
                ]
                _crypto.seal_instances([self], names, placeholder_pk=False, with_indexes=False)
                sealed = self.__dict__["_fieldkey_sealed"]
                try:
                    type(self)._base_manager.using(using).filter(pk=self.pk).update(
                        **{n: sealed[n] for n in names if n in sealed}
                    )
                except BaseException:
                    _crypto.discard([self])
                    raise
                _crypto.commit([self])

