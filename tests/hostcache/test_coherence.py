"""The host cache never serves another disk's data, stale data, or bytes
that fail their checksum; after a kill at any step it agrees with the stamp
on every sector that was not acknowledged differently. A "kill" here is a
fail point that raises, then the cache is reopened from its files."""

from __future__ import annotations

import os
import struct

import lmdb
import pytest

from hostcache.cache import LINE, BlobCache, CachedBlob, CacheMode
from hostcache.errors import HostError
from hostcache.host import Host
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.disks import Disks

from .test_host import make_image

MIB = 1 << 20


class Killed(Exception):
    pass


@pytest.fixture
def stamp(tmp_path):
    st = Stamp.create(str(tmp_path / "st"), extent_size=1 << 20)
    st.blobs.create("d", 4 * LINE)
    st.blobs.write("d", 0, b"s" * (4 * LINE))
    yield st
    st.close()


def reopen(cache: BlobCache, folder) -> BlobCache:
    cache.close()  # close writes nothing: what is on disk is what a kill leaves
    return BlobCache(str(folder), capacity=8 * LINE)


def test_a_disk_deleted_and_recreated_under_its_name_does_not_show_the_old_data(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY, writable=False)
    assert f.pread(4096, 0) == b"s" * 4096  # cached now
    stamp.blobs.delete("d")
    stamp.blobs.create("d", 4 * LINE)  # empty, same name
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY, writable=False)
    assert f.pread(4096, 0) == bytes(4096)
    assert cache.check() == []


def test_a_blob_dropped_under_its_open_file_refuses_io_instead_of_losing_it(stamp, tmp_path):
    """A write accepted after the blob's lines and record were dropped (a
    detach by another process) was acknowledged, then discarded at write-back
    as if the blob had been deleted; a read of an uncached line was a KeyError."""
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    cache.drop_blob("d")
    with pytest.raises(HostError, match="no longer in use on this host"):
        f.pwrite(b"x" * 4096, 0)
    with pytest.raises(HostError, match="no longer in use on this host"):
        f.pread(4096, LINE)
    assert cache.dirty() == {} and stamp.blobs.read("d", 0, 4096) == b"s" * 4096


def test_a_write_with_caching_none_is_not_hidden_by_lines_cached_before(stamp, tmp_path):
    """Caching None writes around the cache; the version recorded at its
    close then vouched for the lines an earlier ReadOnly open had cached."""
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(4096, 0) == b"s" * 4096
    f.close()
    f = CachedBlob(cache, stamp, "d", CacheMode.NONE)
    f.pwrite(b"n" * 4096, 0)
    f.close()
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(4096, 0) == b"n" * 4096
    assert cache.check() == []


