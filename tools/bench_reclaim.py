#!/usr/bin/env python3
"""Sustained large writes through hostcache serve, with space reclaimed as they run.

  .venv/bin/python tools/bench_reclaim.py [--minutes 10] [--tier P40] [--region-gib 4] [--qd 64]
                                          [--workers N] [--sample 10] [--no-reclaim | --compare]
                                          [--json F]

A disk of the tier (Premium_LRS, cache None) is attached to a VM whose own
limits do not cap it (D16s_v3: 384 MiB/s uncached) and served by `hostcache
serve` (which reclaims space by itself unless --no-reclaim). fio writes 64
KiB blocks at random over the first --region-gib GiB of it (the "disk" of the
measurement: its live data), time-based, for --minutes. With --workers N the
disk is served by N processes (`hostcache serve --workers N`, one throttle
shared) and fio runs N jobs of --qd / N each (one connection each, dealt to
the workers in turn), the same queue depth in all. Every --sample
seconds the tool takes:
  - the stamp's disk use: blocks held by every file under its folder
    (replicas and metadata), plus those of files deleted from it that a
    process still holds open (their space is not free until it lets go:
    `du` alone would miss them, and report a bound kept while the disk
    fills), beside the bound 2 x (live data x 3 replicas) +
    ALLOWANCE_EXTENTS extents x 3 replicas (live data: the bytes its blobs
    hold, read from the stamp);
  - fio's write rate in that interval (its bandwidth log), beside the
    tier's published MB/s (in the catalog's unit: MiB/s for Premium).
It prints a table and a summary (peak use over the bound, median and worst
rates as a share of the published one, the serving processes' CPU time per
write: what one core can serve at most, and fio's write completion latency:
its 99th and 99.9th percentiles and its longest, what a writer of the disk
waited, mostly queueing at that depth; and of a probe: 4 KiB reads and
writes at QD1, --probe-iops a second, over PROBE_MIB MiB past the region,
what one reader or writer waits). --compare runs it twice in one sitting, without reclamation and
then with it, each on a fresh stamp, and prints both and what reclamation
added to the latency. Not a test: nothing asserts. The
work folder goes under /var/tmp (the stamp may reach 2 x 3 x region plus the
allowance: 24 GiB and more at the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from fio_tiers import start, stop  # noqa: E402

import vhd  # noqa: E402
from hostcache.boot import make_boot_sector  # noqa: E402
from hostcache.host import Host  # noqa: E402
from hostcache.tiers import disk_limits  # noqa: E402
from stamp import Stamp  # noqa: E402
from stamp.disks import Disks  # noqa: E402
from stamp.stream import DEFAULT_EXTENT_SIZE  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
PY = sys.executable
TIERS = {"P30": 1024, "P40": 2048, "P50": 4096}  # Premium_LRS sizes in GiB
VM = "D16s_v3"
PROBE_MIB = 64  # the probe's area, just past the region
ALLOWANCE_EXTENTS = 4  # the open extent, one sealed since the last round, a round's copies, one in flight


def disk_use(path: str) -> int:
    """Bytes of disk blocks held by every file under `path` (files deleted meanwhile count 0)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def held_deleted(path: str) -> int:
    """Bytes of disk blocks held by files deleted from under `path` that some process
    (any, in /proc) still has open: each file counted once, however many hold it."""
    seen: dict[tuple[int, int], int] = {}
    prefix = path.rstrip("/") + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for name in names:
            link = os.path.join(fd_dir, name)
            try:
                target = os.readlink(link)
                if target.startswith(prefix) and target.endswith(" (deleted)"):
                    st = os.stat(link)
                    seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
            except OSError:
                continue  # closed meanwhile
    return sum(seen.values())


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and its children now alive (the workers of
    `hostcache serve --workers N`): what serving costs, apart from fio's share of the cores."""
    total = 0.0
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except (OSError, ValueError, IndexError):
        return total
    return total + sum(cpu_seconds(int(c)) for c in children)


def live_bytes(st: Stamp) -> int:
    return sum(st.blobs.used_bytes(name) for name in st.blobs.names())


