"""Writer backpressure: a writer faster than the reclaimer waits for it.

Extents are never rewritten in place, so a writer that overwrites faster
than the reclaimer (stamp.reclaim) compacts would take the stamp's disk use
up without limit. A reclaimer (in any process) publishes what its last
census found in STAMP/reclaim.state; every writer of page data
(PageBlobs.write) looks at it every CHECK_BYTES it appends (less often while
far under the limit: a quarter of the room left) and, while the
extents hold more than the published ceiling, waits in small steps for the
reclaimer's rounds to bring them back under.

The record (one pwrite of RECORD.size bytes at offset 0, its last 8 bytes an
xxh3-64 of the rest): magic, the reclaimer's pid, its process start time
and token (which Reclaimer in that process), the live bytes of its last
census, the ceiling (x live) and slack (bytes) of its policy, its count of
rounds that freed or moved something (progress), and the extent bytes
when its last round did nothing (futile_at; 0 if it did something).

Rules (pure: `pressed` takes plain values):
- a writer waits only while extent bytes > ceiling x live + slack, a live
  reclaimer published the record (its process alive and, in this process,
  the Reclaimer not stopped: a stopped or killed one holds nobody), and the
  extents grew since its last round that did nothing (a reclaimer with
  nothing it may reclaim must not hold writers: they go on; once the
  extents grow, it runs again, as its `due` says);
- the ceiling is at least 1 / compact_below (Policy checks it): over it,
  some sealed extent is below compact_below on average, so a round has
  something to compact;
- a wait is bounded: a writer waits in steps of STEP seconds and gives up
  after PATIENCE seconds in which the reclaimer made no progress (a stuck
  or starved reclaimer holds a writer PATIENCE at most per check);
- the state lives in the stamp's folder and its extents table, so writers
  and reclaimers in different processes (`hostcache serve --workers N`,
  `stamp gc --watch` beside other writers) see each other;
- readers never wait, and neither do the reclaimer's own appends
  (compaction appends to the stream directly): a reclaimer never waits
  for itself;
- a writer in an event loop (hostcache serve) waits by coroutine
  (admit_async, then the write inside prepaid()), so the loop's readers
  and other disks go on while it is held; a held write holds the loop's
  later writes with it (they would be held too);
- a damaged or torn record reads as "no reclaimer": writers go on.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from vhd.process import own_start, pid_alive

if TYPE_CHECKING:
    from .stream import StreamLayer

STATE_FILE = "reclaim.state"
MAGIC = b"DSRECL01"
# magic, pid, process start, token (16 bytes), live bytes, slack bytes, ceiling, progress, futile_at
_BODY = struct.Struct("<8sIQ16sQQdQQ")
_CHECK = struct.Struct("<Q")
RECORD_SIZE = _BODY.size + _CHECK.size
CHECK_BYTES = 16 << 20  # a writer looks at the record every this many bytes it appends (at most)
STEP = 0.005  # seconds per wait step
PATIENCE = 5.0  # seconds a writer waits with no progress from the reclaimer, at most

_LIVE_RECLAIMERS: set[bytes] = set()  # tokens of the Reclaimers running in this process


@dataclass(frozen=True)
class Published:
    """What a reclaimer said in its last record."""

    pid: int
    started: int
    token: bytes
    live: int
    slack: int
    ceiling: float
    progress: int
    futile_at: int

    def pack(self) -> bytes:
        body = _BODY.pack(MAGIC, self.pid, self.started, self.token, self.live, self.slack, self.ceiling,
                          self.progress, self.futile_at)
        return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes) -> Published | None:
        """The record, or None if there is none (no file, stopped) or it is not intact."""
        if len(raw) < RECORD_SIZE:
            return None
        body = raw[:_BODY.size]
        if _CHECK.unpack_from(raw, _BODY.size)[0] != xxhash.xxh3_64_intdigest(body):
            return None
        magic, pid, started, token, live, slack, ceiling, progress, futile_at = _BODY.unpack(body)
        if magic != MAGIC or pid == 0:
            return None
        return cls(pid, started, token, live, slack, ceiling, progress, futile_at)

    def limit(self) -> float:
        """Extent bytes above which writers wait."""
        return self.ceiling * self.live + self.slack


def pressed(extent_bytes: int, published: Published | None, alive: bool) -> bool:
    """Must a writer wait? Only for a live reclaimer that can still reclaim
    something, while the extents hold more than its ceiling."""
    if published is None or not alive or extent_bytes <= published.futile_at:
        return False
    return extent_bytes > published.limit()


def alive(p: Published) -> bool:
    """Is the reclaimer that wrote `p` still running?"""
    if p.pid == os.getpid():
        return p.token in _LIVE_RECLAIMERS
    return pid_alive(p.pid, p.started)


def _open(root: str) -> int:
    return os.open(os.path.join(root, STATE_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _run(checks: Generator[float, None, int], sleep: Callable[[float], None]) -> int:
    """Run a check to its end, sleeping each step it yields; its result."""
    try:
        while True:
            sleep(next(checks))
    except StopIteration as done:
        return int(done.value)


class Publisher:
    """A reclaimer's side: registers, publishes after each census and round, withdraws."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.token = os.urandom(16)
        self.started = own_start()
        self._fd = -1

    def publish(self, live: int, ceiling: float, slack: int, progress: int, futile_at: int) -> None:
        _LIVE_RECLAIMERS.add(self.token)
        if self._fd < 0:
            self._fd = _open(self.root)
        raw = Published(os.getpid(), self.started, self.token, live, slack, ceiling, progress, futile_at).pack()
        try:
            os.pwrite(self._fd, raw, 0)
        except OSError:
            pass  # a full disk (the file's first block): writers see no reclaimer and go on

    def withdraw(self) -> None:
        """This reclaimer stops: writers no longer wait for it (the record is
        cleared if it is still this one's; another reclaimer's is left)."""
        _LIVE_RECLAIMERS.discard(self.token)
        if self._fd < 0:
            return
        try:
            current = Published.unpack(os.pread(self._fd, RECORD_SIZE, 0))
            if current is not None and current.token == self.token:
                os.pwrite(self._fd, bytes(RECORD_SIZE), 0)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


