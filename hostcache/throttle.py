"""Throttling by disk tier and VM size: pure arithmetic over an injected clock.

Each limit is a limiter that decides when an I/O may start ("admission"):
- RateLimiter: a generic cell rate algorithm (GCRA) at `rate` units per
  second, allowing `tolerance` seconds of work at once, so a steady stream
  gets exactly `rate` and an idle limiter saves up nothing beyond that;
- CreditLimiter: credit bursting as published: a bucket of credits that
  starts full and holds 30 minutes at the burst rate; while credits last,
  work is admitted at the burst rate and uses (burst - baseline) credits per
  second; otherwise at the baseline; time spent below the baseline earns
  (baseline - use) credits per second, up to the bucket's size.
IOPS limiters count I/Os (one per 256 KiB, see tiers.io_units); MB/s
limiters count bytes (disk MB/s in MiB, VM MB/s in 10^6 bytes: tiers).

Paths (published io_paths), each a list of limiters an I/O must pass:
  uncached            disk, then VM uncached
  cached hit          VM cached only
  cached miss, and    VM cached, then disk, then VM uncached
  writes to a cached disk
An I/O is admitted at the earliest time every limiter on its path allows it,
and then counted by all of them at that time. Over the limit an I/O waits,
in arrival order; nothing is dropped. Service latency (per tier, published
claims) is added after admission, independently per I/O, so IOPS rise with
queue depth as QD / latency until a limit caps them.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from .errors import HostError
from .tiers import BURST_SECONDS, MB, MIB, Burst, DiskLimits, VmLimits, io_units

TOLERANCE = 0.05  # seconds of work a limiter admits at once
# A read served by the host cache (local SSD) still takes time; no source
# gives a figure, so this is our assumption: 0.1 ms.
CACHE_HIT_LATENCY_MS = 0.1
METRIC_WINDOW = 60.0  # seconds, as the platform's one-minute metrics


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand: no sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Path(enum.Enum):
    UNCACHED = "uncached"
    CACHED_HIT = "cached-hit"
    CACHED_MISS = "cached-miss"


@dataclass
class LimiterStats:
    admitted: float = 0.0  # units (I/Os or bytes)
    requests: int = 0
    throttled: int = 0  # requests that waited
    waited: float = 0.0  # seconds, summed over requests
    recent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)


class RateLimiter:
    def __init__(self, name: str, rate: float, tolerance: float = TOLERANCE, start: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"{name}: rate must be positive")
        self.name, self.rate, self.tolerance = name, rate, tolerance
        self.tat = start  # theoretical arrival time of the next unit
        self.stats = LimiterStats()

    def earliest(self, t: float, cost: float) -> float:
        return max(t, self.tat - self.tolerance)

    def commit(self, t: float, cost: float) -> None:
        self.tat = max(t, self.tat) + cost / self.rate
        _record(self.stats, t, cost)

    def consumed(self, now: float, window: float = METRIC_WINDOW) -> float:
        """Percent of the limit used over the last `window` seconds."""
        return _recent(self.stats, now, window) / (self.rate * window) * 100

    def credits_left(self, now: float) -> float | None:
        return None


class CreditLimiter:
    def __init__(self, name: str, baseline: float, burst: float, bucket: float | None = None,
                 tolerance: float = TOLERANCE, start_full: bool = True, start: float = 0.0) -> None:
        if not 0 < baseline < burst:
            raise ValueError(f"{name}: need 0 < baseline < burst")
        self.name, self.baseline, self.burst, self.tolerance = name, baseline, burst, tolerance
        self.bucket = (burst - baseline) * BURST_SECONDS if bucket is None else bucket
        self.credits = self.bucket if start_full else 0.0
        self.tat = start  # when the work admitted so far is done, at the rates allowed
        self.rate = baseline  # for consumed(): the provisioned target
        self.stats = LimiterStats()

    def earliest(self, t: float, cost: float) -> float:
        return max(t, self.tat - self.tolerance)

    def commit(self, t: float, cost: float) -> None:
        start = max(t, self.tat)
        if start > self.tat:  # idle since tat: below the baseline, earning credits
            self.credits = min(self.bucket, self.credits + self.baseline * (start - self.tat))
        at_burst = cost / self.burst
        can_burst = self.credits / (self.burst - self.baseline)
        if at_burst <= can_burst:
            self.tat = start + at_burst
            self.credits -= (self.burst - self.baseline) * at_burst
        else:
            rest = cost - self.burst * can_burst
            self.tat = start + can_burst + rest / self.baseline
            self.credits = 0.0
        _record(self.stats, t, cost)

    def credits_left(self, now: float) -> float:
        """Percent of the bucket, counting what idling until `now` earned."""
        credits = self.credits
        if now > self.tat:
            credits = min(self.bucket, credits + self.baseline * (now - self.tat))
        return credits / self.bucket * 100

    def consumed(self, now: float, window: float = METRIC_WINDOW) -> float:
        return _recent(self.stats, now, window) / (self.baseline * window) * 100


Limiter = RateLimiter | CreditLimiter


def _record(stats: LimiterStats, t: float, cost: float) -> None:
    stats.admitted += cost
    stats.requests += 1
    stats.recent.append((t, cost))


def _recent(stats: LimiterStats, now: float, window: float) -> float:
    while stats.recent and stats.recent[0][0] < now - METRIC_WINDOW:
        stats.recent.popleft()
    return sum(c for t, c in stats.recent if now - window <= t <= now)


def pair(name: str, iops: float, mbps: float, burst_iops: float | None, burst_mbps: float | None,
         credit: bool, unit: int, start: float = 0.0) -> tuple[Limiter, Limiter]:
    """The IOPS and bandwidth limiters of one limit (disk, VM cached or
    uncached); `unit` is the bytes of the table's MB."""
    if credit and burst_iops and burst_iops > iops:
        l_iops: Limiter = CreditLimiter(f"{name} IOPS", iops, burst_iops, start=start)
    else:
        l_iops = RateLimiter(f"{name} IOPS", burst_iops if burst_iops and not credit else iops, start=start)
    if credit and burst_mbps and burst_mbps > mbps:
        l_bw: Limiter = CreditLimiter(f"{name} MB/s", mbps * unit, burst_mbps * unit, start=start)
    else:
        l_bw = RateLimiter(f"{name} MB/s", (burst_mbps if burst_mbps and not credit else mbps) * unit,
                           start=start)
    return l_iops, l_bw


