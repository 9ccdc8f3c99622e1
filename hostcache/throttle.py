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

A disk's limits can change while it is attached (a new performance tier,
new provisioned IOPS or MB/s): Throttle.update_disk gives it new limiters
that take over the old ones' state and statistics.

Limiter state (when the next unit may go, credits left) can live in a
BucketStore (buckets.py) shared by every process using a host: an admission
then reads the buckets on its path, admits, and writes them back under their
locks; with grants (grants.py) it does so once for a run of I/Os, paying the
shared limiters ahead for a few milliseconds of their rate and spending that
locally. Statistics stay in the process and take bounded space: counters, and
the last minute's use in one-second bins (METRIC_BINS of them), whatever the
number of I/Os.
"""

from __future__ import annotations

import enum
import math
import os
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from .errors import HostError
from .grants import Grant, give_back, take
from .tiers import BURST_SECONDS, MB, ULTRA_SKUS, Burst, DiskLimits, VmLimits, io_units

TOLERANCE = 0.05  # seconds of work a limiter admits at once
# A read served by the host cache (local SSD) still takes time; no source
# gives a figure, so this is our assumption: 0.1 ms.
CACHE_HIT_LATENCY_MS = 0.1
METRIC_WINDOW = 60.0  # seconds, as the platform's one-minute metrics
METRIC_BINS = int(METRIC_WINDOW) + 1  # one-second bins: the window and the second in progress


class Clock(Protocol):
    """`epoch` names the clock's origin: times from clocks of one epoch compare."""

    epoch: str

    def now(self) -> float: ...


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return "boot " + f.read().strip()
    except OSError:  # not Linux: treat every process start as a new epoch
        return f"process {os.getpid()} {time.time()}"


class MonotonicClock:
    """CLOCK_MONOTONIC: one timeline for every process until the machine reboots."""

    epoch = _boot_id()

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand: no sleeping."""

    epoch = "fake"

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


class RecentUse:
    """Units admitted per second over the last minute, in METRIC_BINS fixed bins."""

    def __init__(self) -> None:
        self.second = [-1] * METRIC_BINS  # which whole second each bin holds
        self.units = [0.0] * METRIC_BINS

    def add(self, t: float, cost: float) -> None:
        sec = math.floor(t)
        i = sec % METRIC_BINS
        if self.second[i] != sec:
            self.second[i], self.units[i] = sec, 0.0
        self.units[i] += cost

    def total(self, now: float, window: float) -> float:
        """Units admitted in the whole seconds from now - window to now."""
        lo, hi = math.floor(now - min(window, METRIC_WINDOW)), math.floor(now)
        return sum(u for s, u in zip(self.second, self.units, strict=True) if lo <= s <= hi)


@dataclass
class LimiterStats:
    admitted: float = 0.0  # units (I/Os or bytes)
    requests: int = 0
    throttled: int = 0  # requests that waited
    waited: float = 0.0  # seconds, summed over requests
    recent: RecentUse = field(default_factory=RecentUse)


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
        self.advance(t, cost)
        _record(self.stats, t, cost)

    def advance(self, t: float, cost: float) -> None:
        """Count `cost` at `t` in the limiter's state only (commit also records it in the statistics)."""
        self.tat = max(t, self.tat) + cost / self.rate

    def present_rate(self) -> float:
        """Units per second the limiter admits now, with work waiting."""
        return self.rate

    def consumed(self, now: float, window: float = METRIC_WINDOW) -> float:
        """Percent of the limit used over the last `window` seconds."""
        return _recent(self.stats, now, window) / (self.rate * window) * 100

    def credits_left(self, now: float) -> float | None:
        return None

    def state(self) -> tuple[float, float]:
        """What a BucketStore keeps: (tat, credits)."""
        return self.tat, 0.0

    def restore(self, tat: float, credits: float) -> None:
        self.tat = tat

    def idle_until(self, now: float, earn: bool) -> None:
        """Nothing ran before `now` (a pause or a resume): nothing to save up."""
        self.tat = max(self.tat, now)


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
        self.advance(t, cost)
        _record(self.stats, t, cost)

    def present_rate(self) -> float:
        return self.burst if self.credits > 0 else self.baseline

    def advance(self, t: float, cost: float) -> None:
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

    def credits_left(self, now: float) -> float:
        """Percent of the bucket, counting what idling until `now` earned."""
        credits = self.credits
        if now > self.tat:
            credits = min(self.bucket, credits + self.baseline * (now - self.tat))
        return credits / self.bucket * 100

    def consumed(self, now: float, window: float = METRIC_WINDOW) -> float:
        return _recent(self.stats, now, window) / (self.baseline * window) * 100

    def state(self) -> tuple[float, float]:
        return self.tat, self.credits

    def restore(self, tat: float, credits: float) -> None:
        self.tat, self.credits = tat, min(self.bucket, max(0.0, credits))

    def idle_until(self, now: float, earn: bool) -> None:
        """Account for the time until `now`: idling below the baseline earns
        credits (earn, a pause), or nothing ran at all (a resume after a pause)."""
        if earn and now > self.tat:
            self.credits = min(self.bucket, self.credits + self.baseline * (now - self.tat))
        self.tat = max(self.tat, now)


