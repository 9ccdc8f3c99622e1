"""Planning a tier measurement: the rate a limit allows at an I/O size, the queue depth that
reaches it (Little's law), the smallest VM size that does not cap it, and the verdict on a
measured rate against the limit and the path's ceiling."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hostcache.measure import (
    HEADROOM,
    MAX_QD,
    OVERHEAD_MS,
    NoSizeFits,
    caps,
    queue_depth,
    target,
    verdict,
    vm_for,
    vm_path,
)
from hostcache.tiers import MB, MIB, catalog, disk_limits, vm_limits, vm_sizes

SIZES = (4096, 65536)
P30 = disk_limits("Premium_LRS", 1024)


def vm(name: str, iops: int | None, mbps: float | None, premium: bool = True, vcpus: int = 2,
       ultra: tuple[int | None, float | None] = (None, None), ultra_ok: bool | None = True):
    base = vm_limits("D8s_v3")
    return replace(base, name=name, uncached_iops=iops, uncached_mbps=mbps, premium_storage=premium, vcpus=vcpus,
                   ultra_iops=ultra[0], ultra_mbps=ultra[1], ultra_disk_supported=ultra_ok)


def test_target_is_the_lower_of_the_iops_and_bandwidth_limits():
    assert target(P30, 4096) == 5000
    assert target(P30, 65536) == 200 * MIB / 65536 == 3200  # the published P30 example
    assert target(P30, 1 << 20) == 200  # 1 MiB counts as four 256 KiB I/Os: MB/s binds
    ultra = disk_limits("UltraSSD_LRS", 4)  # 4,000 IOPS, 1,000 MB/s of 10^6 bytes
    assert target(ultra, 65536) == 4000
    assert target(ultra, 1 << 20) == pytest.approx(1000 * MB / (1 << 20))


def test_target_of_a_credit_bursting_disk_is_its_burst_and_on_demand_off_is_the_baseline():
    assert target(disk_limits("Premium_LRS", 4), 4096) == 3500  # P1: 120 baseline, bursts to 3,500
    assert target(disk_limits("StandardSSD_LRS", 1024), 4096) == 1000  # E30 bursts to 1,000
    assert target(disk_limits("Premium_LRS", 2048), 4096) == 7500  # P40 without on-demand bursting
    assert target(disk_limits("Premium_LRS", 2048, on_demand_bursting=True), 4096) == 30000


def test_queue_depth_follows_littles_law_with_headroom():
    p40 = disk_limits("Premium_LRS", 2048)
    # 7,500 IOPS x (2 ms service + 1.5 ms path) x 4 = 105 -> 128 (the issue measured 0.76x at QD16, 1.0x at QD64)
    assert queue_depth(p40, 4096, write=False) == 128
    assert queue_depth(p40, 4096, write=False, headroom=2) == 64  # 52.5 -> 64
    assert queue_depth(p40, 4096, write=False, overhead_ms=0, headroom=1) == 16  # 15 -> 16
    s4 = disk_limits("Standard_LRS", 32)  # HDD: reads 12 ms, writes 8 ms
    assert queue_depth(s4, 4096, write=False, overhead_ms=0, headroom=2) == 16  # 500 x 12 ms x 2 = 12
    assert queue_depth(s4, 4096, write=True, overhead_ms=0, headroom=2) == 8  # 500 x 8 ms x 2 = 8
    assert queue_depth(disk_limits("UltraSSD_LRS", 400), 4096, write=False) == MAX_QD  # 400,000 IOPS: capped
    assert queue_depth(disk_limits("Standard_LRS", 32), 4096, False, overhead_ms=0, headroom=0.01) == 1


def test_every_catalog_queue_depth_is_a_power_of_two_that_reaches_its_target():
    disks = [d for sku in ("Premium_LRS", "StandardSSD_LRS", "Standard_LRS") for d in catalog(sku)]
    disks += [disk_limits("UltraSSD_LRS", g) for g in (4, 16, 80)] + [disk_limits("PremiumV2_LRS", 8)]
    for d in disks:
        for n in SIZES:
            for write in (False, True):
                qd = queue_depth(d, n, write)
                assert qd & (qd - 1) == 0, (d.tier, n, qd)
                latency = ((d.latency_write_ms if write else d.latency_read_ms) + OVERHEAD_MS) / 1000
                # Little's law with the headroom, unless the depth is at its cap
                assert qd / latency >= HEADROOM * target(d, n) or qd == MAX_QD, (d.tier, n, write, qd)


def test_vm_for_picks_the_smallest_size_that_leaves_the_disk_uncapped():
    sizes = [vm("big", 20000, 900), vm("small", 1000, 50), vm("tight-mbps", 6000, 200),
             vm("fits", 6000, 210, vcpus=8), vm("fits-fewer-cpus", 6000, 210, vcpus=4),
             vm("no-premium", 5000, 300, premium=False), vm("unpublished", None, 5000)]
    # P30: 5,000 IOPS; 200 MiB/s = 209.7 MB/s, which 64 KiB I/Os reach (3,200 IOPS): 200 MB/s caps it
    assert vm_for(P30, SIZES, sizes).name == "fits-fewer-cpus"
    assert caps(sizes[2], P30, SIZES) and not caps(sizes[2], P30, (4096,))
    assert vm_for(P30, (4096,), sizes).name == "tight-mbps"  # 4 KiB only: 200 MB/s is 48,828 IOPS
    assert caps(sizes[-1], P30, SIZES)  # a size that publishes no limit has an unknown cap, not none
    standard = disk_limits("Standard_LRS", 32)  # 500 IOPS, 60 MiB/s: any size with premium storage or not
    assert vm_for(standard, SIZES, [vm("hdd-ok", 5000, 300, premium=False), sizes[0]]).name == "hdd-ok"


def test_ultra_and_premium_v2_disks_count_against_the_separate_limit_where_published():
    ultra = disk_limits("UltraSSD_LRS", 16)  # 16,000 IOPS, 4,000 MB/s
    split = vm("split", 2000, 100, ultra=(20000, 1200))
    assert vm_path(split, "UltraSSD_LRS") == (20000, 1200) and vm_path(split, "Premium_LRS") == (2000, 100)
    assert vm_for(ultra, SIZES, [vm("plain", 19000, 1100), split]).name == "plain"  # 19,000 < 20,000
    assert vm_for(ultra, SIZES, [vm("plain", 21000, 1100), split]).name == "split"
    assert not caps(split, ultra, SIZES) and caps(split, P30, SIZES)
    with pytest.raises(NoSizeFits):
        vm_for(ultra, SIZES, [vm("no-ultra", 50000, 2000, ultra_ok=False)])
    assert vm_for(ultra, SIZES, [vm("unstated", 50000, 2000, ultra_ok=None)]).name == "unstated"


def test_no_size_fits_says_so():
    with pytest.raises(NoSizeFits, match=r"no published VM size leaves a P30 disk .* uncapped at 4 KiB, 64 KiB"):
        vm_for(P30, SIZES, [vm("small", 1000, 50), vm("no-premium", 9000, 900, premium=False)])


def test_the_full_catalog_fits_every_tier_beyond_d8s_v3():
    """D8s_v3 (12,800 IOPS uncached) capped P60-P80 and large Ultra; the catalog has sizes for all."""
    assert caps(vm_limits("D8s_v3"), disk_limits("Premium_LRS", 32767), SIZES)
    everything = [d for sku in ("Premium_LRS", "StandardSSD_LRS", "Standard_LRS") for d in catalog(sku)]
    everything += [disk_limits("UltraSSD_LRS", g) for g in (4, 16, 80, 400)]
    everything += [disk_limits("PremiumV2_LRS", 160, iops=80000, mbps=2000)]
    all_sizes = vm_sizes()
    for d in everything:
        chosen = vm_for(d, SIZES, all_sizes)
        assert not caps(chosen, d, SIZES)
        iops, mbps = vm_path(chosen, d.sku)
        smaller = [v for v in all_sizes if not caps(v, d, SIZES) and vm_path(v, d.sku) < (iops, mbps)]
        assert not [v for v in smaller if v.premium_storage or d.sku not in ("Premium_LRS", "PremiumV2_LRS",
                                                                             "UltraSSD_LRS")], d.tier


@pytest.mark.parametrize("measured, limit, ceiling, expected", [
    (1000, 1000, None, "ok"), (970, 1000, None, "ok"), (1030, 1000, None, "ok"),
    (1031, 1000, None, "over"), (1031, 1000, 500, "over"),  # a throttle leak is never excused
    (969, 1000, None, "missed"), (500, 900, 1000, "missed"),  # 900 is not above 90% of 1,000
    (500, 901, 1000, "ceiling-bound"), (500, 20000, 5000, "ceiling-bound"), (0, 600, 5000, "missed"),
])
def test_verdict(measured, limit, ceiling, expected):
    assert verdict(measured, limit, ceiling) == expected


def test_verdict_allows_the_counting_windows_edges_above_the_limit_only():
    # QD16 over 0.5 s: 16 I/Os in flight at the start may complete inside the window, 32 IOPS more
    assert verdict(629, 600, None) == "over"
    assert verdict(629, 600, None, edge=16 / 0.5) == "ok"
    assert verdict(600 * 1.03 + 33, 600, None, edge=16 / 0.5) == "over"
    assert verdict(570, 600, None, edge=16 / 0.5) == "missed"  # the edge never excuses a shortfall


def test_verdict_refuses_a_limit_that_is_not_positive():
    with pytest.raises(ValueError):
        verdict(1, 0, None)
    with pytest.raises(ValueError):
        target(P30, 0)
