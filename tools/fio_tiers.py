#!/usr/bin/env python3
"""Real fio over NBD: our export against qemu-nbd and nbdkit, then every disk tier.

  .venv/bin/python tools/fio_tiers.py [--seconds 3] [--tiers P1 P40 Ultra-4000 | all] [--json F] [--png F]

Part 1, the uncapped export (vhd serve) beside its peers on the same image,
in the same run, 4 KiB at queue depth --qd (--no-peers skips it):
  randread on a fixed VHD: ours vs qemu-nbd -f vpc and nbdkit file (goal >= 1.3x qemu-nbd)
  randwrite on a dynamic VHD (fresh, so blocks are allocated as fio writes):
  ours vs qemu-nbd -f vpc (goal >= 5x qemu-nbd)
Part 2, the ceiling: what `hostcache serve` reaches with no limit in the
way (an Ultra disk of 400,000 IOPS and 10,000 MB/s on a VM size whose
limits are above that), 4 KiB and 64 KiB, random write and read.
Part 3, each tier attached (caching None) to the smallest VM size that does
not cap it, served by `hostcache serve`: 4 KiB and 64 KiB, random write and
read, each at the queue depth its latency and limit need (Little's law,
hostcache.measure), beside the published limit. A row is "ok" within 3% of
the limit, "ceiling-bound" when the limit is above 90% of the path's
ceiling measured in part 2 (this machine cannot show it), "over" or
"missed" otherwise. 64 KiB rows are in the disk type's MB/s (MiB/s for
Premium, Standard SSD and HDD; MB/s for Ultra and Premium SSD v2).
Bursting: each VM group runs on a fresh host, so every disk starts with a
full credit bucket (as a new disk does): P1-P20 and E1-E30 rows measure the
burst rate (their four rows use a few seconds of the 30 minutes a bucket
holds); P30 and up measure the provisioned rate (on-demand bursting is off).
The default run is a sample (each family's smallest, a bursting one, the
largest; Premium SSD v2 and Ultra at a few provisioned figures); --tiers all
runs every size and figure. Not a test: nothing asserts; --check exits 1
when a row is "over" or "missed".
With --ceiling, instead: the uncapped 4 KiB ceiling of hostcache serve at 1
and 2 worker processes (measure_workers), alternated --rounds times, medians:
  .venv/bin/python tools/fio_tiers.py --ceiling [--seconds 5] [--rounds 3] [--jobs 4]
With --remote, instead: the same uncapped 4 KiB ceiling (one worker) of a
host whose stamp is a folder beside one whose stamp it reaches only over
HTTP (`hostcache init --stamp URL` against `stamp serve` on 127.0.0.1),
alternated --rounds times, medians, with the ratio remote / local:
  .venv/bin/python tools/fio_tiers.py --remote [--seconds 5] [--rounds 3] [--jobs 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import vhd  # noqa: E402
from hostcache.boot import make_boot_sector  # noqa: E402
from hostcache.host import Host  # noqa: E402
from hostcache.measure import NoSizeFits, queue_depth, target, verdict, vm_for  # noqa: E402
from hostcache.tiers import BURST_SECONDS, MIB, Burst, DiskLimits, VmLimits, disk_limits, reference  # noqa: E402
from stamp import Stamp  # noqa: E402
from stamp.disks import Disks  # noqa: E402
from stamp.errors import StampError  # noqa: E402

PY = sys.executable
SIZES = (4096, 65536)  # bytes per I/O of every tier row
RWS = ("randwrite", "randread")  # writes first: the reads then read data, not unwritten pages
RAMP = 1.0  # seconds fio runs before it counts (the limiters' 50 ms tolerance, the connection)
REGION = "64M"  # the part of each disk fio uses
CEILING_QDS = (16, 64)  # the ceiling is the higher of the two: more outstanding I/Os can cost more than they gain


@dataclass(frozen=True)
class Tier:
    """A disk to measure: a size tier (P10) or a provisioned figure (Ultra-4000)."""

    name: str
    sku: str
    size_gib: int
    iops: int | None = None  # provisioned (Ultra, Premium SSD v2)
    mbps: float | None = None

    def limits(self) -> DiskLimits:
        return disk_limits(self.sku, self.size_gib, iops=self.iops, mbps=self.mbps)


def _sized(sku: str) -> list[Tier]:
    rows = sorted(reference()[sku]["sizes"].items(), key=lambda kv: kv[1]["disk_size_gib"])
    return [Tier(name, sku, int(row["disk_size_gib"])) for name, row in rows]


# Provisioned figures: IOPS, MB/s, on the smallest size that allows them (Ultra 1,000 IOPS per GiB,
# MB/s up to 0.25 per IOPS; Premium SSD v2 500 IOPS per GiB, MB/s up to 0.25 per IOPS)
PROVISIONED = [Tier("Ultra-4000", "UltraSSD_LRS", 4, 4000, 1000), Tier("Ultra-16000", "UltraSSD_LRS", 16, 16000, 4000),
               Tier("Ultra-80000", "UltraSSD_LRS", 80, 80000, 10000),
               Tier("Ultra-400000", "UltraSSD_LRS", 400, 400000, 10000),
               Tier("V2-3000", "PremiumV2_LRS", 8, 3000, 125), Tier("V2-20000", "PremiumV2_LRS", 40, 20000, 500),
               Tier("V2-80000", "PremiumV2_LRS", 160, 80000, 2000)]
ALL = {t.name: t for t in _sized("Premium_LRS") + _sized("StandardSSD_LRS") + _sized("Standard_LRS") + PROVISIONED}
DEFAULT = ["P1", "P20", "P40", "P80", "E1", "E30", "E80", "S4", "S80", "V2-3000", "Ultra-4000", "Ultra-80000"]
CEILING = ALL["Ultra-400000"]  # limits far above anything this path reaches


def provision(disks: Disks, name: str, t: Tier) -> None:
    """Create the tier's disk; an Ultra or Premium SSD v2 disk with its provisioned IOPS and MB/s
    (`stamp disk create --disk-iops-read-write N --disk-mbps-read-write M`), which the host's
    throttle takes from the disk's record. A figure the stamp's rules refuse is a StampError."""
    mbps = None if t.mbps is None else int(t.mbps)
    disks.create_empty(name, t.size_gib, t.sku, iops=t.iops, mbps=mbps)


def fio(uri: str, rw: str, qd: int, seconds: float, size: str = "256M", bs: int = 4096,
        ramp: float = 0.0) -> tuple[float, float]:
    """(IOPS, bytes per second) of one fio job."""
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
           f"--size={size}", f"--runtime={round(seconds * 1000)}ms", "--time_based", "--output-format=json"]
    if ramp:  # (in ms: fio reads "0.5" as 0 seconds)
        cmd.append(f"--ramp_time={round(ramp * 1000)}ms")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    return float(job["iops"]), float(job["bw_bytes"])


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
        results[name] = fio(uri, "randread", a.qd, a.seconds)[0]
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
        writes[name] = fio(uri, "randwrite", a.qd, a.seconds)[0]
        stop(proc)
    rows.append({"test": f"dynamic VHD 4K randwrite QD{a.qd}", "ours": writes["ours"], "peer": writes["qemu-nbd"],
                 "peer_name": "qemu-nbd", "unit": "IOPS", "ratio": writes["ours"] / writes["qemu-nbd"], "goal": 5.0})
    return rows


@contextmanager
def served(work: str, vm_size: str, tiers: list[Tier], serve_args: tuple[str, ...] = ()) -> Iterator[
        tuple[str, dict[str, str]]]:
    """A fresh stamp and host (so every burst bucket starts full), a VM of `vm_size` with the tiers'
    disks attached (caching None), served by `hostcache serve`: yields the socket and, per tier name,
    its export ("lun0"...), or the reason it could not be made."""
    where = tempfile.mkdtemp(prefix="group-", dir=work)
    try:
        with vhd.create(os.path.join(where, "img.vhd"), 32 * MIB, type="fixed") as img:
            img.write(0, make_boot_sector(2048, 60000))
        exports: dict[str, str] = {}
        with Stamp.create(os.path.join(where, "st")) as st:
            d = Disks(st)
            d.create_image("img", path=os.path.join(where, "img.vhd"))
            for t in tiers:
                try:
                    provision(d, t.name.lower(), t)
                    exports[t.name] = ""
                except StampError as e:
                    exports[t.name] = f"skipped: {e}"
        with Host.create(os.path.join(where, "host"), os.path.join(where, "st")) as h:
            h.create_vm("vm", vm_size, "img", os_sku="Standard_LRS", os_caching="None")
            made = [t for t in tiers if not exports[t.name]]
            for lun, t in enumerate(made):
                h.attach("vm", t.name.lower(), lun, "None")
                exports[t.name] = f"lun{lun}"
            full_buckets(h.throttle_stats("vm")["credits_percent"])
        sock = os.path.join(where, "h.sock")
        proc = start([PY, "-m", "hostcache", "--host", os.path.join(where, "host"), "serve", "vm", "--socket", sock,
                      *serve_args], sock)
        try:
            yield sock, exports
        finally:
            stop(proc)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def full_buckets(credits: dict[str, float | None]) -> None:
    """Every credit bucket (disk and VM) starts full, so bursting rows measure the burst rate, every run."""
    low = {name: c for name, c in credits.items() if c is not None and c < 100}
    if low:
        raise RuntimeError(f"burst buckets not full at the start: {low}")


def measure_ceiling(work: str, seconds: float, workers: int = 1) -> dict[tuple[int, str], float]:
    """IOPS `hostcache serve` reaches with no limit in the way, per (bytes per I/O, fio rw): the CEILING
    disk on the smallest size that leaves it uncapped, the best of CEILING_QDS. `workers` goes to serve
    only when it is not 1."""
    vm = vm_for(CEILING.limits(), SIZES)
    args = ("--workers", str(workers)) if workers != 1 else ()
    out = {}
    with served(work, vm.name, [CEILING], args) as (sock, exports):
        uri = f"nbd+unix:///{exports[CEILING.name]}?socket={sock}"
        for bs, rw in itertools.product(SIZES, RWS):
            out[(bs, rw)] = max(fio(uri, rw, qd, seconds, REGION, bs, RAMP)[0] for qd in CEILING_QDS)
    return out


@dataclass(frozen=True)
class Plan:
    """One tier's rows: its limits and the VM size that leaves them uncapped (or why there is none)."""

    tier: Tier
    limits: DiskLimits
    vm: VmLimits | None
    why_not: str = ""


