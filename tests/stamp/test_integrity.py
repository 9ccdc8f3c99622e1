"""Replica integrity: every byte of a replica is verified (file header,
record headers, checksums, data), re-replication copies only verified
records, and recovery after kill -9 keeps every record that verifies on any
replica, healing the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from stamp import Stamp
from stamp import record as rec
from stamp.stream import process_start

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fill(s: Stamp, n: int, size: int = 64 * 1024) -> dict[int, bytes]:
    model = {}
    for i in range(n):
        model[i * size] = os.urandom(size)
        s.blobs.write("d", i * size, model[i * size])
    return model


def verify(s: Stamp, model: dict[int, bytes]) -> None:
    for off, data in model.items():
        assert s.blobs.read("d", off, len(data)) == data


def flip(s: Stamp, extent: int, node: int, offset: int) -> None:
    s.inject("bitflip", node, extent=extent, offset=offset)


def clean(s: Stamp) -> bool:
    report = s.check(deep=True)
    return report.ok and report.stats["bad_copies"] == 0


# A byte in each part of a replica: file header (checked bytes, padding),
# record header (magic, length, check), a chunk checksum, data, the last byte.
PLACES = {"file header": 20, "file header padding": 1000, "record magic": 4096, "record length": 4101,
          "record check": 4108, "chunk checksum": 4096 + 16, "data": 4096 + 24 + 7}


@pytest.mark.parametrize("place", [*PLACES, "last byte"])
def test_a_flipped_byte_anywhere_in_a_replica_is_found_and_healed(st, place):
    model = fill(st, 4, 4096)
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    node = e.nodes[1]
    at = PLACES.get(place, e.length - 1)
    flip(st, e.id, node, at)
    report = st.check(deep=True)
    assert not report.ok and report.stats["bad_copies"] == 1, place
    scrub = st.stream.scrub()
    assert scrub.healed == 1 and not scrub.problems
    assert clean(st)
    verify(st, model)


def test_a_read_verifies_the_record_header_it_reads_and_heals_it(st):
    data = os.urandom(4096)
    st.blobs.write("d", 0, data)
    e = st.stream.all_extents()[0]
    for node in e.nodes[:2]:  # two replicas with a bad header: the read must find the third
        flip(st, e.id, node, 4096)
    fresh = Stamp.open(st.path)  # reads replicas in node order, no cached state
    try:
        assert fresh.blobs.read("d", 0, 4096) == data
    finally:
        fresh.close()
    copies = [open(st.stream.nodes[n].extent_path(e.id), "rb").read() for n in e.nodes]
    assert copies[0] == copies[1] == copies[2]  # the read healed both bad headers
    assert clean(st)


def test_repair_copies_each_record_from_a_replica_that_verifies(st):
    """One replica bit-flipped, another node lost: the new replica is made
    from verified records, taken from whichever replica holds them good."""
    model = fill(st, 8)
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    bad, lost = e.nodes[0], e.nodes[1]  # the first replica is the one a naive copy takes
    flip(st, e.id, bad, 4096 + 24 + 100)
    st.inject("node-lost", lost)
    made = st.stream.rereplicate()
    assert (e.id, lost, made[0][2]) in made
    new = st.stream.extent(e.id, refresh=True)
    assert lost not in new.nodes and len(set(new.nodes)) == 3
    assert st.stream.scrub().healed == 1  # the flipped copy, which repair left to scrub
    st.inject("node-replaced", lost)
    assert clean(st)
    verify(st, model)


def test_repair_from_the_cli_with_a_bad_replica_and_a_lost_node(st, capsys):
    from stamp.cli import main

    model = fill(st, 4)
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    flip(st, e.id, e.nodes[0], 4096 + 24 + 5)
    st.inject("node-lost", e.nodes[1])
    assert main(["--stamp", st.path, "repair"]) == 0, capsys.readouterr()
    st.inject("node-replaced", e.nodes[1])
    assert clean(st)
    verify(st, model)


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from stamp import Stamp
    st = Stamp.open(sys.argv[1])
    for i in range(4):
        st.blobs.write("d", i * 4096, bytes([i + 1]) * 4096)
    e = st.stream._current
    print(e.id, *e.nodes, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("record", [0, 2, 3])
def test_recovery_keeps_acknowledged_records_when_a_replica_is_corrupt(tmp_path, record):
    """Four acknowledged 4 KiB writes, a bit flip on one replica, kill -9:
    the open extent is sealed at its longest verified prefix, not dropped."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", MIB)
    child = subprocess.Popen([sys.executable, "-c", WRITER, path, ROOT], stdout=subprocess.PIPE, text=True)
    try:
        extent, *nodes = map(int, child.stdout.readline().split())  # type: ignore[union-attr]
        with Stamp.open(path) as st:  # the writer is alive: its extent stays open
            flip(st, extent, nodes[0], rec.FILE_HEADER + record * rec.record_size(4096) + 24 + 9)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with Stamp.open(path) as st:
        e = st.stream.extent(extent, refresh=True)
        assert e.state == "sealed" and e.length == rec.FILE_HEADER + 4 * rec.record_size(4096)
        for i in range(4):
            assert st.blobs.read("d", i * 4096, 4096) == bytes([i + 1]) * 4096
        assert clean(st)  # the corrupt copy was healed by recovery


