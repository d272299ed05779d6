"""Model fields: ``EncryptedTextField``, ``EncryptedCharField`` and ``BlindIndexField``.

The column holds the text envelope (``fk1:...``); the model attribute holds the
plaintext ``str``. Encryption happens on save (one EncryptBatch per save, bulk_create
or bulk_update), decryption when a :class:`~fieldkey.django.FieldkeyQuerySet` is
evaluated (one DecryptBatch per evaluation, chunked) or, for an instance loaded another
way, on first access of the attribute.

What a value is bound to (docs/CLIENTS.md):

* tenant and subject: ``instance.fieldkey_scope()`` (see :class:`FieldkeyModel`);
  ``per_subject=False`` makes a field tenant-scoped (no subject: not erasable per user);
* field name: ``"<db_table>.<column>"`` unless ``fieldkey_field="..."`` is given (it is
  also the blind-index profile name and the ``field`` of a re-encryption job spec);
* context: the row's primary key as text (``str(pk)``, the re-encryption job's
  ``context_column``) unless ``bind_pk=False``. A ciphertext copied into another row
  then fails to decrypt (AuthenticationFailed). A pk-bound value is never sent without
  its pk: before the database assigns one it is encrypted after the INSERT (see
  :class:`~fieldkey.django.FieldkeyModel`), and a missing or empty pk raises
  ``MissingScope``. ``bind_pk=False`` sends ``context=fieldkey.UNBOUND`` (deliberately
  unbound; system check fieldkey.W002), which a sidecar listing the field in
  ``[row_binding] required`` refuses (``ContextRequired``).
"""

from __future__ import annotations

import re
from typing import Any

from django.core import checks
from django.core.exceptions import FieldError
from django.db import models
from django.db.models.query_utils import DeferredAttribute

from ..errors import FieldkeyError

__all__ = [
    "BlindIndexField",
    "Ciphertext",
    "EncryptedCharField",
    "EncryptedTextField",
    "PlaintextRefused",
]

_FIELD_NAME = re.compile(r"^[\x21-\x7e]{1,255}$")


class Ciphertext(str):
    """A text envelope as stored in the column. Only values of this type (or None) can
    reach an encrypted column: a plain ``str`` is refused with :class:`PlaintextRefused`
    (so ``QuerySet.update(email="x")`` cannot write plaintext by mistake)."""

    __slots__ = ()


class PlaintextRefused(FieldkeyError, ValueError):
    """A plain value was about to be written to an encrypted column without encryption."""


class _Pending:
    """Loaded from the database, not decrypted yet."""

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: str) -> None:
        self.ciphertext = ciphertext


class _Failed:
    """Decryption failed; accessing the attribute raises ``error``. The stored
    ciphertext is kept and written back unchanged if the row is saved."""

    __slots__ = ("ciphertext", "error")

    def __init__(self, ciphertext: str, error: BaseException) -> None:
        self.ciphertext = ciphertext
        self.error = error


class EncryptedAttribute(DeferredAttribute):
    """The descriptor of an encrypted field: plaintext in, plaintext out; the
    ciphertext loaded from the database is decrypted when first needed."""

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is None:
            return self
        name = self.field.attname
        data = instance.__dict__
        if name not in data:
            super().__get__(instance, cls)  # deferred: loads it (refresh_from_db)
        v = data[name]
        if type(v) is _Pending:
            from ._crypto import decrypt_instances

            decrypt_instances([instance])
            v = data[name]
        if type(v) is _Failed:
            raise v.error
        return v

    def __set__(self, instance: Any, value: Any) -> None:
        if isinstance(value, Ciphertext):
            instance.__dict__[self.field.attname] = _Pending(str(value))
        else:
            instance.__dict__[self.field.attname] = value


