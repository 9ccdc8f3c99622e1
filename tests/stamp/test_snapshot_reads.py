"""Snapshot reads through the history (pagehist) index: right (the model
machines, one with hot pages rewritten between many snapshots), bounded
(reading the oldest of many snapshots does not walk every snapshot's table,
nor every rewrite of a neighbouring page), checked, and built for stamps
made by older code."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

import stamp.meta
import stamp.pageblob
import stamp.ranges
from stamp import Stamp
from stamp.meta import BLOB_EPOCH, PIECE, PLACE, U64
from stamp.testing import PageBlobMachine, page_data

SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))
KIB = 1024
MIB = 1024 * KIB


def test_the_model_holds_with_snapshot_reads_through_the_page_index():
    run_state_machine_as_test(PageBlobMachine, settings=settings(
        max_examples=100 if SLOW else 15, stateful_step_count=40 if SLOW else 30, deadline=None))


@pytest.fixture
def many(tmp_path):
    """A blob with 200 snapshots; page 0 written before them all, page 8 overwritten after each."""
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 1 << 20)
    st.blobs.write("d", 0, b"A" * 4 * KIB)
    snaps = []
    for i in range(200):
        st.blobs.write("d", 8 * 512, bytes([i]) * 4 * KIB)
        snaps.append(st.blobs.snapshot("d").id)
        st.blobs.write("d", 64 * KIB + i * 4 * KIB, bytes([i]) * 4 * KIB)
    yield st, snaps
    st.close()


def test_reading_the_oldest_of_200_snapshots_looks_up_a_few_ranges(many, monkeypatch):
    st, snaps = many
    calls = []
    real = stamp.ranges.overlapping

    def counted(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)
    monkeypatch.setattr(stamp.ranges, "overlapping", counted)
    for snap, page8 in ((snaps[0], 0), (snaps[100], 100), (snaps[-1], 199)):
        calls.clear()
        assert st.blobs.read("d", 0, 4 * KIB, snapshot=snap) == b"A" * 4 * KIB
        assert len(calls) <= 1  # the live index once; no walk over 200 frozen tables
        calls.clear()
        assert st.blobs.read("d", 8 * 512, 4 * KIB, snapshot=snap) == bytes([page8]) * 4 * KIB
        assert len(calls) <= 1
    assert st.blobs.read("d", 64 * KIB, 200 * 4 * KIB, snapshot=snaps[0]) == bytes(200 * 4 * KIB)
    assert st.blobs.read("d", 64 * KIB, 4 * KIB, snapshot=snaps[1]) == bytes([0]) * 4 * KIB


def make_legacy_history(st, with_index: bool) -> None:
    """Put `st` back to the layout older code left: the per-cell `history`
    index (u64 blob, u64 cell of 256 pages, u32 epoch, u64 start -> u64 end,
    one entry per cell a frozen piece touches) and its counter, or (older
    still) no index and no counter; no pagehist or runhist index."""
    old_key, cell = struct.Struct(">QQIQ"), 256
    with st.meta.write() as txn:
        for table in ("pagehist", "runhist"):
            stamp.ranges.delete_prefix(txn, st.meta.db[table], b"")
        txn.delete(stamp.pageblob.RUN_HISTORY_BUILT, db=st.meta.db["counters"])
        if not with_index:
            return
        for key, raw in st.meta.items(txn, "frozen"):
            blob_id, epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])
            s, e = U64.unpack(key[BLOB_EPOCH.size:])[0], PIECE.unpack(raw)[0]
            for c in range(s // cell, (e - 1) // cell + 1):
                txn.put(old_key.pack(blob_id, c, epoch, s), stamp.ranges.END.pack(e), db=st.meta.db["history"])
        txn.put(stamp.pageblob.HISTORY_BUILT, U64.pack(1), db=st.meta.db["counters"])


def make_per_page_history(st) -> None:
    """Put `st` back to the layout the per-page pagehist code left: one
    pagehist entry for every page of every frozen piece, its counter
    `page-history-index`, no runhist (a stamp that code made, or one it
    opened after this code had, which leaves runhist as it was)."""
    with st.meta.write() as txn:
        stamp.ranges.delete_prefix(txn, st.meta.db["pagehist"], b"")
        for key, raw in st.meta.items(txn, "frozen"):
            blob_id, epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])
            s, e, gen = U64.unpack(key[BLOB_EPOCH.size:])[0], PIECE.unpack(raw)[0], PIECE.unpack(raw)[5]
            for p in range(s, e):
                txn.put(stamp.meta.BLOB_PAGE_EPOCH.pack(blob_id, p, epoch), PLACE.pack(s, e, gen),
                        db=st.meta.db["pagehist"])
        txn.put(stamp.pageblob.PAGE_HISTORY_BUILT, U64.pack(1), db=st.meta.db["counters"])


@pytest.mark.parametrize("runs_left", [False, True], ids=["made-by-it", "opened-by-it"])
def test_a_stamp_with_the_per_page_index_opens_and_gets_the_run_index(tmp_path, runs_left):
    """A stamp indexed by the per-page layout (every frozen page in
    pagehist) is re-indexed on open: big frozen pieces by their runs."""
    st = Stamp.create(str(tmp_path / "s"))
    st.blobs.create("d", 8 << 20)
    st.blobs.write("d", 0, b"A" * (4 << 20))
    snaps = [st.blobs.snapshot("d").id]
    st.blobs.write("d", 0, b"B" * (4 << 20))  # freezes a 4 MiB piece: 128 runs
    snaps.append(st.blobs.snapshot("d").id)
    st.blobs.write("d", 3 * 512, b"C" * 4 * KIB)
    want = [st.blobs.read("d", 0, 4 << 20, snapshot=s) for s in snaps]
    if not runs_left:
        with st.meta.write() as txn:
            stamp.ranges.delete_prefix(txn, st.meta.db["runhist"], b"")
            txn.delete(stamp.pageblob.RUN_HISTORY_BUILT, db=st.meta.db["counters"])
    make_per_page_history(st)
    path = st.path
    st.close()
    with Stamp.open(path) as again:
        assert again.check().ok
        assert [again.blobs.read("d", 0, 4 << 20, snapshot=s) for s in snaps] == want
        with again.meta.read() as txn:
            counters = again.meta.db["counters"]
            assert txn.get(stamp.pageblob.RUN_HISTORY_BUILT, db=counters) == U64.pack(1)
            assert txn.get(stamp.pageblob.PAGE_HISTORY_BUILT, db=counters) is None
            assert sum(1 for _ in again.meta.items(txn, "runhist")) == 128
            assert sum(1 for _ in again.meta.items(txn, "pagehist")) == 8  # the 4 KiB piece's pages


def test_check_finds_a_damaged_history_index(many):
    st, snaps = many
    assert st.check().ok
    db = st.meta.db["pagehist"]
    with st.meta.write() as txn:
        key, raw = next(st.meta.items(txn, "pagehist"))
        txn.delete(key, db=db)
    assert any("history index" in p and "is missing" in p for p in st.check().problems)
    with st.meta.write() as txn:
        txn.put(key, raw, db=db)
        txn.put(key[:-4] + b"\xff" * 4, raw, db=db)  # an entry for an epoch with no such piece
    assert any("names no frozen piece" in p for p in st.check().problems)
    with st.meta.write() as txn:
        txn.delete(key[:-4] + b"\xff" * 4, db=db)
        s, e, gen = PLACE.unpack(raw)
        txn.put(key, PLACE.pack(s, e + 1, gen), db=db)  # the right place, the wrong piece
    assert any("names another piece" in p for p in st.check().problems)
    with st.meta.write() as txn:
        txn.put(key, raw, db=db)
    assert st.check().ok


@pytest.mark.parametrize("with_index", [True, False], ids=["cell-index", "no-index"])
def test_an_old_stamp_opens_and_gets_the_page_index(many, with_index):
    st, snaps = many
    want = [st.blobs.read("d", 0, 128 * KIB, snapshot=s) for s in snaps[::20]]
    make_legacy_history(st, with_index)
    path = st.path
    st.close()
    with Stamp.open(path) as again:  # converts it
        assert again.check().ok
        assert [again.blobs.read("d", 0, 128 * KIB, snapshot=s) for s in snaps[::20]] == want
        assert again.blobs.read("d", 8 * 512, 512, snapshot=snaps[3]) == bytes([3]) * 512
        with again.meta.read() as txn:
            counters = again.meta.db["counters"]
            assert txn.get(stamp.pageblob.RUN_HISTORY_BUILT, db=counters) == U64.pack(1)
            assert txn.get(stamp.pageblob.HISTORY_BUILT, db=counters) is None
            assert next(again.meta.items(txn, "history"), None) is None
    with Stamp.open(path) as third:  # once only: nothing left to convert
        assert third.check().ok


class CountingKey:
    """BLOB_PAGE_EPOCH, counting the index entries a read looks at."""

    def __init__(self) -> None:
        self.real, self.seen = stamp.meta.BLOB_PAGE_EPOCH, 0
        self.size, self.pack = self.real.size, self.real.pack

    def unpack(self, raw):
        self.seen += 1
        return self.real.unpack(raw)


def test_a_hot_page_does_not_slow_reads_of_old_snapshots(tmp_path, monkeypatch):
    """Page 5 rewritten between each of 1,000 snapshots: reading the oldest
    snapshot looks at a few index entries, for that page and its neighbours
    in the same 128 KiB alike."""
    st = Stamp.create(str(tmp_path / "hot"))
    st.blobs.create("d", 1 << 20)
    st.blobs.write("d", 0, b"A" * 128 * KIB)
    snaps = []
    for i in range(1000):
        snaps.append(st.blobs.snapshot("d").id)
        st.blobs.write("d", 5 * 512, bytes([i % 251]) * 512)
    counting = CountingKey()
    monkeypatch.setattr(stamp.pageblob, "BLOB_PAGE_EPOCH", counting)
    for k in (0, 1, 500, 999):
        for offset, length in ((0, 4 * KIB), (16 * KIB, 4 * KIB), (5 * 512, 512), (0, 128 * KIB)):
            counting.seen = 0
            got = st.blobs.read("d", offset, length, snapshot=snaps[k])
            want = bytearray(b"A" * 128 * KIB)
            want[5 * 512:6 * 512] = b"A" * 512 if k == 0 else bytes([(k - 1) % 251]) * 512
            assert got == want[offset:offset + length]
            assert counting.seen <= 3, (k, offset, counting.seen)  # not one per snapshot since k
    assert st.check().ok
    st.close()


class HotPageMachine(PageBlobMachine):
    """The model machine, plus bursts that rewrite a few hot pages (the same
    page, or its neighbours) with a snapshot between each rewrite."""

    @rule(page=st.integers(0, 7), width=st.integers(1, 3), rounds=st.integers(1, 8), clear=st.booleans(),
          seed=st.integers(0, 2 ** 16))
    def rewrite_hot_pages(self, page: int, width: int, rounds: int, clear: bool, seed: int) -> None:
        for i in range(rounds):
            at = (page + i % 3) * 512  # the same page, and its neighbours
            if at + width * 512 > len(self.data):
                return
            if clear and i % 2:
                self.clear(at, width * 512)
            else:
                self.write(at, page_data(width * 512, seed + i))
            self.snapshot()


def test_the_model_holds_with_hot_pages_across_many_snapshots():
    run_state_machine_as_test(HotPageMachine, settings=settings(
        max_examples=60 if SLOW else 10, stateful_step_count=60 if SLOW else 40, deadline=None))


@pytest.mark.parametrize("run", [2, 4], ids=["runs-of-2", "runs-of-4"])
def test_the_model_holds_with_small_runs(monkeypatch, run):
    """The run index at sizes the model's 96-page blob crosses often: pieces
    indexed partly by page and partly by run, hot pages at run edges."""
    monkeypatch.setattr(stamp.pageblob, "RUN", run)
    run_state_machine_as_test(HotPageMachine, settings=settings(
        max_examples=40 if SLOW else 8, stateful_step_count=60 if SLOW else 40, deadline=None))


def index_puts(st) -> int:
    with st.meta.read() as txn:
        return sum(1 for t in ("pagehist", "runhist") for _ in st.meta.items(txn, t))


@pytest.mark.parametrize("offset", [0, 4 * KIB], ids=["aligned", "4k-aligned"])
def test_freezing_4_mib_puts_entries_per_run_not_per_page(tmp_path, offset):
    """The first 4 MiB overwrite after a snapshot of data it keeps indexes
    the frozen piece by its whole 32 KiB runs, plus at most 2 x 63 pages at
    its ends: not 8,192 entries."""
    st = Stamp.create(str(tmp_path / "s"))
    st.blobs.create("d", 16 << 20)
    st.blobs.write("d", offset, b"A" * (4 << 20))
    snap = st.blobs.snapshot("d").id
    before = index_puts(st)
    st.blobs.write("d", offset, b"B" * (4 << 20))
    added = index_puts(st) - before
    assert added == (128 if offset == 0 else 56 + 127 + 8), added  # head pages, whole runs, tail pages
    assert st.blobs.read("d", offset, 4 << 20, snapshot=snap) == b"A" * (4 << 20)
    assert st.blobs.read("d", offset + 4 * KIB, 4 * KIB, snapshot=snap) == b"A" * 4 * KIB
    assert st.check().ok
    st.close()


def test_a_hot_page_inside_indexed_runs_does_not_slow_old_snapshot_reads(tmp_path, monkeypatch):
    """As the hot-page test, but the 128 KiB around the hot page were
    overwritten after the first snapshot, so they are kept as whole runs
    (runhist) while page 70 (in run 1) is rewritten between each of 1,000
    snapshots: a read of any snapshot looks at a few entries of each index."""
    st = Stamp.create(str(tmp_path / "hot"))
    st.blobs.create("d", 1 << 20)
    st.blobs.write("d", 0, b"A" * 128 * KIB)
    snaps = [st.blobs.snapshot("d").id]
    st.blobs.write("d", 0, b"B" * 128 * KIB)  # freezes [0, 256): runs 0-3
    for i in range(1000):
        snaps.append(st.blobs.snapshot("d").id)
        st.blobs.write("d", 70 * 512, bytes([i % 251]) * 512)
    counting = CountingKey()
    monkeypatch.setattr(stamp.pageblob, "BLOB_PAGE_EPOCH", counting)
    for k in (0, 1, 2, 500, 1000):
        want = bytearray((b"A" if k == 0 else b"B") * 128 * KIB)
        if k >= 2:
            want[70 * 512:71 * 512] = bytes([(k - 2) % 251]) * 512
        for offset, length in ((0, 4 * KIB), (32 * KIB, 4 * KIB), (70 * 512, 512), (0, 128 * KIB)):
            counting.seen = 0
            got = st.blobs.read("d", offset, length, snapshot=snaps[k])
            assert got == want[offset:offset + length], (k, offset)
            assert counting.seen <= 6, (k, offset, counting.seen)  # not one per snapshot since k
    assert st.check().ok
    st.close()


def test_a_page_and_its_run_each_decide_where_their_epoch_is_least(tmp_path):
    """Pages 64-127 are run 1. Page 70 held X at snapshot 0, run 1 was
    written whole after it (so it was empty at 0 except page 70) and kept
    whole by snapshot 1, then page 70 rewritten between snapshots 2 and 3:
    at snapshot 0 the run's entry (epoch 1) says "empty" for every page but
    70, whose own entry (epoch 0) is older; at snapshot 1 the run's entry is
    older than page 70's later one and decides it."""
    st = Stamp.create(str(tmp_path / "s"))
    st.blobs.create("d", 1 << 20)
    st.blobs.write("d", 70 * 512, b"X" * 512)
    snaps = [st.blobs.snapshot("d").id]  # epoch 0
    st.blobs.write("d", 64 * 512, b"Y" * 32 * KIB)  # freezes page 70 (pagehist, epoch 0)
    snaps.append(st.blobs.snapshot("d").id)  # epoch 1
    st.blobs.write("d", 64 * 512, b"Z" * 32 * KIB)  # freezes run 1 whole (runhist, epoch 1)
    snaps.append(st.blobs.snapshot("d").id)  # epoch 2
    st.blobs.write("d", 70 * 512, b"W" * 512)  # freezes page 70 of Z (pagehist, epoch 2)
    snaps.append(st.blobs.snapshot("d").id)
    st.blobs.write("d", 70 * 512, b"V" * 512)
    with st.meta.read() as txn:
        assert sum(1 for _ in st.meta.items(txn, "runhist")) == 1
    zero, page = bytes(512), 70 - 64
    wants = [zero * page + b"X" * 512 + zero * (63 - page),
             b"Y" * 32 * KIB,
             b"Z" * 32 * KIB,
             b"Z" * 512 * page + b"W" * 512 + b"Z" * 512 * (63 - page)]
    for snap, want in zip(snaps, wants, strict=True):
        assert st.blobs.read("d", 32 * KIB, 32 * KIB, snapshot=snap) == want
        assert st.blobs.read("d", 70 * 512, 512, snapshot=snap) == want[page * 512:(page + 1) * 512]
    assert st.check().ok
    st.close()


