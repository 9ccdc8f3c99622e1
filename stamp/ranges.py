"""Range tables in LMDB: non-overlapping [start, end) page ranges under a key
prefix, found by cursor. Pure of policy: pageblob decides what ranges mean.

A key is prefix + u64 big-endian start page; the value starts with the u64
(little-endian) end page. Invariant: ranges under one prefix never overlap.
`resumed` reads a lazy listing in chunks, each from its own iterator (its
own read transaction), so nothing is held between chunks.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

import lmdb

U64 = struct.Struct(">Q")
END = struct.Struct("<Q")
T = TypeVar("T")


def overlapping(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes, start: int, end: int,
                touching: bool = False) -> list[tuple[int, int, bytes]]:
    """(start, end, value) of every range under `prefix` overlapping [start, end)
    (or also adjacent to it, with touching=True), in order. One cursor seek:
    the range before `start` may reach into it, so the walk starts there."""
    out: list[tuple[int, int, bytes]] = []
    plen = len(prefix)
    lo = start - 1 if touching else start
    hi = end + 1 if touching else end
    cur = txn.cursor(db=db)
    if cur.set_range(prefix + U64.pack(start)):
        cur.prev()  # the range before start, if any (the walk skips it if it ends too soon)
    elif not cur.last():
        return out
    unpack_start, unpack_end = U64.unpack_from, END.unpack_from
    items = cast(Iterator[tuple[bytes, bytes]], cur)  # bytes: no transaction is begun with buffers=True
    for k, v in items:
        if not k.startswith(prefix):
            if k[:plen] < prefix:
                continue  # the entry before our prefix: step past it
            break
        s = unpack_start(k, plen)[0]
        if s >= hi:
            break
        e = unpack_end(v)[0]
        if e > lo:
            out.append((s, e, v))
    return out


def walk(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes, start: int, end: int
         ) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, value) of the ranges under `prefix` overlapping [start,
    end), start and end cut to it, in order, one at a time (overlapping's
    lazy form: a walk over millions of ranges holds one)."""
    cur = txn.cursor(db=db)
    if cur.set_range(prefix + U64.pack(start)):
        cur.prev()  # the range before start may reach into it
    elif not cur.last():
        return
    plen = len(prefix)
    for raw_key, raw_value in cur:
        k = bytes(raw_key)
        if k[:plen] != prefix:
            if k[:plen] < prefix:
                continue
            return
        s = U64.unpack_from(k, plen)[0]
        if s >= end:
            return
        v = bytes(raw_value)
        e = END.unpack_from(v)[0]
        if e > start:
            yield max(s, start), min(e, end), v


def merge_sorted(ranges: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """merge_ranges of ranges sorted by start, lazily."""
    s0 = e0 = None
    for s, e in ranges:
        if e0 is not None and s <= e0:
            e0 = max(e0, e)
            continue
        if s0 is not None and e0 is not None:
            yield s0, e0
        s0, e0 = s, e
    if s0 is not None and e0 is not None:
        yield s0, e0


def all_ranges(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    plen = len(prefix)
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return out
    for raw_key, raw_value in cur:
        k = bytes(raw_key)
        if k[:plen] != prefix:
            break
        v = bytes(raw_value)
        out.append((U64.unpack(k[plen:])[0], END.unpack_from(v)[0], v))
    return out


def delete_prefix(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes) -> int:
    cur = txn.cursor(db=db)
    n = 0
    if not cur.set_range(prefix):
        return 0
    while bytes(cur.key()).startswith(prefix):
        cur.delete()
        n += 1
        if not cur.key():
            break
    return n


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(ranges: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of sorted disjoint `ranges` not covered by sorted disjoint `taken`."""
    out = []
    j = 0
    for s, e in ranges:
        pos = s
        while j < len(taken) and taken[j][1] <= pos:
            j += 1
        k = j
        while k < len(taken) and taken[k][0] < e:
            if taken[k][0] > pos:
                out.append((pos, taken[k][0]))
            pos = max(pos, taken[k][1])
            k += 1
        if pos < e:
            out.append((pos, e))
    return out


def resumed(open_at: Callable[[int], Iterator[T]], start: int, chunk: int) -> Iterator[T]:
    """The items of open_at(start) (each an (offset, length, ...) tuple, in
    offset order), read `chunk` at a time: each chunk from its own iterator,
    opened at the end of the last item taken and closed before the chunk is
    handed out. A lazy listing that holds an LMDB read transaction while it
    runs holds it for one chunk, so a consumer that pauses between items
    (a client reading slowly) pins no pages and no reader slot meanwhile."""
    pos = start
    while True:
        it = open_at(pos)
        try:
            batch = list(itertools.islice(it, chunk))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        yield from batch
        if len(batch) < chunk:
            return
        last = cast(tuple[int, int], batch[-1])
        pos = last[0] + last[1]
