"""Throttle buckets shared by every process using a host: limiter state in small files.

    HOST/throttle/<key>.bucket   one per disk (its IOPS and MB/s limiters) and one
                                 per VM (its uncached, Ultra/v2 and cached limiters)

A record is fixed-size, big-endian (RECORD, then per limiter STATE, then a
CRC32 of everything before it):
    magic "DSTB", version 1, limiter count, epoch (16 bytes: a hash of the
    clock's epoch), then per limiter: tat (double, clock seconds), credits (double)

Rules kept here:
- a process reads a bucket, admits its I/O (or pays a grant for a run of
  them: grants.py) and writes the bucket back while holding an exclusive
  flock on its file (and the store's lock, for its other threads), so every
  process (`hostcache serve`, the CLI, Python) draws on one bucket and no
  update is lost; files are locked in key order, so two processes never
  deadlock;
- a bucket seen for the first time keeps the limiters' own start (credits
  full, as a new disk's); a damaged or torn record reads as drained (no
  credits, idle from now): a crash never refills a bucket. So does an
  intact record whose figures cannot be: a time or credit that is not a
  finite number, negative credits, or a time more than MAX_AHEAD past now
  (no queue of I/Os waits a day; such a record would hold the disk's
  I/O until then);
- times are the clock's; a record written under another epoch (another
  boot, whose monotonic clock started again) keeps its credits and counts
  as idle from now: the time in between is not known, so it earns nothing;
- records are not fsynced: a power loss may lose the last updates of
  throttle state, never data;
- the files are bounded by the host's VMs and the stamp's disks: the host
  removes the buckets of those that are gone (keep_only) on detach and on
  VM delete.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import math
import os
import struct
import threading
import zlib
from urllib.parse import quote, unquote

from .throttle import Limiter

MAGIC = b"DSTB"
VERSION = 1
RECORD = struct.Struct(">4sHH16s")
STATE = struct.Struct(">dd")
CRC = struct.Struct(">I")
MAX_AHEAD = 86400.0  # seconds (a day): the latest a record's time may lie past now
assert RECORD.size == 24 and STATE.size == 16


def epoch_id(epoch: str) -> bytes:
    return hashlib.blake2b(epoch.encode(), digest_size=16).digest()


@functools.cache
def _states(count: int) -> struct.Struct:
    """Every limiter's (tat, credits) of a record of `count` limiters, as one structure."""
    return struct.Struct(f">{2 * count}d")


@functools.cache
def _header(epoch: bytes, count: int) -> bytes:
    return RECORD.pack(MAGIC, VERSION, count, epoch)


def pack(epoch: bytes, states: list[tuple[float, float]]) -> bytes:
    body = _header(epoch, len(states)) + _states(len(states)).pack(*itertools.chain.from_iterable(states))
    return body + CRC.pack(zlib.crc32(body))


def unpack(raw: bytes, count: int) -> tuple[bytes, list[tuple[float, float]]] | None:
    """(epoch, states), or None when the record is not a whole, intact one of `count` limiters."""
    size = RECORD.size + count * STATE.size
    if len(raw) != size + CRC.size or CRC.unpack_from(raw, size)[0] != zlib.crc32(raw[:size]):
        return None
    magic, version, n, epoch = RECORD.unpack_from(raw)
    if magic != MAGIC or version != VERSION or n != count:
        return None
    flat = _states(count).unpack_from(raw, RECORD.size)
    return epoch, [(flat[2 * i], flat[2 * i + 1]) for i in range(count)]


def plausible(states: list[tuple[float, float]], now: float) -> bool:
    """Whether a record's figures can be a limiter's: finite, credits not
    negative, times at most MAX_AHEAD past `now` (inf: another epoch's, not comparable)."""
    return all(math.isfinite(tat) and math.isfinite(credits) and credits >= 0 and tat <= now + MAX_AHEAD
               for tat, credits in states)


