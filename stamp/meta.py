"""The stamp's metadata: one LMDB environment, its tables and their encodings.

Every table is declared here with its key and value layout, so the stream and
partition layers share one definition. Rules:
- a write transaction starts and commits in one function, on one thread;
- keys are big-endian so LMDB's byte order is numeric order;
- durability mode "fsync" syncs every commit; "os" leaves that to the kernel
  (safe against process crashes, not against power loss);
- LMDB writes through its shared map (writemap): a commit is then no system
  call at all, where copying dirty pages out had cost about 6 us of a 4 KiB
  page write's 23. The price: data.mdb is a sparse file of MAP_SIZE, and a page
  first touched on a full disk would end the process with SIGBUS. So disk
  blocks are taken with fallocate ahead of LMDB's use (`reserve()`), where a
  full disk is an ordinary error (MetadataFull) raised before the write.
  Page writes stop at once on a full disk, which leaves at least
  RESERVE_MIN / 2 minus 15 small transactions of taken blocks; management
  transactions (deletes, gc, sealing) may use those down to SPARE, so a
  stamp on a full disk still opens, lists, checks, deletes and collects;
- no nested transactions (LMDB does not allow them with writemap): a
  `write()` opened on a thread that already holds one joins it (no commit of
  its own), so a check and the change it guards can run as one transaction
  (`atomic()`), the change's own `write()` included;
- a process killed inside a read transaction leaves its reader slot behind,
  and LMDB keeps every page that reader could see: each later write takes
  new pages. Stale slots are cleared (`reader_check`) on open and whenever
  the metadata is about to grow (`reserve()`), so that growth stops within
  one reserve step (RESERVE_MIN / 2, or a sixteenth of what is used).

Tables
  nodes      u32 node id            -> JSON {name, fault_domain, state, slow_ms, full, generation}
  extents    u64 extent id          -> JSON {nodes: [3 ids], state: open|sealed, length, owner, token,
                                             started, copy (while a replica is re-made)}
  dying      u64 extent id          -> the same JSON, for a sealed extent gc is proving unreferenced
                                       (moved out of `extents` so no new pointer to it commits; see gc)
  counters   name                   -> u64
  blobs      name (utf-8)           -> JSON {id, created, properties...}
  blobstate  u64 blob id            -> STATE (epoch, latest snapshot epoch, size, lease, version word:
                                             content version << 1 | 1 if someone read it since it moved)
  snaps      u64 blob id, u32 epoch -> JSON {snapshot, epoch, time, size, metadata}
  snapnames  u64 blob id, snapshot id (utf-8) -> the same JSON
  pages      u64 blob id, u64 page  -> PIECE (the live index)
  frozen     u64 blob id, u32 epoch, u64 page -> PIECE (kept for snapshot `epoch`)
  pagehist   u64 blob id, u64 page, u32 epoch -> PLACE (frozen's index by place: one entry per page
                                             of a frozen piece outside the whole runs it covers)
  runhist    u64 blob id, u64 run, u32 epoch -> PLACE (the same, one entry per run of 64 aligned pages
                                             a frozen piece covers whole)
  history    legacy (the older, per-cell index of frozen): emptied when a stamp is opened
  changes    u64 blob id, u32 epoch, u64 page -> u64 end page (pages changed in epoch)
  resources  "disk/NAME", "image/NAME", "snapshot/NAME" -> JSON (managed disks, images, snapshots)
  containers name (utf-8)           -> JSON {name, created, modified, rev, metadata, public_access}
                                       (the blobs of container C are the blobs named "C/...")
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lmdb

from .errors import MetadataFull

TABLES = ("nodes", "extents", "counters", "blobs", "blobstate", "snaps", "snapnames", "pages", "frozen",
          "resources",
          "changes", "history", "pagehist", "runhist", "dying", "containers")
MAP_SIZE = 1 << 36  # 64 GiB: the metadata's limit, and data.mdb's apparent (sparse) size
RESERVE_MIN = 8 << 20  # blocks taken ahead of use: at least this, or an eighth of what is used
SPARE = 1 << 20  # on a full disk, management transactions stop this far from the blocks taken

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
BLOB_PAGE = struct.Struct(">QQ")
BLOB_EPOCH = struct.Struct(">QI")
BLOB_EPOCH_PAGE = struct.Struct(">QIQ")
BLOB_PAGE_EPOCH = struct.Struct(">QQI")
# a frozen piece's start page, end page and generation
PLACE = struct.Struct("<QQI")
# end page, extent id, record offset, record length, inner byte offset, generation
PIECE = struct.Struct("<QQQIII")
# epoch, latest surviving snapshot epoch (-1: none), size, lease id (16 bytes), lease expiry (0: never),
# version word (the content version << 1, | 1 once observed: see PageBlobs.version)
STATE = struct.Struct("<IiQ16sdQ")
STATE_V1 = struct.Struct("<IiQ16sd")  # older stamps: no version word (the version was counter version/ID)
WORD = struct.Struct("<Q")  # STATE's last field alone
assert STATE.size == STATE_V1.size + WORD.size


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw)


# LMDB allows one environment per file per process: Stamp objects on the same
# folder in one process share it (counted, closed with the last one).
_OPEN: dict[str, tuple[lmdb.Environment, int]] = {}
_OPEN_LOCK = threading.Lock()
_HELD = threading.local()  # .txns: {environment key: the write transaction this thread holds}


class Meta:
    """The LMDB environment of one stamp folder."""

    def __init__(self, path: str, sync: bool) -> None:
        os.makedirs(path, exist_ok=True)
        self.key = os.path.realpath(path)
        with _OPEN_LOCK:
            env, count = _OPEN.get(self.key, (None, 0))
            if env is None:
                env = lmdb.open(path, max_dbs=len(TABLES) + 2, map_size=MAP_SIZE, sync=sync,
                                metasync=sync, max_readers=512, readahead=False, writemap=True)
            _OPEN[self.key] = (env, count + 1)
        self.env = env
        self.db = {name: self.env.open_db(name.encode()) for name in TABLES}
        self.closed = False
        self._data_fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
        self._page = int(env.stat()["psize"])
        self._reserved = 0
        self._commits = 0
        self.env.reader_check()
        try:
            self.reserve()
        except MetadataFull:
            pass  # a full disk: reads work, and each transaction checks for itself

    def reserve(self, spare: bool = True) -> None:
        """Make sure disk blocks back the pages LMDB will touch next: the used
        pages plus max(RESERVE_MIN, used / 8). Several processes may do this;
        they share the file, so each one's fallocate counts for all. On a full
        disk, a management transaction (`spare`) may still use the blocks
        already taken down to the last SPARE of them, so that a stamp on a
        full disk opens, lists, checks, deletes and collects garbage; the
        write path (not `spare`) is refused at once, with nothing stored."""
        used = (int(self.env.info()["last_pgno"]) + 1) * self._page
        ahead = max(RESERVE_MIN, used // 8)
        if used + ahead // 2 <= self._reserved:
            return
        self.env.reader_check()  # growing: first free what dead readers pinned (see the header)
        try:
            os.posix_fallocate(self._data_fd, 0, used + ahead)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._reserved = 0  # check again next time: space may come back
            if spare and used + SPARE <= self._allocated():
                return
            raise MetadataFull(f"no space left for the stamp's metadata ({e.strerror}); "
                               "free some disk space (delete disks or snapshots, then `stamp gc`): "
                               "nothing was changed") from None
        self._reserved = used + ahead

    def _allocated(self) -> int:
        """Bytes of data.mdb from its start that have disk blocks. Blocks are
        only ever taken from the start (by reserve), so it is what the file
        holds, less a margin for the filesystem's own blocks (ext4's extent
        tree). SEEK_HOLE cannot say it: ext4 reports fallocated blocks
        nothing was written to yet as a hole."""
        return os.fstat(self._data_fd).st_blocks * 512 - (64 << 10)

    def before_small_write(self) -> None:
        """Called before each small transaction of the write path (a few pages
        at most): one in 16 runs reserve(), which keeps far inside the headroom,
        and each one does while the disk is full."""
        self._commits += 1
        if not self._commits & 15 or not self._reserved:
            self.reserve(spare=False)

    def read(self) -> lmdb.Transaction:
        return self.env.begin(write=False)

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed at the end; inside atomic() on this
        thread, atomic()'s own (committed, or aborted on an error, by it)."""
        held = self.held()
        if held is not None:
            yield held
            return
        self.reserve()
        with self.env.begin(write=True) as txn:
            yield txn

    def held(self) -> lmdb.Transaction | None:
        """The atomic() transaction this thread is in, if any (a read in it
        must use it to see its changes)."""
        return getattr(_HELD, "txns", {}).get(self.key)

    @contextmanager
    def atomic(self) -> Iterator[lmdb.Transaction]:
        """One write transaction that every write() on this thread joins
        until it ends: a check and the change it guards commit together."""
        txns = _HELD.__dict__.setdefault("txns", {})
        if self.key in txns:
            yield txns[self.key]
            return
        with self.write() as txn:
            txns[self.key] = txn
            try:
                yield txn
            finally:
                del txns[self.key]

    def next_id(self, txn: lmdb.Transaction, name: str) -> int:
        key = name.encode()
        raw = txn.get(key, db=self.db["counters"])
        value = (U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(key, U64.pack(value), db=self.db["counters"])
        return value

    def get_json(self, txn: lmdb.Transaction, table: str, key: bytes) -> Any:
        raw = txn.get(key, db=self.db[table])
        return None if raw is None else loads(bytes(raw))

    def put_json(self, txn: lmdb.Transaction, table: str, key: bytes, value: Any) -> None:
        txn.put(key, dumps(value), db=self.db[table])

    def items(self, txn: lmdb.Transaction, table: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=self.db[table])
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                return
            yield bytes(key), bytes(value)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self._data_fd)
        with _OPEN_LOCK:
            env, count = _OPEN[self.key]
            if count == 1:
                del _OPEN[self.key]
                env.close()
            else:
                _OPEN[self.key] = (env, count - 1)
