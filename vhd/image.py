"""VHD images as block devices: fixed, dynamic and differencing.

FixedImage is data then footer. SparseImage covers dynamic and differencing
images: mirror footer, dynamic header, BAT, (parent locator data), blocks of
[sector bitmap | data], footer. A differencing image is a SparseImage with a
parent block device: clear bitmap bits read through to it.

Write order (docs/formats/vhd.md, "Crash safety"), which keeps the file a
valid VHD at every instant and loses nothing flushed:
  allocating a block at the current footer position P:
    1. write the footer at P + bitmap + block_size, sync   (file is valid,
       with two footers; the last one wins)
    2. write the block's bitmap at P (overwrites the old footer), then data
  flush():
    3. sync                          (data, new bitmaps durable)
    4. write changed bitmaps of blocks the on-disk BAT already points to,
       and the changed BAT sectors
    5. sync                          (pointers durable)
Until step 5 the on-disk BAT does not point at new blocks, so a crash loses
exactly the unflushed writes and leaves at most unreferenced space.

Write-through (`write_through = True`, for a file whose every pwrite survives
a process kill when it returns, such as a page blob behind a host cache): a
write is not acknowledged until its metadata is in the file too, in this
order and without a sync: data, then the block's bitmap, then its BAT sector
(step 1's sync is skipped as well: the file keeps the order of its writes).
A kill then loses no acknowledged write; flush() still syncs for power loss.

Memory: what an open sparse image holds grows with its allocated blocks,
never with its virtual size (an outsider's 2040 GiB image of 4 KiB blocks
has 534M entries): the BAT and the read fast path are paged tables
(bat.Table, bat.Paged: at most about 1.7 KB per allocated block, 12 bytes
per block when they are dense), a partly present block's bitmap (1/4096
of the block: more than that bound for blocks over 2 MiB) is kept only
once it is read or written, and opening reads and checks the BAT a
chunk at a time. Checking that no two blocks overlap sorts the allocated
entries (about 40 bytes each, while opening).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from . import bat as batlib
from . import dynamic_header as dh
from . import footer as ft
from .blockdev import (
    Alloc,
    BlockDevice,
    Extent,
    FileDevice,
    align_write,
    check_range,
    is_zero,
    write_zeros,
)
from .chain import Candidate, Resolver, candidates, check_allowed
from .errors import (
    BusyError,
    FileTypeError,
    FormatError,
    ParentLoopError,
    ParentMismatchError,
    ParentNotFoundError,
    ParentOutsideError,
    ReadOnlyError,
    UsageError,
    VhdError,
)
from .fileio import OsFile, RawFile
from .geometry import chs_for_size

SECTOR = 512
MAX_CHAIN_DEPTH = 256
# Dynamic images address blocks by a u32 sector number: the file stays
# below 2 TiB. The spec's limit on virtual size for dynamic disks is 2040 GiB.
MAX_DYNAMIC_SIZE = 2040 * 1024 ** 3
MAX_FIXED_SIZE = 64 * 1024 ** 4  # the largest managed disk (Ultra, PremiumV2)

_FULL, _PARTIAL = 1, 2


def fast_pread(file: RawFile) -> Callable[[int, int], bytes]:
    """os.pread bound to the file's descriptor when it has one: no Python
    frame per call on the hot path. Callers handle short reads."""
    if isinstance(file, OsFile) and type(file).pread is OsFile.pread:
        return functools.partial(os.pread, file.fd)
    return file.pread


def fast_pwrite(file: RawFile) -> Callable[[bytes | bytearray | memoryview, int], int]:
    """os.pwrite bound to the descriptor (returns the count written), or a
    wrapper that writes everything and returns the length."""
    if isinstance(file, OsFile) and type(file).pwrite is OsFile.pwrite:
        return functools.partial(os.pwrite, file.fd)

    def write_all(data: bytes | bytearray | memoryview, offset: int) -> int:
        file.pwrite(data, offset)
        return len(data)
    return write_all


class FixedImage(FileDevice):
    """A fixed VHD: the disk's bytes, then the footer. Writes, flush, discard
    and the allocation map are those of a raw device of the same size."""

    def __init__(self, file: RawFile, footer: ft.Footer, readonly: bool, path: str | None) -> None:
        super().__init__(file, readonly, footer.current_size)
        self.footer, self.path = footer, path
        self.parent: BlockDevice | None = None
        self.footer_damaged = False
        self.closed = False
        self.sync_on_close = True
        self.made_here = False  # made by this handle: close() settles its mtime (settle_new_mtime)
        self._pread = fast_pread(file)

    @property
    def disk_type(self) -> ft.DiskType:
        return ft.DiskType.FIXED

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            check_range(self.size, offset, length)
        data = self._pread(length, offset)
        return data if len(data) == length else self.file.pread(length, offset).ljust(length, b"\0")

    def chain(self) -> list[BlockDevice]:
        return [self]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.sync_on_close:
                self.flush()
            if self.made_here:
                settle_new_mtime(self.file)
        finally:
            self.file.close()

    def __enter__(self) -> FixedImage:
        return self


class SparseImage:
    """A dynamic or differencing VHD (see the module comment for the rules)."""

    def __init__(self, file: RawFile, footer: ft.Footer, header: dh.DynamicHeader,
                 table: batlib.Table, readonly: bool, path: str | None,
                 parent: BlockDevice | None = None, durable: bool = True) -> None:
        self.file, self.footer, self.header, self.bat = file, footer, header, table
        self.readonly, self.path, self.parent, self.durable = readonly, path, parent, durable
        self.size = footer.current_size
        self.block_size = header.block_size
        self.sectors_per_block = self.block_size // SECTOR
        self.bitmap_size = batlib.bitmap_bytes(self.block_size)
        self.footer_damaged = False
        self.closed = False
        self.sync_on_close = True  # False: close() writes metadata but never syncs
        self.made_here = False  # made by this handle: close() settles its mtime (settle_new_mtime)
        self._shift = self.block_size.bit_length() - 1
        self._mask = self.block_size - 1
        self._footer_raw = footer.pack()
        self._data_end = file.size() - ft.SIZE  # where the footer sits; next block goes here
        # A block's state: _FULL when it has a _fast entry (the file offset of
        # its data: the read fast path), _PARTIAL when its bitmap is in
        # _bitmaps, not yet known otherwise.
        self._fast = batlib.Paged(len(table), "q", -1)
        self._fast_pages = self._fast.pages
        self._pread = fast_pread(file)
        self._pwrite = fast_pwrite(file)
        self._bitmaps: dict[int, bytearray] = {}
        self._dirty_bat: set[int] = set()
        self._dirty_bitmaps: set[int] = set()
        self._uncommitted: set[int] = set()
        self._unsynced = False
        self.write_through = False  # see the module comment

    @property
    def disk_type(self) -> ft.DiskType:
        return self.footer.disk_type

    # -- bitmaps -----------------------------------------------------------

    def _block_state(self, b: int) -> int:
        if self._fast[b] >= 0:
            return _FULL
        if b in self._bitmaps:
            return _PARTIAL
        raw = self.file.pread(self.bitmap_size, self.bat[b] * SECTOR)
        bm = bytearray(raw.ljust(self.bitmap_size, b"\0"))
        if batlib.all_set(bm, self.sectors_per_block):
            self._fast[b] = self.bat[b] * SECTOR + self.bitmap_size
            return _FULL
        self._bitmaps[b] = bm
        return _PARTIAL

    def _bitmap(self, b: int) -> bytearray:
        if self._block_state(b) == _FULL:
            return bytearray(b"\xff" * self.bitmap_size)
        return self._bitmaps[b]

    def block_bitmap(self, b: int) -> bytes:
        """The sector bitmap of allocated block b, as it reads now."""
        return bytes(self._bitmap(b))

    # -- reads -------------------------------------------------------------

    def _parent_read(self, offset: int, length: int) -> bytes:
        if self.parent is None or offset >= self.parent.size:
            return bytes(length)
        n = min(length, self.parent.size - offset)
        data = self.parent.read(offset, n)
        return data if n == length else data + bytes(length - n)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            check_range(self.size, offset, length)
        inb = offset & self._mask
        if inb + length <= self.block_size:  # inside one fully present block: the common case, kept short
            b = offset >> self._shift
            page = self._fast_pages.get(b >> 7)
            if page is not None and (at := page[b & 127]) >= 0:
                data = self._pread(length, at + inb)
                if len(data) == length:
                    return data
        bs = self.block_size
        parts: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            b, inb = divmod(pos, bs)
            n = min(bs - inb, end - pos)
            parts.extend(self._read_block(b, inb, n))
            pos += n
        return b"".join(parts)

    def _read_block(self, b: int, inb: int, n: int) -> list[bytes]:
        entry = self.bat[b]
        vbase = b * self.block_size
        if entry == batlib.UNALLOCATED:
            return [self._parent_read(vbase + inb, n)]
        fbase = entry * SECTOR + self.bitmap_size
        if self._block_state(b) == _FULL:
            return [self.file.pread(n, fbase + inb).ljust(n, b"\0")]
        out: list[bytes] = []
        first, last = inb // SECTOR, (inb + n - 1) // SECTOR
        for present, s, count in batlib.runs(self._bitmaps[b], first, last - first + 1):
            lo = max(s * SECTOR, inb)
            hi = min((s + count) * SECTOR, inb + n)
            if present:
                out.append(self.file.pread(hi - lo, fbase + lo).ljust(hi - lo, b"\0"))
            else:
                out.append(self._parent_read(vbase + lo, hi - lo))
        return out

    # -- writes ------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.file.name}: opened read-only")
        length = len(data)
        if offset < 0 or offset + length > self.size:
            check_range(self.size, offset, length)
        inb = offset & self._mask
        if not (offset | length) & 511 and inb + length <= self.block_size:
            b = offset >> self._shift
            page = self._fast_pages.get(b >> 7)
            if page is not None and (at := page[b & 127]) >= 0:  # sectors of a fully present block: one pwrite, no metadata
                done = self._pwrite(data, at + inb)
                if done < length:
                    self.file.pwrite(memoryview(data)[done:], at + inb + done)
                self._unsynced = True
                return
        offset, data = align_write(self.read, offset, data, SECTOR)  # read-modify-write whole sectors
        length = len(data)
        view = memoryview(data)
        bs = self.block_size
        pos = 0
        while pos < length:
            b, inb = divmod(offset + pos, bs)
            n = min(bs - inb, length - pos)
            self._write_block(b, inb, view[pos:pos + n])
            pos += n
        if self.write_through:
            self._commit(sync=False)  # bitmaps, then BAT sectors: after the data, before the ack

    def _write_block(self, b: int, inb: int, chunk: memoryview) -> None:
        entry = self.bat[b]
        if entry == batlib.UNALLOCATED:
            if self.parent is None and is_zero(chunk):
                return  # zeros into an unallocated dynamic block: already reads as zeros
            entry = self._allocate(b)
        self.file.pwrite(chunk, entry * SECTOR + self.bitmap_size + inb)
        self._unsynced = True
        if self._block_state(b) == _PARTIAL:
            bm = self._bitmaps[b]
            if batlib.set_bits(bm, inb // SECTOR, len(chunk) // SECTOR):
                self._bitmap_changed(b)

    def _bitmap_changed(self, b: int) -> None:
        bm = self._bitmaps[b]
        if batlib.all_set(bm, self.sectors_per_block):
            self._fast[b] = self.bat[b] * SECTOR + self.bitmap_size
            del self._bitmaps[b]
            bm = bytearray(b"\xff" * self.bitmap_size)
        if b in self._uncommitted or self.write_through:  # no on-disk pointer yet, or no waiting: write now
            self.file.pwrite(bm, self.bat[b] * SECTOR)
        else:
            self._dirty_bitmaps.add(b)

    def _allocate(self, b: int) -> int:
        """Steps 1 and 2 of the write order: a new block at the footer's place."""
        at = self._data_end
        new_end = at + self.bitmap_size + self.block_size
        if new_end // SECTOR > batlib.UNALLOCATED - 1:
            raise VhdError(f"{self.file.name}: file would pass the 2 TiB a dynamic VHD can address")
        self.file.pwrite(self._footer_raw, new_end)
        if self.durable and not self.write_through:
            self.file.sync()
        if self.parent is None:
            self.file.pwrite(b"\xff" * self.bitmap_size, at)
            self._fast[b] = at + self.bitmap_size
        else:
            self.file.pwrite(bytes(self.bitmap_size), at)
            self._bitmaps[b] = bytearray(self.bitmap_size)
        self._data_end = new_end
        self.bat[b] = at // SECTOR
        self._dirty_bat.add(b)
        self._uncommitted.add(b)
        self._unsynced = True
        return self.bat[b]

    def flush(self) -> None:
        """Steps 3 to 5 of the write order: afterwards every write is durable."""
        self._commit(sync=True)

    def write_metadata(self) -> None:
        """Write pending BAT entries and bitmaps without any sync: for files
        whose durability the caller does not need (convert --no-sync)."""
        self._commit(sync=False)

    def _commit(self, sync: bool) -> None:
        if self.readonly:
            return
        if not (self._dirty_bat or self._dirty_bitmaps):
            if self._unsynced and sync:
                self.file.sync()
                self._unsynced = False
            return
        if sync and self.durable:
            self.file.sync()  # 3. data and new blocks' bitmaps before any pointer to them
        for b in sorted(self._dirty_bitmaps):
            if self.bat[b] != batlib.UNALLOCATED:
                self.file.pwrite(self._bitmap(b), self.bat[b] * SECTOR)
        per_sector = SECTOR // 4
        for sector in sorted({b // per_sector for b in self._dirty_bat}):
            first = sector * per_sector
            count = min(per_sector, len(self.bat) - first)
            self.file.pwrite(self.bat.pack_entries(first, count),
                             self.header.table_offset + sector * SECTOR)
        if sync:
            self.file.sync()  # 5. pointers durable
        self._dirty_bat.clear()
        self._dirty_bitmaps.clear()
        self._uncommitted.clear()
        self._unsynced = not sync

    def discard(self, offset: int, length: int) -> None:
        """Afterwards the range reads as zeros. Dynamic: whole blocks are
        unallocated (the file keeps their place until compact, but their
        data is punched out where the file can: fileio.punch_hole), and
        a part of a block is punched out, else zeros are written (a punched
        sector reads as zeros whether its bit is set or not); differencing:
        zeros are written, since a clear bit would show the parent."""
        if self.readonly:
            raise ReadOnlyError(f"{self.file.name}: opened read-only")
        check_range(self.size, offset, length)
        if self.parent is not None:
            write_zeros(self, offset, length)
            return
        bs = self.block_size
        punch = getattr(self.file, "punch_hole", None)
        pos, end = offset, offset + length
        while pos < end:
            b, inb = divmod(pos, bs)
            n = min(bs - inb, end - pos)
            entry = self.bat[b]
            if entry != batlib.UNALLOCATED:
                data_at = entry * SECTOR + self.bitmap_size
                if n == bs or (inb == 0 and b == len(self.bat) - 1 and pos + n == self.size):
                    self._unallocate(b)
                    if punch is not None:
                        punch(data_at, bs)  # before the BAT says so, the block reads as zeros: a discard's result
                elif punch is None or not punch(data_at + inb, n):
                    write_zeros(self, pos, n)
            pos += n
        if self.write_through:
            self._commit(sync=False)  # the unallocated entries before the discard returns

    def _unallocate(self, b: int) -> None:
        self.bat[b] = batlib.UNALLOCATED
        self._fast[b] = -1
        self._bitmaps.pop(b, None)
        self._dirty_bitmaps.discard(b)
        self._uncommitted.discard(b)
        self._dirty_bat.add(b)

    def copy_block_from(self, src: SparseImage, b: int, bitmap: bytes) -> None:
        """Give this image a copy of src's block b (bitmap and data); used by
        rewrites. All-zero pieces of the data are left as holes."""
        entry = self._allocate(b)
        at = entry * SECTOR
        self.file.pwrite(bitmap, at)
        piece = 64 * 1024
        src_at = src.bat[b] * SECTOR + src.bitmap_size
        for off in range(0, self.block_size, piece):
            data = src.file.pread(piece, src_at + off)
            if data and not is_zero(data):
                self.file.pwrite(data, at + self.bitmap_size + off)
        self._fast[b] = -1
        self._bitmaps.pop(b, None)

    def reload(self) -> None:
        """Forget cached bitmaps and positions after the file was rewritten
        underneath (merge's emptying); nothing may be dirty."""
        assert not (self._dirty_bat or self._dirty_bitmaps), "reload with unflushed metadata"
        self._data_end = self.file.size() - ft.SIZE
        self._fast.clear()
        self._bitmaps.clear()
        self._uncommitted.clear()

    # -- allocation map ----------------------------------------------------

    def _parent_allocation(self, offset: int, length: int) -> list[Extent]:
        if self.parent is None or offset >= self.parent.size:
            return [Extent(offset, length, Alloc.ZERO)]
        n = min(length, self.parent.size - offset)
        out = list(self.parent.allocation(offset, n))
        if n < length:
            out.append(Extent(offset + n, length - n, Alloc.ZERO))
        return out

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """Extents joined as they are found, and a run of unallocated blocks
        asked of the parent at once: memory grows with the runs, not with
        the blocks (an empty 2040 GiB image of 4 KiB blocks has 534M)."""
        check_range(self.size, offset, length)
        out: list[Extent] = []
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            b, inb = divmod(pos, bs)
            if self.bat[b] == batlib.UNALLOCATED:
                stop = self._unallocated_until(b, end)
                _join(out, self._parent_allocation(pos, stop - pos))
                pos = stop
                continue
            n = min(bs - inb, end - pos)
            if self._block_state(b) == _FULL:
                _join(out, [Extent(pos, n, Alloc.DATA)])
            else:
                _join(out, self._partial_allocation(b, inb, n))
            pos += n
        return out

    def _unallocated_until(self, b: int, end: int) -> int:
        """Where the run of unallocated blocks from block b ends (at most `end`)."""
        c = self.bat.next_allocated(b, (end - 1) // self.block_size + 1)
        return min(c * self.block_size, end)

    def _partial_allocation(self, b: int, inb: int, n: int) -> list[Extent]:
        vbase = b * self.block_size
        out: list[Extent] = []
        first, last = inb // SECTOR, (inb + n - 1) // SECTOR
        for present, s, count in batlib.runs(self._bitmaps[b], first, last - first + 1):
            lo = max(s * SECTOR, inb)
            hi = min((s + count) * SECTOR, inb + n)
            if present:
                out.append(Extent(vbase + lo, hi - lo, Alloc.DATA))
            else:
                out.extend(self._parent_allocation(vbase + lo, hi - lo))
        return out

    def allocated_blocks(self) -> list[int]:
        return [b for b, _ in self.bat.items()]

    def chain(self) -> list[BlockDevice]:
        members: list[BlockDevice] = [self]
        parent = self.parent
        while parent is not None:
            members.append(parent)
            parent = getattr(parent, "parent", None)
        return members

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.sync_on_close:
                self.flush()
            else:
                self.write_metadata()
            if self.made_here:
                settle_new_mtime(self.file)
        finally:
            self.file.close()
            if self.parent is not None:
                self.parent.close()

    def __enter__(self) -> SparseImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(out: list[Extent], more: list[Extent]) -> None:
    """Append extents to `out`, joining neighbours of the same state (as
    merge_extents does, but without a list of every piece first)."""
    for e in more:
        if e.length == 0:
            continue
        if out and out[-1].state is e.state and out[-1].offset + out[-1].length == e.offset:
            e = Extent(out[-1].offset, out[-1].length + e.length, e.state)
            out[-1] = e
        else:
            out.append(e)


Image = FixedImage | SparseImage


# -- opening ---------------------------------------------------------------

def read_footer(file: RawFile) -> tuple[ft.Footer, bool]:
    """The footer at the end, or the mirror at offset 0 when the end one is
    damaged (returned flag True). Raises FormatError if neither is valid."""
    size = file.size()
    if size < ft.SIZE:
        raise FormatError("file", "length", 0, f"{size} bytes is shorter than a VHD footer")
    at = size - ft.SIZE
    try:
        return ft.Footer.unpack(file.pread(ft.SIZE, at), at), False
    except FormatError as end_error:
        if size >= 3 * ft.SIZE:
            try:
                mirror = ft.Footer.unpack(file.pread(ft.SIZE, 0), 0)
            except FormatError:
                raise end_error from None
            if mirror.disk_type is not ft.DiskType.FIXED:
                return mirror, True
        raise


def repair_command(file: RawFile) -> str:
    """The command that repairs this file: a file's own (a page blob's names
    the stamp command), else `vhd check --repair`."""
    own = getattr(file, "repair_command", None)
    return own if isinstance(own, str) else f"vhd check --repair {file.name}"


def is_vhd(file: RawFile) -> bool:
    """True if the file ends (or, for a dynamic image, starts) with a footer cookie."""
    size = file.size()
    if size < ft.SIZE:
        return False
    return (file.pread(8, size - ft.SIZE) == ft.COOKIE
            or (size >= 3 * ft.SIZE and file.pread(8, 0) == ft.COOKIE))


def damaged_vhd_reason(file: RawFile) -> str | None:
    """Why a file that is_vhd() refuses still looks like a VHD (a footer or
    dynamic header cookie with a few bytes changed, or a footer whose
    checksum matches its bytes), or None: then it reads as a raw disk."""
    size = file.size()
    near = [(size - ft.SIZE, ft.COOKIE, "footer cookie at the end")]
    if size >= 3 * ft.SIZE:
        near += [(0, ft.COOKIE, "footer cookie at offset 0"), (ft.SIZE, dh.COOKIE, "dynamic header cookie at 512")]
    for at, cookie, what in near:
        got = file.pread(len(cookie), at) if at >= 0 else b""
        same = sum(a == b for a, b in zip(got, cookie, strict=False))
        if 4 <= same < len(cookie):
            return f"a damaged {what} ({got!r})"
    if size >= ft.SIZE:
        raw = file.pread(ft.SIZE, size - ft.SIZE)
        if any(raw) and int.from_bytes(raw[64:68], "big") == ft.checksum(raw):
            return "a footer at the end whose checksum matches but whose cookie is wrong"
    return None


def _read_sparse_layout(file: RawFile, footer: ft.Footer) -> tuple[dh.DynamicHeader, batlib.Table]:
    size = file.size()
    end = size - ft.SIZE
    hoff = footer.data_offset
    if hoff < ft.SIZE or hoff + dh.SIZE > end:
        raise FormatError("footer", "data offset", end + 16, f"{hoff} puts the dynamic header outside the file")
    header = dh.DynamicHeader.unpack(file.pread(dh.SIZE, hoff), hoff)
    needed = -(-footer.current_size // header.block_size)
    if header.max_table_entries < needed:
        raise FormatError("dynamic header", "max table entries", hoff + 28,
                          f"{header.max_table_entries} blocks cannot hold {footer.current_size} bytes")
    tbytes = batlib.table_bytes(header.max_table_entries)
    if header.table_offset < ft.SIZE or header.table_offset + header.max_table_entries * 4 > end:
        raise FormatError("dynamic header", "table offset", hoff + 16,
                          f"BAT of {tbytes} bytes at {header.table_offset} does not fit in the file")
    # Only the entries the disk size needs are read: the rest map nothing, and
    # a hostile table may claim 2**32 of them.
    span = batlib.bitmap_bytes(header.block_size) + header.block_size
    table = load_table(file, header.table_offset, needed, span, end)
    _validate_table(table, header, end, _metadata_regions(footer, header))
    return header, table


def _metadata_regions(footer: ft.Footer, header: dh.DynamicHeader) -> list[tuple[int, int, str]]:
    """(offset, length, name) of everything in a sparse file that is not a
    block: mirror, header, BAT and, in a differencing image, locator data."""
    regions = [(0, ft.SIZE, "the footer mirror"), (footer.data_offset, dh.SIZE, "the dynamic header"),
               (header.table_offset, batlib.table_bytes(header.max_table_entries), "the BAT")]
    if footer.disk_type is ft.DiskType.DIFFERENCING:
        regions += [(loc.data_offset, loc.space_bytes, f"parent locator {i}'s data")
                    for i, loc in enumerate(header.locators) if loc.platform != dh.PLATFORM_NONE]
    return regions


def _validate_table(table: batlib.Table, header: dh.DynamicHeader, end: int,
                    regions: list[tuple[int, int, str]]) -> None:
    """Every allocated block lies in the file and overlaps no other block and
    no metadata region (a write there would overwrite the header, the BAT or
    a parent locator)."""
    span = batlib.bitmap_bytes(header.block_size) + header.block_size
    for b, e in table.items():  # each entry alone first: nothing is kept per entry
        _validate_entry(b, e * SECTOR, span, header.table_offset + 4 * b, end, regions)
    starts = sorted(e for _, e in table.items())  # sector numbers: one int each
    for prev, start in zip(starts, starts[1:], strict=False):
        if (start - prev) * SECTOR < span:
            other = _block_at(table, prev)
            b = _block_at(table, start, other if start == prev else -1)  # two entries of one place: the later
            raise FormatError("BAT", f"entry {b}", header.table_offset + 4 * b,
                              f"block at {start * SECTOR} overlaps block {other}")


def _block_at(table: batlib.Table, sector: int, skip: int = -1) -> int:
    """The first block but `skip` whose entry is `sector` (one exists): found
    again only to name it in an error."""
    return next(b for b, e in table.items() if e == sector and b != skip)


def _validate_entry(b: int, start: int, span: int, at: int, end: int,
                    regions: list[tuple[int, int, str]]) -> None:
    if start + span > end:
        raise FormatError("BAT", f"entry {b}", at, f"block at {start} runs past the footer at {end}")
    for lo, n, what in regions:
        if start < lo + n and lo < start + span:
            raise FormatError("BAT", f"entry {b}", at, f"block at {start} overlaps {what}")


def load_table(file: RawFile, table_offset: int, entries: int, span: int, end: int) -> batlib.Table:
    """The BAT's first `entries` entries (bat.Table.load); FormatError as soon
    as more blocks are allocated than the file can hold, before the pages of
    a zeroed table of millions of entries are built."""
    try:
        return batlib.Table.load(file.pread, table_offset, entries, end // span)
    except batlib.TooManyAllocated as e:
        counted, read = e.args
    _entry_past_the_end(file, table_offset, read, span, end)  # names the entry, when one is
    raise FormatError("BAT", "entries", table_offset,
                      f"{counted} or more allocated blocks of {span} bytes cannot fit before the footer at {end}")


def _entry_past_the_end(file: RawFile, table_offset: int, entries: int, span: int, end: int) -> None:
    """FormatError naming the first of `entries` whose block runs past the
    footer, if one does; read a chunk at a time, nothing kept."""
    per_chunk = batlib.READ_CHUNK // 4
    for first in range(0, entries, per_chunk):
        n = min(per_chunk, entries - first)
        i = batlib.first_above(file.pread(4 * n, table_offset + 4 * first), (end - span) // SECTOR)
        if i is not None:
            b = first + i
            raise FormatError("BAT", f"entry {b}", table_offset + 4 * b, f"its block runs past the footer at {end}")


Seen = list[tuple[tuple[int, int] | None, uuidlib.UUID]]


def open_image(target: str | os.PathLike[str] | RawFile, *, writable: bool = False,
               allow_dirs: Sequence[str] | None = None, resolver: Resolver | None = None,
               ignore_timestamp: bool = False, parent_writable: bool = False,
               durable: bool = True, path: str | None = None) -> Image:
    """Open a VHD of any type; a differencing image opens with its whole chain.

    `allow_dirs`: folders parents may live in (default: the folder of
    `target`). `resolver`: tried before the locators (see chain.Resolver).
    `path`: where an already opened RawFile `target` lives, so its parent's
    locators can be followed. A path given by the caller may name a block
    device; parents must be regular files.
    """
    member: str | RawFile = target if isinstance(target, RawFile) else os.fspath(target)
    where = member if isinstance(member, str) else path
    if allow_dirs is None:
        allow_dirs = [os.path.dirname(os.path.abspath(where))] if where is not None else []
    opts = _Opts(list(allow_dirs), resolver, ignore_timestamp, parent_writable, durable)
    return _open_member(member, writable, opts, [], path, top=True)


@dataclass(frozen=True)
class _Opts:
    """What the caller of open_image asked, the same for every chain member."""
    allow_dirs: list[str]
    resolver: Resolver | None
    ignore_timestamp: bool
    parent_writable: bool
    durable: bool


def _identity(file: RawFile) -> tuple[int, int] | None:
    fd = getattr(file, "fd", None)
    if fd is None:
        return None
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _open_member(target: str | RawFile, writable: bool, opts: _Opts, seen: Seen,
                 path: str | None = None, top: bool = False) -> Image:
    file = OsFile(target, writable=writable, allow_block=top) if isinstance(target, str) else target
    path = target if isinstance(target, str) else path
    try:
        return _open_file(file, path, writable, opts, seen)
    except FormatError as e:
        file.close()
        if getattr(e, "file", None) is not None:
            raise  # a parent's error, already naming the parent's file
        named = type(e)(f"{file.name}: {e.what}", e.field, e.offset, e.detail)
        named.file = file.name  # type: ignore[attr-defined]
        raise named from None
    except BaseException:
        file.close()
        raise


def _open_file(file: RawFile, path: str | None, writable: bool, opts: _Opts, seen: Seen) -> Image:
    footer, damaged = read_footer(file)
    ident = _identity(file)
    for other_ident, other_uuid in seen:
        if (ident is not None and ident == other_ident) or footer.unique_id == other_uuid:
            raise ParentLoopError(f"{file.name}: parent chain loops back to an image already in it")
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise ParentLoopError(f"{file.name}: parent chain deeper than {MAX_CHAIN_DEPTH}")
    seen.append((ident, footer.unique_id))
    if damaged and writable:
        raise FormatError("footer", "cookie", file.size() - ft.SIZE,
                          "the footer at the end is damaged (the copy at offset 0 is good); "
                          f"run: {repair_command(file)}")
    if footer.disk_type is ft.DiskType.FIXED:
        if file.size() != footer.current_size + ft.SIZE:
            raise FormatError("footer", "current size", file.size() - ft.SIZE + 48,
                              f"{footer.current_size} but the file holds {file.size() - ft.SIZE} bytes of data")
        return FixedImage(file, footer, not writable, path)
    header, table = _read_sparse_layout(file, footer)
    if (file.size() - ft.SIZE) % SECTOR:
        raise FormatError("file", "length", file.size(), "not a whole number of sectors")
    parent = None
    if footer.disk_type is ft.DiskType.DIFFERENCING:
        parent = _open_parent(path, file, footer, header, opts, seen)
    img = SparseImage(file, footer, header, table, not writable, path, parent, opts.durable)
    img.footer_damaged = damaged
    return img


def _open_parent(path: str | None, file: RawFile, footer: ft.Footer, header: dh.DynamicHeader,
                 opts: _Opts, seen: Seen) -> BlockDevice:
    """The first candidate that opens and is the parent the child recorded.
    A candidate that is not an image (a FIFO, a folder, a damaged file) is
    noted and the next one tried; the first such error is raised if none fits."""
    tried: list[str] = []
    failed: VhdError | None = None
    found: list[Candidate] = []
    if opts.resolver is not None:
        got = opts.resolver(path, header)
        if isinstance(got, (str, os.PathLike)):
            found.append(Candidate("resolver", os.fspath(got)))
        elif got is not None:
            dev = got
            pf = getattr(dev, "footer", None)
            if pf is not None:
                try:
                    _check_parent_identity(file.name, "resolver", header, pf, opts.ignore_timestamp)
                    if not opts.ignore_timestamp and isinstance(dev, (FixedImage, SparseImage)):
                        _check_parent_unmodified(file.name, footer, dev)  # a regular file's mtime, as below
                except ParentMismatchError:
                    dev.close()  # type: ignore[attr-defined]
                    raise
            return dev  # type: ignore[return-value]
    notes: list[str] = []
    if path is not None:
        more, notes = candidates(path, file, header)
        found.extend(more)
    for cand in found:
        if not os.path.lexists(cand.path):
            tried.append(f"{cand.how}: {cand.path} (missing)")
            continue
        depth = len(seen)
        try:
            if cand.how != "resolver":
                check_allowed(cand.path, opts.allow_dirs)
            parent = _open_member(cand.path, opts.parent_writable, replace(opts, parent_writable=False), seen)
        except (FormatError, FileTypeError, BusyError, ParentOutsideError) as e:
            del seen[depth:]
            failed = failed or e
            tried.append(f"{cand.how}: {cand.path} ({e})")
            continue
        try:
            _check_parent_identity(file.name, f"{cand.how} {cand.path}", header,
                                   parent.footer, opts.ignore_timestamp)
            if not opts.ignore_timestamp:
                _check_parent_unmodified(file.name, footer, parent)
        except ParentMismatchError as e:
            parent.close()
            del seen[depth:]
            failed = failed or e
            tried.append(f"{cand.how}: {cand.path} ({e})")
            continue
        return parent
    if failed is not None:
        raise failed
    detail = "; ".join(tried + notes) or "no locator, parent name or resolver"
    raise ParentNotFoundError(f"{file.name}: parent {header.parent_name or '?'} "
                              f"({header.parent_uuid}) not found: tried {detail}")


def _check_parent_identity(child: str, where: str, header: dh.DynamicHeader,
                           parent: ft.Footer, ignore_timestamp: bool) -> None:
    if parent.unique_id != header.parent_uuid:
        raise ParentMismatchError(f"{child}: parent found by {where} has UUID {parent.unique_id}, "
                                  f"the child expects {header.parent_uuid}")
    if not ignore_timestamp and parent.timestamp != header.parent_timestamp:
        raise ParentMismatchError(
            f"{child}: parent found by {where} has timestamp {parent.timestamp}, the child recorded "
            f"{header.parent_timestamp} (the parent changed?); pass --ignore-parent-timestamp to accept it")


def _check_parent_unmodified(child: str, footer: ft.Footer, parent: Image) -> None:
    """The parent's file was last modified before the child was made
    (docs/formats/vhd.md, "Parents are not written"): otherwise the child's
    view of the disk has changed under it."""
    mtime = file_mtime_ns(parent.file)
    if mtime is not None and mtime >= made_ns(footer):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime // 10 ** 9))
        raise ParentMismatchError(
            f"{child}: its parent {parent.file.name} was modified at {when}, after the child was made "
            f"(timestamp {footer.timestamp}): the child would read changed data. If the parent was only "
            "copied, copy it with its times kept (cp -p, rsync -a) or pass --ignore-parent-timestamp")


def made_ns(footer: ft.Footer) -> int:
    """The instant an image was made, from its footer timestamp, in Unix nanoseconds."""
    return stamp_ns(footer.timestamp)


def file_mtime_ns(file: RawFile) -> int | None:
    """A regular file's modification time; None for anything else (a page
    blob, a block device: writes to a device leave its node's time alone)."""
    fd = getattr(file, "fd", None)
    if fd is None:
        return None
    st = os.fstat(fd)
    return st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None


def pin_parent_mtime(parent: Image, child_footer: ft.Footer) -> None:
    """Set the parent's modification time to a whole second before the child
    was made, so any later write to the parent (by us, qemu or anyone) gives
    it a later time that _check_parent_unmodified sees. Synced. Only merge
    uses it, right after giving the parent a new footer timestamp: every
    other child then refuses the parent by that, whatever its mtime."""
    fd = getattr(parent.file, "fd", None)
    if fd is None:
        return
    st = os.fstat(fd)
    limit = made_ns(child_footer) - 10 ** 9
    if st.st_mtime_ns <= limit:
        return
    try:
        os.utime(fd, ns=(st.st_atime_ns, limit))
        os.fsync(fd)
    except OSError as e:  # not its owner, a read-only filesystem
        raise VhdError(f"{parent.file.name}: cannot set its modification time ({e.strerror or e}), which "
                       "a child needs to detect later writes to it") from None


def stamp_ns(timestamp: int) -> int:
    """A footer timestamp (seconds since 2000) in Unix nanoseconds."""
    return (timestamp + ft.EPOCH_2000) * 10 ** 9


MAX_CLOCK_WAIT = 3  # seconds a new child waits for the clock to pass its parent's mtime


def _made_after(parent: Image) -> int:
    """The timestamp of a new child of `parent`: a second before now (a
    margin for coarse file clocks) and after the parent's last modification,
    so that any later write to the parent is seen (_check_parent_unmodified).
    The parent's mtime is never set back: that would also hide a write made
    after an earlier child. A parent modified in the last two seconds makes
    us wait for the clock; one modified in the future is refused."""
    mtime = file_mtime_ns(parent.file)
    while True:
        made = ft.vhd_timestamp() - 1
        if mtime is None or mtime < stamp_ns(made):
            return made
        target = mtime // 10 ** 9 - ft.EPOCH_2000 + 2  # the first whole second with made > mtime
        if target - ft.vhd_timestamp() > MAX_CLOCK_WAIT:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime // 10 ** 9))
            raise VhdError(f"{parent.file.name}: modified at {when}, in the future: a child made now could not "
                           "tell later writes to it from that one; fix the clock, or `touch` the parent")
        time.sleep(max(0.01, target + ft.EPOCH_2000 - time.time()))


def settle_new_mtime(file: RawFile) -> None:
    """Set a newly made image's mtime two whole seconds back, as it is closed
    by the handle that made it: no child of it can exist yet (that handle
    held it exclusively throughout), and a child made right away then need
    not wait for the clock (_made_after)."""
    fd = getattr(file, "fd", None)
    if fd is None or fd < 0:
        return
    back = stamp_ns(ft.vhd_timestamp() - 2)
    if os.fstat(fd).st_mtime_ns > back:
        os.utime(fd, ns=(back, back))


# -- creating --------------------------------------------------------------

def _check_size(size: int, limit: int) -> None:
    if size <= 0 or size % SECTOR:
        raise UsageError(f"size {size} must be a positive multiple of 512 bytes")
    if size > limit:
        raise UsageError(f"size {size} is larger than this image type allows ({limit} bytes)")


def new_footer(disk_type: ft.DiskType, size: int, data_offset: int = ft.FIXED_DATA_OFFSET,
               unique_id: uuidlib.UUID | None = None, timestamp: int | None = None) -> ft.Footer:
    return ft.Footer(disk_type, size, size, chs_for_size(size), unique_id or uuidlib.uuid4(),
                     ft.vhd_timestamp() if timestamp is None else timestamp, data_offset)


def _target_file(target: str | os.PathLike[str] | RawFile) -> tuple[RawFile, str | None]:
    if isinstance(target, RawFile):
        return target, None
    path = os.fspath(target)
    return OsFile(path, writable=True, create=True), path


def create_fixed(target: str | os.PathLike[str] | RawFile, size: int, *,
                 unique_id: uuidlib.UUID | None = None, durable: bool = True) -> FixedImage:
    """A fixed VHD of `size` bytes (sparse on disk until written).
    durable=False: not synced here (the caller syncs, e.g. convert)."""
    _check_size(size, MAX_FIXED_SIZE)
    file, path = _target_file(target)
    footer = new_footer(ft.DiskType.FIXED, size, unique_id=unique_id)
    with _removed_on_failure(file, path):
        file.truncate(size)
        file.pwrite(footer.pack(), size)
        if durable:
            file.sync()
    img = FixedImage(file, footer, False, path)
    img.made_here = True
    return img


@contextlib.contextmanager
def _removed_on_failure(file: RawFile, path: str | None) -> Iterator[None]:
    """Laying out a new file that fails (a full disk) closes and removes it:
    no half-made image is left to be mistaken for one, or to block a retry."""
    try:
        yield
    except BaseException:
        file.close()
        if path is not None:
            os.unlink(path)
        raise


def create_dynamic(target: str | os.PathLike[str] | RawFile, size: int, *,
                   block_size: int = dh.DEFAULT_BLOCK_SIZE, durable: bool = True,
                   unique_id: uuidlib.UUID | None = None) -> SparseImage:
    """An empty dynamic VHD: mirror footer, header, BAT, footer."""
    _check_size(size, MAX_DYNAMIC_SIZE)
    _check_block_size(block_size)
    file, path = _target_file(target)
    with _removed_on_failure(file, path):
        return _write_sparse(file, path, ft.DiskType.DYNAMIC, size, block_size, None, [], durable, unique_id)


def create_differencing(target: str | os.PathLike[str], parent_path: str | os.PathLike[str], *,
                        block_size: int = dh.DEFAULT_BLOCK_SIZE, durable: bool = True,
                        allow_dirs: Sequence[str] | None = None) -> SparseImage:
    """A differencing VHD over `parent_path`, with W2ru and W2ku locators."""
    _check_block_size(block_size)
    path, ppath = os.fspath(target), os.path.abspath(os.fspath(parent_path))
    _refuse_block_parent(ppath)
    parent = open_image(ppath, allow_dirs=allow_dirs)
    try:
        if len(parent.chain()) >= MAX_CHAIN_DEPTH:
            raise UsageError(f"{ppath} heads a chain of {MAX_CHAIN_DEPTH} images already: a child would "
                             f"pass the {MAX_CHAIN_DEPTH} levels a chain may have (merge or convert it first)")
        rel = os.path.relpath(ppath, os.path.dirname(os.path.abspath(path)))
        locators = [(dh.W2RU, (".\\" + rel.replace("/", "\\")) if not rel.startswith("..") else rel.replace("/", "\\")),
                    (dh.W2KU, ppath)]
        parent_info = (parent.footer.unique_id, parent.footer.timestamp, os.path.basename(ppath))
        size = parent.size
        made = _made_after(parent)
        file = OsFile(path, writable=True, create=True)
    except BaseException:
        parent.close()
        raise
    try:
        img = _write_sparse(file, path, ft.DiskType.DIFFERENCING, size, block_size, parent_info,
                            locators, durable, None, made)
    except BaseException:
        parent.close()
        file.close()
        os.unlink(path)
        raise
    img.parent = parent
    return img


def _refuse_block_parent(ppath: str) -> None:
    """A parent must be a regular file: a child detects writes to its parent by
    the parent's mtime, and a write to a block device changes neither its
    node's time nor the VHD footer on it (UUID and timestamp stay), so nothing
    a child can check tells a changed device from the one it was made over.
    Opening refuses block-device parents anyway (a child of one could never
    be opened by its locators)."""
    try:
        mode = os.stat(ppath).st_mode
    except OSError:
        return  # open_image says what is wrong with the path
    if stat.S_ISBLK(mode):
        raise UsageError(f"{ppath} is a block device: a differencing image's parent must be a regular file "
                         "(writes to a device leave no trace a child can check); copy it to a file first "
                         "(vhd convert DEVICE base.vhd --to dynamic) and make the child over that")


def _check_block_size(block_size: int) -> None:
    if block_size & (block_size - 1) or not dh.MIN_BLOCK_SIZE <= block_size <= dh.MAX_BLOCK_SIZE:
        raise UsageError(f"block size {block_size} must be a power of two from "
                         f"{dh.MIN_BLOCK_SIZE} to {dh.MAX_BLOCK_SIZE} bytes")


def _write_sparse(file: RawFile, path: str | None, disk_type: ft.DiskType, size: int,
                  block_size: int, parent: tuple[uuidlib.UUID, int, str] | None,
                  locators: list[tuple[int, str]], durable: bool,
                  unique_id: uuidlib.UUID | None, timestamp: int | None = None) -> SparseImage:
    """Lay out a new sparse image; the footer goes last, after a sync."""
    entries = -(-size // block_size)
    table_offset = ft.SIZE + dh.SIZE
    pos = table_offset + batlib.table_bytes(entries)
    locs: list[dh.ParentLocator] = []
    payloads: list[tuple[int, bytes]] = []
    for code, text in locators:
        raw = text.encode("utf-16-le")
        space = -(-len(raw) // SECTOR) * SECTOR
        locs.append(dh.ParentLocator(code, space, len(raw), pos))
        payloads.append((pos, raw.ljust(space, b"\0")))
        pos += space
    locs += [dh.EMPTY_LOCATOR] * (dh.LOCATOR_COUNT - len(locs))
    puuid, pts, pname = parent if parent else (uuidlib.UUID(int=0), 0, "")
    header = dh.DynamicHeader(table_offset, entries, block_size, puuid, pts, pname, tuple(locs))
    footer = new_footer(disk_type, size, ft.SIZE, unique_id, timestamp)
    table = batlib.Table(entries)
    if file.size():
        file.truncate(0)  # only when reusing a file: on ext4 a truncate to 0 makes close() flush
    file.pwrite(footer.pack() + header.pack(), 0)
    batlib.write_empty(file.pwrite, table_offset, entries)
    for at, raw in payloads:
        file.pwrite(raw, at)
    if durable:
        file.sync()  # headers and BAT before the footer that makes the file a VHD
    file.pwrite(footer.pack(), pos)
    if durable:
        file.sync()
    img = SparseImage(file, footer, header, table, False, path, None, durable)
    img.made_here = True
    return img
