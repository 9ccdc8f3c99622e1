"""A managed disk's performance settings: what the platform lets a disk be given.

Where the rules live, and why here: the stamp keeps the disk resource (its
record holds the provisioned IOPS and MB/s, or the performance tier), and
the resource API (`Disks` create and update) is what accepts or refuses a
setting, as the platform's disk API does before any host sees the disk.
So the rules are here, as data, below the host; hostcache imports them
(tiers.py builds the throttle's limits from a record and checks with these
same functions), so one table serves both layers. What each tier then
performs (its IOPS, MB/s and bursting) stays in hostcache's catalog: the
stamp needs only the tier names and sizes, which a test checks against it.

Rules kept here (the project's reference of published limits: disk types,
billing, performance tiers):
- IOPS and MB/s are whole numbers (the API's diskIOPSReadWrite and
  diskMBpsReadWrite are integers); MB/s here is 10^6 bytes per second.
- Ultra Disk (UltraSSD_LRS): 4 to 65,536 GiB; IOPS 100 to min(400,000,
  1,000 per GiB); MB/s 1 to min(10,000, 0.25 per provisioned IOPS). Not
  given: the size's maximum IOPS, and the most MB/s those IOPS allow (our
  choice; the platform assigns "a default based on the size"). At most 4
  performance changes in 24 hours (of IOPS or MB/s: a growth alone is none).
- Premium SSD v2 (PremiumV2_LRS): 1 to 65,536 GiB; IOPS 3,000 to
  min(80,000, max(3,000, 500 per GiB)); MB/s 125 to min(2,000, 0.25 per
  provisioned IOPS). Not given: the free baseline, 3,000 IOPS and 125 MB/s.
  At most 4 performance changes in 24 hours, the creation counting as one.
- Older editions of those rules (the reference's disagreements) are kept for
  the host's catalog (`edition`); the stamp accepts by the current ones.
- Premium SSD performance tiers: a disk's baseline tier is the smallest
  tier whose size holds it (its size rounded up to a whole GiB); it may be
  given any tier at or above its baseline, set at creation or later, and
  back down to the baseline; P60, P70 and P80 only for disks larger than
  4,096 GiB (so a disk of at most 4,096 GiB goes up to P50); a downgrade at
  most once every 12 hours; only Premium SSD disks take a tier.
- Standard SSD and Standard HDD disks have the tier of their size (E10,
  S10...), which cannot be changed.

The platform's answers (docs/errors.md): an IOPS or MB/s value out of
range is BadRequest, "The value V of parameter disk.diskIOPSReadWrite is
not valid. The supported range for a SKU disk of size N GB is between LO
and HI." (as recorded in public reports of the platform's responses); a
tier or a setting the disk type does not take is InvalidParameter, a change
too soon is OperationNotAllowed (codes not verified against the platform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BadRequest, InvalidParameter, OperationNotAllowed

PROVISIONED_SKUS = ("PremiumV2_LRS", "UltraSSD_LRS")
TIERED_SKUS = ("Premium_LRS", "StandardSSD_LRS", "Standard_LRS")
# Tier names and sizes in GiB, smallest first (the published size tables)
TIERS = {
    "Premium_LRS": (("P1", 4), ("P2", 8), ("P3", 16), ("P4", 32), ("P6", 64), ("P10", 128), ("P15", 256),
                    ("P20", 512), ("P30", 1024), ("P40", 2048), ("P50", 4096), ("P60", 8192), ("P70", 16384),
                    ("P80", 32767)),
    "StandardSSD_LRS": (("E1", 4), ("E2", 8), ("E3", 16), ("E4", 32), ("E6", 64), ("E10", 128), ("E15", 256),
                        ("E20", 512), ("E30", 1024), ("E40", 2048), ("E50", 4096), ("E60", 8192),
                        ("E70", 16384), ("E80", 32767)),
    "Standard_LRS": (("S4", 32), ("S6", 64), ("S10", 128), ("S15", 256), ("S20", 512), ("S30", 1024),
                     ("S40", 2048), ("S50", 4096), ("S60", 8192), ("S70", 16384), ("S80", 32767)),
}
LARGE_TIER_MIN_GIB = 4096  # P60, P70, P80: only for disks larger than this
DOWNGRADE_SECONDS = 12 * 3600  # a tier downgrade at most once in this time
CHANGE_WINDOW = 24 * 3600  # Ultra and Premium SSD v2: at most CHANGES_PER_WINDOW changes in it
CHANGES_PER_WINDOW = 4


@dataclass(frozen=True)
class Provisioned:
    """The rules of one provisioned disk type in one edition of the sources."""

    min_gib: int
    max_gib: int
    min_iops: int
    iops_per_gib: int
    max_iops: int
    floor_iops: int  # the most IOPS any size may have at least (Premium SSD v2: 3,000)
    min_mbps: int
    mbps_per_iops: float  # MB/s allowed per provisioned IOPS
    max_mbps: int
    default_iops: int | None  # None: the size's maximum
    default_mbps: int | None  # None: the most the IOPS allow
    creation_counts: bool  # whether creating the disk counts as one of its performance changes


RULES = {
    ("UltraSSD_LRS", "current"): Provisioned(4, 65536, 100, 1000, 400000, 0, 1, 0.25, 10000, None, None, False),
    # billing_2024: 300 IOPS per GiB, 256 kB/s per IOPS; disk_types_2022: also 160,000 and 4,000 MB/s, KiB
    ("UltraSSD_LRS", "2024"): Provisioned(4, 65536, 100, 300, 400000, 0, 1, 0.256, 10000, None, None, False),
    ("UltraSSD_LRS", "2022"): Provisioned(4, 65536, 100, 300, 160000, 0, 1, 256 * 1024 / 1e6, 4000, None, None,
                                          False),
    ("PremiumV2_LRS", "current"): Provisioned(1, 65536, 3000, 500, 80000, 3000, 125, 0.25, 2000, 3000, 125, True),
    ("PremiumV2_LRS", "2024"): Provisioned(1, 65536, 3000, 500, 80000, 3000, 125, 0.25, 1200, 3000, 125, True),
    ("PremiumV2_LRS", "2022"): Provisioned(1, 65536, 3000, 500, 80000, 3000, 125, 0.25, 1200, 3000, 125, True),
}


def rules(sku: str, edition: str = "current") -> Provisioned:
    rule = RULES.get((sku, edition))
    if rule is None:
        raise InvalidParameter(f"{sku} disks have no provisioned IOPS or MB/s (edition {edition}): "
                               f"only {' and '.join(PROVISIONED_SKUS)} disks do")
    return rule


def whole_gib(size_gib: float) -> int:
    """A disk performs as the whole GiB that holds it."""
    return max(1, math.ceil(size_gib))


def iops_range(sku: str, size_gib: float, edition: str = "current") -> tuple[int, int]:
    """The IOPS a disk of this type and size may be given."""
    r = rules(sku, edition)
    size = whole_gib(size_gib)
    return r.min_iops, min(r.max_iops, max(r.floor_iops, r.iops_per_gib * size))


def mbps_range(sku: str, iops: float, edition: str = "current") -> tuple[int, float]:
    """The MB/s a disk of this type with `iops` may be given (the top may be
    fractional: 101 Ultra IOPS allow 25.25 MB/s, so 25 as a whole number)."""
    r = rules(sku, edition)
    return r.min_mbps, max(r.min_mbps, min(r.max_mbps, r.mbps_per_iops * iops))


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The value {value!r} of parameter disk.{what} is not valid: a whole number")
    return value


def provisioned(sku: str, size_gib: float, iops: int | None = None, mbps: int | None = None,
                edition: str = "current") -> tuple[int, int]:
    """The (IOPS, MB/s) a disk gets: the ones asked for, checked, or the
    defaults; BadRequest, in the platform's words, for a value out of range."""
    r = rules(sku, edition)
    size = whole_gib(size_gib)
    lo, hi = iops_range(sku, size, edition)
    iops = hi if iops is None and r.default_iops is None else (r.default_iops if iops is None else iops)
    iops = _whole(iops, "diskIOPSReadWrite")
    if not lo <= iops <= hi:
        raise BadRequest(f"The value {iops} of parameter disk.diskIOPSReadWrite is not valid. The supported "
                         f"range for a {sku} disk of size {size} GB is between {lo} and {hi}.")
    lo, top = mbps_range(sku, iops, edition)
    hi = math.floor(top + 1e-9)
    mbps = (hi if r.default_mbps is None else r.default_mbps) if mbps is None else mbps
    mbps = _whole(mbps, "diskMBpsReadWrite")
    if not lo <= mbps <= hi:
        raise BadRequest(f"The value {mbps} of parameter disk.diskMBpsReadWrite is not valid. The supported "
                         f"range for a {sku} disk with {iops} IOPS is between {lo} and {hi} "
                         f"(at most {r.mbps_per_iops:g} MB/s per IOPS, {r.max_mbps:,} in all).")
    return iops, mbps


