"""The process-wide client, configured from ``settings.FIELDKEY``::

    FIELDKEY = {
        "TARGET": "127.0.0.1:7450",          # or "unix:/run/fieldkey/fieldkey.sock"
        "TLS": {                             # only for an mTLS listener
            "ROOT_CA": "/etc/fieldkey/tls/ca.crt",
            "CERT": "/etc/fieldkey/tls/tls.crt",
            "KEY": "/etc/fieldkey/tls/tls.key",
            "SERVER_NAME": "fieldkey.internal",   # optional
        },
        "TIMEOUT": 10.0,                     # seconds per RPC, retries included
        "RETRY": {"MAX_ATTEMPTS": 4, "INITIAL_BACKOFF": 0.05, "MAX_BACKOFF": 1.0},
        "MAX_BATCH_ITEMS": 10000,            # the sidecar's limits.max_batch_items
        "MAX_BATCH_BYTES": 4194304,
        "INTERCEPTORS": [],                  # grpc client interceptors, or dotted paths to them
        "COLUMN_MIN_VALUES": 32,             # see below
        "READ_REPAIR": False,                # see below
    }

``COLUMN_MIN_VALUES``: the values of one (tenant, field) in a page, a save or a
backfill batch go as one columnar call (DecryptColumn, EncryptColumn,
BlindIndexColumn) when there are at least this many (default 32), else with the other
small groups in one item batch (one round trip for them all); ``1``: always columns;
``None``: item batches only.

``READ_REPAIR`` (default False): decrypt loaded rows with read repair
(docs/ROTATION.md): a value under a decrypt-only key version comes back re-encrypted
under the active version too, and the instance's next ``save()`` (or ``bulk_update``
of the field) writes that ciphertext if the value was not changed, with no sidecar call
at save time. The sidecar's policies must allow the application ``Crypto::Rewrap`` on
the fields as well as ``Crypto::Decrypt`` (else every load fails with
PermissionDenied); off by default for that reason.

Every key is optional. The client is made on first use and remade when the setting
changes (``override_settings`` in tests). It requires a context (``require_context``
on, not configurable here): the fields bind the primary key, or pass
``fieldkey.UNBOUND`` for a ``bind_pk=False`` field.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from .._core import BatchLimits, RetryPolicy, TlsConfig
from ..client import Client

_lock = threading.Lock()
_client: Client | None = None

_KEYS = {
    "TARGET",
    "TLS",
    "TIMEOUT",
    "RETRY",
    "MAX_BATCH_ITEMS",
    "MAX_BATCH_BYTES",
    "INTERCEPTORS",
    "METADATA",
    "COLUMN_MIN_VALUES",
    "READ_REPAIR",
}

#: The default of FIELDKEY["COLUMN_MIN_VALUES"].
DEFAULT_COLUMN_MIN_VALUES = 32


def _settings() -> dict[str, Any]:
    from django.conf import settings

    cfg = getattr(settings, "FIELDKEY", {}) or {}
    if not isinstance(cfg, dict):
        raise ImproperlyConfigured("settings.FIELDKEY must be a dict")
    unknown = set(cfg) - _KEYS
    if unknown:
        raise ImproperlyConfigured(f"settings.FIELDKEY: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    return cfg


def client_from_settings() -> Client:
    cfg = _settings()
    tls = None
    if cfg.get("TLS"):
        t = cfg["TLS"]
        try:
            tls = TlsConfig(t["ROOT_CA"], t["CERT"], t["KEY"], t.get("SERVER_NAME"))
        except KeyError as e:
            raise ImproperlyConfigured(f"settings.FIELDKEY['TLS'] needs {e.args[0]}") from None
    r = cfg.get("RETRY") or {}
    retry = RetryPolicy(
        max_attempts=int(r.get("MAX_ATTEMPTS", 4)),
        initial_backoff=float(r.get("INITIAL_BACKOFF", 0.05)),
        max_backoff=float(r.get("MAX_BACKOFF", 1.0)),
    )
    interceptors = [import_string(i) if isinstance(i, str) else i for i in cfg.get("INTERCEPTORS", ())]
    interceptors = [i() if isinstance(i, type) else i for i in interceptors]
    return Client(
        cfg.get("TARGET", "127.0.0.1:7450"),
        tls=tls,
        timeout=cfg.get("TIMEOUT", 10.0),
        retry=retry,
        batch=BatchLimits(
            max_items=int(cfg.get("MAX_BATCH_ITEMS", 10_000)),
            max_bytes=int(cfg.get("MAX_BATCH_BYTES", 4 * 1024 * 1024)),
        ),
        interceptors=interceptors,
        metadata=cfg.get("METADATA", ()),
        require_context=True,
    )


def column_min_values() -> int | None:
    """FIELDKEY["COLUMN_MIN_VALUES"]: the fewest values of one (tenant, field) sent as a
    columnar call (None: never)."""
    v = _settings().get("COLUMN_MIN_VALUES", DEFAULT_COLUMN_MIN_VALUES)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ImproperlyConfigured("settings.FIELDKEY['COLUMN_MIN_VALUES'] must be a positive int or None")
    return v


def read_repair() -> bool:
    """FIELDKEY["READ_REPAIR"]: decrypt loaded rows with read repair."""
    v = _settings().get("READ_REPAIR", False)
    if not isinstance(v, bool):
        raise ImproperlyConfigured("settings.FIELDKEY['READ_REPAIR'] must be True or False")
    return v


def get_client() -> Client:
    """The client the Django integration uses (one per process, thread-safe)."""
    global _client
    c = _client
    if c is None:
        with _lock:
            if _client is None:
                _client = client_from_settings()
            c = _client
    return c


def reset_client() -> None:
    """Close the client; the next use makes a new one from the settings."""
    global _client
    with _lock:
        c, _client = _client, None
    if c is not None:
        c.close()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "FIELDKEY":
        reset_client()


setting_changed.connect(_on_setting_changed)
