"""Continuous reclamation (stamp.reclaim): the policy's choices, disk use
kept bounded beside a writer that never stops, and kill -9 of the reclaimer
beside a writer losing nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from stamp import Stamp
from stamp.gc import ExtentUse, collect
from stamp.reclaim import Companion, Policy, Reclaimer, due, plan
from tests.stamp import thrash

from .test_thrash import replay

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def use(i: int, live_mib: float, size_mib: float = 1, sealed: bool = True) -> ExtentUse:
    return ExtentUse(i, int(size_mib * MIB), int(live_mib * MIB), sealed)


def test_plan_compacts_the_emptiest_first_down_to_the_target():
    uses = [use(1, 0.4), use(2, 0.1), use(3, 0.9), use(4, 0.3), use(5, 0), use(6, 0.2, sealed=False)]
    # live 1.9 MiB in 5 MiB of extents that stay (the dead one goes anyway)
    assert plan(uses, Policy(target=2.0, trigger=2.0)) == [2, 4]  # 5 -> 4.1 -> 3.4 <= 3.8
    assert plan(uses, Policy(target=2.2, trigger=2.2)) == [2]
    assert plan(uses, Policy(target=1.5, trigger=1.6)) == [2, 4, 1]  # never 3 (above compact_below)
    assert plan(uses, Policy(target=3.0, trigger=3.0)) == []
    assert plan(uses, Policy(target=1.5, trigger=1.6, max_move=MIB // 2)) == [2, 4]  # 0.1 + 0.3 of 0.5
    assert plan(uses, Policy(target=1.5, trigger=1.6, max_move=1)) == [2]  # always at least one
    assert 6 not in plan(uses, Policy(target=1.01, trigger=1.01, compact_below=1.0))  # open: never


def test_plan_under_the_free_space_floor_compacts_every_candidate():
    uses = [use(1, 0.4), use(2, 0.1), use(3, 0.9)]
    lax = Policy(target=50, trigger=50, min_free=100 * MIB)
    assert plan(uses, lax, free=200 * MIB) == []
    assert plan(uses, lax, free=50 * MIB) == [2, 1]


def test_a_round_is_due_above_the_trigger_on_a_recount_or_short_of_space():
    p = Policy(target=1.5, trigger=2.0, recount=10, min_free=MIB)
    assert due(0, None, None, 0, p)  # no census yet
    assert not due(20 * MIB, 10 * MIB, None, 1, p)
    assert due(21 * MIB, 10 * MIB, None, 1, p)
    assert due(1, 10 * MIB, None, 10, p)
    assert due(1, 10 * MIB, MIB - 1, 1, p)


@pytest.mark.parametrize("kw", [dict(target=1.0), dict(target=2, trigger=1.5), dict(compact_below=0),
                                dict(max_move=0), dict(interval=-1)])
def test_a_policy_that_cannot_work_is_refused(kw):
    with pytest.raises(ValueError):
        Policy(**kw)


def node_bytes(path: str) -> int:
    """Disk blocks held by the stamp's extent replicas."""
    total = 0
    for root, _, files in os.walk(os.path.join(path, "nodes")):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass  # deleted by the reclaimer since the listing
    return total


SIZE = 4 * MIB  # the disk
WRITE = 64 * 1024
# 3 replicas of: the open extent, a sealed one the round has not looked at,
# and the extent a round's copies go to (1 MiB extents)
ALLOWANCE = 3 * 3 * MIB


