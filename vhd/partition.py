"""Partition tables of a disk (MBR, or a protective MBR and a GPT): where
the partitions are, for mounting one. Pure: it reads through a function.
(Validation for booting, CRCs included, is the host's: hostcache.boot.)"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import VhdError

SECTOR = 512


@dataclass(frozen=True)
class Partition:
    number: int  # 1-based, as the kernel numbers them
    first_lba: int
    sectors: int
    kind: str

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


def partitions(read: Callable[[int, int], bytes]) -> list[Partition]:
    mbr = read(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    if any(kind == 0xEE for _, kind, _, _ in entries):
        return _gpt(read)
    return [Partition(i + 1, first, count, f"mbr {kind:#04x}")
            for i, (_, kind, first, count) in enumerate(entries) if kind and count]


def _gpt(read: Callable[[int, int], bytes]) -> list[Partition]:
    header = read(SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        return []
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if not 128 <= size <= 4096 or count > 1024:
        raise VhdError("the GPT's partition entry array has an unusual size")
    table = read(entries_lba * SECTOR, -(-count * size // SECTOR) * SECTOR)
    out = []
    for i in range(count):
        entry = table[i * size:(i + 1) * size]
        if len(entry) < 48 or entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            out.append(Partition(i + 1, first, last - first + 1, "gpt"))
    return out