class DiskThrottle:
    def __init__(self, limits: DiskLimits, start: float = 0.0) -> None:
        self.limits = limits
        # on-demand bursting has no credits and no time limit: pair() makes the burst figures the limit
        self.iops, self.bandwidth = pair(
            f"disk {limits.tier}", limits.iops, limits.mbps,
            limits.burst_iops if limits.burst is not Burst.NONE else None,
            limits.burst_mbps if limits.burst is not Burst.NONE else None,
            credit=limits.burst is Burst.CREDIT, unit=MIB, start=start)


class VmThrottle:
    def __init__(self, limits: VmLimits, bursting: bool = True, start: float = 0.0) -> None:
        self.limits = limits
        burst = bursting and limits.burst_iops is not None
        self.uncached_iops, self.uncached_bandwidth = pair(
            f"VM {limits.name} uncached", limits.uncached_iops, limits.uncached_mbps,
            limits.burst_iops if burst else None, limits.burst_mbps if burst else None, credit=True, unit=MB,
            start=start)
        self.cached_iops: Limiter | None = None
        self.cached_bandwidth: Limiter | None = None
        if limits.cached_iops and limits.cached_mbps:
            self.cached_iops = RateLimiter(f"VM {limits.name} cached IOPS", limits.cached_iops, start=start)
            self.cached_bandwidth = RateLimiter(f"VM {limits.name} cached MB/s", limits.cached_mbps * MB,
                                                start=start)


