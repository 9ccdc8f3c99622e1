"""The thrash campaign: a stamp under every fault at once, in the style of
Ceph's thrash tests.

Each round runs, in separate processes, 3 writers (one blob each, journaled:
tests/stamp/thrash.py), a snapshotter (snapshots, diffs checked against
their contents, deletion) and a collector (continuous reclamation, stamp.reclaim, and gc rounds), on a
stamp in a small tmpfs, while this process injects at
random moments: kill -9 of any of them (restarted at once), bit flips at any
byte of any replica file (file headers, record headers, checksums, data,
tails; at most one replica of an extent per round, so that a good copy is
left with one node faulty), and one node fault per round: down, lost (its
files deleted), or a full filesystem. Then everything is killed, the node
fault is undone and the stamp reopened, repaired and scrubbed, and:
- `check` is clean (every byte of every replica verifies, 3 replicas each);
- every page holds what the last acknowledged operation on it wrote (or,
  for an operation left unacknowledged by a kill or refused, either value);
- every snapshot reads as it did right after it was taken, and the diff of
  two consecutive snapshots covers every page that differs between them;
- the metadata stays under a fixed size.

Short by default (3 rounds of 2 s: lost, full, down); DISKSTAMP_SLOW=1 runs
25 rounds of 6 s; DISKSTAMP_THRASH_SEED picks another campaign.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from stamp import Stamp
from tests.stamp import thrash

from ..conftest import tmpfs as mount_tmpfs

SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))
ROUNDS = 25 if SLOW else 3
ROUND_SECONDS = 6.0 if SLOW else 2.0
NODE_FAULTS = ("lost", "full", "down", "none")  # round r has NODE_FAULTS[r % 4]
WRITERS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
META_BOUND = 64 * MIB  # data.mdb's used pages after any round


@pytest.fixture
def tmpfs(tmp_path):
    with mount_tmpfs(tmp_path / "fs", 256, "the thrash campaign") as mnt:
        yield mnt


@dataclass
class Campaign:
    stamp: str
    work: str
    rng: random.Random
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    seeds: int = 0
    kills: int = 0
    flips: int = 0
    faults: list[str] = field(default_factory=list)

    def journal(self, name: str) -> str:
        return os.path.join(self.work, f"{name}.journal")

    def start(self, name: str) -> None:
        self.seeds += 1
        if name.startswith("w"):
            args = ["writer", self.stamp, name[1:], str(self.seeds), self.journal(name)]
        elif name == "snapshotter":
            args = ["snapshotter", self.stamp, str(self.seeds), self.journal(name), self.snapdir,
                    *(thrash.blob_name(i) for i in range(WRITERS))]
        else:
            args = ["collector", self.stamp]
        err = open(os.path.join(self.work, f"{name}.{self.seeds}.err"), "wb")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "tests.stamp.thrash", *args],
                                            cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL)
        err.close()

    @property
    def snapdir(self) -> str:
        return os.path.join(self.work, "snaps")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is not None:  # it ended by itself: a traceback, which the campaign fails
            errs = sorted(f for f in os.listdir(self.work) if f.endswith(".err"))
            tails = {f: open(os.path.join(self.work, f)).read()[-2000:] for f in errs}
            pytest.fail(f"{name} exited by itself ({proc.returncode}): {[t for t in tails.values() if t]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.kills += 1


def flip_somewhere(c: Campaign, flipped: set[int]) -> None:
    """One byte anywhere in one replica of an extent not flipped this round."""
    nodes = os.path.join(c.stamp, "nodes")
    files = [(n, f) for n in sorted(os.listdir(nodes)) if os.path.isdir(os.path.join(nodes, n))
             for f in os.listdir(os.path.join(nodes, n, "extents"))]
    files = [(n, f) for n, f in files if int(f[:16], 16) not in flipped]
    if not files:
        return
    node, name = c.rng.choice(files)
    path = os.path.join(nodes, node, "extents", name)
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return
            at = c.rng.randrange(size)
            b = os.pread(f.fileno(), 1, at)
            os.pwrite(f.fileno(), bytes([b[0] ^ (1 << c.rng.randrange(8))]), at)
    except FileNotFoundError:
        return  # gc deleted it meanwhile
    flipped.add(int(name[:16], 16))
    c.flips += 1


def node_fault(c: Campaign, st: Stamp, kind: str, mnt: str) -> str | None:
    """Apply one node fault; returns the node touched (None for a full filesystem)."""
    if kind == "full":
        fill(mnt)
        return None
    node = f"node-{c.rng.randrange(6):02d}"
    st.inject("node-down" if kind == "down" else "node-lost", node)
    return node


def fill(mnt: str) -> None:
    """Take every free byte of the filesystem into the ballast file (again:
    the collector frees space as it reclaims, and the filesystem must stay
    full for the round, so that writers are refused)."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(os.path.join(mnt, "ballast"), "ab") as f:
        try:
            os.posix_fallocate(f.fileno(), f.tell(), max(free, 4096))
        except OSError:
            pass


