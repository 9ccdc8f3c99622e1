"""Page blobs: the partition layer's index over the stream layer.

A page blob is a sparse array of 512-byte pages. Its live index maps page
ranges to record bytes in extents ("pieces"); never-written and cleared pages
have no piece and read as zeros. Metadata grows with data written, not size.

Snapshots cost O(1): a snapshot records the blob's epoch E and the blob moves
to epoch E+1. Every piece carries the epoch it was written in (its gen). When
a write or clear covers a piece that the latest surviving snapshot L can see
(gen <= L), the covered part moves to the frozen table of L instead of being
dropped. Reading snapshot k takes, page by page, the first of frozen(j) for
surviving snapshots j >= k in ascending order, then the live index. Live
reads and writes never look at snapshots, so they cost the same with 500.
The frozen tables are indexed by place, in two tables of the same shape:
`pagehist` (page, then epoch) and `runhist` (run of RUN = 64 aligned pages,
then epoch), each entry naming the frozen piece's start, end and gen. A
frozen piece [s, e) has one `runhist` entry per aligned run it covers whole
and one `pagehist` entry per page outside those runs (its head and tail:
under 2 * RUN), so freezing a 4 MiB piece puts 128 entries, not 8,192 (a
RUN-aligned one; 191 at most: head and tail pages add up to 64, beside 127
whole runs). Every page of a frozen
piece is covered by exactly one of its entries. For one page, the pieces
frozen over time lived in disjoint epoch intervals [gen, frozen epoch] (a
page has one live piece at a time, and a piece is frozen in the latest
snapshot before the epoch that replaced it; a snapshot's delete moves it to
an earlier snapshot, which only shortens its interval), so the piece that
decides page p at snapshot k is, among the entries covering p (its own in
`pagehist`, its run's in `runhist`) at epochs >= k, the one of least epoch:
a seek at (p, k) in `pagehist` and one at (p // RUN, k) in `runhist` find
the least of each, and the lesser of the two decides. (Two entries for one
page at one epoch cannot be: frozen(epoch) pieces do not overlap and a
piece covers a page by one entry.) When that piece was live at k (gen <= k),
it decides every page it holds (no other piece of those pages was live at
k), and the read skips to its end; when gen > k, the page was empty at k
(and when that entry was its run's, so were the pages after p with no entry
of their own at or after k: the run's entry is their least too).
A seek that lands past p says the pages in between have no entry at or
after k in that table, and its answer is kept for them: so a read costs two
seeks per run of pages, whatever the number of snapshots or how often a
neighbouring page was rewritten between them, plus one for each page (or
run) passed whose entries are all older than k (a read of a snapshot newer
than a big kept piece: one per RUN pages of it). Freezing a piece costs
O(pieces + pages / RUN) index entries, at most once per page written per
snapshot.

While a blob has snapshots, every write and clear adds its range to the
change log of the current epoch (one entry per start page, keeping the
longest; entries may overlap). The diff from snapshot k
to a target (a later snapshot m, or live) is the union of the change logs of
epochs k+1..m, split by the target's state into written and cleared ranges:
cost proportional to what changed.

Deleting snapshot k moves each piece of frozen(k) that the previous surviving
snapshot k' can see (gen <= k') to frozen(k') and drops the rest; the change
logs of the epochs from k'+1 to the next surviving snapshot (or the current
epoch) are merged into that last one, as no diff reads them apart any more.

Write order: data is appended to 3 replicas (stream layer) before the index
transaction that points at it commits; a crash in between leaves only
unreferenced record bytes.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import heapq
import itertools
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import lmdb

from . import ranges as rg
from .errors import (
    BlobAlreadyExists,
    BlobNotFound,
    CorruptStamp,
    DataLost,
    InvalidHeaderValue,
    InvalidPageRange,
    InvalidRange,
    InvalidResourceName,
    LeaseAlreadyPresent,
    LeaseIdMismatch,
    LeaseIdMismatchWithLeaseOperation,
    LeaseIdMissing,
    LeaseIsBreakingAndCannotBeAcquired,
    LeaseIsBreakingAndCannotBeChanged,
    LeaseIsBrokenAndCannotBeRenewed,
    LeaseLost,
    LeaseNotPresentWithBlobOperation,
    LeaseNotPresentWithLeaseOperation,
    PreviousSnapshotCannotBeNewer,
    PreviousSnapshotNotFound,
    RequestBodyTooLarge,
    SnapshotNotFound,
    SnapshotsPresent,
)
from .meta import (
    BLOB_EPOCH,
    BLOB_EPOCH_PAGE,
    BLOB_PAGE_EPOCH,
    PIECE,
    PLACE,
    STATE,
    STATE_V1,
    U64,
    WORD,
    Meta,
    dumps,
    loads,
)
from .pressure import Gate
from .stream import Location, StreamLayer, own_start, pid_alive

PAGE = 512
MAX_WRITE = 4 * 1024 * 1024
MAX_BLOB = 8 * 1024 ** 4  # the page blob API's limit
MAX_DISK_BLOB = 64 * 1024 ** 4 + 512  # a managed disk's blob: up to 64 TiB of data and the VHD footer
MAX_NAME = 1024  # characters in a blob name (Azure's limit), after its container's name and "/" if it has one
NAME_CACHE = 1024  # blob names whose ids a process keeps (PageBlobs._state_raw): a long-lived one sees ever new ones
MAX_CONTAINER = 63  # characters in a container name (containers.NAME): "C/B" may be 63 + 1 + 1,024 long
SHORT_KEY = 400  # a name's UTF-8 bytes up to this are its `blobs` key; longer ones are hashed
NO_LEASE = bytes(16)
HISTORY_BUILT = b"history-index"  # counters key of the legacy per-cell index (removed on upgrade)
STATE_WORD_BUILT = b"state-version-word"  # counters key: every state record holds its version word
PAGE_HISTORY_BUILT = b"page-history-index"  # counters key of the per-page-only layout (removed on upgrade)
RUN_HISTORY_BUILT = b"run-history-index"  # counters key: pagehist + runhist cover every frozen piece
RUN = 64  # pages in a runhist run (32 KiB): a frozen piece indexes its whole aligned runs, not their pages


class Piece(NamedTuple):
    """Pages [start, end) are record bytes from `inner` on. A named tuple:
    one is made on every write, and a tuple is the cheapest object to make."""

    start: int
    end: int
    extent: int
    rec_off: int
    rec_len: int
    inner: int
    gen: int

    def cut(self, s: int, e: int) -> Piece:
        s, e = max(s, self.start), min(e, self.end)
        if s == self.start and e == self.end:
            return self
        return Piece(s, e, self.extent, self.rec_off, self.rec_len, self.inner + (s - self.start) * PAGE, self.gen)

    def pack(self) -> bytes:
        return PIECE.pack(self.end, self.extent, self.rec_off, self.rec_len, self.inner, self.gen)

    @classmethod
    def unpack(cls, start: int, raw: bytes) -> Piece:
        end, extent, off, length, inner, gen = PIECE.unpack(raw)
        return cls(start, end, extent, off, length, inner, gen)


@dataclass
class BlobState:
    epoch: int
    latest: int  # epoch of the latest surviving snapshot, -1 if none
    size: int
    lease: bytes
    lease_expiry: float
    version: int = 0  # the version word: content version << 1 | observed (see PageBlobs.version)

    @classmethod
    def unpack(cls, raw: bytes) -> BlobState:
        return cls(*STATE.unpack(raw))

    def pack(self) -> bytes:
        return STATE.pack(self.epoch, self.latest, self.size, self.lease, self.lease_expiry, self.version)

    def lease_held(self, now: float) -> bool:
        return self.lease != NO_LEASE and (self.lease_expiry == 0 or self.lease_expiry > now)


def moved_on(word: int) -> int:
    """The version word after a change of the blob's live pages: the version
    moves on only if someone read it since it last moved (else no reader can
    tell the two apart), and the new one is not yet observed."""
    return (word >> 1) + 1 << 1 if word & 1 else word


Hook = Callable[[dict[str, Any], int, int, int, float], None]
"""A write's or clear's hook: called as hook(properties, blob id, size,
content version, time of the last hooked write) inside the index transaction, before the pages change. It
may raise to refuse (nothing changes) or change `properties` in place (they
are stored in the same commit), so a check of the blob's state and the
change it guards are one atomic step, across processes too. Every write
records its time (BlobInfo.touched, to the second)."""
TIME = struct.Struct("<d")
T = TypeVar("T")


class LeaseState(enum.Enum):
    """A blob's lease, as the service reports it (x-ms-lease-state). The
    machine: available -acquire-> leased -break-> breaking -(period)-> broken
    -acquire-> leased; leased -(duration)-> expired -acquire-> leased;
    release from leased, expired or broken -> available."""

    AVAILABLE = "available"
    LEASED = "leased"
    EXPIRED = "expired"
    BREAKING = "breaking"
    BROKEN = "broken"


def lease_state(st: BlobState, obj: dict[str, Any], now: float) -> LeaseState:
    """The state of the blob's lease, from its state record and blob record."""
    if st.lease == NO_LEASE:
        return LeaseState.AVAILABLE
    broken = bool(obj.get("properties", {}).get("lease_broken"))
    if st.lease_held(now):
        return LeaseState.BREAKING if broken else LeaseState.LEASED
    return LeaseState.BROKEN if broken else LeaseState.EXPIRED


@dataclass(frozen=True)
class BlobInfo:
    """What the Blob service reports of a blob (or one of its snapshots)."""

    name: str
    id: int
    size: int
    created: float
    properties: dict[str, Any]
    version: int  # moves on with every change of the live pages (PageBlobs.version)
    touched: float  # when a write, clear, resize or copy last changed it, to the second (0: never)
    lease: LeaseState
    lease_id: str | None
    lease_expiry: float
    snapshots: int
    snapshot: str | None = None


@dataclass(frozen=True)
class Snapshot:
    blob: str
    id: str  # Azure-style timestamp, unique per blob
    epoch: int
    time: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"blob": self.blob, "snapshot": self.id, "time": self.time}


