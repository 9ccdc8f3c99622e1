"""The tier catalog: published disk and VM storage limits, as data.

The figures come from `data/azure-disk-limits.json`, a copy of the project's
reference file with its sources and the places where sources disagree. Rules
kept here (each stated by that file):
- Premium SSD, Standard SSD and Standard HDD: a disk's size, rounded up, maps
  to the smallest offered size that holds it (100 GiB Premium -> P10);
  performance plus (disks >= 513 GiB, chosen at creation) takes the
  "expanded" figures.
- Bursting: credit-based for Premium P20 and smaller and Standard SSD E30 and
  smaller (a full bucket is 30 minutes at the burst rate); on-demand for
  Premium above 512 GiB when enabled (30,000 IOPS, 1,000 MB/s); none for HDD.
- Premium SSD v2: IOPS up to min(80,000, max(3,000, 500 per GiB)); MB/s up to
  min(2,000, 0.25 per IOPS) (edition "2024": 1,200). Default: the free
  baseline, 3,000 IOPS and 125 MB/s.
- Ultra: IOPS 100 to min(400,000, 1,000 per GiB) (edition "2022": 300 per
  GiB, 160,000); MB/s 1 to min(10,000, 0.25 per IOPS) (2022: 4,000).
  Default: the size's maximum.
- Units of MB/s: VM limits are 10^6 bytes per second (the VM size tables
  define MBps so). Disk limits are 2^20 bytes per second: the disk tables do
  not say, and the published P30 example (5,000 IOPS, 200 MB/s: 64 KB I/Os
  give 3,200 IOPS, 1,024 KB give 200) holds exactly only in MiB.
- An I/O larger than 256 KiB counts as several 256 KiB I/Os; the same unit
  is used for Standard HDD (no source states its throttling unit; its 16 KiB
  rule is for billing).
- Host caching: Premium, Standard SSD and HDD disks under 4,096 GiB only.

Where sources disagree (the reference's `disagreements`), the current figure
is the default; `edition` selects the other where it changes behaviour:
Ultra per-GiB IOPS, maximum IOPS and MB/s ("2022"); Premium v2 maximum MB/s
("2024": 1,200); Standard SSD E1-E6 ("2019" table); DS1_v2 host caching
(current: not supported; "2020": supported, 43 GiB). Kept as decided, not
selectable: P50/S50/E50 are 4,096 GiB in the current tables and caching
stops at 4,096 GiB (the FAQ's 4,095 rule); D2s_v3 uncached 48 MB/s (the
size table, not a diagram's 32); data disks attach with caching None unless
asked (vm_disk_perf; the older design guide said ReadOnly).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from .errors import InvalidPerformance, UnknownTier

MB = 1_000_000  # VM tables
MIB = 1 << 20  # disk tables (see the module comment)
IO_UNIT = 256 * 1024
BURST_SECONDS = 30 * 60
CACHE_LIMIT_GIB = 4096
SKUS = ("Standard_LRS", "StandardSSD_LRS", "Premium_LRS", "PremiumV2_LRS", "UltraSSD_LRS")
EDITIONS = ("current", "2024", "2022", "2019")


class Burst(enum.Enum):
    NONE = "none"
    CREDIT = "credit"
    ON_DEMAND = "on-demand"


@dataclass(frozen=True)
class DiskLimits:
    """What one disk may do: the throttle's input."""

    sku: str
    tier: str  # "P10", "E30", "S4", or "PremiumV2"/"Ultra" for the provisioned types
    size_gib: int
    iops: int
    mbps: float
    burst: Burst
    burst_iops: int  # = iops when there is no burst
    burst_mbps: float
    host_caching: bool
    latency_read_ms: float
    latency_write_ms: float

    @property
    def credit_iops(self) -> float:
        """Size of a full IOPS credit bucket (30 minutes at the burst rate)."""
        return (self.burst_iops - self.iops) * BURST_SECONDS if self.burst is Burst.CREDIT else 0.0


    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["burst"] = self.burst.value
        return out


@dataclass(frozen=True)
class VmLimits:
    name: str
    max_data_disks: int
    cached_iops: int | None
    cached_mbps: float | None
    cache_size_gib: int | None
    uncached_iops: int
    uncached_mbps: float
    burst_iops: int | None
    burst_mbps: float | None
    host_caching: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Service latency defaults, from the published claims (latency_claims):
