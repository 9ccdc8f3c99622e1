"""Space reclamation: delete dead extents, compact partly dead ones (one round).

Record bytes are dead when no index piece (live, or frozen for a snapshot)
points at them: overwritten or cleared data no snapshot can see, deleted
blobs, deleted snapshots. Only sealed extents are touched (open ones are
still being appended to, possibly by another process). No index scan runs
inside a write transaction: scans use read transactions, which hold no
writer back, and every write transaction of a round is small (bounded by
COMPACT_BATCH pieces or by the extents it names).

  1. census: count, per sealed extent, the bytes its pieces reference (one
     read transaction);
  2. compact the extents `choose` names: each piece's bytes are appended
     anew (3 replicas, as any write) and the pieces are switched to them in
     batches with a compare-and-swap, so a concurrent overwrite wins and
     nothing it wrote is lost; a piece whose extent another round (any
     process) compacted and deleted since the census is left to it;
  3. doom the extents that now look unreferenced: one write transaction
     moves their records from `extents` to `dying`. From then on no new
     pointer to them can be committed: a write whose record went to a
     dying extent (appended just before it was sealed) finds it missing
     from `extents` in its own index transaction and appends again;
     compaction only points at open extents; copies and snapshot moves only
     copy pointers that already exist. Readers still find a dying extent;
  4. verify: one read transaction begun after the doom scans the index. An
     extent it finds no pointer to can never be pointed at again (by the
     rule above, any later pointer would copy one it would have seen);
  5. finish: one write transaction deletes the `dying` records of the
     unreferenced extents and puts the others back in `extents`; then
     their replica files are deleted (after the commit: a crash in between
     leaves orphan files, which scrub removes). The transaction bumps the
     GONE counter, by which every other process sharing the stamp lets go of
     its descriptors of those files (stream.release_gone), so their space
     is freed, not only in this process.
A round killed after step 3 leaves `dying` records: the next round (in any
process), or `stamp repair` (which re-replicates only extents in `extents`),
verifies and finishes them, and two rounds finishing one extent at
once agree (each verified after its doom). Readers that resolved a piece
just before it moved re-resolve (pageblob). On a full disk compaction cannot
append and is skipped; deleting dead extents goes on (its transactions may
use the metadata's spare blocks).
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lmdb

from . import record as rec
from .errors import CorruptStamp, DataLost, MetadataFull, NotEnoughNodes
from .meta import PIECE, U64, loads
from .node import NodeState
from .pageblob import PAGE, Piece
from .stamp import Stamp
from .stream import Extent

COMPACT_BATCH = 64  # pieces switched per write transaction (well under a millisecond on an idle core)

Ref = tuple[str, bytes, bytes]  # (table, key, piece bytes)


@dataclass
class GcReport:
    extents_deleted: int = 0
    extents_compacted: int = 0
    bytes_freed: int = 0
    bytes_moved: int = 0
    longest_txn_ms: float = 0.0  # the longest write transaction of the round: what a writer may wait
    # that transaction's parts: its changes (body) and its commit; and the longest wait for the write lock
    # (what a writer holding it made the round wait: not time the round held anyone)
    longest_body_ms: float = 0.0
    longest_commit_ms: float = 0.0
    longest_lock_wait_ms: float = 0.0
    # and what its thread met meanwhile: page faults that read the disk, times it was preempted (the
    # machine's other work), times it blocked (a lock, the GIL, I/O)
    longest_major_faults: int = 0
    longest_preempted: int = 0
    longest_blocked: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add(self, other: GcReport) -> None:
        self.extents_deleted += other.extents_deleted
        self.extents_compacted += other.extents_compacted
        self.bytes_freed += other.bytes_freed
        self.bytes_moved += other.bytes_moved
        if other.longest_txn_ms > self.longest_txn_ms:
            for k in ("longest_txn_ms", "longest_body_ms", "longest_commit_ms", "longest_major_faults",
                      "longest_preempted", "longest_blocked"):
                setattr(self, k, getattr(other, k))
        self.longest_lock_wait_ms = max(self.longest_lock_wait_ms, other.longest_lock_wait_ms)
        self.skipped += other.skipped


class _Timed:
    """A write transaction of a round, timed into its report: the wait for
    the write lock, the changes, the commit."""

    def __init__(self, stamp: Stamp, report: GcReport | None) -> None:
        self.stamp, self.report = stamp, report

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        asked = time.perf_counter()
        with self.stamp.meta.write() as txn:
            began = time.perf_counter()
            before = _thread_usage()
            yield txn
            body_end = time.perf_counter()
        ended = time.perf_counter()
        after = _thread_usage()
        r = self.report
        if r is not None:
            ms = (ended - began) * 1000
            r.longest_lock_wait_ms = max(r.longest_lock_wait_ms, round((began - asked) * 1000, 3))
            if ms > r.longest_txn_ms:
                r.longest_txn_ms = round(ms, 3)
                r.longest_body_ms = round((body_end - began) * 1000, 3)
                r.longest_commit_ms = round((ended - body_end) * 1000, 3)
                r.longest_major_faults, r.longest_preempted, r.longest_blocked = (
                    a - b for a, b in zip(after, before, strict=True))


def _thread_usage() -> tuple[int, int, int]:
    """This thread's major page faults, involuntary and voluntary context switches so far."""
    u = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return u.ru_majflt, u.ru_nivcsw, u.ru_nvcsw


