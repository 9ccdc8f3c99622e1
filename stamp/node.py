"""Extent nodes: one folder each, with a fault domain, holding extent replicas.

A node's health and injected faults live in the metadata (table `nodes`), so
a fault injected from the CLI reaches a server using the same stamp (by its
next append: see stream.open_node_epoch). States:
  up    serves reads and appends
  down  refuses every operation (its files are intact; it may come back)
  lost  its folder is gone for good; replicas on it must be re-made
Injected on an up node: `slow_ms` (each operation waits), `full` (appends
fail with ENOSPC). Bit flips are made in the replica file itself.
`generation` counts the times the node was lost (its files deleted): a
process that sees it change drops the descriptors it holds on the node,
which name deleted files (lost and replaced between two of its appends, the
state alone looks unchanged).

Descriptors (one process's view): a replica file stays open while its
extent is used, so another process deleting it (gc, re-replication) does not
free its space; the stream layer tells the node which extents are gone
elsewhere (`release`, see stream.StreamLayer.release_gone), and every file
opened is listed in `opened` for the stream layer to check once. A
descriptor is never closed while a thread may still pread it: it is pointed
at /dev/null (its file's space is freed at once; such a pread reads nothing,
which fails verification, and the read resolves again) and closed MAX_OPEN
retirements later, and then only if no thread is using it: a thread taking
a descriptor (read, append, sync, size) names it in `_busy` first, then
checks it is still its extent's, and a retired one named there stays open
until that thread is done. A count of retirements alone is no proof: a
thread the scheduler takes away between taking the number and its system
call may come back after the number was closed and given to another file,
whose record at the same offset verifies (records are checksummed by
offset, not extent): a read returned another blob's bytes, a heal would
have written over another extent. Bookkeeping of `_fds` and `_stale` is
under `_lock` (opens, retirements, releases); the hot path only reads
`_fds` and sets and pops its own `_busy` entry (single dict operations).
"""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Replica files a node keeps open in one process; beyond it the oldest opened
# is retired (reopened when used again), and a retired descriptor is closed
# only after MAX_OPEN more have been retired, so that a thread that was just
# handed it has long finished its pread. Without a bound a long-lived
# process kept every extent it ever touched open, until "Too many open files".
MAX_OPEN = 64


_DEVNULL = -1


def _devnull() -> int:
    """A descriptor of /dev/null, opened once per process (see Node.drop)."""
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


class NodeState(enum.Enum):
    UP = "up"
    DOWN = "down"
    LOST = "lost"


class NodeDown(OSError):
    """The node cannot be reached (down or lost)."""


