"""Patches: the few sectors of a chunk that changed since it was stored whole. Pure.

A manifest entry is a chunk's name, or [BASE, PATCH]: the chunk BASE with
the runs of PATCH written over it. A backup that sees a few scattered pages
of a chunk change reads only those pages and stores them as a patch (itself
stored as a chunk: named by its content, compressed, encrypted), so a
scattered 1% change costs about 1% to read and store, and the base chunks
stay shared between disks made from one image. A patch holds every change
since its base (the old patch's runs, overlaid by the new ones), so a point
is never more than two chunks deep; past MAX bytes the chunk is read and
stored whole again. Stored form (little-endian):

    "DSVP"  u32 count  count x (u32 offset, u32 length)  the runs' bytes

Runs are sector-aligned (SECTOR), sorted, apart, inside one chunk; decode
checks exactly that, so any bytes give runs or ChunkError.
"""

from __future__ import annotations

import struct

from .chunk import CHUNK
from .errors import ChunkError

MAGIC = b"DSVP"
SECTOR = 512
MAX = CHUNK // 4  # beyond this a whole chunk is cheaper than a patch
_HEAD = struct.Struct("<4sI")
_RUN = struct.Struct("<II")

Runs = list[tuple[int, bytes]]


def encode(runs: Runs) -> bytes:
    head = _HEAD.pack(MAGIC, len(runs)) + b"".join(_RUN.pack(off, len(data)) for off, data in runs)
    return head + b"".join(data for _, data in runs)


def decode(raw: bytes, name: str = "patch") -> Runs:
    if len(raw) < _HEAD.size or raw[:4] != MAGIC:
        raise ChunkError(f"{name}: not a patch")
    count = _HEAD.unpack_from(raw)[1]
    at = _HEAD.size + count * _RUN.size
    if count > CHUNK // SECTOR or at > len(raw):
        raise ChunkError(f"{name}: {count} runs, more than the patch holds")
    runs, end = [], 0
    for k in range(count):
        off, n = _RUN.unpack_from(raw, _HEAD.size + k * _RUN.size)
        if off < end or off % SECTOR or n == 0 or off + n > CHUNK or at + n > len(raw):
            raise ChunkError(f"{name}: run {k} ({off}, {n}) out of order or out of range")
        runs.append((off, raw[at:at + n]))
        at, end = at + n, off + n
    if at != len(raw):
        raise ChunkError(f"{name}: {len(raw) - at} bytes after the last run")
    return runs


def overlay(old: Runs, new: Runs) -> Runs:
    """`old` with `new` written over it, as sorted runs apart from each other."""
    sectors: dict[int, bytes] = {}
    for off, data in (*old, *new):
        for k in range(0, len(data), SECTOR):
            sectors[off + k] = data[k:k + SECTOR]
    runs: Runs = []
    for off in sorted(sectors):
        if runs and runs[-1][0] + len(runs[-1][1]) == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + sectors[off])
        else:
            runs.append((off, sectors[off]))
    return runs


def size(runs: Runs) -> int:
    return sum(len(data) for _, data in runs)


def apply(base: bytes, runs: Runs) -> bytes:
    out = bytearray(base)
    for off, data in runs:
        out[off:off + len(data)] = data
    return bytes(out)


def sector_ranges(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of `ranges` inside [start, end), widened to whole sectors and merged."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        lo, hi = max(off, start) // SECTOR * SECTOR, -(-min(off + n, end) // SECTOR) * SECTOR
        if lo >= hi:
            continue
        if out and lo <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], hi) - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out