def test_snapshot_create_delete_cycles_beside_a_kept_snapshot_keep_the_change_log_bounded(tmp_path):
    """A backup schedule's pattern: one snapshot kept, and many taken, written
    after and deleted. Each cycle used to leave a change-log entry under its
    own epoch (3,000 cycles over 8 pages: 3,001 entries, and a diff from the
    kept snapshot reading them all); a deleted snapshot's epochs are merged
    into the next one's, so the log holds what changed, not how often."""
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 1 << 20)
    keep = st.blobs.snapshot("d")
    for i in range(300):
        s = st.blobs.snapshot("d")
        st.blobs.write("d", (i % 8) * 4 * KIB, page_data(4 * KIB, i))
        st.blobs.delete_snapshot("d", s.id)
    newer = st.blobs.snapshot("d")  # the newest deleted last: its epochs merge into the live one
    st.blobs.write("d", 64 * KIB, page_data(4 * KIB, 1))
    mid = st.blobs.snapshot("d")
    st.blobs.write("d", 128 * KIB, page_data(4 * KIB, 2))
    st.blobs.delete_snapshot("d", newer.id)
    with st.meta.read() as txn:
        entries = txn.stat(st.meta.db["changes"])["entries"]
    assert entries <= 8, entries
    assert st.blobs.diff("d", keep.id).to_json()["written"] == [
        {"offset": 0, "length": 32 * KIB}, {"offset": 64 * KIB, "length": 4 * KIB},
        {"offset": 128 * KIB, "length": 4 * KIB}]
    assert st.blobs.diff("d", keep.id, mid.id).written == [(0, 32 * KIB), (64 * KIB, 4 * KIB)]
    assert st.blobs.diff("d", mid.id).written == [(128 * KIB, 4 * KIB)]
    assert st.check().ok
    st.close()


