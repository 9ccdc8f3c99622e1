"""Throttle buckets shared by every process using a host: limiter state in small files.

    HOST/throttle/<key>.bucket   one per disk (its IOPS and MB/s limiters) and one
                                 per VM (its uncached, Ultra/v2 and cached limiters)

A record is fixed-size, big-endian (RECORD, then per limiter STATE, then a
CRC32 of everything before it):
    magic "DSTB", version 1, limiter count, epoch (16 bytes: a hash of the
    clock's epoch), then per limiter: tat (double, clock seconds), credits (double)

Rules kept here:
- a process reads a bucket, admits its I/O and writes the bucket back while
  holding an exclusive flock on its file (and the store's lock, for its
  other threads), so every process (`hostcache serve`, the CLI, Python)
  draws on one bucket and no update is lost; files are locked in key
  order, so two processes never deadlock;
- a bucket seen for the first time keeps the limiters' own start (credits
  full, as a new disk's); a damaged or torn record reads as drained (no
  credits, idle from now): a crash never refills a bucket;
- times are the clock's; a record written under another epoch (another
  boot, whose monotonic clock started again) keeps its credits and counts
  as idle from now: the time in between is not known, so it earns nothing;
- records are not fsynced: a power loss may lose the last updates of
  throttle state, never data.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

from .throttle import Limiter

MAGIC = b"DSTB"
VERSION = 1
RECORD = struct.Struct(">4sHH16s")
STATE = struct.Struct(">dd")
CRC = struct.Struct(">I")
assert RECORD.size == 24 and STATE.size == 16


def epoch_id(epoch: str) -> bytes:
    return hashlib.blake2b(epoch.encode(), digest_size=16).digest()


def pack(epoch: bytes, states: list[tuple[float, float]]) -> bytes:
    body = RECORD.pack(MAGIC, VERSION, len(states), epoch) + b"".join(STATE.pack(*s) for s in states)
    return body + CRC.pack(zlib.crc32(body))


def unpack(raw: bytes, count: int) -> tuple[bytes, list[tuple[float, float]]] | None:
    """(epoch, states), or None when the record is not a whole, intact one of `count` limiters."""
    size = RECORD.size + count * STATE.size
    if len(raw) != size + CRC.size or CRC.unpack_from(raw, size)[0] != zlib.crc32(raw[:size]):
        return None
    magic, version, n, epoch = RECORD.unpack_from(raw)
    if magic != MAGIC or version != VERSION or n != count:
        return None
    return epoch, [STATE.unpack_from(raw, RECORD.size + i * STATE.size) for i in range(count)]


class BucketStore:
    """The buckets of one host folder; `epoch` is the clock's (Clock.epoch).
    Files stay open between holds; flock keeps other processes out and a
    lock of the store keeps this process's other threads out (flock
    belongs to an open file, which the threads share)."""

    def __init__(self, folder: str, epoch: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.epoch = epoch_id(epoch)
        self.fds: dict[str, int] = {}
        self.lock = threading.RLock()

    def path(self, key: str) -> str:
        return os.path.join(self.folder, quote(key, safe="") + ".bucket")

    def _fd(self, key: str) -> int:
        fd = self.fds.get(key)
        if fd is None:
            fd = self.fds[key] = os.open(self.path(key), os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    @contextmanager
    def hold(self, buckets: dict[str, list[Limiter]], now: float) -> Iterator[None]:
        """Lock the buckets, load their state into the limiters, and write it
        back when the block ends (not when it raises)."""
        keys = sorted(buckets)
        with self.lock:
            fds = [self._fd(k) for k in keys]
            locked: list[int] = []
            try:
                for fd in fds:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    locked.append(fd)
                lengths = [self._load(fd, buckets[key], now) for key, fd in zip(keys, fds, strict=True)]
                yield
                for key, fd, length in zip(keys, fds, lengths, strict=True):
                    self._save(fd, buckets[key], length)
            finally:
                for fd in reversed(locked):
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _load(self, fd: int, limiters: list[Limiter], now: float) -> int:
        """Load the record into the limiters; the bytes the file held."""
        raw = os.pread(fd, RECORD.size + len(limiters) * STATE.size + CRC.size + 1, 0)
        if not raw:
            return 0  # a new bucket
        record = unpack(raw, len(limiters))
        if record is None:
            for lim in limiters:
                lim.restore(now, 0.0)
            return len(raw)
        epoch, states = record
        for lim, (tat, credits) in zip(limiters, states, strict=True):
            lim.restore(tat if epoch == self.epoch else now, credits)
        return len(raw)

    def _save(self, fd: int, limiters: list[Limiter], length: int) -> None:
        raw = pack(self.epoch, [lim.state() for lim in limiters])
        os.pwrite(fd, raw, 0)
        if length > len(raw):  # a longer record was there (other limiters)
            os.ftruncate(fd, len(raw))

    def remove(self, key: str) -> None:
        """Forget a bucket (its VM or disk is gone)."""
        with self.lock:
            fd = self.fds.pop(key, None)
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