def baseline_tier(sku: str, size_gib: float) -> str:
    """The tier a tiered disk's size gives it (100 GiB Premium: P10)."""
    if sku not in TIERS:
        raise InvalidParameter(f"{sku} disks have no size tiers: their performance is provisioned")
    size = whole_gib(size_gib)
    for name, gib in TIERS[sku]:
        if gib >= size:
            return name
    raise InvalidParameter(f"{sku} disks go up to {TIERS[sku][-1][1]:,} GiB; {size:,} GiB is too big")


def tier_size(sku: str, tier: str) -> int:
    for name, gib in TIERS.get(sku, ()):
        if name == tier:
            return gib
    raise InvalidParameter(f"the value {tier!r} of parameter disk.tier is not valid: "
                           f"{_tier_names(sku) or 'none'}")


def _tier_names(sku: str) -> str:
    return ", ".join(name for name, _ in TIERS.get(sku, ()))


def allowed_tiers(sku: str, size_gib: float) -> list[str]:
    """The performance tiers a disk may be given: its baseline and those above
    it, P60 and up only for disks larger than 4,096 GiB (Premium SSD only)."""
    base = baseline_tier(sku, size_gib)
    if sku != "Premium_LRS":
        return [base]
    size = whole_gib(size_gib)
    start = [name for name, _ in TIERS[sku]].index(base)
    return [name for name, gib in TIERS[sku][start:] if size > LARGE_TIER_MIN_GIB or gib <= LARGE_TIER_MIN_GIB]


