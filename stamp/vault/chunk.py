"""Vault chunks: content-addressed, compressed, optionally encrypted. Pure.

A chunk is at most CHUNK bytes of a disk as the guest sees it. Its name is
SHA-256 of the plaintext, or, in a vault with a key, HMAC-SHA256 under the
vault's naming key: equal plaintexts under different keys get different
names, so a name reveals nothing. Stored form (little-endian):

    "DSVC"  u8 version (1)  u8 flags (1: zstd, 2: AES-256-GCM)  u16 0
    u32 plaintext length  u32 stored length
    [12-byte nonce]  payload (zstd frame; under a key, its AES-GCM ciphertext
                     with the chunk's name and header as associated data)

Opening checks, in order: magic, lengths (the plaintext is at most CHUNK, so
decompression is bounded before it starts: no bomb), authentication, the
plaintext length, and the name against the content.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import zstandard

CHUNK = 4 * 1024 * 1024
MAGIC = b"DSVC"
F_ZSTD, F_AES = 1, 2
_HEAD = struct.Struct("<4sBBHII")


class ChunkError(Exception):
    """A stored chunk that is not what its name says (corrupt, truncated, wrong key)."""


def name_of(data: bytes, naming_key: bytes | None) -> str:
    if naming_key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(naming_key, data, hashlib.sha256).hexdigest()


def seal(data: bytes, name: str, enc_key: bytes | None, level: int = 3) -> bytes:
    if not 0 < len(data) <= CHUNK:
        raise ValueError(f"a chunk holds 1 to {CHUNK} bytes, not {len(data)}")
    payload = zstandard.ZstdCompressor(level=level).compress(data)
    flags = F_ZSTD
    nonce = b""
    if enc_key is not None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        flags |= F_AES
        nonce = os.urandom(12)
        head = _HEAD.pack(MAGIC, 1, flags, 0, len(data), len(payload) + 16)
        payload = AESGCM(enc_key).encrypt(nonce, payload, name.encode() + head)
    head = _HEAD.pack(MAGIC, 1, flags, 0, len(data), len(payload))
    return head + nonce + payload


def open_chunk(raw: bytes, name: str, enc_key: bytes | None, naming_key: bytes | None) -> bytes:
    if len(raw) < _HEAD.size:
        raise ChunkError(f"chunk {name}: truncated header")
    magic, version, flags, _, length, stored = _HEAD.unpack_from(raw)
    if magic != MAGIC or version != 1:
        raise ChunkError(f"chunk {name}: not a vault chunk")
    if not 0 < length <= CHUNK or stored > CHUNK + 1024 * 1024:
        raise ChunkError(f"chunk {name}: sizes out of range ({length}, {stored})")
    body = raw[_HEAD.size:]
    if flags & F_AES:
        if enc_key is None:
            raise ChunkError(f"chunk {name}: encrypted, and no key was given")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce, body = body[:12], body[12:]
        if len(body) != stored:
            raise ChunkError(f"chunk {name}: truncated")
        try:
            body = AESGCM(enc_key).decrypt(nonce, body, name.encode() + raw[:_HEAD.size])
        except InvalidTag:
            raise ChunkError(f"chunk {name}: authentication failed (corrupt, or another key)") from None
    elif len(body) != stored:
        raise ChunkError(f"chunk {name}: truncated")
    try:
        data = zstandard.ZstdDecompressor().decompress(body, max_output_size=length)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk {name}: does not decompress ({e})") from None
    if len(data) != length:
        raise ChunkError(f"chunk {name}: {len(data)} bytes, the header says {length}")
    if not hmac.compare_digest(name_of(data, naming_key), name):
        raise ChunkError(f"chunk {name}: content does not match its name")
    return data
