"""Page blob rules with their Azure error codes, leases, 500 snapshots,
several processes on one stamp, and the block device view."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import stamp
from stamp import Stamp

MIB = 1 << 20


@pytest.fixture
def st(tmp_path):
    s = Stamp.create(str(tmp_path / "st"), extent_size=4 * MIB)
    s.blobs.create("d", 64 * MIB)
    yield s
    s.close()


@pytest.mark.parametrize("call,error", [
    (lambda b: b.write("d", 100, b"x" * 512), stamp.InvalidPageRange),
    (lambda b: b.write("d", 0, b"x" * 100), stamp.InvalidPageRange),
    (lambda b: b.write("d", 64 * MIB, b"x" * 512), stamp.InvalidPageRange),
    (lambda b: b.write("d", 0, b"x" * (4 * MIB + 512)), stamp.RequestBodyTooLarge),
    (lambda b: b.clear("d", 512, 1000), stamp.InvalidPageRange),
    (lambda b: b.read("nope", 0, 512), stamp.BlobNotFound),
    (lambda b: b.create("d", 512), stamp.BlobAlreadyExists),
    (lambda b: b.create("e", 1000), stamp.InvalidHeaderValue),
    (lambda b: b.create("e", 9 * 1024 ** 4), stamp.InvalidHeaderValue),
    (lambda b: b.read("d", 0, 512, snapshot="2000-01-01T00:00:00.0000000Z"), stamp.SnapshotNotFound),
    (lambda b: b.create("e", 512.0), stamp.InvalidHeaderValue),  # a size that is not an integer
    (lambda b: b.resize("d", "4096"), stamp.InvalidHeaderValue),
    (lambda b: b.page_ranges("d", offset=-512, length=1024), stamp.InvalidRange),
    (lambda b: b.page_ranges("d", offset=0, length=-1), stamp.InvalidRange),
])
def test_violations_raise_their_azure_code(st, call, error):
    with pytest.raises(error) as e:
        call(st.blobs)
    assert str(e.value).startswith(error.code)


def test_never_written_and_cleared_pages_read_as_zeros(st):
    assert st.blobs.read("d", 0, 4096) == bytes(4096)
    st.blobs.write("d", 0, b"\xff" * 8192)
    st.blobs.clear("d", 512, 1024)
    assert st.blobs.read("d", 0, 2048) == b"\xff" * 512 + bytes(1024) + b"\xff" * 512
    assert st.blobs.page_ranges("d") == [(0, 512), (1536, 8192 - 1536)]


def test_a_sparse_32_tib_class_blob_costs_almost_nothing(st, tmp_path):
    st.blobs.create("huge", 8 * 1024 ** 4)
    st.blobs.write("huge", 8 * 1024 ** 4 - 4096, b"z" * 4096)
    assert st.blobs.read("huge", 8 * 1024 ** 4 - 4096, 4096) == b"z" * 4096
    assert st.check(deep=False).stats["index_pieces"] < 5


def test_leases_guard_writes(st):
    lease = st.blobs.acquire_lease("d")
    with pytest.raises(stamp.LeaseIdMissing):
        st.blobs.write("d", 0, b"x" * 512)
    with pytest.raises(stamp.LeaseIdMismatch):
        st.blobs.write("d", 0, b"x" * 512, lease="00000000-0000-0000-0000-000000000001")
    with pytest.raises(stamp.LeaseAlreadyPresent):
        st.blobs.acquire_lease("d")
    st.blobs.write("d", 0, b"x" * 512, lease=lease)
    st.blobs.release_lease("d", lease)
    st.blobs.write("d", 0, b"y" * 512)
    assert st.blobs.read("d", 0, 512) == b"y" * 512


def test_500_snapshots_and_adjacent_diffs(st):
    written = {}
    snaps = []
    for i in range(500):
        off = (i * 37 % 1000) * 4096
        data = bytes([i % 251 + 1]) * 4096
        st.blobs.write("d", off, data)
        written[off] = data
        snaps.append((st.blobs.snapshot("d"), off))
    for off, data in list(written.items())[:50]:
        assert st.blobs.read("d", off, 4096) == data
    for (a, _), (b, off) in zip(snaps[200:230], snaps[201:231], strict=True):
        assert st.blobs.diff("d", a.id, b.id) == stamp.Diff([(off, 4096)], [])
    first, off0 = snaps[0]
    assert st.blobs.read("d", off0, 4096, snapshot=first.id) == bytes([1]) * 4096
    for s, _ in snaps[::2]:
        st.blobs.delete_snapshot("d", s.id)
    assert st.blobs.read("d", snaps[1][1], 4096, snapshot=snaps[1][0].id) == bytes([2]) * 4096
    assert st.check(deep=False).ok


def test_block_device_view_any_offset(st):
    with st.blob("d", writable=True) as dev:
        dev.write(1000, b"hello")
        dev.write(4 * MIB - 100, b"a" * (5 * MIB))  # crosses the 4 MiB write limit
        assert dev.read(998, 9) == b"\0\0hello\0\0"
        assert dev.read(4 * MIB - 100, 5 * MIB) == b"a" * (5 * MIB)
        dev.discard(4 * MIB, MIB + 7)
        assert dev.read(4 * MIB - 2, 4) == b"aa\0\0"
        assert dev.read(5 * MIB + 7, 1) == b"a"
        got = [(e.offset, e.length, e.state.value) for e in dev.allocation(0, 16 * MIB)]
        assert got == [(0, 512, "zero"), (512, 512, "data"), (1024, 4 * MIB - 1536, "zero"),
                       (4 * MIB - 512, 512, "data"), (4 * MIB, MIB, "zero"), (5 * MIB, 4 * MIB, "data"),
                       (9 * MIB, 7 * MIB, "zero")]
        dev.flush()


HOLDER = textwrap.dedent("""
    import sys, time
    from stamp import Stamp
    st = Stamp.open(sys.argv[1])
    dev = st.blob("d", writable=True)
    dev.write(0, b"child" * 100 + b"\\0" * 12)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_two_processes_one_writer_clear_errors(st):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, st.path], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(stamp.LeaseAlreadyPresent, match=f"pid {child.pid}"):
            st.blob("d", writable=True)
        # meanwhile this process can still read, snapshot and diff the blob
        assert st.blobs.read("d", 0, 512).startswith(b"child")
        snap = st.blobs.snapshot("d")
        assert st.blobs.diff("d", snap.id).written == []
    finally:
        child.kill()
        child.wait()
    t = time.monotonic()
    with st.blob("d", writable=True) as dev:  # the holder died: its lease is stale and broken
        dev.write(0, b"parent".ljust(512, b"\0"))
    assert time.monotonic() - t < 5
    other = Stamp.open(st.path)  # and the dead process's open extent got sealed
    assert all(e.state == "sealed" or e.owner in (os.getpid(),) for e in other.stream.all_extents())
    other.close()