def plan(names: list[str]) -> list[Plan]:
    out = []
    for name in names:
        t = ALL[name]
        lim = t.limits()
        try:
            out.append(Plan(t, lim, vm_for(lim, SIZES)))
        except NoSizeFits as e:
            out.append(Plan(t, lim, None, str(e)))
    return out


def groups(plans: list[Plan]) -> list[tuple[VmLimits, list[Plan]]]:
    """The plans by VM size, at most its data disks to a VM, in the order the sizes first appear."""
    by_size: dict[str, list[Plan]] = {}
    for p in plans:
        if p.vm is not None:
            by_size.setdefault(p.vm.name, []).append(p)
    out = []
    for ps in by_size.values():
        room = ps[0].vm.max_data_disks  # type: ignore[union-attr]
        out += [(ps[0].vm, ps[i:i + room]) for i in range(0, len(ps), room)]
    return out  # type: ignore[return-value]


def measures(lim: DiskLimits) -> str:
    """Which rate the rows measure."""
    if lim.burst is Burst.CREDIT:
        return "burst (full bucket: a new disk)"
    if lim.sku in ("UltraSSD_LRS", "PremiumV2_LRS"):
        return "provisioned"
    return "provisioned (no credit bursting)" if lim.sku != "Premium_LRS" or lim.size_gib < 1024 else \
        "provisioned (on-demand bursting off)"