@dataclass(frozen=True)
class ExtentUse:
    """An extent's size (record bytes, file header excluded) and the bytes pieces reference in it."""

    id: int
    size: int
    live: int
    sealed: bool = True

    @property
    def ratio(self) -> float:
        return self.live / self.size if self.size > 0 else 0.0


def references(stamp: Stamp) -> dict[int, list[Ref]]:
    """extent id -> [(table, key, piece bytes)] for every piece in the index
    (one read transaction: writers go on)."""
    refs: dict[int, list[Ref]] = defaultdict(list)
    with stamp.meta.read() as txn:
        for table in ("pages", "frozen"):
            for key, raw in stamp.meta.items(txn, table):
                refs[PIECE.unpack(raw)[1]].append((table, key, raw))
    return refs


def census(stamp: Stamp, refs: dict[int, list[Ref]]) -> list[ExtentUse]:
    """The use of every extent (open ones too: their length is their owner's last sealed view)."""
    return [ExtentUse(e.id, e.length - rec.FILE_HEADER, _live(refs.get(e.id, [])), e.state == "sealed")
            for e in stamp.stream.all_extents()]


def below(compact_below: float) -> Callable[[list[ExtentUse]], list[int]]:
    """The plain policy of `stamp gc`: compact every partly dead sealed extent
    whose live share is below `compact_below`."""
    return lambda uses: [u.id for u in uses if u.sealed and 0 < u.live and u.ratio < compact_below]


def collect(stamp: Stamp, compact_below: float = 0.5,
            choose: Callable[[list[ExtentUse]], list[int]] | None = None) -> GcReport:
    """One round: delete every dead sealed extent and compact those `choose`
    names, given every extent's use (default: sealed ones whose live share is
    below `compact_below`)."""
    report = GcReport()
    refs = references(stamp)
    uses = census(stamp, refs)
    dead = [u.id for u in uses if u.sealed and u.live == 0]
    sealed = {u.id for u in uses if u.sealed}
    for extent_id in (choose or below(compact_below))(uses):
        if extent_id not in sealed:
            raise ValueError(f"extent {extent_id} is not sealed: only sealed extents are compacted")
        try:
            report.bytes_moved += _compact(stamp, refs.get(extent_id, []), report)
        except (NotEnoughNodes, MetadataFull) as err:  # a full disk: deleting goes on, moving waits
            report.skipped.append(f"compaction stopped at extent {extent_id} ({err})")
            break
        report.extents_compacted += 1
        dead.append(extent_id)  # moved, unless something raced: the verify scan says
    sizes = {u.id: u.size + rec.FILE_HEADER for u in uses}
    for extent_id, deleted in _delete_unreferenced(stamp, dead, report).items():
        if deleted:
            report.extents_deleted += 1
            report.bytes_freed += sizes.get(extent_id, 0)
        elif extent_id in sizes:
            report.skipped.append(f"extent {extent_id}: still referenced (a write or a copy raced)")
    stamp.stream.release_gone()  # files other rounds (other processes) deleted, and those compaction read
    return report


def _live(pieces: Iterable[Ref]) -> int:
    return sum((PIECE.unpack(raw)[0] - _start(key)) * PAGE for _, key, raw in pieces)


