"""The host's durability rule under kill -9: a write acknowledged to the
guest survives the process (in the stamp for None and ReadOnly, in the host
cache for ReadWrite), for every disk type, the FromImage OS disk included.
A child process writes through an attached disk and prints each write once
it returns; the test kills it with SIGKILL and reads the disk back in a new
host process. Bounded rounds by default, more with DISKSTAMP_SLOW=1.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

import vhd
from hostcache.boot import make_boot_sector
from hostcache.host import OS_LUN, Host
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.disks import Disks

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
