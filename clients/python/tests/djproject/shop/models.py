"""The test project's models: every way the integration is meant to be used."""

import uuid

from django.db import models

from fieldkey.django import BlindIndexField, EncryptedCharField, EncryptedTextField, FieldkeyModel


class Customer(FieldkeyModel):
    """Auto-increment pk (pk-bound values need the two-step insert); per-subject email
    with a blind index; a tenant-scoped note."""

    fieldkey_tenant_field = "tenant"
    fieldkey_subject_field = "user_id"

    tenant = models.CharField(max_length=64)
    user_id = models.CharField(max_length=64, blank=True, default="")
    email = EncryptedCharField(max_length=254)
    email_bidx = BlindIndexField(source="email")
    note = EncryptedTextField(null=True, blank=True, per_subject=False)

    class Meta:
        indexes = [models.Index(fields=["tenant", "email_bidx"])]


class Ticket(FieldkeyModel):
    """A UUID pk known before the INSERT; the scope hook as a method; unbound context."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="tickets")
    org = models.CharField(max_length=64)
    body = EncryptedTextField(fieldkey_field="ticket-body", per_subject=False)
    summary = EncryptedTextField(null=True, bind_pk=False, per_subject=False)

    def fieldkey_scope(self):
        return (self.org, None)


class VipCustomer(Customer):
    """Multi-table inheritance: the inherited encrypted fields live in the parent's table
    (shop_customer, keyed by id), this one in the child's (keyed by customer_ptr_id)."""

    perk = EncryptedTextField(null=True, blank=True, per_subject=False)