class _EncryptedMixin:
    """What EncryptedTextField and EncryptedCharField share."""

    descriptor_class = EncryptedAttribute
    fieldkey_encrypted = True

    def _init_fieldkey(self, fieldkey_field: str | None, per_subject: bool, bind_pk: bool) -> None:
        self.fieldkey_field = fieldkey_field
        self.per_subject = per_subject
        self.bind_pk = bind_pk

    def _deconstruct_fieldkey(self, kwargs: dict[str, Any]) -> None:
        if self.fieldkey_field is not None:
            kwargs["fieldkey_field"] = self.fieldkey_field
        if not self.per_subject:
            kwargs["per_subject"] = False
        if not self.bind_pk:
            kwargs["bind_pk"] = False

    @property
    def fieldkey_name(self) -> str:
        """The fieldkey field name: ``fieldkey_field``, else ``"<db_table>.<column>"``."""
        if self.fieldkey_field:
            return self.fieldkey_field
        return f"{self.model._meta.db_table}.{self.column}"  # type: ignore[attr-defined]

    def get_internal_type(self) -> str:
        return "TextField"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None:
            return None
        return Ciphertext(value)

    def get_prep_value(self, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, Ciphertext):
            return str(value)
        raise PlaintextRefused(
            f"refusing to write a plain value to the encrypted column {self.fieldkey_name}: save it "
            "through a FieldkeyModel (save, bulk_create, bulk_update), or pass a "
            "fieldkey.django.Ciphertext"
        )

    def pre_save(self, model_instance: Any, add: bool) -> Any:
        sealed = model_instance.__dict__.get("_fieldkey_sealed")
        if sealed is None or self.attname not in sealed:  # type: ignore[attr-defined]
            # A path that bypasses FieldkeyModel.save / the queryset (loaddata's raw save):
            # encrypt this instance now.
            from ._crypto import seal_instances

            seal_instances([model_instance], None, placeholder_pk=False)
            sealed = model_instance.__dict__["_fieldkey_sealed"]
        return sealed[self.attname]  # type: ignore[attr-defined]

    def get_lookup(self, lookup_name: str) -> Any:
        if lookup_name == "isnull":
            return super().get_lookup(lookup_name)  # type: ignore[misc]
        raise FieldError(
            f"{self.fieldkey_name} is encrypted: it supports only __isnull lookups; search it "  # noqa: S608
            "through a BlindIndexField (Model.objects.blind_filter)"
        )

    def get_transform(self, lookup_name: str) -> Any:
        return None

    def _check_fieldkey(self) -> list[checks.CheckMessage]:
        from .models import FieldkeyModel, FieldkeyQuerySet

        errors: list[checks.CheckMessage] = []
        model = self.model  # type: ignore[attr-defined]
        if not issubclass(model, FieldkeyModel):
            errors.append(
                checks.Error(
                    f"{model.__name__} has encrypted fields but does not subclass fieldkey.django.FieldkeyModel",
                    obj=self,
                    id="fieldkey.E001",
                )
            )
        elif not isinstance(model._default_manager.get_queryset(), FieldkeyQuerySet):
            errors.append(
                checks.Warning(
                    f"{model.__name__}'s default manager does not return a FieldkeyQuerySet: "
                    "reads decrypt one row at a time",
                    hint="use fieldkey.django.FieldkeyManager (or FieldkeyQuerySet.as_manager())",
                    obj=self,
                    id="fieldkey.W001",
                )
            )
        if not self.bind_pk:
            errors.append(
                checks.Warning(
                    f"{model.__name__}.{self.name} has bind_pk=False: its values are not bound to "  # type: ignore[attr-defined]
                    "their row, so a ciphertext copied into another row of the tenant decrypts there",
                    hint="remove bind_pk=False (the primary key is the context), or silence "
                    "fieldkey.W002 for a value that is deliberately shared across rows; a sidecar "
                    "whose [row_binding] required lists this field refuses it",
                    obj=self,
                    id="fieldkey.W002",
                )
            )
        if not _FIELD_NAME.match(self.fieldkey_name):
            errors.append(
                checks.Error(
                    f"fieldkey field name {self.fieldkey_name!r} must be 1..255 visible ASCII characters",
                    hint="set fieldkey_field=",
                    obj=self,
                    id="fieldkey.E003",
                )
            )
        return errors


