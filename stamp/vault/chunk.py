"""Vault chunks: content-addressed, compressed, optionally encrypted. Pure.

A chunk is at most CHUNK bytes of a disk as the guest sees it. Its name is
SHA-256 of the plaintext, or, in a vault with a key, HMAC-SHA256 under the
vault's naming key: equal plaintexts under different keys get different
names, so a name reveals nothing. Stored form (little-endian):

    "DSVC"  u8 version (2)  u8 flags (1: zstd, 2: AES-256-GCM)  u16 0
    without a key:  u32 plaintext length  u32 stored length  zstd frame
    with a key:     12-byte nonce, then the AES-GCM ciphertext of the zstd
                    frame (the chunk's name and the 8-byte header as
                    associated data); the plaintext length is inside it
                    (the frame's content size), not in the clear

Opening checks, in order: magic and version, the stored size, authentication,
the lengths (the plaintext is at most CHUNK, so decompression is bounded
before it starts: no bomb), the plaintext length, and the name against the
content. A chunk is written in parts (`seal_parts`): joining them would cost
a fresh 4 MiB copy per chunk, which this kind of VM charges for.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import zstandard

from .errors import ChunkError

CHUNK = 4 * 1024 * 1024
MAX_STORED = CHUNK + 1024 * 1024  # zstd never grows 4 MiB by this much
MAGIC = b"DSVC"
VERSION = 2
F_ZSTD, F_AES = 1, 2
_HEAD = struct.Struct("<4sBBH")
_LENGTHS = struct.Struct("<II")

__all__ = ["CHUNK", "ChunkError", "MAX_STORED", "name_of", "open_chunk", "seal", "seal_parts"]


def name_of(data: bytes, naming_key: bytes | None) -> str:
    if naming_key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(naming_key, data, hashlib.sha256).hexdigest()


def seal(data: bytes, name: str, enc_key: bytes | None, level: int = 3) -> bytes:
    return b"".join(seal_parts(data, name, enc_key, level))


def seal_parts(data: bytes, name: str, enc_key: bytes | None, level: int = 3) -> list[bytes]:
    """The stored form in pieces, to be written one after the other."""
    if not 0 < len(data) <= CHUNK:
        raise ValueError(f"a chunk holds 1 to {CHUNK} bytes, not {len(data)}")
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if enc_key is None:
        return [_HEAD.pack(MAGIC, VERSION, F_ZSTD, 0) + _LENGTHS.pack(len(data), len(frame)), frame]
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = _HEAD.pack(MAGIC, VERSION, F_ZSTD | F_AES, 0)
    nonce = os.urandom(12)
    return [head + nonce, AESGCM(enc_key).encrypt(nonce, frame, name.encode() + head)]


def open_chunk(raw: bytes, name: str, enc_key: bytes | None, naming_key: bytes | None) -> bytes:
    if len(raw) < _HEAD.size + _LENGTHS.size:
        raise ChunkError(f"chunk {name}: truncated header")
    magic, version, flags, _ = _HEAD.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise ChunkError(f"chunk {name}: not a vault chunk (format {VERSION})")
    if len(raw) > MAX_STORED + 64:
        raise ChunkError(f"chunk {name}: {len(raw)} bytes, larger than any chunk")
    body = memoryview(raw)[_HEAD.size:]
    if flags & F_AES:
        frame: bytes | memoryview = _decrypt(body, raw[:_HEAD.size], name, enc_key)
        length = _content_size(frame, name)
    elif enc_key is not None:
        raise ChunkError(f"chunk {name}: not encrypted, in an encrypted vault")
    else:
        length, stored = _LENGTHS.unpack_from(body)
        frame = body[_LENGTHS.size:]
        if len(frame) != stored:
            raise ChunkError(f"chunk {name}: truncated")
    if not 0 < length <= CHUNK:
        raise ChunkError(f"chunk {name}: {length} bytes of plaintext, out of range")
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=length)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk {name}: does not decompress ({e})") from None
    if len(data) != length:
        raise ChunkError(f"chunk {name}: {len(data)} bytes, the header says {length}")
    if not hmac.compare_digest(name_of(data, naming_key), name):
        raise ChunkError(f"chunk {name}: content does not match its name")
    return data


def _decrypt(body: memoryview, head: bytes, name: str, enc_key: bytes | None) -> bytes:
    if enc_key is None:
        raise ChunkError(f"chunk {name}: encrypted, and no key was given")
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(enc_key).decrypt(bytes(body[:12]), body[12:], name.encode() + head)
    except (InvalidTag, ValueError):
        raise ChunkError(f"chunk {name}: authentication failed (corrupt, or another key)") from None


def _content_size(frame: bytes | memoryview, name: str) -> int:
    try:
        size = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError:
        raise ChunkError(f"chunk {name}: not a zstd frame") from None
    return -1 if size == zstandard.CONTENTSIZE_UNKNOWN else int(size)
