#!/usr/bin/env python3
"""Fields per second from Python: fieldkey (sidecar over gRPC) beside the AWS Encryption
SDK for Python with a caching materials manager, both on one moto KMS, in one run.

    clients/python/bench.py --fieldkey-bin target/release/fieldkey [--seconds 3]

Rows: single calls, item batches (EncryptBatch / DecryptBatch) and columns
(EncryptColumn / DecryptColumn) of 100 and 1,000 values, the asyncio client, the SDK's
two suites; then the batch and column figures as multiples of the SDK's unsigned suite.

Needs the packages of requirements-test.txt (run-tests.sh's venv has them) and this
package installed. Starts its own moto_server (from a venv with moto[server]==5.2.5
under the fieldkey cache directory, made like scripts/test.sh makes it, unless
--moto-url is given) and its own sidecar, whose KMS is the same moto (AWS KMS
provider). Values are 32 random bytes; every figure is values per second, measured for
--seconds after a warm-up, on one Python thread unless said otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import grpc

import fieldkey
from fieldkey import DecryptItem, EncryptItem

MOTO_VERSION = "5.2.5"
REGION = "eu-west-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, secs: float) -> None:
    end = time.time() + secs
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def start_moto() -> tuple[str, subprocess.Popen[bytes]]:
    cache = Path(
        os.environ.get("FIELDKEY_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fieldkey"
    )
    venv = cache / f"venv-moto-{MOTO_VERSION}"
    if subprocess.run([str(venv / "bin" / "python"), "-c", "import moto"], capture_output=True).returncode != 0:
        print(f"creating {venv} with moto[server]=={MOTO_VERSION}", file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"moto[server]=={MOTO_VERSION}"], check=True)
    port = free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, 30)
    return f"http://127.0.0.1:{port}", proc


def start_sidecar(binary: str, data: Path, moto_url: str, key_arn: str) -> tuple[dict[str, str], subprocess.Popen[str]]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        RUST_LOG="warn",
    )
    sock = data / "fk.sock"
    proc = subprocess.Popen(
        [
            binary, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--unix-socket", str(sock),
            "--aws-kms-key-id", key_arn, "--aws-region", REGION, "--aws-kms-endpoint", moto_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    addrs: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("fieldkey listening on "):
            scheme, _, addr = line.strip().removeprefix("fieldkey listening on ").partition("://")
            addrs[scheme] = addr
        if {"tcp", "unix"} <= addrs.keys():
            return addrs, proc
    raise RuntimeError(f"the sidecar exited with {proc.wait()}")


SIDECAR_PID = [0]


def sidecar_cpu() -> float:
    """CPU seconds (user + system) the sidecar has used."""
    if not SIDECAR_PID[0]:
        return 0.0
    with open(f"/proc/{SIDECAR_PID[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rate:
    """Values per second, and CPU microseconds per value in this process and in the sidecar."""

    def __init__(self, n: int, wall: float, cpu: float, side: float) -> None:
        self.per_sec = n / wall
        self.cpu_us = cpu / n * 1e6
        self.side_us = side / n * 1e6

    def __str__(self) -> str:
        side = f" / {self.side_us:.1f}" if self.side_us else ""
        return f"{self.per_sec:,.0f} ({self.cpu_us:.1f}{side} µs)"


def measure(fn: Callable[[], int], seconds: float) -> Rate:
    """Rate of repeated fn() calls (each returns how many values it did)."""
    end = time.perf_counter() + min(0.5, seconds / 4)
    while time.perf_counter() < end:  # warm-up
        fn()
    n = 0
    t0, c0, s0 = time.perf_counter(), time.process_time(), sidecar_cpu()
    end = t0 + seconds
    while True:
        n += fn()
        t = time.perf_counter()
        if t >= end:
            return Rate(n, t - t0, time.process_time() - c0, sidecar_cpu() - s0)


def bench_fieldkey(target: str, seconds: float, label: str) -> list[tuple[str, Rate, Rate]]:
    rows = []
    value = secrets.token_bytes(32)
    with fieldkey.Client(target) as c:
        tenant = "bench-" + secrets.token_hex(4)
        c.create_tenant(tenant)
        ct = c.encrypt(tenant, "email", value, context=b"row-1")
        enc = measure(lambda: (c.encrypt(tenant, "email", value, context=b"row-1"), 1)[1], seconds)
        dec = measure(lambda: (c.decrypt(tenant, "email", ct, context=b"row-1"), 1)[1], seconds)
        rows.append((f"fieldkey {label}, single calls (Encrypt / Decrypt)", enc, dec))
        for size in (100, 1000):
            items = [EncryptItem(tenant, "email", value, context=str(i)) for i in range(size)]
            cts = [r.unwrap() for r in c.encrypt_batch(items)]
            ditems = [DecryptItem(tenant, "email", x, context=str(i)) for i, x in enumerate(cts)]

            def e() -> int:
                return len(c.encrypt_batch(items))

            def d() -> int:
                return len(c.decrypt_batch(ditems))

            rows.append((f"fieldkey {label}, batches of {size:,} (EncryptBatch / DecryptBatch)", measure(e, seconds), measure(d, seconds)))
        for size in (100, 1000):
            # the same values and row contexts as the batches, as one column each
            values = [value] * size
            contexts = [str(i) for i in range(size)]
            ccts = [r.unwrap() for r in c.encrypt_column(tenant, "email", values, contexts=contexts)]

            def ce() -> int:
                return len(c.encrypt_column(tenant, "email", values, contexts=contexts))

            def cd() -> int:
                return len(c.decrypt_column(tenant, "email", ccts, contexts=contexts))

            rows.append((f"fieldkey {label}, columns of {size:,} (EncryptColumn / DecryptColumn)", measure(ce, seconds), measure(cd, seconds)))
    return rows


def bench_fieldkey_async(target: str, seconds: float, inflight: int) -> tuple[str, Rate, Rate]:
    value = secrets.token_bytes(32)

    async def run() -> tuple[Rate, Rate]:
        async with fieldkey.AsyncClient(target) as c:
            tenant = "bench-" + secrets.token_hex(4)
            await c.create_tenant(tenant)
            ct = await c.encrypt(tenant, "email", value, context=b"row-1")

            async def loop(op: Callable[[], object]) -> Rate:
                n = 0
                stop = time.perf_counter() + seconds
                c0, s0 = time.process_time(), sidecar_cpu()

                async def worker() -> None:
                    nonlocal n
                    while time.perf_counter() < stop:
                        await op()  # type: ignore[misc]
                        n += 1

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(inflight)))
                return Rate(n, time.perf_counter() - t0, time.process_time() - c0, sidecar_cpu() - s0)

            await loop(lambda: c.encrypt(tenant, "email", value, context=b"row-1"))  # warm-up
            e = await loop(lambda: c.encrypt(tenant, "email", value, context=b"row-1"))
            d = await loop(lambda: c.decrypt(tenant, "email", ct, context=b"row-1"))
            return e, d

    e, d = asyncio.run(run())
    return (f"fieldkey TCP, AsyncClient, single calls, {inflight} in flight", e, d)


def bench_esdk(moto_url: str, key_arn: str, seconds: float) -> list[tuple[str, Rate, Rate]]:
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy
    from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
    from aws_encryption_sdk.identifiers import Algorithm
    from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager

    os.environ["AWS_ENDPOINT_URL_KMS"] = moto_url
    mkp = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[key_arn])
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    value = secrets.token_bytes(32)
    ctx = {"tenant": "bench", "field": "email", "row": "row-1"}
    rows = []
    for name, alg in (
        ("default suite (committing, ECDSA P-384 signed)", None),
        ("AES_256_GCM_HKDF_SHA512_COMMIT_KEY (no signature)", Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY),
    ):
        cmm = CachingCryptoMaterialsManager(
            master_key_provider=mkp,
            cache=LocalCryptoMaterialsCache(capacity=1000),
            max_age=600.0,
            max_messages_encrypted=2**32,
        )
        kw = {"materials_manager": cmm, "encryption_context": ctx}
        if alg is not None:
            kw["algorithm"] = alg
        ct, _ = client.encrypt(source=value, **kw)
        kms_before = kms_calls[0]

        def e() -> int:
            client.encrypt(source=value, **kw)
            return 1

        def d() -> int:
            client.decrypt(source=ct, materials_manager=cmm)
            return 1

        er, dr = measure(e, seconds), measure(d, seconds)
        rows.append((f"AWS Encryption SDK {aws_encryption_sdk.__version__}, caching CMM, {name}; {len(ct)} B ciphertext; KMS calls during the run: {kms_calls[0] - kms_before}", er, dr))
    return rows


kms_calls = [0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fieldkey-bin", default=os.environ.get("FIELDKEY_BIN", "target/release/fieldkey"))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--moto-url")
    ap.add_argument("--inflight", type=int, default=16)
    args = ap.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    data = Path(tempfile.mkdtemp(prefix="fk-bench-"))
    try:
        moto_url = args.moto_url
        if not moto_url:
            moto_url, p = start_moto()
            procs.append(p)
        kms = boto3.client("kms", region_name=REGION, endpoint_url=moto_url)
        key_arn = kms.create_key(Description="fieldkey bench")["KeyMetadata"]["Arn"]
        addrs, sp = start_sidecar(args.fieldkey_bin, data, moto_url, key_arn)
        procs.append(sp)
        SIDECAR_PID[0] = sp.pid

        # count KMS calls the ESDK makes (botocore event hook on every client it creates)
        import botocore.session

        orig = botocore.session.Session.create_client

        def counting(self, *a, **k):  # type: ignore[no-untyped-def]
            cl = orig(self, *a, **k)
            cl.meta.events.register("before-call.kms", lambda **_: kms_calls.__setitem__(0, kms_calls[0] + 1))
            return cl

        botocore.session.Session.create_client = counting  # type: ignore[method-assign]

        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        print(f"machine: {os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()}; grpcio {grpc.__version__}")
        print(f"sidecar: {args.fieldkey_bin} (AWS KMS provider on moto {moto_url}); {args.seconds} s per figure\n")
        rows = []
        rows += bench_fieldkey(addrs["tcp"], args.seconds, "TCP")
        rows += bench_fieldkey("unix:" + addrs["unix"], args.seconds, "Unix socket")[:1]
        rows.append(bench_fieldkey_async(addrs["tcp"], args.seconds, args.inflight))
        SIDECAR_PID[0] = 0  # the ESDK runs in this process only
        rows += bench_esdk(moto_url, key_arn, args.seconds)
        print("values/s (CPU µs per value: Python process / sidecar)\n")
        print("| what | encrypt | decrypt |")
        print("| --- | ---: | ---: |")
        for name, e, d in rows:
            print(f"| {name} | {e} | {d} |")
        # fieldkey's batch and column figures over the SDK's fastest suite, same run
        sdk = next(r for r in rows if "no signature" in r[0])
        print(f"\nratios to the SDK's unsigned suite ({sdk[1].per_sec:,.0f} / {sdk[2].per_sec:,.0f} values/s):\n")
        print("| what | encrypt | decrypt |")
        print("| --- | ---: | ---: |")
        for name, e, d in rows:
            if name.startswith("fieldkey TCP, batches") or name.startswith("fieldkey TCP, columns"):
                print(f"| {name} | {e.per_sec / sdk[1].per_sec:.1f}x | {d.per_sec / sdk[2].per_sec:.1f}x |")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
