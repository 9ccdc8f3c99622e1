"""Overlapped I/O of a disk whose stamp is over the network.

Over the network each uncached I/O is an HTTP round trip; served one at a
time, a host reaches a fraction of what the stamp answers. A disk that can
take its I/Os concurrently (Overlapped: an AttachedDisk whose stamp is
remote, with caching None, over a fixed VHD, so neither the VHD nor the
cache holds state in the process) has its reads and writes run by a bounded
pool of threads (the host's: POOL_THREADS), each with its own keep-alive
connection (stamp.remote keeps one per thread), so a client's queue depth is
in flight at once.

Rules kept:
- I/Os that touch a common 512-byte page, one of them a write (or a
  discard), run in order of arrival: each waits for the earlier ones it
  conflicts with before it starts (a partial-page write is a read-modify-write
  of its page, so pages, not bytes, are what conflict); others overlap;
- an I/O waits only for I/Os that arrived before it, and the pool takes work
  in order of arrival, so the earliest waiting I/O always has a thread or
  its predecessors are done: no deadlock, whatever the pool's size;
- a write is acknowledged only once its data path returned (the stamp
  acknowledged it), so a FLUSH covers every write acknowledged before it;
- bounded: POOL_THREADS threads (and connections) per host, however many
  disks and clients; the I/Os waiting are the ones the NBD server admitted
  (its memory budget), and each is forgotten once done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

PAGE = 512
POOL_THREADS = 16  # requests in flight to the stamp at once, per host

T = TypeVar("T")
Job = concurrent.futures.Future


def pages(offset: int, length: int) -> tuple[int, int]:
    """The 512-byte pages [start, end) an I/O touches, as byte offsets."""
    return offset - offset % PAGE, -(-(offset + max(length, 1)) // PAGE) * PAGE


def conflict(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> bool:
    """Two I/Os (start, end, writes) that must not run at once: they share a page and one writes."""
    return (a[2] or b[2]) and a[0] < b[1] and b[0] < a[1]


class InFlight:
    """The I/Os of one disk under way, in order of arrival."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # entries leave from the pool's threads
        self._ios: dict[Job[object], tuple[int, int, bool]] = {}

    def __len__(self) -> int:
        return len(self._ios)

    def before(self, offset: int, length: int, write: bool) -> list[Job[object]]:
        """The I/Os under way an I/O arriving now must wait for."""
        me = (*pages(offset, length), write)
        with self._lock:
            return [job for job, io in self._ios.items() if conflict(me, io)]

    def add(self, job: Job[T], offset: int, length: int, write: bool) -> None:
        with self._lock:
            self._ios[job] = (*pages(offset, length), write)  # type: ignore[index]
        job.add_done_callback(self._done)

    def _done(self, job: Job[T]) -> None:
        with self._lock:
            self._ios.pop(job, None)  # type: ignore[arg-type]


def _after(before: list[Job[object]], fn: Callable[[], T]) -> T:
    """In a pool thread: wait for the earlier conflicting I/Os (failed or not), then do this one."""
    if before:
        concurrent.futures.wait(before)
    return fn()


class Overlapped:
    """A disk's I/Os through a pool, ordered where they conflict (see the module header)."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self.inflight = InFlight()

    def submit(self, offset: int, length: int, write: bool, fn: Callable[[], T]) -> Job[T]:
        """Start an I/O now (its place in the order is taken now, on the caller's thread)."""
        before = self.inflight.before(offset, length, write)
        job = self.pool.submit(_after, before, fn)
        self.inflight.add(job, offset, length, write)
        return job

    async def run(self, offset: int, length: int, write: bool, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(offset, length, write, fn))

    def now(self, offset: int, length: int, write: bool, fn: Callable[[], T]) -> T:
        """An I/O done on the caller's thread (a discard, an allocation map from the
        event loop): after the earlier conflicting I/Os, which need no loop to finish."""
        before = self.inflight.before(offset, length, write)
        if before:
            concurrent.futures.wait(before)
        return fn()

    def drain(self) -> None:
        """Wait for every I/O under way (before the disk closes)."""
        concurrent.futures.wait(self.inflight.before(0, 1 << 62, True))
