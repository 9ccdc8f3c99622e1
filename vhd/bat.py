"""The Block Allocation Table and the sector bitmaps of dynamic images.

BAT: one big-endian u32 per block, the sector number of the block's start
(its bitmap) in the file, 0xFFFFFFFF when the block is not allocated. The
table is padded with 0xFFFFFFFF to a whole sector.

Sector bitmap: at the start of each block, one bit per sector of the block,
most significant bit first (sector 0 is bit 7 of byte 0), padded to a whole
sector. A set bit: the sector's data is in this block. A clear bit: the
sector reads from the parent (differencing) or as zeros (dynamic).

Memory (Table, Paged): a table is kept as the 128-entry pages (one BAT
sector each) that hold a value other than the default, so what an open
image holds grows with its allocated blocks, not with its virtual size: an
empty 2040 GiB image of 4 KiB blocks (534M entries, a 2 GiB table on disk)
holds no page at all. Bound: at most one page (about 600 bytes) per
allocated block, and 4 bytes per entry plus 1/128 of a page's overhead
when they are dense. Reading a table goes a chunk at a time
(READ_CHUNK), counting allocated entries as it goes, so a table claiming
more blocks than the file can hold is refused before its pages are built.
Everything here is pure but Table.load and write_empty, which take the
file's pread/pwrite.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

SECTOR = 512
UNALLOCATED = 0xFFFFFFFF
PAGE = SECTOR // 4  # entries in one page of a Table: one BAT sector
READ_CHUNK = 1 << 20  # bytes of table read (or written) at a time
_EMPTY_SECTOR = b"\xff" * SECTOR


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


class Paged:
    """A virtual array of `length` ints of one array typecode, every entry
    `default` until set: only pages holding another value exist."""

    def __init__(self, length: int, typecode: str, default: int) -> None:
        self.length, self.typecode, self.default = length, typecode, default
        self.pages: dict[int, array[int]] = {}
        self._blank = array(typecode, [default]) * PAGE

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> int:
        page = self.pages.get(i >> 7)
        return self.default if page is None else page[i & 127]

    def __setitem__(self, i: int, value: int) -> None:
        if not 0 <= i < self.length:
            raise IndexError(i)
        page = self.pages.get(i >> 7)
        if page is None:
            if value == self.default:
                return
            page = self.pages[i >> 7] = array(self.typecode, self._blank)
        page[i & 127] = value
        if value == self.default and page == self._blank:
            del self.pages[i >> 7]  # back to all default: the page goes

    def __iter__(self) -> Iterator[int]:
        """Every entry, in order (time grows with the length, memory does not)."""
        for first in range(0, self.length, PAGE):
            page = self.pages.get(first >> 7, self._blank)
            yield from page[:min(PAGE, self.length - first)]

    def items(self) -> Iterator[tuple[int, int]]:
        """(index, value) of every entry that is not the default, in index order."""
        default = self.default
        for p in sorted(self.pages):
            base = p * PAGE
            for i, v in enumerate(self.pages[p]):
                if v != default:
                    yield base + i, v

    def clear(self) -> None:
        self.pages.clear()


class Table(Paged):
    """A BAT in memory: entries are sector numbers, UNALLOCATED by default."""

    def __init__(self, entries: int) -> None:
        super().__init__(entries, "I", UNALLOCATED)

    def allocated(self) -> int:
        return sum(PAGE - page.count(UNALLOCATED) for page in self.pages.values())

    def next_allocated(self, b: int, stop: int) -> int:
        """The first allocated block in [b, stop), or `stop`: whole pages
        that hold nothing are skipped with one dictionary look-up each."""
        while b < stop:
            page = self.pages.get(b >> 7)
            if page is None:
                b = (b | 127) + 1
                continue
            if page[b & 127] != UNALLOCATED:
                return b
            b += 1
        return stop

    def pack_entries(self, first: int, count: int) -> bytes:
        """Entries [first, first+count) of one page, as on disk."""
        page = self.pages.get(first >> 7)
        if page is None:
            return _EMPTY_SECTOR[:4 * count]
        part = page[first & 127:(first & 127) + count]
        part.byteswap()
        return part.tobytes()

    @classmethod
    def load(cls, pread: Callable[[int, int], bytes], offset: int, entries: int,
             max_allocated: int) -> Table:
        """The first `entries` entries of the table at `offset`, read a chunk
        at a time. TooManyAllocated as soon as more than `max_allocated`
        entries are allocated (the pages built so far are dropped)."""
        table = cls(entries)
        allocated = 0
        total = entries * 4
        for at in range(0, total, READ_CHUNK):
            raw = pread(min(READ_CHUNK, total - at), offset + at).ljust(min(READ_CHUNK, total - at), b"\xff")
            if raw.count(0xFF) == len(raw):
                continue
            words = array("I", raw)
            allocated += len(words) - words.count(UNALLOCATED)
            if allocated > max_allocated:
                raise TooManyAllocated(allocated, (at + len(raw)) // 4)
            for s in range(0, len(raw), SECTOR):
                piece = raw[s:s + SECTOR]
                if piece.count(0xFF) != len(piece):
                    page = array("I", piece.ljust(SECTOR, b"\xff"))
                    page.byteswap()
                    table.pages[(at + s) // SECTOR] = page
        return table


class TooManyAllocated(Exception):
    """A table holds more allocated entries than its file can (args: how
    many were counted, in how many entries from the start)."""


def write_empty(pwrite: Callable[[bytes, int], object], offset: int, entries: int) -> None:
    """Write an empty table of `entries` entries, padded to a sector, a chunk at a time."""
    total = table_bytes(entries)
    chunk = b"\xff" * min(READ_CHUNK, total)
    for at in range(0, total, READ_CHUNK):
        pwrite(chunk[:min(READ_CHUNK, total - at)], offset + at)


def first_above(raw: bytes, limit: int) -> int | None:
    """The index of the first allocated entry of big-endian `raw` whose value
    is above `limit`, or None: at C speed (a set of the values, then index)."""
    table = unpack_table(raw, len(raw) // 4)
    above = {v for v in set(table) if limit < v != UNALLOCATED}
    return min((table.index(v) for v in above), default=None)


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