def undo_fault(st: Stamp, kind: str, node: str | None, mnt: str) -> None:
    if kind == "full":
        os.unlink(os.path.join(mnt, "ballast"))
    elif kind == "down":
        st.inject("node-up", node)
    elif kind == "lost":
        st.stream.rereplicate()  # the lost node's replicas made again elsewhere
        st.inject("node-replaced", node)


def run_round(c: Campaign, mnt: str, rnd: int) -> None:
    names = [thrash.blob_name(i) for i in range(WRITERS)] + ["snapshotter", "collector"]
    for name in names:
        c.start(name)
    kind = NODE_FAULTS[rnd % len(NODE_FAULTS)]
    node, applied, flipped = None, False, set()
    journals = [c.journal(name) for name in names if name != "collector"]
    sizes = [_size(j) for j in journals]
    start = time.monotonic()
    with Stamp.open(c.stamp) as st:  # the fault injector
        # The round lasts ROUND_SECONDS, and on a busy machine until every
        # journaled process has done something since the node fault (at most
        # a minute more). The node fault comes a third of the way in.
        while time.monotonic() < start + ROUND_SECONDS or (
                time.monotonic() < start + ROUND_SECONDS + 60
                and any(_size(j) <= n for j, n in zip(journals, sizes, strict=True))):
            time.sleep(c.rng.uniform(0.05, 0.25))
            if not applied and time.monotonic() > start + ROUND_SECONDS / 3:
                applied = True
                if kind != "none":
                    node = node_fault(c, st, kind, mnt)
                    c.faults.append(f"round {rnd}: {kind} {node or ''}".strip())
                sizes = [_size(j) for j in journals]
                continue
            if applied and kind == "full":
                fill(mnt)  # what the collector freed meanwhile
            if c.rng.random() < 0.4:
                victim = c.rng.choice(names)
                c.kill(victim)
                c.start(victim)
            else:
                flip_somewhere(c, flipped)
        for name in names:
            c.kill(name)
    with Stamp.open(c.stamp) as st:  # reopened: recovery seals what the dead left open
        if kind != "none":
            undo_fault(st, kind, node, mnt)
        st.stream.rereplicate()
        st.stream.scrub()


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def replay(journal: str) -> tuple[list[set[int]], int, int]:
    """Per page, the seqs it may hold (0: zeros); the acknowledged and refused counts."""
    allowed: list[set[int]] = [{0} for _ in range(thrash.PAGES)]
    ops: dict[int, tuple[str, int, int]] = {}
    acked = refused = 0
    if not os.path.exists(journal):
        return allowed, 0, 0
    with open(journal) as f:
        lines = f.read().split("\n")[:-1]  # a line cut by a kill has no newline yet
    for line in lines:
        if not line:
            continue
        kind, seq, *rest = line.split()
        if kind == "I":
            ops[int(seq)] = (rest[0], int(rest[1]), int(rest[2]))
            op, start, count = ops[int(seq)]
            for p in range(start, start + count):  # in flight: the new value is possible from now
                allowed[p].add(int(seq) if op == "W" else 0)
        elif kind == "A":
            op, start, count = ops.pop(int(seq))
            for p in range(start, start + count):
                allowed[p] = {int(seq) if op == "W" else 0}
            acked += 1
        elif kind == "F":  # refused: its pages keep both values possible
            refused += 1
    return allowed, acked, refused