def test_recovery_keeps_a_record_that_only_one_replica_holds(tmp_path):
    """The owner died after one replica took a record and before the others
    did: that record verifies, so it is kept and copied to the others."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", MIB)
        st.blobs.write("d", 0, b"a" * 4096)
        e = st.stream._current
        assert e is not None
        extra = rec.pack_record(b"b" * 4096, e.length)
        st.stream.nodes[e.nodes[2]].append(e.id, extra, e.length)
        end = e.length + len(extra)
        with st.meta.write() as txn:  # as if its owner had died
            st.meta.put_json(txn, "extents", e.id.to_bytes(8, "big"), {**e.to_json(), "owner": 999999999})
        st.stream._current = None
    with Stamp.open(path) as st:
        sealed = st.stream.extent(e.id, refresh=True)
        assert sealed.state == "sealed" and sealed.length == end
        assert st.blobs.read("d", 0, 4096) == b"a" * 4096
        assert clean(st)


def test_scrub_deletes_the_files_of_an_extent_whose_deletion_was_cut_short(st):
    """gc deletes an extent's record, then its files: killed in between, it
    leaves three files no one owns. check counts them; scrub deletes them."""
    st.blobs.write("d", 0, b"a" * 4096)
    st.stream.seal_current()
    st.blobs.write("d", 0, b"b" * 4096)  # the first extent is now dead
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    with st.meta.write() as txn:  # gc's commit, and then the kill
        txn.delete(e.id.to_bytes(8, "big"), db=st.meta.db["extents"])
    paths = [st.stream.nodes[n].extent_path(e.id) for n in e.nodes]
    assert all(os.path.exists(p) for p in paths)
    assert st.check(deep=True).stats["orphan_files"] == 3
    assert st.stream.scrub().orphans == 3
    assert not any(os.path.exists(p) for p in paths)
    assert st.check(deep=True).stats["orphan_files"] == 0
    assert st.blobs.read("d", 0, 4096) == b"b" * 4096


def test_recovery_waits_for_a_down_replica_before_sealing(tmp_path):
    """Four acknowledged writes, the owner dies, the last record is flipped on
    one replica, another replica's node is down and the third is lost: the
    only good copy of that record is on the down node, so recovery must not
    seal the extent short; once the node is back it is sealed whole."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", MIB)
        for i in range(4):
            st.blobs.write("d", i * 4096, bytes([i + 1]) * 4096)
        e = st.stream._current
        assert e is not None
        end = e.length
        with st.meta.write() as txn:  # as if its owner had died
            st.meta.put_json(txn, "extents", e.id.to_bytes(8, "big"), {**e.to_json(), "owner": 999999999})
        st.stream._current = None
        flip(st, e.id, e.nodes[0], end - 100)
        st.inject("node-down", e.nodes[1])
        st.inject("node-lost", e.nodes[2])
    with Stamp.open(path) as st:
        assert st.stream.extent(e.id, refresh=True).state == "open"  # waits for the down node
        assert not st.check(deep=True).ok
        st.inject("node-up", e.nodes[1])
    with Stamp.open(path) as st:
        sealed = st.stream.extent(e.id, refresh=True)
        assert sealed.state == "sealed" and sealed.length == end
        st.stream.rereplicate()
        st.stream.scrub()
        assert clean(st)
        for i in range(4):
            assert st.blobs.read("d", i * 4096, 4096) == bytes([i + 1]) * 4096


def test_scrub_deletes_replicas_left_on_nodes_an_extent_moved_off(st):
    """A node is down while repair re-makes its replica elsewhere: when it
    comes back, its old file belongs to no extent. check counts it; scrub
    deletes it, and nothing else."""
    model = fill(st, 4)
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    old = st.stream.nodes[e.nodes[0]]
    st.inject("node-down", old.name)
    assert [m[:2] for m in st.stream.rereplicate()] == [(e.id, old.id)]
    st.inject("node-up", old.name)
    assert os.path.exists(old.extent_path(e.id))
    assert st.check(deep=True).stats["orphan_files"] == 1
    assert st.stream.scrub().orphans == 1
    assert not os.path.exists(old.extent_path(e.id))
    assert clean(st) and st.check(deep=True).stats["orphan_files"] == 0
    verify(st, model)


def test_scrub_deletes_a_killed_copy_and_keeps_a_running_one(st):
    """A replica copy records its target first: scrub keeps the target's file
    while the copying process lives and deletes it once that process died."""
    fill(st, 2)
    st.stream.seal_current()
    e = st.stream.all_extents()[0]
    target = next(n for n in st.stream.nodes.values() if n.id not in e.nodes)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for owner, kept in ((os.getpid(), True), (dead.pid, False)):
        marker = {"node": target.id, "owner": owner, "started": process_start(owner) if kept else 1}
        with st.meta.write() as txn:
            st.meta.put_json(txn, "extents", e.id.to_bytes(8, "big"), {**e.to_json(), "copy": marker})
        with open(target.extent_path(e.id), "wb") as f:
            f.write(rec.pack_file_header(uuid.UUID(int=e.id)))
        assert st.stream.scrub().orphans == (0 if kept else 1)
        assert os.path.exists(target.extent_path(e.id)) == kept