def _start(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def _compact(stamp: Stamp, pieces: list[Ref], report: GcReport | None = None) -> int:
    """Copy each piece's bytes to the open extent, then switch the pieces to
    the copies, COMPACT_BATCH at a time (a short transaction each)."""
    moved = 0
    updates = []
    for table, key, raw in pieces:
        p = Piece.unpack(_start(key), raw)
        n = (p.end - p.start) * PAGE
        try:
            data = stamp.stream.read(p.extent, p.rec_off, p.rec_len, p.inner, n)
        except (CorruptStamp, DataLost):
            if _moved(stamp, table, key, raw):
                continue  # another round (any process) moved it and deleted its extent: nothing to copy
            raise
        loc = stamp.stream.append(data)  # on 3 replicas before any pointer moves
        new = Piece(p.start, p.end, loc.extent, loc.offset, loc.length, 0, p.gen)
        updates.append((table, key, raw, new.pack(), loc.extent))
        moved += n
    for i in range(0, len(updates), COMPACT_BATCH):
        with _Timed(stamp, report).write() as txn:
            for table, key, old, new_raw, extent in updates[i:i + COMPACT_BATCH]:
                if txn.get(U64.pack(extent), db=stamp.meta.db["extents"]) is None:
                    continue  # another gc deleted the copy's extent: the piece stays where it was
                if txn.get(key, db=stamp.meta.db[table]) == old:  # compare-and-swap
                    txn.put(key, new_raw, db=stamp.meta.db[table])
    return moved


def finish_dying(stamp: Stamp) -> dict[int, bool]:
    """Finish what rounds killed after their doom left in `dying` (verify,
    then delete or put back): `stamp repair` does it first, so an extent put
    back is re-replicated with the others. Returns {id: deleted}."""
    return _delete_unreferenced(stamp, [])


def _moved(stamp: Stamp, table: str, key: bytes, raw: bytes) -> bool:
    """Is the piece at `key` no longer `raw` (moved, overwritten or gone)?"""
    with stamp.meta.read() as txn:
        return txn.get(key, db=stamp.meta.db[table]) != raw


def _delete_if_unreferenced(stamp: Stamp, extent_id: int) -> bool:
    return _delete_unreferenced(stamp, [extent_id]).get(extent_id, False)


def _delete_unreferenced(stamp: Stamp, ids: list[int], report: GcReport | None = None) -> dict[int, bool]:
    """Delete those of the sealed extents `ids` (and of any left dying by a
    killed round) that no piece points at: doom, verify, finish (the header's
    steps 3 to 5). Returns {id: deleted} for every extent it looked at."""
    doomed = _doom(stamp, ids, report)
    if not doomed:
        return {}
    referenced = _referenced(stamp, set(doomed))
    gone = _finish(stamp, doomed, referenced, report)
    for e in gone:
        for n in e.nodes:
            node = stamp.stream.nodes.get(n)
            if node is not None and node.state is not NodeState.LOST:
                node.drop(e.id)
        stamp.stream.forget_extent(e.id)
    return {extent_id: extent_id not in referenced for extent_id in doomed}


def _doom(stamp: Stamp, ids: list[int], report: GcReport | None = None) -> list[int]:
    """Move the sealed extents `ids` from `extents` to `dying` (one short
    write transaction); returns them with those already dying."""
    extents, dying = stamp.meta.db["extents"], stamp.meta.db["dying"]
    out = []
    with _Timed(stamp, report).write() as txn:
        for extent_id in ids:
            key = U64.pack(extent_id)
            raw = txn.get(key, db=extents)
            if raw is None or loads(bytes(raw))["state"] != "sealed":
                continue  # another gc deleted it
            txn.put(key, raw, db=dying)
            txn.delete(key, db=extents)
        out = [U64.unpack(k)[0] for k, _ in stamp.meta.items(txn, "dying")]
    return out


def _referenced(stamp: Stamp, wanted: set[int]) -> set[int]:
    """Those of `wanted` some piece points at (a read transaction)."""
    found: set[int] = set()
    with stamp.meta.read() as txn:
        for table in ("pages", "frozen"):
            for _, raw in stamp.meta.items(txn, table):
                extent_id = PIECE.unpack(raw)[1]
                if extent_id in wanted:
                    found.add(extent_id)
    return found


def _finish(stamp: Stamp, doomed: list[int], referenced: set[int], report: GcReport | None = None) -> list[Extent]:
    """Delete the dying records of unreferenced extents, restore the others
    (one short write transaction); returns the deleted extents."""
    extents, dying = stamp.meta.db["extents"], stamp.meta.db["dying"]
    gone = []
    with _Timed(stamp, report).write() as txn:
        for extent_id in doomed:
            key = U64.pack(extent_id)
            raw = txn.get(key, db=dying)
            if raw is None:
                continue  # another round finished it
            if extent_id in referenced:
                txn.put(key, raw, db=extents)
            else:
                gone.append(Extent.from_json(extent_id, loads(bytes(raw))))
            txn.delete(key, db=dying)
        if gone:
            stamp.stream.mark_gone(txn)  # other processes let go of their files (stream's header)
    return gone
