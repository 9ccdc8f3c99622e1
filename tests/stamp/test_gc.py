"""Space reclamation: dead extents go, partly dead ones are compacted, and
nothing a blob or snapshot can read changes."""

from __future__ import annotations

import json
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


def test_a_reader_whose_pieces_move_twice_while_it_waits_still_reads_them(tmp_path):
    """A reader resolves its pieces, then loses the CPU while gc in another
    process compacts their extent and deletes it; its retry resolves the
    copies, and loses the CPU again while another round moves those too. A
    live page must still read: only a resolution that fails twice the same
    way is a loss."""
    import subprocess
    import sys

    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("b", 8 * MIB)
    want = b"\x07" * 4096
    st.blobs.write("b", 0, want)
    for i in range(300):  # the extent holding page 0 fills, is sealed and is mostly dead
        st.blobs.write("b", 8192, bytes([i % 256]) * 4096)
    st.close()
    st = Stamp.open(path)  # a reader with no replica file open yet
    read, rounds = st.stream.read, []

    def preempted(*args):
        if len(rounds) < 2:  # gc in another process runs before each of the reader's first two reads
            gc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", path, "gc", "--compact-below", "1.0"],
                                capture_output=True, text=True)
            rounds.append(gc.returncode)
        return read(*args)

    st.stream.read = preempted
    assert st.blobs.read("b", 0, 4096) == want
    assert rounds == [0, 0]
    st.stream.read = read
    assert st.check().ok
    st.close()


def test_two_rounds_in_two_processes_compacting_one_extent_both_succeed(tmp_path):
    """Two reclaimers (`stamp gc --watch` beside a serve's thread) census the
    same partly dead extent; the other process compacts and deletes it while
    this round is about to copy it. This round must not fail with
    CorruptStamp (nor report corruption): the pieces moved, nothing is lost."""
    import subprocess
    import sys

    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("b", 8 * MIB)
    want = b"\x07" * 4096
    st.blobs.write("b", 0, want)
    for i in range(300):
        st.blobs.write("b", 8192, bytes([i % 256]) * 4096)
    st.close()
    st = Stamp.open(path)
    read, rounds = st.stream.read, []

    def other_round_first(*args):
        if not rounds:
            gc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", path, "gc", "--compact-below", "1.0"],
                                capture_output=True, text=True)
            rounds.append(gc.returncode)
        return read(*args)

    st.stream.read = other_round_first
    report = collect(st, compact_below=1.0)
    st.stream.read = read
    assert rounds == [0]
    assert report.bytes_moved == 0  # the other round moved it all
    assert st.blobs.read("b", 0, 4096) == want
    assert st.check().ok
    st.close()


def test_repair_after_a_round_killed_after_dooming_and_a_lost_node_checks_clean(tmp_path, capsys):
    """gc killed -9 right after its doom leaves a `dying` record; a node holding
    one of its replicas is then lost. check names the lost replica and says
    `stamp repair` re-makes it: repair must finish the half round (delete the
    extent if unreferenced, else put it back and re-replicate it) so that
    check is clean after it."""
    from stamp.cli import main
    from stamp.gc import _doom, census, references

    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("b", 8 * MIB)
    st.blobs.write("b", 0, b"\x07" * 4096)  # live: in the first extent with the dead ones below
    for i in range(800):  # extents 2 and on: dead but the last
        st.blobs.write("b", 8192, bytes([i % 256]) * 4096)
    st.stream.seal_current()
    uses = census(st, references(st))
    dead = [u.id for u in uses if u.sealed and u.live == 0]
    live = next(u.id for u in uses if u.sealed and u.live > 0)
    assert sorted(_doom(st, [*dead, live])) == sorted([*dead, live])  # the round dies here
    name = st.stream.nodes[st.stream.extent(live, refresh=True).nodes[0]].name
    st.close()
    assert main(["--stamp", path, "fault", "node-lost", name]) == 0
    assert main(["--stamp", path, "repair"]) == 0
    capsys.readouterr()
    assert main(["--stamp", path, "check"]) == 0, capsys.readouterr().out
    st = Stamp.open(path)
    assert st.blobs.read("b", 0, 4096) == b"\x07" * 4096
    assert live in {e.id for e in st.stream.all_extents()}  # back, on 3 replicas
    assert not set(dead) & {e.id for e in st.stream.all_extents(dying=True)}  # gone
    st.close()


