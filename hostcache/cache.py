"""The BlobCache: the host's cache of page blob pages, RAM over a local file.

Lines of LINE bytes of one blob (keyed by blob name, so a base image under
many disks on one host is cached once) live in slots of a cache file (the
host's local SSD); the hottest are also kept in RAM. Per line, two sector
bitmaps: `valid` (the sector's bytes are in the slot) and `dirty` (they are
newer than the stamp's). The index lives in LMDB in the host folder.

Modes, per attached disk (CachedBlob):
  NONE       every read and write goes to the stamp
  READONLY   reads fill and use the cache; writes go to the stamp first, then
             refresh the cached sectors
  READWRITE  a write is acknowledged once it is in the cache file and the
             index marks it dirty (data, [sync], then index: in "fsync"
             durability the data is synced before the index commits); dirty
             sectors are written back on flush, on detach and when their line
             is evicted: stamp write acknowledged first, then dirty bits cleared
Eviction is segmented LRU (scan-resistant): a line enters the probation
segment and moves to the protected one on its second use; victims come from
probation first. A dirty victim is written back before its slot is reused.
Crash: the index and the cache file survive a process kill, so dirty lines
are found and written back on the next attach. `lose()` is the host-lost
fault: the cache is gone and the unflushed ranges are reported lost.
"""

from __future__ import annotations

import collections
import enum
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import lmdb

from stamp import Stamp
from stamp.blobfile import PageBlobFile
from stamp.ranges import merge_ranges
from vhd.blockdev import align_write

from .errors import HostError

SECTOR = 512
LINE = 64 * 1024
SECTORS = LINE // SECTOR  # 128: two u64 bitmaps per line
FULL = (1 << SECTORS) - 1
_LINE_ENTRY = struct.Struct("<Q16s16s")  # slot, valid, dirty


class CacheMode(enum.Enum):
    NONE = "None"
    READONLY = "ReadOnly"
    READWRITE = "ReadWrite"


@dataclass
class Line:
    slot: int
    valid: int = 0
    dirty: int = 0

    def pack(self) -> bytes:
        return _LINE_ENTRY.pack(self.slot, self.valid.to_bytes(16, "little"), self.dirty.to_bytes(16, "little"))

    @classmethod
    def unpack(cls, raw: bytes) -> Line:
        slot, valid, dirty = _LINE_ENTRY.unpack(raw)
        return cls(slot, int.from_bytes(valid, "little"), int.from_bytes(dirty, "little"))


def bits(first: int, count: int) -> int:
    """The bitmap of sectors [first, first+count) of a line."""
    return ((1 << count) - 1) << first


def runs(bitmap: int) -> list[tuple[int, int]]:
    """(first sector, count) of each run of set bits."""
    out = []
    s = 0
    while bitmap >> s:
        if not (bitmap >> s) & 1:
            s += (((bitmap >> s) & -(bitmap >> s)).bit_length() - 1)
            continue
        e = s
        while (bitmap >> e) & 1:
            e += 1
        out.append((s, e - s))
        s = e
    return out


@dataclass
class CacheStats:
    read_hits: int = 0  # sectors
    read_misses: int = 0
    writes_cached: int = 0
    written_back: int = 0  # bytes
    evictions: int = 0
    ram_hits: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Segments:
    """Segmented LRU over line keys."""

    probation: collections.OrderedDict[tuple[str, int], None] = field(default_factory=collections.OrderedDict)
    protected: collections.OrderedDict[tuple[str, int], None] = field(default_factory=collections.OrderedDict)
    protected_max: int = 0

    def touch(self, key: tuple[str, int]) -> None:
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.probation:
            del self.probation[key]
            self.protected[key] = None
            while len(self.protected) > self.protected_max:
                demoted, _ = self.protected.popitem(last=False)
                self.probation[demoted] = None
        else:
            self.probation[key] = None

    def drop(self, key: tuple[str, int]) -> None:
        self.probation.pop(key, None)
        self.protected.pop(key, None)

    def victims(self) -> list[tuple[str, int]]:
        return list(self.probation) + list(self.protected)