# Ultra and v2 "submillisecond", Premium "low single-digit ms", Standard SSD
# "single-digit ms", Standard HDD "writes < 10 ms, reads < 20 ms".
LATENCY_MS = {
    "UltraSSD_LRS": (0.5, 0.5),
    "PremiumV2_LRS": (0.8, 0.8),
    "Premium_LRS": (2.0, 2.0),
    "StandardSSD_LRS": (4.0, 4.0),
    "Standard_LRS": (12.0, 8.0),
}


@cache
def reference() -> dict[str, Any]:
    text = resources.files("hostcache").joinpath("data/azure-disk-limits.json").read_text()
    return dict(json.loads(text))


def _check_sku(sku: str) -> None:
    if sku not in SKUS:
        raise UnknownTier(f"unknown disk SKU {sku!r}: one of {', '.join(SKUS)}")


def disk_limits(sku: str, size_gib: int, *, iops: int | None = None, mbps: float | None = None,
                performance_plus: bool = False, on_demand_bursting: bool = False,
                edition: str = "current") -> DiskLimits:
    """The limits of a disk of `sku` and `size_gib` (provisioned iops/mbps for
    PremiumV2 and Ultra), as the published tables give them."""
    _check_sku(sku)
    if edition not in EDITIONS:
        raise UnknownTier(f"unknown edition {edition!r}: one of {', '.join(EDITIONS)}")
    if size_gib <= 0:
        raise UnknownTier(f"disk size must be positive, not {size_gib} GiB")
    read_ms, write_ms = LATENCY_MS[sku]
    if sku == "PremiumV2_LRS":
        return _premium_v2(size_gib, iops, mbps, edition, read_ms, write_ms)
    if sku == "UltraSSD_LRS":
        return _ultra(size_gib, iops, mbps, edition, read_ms, write_ms)
    if iops is not None or mbps is not None:
        raise InvalidPerformance(f"{sku} disks take the performance of their size tier; iops and mbps "
                                 "are set only for PremiumV2_LRS and UltraSSD_LRS")
    name, row = _size_row(sku, size_gib, edition)
    base_iops: Any = row.get("provisioned_iops", row.get("max_iops_up_to"))
    base_mbps: Any = row.get("provisioned_mbps", row.get("max_mbps_up_to"))
    if performance_plus:
        if size_gib < 513:
            raise InvalidPerformance("performance plus needs a disk of at least 513 GiB")
        base_iops = row.get("expanded_iops_performance_plus") or base_iops
        base_mbps = row.get("expanded_mbps_performance_plus") or base_mbps
    model = str(row.get("burst_model", "none"))
    if model == "credit":
        burst, b_iops, b_mbps = Burst.CREDIT, row["max_burst_iops"], row["max_burst_mbps"]
    elif model.startswith("on-demand") and on_demand_bursting:
        burst, b_iops, b_mbps = Burst.ON_DEMAND, row["max_burst_iops"], row["max_burst_mbps"]
    else:
        if on_demand_bursting:
            raise InvalidPerformance(f"on-demand bursting is for Premium_LRS disks above 512 GiB, not {name}")
        burst, b_iops, b_mbps = Burst.NONE, base_iops, base_mbps
    return DiskLimits(sku, name, size_gib, int(base_iops), float(base_mbps), burst, int(b_iops), float(b_mbps),
                      size_gib < CACHE_LIMIT_GIB, read_ms, write_ms)


def _size_row(sku: str, size_gib: int, edition: str) -> tuple[str, dict[str, Any]]:
    ref = reference()[sku]
    sizes: dict[str, dict[str, Any]] = ref["sizes"]
    if sku == "StandardSSD_LRS" and edition == "2019":
        old = ref["sizes_2019_superseded"]["values"]
        sizes = {k: {"disk_size_gib": v[0], "max_iops_up_to": v[1], "max_mbps_up_to": v[2] * 1.048576,
                     "burst_model": "none"} for k, v in old.items()}
    for name, row in sorted(sizes.items(), key=lambda kv: kv[1]["disk_size_gib"]):
        if row["disk_size_gib"] >= size_gib:
            return name, row
    biggest = max(r["disk_size_gib"] for r in sizes.values())
    raise UnknownTier(f"{sku} disks go up to {biggest} GiB; {size_gib} GiB is too big")


