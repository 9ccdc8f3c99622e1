"""Space reclamation: dead extents go, partly dead ones are compacted, and
nothing a blob or snapshot can read changes."""

from __future__ import annotations

import os
import threading

from stamp import Stamp
from stamp.gc import collect

MIB = 1 << 20


def test_overwritten_and_deleted_data_is_reclaimed(tmp_path):
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("a", 8 * MIB)
    st.blobs.create("b", 8 * MIB)
    keep = os.urandom(256 * 1024)
    st.blobs.write("a", 0, keep)
    for _ in range(40):  # overwrite the same 256 KiB of b: all but the last copy dies
        st.blobs.write("b", MIB, os.urandom(256 * 1024))
    last = st.blobs.read("b", MIB, 256 * 1024)
    snap = st.blobs.snapshot("b")
    st.blobs.write("b", MIB, b"n" * 256 * 1024)  # the snapshot keeps `last` alive
    st.stream.seal_current()
    before = sum(e.length for e in st.stream.all_extents())
    report = collect(st, compact_below=0.6)
    after = sum(e.length for e in st.stream.all_extents())
    assert report.extents_deleted > 5 and report.bytes_freed > 5 * MIB and after < before / 3
    assert st.blobs.read("a", 0, len(keep)) == keep
    assert st.blobs.read("b", MIB, 256 * 1024, snapshot=snap.id) == last
    assert st.blobs.read("b", MIB, 256 * 1024) == b"n" * 256 * 1024
    st.blobs.delete_snapshot("b", snap.id)
    st.blobs.delete("a")
    st.stream.seal_current()
    report = collect(st, compact_below=0.6)
    assert report.bytes_freed > 0
    assert st.blobs.read("b", MIB, 256 * 1024) == b"n" * 256 * 1024
    assert st.check(deep=True).ok
    files = sum(len(os.listdir(os.path.join(st.path, "nodes", n, "extents")))
                for n in os.listdir(os.path.join(st.path, "nodes")))
    assert files == 3 * len(st.stream.all_extents())
    st.close()


def test_compaction_keeps_partly_dead_extents_readable(tmp_path):
    st = Stamp.create(str(tmp_path / "st"), extent_size=4 * MIB)
    st.blobs.create("d", 16 * MIB)
    model = bytearray(16 * MIB)
    for i in range(12):
        data = os.urandom(MIB)
        st.blobs.write("d", i * MIB, data)
        model[i * MIB:(i + 1) * MIB] = data
    for i in range(0, 12, 2):  # kill half of every extent
        st.blobs.clear("d", i * MIB, MIB)
        model[i * MIB:(i + 1) * MIB] = bytes(MIB)
    st.stream.seal_current()
    report = collect(st, compact_below=0.75)
    assert report.extents_compacted >= 2 and report.bytes_moved >= 4 * MIB
    assert st.blobs.read("d", 0, 4 * MIB) + st.blobs.read("d", 4 * MIB, 4 * MIB) + \
        st.blobs.read("d", 8 * MIB, 4 * MIB) + st.blobs.read("d", 12 * MIB, 4 * MIB) == bytes(model)
    assert st.check(deep=True).ok
    st.close()


def test_gc_racing_a_write_between_its_append_and_its_index(tmp_path):
    """A write appends its record, and the extent is sealed (it reached its
    size) before the index points at the record. gc, in another thread or
    process, may find that sealed extent unreferenced and delete it right
    then. The write must notice inside its index transaction and append
    again, never leave a pointer into a deleted extent."""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 8 * MIB)
    real_append = st.stream.append
    raced = []

    def append_then_gc(data):
        loc = real_append(data)
        if not raced:
            st.stream.seal_current()  # as if the record had filled the extent
            report = collect(st)  # nothing points at the record yet: its extent goes
            raced.append((loc.extent, report.extents_deleted))
        return loc
    st.stream.append = append_then_gc
    data = os.urandom(64 * 1024)
    st.blobs.write("d", 0, data)
    st.stream.append = real_append
    gone, deleted = raced[0]
    assert deleted >= 1 and gone not in {e.id for e in st.stream.all_extents()}
    assert st.blobs.read("d", 0, len(data)) == data
    assert st.check(deep=True).ok
    st.close()


def test_compaction_whose_copy_another_gc_deleted_keeps_the_piece(tmp_path):
    """Compaction appends a copy of a live piece, then moves the pointer. If
    another gc deletes the copy's extent in between (sealed, and nothing
    pointed at it yet), the pointer must stay on the original."""
    from stamp.gc import _delete_if_unreferenced
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 4 * MIB)
    keep = os.urandom(256 * 1024)
    st.blobs.write("d", 0, keep)
    st.blobs.write("d", 256 * 1024, os.urandom(768 * 1024))
    st.blobs.clear("d", 256 * 1024, 768 * 1024)  # the extent is mostly dead: compaction moves `keep`
    st.stream.seal_current()
    real_append = st.stream.append
    deleted = []

    def append_then_other_gc(data):
        loc = real_append(data)
        st.stream.seal_current()
        deleted.append(_delete_if_unreferenced(st, loc.extent))
        return loc
    st.stream.append = append_then_other_gc
    report = collect(st, compact_below=0.5)
    st.stream.append = real_append
    assert deleted and all(deleted) and report.extents_compacted == 1
    assert report.extents_deleted == 0  # the original is still pointed at
    assert st.blobs.read("d", 0, len(keep)) == keep
    assert st.check(deep=True).ok
    st.close()