class BlobCache:
    """One host's cache: `capacity` bytes of cache file, `ram` bytes of RAM."""

    def __init__(self, folder: str, capacity: int, ram: int = 0, fsync: bool = False) -> None:
        if capacity < LINE:
            raise HostError(f"a cache needs at least {LINE} bytes")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.fsync = folder, fsync
        self.slots = capacity // LINE
        self.env = lmdb.open(os.path.join(folder, "cache-index"), map_size=1 << 34, max_dbs=2, sync=fsync,
                             metasync=fsync)
        self.db = self.env.open_db(b"lines")
        path = os.path.join(folder, "cache.dat")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self.fd).st_size < self.slots * LINE:
            os.ftruncate(self.fd, self.slots * LINE)
        self.lines: dict[tuple[str, int], Line] = {}
        self.lru = _Segments(protected_max=max(1, self.slots * 4 // 5))
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.db):
                blob, index = _unkey(bytes(key))
                line = Line.unpack(bytes(raw))
                if line.slot < self.slots:
                    self.lines[(blob, index)] = line
                    self.lru.touch((blob, index))
        used = {line.slot for line in self.lines.values()}
        self.free = [s for s in range(self.slots - 1, -1, -1) if s not in used]
        self.ram_lines = max(0, ram // LINE)
        self.ram: collections.OrderedDict[tuple[str, int], bytearray] = collections.OrderedDict()
        self.stats = CacheStats()
        self.lock = threading.RLock()
        self.leases: dict[str, str] = {}  # blob -> the lease write-back must present

    def grow(self, capacity: int) -> None:
        """Make room for more lines (a VM with a cache of its own arrived)."""
        with self.lock:
            slots = capacity // LINE
            if slots <= self.slots:
                return
            os.ftruncate(self.fd, slots * LINE)
            self.free = list(range(slots - 1, self.slots - 1, -1)) + self.free
            self.slots = slots
            self.lru.protected_max = max(1, slots * 4 // 5)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.env.close()

    # -- the index ------------------------------------------------------------------

    def _save(self, txn: lmdb.Transaction, key: tuple[str, int], line: Line | None) -> None:
        k = _key(*key)
        if line is None:
            txn.delete(k, db=self.db)
        else:
            txn.put(k, line.pack(), db=self.db)

    def dirty(self, blob: str | None = None) -> dict[str, list[tuple[int, int]]]:
        """Unflushed byte ranges (offset, length), per blob."""
        out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for (b, index), line in sorted(self.lines.items()):
            if line.dirty and (blob is None or b == blob):
                for s, n in runs(line.dirty):
                    start = index * LINE + s * SECTOR
                    out[b].append((start, start + n * SECTOR))
        return {b: [(s, e - s) for s, e in merge_ranges(r)] for b, r in out.items()}

    # -- slots ------------------------------------------------------------------------

    def _slot_read(self, line: Line, first: int, count: int) -> bytes:
        return os.pread(self.fd, count * SECTOR, line.slot * LINE + first * SECTOR)

    def _slot_write(self, line: Line, first: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        at = line.slot * LINE + first * SECTOR
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def _allocate(self, key: tuple[str, int], stamp: Stamp | None) -> Line:
        if not self.free:
            self._evict(stamp)
        line = Line(self.free.pop())
        self.lines[key] = line
        return line

    def _evict(self, stamp: Stamp | None) -> None:
        for victim in self.lru.victims():
            line = self.lines[victim]
            if line.dirty:
                if stamp is None:
                    continue
                self._write_back(stamp, victim, line)
            self._forget(victim)
            self.stats.evictions += 1
            return
        raise HostError("the host cache is full of dirty lines and nothing can write them back")

    def _forget(self, key: tuple[str, int]) -> None:
        line = self.lines.pop(key)
        self.lru.drop(key)
        self.ram.pop(key, None)
        with self.env.begin(write=True) as txn:
            self._save(txn, key, None)
        self.free.append(line.slot)

    # -- reads and writes (CachedBlob calls these) ----------------------------------------

    def read(self, stamp: Stamp, blob: str, offset: int, length: int, fill: bool) -> bytes:
        """Sector-aligned read through the cache; misses come from the stamp and,
        with fill, are kept."""
        with self.lock:
            out = bytearray()
            pos, end = offset, offset + length
            while pos < end:
                index, inner = divmod(pos, LINE)
                n = min(LINE - inner, end - pos)
                out += self._read_line(stamp, blob, index, inner // SECTOR, n // SECTOR, fill)
                pos += n
            return bytes(out)

    def _read_line(self, stamp: Stamp, blob: str, index: int, first: int, count: int, fill: bool) -> bytes:
        key = (blob, index)
        line = self.lines.get(key)
        want = bits(first, count)
        if line is not None and line.valid & want == want:
            self.lru.touch(key)
            self.stats.read_hits += count
            ram = self.ram.get(key)
            if ram is not None:
                self.ram.move_to_end(key)
                self.stats.ram_hits += count
                return bytes(ram[first * SECTOR:(first + count) * SECTOR])
            data = self._slot_read(line, first, count)
            self._to_ram(key, line)
            return data
        self.stats.read_misses += count
        size = stamp.blobs.size(blob)
        line_start = index * LINE
        span = min(LINE, max(0, size - line_start))
        fetched = stamp.blobs.read(blob, line_start, span) if span else b""
        fetched = fetched.ljust(LINE, b"\0")
        if line is not None:  # keep our newer (dirty or refreshed) sectors
            for s, n in runs(line.valid):
                fetched = fetched[:s * SECTOR] + self._slot_read(line, s, n) + fetched[(s + n) * SECTOR:]
        result = fetched[first * SECTOR:(first + count) * SECTOR]
        if fill:
            if line is None:
                line = self._allocate(key, stamp)
            fresh = FULL & ~line.valid & bits(0, span // SECTOR)
            for s, n in runs(fresh):
                self._slot_write(line, s, fetched[s * SECTOR:(s + n) * SECTOR])
            line.valid |= fresh
            with self.env.begin(write=True) as txn:
                self._save(txn, key, line)
            self.lru.touch(key)
            self._to_ram(key, line)
        return result

    def _to_ram(self, key: tuple[str, int], line: Line) -> None:
        if not self.ram_lines or line.valid != FULL:
            return
        if key not in self.ram:
            self.ram[key] = bytearray(os.pread(self.fd, LINE, line.slot * LINE))
            while len(self.ram) > self.ram_lines:
                self.ram.popitem(last=False)

    def update(self, stamp: Stamp, blob: str, offset: int, data: bytes | bytearray | memoryview,
               dirty: bool) -> None:
        """Put sector-aligned data in the cache: dirty (ReadWrite: the stamp has
        not got it yet) or clean (ReadOnly: the stamp already has it)."""
        with self.lock:
            view = memoryview(data)
            pos, end = offset, offset + len(view)
            while pos < end:
                index, inner = divmod(pos, LINE)
                n = min(LINE - inner, end - pos)
                key = (blob, index)
                line = self.lines.get(key)
                if line is None:
                    if not dirty:
                        pos += n
                        continue  # a write-through of a line we do not hold: nothing to refresh
                    line = self._allocate(key, stamp)  # may evict (and write back) an earlier line
                first = inner // SECTOR
                self._slot_write(line, first, view[pos - offset:pos - offset + n])
                ram = self.ram.get(key)
                if ram is not None:
                    ram[inner:inner + n] = view[pos - offset:pos - offset + n]
                mask = bits(first, n // SECTOR)
                line.valid |= mask
                if dirty:
                    line.dirty |= mask
                    if self.fsync:
                        os.fdatasync(self.fd)  # the data before the index entry that marks it dirty
                with self.env.begin(write=True) as txn:  # each line's entry right after its data
                    self._save(txn, key, line)
                self.lru.touch(key)
                pos += n
            if dirty:
                self.stats.writes_cached += 1

    # -- write-back ------------------------------------------------------------------

    def _write_back(self, stamp: Stamp, key: tuple[str, int], line: Line) -> None:
        blob, index = key
        size = stamp.blobs.size(blob)
        for s, n in runs(line.dirty):
            at = index * LINE + s * SECTOR
            n = min(n * SECTOR, max(0, size - at))
            if n > 0:
                stamp.blobs.write(blob, at, self._slot_read(line, s, n // SECTOR), lease=self.leases.get(blob))
                self.stats.written_back += n
        line.dirty = 0  # only after the stamp acknowledged every run
        with self.env.begin(write=True) as txn:
            self._save(txn, key, line)

    def flush(self, stamp: Stamp, blob: str) -> int:
        """Write back every dirty sector of `blob`; returns the bytes written."""
        with self.lock:
            before = self.stats.written_back
            for key, line in sorted(self.lines.items()):
                if key[0] == blob and line.dirty:
                    self._write_back(stamp, key, line)
            return self.stats.written_back - before

    def drop_blob(self, blob: str) -> None:
        with self.lock:
            for key in [k for k in self.lines if k[0] == blob]:
                if self.lines[key].dirty:
                    raise HostError(f"blob {blob} has unflushed data in the cache")
                self._forget(key)

    def lose(self) -> dict[str, list[tuple[int, int]]]:
        """The host-lost fault: the local cache is gone. Returns what was lost
        (every unflushed range, per blob)."""
        with self.lock:
            lost = self.dirty()
            with self.env.begin(write=True) as txn:
                txn.drop(self.db, delete=False)
            self.lines.clear()
            self.ram.clear()
            self.lru = _Segments(protected_max=self.lru.protected_max)
            self.free = list(range(self.slots - 1, -1, -1))
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.slots * LINE)
            return lost

    def check(self) -> list[str]:
        """Invariants: slots unique and in range, dirty within valid, free list complete."""
        problems = []
        seen: dict[int, tuple[str, int]] = {}
        for key, line in self.lines.items():
            if not 0 <= line.slot < self.slots:
                problems.append(f"line {key}: slot {line.slot} out of range")
            if line.slot in seen:
                problems.append(f"line {key}: slot {line.slot} also holds {seen[line.slot]}")
            seen[line.slot] = key
            if line.dirty & ~line.valid:
                problems.append(f"line {key}: dirty sectors that are not valid")
        if len(seen) + len(self.free) != self.slots or set(self.free) & set(seen):
            problems.append("free slots and used slots do not add up")
        with self.env.begin() as txn:
            stored = {_unkey(bytes(k)): Line.unpack(bytes(v)) for k, v in txn.cursor(db=self.db)}
        if stored != self.lines:
            problems.append("the persistent index differs from the cache's view")
        return problems


def _key(blob: str, index: int) -> bytes:
    return blob.encode() + b"\0" + index.to_bytes(8, "big")


def _unkey(key: bytes) -> tuple[str, int]:
    return key[:-9].decode(), int.from_bytes(key[-8:], "big")


class CachedBlob(PageBlobFile):
    """A page blob seen through the host cache in one mode: a vhd RawFile, so
    the disk's VHD is read and written through the cache."""

    def __init__(self, cache: BlobCache, stamp: Stamp, blob: str, mode: CacheMode,
                 lease: str | None = None, writable: bool = True) -> None:
        super().__init__(stamp, blob, lease=lease, writable=writable)
        self.cache, self.mode = cache, mode
        if lease:
            cache.leases[blob] = lease

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        if self.mode is CacheMode.NONE:
            return super().pread(length, offset)
        lo, hi = offset - offset % SECTOR, -(-end // SECTOR) * SECTOR
        data = self.cache.read(self.stamp, self.blob, lo, hi - lo, fill=True)
        return data[offset - lo:end - lo]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.mode is CacheMode.NONE:
            return super().pwrite(data, offset)
        if not self.writable:
            raise PermissionError(f"{self.name} is open read-only")
        n = len(data)
        if offset + n > self._size:
            self.truncate(-(-(offset + n) // SECTOR) * SECTOR)
        offset, data = align_write(lambda o, k: self.pread(k, o).ljust(k, b"\0"), offset, data, SECTOR)
        if self.mode is CacheMode.READONLY:
            super().pwrite(data, offset)  # the stamp first: writes go through
            self.cache.update(self.stamp, self.blob, offset, data, dirty=False)
        else:
            self.cache.update(self.stamp, self.blob, offset, data, dirty=True)

    def sync(self) -> None:
        """Flush (and FUA): write back what the cache holds dirty, then make the stamp durable."""
        if self.mode is CacheMode.READWRITE:
            self.cache.flush(self.stamp, self.blob)
        super().sync()
