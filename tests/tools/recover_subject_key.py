#!/usr/bin/env python3
"""Recover one subject key from a fieldkey key store, written from docs/FORMAT.md §4 alone.

  python recover_subject_key.py --db <sqlite-file | postgres://user:pw@host:port/db>
      --tenant T --subject S --kms-endpoint URL [--region eu-west-1]

AWS credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
Prints {"ok": true, "subject_key_sha256": "<hex>"} and exits 0, or
{"ok": false, "stage": "row" | "kms" | "unwrap", "error": "..."} and exits 3.

Steps, as §4 gives them:
  1. fk_subjects (swk_id, wrap_version, wrapped) of (T, S).
  2. swk_id set (§4.3): fk_subject_wrapping_keys (epoch, kms_key_id, wrapped) of swk_id,
     KMS Decrypt with context {purpose: subject-wrapping-key, tenant: T, epoch: e}.
     swk_id NULL (§4.2, legacy): fk_tenant_keys (kms_key_id, wrapped) of version w,
     KMS Decrypt with context {purpose: tenant-key, tenant: T, version: w}.
  3. Open the subject row's blob: 0x01 || nonce(24) || XAES-256-GCM(key, nonce, SK, AD).
Needs: cryptography, boto3; pg8000 for PostgreSQL.
"""
import argparse
import hashlib
import json
import sqlite3
import struct
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class Failure(Exception):
    def __init__(self, stage, error):
        super().__init__(error)
        self.stage = stage


# ------------------------------------------------------------------ §4.2 / §4.3 unwrap
def lp16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def xaes_256_gcm_decrypt(key: bytes, nonce24: bytes, ct_and_tag: bytes, ad: bytes) -> bytes:
    """C2SP XAES-256-GCM: AES-256-GCM under a key derived from the first 12 nonce bytes."""
    aes = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    l = int.from_bytes(aes.update(bytes(16)), "big")
    k1 = (((l << 1) & ((1 << 128) - 1)) ^ (0x87 if l >> 127 else 0)).to_bytes(16, "big")
    xor = lambda a, b: bytes(x ^ y for x, y in zip(a, b))
    m1, m2 = b"\x00\x01X\x00" + nonce24[:12], b"\x00\x02X\x00" + nonce24[:12]
    derived = aes.update(xor(m1, k1)) + aes.update(xor(m2, k1))
    return AESGCM(derived).decrypt(nonce24[12:], ct_and_tag, ad)  # raises InvalidTag


def open_subject_key(key: bytes, tenant: str, subject: str, blob: bytes, *, wrap_version=None, epoch=None) -> bytes:
    """§4.2 (key = TK_w, wrap_version = w) or §4.3 (key = SWK_{t,e}, epoch = e)."""
    if len(blob) != 73 or blob[0] != 0x01:
        raise ValueError(f"wrapped subject key: {len(blob)} bytes, format byte {blob[:1].hex()}; want 73 bytes, 01")
    t, s = tenant.encode(), subject.encode()
    if epoch is None:  # §4.2: W = HKDF(salt, IKM = TK_w, info = lp16(tenant))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fieldkey/v1 subject-wrap", info=lp16(t)).derive(key)
        ad = b"fieldkey/v1 subject-key" + lp16(t) + lp16(s) + struct.pack(">I", wrap_version)
    else:  # §4.3: the SWK itself
        ad = b"fieldkey/v1 subject-key-epoch" + lp16(t) + lp16(s) + struct.pack(">Q", epoch)
    return xaes_256_gcm_decrypt(key, blob[1:25], blob[25:], ad)


