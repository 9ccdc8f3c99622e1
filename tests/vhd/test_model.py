"""A real image chain driven by Hypothesis next to a bytearray model.

One state machine, run over fixed, dynamic and differencing chains of depth
1 to 4: writes (aligned and not, across blocks, zeros included), discards,
flushes, reopen, merge, convert and compact. After every step the top file
passes check() even with metadata not yet flushed.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vhd
from vhd.fileio import OsFile

BS = 16 << 10
SIZE = 40 * BS + 1536  # the last block is partial


class ImageMachine(RuleBasedStateMachine):
    kind = "dynamic"
    depth = 0

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vhd-model-")
        self.model = bytearray(SIZE)
        self.paths: list[str] = []
        base = os.path.join(self.dir, "l0.vhd")
        img = vhd.create(base, SIZE, type=self.kind, block_size=BS)
        self._seed_level(img, 0)
        img.close()
        self.paths.append(base)
        for level in range(1, self.depth + 1):
            path = os.path.join(self.dir, f"l{level}.vhd")
            img = vhd.create(path, parent=self.paths[-1], block_size=BS)
            self._seed_level(img, level)
            img.close()
            self.paths.append(path)
        self.img = vhd.open(self.paths[-1], writable=True)

    def _seed_level(self, img, level: int) -> None:
        """Each level owns a few sectors so reads must fall through correctly."""
        for i in range(3):
            off = ((level * 7 + i * 13) % 40) * BS + 512 * (level + i)
            data = bytes([0x10 * (level + 1) + i]) * 1024
            img.write(off, data)
            self.model[off:off + len(data)] = data

    @property
    def top(self) -> str:
        return self.paths[-1]

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * BS), value=st.integers(0, 255),
          aligned=st.booleans())
    def write(self, off, n, value, aligned):
        if aligned:
            off -= off % 512
            n = -(-n // 512) * 512
        n = min(n, SIZE - off)
        data = bytes((value + (i >> 9)) & 0xFF for i in range(n)) if value else bytes(n)
        self.img.write(off, data)
        self.model[off:off + n] = data

    @rule(off=st.integers(0, SIZE // 512 - 1), n=st.integers(1, 3 * BS // 512))
    def discard(self, off, n):
        off *= 512
        n = min(n * 512, SIZE - off)
        self.img.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule()
    def flush(self):
        self.img.flush()

    @rule()
    def reopen(self):
        self.img.close()
        self.img = vhd.open(self.top, writable=True)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * BS))
    def read(self, off, n):
        n = min(n, SIZE - off)
        assert self.img.read(off, n) == bytes(self.model[off:off + n])

    @precondition(lambda self: self.depth > 0)
    @rule()
    def merge(self):
        self.img.close()
        vhd.merge(self.top, show_progress=False)
        self.img = vhd.open(self.top, writable=True)
        assert self.img.allocated_blocks() == []

    @rule(to=st.sampled_from(["raw", "fixed", "dynamic"]), sync=st.booleans())
    def convert(self, to, sync):
        self.img.close()
        out = os.path.join(self.dir, f"out.{to}")
        vhd.convert(self.top, out, to, block_size=BS, show_progress=False, sync=sync)
        with vhd.open_device(out, fmt="raw" if to == "raw" else "vhd") as dev:  # type: ignore[attr-defined]
            assert dev.read(0, SIZE) == bytes(self.model)
        os.unlink(out)
        self.img = vhd.open(self.top, writable=True)

    @precondition(lambda self: self.kind == "dynamic" or self.depth > 0)
    @rule()
    def compact(self):
        self.img.close()
        vhd.compact(self.top, show_progress=False)
        self.img = vhd.open(self.top, writable=True)

    @invariant()
    def file_is_always_a_valid_vhd(self):
        f = OsFile(self.top, lock=False)
        try:
            report = vhd.check(f)
        finally:
            f.close()
        assert report.ok, [str(p) for p in report.problems]

    def teardown(self):
        self.img.close()
        with vhd.open(self.top) as img:
            assert img.read(0, SIZE) == bytes(self.model)
        shutil.rmtree(self.dir)


def machine(kind: str, depth: int):
    cls = type(f"Machine_{kind}_{depth}", (ImageMachine,), {"kind": kind, "depth": depth})
    case = cls.TestCase
    slow = bool(os.environ.get("DISKSTAMP_SLOW"))  # long runs: DISKSTAMP_SLOW=1
    case.settings = settings(max_examples=300 if slow else 15, stateful_step_count=40 if slow else 25,
                             deadline=None)
    return case


TestFixed = machine("fixed", 0)
TestDynamic = machine("dynamic", 0)
TestDiff1 = machine("dynamic", 1)
TestDiff2OverFixed = machine("fixed", 2)
TestDiff4 = machine("dynamic", 4)