def test_a_full_disk_for_the_metadata_is_a_clear_error(st, monkeypatch):
    """LMDB writes through a map of a sparse file; blocks are taken with
    fallocate ahead of use, so a full disk is MetadataFull before anything
    changes, never a SIGBUS, and the stamp works again once there is space."""
    import errno

    import stamp.meta as meta
    st.blobs.write("d", 0, b"a" * 4096)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(meta.os, "posix_fallocate", full)
    st.meta._reserved = 0  # as if the reserve were used up
    monkeypatch.setattr(st.meta, "_allocated", lambda: 0)  # and the spare blocks too
    with pytest.raises(stamp.MetadataFull, match="no space left for the stamp's metadata"):
        st.blobs.snapshot("d")
    monkeypatch.setattr(st.meta, "_allocated", lambda: 1 << 40)  # spare blocks are for management only
    with pytest.raises(stamp.MetadataFull):
        for i in range(16):  # the write path checks before one write in 16
            st.blobs.write("d", 4096 * (i + 1), b"b" * 4096)
    written = i  # writes before the refused one landed; the refused one did not
    assert st.blobs.snapshots("d") == []
    assert st.blobs.read("d", 0, 4096 * (written + 2)) == b"a" * 4096 + b"b" * 4096 * written + bytes(4096)
    monkeypatch.undo()
    st.blobs.write("d", 4096 * (written + 1), b"c" * 4096)
    assert st.blobs.read("d", 4096 * (written + 1), 4096) == b"c" * 4096
    assert st.check().ok