def overwrite(st: Stamp, rng: random.Random, model: bytearray) -> None:
    off = rng.randrange(SIZE // WRITE) * WRITE
    data = rng.randbytes(WRITE)
    st.blobs.write("d", off, data)
    model[off:off + WRITE] = data


def test_a_writer_and_reclaimer_rounds_keep_disk_use_under_twice_the_live_data(tmp_path):
    """A writer that never stops (64 KiB random overwrites, 25 times the
    disk), with a reclaimer round after every MiB written: the replicas on
    disk stay under 2 x (live data x 3) plus a fixed allowance all along."""
    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(7), bytearray(SIZE)
    r = Reclaimer(st, Policy(interval=0))
    peak = 0.0
    for i in range(25 * SIZE // WRITE):
        overwrite(st, rng, model)
        if i % (MIB // WRITE) == 0:
            r.step()
            live = st.blobs.used_bytes("d")
            used = node_bytes(path)
            assert used <= 2 * 3 * live + ALLOWANCE, (i, used, live, r.stats.to_json())
            peak = max(peak, used / (3 * live))
    assert r.stats.total.bytes_freed > 50 * MIB and r.stats.total.extents_compacted > 10
    assert st.blobs.read("d", 0, SIZE) == bytes(model) and st.check(deep=True).ok
    print(f"peak disk use: {peak:.2f} x (live x 3); {r.stats.to_json()}")
    st.close()


def test_a_reclaimer_thread_beside_a_writer_keeps_disk_use_bounded(tmp_path):
    """The same with the reclaimer in its own thread, as `hostcache serve`
    runs it: disk use stays bounded (the allowance is larger: the writer is
    held back (stamp.pressure) only past the ceiling, so on a loaded machine
    it may get a few rounds ahead of the thread)."""
    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(8), bytearray(SIZE)
    with Reclaimer(st, Policy(interval=0.001)) as r:
        for i in range(25 * SIZE // WRITE):
            overwrite(st, rng, model)
            if i % 16 == 0:
                used, live = node_bytes(path), st.blobs.used_bytes("d")
                assert used <= 2 * 3 * live + 4 * ALLOWANCE, (i, used, live, r.stats.to_json())
    r.step()  # the writer stopped: one more round brings it under the trigger
    assert node_bytes(path) <= 3 * (1.6 * SIZE + 2 * MIB)
    assert r.stats.errors == 0 and r.stats.total.bytes_freed > 50 * MIB
    assert st.blobs.read("d", 0, SIZE) == bytes(model) and st.check(deep=True).ok
    st.close()


def test_kill_9_during_continuous_gc_beside_a_writer_loses_nothing(tmp_path):
    """`stamp gc --watch` (an eager policy: it compacts nearly every partly
    dead extent, rounds back to back) killed with SIGKILL again and again at
    random moments, beside a journaled writer (killed at the end): every
    acknowledged write reads back, check is clean, and the next round
    finishes what the killed ones left (no dying extent stays)."""
    path = str(tmp_path / "st")
    with Stamp.create(path, extent_size=MIB) as st:
        st.blobs.create(thrash.blob_name(0), thrash.SIZE)
    journal = str(tmp_path / "w0.journal")
    env = {**os.environ, "PYTHONPATH": ROOT}
    writer = subprocess.Popen([sys.executable, "-m", "tests.stamp.thrash", "writer", path, "0", "1", journal],
                              cwd=ROOT, env=env)
    rng = random.Random(3)
    rounds = []
    try:
        for k in range(12):
            out = str(tmp_path / f"gc.{k}.out")
            with open(out, "wb") as f:
                gc = subprocess.Popen([sys.executable, "-m", "stamp", "--stamp", path, "gc", "--watch", "--target",
                                       "1.02", "--trigger", "1.02", "--compact-below", "0.9", "--interval", "0",
                                       "--max-move-mib", "1"], cwd=ROOT, env=env, stdout=f)
            for _ in range(400):  # until it has reclaimed something (its start-up is slow on a busy machine)
                if os.path.getsize(out) or gc.poll() is not None:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.3))  # then somewhere in the rounds that follow
            assert gc.poll() is None and writer.poll() is None
            gc.send_signal(signal.SIGKILL)
            gc.wait()
            rounds += [json.loads(line) for line in open(out) if line.endswith("}\n")]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert len(rounds) >= 12 and sum(r["bytes_freed"] for r in rounds) > 0
    with Stamp.open(path) as st:
        st.stream.scrub()  # orphan files of a kill between a commit and the deletes go
        report = st.check(deep=True)
        assert report.ok and report.stats["orphan_files"] == 0, report.problems
        allowed, acked, _ = replay(journal)
        assert acked > 100
        data = st.blobs.read(thrash.blob_name(0), 0, thrash.SIZE)
        for p, seqs in enumerate(allowed):
            got = data[p * thrash.PAGE:(p + 1) * thrash.PAGE]
            assert got in [bytes(thrash.PAGE) if s == 0 else thrash.page_bytes(0, s, p) for s in seqs], p
        collect(st)
        assert st.stream.all_extents(dying=True) == st.stream.all_extents()
        assert st.check(deep=True).ok


def test_an_idle_stamp_no_round_can_improve_is_not_scanned_again_and_again(tmp_path):
    """Extents just above compact_below live (56%) hold 1.78 x the live bytes:
    over the trigger, yet nothing may be compacted. A round finds nothing to
    do; the next steps must not run the same futile round (two index scans
    and a write transaction) at every interval while nothing changes, as an
    idle `hostcache serve` would forever; a write that adds extent bytes, or
    the recount, makes one due again."""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", 8 * MIB)
    for k in range(4):  # each 1 MiB extent: 16 x 64 KiB, 7 of them cleared afterwards
        for j in range(16):
            st.blobs.write("d", (k * 16 + j) * 65536, bytes([j + 1]) * 65536)
        st.blobs.clear("d", k * 16 * 65536, 7 * 65536)
    st.stream.seal_current()
    r = Reclaimer(st, Policy(interval=0))
    report = r.step()
    assert report is not None and report.bytes_moved == report.bytes_freed == 0
    assert r.stats.extent_bytes > Policy().trigger * r.stats.live_bytes
    assert [r.step() for _ in range(5)] == [None] * 5 and r.stats.censuses == 1
    st.blobs.write("d", 0, b"\x01" * 65536)
    st.stream.seal_current()  # new extent bytes (an open extent's count at its seal): worth a look
    assert r.step() is not None and r.stats.censuses == 2
    r._census_at -= Policy().recount  # the recount still comes
    assert r.step() is not None and r.stats.censuses == 3
    st.close()


PARENT = """
import sys, time
from stamp.reclaim import Companion
c = Companion(sys.argv[1]).start()
print(c.proc.pid, flush=True)
time.sleep(600)
"""


def _overwritten(path: str) -> int:
    """A stamp of 1 MiB extents whose 2 MiB blob was written 6 times: its extent bytes."""
    with Stamp.create(path, extent_size=MIB) as st:
        st.blobs.create("d", 2 * MIB)
        for i in range(6):
            st.blobs.write("d", 0, bytes([i + 1]) * (2 * MIB))
        return st.stream.extent_bytes()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: it ended
    except FileNotFoundError:
        return True


def test_a_companion_reclaims_then_says_what_it_did_when_stopped(tmp_path):
    """`hostcache serve`'s reclaimer: a process of its own, stopped through its standard input."""
    path = str(tmp_path / "st")
    before = _overwritten(path)
    with Companion(path) as c:
        with Stamp.open(path) as st:
            for _ in range(600):  # its start-up and first round take a while on a busy machine
                if st.stream.extent_bytes() < before / 2:
                    break
                time.sleep(0.05)
            after = st.stream.extent_bytes()
    assert after < before / 2 and c.stats["rounds"] >= 1 and c.stats["bytes_freed"] > 0, (before, after, c.stats)
    with Stamp.open(path) as st:
        assert st.blobs.read("d", 0, 2 * MIB) == bytes([6]) * (2 * MIB) and st.check(deep=True).ok


def test_a_companion_ends_with_its_parent_however_the_parent_ends(tmp_path):
    """kill -9 of the serving process: its companion's standard input closes and it stops
    (it would otherwise reclaim, and hold writers, for nobody)."""
    path = str(tmp_path / "st")
    _overwritten(path)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, path], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.kill()
    parent.wait()
    for _ in range(600):
        if _gone(child):
            break
        time.sleep(0.05)
    assert _gone(child)
    with Stamp.open(path) as st:
        assert st.check(deep=True).ok


def test_a_companion_killed_9_holds_no_writer_while_its_parent_goes_on(tmp_path):
    """kill -9 of the companion alone: until its parent (the serve, going on) waits for it, it is a
    zombie, which answers kill(0) and keeps its start time; writers over the ceiling took it for a
    live reclaimer and waited the patience (5 s) at every check, for a reclaimer that was dead."""
    from stamp import pressure

    path = str(tmp_path / "st")
    _overwritten(path)
    with Companion(path) as c, Stamp.open(path) as st:
        gate = pressure.Gate(st.stream)
        assert c.proc is not None
        for _ in range(600):  # its start-up takes a while on a busy machine
            p = gate.published()
            if p is not None and p.pid == c.proc.pid:
                break
            time.sleep(0.05)
        assert p is not None and pressure.alive(p)
        os.kill(c.proc.pid, signal.SIGKILL)
        for _ in range(600):
            if _gone(c.proc.pid):
                break
            time.sleep(0.05)
        assert _gone(c.proc.pid) and not pressure.alive(p)
        gate.close()


def test_a_companion_killed_by_a_signal_is_started_again(tmp_path):
    """kill -9 (or the OOM killer) of the companion alone: the serve went on without any
    reclaimer for the rest of its life, and the stamp filled. It is started again."""
    path = str(tmp_path / "st")
    Stamp.create(path, extent_size=MIB).close()
    with Companion(path) as c:
        assert c.proc is not None
        first = c.proc.pid
        os.kill(first, signal.SIGKILL)
        for _ in range(600):
            proc = c.proc
            if proc is not None and proc.pid != first:
                break
            time.sleep(0.05)
        assert proc is not None and proc.pid != first and not _gone(proc.pid) and c.restarts == 1
        before = _overwritten(str(tmp_path / "other"))  # (the same writes as below, for their size)
        with Stamp.open(path) as st:
            st.blobs.create("d", 2 * MIB)
            for i in range(6):
                st.blobs.write("d", 0, bytes([i + 1]) * (2 * MIB))
            for _ in range(600):  # the new one reclaims
                if st.stream.extent_bytes() < before / 2:
                    break
                time.sleep(0.05)
            assert st.stream.extent_bytes() < before / 2
    assert _gone(proc.pid) and c.stats["rounds"] >= 1
