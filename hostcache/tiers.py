"""The tier catalog: published disk and VM storage limits, as data.

The figures come from `data/azure-disk-limits.json` (disk types) and
`data/azure-vm-sizes.json` (313 VM sizes in 38 families), copies of the
project's reference files with their sources and the places where sources
disagree. Rules kept here (each stated by those files):
- Premium SSD, Standard SSD and Standard HDD: a disk's size, rounded up to a
  whole GiB (128 GiB + 1 MiB is 129), maps to the smallest offered size that
  holds it (100 GiB Premium -> P10; 129 GiB -> P15);
  performance plus (disks >= 513 GiB, chosen at creation) takes the
  "expanded" figures.
- Bursting: credit-based for Premium P20 and smaller and Standard SSD E30 and
  smaller (a full bucket is 30 minutes at the burst rate); on-demand for
  Premium above 512 GiB when enabled (30,000 IOPS, 1,000 MB/s), refused on
  any other disk; none for HDD.
- Premium SSD v2: IOPS up to min(80,000, max(3,000, 500 per GiB)); MB/s up to
  min(2,000, 0.25 per IOPS) (edition "2024": 1,200). Default: the free
  baseline, 3,000 IOPS and 125 MB/s.
- Ultra: IOPS 100 to min(400,000, 1,000 per GiB) (edition "2024": 300 per
  GiB; "2022": 300 per GiB, 160,000); MB/s 1 to min(10,000, 0.25 per IOPS)
  ("2024": 256 kB/s per IOPS; "2022": 256 KiB/s per IOPS, 4,000).
  Default: the size's maximum.
- Units of MB/s (DiskLimits.mbps_unit): VM limits, Ultra and Premium SSD v2
  are 10^6 bytes per second (the VM size tables and the Ultra section define
  MBps so; the Premium SSD v2 pages give MB/s with the same 0.25 per IOPS
  ratio). Premium SSD, Standard SSD and Standard HDD disk limits are 2^20
  bytes per second: their tables do not say (the 2019 Standard tables said
  MiB/sec), and the published P30 example (5,000 IOPS, 200 MB/s: 64 KB I/Os
  give 3,200 IOPS, 1,024 KB give 200) holds exactly only in MiB.
- An I/O larger than 256 KiB counts as several 256 KiB I/Os; the same unit
  is used for Standard HDD (no source states its throttling unit; its 16 KiB
  rule is for billing).
- Host caching: Premium, Standard SSD and HDD disks under 4,096 GiB only.
- VM sizes: names are case-insensitive, "Standard_" optional. A figure a
  size does not publish is None and its behaviour is stated in the size's
  `not_published` (no limit enforced, or no cache growth), never invented.
  The cached limit is the "cached and temp" (or "cached") column only: the
  newer pages' temp-disk figures are not host-cache figures. Its burst
  figures (M-series "burst cached and temp") burst as the uncached ones do. Ultra and
  Premium SSD v2 disks count against the size's separate Ultra/v2 uncached
  limit where one is published, else against the uncached limit.

Where sources disagree (the reference's `disagreements`), the current figure
is the default; `edition` selects the other where it changes behaviour:
Ultra per-GiB IOPS, maximum IOPS and MB/s ("2022"); Premium v2 maximum MB/s
("2024", and "2022": 1,200); Standard SSD E1-E6 ("2019" table, in MiB/s as
the type's other figures). An edition a SKU has no figures for is refused. VM sizes take the
reference's primary source (its `source_disagreements` list the rest; DSv2's
current page saying premium storage and caching are not supported is taken
as a documentation error, as the reference does). Kept as decided, not
selectable: P50/S50/E50 are 4,096 GiB in the current tables and caching
stops at 4,096 GiB (the FAQ's 4,095 rule); D2s_v3 uncached 48 MB/s (the
size table, not a diagram's 32); data disks attach with caching None unless
asked (vm_disk_perf; the older design guide said ReadOnly).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

from stamp import performance as perf
from stamp.errors import DiskRequestError

from .errors import InvalidParameter, InvalidPerformance, UnknownTier

MB = 1_000_000  # VM tables
MIB = 1 << 20  # disk tables (see the module comment)
IO_UNIT = 256 * 1024
BURST_SECONDS = 30 * 60
CACHE_LIMIT_GIB = 4096
SKUS = ("Standard_LRS", "StandardSSD_LRS", "Premium_LRS", "PremiumV2_LRS", "UltraSSD_LRS")
ULTRA_SKUS = ("PremiumV2_LRS", "UltraSSD_LRS")  # provisioned performance; the VM's separate limit
PREMIUM_SKUS = ("Premium_LRS", "PremiumV2_LRS", "UltraSSD_LRS")  # need a size with premium storage
EDITIONS = ("current", "2024", "2022", "2019")
# The editions each SKU has figures for (the reference's disagreements); another is refused, not
# answered with the current figures.
SKU_EDITIONS = {
    "Standard_LRS": ("current",),
    "StandardSSD_LRS": ("current", "2019"),
    "Premium_LRS": ("current",),
    "PremiumV2_LRS": ("current", "2024", "2022"),
    "UltraSSD_LRS": ("current", "2024", "2022"),
}


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
    mbps_unit: int = MIB  # bytes of this disk type's MB (see the module comment)

    @property
    def credit_iops(self) -> float:
        """Size of a full IOPS credit bucket (30 minutes at the burst rate)."""
        return (self.burst_iops - self.iops) * BURST_SECONDS if self.burst is Burst.CREDIT else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["burst"] = self.burst.value
        out["mbps_unit"] = "MiB/s" if self.mbps_unit == MIB else "MB/s"
        return out


@dataclass(frozen=True)
class VmLimits:
    """A VM size's storage limits; None where the size publishes no figure."""

    name: str
    max_data_disks: int
    cached_iops: int | None
    cached_mbps: float | None
    cache_size_gib: int | None
    uncached_iops: int | None
    uncached_mbps: float | None
    burst_iops: int | None
    burst_mbps: float | None
    host_caching: bool
    premium_storage: bool = True
    family: str = ""
    vcpus: int | None = None
    ultra_iops: int | None = None  # the separate uncached limit of Ultra and Premium SSD v2 disks
    ultra_mbps: float | None = None
    ultra_burst_iops: int | None = None
    ultra_burst_mbps: float | None = None
    ultra_disk_supported: bool | None = None  # None: the pages do not say
    cached_burst_iops: int | None = None  # burst of the cached limit (M-series "burst cached and temp")
    cached_burst_mbps: float | None = None
    not_published: tuple[str, ...] = ()  # what the sources do not give, and what the emulator does then

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["not_published"] = list(self.not_published)
        out["mbps_unit"] = "MB/s"
        return out


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


