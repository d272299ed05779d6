"""Fixtures: a real fieldkey sidecar for the session, counting interceptors, tenants,
and the Django test project on a throwaway database."""

from __future__ import annotations

import collections
import os
import secrets
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import fieldkey
from sidecar import Sidecar, cleanup

# Blind-index profiles: "email" for the client tests, the Django model's field name, and
# "name" with another normalization.
SIDECAR_CONFIG = """
[blind_index.fields.email]
normalize = ["nfc", "casefold", "trim"]

[blind_index.fields."shop_customer.email"]
normalize = ["nfc", "casefold", "trim"]

[blind_index.fields.name]
bits = 128
normalize = ["nfkc", "casefold", "trim"]
"""


def _method(details: Any) -> str:
    m = details.method
    if isinstance(m, bytes):
        m = m.decode()
    return str(m).rsplit("/", 1)[-1]


class CallCounter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts RPC attempts by method name (Encrypt, DecryptBatch, ...)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls[_method(details)] += 1
        return continuation(details, request)

    def reset(self) -> None:
        self.calls.clear()


class AsyncCallCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls[_method(details)] += 1
        return await continuation(details, request)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fk-pyclient-"))
    yield d
    cleanup(d)


@pytest.fixture(scope="session")
def sidecar(workdir: Path) -> Iterator[Sidecar]:
    s = Sidecar(workdir / "main", SIDECAR_CONFIG, unix_socket=workdir / "main.sock")
    s.start()
    yield s
    s.stop()


#: The sidecar of the row-binding tests requires a context for these fields.
ROW_BINDING_CONFIG = """
[row_binding]
required = ["email", "shop_customer.email", "shop_ticket.summary"]
"""


@pytest.fixture(scope="session")
def bound_sidecar(workdir: Path) -> Iterator[Sidecar]:
    """A second sidecar whose [row_binding] requires a context for ``email`` and the
    Django test project's ``shop_customer.email`` and ``shop_ticket.summary``."""
    s = Sidecar(workdir / "row-binding", SIDECAR_CONFIG, extra_config=ROW_BINDING_CONFIG)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def counter() -> CallCounter:
    return CallCounter()


@pytest.fixture(scope="session")
def fk(sidecar: Sidecar, counter: CallCounter) -> Iterator[fieldkey.Client]:
    with fieldkey.Client(sidecar.tcp, interceptors=[counter], timeout=20.0) as c:
        yield c


@pytest.fixture
def calls(counter: CallCounter) -> collections.Counter[str]:
    counter.reset()
    return counter.calls


def new_tenant(client: fieldkey.Client) -> str:
    t = "t-" + secrets.token_hex(6)
    client.create_tenant(t)
    return t


@pytest.fixture
def tenant(fk: fieldkey.Client) -> str:
    return new_tenant(fk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ Django


def _pg_url() -> str | None:
    url = os.environ.get("FIELDKEY_TEST_DATABASE_URL")
    if url:
        return url
    if os.environ.get("FIELDKEY_TEST_SQLITE"):
        return None
    try:
        import psycopg

        psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=2).close()
        return "postgresql://postgres@127.0.0.1:5432/test"
    except Exception:  # noqa: BLE001 - no server: SQLite fallback
        return None


@pytest.fixture(scope="session")
def django_db(sidecar: Sidecar, counter: CallCounter, workdir: Path) -> Iterator[str]:
    """Django set up against a throwaway PostgreSQL database (dropped at the end) or,
    without a server, SQLite; migrated; FIELDKEY pointed at the sidecar with the
    counting interceptor. Yields the database vendor."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "djproject.settings"
    import django
    from django.conf import settings

    url = _pg_url()
    dropper = None
    if url:
        import psycopg

        u = urllib.parse.urlparse(url)
        # named like scripts/test.sh's databases, so an interrupted run's is cleaned up there
        name = f"fk_test_{int(time.time())}_py{secrets.token_hex(3)}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

        def dropper() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        settings.DATABASES = {
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": name,
                "USER": urllib.parse.unquote(u.username or "postgres"),
                "PASSWORD": urllib.parse.unquote(u.password or ""),
                "HOST": u.hostname or "127.0.0.1",
                "PORT": str(u.port or 5432),
            }
        }
    else:
        settings.DATABASES = {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(workdir / "django.sqlite3")}
        }
    settings.FIELDKEY = {"TARGET": sidecar.tcp, "INTERCEPTORS": [counter], "TIMEOUT": 20.0}
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    try:
        yield connection.vendor
    finally:
        from django.db import connections

        from fieldkey.django import reset_client

        reset_client()
        connections.close_all()
        if dropper is not None:
            dropper()