def test_a_read_past_an_older_kept_piece_looks_at_an_entry_per_run(tmp_path, monkeypatch):
    """A 4 MiB piece kept by snapshot 0, then 100 more snapshots: a 1 MiB
    read of a later snapshot passes the piece's older entries at one per
    32 KiB run (the per-page index: one or two per page)."""
    st = Stamp.create(str(tmp_path / "s"))
    st.blobs.create("d", 8 << 20)
    st.blobs.write("d", 0, b"A" * (4 << 20))
    snaps = [st.blobs.snapshot("d").id]
    st.blobs.write("d", 0, b"B" * (4 << 20))
    snaps += [st.blobs.snapshot("d").id for _ in range(100)]
    counting = CountingKey()
    monkeypatch.setattr(stamp.pageblob, "BLOB_PAGE_EPOCH", counting)
    for k, want in ((0, b"A"), (1, b"B"), (100, b"B")):
        counting.seen = 0
        assert st.blobs.read("d", MIB, MIB, snapshot=snaps[k]) == want * MIB
        assert counting.seen <= MIB // (32 * KIB) + 2, (k, counting.seen)
    st.close()


def test_check_and_snapshot_reads_report_a_history_entry_of_the_wrong_size(many):
    """A damaged pagehist entry (a value or key cut short) is a problem that
    check names and a snapshot read's CorruptStamp, never a struct.error
    traceback from `stamp check`."""
    st, snaps = many
    db = st.meta.db["pagehist"]
    with st.meta.write() as txn:
        key, raw = next(st.meta.items(txn, "pagehist"))
        txn.put(key, raw[:3], db=db)
        txn.put(key[:5], raw, db=db)
    problems = st.check().problems
    assert any("history index" in p and "damaged" in p and "3 bytes" in p for p in problems), problems
    assert any("history index" in p and "damaged" in p and "key" in p for p in problems), problems
    blob_id, page, epoch = struct.unpack(">QQI", key)
    snap = next(s for s in st.blobs.snapshots("d") if s.epoch == epoch)
    with pytest.raises(stamp.CorruptStamp, match="damaged"):
        st.blobs.read("d", page * 512, 512, snapshot=snap.id)
    with st.meta.write() as txn:
        txn.put(key, raw, db=db)
        txn.delete(key[:5], db=db)
    assert st.check().ok