TIB = 1024 ** 4


@pytest.mark.parametrize("size", [8 * TIB + 512, 64 * TIB, 64 * TIB + 512])
def test_resize_keeps_the_limit_create_keeps(st, size):
    """One rule for both: a plain page blob is at most 8 TiB, made or resized."""
    with pytest.raises(stamp.InvalidHeaderValue, match=str(8 * TIB)):
        st.blobs.create("e", size)
    with pytest.raises(stamp.InvalidHeaderValue, match=str(8 * TIB)):
        st.blobs.resize("d", size)
    assert st.blobs.size("d") == 64 * MIB
    st.blobs.resize("d", 8 * TIB)  # the limit itself is allowed
    st.blobs.copy("d", "c")
    with pytest.raises(stamp.InvalidHeaderValue):  # a copy keeps its source's limit
        st.blobs.resize("c", size)


def test_a_managed_disks_blob_grows_to_64_tib_and_its_footer(st):
    from stamp.pageblob import MAX_DISK_BLOB
    st.blobs.create("disk", 0, limit=MAX_DISK_BLOB)
    st.blobs.resize("disk", 64 * TIB + 512)
    with pytest.raises(stamp.InvalidHeaderValue):
        st.blobs.resize("disk", 64 * TIB + 1024)


OTHER_LEASE = "00000000-0000-0000-0000-000000000001"


def diff_from_the_newer(b):
    older, newer = b.snapshot("d"), b.snapshot("d")
    return b.diff("d", newer.id, older.id)


@pytest.mark.parametrize("call,code,status", [
    (lambda b: b.read("d", 64 * MIB, 512), "InvalidRange", 416),
    (lambda b: b.read("d", 64 * MIB + 4096, 1), "InvalidRange", 416),
    (lambda b: b.diff("d", "2000-01-01T00:00:00.0000000Z"), "PreviousSnapshotNotFound", 409),
    (diff_from_the_newer, "PreviousSnapshotCannotBeNewer", 400),
    (lambda b: (b.snapshot("d"), b.delete("d")), "SnapshotsPresent", 409),
    (lambda b: (b.acquire_lease("d"), b.release_lease("d", OTHER_LEASE)), "LeaseIdMismatchWithLeaseOperation", 409),
    (lambda b: b.release_lease("d", OTHER_LEASE), "LeaseNotPresentWithLeaseOperation", 409),
    (lambda b: b.break_lease("d"), "LeaseNotPresentWithLeaseOperation", 409),
    (lambda b: b.write("d", 0, b"x" * 512, lease=OTHER_LEASE), "LeaseNotPresentWithBlobOperation", 412),
    (lambda b: b.clear("d", 0, 512, lease=OTHER_LEASE), "LeaseNotPresentWithBlobOperation", 412),
    (lambda b: b.write("d", 0, b""), "InvalidHeaderValue", 400),
    (lambda b: b.create("n" * 1025, 512), "InvalidResourceName", 400),
    (lambda b: b.create("", 512), "InvalidResourceName", 400),
    (lambda b: b.write("d", 0, b"x" * 512, lease="not-a-guid"), "InvalidHeaderValue", 400),
    (lambda b: b.read("d", 0, 512, snapshot="x" * 600), "BlobNotFound", 404),
])
def test_the_platforms_error_codes(st, call, code, status):
    with pytest.raises(stamp.AzureError) as e:
        call(st.blobs)
    assert (e.value.code, e.value.status) == (code, status)
    assert str(e.value).startswith(code + ": ")


