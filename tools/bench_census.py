#!/usr/bin/env python3
"""What a gc round costs in CPU, and what its census does to a thread beside it.

  .venv/bin/python tools/bench_census.py [--pieces 65536] [--seconds 3]

Builds a stamp whose blob has --pieces index pieces (4 KiB writes), then
prints: the CPU and wall time of a round's two index scans (the census,
gc.references, and the verify scan) and of one compaction batch of
gc.COMPACT_BATCH compare-and-swaps (the work a round does holding the write
lock); and the latency of a "request" (four system calls that release the
GIL, as an event loop's recv, pread, send do) made in a loop for --seconds
with no census beside it, with a census thread in the same process (the
reclaimer thread `hostcache serve` once ran), and with a census in another
process (its companion now). Not a test: nothing asserts. The stamp goes
under /var/tmp and is removed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from stamp import Stamp, gc  # noqa: E402


def timed(f: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, this thread's CPU ms) of f()."""
    w, c = time.perf_counter(), time.thread_time()
    f()
    return (time.perf_counter() - w) * 1000, (time.thread_time() - c) * 1000


def scans(path: str, stop: threading.Event | None = None, ev: object = None) -> None:
    st = Stamp.open(path)
    flag = stop or ev
    while not flag.is_set():  # type: ignore[attr-defined]
        gc.references(st)
    st.close()


def requests(fd: int, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            os.pread(fd, 4096, 0)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.001)
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=65536, help="index pieces of the blob (default 65536)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of requests per case (default 3)")
    a = ap.parse_args()
    if a.pieces <= 0 or a.seconds <= 0:
        print("bench_census: --pieces and --seconds must be positive", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench-census-", dir="/var/tmp")
    try:
        path = os.path.join(work, "st")
        with Stamp.create(path) as st:
            st.blobs.create("d", a.pieces * 4096)
            data = os.urandom(4096)
            for i in range(a.pieces):
                st.blobs.write("d", i * 4096, data)
            for _ in range(3):
                w, c = timed(lambda: gc.references(st))
                print(f"census (gc.references) of {a.pieces} pieces: {w:.1f} ms wall, {c:.1f} ms CPU")
                w, c = timed(lambda: gc._referenced(st, {0}))
                print(f"verify scan: {w:.1f} ms wall, {c:.1f} ms CPU")
            pieces = [p for refs in gc.references(st).values() for p in refs]
            rng = random.Random(1)
            for _ in range(3):
                batch = rng.sample(pieces, min(gc.COMPACT_BATCH, len(pieces)))

                def cas(batch: list[gc.Ref] = batch) -> None:
                    with st.meta.write() as txn:
                        for table, key, raw in batch:
                            if txn.get(key, db=st.meta.db[table]) == raw:
                                txn.put(key, raw, db=st.meta.db[table])
                w, c = timed(cas)
                print(f"a batch of {len(batch)} compare-and-swaps: {w:.2f} ms wall, {c:.2f} ms CPU")
        fd = os.open(os.path.join(path, "stamp.json"), os.O_RDONLY)
        for case in ("no census", "census thread", "census process"):
            stop, ev = threading.Event(), multiprocessing.Event()
            th = threading.Thread(target=scans, args=(path, stop)) if case == "census thread" else None
            pr = multiprocessing.Process(target=scans, args=(path, None, ev)) if case == "census process" else None
            for x in (th, pr):
                if x is not None:
                    x.start()
            time.sleep(0.5)
            lat = requests(fd, a.seconds)
            stop.set()
            ev.set()
            for x in (th, pr):
                if x is not None:
                    x.join()
            print(f"{case}: {len(lat)} requests, median {lat[len(lat) // 2]:.3f} ms, 99.9th "
                  f"{lat[int(len(lat) * 0.999)]:.3f} ms, longest {lat[-1]:.3f} ms")
        os.close(fd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
