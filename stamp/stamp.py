"""A storage stamp in one folder: extent nodes, metadata, page blobs.

    STAMP/stamp.json        configuration (nodes, fault domains, durability)
    STAMP/meta/             LMDB: the stream manager's and partition layer's tables
    STAMP/nodes/node-NN/    one extent node each: node.json and extents/

`Stamp.create` lays a folder out; `Stamp.open` opens it (several processes may
open one stamp; each appends only to extents it created, and on open seals
extents left open by processes that died). `check()` walks everything.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vhd.blockdev import Alloc, Extent, align_write, check_range, ranges_to_extents

from . import record as rec
from .containers import Containers
from .errors import StampError
from .meta import PIECE, U32, U64, Meta
from .node import NodeState
from .pageblob import PAGE, BlobState, PageBlobs
from .stream import DEFAULT_EXTENT_SIZE, REPLICAS, StreamLayer, owner_alive

DURABILITY = ("os", "fsync")
_LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Sync the whole filesystem holding `fd` (Linux syncfs(2); os.sync() elsewhere)."""
    call = getattr(_LIBC, "syncfs", None)
    if call is None:
        os.sync()
    elif call(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "stats": self.stats}


class Stamp:
    def __init__(self, path: str, config: dict[str, Any]) -> None:
        self.path, self.config = path, config
        self.fsync = config["durability"] == "fsync"
        self.meta = Meta(os.path.join(path, "meta"), sync=self.fsync)
        self.stream = StreamLayer(path, self.meta, self.fsync, config.get("extent_size", DEFAULT_EXTENT_SIZE))
        self.blobs = PageBlobs(self.meta, self.stream)
        self.containers = Containers(self.meta, self.blobs)
        self.stream.recover()

    @classmethod
    def create(cls, path: str, *, nodes: int = 6, fault_domains: int = 3, durability: str = "os",
               extent_size: int = DEFAULT_EXTENT_SIZE) -> Stamp:
        if durability not in DURABILITY:
            raise StampError(f"durability must be one of {', '.join(DURABILITY)}")
        if fault_domains < REPLICAS or nodes < fault_domains:
            raise StampError(f"a stamp needs at least {REPLICAS} fault domains and a node in each "
                             f"(asked: {nodes} nodes in {fault_domains} fault domains)")
        if extent_size < 1 << 20:
            raise StampError("extent size must be at least 1 MiB")
        if os.path.exists(os.path.join(path, "stamp.json")):
            raise StampError(f"{path} already holds a stamp")
        os.makedirs(path, mode=0o700, exist_ok=True)  # made here: private (its extents hold disks' data)
        config = {"version": 1, "durability": durability, "extent_size": extent_size,
                  "nodes": nodes, "fault_domains": fault_domains}
        meta = Meta(os.path.join(path, "meta"), sync=True)
        with meta.write() as txn:
            for i in range(nodes):
                name = f"node-{i:02d}"
                folder = os.path.join(path, "nodes", name)
                os.makedirs(os.path.join(folder, "extents"), exist_ok=True)
                info = {"name": name, "fault_domain": i % fault_domains}
                with open(os.path.join(folder, "node.json"), "w") as f:
                    json.dump(info, f)
                meta.put_json(txn, "nodes", U32.pack(i), {**info, "state": "up", "slow_ms": 0, "full": False})
        meta.close()
        tmp = os.path.join(path, "stamp.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, "stamp.json"))  # the folder is a stamp from here on
        return cls(path, config)

    @classmethod
    def open(cls, path: str) -> Stamp:
        try:
            with open(os.path.join(path, "stamp.json")) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise StampError(f"{path} is not a stamp (no stamp.json); create one with `stamp init {path}`") from None
        except (json.JSONDecodeError, OSError) as e:
            raise StampError(f"{path}/stamp.json: {e}") from None
        return cls(path, config)

    def close(self) -> None:
        self.blobs.pressure.close()
        self.stream.close()
        self.meta.close()

    def __enter__(self) -> Stamp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- page blobs as block devices -------------------------------------------------

    def blob(self, name: str, writable: bool = False) -> BlobDevice:
        """A page blob as a block device; a writable one holds the blob's lease
        (one writer per blob, across processes)."""
        return BlobDevice(self, name, writable)

    def flush(self) -> None:
        """Make everything acknowledged durable against power loss too."""
        self.stream.flush()
        self.meta.sync()

    def flush_shared(self) -> None:
        """flush(), and also what every other process using the stamp
        acknowledged: flush() syncs only the extent this process appends to,
        so a server whose clients' writes land in several processes (hostcache
        serve --workers) syncs each filesystem holding the stamp's files
        (syncfs: the nodes' folders and the metadata)."""
        self.flush()
        seen: set[int] = set()
        nodes = os.path.join(self.path, "nodes")
        folders = [self.path, os.path.join(self.path, "meta")]
        if os.path.isdir(nodes):
            folders += [os.path.join(nodes, n) for n in sorted(os.listdir(nodes))]
        for folder in folders:
            fd = os.open(os.path.realpath(folder), os.O_RDONLY | os.O_DIRECTORY)
            try:
                dev = os.fstat(fd).st_dev
                if dev not in seen:
                    seen.add(dev)
                    syncfs(fd)
            finally:
                os.close(fd)

    # -- faults ------------------------------------------------------------------------

    def node_id(self, name_or_id: str | int) -> int:
        for node in self.stream.nodes.values():
            if str(name_or_id) in (node.name, str(node.id)):
                return node.id
        raise StampError(f"no extent node {name_or_id!r}; nodes: {', '.join(n.name for n in self.nodes())}")

    def nodes(self) -> list[Any]:
        self.stream.refresh_nodes()
        return sorted(self.stream.nodes.values(), key=lambda n: n.id)

    def inject(self, fault: str, node: str | int | None = None, **kw: Any) -> dict[str, Any]:
        """Inject a fault: node-down, node-up, node-lost, slow (ms=), full (on=), bitflip
        (extent=, offset=). Returns what was done."""
        if fault == "bitflip":
            return self._bitflip(int(kw["extent"]), node, kw.get("offset"))
        if node is None:
            raise StampError(f"fault {fault} needs a node")
        n = self.node_id(node)
        if fault == "node-down":
            self.stream.set_node(n, state="down")
        elif fault == "node-up":
            self.stream.set_node(n, state="up", slow_ms=0, full=False)
        elif fault == "node-lost":
            folder = self.stream.nodes[n].folder
            self.stream.forget_node(n)
            self.stream.set_node(n, lost=True, state="lost")
            for entry in os.listdir(os.path.join(folder, "extents")):
                try:
                    os.unlink(os.path.join(folder, "extents", entry))
                except FileNotFoundError:
                    pass  # gc (in any process) deleted it meanwhile
        elif fault == "node-replaced":  # a lost node comes back empty
            self.stream.set_node(n, state="up", slow_ms=0, full=False)
        elif fault == "slow":
            self.stream.set_node(n, slow_ms=_slow_ms(kw.get("ms", 50)))
        elif fault == "full":
            self.stream.set_node(n, full=bool(kw.get("on", True)))
        else:
            raise StampError(f"unknown fault {fault!r}: node-down, node-up, node-lost, node-replaced, "
                             "slow, full, bitflip")
        return {"fault": fault, "node": self.stream.nodes[n].name}

    def _bitflip(self, extent_id: int, node: str | int | None, offset: int | None) -> dict[str, Any]:
        if not 0 < extent_id < 1 << 64:
            raise StampError(f"no extent {extent_id}")
        e = self.stream.extent(extent_id, refresh=True)
        n = self.node_id(node) if node is not None else e.nodes[0]
        if n not in e.nodes:
            raise StampError(f"extent {extent_id} has no replica on node {node}")
        path = self.stream.nodes[n].extent_path(extent_id)
        size = os.path.getsize(path)
        if size <= rec.FILE_HEADER + rec.RECORD_HEADER + rec.CHECK:
            raise StampError(f"extent {extent_id} holds no data to corrupt")
        at = offset if offset is not None else rec.FILE_HEADER + rec.RECORD_HEADER + rec.CHECK + 1
        if not 0 <= at < size:
            raise StampError(f"offset {at} is outside extent {extent_id}'s replica file ({size} bytes)")
        with open(path, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x40]))
        return {"fault": "bitflip", "extent": extent_id, "node": self.stream.nodes[n].name, "offset": at}

    # -- check ---------------------------------------------------------------------------

    def check(self, deep: bool = True) -> CheckReport:
        """Walk the stamp: placement, extents, index vs extents, snapshot tables,
        and (deep) every record of every replica. The walk is not one
        snapshot: a reclaimer (any process: `hostcache serve` runs one) that
        deletes or moves extents during it makes it see pieces pointing at
        extents listed before as gone, and replicas it listed as missing or
        lost. So a walk that found problems is made again, and only those
        found both times are reported: what gc deleted during the first walk
        is not listed in the second, a real problem stays."""
        first = self._check_once(deep)
        if first.ok:
            return first
        again = self._check_once(deep)
        again.problems = [p for p in again.problems if p in set(first.problems)]
        return again

    def _check_once(self, deep: bool) -> CheckReport:
        report = CheckReport()
        self.stream.recover()  # as an open does: a writer that died since this process opened the stamp
        extents = {e.id: e for e in self.stream.all_extents(dying=True)}  # dying: gc is deciding
        nodes = self.stream.nodes
        for e in extents.values():
            if e.state == "open" and not owner_alive(e):  # recovery waits for a down replica
                report.problems.append(f"extent {e.id}: open and its writer is gone; it is sealed when "
                                       f"{', '.join(self.stream.down_members(e)) or 'its nodes are'} back up")
            domains = {nodes[n].fault_domain for n in e.nodes if n in nodes}
            if len(e.nodes) != REPLICAS or len(set(e.nodes)) != REPLICAS:
                report.problems.append(f"extent {e.id}: {len(set(e.nodes))} distinct replicas, not {REPLICAS}")
            elif len(domains) != REPLICAS:
                report.problems.append(f"extent {e.id}: replicas share a fault domain")
            for n in e.nodes:
                node = nodes.get(n)
                if node is None or node.state is NodeState.LOST:
                    report.problems.append(f"extent {e.id}: its replica on node {n} is lost "
                                           "(stamp repair re-replicates it)")
                    continue
                if node.state is NodeState.DOWN:
                    report.problems.append(f"extent {e.id}: its replica on {node.name} is unavailable (node down)")
                    continue
                path = node.extent_path(e.id)
                if node.state is NodeState.UP and not os.path.exists(path):
                    report.problems.append(f"extent {e.id}: replica on {node.name} is missing (rereplicate)")
                elif node.state is NodeState.UP and os.path.getsize(path) < e.length and e.state == "sealed":
                    report.problems.append(f"extent {e.id}: replica on {node.name} is shorter than its sealed "
                                           "length")
        pieces = 0
        with self.meta.read() as txn:
            for table in ("pages", "frozen"):
                for key, raw in self.meta.items(txn, table):
                    pieces += 1
                    end, ext, off, length, inner, gen = PIECE.unpack(raw)
                    start = U64.unpack(key[-8:])[0]
                    where = f"{table} blob {U64.unpack(key[:8])[0]} page {start}"
                    owner = extents.get(ext)
                    if owner is None:
                        report.problems.append(f"{where}: points at missing extent {ext}")
                        continue
                    e = owner
                    if end <= start or inner + (end - start) * PAGE > length:
                        report.problems.append(f"{where}: range outside its record")
                    if off + rec.record_size(length) > e.length and e.state != "open":  # open: its writer's
                        report.problems.append(f"{where}: record at {off} lies past extent {ext}'s length")
            report.problems += self.blobs.check_history(txn)
            blobs = len(list(self.meta.items(txn, "blobs")))
            for key, raw in self.meta.items(txn, "blobstate"):
                st = BlobState.unpack(raw)
                snaps = [U32.unpack(k[8:12])[0] for k, _ in self.meta.items(txn, "snaps", key)]
                if st.latest != (max(snaps) if snaps else -1):
                    report.problems.append(f"blob {U64.unpack(key)[0]}: latest snapshot epoch {st.latest} "
                                           f"but snapshots are {snaps}")
        report.problems += self.containers.check()
        if deep:
            scrub = self.stream.scrub(heal=False)
            report.problems += scrub.problems
            report.stats.update(records=scrub.records, bad_copies=scrub.bad, orphan_files=scrub.orphans)
        report.stats.update({"extents": len(extents), "index_pieces": pieces, "blobs": blobs})
        return report


