#!/usr/bin/env python3
"""Independent check of tests/vectors/blind_index_v1.json against docs/BLIND_INDEX.md.

A second implementation of fieldkey's blind indexes and pseudonyms, written from the
spec with Python's hmac/hashlib/unicodedata and the `cryptography` package (HKDF,
Argon2id). It recomputes every index and pseudonym and checks that every fail_* vector
fails. Usage: python3 check_blind_vectors.py [path-to-json]
"""
import base64
import hashlib
import hmac
import json
import struct
import sys
import unicodedata
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INDEX_KEY_SALT = b"fieldkey/v1 blind-index"
PSEUDONYM_SALT = b"fieldkey/v1 pseudonym"
INDEX_FORMAT = 0xB1
TEXT_PREFIX = "fkb1:"


def lp16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def profile_bytes(p) -> bytes:
    """§3: algorithm (1), bits (2), normalization flags (1), Argon2id m, t, p (4 each)."""
    steps = p["normalize"]
    form = 1 if "nfc" in steps else 2 if "nfkc" in steps else 0
    flags = form | (4 if "casefold" in steps else 0) | (8 if "trim" in steps else 0)
    if p["algorithm"] == "hmac-sha256":
        alg, cost = 1, (0, 0, 0)
    else:
        a = p["argon2"]
        alg, cost = 2, (a["memory_kib"], a["iterations"], a["parallelism"])
    return struct.pack(">BHB3I", alg, p["bits"], flags, *cost)


def normalize(p, value: bytes) -> bytes:
    """§2: Unicode form, case folding, the form again, trimming (White_Space)."""
    steps = p["normalize"]
    if not steps:
        return value
    s = value.decode("utf-8")  # raises for non-UTF-8: the invalid vectors
    form = "NFC" if "nfc" in steps else "NFKC" if "nfkc" in steps else None
    if form:
        s = unicodedata.normalize(form, s)
    if "casefold" in steps:
        s = s.casefold()
        if form:
            s = unicodedata.normalize(form, s)
    if "trim" in steps:
        s = s.strip()
    return s.encode("utf-8")


def blind_index(v) -> bytes:
    p = v["profile"]
    t, f = v["tenant"].encode(), v["field"].encode()
    info = lp16(t) + lp16(f) + struct.pack(">I", v["version"]) + profile_bytes(p)
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=INDEX_KEY_SALT, info=info).derive(
        bytes.fromhex(v["tenant_key"])
    )
    key, salt = okm[:32], okm[32:]
    value = normalize(p, bytes.fromhex(v["value"]))
    n = p["bits"] // 8
    if p["algorithm"] == "hmac-sha256":
        digest = hmac.new(key, value, hashlib.sha256).digest()[:n]
    else:
        a = p["argon2"]
        digest = Argon2id(
            salt=salt,
            length=max(n, 4),
            iterations=a["iterations"],
            lanes=a["parallelism"],
            memory_cost=a["memory_kib"],
            secret=key,
        ).derive(value)[:n]
    return bytes([INDEX_FORMAT]) + struct.pack(">I", v["version"]) + digest


def parse_stored(stored: bytes) -> bytes:
    if stored.startswith(TEXT_PREFIX.encode()):
        b64 = stored[len(TEXT_PREFIX):].decode("ascii")
        if not all(c.isalnum() or c in "-_" for c in b64):
            raise ValueError("malformed")
        stored = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    if len(stored) < 7 or stored[0] != INDEX_FORMAT:
        raise ValueError("malformed")
    return stored


def pseudonym(v) -> bytes:
    t, s, p = (v[k].encode() for k in ("tenant", "subject", "purpose"))
    return HKDF(
        algorithm=hashes.SHA256(), length=16, salt=PSEUDONYM_SALT, info=lp16(t) + lp16(s) + lp16(p)
    ).derive(bytes.fromhex(v["subject_key"]))


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("blind_index_v1.json")
    data = json.loads(path.read_text())
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}")

    for v in data["valid"]:
        got = blind_index(v)
        check(normalize(v["profile"], bytes.fromhex(v["value"])).hex() == v["normalized"],
              f"{v['name']}: normalized")
        check(got.hex() == v["index"], f"{v['name']}: index {got.hex()} != {v['index']}")
        text = TEXT_PREFIX + base64.urlsafe_b64encode(got).decode().rstrip("=")
        check(text == v["text"], f"{v['name']}: text form")
        check(parse_stored(text.encode()) == got, f"{v['name']}: text parses back")
    for v in data["invalid"]:
        try:
            blind_index(v)
            check(False, f"{v['name']}: accepted")
        except UnicodeDecodeError:
            check(v["error"] == "invalid_argument", f"{v['name']}")
    for v in data["malformed"]:
        try:
            parse_stored(bytes.fromhex(v["stored"]))
            check(False, f"{v['name']}: accepted")
        except ValueError:
            check(True, v["name"])
    for v in data["pseudonyms"]:
        check(pseudonym(v).hex() == v["pseudonym"], f"{v['name']}: pseudonym")

    print(f"check_blind_vectors: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