def _premium_v2(size: int, iops: int | None, mbps: float | None, edition: str, r: float,
                w: float) -> DiskLimits:
    if size > 65536:
        raise UnknownTier("PremiumV2_LRS disks go up to 65,536 GiB")
    max_iops = min(80000, max(3000, 500 * size))
    iops = 3000 if iops is None else iops
    if not 3000 <= iops <= max_iops:
        raise InvalidPerformance(f"a {size} GiB PremiumV2 disk takes 3,000 to {max_iops:,} IOPS, not {iops:,}")
    cap = 1200 if edition in ("2024", "2022") else 2000
    max_mbps = min(cap, 0.25 * iops)
    mbps = 125 if mbps is None else mbps
    if not 125 <= mbps <= max(125, max_mbps):
        raise InvalidPerformance(f"a PremiumV2 disk with {iops:,} IOPS takes 125 to {max_mbps:,.0f} MB/s")
    return DiskLimits("PremiumV2_LRS", "PremiumV2", size, iops, float(mbps), Burst.NONE, iops, float(mbps),
                      False, r, w)


def _ultra(size: int, iops: int | None, mbps: float | None, edition: str, r: float, w: float) -> DiskLimits:
    if not 4 <= size <= 65536:
        raise UnknownTier("UltraSSD_LRS disks are 4 to 65,536 GiB")
    per_gib, top, top_mbps = (300, 160000, 4000) if edition == "2022" else (1000, 400000, 10000)
    max_iops = min(top, per_gib * size)
    iops = max_iops if iops is None else iops
    if not 100 <= iops <= max_iops:
        raise InvalidPerformance(f"a {size} GiB Ultra disk takes 100 to {max_iops:,} IOPS, not {iops:,}")
    max_mbps = min(top_mbps, 0.25 * iops) if edition != "2022" else min(top_mbps, iops * 256 * 1024 / MB)
    mbps = max_mbps if mbps is None else mbps
    if not 1 <= mbps <= max_mbps:
        raise InvalidPerformance(f"an Ultra disk with {iops:,} IOPS takes 1 to {max_mbps:,.0f} MB/s")
    return DiskLimits("UltraSSD_LRS", "Ultra", size, iops, float(mbps), Burst.NONE, iops, float(mbps),
                      False, r, w)


def vm_limits(name: str, edition: str = "current") -> VmLimits:
    sizes = reference()["vm_sizes"]["sizes"]
    key = name if name.startswith("Standard_") else f"Standard_{name}"
    row = sizes.get(key)
    if row is None:
        raise UnknownTier(f"unknown VM size {name!r}: one of {', '.join(s.removeprefix('Standard_') for s in sizes)}")
    premium_caching = row.get("premium_caching")
    if isinstance(premium_caching, str):  # sources disagree (DS1_v2): current says not supported
        premium_caching = edition == "2020"
    caching = premium_caching is True and row.get("cache_size_gib") is not None
    cached = caching  # without premium caching there is no cached path (the figures are the temp disk's)
    return VmLimits(key, int(row["max_data_disks"]), row.get("cached_and_temp_iops") if cached else None,
                    row.get("cached_and_temp_mbps") if cached else None,
                    row.get("cache_size_gib") if cached else None, int(row["uncached_iops"]),
                    float(row["uncached_mbps"]), row.get("burst_uncached_iops"), row.get("burst_uncached_mbps"),
                    caching)


def catalog(sku: str) -> list[DiskLimits]:
    """Every offered size of a tiered SKU, smallest first."""
    _check_sku(sku)
    if sku in ("PremiumV2_LRS", "UltraSSD_LRS"):
        raise UnknownTier(f"{sku} has no size tiers: its performance is provisioned")
    rows = sorted(reference()[sku]["sizes"].values(), key=lambda r: r["disk_size_gib"])
    return [disk_limits(sku, int(r["disk_size_gib"])) for r in rows]


def io_units(nbytes: int) -> int:
    """I/Os a request counts as: one per 256 KiB, at least one."""
    return max(1, -(-nbytes // IO_UNIT))
