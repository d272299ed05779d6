"""Retries on UNAVAILABLE and a full memory budget (and nothing else), mTLS with
certificates made here, and the asyncio client."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import fieldkey
from conftest import AsyncCallCounter, CallCounter, free_port, new_tenant
from sidecar import Sidecar

FAST_RETRY = fieldkey.RetryPolicy(max_attempts=5, initial_backoff=0.02, max_backoff=0.05)


def test_unavailable_is_retried_a_bounded_number_of_times() -> None:
    counter = CallCounter()
    port = free_port()  # nothing listens there
    with fieldkey.Client(f"127.0.0.1:{port}", interceptors=[counter], retry=FAST_RETRY, timeout=10) as c:
        t0 = time.monotonic()
        with pytest.raises(fieldkey.Unavailable) as e:
            c.encrypt("t", "f", "x", context=1)
        assert counter.calls["Encrypt"] == 5
        assert e.value.attempts == 5  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 5
    counter.calls.clear()
    with fieldkey.Client(f"127.0.0.1:{port}", interceptors=[counter], retry=fieldkey.NO_RETRY) as c:
        with pytest.raises(fieldkey.Unavailable):
            c.encrypt("t", "f", "x", context=1)
        assert counter.calls["Encrypt"] == 1


def test_retries_stop_at_the_deadline() -> None:
    counter = CallCounter()
    slow = fieldkey.RetryPolicy(max_attempts=100, initial_backoff=0.2, max_backoff=0.2)
    with fieldkey.Client(f"127.0.0.1:{free_port()}", interceptors=[counter], retry=slow, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises((fieldkey.Unavailable, fieldkey.DeadlineExceeded)):
            c.encrypt("t", "f", "x", context=1)
        assert time.monotonic() - t0 < 1.5
        assert 1 <= counter.calls["Encrypt"] <= 5


def test_a_restarted_sidecar_is_reached_by_retrying(workdir: Path) -> None:
    s = Sidecar(workdir / "restart", "")
    s.start()
    port = s.tcp.rsplit(":", 1)[1]
    counter = CallCounter()
    policy = fieldkey.RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.25)
    try:
        with fieldkey.Client(s.tcp, interceptors=[counter], retry=policy, timeout=30) as c:
            t = new_tenant(c)
            ct = c.encrypt_text(t, "email", "survives a restart", context=1)
            s.stop()
            s.listen = f"127.0.0.1:{port}"
            restarter = threading.Timer(0.8, s.start)
            restarter.start()
            counter.calls.clear()
            assert c.decrypt_text(t, "email", ct, context=1) == "survives a restart"
            restarter.join()
            assert counter.calls["Decrypt"] >= 2  # it failed with UNAVAILABLE first
    finally:
        s.stop()


def test_a_full_memory_budget_is_retried_and_nothing_else_is(workdir: Path) -> None:
    # A budget that holds one 600 kB message at a time: of four callers at once, the
    # others are refused with MEMORY_BUDGET (nothing buffered) and get in on a retry.
    s = Sidecar(
        workdir / "budget",
        "",
        extra_config="[limits]\nmax_message_bytes = 1048576\nmemory_budget_bytes = 1048581\n",
    )
    s.start()
    try:
        value = "x" * 600_000
        counter = CallCounter()
        patient = fieldkey.RetryPolicy(max_attempts=50, initial_backoff=0.01, max_backoff=0.05)
        with fieldkey.Client(s.tcp, interceptors=[counter], retry=patient, timeout=30) as c:
            t = new_tenant(c)
            out: list[bytes] = []
            start = threading.Barrier(4)

            def retried() -> None:
                start.wait()
                out.append(c.encrypt_text(t, "essay", value, context=1))

            workers = [threading.Thread(target=retried) for _ in range(4)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert len(out) == 4
            assert counter.calls["Encrypt"] > 4  # some were refused first, then retried
            assert all(c.decrypt_text(t, "essay", ct, context=1) == value for ct in out)
        # Without retries the refusal is raised as what it is.
        with fieldkey.Client(s.tcp, retry=fieldkey.NO_RETRY, timeout=30) as c:
            t = new_tenant(c)
            errors: list[BaseException] = []
            together = threading.Barrier(8)

            def once() -> None:
                together.wait()
                try:
                    c.encrypt_text(t, "essay", value, context=1)
                except fieldkey.FieldkeyError as e:
                    errors.append(e)

            workers = [threading.Thread(target=once) for _ in range(8)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert errors, "eight 600 kB calls at once fit a 1 MiB budget"
            assert all(isinstance(e, fieldkey.MemoryBudgetExceeded) for e in errors), errors
            assert all(e.reason == "MEMORY_BUDGET" for e in errors)  # type: ignore[attr-defined]
    finally:
        s.stop()


# ------------------------------------------------------------------ mTLS

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] = (),  # type: ignore[assignment]
    eku: list[x509.ObjectIdentifier] = (),  # type: ignore[assignment]
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(hours=1))
        .not_valid_after(_NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(workdir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for label in ("ca", "other_ca"):
        k = ec.generate_private_key(ec.SECP256R1())
        out[label] = _pem(_cert(f"fieldkey test {label}", k, None, ca=True))
        out[label + "_key"] = _key_pem(k)
    ca = x509.load_pem_x509_certificate(out["ca"])
    ca_key = serialization.load_pem_private_key(out["ca_key"], None)
    sk = ec.generate_private_key(ec.SECP256R1())
    out["server"] = _pem(
        _cert(
            "fieldkey.test",
            sk,
            (ca, ca_key),  # type: ignore[arg-type]
            sans=[x509.DNSName("fieldkey.test"), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
    )
    out["server_key"] = _key_pem(sk)
    ck = ec.generate_private_key(ec.SECP256R1())
    out["client"] = _pem(
        _cert(
            "pyclient",
            ck,
            (ca, ca_key),  # type: ignore[arg-type]
            sans=[x509.UniformResourceIdentifier("spiffe://example.org/ns/test/sa/pyclient")],
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
    )
    out["client_key"] = _key_pem(ck)
    d = workdir / "pki"
    d.mkdir(exist_ok=True)
    for name, data in out.items():
        (d / f"{name}.pem").write_bytes(data)
    return out


@pytest.fixture(scope="module")
def mtls_sidecar(workdir: Path, pki: dict[str, bytes]):  # type: ignore[no-untyped-def]
    d = workdir / "pki"
    s = Sidecar(
        workdir / "mtls",
        f"""
