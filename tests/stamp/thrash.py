"""The processes of the thrash campaign (test_thrash.py), and the journal
rules the campaign checks them by.

Each process runs until it is killed (kill -9, at any instant). A writer
owns one blob and journals every call: `I seq op start count` before it,
`A seq` after it returns (acknowledged), `F seq` if it raised a StampError
(refused: a full disk, too few nodes). Page contents name their writer,
operation and page, so any page read back says which operation wrote it.
The snapshotter takes snapshots, saves each one's contents as read right
after taking it (then journals `S blob id`), checks the diff from the
previous one against both contents (`X ...` for each thing it gets wrong)
and deletes old ones (`D blob id` once the call returned); the collector
runs continuous reclamation (stamp.reclaim) and plain gc rounds. Anything
but a StampError ends a process with a traceback: the campaign fails it.

    python -m tests.stamp.thrash writer STAMP INDEX SEED JOURNAL
    python -m tests.stamp.thrash snapshotter STAMP SEED JOURNAL SNAPDIR BLOBS...
    python -m tests.stamp.thrash collector STAMP
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import sys
import time

from stamp import Stamp, StampError
from stamp.gc import collect
from stamp.pageblob import Diff
from stamp.reclaim import Policy, Reclaimer

PAGE = 512
PAGES = 2048  # each writer's blob: 1 MiB
SIZE = PAGES * PAGE
MAX_OP = 32  # pages per operation
KEEP_SNAPSHOTS = 4


def blob_name(index: int) -> str:
    return f"w{index}"


def page_bytes(writer: int, seq: int, page: int) -> bytes:
    return struct.pack("<IIQ", writer + 1, seq, page) * (PAGE // 16)


def payload(writer: int, seq: int, start: int, count: int) -> bytes:
    return b"".join(page_bytes(writer, seq, start + k) for k in range(count))


def diff_misses(diff: Diff, before: bytes, after: bytes) -> list[str]:
    """What a diff between two snapshots with these contents gets wrong: a
    page that differs but is not listed, or one listed as cleared that holds
    data."""
    covered = bytearray(PAGES)
    for off, n in diff.written + diff.cleared:
        covered[off // PAGE:(off + n) // PAGE] = b"\1" * (n // PAGE)
    wrong = [f"page {p} changed, not in the diff" for p in range(PAGES)
             if not covered[p] and before[p * PAGE:(p + 1) * PAGE] != after[p * PAGE:(p + 1) * PAGE]]
    return wrong + [f"bytes {off}+{n} listed as cleared hold data" for off, n in diff.cleared
                    if after[off:off + n] != bytes(n)]


def _journal(fd: int, line: str) -> None:
    os.write(fd, line.encode() + b"\n")  # O_APPEND, page cache: survives kill -9 of this process


def writer(path: str, index: int, seed: int, journal: str) -> None:
    rng = random.Random(seed)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _journal(fd, "")  # ends a line a killed predecessor may have left cut
    st = Stamp.open(path)
    blob = blob_name(index)
    for i in range(10**9):
        seq = seed * 1_000_000 + i  # seeds differ per incarnation: seqs never repeat
        start = rng.randrange(PAGES)
        count = min(rng.randrange(1, MAX_OP + 1), PAGES - start)
        op = "W" if rng.random() < 0.85 else "C"
        _journal(fd, f"I {seq} {op} {start} {count}")
        try:
            if op == "W":
                st.blobs.write(blob, start * PAGE, payload(index, seq, start, count))
            else:
                st.blobs.clear(blob, start * PAGE, count * PAGE)
        except StampError:
            _journal(fd, f"F {seq}")
            time.sleep(0.02)
            continue
        _journal(fd, f"A {seq}")


def snapshotter(path: str, seed: int, journal: str, snapdir: str, blobs: list[str]) -> None:
    rng = random.Random(seed)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    st = Stamp.open(path)
    while True:
        blob = rng.choice(blobs)
        try:
            snaps = st.blobs.snapshots(blob)
            if len(snaps) > KEEP_SNAPSHOTS:
                victim = snaps[rng.randrange(len(snaps) - 1)].id  # never the newest
                st.blobs.delete_snapshot(blob, victim)
                _journal(fd, f"D {blob} {victim}")
            else:
                snap = st.blobs.snapshot(blob)
                data = st.blobs.read(blob, 0, SIZE, snapshot=snap.id)
                tmp = os.path.join(snapdir, f"{blob}.{snap.id}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, os.path.join(snapdir, f"{blob}.{snap.id}"))
                _journal(fd, f"S {blob} {snap.id}")
                if snaps and os.path.exists(os.path.join(snapdir, f"{blob}.{snaps[-1].id}")):
                    with open(os.path.join(snapdir, f"{blob}.{snaps[-1].id}"), "rb") as f:
                        before = f.read()
                    for wrong in diff_misses(st.blobs.diff(blob, snaps[-1].id, snap.id), before, data):
                        _journal(fd, f"X {blob} {snaps[-1].id}..{snap.id}: {wrong}")
        except StampError:
            pass
        time.sleep(rng.uniform(0.01, 0.05))


def collector(path: str) -> None:
    """Continuous reclamation (stamp.reclaim), with a policy far more eager
    than the default: nearly every partly dead extent is compacted, rounds
    run back to back, and every other round is a plain `stamp gc` round."""
    st = Stamp.open(path)
    r = Reclaimer(st, Policy(target=1.02, trigger=1.02, compact_below=0.9, max_move=2 << 20, interval=0,
                             recount=0.1), publish=True)  # writers wait for it (pressure.py)
    for n in itertools.count():
        try:
            if n % 2:
                collect(st)
            else:
                r.step()
        except StampError:
            pass
        time.sleep(0.02)


def main(argv: list[str]) -> None:
    role, path = argv[0], argv[1]
    if role == "writer":
        writer(path, int(argv[2]), int(argv[3]), argv[4])
    elif role == "snapshotter":
        snapshotter(path, int(argv[2]), argv[3], argv[4], argv[5:])
    elif role == "collector":
        collector(path)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