@dataclass
class Node:
    id: int
    name: str
    fault_domain: int
    folder: str
    state: NodeState = NodeState.UP
    slow_ms: float = 0.0
    full: bool = False
    generation: int = 0
    _fds: dict[int, int] = field(default_factory=dict, repr=False)
    # retired descriptors (extent id, or -1 once pointed at /dev/null; fd), closed MAX_OPEN later
    _stale: list[tuple[int, int]] = field(default_factory=list, repr=False)
    pinned: int = -1  # the extent this process appends to: its descriptors are never retired
    # (node id, extent id) of every file opened, for the stream layer to check once (shared by its nodes)
    opened: list[tuple[int, int]] = field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # thread ident -> the descriptor it is using (see _take): never closed under it
    _busy: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, node_id: int, root: str, obj: dict[str, Any]) -> Node:
        name = str(obj["name"])
        return cls(node_id, name, int(obj["fault_domain"]), os.path.join(root, "nodes", name),
                   NodeState(obj.get("state", "up")), float(obj.get("slow_ms", 0.0)), bool(obj.get("full", False)),
                   int(obj.get("generation", 0)))

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "fault_domain": self.fault_domain, "state": self.state.value,
                "slow_ms": self.slow_ms, "full": self.full, "generation": self.generation}

    @property
    def healthy(self) -> bool:
        return self.state is NodeState.UP

    def extent_path(self, extent_id: int) -> str:
        return os.path.join(self.folder, "extents", f"{extent_id:016x}.ext")

    def _gate(self) -> None:
        if self.state is not NodeState.UP:
            raise NodeDown(errno.EHOSTDOWN, f"node {self.name} is {self.state.value}")
        if self.slow_ms:
            time.sleep(self.slow_ms / 1000)

    def fd(self, extent_id: int, create: bool = False, user: int | None = None) -> int:
        """The descriptor of extent_id's file (opened if need be); with `user`
        (a thread ident), named in _busy for that thread, so that it is not
        closed under it (see _take)."""
        self._gate()
        fd = self._fds.get(extent_id)
        if fd is not None and user is not None:
            self._busy[user] = fd
            if self._fds.get(extent_id) != fd:
                fd = None  # retired before it was named (maybe closed since): taken again under the lock
        if fd is None:
            flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
            mine = os.open(self.extent_path(extent_id), flags | os.O_CLOEXEC, 0o644)
            with self._lock:
                fd = self._fds.setdefault(extent_id, mine)
                if user is not None:
                    self._busy[user] = fd
                if fd != mine:  # another thread opened it meanwhile: keep one (an extra would leak)
                    os.close(mine)
                    return fd
                self.opened.append((self.id, extent_id))
                if len(self._fds) > MAX_OPEN:
                    self._retire_oldest()
        return fd

    def _retire_oldest(self) -> None:
        for oldest in list(self._fds):  # a copy (other threads may open files); in opening order
            if oldest != self.pinned:
                fd = self._fds.pop(oldest, None)
                if fd is not None:
                    self._park(oldest, fd)
                break

    def _park(self, extent_id: int, fd: int) -> None:
        """Retire fd (under _lock): closed after MAX_OPEN more are retired,
        once no thread is using it (_busy)."""
        self._stale.append((extent_id, fd))
        over = len(self._stale) - MAX_OPEN
        if over > 0:
            busy = set(self._busy.values())
            for entry in [x for x in self._stale if x[1] not in busy][:over]:
                self._stale.remove(entry)
                os.close(entry[1])

    def _take(self, extent_id: int) -> int:
        """The descriptor of extent_id's file, named in _busy for this thread
        (so not closed under it) until _done(): named, then checked to be
        still its extent's (one retired before it was named may be closed and
        its number reused: then it is taken again, under the lock)."""
        return self.fd(extent_id, user=threading.get_ident())

    def _done(self) -> None:
        self._busy.pop(threading.get_ident(), None)

    def append(self, extent_id: int, data: bytes, offset: int) -> None:
        if self.full:
            self._gate()  # down, lost, slow
            raise OSError(errno.ENOSPC, f"node {self.name}: no space left (injected)")
        fd = self._take(extent_id)
        try:
            n = os.pwrite(fd, data, offset)
            if n < len(data):  # rare: finish a short write
                view = memoryview(data)[n:]
                offset += n
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
        finally:
            self._done()

    def read(self, extent_id: int, length: int, offset: int) -> bytes:
        fd = self._take(extent_id)
        try:
            return os.pread(fd, length, offset)
        finally:
            self._done()

    def sync(self, extent_id: int) -> None:
        fd = self._take(extent_id)
        try:
            os.fdatasync(fd)
        finally:
            self._done()

    def size(self, extent_id: int) -> int:
        fd = self._take(extent_id)
        try:
            return os.fstat(fd).st_size
        finally:
            self._done()

    def drop(self, extent_id: int) -> None:
        """Forget and delete a replica file. Its descriptor is not closed at
        once: another thread may have just been handed it (a reader in
        `hostcache serve` beside the reclaimer's thread), and a number closed
        now may be given to the next file opened, whose record of the same
        length at the same offset would verify (records are checksummed by
        offset, not extent). It is pointed at /dev/null instead (the file's
        space is freed; such a pread reads nothing, a bad copy, and the read
        resolves again) and closed as a retired one is."""
        self.release({extent_id})
        try:
            os.unlink(self.extent_path(extent_id))
        except FileNotFoundError:
            pass

    def release(self, gone: set[int]) -> int:
        """Let go of the descriptors (open or retired) of the extents `gone`
        (deleted, or moved off this node, maybe by another process), as drop
        does: pointed at /dev/null, so their files' space is freed now.
        Returns how many were let go."""
        released = 0
        with self._lock:
            for extent_id in [x for x in self._fds if x in gone]:
                fd = self._fds.pop(extent_id)
                os.dup2(_devnull(), fd, inheritable=False)
                self._park(-1, fd)
                released += 1
            for i, (extent_id, fd) in enumerate(self._stale):
                if extent_id in gone:
                    os.dup2(_devnull(), fd, inheritable=False)
                    self._stale[i] = (-1, fd)
                    released += 1
        return released

    def held(self) -> set[int]:
        """The extents this node holds a descriptor of (open or retired)."""
        with self._lock:
            return {*self._fds, *(x for x, _ in self._stale if x >= 0)}

    def abandon_files(self) -> None:
        """Stop using the descriptors held (their files were deleted): later
        operations open the files again. They are pointed at /dev/null (the
        space goes) and closed later, not here: another thread may be using
        one this instant."""
        self.release(self.held())

    def forget(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *(fd for _, fd in self._stale)]:
                os.close(fd)
            self._fds.clear()
            self._stale.clear()