@dataclass(frozen=True)
class Admission:
    arrival: float
    start: float  # admitted by every limiter on the path
    done: float  # start + service latency

    @property
    def waited(self) -> float:
        return self.start - self.arrival


def admit(steps: list[tuple[Limiter, float]], now: float) -> float:
    """The earliest time every limiter allows its cost; then count it there."""
    t = now
    for _ in range(4):  # earliest() is max(t, x) with x fixed: stable in two rounds
        later = max(lim.earliest(t, cost) for lim, cost in steps)
        if later <= t:
            break
        t = later
    for lim, cost in steps:
        if t > now:
            lim.stats.throttled += 1
            lim.stats.waited += t - now
        lim.commit(t, cost)
    return t


class Throttle:
    """One VM's I/O admission: its limits and those of its disks."""

    def __init__(self, vm: VmLimits, clock: Clock | None = None, latency: bool = True,
                 vm_bursting: bool = True) -> None:
        self.clock = clock or MonotonicClock()
        self.vm = VmThrottle(vm, bursting=vm_bursting, start=self.clock.now())
        self.latency = latency
        self.disks: dict[str, DiskThrottle] = {}
        self.lock = threading.Lock()  # admissions from several threads (queue depth) happen one at a time

    def add_disk(self, name: str, limits: DiskLimits) -> DiskThrottle:
        self.disks[name] = DiskThrottle(limits, start=self.clock.now())
        return self.disks[name]

    def steps(self, disk: str, nbytes: int, path: Path) -> list[tuple[Limiter, float]]:
        ios = io_units(nbytes)
        d, vm = self.disks[disk], self.vm
        disk_steps: list[tuple[Limiter, float]] = [(d.iops, ios), (d.bandwidth, nbytes)]
        uncached: list[tuple[Limiter, float]] = [(vm.uncached_iops, ios), (vm.uncached_bandwidth, nbytes)]
        cached: list[tuple[Limiter, float]] = []
        if vm.cached_iops is not None and vm.cached_bandwidth is not None:
            cached = [(vm.cached_iops, ios), (vm.cached_bandwidth, nbytes)]
        if path is Path.UNCACHED:
            return disk_steps + uncached
        if path is Path.CACHED_HIT:
            return cached
        return cached + disk_steps + uncached

    def admit(self, disk: str, write: bool, nbytes: int, path: Path = Path.UNCACHED,
              now: float | None = None) -> Admission:
        """When an I/O arriving now may start, and when it completes."""
        with self.lock:
            arrival = self.clock.now() if now is None else now
            steps = self.steps(disk, nbytes, path)
            if not steps:
                raise HostError(f"VM size {self.vm.limits.name} has no host cache: an I/O cannot hit it")
            start = admit(steps, arrival)
        lim = self.disks[disk].limits
        service = 0.0
        if self.latency:
            ms = CACHE_HIT_LATENCY_MS if path is Path.CACHED_HIT else \
                (lim.latency_write_ms if write else lim.latency_read_ms)
            service = ms / 1000
        return Admission(arrival, start, start + service)

    def statistics(self, now: float | None = None) -> dict[str, dict[str, float | None]]:
        """Per limiter: consumed percent (last minute), credits left, time throttled."""
        t = self.clock.now() if now is None else now
        limiters: list[Limiter] = [self.vm.uncached_iops, self.vm.uncached_bandwidth]
        if self.vm.cached_iops is not None and self.vm.cached_bandwidth is not None:
            limiters += [self.vm.cached_iops, self.vm.cached_bandwidth]
        for d in self.disks.values():
            limiters += [d.iops, d.bandwidth]
        return {lim.name: {"consumed_percent": round(lim.consumed(t), 3),
                           "burst_credits_percent": lim.credits_left(t),
                           "throttled_seconds": round(lim.stats.waited, 6),
                           "throttled_requests": lim.stats.throttled,
                           "requests": lim.stats.requests} for lim in limiters}