class _Hold:
    """One hold of some buckets (BucketStore.hold)."""

    def __init__(self, store: BucketStore, buckets: dict[str, list[Limiter]], now: float) -> None:
        self.store, self.now = store, now
        self.items = sorted(buckets.items())
        self.locked: list[int] = []

    def __enter__(self) -> None:
        store = self.store
        store.lock.acquire()
        try:
            for key, limiters in self.items:
                fd = store.fd(key)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.locked.append(fd)
                store.load(key, fd, limiters, self.now)
        except BaseException:
            self.release()
            raise

    def __exit__(self, kind: object, *rest: object) -> None:
        try:
            for (key, limiters), fd in zip(self.items, self.locked, strict=True):
                if kind is None:
                    self.store.save(key, fd, limiters)
                else:  # what the limiters hold now was not written: the next hold reads the file again
                    self.store.written.pop(key, None)
        finally:
            self.release()

    def release(self) -> None:
        for fd in reversed(self.locked):
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.locked.clear()
        self.store.lock.release()


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
        self.lengths: dict[str, int] = {}  # bytes each file held when last read or written
        self.written: dict[str, tuple[bytes, list[Limiter]]] = {}  # the last record written, and by whom

    def path(self, key: str) -> str:
        return os.path.join(self.folder, quote(key, safe="") + ".bucket")

    def fd(self, key: str) -> int:
        fd = self.fds.get(key)
        if fd is None:
            fd = self.fds[key] = os.open(self.path(key), os.O_RDWR | os.O_CREAT, 0o600)
        return fd

    def hold(self, buckets: dict[str, list[Limiter]], now: float) -> _Hold:
        """For a `with`: lock the buckets, load their state into the limiters,
        and write it back when the block ends (not when it raises)."""
        return _Hold(self, buckets, now)

    def load(self, key: str, fd: int, limiters: list[Limiter], now: float) -> None:
        raw = os.pread(fd, RECORD.size + len(limiters) * STATE.size + CRC.size + 1, 0)
        if self.written.get(key) == (raw, limiters):  # limiters compare by identity
            return  # these limiters wrote it last, and no one since: they hold that state already
        self.lengths[key] = len(raw)
        if not raw:
            return  # a new bucket
        record = unpack(raw, len(limiters))
        if record is None or not plausible(record[1], now if record[0] == self.epoch else math.inf):
            for lim in limiters:
                lim.restore(now, 0.0)  # damaged, torn or impossible: drained, idle from now
            return
        epoch, states = record
        for lim, (tat, credits) in zip(limiters, states, strict=True):
            lim.restore(tat if epoch == self.epoch else now, credits)

    def save(self, key: str, fd: int, limiters: list[Limiter]) -> None:
        raw = pack(self.epoch, [lim.state() for lim in limiters])
        os.pwrite(fd, raw, 0)
        if self.lengths.get(key, 0) > len(raw):  # a longer record was there (other limiters)
            os.ftruncate(fd, len(raw))
        self.lengths[key] = len(raw)
        self.written[key] = (raw, limiters)

    def remove(self, key: str) -> None:
        """Forget a bucket (its VM or disk is gone)."""
        with self.lock:
            fd = self.fds.pop(key, None)
            if fd is not None:
                os.close(fd)
            self.written.pop(key, None)
            self.lengths.pop(key, None)
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass

    def keep_only(self, keys: set[str], listed: list[str]) -> list[str]:
        """Remove the buckets among `listed` (file names, from names()) whose
        key is not in `keys`; the keys removed."""
        wanted = {quote(k, safe="") + ".bucket" for k in keys}
        gone = [unquote(f.removesuffix(".bucket")) for f in listed if f not in wanted]
        for key in gone:
            self.remove(key)
        return gone

    def names(self) -> list[str]:
        return [f for f in os.listdir(self.folder) if f.endswith(".bucket")]

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self.written.clear()