def test_gc_scans_the_index_once_to_delete_many_extents(tmp_path):
    """Each scan of the index costs time in proportion to the index: deleting
    many dead extents takes one verify scan, not one each."""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 4 * MIB)
    for _ in range(8):  # 8 MiB over the same MiB: 7 or so dead extents
        last = os.urandom(MIB)
        st.blobs.write("d", 0, last)
    st.stream.seal_current()
    scans = []
    real_items = st.meta.items

    def counting_items(txn, table, prefix=b""):
        if table == "pages":
            scans.append(table)
        return real_items(txn, table, prefix)
    st.meta.items = counting_items
    report = collect(st)
    st.meta.items = real_items
    assert report.extents_deleted >= 5
    assert len(scans) == 2  # gc's reference count, and the one check before deleting
    assert st.blobs.read("d", 0, MIB) == last and st.check(deep=True).ok
    st.close()


def test_gc_scans_hold_no_writer_back(tmp_path):
    """gc scans the index in read transactions: a write commits while either
    scan (the census, the check before deleting) is under way. (The scan
    before deleting ran inside a write transaction and held every writer
    for its whole length.)"""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 4 * MIB)
    for _ in range(4):
        st.blobs.write("d", 0, os.urandom(MIB))
    st.stream.seal_current()
    real_items = st.meta.items
    written = []

    def write_during_scan(txn, table, prefix=b""):
        if table == "pages" and len(written) < 2:
            data = os.urandom(4096)
            t = threading.Thread(target=st.blobs.write, args=("d", 2 * MIB + 4096 * len(written), data))
            t.start()
            t.join(30)  # a writer held by the scan's transaction is still waiting
            written.append(not t.is_alive())
            threads.append(t)
        return real_items(txn, table, prefix)
    threads: list[threading.Thread] = []
    st.meta.items = write_during_scan
    report = collect(st)
    st.meta.items = real_items
    for t in threads:
        t.join()
    assert written == [True, True]
    assert report.extents_deleted >= 2 and st.check(deep=True).ok
    st.close()


def test_a_round_killed_after_dooming_is_finished_by_the_next(tmp_path):
    """A round moves the extents it means to delete to `dying`, then checks
    them. Killed in between, it leaves dying extents: they still read, check
    passes, and the next round deletes the unreferenced ones and puts a
    referenced one back."""
    from stamp.gc import _doom
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 4 * MIB)
    st.blobs.write("d", 0, os.urandom(MIB))  # fills its extent, which is sealed
    dead = st.stream.all_extents()[-1].id
    keep = os.urandom(MIB)
    st.blobs.write("d", 0, keep)  # the first extent is now dead
    st.stream.seal_current()
    live = [e.id for e in st.stream.all_extents() if e.id != dead]
    assert set(_doom(st, [dead, *live])) == {dead, *live}  # a live one too, as a racing writer makes it
    assert st.stream.all_extents() == [] and len(st.stream.all_extents(dying=True)) == 1 + len(live)
    assert st.blobs.read("d", 0, MIB) == keep
    assert st.check(deep=True).ok
    report = collect(st)
    assert report.extents_deleted == 1
    assert sorted(e.id for e in st.stream.all_extents()) == sorted(live)
    assert st.stream.all_extents(dying=True) == st.stream.all_extents()
    assert st.blobs.read("d", 0, MIB) == keep and st.check(deep=True).ok
    st.close()


def test_a_copy_made_while_an_extent_is_dying_keeps_it(tmp_path):
    """Copies share extents. A copy made from a blob whose extent gc is
    checking points at that extent; the source then goes away. The check
    before deleting must see the copy's pointers and keep the extent."""
    from stamp.gc import _delete_unreferenced, _doom
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("src", 4 * MIB)
    data = os.urandom(512 * 1024)
    st.blobs.write("src", 0, data)
    st.stream.seal_current()
    extent = st.stream.all_extents()[0].id
    _doom(st, [extent])  # as a round would before its check (it was racing a write)
    st.blobs.copy("src", "dst")
    st.blobs.delete("src")
    assert _delete_unreferenced(st, []) == {extent: False}  # the round, resumed: kept
    assert [e.id for e in st.stream.all_extents()] == [extent]
    assert st.blobs.read("dst", 0, len(data)) == data and st.check(deep=True).ok
    st.close()
