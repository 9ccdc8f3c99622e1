"""Snapshot reads through the history index: right (the model machine with
small cells, so pieces cross cells) and bounded (reading the oldest of many
snapshots does not walk every snapshot's table)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

import stamp.pageblob
import stamp.ranges
from stamp import Stamp
from stamp.meta import U64
from stamp.testing import PageBlobMachine

SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))
KIB = 1024


def test_the_model_holds_with_pieces_across_many_history_cells(monkeypatch):
    monkeypatch.setattr(stamp.pageblob, "CELL", 3)  # the model's blob spans 32 cells; pieces cross them
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


def test_check_finds_a_damaged_history_index_and_an_old_stamp_gets_one(many, tmp_path):
    st, snaps = many
    assert st.check().ok
    db = st.meta.db["history"]
    with st.meta.write() as txn:
        key, _ = next(st.meta.items(txn, "history"))
        txn.delete(key, db=db)
    problems = st.check().problems
    assert any("history index" in p and "is missing" in p for p in problems)
    with st.meta.write() as txn:  # a stamp from before the index: no entries, no counter
        stamp.ranges.delete_prefix(txn, db, b"")
        txn.delete(stamp.pageblob.HISTORY_BUILT, db=st.meta.db["counters"])
    path = st.path
    st.close()
    with Stamp.open(path) as again:  # builds it
        assert again.check().ok
        assert again.blobs.read("d", 8 * 512, 512, snapshot=snaps[3]) == bytes([3]) * 512
        with again.meta.read() as txn:
            assert txn.get(stamp.pageblob.HISTORY_BUILT, db=again.meta.db["counters"]) == U64.pack(1)