def disk_limits(sku: str, size_gib: float, *, iops: int | None = None, mbps: float | None = None,
                performance_plus: bool = False, on_demand_bursting: bool = False,
                edition: str = "current", tier: str | None = None) -> DiskLimits:
    """The limits of a disk of `sku` and `size_gib` (provisioned iops/mbps for
    PremiumV2 and Ultra; a performance `tier` for Premium SSD, which the disk
    then performs as, bursting included), as the published tables give them."""
    _check_sku(sku)
    if edition not in EDITIONS:
        raise UnknownTier(f"unknown edition {edition!r}: one of {', '.join(EDITIONS)}")
    if edition not in SKU_EDITIONS[sku]:
        raise UnknownTier(f"edition {edition} has no figures of its own for {sku}: its editions are "
                          f"{', '.join(SKU_EDITIONS[sku])}")
    if size_gib <= 0:
        raise UnknownTier(f"disk size must be positive, not {size_gib} GiB")
    size_gib = math.ceil(size_gib)  # a disk performs as the whole GiB that holds it
    read_ms, write_ms = LATENCY_MS[sku]
    if sku == "PremiumV2_LRS":
        return _premium_v2(size_gib, iops, mbps, edition, read_ms, write_ms)
    if sku == "UltraSSD_LRS":
        return _ultra(size_gib, iops, mbps, edition, read_ms, write_ms)
    if iops is not None or mbps is not None:
        raise InvalidPerformance(f"{sku} disks take the performance of their size tier; iops and mbps "
                                 "are set only for PremiumV2_LRS and UltraSSD_LRS")
    return _tiered(sku, size_gib, performance_plus, on_demand_bursting, edition, read_ms, write_ms, tier)


