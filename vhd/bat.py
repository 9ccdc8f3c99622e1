"""The Block Allocation Table and the sector bitmaps of dynamic images.

BAT: one big-endian u32 per block, the sector number of the block's start
(its bitmap) in the file, 0xFFFFFFFF when the block is not allocated. The
table is padded with 0xFFFFFFFF to a whole sector.

Sector bitmap: at the start of each block, one bit per sector of the block,
most significant bit first (sector 0 is bit 7 of byte 0), padded to a whole
sector. A set bit: the sector's data is in this block. A clear bit: the
sector reads from the parent (differencing) or as zeros (dynamic).
All functions here are pure.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

SECTOR = 512
UNALLOCATED = 0xFFFFFFFF


def table_bytes(entries: int) -> int:
    """Bytes the BAT occupies on disk, padded to a sector."""
    return -(-entries * 4 // SECTOR) * SECTOR


def bitmap_bytes(block_size: int) -> int:
    """Bytes of one block's sector bitmap, padded to a sector."""
    return -(-(block_size // SECTOR) // 8 // SECTOR) * SECTOR


def unpack_table(raw: bytes, entries: int) -> array[int]:
    table = array("I", raw[:entries * 4])
    if table.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte 'I'
        raise RuntimeError("array('I') is not 32-bit here")
    table.byteswap()
    return table


def pack_entries(table: array[int], first: int, count: int) -> bytes:
    part = table[first:first + count]
    part.byteswap()
    return part.tobytes()


def pack_table(table: array[int]) -> bytes:
    raw = pack_entries(table, 0, len(table))
    return raw + b"\xff" * (table_bytes(len(table)) - len(raw))


def bit(bitmap: bytes | bytearray, sector: int) -> bool:
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def set_bits(bitmap: bytearray, start: int, count: int) -> bool:
    """Set bits [start, start+count); return True if any bit changed."""
    return _assign(bitmap, start, count, True)


def clear_bits(bitmap: bytearray, start: int, count: int) -> bool:
    return _assign(bitmap, start, count, False)


def _assign(bitmap: bytearray, start: int, count: int, value: bool) -> bool:
    changed = False
    end = start + count
    s = start
    while s < end:
        if s & 7 == 0 and end - s >= 8:
            n = (end - s) >> 3
            want = b"\xff" * n if value else bytes(n)
            if bitmap[s >> 3:(s >> 3) + n] != want:
                bitmap[s >> 3:(s >> 3) + n] = want
                changed = True
            s += n * 8
            continue
        mask = 0x80 >> (s & 7)
        old = bitmap[s >> 3]
        new = old | mask if value else old & ~mask
        if new != old:
            bitmap[s >> 3] = new
            changed = True
        s += 1
    return changed


def runs(bitmap: bytes | bytearray, start: int, count: int) -> Iterator[tuple[bool, int, int]]:
    """Yield (present, first_sector, n) runs covering [start, start+count)."""
    end = start + count
    s = start
    while s < end:
        value = bit(bitmap, s)
        full = 0xFF if value else 0x00
        t = s + 1
        while t < end:
            if t & 7 == 0 and end - t >= 8 and bitmap[t >> 3] == full:
                t += 8
                continue
            if bit(bitmap, t) != value:
                break
            t += 1
        yield value, s, t - s
        s = t


def all_set(bitmap: bytes | bytearray, sectors: int) -> bool:
    whole, rest = divmod(sectors, 8)
    if bitmap[:whole].count(0xFF) != whole:
        return False
    return rest == 0 or bitmap[whole] & (0xFF00 >> rest) & 0xFF == (0xFF00 >> rest) & 0xFF


def none_set(bitmap: bytes | bytearray, sectors: int) -> bool:
    whole, rest = divmod(sectors, 8)
    if bitmap[:whole].count(0) != whole:
        return False
    return rest == 0 or bitmap[whole] & (0xFF00 >> rest) & 0xFF == 0
