"""Every fault kind: I/O goes on while one good replica remains, and heal,
re-replication and scrub bring back 3 good replicas."""

from __future__ import annotations

import os

import pytest

import stamp
from stamp import Stamp

MIB = 1 << 20


def fill(s: Stamp, n: int = 40, seed: int = 0) -> dict[int, bytes]:
    model = {}
    for i in range(n):
        data = os.urandom(64 * 1024)
        off = ((i * 7 + seed) % 200) * 64 * 1024
        s.blobs.write("d", off, data)
        model[off] = data
    return model


def verify(s: Stamp, model: dict[int, bytes]) -> None:
    for off, data in model.items():
        assert s.blobs.read("d", off, len(data)) == data


def replicas_healthy(s: Stamp) -> bool:
    report = s.check(deep=True)
    return report.ok and report.stats["bad_copies"] == 0


def test_node_down_writes_and_reads_go_on(st):
    model = fill(st)
    st.inject("node-down", "node-00")
    model.update(fill(st, seed=3))
    verify(st, model)
    used = {n for e in st.stream.all_extents() if e.state == "open" for n in e.nodes}
    assert 0 not in used  # new extents avoid the down node
    st.inject("node-up", "node-00")
    verify(st, model)
    assert replicas_healthy(st)


def test_node_lost_then_rereplicated(st):
    model = fill(st)
    st.inject("node-lost", "node-01")
    verify(st, model)  # every record still has two good copies
    made = st.stream.rereplicate()
    assert made and all(lost == 1 for _, lost, _ in made)
    for e in st.stream.all_extents():
        assert 1 not in e.nodes or e.state == "open"
    st.inject("node-replaced", "node-01")
    verify(st, model)
    assert replicas_healthy(st)


def test_bitflip_is_healed_by_read_and_by_scrub(st):
    model = fill(st, n=4)
    e = st.stream.all_extents()[0]
    node = e.nodes[0]
    st.inject("bitflip", node, extent=e.id)
    path = st.stream.nodes[node].extent_path(e.id)
    before = open(path, "rb").read()
    assert not st.check(deep=True).ok  # check sees it and does not touch it
    assert open(path, "rb").read() == before
    verify(st, model)  # served from a good replica, and the bad chunk healed
    assert replicas_healthy(st)
    st.inject("bitflip", e.nodes[1], extent=e.id, offset=4096 + 16 + 8 + 4096 + 100)
    report = st.stream.scrub()
    assert report.healed == 1 and not report.problems
    assert replicas_healthy(st)


def test_slow_node_still_serves(st):
    st.inject("slow", "node-02", ms=2)
    model = fill(st, n=5)
    verify(st, model)
    st.inject("node-up", "node-02")


def test_disk_full_moves_appends_elsewhere(st):
    model = fill(st, n=3)
    first = {e.id for e in st.stream.all_extents()}
    st.inject("full", "node-00", on=True)  # fault domain 0
    st.inject("full", "node-04", on=True)  # fault domain 1: each domain keeps one node
    model.update(fill(st, n=10, seed=5))
    verify(st, model)
    for e in st.stream.all_extents():
        if e.id not in first:
            assert not {0, 4} & set(e.nodes)


def test_fewer_healthy_fault_domains_than_replicas_is_a_clear_error(st):
    model = fill(st, n=3)
    for node in ("node-00", "node-03"):  # fault domain 0 entirely
        st.inject("node-down", node)
    st.stream.seal_current()  # no open extent left to append to
    with pytest.raises(stamp.NotEnoughNodes, match="distinct fault domains"):
        st.blobs.write("d", 0, b"x" * 4096)
    verify(st, model)  # nothing half-written became visible
    for node in ("node-00", "node-03"):
        st.inject("node-up", node)
    st.blobs.write("d", 0, b"y" * 4096)
    assert st.blobs.read("d", 0, 4096) == b"y" * 4096