def test_get_blob_reads_any_range_and_cuts_it_at_the_end(st):
    data = os.urandom(8192)
    st.blobs.write("d", 0, data)
    st.blobs.write("d", 64 * MIB - 512, b"e" * 512)
    assert st.blobs.read("d", 100, 1000) == data[100:1100]
    assert st.blobs.read("d", 511, 2) == data[511:513]
    assert st.blobs.read("d", 64 * MIB - 10, 4096) == b"e" * 10  # cut at the end, as Get Blob's 206
    snap = st.blobs.snapshot("d").id
    st.blobs.write("d", 0, bytes(8192))
    assert st.blobs.read("d", 3, 5000, snapshot=snap) == data[3:5003]


def test_deleting_a_blob_with_snapshots_says_what_happens_to_them(st):
    st.blobs.write("d", 0, b"x" * 512)
    st.blobs.snapshot("d")
    st.blobs.delete("d", snapshots="only")  # the snapshots go, the blob stays
    assert st.blobs.snapshots("d") == [] and st.blobs.read("d", 0, 1) == b"x"
    st.blobs.snapshot("d")
    st.blobs.delete("d", snapshots="include")
    assert not st.blobs.exists("d")


@pytest.mark.parametrize("name", ["n" * 1024, "é" * 1024, "a/" * 300])
def test_any_name_up_to_1024_characters_works(st, name):
    st.blobs.create(name, 4096)
    st.blobs.write(name, 0, b"z" * 512)
    assert st.blobs.read(name, 0, 2) == b"zz"
    assert name in st.blobs.names() and st.blobs.properties(name)["size"] == 4096
    st.blobs.copy(name, name[:-1] + "!")
    st.blobs.delete(name)
    assert not st.blobs.exists(name) and st.blobs.exists(name[:-1] + "!")
    assert st.check().ok


def test_the_version_changes_with_the_live_pages_only_and_costs_no_index_walk(st, monkeypatch):
    """PageBlobs.version (what host caches compare on open and close) moves
    on every write, clear and resize, not on snapshots or leases; it reads a
    counter kept with the index instead of digesting the whole index."""
    blob_id, v0 = st.blobs.version("d")
    for i in range(200):
        st.blobs.write("d", i * 8192, b"x" * 512)
    written = st.blobs.version("d")[1]
    assert written != v0
    st.blobs.snapshot("d")
    lease = st.blobs.acquire_lease("d")
    assert st.blobs.version("d")[1] == written
    for change in (lambda: st.blobs.write("d", 0, b"y" * 512, lease=lease),
                   lambda: st.blobs.clear("d", 0, 512, lease=lease),
                   lambda: st.blobs.resize("d", 128 * MIB, lease=lease),
                   lambda: st.blobs.resize("d", 64 * MIB, lease=lease)):
        before = st.blobs.version("d")[1]
        change()
        got = st.blobs.version("d")
        assert got[0] == blob_id and got[1] != before
    walked = []
    real = st.blobs.meta.items
    monkeypatch.setattr(st.blobs.meta, "items", lambda txn, table, *a: walked.append(table) or real(txn, table, *a))
    st.blobs.version("d")
    assert "pages" not in walked
    st.blobs.release_lease("d", lease)
    st.blobs.delete("d", snapshots="include")
    st.blobs.create("d", 64 * MIB)
    assert st.blobs.version("d")[0] != blob_id


