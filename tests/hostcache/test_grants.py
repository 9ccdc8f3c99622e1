"""Grants: a process admits runs of I/Os on a prepaid share of the shared bucket.
Two throttles over two BucketStores of one folder stand for two processes
(each store keeps its own open files and flocks, as a process does)."""

from __future__ import annotations

from typing import Any

import pytest

from hostcache.buckets import BucketStore
from hostcache.grants import GRANT_LIFETIME, GRANT_SECONDS
from hostcache.throttle import TOLERANCE, FakeClock, Throttle
from hostcache.tiers import disk_limits, vm_limits

S4_IOPS = 500  # Standard_LRS 32 GiB: no bursting
P10 = "disk lun0 P10 IOPS"


class Counting(BucketStore):
    """A store that counts its trips to the files."""

    holds = 0

    def hold(self, buckets: Any, now: float) -> Any:
        self.holds += 1
        return super().hold(buckets, now)


def worker(folder: str, clock: FakeClock, grant: float = GRANT_SECONDS, sku: str = "Standard_LRS",
           gib: int = 32) -> Throttle:
    t = Throttle(vm_limits("D8s_v3"), clock, latency=False, store=Counting(folder, clock.epoch), key="vm",
                 grant=grant)
    t.add_disk("0", disk_limits(sku, gib), key="disk", label="lun0")
    return t


def closed_loop(workers: list[Throttle], until: float) -> list[float]:
    """Each worker sends its next 4 KiB read when the last one is admitted, the
    earliest first. The admission times, every worker's, up to `until` seconds."""
    starts: list[float] = []
    nxt = [0.0] * len(workers)
    while True:
        i = min(range(len(workers)), key=nxt.__getitem__)
        if nxt[i] > until:
            return starts
        nxt[i] = workers[i].admit("0", False, 4096, now=nxt[i]).start
        starts.append(nxt[i])


def test_two_workers_with_grants_stay_within_the_limit_and_reach_it(tmp_path):
    clock = FakeClock()
    a, b = worker(str(tmp_path), clock), worker(str(tmp_path), clock)
    seconds = 20.0
    starts = [s for s in closed_loop([a, b], seconds) if s <= seconds]
    allowed = S4_IOPS * (seconds + TOLERANCE)  # a steady stream gets the rate, plus the tolerance at once
    assert len(starts) <= allowed + 1
    assert len(starts) >= 0.97 * S4_IOPS * seconds


def test_grants_save_trips_to_the_bucket_file(tmp_path):
    clock = FakeClock()
    granted, every = worker(str(tmp_path / "g"), clock, sku="Premium_LRS", gib=1024), \
        worker(str(tmp_path / "e"), clock, grant=0.0, sku="Premium_LRS", gib=1024)  # P30: 5,000 IOPS
    for t in (granted, every):
        for i in range(1000):  # 2,000 IOPS: under every limit
            t.admit("0", False, 4096, now=i * 0.0005)
    assert every.store.holds == 1000  # type: ignore[union-attr]
    # a grant is 5 ms of each limiter on the path: the tightest, the P30's 5,000 IOPS, gives 25 reads
    assert granted.store.holds <= 1000 / 24  # type: ignore[union-attr]


def test_a_worker_below_the_limit_still_spends_its_grants_whole(tmp_path):
    # 300 reads a second against a P30's 5,000 IOPS: 5 ms of the limit's time passes after each
    # read or two, but the grant (25 reads) is spent whole before the next trip to the bucket
    clock = FakeClock()
    t = worker(str(tmp_path), clock, sku="Premium_LRS", gib=1024)
    for i in range(1000):
        t.admit("0", False, 4096, now=i / 300)
    assert t.store.holds <= 1000 / 24  # type: ignore[union-attr]


def test_an_unspent_grant_is_given_back_and_the_bucket_ends_as_without_grants(tmp_path):
    clock = FakeClock()
    granted = worker(str(tmp_path / "g"), clock, sku="Premium_LRS", gib=128)  # P10: bursting, credits
    plain = worker(str(tmp_path / "p"), clock, grant=0.0, sku="Premium_LRS", gib=128)
    for t in (granted, plain):
        for lim in t.disks["0"].limiters + t.vm_limiters:  # half drained: credits neither full nor out
            lim.restore(0.0, lim.state()[1] / 2)
        for i in range(37):
            t.admit("0", i % 3 == 0, 65536, now=i * 0.001)
    assert granted.grants  # what the last refresh paid for is not spent yet
    granted.settle()
    assert not granted.grants
    now = 0.05
    g, p = granted.statistics(now=now), plain.statistics(now=now)
    assert g[P10]["burst_credits_percent"] < 50
    for name in g:  # credits as of now: what was used, and what the idle time between earned
        mine, theirs = g[name]["burst_credits_percent"], p[name]["burst_credits_percent"]
        assert mine == theirs or mine == pytest.approx(theirs, rel=1e-12)
        assert g[name]["requests"] == p[name]["requests"]
    for a, b in zip(granted.disks["0"].limiters, plain.disks["0"].limiters, strict=True):
        # the I/Os spent on a grant are counted back to back from its payment, not with the idle time
        # between them: a time in the past either way, which admits alike from now on
        assert max(a.tat, now) == max(b.tat, now)


def test_a_worker_that_dies_holding_a_grant_loses_that_grant_and_no_more(tmp_path):
    clock = FakeClock()
    dead, alive = worker(str(tmp_path), clock), worker(str(tmp_path), clock)
    dead.admit("0", False, 4096, now=0.0)  # then killed: its grant is never given back
    assert dead.grants
    alone = worker(str(tmp_path / "alone"), clock, grant=0.0)
    alone.admit("0", False, 4096, now=0.0)
    burst = int(S4_IOPS * TOLERANCE) + 1  # what the tolerance lets go at once, then one more that waits
    late = [alive.admit("0", False, 4096, now=0.0).start for _ in range(burst + 1)][-1]
    due = [alone.admit("0", False, 4096, now=0.0).start for _ in range(burst + 1)][-1]
    assert due < late <= due + GRANT_SECONDS + 1e-9  # the dead worker's grant counts as used: no more


def test_a_grant_expires_and_a_change_of_limits_gives_it_back(tmp_path):
    clock = FakeClock()
    t = worker(str(tmp_path), clock)
    t.admit("0", False, 4096, now=0.0)
    holds = t.store.holds  # type: ignore[union-attr]
    t.admit("0", False, 4096, now=0.001)  # on the grant
    assert t.store.holds == holds  # type: ignore[union-attr]
    later = GRANT_LIFETIME + 0.5
    t.admit("0", False, 4096, now=later)  # the grant is too old: to the bucket, the rest given back
    assert t.store.holds == holds + 1  # type: ignore[union-attr]
    lim = t.disks["0"].iops
    assert lim.tat == pytest.approx(later + 1 / S4_IOPS + GRANT_SECONDS)  # this I/O and a new grant only
    clock.t = later
    t.update_disk("0", disk_limits("Standard_LRS", 64))  # S6: the old limiters' grants go back first
    assert not t.grants
    assert t.disks["0"].iops.tat == pytest.approx(later + 1 / S4_IOPS)