[listen.mtls]
listen = "127.0.0.1:0"
cert_file = "{d / 'server.pem'}"
key_file = "{d / 'server_key.pem'}"
client_ca_file = "{d / 'ca.pem'}"
""",
    )
    s.start()
    yield s
    s.stop()


def test_mtls_identity_is_the_certificate_san(mtls_sidecar, pki, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    addr = mtls_sidecar.addresses["mtls"]
    d = workdir / "pki"
    # from files, connecting to an IP address with the server name overridden
    tls = fieldkey.TlsConfig(d / "ca.pem", d / "client.pem", d / "client_key.pem", server_name="fieldkey.test")
    with fieldkey.Client(addr, tls=tls) as c:
        assert c.who_am_i() == ("spiffe://example.org/ns/test/sa/pyclient", "mtls")
        t = new_tenant(c)
        ct = c.encrypt_text(t, "email", "over mTLS", context=1)
        assert c.decrypt_text(t, "email", ct, context=1) == "over mTLS"
        c.reconnect()  # re-reads the files
        assert c.who_am_i()[1] == "mtls"
    # from PEM bytes, by host name
    port = addr.rsplit(":", 1)[1]
    with fieldkey.Client(f"localhost:{port}", tls=fieldkey.TlsConfig(pki["ca"], pki["client"], pki["client_key"])) as c:
        assert c.who_am_i()[0] == "spiffe://example.org/ns/test/sa/pyclient"


def test_mtls_refuses_wrong_ca_and_unknown_client(mtls_sidecar, pki) -> None:  # type: ignore[no-untyped-def]
    addr = mtls_sidecar.addresses["mtls"]
    # the client does not trust the server's CA
    bad = fieldkey.TlsConfig(pki["other_ca"], pki["client"], pki["client_key"], server_name="fieldkey.test")
    with fieldkey.Client(addr, tls=bad, retry=fieldkey.NO_RETRY, timeout=5) as c:
        with pytest.raises(fieldkey.Unavailable):
            c.who_am_i()
    # a client certificate from a CA the server does not accept
    other_key = serialization.load_pem_private_key(pki["other_ca_key"], None)
    other_ca = x509.load_pem_x509_certificate(pki["other_ca"])
    k = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(
        "intruder", k, (other_ca, other_key),  # type: ignore[arg-type]
        sans=[x509.UniformResourceIdentifier("spiffe://example.org/intruder")],
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    intruder = fieldkey.TlsConfig(pki["ca"], _pem(cert), _key_pem(k), server_name="fieldkey.test")
    with fieldkey.Client(addr, tls=intruder, retry=fieldkey.NO_RETRY, timeout=5) as c:
        with pytest.raises(fieldkey.FieldkeyError) as e:
            c.who_am_i()
        assert isinstance(e.value, (fieldkey.Unavailable, fieldkey.Unauthenticated, fieldkey.InternalError))
    # plaintext gRPC to the TLS port fails too
    with fieldkey.Client(addr, retry=fieldkey.NO_RETRY, timeout=5) as c:
        with pytest.raises(fieldkey.FieldkeyError):
            c.who_am_i()


# ------------------------------------------------------------------ asyncio


@pytest.mark.asyncio
async def test_async_client(sidecar, fk: fieldkey.Client) -> None:  # type: ignore[no-untyped-def]
    counter = AsyncCallCounter()
    tenant = new_tenant(fk)
    async with fieldkey.AsyncClient(sidecar.tcp, interceptors=[counter], batch=fieldkey.BatchLimits(max_items=100)) as c:
        ct = await c.encrypt_text(tenant, "email", "async@example.com", subject="u", context=1)
        assert await c.decrypt_text(tenant, "email", ct, subject="u", context=1) == "async@example.com"
        with pytest.raises(fieldkey.AuthenticationFailed):
            await c.decrypt_text(tenant, "email", ct, subject="u", context=2)
        res = await c.encrypt_batch([fieldkey.EncryptItem(tenant, "email", f"a{i}", context=i) for i in range(250)], text=True)
        assert counter.calls["EncryptBatch"] == 3
        dec = await c.decrypt_batch(
            [fieldkey.DecryptItem(tenant, "email", r.unwrap(), context=i) for i, r in enumerate(res)]
            + [fieldkey.DecryptItem(tenant, "email", "x", context=1)],
            as_text=True,
        )
        assert [d.value for d in dec[:250]] == [f"a{i}" for i in range(250)]
        assert isinstance(dec[250].error, fieldkey.MalformedCiphertext)
        assert await c.blind_index(tenant, "email", "A@B.C", text=True) == fk.blind_index(tenant, "email", "a@b.c", text=True)
        assert await c.pseudonymize(tenant, "u", "analytics") == fk.pseudonymize(tenant, "u", "analytics")
        assert (await c.who_am_i()) == ("local", "local")
        await c.shred_subject(tenant, "u")
        with pytest.raises(fieldkey.KeyDestroyed):
            await c.decrypt_text(tenant, "email", ct, subject="u", context=1)
    async with fieldkey.AsyncClient("unix:" + sidecar.addresses["unix"]) as u:
        assert (await u.who_am_i())[1] == "local"


@pytest.mark.asyncio
async def test_async_retries_unavailable_only() -> None:
    counter = AsyncCallCounter()
    async with fieldkey.AsyncClient(f"127.0.0.1:{free_port()}", interceptors=[counter], retry=FAST_RETRY) as c:
        with pytest.raises(fieldkey.Unavailable):
            await c.encrypt("t", "f", "x", context=1)
    assert counter.calls["Encrypt"] == 5
