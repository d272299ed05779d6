#!/usr/bin/env python3
"""Independent check of tests/vectors/envelope_v1.json against docs/FORMAT.md.

A second implementation of fieldkey envelope v1, written from the spec with the
`cryptography` package (AES-ECB for the XAES-256-GCM key derivation, AESGCM, HKDF).
It recomputes every valid vector and checks that every fail_* vector fails with its
named error class. Usage: python3 check_vectors.py [path-to-json]
"""
import json
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC, FORMAT_V1, SUITE = b"fk", 1, 1
HEADER_LEN, TAG_LEN = 33, 16
FIELD_KEY_SALT = b"fieldkey/v1 field-key"


def lp16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def field_key(tenant_key, subject_key, tenant, subject, field):
    if subject is None:
        ikm, info = tenant_key, b"\x00" + lp16(tenant) + lp16(field)
    else:
        ikm = tenant_key + subject_key
        info = b"\x01" + lp16(tenant) + lp16(subject) + lp16(field)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=FIELD_KEY_SALT, info=info).derive(ikm)


def xaes_key(key: bytes, nonce24: bytes):
    """C2SP XAES-256-GCM: derive the AES-256-GCM key and 96-bit nonce."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    l = int.from_bytes(enc.update(bytes(16)), "big")
    k1 = (((l << 1) & ((1 << 128) - 1)) ^ (0x87 if l >> 127 else 0)).to_bytes(16, "big")
    m1 = b"\x00\x01X\x00" + nonce24[:12]
    m2 = b"\x00\x02X\x00" + nonce24[:12]
    xor = lambda a, b: bytes(x ^ y for x, y in zip(a, b))
    return enc.update(xor(m1, k1)) + enc.update(xor(m2, k1)), nonce24[12:]


def aad(header, tenant, subject, field, context):
    return (header + lp16(tenant) + lp16(subject or b"") + lp16(field)
            + struct.pack(">I", len(context)) + context)


def b(v):
    return None if v is None else v.encode()


def open_envelope(env, tenant_key, subject_key, tenant, subject, field, context):
    """Returns plaintext, or raises ValueError(error_class)."""
    if len(env) < 3 or env[:2] != MAGIC:
        raise ValueError("malformed")
    if env[2] != FORMAT_V1:
        raise ValueError("unsupported-version")
    if len(env) < HEADER_LEN + TAG_LEN:
        raise ValueError("malformed")
    if env[3] != SUITE:
        raise ValueError("unsupported-suite")
    if env[4] not in (0, 1):
        raise ValueError("malformed")
    if struct.unpack(">I", env[5:9])[0] == 0:
        raise ValueError("malformed")
    if (env[4] == 1) != (subject is not None):
        raise ValueError("scope-mismatch")
    fk = field_key(tenant_key, subject_key, tenant, subject, field)
    k, n = xaes_key(fk, env[9:33])
    try:
        return AESGCM(k).decrypt(n, env[HEADER_LEN:], aad(env[:HEADER_LEN], tenant, subject, field, context))
    except InvalidTag:
        raise ValueError("authentication")


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("envelope_v1.json")
    data = json.loads(path.read_text())
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}")

    # C2SP XAES-256-GCM published vectors first: the derivation itself is right.
    for key, ad, ct in [
        ("01" * 32, b"", "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"),
        ("03" * 32, b"c2sp.org/XAES-256-GCM", "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"),
    ]:
        k, n = xaes_key(bytes.fromhex(key), b"ABCDEFGHIJKLMNOPQRSTUVWX")
        check(AESGCM(k).encrypt(n, b"XAES-256-GCM", ad).hex() == ct, f"C2SP vector {key[:2]}")

    for v in data["valid"]:
        tk, sk = bytes.fromhex(v["tenant_key"]), v["subject_key"] and bytes.fromhex(v["subject_key"])
        t, s, f, c = b(v["tenant"]), b(v["subject"]), b(v["field"]), bytes.fromhex(v["context"])
        pt, nonce = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["nonce"])
        fk = field_key(tk, sk, t, s, f)
        check(fk.hex() == v["field_key"], f"{v['name']}: field key")
        header = MAGIC + bytes([FORMAT_V1, SUITE, 1 if s else 0]) + struct.pack(">I", v["key_version"]) + nonce
        ad = aad(header, t, s, f, c)
        check(ad.hex() == v["associated_data"], f"{v['name']}: associated data")
        k, n = xaes_key(fk, nonce)
        env = header + AESGCM(k).encrypt(n, pt, ad)
        check(env.hex() == v["envelope"], f"{v['name']}: envelope")
        import base64
        text = "fk1:" + base64.urlsafe_b64encode(env).decode().rstrip("=")
        check(text == v["text"], f"{v['name']}: text form")
        check(open_envelope(env, tk, sk, t, s, f, c) == pt, f"{v['name']}: decrypt")

    for v in data["invalid"]:
        tk, sk = bytes.fromhex(v["tenant_key"]), v["subject_key"] and bytes.fromhex(v["subject_key"])
        try:
            open_envelope(bytes.fromhex(v["envelope"]), tk, sk, b(v["tenant"]), b(v["subject"]),
                          b(v["field"]), bytes.fromhex(v["context"]))
            check(False, f"{v['name']}: accepted")
        except ValueError as e:
            check(str(e) == v["error"], f"{v['name']}: got {e}, want {v['error']}")

    print(f"check_vectors: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
