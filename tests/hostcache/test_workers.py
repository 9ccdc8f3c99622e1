"""hostcache serve --workers: clients dealt to worker processes, one disk
written by several at once. NBD multi-conn holds across workers in every
caching mode (a write answered on one connection is read on another; a flush
on one writes back the other's), the throttle's limits hold across them
(counted in the shared bucket, not by the clock), a worker killed -9 loses no
acknowledged write and leaves the buckets whole, nbdcopy --connections works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import vhd
from hostcache import buckets
from hostcache.boot import make_boot_sector
from hostcache.grants import GRANT_SECONDS
from hostcache.host import Host
from hostcache.throttle import TOLERANCE
from stamp import Stamp
from stamp.disks import Disks

from ..conftest import run

MIB = 1 << 20
S4_IOPS = 500  # Standard_LRS 32 GiB: 500 IOPS, no bursting


def setup_host(tmp_path: Any, caching: str = "None", sku: str = "Premium_LRS", gib: int = 128) -> str:
    with vhd.create(tmp_path / "img.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    with Stamp.create(str(tmp_path / "st")) as st:
        d = Disks(st)
        d.create_image("img", path=str(tmp_path / "img.vhd"))
        d.create_empty("data", gib, sku)
    with Host.create(str(tmp_path / "host"), str(tmp_path / "st")) as h:
        h.create_vm("vm", "D8s_v3", "img")
        h.attach("vm", "data", 0, caching)
    return str(tmp_path / "host")


class Served:
    """hostcache serve --workers 2 of LUN 0 on a unix socket."""

    def __init__(self, host: str, sock: str, workers: int = 2) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0",
                                      "--workers", str(workers), "--socket", sock],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, self.proc.stderr.read()  # type: ignore[union-attr]
        self.ready = json.loads(line)

    def connect(self) -> Any:
        import nbd as libnbd

        h = libnbd.NBD()
        h.set_full_info(True)
        h.connect_uri(f"nbd+unix:///lun0?socket={self.sock}")
        return h

    def stop(self) -> tuple[dict[str, Any], str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=90)
        return json.loads(out), err


def worker_pid(h: Any) -> int:
    return int(h.get_export_description().rsplit(" ", 1)[1])


def stamp_bytes(tmp_path: Any, offset: int, length: int) -> bytes:
    """What the stamp holds of the data disk (a fixed VHD: the blob's first bytes are the disk's)."""
    with Stamp.open(str(tmp_path / "st")) as st:
        blob = Disks(st).record("data")["blob"]
        return st.blobs.read(blob, offset, length)


@pytest.mark.parametrize("caching", ["None", "ReadOnly", "ReadWrite"])
def test_multi_conn_a_write_on_one_worker_is_read_on_the_other_and_a_flush_covers_both(tmp_path, caching):
    served = Served(setup_host(tmp_path, caching), str(tmp_path / "s.sock"))
    try:
        a, b = served.connect(), served.connect()
        assert a.can_multi_conn() and b.can_multi_conn()
        assert worker_pid(a) != worker_pid(b) and set(served.ready["workers"]) == {worker_pid(a), worker_pid(b)}
        x, y = b"\x11" * 4096, b"\x22" * 8192
        assert b.pread(8192, MIB) == bytes(8192)  # B's worker reads the range first (ReadOnly, ReadWrite: caches it)
        a.pwrite(x, MIB)
        assert b.pread(4096, MIB) == x  # answered on A, read on B: no stale cache line in B's worker
        b.pwrite(y, MIB)
        assert a.pread(8192, MIB) == y
        a.pwrite(b"\x33" * 4096, 4 * MIB)
        if caching == "ReadWrite":  # acknowledged from the host cache: the stamp has not got it yet
            assert stamp_bytes(tmp_path, 4 * MIB, 4096) == bytes(4096)
        b.flush()  # B's flush covers what A was answered
        assert stamp_bytes(tmp_path, 4 * MIB, 4096) == b"\x33" * 4096
        assert stamp_bytes(tmp_path, MIB, 8192) == y
        a.shutdown()
        b.shutdown()
    finally:
        result, err = served.stop()
    assert result["workers"] == 2 and result["restarted"] == 0, err
    with Host(str(tmp_path / "host")) as h:  # the leases went with the supervisor: the disk opens
        assert h.open_disk("vm", 0).read(MIB, 8192) == y


def shared_tat(host: str) -> float:
    """The data disk's IOPS limiter in the shared bucket: when its next I/O may go."""
    folder = os.path.join(host, "throttle")
    name = next(f for f in os.listdir(folder) if f.startswith("disk%20data%20"))
    with open(os.path.join(folder, name), "rb") as f:
        record = buckets.unpack(f.read(), 2)
    assert record is not None, "the bucket record is damaged"
    return record[1][0][0]


