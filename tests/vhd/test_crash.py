"""Crash safety: stop a workload at every I/O operation, keep any subset of
the unsynced writes, reopen. The image always opens, check() passes, and
every sector holds its last flushed value or a value written after that
flush (a write in flight may or may not have landed) - never anything else.
"""

from __future__ import annotations

import os
import random

import pytest

from vhd import check
from vhd import footer as ft
from vhd.fileio import MemFile
from vhd.image import _write_sparse, create_dynamic, create_fixed, open_image

from .crashfile import Crash, CrashFile

BS = 16 << 10
SIZE = 12 * BS
SECTORS = SIZE // 512


def workload(seed: int) -> list[tuple]:
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(14):
        r = rng.random()
        if r < 0.6:
            off = rng.randrange(SECTORS) * 512
            n = min(rng.randrange(1, 3 * BS // 512) * 512, SIZE - off)
            ops.append(("write", off, n, rng.randrange(1, 256)))
        elif r < 0.7:
            off = rng.randrange(SECTORS) * 512
            ops.append(("discard", off, min(rng.randrange(1, 2 * BS // 512) * 512, SIZE - off)))
        else:
            ops.append(("flush",))
    ops.append(("flush",))
    return ops


class Expect:
    """Per sector: the value at the last completed flush, and values since."""

    def __init__(self, initial: bytes) -> None:
        self.current = bytearray(initial)
        self.flushed = bytes(initial)
        self.since: dict[int, set[bytes]] = {}

    def will_write(self, off: int, data: bytes) -> None:
        self.current[off:off + len(data)] = data
        for i in range(0, len(data), 512):
            self.since.setdefault((off + i) // 512, set()).add(data[i:i + 512])

    def flushed_now(self) -> None:
        self.flushed = bytes(self.current)
        self.since.clear()

    def verify(self, data: bytes) -> None:
        for s in range(SECTORS):
            got = data[s * 512:(s + 1) * 512]
            ok = {self.flushed[s * 512:(s + 1) * 512]} | self.since.get(s, set())
            assert got in ok, f"sector {s} holds a value never written there"


def run_workload(img, ops, expect: Expect) -> None:
    for op in ops:
        if op[0] == "write":
            _, off, n, v = op
            data = bytes([v]) * n
            expect.will_write(off, data)
            img.write(off, data)
        elif op[0] == "discard":
            _, off, n = op
            expect.will_write(off, bytes(n))
            img.discard(off, n)
        else:
            img.flush()
            expect.flushed_now()


def make_parent() -> bytes:
    f = MemFile()
    img = create_dynamic(f, SIZE, block_size=BS)
    img.write(0, bytes((i // 512) & 0xFF or 1 for i in range(SIZE)))
    img.flush()
    return bytes(f.buf)


PARENT = make_parent()


def fresh(kind: str) -> tuple[bytes, object]:
    """The starting bytes of the image under test, and its parent (if any)."""
    f = MemFile()
    if kind == "fixed":
        create_fixed(f, SIZE).flush()
        return bytes(f.buf), None
    if kind == "dynamic":
        create_dynamic(f, SIZE, block_size=BS).flush()
        return bytes(f.buf), None
    parent = open_image(MemFile(PARENT))
    _write_sparse(f, None, ft.DiskType.DIFFERENCING, SIZE, BS,
                  (parent.footer.unique_id, parent.footer.timestamp, "parent.vhd"), [], True, None)
    return bytes(f.buf), parent


def open_crashed(kind: str, raw: bytes, writable: bool = False):
    resolver = None
    if kind == "differencing":
        resolver = lambda path, header: open_image(MemFile(PARENT))  # noqa: E731
    return open_image(MemFile(raw), writable=writable, resolver=resolver)


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
@pytest.mark.parametrize("seed", range(40 if os.environ.get("DISKSTAMP_SLOW") else 4))
def test_crash_at_every_operation_loses_nothing_flushed(kind, seed):
    ops = workload(seed)
    start, _ = fresh(kind)
    initial = open_crashed(kind, start).read(0, SIZE)
    counter = CrashFile(start)
    run_workload(open_crashed_on(kind, counter), ops, Expect(initial))
    total = counter.ops
    assert total > 10
    rng = random.Random(seed)
    for k in range(total + 1):
        file = CrashFile(start, fail_at=k)
        expect = Expect(initial)
        img = open_crashed_on(kind, file)
        try:
            run_workload(img, ops, expect)
        except Crash:
            pass
        for _ in range(3):
            raw = file.crash(rng)
            report = check(MemFile(raw))
            assert report.ok, (k, [str(p) for p in report.problems])
            reopened = open_crashed(kind, raw, writable=True)
            expect.verify(reopened.read(0, SIZE))
            reopened.write(0, b"\x77" * 512)  # and it keeps working
            reopened.flush()
            assert check(reopened.file).ok


def open_crashed_on(kind: str, file: CrashFile):
    resolver = None
    if kind == "differencing":
        resolver = lambda path, header: open_image(MemFile(PARENT))  # noqa: E731
    return open_image(file, writable=True, resolver=resolver)
