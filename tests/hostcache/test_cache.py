"""The BlobCache in its three modes against a byte model; crash, host loss,
sharing a base image."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hostcache.cache import LINE, BlobCache, CachedBlob, CacheMode, runs
from hostcache.errors import HostError
from stamp import Stamp

SIZE = 48 * 8192  # 6 cache lines of 64 KiB
SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))


def test_runs_of_bits():
    assert runs(0) == [] and runs(0b1) == [(0, 1)] and runs(0b1110_0110) == [(1, 2), (5, 3)]
    assert runs((1 << 128) - 1) == [(0, 128)]


class CacheMachine(RuleBasedStateMachine):
    mode = CacheMode.READWRITE

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cache-model-")
        self.stamp = Stamp.create(os.path.join(self.dir, "st"), extent_size=1 << 20)
        self.stamp.blobs.create("disk", SIZE)
        self.model = bytearray(SIZE)
        self.open_cache()

    def open_cache(self) -> None:
        # 3 lines of cache for a 6-line blob: eviction pressure all the time
        self.cache = BlobCache(os.path.join(self.dir, "host"), capacity=3 * LINE, ram=LINE)
        self.file = CachedBlob(self.cache, self.stamp, "disk", self.mode)

    @rule(sector=st.integers(0, SIZE // 512 - 1), count=st.integers(1, 300), value=st.integers(1, 255))
    def write(self, sector, count, value):
        count = min(count, SIZE // 512 - sector)
        data = bytes([value]) * (count * 512)
        self.file.pwrite(data, sector * 512)
        self.model[sector * 512:(sector + count) * 512] = data

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * LINE))
    def read(self, offset, length):
        length = min(length, SIZE - offset)
        assert self.file.pread(length, offset) == bytes(self.model[offset:offset + length])

    @rule()
    def flush(self):
        self.file.sync()
        assert self.stamp.blobs.read("disk", 0, SIZE) == bytes(self.model)  # the stamp agrees

    @rule()
    def detach_and_reattach(self):
        self.file.sync()  # detach flushes
        self.file = CachedBlob(self.cache, self.stamp, "disk", self.mode)

    @rule()
    def process_restart(self):
        """The host process dies and comes back: the cache file and index survive."""
        self.cache.close()
        self.open_cache()

    @precondition(lambda self: self.mode is CacheMode.READWRITE)
    @rule()
    def host_lost(self):
        lost = self.cache.lose()
        stamp_now = self.stamp.blobs.read("disk", 0, SIZE)
        for off, n in lost.get("disk", []):  # exactly the lost ranges differ
            self.model[off:off + n] = stamp_now[off:off + n]
        assert stamp_now == bytes(self.model)

    @invariant()
    def cache_checks(self):
        assert self.cache.check() == []

    def teardown(self):
        self.file.sync()
        assert self.stamp.blobs.read("disk", 0, SIZE) == bytes(self.model)
        self.cache.close()
        self.stamp.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def machine(mode: CacheMode):
    cls = type(f"Machine{mode.value}", (CacheMachine,), {"mode": mode})
    case = cls.TestCase
    case.settings = settings(max_examples=150 if SLOW else 12, stateful_step_count=30, deadline=None)
    return case


TestReadWrite = machine(CacheMode.READWRITE)
TestReadOnly = machine(CacheMode.READONLY)
TestNone = machine(CacheMode.NONE)


def test_read_write_acknowledges_in_cache_and_writes_back_on_flush(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    f.pwrite(b"w" * 4096, LINE + 512)
    assert st.blobs.read("d", LINE, 8192) == bytes(8192)  # not in the stamp yet
    assert cache.dirty() == {"d": [(LINE + 512, 4096)]}
    f.sync()
    assert st.blobs.read("d", LINE + 512, 4096) == b"w" * 4096 and cache.dirty() == {}


def test_host_lost_loses_exactly_the_unflushed_writes(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    f.pwrite(b"a" * 512, 0)
    f.sync()
    f.pwrite(b"b" * 1024, 2 * LINE)
    assert cache.lose() == {"d": [(2 * LINE, 1024)]}
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    assert f.pread(512, 0) == b"a" * 512 and f.pread(1024, 2 * LINE) == bytes(1024)


def test_a_base_image_under_many_disks_is_cached_once(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("images/base", 4 * LINE)
    st.blobs.write("images/base", 0, b"i" * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    for _ in range(5):  # five VMs' disks read their parent's first line
        assert CachedBlob(cache, st, "images/base", CacheMode.READONLY, writable=False).pread(LINE, 0) == b"i" * LINE
    assert cache.stats.read_misses == LINE // 512 and cache.stats.read_hits == 4 * LINE // 512
    assert len(cache.lines) == 1


def test_scan_resistance_keeps_the_hot_line(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 64 * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READONLY)
    f.pread(512, 0)
    f.pread(512, 0)  # line 0 is hot: protected
    for i in range(1, 64):  # a long scan passes through probation only
        f.pread(512, i * LINE)
    assert (f.blob_id, 0) in cache.lines


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from stamp import Stamp
    from hostcache.cache import BlobCache, CachedBlob, CacheMode
    st = Stamp.open(sys.argv[1])
    cache = BlobCache(sys.argv[2], capacity=4 * 65536)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    for i in range(100000):
        f.pwrite(bytes([i % 250 + 1]) * 512, (i * 7 % 1024) * 512)
        print(i, flush=True)
""")


