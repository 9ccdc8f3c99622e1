"""hostcache: the physical host in front of the stamp.

The tier catalog (published disk and VM storage limits, as data), the
throttle (token buckets and credit bursting by disk tier and VM size, the
256 KiB rule, cached and uncached paths, a service-latency model, an
injectable clock, buckets shared by every process using a host), the
catalog of the 313 published VM sizes, the BlobCache (RAM + a local cache
file), and the host
(VMs, attach at a LUN, boot, serving disks over NBD). Imports stamp and vhd,
never the reverse.

    from hostcache import disk_limits, vm_limits, Throttle, FakeClock
    from hostcache.sim import Workload, simulate
    t = Throttle(vm_limits("D8s_v3"), FakeClock())
    t.add_disk("data", disk_limits("Premium_LRS", 1024))       # a P30
    simulate(t, [Workload("data", qd=16)], seconds=10)         # {"data": 5000.0}
"""

from .buckets import BucketStore
from .errors import (
    ConflictingUserInput,
    HostError,
    HostRuleError,
    InvalidParameter,
    InvalidPerformance,
    OperationNotAllowed,
    UnknownTier,
)
from .throttle import Admission, CreditLimiter, FakeClock, MonotonicClock, Path, RateLimiter, Throttle
from .tiers import Burst, DiskLimits, VmLimits, catalog, disk_limits, io_units, vm_limits, vm_sizes

__all__ = [
    "Admission", "BucketStore", "Burst", "ConflictingUserInput", "CreditLimiter", "DiskLimits", "FakeClock",
    "HostError", "HostRuleError", "InvalidParameter", "InvalidPerformance", "MonotonicClock",
    "OperationNotAllowed", "Path", "RateLimiter", "Throttle", "UnknownTier", "VmLimits", "catalog",
    "disk_limits", "io_units", "vm_limits", "vm_sizes",
]