def row(p: Plan, bs: int, rw: str, qd: int, measured_iops: float | None, ceiling: dict[tuple[int, str], float],
        note: str = "", seconds: float = 0.0) -> dict:
    """A table row: 4 KiB rows in IOPS, larger ones in the disk type's MB/s."""
    lim = p.limits
    limit_iops = target(lim, bs)
    scale, unit = (1.0, "IOPS") if bs == 4096 else (bs / lim.mbps_unit, "MiB/s" if lim.mbps_unit == MIB else "MB/s")
    ceil = ceiling.get((bs, rw))
    out = {"test": f"{p.tier.name} {bs // 1024}K {rw} QD{qd} via hostcache serve", "tier": p.tier.name,
           "sku": lim.sku, "size_gib": lim.size_gib, "bs": bs, "rw": rw, "qd": qd,
           "vm": p.vm.name if p.vm else None, "measures": measures(lim),
           "ours": None if measured_iops is None else measured_iops * scale, "peer": limit_iops * scale,
           "peer_name": "published limit", "unit": unit, "goal": None,
           "ceiling": None if ceil is None else ceil * scale, "ceiling_iops": ceil, "iops": measured_iops, "limit_iops": limit_iops,
           "ratio": None if measured_iops is None else measured_iops / limit_iops}
    out["verdict"] = note or verdict(measured_iops or 0.0, limit_iops, ceil, edge=qd / seconds if seconds else 0.0)
    return out


