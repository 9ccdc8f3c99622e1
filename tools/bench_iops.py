#!/usr/bin/env python3
"""IOPS and MB/s by disk tier, measured through a host: real time, real I/O.

  .venv/bin/python tools/bench_iops.py [--seconds 3] [--qd 16] [--tiers S10 E10 P10 P30 v2 ultra] [--json F]

Any selection of tiers works; the cached-against-uncached rows use P10, else
the first chosen tier that may have host caching (none: Ultra and Premium
SSD v2 may not), and are skipped when there is none.

For each tier a disk of that tier is attached (caching None) to a VM and
read and written at random, 4 KiB and 64 KiB, at a queue depth (threads), for
a few seconds of wall time through the VHD, the host's throttle and the
stamp. Printed beside each: the limit the tier publishes (its burst rate
while credits last: a new disk's bucket starts full), and how close the
measurement came. Then IOPS against queue depth for one tier, and the
uncapped peak of the path (Ultra at its size's maximum). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import vhd  # noqa: E402
from hostcache.boot import make_boot_sector  # noqa: E402
from hostcache.host import Host  # noqa: E402
from hostcache.tiers import MIB, ULTRA_SKUS, Burst, VmLimits, disk_limits  # noqa: E402
from stamp import Stamp  # noqa: E402
from stamp.disks import Disks  # noqa: E402

TIERS = {  # name: (sku, size GiB, provisioned iops, provisioned MB/s)
    "S10": ("Standard_LRS", 128, None, None),
    "E10": ("StandardSSD_LRS", 128, None, None),
    "P10": ("Premium_LRS", 128, None, None),
    "P30": ("Premium_LRS", 1024, None, None),
    "v2": ("PremiumV2_LRS", 64, 3000, 125),
    "ultra": ("UltraSSD_LRS", 64, 2000, 500),
}
HUGE = VmLimits("uncapped", 64, None, None, None, 10**9, 10**9, None, None, False)
SPAN = 256 * MIB  # the part of each disk the I/O touches (written first so reads hit data)


WARMUP = 0.5  # seconds before counting: the limiters' start-up allowance is not measured


def run_io(disk, seconds: float, qd: int, size: int, write: bool,
           latencies: list[float] | None = None) -> tuple[float, float]:
    begin = time.monotonic() + WARMUP
    stop = begin + seconds
    counts = [0] * qd
    buf = os.urandom(size)

    def worker(i: int) -> None:
        rng = random.Random(i)
        slots = SPAN // size
        while True:
            now = time.monotonic()
            if now >= stop:
                return
            off = rng.randrange(slots) * size
            if write:
                disk.write(off, buf)
            else:
                disk.read(off, size)
            if now >= begin:
                counts[i] += 1
                if latencies is not None:
                    latencies.append(time.monotonic() - now)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(qd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    iops = sum(counts) / seconds
    return iops, iops * size / MIB


WORKLOADS = ((4096, False), (4096, True), (65536, False), (65536, True))


def measure_uncapped(host: Host, disk, a: argparse.Namespace) -> dict[tuple[int, bool], float]:
    """The path's own peak: the same I/O with no limit and no service latency."""
    saved = disk.throttle
    free = type(saved)(HUGE, saved.clock, latency=False)
    free.add_disk(str(disk.lun), disk_limits("UltraSSD_LRS", 1024))
    disk.throttle = free
    out = {}
    print(f"{'uncapped':>10}: the emulator's own path, no limits, no service latency")
    for size_io, write in WORKLOADS:
        out[(size_io, write)] = run_io(disk, a.seconds, a.qd, size_io, write)[0]
        print(f"{'':>10} {'randwrite' if write else 'randread':>9} {size_io // 1024:>3}K QD{a.qd}: "
              f"{out[(size_io, write)]:9.1f} IOPS", flush=True)
    disk.throttle = saved
    return out


def percentiles(lat: list[float]) -> dict[str, float]:
    """Completion latency percentiles in ms (fio's clat percentiles)."""
    if not lat:
        return {"50": 0.0, "99": 0.0, "99.9": 0.0}
    lat = sorted(lat)
    return {k: round(lat[min(len(lat) - 1, int(len(lat) * q))] * 1000, 3)
            for k, q in (("50", 0.5), ("99", 0.99), ("99.9", 0.999))}