def _tiered(sku: str, size_gib: int, performance_plus: bool, on_demand_bursting: bool, edition: str,
            read_ms: float, write_ms: float, tier: str | None = None) -> DiskLimits:
    if tier is not None:  # the stamp's rules (performance.py) say which tiers a disk of this size may have
        try:
            perf.check_tier(sku, size_gib, tier)
        except DiskRequestError as e:
            raise InvalidPerformance(str(e)) from None
    name, row = _size_row(sku, perf.tier_size(sku, tier) if tier is not None else size_gib, edition)
    base_iops: Any = row.get("provisioned_iops", row.get("max_iops_up_to"))
    base_mbps: Any = row.get("provisioned_mbps", row.get("max_mbps_up_to"))
    if performance_plus:
        if size_gib < 513:
            raise InvalidPerformance("performance plus needs a disk of at least 513 GiB")
        base_iops = row.get("expanded_iops_performance_plus") or base_iops
        base_mbps = row.get("expanded_mbps_performance_plus") or base_mbps
    model = str(row.get("burst_model", "none"))
    if on_demand_bursting and not model.startswith("on-demand"):
        raise InvalidParameter(f"on-demand bursting is only for Premium_LRS disks above 512 GiB (P30 and up), "
                               f"not {name} ({sku}, {size_gib} GiB): leave it off or choose a larger disk")
    if model == "credit":
        burst, b_iops, b_mbps = Burst.CREDIT, row["max_burst_iops"], row["max_burst_mbps"]
    elif model.startswith("on-demand") and on_demand_bursting:
        burst, b_iops, b_mbps = Burst.ON_DEMAND, row["max_burst_iops"], row["max_burst_mbps"]
    else:
        burst, b_iops, b_mbps = Burst.NONE, base_iops, base_mbps
    return DiskLimits(sku, name, size_gib, int(base_iops), float(base_mbps), burst, int(b_iops), float(b_mbps),
                      size_gib < CACHE_LIMIT_GIB, read_ms, write_ms)