Limiter = RateLimiter | CreditLimiter


def _record(stats: LimiterStats, t: float, cost: float) -> None:
    stats.admitted += cost
    stats.requests += 1
    stats.recent.add(t, cost)


def _recent(stats: LimiterStats, now: float, window: float) -> float:
    return stats.recent.total(now, window)


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
    """One disk's limiters, named "disk LABEL TIER IOPS" and "... MB/s" (the
    label tells apart two disks of one tier on a VM)."""

    def __init__(self, limits: DiskLimits, start: float = 0.0, label: str = "") -> None:
        self.limits, self.label = limits, label
        # on-demand bursting has no credits and no time limit: pair() makes the burst figures the limit
        self.iops, self.bandwidth = pair(
            " ".join(w for w in ("disk", label, limits.tier) if w), limits.iops, limits.mbps,
            limits.burst_iops if limits.burst is not Burst.NONE else None,
            limits.burst_mbps if limits.burst is not Burst.NONE else None,
            credit=limits.burst is Burst.CREDIT, unit=limits.mbps_unit, start=start)
        self.limiters: list[Limiter] = [self.iops, self.bandwidth]


@dataclass
class VmLimit:
    """The limiters of one VM limit; None where the size publishes no figure (nothing to enforce)."""

    iops: Limiter | None
    bandwidth: Limiter | None

    def limiters(self) -> list[Limiter]:
        return [lim for lim in (self.iops, self.bandwidth) if lim is not None]

    def steps(self, ios: int, nbytes: int) -> list[tuple[Limiter, float]]:
        out: list[tuple[Limiter, float]] = []
        if self.iops is not None:
            out.append((self.iops, ios))
        if self.bandwidth is not None:
            out.append((self.bandwidth, nbytes))
        return out


def _vm_limit(name: str, iops: float | None, mbps: float | None, burst_iops: float | None,
              burst_mbps: float | None, start: float) -> VmLimit:
    """A VM limit: credit bursting where the size publishes burst figures."""

    def one(what: str, rate: float | None, burst: float | None, unit: int) -> Limiter | None:
        if rate is None:
            return None
        if burst is not None and burst > rate:
            return CreditLimiter(f"{name} {what}", rate * unit, burst * unit, start=start)
        return RateLimiter(f"{name} {what}", rate * unit, start=start)
    return VmLimit(one("IOPS", iops, burst_iops, 1), one("MB/s", mbps, burst_mbps, MB))


class VmThrottle:
    """A VM size's limits: uncached (Premium SSD and the rest), the separate
    uncached limit for Ultra and Premium SSD v2 disks where the size publishes
    one, and the host cache's (bursting where the size publishes a cached
    burst); a figure the size does not publish is not enforced."""

    def __init__(self, limits: VmLimits, bursting: bool = True, start: float = 0.0) -> None:
        self.limits = v = limits
        self.uncached = _vm_limit(f"VM {v.name} uncached", v.uncached_iops, v.uncached_mbps,
                                  v.burst_iops if bursting else None, v.burst_mbps if bursting else None, start)
        self.ultra: VmLimit | None = None
        if v.ultra_iops is not None or v.ultra_mbps is not None:
            self.ultra = _vm_limit(f"VM {v.name} uncached Ultra/PremiumV2", v.ultra_iops, v.ultra_mbps,
                                   v.ultra_burst_iops if bursting else None,
                                   v.ultra_burst_mbps if bursting else None, start)
        self.cached = _vm_limit(f"VM {v.name} cached", v.cached_iops, v.cached_mbps,
                                v.cached_burst_iops if bursting else None,
                                v.cached_burst_mbps if bursting else None, start)

    def limiters(self) -> list[Limiter]:
        return [lim for vl in (self.uncached, self.ultra, self.cached) if vl is not None for lim in vl.limiters()]

    def uncached_for(self, sku: str) -> VmLimit:
        """The uncached limit a disk of `sku` counts against."""
        if sku in ULTRA_SKUS and self.ultra is not None:
            return self.ultra
        return self.uncached