def describe(st: Stamp, problems: list[str]) -> list[str]:
    """The extents named in check's problems, with each replica's size."""
    out = []
    for e in st.stream.all_extents():
        if any(f"extent {e.id}:" in p for p in problems):
            sizes = {st.stream.nodes[n].name: (st.stream.nodes[n].state.value,
                                               os.path.getsize(p) if os.path.exists(p := st.stream.nodes[n]
                                                                                    .extent_path(e.id)) else None)
                     for n in e.nodes}
            out.append(f"{e} replicas {sizes}")
    return out


def verify(c: Campaign, st: Stamp) -> dict[str, int]:
    report = st.check(deep=True)
    assert report.ok, (report.problems, describe(st, report.problems), c.faults)
    assert report.stats["bad_copies"] == 0 and report.stats["orphan_files"] == 0
    acked = refused = 0
    for i in range(WRITERS):
        allowed, n, r = replay(c.journal(thrash.blob_name(i)))
        acked, refused = acked + n, refused + r
        data = st.blobs.read(thrash.blob_name(i), 0, thrash.SIZE)
        for p, seqs in enumerate(allowed):
            got = data[p * thrash.PAGE:(p + 1) * thrash.PAGE]
            want = [bytes(thrash.PAGE) if s == 0 else thrash.page_bytes(i, s, p) for s in seqs]
            assert got in want, f"blob w{i} page {p}: holds {got[:16].hex()}, may hold seqs {sorted(seqs)}"
    snaps = verify_snapshots(c, st)
    used = (int(st.meta.env.info()["last_pgno"]) + 1) * int(st.meta.env.stat()["psize"])
    assert used < META_BOUND, f"metadata uses {used >> 20} MiB"
    lines = open(c.journal("snapshotter")).read().split("\n") if _size(c.journal("snapshotter")) else []
    assert not [line for line in lines if line.startswith("X ")]  # the snapshotter's diff checks
    taken = sum(line.startswith("S ") for line in lines)
    return {"acked": acked, "refused": refused, "taken": taken, "snapshots": snaps, "meta_mib": used >> 20}


def verify_snapshots(c: Campaign, st: Stamp) -> int:
    checked = 0
    for i in range(WRITERS):
        blob = thrash.blob_name(i)
        saved = {}
        for snap in st.blobs.snapshots(blob):
            path = os.path.join(c.snapdir, f"{blob}.{snap.id}")
            if os.path.exists(path):  # else taken by a snapshotter killed before it saved it
                saved[snap.id] = open(path, "rb").read()
                assert st.blobs.read(blob, 0, thrash.SIZE, snapshot=snap.id) == saved[snap.id], snap.id
                checked += 1
        ids = list(saved)
        for a, b in zip(ids, ids[1:], strict=False):
            assert not thrash.diff_misses(st.blobs.diff(blob, a, b), saved[a], saved[b]), (a, b)
    return checked


def test_thrash(tmpfs, tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(os.path.join(work, "snaps"))
    c = Campaign(os.path.join(tmpfs, "st"), work, random.Random(int(os.environ.get("DISKSTAMP_THRASH_SEED", "10"))))
    with Stamp.create(c.stamp, extent_size=MIB) as st:
        for i in range(WRITERS):
            st.blobs.create(thrash.blob_name(i), thrash.SIZE)
    results = []
    try:
        for rnd in range(ROUNDS):
            run_round(c, tmpfs, rnd)
            with Stamp.open(c.stamp) as st:
                results.append(verify(c, st))
    finally:
        for proc in c.procs.values():  # a round that failed midway leaves none running
            proc.kill()
            proc.wait(timeout=30)
    last = results[-1]
    print(f"thrash: {ROUNDS} rounds, {last['acked']} acknowledged writes and clears, {last['refused']} refused, "
          f"{last['taken']} snapshots taken, {c.kills} kill -9, {c.flips} bit flips, faults {c.faults}, "
          f"snapshots checked {[r['snapshots'] for r in results]}, metadata MiB {[r['meta_mib'] for r in results]}")
    assert last["acked"] > 0 and last["taken"] > 0 and c.kills > 0 and c.flips > 0
    assert last["refused"] > 0  # the full filesystem round refused writes, cleanly