@dataclass
class GateStats:
    checks: int = 0
    waits: int = 0  # checks that waited
    waited: float = 0.0  # seconds, in all
    longest: float = 0.0  # seconds, the longest wait
    gave_up: int = 0  # waits ended by PATIENCE with the extents still over the ceiling

    def to_json(self) -> dict[str, float | int]:
        return dict(self.__dict__)


class Gate:
    """A writer's side: `admit(n)` before appending n bytes of page data; in
    an event loop, `await admit_async()` first, then the write inside
    `prepaid()`: a held write then waits without holding up the loop's other
    work (reads, other disks), where admit() would sleep the whole thread."""

    def __init__(self, stream: StreamLayer, every: int | None = None, step: float = STEP,
                 patience: float = PATIENCE, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.stream = stream
        self.every = every if every is not None else min(CHECK_BYTES, max(stream.extent_size // 4, 1))
        self.step, self.patience, self.clock, self.sleep = step, patience, clock, sleep
        self.stats = GateStats()
        self.on_wait: Callable[[], None] | None = None  # a test hook: called at each wait step
        self._due = 0  # bytes until the next check
        self._fd = -1
        self._lock = threading.Lock()  # one check at a time; the others wait with it
        self._checking = False  # an admit_async's check is under way (its loop's other admits wait for it)
        self._prepaid = threading.local()  # .depth: inside prepaid() on this thread

    def admit(self, n: int) -> None:
        """Return when `n` more bytes may be appended (at once, nearly always).
        Inside prepaid() the bytes are counted but a check falls due instead
        of running: the next admit_async runs it."""
        self._due -= n
        if self._due > 0 or getattr(self._prepaid, "depth", 0) > 0:
            return
        with self._lock:
            if self._due <= 0:
                self._due = max(self.every, _run(self._check(), self.sleep) // 4)

    async def admit_async(self) -> None:
        """For a coroutine of an event loop, before a write it then makes
        inside prepaid() (no await in between): runs the check that fell due
        (the bytes written so far counted, as admit() counts them), its
        waits in asyncio.sleep."""
        while self._checking:  # another write of this loop is held: this one waits with it
            await asyncio.sleep(self.step)
        if self._due > 0:
            return
        self._checking = True
        try:
            checks = self._check()
            try:
                while True:
                    await asyncio.sleep(next(checks))
            except StopIteration as done:
                self._due = max(self.every, done.value // 4)
        finally:
            self._checking = False

    @contextmanager
    def prepaid(self) -> Iterator[None]:
        """admit() on this thread counts the bytes but never waits inside (admit_async does)."""
        self._prepaid.depth = getattr(self._prepaid, "depth", 0) + 1
        try:
            yield
        finally:
            self._prepaid.depth -= 1

    def published(self) -> Published | None:
        if self._fd < 0:
            path = os.path.join(self.stream.root, STATE_FILE)
            if not os.path.exists(path):
                return None  # no reclaimer ever ran here: nothing to wait for
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return Published.unpack(os.pread(self._fd, RECORD_SIZE, 0))
        except OSError:
            return None

    def _check(self) -> Generator[float, None, int]:
        """Wait while pressed (yields each step to sleep: the caller sleeps, by
        thread or by coroutine); returns the room left under the limit (bytes): far
        under it, the next check comes later (a quarter of the room, so that
        up to four writing processes together cannot pass the limit by more
        than `every` each before they look again), and the extents table, read
        at each check, is read less often on a large stamp."""
        self.stats.checks += 1
        p = self.published()
        if p is None or not alive(p):
            return 0
        total = self.stream.extent_bytes()
        if not pressed(total, p, True):
            return max(int(p.limit()) - total, 0)
        began = self.clock()
        progress, since = p.progress, began
        while True:
            if self.on_wait is not None:
                self.on_wait()
            yield self.step
            p = self.published()
            if p is None or not pressed(self.stream.extent_bytes(), p, alive(p)):
                break
            now = self.clock()
            if p.progress != progress:
                progress, since = p.progress, now
            elif now - since >= self.patience:
                self.stats.gave_up += 1
                break
        took = self.clock() - began
        self.stats.waits += 1
        self.stats.waited += took
        self.stats.longest = max(self.stats.longest, took)
        return 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
