#!/usr/bin/env python3
"""Independent check of tests/vectors/subject_wrap.json against docs/FORMAT.md §4.2/§4.3.

Recomputes every valid vector (wrapping key, associated data, blob) from the spec with
the `cryptography` package, opens it, and checks that every fail_* vector is refused
with its named error class. Then runs the recovery tool's unwrap
(tests/tools/recover_subject_key.py, also written from §4 alone) over the same vectors.
Usage: python3 check_subject_wrap.py [path-to-json]
"""
import json
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))
from check_vectors import lp16, xaes_key  # noqa: E402  (the XAES-256-GCM derivation, C2SP-checked there)
import recover_subject_key  # noqa: E402

WRAPPED_LEN, FORMAT = 73, 0x01


def wrap_inputs(v):
    """(aead key, associated data) of a vector, from §4.2 or §4.3."""
    t, s = v["tenant"].encode(), v["subject"].encode()
    if v["kind"] == "legacy":
        w = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fieldkey/v1 subject-wrap",
                 info=lp16(t)).derive(bytes.fromhex(v["tenant_key"]))
        return w, b"fieldkey/v1 subject-key" + lp16(t) + lp16(s) + struct.pack(">I", v["wrap_version"])
    if v["kind"] == "epoch":
        ad = b"fieldkey/v1 subject-key-epoch" + lp16(t) + lp16(s) + struct.pack(">Q", v["epoch"])
        return bytes.fromhex(v["swk"]), ad
    raise KeyError(v["kind"])


def seal(key, nonce, sk, ad):
    k, n = xaes_key(key, nonce)
    return bytes([FORMAT]) + nonce + AESGCM(k).encrypt(n, sk, ad)


def unwrap(v, blob):
    """The subject key, or raises ValueError(error class)."""
    if len(blob) != WRAPPED_LEN:
        raise ValueError("malformed")
    if blob[0] != FORMAT:
        raise ValueError("unsupported-version")
    key, ad = wrap_inputs(v)
    k, n = xaes_key(key, blob[1:25])
    try:
        return AESGCM(k).decrypt(n, blob[25:], ad)
    except InvalidTag:
        raise ValueError("authentication")


def tool_unwrap(v, blob):
    key = bytes.fromhex(v["tenant_key"] if v["kind"] == "legacy" else v["swk"])
    which = {"wrap_version": v["wrap_version"]} if v["kind"] == "legacy" else {"epoch": v["epoch"]}
    return recover_subject_key.open_subject_key(key, v["tenant"], v["subject"], blob, **which)


def attempt(f, *args):
    """f(*args), or the exception that refused it."""
    try:
        return f(*args)
    except (ValueError, InvalidTag) as e:
        return e


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "subject_wrap.json"
    data = json.loads(path.read_text())
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}")

    kinds = {v["kind"] for v in data["valid"]} | {v["kind"] for v in data["invalid"]}
    check(kinds == {"legacy", "epoch"}, f"both kinds present: {sorted(kinds)}")
    check(any(v.get("epoch", 0) > 2**32 for v in data["valid"]), "an epoch above 2^32")

    for v in data["valid"]:
        name = v["name"]
        key, ad = wrap_inputs(v)
        check(key.hex() == v["aead_key"], f"{name}: aead key")
        check(ad.hex() == v["associated_data"], f"{name}: associated data")
        sk, blob = bytes.fromhex(v["subject_key"]), bytes.fromhex(v["blob"])
        check(seal(key, bytes.fromhex(v["nonce"]), sk, ad) == blob, f"{name}: blob")
        check(attempt(unwrap, v, blob) == sk, f"{name}: unwrap")
        check(attempt(tool_unwrap, v, blob) == sk, f"{name}: recovery tool unwrap")

    for v in data["invalid"]:
        name, blob = v["name"], bytes.fromhex(v["blob"])
        check(name.startswith("fail_"), f"{name}: named fail_*")
        got = attempt(unwrap, v, blob)
        check(isinstance(got, ValueError) and str(got) == v["error"], f"{name}: got {got!r}, want {v['error']}")
        check(isinstance(attempt(tool_unwrap, v, blob), Exception), f"{name}: recovery tool accepted")

    print(f"check_subject_wrap: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
