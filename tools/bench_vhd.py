#!/usr/bin/env python3
"""Benchmark the vhd data path against its peers, in one run, as ratios.

  .venv/bin/python tools/bench_vhd.py [--size-mib 1024] [--ops 200000] [--json]

Rows: 4 KiB random read and write IOPS on a fixed and a fully allocated
dynamic image, each against raw os.pread/os.pwrite on the same file (goal
>= 0.7x); 4 KiB random writes into a new differencing image, write-through
(metadata persisted before each write returns) against metadata kept until
the flush (goal >= 0.7x); converting a raw file (half zeros) to a dynamic VHD against
`qemu-img convert -O vpc -o subformat=dynamic` (goal: no slower, ratio >= 1).
Files live in --dir (default: a temporary folder under /var/tmp); the page
cache is warm for both sides of each pair. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from benchtable import show  # noqa: E402

import vhd  # noqa: E402

KIB, MIB = 1024, 1024 * 1024


def offsets(n: int, size: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    blocks = size // (4 * KIB)
    return [rng.randrange(blocks) * 4 * KIB for _ in range(n)]


def rate(fn, offs: list[int]) -> float:
    t = time.perf_counter()
    fn(offs)
    return len(offs) / (time.perf_counter() - t)


def raw_read(path: str, data_offset: int):
    fd = os.open(path, os.O_RDONLY)

    def go(offs):
        pread = os.pread
        for o in offs:
            pread(fd, 4096, o + data_offset)
    return go, lambda: os.close(fd)


def raw_write(path: str, data_offset: int):
    fd = os.open(path, os.O_RDWR)
    buf = os.urandom(4096)

    def go(offs):
        pwrite = os.pwrite
        for o in offs:
            pwrite(fd, buf, o + data_offset)
    return go, lambda: os.close(fd)


def img_read(img):
    def go(offs):
        read = img.read
        for o in offs:
            read(o, 4096)
    return go


def img_write(img):
    buf = os.urandom(4096)

    def go(offs):
        write = img.write
        for o in offs:
            write(o, buf)
    return go


def best_of(n: int, fn, offs) -> float:
    return max(rate(fn, offs) for _ in range(n))


def io_rows(work: str, size: int, ops: int) -> list[dict]:
    rows = []
    offs = offsets(ops, size)
    for kind in ("fixed", "dynamic"):
        path = os.path.join(work, f"bench-{kind}.vhd")
        img = vhd.create(path, size, type=kind)
        chunk = os.urandom(MIB)
        for o in range(0, size, MIB):  # fully allocated, and in the page cache
            img.write(o, chunk)
        img.flush()
        img.close()
        img = vhd.open(path, writable=True)
        if kind == "fixed":
            # the same bytes of the same file: the data region starts at 0
            base_of = {o: o for o in offs}
        else:
            base_of = {o: img.bat[o // img.block_size] * 512 + img.bitmap_size + o % img.block_size for o in offs}
        phys = [base_of[o] for o in offs]
        for op, ours, peer in (("randread", img_read(img), raw_read), ("randwrite", img_write(img), raw_write)):
            peer_fn, peer_close = peer(path, 0)
            ours_rate = best_of(3, ours, offs)
            peer_rate = best_of(3, peer_fn, phys)
            peer_close()
            rows.append({"test": f"4K {op} {kind}", "ours": ours_rate, "peer": peer_rate,
                         "peer_name": "os.p" + ("read" if op == "randread" else "write"),
                         "unit": "IOPS", "ratio": ours_rate / peer_rate, "goal": 0.7})
        img.close()
        os.unlink(path)
    return rows


def write_through_rows(work: str, size: int, ops: int) -> list[dict]:
    """4 KiB random writes into a new differencing image (blocks allocated
    and bitmap bits set as they go), then a flush: write-through (each
    write's bitmap and BAT entry written before it returns) against the same
    image keeping them until the flush. Neither side syncs per allocation
    (durable=False), so the row shows the cost of the extra metadata writes."""
    parent = os.path.join(work, "wt-parent.vhd")
    vhd.create(parent, size, type="fixed").close()
    offs = offsets(ops, size, seed=2)
    rates = {}
    for through in (True, False):
        best = 0.0
        for _ in range(3):
            child = os.path.join(work, "wt-child.vhd")
            img = vhd.create_differencing(child, parent, durable=False)
            img.write_through = through
            go = img_write(img)
            t = time.perf_counter()
            go(offs)
            img.flush()
            best = max(best, len(offs) / (time.perf_counter() - t))
            img.close()
            os.unlink(child)
        rates[through] = best
    os.unlink(parent)
    return [{"test": "4K randwrite differencing, write-through", "ours": rates[True], "peer": rates[False],
             "peer_name": "metadata at flush", "unit": "IOPS", "ratio": rates[True] / rates[False], "goal": 0.7}]


def convert_rows(work: str, size: int) -> list[dict]:
    """Two honest pairs: neither side syncs (qemu-img's default is -t unsafe),
    and both sync the result (ours by default, qemu-img with -t writeback)."""
    raw = os.path.join(work, "half-zeros.raw")
    with open(raw, "wb") as f:  # alternate 4 MiB of data and 4 MiB of zeros: half zeros
        data, zeros = os.urandom(4 * MIB), bytes(4 * MIB)
        for i in range(size // (4 * MIB)):
            f.write(data if i % 2 == 0 else zeros)
    subprocess.run(["cat", raw], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    rows = []
    for sync, qemu_cache in ((False, "unsafe"), (True, "writeback")):
        ours_t, qemu_t = [], []
        for _ in range(3):
            out = os.path.join(work, "ours.vhd")
            subprocess.run(["sync"], check=True)
            t = time.perf_counter()
            vhd.convert(raw, out, "dynamic", show_progress=False, sync=sync)
            ours_t.append(time.perf_counter() - t)
            os.unlink(out)
            out = os.path.join(work, "qemu.vhd")
            subprocess.run(["sync"], check=True)
            t = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-t", qemu_cache, "-f", "raw", "-O", "vpc",
                            "-o", "subformat=dynamic,force_size=on", raw, out], check=True)
            qemu_t.append(time.perf_counter() - t)
            os.unlink(out)
        ours, qemu = min(ours_t), min(qemu_t)
        how = "synced" if sync else "no sync"
        rows.append({"test": f"convert {size // MIB} MiB raw (half zeros) -> dynamic, {how}", "ours": ours,
                     "peer": qemu, "peer_name": f"qemu-img -t {qemu_cache}", "unit": "s",
                     "ratio": qemu / ours, "goal": 1.0})
    os.unlink(raw)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="image and raw file size (default 1024)")
    ap.add_argument("--ops", type=int, default=100_000, help="random 4 KiB operations per measurement")
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary one in /var/tmp)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    if shutil.which("qemu-img") is None:
        print("bench_vhd: qemu-img is missing (bash tools/run.sh test installs it)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="bench-vhd-", dir=a.dir or "/var/tmp")
    try:
        size = a.size_mib * MIB
        rows = io_rows(work, size, a.ops) + write_through_rows(work, size, a.ops) + convert_rows(work, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(rows, a.json)
    return 0
    print(f"{'test':<58} {'ours':>12} {'peer':>12}  {'peer is':<18} {'ratio':>6}  goal")
    for r in rows:
        fmt = "{:>12.0f}" if r["unit"] == "IOPS" else "{:>11.2f}s"
        print(f"{r['test']:<58} {fmt.format(r['ours'])} {fmt.format(r['peer'])}  {r['peer_name']:<18} "
              f"{r['ratio']:>5.2f}x  >= {r['goal']}x {'ok' if r['ratio'] >= r['goal'] else 'MISSED'}")
    print("ratio: ours/peer for IOPS, peer/ours for time (higher is better for us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
