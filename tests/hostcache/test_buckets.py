"""Throttle state that outlives a process: buckets shared through the host folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hostcache.buckets import BucketStore, epoch_id, pack
from hostcache.host import Host
from hostcache.throttle import CreditLimiter, FakeClock, RateLimiter, Throttle
from hostcache.tiers import disk_limits, vm_limits

from .test_host import host, make_image  # noqa: F401  (the fixture)

KIB = 1024
P10_IOPS = "disk lun0 P10 IOPS"


def drain(t: Throttle, lun: str) -> float:
    """Spend the disk's whole burst bucket at once; the time when that work is done."""
    p10 = disk_limits("Premium_LRS", 128)
    t.admit(lun, False, int(p10.credit_iops / (p10.burst_iops - p10.iops) * p10.burst_iops) * 256 * KIB,
            now=t.clock.now())
    t.settle()  # the grant taken beyond it given back: the limiter's time is the work's end
    return t.disks[lun].iops.tat


def credits(h: Host, vm: str, now: float) -> float:
    value = h.throttle(vm).statistics(now=now)[P10_IOPS]["burst_credits_percent"]
    assert value is not None
    return value


def test_a_drained_bucket_stays_drained_across_detach_attach_and_a_new_host(host, tmp_path):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")  # a P10: 500 IOPS, bursting to 3,500
    assert credits(host, "vm1", 0.0) == 100.0
    done = drain(host.throttle("vm1"), "0")
    host.clock.advance(done)
    assert credits(host, "vm1", done) == 0.0
    host.detach("vm1", 0)
    host.clock.advance(1000)  # detached: not running, so it earns nothing
    host.attach("vm1", "data1", 0, "None")
    now = host.clock.now()
    assert credits(host, "vm1", now) == 0.0  # not refilled by detach + attach
    host.stop("vm1")
    host.clock.advance(1000)  # deallocated: nothing either
    host.start("vm1")
    now = host.clock.now()
    assert credits(host, "vm1", now) == 0.0
    host.close()
    again = Host(host.path, clock=FakeClock(now))
    try:
        assert credits(again, "vm1", now) == 0.0  # nor by a new Host
        # credits accrue only while running below the baseline: 10 idle seconds earn 500 I/Os each
        assert credits(again, "vm1", now + 10) == pytest.approx(500 * 10 / (3000 * 1800) * 100)
    finally:
        again.close()


def test_idling_while_attached_earns_up_to_the_detach(host):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    done = drain(host.throttle("vm1"), "0")
    host.clock.advance(done + 100)  # 100 s attached and idle: 50,000 I/Os earned
    host.detach("vm1", 0)
    host.clock.advance(5000)
    host.attach("vm1", "data1", 0, "None")
    assert credits(host, "vm1", host.clock.now()) == pytest.approx(500 * 100 / (3000 * 1800) * 100)


def test_two_processes_draw_on_one_bucket(host, tmp_path):  # noqa: F811
    """Two processes each admit 3,000 4 KiB reads at t=0 on one P10: the
    bucket ends as if one process had admitted all 6,000 (no update lost)."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    host.close()
    script = textwrap.dedent(f"""
        from hostcache.host import Host
        from hostcache.throttle import FakeClock
        with Host({host.path!r}, clock=FakeClock(0.0)) as h:
            t = h.throttle("vm1")
            for _ in range(3000):
                t.admit("0", False, 4096, now=0.0)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    alone = Throttle(vm_limits("D8s_v3"), FakeClock(0.0), latency=False)
    alone.add_disk("0", disk_limits("Premium_LRS", 128), label="lun0")
    for _ in range(6000):
        alone.admit("0", False, 4096, now=0.0)
    with Host(host.path, clock=FakeClock(0.0)) as h:
        shared, one = h.throttle("vm1").statistics(now=0.0), alone.statistics(now=0.0)
    for name in (P10_IOPS, "VM Standard_D8s_v3 uncached IOPS"):  # the disk's bucket and the VM's
        # equal within what the processes' grants (grants.py) make of the credits: paid and given back
        # around idle time the bucket's cap cuts, each is at most 5 ms at the burst rate (17.5 I/Os on
        # the P10, 0.0003% of its bucket); the 3,000 I/Os of one lost update are 0.05%
        assert one[name]["burst_credits_percent"] < 100
        assert shared[name]["burst_credits_percent"] == pytest.approx(one[name]["burst_credits_percent"], abs=1e-3)