def test_a_blob_written_elsewhere_is_read_fresh_on_the_next_open(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(4096, 0) == b"s" * 4096
    f.close()
    cache = reopen(cache, tmp_path / "host")  # a new process: the lines are still there
    stamp.blobs.write("d", 0, b"e" * 4096)  # while nobody here had it open
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(4096, 0) == b"e" * 4096


def test_clean_lines_outlive_a_close_when_nothing_changed(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    f.pread(LINE, 0)
    f.pwrite(b"w" * 512, 0)
    f.close()
    cache = reopen(cache, tmp_path / "host")
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(LINE, 0) == b"w" * 512 + b"s" * (LINE - 512)
    assert cache.stats.read_misses == 0  # served from the cache file


def test_a_kill_between_the_stamp_write_and_the_cache_refresh(stamp, tmp_path, monkeypatch):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    f.pread(LINE, 0)

    def killed(*a, **k):
        raise Killed
    monkeypatch.setattr(cache, "update", killed)
    with pytest.raises(Killed):
        f.pwrite(b"n" * 4096, 0)  # in the stamp, not acknowledged
    cache = reopen(cache, tmp_path / "host")
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY)
    assert f.pread(4096, 0) == stamp.blobs.read("d", 0, 4096) == b"n" * 4096
    assert cache.check() == []


def slot_write_then_kill(cache: BlobCache, monkeypatch) -> None:
    real = BlobCache._slot_write

    def write_then_die(self, line, first, data):
        real(self, line, first, data)
        raise Killed
    monkeypatch.setattr(BlobCache, "_slot_write", write_then_die)


def test_a_kill_between_a_slot_write_and_its_index_entry(stamp, tmp_path, monkeypatch):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    f.pread(LINE, 0)  # clean and valid
    slot_write_then_kill(cache, monkeypatch)
    with pytest.raises(Killed):
        f.pwrite(b"n" * 512, 0)  # in the slot, never acknowledged
    monkeypatch.undo()
    cache = reopen(cache, tmp_path / "host")
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    assert f.pread(512, 0) == b"s" * 512  # what the stamp holds
    assert cache.check() == []


def test_a_kill_while_overwriting_dirty_sectors_keeps_either_version(stamp, tmp_path, monkeypatch):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    f.pwrite(b"a" * 1024, 0)  # acknowledged: only the cache holds it
    slot_write_then_kill(cache, monkeypatch)
    with pytest.raises(Killed):
        f.pwrite(b"b" * 1024, 0)
    monkeypatch.undo()
    cache = reopen(cache, tmp_path / "host")
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    assert f.pread(1024, 0) in (b"a" * 1024, b"b" * 1024)
    assert cache.check() == [] and not cache.lost


def flip(tmp_path, cache: BlobCache, at: int) -> None:
    """Flip a bit of the cache's only line, `at` bytes into its slot."""
    (line,) = cache.lines.values()
    with open(tmp_path / "host" / "cache.dat", "r+b") as fh:
        fh.seek(line.slot * LINE + at)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_in_the_cache_file_is_dropped_and_read_again(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE, ram=4 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY, writable=False)  # a base image
    f.pread(LINE, 0)
    flip(tmp_path, cache, 1000)
    cache = reopen(cache, tmp_path / "host")
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY, writable=False)
    assert f.pread(LINE, 0) == b"s" * LINE
    assert cache.stats.bad_sectors == 8 and cache.check() == []  # the 4 KiB chunk a checksum covers
    assert f.pread(LINE, 0) == b"s" * LINE  # read again from the stamp, and cached again


def test_check_finds_a_sector_that_fails_its_checksum(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READONLY, writable=False)
    f.pread(LINE, 0)
    assert cache.check() == []
    flip(tmp_path, cache, 1000)
    assert cache.check() == [f"line {(f.blob_id, 0)}: chunk 0 (sectors 0-7) fails its checksum"]


def test_a_flipped_byte_in_dirty_data_is_reported_lost_not_served(stamp, tmp_path):
    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    f.pwrite(b"a" * 1024, LINE)
    f.pwrite(b"b" * 512, LINE + 4096)  # the next chunk: unharmed
    flip(tmp_path, cache, 600)
    assert f.pread(4608, LINE) == b"s" * 4096 + b"b" * 512
    assert cache.lost == {"d": [(LINE, 1024)]}
    f.sync()
    assert stamp.blobs.read("d", LINE, 4608) == b"s" * 4096 + b"b" * 512
    assert reopen(cache, tmp_path / "host").lost == {"d": [(LINE, 1024)]}  # the report outlives the process


@pytest.fixture
def host(tmp_path):
    with Stamp.create(str(tmp_path / "hst")) as st:
        d = Disks(st)
        d.create_image("img", path=make_image(tmp_path / "img.vhd"))
        d.create_empty("data", 1, "Premium_LRS")
    h = Host.create(str(tmp_path / "hosted"), str(tmp_path / "hst"), cache_bytes=32 * MIB, clock=FakeClock())
    h.create_vm("vm", "D8s_v3", "img", os_caching="ReadOnly")
    yield h
    h.close()


def test_a_data_disk_recreated_empty_under_its_name_reads_zeros(host):
    host.attach("vm", "data", 0, "ReadOnly")
    disk = host.open_disk("vm", 0)
    disk.write(0, b"\x42" * 4096)
    assert disk.read(0, 4096) == b"\x42" * 4096
    host.detach("vm", 0)
    host.disks.delete_disk("data")
    host.disks.create_empty("data", 1, "Premium_LRS")
    host.attach("vm", "data", 0, "ReadOnly")
    assert host.open_disk("vm", 0).read(0, 4096) == bytes(4096)