# ------------------------------------------------------------------ rows
def query_one(db: str, sql: str, args: tuple):
    """One row (or None) of `sql` with ? placeholders, from a SQLite file or PostgreSQL URL."""
    if db.startswith(("postgres://", "postgresql://")):
        import pg8000.native

        u = urlparse(db)
        conn = pg8000.native.Connection(
            user=unquote(u.username or "postgres"), password=unquote(u.password) if u.password else None,
            host=u.hostname or "127.0.0.1", port=u.port or 5432, database=(u.path.lstrip("/") or None))
        try:
            for i in range(len(args)):
                sql = sql.replace("?", f":a{i}", 1)
            rows = conn.run(sql, **{f"a{i}": a for i, a in enumerate(args)})
        finally:
            conn.close()
    else:
        path = Path(db.removeprefix("sqlite://").split("?")[0])
        conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)  # read only
        try:
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    return tuple(rows[0]) if rows else None


def read_rows(db: str, tenant: str, subject: str):
    """(kms_key_id, kms_wrapped, encryption_context, subject_blob, unwrap_kwargs)."""
    row = query_one(db, "SELECT swk_id, wrap_version, wrapped FROM fk_subjects WHERE tenant_id = ? AND subject_id = ?",
                    (tenant, subject))
    if row is None:
        raise Failure("row", "no fk_subjects row for this tenant and subject")
    swk_id, wrap_version, blob = row
    if blob is None:
        raise Failure("row", "the subject key is destroyed (fk_subjects.wrapped is NULL)")
    if swk_id is not None:
        swk = query_one(db, "SELECT epoch, kms_key_id, wrapped FROM fk_subject_wrapping_keys WHERE swk_id = ?", (swk_id,))
        if swk is None:
            raise Failure("row", f"no fk_subject_wrapping_keys row {swk_id!r}")
        epoch, kms_key_id, wrapped = swk
        ctx = {"fieldkey:purpose": "subject-wrapping-key", "fieldkey:tenant": tenant, "fieldkey:epoch": str(epoch)}
        return kms_key_id, bytes(wrapped), ctx, bytes(blob), {"epoch": int(epoch)}
    tk = query_one(db, "SELECT kms_key_id, wrapped FROM fk_tenant_keys WHERE tenant_id = ? AND version = ?",
                   (tenant, wrap_version))
    if tk is None or tk[1] is None:
        raise Failure("row", f"tenant key version {wrap_version} is missing or destroyed")
    ctx = {"fieldkey:purpose": "tenant-key", "fieldkey:tenant": tenant, "fieldkey:version": str(wrap_version)}
    return tk[0], bytes(tk[1]), ctx, bytes(blob), {"wrap_version": int(wrap_version)}


# ------------------------------------------------------------------ main
def recover(args) -> bytes:
    try:
        kms_key_id, wrapped, ctx, blob, which = read_rows(args.db, args.tenant, args.subject)
    except Failure:
        raise
    except Exception as e:  # unreadable database, missing table, ...
        raise Failure("row", f"{type(e).__name__}: {e}")
    try:
        import boto3

        kms = boto3.client("kms", endpoint_url=args.kms_endpoint, region_name=args.region)
        key = kms.decrypt(KeyId=kms_key_id, CiphertextBlob=wrapped, EncryptionContext=ctx)["Plaintext"]
    except Exception as e:
        raise Failure("kms", f"{type(e).__name__}: {e}")
    try:
        return open_subject_key(key, args.tenant, args.subject, blob, **which)
    except InvalidTag:
        raise Failure("unwrap", "authentication failed: wrong key, tenant, subject, epoch or version, or altered blob")
    except Exception as e:
        raise Failure("unwrap", f"{type(e).__name__}: {e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="SQLite file, or postgres://user:pw@host:port/db")
    p.add_argument("--tenant", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--kms-endpoint", required=True, help="KMS endpoint URL")
    p.add_argument("--region", default="eu-west-1")
    args = p.parse_args()
    try:
        sk = recover(args)
    except Failure as f:
        print(json.dumps({"ok": False, "stage": f.stage, "error": str(f)}))
        sys.exit(3)
    print(json.dumps({"ok": True, "subject_key_sha256": hashlib.sha256(sk).hexdigest()}))


if __name__ == "__main__":
    main()