def measure_row(p: Plan, bs: int, rw: str, qd: int, uri: str, a: argparse.Namespace,
                ceiling: dict[tuple[int, str], float]) -> dict:
    """One row; a row that misses (other load on the machine, as often as not) is run up to --retries
    more times and the best kept, with the count of runs."""
    best: dict = {}
    for run in range(1, a.retries + 2):
        r = row(p, bs, rw, qd, fio(uri, rw, qd, a.seconds, REGION, bs, RAMP)[0], ceiling, seconds=a.seconds)
        if not best or r["iops"] > best["iops"]:
            best = r
        best["runs"] = run
        if best["verdict"] != "missed":
            break
    return best


def tiers(work: str, a: argparse.Namespace, ceiling: dict[tuple[int, str], float]) -> list[dict]:
    plans = plan(a.tiers)
    rows = [row(p, bs, rw, 0, None, ceiling, f"no VM size: {p.why_not}")
            for p in plans if p.vm is None for bs, rw in itertools.product(SIZES, RWS)]
    for vm, ps in groups(plans):
        with served(work, vm.name, [p.tier for p in ps]) as (sock, exports):
            for p in ps:
                for bs, rw in itertools.product(SIZES, RWS):
                    qd = queue_depth(p.limits, bs, write=rw == "randwrite")
                    if not exports[p.tier.name].startswith("lun"):
                        rows.append(row(p, bs, rw, qd, None, ceiling, exports[p.tier.name]))
                        continue
                    rows.append(measure_row(p, bs, rw, qd, f"nbd+unix:///{exports[p.tier.name]}?socket={sock}",
                                            a, ceiling))
                    print(f"  {rows[-1]['test']:<44} {rows[-1]['ours']:>9.0f} of {rows[-1]['peer']:>9.0f} "
                          f"{rows[-1]['unit']:<5} {rows[-1]['verdict']}", file=sys.stderr)
    order = {name: i for i, name in enumerate(a.tiers)}
    return sorted(rows, key=lambda r: order[r["tier"]])


def ceiling_rows(ceiling: dict[tuple[int, str], float]) -> list[dict]:
    lim = CEILING.limits()
    return [{"test": f"ceiling {bs // 1024}K {rw} QD{'/'.join(map(str, CEILING_QDS))} (no limit in the way)", "unit": "IOPS",
             "ours": iops, "mib_per_s": iops * bs / MIB, "disk": f"{CEILING.name} ({lim.iops:,} IOPS, "
             f"{lim.mbps:,.0f} MB/s)"} for (bs, rw), iops in ceiling.items()]


