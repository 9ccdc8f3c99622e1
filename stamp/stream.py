"""The stream layer: append-only extents, each replicated on 3 nodes.

Rules (WAS stream layer, simplified to one data stream):
- An extent is appended to by the one process that opened it (its owner).
  A record is acknowledged only after every replica holds it (and, in fsync
  mode, after every replica is synced; concurrent appenders share fsyncs:
  group commit).
- If a replica fails during an append, the extent is sealed at the length
  all replicas held before that record, and the append is retried on a new
  extent on healthy nodes; the caller never sees the failure. With fewer than
  3 healthy nodes in distinct fault domains, NotEnoughNodes is raised and
  nothing was acknowledged.
- Extents are sealed when they reach the target size, on failure, or when
  their owner is found dead: at the end of the longest run of records each
  of which verifies on some reachable replica (an acknowledged record is on
  every replica, so one good copy proves it; a bad copy is corruption, not
  a torn tail), the replicas lacking one healed from a good copy.
- Every read verifies its chunks' checksums (and the record header when it
  reads the first chunk); a replica that fails is skipped and, if its node
  is up, healed with the bytes of a good replica.
- Scrub, check, recovery and re-replication verify whole records (header,
  checksums, data) and file headers; a new replica is built record by
  record from whichever replica verifies each, never from a corrupt copy.
- A node state change (a fault injected by any process) reaches every
  appender by its next append: the change rewrites STAMP/nodes.epoch after
  its commit, and each append compares that file's 8 bytes first; a read
  compares them too if it is READ_RECHECK after the last such read.
- Replica files deleted by another process (gc, re-replication) are let go
  here too, or their space would stay taken for as long as this process
  lives: every transaction that deletes an extent or moves a replica bumps
  the counter GONE (in the transaction that removes it), and the page layer
  reads it in the transactions its reads and writes open anyway
  (`gone_moved`); when it moved, or when files were opened since the last
  check, `release_gone` looks the held extents up in one read transaction
  and lets go of those no longer there (node.Node.release). A file opened
  before its deletion is looked up in a transaction that either lacks it or
  saw a GONE the deletion's bump moves past, so no descriptor of a deleted
  file outlives the process's next read or write; nor RELEASE_EVERY while
  it does neither: once it has done one, a thread of its own runs
  release_gone at that interval (a read transaction and a get).
Location of data: (extent id, record offset, record length); the partition
layer keeps these in its index.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from vhd.process import own_start, pid_alive, process_start  # noqa: F401 (the stamp names them here too)

from . import record as rec
from .errors import CorruptStamp, DataLost, NotEnoughNodes
from .meta import U32, U64, Meta, loads
from .node import Node, NodeDown, NodeState

REPLICAS = 3
GONE = "gone"  # counters: bumped by each transaction deleting an extent or moving a replica (see the header)
_GONE_KEY = GONE.encode()
RELEASE_EVERY = 1.0  # seconds: how long a process that neither reads nor writes may hold files deleted elsewhere
READ_RECHECK = 0.05  # seconds: how stale a reading process's node states may get (see read)
DEFAULT_EXTENT_SIZE = 256 * 1024 * 1024


@dataclass
class ScrubReport:
    records: int = 0
    bad: int = 0
    healed: int = 0
    orphans: int = 0  # replica files of extents the metadata no longer has
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "bad_copies": self.bad, "healed": self.healed,
                "orphan_files": self.orphans, "problems": self.problems}


class Location(NamedTuple):
    extent: int
    offset: int  # of the record in the extent
    length: int  # data bytes in the record


@dataclass
class Extent:
    id: int
    nodes: list[int]
    state: str  # "open" or "sealed"
    length: int  # bytes in the file, header included (sealed: final)
    owner: int  # pid of the appender while open
    token: str = ""  # which StreamLayer in that process
    started: int = 0  # the owner's start time (process_start): a reused pid is not the owner
    copy: dict[str, int] | None = None  # a replica being made: {node, owner, started} (rereplicate)

    def to_json(self) -> dict[str, Any]:
        obj = {"nodes": self.nodes, "state": self.state, "length": self.length, "owner": self.owner,
               "token": self.token, "started": self.started}
        return obj if self.copy is None else {**obj, "copy": self.copy}

    @classmethod
    def from_json(cls, extent_id: int, obj: dict[str, Any]) -> Extent:
        return cls(extent_id, list(obj["nodes"]), obj["state"], int(obj["length"]), int(obj.get("owner", 0)),
                   str(obj.get("token", "")), int(obj.get("started", 0)), obj.get("copy"))

    def holds(self, node_id: int) -> bool:
        """May node `node_id` have a replica file of this extent: a member, or
        the target of a copy whose process is alive?"""
        if node_id in self.nodes:
            return True
        c = self.copy
        return c is not None and c["node"] == node_id and pid_alive(c["owner"], c["started"])


class _ReplicaFileError(Exception):
    def __init__(self, node: Node, reason: str) -> None:
        super().__init__(f"{node.name}: {reason}")
        self.node, self.reason = node, reason


_LIVE_TOKENS: set[str] = set()  # StreamLayers open in this process
_REPLICA_NAME = re.compile(r"[0-9a-f]{16}\.ext")


def owner_alive(e: Extent) -> bool:
    """Is the process (and, in this process, the StreamLayer) appending to e alive?"""
    if e.owner == os.getpid():
        return e.token in _LIVE_TOKENS
    return pid_alive(e.owner, e.started)


def _read_replica(node: Node, extent_id: int, length: int, offset: int) -> bytes:
    return node.read(extent_id, length, offset)


class StreamLayer:
    def __init__(self, root: str, meta: Meta, fsync: bool, extent_size: int = DEFAULT_EXTENT_SIZE) -> None:
        self.root, self.meta, self.fsync, self.extent_size = root, meta, fsync, extent_size
        self.nodes: dict[int, Node] = {}
        self._extents: dict[int, Extent] = {}
        self._current: Extent | None = None
        self._lock = threading.Lock()  # appends: offsets and pwrites in order
        self._sync_lock = threading.Lock()  # group commit
        self._synced: dict[int, int] = {}
        self._fast: tuple[Extent, list[int]] | None = None  # see _fast_fds
        self._opened: list[tuple[int, int]] = []  # (node, extent) of files opened since release_gone (all nodes)
        self._gone_seen = -1  # GONE as of the last release_gone (-1: none yet) ...
        self._gone_raw: bytes | None = b"?"  # ... as stored (None: never bumped; b"?": no release_gone yet)
        self._counters = meta.db["counters"]
        self._release_lock = threading.Lock()
        self._idle_stop = threading.Event()
        self._idle_thread: threading.Thread | None = None  # see _watch_idle
        self.token = uuid.uuid4().hex
        _LIVE_TOKENS.add(self.token)
        self._epoch_fd = open_node_epoch(root)
        self._epoch = b""
        self._epoch_checked = 0.0  # when a read last compared the epoch (monotonic)
        self.refresh_nodes()

    # -- nodes ---------------------------------------------------------------

    def refresh_nodes(self) -> None:
        """Reload node states (faults may be injected by another process)."""
        self._fast = None
        self._epoch = os.pread(self._epoch_fd, 8, 0)  # before the states: a change in between is seen next time
        with self.meta.read() as txn:
            for key, raw in self.meta.items(txn, "nodes"):
                node_id = U32.unpack(key)[0]
                fresh = Node.from_json(node_id, self.root, loads(raw))
                old = self.nodes.get(node_id)
                if old is None:
                    fresh.opened = self._opened
                    self.nodes[node_id] = fresh
                    continue
                if old.generation != fresh.generation:  # lost since: the files held are deleted ones
                    old.abandon_files()
                old.state, old.slow_ms, old.full, old.generation = (fresh.state, fresh.slow_ms, fresh.full,
                                                                     fresh.generation)

    # -- files deleted elsewhere ---------------------------------------------------

    def mark_gone(self, txn: Any) -> None:
        """In a write transaction deleting an extent or moving a replica off a
        node (its files are unlinked after the commit): every process holding
        them lets go (see the header)."""
        self.meta.next_id(txn, GONE)

    def gone_moved(self, txn: Any) -> bool:
        """Does release_gone have work: did GONE move, or were files opened
        since it last ran? (One get in a transaction the caller holds.)"""
        return bool(self._opened) or txn.get(_GONE_KEY, db=self._counters) != self._gone_raw

    def release_gone(self, txn: Any = None) -> int:
        """Let go of the descriptors of replica files whose extent is gone or
        no longer on their node, as of `txn` (a read transaction begun after
        the caller's files were opened; None: one of its own). Looks up every
        held extent when GONE moved, else only the files opened since the last
        call. Returns how many descriptors were let go."""
        if not self._release_lock.acquire(blocking=False):
            return 0  # another thread is at it: files it misses stay listed for the next call
        try:
            if self._idle_thread is None and not self._idle_stop.is_set():
                self._watch_idle()
            if txn is not None:
                return self._release_in(txn)
            with self.meta.read() as own:
                return self._release_in(own)
        finally:
            self._release_lock.release()

    def _watch_idle(self) -> None:
        """Start the thread that runs release_gone every RELEASE_EVERY, for
        when this process goes idle holding files (a worker whose client
        stopped, beside a writer and its reclaimer). It holds the layer only
        weakly, and ends with close() or when the layer is gone."""
        ref, stop = weakref.ref(self), self._idle_stop

        def run() -> None:
            while not stop.wait(RELEASE_EVERY):
                layer = ref()
                if layer is None:
                    return
                try:
                    layer.release_gone()
                except Exception:  # noqa: BLE001 (the stamp closing under it, say: the next tick or op tries again)
                    pass
                del layer

        self._idle_thread = threading.Thread(target=run, name="stamp-release-gone", daemon=True)
        self._idle_thread.start()
        _WATCHED.add(self)

    def _stop_watching(self) -> None:
        self._idle_stop.set()
        if self._idle_thread is not None and self._idle_thread is not threading.current_thread():
            self._idle_thread.join()

    def _release_in(self, txn: Any) -> int:
        raw = txn.get(_GONE_KEY, db=self.meta.db["counters"])
        gone_now = U64.unpack(raw)[0] if raw is not None else 0
        if gone_now < self._gone_seen:
            return 0  # an older snapshot than the last check's: a later call does it
        taken = len(self._opened)
        if gone_now != self._gone_seen:
            wanted = {node.id: node.held() for node in list(self.nodes.values())}
        else:
            wanted = {}
            for node_id, extent_id in self._opened[:taken]:
                wanted.setdefault(node_id, set()).add(extent_id)
        found: dict[int, Extent | None] = {}
        released = 0
        for node_id, ids in wanted.items():
            node = self.nodes.get(node_id)
            if node is None:
                continue
            gone = {x for x in ids if not self._still_on(txn, found, x, node_id)}
            if gone:
                released += node.release(gone)
        del self._opened[:taken]  # one C call: files opened meanwhile stay listed
        self._gone_seen, self._gone_raw = gone_now, None if raw is None else bytes(raw)
        if released:
            self._fast = None
            for extent_id, e in found.items():
                if e is None and (self._current is None or self._current.id != extent_id):
                    self._extents.pop(extent_id, None)
        return released

    def _still_on(self, txn: Any, found: dict[int, Extent | None], extent_id: int, node_id: int) -> bool:
        """Is extent_id (in `extents` or `dying`, as of txn) kept on node_id?"""
        if extent_id not in found:
            key = U64.pack(extent_id)
            raw = txn.get(key, db=self.meta.db["extents"])
            if raw is None:
                raw = txn.get(key, db=self.meta.db["dying"])
            found[extent_id] = None if raw is None else Extent.from_json(extent_id, loads(bytes(raw)))
        e = found[extent_id]
        return e is not None and e.holds(node_id)

    def set_node(self, node_id: int, lost: bool = False, **changes: Any) -> Node:
        """Change a node's state or injected faults, durably, for every process;
        `lost`: its files are about to be deleted (a new generation)."""
        with self.meta.write() as txn:
            obj = self.meta.get_json(txn, "nodes", U32.pack(node_id))
            if obj is None:
                raise CorruptStamp(f"no node {node_id}")
            obj.update(changes)
            if lost:
                obj["generation"] = int(obj.get("generation", 0)) + 1
            self.meta.put_json(txn, "nodes", U32.pack(node_id), obj)
        os.pwrite(self._epoch_fd, os.urandom(8), 0)  # after the commit: every appender reloads the states
        self.refresh_nodes()
        return self.nodes[node_id]

    def place(self, exclude: Collection[int] = (), count: int = REPLICAS,
              avoid_domains: Collection[int] = ()) -> list[int]:
        """`count` healthy nodes in distinct fault domains, least loaded first."""
        load: dict[int, int] = {n: 0 for n in self.nodes}
        for e in list(self._extents.values()):  # a copy: other threads forget extents (release_gone, gc)
            for n in e.nodes:
                load[n] = load.get(n, 0) + 1
        chosen: list[int] = []
        domains = set(avoid_domains)
        for node in sorted(self.nodes.values(), key=lambda n: (load.get(n.id, 0), n.id)):
            if node.healthy and not node.full and node.id not in exclude and node.fault_domain not in domains:
                chosen.append(node.id)
                domains.add(node.fault_domain)
                if len(chosen) == count:
                    return chosen
        healthy = sorted({n.fault_domain for n in self.nodes.values() if n.healthy and not n.full})
        raise NotEnoughNodes(f"need {count} healthy extent nodes in distinct fault domains; "
                             f"healthy fault domains: {healthy or 'none'}")

    # -- extents ---------------------------------------------------------------

    def extent(self, extent_id: int, refresh: bool = False) -> Extent:
        e = self._extents.get(extent_id)
        if e is None or refresh or e.state == "open" and e is not self._current:
            with self.meta.read() as txn:
                obj = self.meta.get_json(txn, "extents", U64.pack(extent_id))
                if obj is None:  # gc may be proving it unreferenced: its replicas are still there
                    obj = self.meta.get_json(txn, "dying", U64.pack(extent_id))
            if obj is None:
                raise CorruptStamp(f"extent {extent_id} is not in the metadata")
            e = Extent.from_json(extent_id, obj)
            if self._current is not None and self._current.id == extent_id:
                return self._current
            self._extents[extent_id] = e
        return e

    def _new_extent(self) -> Extent:
        """A new open extent on 3 healthy nodes; nodes that fail to take its
        file (full, vanished) are left out of the next try."""
        self.refresh_nodes()
        failed: dict[int, str] = {}
        while True:
            try:
                nodes = self.place(exclude=failed)
            except NotEnoughNodes:
                if not failed:
                    raise
                raise NotEnoughNodes("could not create an extent on enough healthy nodes ("
                                     + "; ".join(failed.values()) + "); free space or bring nodes up: "
                                     "nothing was written") from None
            with self.meta.write() as txn:
                extent_id = self.meta.next_id(txn, "extent")
                e = Extent(extent_id, nodes, "open", rec.FILE_HEADER, os.getpid(), self.token, own_start())
                self.meta.put_json(txn, "extents", U64.pack(extent_id), e.to_json())
            try:
                for n in nodes:
                    self._make_replica_file(self.nodes[n], extent_id)
            except _ReplicaFileError as err:
                failed[err.node.id] = f"{err.node.name}: {err.reason}"
                self._drop_empty(e)  # it holds no record: nothing is left behind
                continue
            self._extents[extent_id] = e
            for n in nodes:
                self.nodes[n].pinned = extent_id  # appended to from now on: its files stay open
            return e

    def _make_replica_file(self, node: Node, extent_id: int) -> None:
        try:
            node.fd(extent_id, create=True)
            node.append(extent_id, rec.pack_file_header(uuid.UUID(int=extent_id)), 0)
            if self.fsync:
                node.sync(extent_id)
        except OSError as err:
            raise _ReplicaFileError(node, err.strerror or str(err)) from None

    def _seal(self, e: Extent, length: int) -> None:
        e.state, e.length = "sealed", length
        with self.meta.write() as txn:
            self.meta.put_json(txn, "extents", U64.pack(e.id), e.to_json())
        if self._current is e:
            self._current = None

    def append(self, data: bytes | memoryview) -> Location:
        """Append one record (1 byte to 4 MiB) to 3 replicas; returns where it is.
        Returns only when every replica holds it (and has synced it, in fsync mode)."""
        if not self.fsync:
            return self._append_locked(data)[0]
        for _ in range(2 * len(self.nodes) + 2):
            loc, e, end = self._append_locked(data)
            if self._group_sync(e, end):
                return loc
        raise NotEnoughNodes("appends keep failing on every extent")

    def _append_locked(self, data: bytes | memoryview) -> tuple[Location, Extent, int]:
        failures = 0
        with self._lock:
            if os.pread(self._epoch_fd, 8, 0) != self._epoch:  # a node changed, maybe in another process
                self.refresh_nodes()
            while True:
                e = self._current
                if e is None or e.state != "open":
                    e = self._current = self._new_extent()
                offset = e.length
                raw = rec.pack_record(data, offset)
                size = len(raw)
                fast = self._fast
                try:
                    fds = fast[1] if fast is not None and fast[0] is e else self._fast_fds(e)  # cached, or made
                    if fds is None:
                        for n in e.nodes:
                            self.nodes[n].append(e.id, raw, offset)
                    else:
                        for fd in fds:
                            if os.pwrite(fd, raw, offset) != size:  # rare: let the node finish it
                                self.nodes[e.nodes[fds.index(fd)]].append(e.id, raw, offset)
                except OSError:
                    failures += 1
                    if failures > 2 * len(self.nodes) + 1:
                        raise NotEnoughNodes("appends keep failing on every extent") from None
                    self.refresh_nodes()
                    self._seal(e, offset)  # every replica held everything before this record
                    continue
                e.length = end = offset + size
                if end >= self.extent_size:
                    self._seal(e, end)
                return Location(e.id, offset, len(data)), e, end

    def _fast_fds(self, e: Extent) -> list[int] | None:
        """Open the current extent's replica files for `_fast`, the cache the
        append path checks first: used while all its nodes are up with no
        injected fault, so appends skip the per-node checks. Reset whenever
        node states are reloaded or replica files closed."""
        nodes = [self.nodes[n] for n in e.nodes]
        if any(not node.healthy or node.slow_ms or node.full for node in nodes):
            return None
        fds = [node.fd(e.id) for node in nodes]
        self._fast = (e, fds)
        return fds

    def _group_sync(self, e: Extent, end: int) -> bool:
        """fsync every replica up to `end`, sharing the fsync with concurrent
        appenders (group commit). False if a replica failed to sync: the extent
        is then sealed at what was synced and the caller appends again."""
        with self._sync_lock:
            if self._synced.get(e.id, 0) >= end:
                return True
            if e.state == "sealed" and e.length < end:
                return False  # sealed before this record by a failed sync
            with self._lock:
                target = e.length  # written before this fsync starts, so covered by it
            try:
                for n in e.nodes:
                    self.nodes[n].sync(e.id)
            except OSError:
                with self._lock:
                    self.refresh_nodes()
                    self._seal(e, self._synced.get(e.id, rec.FILE_HEADER))
                return False
            self._synced[e.id] = target
            return True

    # -- reads -----------------------------------------------------------------

    def read(self, loc_extent: int, rec_offset: int, rec_length: int, inner: int, length: int) -> bytes:
        """`length` bytes at `inner` in a record, verified; heals bad replicas."""
        sp = rec.span(rec_offset, rec_length, inner, length)
        self._recheck_nodes()
        for attempt in range(2):
            e = self.extent(loc_extent, refresh=attempt > 0)
            bad: list[int] = []
            for n in e.nodes:
                node = self.nodes.get(n)
                if node is None or not node.healthy:
                    continue
                try:
                    raw = node.read(e.id, sp.file_length, sp.file_offset)
                    data = rec.verify_span(raw, rec_offset, sp, length)
                except (rec.RecordError, OSError):
                    bad.append(n)
                    continue
                for b in bad:
                    self._heal(e.id, b, raw, sp.file_offset)
                return data
            self.refresh_nodes()
        away = [f"{self.nodes[n].name} {self.nodes[n].state.value}" for n in e.nodes
                if n in self.nodes and not self.nodes[n].healthy]
        raise DataLost(f"no replica of extent {loc_extent} holds a good copy of the record at {rec_offset}"
                       + (f" (not read: {', '.join(away)}; `stamp fault node-up NODE` brings a down node back)"
                          if away else ""))

    def _recheck_nodes(self) -> None:
        """Reload node states if they changed (a fault injected elsewhere),
        at most every READ_RECHECK seconds: a process that only reads sees a
        node go down within that time, for the price of a clock read (the
        epoch's pread would add a fifth to a 4 KiB read)."""
        now = time.monotonic()
        if now - self._epoch_checked >= READ_RECHECK:
            self._epoch_checked = now
            if os.pread(self._epoch_fd, 8, 0) != self._epoch:
                self.refresh_nodes()

    def _heal(self, extent_id: int, node_id: int, raw: bytes, offset: int) -> bool:
        """Write good bytes over a bad copy; False if that failed."""
        node = self.nodes[node_id]
        try:
            if not os.path.exists(node.extent_path(extent_id)):
                return False  # a missing replica is re-made whole by rereplicate()
            node.append(extent_id, raw, offset)
            if self.fsync:
                node.sync(extent_id)
        except OSError:
            return False  # still bad: the scrubber and re-replication deal with it
        return True

    # -- recovery and maintenance ---------------------------------------------------

    def recover(self) -> list[int]:
        """Seal extents whose owner process is gone (and none of whose nodes is
        down: its replica may be the only good copy of a record), at the end of the longest
        run of records each of which verifies on some reachable replica (an
        acknowledged record is on every replica, so one good copy proves it
        committed; a bad copy is corruption, not a torn tail), healing the
        replicas that lack one; delete those that hold no record on any
        replica. Returns the sealed ids."""
        self.refresh_nodes()
        sealed = []
        for e in self.all_extents():
            if e.state != "open" or owner_alive(e) or self.down_members(e):
                continue  # a down node's replica may hold records no reachable one has: wait for it
            report = ScrubReport()
            length = self._walk(e, None, heal=True, report=report)
            if length <= rec.FILE_HEADER and all(self._reachable(n) is not None for n in e.nodes):
                # No record on any replica: the owner died while creating it
                # (metadata first, then the replica files) or before its first
                # append. Nothing can point into it, so it goes, with its files.
                self._drop_empty(e)
                continue
            if not self._seal_recovered(e, length):
                continue  # another process recovered it first (and gc may have deleted it since)
            self._extents[e.id] = e
            sealed.append(e.id)
        return sealed

    def _seal_recovered(self, e: Extent, length: int) -> bool:
        """Seal e, an open extent whose owner died, if it is still that: the
        walk ran outside any transaction, and meanwhile another process's
        recovery may have sealed it and gc (any process) found it unreferenced
        and deleted it with its files; an unconditional put would bring back
        a record whose replicas are gone (check: data lost, for ever)."""
        with self.meta.write() as txn:
            raw = txn.get(U64.pack(e.id), db=self.meta.db["extents"])
            if raw is None or loads(bytes(raw))["state"] != "open":
                return False
            e.state, e.length = "sealed", length
            self.meta.put_json(txn, "extents", U64.pack(e.id), e.to_json())
        return True

    def down_members(self, e: Extent) -> list[str]:
        """The down (not lost) nodes holding a replica of e."""
        return [node.name for node in map(self.nodes.get, e.nodes)
                if node is not None and node.state is NodeState.DOWN]

    def _drop_empty(self, e: Extent) -> None:
        for n in e.nodes:
            node = self.nodes.get(n)
            if node is not None and node.state is not NodeState.LOST:
                node.drop(e.id)
        with self.meta.write() as txn:
            txn.delete(U64.pack(e.id), db=self.meta.db["extents"])
            self.mark_gone(txn)
        self.forget_extent(e.id)

    def all_extents(self, dying: bool = False) -> list[Extent]:
        """Every extent (with `dying`, also those gc is about to delete or restore)."""
        tables = ("extents", "dying") if dying else ("extents",)
        with self.meta.read() as txn:
            return [Extent.from_json(U64.unpack(k)[0], loads(v))
                    for table in tables for k, v in self.meta.items(txn, table)]

    def extent_bytes(self) -> int:
        """Record bytes in every extent, dying ones too (one replica's worth):
        the extents table, with the length this process has appended to its
        own open extent (another process's open extent counts its header only
        until it is sealed)."""
        cur = self._current
        total = 0
        for e in self.all_extents(dying=True):
            length = cur.length if cur is not None and cur.id == e.id else e.length
            total += max(length - rec.FILE_HEADER, 0)
        return total

    def rereplicate(self) -> list[tuple[int, int, int]]:
        """Give every sealed extent 3 replicas again: make a new one on a
        healthy node in a fault domain the extent is not on, each record taken
        from whichever replica verifies it (a corrupt copy is never copied).
        Returns (extent, lost node, new node) for each copy made."""
        self.refresh_nodes()
        with self._lock:
            cur = self._current
            if cur is not None and not all(self._replica_ok(cur, n) for n in cur.nodes):
                self._seal(cur, cur.length)  # every replica held all of it; re-made below
        made = []
        for e in self.all_extents():
            if e.state != "sealed":
                continue
            for n in list(e.nodes):
                if self._replica_ok(e, n):
                    continue
                if not any(m != n and self._reachable(m) is not None for m in e.nodes):
                    continue
                domains = {self.nodes[m].fault_domain for m in e.nodes if m != n}
                try:
                    target = self.place(exclude=set(e.nodes), count=1, avoid_domains=domains)[0]
                except NotEnoughNodes:
                    continue
                # The copy's target is recorded before its file exists, so
                # the orphan scan (in any process) leaves a live copy alone
                # and deletes the file of one whose process died.
                if not self._commit_extent(e, {"node": target, "owner": os.getpid(), "started": own_start()}):
                    break  # gc deleted it
                try:
                    self._copy_replica(e, target)
                except (DataLost, OSError):
                    self._commit_extent(e, None)
                    continue  # no good copy anywhere, or the target failed: scrub and check report it
                e.nodes = [target if m == n else m for m in e.nodes]
                gone = not self._commit_extent(e, None)
                if gone:  # gc deleted it during the copy: the copy goes too
                    self.nodes[target].drop(e.id)
                    break
                self._extents[e.id] = e
                if self.nodes[n].state is NodeState.UP:
                    self.nodes[n].drop(e.id)
                made.append((e.id, n, target))
        return made

    def _commit_extent(self, e: Extent, copy: dict[str, int] | None) -> bool:
        """Store e (with `copy` as its copy marker); False if gc deleted it.
        Marks GONE: a replica may have left a node (rare: no need to tell)."""
        e.copy = copy
        with self.meta.write() as txn:
            if txn.get(U64.pack(e.id), db=self.meta.db["extents"]) is None:
                return False
            self.meta.put_json(txn, "extents", U64.pack(e.id), e.to_json())
            self.mark_gone(txn)
        return True

    def _replica_ok(self, e: Extent, n: int) -> bool:
        node = self.nodes.get(n)
        if node is None or not node.healthy or not os.path.exists(node.extent_path(e.id)):
            return False
        try:
            return node.size(e.id) >= e.length
        except OSError:
            return False

    def _copy_replica(self, e: Extent, target: int) -> None:
        """Make the replica on `target` record by record, each record taken
        from any other replica that verifies it, then sync it."""
        dst = self.nodes[target]
        dst.drop(e.id)
        try:
            dst.fd(e.id, create=True)
            dst.append(e.id, rec.pack_file_header(uuid.UUID(int=e.id)), 0)
            pos = rec.FILE_HEADER
            while pos < e.length:
                raw, _ = self._good_record(e, pos, e.length)
                if raw is None:
                    raise DataLost(f"extent {e.id}: no replica holds a good copy of the record at {pos}; "
                                   f"node {dst.name} was not given a copy")
                dst.append(e.id, raw, pos)
                pos += len(raw)
            dst.sync(e.id)
        except (DataLost, OSError):
            dst.drop(e.id)  # no half-made replica is left behind
            raise

    def _reachable(self, n: int) -> Node | None:
        """Node n if its replicas can be read (it is up)."""
        node = self.nodes.get(n)
        return node if node is not None and node.healthy else None

    def _good_record(self, e: Extent, pos: int, end: int | None) -> tuple[bytes | None, list[int]]:
        """The record at `pos` from the first replica on which it verifies
        whole (header, checksums, data), and the replicas on which it does not
        (missing replica files are left to rereplicate). With `end` None,
        records may run to any replica's end."""
        good, bad = None, []
        for n in e.nodes:
            node = self._reachable(n)
            if node is None or not os.path.exists(node.extent_path(e.id)):
                continue
            try:
                limit = node.size(e.id) if end is None else end
                raw = rec.read_record(functools.partial(_read_replica, node, e.id), pos, limit)
            except (rec.RecordError, OSError):
                bad.append(n)
                continue
            if good is None:
                good = raw
        return good, bad

    def _walk(self, e: Extent, end: int | None, heal: bool, report: ScrubReport) -> int:
        """Verify e's replicas: every file header, then every record up to
        `end` (None: while some replica holds a verified record). Each bad or
        short copy is counted and, with heal, rewritten from a good one.
        Returns where the walk stopped (end, unless a record has no good copy)."""
        self._check_file_headers(e, heal, report)
        pos = rec.FILE_HEADER
        while end is None or pos < end:
            good, bad = self._good_record(e, pos, end)
            if good is None:
                if end is not None:
                    report.problems.append(f"extent {e.id}: record at {pos} has no good copy (data lost)")
                return pos
            report.records += 1
            report.bad += len(bad)
            for b in bad:
                if heal and self._heal(e.id, b, good, pos):
                    report.healed += 1
                else:
                    report.problems.append(f"extent {e.id}: record at {pos} is corrupt or missing on node "
                                           f"{self.nodes[b].name}")
            pos += len(good)
        return pos

    def _check_file_headers(self, e: Extent, heal: bool, report: ScrubReport) -> None:
        want = uuid.UUID(int=e.id)
        for n in e.nodes:
            node = self._reachable(n)
            if node is None or not os.path.exists(node.extent_path(e.id)):
                continue
            try:
                rec.verify_file_header(node.read(e.id, rec.FILE_HEADER, 0), want)
                continue
            except (rec.RecordError, OSError):
                report.bad += 1
            if heal and self._heal(e.id, n, rec.pack_file_header(want), 0):
                report.healed += 1
            else:
                report.problems.append(f"extent {e.id}: file header is corrupt on node {node.name}")

    def scrub(self, heal: bool = True) -> ScrubReport:
        """Verify every byte of every record on every reachable replica, file
        headers included; with heal, rewrite bad copies from a good replica
        and delete replica files of extents that no longer exist."""
        self.refresh_nodes()
        report = ScrubReport()
        self._orphans(heal, report)
        for e in self.all_extents():
            end = e.length
            if self._current is not None and self._current.id == e.id:
                end = self._current.length
            elif e.state == "open":
                continue  # another live process is appending to it
            self._walk(e, end, heal, report)
        return report

    def _orphans(self, remove: bool, report: ScrubReport) -> None:
        """Count (and with `remove`, delete) replica files no extent holds:
        files of extents the metadata no longer has (a gc or a drop killed
        between its commit and its file deletions) and files on nodes that
        are not the extent's members (a replica re-made elsewhere while its
        node was down, a re-replication killed midway). The folders are
        listed before the table is read, and a replica file is only ever
        made after the record naming its node (member or copy target) is
        committed, so a listed file that a later read does not name is
        nobody's."""
        listed = []
        for node in self.nodes.values():
            try:
                names = os.listdir(os.path.join(node.folder, "extents"))
            except FileNotFoundError:
                continue
            listed += [(node, int(name[:16], 16)) for name in names if _REPLICA_NAME.fullmatch(name)]
        known = {e.id: e for e in self.all_extents(dying=True)}
        for node, extent_id in listed:
            e = known.get(extent_id)
            if e is None or not e.holds(node.id):
                report.orphans += 1
                if remove:
                    node.drop(extent_id)

    def forget_node(self, node_id: int) -> None:
        """Close a node's replica files (its folder is going away); no append
        is under way meanwhile."""
        with self._lock:
            self._fast = None
            self.nodes[node_id].forget()

    def forget_extent(self, extent_id: int) -> None:
        """Drop cached knowledge of an extent that gc deleted."""
        self._fast = None
        self._extents.pop(extent_id, None)
        self._synced.pop(extent_id, None)

    def flush(self) -> None:
        """Sync the replicas of the extent being appended to. One that cannot
        be synced (its node down or lost) seals the extent: its records are
        synced on the others, re-replication makes the third copy, and the
        next append goes to a new extent. Appends go on during the syncs."""
        with self._lock:
            if os.pread(self._epoch_fd, 8, 0) != self._epoch:  # a node changed, maybe in another process
                self.refresh_nodes()
            e = self._current
        if e is None:
            return
        failed = False
        for n in e.nodes:
            try:
                self.nodes[n].sync(e.id)
            except OSError:
                failed = True
        if failed:
            with self._lock:
                if self._current is e:
                    self._seal(e, e.length)

    def seal_current(self) -> None:
        """Seal the extent this process appends to (the next append opens a new one)."""
        with self._lock:
            if self._current is not None:
                self._seal(self._current, self._current.length)

    def close(self) -> None:
        self._stop_watching()
        self.seal_current()
        _LIVE_TOKENS.discard(self.token)
        with self._lock:  # no append holds a descriptor about to close
            self._fast = None
            for node in self.nodes.values():
                node.forget()
            if self._epoch_fd >= 0:  # closing twice is allowed
                os.close(self._epoch_fd)
                self._epoch_fd = -1


_WATCHED: weakref.WeakSet[StreamLayer] = weakref.WeakSet()  # layers whose release thread runs


@atexit.register
def _stop_all_watching() -> None:
    """At exit, stop the release threads of layers never closed, before the
    interpreter tears down what they use (LMDB environments)."""
    for layer in list(_WATCHED):
        layer._stop_watching()


def open_node_epoch(root: str) -> int:
    """STAMP/nodes.epoch: 8 bytes rewritten (random) after every change of a
    node's state, so each appender notices it with one pread before its next
    append and reloads the states from the metadata. Made whole at create,
    so rewriting it in place never needs a new disk block."""
    fd = os.open(os.path.join(root, "nodes.epoch"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if os.fstat(fd).st_size < 8:
        try:
            os.pwrite(fd, bytes(8), 0)
        except OSError:
            pass  # a full disk: reads as b"" until a fault is injected with space to record it
    return fd


__all__ = ["StreamLayer", "Location", "Extent", "NodeDown", "REPLICAS"]