def _size_row(sku: str, size_gib: int, edition: str) -> tuple[str, dict[str, Any]]:
    ref = reference()[sku]
    sizes: dict[str, dict[str, Any]] = ref["sizes"]
    if sku == "StandardSSD_LRS" and edition == "2019":
        old = ref["sizes_2019_superseded"]["values"]
        # the 2019 table is in MiB/s, this disk type's own unit (DiskLimits.mbps_unit): taken as it is
        sizes = {k: {"disk_size_gib": v[0], "max_iops_up_to": v[1], "max_mbps_up_to": v[2],
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
    rule = perf.rules("PremiumV2_LRS", edition)  # the rules live in the stamp, with the disk records
    min_iops, max_iops = perf.iops_range("PremiumV2_LRS", size, edition)
    iops = (rule.default_iops or min_iops) if iops is None else iops
    if not min_iops <= iops <= max_iops:
        raise InvalidPerformance(f"a {size} GiB PremiumV2 disk takes {min_iops:,} to {max_iops:,} IOPS, "
                                 f"not {iops:,}")
    min_mbps, max_mbps = perf.mbps_range("PremiumV2_LRS", iops, edition)
    mbps = (rule.default_mbps or min_mbps) if mbps is None else mbps
    if not min_mbps <= mbps <= max_mbps:
        raise InvalidPerformance(f"a PremiumV2 disk with {iops:,} IOPS takes {min_mbps:,} to {max_mbps:,.0f} MB/s")
    return DiskLimits("PremiumV2_LRS", "PremiumV2", size, iops, float(mbps), Burst.NONE, iops, float(mbps),
                      False, r, w, mbps_unit=MB)


def _ultra(size: int, iops: int | None, mbps: float | None, edition: str, r: float, w: float) -> DiskLimits:
    rule = perf.rules("UltraSSD_LRS", edition)  # by edition; the rules live in the stamp, with the disk records
    if not rule.min_gib <= size <= rule.max_gib:
        raise UnknownTier(f"UltraSSD_LRS disks are {rule.min_gib} to {rule.max_gib:,} GiB")
    min_iops, max_iops = perf.iops_range("UltraSSD_LRS", size, edition)
    iops = max_iops if iops is None else iops
    if not min_iops <= iops <= max_iops:
        raise InvalidPerformance(f"a {size} GiB Ultra disk takes {min_iops} to {max_iops:,} IOPS, not {iops:,}")
    min_mbps, max_mbps = perf.mbps_range("UltraSSD_LRS", iops, edition)
    mbps = max_mbps if mbps is None else mbps
    if not min_mbps <= mbps <= max_mbps:
        raise InvalidPerformance(f"an Ultra disk with {iops:,} IOPS takes {min_mbps} to {max_mbps:,.0f} MB/s")
    return DiskLimits("UltraSSD_LRS", "Ultra", size, iops, float(mbps), Burst.NONE, iops, float(mbps),
                      False, r, w, mbps_unit=MB)


@cache
def vm_reference() -> dict[str, Any]:
    text = resources.files("hostcache").joinpath("data/azure-vm-sizes.json").read_text()
    return dict(json.loads(text))


@cache
def _vm_names() -> dict[str, str]:
    """Lower-case name, with and without "standard_", to the catalog's name."""
    names = {}
    for key in vm_reference()["sizes"]:
        names[key.lower()] = key
        names[key.lower().removeprefix("standard_")] = key
    return names


# The "cached" columns that are host-cache figures (others are temp-disk figures).
CACHE_BASES = ("cached+temp", "cached only")


def vm_limits(name: str) -> VmLimits:
    """A VM size's storage limits, by name ("D8s_v3", "standard_d8s_v3")."""
    key = _vm_names().get(name.strip().lower())
    if key is None:
        raise UnknownTier(f"unknown VM size {name!r}: `hostcache sizes` lists the {len(vm_reference()['sizes'])} "
                          "published sizes (for example D8s_v3)")
    return _vm_row(key, vm_reference()["sizes"][key])


def vm_provenance(name: str) -> dict[str, Any]:
    """Where a size's figures come from: its sources, caveats, and where sources disagree."""
    key = vm_limits(name).name
    row = vm_reference()["sizes"][key]
    disagreements = [d for d in vm_reference()["_meta"]["source_disagreements"] if d["size"] == key]
    return {"source": row["source"], "caveats": row["caveats"], "disagreements": disagreements}


def _vm_row(key: str, row: dict[str, Any]) -> VmLimits:
    caching = bool(row["premium_caching"])
    basis = str(row.get("cached_temp_basis") or "")
    cached = caching and basis.startswith(CACHE_BASES)
    limits = VmLimits(
        key, int(row["max_data_disks"]),
        row["max_cached_temp_iops"] if cached else None, row["max_cached_temp_mbps"] if cached else None,
        row["cache_size_gib"] if caching else None,
        row["max_uncached_iops"], row["max_uncached_mbps"], row["burst_uncached_iops"],
        row["burst_uncached_mbps"], caching, bool(row["premium_storage"]), str(row["family"]), row["vcpus"],
        row["max_uncached_ultra_premv2_iops"], row["max_uncached_ultra_premv2_mbps"],
        row["burst_uncached_ultra_premv2_iops"], row["burst_uncached_ultra_premv2_mbps"],
        row["ultra_disk_supported"],
        row["burst_cached_temp_iops"] if cached else None, row["burst_cached_temp_mbps"] if cached else None)
    return replace(limits, not_published=_not_published(limits))


def _not_published(v: VmLimits) -> tuple[str, ...]:
    """The figures this size's sources do not give, each with what the emulator does instead."""
    out = []
    limits = [("uncached disk", v.uncached_iops, v.uncached_mbps)]
    if v.host_caching:
        limits.append(("cached (host cache)", v.cached_iops, v.cached_mbps))
    for what, iops, mbps in limits:
        missing = [unit for unit, value in (("IOPS", iops), ("MB/s", mbps)) if value is None]
        if missing:
            out.append(f"{what} {' and '.join(missing)}: not published; not limited at the VM level")
    if v.uncached_iops is not None and v.burst_iops is None:
        out.append("burst uncached IOPS and MB/s: not published; the VM does not burst")
    if v.host_caching and v.cache_size_gib is None:
        out.append("host cache size: not published; the host's cache is not grown for this size")
    if v.ultra_iops is None:
        out.append("separate Ultra/Premium SSD v2 limit: not published; those disks count against the "
                   "uncached limit")
    if v.ultra_disk_supported is None:
        out.append("Ultra disk support: not stated; Ultra disks are allowed")
    return tuple(out)


def vm_sizes(family: str | None = None, contains: str | None = None, premium: bool | None = None,
             caching: bool | None = None, min_vcpus: int | None = None) -> list[VmLimits]:
    """Every published VM size that matches all the filters given (case-insensitive);
    a family that no size has is refused (a typo would list nothing)."""
    rows = [_vm_row(k, r) for k, r in vm_reference()["sizes"].items()]
    families = sorted({v.family for v in rows})
    if family is not None and family.lower() not in {f.lower() for f in families}:
        raise UnknownTier(f"no VM size family {family!r}: the families are {', '.join(families)}")
    return [v for v in rows
            if (family is None or v.family.lower() == family.lower())
            and (contains is None or contains.lower() in v.name.lower())
            and (premium is None or v.premium_storage == premium)
            and (caching is None or v.host_caching == caching)
            and (min_vcpus is None or (v.vcpus or 0) >= min_vcpus)]


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
