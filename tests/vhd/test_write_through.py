"""Write-through images (SparseImage.write_through): a process kill at any
I/O operation loses no acknowledged write. The kill keeps every write the
file completed (a page blob behind the host cache, or a file's page cache),
so the bytes after the kill are CrashFile.current at the failed operation.
"""

from __future__ import annotations

import os

import pytest

from vhd import check
from vhd.fileio import MemFile

from .crashfile import Crash, CrashFile
from .test_crash import SECTORS, SIZE, fresh, open_crashed, open_crashed_on, workload


class Acked:
    """Per sector: the value of the last acknowledged write, and the value
    of the write in flight (which may or may not have landed)."""

    def __init__(self, initial: bytes) -> None:
        self.acked = bytearray(initial)
        self.inflight: dict[int, bytes] = {}

    def begin(self, off: int, data: bytes) -> None:
        self.inflight = {(off + i) // 512: data[i:i + 512] for i in range(0, len(data), 512)}

    def done(self, off: int, data: bytes) -> None:
        self.acked[off:off + len(data)] = data
        self.inflight = {}

    def verify(self, data: bytes) -> None:
        for s in range(SECTORS):
            got = data[s * 512:(s + 1) * 512]
            ok = {bytes(self.acked[s * 512:(s + 1) * 512])}
            if s in self.inflight:
                ok.add(self.inflight[s])
            assert got in ok, f"sector {s} lost an acknowledged write"


def run_acked(img, ops, expect: Acked) -> None:
    """The workload with no flush at all: write-through must not need one."""
    for op in ops:
        if op[0] == "flush":
            continue
        if op[0] == "write":
            _, off, n, v = op
            data = bytes([v]) * n
        else:
            _, off, n = op
            data = bytes(n)
        expect.begin(off, data)
        if op[0] == "write":
            img.write(off, data)
        else:
            img.discard(off, n)
        expect.done(off, data)


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize("seed", range(30 if os.environ.get("DISKSTAMP_SLOW") else 4))
def test_a_kill_at_any_operation_loses_no_acknowledged_write(kind, seed):
    ops = workload(seed)
    start, _ = fresh(kind)
    initial = open_crashed(kind, start).read(0, SIZE)
    counter = CrashFile(start)
    img = open_crashed_on(kind, counter)
    img.write_through = True
    run_acked(img, ops, Acked(initial))
    total = counter.ops
    assert total > 10
    for k in range(total + 1):
        file = CrashFile(start, fail_at=k)
        expect = Acked(initial)
        img = open_crashed_on(kind, file)
        img.write_through = True
        try:
            run_acked(img, ops, expect)
        except Crash:
            pass
        raw = bytes(file.current)  # a kill: every completed write is there, nothing was synced
        assert check(MemFile(raw)).ok, k
        expect.verify(open_crashed(kind, raw).read(0, SIZE))


def test_write_through_needs_no_sync_per_write():
    """The order alone keeps it safe on a write-through file: no sync is issued."""
    start, _ = fresh("differencing")
    file = CrashFile(start)
    img = open_crashed_on("differencing", file)
    img.write_through = True
    syncs = []
    file.sync = lambda: syncs.append(1)  # type: ignore[method-assign]
    for i in range(0, SIZE, 8192):
        img.write(i, b"\x42" * 4096)
    assert syncs == []