def ios(h: Any, count: int, write: bool = False, qd: int = 8) -> None:
    """`count` 4 KiB reads (or writes) at queue depth `qd` on one connection."""
    buf = bytearray(4096)
    sent = done = 0
    while done < count:
        while sent < count and h.aio_in_flight() < qd:
            (h.aio_pwrite if write else h.aio_pread)(buf, (sent % 1024) * 4096)
            sent += 1
        h.poll(-1)
        done = sent - h.aio_in_flight()
    while h.aio_in_flight():
        h.poll(-1)


def on_both(a: Any, b: Any, count: int, write: bool = False) -> None:
    """`count` I/Os on each connection at once: each a thread (libnbd releases the GIL while it waits)."""
    import threading

    t = threading.Thread(target=ios, args=(b, count, write))
    t.start()
    ios(a, count, write)
    t.join()


def test_the_disk_limit_holds_across_two_workers_in_the_shared_bucket(tmp_path):
    # an S4 (500 IOPS) read by two connections in two workers: every I/O either
    # admits moves the one shared bucket on by 1/500 s, so after N reads it
    # stands at least N/500 s past the time they started. Two buckets (each
    # worker its own, the last written winning) would stand near N/2/500.
    host = setup_host(tmp_path, "None", "Standard_LRS", 32)
    served = Served(host, str(tmp_path / "s.sock"))
    try:
        a, b = served.connect(), served.connect()
        assert worker_pid(a) != worker_pid(b)
        per = 150
        start = time.monotonic()  # the throttle's clock: CLOCK_MONOTONIC, one timeline for every process
        on_both(a, b, per)
        assert shared_tat(host) >= start + 2 * per / S4_IOPS
    finally:
        served.stop()


def test_two_workers_on_grants_together_stay_within_the_disk_limit(tmp_path):
    # each worker admits runs of I/Os on grants (hostcache/grants.py) paid ahead in the shared bucket:
    # 2 x 400 reads on an S4 (500 IOPS) take at least what the limit allows, less the tolerance's
    # burst and one grant per worker, whatever the machine's speed (a slow one only takes longer)
    host = setup_host(tmp_path, "None", "Standard_LRS", 32)
    served = Served(host, str(tmp_path / "s.sock"))
    try:
        a, b = served.connect(), served.connect()
        assert worker_pid(a) != worker_pid(b)
        per = 400
        start = time.monotonic()
        on_both(a, b, per)
        took = time.monotonic() - start
        free = S4_IOPS * (TOLERANCE + 2 * GRANT_SECONDS)  # I/Os that may go without waiting
        assert took >= (2 * per - free) / S4_IOPS / 1.03
    finally:
        served.stop()