def setup(work: str, tier: str) -> str:
    """A stamp, a host and a VM with the tier's disk at LUN 0; returns the host folder."""
    with vhd.create(os.path.join(work, "img.vhd"), 32 * MIB, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    with Stamp.create(os.path.join(work, "st")) as st:
        d = Disks(st)
        d.create_image("img", path=os.path.join(work, "img.vhd"))
        d.create_empty("data", TIERS[tier], "Premium_LRS")
    host = os.path.join(work, "host")
    with Host.create(host, os.path.join(work, "st")) as h:
        h.create_vm("vm", VM, "img")
        h.attach("vm", "data", 0, "None")
    return host


def fio_cmd(uri: str, a: argparse.Namespace, log: str) -> list[str]:
    runtime = f"--runtime={int(a.minutes * 60)}"
    cmd = ["fio", "--output-format=json", "--name=j", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
           f"--iodepth={max(a.qd // a.workers, 1)}", f"--numjobs={a.workers}", "--group_reporting",
           f"--size={a.region_gib}G", runtime, "--time_based",
           f"--write_bw_log={log}", f"--log_avg_msec={int(a.sample * 1000)}"]
    if a.probe_iops:  # a reader and writer at QD1 beside the load, in a group of its own: what one I/O waits
        cmd += ["--name=probe", "--new_group", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
                "--iodepth=1", f"--rate_iops={a.probe_iops}", f"--offset={a.region_gib}G",
                f"--size={PROBE_MIB}M", runtime, "--time_based"]
    return cmd


def latency(side: dict) -> dict[str, float]:
    """fio's completion latency of one direction of a job (ms): mean, 99th and 99.9th percentiles, longest."""
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return {"mean": round(clat.get("mean", 0) / 1e6, 3), "p99": round(pct.get("99.000000", 0) / 1e6, 3),
            "p99.9": round(pct.get("99.900000", 0) / 1e6, 3), "max": round(clat.get("max", 0) / 1e6, 3)}


def rates(log: str, jobs: int = 1) -> list[tuple[float, float]]:
    """(seconds, MiB/s) per interval from fio's bandwidth logs (KiB/s), the jobs' summed
    (each job's n-th interval ends at nearly the same time: the first job's is taken)."""
    per_job = []
    for j in range(1, jobs + 1):
        path = f"{log}_bw.{j}.log"
        if not os.path.exists(path):
            continue
        rows = []
        for line in open(path):
            fields = [x.strip() for x in line.split(",")]
            if len(fields) >= 2:
                rows.append((int(fields[0]) / 1000, int(fields[1]) / 1024))
        per_job.append(rows)
    if not per_job:
        return []
    n = min(len(rows) for rows in per_job)
    return [(per_job[0][i][0], sum(rows[i][1] for rows in per_job)) for i in range(n)]


def measure(work: str, a: argparse.Namespace) -> dict:
    host = setup(work, a.tier)
    sock = f"{work}/h.sock"
    serve = [PY, "-m", "hostcache", "--host", host, "serve", "vm", "--lun", "0", "--socket", sock]
    proc = start(serve + (["--no-reclaim"] if a.no_reclaim else []) + ["--workers", str(a.workers)], sock)
    log = os.path.join(work, "fio")
    samples = []
    stamp_dir = os.path.join(work, "st")
    allowance = ALLOWANCE_EXTENTS * DEFAULT_EXTENT_SIZE * 3
    try:
        fio = subprocess.Popen(fio_cmd(f"nbd+unix:///lun0?socket={sock}", a, log), stdout=subprocess.PIPE,
                               text=True)
        t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid)
        with Stamp.open(stamp_dir) as st:
            while fio.poll() is None:
                time.sleep(a.sample)
                held = held_deleted(stamp_dir)
                used, live = disk_use(stamp_dir) + held, live_bytes(st)
                samples.append({"t": round(time.monotonic() - t0, 1), "disk_use": used, "held_deleted": held,
                                "live": live, "bound": 2 * 3 * live + allowance})
                print(f"  {samples[-1]['t']:7.1f} s  use {used / GIB:6.2f} GiB (deleted, held open: "
                      f"{held / GIB:.2f})  bound {samples[-1]['bound'] / GIB:6.2f} GiB  live {live / GIB:5.2f} GiB",
                      file=sys.stderr, flush=True)
        out = fio.communicate()[0]
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    served = proc.stdout.read() if proc.stdout is not None else ""
    final = json.loads(served) if served.strip().startswith("{") else {}
    reclaimed, held = final.get("reclaimed", {}), final.get("writers_held", {})
    jobs = json.loads(out[out.index("{"):])["jobs"]
    job = jobs[0]["write"]
    probe = [j for j in jobs if j["jobname"] == "probe"]
    published = disk_limits("Premium_LRS", TIERS[a.tier]).mbps
    return {"tier": a.tier, "published_mibps": published, "reclaim": not a.no_reclaim,
            "fio_mibps": job["bw_bytes"] / MIB, "written": job["io_bytes"], "reclaimed": reclaimed, "writers_held": held,
            "serve_cpu_us_per_write": round(1e6 * cpu / max(job["total_ios"], 1), 1),
            "write_clat_ms": latency(job),
            **({"probe_clat_ms": {"read": latency(probe[0]["read"]), "write": latency(probe[0]["write"])}}
               if probe else {}),
            "samples": samples, "rates": rates(log, a.workers),
            "allowance": allowance, "args": {k: v for k, v in vars(a).items() if k != "json"}}


