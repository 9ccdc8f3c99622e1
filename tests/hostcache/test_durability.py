"""The host's durability rule under kill -9: a write acknowledged to the
guest survives the process (in the stamp for None and ReadOnly, in the host
cache for ReadWrite), for every disk type, the FromImage OS disk included.
A child process writes through an attached disk and prints each write once
it returns; the test kills it with SIGKILL and reads the disk back in a new
host process. Bounded rounds by default, more with DISKSTAMP_SLOW=1.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap

import pytest

import vhd
from hostcache.boot import make_boot_sector
from hostcache.cache import BlobCache
from hostcache.errors import HostError
from hostcache.host import OS_LUN, Host
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.blobfile import PageBlobFile
from stamp.disks import Disks
from vhd.image import open_image, read_footer

MIB = 1 << 20
ROUNDS = 8 if os.environ.get("DISKSTAMP_SLOW") else 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from hostcache.host import Host
    from hostcache.throttle import FakeClock
    h = Host(sys.argv[2], clock=FakeClock())
    disk = h.open_disk("vm", int(sys.argv[3]))
    seed = int(sys.argv[4])
    for i in range(100000):
        off = (i * 7919 + seed) % 4096 * 4096  # the first 16 MiB: 8 VHD blocks
        disk.write(off, bytes([i % 251 + 1]) * 4096)
        print(i, flush=True)
""")


def offset_of(i: int, seed: int) -> int:
    return (i * 7919 + seed) % 4096 * 4096