class EncryptedTextField(_EncryptedMixin, models.TextField):
    """A text value stored encrypted (``fk1:`` envelope in a text column).

    Options: ``fieldkey_field`` (default ``"<db_table>.<column>"``), ``per_subject``
    (default True: bound to the subject of ``fieldkey_scope()``), ``bind_pk`` (default
    True: the primary key's text is the record context).
    """

    def __init__(
        self,
        *args: Any,
        fieldkey_field: str | None = None,
        per_subject: bool = True,
        bind_pk: bool = True,
        **kwargs: Any,
    ) -> None:
        self._init_fieldkey(fieldkey_field, per_subject, bind_pk)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        self._deconstruct_fieldkey(kwargs)
        return name, "fieldkey.django.fields.EncryptedTextField", args, kwargs

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        return [*super().check(**kwargs), *self._check_fieldkey()]


class EncryptedCharField(_EncryptedMixin, models.CharField):
    """Like EncryptedTextField, with ``max_length`` checked on the plaintext (forms and
    ``full_clean``). The column is ``text``: an envelope is longer than its value
    (``4 + ceil((49 + bytes) * 4 / 3)`` characters)."""

    def __init__(
        self,
        *args: Any,
        fieldkey_field: str | None = None,
        per_subject: bool = True,
        bind_pk: bool = True,
        **kwargs: Any,
    ) -> None:
        self._init_fieldkey(fieldkey_field, per_subject, bind_pk)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        self._deconstruct_fieldkey(kwargs)
        return name, "fieldkey.django.fields.EncryptedCharField", args, kwargs

    def db_type(self, connection: Any) -> Any:
        return models.TextField().db_type(connection)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        return [*super().check(**kwargs), *self._check_fieldkey()]


class BlindIndexField(models.CharField):
    """The blind index (``fkb1:...``) of an encrypted field, kept up to date on save;
    search with ``Model.objects.blind_filter(tenant, <source>=value)``.

    ``source``: the name of the EncryptedTextField/EncryptedCharField it indexes. The
    sidecar needs a profile for that field's fieldkey name
    (``[blind_index.fields."<db_table>.<column>"]``), else IndexNotConfigured on save.
    Nullable (a re-encryption job clears the index of a shredded value) and indexed.
    """

    def __init__(self, *args: Any, source: str, **kwargs: Any) -> None:
        self.source = source
        kwargs.setdefault("max_length", 96)
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        kwargs.setdefault("db_index", True)
        kwargs.setdefault("editable", False)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs["source"] = self.source
        return name, "fieldkey.django.fields.BlindIndexField", args, kwargs

    @property
    def source_field(self) -> _EncryptedMixin:
        f = self.model._meta.get_field(self.source)
        if not getattr(f, "fieldkey_encrypted", False):
            raise FieldError(f"BlindIndexField {self.name}: source {self.source!r} is not an encrypted field")
        return f

    def pre_save(self, model_instance: Any, add: bool) -> Any:
        sealed = model_instance.__dict__.get("_fieldkey_sealed")
        if sealed is None or self.attname not in sealed:
            from ._crypto import seal_instances

            seal_instances([model_instance], None, placeholder_pk=False)
            sealed = model_instance.__dict__["_fieldkey_sealed"]
        return sealed[self.attname]

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        errors = list(super().check(**kwargs))
        try:
            self.source_field
        except Exception as e:  # noqa: BLE001 - reported as a check
            errors.append(checks.Error(str(e), obj=self, id="fieldkey.E002"))
        return errors


def encrypted_fields(model: Any) -> list[_EncryptedMixin]:
    return [f for f in model._meta.concrete_fields if getattr(f, "fieldkey_encrypted", False)]


def index_fields(model: Any) -> list[BlindIndexField]:
    return [f for f in model._meta.concrete_fields if isinstance(f, BlindIndexField)]
