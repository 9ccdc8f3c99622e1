"""Planning and judging a measurement of a disk's limit: pure arithmetic over the tier catalog.

A benchmark that checks a disk reaches its published limit needs three
choices made for it, and one judgement after:
- target(): the I/Os per second the disk allows at an I/O size: its IOPS
  limit (one I/O per 256 KiB, tiers.io_units) or its MB/s limit over the
  I/O size, whichever is lower. A credit-bursting disk is judged at its burst
  figures (a new disk's bucket starts full and holds 30 minutes at the burst
  rate: throttle.CreditLimiter); on-demand bursting is off unless enabled, so
  P30 and up are judged at their provisioned figures.
- queue_depth(): enough I/Os outstanding to reach the target. By Little's
  law I/Os that each take L seconds complete at most QD / L a second, so
  QD = target x L, where L is the tier's service latency (throttle: added
  after admission) plus the serving path's own time per I/O (OVERHEAD_MS),
  times HEADROOM (that time grows as the path gets busy), rounded up to a
  power of two and kept within MIN_QD..MAX_QD.
- vm_for(): the smallest VM size whose uncached limits leave the disk's
  target unchanged at every I/O size measured. Only sizes that publish the
  limits on the disk's path count (a size that publishes none has an unknown
  cap, not no cap), with premium storage for Premium, Premium SSD v2 and
  Ultra disks, and not stated unsupported for Ultra. The path is the one the
  throttle uses (throttle.VmThrottle.uncached_for): Ultra and Premium SSD v2
  disks count against the separate Ultra/v2 limit where the size publishes
  one. Sizes are judged at their baseline (a VM's burst is not counted on).
  Smallest: the lowest limits on that path (IOPS, then MB/s), then the fewest
  vCPUs, then the name. NoSizeFits says so when none exists.
- verdict(): a measured rate against the limit and the path's measured
  ceiling (the rate the serving path reaches with no limit in the way):
  "ok" within TOLERANCE of the limit, "over" above it and above what the
  counting window's edges can add (a throttle leak, never excused), "ceiling-bound" below it when the limit is above CEILING_SHARE of
  the ceiling (the machine, not the throttle, is the bound), else "missed".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .errors import HostError
from .tiers import MB, PREMIUM_SKUS, ULTRA_SKUS, Burst, DiskLimits, VmLimits, io_units, vm_sizes

HEADROOM = 4.0  # extra I/Os only wait in the throttle: cheap; too few leave the disk short of its limit
# fio -> NBD -> hostcache serve -> throttle -> cache -> stamp and back, per I/O at queue depth 1
# beyond the service latency: 1.2 to 1.5 ms measured on the 2-core machine this was tuned on
# (fio 4 KiB and 64 KiB randread, QD1, an Ultra disk: 1.7 to 2.0 ms completion latency, 0.5 ms of it service)
OVERHEAD_MS = 1.5
MIN_QD, MAX_QD = 1, 256
TOLERANCE = 0.03  # a measured rate within 3% of the limit meets it
CEILING_SHARE = 0.9  # a limit above 90% of the path's ceiling cannot be shown by this machine
VERDICTS = ("ok", "over", "ceiling-bound", "missed")


class NoSizeFits(HostError):
    """No published VM size leaves this disk uncapped."""


def target(disk: DiskLimits, nbytes: int) -> float:
    """I/Os per second the disk's own limits allow at `nbytes` per I/O."""
    if nbytes <= 0:
        raise ValueError(f"an I/O size is at least 1 byte, not {nbytes}")
    bursting = disk.burst is not Burst.NONE
    iops = disk.burst_iops if bursting else disk.iops
    mbps = disk.burst_mbps if bursting else disk.mbps
    return min(iops / io_units(nbytes), mbps * disk.mbps_unit / nbytes)


def queue_depth(disk: DiskLimits, nbytes: int, write: bool, overhead_ms: float = OVERHEAD_MS,
                headroom: float = HEADROOM) -> int:
    """I/Os to keep outstanding so the disk's target at `nbytes` is reached (Little's law)."""
    latency = ((disk.latency_write_ms if write else disk.latency_read_ms) + overhead_ms) / 1000
    need = max(1.0, target(disk, nbytes) * latency * headroom)
    return max(MIN_QD, min(MAX_QD, 1 << math.ceil(math.log2(need))))


def vm_path(vm: VmLimits, sku: str) -> tuple[int | None, float | None]:
    """The uncached (IOPS, MB/s) limit a disk of `sku` counts against on this size."""
    if sku in ULTRA_SKUS and (vm.ultra_iops is not None or vm.ultra_mbps is not None):
        return vm.ultra_iops, vm.ultra_mbps
    return vm.uncached_iops, vm.uncached_mbps


def caps(vm: VmLimits, disk: DiskLimits, sizes: Iterable[int]) -> bool:
    """Whether the size's limits on the disk's path would lower its target at any of `sizes`
    (a limit the size does not publish counts as capping: its cap is unknown)."""
    iops, mbps = vm_path(vm, disk.sku)
    if iops is None or mbps is None:
        return True
    return any(min(iops / io_units(n), mbps * MB / n) < target(disk, n) for n in sizes)


def allowed(vm: VmLimits, sku: str) -> bool:
    """Whether the platform lets a disk of `sku` attach to this size."""
    if sku in PREMIUM_SKUS and not vm.premium_storage:
        return False
    return not (sku == "UltraSSD_LRS" and vm.ultra_disk_supported is False)


def vm_for(disk: DiskLimits, sizes: Sequence[int], catalog: Iterable[VmLimits] | None = None) -> VmLimits:
    """The smallest VM size that takes the disk and does not cap it at any of `sizes` (bytes per I/O)."""
    fits = [vm for vm in (vm_sizes() if catalog is None else catalog)
            if allowed(vm, disk.sku) and not caps(vm, disk, sizes)]
    if not fits:
        raise NoSizeFits(f"no published VM size leaves a {disk.tier} disk ({disk.sku}, {disk.iops:,} IOPS, "
                         f"{disk.mbps:,.0f} MB/s) uncapped at {', '.join(_kib(n) for n in sizes)}: its rows "
                         "would measure the VM's limit")
    return min(fits, key=lambda vm: _order(vm, disk.sku))


def _order(vm: VmLimits, sku: str) -> tuple[float, float, int, str]:
    """Smaller first: the limits on the disk's path, then vCPUs, then the name."""
    iops, mbps = vm_path(vm, sku)
    return (math.inf if iops is None else iops, math.inf if mbps is None else mbps, vm.vcpus or 0, vm.name)


def verdict(measured: float, limit: float, ceiling: float | None, tolerance: float = TOLERANCE,
            share: float = CEILING_SHARE, edge: float = 0.0) -> str:
    """One of VERDICTS for a rate measured against `limit`, on a path whose ceiling (same I/O size and
    direction, no limit in the way) is `ceiling` (None: not measured). `edge` is what the window's
    edges may add to a rate: I/Os in flight when counting starts (queue depth / seconds counted) may
    all complete inside it, above the limit's rate, when a busy machine held their completions back."""
    if limit <= 0:
        raise ValueError(f"a limit is positive, not {limit}")
    ratio = measured / limit
    if ratio > 1 + tolerance + edge / limit:
        return "over"
    if ratio >= 1 - tolerance:
        return "ok"
    if ceiling is not None and limit > share * ceiling:
        return "ceiling-bound"
    return "missed"


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"
