#!/usr/bin/env python3
"""Real fio over NBD: our export against qemu-nbd and nbdkit, then every tier.

  .venv/bin/python tools/fio_tiers.py [--seconds 5] [--qd 32] [--tiers S10 P10 P30] [--json F] [--png F]

Part 1, the uncapped export (vhd serve) beside its peers on the same image,
in the same run, 4 KiB at queue depth --qd:
  randread on a fixed VHD: ours vs qemu-nbd -f vpc and nbdkit file (goal >= 1.3x qemu-nbd)
  randwrite on a dynamic VHD (fresh, so blocks are allocated as fio writes):
  ours vs qemu-nbd -f vpc (goal >= 5x qemu-nbd)
Part 2, each tier attached to a VM and served by hostcache serve (cache None),
fio randread and randwrite, beside the published limit.
With --ceiling, instead: the uncapped 4 KiB ceiling of hostcache serve at 1
and 2 worker processes (measure_ceiling), alternated --rounds times, medians:
  .venv/bin/python tools/fio_tiers.py --ceiling [--seconds 5] [--rounds 3] [--jobs 4]
Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import vhd  # noqa: E402
from hostcache.boot import make_boot_sector  # noqa: E402
from hostcache.host import Host  # noqa: E402
from hostcache.tiers import disk_limits  # noqa: E402
from stamp import Stamp  # noqa: E402
from stamp.disks import Disks  # noqa: E402

MIB = 1 << 20
PY = sys.executable
TIERS = {"S10": ("Standard_LRS", 128), "E10": ("StandardSSD_LRS", 128), "P10": ("Premium_LRS", 128),
         "P30": ("Premium_LRS", 1024), "P40": ("Premium_LRS", 2048)}


def fio(uri: str, rw: str, qd: int, seconds: float, size: str = "256M") -> float:
    out = subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
                          f"--iodepth={qd}", f"--size={size}", f"--runtime={seconds}", "--time_based",
                          "--output-format=json"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


def start(cmd: list[str], sock: str, json_line: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if json_line:
        proc.stdout.readline()  # type: ignore[union-attr]
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def peers(work: str, a: argparse.Namespace) -> list[dict]:
    rows = []
    fixed = os.path.join(work, "fixed.vhd")
    with vhd.create(fixed, 1024 * MIB, type="fixed") as img:
        chunk = os.urandom(4 * MIB)
        for o in range(0, 1024 * MIB, 4 * MIB):
            img.write(o, chunk)
    results = {}
    for name, cmd, sock, js in (
            ("ours", [PY, "-m", "vhd", "serve", fixed, "--socket", f"{work}/o.sock", "--read-only"],
             f"{work}/o.sock", True),
            ("qemu-nbd", ["qemu-nbd", "-f", "vpc", "-r", "-t", "-k", f"{work}/q.sock", fixed], f"{work}/q.sock", False),
            ("nbdkit file", ["nbdkit", "-f", "-r", "-U", f"{work}/k.sock", "file", fixed], f"{work}/k.sock", False)):
        proc = start(cmd, sock, js)
        uri = f"nbd+unix:///{'fixed' if name == 'ours' else ''}?socket={sock}"
        results[name] = fio(uri, "randread", a.qd, a.seconds)
        stop(proc)
    for peer in ("qemu-nbd", "nbdkit file"):
        rows.append({"test": f"fixed VHD 4K randread QD{a.qd}", "ours": results["ours"], "peer": results[peer],
                     "peer_name": peer, "unit": "IOPS", "ratio": results["ours"] / results[peer],
                     "goal": 1.3 if peer == "qemu-nbd" else None})
    writes = {}
    for name in ("ours", "qemu-nbd"):
        dyn = os.path.join(work, f"dyn-{name}.vhd")
        vhd.create(dyn, 1024 * MIB).close()
        if name == "ours":
            proc = start([PY, "-m", "vhd", "serve", dyn, "--socket", f"{work}/od.sock"], f"{work}/od.sock")
            uri = f"nbd+unix:///dyn-ours?socket={work}/od.sock"
        else:
            proc = start(["qemu-nbd", "-f", "vpc", "-t", "-k", f"{work}/qd.sock", dyn], f"{work}/qd.sock", False)
            uri = f"nbd+unix:///?socket={work}/qd.sock"
        writes[name] = fio(uri, "randwrite", a.qd, a.seconds)
        stop(proc)
    rows.append({"test": f"dynamic VHD 4K randwrite QD{a.qd}", "ours": writes["ours"], "peer": writes["qemu-nbd"],
                 "peer_name": "qemu-nbd", "unit": "IOPS", "ratio": writes["ours"] / writes["qemu-nbd"], "goal": 5.0})
    return rows


def tiers(work: str, a: argparse.Namespace) -> list[dict]:
    with vhd.create(os.path.join(work, "img.vhd"), 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    with Stamp.create(os.path.join(work, "st")) as st:
        d = Disks(st)
        d.create_image("img", path=os.path.join(work, "img.vhd"))
        for t in a.tiers:
            d.create_empty(t.lower(), TIERS[t][1], TIERS[t][0])
    with Host.create(os.path.join(work, "host"), os.path.join(work, "st")) as h:
        h.create_vm("vm", "D8s_v3", "img")
        for lun, t in enumerate(a.tiers):
            h.attach("vm", t.lower(), lun, "None")
    sock = f"{work}/h.sock"
    proc = start([PY, "-m", "hostcache", "--host", os.path.join(work, "host"), "serve", "vm", "--socket", sock], sock)
    rows = []
    try:
        for lun, t in enumerate(a.tiers):
            lim = disk_limits(*TIERS[t])
            limit = lim.burst_iops if lim.burst.value == "credit" else lim.iops
            for rw in ("randread", "randwrite"):
                iops = fio(f"nbd+unix:///lun{lun}?socket={sock}", rw, 16, a.seconds, "64M")
                rows.append({"test": f"{t} 4K {rw} QD16 via hostcache serve", "ours": iops, "peer": limit,
                             "peer_name": "published limit", "unit": "IOPS", "ratio": iops / limit, "goal": None})
    finally:
        stop(proc)
    return rows


CEILING_VM, CEILING_DISK = "Standard_D192s_v6", ("UltraSSD_LRS", 1024)  # 400,400 and 400,000 IOPS: far above the path


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def measure_ceiling(workers: int = 1, seconds: float = 5, jobs: int = 4, qd: int = 16) -> dict[str, float]:
    """The uncapped 4 KiB ceiling of `hostcache serve --workers N`: IOPS of fio
    randwrite then randread with `jobs` jobs (one NBD connection each, on 64 MiB
    regions of their own) at queue depth `qd`, on an Ultra disk (cache None) of
    a VM whose limits are far above what the emulator does, so the path, not the
    throttle, is what is measured. A fresh stamp and host in a folder of its own.
    Also, per rw: the serving processes' CPU microseconds per I/O and the cores
    they kept busy (CPU seconds per second), which a shared machine's load does
    not move as it moves IOPS."""
    work = tempfile.mkdtemp(prefix="fio-ceiling-", dir="/var/tmp")
    try:
        with vhd.create(os.path.join(work, "img.vhd"), 32 * MIB, type="fixed") as img:
            img.write(0, make_boot_sector(2048, 60000))
        with Stamp.create(os.path.join(work, "st")) as st:
            d = Disks(st)
            d.create_image("img", path=os.path.join(work, "img.vhd"))
            d.create_empty("ultra", CEILING_DISK[1], CEILING_DISK[0])
        host = os.path.join(work, "host")
        with Host.create(host, os.path.join(work, "st")) as h:
            h.create_vm("vm", CEILING_VM, "img")
            h.attach("vm", "ultra", 0, "None")
        sock = f"{work}/c.sock"
        proc = subprocess.Popen([PY, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0", "--workers",
                                 str(workers), "--socket", sock], stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            pids = ready.get("workers", [proc.pid])
            out = {}
            for rw in ("randwrite", "randread"):  # written first: the reads find data
                cpu, t0 = _cpu_seconds(pids), time.monotonic()
                res = subprocess.run(["fio", "--name=c", "--ioengine=nbd", f"--uri=nbd+unix:///lun0?socket={sock}",
                                      f"--rw={rw}", "--bs=4k", f"--iodepth={qd}", f"--numjobs={jobs}", "--size=64M",
                                      "--offset_increment=64M", f"--runtime={seconds}", "--time_based",
                                      "--group_reporting", "--output-format=json"],
                                     capture_output=True, text=True, check=True).stdout
                job = json.loads(res[res.index("{"):])["jobs"][0]
                side = job["read" if rw == "randread" else "write"]
                out[rw] = float(side["iops"])
                used, wall = _cpu_seconds(pids) - cpu, time.monotonic() - t0
                out[f"{rw}_cpu_us_per_io"] = used / max(1, side["total_ios"]) * 1e6
                out[f"{rw}_cores"] = used / wall
            return out
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ceiling_rows(a: argparse.Namespace) -> list[dict]:
    """1 and 2 workers alternated a.rounds times (the machine is shared): medians."""
    import statistics

    got: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(a.rounds):
        for workers in (1, 2):
            got[workers].append(measure_ceiling(workers, a.seconds, a.jobs))
    rows = []
    for rw in ("randread", "randwrite"):
        one, two = (statistics.median(r[rw] for r in got[w]) for w in (1, 2))
        rows.append({"test": f"hostcache serve 4K {rw}, {a.jobs} fio jobs QD16, 2 workers", "ours": two,
                     "peer": one, "peer_name": "1 worker", "unit": "IOPS", "ratio": two / one, "goal": None})
        for what, unit in (("cpu_us_per_io", "us"), ("cores", "")):
            one, two = (statistics.median(r[f"{rw}_{what}"] for r in got[w]) for w in (1, 2))
            label = "server CPU per I/O" if what == "cpu_us_per_io" else "cores the server kept busy"
            print(f"{rw:>10} {label}: 1 worker {one:.2f}{unit}, 2 workers {two:.2f}{unit}")
    return rows


def main() -> int:
    from benchtable import show

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--tiers", nargs="+", default=["S10", "P10", "P30"], choices=list(TIERS))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--png", help="draw the tiers' measured IOPS beside their published limits here")
    ap.add_argument("--ceiling", action="store_true", help="only the uncapped ceiling at 1 and 2 workers")
    ap.add_argument("--rounds", type=int, default=3, help="with --ceiling: 1 and 2 workers alternated this often")
    ap.add_argument("--jobs", type=int, default=4, help="with --ceiling: fio jobs (NBD connections)")
    a = ap.parse_args()
    if a.ceiling:
        rows = ceiling_rows(a)
        show(rows)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
    for tool in ("fio", "qemu-nbd", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"fio_tiers: {tool} is missing (bash tools/run.sh test installs it)", file=sys.stderr)
            return 1
    work = tempfile.mkdtemp(prefix="fio-tiers-", dir="/var/tmp")
    try:
        rows = peers(work, a) + tiers(work, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    if a.png:
        from charts import bars

        tier_rows = [r for r in rows if "hostcache serve" in r["test"]]
        print(bars([r["test"].split(" QD")[0] for r in tier_rows],
                   {"fio over NBD": [r["ours"] for r in tier_rows],
                    "published limit": [r["peer"] for r in tier_rows]},
                   "IOPS", "diskstamp: fio by tier through hostcache serve", a.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
