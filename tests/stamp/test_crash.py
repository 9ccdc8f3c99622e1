"""Kill -9 at random moments: no acknowledged write is lost, no snapshot
changes, and the stamp checks clean after the dead writer's extent is sealed.

The child runs a deterministic schedule of writes, clears and snapshots and
prints a line after each one returns (its acknowledgement). The parent
replays the schedule as a model: every page holds its value after the last
acknowledged operation, except pages of the one operation in flight, which
may hold either value.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from stamp import Stamp
from stamp.stream import process_start

PAGES = 256
PAGE = 512

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from stamp import Stamp
    from tests.stamp.test_crash import schedule, payload
    st = Stamp.open(sys.argv[1])
    for i, op in enumerate(schedule(int(sys.argv[2]))):
        if op[0] == "write":
            st.blobs.write("d", op[1] * 512, payload(op))
            print("ack", i, flush=True)
        elif op[0] == "clear":
            st.blobs.clear("d", op[1] * 512, op[2] * 512)
            print("ack", i, flush=True)
        else:
            snap = st.blobs.snapshot("d")
            print("ack", i, snap.id, flush=True)
""")


def schedule(seed: int, n: int = 3000) -> list[tuple]:
    rng = random.Random(seed)
    ops: list[tuple] = []
    for i in range(n):
        r = rng.random()
        start = rng.randrange(PAGES)
        count = min(rng.randrange(1, 24), PAGES - start)
        if r < 0.75:
            ops.append(("write", start, count, i))
        elif r < 0.9:
            ops.append(("clear", start, count))
        else:
            ops.append(("snapshot",))
    return ops


def payload(op: tuple) -> bytes:
    _, start, count, i = op
    return b"".join(((i << 16) | (start + k)).to_bytes(4, "little") * 128 for k in range(count))


def apply(model: bytearray, op: tuple) -> None:
    if op[0] == "write":
        model[op[1] * PAGE:(op[1] + op[2]) * PAGE] = payload(op)
    elif op[0] == "clear":
        model[op[1] * PAGE:(op[1] + op[2]) * PAGE] = bytes(op[2] * PAGE)


ROUNDS = 40 if os.environ.get("DISKSTAMP_SLOW") else 6


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_kill_9_loses_nothing_acknowledged(tmp_path, round_):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = str(tmp_path / "st")
    Stamp.create(path, extent_size=1 << 20).close()
    with Stamp.open(path) as st:
        st.blobs.create("d", PAGES * PAGE)
    rng = random.Random(round_)
    ops = schedule(round_)
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, str(round_), root],
                             stdout=subprocess.PIPE, text=True)
    acked: list[str] = []
    stop_after = rng.randrange(5, 300)
    for line in child.stdout:  # type: ignore[union-attr]
        acked.append(line)
        if len(acked) >= stop_after:
            time.sleep(rng.random() * 0.003)
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    for line in child.stdout:  # type: ignore[union-attr]
        acked.append(line)  # acknowledged before the kill landed
    if acked and not acked[-1].endswith("\n"):
        acked.pop()  # the kill cut this acknowledgement short: its operation is the one in flight
    done = len(acked)
    assert done < len(ops), "the child finished before the kill: the round tested nothing"

    model = bytearray(PAGES * PAGE)
    snapshots: dict[str, bytes] = {}
    for i, line in enumerate(acked):
        parts = line.split()
        assert int(parts[1]) == i
        apply(model, ops[i])
        if ops[i][0] == "snapshot":
            snapshots[parts[2]] = bytes(model)
    inflight = bytearray(model)
    if done < len(ops):
        apply(inflight, ops[done])

    with Stamp.open(path) as st:
        report = st.check(deep=True)
        assert report.ok, report.problems
        live = st.blobs.read("d", 0, PAGES * PAGE)
        for p in range(PAGES):
            got = live[p * PAGE:(p + 1) * PAGE]
            assert got in (model[p * PAGE:(p + 1) * PAGE], inflight[p * PAGE:(p + 1) * PAGE]), f"page {p}"
        for sid, frozen in snapshots.items():
            assert st.blobs.read("d", 0, PAGES * PAGE, snapshot=sid) == frozen
        st.blobs.write("d", 0, b"\x01" * PAGE)  # and the stamp keeps working
        assert st.check(deep=False).ok


def test_an_extent_whose_creator_died_before_its_files_existed_is_dropped(tmp_path):
    """The crash the rounds above found once: metadata for a new extent was
    committed, one replica file was half made, then the process died."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", PAGES * PAGE)
        st.blobs.write("d", 0, b"k" * PAGE)
    with Stamp.open(path) as st:
        with st.meta.write() as txn:
            extent_id = st.meta.next_id(txn, "extent")
            st.meta.put_json(txn, "extents", extent_id.to_bytes(8, "big"),
                             {"nodes": [3, 4, 5], "state": "open", "length": 4096, "owner": 999999999})
        with open(st.stream.nodes[3].extent_path(extent_id), "wb") as f:
            f.write(b"DSEXTNT1")  # a torn file header; nodes 4 and 5 got nothing
    with Stamp.open(path) as st:
        assert extent_id not in {e.id for e in st.stream.all_extents()}
        assert not os.path.exists(st.stream.nodes[3].extent_path(extent_id))
        assert st.check(deep=True).ok
        assert st.blobs.read("d", 0, PAGE) == b"k" * PAGE


def test_an_extent_whose_owner_pid_was_reused_is_recovered(tmp_path):
    """The owner died and its pid now names another, live process: the
    extent is still recovered (an owner is its pid and its start time)."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", PAGES * PAGE)
        st.blobs.write("d", 0, b"r" * PAGE)
        e = st.stream._current
        assert e is not None and e.started == process_start(os.getpid())
        other = subprocess.Popen(["sleep", "60"])  # alive, with a pid of its own
        try:
            with st.meta.write() as txn:  # as if the owner had died and `other` got its pid
                st.meta.put_json(txn, "extents", e.id.to_bytes(8, "big"),
                                 {**e.to_json(), "owner": other.pid, "started": process_start(other.pid) - 1})
            st.stream._current = None
            with Stamp.open(path) as st2:
                assert st2.stream.extent(e.id, refresh=True).state == "sealed"
                assert st2.blobs.read("d", 0, PAGE) == b"r" * PAGE
                assert st2.check(deep=True).ok
        finally:
            other.kill()
            other.wait()