def test_a_writer_lease_and_its_holder_are_taken_in_one_step(st, monkeypatch):
    """A new writer's lease is recorded with its holder at once: another
    taker meanwhile sees the new holder (alive), never the dead one before
    it, so it cannot break the lease just taken (two writers, one losing
    its writes)."""
    import threading

    from stamp.pageblob import PageBlobs, this_holder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone = {**this_holder(), "lease_pid": int(dead), "lease_started": 1, "lease_holder": f"pid {dead}"}
    st.blobs.release_lease("d", st.blobs.acquire_writer_lease("d", gone))  # its holder recorded, then gone
    paused, go = threading.Event(), threading.Event()
    real = PageBlobs.set_properties

    def slow(self, name, **props):  # the first taker, between its lease and its holder's record
        if not paused.is_set():
            paused.set()
            go.wait(10)
        real(self, name, **props)

    monkeypatch.setattr(PageBlobs, "set_properties", slow)
    got: list[str] = []
    first = threading.Thread(target=lambda: got.append(st.blobs.acquire_writer_lease("d", this_holder())))
    first.start()
    for _ in range(500):
        if paused.is_set() or got:
            break
        time.sleep(0.01)
    try:
        with pytest.raises(stamp.LeaseAlreadyPresent, match=f"pid {os.getpid()}"):
            st.blobs.acquire_writer_lease("d", {**this_holder(), "lease_holder": "the second"})
    finally:
        go.set()
        first.join(10)
    st.blobs.write("d", 0, b"x" * 512, got[0])  # the first taker still holds it


def test_describe_snapshots_is_describe_of_each_a_page_at_a_time(st):
    snaps = []
    for i in range(7):
        st.blobs.write("d", i * 4096, b"s" * 512)
        snaps.append(st.blobs.snapshot("d", {"properties": {"n": i}}))
    epochs = [s.epoch for s in snaps]
    for start in (0, epochs[2], epochs[2] + 1, epochs[-1], epochs[-1] + 1):
        for limit in (1, 3, 100):
            got = st.blobs.describe_snapshots("d", start, limit)
            want = [(s.epoch, st.blobs.describe("d", s.id)) for s in snaps if s.epoch >= start][:limit]
            assert got == want, (start, limit)


def test_iter_diff_in_chunks_carries_a_changed_run_across_chunks(st):
    """A chunk that ends inside a changed run (one logged change, cleared in
    places since): the next chunk seeks the logs past the change's start and
    still lists the rest of the run."""
    base = st.blobs.snapshot("d").id
    st.blobs.write("d", 0, b"w" * (64 * 512))  # one change: pages 0-63
    for p in (1, 5, 6, 40):
        st.blobs.clear("d", p * 512, 512)
    st.blobs.write("d", 100 * 512, b"v" * 512)
    later = st.blobs.snapshot("d").id
    st.blobs.write("d", 200 * 512, b"u" * 512)
    for target in (later, None):
        whole = list(st.blobs.iter_diff("d", base, target))
        assert len(whole) == (8 if target else 9)
        for chunk in (1, 2, 3, 4, 100):
            assert list(st.blobs.iter_diff("d", base, target, chunk=chunk)) == whole, (target, chunk)
            assert list(st.blobs.iter_diff("d", base, target, 3 * 512, 50 * 512, chunk=chunk)) == \
                list(st.blobs.iter_diff("d", base, target, 3 * 512, 50 * 512)), (target, chunk)


def test_a_long_lived_process_holds_no_memory_for_every_blob_name_it_ever_used(st):
    """A server (`stamp serve`) whose clients make, write, read and delete
    blobs under ever new names (a name per backup, per upload) kept each
    name's id in its name -> id cache for good: memory grew with every
    name the process ever saw, deleted ones included (1 KiB names: about
    1 MiB per thousand)."""
    import tracemalloc

    def cycle(i: int) -> None:
        name = f"{i:06d}" + "n" * 1018
        st.blobs.create(name, 4096)
        st.blobs.write(name, 0, b"x" * 512)
        assert st.blobs.read(name, 0, 512) == b"x" * 512
        st.blobs.delete(name)

    for i in range(200):  # warm: what the first names cost once
        cycle(i)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200, 4200):
            cycle(i)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 3 << 20, f"{grown / (1 << 20):.1f} MiB held after 4,000 blobs made and deleted"