def test_a_worker_killed_9_loses_no_acknowledged_write_and_leaves_the_buckets_whole(tmp_path):
    host = setup_host(tmp_path, "ReadWrite", "Standard_LRS", 32)
    served = Served(host, str(tmp_path / "s.sock"))
    try:
        a, b = served.connect(), served.connect()
        victim = worker_pid(a)
        data = os.urandom(256 * 1024)
        a.pwrite(data, 2 * MIB)  # answered: in the host cache, not yet in the stamp
        buf = bytearray(4096)
        for i in range(64):  # throttled reads in flight on the victim when it dies
            a.aio_pread(buf, i * 4096)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017 - libnbd's error for a server gone is its own
            while a.aio_in_flight():
                a.poll(-1)
            a.pread(4096, 0)
        shared_tat(host)  # whole, not torn or drained
        assert b.pread(len(data), 2 * MIB) == data  # the other worker reads the acknowledged write
        c = served.connect()  # the supervisor deals new clients to a new worker in the victim's place
        assert worker_pid(c) not in (victim, worker_pid(b))
        assert c.pread(len(data), 2 * MIB) == data
        start = time.monotonic()
        on_both(b, c, 100, write=True)  # the limit still holds, across the new worker too (ReadWrite: a write
        # passes the disk's limits; a read the cache holds, only the VM's cached ones)
        assert shared_tat(host) >= start + 200 / S4_IOPS
        b.shutdown()
        c.shutdown()
    finally:
        result, err = served.stop()
    assert result["restarted"] == 1 and f"pid {victim}" in err and "signal 9" in err
    assert stamp_bytes(tmp_path, 2 * MIB, len(data)) == data  # the supervisor wrote back what the victim left dirty


def test_a_supervisor_killed_9_takes_its_workers_with_it_and_the_disk_opens_again(tmp_path):
    host = setup_host(tmp_path, "ReadWrite")
    served = Served(host, str(tmp_path / "s.sock"))
    a = served.connect()
    a.pwrite(b"\x44" * 65536, 8 * MIB)  # answered: dirty in the host cache
    served.proc.kill()
    served.proc.wait()
    for pid in served.ready["workers"]:  # each saw its control socket close, flushed and exited
        for _ in range(600):
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} outlived its supervisor")
    with Host(host) as h:  # the dead supervisor's leases are stale: broken on open
        assert h.open_disk("vm", 0).read(8 * MIB, 65536) == b"\x44" * 65536


def test_nbdcopy_with_four_connections_and_fio_with_four_jobs(tmp_path):
    served = Served(setup_host(tmp_path, "ReadOnly"), str(tmp_path / "s.sock"))
    uri = f"nbd+unix:///lun0?socket={served.sock}"
    try:
        src = tmp_path / "in.raw"
        src.write_bytes(os.urandom(16 * MIB))
        run("nbdcopy", "--connections=4", "--requests=16", str(src), uri)
        run("nbdcopy", "--connections=4", uri, str(tmp_path / "out.raw"))
        with open(tmp_path / "out.raw", "rb") as f:
            assert f.read(16 * MIB) == src.read_bytes()
        out = run("fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                  "--numjobs=4", "--size=4M", "--offset_increment=4M", "--verify=crc32c", "--group_reporting",
                  "--output-format=json").stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MIB
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["can_multi_conn"] is True
        assert run("qemu-img", "info", "--output=json", uri).stdout.count("raw")
    finally:
        result, err = served.stop()
    assert result["restarted"] == 0, err


def test_a_differencing_disk_is_refused_with_what_to_do(tmp_path):
    host = setup_host(tmp_path)
    out = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--workers", "2",
                          "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "differencing VHD" in out.stderr and "--workers 1" in out.stderr
    assert not os.path.exists(tmp_path / "s.sock")
    with Host(host) as h:  # nothing was left held
        h.open_disk("vm", 0).close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_socket_that_cannot_be_made_is_a_clear_error_and_leaves_nothing_held(tmp_path, workers):
    host = setup_host(tmp_path)
    for sock, words in [(str(tmp_path / "no" / "such" / "s.sock"), "does not exist"),
                        (str(tmp_path / ("x" * 120)), "too long")]:
        out = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0",
                              "--workers", str(workers), "--socket", sock], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert words in out.stderr and "--socket" in out.stderr, out.stderr
    with Host(host) as h:  # nothing was left held
        h.open_disk("vm", 0).close()


def test_a_workers_own_options_given_by_hand_are_a_clear_error(tmp_path):
    host = setup_host(tmp_path)
    for extra in (["--worker-control", "99"], ["--worker-control", "1"], ["--worker-control", "0", "--worker-lease=0"]):
        out = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0", *extra],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "serve with --workers N" in out.stderr, out.stderr
