"""A closed-loop I/O simulation over a Throttle and a fake clock.

Each workload keeps `qd` I/Os outstanding on one disk; when one completes
(admission plus service latency) the next is issued at that instant. Events
are processed in time order, so limiters see arrivals in order. Used by the
tests to check throttle arithmetic exactly, and to show IOPS against queue
depth without sleeping. A run must last longer than its warmup, and every
workload keeps at least one I/O of at least one byte outstanding. A run
admits at most MAX_IOS I/Os (time and memory bounded whatever the seconds
and queue depths asked): past that it stops with an error saying so.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .errors import HostError
from .throttle import FakeClock, Path, Throttle

MAX_IOS = 2_000_000  # about 20 to 60 s of arithmetic here


@dataclass
class Workload:
    disk: str
    nbytes: int = 4096
    write: bool = False
    qd: int = 1
    path: Path = Path.UNCACHED


def simulate(throttle: Throttle, workloads: list[Workload], seconds: float, warmup: float = 0.0,
             start: float = 0.0, max_ios: int = MAX_IOS) -> dict[str, float]:
    """I/Os per second completed by each workload's disk between `start +
    warmup` and `start + seconds`."""
    clock = throttle.clock
    if not isinstance(clock, FakeClock):
        raise ValueError("simulate() needs a Throttle built with a FakeClock")
    if not 0 <= warmup < seconds:
        raise HostError(f"simulate {seconds} s after a warmup of {warmup} s: the warmup must be shorter")
    for w in workloads:
        if w.qd < 1 or w.nbytes < 1:
            raise HostError(f"workload on {w.disk}: queue depth and I/O size must be at least 1")
    if sum(w.qd for w in workloads) > max_ios:
        raise _too_long(max_ios)
    events: list[tuple[float, int, int]] = []
    seq = 0
    for i, w in enumerate(workloads):
        for _ in range(w.qd):
            heapq.heappush(events, (start, seq, i))
            seq += 1
    counted = {w.disk: 0 for w in workloads}
    admitted = 0
    lo, hi = start + warmup, start + seconds
    while events:
        t, _, i = heapq.heappop(events)
        if t >= hi:
            break
        if admitted == max_ios:
            raise _too_long(max_ios)
        admitted += 1
        clock.t = t
        w = workloads[i]
        adm = throttle.admit(w.disk, w.write, w.nbytes, w.path, now=t)
        if lo <= adm.done < hi:
            counted[w.disk] += 1
        heapq.heappush(events, (adm.done, seq, i))
        seq += 1
    span = hi - lo
    return {disk: n / span for disk, n in counted.items()}


def _too_long(max_ios: int) -> HostError:
    return HostError(f"the simulation would admit more than {max_ios:,} I/Os: "
                     "simulate fewer seconds or a lower queue depth")
