"""Django integration: encrypted model fields, blind-index lookups, batch decryption.

    from fieldkey.django import (
        BlindIndexField, EncryptedCharField, EncryptedTextField, FieldkeyModel,
    )

    class Customer(FieldkeyModel):
        fieldkey_tenant_field = "tenant_id"
        fieldkey_subject_field = "user_id"

        tenant_id = models.CharField(max_length=64)
        user_id = models.CharField(max_length=64)
        email = EncryptedCharField(max_length=254)
        email_bidx = BlindIndexField(source="email")

    Customer.objects.blind_filter("acme", email="alice@example.com")

Configure the sidecar connection with ``settings.FIELDKEY`` (see :mod:`fieldkey.django.conf`)
and read docs/CLIENTS.md.
"""

from __future__ import annotations

from ._crypto import MissingScope, decrypt_instances, save_repairs
from .backfill import encrypt_column
from .conf import get_client, reset_client
from .fields import BlindIndexField, Ciphertext, EncryptedCharField, EncryptedTextField, PlaintextRefused
from .models import FieldkeyManager, FieldkeyModel, FieldkeyQuerySet, blind_lookup

__all__ = [
    "BlindIndexField",
    "Ciphertext",
    "EncryptedCharField",
    "EncryptedTextField",
    "FieldkeyManager",
    "FieldkeyModel",
    "FieldkeyQuerySet",
    "MissingScope",
    "PlaintextRefused",
    "blind_lookup",
    "decrypt_instances",
    "encrypt_column",
    "get_client",
    "reset_client",
    "save_repairs",
]