def test_check_and_snapshot_reads_report_a_run_history_entry_of_the_wrong_size(tmp_path):
    """The same for the run index: a runhist value cut short, a key cut
    short, or a key of the wrong length where the run's entry should be, is
    a problem check names (as runhist's) and a snapshot read's CorruptStamp,
    never a struct.error."""
    st = Stamp.create(str(tmp_path / "s"))
    st.blobs.create("d", 1 << 20)
    st.blobs.write("d", 64 * KIB, b"A" * 32 * KIB)  # run 2 (pages 128-191), whole
    snap = st.blobs.snapshot("d")
    st.blobs.write("d", 64 * KIB, b"B" * 32 * KIB)  # freezes run 4 whole: one runhist entry
    db = st.meta.db["runhist"]
    with st.meta.read() as txn:
        [(key, raw)] = list(st.meta.items(txn, "runhist"))
    assert struct.unpack(">QQI", key)[1:] == (2, snap.epoch)

    with st.meta.write() as txn:
        txn.put(key, raw[:3], db=db)
        txn.put(key[:19], raw, db=db)
    problems = st.check().problems
    assert any("(runhist)" in p and "run 2 " in p and "damaged entry (3 bytes" in p for p in problems), problems
    assert any("(runhist)" in p and "damaged key" in p and "19 bytes" in p for p in problems), problems
    assert not any("is missing" in p for p in problems), problems  # the damaged entry, once
    with pytest.raises(stamp.CorruptStamp, match=r"damaged entry near run 2"):
        st.blobs.read("d", 64 * KIB, 4 * KIB, snapshot=snap.id)

    with st.meta.write() as txn:  # the run's entry under a key one byte too long
        txn.delete(key, db=db)
        txn.delete(key[:19], db=db)
        txn.put(key + b"\0", raw, db=db)
    problems = st.check().problems
    assert any("(runhist)" in p and "damaged key" in p and "21 bytes" in p for p in problems), problems
    with pytest.raises(stamp.CorruptStamp, match=r"runhist.*damaged"):
        st.blobs.read("d", 64 * KIB, 4 * KIB, snapshot=snap.id)

    with st.meta.write() as txn:
        txn.delete(key + b"\0", db=db)
        txn.put(key, raw, db=db)
    assert st.check().ok
    assert st.blobs.read("d", 64 * KIB, 32 * KIB, snapshot=snap.id) == b"A" * 32 * KIB
    st.close()
