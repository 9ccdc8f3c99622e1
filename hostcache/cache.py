"""The BlobCache: the host's cache of page blob pages, RAM over a local file.

Lines of LINE bytes of one blob live in slots of a cache file (the host's
local SSD); the hottest are also kept in RAM. A line is keyed by the blob's
id in the stamp (never reused: a disk deleted and re-created under its name
gets other lines) and its index, so a base image under many disks on one host
is cached once. Per line: two sector bitmaps, `valid` (the sector's bytes are
in the slot) and `dirty` (newer than the stamp's), and an xxh3-64 checksum
per 4 KiB chunk of the slot.
The index lives in LMDB in the host folder: `lines` and `blobs` (id -> name,
and the blob's version when its clean lines were last known to match it).

Modes, per attached disk (CachedBlob):
  NONE       every read and write goes to the stamp
  READONLY   reads fill and use the cache; a write first takes the sectors
             out of the index, then goes to the stamp, then refreshes them,
             all under the lock: two write-throughs of one sector (workers
             of `hostcache serve`) would otherwise refresh it in another
             order than the stamp took them, leaving the cache the older
  READWRITE  a write is acknowledged once it is in the cache file and the
             index marks it dirty; dirty sectors are written back on flush,
             on detach and when their line is evicted: stamp write
             acknowledged first, then dirty bits cleared
Rules that keep the cache and the stamp agreeing after a kill at any point:
- slot bytes, then the index entry that makes them valid (with their checksums);
  in "fsync" durability the data is synced before the index commits;
- a write into a chunk that holds dirty sectors (the only copy of an
  acknowledged write) first records the chunk's new checksum as pending, so
  either version verifies;
- a chunk whose bytes fail their checksum is not served: its clean sectors are
  dropped and read again from the stamp, its dirty ones reported lost;
- a blob's clean lines are kept across opens only while its version is the
  one recorded when it was last closed; an open for writing clears the record
  until the close, so a kill in between drops them on the next open.
Eviction is segmented LRU (scan-resistant): a line enters the probation
segment and moves to the protected one on its second use; victims come from
probation first. A dirty victim is written back before its slot is reused.
`lose()` is the host-lost fault: the cache is gone and the unflushed ranges
are reported lost.
Several processes of one host may share the cache (`hostcache serve` and a
CLI command): each operation holds a SharedLock (threads and processes), the
index in LMDB is the truth, every index write moves its generation on, and a
process that takes the lock and finds the generation moved loads the index
again (so no two processes hand out one slot). A blob's record keeps its
writer's lease, so whichever process evicts a dirty line can write it back.
An operation that fails part way (the cache's disk full) is a HostError and
leaves the index the truth: the next operation loads it again.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import json
import mmap
import os
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb
import xxhash

from stamp.blobfile import PageBlobFile
from stamp.errors import BlobNotFound
from stamp.hosted import HostStamp
from stamp.ranges import merge_ranges
from vhd.blockdev import align_write

from .errors import HostError

xxh3 = xxhash.xxh3_64_intdigest

SECTOR = 512
LINE = 64 * 1024
SECTORS = LINE // SECTOR  # 128: u128 bitmaps per line
FULL = (1 << SECTORS) - 1
CHUNK = 4096  # the unit of a checksum
PER = CHUNK // SECTOR  # 8 sectors
CHUNKS = LINE // CHUNK  # 16 checksums per line
_LINE_HEAD = struct.Struct("<Q16s16sH")  # slot, valid, dirty, pending chunks
_SUMS = CHUNKS * 8  # a u64 checksum per chunk; pending lines carry a second array
_ID = struct.Struct(">QQ")  # the index key: blob id, line index (big-endian: sorted)

Key = tuple[int, int]  # (blob id, line index)


class CacheMode(enum.Enum):
    NONE = "None"
    READONLY = "ReadOnly"
    READWRITE = "ReadWrite"


def _zero_sums() -> array[int]:
    return array("Q", bytes(_SUMS))


@dataclass
class Line:
    slot: int
    valid: int = 0
    dirty: int = 0
    sums: array[int] = field(default_factory=_zero_sums)
    pending: int = 0  # chunks holding dirty sectors, rewritten in place: `alt` holds the new checksum
    alt: array[int] = field(default_factory=_zero_sums)
    landed: int = 0  # not stored: pending chunks whose rewrite this process saw complete

    def pack(self) -> bytes:
        head = _LINE_HEAD.pack(self.slot, _b(self.valid), _b(self.dirty), self.pending)
        return head + self.sums.tobytes() + (self.alt.tobytes() if self.pending else b"")

    @classmethod
    def unpack(cls, raw: bytes) -> Line:
        slot, valid, dirty, pending = _LINE_HEAD.unpack_from(raw)
        at = _LINE_HEAD.size
        sums = array("Q", raw[at:at + _SUMS])
        alt = array("Q", raw[at + _SUMS:at + 2 * _SUMS]) if len(raw) >= at + 2 * _SUMS else _zero_sums()
        return cls(slot, _i(valid), _i(dirty), sums, pending, alt)

    def chunk_ok(self, c: int, got: int) -> bool:
        """Do the slot's bytes of chunk c (whose checksum is `got`) verify?"""
        return got == self.sums[c] or bool((self.pending >> c) & 1 and got == self.alt[c])


