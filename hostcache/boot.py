"""Boot checks and the boot read trace: pure logic over a read function.

A disk boots if LBA 0 ends in 0x55AA and holds a usable partition table:
either MBR entries (a partition with a type and a nonzero length) or a
protective MBR (type 0xEE) in front of a GPT whose header and entry array
pass their CRC32s. The boot trace is what a boot reads: the first 64 sectors
(boot code), a few MiB sequentially from the first partition (kernel and
initrd), then scattered 4 KiB reads inside it (files), from a fixed seed.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import HostError

SECTOR = 512


class NotBootable(HostError):
    """The disk cannot boot; the message says why."""


@dataclass(frozen=True)
class Partition:
    first_lba: int
    sectors: int
    kind: str  # "mbr 0x83", "gpt <type guid>"


def find_boot_partition(read: Callable[[int, int], bytes], disk_size: int) -> Partition:
    mbr = read(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        raise NotBootable("no boot signature (0x55AA) at the end of LBA 0")
    entries = [struct.unpack_from("<BBBBBBBBII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[4] == 0xEE for e in entries):
        return _gpt(read, disk_size)
    for e in entries:
        kind, first, count = e[4], e[8], e[9]
        if kind == 0:
            continue
        if count == 0:
            raise NotBootable(f"MBR partition of type {kind:#04x} has zero length")
        if (first + count) * SECTOR > disk_size:
            raise NotBootable(f"MBR partition of type {kind:#04x} runs past the end of the disk")
        return Partition(first, count, f"mbr {kind:#04x}")
    raise NotBootable("the MBR has no partition")


def _gpt(read: Callable[[int, int], bytes], disk_size: int) -> Partition:
    header = read(SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        raise NotBootable("protective MBR but no GPT header at LBA 1")
    size = struct.unpack_from("<I", header, 12)[0]
    if not 92 <= size <= SECTOR:
        raise NotBootable(f"GPT header size {size} is invalid")
    stored = struct.unpack_from("<I", header, 16)[0]
    blank = header[:16] + b"\0\0\0\0" + header[20:size]
    if zlib.crc32(blank) != stored:
        raise NotBootable("GPT header CRC32 does not match")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if not 128 <= entry_size <= 4096 or count > 4096:
        raise NotBootable("GPT partition entry array has an invalid size")
    table = read(entries_lba * SECTOR, -(-count * entry_size // SECTOR) * SECTOR)[:count * entry_size]
    if zlib.crc32(table) != entries_crc:
        raise NotBootable("GPT partition entry array CRC32 does not match")
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise NotBootable(f"GPT partition {i + 1} has zero length")
        if (last + 1) * SECTOR > disk_size:
            raise NotBootable(f"GPT partition {i + 1} runs past the end of the disk")
        return Partition(first, last - first + 1, "gpt")
    raise NotBootable("the GPT has no partition")


def boot_trace(part: Partition, sequential: int = 4 * 1024 * 1024, scattered: int = 200,
               seed: int = 2026) -> list[tuple[int, int]]:
    """(offset, length) reads of the default boot."""
    reads = [(lba * SECTOR, SECTOR) for lba in range(64)]
    start = part.first_lba * SECTOR
    span = part.sectors * SECTOR
    seq = min(sequential, span)
    reads += [(start + o, min(64 * 1024, seq - o)) for o in range(0, seq, 64 * 1024)]
    rng = random.Random(seed)
    pages = span // 4096
    reads += [(start + rng.randrange(pages) * 4096, 4096) for _ in range(scattered if pages else 0)]
    return reads


def load_trace(path: str) -> list[tuple[int, int]]:
    """A boot trace file: one read per line, "OFFSET LENGTH" in bytes; # comments."""
    reads = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                offset, length = (int(x, 0) for x in text.split())
            except ValueError:
                raise HostError(f"{path}:{number}: expected OFFSET LENGTH, got {line.strip()!r}") from None
            if offset < 0 or length <= 0:
                raise HostError(f"{path}:{number}: offset and length must be positive")
            reads.append((offset, length))
    return reads


def make_boot_sector(first_lba: int, sectors: int, kind: int = 0x83) -> bytes:
    """An MBR with one partition: for tests and demos."""
    mbr = bytearray(SECTOR)
    mbr[0:3] = b"\xeb\x3c\x90"
    struct.pack_into("<BBBBBBBBII", mbr, 446, 0x80, 0, 2, 0, kind, 0, 0, 0, first_lba, sectors)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def make_gpt(disk_sectors: int, first_lba: int = 2048, last_lba: int | None = None) -> dict[int, bytes]:
    """LBA -> bytes of a protective MBR and a GPT with one partition (tests, demos)."""
    last = (disk_sectors - 34) if last_lba is None else last_lba
    entry = bytearray(128)
    entry[:16] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # Linux filesystem type GUID
    entry[16:32] = bytes(range(16))
    struct.pack_into("<QQ", entry, 32, first_lba, last)
    table = bytes(entry) + bytes(127 * 128)
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ16sQIII", header, 8, 0x00010000, 92, 0, 0, 1, disk_sectors - 1, 34,
                     disk_sectors - 34, bytes(16), 2, 128, 128, zlib.crc32(table))
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
    mbr = bytearray(make_boot_sector(1, min(disk_sectors - 1, 0xFFFFFFFF), kind=0xEE))
    return {0: bytes(mbr), 1: bytes(header).ljust(SECTOR, b"\0"), 2: table[:SECTOR * 32]}