QDS = (1, 2, 4, 8, 16, 32, 64)


def qd_sweep(host: Host, a: argparse.Namespace) -> dict[str, list[float]]:
    """IOPS against queue depth for every tier: QD / latency until the limit."""
    out = {}
    print("IOPS against queue depth, 4K random reads (service latency on: IOPS = QD / latency until the limit)")
    print(f"{'tier':>10} " + " ".join(f"{'QD' + str(q):>8}" for q in QDS))
    for lun, _name in enumerate(a.tiers):
        disk = host.open_disk("vm", lun)
        tier = disk.throttle.disks[str(lun)].limits.tier
        out[tier] = [run_io(disk, a.seconds / 2, qd, 4096, False)[0] for qd in QDS]
        print(f"{tier:>10} " + " ".join(f"{v:8.0f}" for v in out[tier]), flush=True)
    return out


def cached_tier(tiers: list[str], vm_caches: bool) -> str | None:
    """The tier cached_rows measures: P10 if chosen, else the first chosen tier
    that may have host caching (not Ultra or Premium SSD v2), else None
    (none may, or the VM size has no host cache)."""
    cacheable = [n for n in tiers if TIERS[n][0] not in ULTRA_SKUS]
    if not vm_caches or not cacheable:
        return None
    return "P10" if "P10" in cacheable else cacheable[0]


def cached_rows(host: Host, a: argparse.Namespace) -> list[dict]:
    """The same disk (P10 by preference), uncached and with ReadOnly caching once
    its pages are in the host cache: hits count against the VM's cached limit only."""
    name = cached_tier(a.tiers, host.throttle("vm").vm.limits.host_caching)
    if name is None:
        print("cached vs uncached: skipped (no chosen tier may have host caching: Ultra and "
              "Premium SSD v2 may not, nor may a VM size without a host cache)")
        return []
    lun = a.tiers.index(name)
    disk_name = f"d-{name}"
    rows = []
    print(f"cached vs uncached, {name}, 4K random reads QD{a.qd} over 16 MiB")
    for caching in ("None", "ReadOnly"):
        host.detach("vm", lun)
        host.attach("vm", disk_name, lun, caching)
        disk = host.open_disk("vm", lun)
        for off in range(0, 16 * MIB, 64 * 1024):
            with disk.lock:
                disk.virtual.read(off, 64 * 1024)  # warm the host cache
        global SPAN
        span, SPAN = SPAN, 16 * MIB
        iops, _ = run_io(disk, a.seconds, a.qd, 4096, False)
        SPAN = span
        rows.append({"tier": name, "caching": caching, "iops": round(iops, 1)})
        print(f"{caching:>10}: {iops:9.1f} IOPS", flush=True)
    return rows


def chart(rows: list[dict], path: str) -> str:
    """Measured IOPS beside the published limit, 4 KiB random reads, by tier."""
    from charts import bars

    reads = [r for r in rows if r["rw"] == "randread" and r["bs"] == 4096]
    return bars([r["tier"] for r in reads], {"measured": [r["iops"] for r in reads],
                                             "published limit": [r["limit_iops"] for r in reads]},
                "IOPS (4 KiB random read)", f"diskstamp: IOPS by tier, QD{reads[0]['iodepth'] if reads else ''}",
                path)


