"""A real fieldkey sidecar process for the tests (``fieldkey serve``)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

PASSPHRASE = "python client tests passphrase"

_LISTEN = re.compile(r"^fieldkey listening on (tcp|unix|mtls)://(.+)$")


def binary() -> str:
    b = os.environ.get("FIELDKEY_BIN")
    if not b:
        target = os.environ.get("CARGO_TARGET_DIR") or str(Path(__file__).resolve().parents[3] / "target")
        b = str(Path(target) / "debug" / "fieldkey")
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        raise RuntimeError(
            f"fieldkey binary not found at {b}: build it (cargo build) or set FIELDKEY_BIN"
        )
    return b


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["FIELDKEY_LOCAL_KMS_PASSPHRASE"] = PASSPHRASE
    e.setdefault("RUST_LOG", "warn")
    for k in ("FIELDKEY_CONFIG", "FIELDKEY_LISTEN", "FIELDKEY_UNIX_SOCKET", "FIELDKEY_POLICIES", "FIELDKEY_POSTGRES_URL"):
        e.pop(k, None)
    return e


class Sidecar:
    """``fieldkey serve`` with a data dir and a config file; ``start()`` waits for the
    listening lines it prints and records the addresses. ``extra_config`` is appended to
    ``config`` (TOML tables such as ``[row_binding]`` for one test's sidecar)."""

    def __init__(
        self,
        data_dir: Path,
        config: str,
        *,
        listen: str = "127.0.0.1:0",
        unix_socket: Path | None = None,
        extra_config: str = "",
    ):
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = data_dir / "fieldkey.toml"
        self.config_path.write_text(config + ("\n" + extra_config if extra_config else ""))
        self.listen = listen
        self.unix_socket = unix_socket
        self.proc: subprocess.Popen[str] | None = None
        self.addresses: dict[str, str] = {}
        self.log: list[str] = []

    @property
    def tcp(self) -> str:
        return self.addresses["tcp"]

    def start(self, timeout: float = 60.0) -> None:
        args = [
            binary(),
            "serve",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.listen,
        ]
        if self.unix_socket is not None:
            args += ["--unix-socket", str(self.unix_socket)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True
        )
        want = {"tcp"} | ({"unix"} if self.unix_socket else set())
        if "[listen.mtls]" in self.config_path.read_text():
            want.add("mtls")
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: object, keep: bool) -> None:
            for line in stream:  # type: ignore[attr-defined]
                if keep:
                    lines.put(line.rstrip("\n"))
                self.log.append(line.rstrip("\n"))
            if keep:
                lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=pump, args=(self.proc.stderr, False), daemon=True).start()
        self.addresses = {}
        while not want <= self.addresses.keys():
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise RuntimeError("fieldkey serve did not start in time:\n" + "\n".join(self.log[-30:])) from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(
                    f"fieldkey serve exited with {self.proc.returncode}:\n" + "\n".join(self.log[-30:])
                )
            m = _LISTEN.match(line)
            if m:
                self.addresses[m.group(1)] = m.group(2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The fieldkey CLI against this sidecar's data dir and config (key-store commands)."""
        return subprocess.run(
            [binary(), *args, "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
        )


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
