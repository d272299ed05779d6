"""fieldkey: Python client for the fieldkey field-level-encryption sidecar.

>>> import fieldkey
>>> fk = fieldkey.Client("127.0.0.1:7450")
>>> ct = fk.encrypt_text("acme", "email", "alice@example.com", subject="user-42", context=7)
>>> fk.decrypt_text("acme", "email", ct, subject="user-42", context=7)
'alice@example.com'

``context`` (the row's id) is required by default: without one, encrypt and decrypt
raise ``fieldkey.ContextRequired`` before sending anything (``require_context=False``
or ``context=fieldkey.UNBOUND`` for a deliberately unbound value).

See docs/CLIENTS.md in the fieldkey repository.
"""

from __future__ import annotations

from ._core import (
    BatchLimits,
    BlindIndex,
    BlindIndexItem,
    Context,
    Decrypted,
    DecryptItem,
    EncryptItem,
    NO_RETRY,
    PseudonymizeItem,
    Result,
    RetryPolicy,
    RewrapItem,
    Rewrapped,
    TlsConfig,
    UNBOUND,
    Unbound,
    unwrap_all,
)
from .aio import AsyncClient
from .client import Client
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BatchLimits",
    "BlindIndex",
    "BlindIndexItem",
    "Client",
    "Context",
    "Decrypted",
    "DecryptItem",
    "EncryptItem",
    "NO_RETRY",
    "PseudonymizeItem",
    "Result",
    "RetryPolicy",
    "RewrapItem",
    "Rewrapped",
    "TlsConfig",
    "UNBOUND",
    "Unbound",
    "unwrap_all",
    *_errors_all,
]