def test_kill_9_during_read_write_loses_no_acknowledged_write(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with Stamp.create(str(tmp_path / "st"), extent_size=1 << 20) as st:
        st.blobs.create("d", 1024 * 512)
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "st"), str(tmp_path / "host"), root],
                                 stdout=subprocess.PIPE, text=True)
        acked = []
        for line in child.stdout:  # type: ignore[union-attr]
            acked.append(line)
            if len(acked) > 200 + 150 * round_:
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        acked += list(child.stdout)  # type: ignore[union-attr]
        if acked and not acked[-1].endswith("\n"):
            acked.pop()
        model = {}
        for line in acked:
            i = int(line)
            model[(i * 7 % 1024) * 512] = bytes([i % 250 + 1]) * 512
        with Stamp.open(str(tmp_path / "st")) as st:
            cache = BlobCache(str(tmp_path / "host"), capacity=4 * 65536)
            assert cache.check() == []
            f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
            f.sync()  # reattach writes back what the dead process left dirty
            cache.close()
            got = st.blobs.read("d", 0, 1024 * 512)
        n = len(acked)
        inflight = (n * 7 % 1024) * 512  # the write in flight may or may not have landed
        for off, data in model.items():
            if off != inflight:
                assert got[off:off + 512] == data, (round_, off)