def test_a_disk_written_elsewhere_while_detached_reads_the_new_data(host):
    host.attach("vm", "data", 0, "ReadWrite")
    host.open_disk("vm", 0).write(0, b"\x42" * 4096)
    host.detach("vm", 0)
    with host.disks.open_virtual("data", writable=True) as v:
        v.write(0, b"\x43" * 4096)
    host.attach("vm", "data", 0, "ReadWrite")
    assert host.open_disk("vm", 0).read(0, 4096) == b"\x43" * 4096


def test_an_os_disk_written_while_its_vm_was_stopped_reads_the_new_data(host):
    disk = host.open_disk("vm", -1)
    assert disk.read(0, 4096)  # the cache holds it
    host.stop("vm")
    with host.disks.open_virtual("vm-osdisk", writable=True) as v:
        v.write(0, b"\x44" * 4096)
    host.start("vm")
    assert host.open_disk("vm", -1).read(0, 4096) == b"\x44" * 4096


def test_an_index_from_before_blob_ids_keeps_its_dirty_data(stamp, tmp_path):
    """A cache index keyed by blob name (older hosts): its dirty sectors are
    acknowledged writes, adopted under the blob's id; clean lines go."""
    folder = tmp_path / "host"
    folder.mkdir()
    env = lmdb.open(str(folder / "cache-index"), max_dbs=4)
    db = env.open_db(b"lines")
    with env.begin(write=True) as txn:
        old = struct.Struct("<Q16s16s")
        txn.put(b"d\0" + (1).to_bytes(8, "big"), old.pack(0, (3).to_bytes(16, "little"), (3).to_bytes(16, "little")),
                db=db)
        txn.put(b"d\0" + (2).to_bytes(8, "big"), old.pack(1, (1).to_bytes(16, "little"), bytes(16)), db=db)
    env.close()
    with open(folder / "cache.dat", "wb") as fh:
        fh.write(b"o" * 1024)
    cache = BlobCache(str(folder), capacity=8 * LINE)
    cache.prune(stamp)
    f = CachedBlob(cache, stamp, "d", CacheMode.READWRITE)
    assert f.pread(1536, LINE) == b"o" * 1024 + b"s" * 512
    assert f.pread(512, 2 * LINE) == b"s" * 512
    f.sync()
    assert stamp.blobs.read("d", LINE, 1024) == b"o" * 1024
    assert cache.check() == []


def test_overlapping_write_throughs_from_two_processes_leave_the_cache_as_the_stamp(stamp, tmp_path, monkeypatch):
    """ReadOnly caching in `hostcache serve --workers 2`: worker 1's write of
    X reached the stamp, then worker 2's write of Y to the same sectors ran
    whole (invalidate, stamp, refresh), then worker 1 refreshed the cache
    with X. The stamp held Y, the cache X: every read served X, until the
    line was evicted and the disk changed by itself to Y (a backup, which
    reads the stamp, held Y all along)."""
    import threading

    cache = BlobCache(str(tmp_path / "host"), capacity=8 * LINE)  # its lock excludes threads as processes
    f1 = CachedBlob(cache, stamp, "d", CacheMode.READONLY)  # worker 1 (a thread here)
    f2 = CachedBlob(cache, stamp, "d", CacheMode.READONLY)  # worker 2
    assert f2.pread(LINE, 0) == b"s" * LINE  # the line is cached: a write-through refreshes it
    landed, go_on = threading.Event(), threading.Event()
    real = type(stamp.blobs).write

    def write(self, name, offset, data, lease=None):
        real(self, name, offset, data, lease=lease)
        if bytes(data[:1]) == b"X":
            landed.set()
            go_on.wait(30)  # worker 1 is descheduled between its stamp write and its refresh
    monkeypatch.setattr(type(stamp.blobs), "write", write)
    t1 = threading.Thread(target=f1.pwrite, args=(b"X" * 4096, 0))
    t1.start()
    assert landed.wait(30)
    t2 = threading.Thread(target=f2.pwrite, args=(b"Y" * 4096, 0))
    t2.start()
    t2.join(5)  # done at once, or held until worker 1 is done
    go_on.set()
    t1.join(30)
    t2.join(30)
    assert stamp.blobs.read("d", 0, 4096) == f2.pread(4096, 0) == f1.pread(4096, 0)
    assert cache.check() == []
