"""Space reclamation: delete dead extents, compact partly dead ones.

Record bytes are dead when no index piece (live, or frozen for a snapshot)
points at them: overwritten or cleared data no snapshot can see, deleted
blobs, deleted snapshots. Only sealed extents are touched (open ones are
still being appended to, possibly by another process).

  1. count, per sealed extent, the bytes its pieces reference;
  2. an extent with none is deleted;
  3. an extent whose live share is below `compact_below` is compacted: each
     piece's bytes are appended anew (3 replicas, as any write) and the piece
     is switched to them with a compare-and-swap, so a concurrent overwrite
     wins and nothing it wrote is lost;
  4. an extent is deleted only when a scan inside a write transaction finds
     no piece pointing at it (the transaction keeps new pointers out); one
     scan serves every extent gc deletes, since a scan of a large index
     holds every writer back while it runs. A
     write whose record was appended just before its extent was sealed finds
     the extent gone in its own index transaction and appends again; a
     compaction whose copy another gc deleted leaves that piece where it was.
Readers that resolved a piece just before it moved re-resolve (pageblob).
On a full disk compaction cannot append and is skipped; deleting dead
extents goes on (its transactions may use the metadata's spare blocks).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from . import record as rec
from .errors import MetadataFull, NotEnoughNodes
from .meta import PIECE, U64
from .node import NodeState
from .pageblob import PAGE, Piece
from .stamp import Stamp
from .stream import Extent


@dataclass
class GcReport:
    extents_deleted: int = 0
    extents_compacted: int = 0
    bytes_freed: int = 0
    bytes_moved: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def references(stamp: Stamp) -> dict[int, list[tuple[str, bytes, bytes]]]:
    """extent id -> [(table, key, piece bytes)] for every piece in the index."""
    refs: dict[int, list[tuple[str, bytes, bytes]]] = defaultdict(list)
    with stamp.meta.read() as txn:
        for table in ("pages", "frozen"):
            for key, raw in stamp.meta.items(txn, table):
                refs[PIECE.unpack(raw)[1]].append((table, key, raw))
    return refs


def collect(stamp: Stamp, compact_below: float = 0.5) -> GcReport:
    report = GcReport()
    refs = references(stamp)
    can_move = True
    dead: list[Extent] = []
    for e in stamp.stream.all_extents():
        if e.state != "sealed":
            continue
        size = e.length - rec.FILE_HEADER
        pieces = refs.get(e.id, [])
        live = sum((PIECE.unpack(raw)[0] - _start(key)) * PAGE for _, key, raw in pieces)
        if can_move and pieces and size > 0 and live / size < compact_below:
            try:
                report.bytes_moved += _compact(stamp, pieces)
            except (NotEnoughNodes, MetadataFull) as err:  # a full disk: deleting goes on, moving waits
                report.skipped.append(f"compaction stopped at extent {e.id} ({err})")
                can_move = False
                continue
            report.extents_compacted += 1
            pieces = []  # moved, unless something raced: the delete below rescans
        if not pieces:
            dead.append(e)
    deleted = set(_delete_unreferenced(stamp, [e.id for e in dead]))
    for e in dead:
        if e.id in deleted:
            report.extents_deleted += 1
            report.bytes_freed += e.length
        else:
            report.skipped.append(f"extent {e.id}: still referenced after compaction (a write raced)")
    return report


def _start(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def _compact(stamp: Stamp, pieces: list[tuple[str, bytes, bytes]]) -> int:
    moved = 0
    updates = []
    for table, key, raw in pieces:
        p = Piece.unpack(_start(key), raw)
        n = (p.end - p.start) * PAGE
        data = stamp.stream.read(p.extent, p.rec_off, p.rec_len, p.inner, n)
        loc = stamp.stream.append(data)  # on 3 replicas before any pointer moves
        new = Piece(p.start, p.end, loc.extent, loc.offset, loc.length, 0, p.gen)
        updates.append((table, key, raw, new.pack(), loc.extent))
        moved += n
    with stamp.meta.write() as txn:
        for table, key, old, new_raw, extent in updates:
            if txn.get(U64.pack(extent), db=stamp.meta.db["extents"]) is None:
                continue  # another gc deleted the copy's extent: the piece stays where it was
            if txn.get(key, db=stamp.meta.db[table]) == old:  # compare-and-swap
                txn.put(key, new_raw, db=stamp.meta.db[table])
    return moved


def _delete_if_unreferenced(stamp: Stamp, extent_id: int) -> bool:
    return bool(_delete_unreferenced(stamp, [extent_id]))


def _delete_unreferenced(stamp: Stamp, ids: list[int]) -> list[int]:
    """Delete those of the extents `ids` that no piece points at, found by one
    scan of the index and deleted in the same write transaction; then drop
    their replica files (on the nodes that transaction saw). Returns the
    deleted ids."""
    if not ids:
        return []
    wanted = set(ids)
    gone = []
    with stamp.meta.write() as txn:
        for table in ("pages", "frozen"):
            for _, raw in stamp.meta.items(txn, table):
                wanted.discard(PIECE.unpack(raw)[1])
                if not wanted:
                    return []
        for extent_id in sorted(wanted):
            obj = stamp.meta.get_json(txn, "extents", U64.pack(extent_id))
            if obj is not None:  # else another gc deleted it
                txn.delete(U64.pack(extent_id), db=stamp.meta.db["extents"])
                gone.append(Extent.from_json(extent_id, obj))
    for e in gone:
        for n in e.nodes:
            node = stamp.stream.nodes.get(n)
            if node is not None and node.state is not NodeState.LOST:
                node.drop(e.id)
        stamp.stream.forget_extent(e.id)
    return [e.id for e in gone]
