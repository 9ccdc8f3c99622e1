"""Throttle arithmetic, exact, on an injected clock: no test sleeps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostcache.errors import HostError, InvalidPerformance, UnknownTier
from hostcache.sim import Workload, simulate
from hostcache.throttle import CreditLimiter, FakeClock, Path, RateLimiter, Throttle
from hostcache.tiers import MIB, Burst, VmLimits, catalog, disk_limits, io_units, vm_limits

KIB = 1024
HUGE_VM = VmLimits("test-no-vm-limit", 64, None, None, None, 10**9, 10**9, None, None, False)


def throttle(vm: VmLimits = HUGE_VM, latency: bool = False, bursting: bool = True, **disks) -> Throttle:
    t = Throttle(vm, FakeClock(), latency=latency, vm_bursting=bursting)
    for name, limits in disks.items():
        t.add_disk(name, limits)
    return t


def test_sizes_map_to_tiers_as_published():
    assert disk_limits("Premium_LRS", 100).tier == "P10"
    assert disk_limits("StandardSSD_LRS", 200).tier == "E15"
    assert disk_limits("Standard_LRS", 32).tier == "S4"
    p30 = disk_limits("Premium_LRS", 1000, performance_plus=True)
    assert (p30.tier, p30.iops, p30.mbps) == ("P30", 8000, 300)
    assert disk_limits("Premium_LRS", 512).burst is Burst.CREDIT
    assert disk_limits("Premium_LRS", 513).burst is Burst.NONE
    assert disk_limits("Premium_LRS", 1024, on_demand_bursting=True).burst_iops == 30000
    assert disk_limits("StandardSSD_LRS", 1024).burst_iops == 1000  # E30 bursts
    assert disk_limits("StandardSSD_LRS", 2048).burst is Burst.NONE  # E40 does not
    assert not disk_limits("Premium_LRS", 4096).host_caching and disk_limits("Premium_LRS", 4095).host_caching
    assert [t.tier for t in catalog("Standard_LRS")][:3] == ["S4", "S6", "S10"]


def test_provisioned_types_follow_their_formulas_and_editions():
    v2 = disk_limits("PremiumV2_LRS", 10)
    assert (v2.iops, v2.mbps) == (3000, 125)
    assert disk_limits("PremiumV2_LRS", 160, iops=80000, mbps=2000).mbps == 2000
    with pytest.raises(InvalidPerformance, match="5,000"):
        disk_limits("PremiumV2_LRS", 10, iops=6000)
    with pytest.raises(InvalidPerformance, match="1,200"):
        disk_limits("PremiumV2_LRS", 160, iops=80000, mbps=2000, edition="2024")
    ultra = disk_limits("UltraSSD_LRS", 64)
    assert (ultra.iops, ultra.mbps) == (64000, 10000)
    assert disk_limits("UltraSSD_LRS", 64, edition="2022").iops == 19200
    with pytest.raises(InvalidPerformance):
        disk_limits("UltraSSD_LRS", 4, iops=50)
    with pytest.raises(UnknownTier):
        disk_limits("Premium_LRS", 40000)
    with pytest.raises(UnknownTier, match="D8s_v3"):
        vm_limits("D99s_v9")
    with pytest.raises(InvalidPerformance):
        disk_limits("Premium_LRS", 128, iops=1000)


def test_the_256_kib_rule():
    assert [io_units(n) for n in (512, 256 * KIB, 256 * KIB + 1, 1 << 20)] == [1, 1, 2, 4]
    t = throttle(s10=disk_limits("Standard_LRS", 128))  # 500 IOPS, 60 MB/s, no burst
    assert simulate(t, [Workload("s10", nbytes=100 * KIB, qd=8)], 10, warmup=1)["s10"] == pytest.approx(500, rel=0.01)
    t = throttle(s10=disk_limits("Standard_LRS", 128))
    # 1 MiB I/Os count 4 each: 125 per second by IOPS, fewer by MB/s (60 MiB/s)
    assert simulate(t, [Workload("s10", nbytes=1 << 20, qd=8)], 10, warmup=1)["s10"] == pytest.approx(60, rel=0.01)


@pytest.mark.parametrize("size,iops", [(64 * KIB, 3200), (8 * KIB, 5000), (1024 * KIB, 200)])
def test_the_published_p30_example(size, iops):
    t = throttle(p30=disk_limits("Premium_LRS", 1024))
    got = simulate(t, [Workload("p30", nbytes=size, qd=32)], 10, warmup=1)["p30"]
    assert got == pytest.approx(iops, rel=0.005)


def test_credit_bursting_start_exhaustion_and_refill_exactly():
    p10 = disk_limits("Premium_LRS", 128)  # 500 IOPS, bursts to 3,500 for 30 minutes
    lim = CreditLimiter("p10", p10.iops, p10.burst_iops)
    assert lim.bucket == 3000 * 1800 and lim.credits_left(0) == 100.0  # starts full
    lim.commit(0.0, 3500 * 900)  # 15 minutes at the burst rate
    assert lim.tat == pytest.approx(900) and lim.credits_left(900) == pytest.approx(50.0)
    lim.commit(900.0, 3500 * 900 + 500 * 100)  # 15 more at burst, then 100 s at the baseline
    assert lim.tat == pytest.approx(1900) and lim.credits == 0
    assert lim.credits_left(1900 + 600) == pytest.approx(500 * 600 / lim.bucket * 100)  # idle earns 500/s
    lim.commit(2500.0, 3500 * 10)  # what was earned is spent at the burst rate
    assert lim.tat == pytest.approx(2510) and lim.credits == pytest.approx(500 * 600 - 3000 * 10)


def test_a_burst_disk_under_load_bursts_then_settles():
    t = throttle(p10=disk_limits("Premium_LRS", 128))
    assert simulate(t, [Workload("p10", qd=16)], 10, warmup=1)["p10"] == pytest.approx(3500, rel=0.005)
    lim = t.disks["p10"].iops
    assert isinstance(lim, CreditLimiter)
    lim.credits = 0.0  # as after 30 minutes at the burst rate
    assert simulate(t, [Workload("p10", qd=16)], 30, warmup=15, start=10)["p10"] == pytest.approx(500, rel=0.01)


def test_vm_limits_cap_several_disks_the_d8s_v3_example():
    """Three disks that ask for 15,000 IOPS get 12,800 in total (published:
    split 4,267 / 4,266 / 4,266)."""
    t = throttle(vm_limits("D8s_v3"), bursting=False,
                 **{n: disk_limits("Premium_LRS", 1024) for n in ("d1", "d2", "d3")})
    got = simulate(t, [Workload(n, qd=32) for n in ("d1", "d2", "d3")], 12, warmup=2)
    assert sum(got.values()) == pytest.approx(12800, rel=0.002)
    for v in got.values():
        assert v == pytest.approx(12800 / 3, rel=0.005)


def test_vm_and_disk_limits_are_independent_the_ds1_v2_example():
    t = throttle(vm_limits("DS1_v2"), p30=disk_limits("Premium_LRS", 1024))
    assert simulate(t, [Workload("p30", qd=32)], 10, warmup=1)["p30"] == pytest.approx(3200, rel=0.005)


def test_cached_paths():
    vm = vm_limits("D8s_v3")  # cached 16,000 IOPS, uncached 12,800
    t = throttle(vm, bursting=False, p10=disk_limits("Premium_LRS", 128))
    t.disks["p10"].iops.credits = 0.0  # type: ignore[union-attr]
    hit = simulate(t, [Workload("p10", qd=32, path=Path.CACHED_HIT)], 5, warmup=1)["p10"]
    assert hit == pytest.approx(16000, rel=0.005)  # hits never touch the disk's 500
    miss = simulate(t, [Workload("p10", qd=32, path=Path.CACHED_MISS)], 15, warmup=6, start=5)["p10"]
    assert miss == pytest.approx(500, rel=0.01)
    with pytest.raises(HostError, match="no host cache"):  # Lsv3: no host cache for data disks
        throttle(vm_limits("L8s_v3"), d=disk_limits("Premium_LRS", 128)).admit("d", False, 4096, Path.CACHED_HIT)


def test_queue_depth_matters_through_service_latency():
    """Premium SSD serves in 2 ms: IOPS = QD / 2 ms until the limit."""
    got = {}
    for qd in (1, 4, 16, 64):
        t = throttle(latency=True, p30=disk_limits("Premium_LRS", 1024))
        got[qd] = simulate(t, [Workload("p30", qd=qd)], 5, warmup=1)["p30"]
    assert got[1] == pytest.approx(500, rel=0.01) and got[4] == pytest.approx(2000, rel=0.01)
    assert got[16] == pytest.approx(5000, rel=0.01) and got[64] == pytest.approx(5000, rel=0.01)


def test_on_demand_bursting_has_no_time_limit():
    t = throttle(p30=disk_limits("Premium_LRS", 1024, on_demand_bursting=True))
    assert simulate(t, [Workload("p30", qd=64)], 5, warmup=1)["p30"] == pytest.approx(30000, rel=0.005)


def test_over_the_limit_io_waits_in_order_and_nothing_is_dropped():
    lim = RateLimiter("r", 100, tolerance=0.0)
    t = throttle(s=disk_limits("Standard_LRS", 32))
    starts = [t.admit("s", False, 4096, now=0.0).start for _ in range(1000)]
    assert starts == sorted(starts) and len(starts) == 1000
    assert starts[-1] == pytest.approx(999 / 500 - 0.05, abs=1e-9)  # 500 IOPS after the 50 ms allowance
    lim.commit(0.0, 100)
    assert lim.earliest(0.0, 1) == pytest.approx(1.0)


def test_statistics_like_the_platforms_metrics():
    t = throttle(s=disk_limits("Standard_LRS", 32))
    simulate(t, [Workload("s", qd=4)], 60)
    stats = t.statistics(now=60)
    disk = stats["disk s S4 IOPS"]
    assert disk["consumed_percent"] == pytest.approx(100, abs=0.5)
    assert disk["throttled_requests"] > 0 and disk["throttled_seconds"] > 0
    assert stats["disk s S4 MB/s"]["consumed_percent"] == pytest.approx(500 * 4096 / (60 * MIB) * 100, rel=0.01)
    p10 = throttle(p=disk_limits("Premium_LRS", 128))
    p10.admit("p", False, 4096, now=0.0)
    assert p10.statistics(now=0.0)["disk p P10 IOPS"]["burst_credits_percent"] == pytest.approx(100, abs=0.01)


def test_large_ios_count_in_256_kib_units_where_iops_bind():
    """An Ultra disk at 1,000 IOPS and 250 MB/s: I/Os of 256 KiB + 512 count
    twice, so 500 fit in a second; bandwidth alone would allow about 998."""
    t = throttle(u=disk_limits("UltraSSD_LRS", 64, iops=1000, mbps=250))
    got = simulate(t, [Workload("u", nbytes=256 * KIB + 512, qd=16)], 10, warmup=1)["u"]
    assert got == pytest.approx(500, rel=0.005)


def test_statistics_take_bounded_space_whatever_the_number_of_ios():
    """statistics() is never called here, as under `hostcache serve`: a
    minute more of I/O (30,000 admissions) must not grow memory."""
    import tracemalloc

    t = throttle(s=disk_limits("Standard_LRS", 32))  # 500 IOPS
    simulate(t, [Workload("s", qd=4)], 60)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    simulate(t, [Workload("s", qd=4)], 60, start=60)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert t.disks["s"].iops.stats.requests > 59000
    assert grown < 64 * KIB  # was about 281 bytes per I/O per limiter: 30 MB
    assert t.statistics(now=120)["disk s S4 IOPS"]["consumed_percent"] == pytest.approx(100, abs=2)


def test_simulate_refuses_what_it_cannot_measure():
    t = throttle(s=disk_limits("Standard_LRS", 32))
    with pytest.raises(HostError, match="warmup must be shorter"):
        simulate(t, [Workload("s")], 0)
    with pytest.raises(HostError, match="queue depth and I/O size must be at least 1"):
        simulate(t, [Workload("s", qd=0)], 1)


def test_a_simulation_is_bounded_whatever_it_is_asked():
    """--seconds 100000 or --qd 3000000 ran for ever (or grew by 340 MB in 10 s):
    a run admits at most max_ios I/Os, and says so past that."""
    t = throttle(s=disk_limits("Standard_LRS", 32))  # 500 IOPS: 1,000 I/Os take 2 s
    assert simulate(t, [Workload("s")], 1.5, max_ios=1000)["s"] > 0
    with pytest.raises(HostError, match="more than 1,000 I/Os: simulate fewer seconds or a lower queue depth"):
        simulate(throttle(s=disk_limits("Standard_LRS", 32)), [Workload("s")], 100000, max_ios=1000)
    with pytest.raises(HostError, match="more than 1,000 I/Os"):
        simulate(throttle(s=disk_limits("Standard_LRS", 32)), [Workload("s", qd=1001)], 1, max_ios=1000)
    r = subprocess.run([sys.executable, "-m", "hostcache", "simulate", "Premium_LRS", "128", "--qd", "3000000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "more than 2,000,000 I/Os" in r.stderr and "Traceback" not in r.stderr
