"""Writer backpressure (stamp.pressure): a writer faster than the reclaimer
waits for it, within a bound; a reclaimer that cannot help holds nobody."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest

from stamp import Stamp
from stamp.pressure import RECORD_SIZE, Published, alive, pressed
from stamp.reclaim import Policy, Reclaimer

MIB = 1 << 20
SIZE = 4 * MIB
WRITE = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record(**kw: object) -> Published:
    base: dict[str, object] = dict(pid=os.getpid(), started=0, token=b"t" * 16, live=10 * MIB, slack=2 * MIB,
                                   ceiling=2.0, progress=0, futile_at=0)
    return Published(**{**base, **kw})  # type: ignore[arg-type]


def test_a_writer_waits_only_for_a_live_reclaimer_that_can_reclaim_over_its_ceiling():
    p = record()
    assert p.limit() == 22 * MIB
    assert not pressed(22 * MIB, p, alive=True)
    assert pressed(22 * MIB + 1, p, alive=True)
    assert not pressed(99 * MIB, p, alive=False)  # stopped or killed: holds nobody
    assert not pressed(99 * MIB, record(futile_at=99 * MIB), alive=True)  # nothing it may reclaim: writers go on
    assert pressed(99 * MIB + 1, record(futile_at=99 * MIB), alive=True)  # grown since: it runs again
    assert not pressed(99 * MIB, None, alive=True)  # no reclaimer ever ran


def test_the_record_round_trips_and_a_damaged_one_reads_as_no_reclaimer():
    p = record(progress=7, futile_at=5)
    raw = p.pack()
    assert len(raw) == RECORD_SIZE and Published.unpack(raw) == p
    for i in range(RECORD_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        assert Published.unpack(bytes(bad)) is None, i
    assert Published.unpack(raw[:-1]) is None and Published.unpack(bytes(RECORD_SIZE)) is None


def overwrite(st: Stamp, rng: random.Random, model: bytearray) -> None:
    off = rng.randrange(SIZE // WRITE) * WRITE
    data = rng.randbytes(WRITE)
    st.blobs.write("d", off, data)
    model[off:off + WRITE] = data


def test_a_writer_much_faster_than_its_reclaimer_is_held_under_the_ceiling(tmp_path):
    """The reclaimer thread runs a round only when the writer is waiting for
    it (a test hook): without backpressure it would never run and the extents
    would grow to 25 x the disk. With it, the writer waits at each check over
    the ceiling, and the extents stay under ceiling x live + slack, plus
    what a writer appends between two checks and one round's copies."""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(11), bytearray(SIZE)
    gate = st.blobs.pressure
    gate.patience = 600.0  # a loaded machine must not make the writer give up: progress is what counts
    turns = threading.Semaphore(0)
    gate.on_wait = turns.release  # one round per wait step of the writer, none otherwise
    policy = Policy(interval=0, max_move=MIB)
    r = Reclaimer(st, policy)
    r.pace = lambda: None if r.stats.censuses == 0 or done.is_set() else turns.acquire()  # first census: free
    done = threading.Event()
    worst = 0.0
    try:
        r.start()
        for _ in range(25 * SIZE // WRITE):
            overwrite(st, rng, model)
            live = st.blobs.used_bytes("d")
            extra = st.stream.extent_bytes() - (2.0 * live + 2 * MIB)
            worst = max(worst, extra)
            assert extra <= gate.every + WRITE + policy.max_move, (extra, gate.stats, r.stats.to_json())
    finally:
        done.set()
        turns.release()  # a round waiting for its turn
        r.stop()
    assert gate.stats.waits > 5 and gate.stats.gave_up == 0, gate.stats
    assert r.stats.total.bytes_freed > 40 * MIB
    assert st.blobs.read("d", 0, SIZE) == bytes(model) and st.check(deep=True).ok
    print(f"worst over the ceiling: {worst / MIB:.2f} MiB; {gate.stats.to_json()}; {r.stats.to_json()}")
    st.close()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_a_stuck_reclaimer_holds_a_writer_no_longer_than_the_patience(tmp_path):
    """A reclaimer thread that never finishes a round (stuck in its hook)
    makes no progress: each check over the ceiling waits PATIENCE (on a
    fake clock) and gives up, and every write completes."""
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(12), bytearray(SIZE)
    gate = st.blobs.pressure
    fake = FakeTime()
    gate.clock, gate.sleep, gate.patience = fake.clock, fake.sleep, 2.0
    release = threading.Event()
    r = Reclaimer(st, Policy(interval=0))
    r.pace = lambda: None if r.stats.censuses == 0 else release.wait()
    try:
        r.start()
        while r.stats.censuses == 0:  # its first census is published; every later round is stuck
            release.wait(0.01)
        for _ in range(8 * SIZE // WRITE):
            overwrite(st, rng, model)
    finally:
        release.set()
        r.stop()
    assert gate.stats.gave_up >= 3 and gate.stats.waits == gate.stats.gave_up, gate.stats
    assert gate.stats.longest <= gate.patience + 2 * gate.step, gate.stats
    assert st.blobs.read("d", 0, SIZE) == bytes(model) and st.check(deep=True).ok
    st.close()


def test_a_stopped_reclaimer_holds_nobody(tmp_path):
    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", SIZE)
    with Reclaimer(st, Policy(interval=0)) as r:
        while r.stats.censuses == 0:
            threading.Event().wait(0.01)
        p = st.blobs.pressure.published()
        assert p is not None and alive(p) and p.pid == os.getpid()
    assert st.blobs.pressure.published() is None
    st.close()


CHILD = """
import sys
from stamp import Stamp
from stamp.reclaim import Policy, Reclaimer
st = Stamp.open(sys.argv[1])
r = Reclaimer(st, Policy(interval=0), publish=True)
r.step()
print("published", flush=True)
sys.stdin.read()  # stays alive, publishing, until killed
"""


def test_writers_in_another_process_see_the_reclaimer_and_its_death(tmp_path):
    """The signal is the stamp's shared state: a reclaimer in another process
    (which then makes no progress) holds this process's writer for the
    patience at most; killed, it holds nobody."""
    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(13), bytearray(SIZE)
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert child.stdout is not None and child.stdout.readline() == "published\n"
        gate = st.blobs.pressure
        fake = FakeTime()
        gate.clock, gate.sleep, gate.patience = fake.clock, fake.sleep, 1.0
        p = gate.published()
        assert p is not None and p.pid == child.pid and alive(p)
        for _ in range(4 * SIZE // WRITE):
            overwrite(st, rng, model)
        assert gate.stats.gave_up >= 1, gate.stats  # it was there, and did not move
    finally:
        child.kill()
        child.wait()
    held = gate.stats.waits
    p = gate.published()
    assert p is not None and not alive(p)
    for _ in range(4 * SIZE // WRITE):
        overwrite(st, rng, model)
    assert gate.stats.waits == held  # a dead reclaimer holds nobody
    assert st.blobs.read("d", 0, SIZE) == bytes(model) and st.check(deep=True).ok
    st.close()


def test_a_reclaimer_whose_round_failed_holds_nobody(tmp_path, monkeypatch):
    """A round that fails (a full filesystem: compaction cannot append; too
    few nodes) frees nothing: writers must not wait the patience for it at
    every check. On a full filesystem they go on and are refused at once, as
    without a reclaimer (the stamp's thrash suite kills writers held longer
    than a round). Once the extents grow past where it failed, it runs again."""
    import stamp.reclaim as reclaim
    from stamp.errors import StampError

    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    st.blobs.create("d", SIZE)
    rng, model = random.Random(13), bytearray(SIZE)
    r = Reclaimer(st, Policy(interval=0), publish=True)
    r.step()  # a census (nothing written yet): published
    gate = st.blobs.pressure
    gate.patience = 0.0  # the writes below must not wait for the round that never comes
    for _ in range(8 * SIZE // WRITE):
        overwrite(st, rng, model)
    r.step()  # a real round: it compacts; the census sees the live bytes
    for _ in range(8 * SIZE // WRITE):
        overwrite(st, rng, model)
    extents = st.stream.extent_bytes()
    assert pressed(extents, gate.published(), alive=True)  # far over: a working reclaimer holds writers

    def fails(stamp: Stamp, choose: object) -> None:
        raise StampError("No space left on device")

    monkeypatch.setattr(reclaim, "collect", fails)
    with pytest.raises(StampError):
        r.step()
    assert not pressed(extents, gate.published(), alive=True)  # it can do nothing: nobody waits for it
    assert pressed(extents + 1, gate.published(), alive=True)  # grown since: it runs again
    st.close()
