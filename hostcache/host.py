"""A physical host: VMs, their disks attached at LUNs, one BlobCache.

    HOST/host.json    {"id": the host's identity in the disk records its VMs have (a uuid; a folder
                      made before ids has none: identity()), "stamp": path of the stamp folder, or
                      the URL of a `stamp serve` (a host over the network: stamp.remote),
                      "account_key" (if given), "ca_file" (if given: "ca.pem"), "cache_bytes",
                      "cache_scale", "ram_bytes"}; mode 0600, replaced whole (hostfile.py)
    HOST/ca.pem       the CA an https stamp's certificate is verified with (`init --ca-file`)
    HOST/host.lock    held (flock) by a compute call, whatever the process: one at a time
    HOST/state/       LMDB: tables vms (name -> JSON) and throttle (name -> last statistics)
    HOST/cache/       the BlobCache (cache.dat and its index)
    HOST/throttle/    the throttle's buckets (buckets.py), one per VM and one per
                      disk, keyed by name and creation time: shared by every
                      process using the host, and kept across detach and attach
                      (a detached disk's credits also go in its stamp record, for
                      the next host that attaches it);
                      credits accrue only while running (a detached disk or a
                      stopped VM is paused: Throttle.pause and resume)

The cache is sized from the VM sizes' cache sizes, scaled down for emulation
(cache_scale, default 1/1024: a D8s_v3's 200 GiB cache becomes 200 MiB): it
grows as VMs arrive (the sum over the host's VMs) and does not shrink; a
size that publishes no cache size adds nothing. A host created with an
explicit cache size keeps that size.

Platform rules kept here (reference files: host_caching, managed_disk_limits,
VM sizes), refused with the platform's error codes (errors.py):
- a VM size takes at most `max_data_disks` data disks (OperationNotAllowed),
  at LUNs 0 to that - 1 (a LUN outside, or taken: InvalidParameter);
- a disk is attached to one VM at a time (its managed-disk state says
  where; ConflictingUserInput); the state moves from Unattached to Attached
  in one stamp transaction, so two hosts attaching it at once cannot both win;
- a LUN is a whole number (InvalidParameter);
- attach marks the disk (with this host's identity) before the VM's record
  lists it, detach unlists before unmarking: a process killed in between
  leaves a disk marked for a LUN its VM does not list, which the next attach
  or detach on that VM settles as unattached;
- host caching (ReadOnly, ReadWrite) only for Premium, Standard SSD and
  Standard HDD disks under 4 TiB (sizes rounded up to a whole GiB), and only
  on VM sizes that support premium storage caching (OperationNotAllowed);
  an OS disk asked for None gets ReadOnly where the size caches, and stays
  None where it does not; changing a disk's caching is a detach and a
  reattach;
- an OS disk is at most 4,095 GiB and is not Ultra or Premium SSD v2
  (OperationNotAllowed); Premium SSD, Premium SSD v2 and Ultra disks need a
  size with premium storage;
- create_vm checks the image (vhd's check: footers, checksums) and every
  rule before it creates the OS disk, and a refused call leaves nothing;
- detach, stop and delete flush the disk's dirty cache lines first (under
  the disk's writer lease, taken anew if the process that held it died);
  detach and delete also drop its lines (it may be written elsewhere
  meanwhile); all three are refused while another live process of the host
  has the disk open (`hostcache serve`, `mount`), which would go on writing.
An attached disk (AttachedDisk) is a block device: its VHD is read by vhd
over CachedBlob files, and every I/O is admitted by the VM's Throttle; the
I/O returns when the throttle's completion time has come (the clock waits).
Several processes may act on one host: state is in LMDB, the compute calls
(create, attach, detach, caching, stop, start, delete) run one at a time
under HOST/host.lock, each reading the records it checks inside it, the
throttle's buckets are files in the host folder (buckets.py) shared by them
all; the open disks live in the process that serves them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lmdb

from stamp.blobfile import PageBlobFile
from stamp.disks import DiskState, ResourceInUse, VirtualDisk, open_recovered
from stamp.errors import LeaseAlreadyPresent
from stamp.errors import OperationNotAllowed as StampNotAllowed
from stamp.hosted import is_remote, is_url, open_for_host
from stamp.pageblob import PageBlobs
from stamp.pressure import Gate
from vhd.blockdev import Extent
from vhd.check import check as check_vhd
from vhd.image import FixedImage, Image, SparseImage, open_image
from vhd.nbd import Export, NbdServer

from . import hostfile
from .boot import boot_trace, find_boot_partition, load_trace
from .bootsector import BANNER, first_change, is_ours, recorded_digest
from .buckets import BucketStore
from .cache import BlobCache, CachedBlob, CacheMode
from .errors import ConflictingUserInput, HostError, HostRuleError, InvalidParameter, OperationNotAllowed
from .grants import GRANT_SECONDS
from .overlap import POOL_THREADS, Overlapped
from .throttle import Clock, MonotonicClock, Path, Throttle
from .tiers import PREMIUM_SKUS, ULTRA_SKUS, DiskLimits, VmLimits, disk_limits, vm_limits

OS_LUN = -1
GIB = 1024 ** 3
OS_DISK_MAX_GIB = 4095  # managed_disk_limits.os_disk
MAX_CACHE_BYTES = 16 << 40  # the largest file ext4 holds: the cache file is one
HOST_FILES = ("host.json", "host.lock", "state", "cache", "throttle", "ca.pem")
CA_FILE = "ca.pem"  # the CA an https stamp's certificate is verified with, copied in by `hostcache init --ca-file`
MAX_CA_BYTES = 1 << 20
# How often an attached disk's I/O looks at its stamp record for a performance change (one read each
# time): a change takes effect within this much of the host's clock, at a bounded cost per I/O.
PERFORMANCE_LOOK_SECONDS = 0.05
ACCOUNT_KEY_ENV = "DISKSTAMP_ACCOUNT_KEY"


def key_of(config: dict[str, Any]) -> str | None:
    """The key a host over the network signs with: $DISKSTAMP_ACCOUNT_KEY, else
    the one given to `hostcache init`, else None (the devstore account's key)."""
    return os.environ.get(ACCOUNT_KEY_ENV) or config.get("account_key")


def _unmake(path: str, made: bool, there: set[str]) -> None:
    """Remove what Host.create made in `path`: the folder if it made it, else
    the host's files that were not `there` before."""
    if made:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in set(HOST_FILES) - there:
        where = os.path.join(path, name)
        if os.path.isdir(where):
            shutil.rmtree(where, ignore_errors=True)
        elif os.path.exists(where):
            os.unlink(where)


def _read_ca(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as e:
        raise HostError(f"cannot read the CA file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CA_BYTES:
        raise HostError(f"the CA file {path} is over {MAX_CA_BYTES >> 20} MiB: give the CA's PEM certificate")
    return data


def _size_gib(rec: dict[str, Any]) -> float:
    return float(rec.get("size_bytes", rec["size_gib"] * GIB)) / GIB


def _limits(rec: dict[str, Any]) -> DiskLimits:
    """A disk record's limits (disk_limits rounds the size up to a whole GiB):
    its provisioned IOPS and MB/s, or its performance tier, as the stamp keeps
    them (a record made before they were kept has the defaults)."""
    sku = rec["sku"]
    if sku in ULTRA_SKUS:
        return disk_limits(sku, _size_gib(rec), iops=rec.get("disk_iops_read_write"),
                           mbps=rec.get("disk_mbps_read_write"))
    return disk_limits(sku, _size_gib(rec), tier=rec.get("tier") if sku == "Premium_LRS" else None)


def _disk_key(rec: dict[str, Any]) -> str:
    """A disk's throttle bucket: a disk deleted and made again under its name starts afresh."""
    return f"disk {rec['name']} {rec.get('created', 0)}"


def _label(lun: int) -> str:
    """How a disk's limiters are named in the VM's statistics: "os", "lun0"..."""
    return "os" if lun == OS_LUN else f"lun{lun}"


def _vm_key(vm: dict[str, Any]) -> str:
    return f"vm {vm['name']} {vm.get('created', 0)}"


def _attached_elsewhere(rec: dict[str, Any]) -> HostRuleError:
    if rec["state"] in (DiskState.READY_TO_UPLOAD.value, DiskState.ACTIVE_UPLOAD.value,
                        DiskState.ACTIVE_SAS.value):  # an upload or a download is under way
        return OperationNotAllowed(f"Operation 'attachDisk' is not allowed on disk '{rec['name']}' since the disk "
                                   f"is in '{rec['state']}' state: finish the upload or download and revoke "
                                   "access first (stamp disk revoke-access)")
    where = rec.get("attached_to")
    return ConflictingUserInput("A disk can be attached to only one VM at a time: "
                                f"disk {rec['name']} is {rec['state']}" + (f" to VM {where}" if where else "")
                                + "; detach it there first")


def _check_sku_on_size(limits: VmLimits, sku: str, disk: str) -> None:
    if sku in PREMIUM_SKUS and not limits.premium_storage:
        raise OperationNotAllowed(f"VM size {limits.name} does not support premium storage: disk {disk} is "
                                  f"{sku}; use a size with premium storage (an 's' size) or a Standard disk")


def _lun(value: object) -> int:
    """A LUN as the caller gave it: a whole number (a float or a bool would be
    kept in the VM's record under a key no later call could read back)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"a LUN is a whole number, not {value!r}")
    return value


def _entry(vm: dict[str, Any], lun: int) -> dict[str, Any] | None:
    """The VM's disk entry at `lun` (OS_LUN for the OS disk), or None."""
    entry: dict[str, Any] | None = vm["os_disk"] if lun == OS_LUN else vm["data_disks"].get(str(lun))
    return entry


@dataclass
class Sleeper:
    """Waits until a time on the clock; a FakeClock is advanced instead."""

    clock: Clock

    def until(self, t: float) -> None:
        now = self.clock.now()
        if t <= now:
            return
        advance = getattr(self.clock, "advance", None)
        if advance is not None:
            advance(t - now)
        else:
            time.sleep(t - now)


class Host:
    def __init__(self, path: str, clock: Clock | None = None, latency: bool = True) -> None:
        try:
            with open(os.path.join(path, "host.json")) as f:
                self.config = json.load(f)
        except FileNotFoundError:
            raise HostError(f"{path} is not a host folder (no host.json): create one with `hostcache init`") from None
        except (ValueError, UnicodeDecodeError) as e:  # cut short by a writer before host.json was replaced whole
            raise HostError(f"{path}/host.json is damaged ({e}): it is not JSON") from None
        self.path = path
        ca = os.path.join(path, self.config["ca_file"]) if self.config.get("ca_file") else None
        self.stamp, self.disks = open_for_host(self.config["stamp"], key_of(self.config), ca, self.identity())
        self.env = lmdb.open(os.path.join(path, "state"), map_size=1 << 30, max_dbs=3, mode=0o700)
        self.vms_db = self.env.open_db(b"vms")
        self.stats_db = self.env.open_db(b"throttle")
        self.cache = BlobCache(os.path.join(path, "cache"), self.config["cache_bytes"],
                               ram=self.config.get("ram_bytes", 0))
        self.cache.prune(self.stamp)  # lines of disks deleted meanwhile go
        self.clock = clock or MonotonicClock()
        self.buckets = BucketStore(os.path.join(path, "throttle"), self.clock.epoch)
        self.latency = latency
        self.throttles: dict[str, Throttle] = {}
        self.open_disks: dict[tuple[str, int], AttachedDisk] = {}
        self._call_lock = threading.RLock()
        self._call_fd = -1  # HOST/host.lock while a compute call of this process holds it
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # overlapped remote I/O (overlap.py)

    @classmethod
    def create(cls, path: str, stamp_path: str, cache_bytes: int | None = None, ram_bytes: int = 0,
               cache_scale: float = 1 / 1024, account_key: str | None = None, ca_file: str | None = None,
               **kw: Any) -> Host:
        """A host over a stamp: its folder, or the URL of a `stamp serve`
        (http(s)://HOST:PORT/ACCOUNT, signed with `account_key`, else
        $DISKSTAMP_ACCOUNT_KEY when the host is used, else the devstore key;
        an https one's certificate verified with the CA in `ca_file`, copied
        into the host folder so every later command trusts that CA).
        cache_bytes None: sized from its VMs' cache sizes times cache_scale
        (starting at 64 MiB)."""
        if os.path.exists(os.path.join(path, "host.json")):
            raise HostError(f"{path} already holds a host")
        if cache_bytes is not None and not 1 << 20 <= cache_bytes <= MAX_CACHE_BYTES:
            raise HostError(f"a host cache of {cache_bytes} bytes cannot be: give 1 MiB to 16 TiB")
        if not 0 < cache_scale <= 1 or ram_bytes < 0:
            raise HostError("cache_scale must be more than 0 and at most 1 (the sizes' own cache), "
                            "and ram_bytes 0 or more")
        config = {"id": str(uuid.uuid4()), "stamp": stamp_path if is_url(stamp_path) else os.path.abspath(stamp_path),
                  "cache_bytes": cache_bytes or 64 * 1024 * 1024, "cache_scale": None if cache_bytes else cache_scale,
                  "ram_bytes": ram_bytes}
        if account_key is not None:
            config["account_key"] = account_key
        ca = _read_ca(ca_file) if ca_file else None
        open_for_host(stamp_path, key_of(config), ca_file)[0].close()  # a clear error now if it is not a stamp
        made = not os.path.exists(path)
        there = {n for n in HOST_FILES if os.path.exists(os.path.join(path, n))}
        os.makedirs(path, mode=0o700, exist_ok=True)  # made here: private (its cache holds guests' data)
        try:
            if ca is not None:  # the CA that was verified, as it was then (the file given may change)
                hostfile.write_private(os.path.join(path, CA_FILE), ca)
                config["ca_file"] = CA_FILE
            hostfile.write_json(os.path.join(path, "host.json"), config)  # 0600 from its creation: a key may be in it
            return cls(path, **kw)
        except BaseException as e:  # a host that cannot open is not left behind
            _unmake(path, made, there)
            if isinstance(e, OSError):
                raise HostError(f"cannot make the host in {path}: {e.strerror or e}") from None
            raise

    def io_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that run the overlapped I/O of this host's remote disks
        (overlap.py): one pool for every disk, so threads and their connections
        to the stamp are bounded by POOL_THREADS however many disks are open."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="remote-io")
        return self._pool

    def identity(self) -> str:
        """How this host names itself in the disk records it attaches (and
        in the writer leases it asks the host API for): the host folder's
        id, made by `hostcache init` (it goes with the folder, which holds
        the disks' dirty cache lines); a folder made before ids were, its
        path, and over the network also its machine."""
        if self.config.get("id"):
            return str(self.config["id"])
        here = os.path.abspath(self.path)
        return f"{socket.gethostname()}:{here}" if is_url(self.config["stamp"]) else here

    def _size_cache(self) -> None:
        """Grow the cache to the scaled sum of the VMs' cache sizes."""
        scale = self.config.get("cache_scale")
        if not scale:
            return
        gib = sum((vm_limits(vm["size"]).cache_size_gib or 0) for vm in self.vms())
        total = min(MAX_CACHE_BYTES, gib * GIB * scale)
        if total > self.config["cache_bytes"]:
            self.cache.grow(int(total))
            self.config["cache_bytes"] = int(total)
            hostfile.write_json(os.path.join(self.path, "host.json"), self.config)  # whole, or not at all

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        """One compute call at a time on this host, whatever the process: each
        reads the VM and disk records, checks its rules and writes them back
        under HOST/host.lock (flock), so two processes attaching at once cannot
        both take one LUN or one disk. Reentrant (set_caching is detach and attach)."""
        with self._call_lock:
            outer = self._call_fd < 0
            if outer:
                fd = os.open(os.path.join(self.path, "host.lock"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._call_fd = fd
            try:
                yield
            finally:
                if outer:
                    os.close(self._call_fd)  # releases the flock
                    self._call_fd = -1

    def close(self) -> None:
        if self.cache.fd < 0:
            return
        try:
            for disk in list(self.open_disks.values()):
                disk.close()
            self._record_throttle_stats()
        except lmdb.Error as e:  # the host's disk is full, say: the cache file keeps what was not flushed
            raise HostError(f"the host's state in {self.path} could not be written: {e}") from e
        finally:  # whatever failed, nothing stays open
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self.buckets.close()
            self.cache.close()
            self.env.close()
            self.stamp.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_throttle_stats(self) -> None:
        """Throttles live in the process that serves I/O; keep their last figures."""
        if not self.throttles:
            return
        with self.env.begin(write=True) as txn:
            for name, t in self.throttles.items():
                txn.put(name.encode(), json.dumps({"recorded": time.time(), "pid": os.getpid(),
                                                   "limiters": t.statistics()}).encode(), db=self.stats_db)

    def throttle_stats(self, vm_name: str) -> dict[str, Any]:
        """This process's figures for a VM it serves, else the last recorded
        ones; burst credits as the shared buckets hold them now, either way."""
        vm = self.vm(vm_name)
        stats = self._any_throttle(vm).statistics(running=vm["state"] == "Running")  # a stopped VM earns nothing
        credits = {name: v["burst_credits_percent"] for name, v in stats.items()}
        if vm_name in self.throttles:
            return {"live": True, "limiters": self.throttles[vm_name].statistics(), "credits_percent": credits}
        with self.env.begin() as txn:
            raw = txn.get(vm_name.encode(), db=self.stats_db)
        if raw is None:
            return {"live": False, "limiters": {}, "note": "no I/O recorded for this VM yet",
                    "credits_percent": credits}
        return {"live": False, **json.loads(bytes(raw)), "credits_percent": credits}

    # -- VM records ---------------------------------------------------------------------

    def vm(self, name: str) -> dict[str, Any]:
        with self.env.begin() as txn:
            raw = txn.get(name.encode(), db=self.vms_db)
        if raw is None:
            raise HostRuleError(f"no VM named {name!r} on this host")
        return dict(json.loads(bytes(raw)))

    def vms(self) -> list[dict[str, Any]]:
        with self.env.begin() as txn:
            return [json.loads(bytes(v)) for _, v in txn.cursor(db=self.vms_db)]

    def _put(self, vm: dict[str, Any]) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(vm["name"].encode(), json.dumps(vm).encode(), db=self.vms_db)

    # -- the compute calls ----------------------------------------------------------------

    def create_vm(self, name: str, size: str, image: str, os_sku: str = "Premium_LRS",
                  os_caching: str = "ReadWrite", os_size_gib: int | None = None) -> dict[str, Any]:
        """A VM whose OS disk is made from `image`. Every rule is checked
        first; if anything fails after the OS disk is made, it is deleted
        (unless another process granted access to it meanwhile: the create
        is then refused, and the disk stays, ActiveSAS, for its revoke)."""
        with self._serialized():
            return self._create_vm(name, size, image, os_sku, os_caching, os_size_gib)

    def _create_vm(self, name: str, size: str, image: str, os_sku: str, os_caching: str,
                   os_size_gib: int | None) -> dict[str, Any]:
        if os_size_gib is not None and (isinstance(os_size_gib, bool) or not isinstance(os_size_gib, int)
                                        or os_size_gib < 1):
            raise InvalidParameter(f"an OS disk size is a whole number of GiB, at least 1, not {os_size_gib!r}")
        limits = vm_limits(size)
        with self.env.begin() as txn:
            if txn.get(name.encode(), db=self.vms_db) is not None:
                raise HostRuleError(f"a VM named {name!r} already exists: delete it or choose another name")
        os_disk = f"{name}-osdisk"
        img = self.disks.image(image)
        size_bytes = int(img["size_bytes"]) if os_size_gib is None else os_size_gib * GIB
        self._check_os_disk(limits, os_disk, os_sku, size_bytes)
        caching = self._caching(os_disk, os_sku, size_bytes, os_caching, limits, is_os=True)
        self._check_image(image, img)
        self.disks.create_from_image(os_disk, image, size_gib=os_size_gib, sku=os_sku)
        try:
            vm = {"name": name, "size": limits.name, "state": "Running", "image": image, "created": time.time(),
                  "os_disk": {"disk": os_disk, "caching": caching}, "data_disks": {}}
            self._put(vm)
            self._size_cache()
            try:  # only from Unattached: another process may have granted access to the new disk meanwhile
                self.disks.set_state(os_disk, DiskState.ATTACHED, expect=DiskState.UNATTACHED, attached_to=name,
                                     lun=OS_LUN, host=self.identity())
            except ResourceInUse:
                raise _attached_elsewhere(self.disks.record(os_disk)) from None
        except BaseException:
            with self.env.begin(write=True) as txn:
                txn.delete(name.encode(), db=self.vms_db)
            try:  # (never attached: that is the try's last step)
                self.disks.delete_disk(os_disk)
            except StampNotAllowed:  # a grant another process took holds it (ActiveSAS): its revoke ends it
                pass
            raise
        return vm

    def _check_os_disk(self, limits: VmLimits, disk: str, sku: str, size_bytes: int) -> None:
        if sku in ULTRA_SKUS:
            raise OperationNotAllowed(f"{sku} disks cannot be OS disks: choose Premium_LRS, StandardSSD_LRS "
                                      "or Standard_LRS for the OS disk")
        if size_bytes > OS_DISK_MAX_GIB * GIB:
            raise OperationNotAllowed(f"an OS disk is at most {OS_DISK_MAX_GIB:,} GiB; {disk} would be "
                                      f"{size_bytes / GIB:,.3f} GiB: choose a smaller size")
        _check_sku_on_size(limits, sku, disk)

    def _check_image(self, name: str, img: dict[str, Any]) -> None:
        """A VM is not made from an image that cannot be read (footer, checksums)."""
        report = check_vhd(PageBlobFile(self.stamp, img["blob"], writable=False))
        errors = [p for p in report.problems if p.severity == "error"]
        if errors:
            raise HostRuleError(f"image {name!r} is damaged ({errors[0].where} at offset {errors[0].offset}: "
                                f"{errors[0].message}): make the image again from its source "
                                "(stamp image delete, then stamp image create)")

    def _caching(self, disk: str, sku: str, size_bytes: int, asked: str, vm: VmLimits, is_os: bool) -> str:
        """The caching mode a disk gets, or the platform's refusal."""
        try:
            mode = CacheMode(asked)
        except ValueError:
            raise InvalidParameter(f"caching must be None, ReadOnly or ReadWrite, not {asked!r}") from None
        if is_os and mode is CacheMode.NONE and vm.host_caching:
            mode = CacheMode.READONLY  # the platform's rule for OS disks
        if mode is CacheMode.NONE:
            return mode.value
        flag = "--os-caching None" if is_os else "caching None"
        if not vm.host_caching:
            raise OperationNotAllowed(f"VM size {vm.name} does not support host caching: use {flag} for {disk}")
        lim = disk_limits(sku, size_bytes / GIB)
        if sku in ULTRA_SKUS:
            raise OperationNotAllowed(f"host caching is not supported for {sku} disks: use {flag} for {disk}")
        if not lim.host_caching:
            raise OperationNotAllowed(f"host caching is only for disks under 4 TiB; {disk} is "
                                      f"{size_bytes / GIB:,.3f} GiB (counted as {lim.size_gib:,} GiB): "
                                      f"use {flag}")
        return mode.value

    def attach(self, vm_name: str, disk: str, lun: int, caching: str = "None") -> dict[str, Any]:
        with self._serialized():
            return self._attach(vm_name, disk, _lun(lun), caching)

    def _settle(self, vm: dict[str, Any]) -> None:
        """Finish what a process killed inside attach or detach left half done:
        a data disk whose stamp record names this VM and a LUN the VM's record
        does not give it (attach marks the disk first, detach unmarks it last)
        is attached to nothing. Only disks this host attached (a VM of that name
        on another host over the stamp is another VM)."""
        here = self.identity()
        for rec in self.disks.disks():
            lun = rec.get("lun")
            if rec.get("host") != here or rec.get("attached_to") != vm["name"] or lun is None or lun == OS_LUN:
                continue
            if vm["data_disks"].get(str(lun), {}).get("disk") != rec["name"]:
                self.disks.set_state(rec["name"], DiskState.UNATTACHED, attached_to=None, lun=None, host=None)

    def _attach(self, vm_name: str, disk: str, lun: int, caching: str) -> dict[str, Any]:
        vm = self.vm(vm_name)
        self._settle(vm)
        limits = vm_limits(vm["size"])
        rec = self.disks.record(disk)
        if rec["state"] != DiskState.UNATTACHED.value:
            raise _attached_elsewhere(rec)
        if not 0 <= lun < limits.max_data_disks:
            raise InvalidParameter(f"LUN {lun} is out of range: {limits.name} takes LUNs 0 to "
                                   f"{limits.max_data_disks - 1}")
        if str(lun) in vm["data_disks"]:
            raise InvalidParameter(f"LUN {lun} of VM {vm_name} holds {vm['data_disks'][str(lun)]['disk']}: "
                                   "choose a free LUN")
        if len(vm["data_disks"]) >= limits.max_data_disks:
            raise OperationNotAllowed(f"{limits.name} takes at most {limits.max_data_disks} data disks: "
                                      "detach one first or choose a larger size")
        _check_sku_on_size(limits, rec["sku"], disk)
        mode = self._caching(disk, rec["sku"], int(_size_gib(rec) * GIB), caching, limits, is_os=False)
        # a deallocated VM's disks are Reserved (stop), a disk attached to it too
        state = DiskState.RESERVED if vm["state"] == "Deallocated" else DiskState.ATTACHED
        try:  # only from Unattached: another host may have taken it since the check
            self.disks.set_state(disk, state, expect=DiskState.UNATTACHED, attached_to=vm_name, lun=lun,
                                 host=self.identity())
        except ResourceInUse:
            raise _attached_elsewhere(self.disks.record(disk)) from None
        vm["data_disks"][str(lun)] = {"disk": disk, "caching": mode}
        try:
            self._put(vm)
        except BaseException:
            self.disks.set_state(disk, DiskState.UNATTACHED, attached_to=None, lun=None, host=None)
            raise
        live = self.throttles.get(vm_name)
        if live is not None:  # a VM running in this process: its throttle learns the disk
            live.add_disk(str(lun), _limits(rec), key=_disk_key(rec), label=_label(lun))
        self._restore_credits(vm, lun, rec)
        if vm["state"] == "Running":
            self._any_throttle(vm).resume([str(lun)])
        return vm

    def detach(self, vm_name: str, lun: int) -> dict[str, Any]:
        with self._serialized():
            return self._detach(vm_name, _lun(lun))

    def _detach(self, vm_name: str, lun: int) -> dict[str, Any]:
        vm = self.vm(vm_name)
        self._settle(vm)
        entry = vm["data_disks"].get(str(lun))
        if entry is None:
            raise InvalidParameter(f"VM {vm_name} has no disk at LUN {lun}")
        self._flush_disk(vm_name, lun, entry["disk"], drop=True)
        if vm["state"] == "Running":
            self._any_throttle(vm).pause([str(lun)])
        credits = self._disk_credits(vm, lun)
        del vm["data_disks"][str(lun)]
        self._put(vm)
        live = self.throttles.get(vm_name)
        if live is not None:
            live.remove_disk(str(lun))
        self.disks.set_state(entry["disk"], DiskState.UNATTACHED, attached_to=None, lun=None, host=None,
                             throttle_credits=credits)
        self._prune_buckets()
        return vm

    def _disk_credits(self, vm: dict[str, Any], lun: int) -> list[float]:
        """The disk's burst credits as its bucket holds them (after the pause):
        kept in its stamp record when it leaves this host, so another host over
        the stamp attaching it next does not start it with a full bucket."""
        t = self._any_throttle(vm)
        with t.shared([str(lun)], self.clock.now()):
            return [lim.state()[1] for lim in t.disks[str(lun)].limiters]

    def _restore_credits(self, vm: dict[str, Any], lun: int, rec: dict[str, Any]) -> None:
        """A disk attached here gets the credits it left its last VM with, on any host."""
        saved = rec.get("throttle_credits")
        t = self._any_throttle(vm)
        if not saved or len(saved) != len(t.disks[str(lun)].limiters):
            return  # never detached: its bucket here (new: full) holds it
        now = self.clock.now()
        with t.shared([str(lun)], now):
            for lim, credits in zip(t.disks[str(lun)].limiters, saved, strict=True):
                lim.restore(now, float(credits))

    def set_caching(self, vm_name: str, lun: int, caching: str) -> dict[str, Any]:
        """Changing a disk's caching detaches and reattaches it (as the platform does)."""
        with self._serialized():
            return self._set_caching(vm_name, _lun(lun), caching)

    def _set_caching(self, vm_name: str, lun: int, caching: str) -> dict[str, Any]:
        entry = self.vm(vm_name)["data_disks"].get(str(lun))
        if entry is None:
            raise InvalidParameter(f"VM {vm_name} has no data disk at LUN {lun}")
        disk = entry["disk"]
        self._detach(vm_name, lun)
        return self._attach(vm_name, disk, lun, caching)

    def stop(self, vm_name: str, deallocate: bool = True) -> dict[str, Any]:
        with self._serialized():
            return self._stop(vm_name, deallocate)

    def _stop(self, vm_name: str, deallocate: bool) -> dict[str, Any]:
        vm = self.vm(vm_name)
        for lun, disk in self._luns(vm):  # every disk first: one open elsewhere refuses before any state changes
            self._flush_disk(vm_name, lun, disk)
        if vm["state"] == "Running":
            self._any_throttle(vm).pause([str(lun) for lun, _ in self._luns(vm)], vm=True)
        for lun, disk in self._luns(vm) if deallocate else []:
            self.disks.set_state(disk, DiskState.RESERVED, attached_to=vm_name, lun=lun, host=self.identity())
        vm["state"] = "Deallocated" if deallocate else "Stopped"
        self._put(vm)
        self.throttles.pop(vm_name, None)
        return vm

    def start(self, vm_name: str) -> dict[str, Any]:
        with self._serialized():
            return self._start(vm_name)

    def _start(self, vm_name: str) -> dict[str, Any]:
        vm = self.vm(vm_name)
        luns = self._luns(vm)
        for _, disk in luns:  # every disk first: one being downloaded refuses before any state changes
            self._refuse_if_downloaded("start", vm_name, disk)
        for i, (lun, disk) in enumerate(luns):
            try:  # refused in the state's own transaction if a grant came since the check
                self.disks.set_state(disk, DiskState.ATTACHED, attached_to=vm_name, lun=lun, host=self.identity())
            except StampNotAllowed:
                for lun0, disk0 in luns[:i] if vm["state"] == "Deallocated" else []:
                    self.disks.set_state(disk0, DiskState.RESERVED, attached_to=vm_name, lun=lun0)
                raise
        if vm["state"] != "Running":
            self._any_throttle(vm).resume([str(lun) for lun, _ in self._luns(vm)], vm=True)
        vm["state"] = "Running"
        self._put(vm)
        return vm

    def _refuse_if_downloaded(self, operation: str, vm_name: str, disk: str, other_way: str = "") -> None:
        """A VM operation is refused while one of its disks is being downloaded (ActiveSAS)."""
        if self.disks.record(disk)["state"] == DiskState.ACTIVE_SAS.value:
            raise OperationNotAllowed(f"Operation '{operation}' is not allowed on VM '{vm_name}' since its disk "
                                      f"'{disk}' is in 'ActiveSAS' state: revoke its access first (stamp disk "
                                      f"revoke-access {disk}){other_way}")

    def delete_vm(self, vm_name: str, delete_os_disk: bool = False) -> None:
        with self._serialized():
            self._delete_vm(vm_name, delete_os_disk)

    def _delete_vm(self, vm_name: str, delete_os_disk: bool) -> None:
        vm = self.vm(vm_name)
        os_disk = vm["os_disk"]["disk"]
        if delete_os_disk:  # refused before anything changes: the disk delete at the end would be, leaving the VM gone
            self._refuse_if_downloaded("delete", vm_name, os_disk, ", or delete the VM without its OS disk")
        for lun, disk in self._luns(vm):  # every disk first: one open elsewhere refuses before any state changes
            self._flush_disk(vm_name, lun, disk, drop=True)
        if vm["state"] == "Running":
            self._any_throttle(vm).pause([str(lun) for lun, _ in self._luns(vm)])
        for lun, disk in self._luns(vm):
            self.disks.set_state(disk, DiskState.UNATTACHED, attached_to=None, lun=None, host=None,
                                 throttle_credits=self._disk_credits(vm, lun))
        with self.env.begin(write=True) as txn:
            txn.delete(vm_name.encode(), db=self.vms_db)
        self.throttles.pop(vm_name, None)
        if delete_os_disk:
            self.disks.delete_disk(os_disk)
        self._prune_buckets()

    def _prune_buckets(self) -> None:
        """Remove the buckets of VMs and disks that no longer exist (listed
        first: a bucket is made after its VM or disk record)."""
        listed = self.buckets.names()
        keys = {_vm_key(vm) for vm in self.vms()} | {_disk_key(rec) for rec in self.disks.disks()}
        self.buckets.keep_only(keys, listed)

    def _luns(self, vm: dict[str, Any]) -> list[tuple[int, str]]:
        return [(OS_LUN, vm["os_disk"]["disk"])] + [(int(k), v["disk"]) for k, v in vm["data_disks"].items()]

    def _flush_disk(self, vm_name: str, lun: int, disk: str, drop: bool = False) -> None:
        """Close the disk if open here and write back its dirty lines; with
        drop (it leaves this host: detach, delete), invalidate its lines too."""
        opened = self.open_disks.pop((vm_name, lun), None)
        if opened is not None:
            opened.close()
        blob = self.disks.record(disk)["blob"]
        lease = self._writer_lease(disk, blob)
        try:
            self.cache.flush(self.stamp, blob, lease)
            if drop:
                self.cache.drop_blob(blob)
        finally:
            self.stamp.blobs.release_lease(blob, lease)

    def _writer_lease(self, disk: str, blob: str) -> str:
        """The disk's writer lease, for writing back its dirty lines. Refused
        while another live process has the disk open (`hostcache serve`,
        `mount`): it would go on writing into lines this host is dropping."""
        try:
            return self.stamp.blobs.acquire_writer_lease(blob)
        except LeaseAlreadyPresent as e:
            holder = str(e).split(" by ", 1)[-1]
            raise HostRuleError(f"disk {disk} is open for writing by {holder}: stop that process first") from None

    def quiesce(self, disk: str) -> None:
        """The pre-snapshot hook: what this host holds dirty for `disk` goes to the stamp."""
        self.cache.flush(self.stamp, self.disks.record(disk)["blob"])
        self.stamp.flush()

    def backup(self, vm_name: str, lun: int, vault: Any, show_progress: bool | None = None) -> dict[str, Any]:
        """Back up an attached disk (quiesced first, so the recovery point holds
        every acknowledged write) into a stamp.vault.Vault."""
        if is_remote(self.stamp):
            raise HostError(f"this host reaches its stamp over the network ({self.stamp.path}): vault backups "
                            "are made where the stamp is (`stamp vault backup`), after a flush or detach here")
        vm = self.vm(vm_name)
        entry = _entry(vm, lun)
        if entry is None:
            raise InvalidParameter(f"VM {vm_name} has no disk at LUN {lun}")
        opened = self.open_disks.get((vm_name, lun))
        if opened is not None:
            with opened.lock:  # no write slips in between the flush and the snapshot
                opened.flush()
                report = vault.backup(self.disks, entry["disk"], quiesce=lambda: self.quiesce(entry["disk"]),
                                      show_progress=show_progress)
        else:
            report = vault.backup(self.disks, entry["disk"], quiesce=lambda: self.quiesce(entry["disk"]),
                                  show_progress=show_progress)
        return dict(report.to_json())

    # -- I/O ------------------------------------------------------------------------------

    def throttle(self, vm_name: str) -> Throttle:
        """The VM's throttle in this process (its statistics are recorded on close)."""
        t = self.throttles.get(vm_name)
        if t is None:
            t = self.throttles[vm_name] = self._new_throttle(self.vm(vm_name))
        return t

    def _new_throttle(self, vm: dict[str, Any]) -> Throttle:
        t = Throttle(vm_limits(vm["size"]), self.clock, latency=self.latency, store=self.buckets, key=_vm_key(vm),
                     grant=GRANT_SECONDS)
        for lun, disk in self._luns(vm):
            rec = self.disks.record(disk)
            t.add_disk(str(lun), _limits(rec), key=_disk_key(rec), label=_label(lun))
        return t

    def _any_throttle(self, vm: dict[str, Any]) -> Throttle:
        """This process's throttle of the VM, or one just to act on its buckets (not kept)."""
        return self.throttles.get(vm["name"]) or self._new_throttle(vm)

    def open_disk(self, vm_name: str, lun: int, shared_lease: str | None = None) -> AttachedDisk:
        """The disk at `lun` (OS_LUN for the OS disk) as the VM sees it. With
        `shared_lease` (a worker of `hostcache serve --workers`) the disk's
        writer lease is one another process (the supervisor) holds for every
        worker writing the disk at once: see AttachedDisk."""
        key = (vm_name, lun)
        if key in self.open_disks:
            return self.open_disks[key]
        vm = self.vm(vm_name)
        if vm["state"] != "Running":
            raise HostRuleError(f"VM {vm_name} is {vm['state']}: start it first")
        entry = _entry(vm, lun)
        if entry is None:
            raise InvalidParameter(f"VM {vm_name} has no disk at LUN {lun}")
        disk = AttachedDisk(self, vm_name, lun, entry["disk"], CacheMode(entry["caching"]), shared_lease)
        self.open_disks[key] = disk
        return disk

    def boot(self, vm_name: str, trace_file: str | None = None, real: bool = False, timeout: float = 60.0,
             interface: str = "ide") -> dict[str, Any]:
        """Boot the VM: for real in qemu (real=True, see real_boot), or by
        reading the OS disk as a boot does, through cache and throttle: the
        default trace (boot.boot_trace) or the reads of a trace file."""
        if real:
            return real_boot(self, vm_name, timeout, interface)
        disk = self.open_disk(vm_name, OS_LUN)
        start_t = self.clock.now()
        part = find_boot_partition(disk.read, disk.size)
        trace = load_trace(trace_file) if trace_file else boot_trace(part)
        for off, n in trace:
            if off + n > disk.size:
                raise HostError(f"the boot trace reads {off}+{n}, past the end of the disk ({disk.size})")
        nbytes = 0
        for off, n in trace:
            disk.read(off, n)
            nbytes += n
        elapsed = self.clock.now() - start_t
        t = self.throttle(vm_name)
        return {"vm": vm_name, "partition": part.__dict__, "reads": len(trace) + 1, "bytes": nbytes,
                "seconds": round(elapsed, 6), "iops": round((len(trace) + 1) / elapsed, 1) if elapsed else None,
                "caching": disk.mode.value, "tier": t.disks[str(OS_LUN)].limits.tier,
                "throttled_seconds": round(sum(v["throttled_seconds"] or 0 for v in t.statistics().values()), 6),
                "throttle": t.statistics()}


class BootError(HostError):
    """A real boot went wrong: the guest said so, or never powered off."""


def real_boot(host: Host, vm_name: str, timeout: float = 60.0, interface: str = "ide") -> dict[str, Any]:
    """Boot the VM in qemu-system-x86_64 from its OS disk, served over NBD from
    this process through the host cache and throttle; return what the guest's
    serial console said. With the project's boot sector the CRC-32 the guest
    printed is checked against the one recorded in the image when it was built."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise HostError("qemu-system-x86_64 is missing: install the Debian package qemu-system-x86")
    if interface not in ("ide", "virtio"):
        raise HostError("the boot disk interface is ide or virtio")
    disk = host.open_disk(vm_name, OS_LUN)
    sector0 = disk.virtual.read(0, 512)
    if sector0[510:512] != b"\x55\xaa":
        from .boot import NotBootable
        raise NotBootable("no boot signature (0x55AA) at the end of LBA 0")
    # our boot sector: the guest's CRC-32 must match the one recorded when the image was built
    # (never one recomputed from this disk: that would vouch for whatever the disk holds)
    expected = recorded_digest(sector0) if is_ours(sector0) else None
    changed = first_change(sector0) if expected is not None else None
    if changed is not None:
        raise BootError(f"byte {changed} of the boot sector is not what was built (it is outside what the guest "
                        "digests): the disk does not hold what was built")
    work = tempfile.mkdtemp(prefix="boot-", dir=host.path)
    sock, serial = os.path.join(work, "nbd.sock"), os.path.join(work, "serial.out")
    served = AsyncDisk(disk)
    server = NbdServer({"os": Export("os", served)})  # type: ignore[arg-type]
    ready = threading.Event()
    running: dict[str, Any] = {}

    async def serve() -> None:
        # asyncio.run: on the way out the client handlers are cancelled and the loop closed
        running["loop"], running["stop"] = asyncio.get_running_loop(), asyncio.Event()
        listening = await server.serve_unix(sock)
        ready.set()
        await running["stop"].wait()
        listening.close()
    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="boot-nbd", daemon=True)
    thread.start()
    ready.wait(10)
    start = time.monotonic()
    try:
        proc = subprocess.run([qemu, "-nodefaults", "-display", "none", "-no-reboot", "-m", "32",
                               "-accel", "tcg", "-serial", f"file:{serial}",
                               "-drive", f"file=nbd+unix:///os?socket={sock},format=raw,if={interface}"],
                              capture_output=True, text=True, timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    elapsed = time.monotonic() - start
    if "stop" in running and thread.is_alive():
        running["loop"].call_soon_threadsafe(running["stop"].set)
    thread.join(10)
    console = open(serial, errors="replace").read() if os.path.exists(serial) else ""
    shutil.rmtree(work, ignore_errors=True)
    if timed_out:
        raise BootError(f"the guest did not power off within {timeout:.0f} s; its console said: {console!r}")
    if proc.returncode != 0:
        raise BootError(f"qemu failed ({proc.returncode}): {proc.stderr.strip()}")
    printed = None
    for line in console.splitlines():
        if line.startswith("crc32 "):
            printed = line.split()[1].strip()
        if "error" in line:
            raise BootError(f"the guest reported: {line.strip()}")
    if expected is not None:
        if BANNER not in console:
            raise BootError(f"the guest never printed its banner; console: {console!r}")
        if printed != expected:
            raise BootError(f"the guest read CRC-32 {printed}, but the image was built with {expected}: "
                            "the disk does not hold what was built")
    t = host.throttle(vm_name)
    return {"vm": vm_name, "console": console, "checksum": printed, "expected": expected,
            "verified": expected is not None and printed == expected, "seconds": round(elapsed, 3),
            "disk_reads": served.reads, "bytes_read": served.bytes_read, "interface": interface,
            "caching": disk.mode.value,
            "tier": t.disks[str(OS_LUN)].limits.tier, "throttle": t.statistics()}


class AttachedDisk:
    """A disk attached to a VM, as a block device: VHD through the host cache, admitted by the throttle.

    Opened with a `shared_lease`, the disk is one of several processes'
    (the workers of `hostcache serve --workers`) writing it at once, under a
    lease the supervisor holds: it does not take or release the lease, leaves
    the cache's record of the blob to the supervisor on close, and its flush
    makes durable what every process acknowledged. Only a fixed VHD can be
    shared so: its bytes are the blob's, with no state in the process; a
    differencing VHD's block table lives in the process that opened it."""

    def __init__(self, host: Host, vm: str, lun: int, disk: str, mode: CacheMode,
                 shared_lease: str | None = None) -> None:
        self.host, self.vm, self.lun, self.name, self.mode = host, vm, lun, disk, mode
        self.shared = shared_lease is not None
        rec = host.disks.record(disk)
        self.blob = rec["blob"]
        if self.shared and rec.get("vhd_type") != "fixed":
            raise HostError(f"disk {disk} is a {rec.get('vhd_type')} VHD: only a fixed VHD can be served by "
                            "several workers")
        lease = shared_lease or host.stamp.blobs.acquire_writer_lease(self.blob)
        try:
            image_dev = self._open_image(rec, lease)
        except BaseException:
            if not self.shared:
                host.stamp.blobs.release_lease(self.blob, lease)  # a failed open keeps nothing
            raise
        if isinstance(image_dev, SparseImage):
            if self.shared:
                image_dev.close()
                raise HostError(f"disk {disk} holds a sparse VHD: only a fixed VHD can be served by several workers")
            image_dev.write_through = True  # the platform's rule: an acknowledged write survives a kill
        self.virtual = VirtualDisk(image_dev, host.stamp.blobs, self.blob, None if self.shared else lease)
        self.size = self.virtual.size
        self.readonly = False
        self.throttle = host.throttle(vm)
        self.sleep = Sleeper(host.clock)
        # A remote stamp, no cache and a fixed VHD: nothing of the data path is in the process, so I/Os
        # overlap (overlap.py: ordered where they touch a common page); else the VHD and cache data
        # path, one I/O at a time (throttle waits overlap)
        concurrent_io = is_remote(host.stamp) and mode is CacheMode.NONE and isinstance(image_dev, FixedImage)
        self.overlapped = Overlapped(host.io_pool()) if concurrent_io else None
        self.lock: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext() if concurrent_io else threading.Lock())
        self.performance_version = rec.get("performance_version", 0)
        self.next_look = host.clock.now() + PERFORMANCE_LOOK_SECONDS
        # a local stamp's writer backpressure (stamp.pressure): AsyncDisk waits for it by coroutine
        blobs = host.stamp.blobs
        self.pressure: Gate | None = blobs.pressure if isinstance(blobs, PageBlobs) else None

    def _look_for_performance_change(self) -> None:
        """At most every PERFORMANCE_LOOK_SECONDS of I/O: read the disk's record
        (one stamp read) and, if its performance changed (`stamp disk update`,
        from any process), give the throttle the new limits; the disk's
        limiters keep their state (when the next I/O may go, credits)."""
        now = self.host.clock.now()
        if now < self.next_look:
            return
        self.next_look = now + PERFORMANCE_LOOK_SECONDS
        rec = self.host.disks.record(self.name)
        version = rec.get("performance_version", 0)
        if version != self.performance_version:
            self.throttle.update_disk(str(self.lun), _limits(rec))
            self.performance_version = version

    def _open_image(self, rec: dict[str, Any], lease: str) -> Image:
        """The disk's VHD over the host cache (a FromImage disk's parent too)."""
        host, mode = self.host, self.mode
        file = CachedBlob(host.cache, host.stamp, self.blob, mode, lease=lease,  # may write back what a dead process left
                          shared=self.shared)
        resolver = None
        image = rec.get("source", {}).get("image")
        if image:
            image_blob = host.disks.image(image)["blob"]
            parent_mode = CacheMode.READONLY if mode is not CacheMode.NONE else CacheMode.NONE
            resolver = lambda child, header: open_image(  # noqa: E731
                CachedBlob(host.cache, host.stamp, image_blob, parent_mode, writable=False))
        return open_recovered(file, resolver)  # a crash mid-growth is repaired, not refused

    def _admission(self, write: bool, nbytes: int, missed: bool) -> float:
        """When the I/O completes, as the throttle and the service latency say."""
        self._look_for_performance_change()
        if self.mode is CacheMode.NONE:
            path = Path.UNCACHED
        elif write or missed:
            path = Path.CACHED_MISS
        else:
            path = Path.CACHED_HIT
        return self.throttle.admit(str(self.lun), write, nbytes, path).done

    def read_now(self, offset: int, length: int) -> tuple[bytes, float]:
        """The data, and when the platform would have completed the read."""
        with self.lock:
            before = self.host.cache.stats.read_misses
            data = self.virtual.read(offset, length)
            missed = self.host.cache.stats.read_misses > before
        return data, self._admission(False, length, missed)

    def write_now(self, offset: int, data: bytes | bytearray | memoryview) -> float:
        with self.lock:
            self.virtual.write(offset, data)
        return self._admission(True, len(data), True)

    def read(self, offset: int, length: int) -> bytes:
        data, done = self.read_now(offset, length)
        self.sleep.until(done)
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.sleep.until(self.write_now(offset, data))

    def flush(self) -> None:
        """What this disk acknowledged goes to the stamp, durable (FLUSH, FUA);
        shared, what every worker acknowledged too (NBD multi-conn: a flush on
        one connection covers the writes every connection was answered)."""
        self.virtual.flush()  # ReadWrite: every process's dirty lines of the blob (one shared index)
        if self.shared:
            self.host.stamp.flush_shared()

    def discard(self, offset: int, length: int) -> None:
        self.virtual.discard(offset, length)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        return self.virtual.allocation(offset, length)

    def close(self) -> None:
        if self.overlapped is not None:
            self.overlapped.drain()  # no I/O of a client that went away still runs on the closed disk
        if self.shared:
            self.flush()
        self.virtual.close()  # releases the blob's lease (the cache forgets it: later write-back names none)
        self.host.open_disks.pop((self.vm, self.lun), None)


class AsyncDisk:
    """An attached disk for an asyncio server (the NBD export): the data path
    runs at once, then the coroutine sleeps until the throttle's completion
    time, so many I/Os wait at once and queue depth matters as on the platform.
    A write the stamp's reclaimer holds back (stamp.pressure) waits by
    coroutine too: the loop's reads and other disks go on meanwhile."""

    def __init__(self, disk: AttachedDisk) -> None:
        self.disk = disk
        self.size = disk.size
        self.readonly = False
        self.reads = self.writes = self.bytes_read = 0  # what the client asked for
        self.overlapped = disk.overlapped  # a remote disk's I/Os run in the host's pool, ordered where they conflict

    async def _until(self, t: float) -> None:
        delay = t - self.disk.host.clock.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        self.bytes_read += length
        if self.overlapped is None:
            data, done = self.disk.read_now(offset, length)
        else:
            data, done = await self.overlapped.run(offset, length, False,
                                                   functools.partial(self.disk.read_now, offset, length))
        await self._until(done)
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        gate = self.disk.pressure
        if gate is not None:  # held back for the reclaimer by coroutine: the loop's reads go on meanwhile
            await gate.admit_async()
            with gate.prepaid():  # no await inside: the stamp's writes count, and never sleep the loop
                done = self.disk.write_now(offset, data)
        elif self.overlapped is None:
            done = self.disk.write_now(offset, data)
        else:
            done = await self.overlapped.run(offset, len(data), True, functools.partial(self.disk.write_now, offset, data))
        await self._until(done)

    def flush(self) -> None:
        self.disk.flush()  # covers what was acknowledged: every such write's data path has returned

    def discard(self, offset: int, length: int) -> None:
        if self.overlapped is None:
            self.disk.discard(offset, length)
        else:  # after the earlier I/Os it touches
            self.overlapped.now(offset, length, True, functools.partial(self.disk.discard, offset, length))

    def allocation(self, offset: int, length: int) -> list[Extent]:
        if self.overlapped is None:
            return self.disk.allocation(offset, length)
        return self.overlapped.now(offset, length, False, functools.partial(self.disk.allocation, offset, length))

    def close(self) -> None:
        self.disk.close()


__all__ = ["Host", "AttachedDisk", "AsyncDisk", "BootError", "HostRuleError", "OS_LUN", "GIB", "real_boot"]