def test_a_slow_recovery_does_not_bring_back_an_extent_gc_deleted(tmp_path):
    """A writer dies (kill -9) with an open extent holding a record nobody
    points at. This process's recovery walks it; meanwhile another process
    opens the stamp (its recovery seals the extent) and gc deletes it as
    unreferenced, files and all. Sealing it now must not put its record
    back: check would report its replicas missing and data lost, for ever."""
    import subprocess
    import sys

    path = str(tmp_path / "st")
    Stamp.create(path, extent_size=MIB).close()
    st = Stamp.open(path)
    subprocess.run([sys.executable, "-c", f"import os; from stamp import Stamp; st = Stamp.open({path!r}); "
                    "st.stream.append(b'x' * 4096); os.kill(os.getpid(), 9)"], check=False)
    walk, others = st.stream._walk, []

    def walk_then_another_process(*args, **kwargs):
        out = walk(*args, **kwargs)
        if not others:
            gc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", path, "gc"], capture_output=True, text=True)
            others.append(json.loads(gc.stdout)["extents_deleted"])
        return out

    st.stream._walk = walk_then_another_process
    assert st.stream.recover() == []  # the other process recovered it first
    st.stream._walk = walk
    assert others == [1]
    report = st.check()
    assert report.ok, report.problems
    st.close()


def test_a_reader_thread_never_reads_another_extent_through_a_descriptor_gc_closed(tmp_path, monkeypatch):
    """In `hostcache serve` the reclaimer thread deletes an extent whose
    replica descriptor a reader thread was just handed; if it closed the
    descriptor, the next file any thread opens may get its number, and the
    reader's pread reads that file. Records are checksummed by offset, not
    by extent, so a record of the same length at the same offset in another
    extent verifies: the reader would return another page's bytes."""
    import stamp.node

    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("b", 8 * MIB)
    want = b"\x07" * 65536
    st.blobs.write("b", 0, want)  # extent 1, its first record
    for i in range(40):  # 64 KiB records: extent 2 has a record of the same length at the same offset
        st.blobs.write("b", 65536, bytes([i + 1]) * 65536)
    st.stream.seal_current()
    other = st.stream.extent(2)
    other_fd = os.open(st.stream.nodes[other.nodes[0]].extent_path(2), os.O_RDONLY)
    real_pread, moved = os.pread, []

    def pread_after_gc(fd, n, offset):  # the reader lost the CPU between fd() and its pread
        if not moved and fd in {node._fds.get(1) for node in st.stream.nodes.values()}:  # a replica of extent 1
            moved.append(0)
            moved[0] = collect(st, compact_below=1.0).extents_deleted  # the reclaimer thread
            try:
                os.fstat(fd)
            except OSError:  # closed: another thread's open may be given its number
                os.dup2(other_fd, fd)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(stamp.node.os, "pread", pread_after_gc)
    got = st.blobs.read("b", 0, 65536)
    monkeypatch.undo()
    assert moved and moved[0] >= 1
    assert got == want
    os.close(other_fd)
    st.close()


def test_a_round_says_where_its_longest_write_transaction_went(tmp_path):
    """The longest transaction's parts (changes, commit) add up to it, and the
    round's report and the sum of reports keep the parts of the same one."""
    from stamp.gc import GcReport

    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("b", 4 * MIB)
    for _ in range(8):
        st.blobs.write("b", 0, os.urandom(2 * MIB))
    st.stream.seal_current()
    report = collect(st, compact_below=0.9)
    assert report.extents_deleted > 0 and report.longest_txn_ms > 0
    parts = report.longest_body_ms + report.longest_commit_ms
    assert abs(parts - report.longest_txn_ms) <= 0.01, report
    assert min(report.longest_major_faults, report.longest_preempted, report.longest_blocked) >= 0
    total = GcReport(longest_txn_ms=report.longest_txn_ms / 2, longest_body_ms=99.0, longest_lock_wait_ms=1e6)
    total.add(report)
    assert (total.longest_txn_ms, total.longest_body_ms) == (report.longest_txn_ms, report.longest_body_ms)
    assert total.longest_lock_wait_ms == 1e6
    st.close()
