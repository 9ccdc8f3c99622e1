"""Property-test snapshot consistency: strategies and a reusable state machine.

Needs hypothesis (pip install 'diskstamp[test]'). Subclass PageBlobMachine to
add your own workload rules; every rule you add may call `self.write`,
`self.clear` and friends, which keep the model in step. The machine drives a
real stamp (in a temporary folder) next to a model: the blob's bytes, which
pages hold data, and the log of pages touched; every snapshot keeps a frozen
copy. It checks every read, every snapshot read and every diff exactly.

    from stamp.testing import PageBlobMachine
    class MyWorkload(PageBlobMachine):
        @rule(n=st.integers(1, 8))
        def journal_append(self, n): ...
    TestMyWorkload = MyWorkload.TestCase
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .gc import collect
from .pageblob import PAGE
from .stamp import Stamp

BLOB = "disk"


def page_ranges(pages: int, max_pages: int = 64) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) in bytes: page-aligned, inside a blob of `pages` pages."""
    return st.integers(0, pages - 1).flatmap(
        lambda s: st.integers(1, min(max_pages, pages - s)).map(lambda n: (s * PAGE, n * PAGE)))


def page_data(length: int, seed: int) -> bytes:
    """Deterministic, page-distinct bytes: a read from the wrong place is caught."""
    return b"".join(((seed * 7919 + i) & 0xFFFFFFFF).to_bytes(4, "little") * (PAGE // 4)
                    for i in range(length // PAGE))


@dataclass
class Frozen:
    id: str
    data: bytes
    alloc: bytes  # one byte per page: 1 holds data
    seq: int  # position in the touch log when taken


class PageBlobMachine(RuleBasedStateMachine):
    """A page blob, its snapshots and diffs against a byte model."""

    pages = 96  # blob size in pages at the start
    extent_size = 1 << 20  # small extents: many seals and extent switches

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="stamp-model-")
        self.stamp = self.make_stamp(self.folder)
        self.stamp.blobs.create(BLOB, self.pages * PAGE)
        self.data = bytearray(self.pages * PAGE)
        self.alloc = bytearray(self.pages)
        self.log: list[set[int]] = []  # pages touched by each write/clear/resize, in order
        self.snaps: list[Frozen] = []
        self.seed = 0

    def make_stamp(self, folder: str) -> Stamp:
        return Stamp.create(folder, extent_size=self.extent_size)

    def reopen_stamp(self) -> Stamp:
        return Stamp.open(self.folder)

    # -- model-keeping operations (subclasses call these) --------------------------

    def write(self, offset: int, data: bytes) -> None:
        self.stamp.blobs.write(BLOB, offset, data)
        self.data[offset:offset + len(data)] = data
        first = offset // PAGE
        pages = range(first, first + len(data) // PAGE)
        for p in pages:
            self.alloc[p] = 1
        self.log.append(set(pages))

    def clear(self, offset: int, length: int) -> None:
        self.stamp.blobs.clear(BLOB, offset, length)
        self.data[offset:offset + length] = bytes(length)
        pages = range(offset // PAGE, (offset + length) // PAGE)
        for p in pages:
            self.alloc[p] = 0
        self.log.append(set(pages))

    def resize(self, size: int) -> None:
        self.stamp.blobs.resize(BLOB, size)
        old = len(self.alloc)
        new = size // PAGE
        self.log.append(set(range(new, old)) if new < old else set())
        del self.data[size:]
        del self.alloc[new:]
        self.data.extend(bytes(size - len(self.data)))
        self.alloc.extend(bytes(new - len(self.alloc)))

    # -- rules -----------------------------------------------------------------------

    @rule(r=page_ranges(pages), seed=st.integers(0, 2**16))
    def write_pages(self, r: tuple[int, int], seed: int) -> None:
        offset, length = r
        length = min(length, len(self.data) - offset)
        if length > 0:
            self.write(offset, page_data(length, seed))

    @rule(r=page_ranges(pages, 128))
    def clear_pages(self, r: tuple[int, int]) -> None:
        offset, length = r
        length = min(length, len(self.data) - offset)
        if length > 0:
            self.clear(offset, length)

    @rule(pages=st.integers(pages // 2, pages + 32))
    def resize_blob(self, pages: int) -> None:
        self.resize(pages * PAGE)

    @rule()
    def snapshot(self) -> None:
        snap = self.stamp.blobs.snapshot(BLOB)
        self.snaps.append(Frozen(snap.id, bytes(self.data), bytes(self.alloc), len(self.log)))

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 10**6))
    def delete_snapshot(self, i: int) -> None:
        snap = self.snaps.pop(i % len(self.snaps))
        self.stamp.blobs.delete_snapshot(BLOB, snap.id)

    @rule(r=page_ranges(pages, 128))
    def read_live(self, r: tuple[int, int]) -> None:
        offset, length = r
        length = min(length, len(self.data) - offset)
        if length > 0:
            assert self.stamp.blobs.read(BLOB, offset, length) == bytes(self.data[offset:offset + length])
            want = self.stamp.blobs.page_ranges(BLOB, offset=offset, length=length)
            assert list(self.stamp.blobs.iter_page_ranges(BLOB, offset=offset, length=length)) == want

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 10**6))
    def read_snapshot(self, i: int) -> None:
        snap = self.snaps[i % len(self.snaps)]
        assert self.stamp.blobs.read(BLOB, 0, len(snap.data), snapshot=snap.id) == snap.data
        ranges = self.stamp.blobs.page_ranges(BLOB, snapshot=snap.id)
        assert ranges == _runs(snap.alloc)
        assert list(self.stamp.blobs.iter_page_ranges(BLOB, snapshot=snap.id)) == ranges
        cut = (i % (len(snap.alloc) + 1)) * PAGE  # the lazy form from an offset: the same ranges, cut there
        want = [(max(o, cut), o + n - max(o, cut)) for o, n in ranges if o + n > cut]
        assert list(self.stamp.blobs.iter_page_ranges(BLOB, snapshot=snap.id, offset=cut)) == want

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 10**6), j=st.integers(0, 10**6), live=st.booleans())
    def diff(self, i: int, j: int, live: bool) -> None:
        a, b = sorted((i % len(self.snaps), j % len(self.snaps)))
        base = self.snaps[a]
        if live or a == b:
            target_alloc, upto, target = bytes(self.alloc), len(self.log), None
        else:
            tsnap = self.snaps[b]
            target_alloc, upto, target = tsnap.alloc, tsnap.seq, tsnap.id
        touched: set[int] = set().union(*self.log[base.seq:upto])
        touched = {p for p in touched if p < len(target_alloc)}
        want_written = _runs(bytes(1 if p in touched and target_alloc[p] else 0 for p in range(len(target_alloc))))
        want_cleared = _runs(bytes(1 if p in touched and not target_alloc[p] else 0
                                   for p in range(len(target_alloc))))
        got = self.stamp.blobs.diff(BLOB, base.id, target)
        assert got.written == want_written, (got.written, want_written)
        assert got.cleared == want_cleared, (got.cleared, want_cleared)
        both = sorted([(o, n, False) for o, n in got.written] + [(o, n, True) for o, n in got.cleared])
        assert list(self.stamp.blobs.iter_diff(BLOB, base.id, target)) == both
        cut = (j % (len(target_alloc) + 1)) * PAGE
        want = [(max(o, cut), o + n - max(o, cut), c) for o, n, c in both if o + n > cut]
        assert list(self.stamp.blobs.iter_diff(BLOB, base.id, target, offset=cut)) == want
        for chunk in (1, 2, 5):  # in short read transactions, resumed where each chunk stopped
            assert list(self.stamp.blobs.iter_diff(BLOB, base.id, target, chunk=chunk)) == both, chunk
            assert list(self.stamp.blobs.iter_diff(BLOB, base.id, target, offset=cut, chunk=chunk)) == want, chunk

    @rule(threshold=st.sampled_from([0.3, 0.9, 1.01]))
    def gc(self, threshold: float) -> None:
        """Reclaim space; every read and diff after it must be unchanged."""
        self.stamp.stream.seal_current()  # so gc may move what it holds too
        collect(self.stamp, compact_below=threshold)

    @rule()
    def reopen(self) -> None:
        self.stamp.close()
        self.stamp = self.reopen_stamp()

    @rule(node=st.integers(0, 5))
    def node_down_and_back(self, node: int) -> None:
        """A node goes down; writes move to healthy nodes; reads skip it; it returns."""
        self.stamp.inject("node-down", node)
        self.write_pages((0, PAGE * 4), self.seed)
        self.seed += 1
        self.read_live((0, PAGE * min(32, len(self.alloc))))
        self.stamp.inject("node-up", node)

    @invariant()
    def stamp_checks(self) -> None:
        report = self.stamp.check(deep=False)
        assert report.ok, report.problems

    def teardown(self) -> None:
        try:
            report = self.stamp.check(deep=True)
            assert report.ok, report.problems
        finally:
            self.stamp.close()
            shutil.rmtree(self.folder, ignore_errors=True)


def _runs(flags: bytes) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) of the runs of nonzero flags (one per page)."""
    out: list[tuple[int, int]] = []
    start = None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start * PAGE, (i - start) * PAGE))
            start = None
    if start is not None:
        out.append((start * PAGE, (len(flags) - start) * PAGE))
    return out
