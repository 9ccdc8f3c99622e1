"""A VM's disks over NBD, through cache and throttle: fio measures the tier;
a killed server leaves nothing behind that blocks the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import vhd
from hostcache.boot import make_boot_sector
from hostcache.host import Host
from stamp import Stamp
from stamp.disks import Disks

from ..conftest import run
from ..vhd.test_nbd import conformance, hostile_load

MIB = 1 << 20


def setup_host(tmp_path) -> str:
    with vhd.create(tmp_path / "img.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    with Stamp.create(str(tmp_path / "st")) as st:
        d = Disks(st)
        d.create_image("img", path=str(tmp_path / "img.vhd"))
        d.create_empty("p10", 128, "Premium_LRS")
    with Host.create(str(tmp_path / "host"), str(tmp_path / "st")) as h:
        h.create_vm("vm", "D8s_v3", "img")
        h.attach("vm", "p10", 0, "ReadWrite")
    return str(tmp_path / "host")


def serve(host: str, sock: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--socket", sock],
                            stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["serving"] == ["os", "lun0"]  # type: ignore[union-attr]
    return proc


def test_fio_through_the_host_measures_the_tier(tmp_path):
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)
    try:
        out = run("fio", "--name=t", "--ioengine=nbd", f"--uri=nbd+unix:///lun0?socket={sock}", "--rw=randwrite",
                  "--bs=4k", "--iodepth=16", "--size=32M", "--runtime=3", "--time_based",
                  "--output-format=json").stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        # a new P10 bursts at 3,500 IOPS while its credits last: the throttle never lets more
        # through (how close a busy machine gets to it is tools/fio_tiers.py's measure, not a test's)
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0
        assert job["write"]["iops"] <= 3500 * 1.05, job["write"]["iops"]
        info = json.loads(run("nbdinfo", "--json", f"nbd+unix:///os?socket={sock}").stdout)
        assert info["exports"][0]["export-size"] == 32 * MIB
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_killed_server_leaves_the_disk_usable_and_its_writes_in_the_cache(tmp_path):
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)
    src = tmp_path / "in.raw"
    src.write_bytes(b"\x5a" * (4 * MIB))
    run("nbdcopy", str(src), f"nbd+unix:///lun0?socket={sock}")  # a 4 MiB file into the start of the disk
    proc.kill()  # SIGKILL: no flush, the lease is left behind
    proc.wait()
    with Host(host) as h:  # a new process: stale lease broken, dirty lines written back on flush
        disk = h.open_disk("vm", 0)
        assert disk.read(0, 4096) == b"\x5a" * 4096
        h.detach("vm", 0)
        with Disks(h.stamp).open_virtual("p10") as v:
            assert v.read(4 * MIB - 512, 512) == b"\x5a" * 512


def test_mount_an_attached_disk_write_a_file_and_find_it_in_the_stamp(tmp_path):
    host = setup_host(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "fs").mkdir()
    cli = [sys.executable, "-m", "hostcache", "--host", host]
    try:
        r = subprocess.run(cli + ["mount", "vm", str(tmp_path / "m"), "--lun", "0"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        run("mkfs.ext4", "-q", "-F", str(tmp_path / "m" / "disk"), "64M")
        assert subprocess.run(cli + ["umount", str(tmp_path / "m")], capture_output=True).returncode == 0
        r = subprocess.run(cli + ["mount", "vm", str(tmp_path / "m"), "--lun", "0", "--fs", str(tmp_path / "fs")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        (tmp_path / "fs" / "note.txt").write_text("through the host cache\n")
    finally:
        subprocess.run(cli + ["umount", str(tmp_path / "m")], capture_output=True)
    with Host(host) as h:  # the ReadWrite cache was flushed on the way out; detach to be sure
        h.detach("vm", 0)
        raw = tmp_path / "p10.raw"
        with Disks(h.stamp).open_virtual("p10") as v, open(raw, "wb") as f:
            f.write(v.read(0, 64 * MIB))
    assert run("debugfs", "-R", "cat /note.txt", str(raw)).stdout == "through the host cache\n"
    r = subprocess.run(cli + ["mount", "vm", str(tmp_path / "m"), "--lun", "7"], capture_output=True, text=True)
    assert r.returncode == 1 and "no disk at LUN 7" in r.stderr


def test_while_served_another_process_snapshots_backs_up_and_reads_stats(tmp_path):
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)
    try:
        src = tmp_path / "in.raw"
        src.write_bytes(b"\x42" * MIB)
        run("nbdcopy", str(src), f"nbd+unix:///lun0?socket={sock}")
        st = str(tmp_path / "st")
        stamp_cli = [sys.executable, "-m", "stamp", "--stamp", st]
        assert subprocess.run(stamp_cli + ["snapshot", "create", "s1", "--disk", "p10"],
                              capture_output=True).returncode == 0
        vault = ["backup", "--vault", str(tmp_path / "vault")]
        assert subprocess.run(stamp_cli + vault + ["init", "--no-encryption"], capture_output=True).returncode == 0
        r = subprocess.run(stamp_cli + vault + ["create", "p10"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        stats = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "cache", "stats"],
                               capture_output=True, text=True)
        assert stats.returncode == 0 and json.loads(stats.stdout)["lines"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_write_zeroes_with_no_hole_is_written_and_every_flag_is_judged_as_vhd_serve_does(tmp_path):
    """qemu sends NO_HOLE for a guest's write-zeroes: it must reach the disk
    (it was acknowledged and dropped: the coroutine was never awaited)."""
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)
    try:
        target = f"nbd+unix:///lun0?socket={sock}"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 64K", "-c", "write -z 1M 64K", target)
        run("qemu-io", "-f", "raw", "-c", "read -P 0 1M 64K", target)  # fails unless all 64 KiB read as zeros
        conformance(target)
        conformance(f"nbd+unix:///os?socket={sock}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_mount_whose_server_fails_shows_what_the_server_said(tmp_path):
    host = setup_host(tmp_path)
    with Host(host) as h:
        h.stop("vm")
    (tmp_path / "m").mkdir()
    r = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "mount", "vm", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "failed to start" in r.stderr and "start it first" in r.stderr, r.stderr
    assert not (tmp_path / "m" / "disk").exists()


def test_a_greedy_client_is_held_to_the_budget_and_a_light_one_on_another_disk_is_served(tmp_path):
    """40 unread 32 MiB reads once took 3.3 GB and stalled another client >10 s."""
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)  # the default budget: 128 MiB
    try:
        hostile_load(sock, proc.pid, "lun0", "os", connections=1, budget=128 * MIB)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_second_server_on_the_same_socket_is_refused_and_the_socket_goes_with_the_first(tmp_path):
    host = setup_host(tmp_path)
    sock = str(tmp_path / "s.sock")
    proc = serve(host, sock)
    try:
        second = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--socket", sock],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already listening" in second.stderr, second.stderr
        info = json.loads(run("nbdinfo", "--json", f"nbd+unix:///os?socket={sock}").stdout)
        assert info["exports"][0]["export-size"] == 32 * MIB  # the first still serves
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert not os.path.exists(sock)


def node_bytes(stamp: str) -> int:
    total = 0
    for root, _, files in os.walk(os.path.join(stamp, "nodes")):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass  # deleted since the listing
    return total


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_reclaims_the_space_of_overwritten_data_by_itself(tmp_path, workers):
    """hostcache serve runs the stamp's reclaimer: 4 MiB overwritten 12 times
    through NBD (cache None: every write reaches the stamp) leaves about one
    copy's worth of replicas on disk, without any `stamp gc`; --no-reclaim
    leaves all twelve. With --workers the supervisor runs it, once for all
    (it ran in none of them)."""
    with vhd.create(tmp_path / "img.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    stamp = str(tmp_path / "st")
    with Stamp.create(stamp, extent_size=MIB) as st:
        d = Disks(st)
        d.create_image("img", path=str(tmp_path / "img.vhd"))
        d.create_empty("p10", 128, "Premium_LRS")
    host = str(tmp_path / "host")
    with Host.create(host, stamp) as h:
        h.create_vm("vm", "D8s_v3", "img")
        h.attach("vm", "p10", 0, "None")
    sock = str(tmp_path / "s.sock")
    results = {}
    for flags in ([], ["--no-reclaim"]):
        luns = [] if workers == 1 else ["--lun", "0", "--workers", str(workers)]  # the OS disk: one process only
        proc = subprocess.Popen([sys.executable, "-m", "hostcache", "--host", host, "serve", "vm", "--socket", sock,
                                 *luns, *flags], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["serving"] == (["os", "lun0"] if workers == 1 else ["lun0"])
        base = node_bytes(stamp)
        for i in range(12):
            src = tmp_path / "in.raw"
            src.write_bytes(bytes([i + 1]) * (4 * MIB))
            run("nbdcopy", str(src), f"nbd+unix:///lun0?socket={sock}")
        for _ in range(600):  # rounds are paced: give them time (a busy machine is slow), not a deadline
            if flags or node_bytes(stamp) - base < 3 * 2 * 4 * MIB:
                break
            time.sleep(0.05)
        grown = node_bytes(stamp) - base
        proc.send_signal(signal.SIGTERM)
        out = json.loads(proc.stdout.read())
        proc.wait(timeout=20)
        results[bool(flags)] = (grown, out)
    grown, out = results[False]
    assert grown < 3 * 2 * 4 * MIB and out["reclaimed"]["bytes_freed"] > 3 * 4 * MIB, results
    assert ("writers_held" in out) == (workers == 1), out  # how long writes waited for it (workers keep theirs)
    grown, out = results[True]
    assert grown > 3 * 11 * 4 * MIB and "reclaimed" not in out, results
    with Stamp.open(stamp) as st:
        assert st.check(deep=True).ok
    with Host(host) as h:
        assert h.open_disk("vm", 0).read(0, 4096) == bytes([12]) * 4096
