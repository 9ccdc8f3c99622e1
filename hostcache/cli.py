"""The `hostcache` command (also `python -m hostcache`): the tier catalog, the
throttle, and a host's compute calls, as JSON. The host folder is --host,
or $DISKSTAMP_HOST, or ./host. Exit codes: 0 ok, 1 a refused request, 2 usage.
Every number is checked where it is read (a count at least 1, a time above
0, sizes as 512, 4K, 64M, 10G); every MB/s field says its unit."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lmdb

from stamp import StampError
from vhd.cli import _connection_opts, standard_streams
from vhd.errors import UsageError, VhdError
from vhd.ops import parse_size

from .errors import HostError
from .host import MAX_CACHE_BYTES, Host
from .sim import Workload, simulate
from .throttle import FakeClock, Path, Throttle
from .tiers import EDITIONS, SKUS, DiskLimits, catalog, disk_limits, vm_limits, vm_provenance, vm_sizes

EPILOG = """examples:
  hostcache init --stamp ./st                      a host over a stamp (export DISKSTAMP_HOST=./host)
  hostcache init --stamp http://127.0.0.1:10000/devstoreaccount1
                                                   a host over a stamp served elsewhere (`stamp serve`)
  hostcache init --stamp https://stamp1:10000/devstoreaccount1 --ca-file ca.pem --account-key-file key
                                                   over TLS (`stamp serve --cert --key`), the key from a file
  hostcache vm create vm1 --size D8s_v3 --image ubuntu
  hostcache vm attach vm1 data1 --lun 0 --caching ReadOnly
  hostcache vm boot vm1                            boot reads through cache and throttle, timed
  hostcache vm detach vm1 --lun 0                  flushes first
  hostcache cache stats
  hostcache tiers Premium_LRS                      every size with its limits
  hostcache limits Premium_LRS 100                 a 100 GiB Premium disk performs as P10
  hostcache limits UltraSSD_LRS 64 --iops 20000 --mbps 500
  hostcache limits Premium_LRS 128 --tier P50      a 128 GiB disk given performance tier P50
  hostcache vm-size D8s_v3
  hostcache sizes --family Dsv5 --premium          the published VM sizes, filtered
  hostcache simulate Premium_LRS 1024 --vm D8s_v3 --qd 1 4 16 64 --size 4K
                                                   IOPS against queue depth, by arithmetic"""


def _disk(a: argparse.Namespace) -> DiskLimits:
    return disk_limits(a.sku, a.size_gib, iops=a.iops, mbps=a.mbps, performance_plus=a.performance_plus,
                       on_demand_bursting=a.on_demand_bursting, edition=a.edition, tier=a.tier)


def _number(kind: type[int] | type[float], low: float, strict: bool, what: str,
            high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` above `low` (or at least it, not
    strict) and at most `high`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number: {what}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is too small: {what}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{text} is too large: {what}")
        return value
    return parse


COUNT = _number(int, 1, False, "at least 1")
NONNEGATIVE = _number(int, 0, False, "0 or more")
POSITIVE = _number(float, 0, True, "more than 0")


def _bytes_arg(text: str) -> int:
    """Bytes from 512, 4K, 64M, 1.5G (binary units), read as the vhd CLI reads sizes."""
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_key_file(path: str) -> str:
    """The account key in `path`, refused if anyone but its owner may read
    or change the file (as ssh refuses such a private key)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(4097)
    except OSError as e:
        raise HostError(f"cannot read the account key file {path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise HostError(f"the account key file {path} is open to others (mode {mode & 0o777:04o}): a key others "
                        f"can read is no secret; make it yours only (chmod 600 {path}) and run the command again")
    key = raw.decode("ascii", "replace").strip()
    if not key or len(raw) > 4096 or any(c.isspace() for c in key):
        raise HostError(f"the account key file {path} does not hold one key (the base64 text the portal or "
                        "`stamp serve` gives, alone in the file)")
    return key


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="hostcache", description="The host in front of a stamp: VMs, disks "
                                  "attached at LUNs through a host cache, the throttle of each Azure disk "
                                  "tier and VM size, real boots, NBD serving and FUSE mounts.", epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--host", default=os.environ.get("DISKSTAMP_HOST", "host"),
                     help="the host folder (default: $DISKSTAMP_HOST or ./host)")
    sub = top.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("init", help="create a host folder over a stamp (a folder, or a `stamp serve` URL)")
    p.add_argument("--stamp", required=True,
                   help="the stamp folder, or the URL of its Blob endpoint, http://HOST:PORT/ACCOUNT (the address "
                        "`stamp serve` prints, then the account: /devstoreaccount1); a host over the network: its "
                        "disks' pages and records go over HTTP, the cache and the throttle stay here")
    p.add_argument("--ca-file", metavar="CERT",
                   help="with an https:// URL: the PEM certificate of the CA that signed the stamp's certificate "
                   "(for a self-signed `stamp serve --cert`, that certificate); copied into HOST/ca.pem, and the "
                   "only CA this host then trusts for the stamp (default: the system's CAs)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--account-key-file", metavar="FILE",
                      help="with a URL: a file holding the account's key (base64), readable by you only (chmod 600: "
                      "refused otherwise, as ssh refuses a private key others can read); the key is kept in "
                      "HOST/host.json, mode 600. $DISKSTAMP_ACCOUNT_KEY, when set, is used instead by every command "
                      "that uses the host (and not kept); with neither, the devstoreaccount1 key")
    keys.add_argument("--account-key", metavar="KEY",
                      help="the key itself, on the command line: avoid it, every user of the machine sees a "
                      "command line (ps, /proc/PID/cmdline) and it stays in your shell history; use "
                      "--account-key-file or $DISKSTAMP_ACCOUNT_KEY")
    p.add_argument("--cache-mib", type=_number(int, 1, False, "at least 1, at most 16,777,216 (16 TiB)", MAX_CACHE_BYTES >> 20),
                   help="a fixed host cache size (default: the VMs' cache sizes, scaled)")
    p.add_argument("--cache-scale", type=_number(float, 0, True, "more than 0, at most 1", 1), default=1 / 1024,
                   help="scale of the VM sizes' cache sizes (default 1/1024: 200 GiB -> 200 MiB; at most 1)")
    p.add_argument("--ram-mib", type=NONNEGATIVE, default=16, help="RAM tier of the host cache")
    vm = sub.add_parser("vm", help="VMs on the host").add_subparsers(dest="action", required=True)
    p = vm.add_parser("create", help="a VM whose OS disk is made from an image")
    p.add_argument("name")
    p.add_argument("--size", default="D2s_v3")
    p.add_argument("--image", required=True)
    p.add_argument("--os-sku", default="Premium_LRS")
    p.add_argument("--os-caching", default="ReadWrite", choices=["None", "ReadOnly", "ReadWrite"])
    vm.add_parser("list")
    for name in ("show", "start"):
        vm.add_parser(name).add_argument("name")
    p = vm.add_parser("boot", help="boot reads through cache and throttle; reports time, IOPS, throttle stats")
    p.add_argument("name")
    p.add_argument("--trace", help='a trace file: one "OFFSET LENGTH" read per line (default: a built-in boot)')
    p.add_argument("--real", action="store_true", help="boot in qemu-system-x86_64 from the disk served over NBD")
    p.add_argument("--timeout", type=POSITIVE, default=60, help="with --real: seconds before giving up")
    p.add_argument("--interface", choices=["ide", "virtio"], default="ide", help="with --real: the boot disk's bus")
    p = sub.add_parser("bootable-image", help="build a fixed VHD with the project's boot sector")
    p.add_argument("path")
    p.add_argument("--size", type=_bytes_arg, default="64M", help="virtual size: 64M, 10G (a multiple of 1 MiB)")
    p.add_argument("--sectors", type=_number(int, 1, False, "1 to 127", 127), default=100,
                   help="sectors the guest reads and digests (1 to 127)")
    p = vm.add_parser("stop")
    p.add_argument("name")
    p.add_argument("--no-deallocate", action="store_true")
    p = vm.add_parser("delete")
    p.add_argument("name")
    p.add_argument("--delete-os-disk", action="store_true")
    p = vm.add_parser("attach", help="attach a disk at a LUN")
    p.add_argument("name")
    p.add_argument("disk")
    p.add_argument("--lun", type=int, required=True)
    p.add_argument("--caching", default="None", choices=["None", "ReadOnly", "ReadWrite"])
    p = vm.add_parser("detach")
    p.add_argument("name")
    p.add_argument("--lun", type=int, required=True)
    cache = sub.add_parser("cache", help="the host cache").add_subparsers(dest="action", required=True)
    cache.add_parser("stats", help="lines, dirty ranges, hits and misses")
    cache.add_parser("lose", help="fault: the host's local disk is lost (unflushed writes with it)")
    p = sub.add_parser("serve", help="export a VM's attached disks over NBD, through cache and throttle",
                       description="Serve disks attached to a VM over NBD until interrupted: what a client "
                       "(nbdinfo, nbdcopy, qemu-img, fio) measures is the disk's tier. Export names are "
                       "'os' and 'lunN'. With --workers N, N processes serve (one core each), clients dealt "
                       "to them in turn, so a client with several connections (nbdcopy --connections=4, "
                       "fio --numjobs=4) uses several cores; the disks' and the VM's limits hold across them "
                       "(one throttle, in the host folder). Only fixed-VHD disks can be shared so: an OS disk "
                       "made from an image is a differencing VHD, served apart with --workers 1.")
    p.add_argument("name", help="the VM")
    p.add_argument("--lun", type=int, action="append", help="a data disk's LUN (repeatable; default: all and os)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket")
    where.add_argument("--port", type=_number(int, 1, False, "a TCP port, 1 to 65535", 65535), default=10809)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--max-inflight-mib", type=int, default=128,
                   help="memory for requests in flight, all clients together (default 128; at most half "
                   "per client); past it the server stops reading requests until replies have left "
                   "(with --workers: in each worker)")
    p.add_argument("--workers", type=_number(int, 1, False, "at least 1, at most 64", 64), default=1,
                   help="worker processes serving clients (default 1: one core; use the machine's core count "
                   "for clients with several connections; --max-connections and --max-inflight-mib are per worker)")
    p.add_argument("--worker-control", type=int, help=argparse.SUPPRESS)  # a worker: its supervisor's socket
    p.add_argument("--worker-lease", action="append", default=[], help=argparse.SUPPRESS)  # LUN=LEASE
    _connection_opts(p)
    p.add_argument("--no-reclaim", action="store_true",
                   help="do not reclaim the stamp's space while serving (default: a thread runs "
                   "`stamp gc --watch`'s rounds, so a long benchmark does not fill the disk)")
    p = sub.add_parser("mount", help="an attached disk as DIR/disk through FUSE (and its filesystem), root only",
                       description="Serve one of a VM's disks (through cache and throttle) and expose it "
                       "as DIR/disk with nbdfuse; --fs MNT also loop-mounts its filesystem. "
                       "`hostcache umount DIR` undoes it and flushes.")
    p.add_argument("name", help="the VM")
    p.add_argument("dir")
    p.add_argument("--lun", type=int, help="a data disk's LUN (default: the OS disk)")
    p.add_argument("--fs", metavar="MNT")
    p.add_argument("--partition", type=COUNT, help="with --fs: the partition holding it (1-based)")
    p = sub.add_parser("umount", help="undo hostcache mount")
    p.add_argument("dir")
    throttle = sub.add_parser("throttle", help="a VM's throttle").add_subparsers(dest="action", required=True)
    throttle.add_parser("stats", help="consumed percent, burst credits, time throttled (as last recorded)"
                        ).add_argument("name")
    p = sub.add_parser("tiers", help="every size of a tiered SKU")
    p.add_argument("sku", choices=[s for s in SKUS if s not in ("PremiumV2_LRS", "UltraSSD_LRS")])
    for name, helptext in (("limits", "the limits of one disk"), ("simulate", "IOPS and MB/s by queue depth")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("sku", choices=SKUS)
        p.add_argument("size_gib", type=POSITIVE, help="the disk's size in GiB (rounded up to a whole GiB)")
        p.add_argument("--iops", type=COUNT, help="provisioned IOPS (PremiumV2_LRS, UltraSSD_LRS)")
        p.add_argument("--mbps", type=POSITIVE, help="provisioned MB/s (PremiumV2_LRS, UltraSSD_LRS)")
        p.add_argument("--tier", help="a performance tier (Premium_LRS: at or above the size's own, e.g. P50 for "
                       "a 128 GiB disk)")
        p.add_argument("--performance-plus", action="store_true")
        p.add_argument("--on-demand-bursting", action="store_true")
        p.add_argument("--edition", choices=EDITIONS, default="current",
                       help="which published figures where sources disagree (default: current; Standard SSD has 2019, "
                            "Premium v2 and Ultra 2024 and 2022; another is refused)")
        if name == "simulate":
            p.add_argument("--vm", default="D8s_v3")
            p.add_argument("--qd", type=COUNT, nargs="+", default=[1, 4, 16, 64])
            p.add_argument("--size", type=_bytes_arg, default="4K", help="I/O size: 4K, 64K, 1M")
            p.add_argument("--write", action="store_true")
            p.add_argument("--cached", choices=["none", "hit", "miss"], default="none")
            p.add_argument("--seconds", type=POSITIVE, default=5.0, help="simulated seconds (more than 0)")
            p.add_argument("--no-latency", action="store_true", help="turn the service-latency model off")
    p = sub.add_parser("vm-size", help="a VM size's storage limits, and what it does not publish")
    p.add_argument("name", nargs="?", help="e.g. D8s_v3, case-insensitive (default: list the names)")
    p = sub.add_parser("sizes", help="the published VM sizes with their storage limits, filtered")
    p.add_argument("--family", help="e.g. Dsv5, Esv3 (case-insensitive)")
    p.add_argument("--name", help="names containing this text")
    p.add_argument("--premium", action=argparse.BooleanOptionalAction, help="premium storage supported (or not)")
    p.add_argument("--caching", action=argparse.BooleanOptionalAction, help="host caching supported (or not)")
    p.add_argument("--min-vcpus", type=COUNT)
    return top


def run(a: argparse.Namespace) -> object:
    if a.cmd == "init":
        key = read_key_file(a.account_key_file) if a.account_key_file else a.account_key
        with Host.create(a.host, a.stamp, cache_bytes=a.cache_mib << 20 if a.cache_mib is not None else None,
                         ram_bytes=a.ram_mib << 20, cache_scale=a.cache_scale, account_key=key,
                         ca_file=a.ca_file) as h:
            return {"host": h.path, **{k: ("(kept)" if k == "account_key" else v) for k, v in h.config.items()}}
    if a.cmd == "serve":
        return serve(a)
    if a.cmd == "mount":
        from vhd.mount import helper, mount_served

        with Host(a.host) as h:  # clear errors now: the VM and the LUN exist
            vm = h.vm(a.name)
            if a.lun is not None and str(a.lun) not in vm["data_disks"]:
                raise HostError(f"VM {a.name} has no disk at LUN {a.lun}")
        lun_args = ["--lun", str(a.lun)] if a.lun is not None else ["--lun", "-1"]
        cmd = helper("hostcache", "--host", os.path.abspath(a.host), "serve", a.name, *lun_args)
        export = "os" if a.lun is None else f"lun{a.lun}"
        return mount_served(cmd, export, f"{os.path.abspath(a.host)}:{a.name}:{export}", a.dir, fs=a.fs, partition=a.partition)
    if a.cmd == "umount":
        from vhd.mount import umount

        return umount(a.dir)
    if a.cmd == "bootable-image":
        from .bootsector import build

        return {"image": a.path, "crc32": build(a.path, a.size, a.sectors)}  # also recorded in the image
    if a.cmd in ("vm", "cache", "throttle"):
        with Host(a.host) as h:
            return host_command(h, a)
    if a.cmd == "tiers":
        return [t.to_json() for t in catalog(a.sku)]
    if a.cmd == "limits":
        return _disk(a).to_json()
    if a.cmd == "vm-size":
        if a.name is None:
            return [v.name for v in vm_sizes()]
        return {**vm_limits(a.name).to_json(), **vm_provenance(a.name)}
    if a.cmd == "sizes":
        return [_size_row(v.to_json()) for v in vm_sizes(a.family, a.name, a.premium, a.caching, a.min_vcpus)]
    return _simulate(a)


SIZE_FIELDS = ("name", "family", "vcpus", "max_data_disks", "premium_storage", "host_caching", "cache_size_gib",
               "cached_iops", "cached_mbps", "cached_burst_iops", "cached_burst_mbps", "uncached_iops", "uncached_mbps", "burst_iops", "burst_mbps",
               "ultra_iops", "ultra_mbps", "mbps_unit")


def _size_row(full: dict[str, Any]) -> dict[str, Any]:
    return {k: full[k] for k in SIZE_FIELDS}


def _simulate(a: argparse.Namespace) -> object:
    """IOPS by queue depth; MB/s in the disk's own unit (its limits' mbps_unit)."""
    limits = _disk(a)
    path = {"none": Path.UNCACHED, "hit": Path.CACHED_HIT, "miss": Path.CACHED_MISS}[a.cached]
    out = []
    for qd in a.qd:
        t = Throttle(vm_limits(a.vm), FakeClock(), latency=not a.no_latency)
        t.add_disk("disk", limits)
        iops = simulate(t, [Workload("disk", a.size, a.write, qd, path)], a.seconds, warmup=min(1.0, a.seconds / 5))
        out.append({"qd": qd, "iops": round(iops["disk"], 1),
                    "mbps": round(iops["disk"] * a.size / limits.mbps_unit, 2)})
    return {"disk": limits.to_json(), "vm": vm_limits(a.vm).name, "io_size": a.size, "write": a.write,
            "cached": a.cached, "mbps_unit": limits.to_json()["mbps_unit"], "results": out}


def host_command(h: Host, a: argparse.Namespace) -> object:
    if a.cmd == "throttle":
        return h.throttle_stats(a.name)
    if a.cmd == "cache":
        if a.action == "lose":
            return {"lost": h.cache.lose()}
        return {"lines": len(h.cache.lines), "slots": h.cache.slots, "dirty": h.cache.dirty(),
                **h.cache.stats.to_json()}
    act = a.action
    if act == "create":
        return h.create_vm(a.name, a.size, a.image, a.os_sku, a.os_caching)
    if act == "list":
        return h.vms()
    if act == "show":
        return h.vm(a.name)
    if act == "attach":
        return h.attach(a.name, a.disk, a.lun, a.caching)
    if act == "detach":
        return h.detach(a.name, a.lun)
    if act == "boot":
        return h.boot(a.name, a.trace, real=a.real, timeout=a.timeout, interface=a.interface)
    if act == "stop":
        return h.stop(a.name, deallocate=not a.no_deallocate)
    if act == "start":
        return h.start(a.name)
    h.delete_vm(a.name, delete_os_disk=a.delete_os_disk)
    return {"deleted": a.name}


def _reclaiming(a: argparse.Namespace, stamp: Any) -> AbstractContextManager[Any]:
    """The stamp's reclaimer, a companion process (stamp.reclaim.Companion:
    not a thread, which would share the event loop's GIL), for as long as a
    serve runs (none with --no-reclaim, nor over the network: the stamp's
    space is reclaimed where it is served, `stamp gc --watch`): a round under
    way ends before the context does."""
    from stamp.hosted import is_remote
    from stamp.reclaim import Companion

    return nullcontext() if a.no_reclaim or is_remote(stamp) else Companion(stamp.path)


def _reclaimed(reclaimer: Any) -> dict[str, Any]:
    return {} if reclaimer is None else {"reclaimed": reclaimer.stats}


def serve(a: argparse.Namespace) -> object:
    from stamp.pageblob import PageBlobs
    from vhd.nbd import Export, NbdServer, claim_socket, run_server, server_budget

    from .host import OS_LUN, AsyncDisk

    budget = server_budget(a.max_inflight_mib, a.max_connections)
    if a.worker_control is not None:
        return serve_worker(a, budget)
    if a.workers > 1:
        return serve_workers(a)
    if a.socket:
        claim_socket(a.socket)  # before the disks are opened (and their leases taken)
    with Host(a.host) as h:
        vm = h.vm(a.name)
        luns = a.lun if a.lun else [OS_LUN] + sorted(int(k) for k in vm["data_disks"])
        exports = {}
        for lun in luns:
            name = "os" if lun == OS_LUN else f"lun{lun}"
            disk = h.open_disk(a.name, lun)
            exports[name] = Export(name, AsyncDisk(disk), f"{a.name} {disk.name} ({disk.mode.value})")  # type: ignore[arg-type]
        with _reclaiming(a, h.stamp) as reclaimer:  # stopped before the stamp closes
            run_server(NbdServer(exports, budget, a.max_connections, a.stall_timeout), a.socket, a.bind, a.port)
        # how long writes waited for the reclaimer (a local stamp's; over the network none runs)
        blobs = h.stamp.blobs
        held = blobs.pressure.stats.to_json() if reclaimer and isinstance(blobs, PageBlobs) else None
    return {"stopped": a.name, **_reclaimed(reclaimer), **({"writers_held": held} if reclaimer else {})}


def _worker_luns(h: Host, a: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """The disks --workers serves, by LUN, each a fixed VHD (clear errors, not a worker's traceback)."""
    from .host import OS_LUN

    vm = h.vm(a.name)
    if vm["state"] != "Running":
        raise HostError(f"VM {a.name} is {vm['state']}: start it first")
    luns = a.lun if a.lun else [OS_LUN] + sorted(int(k) for k in vm["data_disks"])
    out = {}
    for lun in luns:
        entry = vm["os_disk"] if lun == OS_LUN else vm["data_disks"].get(str(lun))
        if entry is None:
            raise HostError(f"VM {a.name} has no disk at LUN {lun}")
        rec = h.disks.record(entry["disk"])
        if rec.get("vhd_type") != "fixed":
            where = "the OS disk" if lun == OS_LUN else f"the disk at LUN {lun}"
            raise HostError(f"{where} ({entry['disk']}) is a {rec.get('vhd_type')} VHD: its block table lives "
                            "in the process that opens it, so several workers cannot write it. Serve it with "
                            f"--workers 1 (hostcache serve {a.name} --lun {lun} --socket ...) and the fixed disks "
                            f"with --workers {a.workers} (--lun 0 --lun 1 ...)")
        out[lun] = rec
    return out


def serve_workers(a: argparse.Namespace) -> object:
    """The supervisor of `serve --workers N` (workers.py): the leases, the socket, the workers."""
    import socket as socketlib

    from vhd.nbd import claim_socket

    from .workers import Supervisor

    if a.socket:
        claim_socket(a.socket)
    with Host(a.host) as h:
        disks = _worker_luns(h, a)
        leases: dict[int, str] = {}
        try:
            for lun, rec in disks.items():
                leases[lun] = h.stamp.blobs.acquire_writer_lease(rec["blob"])
            listener = _listen(a)
            try:
                command = [sys.executable, "-m", "hostcache", "--host", os.path.abspath(a.host), "serve", a.name,
                           "--max-inflight-mib", str(a.max_inflight_mib), "--max-connections", str(a.max_connections),
                           "--stall-timeout", str(a.stall_timeout)]
                for lun in disks:
                    command += ["--lun", str(lun), f"--worker-lease={lun}={leases[lun]}"]
                sup = Supervisor(listener, a.workers, command)
                sup.start()
                where = f"unix socket {a.socket}" if a.socket else f"{a.bind}:{a.port}"
                print(json.dumps({"serving": [_export(lun) for lun in disks], "at": where,
                                  "workers": [w.pid for w in sup.workers]}), flush=True)
                with _reclaiming(a, h.stamp) as reclaimer:  # one for all the workers
                    sup.run()
            finally:
                listener.close()
                if a.socket and listener.family == socketlib.AF_UNIX:
                    try:
                        os.unlink(a.socket)
                    except FileNotFoundError:
                        pass
        finally:
            for lun, lease in leases.items():
                _settle(h, disks[lun]["blob"], lease)
    return {"stopped": a.name, "workers": a.workers, "restarted": sup.restarts, **_reclaimed(reclaimer)}


def _settle(h: Host, blob: str, lease: str) -> None:
    """The workers are gone: write back what a killed one left dirty, record the
    version the cache's clean lines match, release the lease (whatever failed)."""
    try:
        h.cache.flush(h.stamp, blob, lease)
        h.stamp.flush()
        h.cache.close_blob(h.stamp, h.stamp.blobs.version(blob)[0])
    finally:
        try:
            h.stamp.blobs.release_lease(blob, lease)
        except StampError:
            pass


def _export(lun: int) -> str:
    return "os" if lun < 0 else f"lun{lun}"


def _listen(a: argparse.Namespace) -> Any:
    """The listening socket the supervisor accepts on (a live server's socket refused)."""
    import socket as socketlib

    if not a.socket:
        try:
            return socketlib.create_server((a.bind, a.port), backlog=128)
        except OSError as e:
            raise HostError(f"cannot listen on {a.bind}:{a.port} ({e.strerror or e}): stop what listens there, "
                            "or choose another --port") from None
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        sock.bind(a.socket)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise HostError(f"{a.socket} is already in use: stop that server, or choose another --socket") from None
        raise HostError(f"cannot listen on {a.socket} ({e.strerror or e}): choose another --socket") from None
    sock.listen(128)
    return sock


def serve_worker(a: argparse.Namespace, budget: Any) -> object:
    """A worker of `serve --workers N`: the disks under the supervisor's leases,
    serving the clients it hands over until SIGTERM or its supervisor goes."""
    import asyncio
    import signal
    import socket as socketlib

    from vhd.budget import fixed_mmap_threshold
    from vhd.nbd import Export, NbdServer

    from .host import AsyncDisk
    from .workers import READY, worker_fds

    fixed_mmap_threshold()  # as run_server does: freed buffers go back to the system
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops its workers
    leases = dict(item.split("=", 1) for item in a.worker_lease if "=" in item)
    try:
        control = socketlib.socket(fileno=a.worker_control)
        if control.family != socketlib.AF_UNIX or any(str(lun) not in leases for lun in a.lun):
            raise OSError(errno.EINVAL, "not a supervisor's")
    except OSError:
        raise HostError("--worker-control and --worker-lease are for the workers hostcache serve --workers starts; "
                        "serve with --workers N") from None
    with Host(a.host) as h:
        exports = {}
        for lun in a.lun:
            disk = h.open_disk(a.name, lun, shared_lease=leases[str(lun)])
            exports[_export(lun)] = Export(_export(lun), AsyncDisk(disk),  # type: ignore[arg-type]
                                           f"{a.name} {disk.name} ({disk.mode.value}) worker pid {os.getpid()}")
        server = NbdServer(exports, budget, a.max_connections, a.stall_timeout)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            clients: set[asyncio.Task[None]] = set()

            def handed() -> None:
                fds = worker_fds(control)
                if fds is None:  # the supervisor is gone
                    loop.remove_reader(control.fileno())
                    stop.set()
                    return
                for fd in fds:
                    task = loop.create_task(server.adopt(socketlib.socket(fileno=fd)))
                    clients.add(task)
                    task.add_done_callback(clients.discard)
            control.setblocking(False)
            loop.add_reader(control.fileno(), handed)
            control.send(READY)
            await stop.wait()
        asyncio.run(main())  # on the way out the clients' handlers are cancelled
    return None


def main(argv: Sequence[str] | None = None) -> int:
    standard_streams()
    args = build_parser().parse_args(argv)
    try:
        print(json.dumps(run(args), indent=2, default=str))
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
    except (HostError, StampError, VhdError) as e:
        print(f"hostcache {args.cmd}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # | head: quietly, as cat does
        from vhd.cli import closed_pipe

        return closed_pipe()
    except (OSError, lmdb.Error) as e:
        if isinstance(e, OSError) and e.errno not in FOLDER_ERRORS:
            raise
        print(f"hostcache {args.cmd}: a file of the host or the stamp cannot be written ({e}): "
              "free space or make the folder writable, then run the command again", file=sys.stderr)
        return 1
    return 0


# the folder's own state, not a bug: a full or read-only disk (for LMDB, every lmdb.Error)
FOLDER_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


if __name__ == "__main__":
    sys.exit(main())
