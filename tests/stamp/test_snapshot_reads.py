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
    still) no index and no counter; no pagehist index."""
    old_key, cell = struct.Struct(">QQIQ"), 256
    with st.meta.write() as txn:
        stamp.ranges.delete_prefix(txn, st.meta.db["pagehist"], b"")
        txn.delete(stamp.pageblob.PAGE_HISTORY_BUILT, db=st.meta.db["counters"])
        if not with_index:
            return
        for key, raw in st.meta.items(txn, "frozen"):
            blob_id, epoch = BLOB_EPOCH.unpack(key[:BLOB_EPOCH.size])
            s, e = U64.unpack(key[BLOB_EPOCH.size:])[0], PIECE.unpack(raw)[0]
            for c in range(s // cell, (e - 1) // cell + 1):
                txn.put(old_key.pack(blob_id, c, epoch, s), stamp.ranges.END.pack(e), db=st.meta.db["history"])
        txn.put(stamp.pageblob.HISTORY_BUILT, U64.pack(1), db=st.meta.db["counters"])


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
            assert txn.get(stamp.pageblob.PAGE_HISTORY_BUILT, db=counters) == U64.pack(1)
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
