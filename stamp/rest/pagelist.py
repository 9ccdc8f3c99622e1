"""Get Page Ranges answers, streamed: the ranges come from a lazy source (the
stamp's iter_page_ranges or iter_diff, from the marker on) and go out in
pieces of CHUNK ranges, so one answer holds a piece, not the blob's ranges.

Rules: with `maxresults` the answer stops after that many ranges and the
next range's offset is its NextMarker; without it the service answers every
range, and so does this, streamed (chunked transfer encoding). The first
piece is taken before the status line is sent, so an error in opening the
blob is a normal error answer; a stamp error after the answer began drops
the connection (a short body, never a wrong one). Each piece is held only
while the endpoint's byte budget allows, and the source is closed on a pool
thread when the answer ends, whole or not.

A source reads the stamp in short reads (`short_reads` for page listings,
PageBlobs.iter_diff with `chunk` for diffs): CHUNK ranges from one short
LMDB read transaction, the next CHUNK from another that resumes at the end
of the last range taken. Nothing is held between pieces, so a client that
reads slowly pins no metadata pages (writers keep reusing freed ones) and
no reader slot. What that guarantees: a snapshot's listing, and a diff
between two snapshots, never change, so the answer is exactly theirs; a
live blob's (and a diff to the live blob) is each piece as of the moment it
was read, in order, its ranges never overlapping (a write landing between
two pieces may show in the later one, never in an earlier one; two
touching ranges may then be listed apart).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

from aiohttp import web

from .. import ranges as rg
from ..errors import StampError
from . import xmlbody
from .call import Service

log = logging.getLogger("stamp.rest")
Entry = tuple[int, int, bool]  # offset, length, cleared
Source = Generator[Entry, None, None]
CHUNK = 4096  # ranges per piece of an answer
T = TypeVar("T")
ENTRY_BYTES = 96  # an upper bound on one range's XML (two 20-digit numbers and the ClearRange tags)


def short_reads(open_at: Callable[[int], Iterator[T]], start: int) -> Iterator[T]:
    """The ranges of open_at(start), CHUNK at a time, each chunk from its own
    iterator (its own read transaction) opened where the last one stopped."""
    return rg.resumed(open_at, start, CHUNK)


def _take(source: Iterator[Entry], n: int) -> list[Entry]:
    return list(itertools.islice(source, n))


def _open(open_source: Callable[[], Source], n: int) -> tuple[Source, list[Entry]]:
    """Open the source and take its first piece: one hop to the pool."""
    source = open_source()
    return source, _take(source, n)


def aligned(lo: int, hi: int) -> tuple[int, int]:
    """The byte window [lo, hi) widened to whole pages, as (offset, length)."""
    lo -= lo % 512
    hi = -(-hi // 512) * 512
    return lo, max(0, hi - lo)


async def answer(svc: Service, request: web.Request, open_source: Callable[[], Source],
                 limit: int | None, headers: dict[str, str]) -> web.StreamResponse:
    """Stream the page list of `open_source()` (run on the pool), at most
    `limit` ranges and the NextMarker after them."""
    source: Source | None = None
    resp: web.StreamResponse | None = None
    exhausted = False
    try:
        sent, next_marker = 0, None
        while True:
            want = CHUNK if limit is None else min(CHUNK, limit - sent + 1)  # + 1: the next marker's range
            await svc.budget.take(want * ENTRY_BYTES)
            try:
                if source is None:  # an error here (no such blob or snapshot) is the answer
                    source, batch = await svc.run(_open, open_source, want)
                else:
                    batch = await _next(svc, source, want)
                exhausted = done = len(batch) < want
                if limit is not None and sent + len(batch) > limit:
                    next_marker, batch, done = str(batch[limit - sent][0]), batch[:limit - sent], True
                if resp is None:
                    resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": "application/xml"})
                    await resp.prepare(request)
                    await svc.send(resp, xmlbody.page_list_head())
                await svc.send(resp, xmlbody.page_entries(batch))
                sent += len(batch)
            finally:
                await svc.budget.give(want * ENTRY_BYTES)
            if done:
                break
        await svc.send(resp, xmlbody.page_list_tail(next_marker))
        await resp.write_eof()
        return resp
    finally:
        if source is not None and not exhausted:
            await svc.run(source.close)  # on the pool: a source that holds a transaction ends it there


async def _next(svc: Service, source: Source, n: int) -> list[Entry]:
    """The next piece; the answer has begun, so a stamp error drops the connection."""
    try:
        return await svc.run(_take, source, n)
    except StampError as e:
        log.warning("a page list failed after its answer began: %s; the connection is dropped", e)
        raise ConnectionResetError(str(e)) from None