def _b(bitmap: int) -> bytes:
    return bitmap.to_bytes(16, "little")


def _i(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def checksums(data: bytes | bytearray | memoryview) -> list[int]:
    """The checksum (xxh3-64, as the stamp's records) of each 4 KiB chunk of data."""
    view = memoryview(data)
    return [xxh3(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK)]


def chunk_range(first: int, count: int) -> tuple[int, int]:
    """The chunks [c0, c1) that sectors [first, first+count) fall in."""
    return first // PER, -(-(first + count) // PER)


def chunks_of(sectors: int, c0: int = 0, c1: int = CHUNKS) -> int:
    """The bitmap of chunks (among [c0, c1)) holding any of the sectors."""
    out = 0
    for c in range(c0, c1):
        if (sectors >> (c * PER)) & 0xFF:
            out |= 1 << c
    return out


def chunk_sectors(chunks: int) -> int:
    """The bitmap of the sectors of the chunks."""
    return sum(0xFF << (c * PER) for c in range(CHUNKS) if (chunks >> c) & 1)


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
    bad_sectors: int = 0  # valid sectors in chunks that failed their checksum (clean ones read again)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Segments:
    """Segmented LRU over line keys."""

    probation: collections.OrderedDict[Key, None] = field(default_factory=collections.OrderedDict)
    protected: collections.OrderedDict[Key, None] = field(default_factory=collections.OrderedDict)
    protected_max: int = 0

    def touch(self, key: Key) -> None:
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

    def drop(self, key: Key) -> None:
        self.probation.pop(key, None)
        self.protected.pop(key, None)

    def victims(self) -> list[Key]:
        return list(self.probation) + list(self.protected)


class FreeSlots:
    """The cache file's free slots: those freed below a high-water mark, and
    every slot from the mark up (never used, so not listed: a cache of any
    size costs nothing until its slots are used). The lowest is taken first."""

    def __init__(self, slots: int, used: set[int]) -> None:
        self.slots = slots
        self.mark = max(used) + 1 if used else 0
        self.freed = [s for s in range(self.mark - 1, -1, -1) if s not in used]

    def __len__(self) -> int:
        return len(self.freed) + self.slots - self.mark

    def pop(self) -> int:
        if self.freed:
            return self.freed.pop()
        if self.mark >= self.slots:
            raise IndexError("no free slot")
        self.mark += 1
        return self.mark - 1

    def append(self, slot: int) -> None:
        self.freed.append(slot)

    def overlaps(self, used: set[int]) -> bool:
        return bool(set(self.freed) & used) or any(s >= self.mark for s in used)


class SharedLock:
    """The cache's lock, over the threads of this process (an RLock) and the
    processes that share the cache (flock on a lock file, reopened in a
    forked child, which must not share its parent's). Taking it from outside
    calls `on_acquire`, so the process catches up with what others wrote; an
    error leaving it calls `on_error`, which may raise another in its place.
    The lock file's first 8 bytes, mapped shared, are a generation counter
    that whoever holds the lock moves on before changing what it guards."""

    def __init__(self, path: str, on_acquire: Callable[[], None],
                 on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        self.path, self.on_acquire, self.on_error = path, on_acquire, on_error
        self.rlock = threading.RLock()
        self.depth = 0
        self.pid = -1
        self.fd = -1
        self.counter: mmap.mmap | None = None

    def generation(self) -> int:
        assert self.counter is not None and self.depth, "the lock is not held"
        return int.from_bytes(self.counter[:8], "little")

    def bump(self) -> int:
        """Move the generation on (the lock held): other processes will look again."""
        gen = self.generation() + 1
        self.counter[:8] = gen.to_bytes(8, "little")  # type: ignore[index]
        return gen

    def __enter__(self) -> SharedLock:
        self.rlock.acquire()
        if self.depth == 0:
            try:
                self._take()
            except BaseException:
                self.rlock.release()
                raise
        self.depth += 1
        return self

    def _take(self) -> None:
        if self.pid != os.getpid():
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self.fd).st_size < 8:
                os.ftruncate(self.fd, 8)  # zeros: a race between two creators loses nothing
            self.counter = mmap.mmap(self.fd, 8)
            self.pid = os.getpid()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            self.depth += 1  # generation() may be read in on_acquire
            try:
                self.on_acquire()
            finally:
                self.depth -= 1
        except BaseException:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            raise

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.depth -= 1
        try:
            if self.depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                if error is not None:
                    self.on_error(error)
        finally:
            self.rlock.release()

    def close(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():
            assert self.counter is not None
            self.counter.close()
            os.close(self.fd)
        self.fd, self.pid, self.counter = -1, -1, None


class BlobCache:
    """One host's cache: `capacity` bytes of cache file, `ram` bytes of RAM."""

    def __init__(self, folder: str, capacity: int, ram: int = 0, fsync: bool = False) -> None:
        if capacity < LINE:
            raise HostError(f"a cache needs at least {LINE} bytes")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.fsync = folder, fsync
        self.slots = capacity // LINE
        self.env = lmdb.open(os.path.join(folder, "cache-index"), map_size=1 << 34, max_dbs=4, mode=0o700, sync=fsync,
                             metasync=fsync)
        self.db = self.env.open_db(b"lines")
        self.blobs_db = self.env.open_db(b"blobs")
        self.lost_db = self.env.open_db(b"lost")  # blob name -> [[offset, length]...]: kept until read
        path = os.path.join(folder, "cache.dat")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.lines: dict[Key, Line] = {}
        self.free = FreeSlots(self.slots, set())
        self.lru = _Segments(protected_max=max(1, self.slots * 4 // 5))
        self.known: dict[int, dict[str, Any]] = {}  # blob id -> {"name", "version", "lease"}
        self.legacy: dict[bytes, tuple[str, int, Line]] = {}  # lines of an index keyed by name (older hosts)
        self.ram_lines = max(0, ram // LINE)
        self.ram: collections.OrderedDict[Key, bytearray] = collections.OrderedDict()
        self.stats = CacheStats()
        self.lost: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # dirty sectors that failed
        self.seen = -1  # the generation of the index this process last loaded or wrote
        self.lock = SharedLock(os.path.join(folder, "cache.lock"), self._catch_up, self._failed)
        with self.lock:
            if os.fstat(self.fd).st_size < self.slots * LINE:
                os.ftruncate(self.fd, self.slots * LINE)

    # -- several processes: the index is the truth, read again when another process changed it --

    def _write(self) -> lmdb.Transaction:
        """A write transaction of the index (the lock held), after moving the
        generation on: other processes will know to read the index again."""
        self.seen = self.lock.bump()
        return self.env.begin(write=True)

    def _catch_up(self) -> None:
        """Called with the lock just taken: if another process changed the
        index (or grew the file) since this one last looked, load it again."""
        if self.lock.generation() == self.seen:
            return
        with self.env.begin() as txn:
            self.slots = max(self.slots, os.fstat(self.fd).st_size // LINE)
            self.lru.protected_max = max(1, self.slots * 4 // 5)
            self._load(txn)

    def _failed(self, error: BaseException) -> None:
        """An operation failed part way (a full disk, say): what this process
        holds in memory may be ahead of the index, so the next operation loads
        the index again. A failure of the cache's own files is a HostError."""
        self.seen = -1
        if isinstance(error, (OSError, lmdb.Error)):
            raise HostError(f"the host cache in {self.folder} failed: {error}") from error

    def _load(self, txn: Any) -> None:
        """The index as the processes left it: lines (a line this process
        already holds unchanged keeps its RAM copy and what it saw land),
        blobs, lost sectors; the free slots are the ones no line holds."""
        lines: dict[Key, Line] = {}
        self.legacy.clear()
        for key, raw in txn.cursor(db=self.db):
            if len(key) != _ID.size:
                self._legacy_line(bytes(key), bytes(raw))
                continue
            k = _ID.unpack(bytes(key))
            mine = self.lines.get(k)
            line = mine if mine is not None and mine.pack() == bytes(raw) else Line.unpack(bytes(raw))
            if line.slot < self.slots:
                lines[k] = line
        for k in list(self.ram):
            if self.lines.get(k) is not lines.get(k):
                del self.ram[k]
        for k in self.lru.victims():
            if k not in lines:
                self.lru.drop(k)
        for k in lines:
            if k not in self.lru.probation and k not in self.lru.protected:
                self.lru.touch(k)
        self.lines = lines
        self.known = {_ID.unpack(bytes(k))[0]: json.loads(bytes(v)) for k, v in txn.cursor(db=self.blobs_db)}
        self.lost = collections.defaultdict(list)
        for key, raw in txn.cursor(db=self.lost_db):
            self.lost[bytes(key).decode()] = [tuple(r) for r in json.loads(bytes(raw))]
        used = {line.slot for line in lines.values()} | {e[2].slot for e in self.legacy.values()}
        self.free = FreeSlots(self.slots, used)
        self.seen = self.lock.generation()

    def grow(self, capacity: int) -> None:
        """Make room for more lines (a VM with a cache of its own arrived)."""
        with self.lock:
            slots = capacity // LINE
            if slots <= self.slots:
                return
            os.ftruncate(self.fd, slots * LINE)
            self.seen = self.lock.bump()  # other processes look at the file's size again
            self.free.slots = slots
            self.slots = slots
            self.lru.protected_max = max(1, slots * 4 // 5)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.env.close()
            self.lock.close()

    # -- blobs: identity and version ------------------------------------------------------

    def open_blob(self, stamp: HostStamp, name: str, writable: bool, lease: str | None = None,
                  keep_clean: bool = True) -> int:
        """Start using blob `name`; returns its id. Clean lines survive only if
        the blob's version is the one recorded at its last close (else it was
        written elsewhere, or this host died while writing it); lines of an
        older blob of the same name (deleted since) are dropped. The writer's
        lease is kept in the index: any process of this host evicting a dirty
        line of the blob presents it. Without keep_clean (a writer that will
        not keep the cache up to date: caching None) clean lines go too."""
        blob_id, version = stamp.blobs.version(name)
        with self.lock:
            lease = lease or self.known.get(blob_id, {}).get("lease")
            for other, rec in list(self.known.items()):
                if rec["name"] == name and other != blob_id:
                    self._drop_lines(other, clean_only=False)  # that blob is gone: so is its data
                    self._register(other, None)
            if not keep_clean or self.known.get(blob_id, {}).get("version") != version:
                self._drop_lines(blob_id, clean_only=True)  # dirty sectors are acknowledged writes: kept
            self._register(blob_id, {"name": name, "version": None if writable else version, "lease": lease})
        return blob_id

    def close_blob(self, stamp: HostStamp, blob_id: int) -> None:
        """Done writing the blob (after its flush): record the version its clean
        lines match, and forget the writer's lease (it is being released: a
        later write-back must name none, or the stamp refuses it)."""
        with self.lock:
            rec = self.known.get(blob_id)
            if rec is None:
                return
            try:
                got_id, version = stamp.blobs.version(rec["name"])
            except BlobNotFound:
                return
            if got_id == blob_id:
                self._register(blob_id, {**rec, "version": version, "lease": None})

    def _register(self, blob_id: int, rec: dict[str, Any] | None) -> None:
        key = _ID.pack(blob_id, 0)
        with self._write() as txn:
            if rec is None:
                self.known.pop(blob_id, None)
                txn.delete(key, db=self.blobs_db)
            else:
                self.known[blob_id] = rec
                txn.put(key, json.dumps(rec).encode(), db=self.blobs_db)

    def _name(self, blob_id: int) -> str:
        """The name of a blob in use; one whose record is gone was detached or
        deleted (by another process) under the one using it."""
        rec = self.known.get(blob_id)
        if rec is None:
            raise HostError(f"blob #{blob_id} is no longer in use on this host (detached or deleted meanwhile)")
        return str(rec["name"])

    def _ids(self, name: str) -> list[int]:
        return [i for i, rec in self.known.items() if rec["name"] == name]

    def _legacy_line(self, key: bytes, raw: bytes) -> None:
        """A line of an index written before lines were keyed by blob id:
        name NUL index, and slot, valid, dirty without checksums. Kept aside
        (its slot in use) until prune() can ask the stamp for the id."""
        slot, valid, dirty = struct.unpack_from("<Q16s16s", raw)
        if slot < self.slots:
            line = Line(slot, _i(valid), _i(dirty))
            self.legacy[key] = (key[:-9].decode(), int.from_bytes(key[-8:], "big"), line)

    def _adopt_legacy(self, stamp: HostStamp) -> None:
        """Re-key the legacy lines by blob id: dirty sectors are acknowledged
        writes and are kept (their checksums taken from the slot), clean ones go."""
        for old_key, (name, index, line) in list(self.legacy.items()):
            del self.legacy[old_key]
            try:
                blob_id = stamp.blobs.blob_id(name)
            except BlobNotFound:
                blob_id = -1
            with self._write() as txn:
                txn.delete(old_key, db=self.db)
            if blob_id < 0 or not line.dirty:
                self.free.append(line.slot)
                continue
            if blob_id not in self.known:
                self._register(blob_id, {"name": name, "version": None})
            line.valid = line.dirty
            line.sums = array("Q", checksums(os.pread(self.fd, LINE, line.slot * LINE)))
            self.lines[(blob_id, index)] = line
            self.lru.touch((blob_id, index))
            self._commit((blob_id, index), line)

    def prune(self, stamp: HostStamp) -> None:
        """Drop the lines of blobs deleted from the stamp (their data went with
        them); adopt the lines of an older index."""
        with self.lock:
            self._adopt_legacy(stamp)
            for blob_id, rec in list(self.known.items()):
                try:
                    alive = stamp.blobs.blob_id(rec["name"]) == blob_id
                except BlobNotFound:
                    alive = False
                if not alive:
                    self._drop_lines(blob_id, clean_only=False)
                    self._register(blob_id, None)

    def _drop_lines(self, blob_id: int, clean_only: bool) -> None:
        for key in [k for k in self.lines if k[0] == blob_id]:
            line = self.lines[key]
            if not clean_only or not line.dirty:
                self._forget(key)
            elif line.valid != line.dirty:
                line.valid = line.dirty
                self.ram.pop(key, None)
                self._commit(key, line)

    # -- the index ------------------------------------------------------------------

    def _commit(self, key: Key, line: Line | None) -> None:
        with self._write() as txn:
            if line is None:
                txn.delete(_ID.pack(*key), db=self.db)
            else:
                txn.put(_ID.pack(*key), line.pack(), db=self.db)

    def dirty(self, blob: str | None = None) -> dict[str, list[tuple[int, int]]]:
        """Unflushed byte ranges (offset, length), per blob name."""
        with self.lock:
            return self._dirty(blob)

    def _dirty(self, blob: str | None) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for (blob_id, index), line in sorted(self.lines.items()):
            name = self.known.get(blob_id, {}).get("name", f"#{blob_id}")
            if line.dirty and (blob is None or name == blob):
                for s, n in runs(line.dirty):
                    start = index * LINE + s * SECTOR
                    out[name].append((start, start + n * SECTOR))
        return {b: [(s, e - s) for s, e in merge_ranges(r)] for b, r in out.items()}

    def dirty_ranges(self, blob_id: int, offset: int, length: int) -> list[tuple[int, int]]:
        """(start, end) of the blob's dirty sectors within [offset, offset+length)."""
        with self.lock:
            first, last = offset // LINE, (offset + length - 1) // LINE
            if last - first < len(self.lines):
                keys = [(blob_id, i) for i in range(first, last + 1) if (blob_id, i) in self.lines]
            else:
                keys = [k for k in self.lines if k[0] == blob_id and first <= k[1] <= last]
            out = []
            for key in keys:
                for s, n in runs(self.lines[key].dirty):
                    start = key[1] * LINE + s * SECTOR
                    lo, hi = max(start, offset), min(start + n * SECTOR, offset + length)
                    if hi > lo:
                        out.append((lo, hi))
            return out

    # -- slots ------------------------------------------------------------------------

    def _slot_read(self, line: Line, first: int, count: int) -> bytes:
        return os.pread(self.fd, count * SECTOR, line.slot * LINE + first * SECTOR)

    def _verified(self, key: Key, line: Line, first: int, count: int) -> bytes | None:
        """Sectors [first, first+count) of a line that holds them all, checked
        against the checksums of their chunks; None if a chunk failed (its
        sectors were dropped)."""
        c0, c1 = chunk_range(first, count)
        raw = os.pread(self.fd, (c1 - c0) * CHUNK, line.slot * LINE + c0 * CHUNK)
        got = array("Q", checksums(raw))
        if got != line.sums[c0:c1]:
            bad = 0
            for i, c in enumerate(got):
                if not line.chunk_ok(c0 + i, c):
                    bad |= 1 << (c0 + i)
            if bad:
                self._drop_bad(key, line, bad)
                return None
        lo = (first - c0 * PER) * SECTOR
        return raw[lo:lo + count * SECTOR]

    def _drop_bad(self, key: Key, line: Line, chunks: int) -> None:
        """Chunks that failed their checksum leave the line; a dirty sector in one
        was an acknowledged write that only this cache held: reported lost."""
        bad = chunk_sectors(chunks) & line.valid
        self.stats.bad_sectors += bin(bad).count("1")
        lost = bad & line.dirty
        if lost:
            name = self.known.get(key[0], {}).get("name", f"#{key[0]}")
            for s, n in runs(lost):
                self.lost[name].append((key[1] * LINE + s * SECTOR, n * SECTOR))
            with self._write() as txn:  # the report outlives the process
                txn.put(name.encode(), json.dumps(self.lost[name]).encode(), db=self.lost_db)
        line.valid &= ~bad
        line.dirty &= ~bad
        line.pending &= ~chunks
        line.landed &= ~chunks
        self.ram.pop(key, None)
        self._commit(key, line)

    def _slot_write(self, line: Line, first: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        at = line.slot * LINE + first * SECTOR
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def _allocate(self, key: Key, stamp: HostStamp | None) -> Line:
        if not self.free:
            self._evict(stamp)
        line = Line(self.free.pop())
        self.lines[key] = line
        return line

    def _evict(self, stamp: HostStamp | None) -> None:
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

    def _forget(self, key: Key) -> None:
        line = self.lines.pop(key)
        self.lru.drop(key)
        self.ram.pop(key, None)
        self._commit(key, None)
        self.free.append(line.slot)

    # -- reads and writes (CachedBlob calls these) ----------------------------------------

    def read(self, stamp: HostStamp, blob_id: int, offset: int, length: int, fill: bool) -> bytes:
        """Sector-aligned read through the cache; misses come from the stamp and,
        with fill, are kept."""
        with self.lock:
            out = bytearray()
            pos, end = offset, offset + length
            while pos < end:
                index, inner = divmod(pos, LINE)
                n = min(LINE - inner, end - pos)
                out += self._read_line(stamp, blob_id, index, inner // SECTOR, n // SECTOR, fill)
                pos += n
            return bytes(out)

    def _read_line(self, stamp: HostStamp, blob_id: int, index: int, first: int, count: int, fill: bool) -> bytes:
        key = (blob_id, index)
        line = self.lines.get(key)
        want = bits(first, count)
        if line is not None and line.valid & want == want:
            ram = self.ram.get(key)
            if ram is not None:
                self.lru.touch(key)
                self.ram.move_to_end(key)
                self.stats.read_hits += count
                self.stats.ram_hits += count
                return bytes(ram[first * SECTOR:(first + count) * SECTOR])
            data = self._verified(key, line, first, count)
            if data is not None:
                self.lru.touch(key)
                self.stats.read_hits += count
                self._to_ram(key, line)
                return data
        return self._miss(stamp, key, line, first, count, fill)

    def _miss(self, stamp: HostStamp, key: Key, line: Line | None, first: int, count: int, fill: bool) -> bytes:
        """Read the line's span from the stamp; our dirty sectors are newer and
        win. With fill, the sectors the line lacks are kept (slot, then index)."""
        self.stats.read_misses += count
        name = self._name(key[0])
        size = stamp.blobs.size(name)
        line_start = key[1] * LINE
        span = min(LINE, max(0, size - line_start))
        fetched = bytearray(stamp.blobs.read(name, line_start, span) if span else b"")
        fetched += bytes(LINE - len(fetched))
        if line is not None:
            for s, n in runs(line.dirty):
                mine = self._verified(key, line, s, n)
                if mine is not None:
                    fetched[s * SECTOR:(s + n) * SECTOR] = mine
                else:  # a bad dirty sector was dropped: keep the good ones
                    for s1, n1 in runs(line.dirty & bits(s, n)):
                        fetched[s1 * SECTOR:(s1 + n1) * SECTOR] = self._slot_read(line, s1, n1)
        result = bytes(fetched[first * SECTOR:(first + count) * SECTOR])
        if fill:
            if line is None:
                line = self._allocate(key, stamp)
            fresh = FULL & ~line.valid & bits(0, span // SECTOR)
            for s, n in runs(fresh):
                self._store(key, line, s, memoryview(fetched)[s * SECTOR:(s + n) * SECTOR], dirty=False)
            self.lru.touch(key)
            self._to_ram(key, line)
        return result

    def _to_ram(self, key: Key, line: Line) -> None:
        if not self.ram_lines or line.valid != FULL or key in self.ram:
            return
        data = self._verified(key, line, 0, SECTORS)
        if data is None:
            return
        self.ram[key] = bytearray(data)
        while len(self.ram) > self.ram_lines:
            self.ram.popitem(last=False)

    def invalidate(self, blob_id: int, offset: int, length: int) -> None:
        """Take sectors out of the cache before the stamp changes under them
        (a write-through): a kill between the stamp write and the refresh must
        not leave the old bytes valid here."""
        with self.lock:
            pos, end = offset, offset + length
            while pos < end:
                index, inner = divmod(pos, LINE)
                n = min(LINE - inner, end - pos)
                key = (blob_id, index)
                line = self.lines.get(key)
                mask = bits(inner // SECTOR, n // SECTOR)
                if line is not None and line.valid & mask:
                    assert not line.dirty & mask, "a write-through over dirty sectors"
                    line.valid &= ~mask
                    self.ram.pop(key, None)
                    self._commit(key, line)
                pos += n

    def update(self, stamp: HostStamp, blob_id: int, offset: int, data: bytes | bytearray | memoryview,
               dirty: bool) -> None:
        """Put sector-aligned data in the cache: dirty (ReadWrite: the stamp has
        not got it yet) or clean (ReadOnly: the stamp already has it)."""
        with self.lock:
            if dirty:
                self._name(blob_id)  # never dirty lines of a blob no record names: write-back would drop them
            view = memoryview(data)
            pos, end = offset, offset + len(view)
            while pos < end:
                index, inner = divmod(pos, LINE)
                n = min(LINE - inner, end - pos)
                key = (blob_id, index)
                line = self.lines.get(key)
                if line is None:
                    if not dirty:
                        pos += n
                        continue  # a write-through of a line we do not hold: nothing to refresh
                    line = self._allocate(key, stamp)  # may evict (and write back) an earlier line
                self._store(key, line, inner // SECTOR, view[pos - offset:pos - offset + n], dirty)
                self.lru.touch(key)
                pos += n
            if dirty:
                self.stats.writes_cached += 1

    def _store(self, key: Key, line: Line, first: int, piece: bytes | bytearray | memoryview,
               dirty: bool) -> None:
        """Write sectors into the line's slot and make them valid (and dirty).
        A chunk that holds dirty sectors (acknowledged writes only the cache
        has) gets its new checksum recorded as pending before its bytes change, so
        a kill leaves either version verifiable; other chunks: slot bytes,
        then the entry that makes them valid."""
        count = len(piece) // SECTOR
        mask = bits(first, count)
        c0, c1 = chunk_range(first, count)
        cmask = ((1 << (c1 - c0)) - 1) << c0
        self._settle(key, line, line.pending & cmask)
        if first % PER == 0 and count % PER == 0:
            new = checksums(piece)
        else:  # part of a chunk: its checksum covers the neighbours in the slot too
            buf = bytearray(os.pread(self.fd, (c1 - c0) * CHUNK, line.slot * LINE + c0 * CHUNK))
            lo = (first - c0 * PER) * SECTOR
            buf[lo:lo + len(piece)] = piece
            new = checksums(buf)
        over = chunks_of(line.dirty, c0, c1)
        if over:
            for c in range(c0, c1):
                if (over >> c) & 1:
                    line.alt[c] = new[c - c0]
            line.pending |= over
            line.landed &= ~over
            self._commit(key, line)
        self._slot_write(line, first, piece)
        ram = self.ram.get(key)
        if ram is not None:
            ram[first * SECTOR:(first + count) * SECTOR] = piece
        line.landed |= over
        for c in range(c0, c1):
            if not (over >> c) & 1:
                line.sums[c] = new[c - c0]
        grows = mask & ~(line.dirty if dirty else line.valid)
        if self.fsync:
            os.fdatasync(self.fd)  # the data before the index entry that points at it
        if grows or cmask & ~over:
            line.valid |= mask
            if dirty:
                line.dirty |= mask
            self._commit(key, line)

    def _settle(self, key: Key, line: Line, chunks: int) -> None:
        """Make pending chunks plain before they are rewritten or written
        back: a rewrite this process saw land gives the chunk its new checksum;
        after a kill, the slot is read to see which version it holds."""
        if not chunks:
            return
        for c in range(chunks.bit_length()):
            if not (chunks >> c) & 1:
                continue
            if (line.landed >> c) & 1:
                line.sums[c] = line.alt[c]
                continue
            got = xxh3(os.pread(self.fd, CHUNK, line.slot * LINE + c * CHUNK))
            if got == line.alt[c]:
                line.sums[c] = got
            elif got != line.sums[c]:
                self._drop_bad(key, line, 1 << c)
        line.pending &= ~chunks
        line.landed &= ~chunks

    # -- write-back ------------------------------------------------------------------

    def _write_back(self, stamp: HostStamp, key: Key, line: Line) -> None:
        blob_id, index = key
        name = self.known.get(blob_id, {}).get("name")
        try:
            alive = name is not None and stamp.blobs.blob_id(name) == blob_id
        except BlobNotFound:
            alive = False
        if not alive:  # the blob was deleted: its unflushed data went with it
            line.dirty = 0
            self._commit(key, line)
            return
        size = stamp.blobs.size(name)  # type: ignore[arg-type]
        self._settle(key, line, line.pending)
        for s, n in runs(line.dirty):
            data = self._verified(key, line, s, n)
            if data is None:  # a bad sector: reported lost; write back the good ones
                for s1, n1 in runs(line.dirty & bits(s, n)):
                    self._write_run(stamp, str(name), key, line, s1, n1, size)
                continue
            self._write_run(stamp, str(name), key, line, s, n, size, data)
        line.dirty = 0  # only after the stamp acknowledged every run
        self._commit(key, line)

    def _write_run(self, stamp: HostStamp, name: str, key: Key, line: Line, s: int, n: int, size: int,
                   data: bytes | None = None) -> None:
        at = key[1] * LINE + s * SECTOR
        nbytes = min(n * SECTOR, max(0, size - at))
        if nbytes > 0:
            if data is None:
                data = self._slot_read(line, s, n)
            stamp.blobs.write(name, at, data[:nbytes], lease=self.known.get(key[0], {}).get("lease"))
            self.stats.written_back += nbytes

    def flush(self, stamp: HostStamp, blob: str | int, lease: str | None = None) -> int:
        """Write back every dirty sector of a blob (by id, or every id known
        under a name), under `lease` if given (the blob's writer lease, taken
        anew: its last writer died); returns the bytes written."""
        with self.lock:
            ids = [blob] if isinstance(blob, int) else self._ids(blob)
            for blob_id in ids if lease else []:
                self._register(blob_id, {**self.known[blob_id], "lease": lease})
            before = self.stats.written_back
            for key, line in sorted(self.lines.items()):
                if key[0] in ids and line.dirty:
                    self._write_back(stamp, key, line)
            return self.stats.written_back - before

    def drop_blob(self, blob: str) -> None:
        """Invalidate every line of a blob (detach, delete, restore): it may be
        written elsewhere before this host sees it again."""
        with self.lock:
            for blob_id in self._ids(blob):
                if any(line.dirty for k, line in self.lines.items() if k[0] == blob_id):
                    raise HostError(f"blob {blob} has unflushed data in the cache")
                self._drop_lines(blob_id, clean_only=False)
                self._register(blob_id, None)

    def lose(self) -> dict[str, list[tuple[int, int]]]:
        """The host-lost fault: the local cache is gone. Returns what was lost
        (every unflushed range, per blob)."""
        with self.lock:
            lost = self.dirty()
            with self._write() as txn:
                txn.drop(self.db, delete=False)
            self.lines.clear()
            self.ram.clear()
            self.lru = _Segments(protected_max=self.lru.protected_max)
            self.free = FreeSlots(self.slots, set())
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.slots * LINE)
            return lost

    def check(self) -> list[str]:
        """Invariants: slots unique and in range, dirty within valid, free list
        complete, the index on disk as in memory, every valid chunk's checksum."""
        with self.lock:
            return self._check()

    def _check(self) -> list[str]:
        problems = []
        seen: dict[int, Key] = {}
        for key, line in self.lines.items():
            if not 0 <= line.slot < self.slots:
                problems.append(f"line {key}: slot {line.slot} out of range")
                continue
            if line.slot in seen:
                problems.append(f"line {key}: slot {line.slot} also holds {seen[line.slot]}")
            seen[line.slot] = key
            if line.dirty & ~line.valid:
                problems.append(f"line {key}: dirty sectors that are not valid")
            if key[0] not in self.known:
                problems.append(f"line {key}: blob id {key[0]} is not registered")
            got = checksums(os.pread(self.fd, LINE, line.slot * LINE))
            for c in range(CHUNKS):
                if chunks_of(line.valid) >> c & 1 and not line.chunk_ok(c, got[c]):
                    problems.append(f"line {key}: chunk {c} (sectors {c * PER}-{c * PER + PER - 1}) fails its checksum")
        if len(seen) + len(self.free) != self.slots or self.free.overlaps(set(seen)):
            problems.append("free slots and used slots do not add up")
        with self.env.begin() as txn:
            stored = {_ID.unpack(bytes(k)): bytes(v) for k, v in txn.cursor(db=self.db)}
        if stored != {k: line.pack() for k, line in self.lines.items()}:
            problems.append("the persistent index differs from the cache's view")
        return problems


class CachedBlob(PageBlobFile):
    """A page blob seen through the host cache in one mode: a vhd RawFile, so
    the disk's VHD is read and written through the cache. Opening it checks
    the blob's identity and version against the cache (BlobCache.open_blob);
    outside ReadWrite, dirty sectors a dead process left are written back
    first, since this mode will not look at them."""

    def __init__(self, cache: BlobCache, stamp: HostStamp, blob: str, mode: CacheMode,
                 lease: str | None = None, writable: bool = True, shared: bool = False) -> None:
        super().__init__(stamp, blob, lease=lease, writable=writable)
        self.cache, self.mode = cache, mode
        self.shared = shared  # one of several processes writing the blob: the last to close records its version
        # a writer in None writes around the cache: the version it leaves at close must not vouch for old lines
        self.blob_id = cache.open_blob(stamp, blob, writable, lease, keep_clean=not (writable and mode is CacheMode.NONE))
        if mode is not CacheMode.READWRITE:
            cache.flush(stamp, self.blob_id)

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        if self.mode is CacheMode.NONE:
            return super().pread(length, offset)
        lo, hi = offset - offset % SECTOR, -(-end // SECTOR) * SECTOR
        data = self.cache.read(self.stamp, self.blob_id, lo, hi - lo, fill=True)
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
            failed: BaseException | None = None
            with self.cache.lock:  # no other write-through (any process) between the stamp write and the refresh
                self.cache.invalidate(self.blob_id, offset, len(data))  # out of the cache, then the stamp
                try:
                    super().pwrite(data, offset)  # the stamp first: writes go through
                except BaseException as e:  # the stamp's error, raised as it is (not as the cache's)
                    failed = e
                else:
                    self.cache.update(self.stamp, self.blob_id, offset, data, dirty=False)
            if failed is not None:
                raise failed
        else:
            self.cache.update(self.stamp, self.blob_id, offset, data, dirty=True)

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The stamp's pages that hold data and, in ReadWrite, the sectors the
        cache holds dirty (data the stamp has not got yet: an NBD client that
        skips holes must still copy them)."""
        ranges = super().data_ranges(offset, length)
        if self.mode is not CacheMode.READWRITE:
            return ranges
        mine = self.cache.dirty_ranges(self.blob_id, offset, length)
        return [(s, e - s) for s, e in merge_ranges([(o, o + n) for o, n in ranges] + mine)]

    def sync(self) -> None:
        """Flush (and FUA): write back what the cache holds dirty, then make the stamp durable."""
        if self.mode is CacheMode.READWRITE:
            self.cache.flush(self.stamp, self.blob_id)
        super().sync()

    def close(self) -> None:
        """After the image's last flush: the cache records the version its clean
        lines match (shared: the supervisor does, once every writer is done)."""
        if self.writable and not self.shared:
            self.cache.close_blob(self.stamp, self.blob_id)