MAX_SLOW_MS = 60_000.0


def _slow_ms(ms: Any) -> float:
    """An injected delay: a finite number of milliseconds, 0 to MAX_SLOW_MS
    (each operation of the node sleeps that long: a negative or huge one
    would break every later command instead)."""
    value = float(ms)
    if not 0 <= value <= MAX_SLOW_MS:  # also refuses nan
        raise StampError(f"--ms must be 0 to {MAX_SLOW_MS:,.0f} milliseconds, not {ms}")
    return value


class BlobDevice:
    """A page blob as a block device (vhd.BlockDevice): any offset, with
    read-modify-write for partial pages; writes split at 4 MiB; discard clears."""

    def __init__(self, stamp: Stamp, name: str, writable: bool) -> None:
        self.stamp, self.name, self.readonly = stamp, name, not writable
        self.blobs = stamp.blobs
        self.size = self.blobs.size(name)
        self.lease: str | None = None
        if writable:
            self._take_lease()

    def _take_lease(self) -> None:
        self.lease = self.blobs.acquire_writer_lease(self.name)

    def read(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        lo = offset - offset % PAGE
        hi = -(-(offset + length) // PAGE) * PAGE
        out = bytearray()
        pos = lo
        while pos < hi:
            n = min(hi - pos, 4 * 1024 * 1024)
            out += self.blobs.read(self.name, pos, n)
            pos += n
        return bytes(out[offset - lo:offset - lo + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise StampError(f"blob {self.name!r} is open read-only")
        check_range(self.size, offset, len(data))
        offset, data = align_write(self.read, offset, data, PAGE)
        view = memoryview(data)
        for pos in range(0, len(view), 4 * 1024 * 1024):
            chunk = view[pos:pos + 4 * 1024 * 1024]
            self.blobs.write(self.name, offset + pos, chunk, lease=self.lease)

    def flush(self) -> None:
        self.stamp.flush()

    def discard(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)
        lo = -(-offset // PAGE) * PAGE
        hi = (offset + length) // PAGE * PAGE
        if hi > lo:
            self.blobs.clear(self.name, lo, hi - lo, lease=self.lease)
        for a, b in ((offset, min(lo, offset + length)), (max(hi, offset), offset + length)):
            if b > a:
                self.write(a, bytes(b - a))

    def allocation(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size, offset, length)
        ranges = self.blobs.page_ranges(self.name, offset=offset - offset % PAGE,
                                        length=-(-(offset + length) // PAGE) * PAGE - (offset - offset % PAGE))
        clipped = [(max(o, offset), min(o + n, offset + length) - max(o, offset)) for o, n in ranges]
        return ranges_to_extents(offset, length, [(o, n) for o, n in clipped if n > 0])

    def close(self) -> None:
        if self.lease is not None:
            try:
                self.blobs.release_lease(self.name, self.lease)
            except StampError:
                pass
            self.lease = None

    def __enter__(self) -> BlobDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Stamp", "BlobDevice", "CheckReport", "Alloc"]