def num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def show_tiers(rows: list[dict]) -> None:
    print(f"{'tier':<12} {'I/O':<13} {'QD':>4} {'VM size':<22} {'measured':>9} {'limit':>9} {'unit':<6} "
          f"{'ratio':>6} {'ceiling':>9}  verdict")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        io = f"{r['bs'] // 1024}K {r['rw'].removeprefix('rand')}"
        print(f"{r['tier']:<12} {io:<13} {r['qd']:>4} {str(r['vm']).removeprefix('Standard_'):<22} "
              f"{num(r['ours']):>9} {num(r['peer']):>9} {r['unit']:<6} {ratio:>6} {num(r['ceiling']):>9}  "
              f"{r['verdict']}")
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("ok", "ceiling-bound", "over", "missed")}
    print("rows: " + ", ".join(f"{n} {v}" for v, n in counts.items()) +
          f", {len(rows) - sum(counts.values())} not run")


def chart(rows: list[dict], path: str) -> str:
    """Each row's measured rate and its path's ceiling as shares of the published limit (1 = the limit)."""
    from charts import hbars

    run = [r for r in rows if r["iops"] is not None]
    return hbars([f"{r['tier']} {r['bs'] // 1024}K {r['rw'].removeprefix('rand')} ({r['verdict']})" for r in run],
                 {"fio over NBD": [r["ratio"] for r in run],
                  "path ceiling": [(r["ceiling_iops"] or 0) / r["limit_iops"] for r in run]},
                 "share of the published limit (ceiling bars clipped at 2)",
                 "diskstamp: fio by tier through hostcache serve", path, log=False, line=1.0, top=2.0)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3, help="seconds fio counts per row, after a 1 s ramp "
                    "(default 3; a bursting disk's rows, retries included, must fit in its 30-minute bucket)")
    ap.add_argument("--qd", type=int, default=32, help="queue depth of part 1 (the peers)")
    ap.add_argument("--tiers", nargs="+", default=DEFAULT, metavar="TIER",
                    help=f"tiers to measure, or 'all' (default: {' '.join(DEFAULT)}); any of {', '.join(ALL)}")
    ap.add_argument("--retries", type=int, default=1, choices=range(0, 4),
                    help="runs more of a row that misses its limit, keeping the best (default 1)")
    ap.add_argument("--no-peers", action="store_true", help="skip part 1 (vhd serve against qemu-nbd and nbdkit)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--png", help="draw each row's measured rate and the path's ceiling as shares of the limit here")
    ap.add_argument("--check", action="store_true", help="exit 1 if a row is 'over' or 'missed'")
    ap.add_argument("--ceiling", action="store_true", help="only the uncapped 4 KiB ceiling at 1 and 2 workers")
    ap.add_argument("--rounds", type=int, default=3, help="with --ceiling: 1 and 2 workers alternated this often")
    ap.add_argument("--jobs", type=int, default=4, help="with --ceiling or --remote: fio jobs (NBD connections)")
    ap.add_argument("--remote", action="store_true", help="only the uncapped 4 KiB ceiling of a host over a local "
                    "stamp beside one over `stamp serve` (hostcache init --stamp URL), alternated --rounds times")
    a = ap.parse_args(argv)
    if a.tiers == ["all"]:
        a.tiers = list(ALL)
    unknown = [t for t in a.tiers if t not in ALL]
    if unknown:
        ap.error(f"unknown tier {', '.join(unknown)}: one of {', '.join(ALL)}, or all")
    if not 0 < a.seconds <= 400:
        ap.error("--seconds is more than 0 and at most 400")
    runs = len(SIZES) * len(RWS) * (a.retries + 1)
    if runs * (a.seconds + RAMP) >= BURST_SECONDS:
        ap.error(f"--seconds {a.seconds:g} with --retries {a.retries}: a disk's {runs} runs of up to "
                 f"{a.seconds + RAMP:g} s would outlast its {BURST_SECONDS // 60}-minute burst bucket; use fewer")
    return a