def test_a_damaged_record_reads_as_drained_and_another_epoch_keeps_the_credits(tmp_path):
    store = BucketStore(str(tmp_path), "boot A")
    lim = CreditLimiter("c", 500, 3500, start=0.0)
    lim.commit(0.0, 3500 * 60)  # one minute at the burst rate
    with store.hold({"k": [lim]}, 0.0):
        pass  # first sight: the limiter's own state is written
    left = lim.credits
    with open(store.path("k"), "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    fresh = CreditLimiter("c", 500, 3500, start=0.0)
    with store.hold({"k": [fresh]}, 100.0):
        assert fresh.state() == (100.0, 0.0)  # damaged: drained, idle from now, never refilled
    with store.hold({"k": [fresh]}, 100.0):
        fresh.restore(60.0, left)
    store.close()
    other = BucketStore(str(tmp_path), "boot B")  # another boot: the monotonic clock began again
    rate, credit = RateLimiter("r", 100, start=0.0), CreditLimiter("c", 500, 3500, start=0.0)
    with other.hold({"k": [credit]}, 5.0), other.hold({"r": [rate]}, 5.0):
        assert credit.state() == (5.0, left)  # credits kept, the unknown gap earns nothing
        assert rate.state() == (0.0, 0.0)  # a new bucket starts as its limiter does
    other.close()


def test_deleting_a_vm_forgets_its_bucket(host):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.throttle("vm1").statistics()
    files = os.listdir(os.path.join(host.path, "throttle"))
    assert any(f.startswith("vm%20vm1") for f in files)
    host.delete_vm("vm1", delete_os_disk=True)
    assert os.listdir(os.path.join(host.path, "throttle")) == []


def test_the_buckets_of_deleted_disks_are_removed(host):  # noqa: F811
    """Attach, detach and delete disk after disk: the bucket files do not pile up."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    folder = os.path.join(host.path, "throttle")
    for i in range(5):
        host.disks.create_empty(f"tmp{i}", 8, "Premium_LRS")
        host.attach("vm1", f"tmp{i}", 0)
        host.throttle("vm1").admit("0", False, 4096)
        host.detach("vm1", 0)
        host.disks.delete_disk(f"tmp{i}")
    host.attach("vm1", "data1", 0)
    host.detach("vm1", 0)  # prunes what the last round left
    names = sorted(os.listdir(folder))
    assert not any(n.startswith("disk%20tmp") for n in names), names
    assert any(n.startswith("disk%20data1") for n in names)  # a disk that exists keeps its bucket


def test_the_cli_sees_the_bucket_a_python_process_drained(host):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    host.clock.advance(drain(host.throttle("vm1"), "0"))
    host.close()
    # the CLI's clock is the monotonic one, another epoch: it keeps the credits as they are (none)
    r = subprocess.run([sys.executable, "-m", "hostcache", "--host", host.path, "throttle", "stats", "vm1"],
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["credits_percent"][P10_IOPS] == 0.0


def test_a_hold_that_raises_writes_nothing_and_the_next_reads_the_file_again(tmp_path):
    store = BucketStore(str(tmp_path), "fake")
    lim = CreditLimiter("c", 500, 3500, start=0.0)
    with store.hold({"k": [lim]}, 0.0):
        lim.commit(0.0, 3500 * 60)
    saved = lim.state()
    with pytest.raises(RuntimeError), store.hold({"k": [lim]}, 0.0):
        lim.commit(0.0, 3500 * 60)
        raise RuntimeError("the admission failed half way")
    assert lim.state() != saved
    with store.hold({"k": [lim]}, 0.0):
        assert lim.state() == saved
    store.close()


@pytest.mark.parametrize("tat,credits", [(1e12, 5.0), (float("inf"), 5.0), (float("nan"), 5.0),
                                         (50.0, float("nan")), (50.0, -1e9), (100.0 + 86401, 5.0)])
def test_an_intact_record_with_impossible_figures_reads_as_drained(tmp_path, tat, credits):
    """A record with a good CRC but a time that is not finite or a day
    ahead (it would hold every I/O until then), or credits that cannot be."""
    store = BucketStore(str(tmp_path), "boot A")
    with open(store.path("k"), "wb") as f:
        f.write(pack(epoch_id("boot A"), [(tat, credits)]))
    lim = CreditLimiter("c", 500, 3500, start=0.0)
    with store.hold({"k": [lim]}, 100.0):
        assert lim.state() == (100.0, 0.0)
        lim.commit(100.0, 1)  # admitted now, not at the record's time
        assert lim.tat < 101
    store.close()


def test_a_disk_whose_bucket_says_a_far_time_reads_now(host):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    rec = host.disks.record("data1")
    path = host.buckets.path(f"disk data1 {rec['created']}")
    for far in (1e12, float("inf")):
        with open(path, "wb") as f:
            f.write(pack(epoch_id("fake"), [(far, 0.0), (far, 0.0)]))
        host.buckets.written.clear()
        now = host.clock.now()
        host.open_disk("vm1", 0).read(0, 4096)
        assert host.clock.now() - now < 1


def test_a_stopped_vm_shows_the_credits_it_will_resume_with(host):  # noqa: F811
    """Deallocated for an hour after a drain: `throttle stats` says 0%, as the
    start that follows does (it said 100% while stopped)."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    host.clock.advance(drain(host.throttle("vm1"), "0"))
    host.stop("vm1")
    host.clock.advance(3600)
    assert host.throttle_stats("vm1")["credits_percent"][P10_IOPS] == 0.0
    host.start("vm1")
    assert host.throttle_stats("vm1")["credits_percent"][P10_IOPS] == 0.0


def test_a_drained_disk_stays_drained_on_another_host_over_the_stamp(host, tmp_path):  # noqa: F811
    """Detached from host 1 drained, attached on host 2 (another host folder,
    the same stamp): its credits go with the disk, not a fresh bucket."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    host.clock.advance(drain(host.throttle("vm1"), "0"))
    host.detach("vm1", 0)
    now = host.clock.now()
    host.close()
    other = Host.create(str(tmp_path / "host2"), host.config["stamp"], cache_bytes=32 << 20, clock=FakeClock(now))
    try:
        other.create_vm("vm2", "D8s_v3", "gpt")
        other.attach("vm2", "data1", 0, "None")
        assert credits(other, "vm2", now) == 0.0
        other.delete_vm("vm2")  # deleting the VM detaches it: the credits go with it again
    finally:
        other.close()
    again = Host(host.path, clock=FakeClock(now))
    try:
        again.attach("vm1", "data1", 0, "None")
        assert credits(again, "vm1", now) == 0.0
    finally:
        again.close()