def main() -> int:
    global WARMUP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=WARMUP,
                    help=f"seconds of each run not counted (default {WARMUP}: the limiters' start-up allowance)")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--tiers", nargs="+", default=list(TIERS), choices=list(TIERS))
    ap.add_argument("--vm", default="D8s_v3")
    ap.add_argument("--json", help="also write the rows here, with fio's field names")
    ap.add_argument("--png", help="also draw a chart of IOPS by tier here (needs matplotlib)")
    a = ap.parse_args()
    a.tiers = list(dict.fromkeys(a.tiers))  # each tier once: one disk per tier
    WARMUP = a.warmup
    work = tempfile.mkdtemp(prefix="bench-iops-", dir="/var/tmp")
    rows: list[dict] = []
    sweeps: dict[str, list[float]] = {}
    cached: list[dict] = []
    try:
        with vhd.create(os.path.join(work, "img.vhd"), 64 * MIB, type="fixed") as img:
            img.write(0, make_boot_sector(2048, 100000))
        st = Stamp.create(os.path.join(work, "st"))
        disks = Disks(st)
        disks.create_image("img", path=os.path.join(work, "img.vhd"))
        for name in a.tiers:
            sku, size, iops, mbps = TIERS[name]
            disks.create_empty(f"d-{name}", size, sku, iops=iops, mbps=mbps)  # the record holds the provisioning
        st.close()
        host = Host.create(os.path.join(work, "host"), os.path.join(work, "st"))
        host.create_vm("vm", a.vm, "img")
        for lun, name in enumerate(a.tiers):
            host.attach("vm", f"d-{name}", lun, "None")
        for lun, name in enumerate(a.tiers):
            sku = TIERS[name][0]
            t = host.throttle("vm")
            lim = t.disks[str(lun)].limits  # from the disk's record, as attach made it
            disk = host.open_disk("vm", lun)
            chunk = os.urandom(4 * MIB)
            with disk.lock:
                for off in range(0, SPAN, 4 * MIB):
                    disk.virtual.write(off, chunk)  # fill, not throttled: reads then read data
            cap_iops = lim.burst_iops if lim.burst is not Burst.NONE else lim.iops
            cap_mbps = lim.burst_mbps if lim.burst is not Burst.NONE else lim.mbps
            vm = t.vm.limits
            if lun == 0:
                uncapped = measure_uncapped(host, disk, a)
            for size_io, write in WORKLOADS:
                lat: list[float] = []
                got_iops, got_mbps = run_io(disk, a.seconds, a.qd, size_io, write, lat)
                limit = min(cap_iops, cap_mbps * MIB / size_io, vm.burst_iops or vm.uncached_iops)
                peak = uncapped[(size_io, write)]
                bound = "emulator-bound" if limit > 0.97 * peak else ("ok" if abs(got_iops / limit - 1) <= 0.03
                                                                      else "OFF BY >3%")
                rows.append({"tier": lim.tier, "sku": sku, "rw": "randwrite" if write else "randread",
                             "bs": size_io, "iodepth": a.qd, "iops": round(got_iops, 1),
                             "bw_mib": round(got_mbps, 2), "limit_iops": round(limit, 1),
                             "uncapped_iops": round(peak, 1), "ratio": round(got_iops / limit, 3), "verdict": bound,
                             "clat_ms": percentiles(lat)})
                p = rows[-1]["clat_ms"]
                print(f"{lim.tier:>10} {rows[-1]['rw']:>9} {size_io // 1024:>3}K QD{a.qd}: "
                      f"{got_iops:9.1f} IOPS {got_mbps:8.2f} MiB/s   limit {limit:9.1f}   "
                      f"{got_iops / limit * 100:6.1f}%   {bound:<14} lat p50/p99/p99.9 "
                      f"{p['50']:.2f}/{p['99']:.2f}/{p['99.9']:.2f} ms", flush=True)
        sweeps = qd_sweep(host, a)
        cached = cached_rows(host, a)
        host.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"jobs": [{"jobname": f"{r['tier']}-{r['rw']}-{r['bs']}",
                                 "read" if r["rw"] == "randread" else "write": {
                                     "iops": r["iops"], "bw": r["bw_mib"] * 1024, "bs": r["bs"],
                                     "clat_ns": {"percentile": {
                                         f"{float(k):.6f}": int(v * 1e6) for k, v in r["clat_ms"].items()}}},
                                 "iodepth": r["iodepth"], "limit_iops": r["limit_iops"],
                                 "uncapped_iops": r["uncapped_iops"]} for r in rows],
                       "qd_sweep": {"qd": list(QDS), "iops": sweeps}, "cached": cached}, f, indent=2)
    if a.png:
        print(chart(rows, a.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