@dataclass(frozen=True)
class Diff:
    written: list[tuple[int, int]]  # byte ranges (offset, length)
    cleared: list[tuple[int, int]]

    def to_json(self) -> dict[str, Any]:
        return {"written": [{"offset": o, "length": n} for o, n in self.written],
                "cleared": [{"offset": o, "length": n} for o, n in self.cleared]}


def _bytes(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(s * PAGE, (e - s) * PAGE) for s, e in ranges]


def index_places(s: int, e: int) -> tuple[list[int], range]:
    """How frozen piece [s, e) is indexed: the pages it gets `pagehist`
    entries for, and the runs (of RUN aligned pages) it gets `runhist`
    entries for: every run it covers whole, and each page outside them."""
    first, last = -(-s // RUN), e // RUN  # runs [first, last) lie whole inside [s, e)
    if first >= last:
        return list(range(s, e)), range(0)
    return [*range(s, first * RUN), *range(last * RUN, e)], range(first, last)


def check_pages(offset: int, length: int, size: int, limit: int | None = MAX_WRITE) -> None:
    """The Azure rules for a page range; violations raise their error code."""
    if length <= 0 and limit is not None:
        raise InvalidHeaderValue("a page write of 0 bytes: write at least one 512-byte page")
    if offset % PAGE or length % PAGE:
        raise InvalidPageRange(f"offset {offset} and length {length} must be multiples of 512")
    if limit is not None and length > limit:
        raise RequestBodyTooLarge(f"{length} bytes in one write; the limit is {limit}")
    if offset < 0 or offset + length > size:
        raise InvalidPageRange(f"range {offset}+{length} is outside the blob (size {size})")


def blob_key(name: str) -> bytes:
    """A blob's key in the `blobs` table: its UTF-8 name, or for a name too
    long for an LMDB key, 0xFF and the name's SHA-256 (0xFF starts no UTF-8
    text, so the two kinds never meet; the record then holds the name)."""
    container, slash, rest = name.partition("/")
    own = rest if slash and 0 < len(container) <= MAX_CONTAINER else name  # the REST blob name of C/B is B
    if not name or len(own) > MAX_NAME or "\0" in name:
        raise InvalidResourceName(f"blob name {name[:40]!r}{'...' if len(name) > 40 else ''} ({len(name)} "
                                  f"characters): a name is 1 to {MAX_NAME} characters (after its container's "
                                  "name and '/'), without NUL")
    raw = name.encode("utf-8", "surrogatepass")
    return raw if len(raw) <= SHORT_KEY else b"\xff" + hashlib.sha256(raw).digest()


def _get_range(offset: int, length: int, size: int) -> tuple[int, int, int, int]:
    """Get Blob's rules for a byte range: (offset, length) cut at the blob's
    end, and the pages [lo, hi) that hold it."""
    if offset < 0 or length < 0:
        raise InvalidRange(f"range {offset}+{length}: offset and length must not be negative")
    if length and offset >= size:
        raise InvalidRange(f"range {offset}+{length} starts at or past the end of the blob (size {size})")
    length = max(0, min(length, size - offset))
    lo = offset - offset % PAGE
    return offset, length, lo, -(-(offset + length) // PAGE) * PAGE


def snap_key(blob_id: int, snapshot: str) -> bytes:
    """A snapshot's key in `snapnames`; an id no snapshot can have (too long
    for a key) gets one that is never found."""
    raw = snapshot.encode("utf-8", "surrogatepass")
    return U64.pack(blob_id) + (raw if len(raw) <= SHORT_KEY else b"\xff")


def lease_bytes(lease: str) -> bytes:
    try:
        return _lease_uuid(lease)
    except (ValueError, TypeError, AttributeError):
        raise InvalidHeaderValue(f"lease id {lease!r} is not a GUID") from None


@functools.lru_cache(maxsize=256)  # every write of a leased blob names its lease: each is parsed once
def _lease_uuid(lease: str) -> bytes:
    return uuid.UUID(lease).bytes


def _version_key(blob_id: int) -> bytes:
    """Where older stamps kept a blob's version counter, in the counters
    table (now in its state record: see PageBlobs.version)."""
    return f"version/{blob_id}".encode()


def _touched_key(blob_id: int) -> bytes:
    """When a hooked write or clear last changed the blob (a double, in the
    counters table beside the version: a page the write dirties anyway)."""
    return f"version/{blob_id}/t".encode()


def snapshot_id(now: float) -> str:
    t = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}0Z"


HOLDER_KEYS = ("lease_holder", "lease_pid", "lease_started", "lease_host")


def this_holder() -> dict[str, Any]:
    """This process as a writer lease's holder (the blob properties it records)."""
    return {"lease_holder": f"pid {os.getpid()} on {socket.gethostname()}", "lease_pid": os.getpid(),
            "lease_started": own_start(), "lease_host": socket.gethostname()}


def _holder_of(props: dict[str, Any]) -> dict[str, Any]:
    return {k: props[k] for k in HOLDER_KEYS if k in props}


def _may_judge(claimant: dict[str, Any], stale: dict[str, Any]) -> bool:
    """May `claimant` (a process elsewhere) say that `stale` died? Only from
    stale's own machine, and never of a holder on this one: holders here are
    judged here (holder_died), whatever a client claims."""
    host = stale.get("lease_host")
    return host != socket.gethostname() and claimant.get("lease_host") == host


def writer_stale(props: dict[str, Any], claimant: dict[str, Any], stale: dict[str, Any] | None) -> bool:
    """Is the writer lease whose holder `props` records stale for `claimant`:
    its holder died on this host, or it is exactly `stale`, which the
    claimant, on that holder's own machine, found dead there?"""
    return holder_died(props) or (stale is not None and _holder_of(props) == _holder_of(stale)
                                  and _may_judge(claimant, stale))


def holder_died(props: dict[str, Any]) -> bool:
    """Did the process that took a writer lease (its pid, start time and host
    in the blob's properties) die on this host? A pid alone is not enough: a
    later process may have been given it. Leases taken before the start time
    was recorded are judged by the pid."""
    pid, host = int(props.get("lease_pid", 0) or 0), props.get("lease_host")
    started = int(props.get("lease_started", 0) or 0)
    return host == socket.gethostname() and pid > 0 and not pid_alive(pid, started)


def _history_entries(items: Iterable[tuple[bytes, bytes]], table: str, unit: str, problems: list[str]
                     ) -> tuple[dict[bytes, bytes], set[bytes]]:
    """The well-formed entries of history index `table` (pagehist or
    runhist), and the keys of those whose value has the wrong size; every
    entry of the wrong size (key or value) is added to `problems`."""
    have: dict[bytes, bytes] = {}
    damaged: set[bytes] = set()
    for key, raw in items:
        if len(key) != BLOB_PAGE_EPOCH.size:
            problems.append(f"history index ({table}): damaged key {key.hex()} ({len(key)} bytes, not "
                            f"{BLOB_PAGE_EPOCH.size})")
        elif len(raw) != PLACE.size:
            blob_id, u, epoch = BLOB_PAGE_EPOCH.unpack(key)
            problems.append(f"history index ({table}): blob {blob_id} {unit} {u} snapshot epoch {epoch}: "
                            f"damaged entry ({len(raw)} bytes, not {PLACE.size})")
            damaged.add(key)
        else:
            have[key] = raw
    return have, damaged


class _Seeker:
    """Seeks in one history index (pagehist or runhist) of one blob for one
    snapshot epoch: first(u) is the first unit (page or run) q >= u below
    `limit` with an entry at an epoch >= `epoch`, as (q, that epoch, place),
    or None. An answer holds for every unit from where it was asked up to q,
    so it is kept and a read seeks once per stretch of units."""

    def __init__(self, cur: lmdb.Cursor, table: str, blob_id: int, epoch: int, limit: int) -> None:
        self.cur, self.table, self.blob_id, self.epoch, self.limit = cur, table, blob_id, epoch, limit
        self.lo, self.hi = 0, -1  # the units the kept answer holds for: [lo, hi]
        self.answer: tuple[int, int, bytes] | None = None

    def first(self, u: int) -> tuple[int, int, bytes] | None:
        if self.lo <= u <= self.hi:
            return self.answer
        key, unpack = BLOB_PAGE_EPOCH.pack, BLOB_PAGE_EPOCH.unpack
        at = u
        while True:
            if not self.cur.set_range(key(self.blob_id, at, self.epoch)):
                answer = None
                break
            try:
                b, q, j = unpack(self.cur.key())
            except struct.error:
                raise self._damaged(at) from None
            if b != self.blob_id or q >= self.limit:
                answer = None
                break
            value = bytes(self.cur.value())
            if len(value) != PLACE.size:
                raise self._damaged(q)
            if j >= self.epoch:
                answer = (q, j, value)
                break
            at = q  # q's first entry is older than `epoch`: seek again at (q, epoch)
        self.lo, self.hi, self.answer = u, self.limit if answer is None else answer[0], answer
        return answer

    def _damaged(self, u: int) -> CorruptStamp:
        """A read's error for an entry of the wrong size (key or value) at or
        after unit `u`: what check_history reports, never a struct.error."""
        unit = "page" if self.table == "pagehist" else "run"
        return CorruptStamp(f"blob {self.blob_id}: the history index ({self.table}) has a damaged entry near "
                            f"{unit} {u} (stamp check names it)")


class PageBlobs:
    """All page blobs of one stamp."""

    def __init__(self, meta: Meta, stream: StreamLayer) -> None:
        self.meta, self.stream = meta, stream
        self.db = meta.db
        self.pressure = Gate(stream)  # a writer faster than the reclaimer waits for it (pressure.py)
        self._ids: dict[str, int] = {}
        self._snap_infos: dict[bytes, tuple[int, int]] = {}
        self._upgrade_states()
        self._build_history()

    def _upgrade_states(self) -> None:
        """Give the state records of a stamp made by older code their version
        word: the old counter's value, marked observed (a cache may hold it),
        so the next change moves it on. Once: a counter says it is done."""
        with self.meta.read() as txn:
            if txn.get(STATE_WORD_BUILT, db=self.db["counters"]) is not None:
                return
        with self.meta.write() as txn:
            if txn.get(STATE_WORD_BUILT, db=self.db["counters"]) is not None:
                return
            counters = self.db["counters"]
            for key, raw in self.meta.items(txn, "blobstate"):
                if len(raw) == STATE_V1.size:
                    old = txn.get(_version_key(U64.unpack(key)[0]), db=counters)
                    word = (U64.unpack(old)[0] if old else 0) << 1 | 1
                    txn.put(key, raw + WORD.pack(word), db=self.db["blobstate"])
            rg.delete_prefix(txn, counters, b"version/")  # every old counter, deleted blobs' too
            txn.put(STATE_WORD_BUILT, U64.pack(1), db=counters)

    def _build_history(self) -> None:
        """Index the frozen pieces of a stamp made before this layout of the
        index (per-page `pagehist` only, the legacy per-cell `history`, or no
        index), once: a counter says it is done. The older counters go, so a
        stamp opened by older code since (which rebuilds its own layout and
        puts its counter back) is indexed again."""
        counters = self.db["counters"]

        def built(txn: lmdb.Transaction) -> bool:
            return txn.get(RUN_HISTORY_BUILT, db=counters) is not None and \
                txn.get(PAGE_HISTORY_BUILT, db=counters) is None

        with self.meta.read() as txn:
            if built(txn):
                return
        with self.meta.write() as txn:
            if built(txn):
                return
            for table in ("history", "pagehist", "runhist"):
                rg.delete_prefix(txn, self.db[table], b"")
            for key, raw in self.meta.items(txn, "frozen"):
                blob_id, epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])
                self._index(txn, blob_id, epoch, U64.unpack(key[BLOB_EPOCH.size:])[0], raw)
            txn.delete(HISTORY_BUILT, db=counters)
            txn.delete(PAGE_HISTORY_BUILT, db=counters)
            txn.put(RUN_HISTORY_BUILT, U64.pack(1), db=counters)

    # -- blob records -------------------------------------------------------------

    def _blob(self, txn: lmdb.Transaction, name: str) -> tuple[int, dict[str, Any], BlobState]:
        obj = self.meta.get_json(txn, "blobs", blob_key(name))
        if obj is None:
            raise BlobNotFound(f"blob {name!r} does not exist")
        raw = txn.get(U64.pack(obj["id"]), db=self.db["blobstate"])
        if raw is None:
            raise CorruptStamp(f"blob {name!r} has no state record")
        return obj["id"], obj, BlobState.unpack(bytes(raw))

    def _state(self, txn: lmdb.Transaction, name: str) -> tuple[int, BlobState]:
        """The hot path's _blob."""
        blob_id, raw = self._state_raw(txn, name)
        return blob_id, BlobState.unpack(raw)

    def _state_raw(self, txn: lmdb.Transaction, name: str) -> tuple[int, bytes]:
        """A blob's id and packed state. Ids never change, so name -> id is
        cached (NAME_CACHE names at most: a long-lived server sees ever new
        names); a blob deleted (and perhaps re-created) elsewhere has no state
        under the cached id, which sends us back to the name."""
        blob_id = self._ids.get(name)
        if blob_id is not None:
            raw = txn.get(U64.pack(blob_id), db=self.db["blobstate"])
            if raw is not None:
                return blob_id, bytes(raw)
        blob_id, _, st = self._blob(txn, name)
        if len(self._ids) >= NAME_CACHE:  # names of blobs deleted long ago (by any process) go too
            self._ids.clear()
        self._ids[name] = blob_id
        return blob_id, st.pack()

    def create(self, name: str, size: int, properties: dict[str, Any] | None = None,
               limit: int = MAX_BLOB) -> None:
        """A new page blob of `size` bytes (a multiple of 512; up to 8 TiB,
        or `limit` for the blobs of managed disks)."""
        key = blob_key(name)
        self._check_size(size, limit)
        with self.meta.write() as txn:
            if txn.get(key, db=self.db["blobs"]) is not None:
                raise BlobAlreadyExists(f"blob {name!r} already exists")
            blob_id = self.meta.next_id(txn, "blob")  # a counter: ids are never reused
            self.meta.put_json(txn, "blobs", key, {"id": blob_id, "name": name, "created": time.time(),
                                                   "limit": limit, "properties": properties or {}})
            txn.put(U64.pack(blob_id), BlobState(0, -1, size, NO_LEASE, 0).pack(), db=self.db["blobstate"])

    @staticmethod
    def _check_size(size: int, limit: int = MAX_BLOB) -> None:
        if type(size) is not int or size < 0 or size % PAGE or size > limit:
            raise InvalidHeaderValue(f"page blob size {size} must be a multiple of 512 up to {limit} bytes")

    def exists(self, name: str) -> bool:
        with self.meta.read() as txn:
            return self.exists_in(txn, name)

    def exists_in(self, txn: lmdb.Transaction, name: str) -> bool:
        return txn.get(blob_key(name), db=self.db["blobs"]) is not None

    def names(self) -> list[str]:
        with self.meta.read() as txn:
            return sorted(str(loads(v).get("name") or k.decode()) for k, v in self.meta.items(txn, "blobs"))

    def properties(self, name: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            blob_id, obj, st = self._blob(txn, name)
            snaps = len(list(self.meta.items(txn, "snaps", U64.pack(blob_id))))
        return {"name": name, "id": blob_id, "size": st.size, "created": obj["created"], "snapshots": snaps,
                "leased": st.lease_held(time.time()), **obj.get("properties", {})}

    def set_properties(self, name: str, **props: Any) -> None:
        with self.meta.write() as txn:
            _, obj, _ = self._blob(txn, name)
            obj.setdefault("properties", {}).update(props)
            self.meta.put_json(txn, "blobs", blob_key(name), obj)

    def update_properties(self, name: str, change: Callable[[dict[str, Any]], None],
                          lease: str | None | bool = False) -> dict[str, Any]:
        """Change the blob's properties with `change(props)` in one transaction
        (a read, modify and write no other process can come between); with
        `lease` (not False) the lease rules of a write apply first."""
        with self.meta.write() as txn:
            _, obj, st = self._blob(txn, name)
            if lease is not False:
                self._check_lease(st, lease if isinstance(lease, str) else None)
            props = obj.setdefault("properties", {})
            change(props)
            self.meta.put_json(txn, "blobs", blob_key(name), obj)
        return dict(props)

    def describe(self, name: str, snapshot: str | None = None) -> BlobInfo:
        """The blob's (or snapshot's) size, properties, content version and
        lease, from one transaction. A snapshot's properties are those
        recorded in its metadata under "properties". The version reported is
        observed (as version() does): the next change of the live pages moves
        it on, so a client holding it (an ETag) sees every change."""
        held = self.meta.held()
        if held is not None:  # inside atomic(): what it changed so far
            return self._describe(held, name, snapshot, *self._observed(held, name))
        with self.meta.read() as txn:
            found = self._blob(txn, name)
            if found[2].version & 1:
                return self._describe(txn, name, snapshot, *found)
        with self.meta.write() as txn:  # unobserved: mark it in the transaction that reports it
            return self._describe(txn, name, snapshot, *self._observed(txn, name))

    def atomically(self, name: str, fn: Callable[[BlobInfo | None], T], snapshot: str | None = None,
                   missing_ok: bool = False) -> T:
        """fn(the blob's description, or None if missing_ok and there is no
        blob) and every change fn makes through this stamp, in one write
        transaction: a check of the blob's state (an If-Match) and the change
        it guards are one step, across processes too."""
        with self.meta.atomic() as txn:
            try:
                info: BlobInfo | None = self._describe(txn, name, snapshot, *self._observed(txn, name))
            except BlobNotFound:
                if not missing_ok:
                    raise
                info = None
            return fn(info)

    def _describe(self, txn: lmdb.Transaction, name: str, snapshot: str | None, blob_id: int,
                  obj: dict[str, Any], st: BlobState) -> BlobInfo:
        raw = txn.get(_touched_key(blob_id), db=self.db["counters"])
        touched = TIME.unpack(raw)[0] if raw else 0.0
        count = sum(1 for _ in self.meta.items(txn, "snaps", U64.pack(blob_id)))
        if snapshot is None:
            lease_id = None if st.lease == NO_LEASE else str(uuid.UUID(bytes=st.lease))
            return BlobInfo(name, blob_id, st.size, float(obj["created"]), dict(obj.get("properties", {})),
                            st.version >> 1, touched, lease_state(st, obj, time.time()), lease_id, st.lease_expiry,
                            count)
        info = txn.get(snap_key(blob_id, snapshot), db=self.db["snapnames"])
        if info is None:
            raise SnapshotNotFound(f"blob {name!r} has no snapshot {snapshot}")
        rec = loads(bytes(info))
        props = dict(rec.get("metadata", {}).get("properties", {}))
        return BlobInfo(name, blob_id, int(rec["size"]), float(obj["created"]), props, int(rec["epoch"]), 0.0,
                        LeaseState.AVAILABLE, None, 0, count, snapshot)

    def recreate(self, name: str, size: int, properties: dict[str, Any], lease: str | None = None) -> bool:
        """Put Blob: a blob of `size` bytes with no data and `properties`. An
        existing blob is emptied and resized in place (its snapshots and lease
        stay, its properties other than the lease's are replaced), in one
        transaction. Returns True if the blob was new."""
        with self.meta.write() as txn:
            key = blob_key(name)
            if txn.get(key, db=self.db["blobs"]) is None:
                self._check_size(size)
                blob_id = self.meta.next_id(txn, "blob")
                self.meta.put_json(txn, "blobs", key, {"id": blob_id, "name": name, "created": time.time(),
                                                       "limit": MAX_BLOB, "properties": properties})
                txn.put(U64.pack(blob_id), BlobState(0, -1, size, NO_LEASE, 0).pack(), db=self.db["blobstate"])
                return True
            blob_id, obj, st = self._blob(txn, name)
            self._check_size(size, int(obj.get("limit", MAX_BLOB)))
            self._check_lease(st, lease)
            if st.size:
                self._replace(txn, blob_id, st.latest, st.epoch, 0, st.size // PAGE, None)
                st.version = moved_on(st.version)
            self._touch(txn, blob_id)
            st.size = size
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
            kept = {k: v for k, v in obj.get("properties", {}).items() if k.startswith("lease_")}
            obj["properties"] = {**properties, **kept}
            self.meta.put_json(txn, "blobs", key, obj)
        return False

    def copy_into(self, source: str, target: str, snapshot: str | None = None, since: str | None = None,
                  lease: str | None = None) -> None:
        """Make the existing blob `target` hold what `source` (or its
        `snapshot`) holds, size included, sharing its extents: an index
        change, no data copied. With `since` (an older snapshot of the
        source), only the pages changed between the two are replaced (an
        incremental copy). The target's snapshots keep what they saw."""
        with self.meta.write() as txn:
            src_id, _, src_st = self._blob(txn, source)
            epoch = self._snapshot_epoch(txn, src_id, source, snapshot)
            size = src_st.size if snapshot is None else self._snapshot_size(txn, src_id, snapshot, src_st)
            tid, tobj, tst = self._blob(txn, target)
            self._check_size(size, int(tobj.get("limit", MAX_BLOB)))
            self._check_lease(tst, lease)
            if since is None:
                changed = [(0, max(size, tst.size) // PAGE)]
            else:
                d = self._diff_in(txn, source, src_id, src_st, since, snapshot)
                changed = rg.merge_ranges([(o // PAGE, (o + n) // PAGE) for o, n in d.written + d.cleared])
                if tst.size > size:
                    changed = rg.merge_ranges(changed + [(size // PAGE, tst.size // PAGE)])
            for s, e in changed:
                self._replace(txn, tid, tst.latest, tst.epoch, s, e, None)
                for p in self._resolve(txn, src_id, epoch, s, min(e, size // PAGE)):
                    self._replace(txn, tid, tst.latest, tst.epoch, p.start, p.end, p._replace(gen=tst.epoch).pack())
            if changed:
                tst.version = moved_on(tst.version)
                self._touch(txn, tid)
            tst.size = size
            txn.put(U64.pack(tid), tst.pack(), db=self.db["blobstate"])

    def size(self, name: str) -> int:
        with self.meta.read() as txn:
            return self._blob(txn, name)[2].size

    def blob_id(self, name: str) -> int:
        """The blob's id: never reused, so a blob deleted and re-created under
        the same name has another one."""
        with self.meta.read() as txn:
            return self._blob(txn, name)[0]

    def version(self, name: str) -> tuple[int, str]:
        """(id, content version) for caches outside the stamp: the blob's size
        and a counter that a change of its live pages (a write, clear or
        shrink, in the index's own transaction) moves on, so any write, clear
        or resize changes it; snapshots, leases and gc moves do not. O(1).

        The counter moves only when someone has read it since it last moved
        (the observed bit of the state record's version word, which the write
        reads anyway): writes nobody looked between cost no metadata write.
        Reading an unobserved version sets the bit in the same write
        transaction that reads it, so every change committed after any read
        of a version moves it on, in every process."""
        with self.meta.read() as txn:
            blob_id, _, st = self._blob(txn, name)
        if not st.version & 1:
            with self.meta.write() as txn:
                blob_id, _, st = self._observed(txn, name)
        return blob_id, f"{st.size}.{st.version >> 1}"

    def _observed(self, txn: lmdb.Transaction, name: str) -> tuple[int, dict[str, Any], BlobState]:
        """The blob, read in write transaction `txn` with its version marked
        observed (set here if it was not): the next change moves it on."""
        blob_id, obj, st = self._blob(txn, name)
        if not st.version & 1:
            st.version |= 1
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
        return blob_id, obj, st

    def delete(self, name: str, lease: str | None = None, snapshots: str | None = None) -> None:
        """Delete a blob (their space is reclaimed by gc). A blob with snapshots
        needs `snapshots`: "include" deletes them with it, "only" deletes just
        them (Azure's x-ms-delete-snapshots); else SnapshotsPresent."""
        with self.meta.write() as txn:
            self.delete_in(txn, name, lease, snapshots)

    def delete_in(self, txn: lmdb.Transaction, name: str, lease: str | None = None,
                  snapshots: str | None = None) -> None:
        """delete() inside the caller's write transaction (a resource and its
        blob go in one commit)."""
        if snapshots not in (None, "include", "only"):
            raise InvalidHeaderValue(f"snapshots={snapshots!r}: say include or only")
        blob_id, _, st = self._blob(txn, name)
        self._check_lease(st, lease)
        prefix = U64.pack(blob_id)
        if snapshots is None and next(self.meta.items(txn, "snaps", prefix), None) is not None:
            raise SnapshotsPresent(f"blob {name!r} has snapshots: delete with snapshots='include' (or 'only')")
        if snapshots == "only":
            for snap in self.snapshots_in(txn, name):
                self.delete_snapshot_in(txn, name, snap.id)
            return
        txn.delete(_touched_key(blob_id), db=self.db["counters"])
        for table in ("pages", "frozen", "pagehist", "runhist", "changes", "snaps", "snapnames"):
            rg.delete_prefix(txn, self.db[table], prefix)
        txn.delete(prefix, db=self.db["blobstate"])
        txn.delete(blob_key(name), db=self.db["blobs"])

    # -- leases --------------------------------------------------------------------

    @staticmethod
    def _check_lease(st: BlobState, lease: str | None) -> None:
        """The lease rules of a blob operation (write, clear, resize, delete)."""
        given = None if lease is None else lease_bytes(lease)
        if st.lease_held(time.time()):
            if given is None:
                raise LeaseIdMissing("the blob is leased; the request named no lease")
            if given != st.lease:
                raise LeaseIdMismatch("the lease named is not the blob's lease")
        elif given is not None:
            if st.lease != NO_LEASE and given == st.lease:
                raise LeaseLost("the lease named has expired: acquire it again")
            raise LeaseNotPresentWithBlobOperation("the request named a lease and the blob has none")

    @staticmethod
    def _check_lease_operation(st: BlobState, lease: str) -> None:
        """The lease rules of a lease operation (release, change) naming `lease`."""
        if st.lease == NO_LEASE:
            raise LeaseNotPresentWithLeaseOperation("the blob has no lease to release or change")
        if lease_bytes(lease) != st.lease:
            raise LeaseIdMismatchWithLeaseOperation("the lease named is not the blob's lease")

    def acquire_lease(self, name: str, duration: float = -1, lease: str | None = None,
                      holder: dict[str, Any] | None = None,
                      stale: Callable[[dict[str, Any]], bool] | None = None) -> str:
        """Take the blob's lease (for `duration` seconds, -1 forever); returns its id.
        The holder may acquire again (a renewal with a new duration); a
        breaking lease cannot be acquired until it is broken. A writer lease
        (acquire_writer_lease) records its `holder` in the same transaction,
        and takes a lease held by another over only if `stale(properties)`
        says its holder died, judged in that transaction too."""
        if duration != -1 and not 15 <= duration <= 60:
            raise InvalidHeaderValue(f"lease duration {duration}: use -1 or 15 to 60 seconds")
        new = uuid.UUID(bytes=lease_bytes(lease)) if lease else uuid.uuid4()
        now = time.time()
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            state = lease_state(st, obj, now)
            if state is LeaseState.BREAKING:
                raise LeaseIsBreakingAndCannotBeAcquired(f"blob {name!r}: its lease is breaking")
            if state is LeaseState.LEASED and st.lease != new.bytes:
                props = obj.get("properties", {})
                if holder is None:
                    raise LeaseAlreadyPresent(f"blob {name!r} is leased by someone else")
                if stale is None or not stale(props):
                    raise LeaseAlreadyPresent(f"blob {name!r} is open for writing by "
                                              f"{props.get('lease_holder', 'another holder')}")
            st.lease, st.lease_expiry = new.bytes, 0 if duration == -1 else now + duration
            who = {k.removeprefix("lease_"): holder[k] for k in HOLDER_KEYS if k in holder} if holder else {}
            self._put_lease(txn, blob_id, name, obj, st, duration=duration, broken=False, **who)
        return str(new)

    def _put_lease(self, txn: lmdb.Transaction, blob_id: int, name: str, obj: dict[str, Any], st: BlobState,
                   **lease: Any) -> None:
        txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
        props = obj.setdefault("properties", {})
        for k, v in lease.items():
            props[f"lease_{k}"] = v
        self.meta.put_json(txn, "blobs", blob_key(name), obj)

    def renew_lease(self, name: str, lease: str) -> None:
        """Start the lease's duration again; an expired lease nobody took since renews too."""
        given = lease_bytes(lease)
        now = time.time()
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            state = lease_state(st, obj, now)
            if state in (LeaseState.BREAKING, LeaseState.BROKEN):
                raise LeaseIsBrokenAndCannotBeRenewed(f"blob {name!r}: its lease was broken")
            self._check_lease_operation(st, lease)
            duration = float(obj.get("properties", {}).get("lease_duration", -1))
            st.lease, st.lease_expiry = given, 0 if duration == -1 else now + duration
            self._put_lease(txn, blob_id, name, obj, st)

    def change_lease(self, name: str, lease: str, proposed: str) -> str:
        """Give the held lease another id (the holder's, or the proposed one again)."""
        new = lease_bytes(proposed)
        now = time.time()
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            state = lease_state(st, obj, now)
            if state is LeaseState.BREAKING:
                raise LeaseIsBreakingAndCannotBeChanged(f"blob {name!r}: its lease is breaking")
            if state is not LeaseState.LEASED:
                raise LeaseNotPresentWithLeaseOperation(f"blob {name!r} has no lease to change")
            if st.lease not in (lease_bytes(lease), new):
                raise LeaseIdMismatchWithLeaseOperation("the lease named is not the blob's lease")
            st.lease = new
            self._put_lease(txn, blob_id, name, obj, st)
        return str(uuid.UUID(bytes=new))

    def break_lease_after(self, name: str, period: float | None = None) -> int:
        """Break the lease, at once (period 0) or after `period` seconds
        (None: at once for an infinite lease, at its end for a fixed one);
        meanwhile it is breaking and the holder may still write. Returns the
        whole seconds until it is broken (the service's x-ms-lease-time)."""
        if period is not None and not 0 <= period <= 60:
            raise InvalidHeaderValue(f"lease break period {period}: use 0 to 60 seconds")
        now = time.time()
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            state = lease_state(st, obj, now)
            if state is LeaseState.AVAILABLE:
                raise LeaseNotPresentWithLeaseOperation(f"blob {name!r} has no lease to break")
            if state in (LeaseState.BROKEN, LeaseState.EXPIRED):
                end = now
            else:
                left = float("inf") if st.lease_expiry == 0 else st.lease_expiry - now
                if state is LeaseState.LEASED and period is None:
                    period = 0 if st.lease_expiry == 0 else left
                end = now + min(left, period if period is not None else left)
            st.lease_expiry = max(end, 1e-9)  # a broken lease keeps its id: a write naming it is LeaseLost
            self._put_lease(txn, blob_id, name, obj, st, broken=True)
        return max(0, int(-(-(end - now) // 1)))

    def acquire_writer_lease(self, name: str, holder: dict[str, Any] | None = None, lease: str | None = None,
                             stale: dict[str, Any] | None = None) -> str:
        """The lease a process takes to write a blob: it records who holds it
        (`holder`: the lease_* properties of a process elsewhere, a host over
        the network; by default this process), and a lease left by a process
        that died on this host is broken, as is one whose holder is exactly
        `stale` (a remote host found that process dead on its own machine:
        only a claimant on that machine, never of a holder on this one).
        `lease` proposes the id, so a retried acquire is the same acquire."""
        who = holder or this_holder()

        def died(props: dict[str, Any]) -> bool:  # the lease is stale: taken over
            return writer_stale(props, who, stale)

        # one transaction: nobody comes between the judgement and the take-over, nor between the
        # lease and its holder's record (a taker meanwhile would judge the holder before it)
        return self.acquire_lease(name, lease=lease, holder=who, stale=died)

    def writer_of(self, name: str) -> dict[str, Any]:
        """Who holds the blob's writer lease (its lease_* properties; empty if nobody recorded)."""
        return _holder_of(self.properties(name))

    def release_lease(self, name: str, lease: str) -> None:
        with self.meta.write() as txn:
            blob_id, _, st = self._blob(txn, name)
            self._check_lease_operation(st, lease)
            st.lease, st.lease_expiry = NO_LEASE, 0
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])

    def break_lease(self, name: str) -> None:
        with self.meta.write() as txn:
            self.break_lease_in(txn, name)

    def break_lease_in(self, txn: lmdb.Transaction, name: str) -> None:
        """break_lease() inside the caller's write transaction."""
        blob_id, _, st = self._blob(txn, name)
        if st.lease == NO_LEASE:
            raise LeaseNotPresentWithLeaseOperation(f"blob {name!r} has no lease to break")
        st.lease, st.lease_expiry = NO_LEASE, 0
        txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])

    def held_lease_in(self, txn: lmdb.Transaction, name: str) -> tuple[str, dict[str, Any]] | None:
        """The blob's held lease and its properties (who holds it, for a
        writer lease), or None, inside the caller's transaction."""
        _, obj, st = self._blob(txn, name)
        if not st.lease_held(time.time()):
            return None
        return str(uuid.UUID(bytes=st.lease)), dict(obj.get("properties", {}))

    def lease_of(self, name: str) -> str | None:
        with self.meta.read() as txn:
            st = self._blob(txn, name)[2]
        return str(uuid.UUID(bytes=st.lease)) if st.lease_held(time.time()) else None

    # -- writes ----------------------------------------------------------------------

    def write(self, name: str, offset: int, data: bytes | memoryview, lease: str | None = None,
              hook: Hook | None = None) -> None:
        """Put pages: offset and length multiples of 512, at most 4 MiB.
        `hook`, if given, runs inside the index transaction before the pages
        change (see Hook): it may refuse the write or change the properties."""
        self._write(name, offset, data, lease, hook, None)

    def write_described(self, name: str, offset: int, data: bytes | memoryview, lease: str | None = None,
                        hook: Hook | None = None) -> BlobInfo:
        """write(), and the blob as describe() reports it just after, from
        the write's own transaction: the version reported is marked observed
        there (the next change moves it on), so a server answering the write
        with its ETag needs no second transaction."""
        told: list[BlobInfo] = []
        self._write(name, offset, data, lease, hook, told)
        return told[0]

    def _write(self, name: str, offset: int, data: bytes | memoryview, lease: str | None, hook: Hook | None,
               told: list[BlobInfo] | None) -> None:
        # Alignment and length are checked before the data is stored; the blob's
        # existence and size inside the transaction (a refused write leaves only
        # unreferenced record bytes, which gc reclaims).
        n = len(data)
        if offset % PAGE or n % PAGE or not 0 < n <= MAX_WRITE or offset < 0:
            check_pages(offset, n, offset + n)  # raises the error the rules name
        if name not in self._ids:
            with self.meta.read() as txn:
                self._state(txn, name)  # BlobNotFound before storing anything
        self.meta.before_small_write()  # MetadataFull before anything is stored
        self.pressure.admit(n)  # nearly always at once; waits while the reclaimer is far behind
        s = offset // PAGE
        e = s + n // PAGE
        for _ in range(3):
            loc = self.stream.append(data)  # data on 3 replicas before the index points at it
            if self._point(name, offset, n, lease, s, e, loc, hook, told):
                return
        raise CorruptStamp("gc deleted the extent of every fresh copy of this write (3 times)")

    def _point(self, name: str, offset: int, n: int, lease: str | None, s: int, e: int, loc: Location,
               hook: Hook | None = None, told: list[BlobInfo] | None = None) -> bool:
        """The index transaction of a write: pages [s, e) now point at `loc`.
        False if the extent holding it is gone: the record was appended just
        before its extent was sealed, and gc (any process) found the sealed
        extent unreferenced and deleted it. gc deletes inside a write
        transaction, so this check, in ours, sees either the extent or its
        deletion, never a dangling pointer."""
        txn = self.meta.env.begin(write=True)  # started and committed here, on this thread
        try:
            if txn.get(U64.pack(loc.extent), db=self.db["extents"]) is None:
                txn.abort()
                return False
            release = self.stream.gone_moved(txn)  # files deleted elsewhere: let go after the commit
            blob_id, raw = self._state_raw(txn, name)  # no BlobState built: this is the hot path
            epoch, latest, size, lease_id, _, word = STATE.unpack(raw)
            if lease_id != NO_LEASE or lease is not None:
                self._check_lease(BlobState.unpack(raw), lease)
            if offset + n > size:
                check_pages(offset, n, size)  # the blob may have shrunk meanwhile
            if hook is not None:  # before the version moves: the hook judges the state before the write
                self._run_hook(txn, name, blob_id, size, word >> 1, hook)
            after = moved_on(word) | (told is not None)  # moved on if it was read; observed if reported now
            if after != word:
                raw = raw[:-WORD.size] + WORD.pack(after)
                txn.put(U64.pack(blob_id), raw, db=self.db["blobstate"])
            self._touch(txn, blob_id)
            self._replace(txn, blob_id, latest, epoch, s, e, PIECE.pack(e, loc.extent, loc.offset, loc.length, 0, epoch))
            if told is not None:
                obj = self.meta.get_json(txn, "blobs", blob_key(name))
                told.append(self._describe(txn, name, None, blob_id, obj, BlobState.unpack(raw)))
        except BaseException:
            txn.abort()
            raise
        txn.commit()
        if release:
            self.stream.release_gone()
        return True

    def clear(self, name: str, offset: int, length: int, lease: str | None = None, hook: Hook | None = None) -> None:
        """Clear pages: afterwards they read as zeros and hold no data (`hook` as for write)."""
        self._clear(name, offset, length, lease, hook, False)

    def clear_described(self, name: str, offset: int, length: int, lease: str | None = None,
                        hook: Hook | None = None) -> BlobInfo:
        """clear(), and the blob as describe() reports it just after, from
        the same transaction (as write_described)."""
        info = self._clear(name, offset, length, lease, hook, True)
        assert info is not None
        return info

    def _clear(self, name: str, offset: int, length: int, lease: str | None, hook: Hook | None,
               report: bool) -> BlobInfo | None:
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            self._check_lease(st, lease)
            check_pages(offset, length, st.size, limit=None)
            if hook is not None:
                self._run_hook(txn, name, blob_id, st.size, st.version >> 1, hook)
            before = st.version
            if length:
                self._replace(txn, blob_id, st.latest, st.epoch, offset // PAGE, (offset + length) // PAGE, None)
                self._touch(txn, blob_id)
                st.version = moved_on(st.version)
            st.version |= report  # reported now: observed (the next change moves it on)
            if st.version != before:
                txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
            if not report:
                return None
            if hook is not None:  # the hook may have changed the properties
                obj = self.meta.get_json(txn, "blobs", blob_key(name))
            return self._describe(txn, name, None, blob_id, obj, st)

    def resize(self, name: str, size: int, lease: str | None = None) -> None:
        """Grow or shrink; pages cut off are cleared (snapshots keep theirs).
        The size limit is the one the blob was created with."""
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, name)
            self._check_size(size, int(obj.get("limit", MAX_BLOB)))
            self._check_lease(st, lease)
            if size < st.size:
                self._replace(txn, blob_id, st.latest, st.epoch, size // PAGE, st.size // PAGE, None)
                st.version = moved_on(st.version)
            if size != st.size:
                self._touch(txn, blob_id)
            st.size = size
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])

    def _run_hook(self, txn: lmdb.Transaction, name: str, blob_id: int, size: int, version: int,
                  hook: Hook) -> None:
        """Run a write's hook with the blob's content version before the write;
        store the properties only if it changed them (the write's time is
        recorded by the write itself: _touch)."""
        obj = self.meta.get_json(txn, "blobs", blob_key(name))
        props = obj.setdefault("properties", {})
        before = dumps(props)
        touched = txn.get(_touched_key(blob_id), db=self.db["counters"])
        hook(props, blob_id, size, version, TIME.unpack(touched)[0] if touched else 0.0)
        if dumps(props) != before:
            self.meta.put_json(txn, "blobs", blob_key(name), obj)

    def _touch(self, txn: lmdb.Transaction, blob_id: int) -> None:
        """Record that the blob's pages or size change now (BlobInfo.touched,
        the Last-Modified of the REST endpoint), whoever changes them: at most
        once a second per blob, the precision of an HTTP date, so a stream of
        writes reads one small counter each and writes it once a second (the
        version word's observed bit is no help here: a change after an
        observation would be dated, later ones in that window not)."""
        now = time.time()
        key = _touched_key(blob_id)
        raw = txn.get(key, db=self.db["counters"])
        if raw is None or int(TIME.unpack(raw)[0]) < int(now):
            txn.put(key, TIME.pack(now), db=self.db["counters"])

    def _replace(self, txn: lmdb.Transaction, blob_id: int, latest: int, epoch: int, s: int, e: int,
                 new: bytes | None) -> None:
        """Make pages [s, e) map to `new` (a packed Piece starting at s, or
        nothing), keeping what the latest snapshot (epoch `latest`) can see in
        its frozen table; while there are snapshots, log the change in `epoch`."""
        prefix = U64.pack(blob_id)
        pages = self.db["pages"]
        for ps, pe, raw in rg.overlapping(txn, pages, prefix, s, e):
            old = Piece.unpack(ps, raw)
            if ps != s or new is None:  # else the put below replaces it
                txn.delete(prefix + U64.pack(ps), db=pages)
            if ps < s:
                left = old.cut(ps, s)
                txn.put(prefix + U64.pack(ps), left.pack(), db=pages)
            if pe > e:
                right = old.cut(e, pe)
                txn.put(prefix + U64.pack(e), right.pack(), db=pages)
            middle = old.cut(s, e)
            if latest >= 0 and middle.gen <= latest:
                self._freeze(txn, blob_id, latest, middle.start, middle.end, middle.pack())
        if new is not None:
            txn.put(prefix + U64.pack(s), new, db=pages)
        if latest >= 0:  # the change log: one entry per start page, merged when a diff reads it
            key = BLOB_EPOCH_PAGE.pack(blob_id, epoch, s)
            changes = self.db["changes"]
            had = txn.get(key, db=changes)
            if had is None or rg.END.unpack(had)[0] < e:
                txn.put(key, rg.END.pack(e), db=changes)

    def _freeze(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, e: int, raw: bytes) -> None:
        """Keep the piece of pages [s, e) for snapshot `epoch`: in frozen(epoch)
        and, by place, in the pagehist and runhist indexes."""
        txn.put(BLOB_EPOCH.pack(blob_id, epoch) + U64.pack(s), raw, db=self.db["frozen"])
        self._index(txn, blob_id, epoch, s, raw)

    def _index(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, raw: bytes) -> None:
        """The index entries of frozen piece (epoch, s), packed `raw`."""
        e, gen = PIECE.unpack(raw)[0], PIECE.unpack(raw)[5]
        place = PLACE.pack(s, e, gen)
        key = BLOB_PAGE_EPOCH.pack
        pages, runs = index_places(s, e)
        if pages:
            txn.cursor(db=self.db["pagehist"]).putmulti([(key(blob_id, p, epoch), place) for p in pages])
        if runs:
            txn.cursor(db=self.db["runhist"]).putmulti([(key(blob_id, r, epoch), place) for r in runs])

    def _unindex(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, e: int) -> None:
        pages, runs = index_places(s, e)
        for table, units in (("pagehist", pages), ("runhist", runs)):
            db = self.db[table]
            for u in units:
                txn.delete(BLOB_PAGE_EPOCH.pack(blob_id, u, epoch), db=db)

    def check_history(self, txn: lmdb.Transaction) -> list[str]:
        """Problems with the pagehist and runhist indexes: they must hold
        exactly the entries of every frozen piece (index_places), each naming
        the piece (start, end, gen)."""
        want: dict[str, dict[bytes, bytes]] = {"pagehist": {}, "runhist": {}}
        for key, raw in self.meta.items(txn, "frozen"):
            blob_id, epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])
            s = U64.unpack(key[BLOB_EPOCH.size:])[0]
            e, gen = PIECE.unpack(raw)[0], PIECE.unpack(raw)[5]
            pages, runs = index_places(s, e)
            for table, units in (("pagehist", pages), ("runhist", runs)):
                for u in units:
                    want[table][BLOB_PAGE_EPOCH.pack(blob_id, u, epoch)] = PLACE.pack(s, e, gen)
        problems: list[str] = []
        for table, unit in (("pagehist", "page"), ("runhist", "run")):
            have, damaged = _history_entries(self.meta.items(txn, table), table, unit, problems)
            need = {key: place for key, place in want[table].items() if key not in damaged}  # not also missing
            for key in sorted(set(need) ^ set(have))[:100]:
                blob_id, u, epoch = BLOB_PAGE_EPOCH.unpack(key)
                what = "is missing" if key in need else "names no frozen piece"
                problems.append(f"history index ({table}): blob {blob_id} {unit} {u} snapshot epoch {epoch} {what}")
            for key in sorted(need.keys() & have.keys()):
                if need[key] != have[key]:
                    blob_id, u, epoch = BLOB_PAGE_EPOCH.unpack(key)
                    problems.append(f"history index ({table}): blob {blob_id} {unit} {u} snapshot epoch {epoch}: "
                                    f"names another piece {PLACE.unpack(have[key])} than its frozen piece "
                                    f"{PLACE.unpack(need[key])}")
        if next(self.meta.items(txn, "history"), None) is not None:
            problems.append("legacy history index: not empty after the upgrade")
        return problems

    # -- reads -------------------------------------------------------------------------

    def _resolve(self, txn: lmdb.Transaction, blob_id: int, epoch: int | None, s: int, e: int) -> list[Piece]:
        """The pieces that hold pages [s, e) at snapshot `epoch` (None: live), sorted.

        For a snapshot, the first frozen(j), j >= epoch, holding a page decides
        it, then the live index; a piece written after the snapshot (gen >
        epoch) means the page was empty then: had it held data, the write or
        clear that replaced it would have kept that data in an earlier frozen
        table."""
        if epoch is None:
            return self._resolve_live(txn, blob_id, s, e)
        found, gaps = self._resolve_frozen(txn, blob_id, epoch, s, e)
        for gs, ge in gaps:  # pages no snapshot since `epoch` kept: as the live index has them
            found += [p for p in self._resolve_live(txn, blob_id, gs, ge) if p.gen <= epoch]
        return sorted(found, key=lambda p: p.start)

    def _resolve_live(self, txn: lmdb.Transaction, blob_id: int, s: int, e: int) -> list[Piece]:
        return [Piece.unpack(ps, raw).cut(s, e)
                for ps, _, raw in rg.overlapping(txn, self.db["pages"], U64.pack(blob_id), s, e)]

    def _resolve_frozen(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, e: int
                        ) -> tuple[list[Piece], list[tuple[int, int]]]:
        """The frozen pieces that decide pages [s, e) at snapshot `epoch`, and
        the pages none decides."""
        found: list[Piece] = []
        rest: list[tuple[int, int]] = []
        for x in self._frozen_walk(txn, blob_id, epoch, s, e):
            if isinstance(x, Piece):
                found.append(x)
            else:
                rest.append(x)
        return found, rg.merge_ranges(rest)

    def _frozen_walk(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, e: int
                     ) -> Iterator[Piece | tuple[int, int]]:
        """In page order, over [s, e) at snapshot `epoch`: each frozen Piece
        that decides pages, and each (start, end) run of pages none decides.
        Of the entries covering a page at epochs >= `epoch` (its own in
        pagehist, its run's in runhist), the one of least epoch names the
        piece that decides it (see the header); a piece live at `epoch`
        decides all its pages."""
        pages = _Seeker(txn.cursor(db=self.db["pagehist"]), "pagehist", blob_id, epoch, e)
        runs = _Seeker(txn.cursor(db=self.db["runhist"]), "runhist", blob_id, epoch, -(-e // RUN))
        frozen = self.db["frozen"]
        p = s
        while p < e:
            a, b = pages.first(p), runs.first(p // RUN)
            a_at = a[0] if a else e  # the first page at or after p with an entry >= epoch
            b_at = max(p, b[0] * RUN) if b else e  # the first page in a run with one
            here = [c for c, at in ((a, a_at), (b, b_at)) if c is not None and at == p]
            if not here:  # pages [p, next) have nothing frozen since `epoch`
                nxt = min(a_at, b_at, e)
                yield p, nxt
                p = nxt
                continue
            _, j, place = min(here, key=lambda c: c[1])
            ps, pe, gen = PLACE.unpack(place)
            if gen > epoch:  # written after the snapshot: the page was empty then
                if a_at > p:  # decided by its run's entry, as are the next pages with none of their own
                    p = min(a_at, (p // RUN + 1) * RUN, e)
                else:
                    p += 1
                continue
            raw = txn.get(BLOB_EPOCH.pack(blob_id, j) + U64.pack(ps), db=frozen)
            if raw is None:
                raise CorruptStamp(f"blob {blob_id}: the history index names frozen piece {j}/{ps}, "
                                   "which is missing")
            yield Piece.unpack(ps, bytes(raw)).cut(p, e)
            p = min(pe, e)


    def _snapshot_epoch(self, txn: lmdb.Transaction, blob_id: int, name: str, snapshot: str | None) -> int | None:
        return None if snapshot is None else self._snapshot_info(txn, blob_id, name, snapshot)[0]

    def _snapshot_info(self, txn: lmdb.Transaction, blob_id: int, name: str, snapshot: str) -> tuple[int, int]:
        """A snapshot's (epoch, size). Its record never changes while it
        lives, so its parse is kept, by the record's bytes (at most 4,096)."""
        raw = txn.get(snap_key(blob_id, snapshot), db=self.db["snapnames"])
        if raw is None:
            raise SnapshotNotFound(f"blob {name!r} has no snapshot {snapshot}")
        raw = bytes(raw)
        info = self._snap_infos.get(raw)
        if info is None:
            obj = loads(raw)
            info = int(obj["epoch"]), int(obj["size"])
            if len(self._snap_infos) >= 4096:
                self._snap_infos.clear()
            self._snap_infos[raw] = info
        return info

    def read(self, name: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        """Bytes [offset, offset+length) (Get Blob: any offset and length; zeros
        where nothing is written). A range that ends past the blob is cut at
        its end; one that starts at or past it is InvalidRange."""
        failed: list[Piece] | None = None
        while True:
            with self.meta.read() as txn:
                blob_id, st = self._state(txn, name)
                epoch, size = (None, st.size) if snapshot is None else \
                    self._snapshot_info(txn, blob_id, name, snapshot)
                offset, length, lo, hi = _get_range(offset, length, size)
                pieces = self._resolve(txn, blob_id, epoch, lo // PAGE, hi // PAGE)
                if self.stream.gone_moved(txn):  # files deleted by another process: let go of them
                    self.stream.release_gone(txn)
            try:
                data = self._assemble(pieces, lo, hi - lo)
                return data if (lo, hi) == (offset, offset + length) else data[offset - lo:offset - lo + length]
            except (CorruptStamp, DataLost):
                if pieces == failed:
                    raise
                failed = pieces
                # gc may have moved these pieces and deleted their extent since we
                # resolved them, and again after each retry's resolve (a slow reader,
                # rounds in another process): resolve again while the pieces keep
                # moving; a real loss fails twice with the same pieces

    def _snapshot_size(self, txn: lmdb.Transaction, blob_id: int, snapshot: str, st: BlobState) -> int:
        raw = txn.get(snap_key(blob_id, snapshot), db=self.db["snapnames"])
        return int(loads(bytes(raw))["size"]) if raw else st.size

    def _assemble(self, pieces: list[Piece], offset: int, length: int) -> bytes:
        if len(pieces) == 1 and pieces[0].start * PAGE == offset and pieces[0].end * PAGE == offset + length:
            p = pieces[0]
            return self.stream.read(p.extent, p.rec_off, p.rec_len, p.inner, length)
        out = bytearray(length)
        for p in pieces:
            at = p.start * PAGE - offset
            n = (p.end - p.start) * PAGE
            out[at:at + n] = self.stream.read(p.extent, p.rec_off, p.rec_len, p.inner, n)
        return bytes(out)

    def page_ranges(self, name: str, snapshot: str | None = None, offset: int = 0,
                    length: int | None = None) -> list[tuple[int, int]]:
        """(offset, length) byte ranges that hold data, merged."""
        with self.meta.read() as txn:
            blob_id, epoch, s, e = self._listed(txn, name, snapshot, offset, length)
            pieces = self._resolve(txn, blob_id, epoch, s, e)
        return _bytes(rg.merge_ranges([(p.start, p.end) for p in pieces]))

    def iter_page_ranges(self, name: str, snapshot: str | None = None, offset: int = 0,
                         length: int | None = None) -> Iterator[tuple[int, int]]:
        """page_ranges, lazily: the merged byte ranges from `offset` on, in
        order, read from the index as they are taken (cursor walks), all in one read
        transaction held until the iterator ends or is closed. A listing of
        a blob in millions of pieces holds a window of them, not all."""
        with self.meta.read() as txn:
            blob_id, epoch, s, e = self._listed(txn, name, snapshot, offset, length)
            for rs, re_ in self._runs(txn, blob_id, epoch, s, e):
                yield rs * PAGE, (re_ - rs) * PAGE

    def _listed(self, txn: lmdb.Transaction, name: str, snapshot: str | None, offset: int,
                length: int | None) -> tuple[int, int | None, int, int]:
        """A page listing's blob id, epoch (None: live) and pages [s, e), the range cut to the blob's size."""
        if offset < 0 or (length is not None and length < 0):
            raise InvalidRange(f"range {offset}+{length}: offset and length must not be negative")
        blob_id, _, st = self._blob(txn, name)
        epoch = self._snapshot_epoch(txn, blob_id, name, snapshot)
        size = st.size if snapshot is None else self._snapshot_size(txn, blob_id, snapshot, st)
        end = size if length is None else min(offset + length, size)
        return blob_id, epoch, offset // PAGE, -(-end // PAGE)

    def _runs(self, txn: lmdb.Transaction, blob_id: int, epoch: int | None, s: int, e: int
              ) -> Iterator[tuple[int, int]]:
        """The merged page runs that hold data in [s, e) at `epoch` (None:
        live), lazily, by cursor walks over the indexes."""
        pages, prefix = self.db["pages"], U64.pack(blob_id)
        if epoch is None:
            runs: Iterator[tuple[int, int]] = ((ps, pe) for ps, pe, _ in rg.walk(txn, pages, prefix, s, e))
        else:
            runs = self._snapshot_runs(txn, blob_id, epoch, s, e)
        return rg.merge_sorted(runs)

    def _snapshot_runs(self, txn: lmdb.Transaction, blob_id: int, epoch: int, s: int, e: int
                       ) -> Iterator[tuple[int, int]]:
        """_resolve at a snapshot, lazily and in order: the frozen pieces as the
        walk meets them, and in the pages none decides, the live pieces that
        were there then (gen <= epoch)."""
        pages, prefix = self.db["pages"], U64.pack(blob_id)
        for x in self._frozen_walk(txn, blob_id, epoch, s, e):
            if isinstance(x, Piece):
                yield x.start, x.end
            else:
                yield from ((ps, pe) for ps, pe, raw in rg.walk(txn, pages, prefix, x[0], x[1])
                            if PIECE.unpack(raw)[5] <= epoch)

    def copy(self, source: str, target: str, snapshot: str | None = None,
             properties: dict[str, Any] | None = None) -> None:
        """Make `target` a new blob with the content of `source` (or of one of
        its snapshots). Extents are immutable, so the copy shares them: it
        costs index entries, not data."""
        with self.meta.write() as txn:
            blob_id, obj, st = self._blob(txn, source)
            epoch = self._snapshot_epoch(txn, blob_id, source, snapshot)
            size = st.size if snapshot is None else self._snapshot_size(txn, blob_id, snapshot, st)
            pieces = self._resolve(txn, blob_id, epoch, 0, size // PAGE)
            key = blob_key(target)
            if txn.get(key, db=self.db["blobs"]) is not None:
                raise BlobAlreadyExists(f"blob {target!r} already exists")
            new_id = self.meta.next_id(txn, "blob")
            self.meta.put_json(txn, "blobs", key,
                               {"id": new_id, "name": target, "created": time.time(), "properties": properties or {},
                                "limit": int(obj.get("limit", MAX_BLOB)),
                                "copied_from": source, "copied_snapshot": snapshot})
            txn.put(U64.pack(new_id), BlobState(0, -1, size, NO_LEASE, 0).pack(), db=self.db["blobstate"])
            prefix = U64.pack(new_id)
            for p in pieces:
                txn.put(prefix + U64.pack(p.start), p._replace(gen=0).pack(), db=self.db["pages"])

    def used_bytes(self, name: str, snapshot: str | None = None) -> int:
        return sum(n for _, n in self.page_ranges(name, snapshot=snapshot))

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, name: str, metadata: dict[str, Any] | None = None) -> Snapshot:
        """Freeze the blob as it is now: O(1) whatever its size."""
        with self.meta.write() as txn:
            blob_id, _, st = self._blob(txn, name)
            now = time.time()
            sid = snapshot_id(now)
            while txn.get(U64.pack(blob_id) + sid.encode(), db=self.db["snapnames"]) is not None:
                now += 1e-6
                sid = snapshot_id(now)
            info = {"snapshot": sid, "epoch": st.epoch, "time": now, "size": st.size, "metadata": metadata or {}}
            txn.put(BLOB_EPOCH.pack(blob_id, st.epoch), dumps(info), db=self.db["snaps"])
            txn.put(U64.pack(blob_id) + sid.encode(), dumps(info), db=self.db["snapnames"])
            snap = Snapshot(name, sid, st.epoch, now, metadata or {})
            st.latest, st.epoch = st.epoch, st.epoch + 1
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
        return snap

    def snapshots(self, name: str) -> list[Snapshot]:
        with self.meta.read() as txn:
            return self.snapshots_in(txn, name)

    def snapshots_in(self, txn: lmdb.Transaction, name: str) -> list[Snapshot]:
        blob_id = self._blob(txn, name)[0]
        out = []
        for _, raw in self.meta.items(txn, "snaps", U64.pack(blob_id)):
            info = loads(raw)
            out.append(Snapshot(name, info["snapshot"], info["epoch"], info["time"], info.get("metadata", {})))
        return out

    def describe_snapshots(self, name: str, epoch: int = 0, limit: int = 1) -> list[tuple[int, BlobInfo]]:
        """(epoch, description) of the blob's snapshots from `epoch` on, oldest
        first, at most `limit` of them, read from one short read transaction
        (a listing page, whatever the number of snapshots); as describe() of
        each, which would count the blob's snapshots once per snapshot."""
        with self.meta.read() as txn:
            blob_id, obj, _ = self._blob(txn, name)
            count = sum(1 for _ in self.meta.items(txn, "snaps", U64.pack(blob_id)))
            out: list[tuple[int, BlobInfo]] = []
            cur = txn.cursor(db=self.db["snaps"])
            if not cur.set_range(BLOB_EPOCH.pack(blob_id, min(epoch, 0xFFFFFFFF))):
                return out
            for key, raw in cur:
                b, e = BLOB_EPOCH.unpack(bytes(key))
                if b != blob_id or len(out) == limit:
                    break
                rec = loads(bytes(raw))
                props = dict(rec.get("metadata", {}).get("properties", {}))
                out.append((e, BlobInfo(name, blob_id, int(rec["size"]), float(obj["created"]), props, e, 0.0,
                                        LeaseState.AVAILABLE, None, 0, count, str(rec["snapshot"]))))
            return out

    def snapshot_metadata(self, name: str, snapshot: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            blob_id = self._blob(txn, name)[0]
            raw = txn.get(snap_key(blob_id, snapshot), db=self.db["snapnames"])
        if raw is None:
            raise SnapshotNotFound(f"blob {name!r} has no snapshot {snapshot}")
        return dict(loads(bytes(raw)))

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        with self.meta.write() as txn:
            self.delete_snapshot_in(txn, name, snapshot)

    def delete_snapshot_in(self, txn: lmdb.Transaction, name: str, snapshot: str) -> None:
        """delete_snapshot() inside the caller's write transaction."""
        blob_id, _, st = self._blob(txn, name)
        k = self._snapshot_epoch(txn, blob_id, name, snapshot)
        assert k is not None
        epochs = [BLOB_EPOCH.unpack(key)[1] for key, _ in self.meta.items(txn, "snaps", U64.pack(blob_id))]
        older = [j for j in epochs if j < k]
        prev = max(older) if older else -1
        frozen = self.db["frozen"]
        for ps, pe, raw in rg.all_ranges(txn, frozen, BLOB_EPOCH.pack(blob_id, k)):
            self._unindex(txn, blob_id, k, ps, pe)
            if prev >= 0 and Piece.unpack(ps, raw).gen <= prev:
                self._freeze(txn, blob_id, prev, ps, pe, raw)
        rg.delete_prefix(txn, frozen, BLOB_EPOCH.pack(blob_id, k))
        txn.delete(BLOB_EPOCH.pack(blob_id, k), db=self.db["snaps"])
        txn.delete(U64.pack(blob_id) + snapshot.encode(), db=self.db["snapnames"])
        if st.latest == k:
            st.latest = prev
            txn.put(U64.pack(blob_id), st.pack(), db=self.db["blobstate"])
        if prev >= 0:  # no diff starts or ends at k any more: its epochs and the next one's are read as one
            self._merge_changes(txn, blob_id, prev, min([j for j in epochs if j > k], default=st.epoch))
        oldest = min([j for j in epochs if j != k], default=None)
        self._prune_changes(txn, blob_id, oldest)

    def _merge_changes(self, txn: lmdb.Transaction, blob_id: int, after: int, upto: int) -> None:
        """Put the change logs of epochs (after, upto] under epoch `upto`, merged.
        A diff reads either all of them or none once no surviving snapshot lies
        between (a diff runs from one snapshot to a later one, or live), so
        create-write-delete cycles beside a kept snapshot leave what changed,
        not one entry per cycle."""
        changes = self.db["changes"]
        keys, found = [], []
        cur = txn.cursor(db=changes)
        if cur.set_range(BLOB_EPOCH.pack(blob_id, after + 1)):
            for key, raw in cur:
                b, epoch, page = BLOB_EPOCH_PAGE.unpack(bytes(key))
                if b != blob_id or epoch > upto:
                    break
                keys.append(bytes(key))
                found.append((page, rg.END.unpack(bytes(raw))[0]))
        for key in keys:
            txn.delete(key, db=changes)
        for s, e in rg.merge_ranges(found):
            txn.put(BLOB_EPOCH_PAGE.pack(blob_id, upto, s), rg.END.pack(e), db=changes)

    def _prune_changes(self, txn: lmdb.Transaction, blob_id: int, oldest: int | None) -> None:
        """Change logs of epochs no diff can start before are not needed."""
        changes = self.db["changes"]
        cur = txn.cursor(db=changes)
        prefix = U64.pack(blob_id)
        if not cur.set_range(prefix):
            return
        while True:
            key = bytes(cur.key())
            if not key.startswith(prefix):
                return
            epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])[1]
            if oldest is not None and epoch > oldest:
                return
            if not cur.delete() or not cur.key():
                return

    def diff(self, name: str, base: str, target: str | None = None) -> Diff:
        """Ranges written and cleared between snapshot `base` and `target`
        (a later snapshot, or the live blob when None)."""
        with self.meta.read() as txn:
            blob_id, _, st = self._blob(txn, name)
            return self._diff_in(txn, name, blob_id, st, base, target)

    def iter_diff(self, name: str, base: str, target: str | None = None, offset: int = 0,
                  length: int | None = None, chunk: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """diff, lazily and cut to [offset, offset+length) (page-aligned
        outward): (offset, length, cleared) byte ranges in offset order,
        written and cleared interleaved, as a Get Page Ranges diff lists
        them. The change logs of the epochs since `base` are merged by one
        cursor each and each changed run resolved as it is reached: a diff
        of millions of ranges holds a window of them, not all.

        With `chunk` None, all in one read transaction held until the
        iterator ends or is closed. With a number, `chunk` ranges at a time,
        each chunk from its own short read transaction, none held between
        chunks (a slow consumer pins no pages): the next chunk seeks the
        change logs where the last one stopped and carries over the rest of
        the changed run it was in (every logged change that starts before
        that point ends within that run). A diff between two snapshots comes
        out exactly as in one transaction; a diff to the live blob is each
        chunk as of its own moment (a change logged meanwhile behind the
        point reached is not listed)."""
        if chunk is None:
            with self.meta.read() as txn:
                yield from self._diff_walk(txn, name, base, target, offset, length, None, [0])
            return
        end = None if length is None else offset + length
        pos, carry = offset, None
        while True:
            reached = [0]
            with self.meta.read() as txn:
                walk = self._diff_walk(txn, name, base, target, pos, None if end is None else end - pos, carry,
                                       reached)
                batch = list(itertools.islice(walk, chunk))
                walk.close()
            yield from batch
            if len(batch) < chunk:
                return
            pos, carry = batch[-1][0] + batch[-1][1], reached[0]

    def _diff_walk(self, txn: lmdb.Transaction, name: str, base: str, target: str | None, offset: int,
                   length: int | None, carry: int | None, reached: list[int]
                   ) -> Generator[tuple[int, int, bool], None, None]:
        """iter_diff in `txn`. `carry` None: the change logs are read from
        their start (a changed run may begin before `offset`); else they are
        sought at `offset` and pages [offset, carry) are changed too (the rest
        of the run the last chunk was in). reached[0]: the end page of the
        changed run being listed."""
        blob_id, _, st = self._blob(txn, name)
        k, m, last = self._diff_epochs(txn, name, blob_id, st, base, target)
        size = st.size if target is None else self._snapshot_size(txn, blob_id, target, st)
        end = size if length is None else min(offset + length, size)
        lo, hi = offset // PAGE, min(size // PAGE, -(-end // PAGE))
        logs = [self._change_log(txn, blob_id, epoch, 0 if carry is None else lo) for epoch in range(k + 1, last + 1)]
        if carry is not None and carry > lo:
            logs.append(iter([(lo, carry)]))
        for cs, ce in rg.merge_sorted(heapq.merge(*logs)):
            reached[0] = ce
            cs, ce = max(cs, lo), min(ce, hi)
            if cs >= hi:
                return
            if cs >= ce:
                continue
            pos = cs
            for ws, we in self._runs(txn, blob_id, m, cs, ce):
                if ws > pos:
                    yield pos * PAGE, (ws - pos) * PAGE, True
                yield ws * PAGE, (we - ws) * PAGE, False
                pos = we
            if pos < ce:
                yield pos * PAGE, (ce - pos) * PAGE, True

    def _change_log(self, txn: lmdb.Transaction, blob_id: int, epoch: int, start: int = 0
                    ) -> Iterator[tuple[int, int]]:
        """(start, end) pages of the changes logged in `epoch`, by start, from
        the first that starts at or after page `start`."""
        cur = txn.cursor(db=self.db["changes"])
        if not cur.set_range(BLOB_EPOCH_PAGE.pack(blob_id, epoch, start)):
            return
        for key, raw in cur:
            b, e, page = BLOB_EPOCH_PAGE.unpack(bytes(key))
            if b != blob_id or e != epoch:
                return
            yield page, rg.END.unpack(bytes(raw))[0]

    def _diff_epochs(self, txn: lmdb.Transaction, name: str, blob_id: int, st: BlobState, base: str,
                     target: str | None) -> tuple[int, int | None, int]:
        """A diff's base epoch, target epoch (None: live) and last epoch."""
        try:
            k = self._snapshot_epoch(txn, blob_id, name, base)
        except SnapshotNotFound:
            raise PreviousSnapshotNotFound(f"blob {name!r} has no snapshot {base} to diff from") from None
        m = self._snapshot_epoch(txn, blob_id, name, target)
        last = st.epoch if m is None else m
        assert k is not None
        if last < k:
            raise PreviousSnapshotCannotBeNewer(f"the base snapshot {base} is newer than {target}")
        return k, m, last

    def _diff_in(self, txn: lmdb.Transaction, name: str, blob_id: int, st: BlobState, base: str,
                 target: str | None) -> Diff:
        k, m, last = self._diff_epochs(txn, name, blob_id, st, base, target)
        changed: list[tuple[int, int]] = []
        cur = txn.cursor(db=self.db["changes"])
        start = BLOB_EPOCH.pack(blob_id, k + 1)
        if cur.set_range(start):
            for key, raw in cur:
                key = bytes(key)
                b, epoch, page = BLOB_EPOCH_PAGE.unpack(key)
                if b != blob_id or epoch > last:
                    break
                changed.append((page, rg.END.unpack(bytes(raw))[0]))
        changed = rg.merge_ranges(changed)
        size = st.size if target is None else self._snapshot_size(txn, blob_id, target, st)
        pages = size // PAGE
        changed = [(s, min(e, pages)) for s, e in changed if s < pages]
        written: list[tuple[int, int]] = []
        for s, e in changed:
            written += [(p.start, p.end) for p in self._resolve(txn, blob_id, m, s, e)]
        written = rg.merge_ranges(written)
        cleared = rg.subtract(changed, written)
        return Diff(_bytes(written), _bytes(cleared))
