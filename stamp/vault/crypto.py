"""The vault's keys and its sealed metadata. Pure, apart from timing the KDF.

Keys: scrypt(passphrase, salt, N, r, p) gives 96 bytes: the AES-256-GCM key,
the naming key (chunk names are HMACs under it) and the MAC key (the key
check). `calibrate` picks the cost on `stamp backup init`, as restic does: at
least KDF_SECONDS (restic's 0.5 s) on the machine that makes the vault, never
below N=2^15, r=8, p=1, memory at most KDF_MEMORY (N grows to it, then p).
The parameters are stored in vault.json; opening bounds them (a doctored file
cannot make the KDF eat the machine) and a wrong passphrase fails the check.

Sealed metadata (manifests, index entries, locks, bad-chunk records), stored:

    "DSVM"  u8 version (1)  u8 flags (2: AES-256-GCM)  [12-byte nonce]  payload

The payload is zstd-compressed JSON; under a key its AES-GCM ciphertext with
`what` (for example "manifest 3f2a...") as associated data, so a sealed
object opened as anything else, a manifest copied or swapped to another
point's name among them, fails to authenticate. Without a key the payload is
preceded by SHA-256(what, payload): accidents are caught, an adversary is not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import zstandard

from .errors import VaultError, VaultKeyError

KDF_SECONDS = 0.5
KDF_MEMORY = 64 << 20
KDF_FLOOR = {"n": 2 ** 15, "r": 8, "p": 1}
_KEY_CHECK = b"diskstamp vault key check"
MAGIC = b"DSVM"
_HEAD = struct.Struct("<4sBB")
F_AES = 2
META_MAX = 64 << 20  # a sealed object never inflates beyond this


@dataclass(frozen=True)
class Keys:
    enc: bytes
    naming: bytes
    mac: bytes

    def key_check(self) -> str:
        return hmac.new(self.mac, _KEY_CHECK, hashlib.sha256).hexdigest()


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=96,
                          maxmem=128 * n * r * 2 + (1 << 20))


def check_passphrase(passphrase: str) -> None:
    if not passphrase:
        raise VaultKeyError("the passphrase is empty: set $DISKSTAMP_VAULT_PASSPHRASE to a real one "
                            "(or make an unencrypted vault with `stamp backup init --no-encryption`)")


def calibrate(passphrase: str, seconds: float = KDF_SECONDS) -> tuple[dict[str, Any], Keys]:
    """Pick the KDF's cost for this machine; return the parameters and the keys."""
    check_passphrase(passphrase)
    n, r, p, salt = KDF_FLOOR["n"], KDF_FLOOR["r"], KDF_FLOOR["p"], os.urandom(16).hex()
    while True:
        params: dict[str, Any] = {"n": n, "r": r, "p": p, "salt": salt}
        started = time.perf_counter()
        keys = derive(passphrase, params)
        took = time.perf_counter() - started
        if took >= seconds:
            return params, keys
        if 128 * 2 * n * r <= KDF_MEMORY:
            n *= 2
        else:
            p += max(1, int(p * (seconds / max(took, 1e-3) - 1)))


def derive(passphrase: str, params: dict[str, Any]) -> Keys:
    try:
        n, r, p, salt = int(params["n"]), int(params["r"]), int(params["p"]), bytes.fromhex(params["salt"])
    except (KeyError, TypeError, ValueError):
        raise VaultError("vault.json: the key derivation parameters are missing or malformed") from None
    if n < 2 or n & (n - 1) or not (1 <= r <= 32 and 1 <= p <= 64) or 128 * n * r > 1 << 30 or len(salt) < 16:
        raise VaultError(f"vault.json: key derivation parameters out of range (N={n}, r={r}, p={p})")
    raw = _scrypt(passphrase, salt, n, r, p)
    return Keys(raw[:32], raw[32:64], raw[64:])


def seal(obj: Any, what: str, keys: Keys | None) -> bytes:
    payload = zstandard.ZstdCompressor(level=3).compress(json.dumps(obj, separators=(",", ":")).encode())
    if keys is None:
        return _HEAD.pack(MAGIC, 1, 0) + _digest(what, payload) + payload
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = _HEAD.pack(MAGIC, 1, F_AES)
    nonce = os.urandom(12)
    return head + nonce + AESGCM(keys.enc).encrypt(nonce, payload, head + what.encode())


def unseal(raw: bytes, what: str, keys: Keys | None) -> Any:
    """The object sealed as `what`, or VaultError saying why not."""
    if len(raw) < _HEAD.size or raw[:4] != MAGIC or raw[4] != 1:
        raise VaultError(f"{what}: not sealed vault metadata")
    flags, body = raw[5], raw[_HEAD.size:]
    if keys is None and flags & F_AES:
        raise VaultError(f"{what}: encrypted, in a vault without a key")
    if keys is not None:
        if not flags & F_AES:
            raise VaultError(f"{what}: does not authenticate (not encrypted, in an encrypted vault)")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            payload = AESGCM(keys.enc).decrypt(body[:12], body[12:], raw[:_HEAD.size] + what.encode())
        except (InvalidTag, ValueError):
            raise VaultError(f"{what}: does not authenticate (tampered, swapped, or another vault's)") from None
    else:
        payload = body[32:]
        if not hmac.compare_digest(body[:32], _digest(what, payload)):
            raise VaultError(f"{what}: fails its checksum (damaged, or not what its name says)")
    try:
        return json.loads(zstandard.ZstdDecompressor().decompress(payload, max_output_size=META_MAX))
    except (zstandard.ZstdError, ValueError):
        raise VaultError(f"{what}: authenticated, yet does not decode (written by another version?)") from None


def _digest(what: str, payload: bytes) -> bytes:
    return hashlib.sha256(what.encode() + b"\0" + payload).digest()
