"""The catalog against the reference: every published VM size, units, editions, rounding."""

from __future__ import annotations

import json
import pathlib

import pytest

from hostcache.errors import InvalidParameter, UnknownTier
from hostcache.sim import Workload, simulate
from hostcache.throttle import FakeClock, Path, Throttle
from hostcache.tiers import MB, MIB, SKUS, VmLimits, disk_limits, reference, vm_limits, vm_sizes

KIB = 1024
HUGE_VM = VmLimits("test-no-vm-limit", 64, None, None, None, 10**9, 10**9, None, None, False)
REFERENCE = pathlib.Path(__file__).parents[2] / "hostcache" / "data" / "azure-vm-sizes.json"
SIZES = json.loads(REFERENCE.read_text())["sizes"]
CACHE_FIGURES = ("cached+temp", "cached only")  # the columns that are host-cache figures


def test_the_packaged_catalog_holds_every_published_size():
    meta = json.loads(REFERENCE.read_text())["_meta"]
    assert len(SIZES) == meta["size_count"] == 313
    assert len({v.family for v in vm_sizes()}) == meta["family_count"] == 38


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_size_serves_its_published_figures(name):
    row = SIZES[name]
    for asked in (name, name.lower(), name.removeprefix("Standard_"), name.upper().removeprefix("STANDARD_")):
        assert vm_limits(asked).name == name  # case-insensitive, "Standard_" optional
    v = vm_limits(name)
    assert (v.max_data_disks, v.vcpus, v.family) == (row["max_data_disks"], row["vcpus"], row["family"])
    assert (v.premium_storage, v.host_caching) == (row["premium_storage"], row["premium_caching"])
    assert (v.uncached_iops, v.uncached_mbps) == (row["max_uncached_iops"], row["max_uncached_mbps"])
    assert (v.burst_iops, v.burst_mbps) == (row["burst_uncached_iops"], row["burst_uncached_mbps"])
    assert (v.ultra_iops, v.ultra_mbps, v.ultra_burst_iops, v.ultra_burst_mbps) == (
        row["max_uncached_ultra_premv2_iops"], row["max_uncached_ultra_premv2_mbps"],
        row["burst_uncached_ultra_premv2_iops"], row["burst_uncached_ultra_premv2_mbps"])
    cache_figure = row["premium_caching"] and str(row["cached_temp_basis"] or "").startswith(CACHE_FIGURES)
    if cache_figure:
        assert (v.cached_iops, v.cached_mbps) == (row["max_cached_temp_iops"], row["max_cached_temp_mbps"])
    else:  # a temp-disk figure is not a host-cache limit: not published, and said so
        assert v.cached_iops is None and v.cached_mbps is None
    said = " ".join(v.not_published)
    if v.uncached_iops is None:
        assert "uncached disk IOPS" in said and "not limited at the VM level" in said
    if v.uncached_mbps is None:
        assert "MB/s: not published; not limited at the VM level" in said
    if v.host_caching and v.cached_iops is None:
        assert "cached (host cache) IOPS and MB/s: not published" in said
    if v.host_caching and row["cache_size_gib"] is None:
        assert "host cache size: not published" in said
    # every size makes a throttle; a limit it does not publish is not enforced
    t = Throttle(v, FakeClock(), latency=False)
    t.add_disk("d", disk_limits("Standard_LRS", 32))
    t.admit("d", False, 4096, now=0.0)
    assert (t.vm.uncached.iops is None) == (row["max_uncached_iops"] is None)
    assert (t.vm.uncached.bandwidth is None) == (row["max_uncached_mbps"] is None)


def test_a_size_without_published_vm_limits_is_limited_by_its_disk_only():
    dc = vm_limits("DC2s_v3")  # DCsv3 publishes only its data disk count
    assert dc.uncached_iops is None
    t = Throttle(dc, FakeClock(), latency=False)
    t.add_disk("p30", disk_limits("Premium_LRS", 1024))
    assert simulate(t, [Workload("p30", qd=32)], 5, warmup=1)["p30"] == pytest.approx(5000, rel=0.005)


def test_ultra_and_v2_disks_count_against_the_sizes_separate_limit():
    e8 = vm_limits("E8bs_v5")  # uncached 24,200 IOPS; Ultra/Premium SSD v2 32,400
    t = Throttle(e8, FakeClock(), latency=False, vm_bursting=False)
    t.add_disk("u", disk_limits("UltraSSD_LRS", 64))  # 64,000 IOPS
    assert simulate(t, [Workload("u", qd=64)], 5, warmup=1)["u"] == pytest.approx(32400, rel=0.005)


def test_sizes_that_publish_caching_without_a_cache_size_can_cache():
    for name in ("D2s_v5", "D2ds_v5", "DS1_v2"):
        assert vm_limits(name).host_caching
    assert vm_limits("DS1_v2").cache_size_gib == 43
    assert not vm_limits("L8s_v3").host_caching  # Lsv3: no host cache for data disks
    assert not vm_limits("D2_v3").premium_storage
    with pytest.raises(UnknownTier, match="hostcache sizes"):
        vm_limits("D99s_v9")


def test_vm_sizes_filters():
    assert len(vm_sizes()) == 313
    dsv5 = vm_sizes(family="dsv5", premium=True)
    assert len(dsv5) == 8 and all(v.family == "Dsv5" for v in dsv5)
    assert {v.name for v in vm_sizes(premium=False)} >= {"Standard_D2_v3", "Standard_E2_v3"}
    assert all(v.vcpus and v.vcpus >= 96 for v in vm_sizes(min_vcpus=96))
    assert [v.name for v in vm_sizes(contains="d8s_v3")] == ["Standard_D8s_v3"]


