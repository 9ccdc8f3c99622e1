"""Grants: a process admits runs of I/Os on a prepaid share of the shared bucket.
Two throttles over two BucketStores of one folder stand for two processes
(each store keeps its own open files and flocks, as a process does)."""

from __future__ import annotations

from typing import Any

import pytest

from hostcache.buckets import BucketStore
from hostcache.grants import GRANT_SECONDS
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
    # a grant is 5 ms of the tightest limiter on the path (the P30's 200 MB/s: 5 ms is 244 reads of
    # 4 KiB; its 5,000 IOPS: 25), or ends when its time is past (5 ms at 2,000 IOPS: 10 reads)
    assert granted.store.holds <= 1000 / 9  # type: ignore[union-attr]


def test_an_unspent_grant_is_given_back_and_the_bucket_ends_as_without_grants(tmp_path):
    clock = FakeClock()
    granted = worker(str(tmp_path / "g"), clock, sku="Premium_LRS", gib=128)  # P10: bursting, credits
    plain = worker(str(tmp_path / "p"), clock, grant=0.0, sku="Premium_LRS", gib=128)
    for t in (granted, plain):
        for i in range(37):
            t.admit("0", i % 3 == 0, 65536, now=i * 0.001)
    assert granted.grants  # what the last refresh paid for is not spent yet
    granted.settle()
    assert not granted.grants
    g, p = granted.statistics(now=0.05), plain.statistics(now=0.05)
    for name in g:
        assert g[name]["burst_credits_percent"] == pytest.approx(p[name]["burst_credits_percent"], abs=1e-9)
        assert g[name]["requests"] == p[name]["requests"]
    assert granted.disks["0"].iops.tat == pytest.approx(plain.disks["0"].iops.tat, abs=1e-12)


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


def test_a_grant_expires_with_its_time_and_a_change_of_limits_gives_it_back(tmp_path):
    clock = FakeClock()
    t = worker(str(tmp_path), clock)
    t.admit("0", False, 4096, now=0.0)
    holds = t.store.holds  # type: ignore[union-attr]
    t.admit("0", False, 4096, now=0.001)  # on the grant
    assert t.store.holds == holds  # type: ignore[union-attr]
    t.admit("0", False, 4096, now=1.0)  # the grant's time is past: to the bucket, the rest given back
    assert t.store.holds == holds + 1  # type: ignore[union-attr]
    lim = t.disks["0"].iops
    assert lim.tat == pytest.approx(1.0 + 1 / S4_IOPS + GRANT_SECONDS)  # this I/O and a new grant only
    clock.t = 1.0
    t.update_disk("0", disk_limits("Standard_LRS", 64))  # S6: the old limiters' grants go back first
    assert not t.grants
    assert t.disks["0"].iops.tat == pytest.approx(1.0 + 1 / S4_IOPS)