def test_node_faults_reach_other_processes(tmp_path, st):
    other = Stamp.open(st.path)
    st.inject("node-down", "node-04")
    other.stream.refresh_nodes()
    assert not other.stream.nodes[4].healthy
    other.close()


def test_short_writes_of_a_record_are_finished(st, monkeypatch):
    """A replica file that takes only part of a record gets the rest, and
    what is acknowledged reads back (large and one-chunk records)."""
    import stamp.stream as stream
    real = os.pwrite
    calls = {"n": 0, "short": 0}

    def short(fd, data, offset):
        calls["n"] += 1
        if calls["n"] % 3 == 1 and len(data) > 600:
            calls["short"] += 1
            return real(fd, memoryview(data)[:len(data) // 2 - 7], offset)
        return real(fd, data, offset)
    monkeypatch.setattr(stream.os, "pwrite", short)
    big, small = os.urandom(4 * 1024 * 1024), os.urandom(4096)
    st.blobs.write("d", 0, big)
    st.blobs.write("d", 8 * 1024 * 1024, small)
    monkeypatch.undo()
    assert calls["short"] >= 2
    assert st.blobs.read("d", 0, len(big)) == big
    assert st.blobs.read("d", 8 * 1024 * 1024, 4096) == small
    assert st.stream.scrub().bad == 0 and st.check().ok


def test_a_replica_file_that_cannot_be_opened_moves_appends_on(st):
    """The append path opens the current extent's replica files once; if one
    cannot be opened (deleted behind the stamp's back), the extent is sealed
    and the write goes on in a new extent, never an OSError to the caller."""
    a, b = os.urandom(4096), os.urandom(4096)
    st.blobs.write("d", 0, a)
    e = st.stream._current
    assert e is not None
    victim = e.nodes[0]
    os.unlink(st.stream.nodes[victim].extent_path(e.id))
    st.stream.forget_node(victim)  # its descriptors closed: the next append must reopen
    st.blobs.write("d", 4096, b)
    assert st.stream._current is not None and st.stream._current.id != e.id
    assert st.blobs.read("d", 0, 8192) == a + b
    st.stream.rereplicate()
    assert st.check().ok


def test_a_fault_injected_from_the_cli_reaches_a_running_writer_by_its_next_append(st):
    """`stamp fault node-down` in another process: the writer's very next
    append stops using that node (its extent is sealed, the write goes on
    elsewhere), with no refresh called by anyone."""
    import subprocess
    import sys

    st.blobs.write("d", 0, b"a" * 4096)
    e = st.stream._current
    assert e is not None
    victim = st.stream.nodes[e.nodes[0]]
    size = os.path.getsize(victim.extent_path(e.id))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", st.path, "fault", "node-down", victim.name],
                          capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    st.blobs.write("d", 4096, b"b" * 4096)
    assert os.path.getsize(victim.extent_path(e.id)) == size
    assert st.stream._current is not None and victim.id not in st.stream._current.nodes
    assert st.blobs.read("d", 0, 8192) == b"a" * 4096 + b"b" * 4096


def test_node_lost_while_gc_deletes_one_of_its_files(st, monkeypatch):
    """node-lost deletes the node's replica files; one that gc (in another
    process) deleted between the listing and the unlink is no error."""
    import stamp.stamp as stamp_module

    fill(st, n=4)
    real = os.listdir
    monkeypatch.setattr(stamp_module.os, "listdir", lambda path: [*real(path), "00000000000fffff.ext"])
    st.inject("node-lost", "node-01")
    monkeypatch.undo()
    assert not os.listdir(os.path.join(st.path, "nodes", "node-01", "extents"))


def test_a_node_lost_and_replaced_in_another_process_gets_the_writers_next_record(st):
    """`stamp fault node-lost` then `node-replaced` between two appends of a
    running writer: its descriptor of the lost replica names a deleted file.
    The next acknowledged record must be on three replicas that exist."""
    import subprocess
    import sys

    st.blobs.write("d", 0, b"a" * 4096)
    e = st.stream._current
    assert e is not None
    victim = st.stream.nodes[e.nodes[2]]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for fault in ("node-lost", "node-replaced"):
        proc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", st.path, "fault", fault, victim.name],
                              capture_output=True, text=True, cwd=root, timeout=60)
        assert proc.returncode == 0, proc.stderr
    st.blobs.write("d", 4096, b"b" * 4096)
    now = st.stream._current
    assert now is not None
    for n in now.nodes:  # each replica file, as a new process sees it, holds the record
        assert os.path.getsize(st.stream.nodes[n].extent_path(now.id)) >= now.length
    st.stream.rereplicate()
    st.stream.scrub()
    assert st.check().ok
    assert st.blobs.read("d", 0, 8192) == b"a" * 4096 + b"b" * 4096


@pytest.mark.parametrize("fault", ["node-down", "node-lost"])
def test_flush_with_a_node_of_the_current_extent_gone_syncs_the_rest(st, fault):
    """A flush (FUA, an NBD flush) while a replica of the extent being
    appended to is unreachable is no error: the others are synced, the extent
    is sealed, and writes go on elsewhere."""
    dev = st.blob("d", writable=True)
    dev.write(0, b"x" * 4096)
    e = st.stream._current
    assert e is not None
    st.inject(fault, st.stream.nodes[e.nodes[0]].name)
    dev.flush()
    assert st.stream.extent(e.id, refresh=True).state == "sealed"
    dev.write(4096, b"y" * 4096)
    dev.flush()
    assert dev.read(0, 8192) == b"x" * 4096 + b"y" * 4096
    dev.close()


def test_a_long_lived_process_keeps_a_bounded_number_of_replica_files_open(st, monkeypatch):
    """Writing and reading many extents in one process: replica files it no
    longer uses are closed, so it never runs out of descriptors."""
    import stamp.node

    monkeypatch.setattr(stamp.node, "MAX_OPEN", 4, raising=False)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(40):
        st.blobs.write("d", i * 4096, bytes([i + 1]) * 4096)
        st.stream.seal_current()
    for i in range(40):
        assert st.blobs.read("d", i * 4096, 4096) == bytes([i + 1]) * 4096
    assert len(os.listdir("/proc/self/fd")) - before <= 6 * 2 * 4 + 3  # 120 before the bound
    st.stream.scrub()
    assert st.check().ok


def test_a_read_with_every_replica_down_names_the_nodes(st):
    """Not a claim of corruption: the error says which nodes were not read."""
    st.blobs.write("d", 0, b"x" * 4096)
    e = st.stream._current
    assert e is not None
    for n in e.nodes:
        st.inject("node-down", n)
    with pytest.raises(stamp.DataLost, match=f"not read: {st.stream.nodes[e.nodes[0]].name} down"):
        st.blobs.read("d", 0, 4096)
    st.inject("node-up", e.nodes[0])
    assert st.blobs.read("d", 0, 4096) == b"x" * 4096


def test_a_fault_injected_from_the_cli_reaches_a_process_that_only_reads(st, monkeypatch):
    """A process that never appends still stops reading from a node that
    another process put down (within stream.READ_RECHECK; 0 here)."""
    import subprocess
    import sys

    import stamp.stream

    st.blobs.write("d", 0, b"a" * 4096)
    e = st.stream._current
    assert e is not None
    st.stream.seal_current()
    reader = Stamp.open(st.path)
    assert reader.blobs.read("d", 0, 4096) == b"a" * 4096
    victim = e.nodes[0]
    monkeypatch.setattr(stamp.stream, "READ_RECHECK", 0.0, raising=False)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", st.path, "fault", "node-down",
                           st.stream.nodes[victim].name], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reads = []
    real = reader.stream.nodes[victim].read
    monkeypatch.setattr(reader.stream.nodes[victim], "read", lambda *a: reads.append(a) or real(*a))
    assert reader.blobs.read("d", 0, 4096) == b"a" * 4096
    assert reads == [] and not reader.stream.nodes[victim].healthy
    reader.close()