def table(result: dict) -> str:
    pub = result["published_mibps"]
    rates_ = result["rates"]
    workers = result["args"].get("workers", 1)
    lines = [f"{result['tier']} 64 KiB randwrite QD{result['args']['qd']} over {result['args']['region_gib']} GiB "
             f"through hostcache serve --workers {workers} "
             f"({'reclaiming' if result['reclaim'] else 'no reclamation'}); "
             f"published {pub:g} MiB/s",
             f"{'time s':>8} {'use GiB':>8} {'held GiB':>8} {'bound GiB':>9} {'use/bound':>9} {'MiB/s':>7} "
             f"{'x pub':>6}"]
    for s in result["samples"]:
        r = [mb for t, mb in rates_ if abs(t - s["t"]) <= result["args"]["sample"] / 2 + 0.5]
        rate = f"{r[0]:7.1f} {r[0] / pub:6.3f}" if r else f"{'':>7} {'':>6}"
        lines.append(f"{s['t']:8.1f} {s['disk_use'] / GIB:8.2f} {s.get('held_deleted', 0) / GIB:8.2f} "
                     f"{s['bound'] / GIB:9.2f} "
                     f"{s['disk_use'] / max(s['bound'], 1):9.2f} {rate}")
    steady = [mb for t, mb in rates_[1:]]  # the first interval includes fio's start
    worst = max((s["disk_use"] / max(s["bound"], 1) for s in result["samples"]), default=0.0)
    lines.append(f"whole run: {result['fio_mibps']:.1f} MiB/s = {result['fio_mibps'] / pub:.3f} x published; "
                 f"intervals: median {statistics.median(steady) / pub if steady else 0:.3f} x, "
                 f"lowest {min(steady) / pub if steady else 0:.3f} x; peak use/bound {worst:.2f} "
                 f"(allowance {result['allowance'] / GIB:.2f} GiB); use counts the files deleted but held open "
                 f"(held)")
    if "serve_cpu_us_per_write" in result:
        per = result["serve_cpu_us_per_write"]
        lines.append(f"serving processes: {per:.0f} us of CPU per write (the reclaimer's included): one core "
                     f"serves at most {1e6 / max(per, 1) * 64 / 1024:.0f} MiB/s")
    c = result.get("write_clat_ms")
    if c:
        lines.append(f"fio write completion latency: mean {c['mean']:.2f} ms, 99th percentile {c['p99']:.2f} ms, "
                     f"99.9th {c['p99.9']:.2f} ms, longest {c['max']:.2f} ms (queueing at QD{result['args']['qd']})")
    for side, c in result.get("probe_clat_ms", {}).items():
        lines.append(f"probe {side}s (4 KiB, QD1): mean {c['mean']:.2f} ms, 99th percentile {c['p99']:.2f} ms, "
                     f"99.9th {c['p99.9']:.2f} ms, longest {c['max']:.2f} ms")
    r = result["reclaimed"]
    if r:
        lines.append(f"reclaimer: {r['rounds']} rounds, {r['bytes_freed'] / GIB:.1f} GiB freed, "
                     f"{r['bytes_moved'] / GIB:.2f} GiB copied ({r['bytes_moved'] / max(result['written'], 1):.2f} "
                     f"x what fio wrote), longest write transaction {r['longest_txn_ms']:.1f} ms "
                     f"({r.get('longest_body_ms', 0):.1f} changing, {r.get('longest_commit_ms', 0):.1f} committing; "
                     f"{r.get('longest_major_faults', 0)} major faults, preempted {r.get('longest_preempted', 0)} and "
                     f"blocked {r.get('longest_blocked', 0)} times; "
                     f"longest wait for the write lock {r.get('longest_lock_wait_ms', 0):.1f} ms), "
                     f"{r['errors']} failed rounds")
    h = result.get("writers_held")
    if h:
        lines.append(f"writers held back: {h['waits']} times, {h['waited']:.1f} s in all, longest {h['longest']:.2f} s, "
                     f"{h['gave_up']} gave up (--workers 1 only: workers keep theirs)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10, help="fio's run time (default 10)")
    ap.add_argument("--tier", choices=list(TIERS), default="P40")
    ap.add_argument("--region-gib", type=int, default=4, help="GiB of the disk fio writes over (default 4)")
    ap.add_argument("--qd", type=int, default=64, help="queue depth in all (default 64)")
    ap.add_argument("--workers", type=int, default=1,
                    help="serving processes, and fio jobs of --qd / N each (default 1)")
    ap.add_argument("--sample", type=float, default=10, help="seconds between samples (default 10)")
    ap.add_argument("--probe-iops", type=int, default=50,
                    help="a 4 KiB reader and writer at QD1 beside the load, this many I/Os a second each way "
                         "(0: none); their latency is what one I/O waits (default 50)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--no-reclaim", action="store_true", help="serve without reclaiming (for comparison)")
    how.add_argument("--compare", action="store_true",
                     help="run twice, without reclamation and then with it, and compare fio's write latency")
    ap.add_argument("--json", help="write the samples and rates here")
    a = ap.parse_args()
    if shutil.which("fio") is None:
        print("bench_reclaim: fio is missing (bash tools/run.sh test installs it)", file=sys.stderr)
        return 1
    if (a.minutes <= 0 or a.region_gib <= 0 or a.qd <= 0 or a.sample <= 0 or a.probe_iops < 0
            or not 1 <= a.workers <= a.qd):
        print("bench_reclaim: --minutes, --region-gib, --qd and --sample must be positive, --probe-iops not "
              "negative, --workers from 1 to --qd", file=sys.stderr)
        return 2
    results = []
    for no_reclaim in ([True, False] if a.compare else [a.no_reclaim]):
        work = tempfile.mkdtemp(prefix="bench-reclaim-", dir="/var/tmp")
        try:
            results.append(measure(work, argparse.Namespace(**{**vars(a), "no_reclaim": no_reclaim})))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(table(results[-1]), flush=True)
    if a.compare:
        print(compare(results[0], results[1]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results if a.compare else results[0], f, indent=2)
    return 0


def compare(off: dict, on: dict) -> str:
    """What reclamation added to a writer's wait: fio's write latency without and with it."""
    lines = [f"without -> with reclamation: MiB/s {off['fio_mibps']:.1f} -> {on['fio_mibps']:.1f}"]
    pairs = [("load's writes", off["write_clat_ms"], on["write_clat_ms"])]
    pairs += [(f"probe {side}s", off["probe_clat_ms"][side], on["probe_clat_ms"][side])
              for side in on.get("probe_clat_ms", {}) if side in off.get("probe_clat_ms", {})]
    for what, a, b in pairs:
        lines.append(f"  {what}: 99.9th percentile {a['p99.9']:.2f} -> {b['p99.9']:.2f} ms, "
                     f"longest {a['max']:.2f} -> {b['max']:.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