def check_tier(sku: str, size_gib: float, tier: str) -> str:
    """`tier` if a disk of this type and size may have it; else InvalidParameter saying which it may."""
    if sku != "Premium_LRS":
        if sku in TIERS and tier == baseline_tier(sku, size_gib):
            return tier
        raise InvalidParameter(f"only Premium_LRS disks take a performance tier; a {sku} disk has the tier of "
                               f"its size" + (f" ({baseline_tier(sku, size_gib)})" if sku in TIERS else
                                              ": set its IOPS and MB/s instead"))
    tier_size(sku, tier)  # a name that is no tier at all
    allowed = allowed_tiers(sku, size_gib)
    if tier not in allowed:
        size = whole_gib(size_gib)
        why = (f"P60, P70 and P80 are only for disks larger than {LARGE_TIER_MIN_GIB:,} GiB"
               if tier_size(sku, tier) > LARGE_TIER_MIN_GIB and size <= LARGE_TIER_MIN_GIB
               else f"a disk's tier is at or above its baseline tier, {allowed[0]}")
        raise InvalidParameter(f"the value {tier!r} of parameter disk.tier is not valid for a {size:,} GiB disk: "
                               f"{why}; it may be {', '.join(allowed)}")
    return tier


def tier_rank(sku: str, tier: str) -> int:
    return [name for name, _ in TIERS[sku]].index(tier)


def check_downgrade(sku: str, old: str, new: str, last_downgrade: float | None, now: float) -> bool:
    """Whether going from tier `old` to `new` is a downgrade; OperationNotAllowed
    if the last one was less than 12 hours ago."""
    if tier_rank(sku, new) >= tier_rank(sku, old):
        return False
    if last_downgrade is not None and now - last_downgrade < DOWNGRADE_SECONDS:
        wait = DOWNGRADE_SECONDS - (now - last_downgrade)
        raise OperationNotAllowed(f"a disk's performance tier can be downgraded only once every 12 hours: "
                                  f"the last downgrade was {(now - last_downgrade) / 3600:.1f} h ago; try again "
                                  f"in {wait / 3600:.1f} h")
    return True


def recent_changes(changes: list[float], now: float) -> list[float]:
    """The changes still inside the 24-hour window."""
    return [t for t in changes if now - t < CHANGE_WINDOW]


def check_change_allowed(sku: str, changes: list[float], now: float) -> list[float]:
    """The window's changes with this one added; OperationNotAllowed past 4 in 24 hours."""
    recent = recent_changes(changes, now)
    if len(recent) >= CHANGES_PER_WINDOW:
        wait = CHANGE_WINDOW - (now - min(recent))
        counted = " (its creation counts as one)" if rules(sku).creation_counts else ""
        raise OperationNotAllowed(f"the performance of a {sku} disk can be changed at most {CHANGES_PER_WINDOW} "
                                  f"times in 24 hours{counted}; the next change is possible in "
                                  f"{wait / 3600:.1f} h")
    return recent + [now]