class Buckets(Protocol):
    """Where limiter state lives between admissions (buckets.BucketStore)."""

    def hold(self, buckets: dict[str, list[Limiter]], now: float) -> AbstractContextManager[None]: ...


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
    if not steps:  # no published limit on this path
        return t
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
    """One VM's I/O admission: its limits and those of its disks. With a
    `store`, limiter state is read from it and written back around every
    admission (under its keys: `key` for the VM, add_disk's for each disk)."""

    def __init__(self, vm: VmLimits, clock: Clock | None = None, latency: bool = True,
                 vm_bursting: bool = True, store: Buckets | None = None, key: str | None = None,
                 grant: float = 0.0) -> None:
        self.clock = clock or MonotonicClock()
        self.vm = VmThrottle(vm, bursting=vm_bursting, start=self.clock.now())
        self.vm_limiters = self.vm.limiters()
        self.latency = latency
        self.store, self.key = store, key or f"vm {vm.name}"
        self.disks: dict[str, DiskThrottle] = {}
        self.disk_keys: dict[str, str] = {}
        self.lock = threading.Lock()  # admissions from several threads (queue depth) happen one at a time
        self.grant = grant if store is not None else 0.0  # seconds of a limiter's rate a grant pays for
        self.grants: dict[Limiter, Grant] = {}  # by shared limiter: what this process paid for and has left

    def add_disk(self, name: str, limits: DiskLimits, key: str | None = None,
                 label: str | None = None) -> DiskThrottle:
        """A disk under `name`; its limiters' names (statistics) carry `label`, or the name."""
        self.disks[name] = DiskThrottle(limits, start=self.clock.now(), label=name if label is None else label)
        self.disk_keys[name] = key or f"disk {name}"
        return self.disks[name]

    def update_disk(self, name: str, limits: DiskLimits) -> DiskThrottle:
        """New limits for a disk already here (its performance was changed while
        attached): new limiters, which take over the old ones' state (when the
        next unit may go, credits; a limiter without credits gives none) and
        statistics. With a store, the state comes from its bucket anyway (the
        old limiters' grants given back to it first)."""
        with self.lock:
            self.settle([name], self.clock.now())
            old = self.disks[name]
            label = old.label
            new = DiskThrottle(limits, start=self.clock.now(), label=label)
            for was, now in zip(old.limiters, new.limiters, strict=True):
                now.restore(*was.state())
                now.stats = was.stats
            self.disks[name] = new
            return new

    def remove_disk(self, name: str) -> None:
        gone = self.disks.pop(name, None)
        for lim in gone.limiters if gone is not None else []:
            self.grants.pop(lim, None)
        self.disk_keys.pop(name, None)

    def shared(self, disks: list[str], now: float) -> AbstractContextManager[None]:
        """For a `with`: the VM's and these disks' limiters hold the store's
        state, and what changes in them inside is written back."""
        if self.store is None:
            return nullcontext()
        buckets = {self.key: self.vm_limiters}
        for d in disks:
            buckets[self.disk_keys[d]] = self.disks[d].limiters
        return self.store.hold(buckets, now)

    def _held(self, disks: list[str]) -> list[Limiter]:
        """The limiters shared(disks) loads."""
        return self.vm_limiters + [lim for d in disks for lim in self.disks[d].limiters]

    def _give_back(self, limiters: list[Limiter]) -> None:
        """Inside shared(): what these limiters' grants have left goes back to the buckets."""
        for lim in limiters:
            grant = self.grants.pop(lim, None)
            if grant is not None:
                give_back(lim, grant)

    def settle(self, disks: list[str] | None = None, now: float | None = None) -> None:
        """Give back what the grants of the VM's limiters and these disks' (all,
        by default) have left. Call with the lock held, or alone."""
        names = list(self.disks) if disks is None else disks
        if self.grants:
            with self.shared(names, self.clock.now() if now is None else now):
                self._give_back(self._held(names))

    def pause(self, disks: list[str], vm: bool = False, now: float | None = None) -> None:
        """These disks (and the VM's own limits, with vm) stop running, as on
        detach or deallocation: idling until now earns credits, the time
        until resume() earns none (credits accrue only while running)."""
        self._idle(disks, vm, now, earn=True)

    def resume(self, disks: list[str], vm: bool = False, now: float | None = None) -> None:
        """They run again from now: the time since pause() earned nothing."""
        self._idle(disks, vm, now, earn=False)

    def _idle(self, disks: list[str], vm: bool, now: float | None, earn: bool) -> None:
        with self.lock:
            t = self.clock.now() if now is None else now
            with self.shared(disks, t):
                self._give_back(self._held(disks))
                limiters = self.vm.limiters() if vm else []
                for d in disks:
                    limiters += self.disks[d].limiters
                for lim in limiters:
                    lim.idle_until(t, earn)

    def steps(self, disk: str, nbytes: int, path: Path) -> list[tuple[Limiter, float]]:
        ios = io_units(nbytes)
        d, vm = self.disks[disk], self.vm
        disk_steps: list[tuple[Limiter, float]] = [(d.iops, ios), (d.bandwidth, nbytes)]
        uncached_steps = vm.uncached_for(d.limits.sku).steps(ios, nbytes)
        cached_steps = vm.cached.steps(ios, nbytes)
        if path is Path.UNCACHED:
            return disk_steps + uncached_steps
        if path is Path.CACHED_HIT:
            return cached_steps
        return cached_steps + disk_steps + uncached_steps

    def admit(self, disk: str, write: bool, nbytes: int, path: Path = Path.UNCACHED,
              now: float | None = None) -> Admission:
        """When an I/O arriving now may start, and when it completes."""
        with self.lock:
            arrival = self.clock.now() if now is None else now
            if path is not Path.UNCACHED and not self.vm.limits.host_caching:
                raise HostError(f"VM size {self.vm.limits.name} has no host cache: an I/O cannot hit it")
            start = self._admit(disk, self.steps(disk, nbytes, path), arrival)
        lim = self.disks[disk].limits
        service = 0.0
        if self.latency:
            ms = CACHE_HIT_LATENCY_MS if path is Path.CACHED_HIT else \
                (lim.latency_write_ms if write else lim.latency_read_ms)
            service = ms / 1000
        return Admission(arrival, start, start + service)

    def _covered(self, steps: list[tuple[Limiter, float]], arrival: float) -> list[tuple[Grant, float]] | None:
        """The grants that cover every step of an I/O arriving at `arrival`, or None."""
        if not self.grant:
            return None
        covered = []
        for lim, cost in steps:
            g = self.grants.get(lim)
            if g is None or not g.covers(cost, arrival):
                return None
            covered.append((g, cost))
        return covered

    def _admit(self, disk: str, steps: list[tuple[Limiter, float]], arrival: float) -> float:
        """admit() against the shared buckets: on the grants where they cover the
        I/O, else in the buckets (giving back what the grants there have left,
        and taking new ones)."""
        covered = self._covered(steps, arrival)
        if covered is not None:
            start = admit([(g.local, cost) for g, cost in covered], arrival)
            for g, cost in covered:
                g.left -= cost
            return start
        with self.shared([disk], arrival):
            self._give_back(self._held([disk]))
            start = admit(steps, arrival)
            if self.grant:
                for lim, _ in steps:
                    self.grants[lim] = take(lim, start, self.grant)
        return start

    def statistics(self, now: float | None = None, running: bool = True) -> dict[str, dict[str, float | None]]:
        """Per limiter: consumed percent (last minute), credits left, time throttled.
        Not running (a stopped VM): the time since its pause earns no credits."""
        t = self.clock.now() if now is None else now
        limiters = self.vm.limiters()
        for d in self.disks.values():
            limiters += d.limiters
        with self.lock, self.shared(list(self.disks), t):  # credits as the shared buckets hold them
            self._give_back(self._held(list(self.disks)))
            return {lim.name: {"consumed_percent": round(lim.consumed(t), 3),
                               "burst_credits_percent": lim.credits_left(t if running else min(t, lim.tat)),
                               "throttled_seconds": round(lim.stats.waited, 6),
                               "throttled_requests": lim.stats.throttled,
                               "requests": lim.stats.requests} for lim in limiters}