def test_sizes_that_are_not_whole_gib_round_up():
    assert disk_limits("Premium_LRS", 128 + 1 / 1024).tier == "P15"  # 128 GiB + 1 MiB
    assert disk_limits("Premium_LRS", 128).tier == "P10"
    assert not disk_limits("Premium_LRS", 4095 + 1 / 1024).host_caching
    assert disk_limits("Premium_LRS", 4095).host_caching


def test_each_disk_types_mb_is_the_one_its_tables_use():
    units = {sku: disk_limits(sku, 64).mbps_unit for sku in SKUS}
    assert units == {"Standard_LRS": MIB, "StandardSSD_LRS": MIB, "Premium_LRS": MIB,
                     "PremiumV2_LRS": MB, "UltraSSD_LRS": MB}
    assert disk_limits("UltraSSD_LRS", 64).to_json()["mbps_unit"] == "MB/s"


@pytest.mark.parametrize("sku,kw,iops", [
    ("UltraSSD_LRS", {"iops": 1000, "mbps": 250}, 250e6 / (256 * KIB)),  # 953.7, not 1,000
    ("PremiumV2_LRS", {"iops": 4000, "mbps": 200}, 200e6 / (256 * KIB)),  # 762.9, not 800
])
def test_ultra_and_v2_are_throttled_in_mb_per_second(sku, kw, iops):
    t = Throttle(HUGE_VM, FakeClock(), latency=False)
    t.add_disk("d", disk_limits(sku, 100, **kw))
    got = simulate(t, [Workload("d", nbytes=256 * KIB, qd=16)], 10, warmup=1)["d"]
    assert got == pytest.approx(iops, rel=0.003)


def test_ultra_editions():
    assert disk_limits("UltraSSD_LRS", 64).iops == 64000  # current: 1,000 per GiB
    v2024 = disk_limits("UltraSSD_LRS", 64, edition="2024")  # billing 2024: 300 per GiB
    assert (v2024.iops, v2024.mbps) == (19200, pytest.approx(19200 * 0.256))
    assert disk_limits("UltraSSD_LRS", 2048, edition="2024").iops == 400000
    assert disk_limits("UltraSSD_LRS", 2048, edition="2022").iops == 160000


def test_on_demand_bursting_is_refused_below_p30():
    for size in (128, 512):
        with pytest.raises(InvalidParameter, match="only for Premium_LRS disks above 512 GiB"):
            disk_limits("Premium_LRS", size, on_demand_bursting=True)
    with pytest.raises(InvalidParameter):
        disk_limits("StandardSSD_LRS", 1024, on_demand_bursting=True)
    assert disk_limits("Premium_LRS", 1024, on_demand_bursting=True).burst_iops == 30000


def test_the_2019_standard_ssd_table_is_taken_in_its_own_mib_per_second():
    """stdssd_sizes_2019 gives E1 25 MiB/s and E6 50 MiB/s; Standard SSD throttles in MiB/s."""
    old = reference()["StandardSSD_LRS"]["sizes_2019_superseded"]
    assert old["columns"][2] == "throughput_up_to_MiB_per_sec"
    for tier, (size, iops, mib) in old["values"].items():
        lim = disk_limits("StandardSSD_LRS", size, edition="2019")
        assert (lim.tier, lim.iops, lim.mbps, lim.mbps_unit) == (tier, iops, mib, 1 << 20)


@pytest.mark.parametrize("sku,edition", [("UltraSSD_LRS", "2019"), ("PremiumV2_LRS", "2019"),
                                         ("Premium_LRS", "2024"), ("Standard_LRS", "2022"),
                                         ("StandardSSD_LRS", "2024")])
def test_an_edition_a_sku_has_no_figures_for_is_refused(sku, edition):
    with pytest.raises(UnknownTier, match=f"edition {edition} has no figures of its own for {sku}"):
        disk_limits(sku, 64, edition=edition)


def test_m_series_cached_burst_figures_are_served():
    """M8ms publishes cached 10,000 IOPS / 100 MBps bursting to 10,000 / 250:
    cache hits of 1 MiB run at 250 MB/s while the credits last, 100 after."""
    ref = json.loads(REFERENCE.read_text())["sizes"]
    m8 = vm_limits("m8ms")
    assert (m8.cached_mbps, m8.cached_burst_iops, m8.cached_burst_mbps) == (100, 10000, 250)
    served = [v for v in vm_sizes() if v.cached_burst_mbps is not None]
    assert len(served) == 21 and {v.family for v in served} == {"M", "Mdsv2"}
    for v in served:
        assert (v.cached_burst_iops, v.cached_burst_mbps) == (ref[v.name]["burst_cached_temp_iops"],
                                                              ref[v.name]["burst_cached_temp_mbps"])
    t = Throttle(m8, FakeClock(), latency=False)
    t.add_disk("d", disk_limits("Premium_LRS", 1024))
    hits = simulate(t, [Workload("d", nbytes=MIB, qd=8, path=Path.CACHED_HIT)], 10, warmup=1)["d"]
    assert hits * MIB == pytest.approx(250 * MB, rel=0.01)
    assert vm_limits("D8s_v3").cached_burst_mbps is None  # published nowhere else


def test_a_family_no_size_has_is_refused():
    with pytest.raises(UnknownTier, match="no VM size family 'Dsv9': the families are .*Dsv5"):
        vm_sizes(family="Dsv9")
    assert {v.family for v in vm_sizes(family="dsv5")} == {"Dsv5"}