def make_host(tmp_path, caching: str, data_disk: bool) -> str:
    with vhd.create(tmp_path / "img.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
        img.write(MIB, os.urandom(8 * MIB))  # the image's data shows through the OS disk's clear bits
    with Stamp.create(str(tmp_path / "st")) as st:
        d = Disks(st)
        d.create_image("img", path=str(tmp_path / "img.vhd"))
        d.create_empty("data", 1, "Premium_LRS")
    with Host.create(str(tmp_path / "host"), str(tmp_path / "st"), cache_bytes=16 * MIB) as h:
        h.create_vm("vm", "D8s_v3", "img", os_caching=caching if not data_disk else "ReadOnly")
        if data_disk:
            h.attach("vm", "data", 0, caching)
    return str(tmp_path / "host")


def kill_after(host: str, lun: int, seed: int, acks: int) -> list[int]:
    """Run the writer, SIGKILL it once it has acknowledged `acks` writes;
    returns the acknowledged write numbers."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, host, str(lun), str(seed)],
                             stdout=subprocess.PIPE, text=True)
    done: list[int] = []
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            done.append(int(line))
            if len(done) >= acks:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    rest = child.stdout.read()  # type: ignore[union-attr]
    done += [int(x) for x in rest.splitlines(keepends=True) if x.endswith("\n")]
    child.stdout.close()  # type: ignore[union-attr]
    return done


@pytest.mark.parametrize("caching,data_disk", [
    ("ReadOnly", False),   # the FromImage OS disk: a differencing VHD, write-through
    ("ReadWrite", False),  # the same, acknowledged once in the host cache
    ("None", True),        # a data disk (fixed VHD) straight to the stamp
    ("ReadWrite", True),
])
def test_kill_9_loses_no_acknowledged_write(tmp_path, caching, data_disk):
    host = make_host(tmp_path, caching, data_disk)
    lun = 0 if data_disk else OS_LUN
    rng = random.Random(f"{caching}{data_disk}")
    with Host(host, clock=FakeClock()) as h:
        disk = h.open_disk("vm", lun)
        model = {off: disk.read(off, 4096) for off in range(0, 16 * MIB, 4096)}
    for round_ in range(ROUNDS):
        seed = rng.randrange(1 << 20)
        acked = kill_after(host, lun, seed, rng.randrange(40, 400))
        assert acked, "the writer acknowledged nothing"
        inflight = offset_of(acked[-1] + 1, seed)  # may or may not have landed
        for i in acked:
            model[offset_of(i, seed)] = bytes([i % 251 + 1]) * 4096
        with Host(host, clock=FakeClock()) as h:
            disk = h.open_disk("vm", lun)
            for off, want in model.items():
                got = disk.read(off, 4096)
                if off == inflight:
                    model[off] = got  # whichever it holds now is what the next round expects
                    continue
                assert got == want, f"round {round_}: an acknowledged write at {off} is lost"


def grow_without_footer(host: str) -> str:
    """The state a kill leaves between growing the OS disk's blob for a new
    block and writing the footer at its new end; returns the blob."""
    with Host(host, clock=FakeClock()) as h:
        blob = str(h.disks.record("vm-osdisk")["blob"])
        size = h.stamp.blobs.size(blob)
        h.stamp.blobs.resize(blob, size + 512 + 2 * MIB + 512)  # bitmap, block, footer: all zeros
    return blob


def test_a_crash_before_the_new_footer_leaves_a_disk_that_opens_by_itself(tmp_path):
    host = make_host(tmp_path, "ReadOnly", False)
    with Host(host, clock=FakeClock()) as h:
        h.open_disk("vm", OS_LUN).write(3 * MIB, b"\x33" * 4096)
    blob = grow_without_footer(host)
    with Host(host, clock=FakeClock()) as h:
        disk = h.open_disk("vm", OS_LUN)  # was: "footer at the end is damaged ... run: vhd check --repair"
        assert disk.read(3 * MIB, 4096) == b"\x33" * 4096
        disk.write(20 * MIB, b"\x44" * 4096)  # a new block after the space the dead write added
        assert disk.read(20 * MIB, 4096) == b"\x44" * 4096
        disk.close()
        assert vhd.check(PageBlobFile(h.stamp, blob, writable=False)).ok
        report = Disks(h.stamp).check_disk("vm-osdisk")
        assert report.ok and report.leaked_bytes  # the dead write's space, unused
        assert not any(p.fix for p in report.problems)  # no `vhd compact blob:...`: vhd cannot open a blob


def test_the_repair_command_an_error_names_works_on_a_disk_in_the_stamp(tmp_path):
    host = make_host(tmp_path, "ReadOnly", False)
    blob = grow_without_footer(host)
    with Stamp.open(str(tmp_path / "st")) as st:
        with pytest.raises(vhd.FormatError, match="footer at the end is damaged") as err:
            open_image(PageBlobFile(st, blob), writable=True)
    command = str(err.value).split("run: ")[1]
    assert command.startswith("stamp ") and " disk check --repair vm-osdisk" in command
    r = subprocess.run([sys.executable, "-m", "stamp", *shlex.split(command)[1:]], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repaired"] == ["rewrote the end footer from the mirror at offset 0"]
    with Stamp.open(str(tmp_path / "st")) as st:
        assert read_footer(PageBlobFile(st, blob, writable=False)) == (read_footer(PageBlobFile(st, blob))[0], False)
        assert Disks(st).check_disk("vm-osdisk").ok


def test_a_failed_open_releases_the_disk_lease(tmp_path):
    host = make_host(tmp_path, "ReadOnly", False)
    blob = grow_without_footer(host)
    with Host(host, clock=FakeClock()) as h:
        h.stamp.blobs.write(blob, 0, bytes(512))  # the mirror too: nothing to recover from
        with pytest.raises(vhd.FormatError):
            h.open_disk("vm", OS_LUN)
        assert h.stamp.blobs.lease_of(blob) is None


def test_an_open_that_fails_writing_back_a_dead_process_lines_releases_the_lease(tmp_path, monkeypatch):
    """Opening a disk first writes back what a killed process left dirty (for
    a mode that will not look at it); a failure there kept the writer lease,
    so the disk could not be opened again by this process until it exited."""
    host = make_host(tmp_path, "ReadOnly", False)
    with Host(host, clock=FakeClock()) as h:
        blob = h.disks.record("vm-osdisk")["blob"]

        def down(*args, **kw):
            raise HostError("the stamp is unreachable")
        monkeypatch.setattr(BlobCache, "flush", down)
        with pytest.raises(HostError, match="unreachable"):
            h.open_disk("vm", OS_LUN)
        assert h.stamp.blobs.lease_of(blob) is None
        monkeypatch.undo()
        assert h.open_disk("vm", OS_LUN).read(0, 512)