CEILING_VM, CEILING_DISK = "Standard_D192s_v6", ("UltraSSD_LRS", 1024)  # 400,400 and 400,000 IOPS: far above the path


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def measure_workers(workers: int = 1, seconds: float = 5, jobs: int = 4, qd: int = 16,
                    remote: bool = False) -> dict[str, float]:
    """The uncapped 4 KiB ceiling of `hostcache serve --workers N`: IOPS of fio
    randwrite then randread with `jobs` jobs (one NBD connection each, on 64 MiB
    regions of their own) at queue depth `qd`, on an Ultra disk (cache None) of
    a VM whose limits are far above what the emulator does, so the path, not the
    throttle, is what is measured. A fresh stamp and host in a folder of its own.
    Also, per rw: the serving processes' CPU microseconds per I/O and the cores
    they kept busy (CPU seconds per second), which a shared machine's load does
    not move as it moves IOPS. `remote`: the host reaches the stamp only over
    HTTP (`stamp serve` on a free port of 127.0.0.1, `hostcache init --stamp
    URL`); the server's CPU is counted with the host's."""
    work = tempfile.mkdtemp(prefix="fio-ceiling-", dir="/var/tmp")
    server = None
    try:
        with vhd.create(os.path.join(work, "img.vhd"), 32 * MIB, type="fixed") as img:
            img.write(0, make_boot_sector(2048, 60000))
        with Stamp.create(os.path.join(work, "st")) as st:
            d = Disks(st)
            d.create_image("img", path=os.path.join(work, "img.vhd"))
            d.create_empty("ultra", CEILING_DISK[1], CEILING_DISK[0])
        host, location = os.path.join(work, "host"), os.path.join(work, "st")
        if remote:
            server = subprocess.Popen([PY, "-m", "stamp", "--stamp", location, "serve", "--port", "0"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            location = json.loads(server.stdout.readline())["listening"] + "/devstoreaccount1"  # type: ignore[union-attr]
        with Host.create(host, location) as h:
            h.create_vm("vm", CEILING_VM, "img")
            h.attach("vm", "ultra", 0, "None")
        sock = f"{work}/c.sock"
        proc = subprocess.Popen([PY, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0", "--workers",
                                 str(workers), "--socket", sock], stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            pids = ready.get("workers", [proc.pid]) + ([server.pid] if server is not None else [])
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
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)


def remote_rows(a: argparse.Namespace) -> list[dict]:
    """A host over a local stamp and one over `stamp serve`, alternated a.rounds times (the machine is shared): medians."""
    import statistics

    got: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(a.rounds):
        for remote in (False, True):
            got[remote].append(measure_workers(1, a.seconds, a.jobs, remote=remote))
    rows = []
    for rw in ("randread", "randwrite"):
        local, over = (statistics.median(r[rw] for r in got[w]) for w in (False, True))
        rows.append({"test": f"hostcache serve 4K {rw}, {a.jobs} fio jobs QD16, stamp over HTTP", "ours": over,
                     "peer": local, "peer_name": "stamp in-process", "unit": "IOPS", "ratio": over / local,
                     "goal": None})
        local, over = (statistics.median(r[f"{rw}_cpu_us_per_io"] for r in got[w]) for w in (False, True))
        print(f"{rw:>10} CPU per I/O (host and server): in-process {local:.0f} us, over HTTP {over:.0f} us")
    return rows


def worker_rows(a: argparse.Namespace) -> list[dict]:
    """1 and 2 workers alternated a.rounds times (the machine is shared): medians."""
    import statistics

    got: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(a.rounds):
        for workers in (1, 2):
            got[workers].append(measure_workers(workers, a.seconds, a.jobs))
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

    a = parse()
    if a.ceiling or a.remote:
        rows = remote_rows(a) if a.remote else worker_rows(a)
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
        peer_rows = [] if a.no_peers else peers(work, a)
        ceiling = measure_ceiling(work, a.seconds)
        tier_rows = tiers(work, a, ceiling)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if peer_rows:
        show(peer_rows)
        print()
    for r in ceiling_rows(ceiling):
        print(f"{r['test']:<48} {r['ours']:>9,.0f} IOPS {r['mib_per_s']:>7,.1f} MiB/s  {r['disk']}")
    print()
    show_tiers(tier_rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"peers": peer_rows, "ceiling": ceiling_rows(ceiling), "tiers": tier_rows}, f, indent=2)
    if a.png:
        print(chart(tier_rows, a.png))
    bad = [r for r in tier_rows if r["verdict"] in ("over", "missed")]
    return 1 if a.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
