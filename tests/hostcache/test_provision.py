"""A disk's performance changed while it is attached and served: the host's
throttle takes the new limits without a re-attach. Rates are read from the
throttle's own clock (a FakeClock the I/O advances) and its limiters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hostcache.host import PERFORMANCE_LOOK_SECONDS, Host
from hostcache.throttle import FakeClock
from hostcache.tiers import Burst, catalog, disk_limits
from stamp import Stamp
from stamp import performance as perf
from stamp.disks import Disks

from .test_host import make_image

MIB = 1 << 20


@pytest.fixture
def host(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    d = Disks(st)
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_empty("ultra", 64, "UltraSSD_LRS", iops=1000, mbps=250)
    d.create_empty("v2", 64, "PremiumV2_LRS")
    d.create_empty("p10", 128, "Premium_LRS")
    st.close()
    h = Host.create(str(tmp_path / "host"), str(tmp_path / "st"), cache_bytes=32 * MIB, clock=FakeClock(),
                    latency=False)
    h.create_vm("vm1", "D8s_v3", "mbr")  # 12,800 uncached IOPS: caps none of the rates below
    yield h
    h.close()


def iops(disk, n: int = 2000, size: int = 4096) -> float:
    """Reads per second of the throttle's clock over n reads, after one look at
    the record and 500 reads that use up what an idle limiter admits at once."""
    disk.host.clock.advance(PERFORMANCE_LOOK_SECONDS)
    for _ in range(500):
        disk.read(0, size)
    t0 = disk.host.clock.now()
    for i in range(n):
        disk.read(i * size % (32 * MIB), size)
    return n / (disk.host.clock.now() - t0)


def update(host, *args):
    """`stamp disk update` in another process, as a user would while the disk is served."""
    env = {**os.environ, "DISKSTAMP_STAMP": host.config["stamp"]}
    r = subprocess.run([sys.executable, "-m", "stamp", "disk", "update", *args], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr


def test_ultra_iops_changed_while_attached_take_effect(host):
    host.attach("vm1", "ultra", 0)
    disk = host.open_disk("vm1", 0)
    t = disk.throttle
    assert iops(disk) == pytest.approx(1000, rel=0.03)
    assert (t.disks["0"].limits.iops, t.disks["0"].limits.mbps) == (1000, 250)
    update(host, "ultra", "--disk-iops-read-write", "4000", "--disk-mbps-read-write", "1000")
    assert iops(disk) == pytest.approx(4000, rel=0.03)
    assert disk.throttle is t and t.disks["0"].iops.rate == 4000  # the same throttle, not a re-attach
    assert t.disks["0"].bandwidth.rate == 1000 * 10 ** 6
    # 64 KiB reads are capped by MB/s: 250 MB/s -> 3,815 per second, not 4,000
    update(host, "ultra", "--disk-mbps-read-write", "250")
    assert iops(disk, size=64 * 1024) == pytest.approx(250e6 / 65536, rel=0.03)
    stats = host.throttle_stats("vm1")["limiters"]
    assert stats["disk lun0 Ultra IOPS"]["requests"] >= 6000  # statistics carried across the changes


def test_premium_v2_changes_take_effect(host):
    host.attach("vm1", "v2", 1)
    disk = host.open_disk("vm1", 1)
    assert iops(disk) == pytest.approx(3000, rel=0.03)
    Disks(host.stamp).update_disk("v2", iops=10000, mbps=500)  # the Python API, in this process
    assert iops(disk, n=5000) == pytest.approx(10000, rel=0.03)


def test_a_premium_tier_change_takes_effect_and_a_downgrade_drains_the_burst(host):
    """P10 bursts to 3,500 while credits last; as P30 it does 5,000 (no credit
    bursting); back at P10 its credits are gone (a tier without credits held
    none), so 500."""
    host.attach("vm1", "p10", 2)
    disk = host.open_disk("vm1", 2)
    assert iops(disk) == pytest.approx(3500, rel=0.03)  # a new disk's full bucket
    update(host, "p10", "--tier", "P30")
    assert iops(disk, n=5000) == pytest.approx(5000, rel=0.03)
    limits = disk.throttle.disks["2"].limits
    assert (limits.tier, limits.burst, limits.size_gib, limits.host_caching) == ("P30", Burst.NONE, 128, True)
    assert "disk lun2 P30 IOPS" in disk.throttle.statistics()
    update(host, "p10", "--tier", "P10")
    assert iops(disk, n=1000) == pytest.approx(500, rel=0.03)


def test_a_change_is_seen_only_after_the_look_interval(host):
    """Bounded cost per I/O: the record is read at most once per interval."""
    host.attach("vm1", "ultra", 0)
    disk = host.open_disk("vm1", 0)
    disk.read(0, 4096)
    reads = []
    real = host.disks.record
    host.disks.record = lambda name: reads.append(name) or real(name)  # type: ignore[method-assign]
    Disks(host.stamp).update_disk("ultra", iops=4000, mbps=1000)
    for _ in range(20):  # 20 reads at 1,000 IOPS: 20 ms of the clock, under the 50 ms interval
        disk.read(0, 4096)
    assert reads == [] and disk.throttle.disks["0"].limits.iops == 1000
    host.clock.advance(PERFORMANCE_LOOK_SECONDS)
    disk.read(0, 4096)
    assert reads == ["ultra"] and disk.throttle.disks["0"].limits.iops == 4000


def test_a_new_attach_gets_the_recorded_figures(host):
    Disks(host.stamp).update_disk("ultra", iops=2000, mbps=400)
    host.attach("vm1", "ultra", 0)
    assert host.throttle("vm1").disks["0"].limits.iops == 2000


def test_the_stamps_tier_table_is_the_catalogs():
    """stamp/performance.py keeps tier names and sizes for its rules; they are the catalog's."""
    for sku, tiers in perf.TIERS.items():
        assert [(t.tier, t.size_gib) for t in catalog(sku)] == list(tiers)


def test_the_catalog_takes_a_tier():
    assert disk_limits("Premium_LRS", 128, tier="P50").iops == 7500
    assert disk_limits("Premium_LRS", 128, tier="P10").burst is Burst.CREDIT
    with pytest.raises(Exception, match="baseline tier, P10"):
        disk_limits("Premium_LRS", 128, tier="P6")


def test_the_limits_command_takes_a_tier():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hostcache", *args], capture_output=True, text=True)
    r = cli("limits", "Premium_LRS", "128", "--tier", "P50")
    assert r.returncode == 0 and '"iops": 7500' in r.stdout and '"tier": "P50"' in r.stdout
    r = cli("limits", "Premium_LRS", "128", "--tier", "P60")
    assert r.returncode == 1 and "only for disks larger than 4,096 GiB" in r.stderr and "Traceback" not in r.stderr