def test_dirty_ranges_merge_across_cache_lines(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    f.pwrite(b"a" * 1024, 2 * LINE - 512)  # ends in the next line: one dirty range, not two
    f.pwrite(b"b" * 512, 3 * LINE)
    assert cache.dirty() == {"d": [(2 * LINE - 512, 1024), (3 * LINE, 512)]}
    assert cache.dirty("other") == {}


SHARER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from stamp import Stamp
    from hostcache.cache import BlobCache, CachedBlob, CacheMode
    st = Stamp.open(sys.argv[1])
    cache = BlobCache(sys.argv[2], capacity=16 * 65536)
    name, fill = sys.argv[4], int(sys.argv[5])
    f = CachedBlob(cache, st, name, CacheMode.READWRITE, lease=st.blobs.acquire_writer_lease(name))
    print("ready", flush=True)
    sys.stdin.readline()  # both processes have loaded the cache's index before either writes
    for i in range(12):
        f.pwrite(bytes([fill + i]) * 65536, i * 65536)
    print("done", flush=True)
    os._exit(0)  # as a kill: the dirty lines stay in the cache
""")


def test_two_processes_sharing_one_cache_keep_each_others_lines(tmp_path):
    """Two processes of one host (`hostcache serve` and a CLI command, say)
    write different disks through one cache at once, 24 dirty lines in 16
    slots: neither reuses a slot the other holds, and evicting the other's
    dirty line writes it back under the other's lease."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with Stamp.create(str(tmp_path / "st"), extent_size=1 << 20) as st:
        for name in ("a", "b"):
            st.blobs.create(name, 12 * LINE)
    children = [subprocess.Popen([sys.executable, "-c", SHARER, str(tmp_path / "st"), str(tmp_path / "host"), root,
                                  name, fill], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for name, fill in (("a", "1"), ("b", "101"))]
    for child in children:
        assert child.stdout.readline() == "ready\n"  # type: ignore[union-attr]
    for child in children:
        child.stdin.write("go\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
    for child in children:
        assert child.stdout.read() == "done\n"  # type: ignore[union-attr]
        assert child.wait() == 0
    with Stamp.open(str(tmp_path / "st")) as st:
        cache = BlobCache(str(tmp_path / "host"), capacity=16 * LINE)
        assert cache.check() == [] and not cache.lost
        for name, fill in (("a", 1), ("b", 101)):
            f = CachedBlob(cache, st, name, CacheMode.READWRITE, lease=st.blobs.acquire_writer_lease(name))
            for i in range(12):
                assert f.pread(LINE, i * LINE) == bytes([fill + i]) * LINE, (name, i)
            f.sync()
            assert st.blobs.read(name, 0, 12 * LINE) == b"".join(bytes([fill + i]) * LINE for i in range(12))
        assert cache.check() == [] and not cache.lost
        cache.close()


def test_the_allocation_map_counts_what_the_cache_holds_dirty(tmp_path):
    """A fixed VHD's map comes from the blob's page ranges: dirty sectors only
    the cache holds were reported as holes, which nbdcopy and qemu-img skip."""
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    st.blobs.write("d", 0, b"s" * 512)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    f.pwrite(b"q" * 1024, LINE - 512)
    f.pwrite(b"q" * 512, 3 * LINE)
    assert f.data_ranges(0, 4 * LINE) == [(0, 512), (LINE - 512, 1024), (3 * LINE, 512)]
    assert f.data_ranges(LINE, 2 * LINE) == [(LINE, 512)]
    f.sync()
    assert f.data_ranges(0, 4 * LINE) == st.blobs.page_ranges("d")


def test_a_full_cache_disk_is_a_host_error_and_leaves_the_index_the_truth(tmp_path, monkeypatch):
    """A write that fails on the cache's disk (ENOSPC) left this process's
    view ahead of the index (a line and its slot the index never got); the
    error was a bare OSError. Now it is a HostError, and the view is loaded
    again from the index, so later writes and check() agree with it."""
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
    f.pwrite(b"a" * LINE, 0)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(BlobCache, "_slot_write", full)
    with pytest.raises(HostError, match="No space left on device"):
        f.pwrite(b"b" * LINE, LINE)
    monkeypatch.undo()
    assert cache.check() == []
    f.pwrite(b"c" * LINE, 2 * LINE)
    assert f.pread(3 * LINE, 0) == b"a" * LINE + bytes(LINE) + b"c" * LINE
    assert cache.check() == [] and not cache.lost


def test_a_huge_cache_costs_nothing_until_used(tmp_path):
    """Opening a cache listed every slot as free: a 64 GiB cache held a
    million-entry list (a 95 PiB one, `hostcache init --cache-mib
    99999999999`, never finished). Free slots above the highest used one are
    not listed."""
    st = Stamp.create(str(tmp_path / "st"))
    st.blobs.create("d", 4 * LINE)
    tracemalloc.start()
    try:
        cache = BlobCache(str(tmp_path / "host"), capacity=64 << 30)
        f = CachedBlob(cache, st, "d", CacheMode.READWRITE)
        f.pwrite(b"x" * LINE, LINE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert len(cache.free) == (64 << 30) // LINE - 1 and cache.check() == []
    cache.close()
