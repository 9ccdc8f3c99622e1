"""Managed disks, images and disk snapshots: the resources over page blobs.

Each resource is a JSON record (table `resources`) naming its page blob:
- a disk created Empty, Imported or Copied holds a fixed VHD (data, then the
  512-byte footer) in `disks/NAME`;
- a disk created FromImage holds a differencing VHD whose parent is the
  image's fixed VHD blob: one base image, many disks; the child blob grows
  (by resizing) as its VHD allocates blocks, as a file would;
- an image holds a fixed VHD in `images/NAME`;
- a full snapshot is a copy of the disk's blob (`snapshots/NAME`, sharing
  extents); an incremental one is a snapshot of the disk's blob itself and
  reports the bytes changed since the disk's previous incremental snapshot.
A disk's virtual disk is opened through vhd over its page blob(s), so the same
code reads a fixed disk and a differencing disk from an image.
Delete rules: no disk delete while attached; no image delete while a disk
made from it exists. A deleted disk's blob lives on while incremental
snapshots of it do.

Lifecycle rules (a name is reusable once deleted; nothing is half-made):
- every resource gets a blob name of its own, `KINDs/NAME/N` with N from a
  counter, so a blob is never found by a resource's name alone: a new disk
  named like a deleted one never sees the old disk's blob, which its
  snapshots may keep alive;
- a create of several steps first reserves the name (a record in state
  Creating) and writes an intent (`pending/KIND/NAME`: blob, creator pid) in
  one transaction, which also checks that its sources are still there; its
  last step writes the finished record and drops the intent in another. A
  create that fails is rolled back at once; one whose process died is rolled
  back by the next Disks on the stamp, or by one already open when it meets
  the name (the intent names what to delete; its token must still be the
  one judged dead, so a live create of the name since is left alone, and a
  create finishes only while its own intent is there);
- a restore over a disk is built as a disk of its own and swapped in by
  one transaction (replace_disk), so the old disk stays whole until the
  new one is;
- a delete is one transaction: the record and the blobs (or blob
  snapshot) only it kept alive.

Performance (the rules: performance.py): a disk's record keeps what it was
given, `disk_iops_read_write` and `disk_mbps_read_write` (Ultra, Premium
SSD v2) or its performance `tier` and `baseline_tier` (Premium SSD, and the
fixed tier of a Standard disk), and `performance_version`, which every
change moves on: a host serving the disk compares it to rebuild its
throttle's limits without a re-attach. A change (update_disk) is one
transaction that reads the record, checks the rules and writes it back,
attached or not. Growing a disk (a fixed VHD only, not while attached to a
running VM, nor while a grant of it is out) grows its VHD first, then writes
the record.
"""

from __future__ import annotations

import base64
import bisect
import enum
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import lmdb

import vhd
from vhd import dynamic_header as dh
from vhd import footer as ft
from vhd.chain import Resolver
from vhd.check import Report
from vhd.fileio import RawFile
from vhd.image import FixedImage, SparseImage, _write_sparse, create_fixed, open_image, read_footer
from vhd.ops import _grow_fixed

from . import access as ac
from . import guestdiff, sas
from . import performance as perf
from . import ranges as rg
from .blobfile import PageBlobFile
from .errors import (
    BadRequest,
    ComputeError,
    InvalidParameter,
    OperationNotAllowed,
    PreviousSnapshotCannotBeNewer,
    PreviousSnapshotNotFound,
    StampError,
)
from .meta import loads
from .pageblob import MAX_DISK_BLOB, Diff, blob_key, holder_died, writer_stale
from .stamp import Stamp
from .stream import own_start, pid_alive

if TYPE_CHECKING:
    from .hosted import HostBlobs

NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,78}[A-Za-z0-9_])?")  # Azure's rule for disk names
PENDING = "pending/"  # resources key prefix of the intents of unfinished creates
GRANTS = "grant/"  # resources key prefix: grant container -> {kind, name} of the granted resource
CREATING = "Creating"
GIB = 1024 ** 3
MIB = 1024 ** 2
SKUS = {"Standard_LRS": 32767, "StandardSSD_LRS": 32767, "Premium_LRS": 32767,  # P80, E80, S80
        "PremiumV2_LRS": 64 * 1024, "UltraSSD_LRS": 64 * 1024}  # max size in GiB
MIN_GIB = {"UltraSSD_LRS": 4}  # the smallest size, where it is not 1 GiB


class DiskState(enum.Enum):
    UNATTACHED = "Unattached"
    ATTACHED = "Attached"
    RESERVED = "Reserved"  # attached to a stopped (deallocated) VM
    READY_TO_UPLOAD = "ReadyToUpload"
    ACTIVE_UPLOAD = "ActiveUpload"  # a Write grant is out: the upload is under way
    ACTIVE_SAS = "ActiveSAS"  # a Read grant is out: the disk is being downloaded


class ResourceNotFound(StampError):
    pass


class ResourceExists(StampError):
    pass


class ResourceInUse(StampError):
    """A delete or change that a dependent resource forbids."""


def _creator_died(intent: dict[str, Any]) -> bool:
    """Did the process that began a create (its pid, start time and host in
    the intent) die on this host? Intents from before the start time was
    recorded are judged by the pid alone."""
    return intent["host"] == socket.gethostname() and \
        not pid_alive(int(intent["pid"]), int(intent.get("started", 0) or 0))


class Disks:
    def __init__(self, stamp: Stamp) -> None:
        self.stamp = stamp
        self.blobs = stamp.blobs
        self.meta = stamp.meta
        self.clock = time.time  # wall-clock seconds: the 12-hour and 24-hour rules of performance changes
        self.roll_back_dead_creates()

    # -- records ---------------------------------------------------------------------

    def _get(self, kind: str, name: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            obj = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
        if obj is not None and self._expired(obj):
            with self.meta.write() as txn:
                obj = self._end_expired(txn, kind, name)
        if obj is not None and obj.get("state") == CREATING and self._settle(kind, name):
            obj = None  # its creator had died: rolled back now
        if obj is None:
            raise ResourceNotFound(f"no {kind} named {name!r}")
        if obj.get("state") == CREATING:
            raise ResourceInUse(f"{kind} {name!r} is still being created (by {obj.get('creator')}); try later")
        return dict(obj)

    def _finished(self, txn: lmdb.Transaction, kind: str, name: str) -> dict[str, Any]:
        """A finished record, read in the caller's transaction: ResourceNotFound
        if there is none, ResourceInUse while its create runs."""
        obj = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
        if obj is not None and self._expired(obj):
            obj = self._end_expired(txn, kind, name)
        if obj is None:
            raise ResourceNotFound(f"no {kind} named {name!r}")
        if obj.get("state") == CREATING:
            raise ResourceInUse(f"{kind} {name!r} is still being created (by {obj.get('creator')}); try later")
        return dict(obj)

    def _expired(self, obj: dict[str, Any]) -> bool:
        """Does the record hold a grant whose duration is over (and that no
        revoke is ending, nor a grant still building)?"""
        grant = obj.get("access")
        return grant is not None and grant.get("ready", True) and not grant.get("revoking") and \
            sas.parse_time(str(grant["expiry"]), "expiry").timestamp() <= self.clock()

    def _end_expired(self, txn: lmdb.Transaction, kind: str, name: str) -> dict[str, Any] | None:
        """End the record's grant if its duration is over, in write transaction
        `txn`, as the platform does by itself at expiry (here when the record
        is next read or used: no timer): a Read grant's disk goes back to the
        state it had (Unattached, or Reserved), its VHD view is deleted; a
        Write grant's disk goes back to ReadyToUpload, what was uploaded kept
        (grant Write again for a new SAS, or revoke-access to check it).
        Returns the record as it is now."""
        key = f"{kind}/{name}".encode()
        obj = self.meta.get_json(txn, "resources", key)
        if obj is None or not self._expired(obj):
            return obj
        grant = obj["access"]
        if grant["access"] == "Write":
            state: str | None = DiskState.READY_TO_UPLOAD.value
        else:
            state = grant.get("state_before") if kind == "disk" else None
        self._write_grant(txn, kind, name, None, state)
        export = grant.get("export_blob")
        if export and self.blobs.exists_in(txn, export):
            self.blobs.delete_in(txn, export, snapshots="include")
        return self.meta.get_json(txn, "resources", key)

    def _put(self, kind: str, obj: dict[str, Any], new: bool = False) -> None:
        key = f"{kind}/{obj['name']}".encode()
        with self.meta.write() as txn:
            if new and txn.get(key, db=self.meta.db["resources"]) is not None:
                raise ResourceExists(f"a {kind} named {obj['name']!r} already exists")
            self.meta.put_json(txn, "resources", key, obj)

    def _list(self, kind: str) -> list[dict[str, Any]]:
        with self.meta.read() as txn:
            found = [dict(loads(v)) for _, v in self.meta.items(txn, "resources", f"{kind}/".encode())]
        for i, obj in enumerate(found):
            if self._expired(obj):  # its grant ends now (see _end_expired)
                with self.meta.write() as txn:
                    found[i] = self._end_expired(txn, kind, str(obj["name"])) or obj
        return found

    def _users_of_blob(self, txn: lmdb.Transaction, blob: str, kind: str) -> list[str]:
        """Names of the resources of `kind` whose records name `blob`."""
        return [str(loads(v)["name"]) for _, v in self.meta.items(txn, "resources", f"{kind}/".encode())
                if loads(v).get("blob") == blob]

    def record(self, name: str) -> dict[str, Any]:
        """The disk's stored record, without walking its pages (cheap: one read)."""
        return self._get("disk", name)

    def disk(self, name: str) -> dict[str, Any]:
        """The record plus ``used_bytes``, which walks the blob's page ranges."""
        obj = self.record(name)
        obj["used_bytes"] = self.blobs.used_bytes(obj["blob"])
        return obj

    def disks(self) -> list[dict[str, Any]]:
        return self._list("disk")

    def image(self, name: str) -> dict[str, Any]:
        return self._get("image", name)

    def images(self) -> list[dict[str, Any]]:
        return self._list("image")

    def snapshot(self, name: str) -> dict[str, Any]:
        return self._get("snapshot", name)

    def snapshots(self) -> list[dict[str, Any]]:
        return self._list("snapshot")

    def acquire_writer_lease(self, blob: str, holder: dict[str, Any], lease: str | None = None,
                             stale: dict[str, Any] | None = None, host: str | None = None) -> str:
        """A disk blob's writer lease for a process of `host` (a host folder's
        identity; None: a client that names none): PageBlobs.acquire_writer_lease,
        refused (ResourceInUse) while the disk is attached to a VM of another
        host (owner_host), unless the lease taken over is stale by the writer
        lease's own rule, or is the one proposed (a retried acquire). The
        owner is read and the lease taken in one transaction: a host
        attaching the disk meanwhile comes before or after, never between."""
        with self.meta.atomic() as txn:
            rec = self._disk_of_blob(txn, blob) or {}
            owner = owner_host(rec)
            if owner is not None and owner != host:
                held = self.blobs.held_lease_in(txn, blob)
                retried = held is not None and lease is not None and held[0] == lease
                if not retried and (held is None or not writer_stale(held[1], holder, stale)):
                    raise ResourceInUse(f"disk {rec['name']!r} is attached to VM {rec.get('attached_to')} of another "
                                        f"host ({owner}): its writer lease is that host's; detach it there first")
            return self.blobs.acquire_writer_lease(blob, holder, lease, stale)

    def _disk_of_blob(self, txn: lmdb.Transaction, blob: str) -> dict[str, Any] | None:
        """The record of the disk whose blob is `blob` (disks/NAME/TOKEN), or None."""
        parts = blob.split("/")
        obj = self.meta.get_json(txn, "resources", f"disk/{parts[1]}".encode()) if len(parts) == 3 else None
        if obj is not None and obj.get("blob") == blob:
            return dict(obj)
        for name in self._users_of_blob(txn, blob, "disk"):  # a blob named otherwise (replace_disk, say)
            return dict(self.meta.get_json(txn, "resources", f"disk/{name}".encode()))
        return None

    def set_state(self, name: str, state: DiskState, expect: DiskState | None = None,
                  **fields: Any) -> dict[str, Any]:
        """For the host layer: attach, detach, deallocate. With `expect`, only
        a disk in that state changes (read and written in one transaction, so
        two hosts attaching one disk at once cannot both succeed); another
        state is ResourceInUse."""
        key = f"disk/{name}".encode()
        with self.meta.write() as txn:
            obj = self._finished(txn, "disk", name)
            if expect is not None and obj.get("state") != expect.value:
                raise ResourceInUse(f"disk {name!r} is {obj.get('state')}, not {expect.value}")
            grant = obj.get("access")
            if grant is not None and grant["access"] == "Read":  # a download: see _check_grantable
                if state is DiskState.ATTACHED:
                    raise OperationNotAllowed(f"Disk {name} has an active SAS (grant-access): its VM cannot run "
                                              f"until access is revoked (stamp disk revoke-access {name}).")
                obj["access"] = {**grant, "state_before": state.value}  # what revoke-access returns it to
            else:
                obj["state"] = state.value
            obj.update(fields)
            self.meta.put_json(txn, "resources", key, obj)
        return dict(obj)

    # -- creating: reserve, build, finish (or roll back) -------------------------------------

    @contextmanager
    def _creating(self, kind: str, record: dict[str, Any], blob: str | None = None,
                  needs: tuple[tuple[str, str, str], ...] = ()) -> Iterator[str]:
        """Reserve `record`'s name and give it a fresh blob name (or, for an
        incremental snapshot, the disk's `blob`); the body builds the blob.
        `needs` are the (kind, name, blob) of the resources it is made from,
        which must still be there when the name is reserved (a delete after
        that sees the reservation as a user). Then the finished record
        replaces the reservation; on any failure the reservation and what the
        body made are rolled back."""
        blob = self._reserve(kind, record, blob, needs)
        token = self._intent(kind, str(record["name"]))["token"]
        try:
            yield blob
            key = f"{kind}/{record['name']}".encode()
            with self.meta.write() as txn:
                intent = self.meta.get_json(txn, "resources", PENDING.encode() + key)
                if intent is None or intent["token"] != token:  # rolled back by another process (judged dead)
                    raise ResourceInUse(f"the create of {kind} {record['name']!r} was rolled back meanwhile by "
                                        "another process; try again")
                self.meta.put_json(txn, "resources", key, record)
                txn.delete(PENDING.encode() + key, db=self.meta.db["resources"])
        except BaseException:
            self._roll_back(kind, str(record["name"]), token)
            raise

    def _reserve(self, kind: str, record: dict[str, Any], blob: str | None,
                 needs: tuple[tuple[str, str, str], ...] = ()) -> str:
        if not NAME.fullmatch(str(record["name"])):
            raise StampError(f"{kind} name {record['name']!r}: 1 to 80 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit and ending with a letter, digit or '_'")
        key = f"{kind}/{record['name']}".encode()
        creator = {"pid": os.getpid(), "started": own_start(), "host": socket.gethostname()}
        self._settle(kind, str(record["name"]))
        with self.meta.write() as txn:
            had = self.meta.get_json(txn, "resources", key)
            if had is not None and had.get("state") == CREATING:
                raise ResourceExists(f"a {kind} named {record['name']!r} is being created (by "
                                     f"{had.get('creator')})")
            if had is not None:
                raise ResourceExists(f"a {kind} named {record['name']!r} already exists")
            for need in needs:
                self._still_there(txn, *need)
            token = self.meta.next_id(txn, "resource")
            own = blob is None
            blob = blob or f"{kind}s/{record['name']}/{token}"
            record.update(blob=blob)
            intent = {"kind": kind, "name": record["name"], "blob": blob, "own_blob": own, "token": token,
                      **creator}
            self.meta.put_json(txn, "resources", key,
                               {**record, "state": CREATING, "creator": f"pid {creator['pid']} on {creator['host']}"})
            self.meta.put_json(txn, "resources", PENDING.encode() + key, intent)
        return blob

    def _still_there(self, txn: lmdb.Transaction, kind: str, name: str, blob: str) -> None:
        """A create's source is still the finished resource it read (same blob)."""
        obj = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
        if obj is None or obj.get("state") == CREATING or obj.get("blob") != blob:
            raise ResourceNotFound(f"{kind} {name!r} was deleted (or replaced) while this create began")

    def _settle(self, kind: str, name: str) -> bool:
        """Roll back the create of `kind/name` if its process died on this
        host (a process that opened the stamp before the death never ran
        roll_back_dead_creates for it); True if it did (False if another
        process did it first)."""
        with self.meta.read() as txn:
            intent = self.meta.get_json(txn, "resources", f"{PENDING}{kind}/{name}".encode())
        if intent is None or not _creator_died(intent):
            return False
        return self._roll_back(kind, name, intent["token"])

    def _roll_back(self, kind: str, name: str, token: int | None = None) -> bool:
        """Undo an unfinished create in one transaction: its blob (if it made
        one) or the blob snapshot it tagged (and the blob, if the disk was
        deleted meanwhile and nothing else keeps it), its reservation, its
        intent. With `token`, only the create of that token (the one judged
        dead): by the time the transaction starts, another process may have
        rolled it back and a live create reserved the name again."""
        key = f"{kind}/{name}".encode()
        with self.meta.write() as txn:
            intent = self.meta.get_json(txn, "resources", PENDING.encode() + key)
            if intent is None or (token is not None and intent["token"] != token):
                return False
            blob = str(intent["blob"])
            txn.delete(key, db=self.meta.db["resources"])
            txn.delete(PENDING.encode() + key, db=self.meta.db["resources"])
            if intent["own_blob"] and self.blobs.exists_in(txn, blob):
                self.blobs.delete_in(txn, blob, snapshots="include")
            elif not intent["own_blob"] and self.blobs.exists_in(txn, blob):
                for snap in self.blobs.snapshots_in(txn, blob):
                    if snap.metadata.get("token") == intent["token"]:
                        self.blobs.delete_snapshot_in(txn, blob, snap.id)
                self._drop_if_unused(txn, blob)
        return True

    def roll_back_dead_creates(self) -> list[str]:
        """Roll back the creates whose process died on this host (run on open)."""
        with self.meta.read() as txn:
            intents = [loads(v) for _, v in self.meta.items(txn, "resources", PENDING.encode())]
        dead = [i for i in intents if _creator_died(i)]
        for i in dead:
            self._roll_back(i["kind"], i["name"], i["token"])
        return [f"{i['kind']}/{i['name']}" for i in dead]

    # -- creating disks -----------------------------------------------------------------

    @staticmethod
    def _check_sku(sku: str, size_gib: float) -> None:
        if sku not in SKUS:
            raise StampError(f"unknown SKU {sku!r}: one of {', '.join(SKUS)}")
        low = MIN_GIB.get(sku, 0)
        if not 0 < size_gib <= SKUS[sku] or size_gib < low:
            raise StampError(f"{sku} disks are {low or 1} GiB to {SKUS[sku]} GiB; asked for {size_gib} GiB")

    def _record(self, name: str, sku: str, size: int, option: str, kind: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "sku": sku, "size_gib": size / GIB, "size_bytes": size,
                "state": DiskState.UNATTACHED.value, "create_option": option,
                "vhd_type": kind, "created": time.time(), "attached_to": None, "lun": None, **extra}

    def _performance(self, sku: str, size: int, iops: int | None = None, mbps: int | None = None,
                     tier: str | None = None) -> dict[str, Any]:
        """A new disk's performance fields: the IOPS and MB/s of an Ultra or
        Premium SSD v2 disk (asked for, or the defaults), or the tier of a
        tiered one (asked for, or its baseline); the rules' error otherwise."""
        size_gib = max(size, 1) / GIB
        if sku in perf.PROVISIONED_SKUS:
            if tier is not None:
                raise InvalidParameter(f"{sku} disks take no performance tier: set --disk-iops-read-write and "
                                       "--disk-mbps-read-write instead")
            iops, mbps = perf.provisioned(sku, size_gib, iops, mbps)
            changes = [self.clock()] if perf.rules(sku).creation_counts else []
            return {"disk_iops_read_write": iops, "disk_mbps_read_write": mbps, "tier": None,
                    "performance_changes": changes, "performance_version": 0}
        if iops is not None or mbps is not None:
            raise InvalidParameter(f"IOPS and MB/s are only settable for UltraSSD_LRS and PremiumV2_LRS disks; a "
                                   f"{sku} disk performs as its tier" +
                                   (" (give Premium_LRS a higher one with --tier)" if sku == "Premium_LRS" else ""))
        base = perf.baseline_tier(sku, size_gib)
        return {"tier": base if tier is None else perf.check_tier(sku, size_gib, tier), "baseline_tier": base,
                "tier_downgraded": None, "performance_version": 0}

    def _new_blob(self, blob: str, size: int = 0) -> None:
        self.blobs.create(blob, size, limit=MAX_DISK_BLOB)

    def create_empty(self, name: str, size_gib: int, sku: str = "Premium_LRS",
                     size_bytes: int | None = None, *, iops: int | None = None, mbps: int | None = None,
                     tier: str | None = None) -> dict[str, Any]:
        """An empty disk: a fixed VHD page blob, sparse until written. `size_bytes`
        (a multiple of 1 MiB) instead of whole GiB: a restored disk keeps its size.
        `iops` and `mbps` for Ultra and Premium SSD v2, `tier` for Premium SSD
        (performance.py has the rules)."""
        size = size_gib * GIB if size_bytes is None else size_bytes
        if size % MIB:
            raise StampError(f"a disk's size is a multiple of 1 MiB, not {size} bytes")
        self._check_sku(sku, size / GIB)
        record = self._record(name, sku, size, "Empty", "fixed", **self._performance(sku, size, iops, mbps, tier))
        with self._creating("disk", record) as blob:
            self._new_blob(blob)
            create_fixed(PageBlobFile(self.stamp, blob), size)
        return record

    def create_from_image(self, name: str, image: str, size_gib: int | None = None,
                          sku: str = "Premium_LRS", *, iops: int | None = None, mbps: int | None = None,
                          tier: str | None = None) -> dict[str, Any]:
        """A differencing VHD over the image's blob; only what the VM writes is stored."""
        img = self.image(image)
        size = img["size_bytes"] if size_gib is None else size_gib * GIB
        if size < img["size_bytes"]:
            raise StampError(f"disk size {size_gib} GiB is smaller than image {image!r}")
        self._check_sku(sku, size / GIB)
        record = self._record(name, sku, size, "FromImage", "differencing", source={"image": image},
                              **self._performance(sku, size, iops, mbps, tier))
        with self._creating("disk", record, needs=(("image", image, str(img["blob"])),)) as blob:
            self._new_blob(blob)
            parent = (uuid.UUID(img["vhd_uuid"]), int(img["vhd_timestamp"]), str(img["blob"]))
            _write_sparse(PageBlobFile(self.stamp, blob), None, ft.DiskType.DIFFERENCING, size,
                          dh.DEFAULT_BLOCK_SIZE, parent, [], True, None)
        return record

    def import_vhd(self, name: str, path: str, sku: str = "Premium_LRS", convert: bool = False, *,
                   iops: int | None = None, mbps: int | None = None, tier: str | None = None) -> dict[str, Any]:
        """A disk from a local VHD that passes the upload rules (or, with
        convert, any VHD or raw image, made fixed and rounded up to 1 MiB)."""
        record = self._record(name, sku, 0, "Import", "fixed", source={"file": os.path.abspath(path)})
        with self._creating("disk", record) as blob:
            size, _ = self._load_vhd(path, blob, convert)
            self._check_sku(sku, size / GIB if size >= GIB else 1)
            record.update(size_bytes=size, size_gib=size / GIB, **self._performance(sku, size, iops, mbps, tier))
        return record

    def _load_vhd(self, path: str, blob: str, convert: bool) -> tuple[int, ft.Footer]:
        """Copy a local image into the new fixed-VHD blob `blob`; returns (size,
        footer). A VHD that passes the upload rules is taken as it is; with
        convert, any VHD (flattened) or raw image becomes fixed, its size
        rounded up to 1 MiB. The caller's _creating rolls back a failure."""
        if not os.path.isfile(path):
            raise StampError(f"{path}: no such file")
        if _is_vhd(path):
            report = vhd.check(path, azure=True)
            if not report.ok and not convert:
                problems = "; ".join(str(p) for p in report.problems)
                raise StampError(f"{path} cannot be imported as it is: {problems} (or import with --convert)")
            src: vhd.BlockDevice = vhd.open(path)
        elif convert:
            src = vhd.open_device(path, fmt="raw")
        else:
            raise StampError(f"{path} is not a VHD file (import a raw image with --convert)")
        size = src.size if not convert else max(-(-src.size // MIB) * MIB, 20 * MIB)
        try:
            self._new_blob(blob)
            target = create_fixed(PageBlobFile(self.stamp, blob), size)
            vhd.copy_data(src, target)
            footer = target.footer
        finally:
            src.close()
        return size, footer

    def create_copy(self, name: str, source_disk: str | None = None, source_snapshot: str | None = None,
                    sku: str | None = None, *, iops: int | None = None, mbps: int | None = None,
                    tier: str | None = None) -> dict[str, Any]:
        """A new disk with the content of a disk or snapshot (sharing extents)."""
        if (source_disk is None) == (source_snapshot is None):
            raise StampError("copy needs exactly one source: a disk or a snapshot")
        if source_disk is not None:
            src = self._get("disk", source_disk)
            _not_uploading("copy", src)
            blob, snap, kind = src["blob"], None, src["vhd_type"]
            source = {"disk": source_disk}
        else:
            src = self.snapshot(str(source_snapshot))
            blob, snap, kind = src["blob"], src.get("blob_snapshot") or None, src["vhd_type"]
            source = {"snapshot": str(source_snapshot)}
        self._check_sku(sku or src["sku"], src["size_bytes"] / GIB)
        record = self._record(name, sku or src["sku"], src["size_bytes"], "Copy", kind, source=source,
                              **self._performance(sku or src["sku"], src["size_bytes"], iops, mbps, tier))
        if "source" in src and "image" in src.get("source", {}):
            record["source"] = {**source, "image": src["source"]["image"]}
        needs = (("disk", source_disk, str(blob)),) if source_disk is not None else \
            (("snapshot", str(source_snapshot), str(blob)),)
        with self._creating("disk", record, needs=needs) as target:
            self.blobs.copy(blob, target, snapshot=snap)
        return record

    def create_for_upload(self, name: str, upload_bytes: int, sku: str = "Premium_LRS", *, iops: int | None = None,
                          mbps: int | None = None, tier: str | None = None) -> dict[str, Any]:
        """A disk waiting for a fixed VHD of `upload_bytes` (its file size: the
        virtual size plus the 512-byte footer) to be written into its blob
        through a Write grant (grant_access), then checked by revoke_access."""
        ac.check_upload_size(upload_bytes)
        self._check_sku(sku, (upload_bytes - 512) / GIB)
        record = self._record(name, sku, upload_bytes - 512, "Upload", "fixed",
                              state=DiskState.READY_TO_UPLOAD.value, upload_size_bytes=upload_bytes,
                              **self._performance(sku, upload_bytes - 512, iops, mbps, tier))
        with self._creating("disk", record) as blob:
            self._new_blob(blob, upload_bytes)
        return record

    def finish_upload(self, name: str) -> dict[str, Any]:
        """End an upload written into the blob directly (without a grant) or
        through one: as revoke_access."""
        return self.revoke_access("disk", name)

    # -- direct upload and download: grants (rules in stamp.access) -------------------------

    def grant_access(self, kind: str, name: str, access: str, duration: int, *,
                     endpoint: str = ac.DEFAULT_ENDPOINT, key: bytes | None = None,
                     now: datetime | None = None) -> dict[str, Any]:
        """A SAS URL to the disk's (or snapshot's) blob on `endpoint`, signed
        with the account `key` (default: the development account's): Write for
        an upload, Read for a download. Returns {"accessSAS": URL, "grant": ...}."""
        ac.check_access(access, duration)
        account = ac.account_of(endpoint)
        if key is None and account != ac.DEFAULT_ACCOUNT:
            raise ComputeError(f"the SAS of a grant on account {account!r} is signed with that account's key: "
                               "give it (the development account's published key is the default only for "
                               f"{ac.DEFAULT_ACCOUNT})")
        key = base64.b64decode(ac.DEVSTORE_KEY) if key is None else key
        obj = self._get(kind, name)
        grant = obj.get("access")
        if grant is None or grant["access"] != access or not grant.get("ready"):
            self._check_grantable(kind, obj, access)
        policy = ac.new_policy(access, duration, now or datetime.fromtimestamp(self.clock(), UTC))
        if grant is not None and grant["access"] == access and grant.get("ready"):
            # a new SAS, the same blob; one a killed revoke left refusing requests works again
            grant = {**_open(grant), "start": policy.start, "expiry": policy.expiry, "account": account}
            self._update_grant(kind, name, str(obj["blob"]), grant)
        else:
            grant = self._new_grant(kind, obj, access, policy, account)
        return {"accessSAS": ac.sas_url(endpoint, key, grant["container"], grant["id"]),
                "grant": self._grant_view(grant)}

    def _check_grantable(self, kind: str, obj: dict[str, Any], access: str) -> None:
        name, state = str(obj["name"]), str(obj.get("state", ""))
        if kind == "snapshot":
            if access == "Write":
                raise ComputeError(f"snapshot {name!r}: snapshots take Read access only")
            if obj.get("access"):
                raise ac.not_allowed("beginGetAccess", kind, name, DiskState.ACTIVE_SAS.value)
            return
        if state == DiskState.ATTACHED.value or (state == DiskState.RESERVED.value and access == "Write"):
            raise ac.OperationNotAllowed(f"Access not permitted because disk {name} is currently attached to "
                                         f"running VM {obj.get('attached_to')}.")
        if state == DiskState.RESERVED.value:
            return  # its VM is deallocated: Read is granted, and the VM cannot start until it is revoked
        want = DiskState.READY_TO_UPLOAD.value if access == "Write" else DiskState.UNATTACHED.value
        if state != want and obj.get("access"):
            raise ac.not_allowed("beginGetAccess", kind, name, state)
        if state != want:
            raise ComputeError(f"disk {name!r} is {state}: {access} access is granted to a disk in state {want}"
                               + (" (create it with --upload-size-bytes)" if access == "Write" else ""))

    def _new_grant(self, kind: str, obj: dict[str, Any], access: str, policy: sas.AccessPolicy,
                   account: str) -> dict[str, Any]:
        """Reserve the grant (state changed, policy stored, container indexed) in
        one transaction; a Read of a disk from an image then builds its fixed
        VHD view (`export_blob`) and marks the grant ready: a crash before
        leaves it not ready, and revoke_access removes what it made."""
        name = str(obj["name"])
        view = access == "Read" and obj["vhd_type"] != "fixed"
        grant = {"id": str(uuid.uuid4()), "container": ac.new_container(), "access": access, "account": account,
                 "start": policy.start,
                 "expiry": policy.expiry, "ready": not view, "state_before": obj.get("state"),
                 "export_blob": f"{obj['blob']}-export-{uuid.uuid4().hex[:8]}" if view else None}
        with self.meta.write() as txn:
            now = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
            if now is None or now.get("blob") != obj.get("blob") or now.get("state") != obj.get("state") \
                    or now.get("access"):
                raise ac.OperationNotAllowed(f"{kind} {name!r} changed while access was being granted; try again")
            self._write_grant(txn, kind, name, grant, self._granted_state(kind, access))
        if view:
            try:
                self._build_view(kind, obj, str(grant["export_blob"]))
                self._update_grant(kind, name, str(obj["blob"]), {**grant, "ready": True})
            except BaseException:
                self._drop_read(kind, name, grant, str(obj["blob"]))
                raise
            grant["ready"] = True
        return grant

    @staticmethod
    def _granted_state(kind: str, access: str) -> str:
        return DiskState.ACTIVE_UPLOAD.value if access == "Write" else DiskState.ACTIVE_SAS.value

    def _write_grant(self, txn: lmdb.Transaction, kind: str, name: str, grant: dict[str, Any] | None,
                     state: str | None) -> None:
        """Set (or, with None, drop) the grant of a record and its container index."""
        key = f"{kind}/{name}".encode()
        obj = self.meta.get_json(txn, "resources", key)
        old = obj.get("access")
        if old is not None:
            txn.delete(f"{GRANTS}{old['container']}".encode(), db=self.meta.db["resources"])
        if grant is None:
            obj.pop("access", None)
        else:
            obj["access"] = grant
            self.meta.put_json(txn, "resources", f"{GRANTS}{grant['container']}".encode(),
                               {"kind": kind, "name": name})
        if state is not None:
            obj["state"] = state
        elif kind == "snapshot":
            obj.pop("state", None)
        self.meta.put_json(txn, "resources", key, obj)
        if kind == "disk":
            self._mark_upload(txn, str(obj["blob"]), grant)

    def _mark_upload(self, txn: lmdb.Transaction, blob: str, grant: dict[str, Any] | None) -> None:
        """Keep the blob's mark of the Write grant whose SAS may write it now
        (`ac.UPLOAD_MARK`: the grant's id while it is open; none once a revoke
        began): a Put Page checks it inside its own transaction, so a write the
        endpoint let in before the revoke cannot land after the check."""
        key = blob_key(blob)
        record = self.meta.get_json(txn, "blobs", key)
        if record is None:
            return
        props = record.setdefault("properties", {})
        mark = grant["id"] if grant is not None and grant["access"] == "Write" and not grant.get("revoking") else None
        if props.get(ac.UPLOAD_MARK) != mark:
            if mark is None:
                props.pop(ac.UPLOAD_MARK, None)
            else:
                props[ac.UPLOAD_MARK] = mark
            self.meta.put_json(txn, "blobs", key, record)

    def _update_grant(self, kind: str, name: str, blob: str, grant: dict[str, Any],
                      revoking: str | None = None) -> None:
        """Rewrite the grant of a record, if the record (same blob) still
        holds that grant (same id; with `revoking`, still marked by that
        revoke): a revoke, delete or name reuse by another process in between
        is never undone (else an old SAS would reach a new disk of the name)."""
        with self.meta.write() as txn:
            if not self._holds(txn, kind, name, blob, grant["id"], revoking):
                raise ac.OperationNotAllowed(f"{kind} {name!r} changed while its access was being changed (by "
                                             "another process); try again")
            self._write_grant(txn, kind, name, grant, self._granted_state(kind, grant["access"]))

    def _holds(self, txn: lmdb.Transaction, kind: str, name: str, blob: str, grant_id: str | None,
               revoking: str | None = None) -> bool:
        """Does record `kind/name`, still on `blob`, hold grant `grant_id`
        (with `revoking`, marked by that revoke)? With None: no grant, and (a
        disk) still ReadyToUpload."""
        now = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
        if now is None or now.get("blob") != blob or now.get("state") == CREATING:
            return False
        grant = now.get("access")
        if grant_id is None:
            return grant is None and now.get("state") == DiskState.READY_TO_UPLOAD.value
        return grant is not None and grant["id"] == grant_id and \
            (revoking is None or grant.get("revoking") == revoking)

    def _build_view(self, kind: str, obj: dict[str, Any], blob: str) -> None:
        """The fixed VHD a Read grant of a disk from an image serves: the
        guest's data (sparse) and a footer, in a blob of its own."""
        disk, snap = (obj["disk"], obj["name"]) if kind == "snapshot" else (obj["name"], None)
        with self.open_virtual(disk, snapshot=snap) as src:
            self._new_blob(blob)
            vhd.copy_data(src, create_fixed(PageBlobFile(self.stamp, blob), src.size))

    @staticmethod
    def _grant_view(grant: dict[str, Any]) -> dict[str, Any]:
        return {"account": grant.get("account", ac.DEFAULT_ACCOUNT),
                **{k: grant[k] for k in ("access", "container", "start", "expiry")}}

    def grant_for(self, container: str) -> ac.Grant | None:
        """The active, ready grant served as `container`/abcd, or None: for the
        REST endpoint, which then checks the request's SAS against its policy."""
        with self.meta.read() as txn:
            where = self.meta.get_json(txn, "resources", f"{GRANTS}{container}".encode())
            if where is None:
                return None
            obj = self.meta.get_json(txn, "resources", f"{where['kind']}/{where['name']}".encode())
        grant = None if obj is None else obj.get("access")
        if obj is None or grant is None or grant["container"] != container or not grant.get("ready") \
                or grant.get("revoking"):
            return None
        if self._expired(obj):  # its duration is over: it ends now
            with self.meta.write() as txn:
                self._end_expired(txn, where["kind"], where["name"])
            return None
        blob, snapshot = str(obj["blob"]), obj.get("blob_snapshot") or None
        if grant.get("export_blob"):
            blob, snapshot = str(grant["export_blob"]), None
        return ac.Grant(kind=where["kind"], name=where["name"], access=grant["access"],
                        account=str(grant.get("account", ac.DEFAULT_ACCOUNT)), container=container,
                        policy_id=grant["id"], policy=sas.AccessPolicy(grant["start"], grant["expiry"],
                                                                       ac.PERMISSION[grant["access"]]),
                        stamp_blob=blob, snapshot=snapshot, size=self.blobs.size(blob))

    def grant_diff(self, target: ac.Grant, previous: ac.Grant) -> dict[str, Any]:
        """Get Page Ranges with x-ms-previous-snapshot-url between two grants:
        what changed in guest offsets from incremental snapshot `previous` to
        `target` (a later snapshot of the same disk, or the disk itself), as
        Disks.diff ("written" are PageRanges, "cleared" ClearRanges)."""
        return self.diff(*self.grant_diff_ends(target, previous))

    def grant_diff_ends(self, target: ac.Grant, previous: ac.Grant) -> tuple[str, str | None]:
        """The (base, target) snapshot names of grant_diff (target None: the
        disk itself), or the error grant_diff raises."""
        if previous.kind != "snapshot":
            raise PreviousSnapshotNotFound(f"the previous snapshot URL names disk {previous.name!r}, not a snapshot")
        base = self.snapshot(previous.name)
        if not base.get("blob_snapshot"):
            raise PreviousSnapshotNotFound(f"snapshot {previous.name!r} is a full snapshot: diffs are between "
                                           "incremental snapshots of one disk")
        if target.kind == "snapshot":
            if self.snapshot(target.name).get("blob") != base["blob"]:
                raise PreviousSnapshotNotFound(f"snapshot {previous.name!r} is not of the disk {target.name!r} "
                                               "was taken of")
            return previous.name, target.name
        if self._blob_of_disk(target.name) != base["blob"]:
            raise PreviousSnapshotNotFound(f"snapshot {previous.name!r} is not a snapshot of disk {target.name!r}")
        return previous.name, None

    def revoke_access(self, kind: str, name: str) -> dict[str, Any]:
        """End a grant: its SAS stops working at once. An upload's blob must
        then hold a fixed VHD of the declared size (else InvalidVhd, and the
        disk stays ActiveUpload with its SAS working); the disk becomes
        Unattached. A disk or snapshot without a grant is left as it is."""
        obj = self._get(kind, name)
        grant = obj.get("access")
        if grant is None and obj.get("state") != DiskState.READY_TO_UPLOAD.value:
            return obj
        if grant is not None and grant["access"] == "Read":
            return self._end_read(kind, name, obj, grant)
        return self._end_upload(name, obj, grant)

    def _end_read(self, kind: str, name: str, obj: dict[str, Any], grant: dict[str, Any]) -> dict[str, Any]:
        self._drop_read(kind, name, grant, str(obj["blob"]))
        return self._get(kind, name)

    def _drop_read(self, kind: str, name: str, grant: dict[str, Any], blob: str) -> None:
        """End Read grant `grant` in one transaction, if the record (on `blob`)
        still holds it (a revoke that lost a race to another revoke must not set
        the state back over an attach made since), and delete its VHD view."""
        with self.meta.write() as txn:
            if self._holds(txn, kind, name, blob, grant["id"]):  # its state_before as now (a detach since moves it)
                now = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())["access"]
                self._write_grant(txn, kind, name, None, now["state_before"] if kind == "disk" else None)
            export = grant.get("export_blob")
            if export and self.blobs.exists_in(txn, export):
                self.blobs.delete_in(txn, export, snapshots="include")

    def _end_upload(self, name: str, obj: dict[str, Any], grant: dict[str, Any] | None) -> dict[str, Any]:
        blob, token = str(obj["blob"]), uuid.uuid4().hex
        if grant is not None:  # new requests of the SAS are refused while the blob is checked
            self._update_grant("disk", name, blob, {**grant, "revoking": token})
        try:
            self._check_upload(obj)
        except BaseException:
            if grant is not None:  # the SAS works again, unless the grant changed meanwhile
                try:
                    self._update_grant("disk", name, blob, _open(grant), revoking=token)
                except OperationNotAllowed:
                    pass
            raise
        with self.meta.write() as txn:  # the upload checked is still the disk's, its grant untouched
            if not self._holds(txn, "disk", name, blob, None if grant is None else grant["id"],
                               None if grant is None else token):
                raise ac.OperationNotAllowed(f"disk {name!r} changed while revoke-access checked its upload (by "
                                             "another process); try again")
            self._write_grant(txn, "disk", name, None, DiskState.UNATTACHED.value)
        return self._get("disk", name)

    def _check_upload(self, obj: dict[str, Any]) -> None:
        blob, upload = str(obj["blob"]), int(obj.get("upload_size_bytes", obj["size_bytes"] + 512))
        size = self.blobs.size(blob)
        raw = self.blobs.read(blob, size - 512, 512) if size >= 512 else b""
        where = f"{obj['access']['container']}/{ac.BLOB}" if obj.get("access") else blob
        ac.check_uploaded_footer(raw, size, upload, str(obj["name"]), where)
        report = vhd.check(PageBlobFile(self.stamp, blob, writable=False), azure=True)
        if not report.ok:
            raise ac.InvalidVhd(f"The VHD uploaded to disk '{obj['name']}' is not valid: "
                                f"{'; '.join(str(p) for p in report.problems)}")

    # -- changing a disk's performance ------------------------------------------------------

    def update_disk(self, name: str, *, iops: int | None = None, mbps: int | None = None,
                    tier: str | None = None, size_gib: int | None = None) -> dict[str, Any]:
        """Change a disk's provisioned IOPS and MB/s (Ultra, Premium SSD v2: the
        one not given stays, if the other still allows it) or its performance
        tier (Premium SSD), attached or not, in one transaction; its
        `performance_version` moves on, so a host serving it takes the new
        limits. The rules' error (performance.py) when a value is out of range
        or the change comes too soon. `size_gib` grows the disk (grow_disk)."""
        if iops is None and mbps is None and tier is None and size_gib is None:
            raise StampError("nothing to change: give --disk-iops-read-write, --disk-mbps-read-write, --tier or "
                             "--size-gib")
        self._settle("disk", name)
        if size_gib is not None:
            self._grow(name, size_gib, iops, mbps, tier)
        key = f"disk/{name}".encode()
        with self.meta.write() as txn:
            obj = self._finished(txn, "disk", name)
            if size_gib is not None:
                self._check_growable(obj)  # again: another process may have attached or granted it meanwhile
                obj.update(size_bytes=size_gib * GIB, size_gib=float(size_gib))
            obj.update(self._changed(obj, iops, mbps, tier, self.clock()))
            obj["performance_version"] = int(obj.get("performance_version", 0)) + 1
            self.meta.put_json(txn, "resources", key, obj)
        return obj

    def _grow(self, name: str, size_gib: int, iops: int | None, mbps: int | None, tier: str | None) -> None:
        """Grow a disk's fixed VHD to `size_gib` (the platform: only larger, and
        not while attached to a running VM, nor while a grant serves it), after checking that the record
        with the new size passes the rules. Order: the VHD in the blob (data
        region, then the footer at the new end, as vhd's resize), then the
        record (update_disk's transaction): a process killed in between leaves
        the record's size behind the VHD's, and the same update again
        finishes it."""
        obj = self.record(name)
        if isinstance(size_gib, bool) or not isinstance(size_gib, int):
            raise StampError(f"a disk's new size is a whole number of GiB, not {size_gib!r}")
        self._check_growable(obj)
        if size_gib * GIB < int(obj["size_bytes"]):
            raise OperationNotAllowed(f"a disk can only grow: {name!r} is {obj['size_gib']:g} GiB, not more than "
                                      f"{size_gib} GiB")
        if obj["vhd_type"] != "fixed" or obj["state"] == DiskState.READY_TO_UPLOAD.value:
            raise StampError(f"disk {name!r} holds a {obj['vhd_type']} VHD"
                             + (" waiting for its upload" if obj["state"] == DiskState.READY_TO_UPLOAD.value else "")
                             + ": only a disk holding a fixed VHD grows here (the emulator's limit)")
        self._check_sku(str(obj["sku"]), float(size_gib))
        self._changed({**obj, "size_bytes": size_gib * GIB}, iops, mbps, tier, self.clock())  # refused: nothing grew
        lease = self.blobs.acquire_writer_lease(str(obj["blob"]))
        try:
            img = open_image(PageBlobFile(self.stamp, str(obj["blob"]), lease=lease), writable=True)
            try:
                if not isinstance(img, FixedImage):
                    raise StampError(f"disk {name!r}'s blob does not hold a fixed VHD: check it (stamp disk check)")
                if img.size < size_gib * GIB:
                    _grow_fixed(img, size_gib * GIB)
            finally:
                img.close()
        finally:
            self.blobs.release_lease(str(obj["blob"]), lease)

    @staticmethod
    def _check_growable(obj: dict[str, Any]) -> None:
        """A disk grows only unattached or Reserved (its VM deallocated): not
        attached to a running VM, nor while a grant is out (a download reading
        the blob, an upload writing it: the platform's OperationNotAllowed)."""
        name, state = str(obj["name"]), str(obj["state"])
        if state == DiskState.ATTACHED.value:
            raise OperationNotAllowed(f"disk {name!r} is attached to running VM {obj.get('attached_to')}: a disk "
                                      "grows only while unattached or its VM is deallocated")
        if state in (DiskState.ACTIVE_SAS.value, DiskState.ACTIVE_UPLOAD.value):
            raise ac.not_allowed("resize", "disk", name, state)

    def _changed(self, obj: dict[str, Any], iops: int | None, mbps: int | None, tier: str | None,
                 now: float) -> dict[str, Any]:
        """The fields a performance change sets on record `obj` (a size change
        included: its size is the new one), checked by the rules."""
        sku, size_gib = str(obj["sku"]), float(obj["size_bytes"]) / GIB
        if sku in perf.PROVISIONED_SKUS:
            if tier is not None:
                raise InvalidParameter(f"{sku} disks take no performance tier: change --disk-iops-read-write "
                                       "and --disk-mbps-read-write instead")
            was = self._provisioned_now(obj)
            new_iops = was[0] if iops is None else iops
            try:
                new_iops, new_mbps = perf.provisioned(sku, size_gib, new_iops, was[1] if mbps is None else mbps)
            except BadRequest as e:
                if mbps is None and "diskMBpsReadWrite" in str(e):  # the MB/s it has are too many for the new IOPS
                    raise BadRequest(f"{str(e).removeprefix('BadRequest: ')} (the disk has {was[1]} MB/s: "
                                     "give --disk-mbps-read-write too)") from None
                raise
            changes = list(obj.get("performance_changes") or [])
            if iops is None and mbps is None:  # a growth alone: no performance change, none of the 4 in 24 hours
                changes = perf.recent_changes(changes, now)
            else:
                changes = perf.check_change_allowed(sku, changes, now)
            return {"disk_iops_read_write": new_iops, "disk_mbps_read_write": new_mbps,
                    "performance_changes": changes}
        if iops is not None or mbps is not None:
            raise InvalidParameter(f"IOPS and MB/s are only settable for UltraSSD_LRS and PremiumV2_LRS disks; a "
                                   f"{sku} disk performs as its tier" +
                                   (" (give it a higher one with --tier)" if sku == "Premium_LRS" else ""))
        base = perf.baseline_tier(sku, size_gib)
        old = str(obj.get("tier") or base)
        if tier is None:  # a size change: the tier it had, unless the new size's own is higher
            known = old in [n for n, _ in perf.TIERS[sku]]
            tier = base if not known or perf.tier_rank(sku, base) > perf.tier_rank(sku, old) else old
        new = perf.check_tier(sku, size_gib, tier)
        out: dict[str, Any] = {"tier": new, "baseline_tier": base}
        if perf.check_downgrade(sku, old, new, obj.get("tier_downgraded"), now):
            out["tier_downgraded"] = now
        return out

    @staticmethod
    def _provisioned_now(obj: dict[str, Any]) -> tuple[int, int]:
        """An Ultra or Premium SSD v2 record's IOPS and MB/s (one made before
        they were recorded has the defaults)."""
        if obj.get("disk_iops_read_write") is not None:
            return int(obj["disk_iops_read_write"]), int(obj["disk_mbps_read_write"])
        return perf.provisioned(str(obj["sku"]), float(obj["size_bytes"]) / GIB)

    # -- images and snapshots ---------------------------------------------------------------

    def create_image(self, name: str, path: str | None = None, disk: str | None = None,
                     convert: bool = False) -> dict[str, Any]:
        """An image from a local VHD file or from a disk (flattened to a fixed VHD)."""
        if (path is None) == (disk is None):
            raise StampError("an image comes from exactly one source: a VHD file or a disk")
        source: dict[str, Any] = {"file": os.path.abspath(path)} if path is not None else {"disk": disk}
        record: dict[str, Any] = {"name": name, "created": time.time(), "source": source}
        with self._creating("image", record) as blob:
            if path is not None:
                size, footer = self._load_vhd(path, blob, convert)
            else:
                with self.open_virtual(str(disk)) as src:
                    size = src.size
                    self._new_blob(blob)
                    target = create_fixed(PageBlobFile(self.stamp, blob), size)
                    vhd.copy_data(src, target)
                    footer = target.footer
            record.update(size_bytes=size, vhd_uuid=str(footer.unique_id), vhd_timestamp=footer.timestamp)
        return record

    def create_snapshot(self, name: str, disk: str, incremental: bool = True) -> dict[str, Any]:
        src = self._get("disk", disk)
        _not_uploading("snapshot", src)
        record: dict[str, Any] = {"name": name, "disk": disk, "incremental": incremental, "created": time.time(),
                                  "sku": src["sku"], "size_bytes": src["size_bytes"], "vhd_type": src["vhd_type"],
                                  "source": src.get("source", {})}
        if not incremental:
            with self._creating("snapshot", record) as blob:
                self.blobs.copy(src["blob"], blob)
                record.update(blob_snapshot=None, used_bytes=self.blobs.used_bytes(blob))
            return record
        with self._creating("snapshot", record, blob=src["blob"], needs=(("disk", disk, str(src["blob"])),)) as blob:
            token = self._intent("snapshot", name)["token"]
            snap = self.blobs.snapshot(blob, metadata={"token": token})  # the tag a roll back finds it by
            prev, changed = self._changed_since_previous(blob, snap.id)
            record.update(blob_snapshot=snap.id, changed_bytes=changed, previous=prev)
        return record

    def _changed_since_previous(self, blob: str, snap: str) -> tuple[str | None, int]:
        """(name, bytes written since) of the latest finished incremental
        snapshot of `blob` before `snap`, or (None, bytes used). One deleted
        since it was listed (a retention job) gives way to the one before it;
        one finished meanwhile by a concurrent create (newer than `snap`) is
        passed over."""
        passed: set[str] = set()
        while True:
            previous = [s for s in self.snapshots() if s["blob"] == blob and s["incremental"]
                        and s.get("state") != CREATING and s["name"] not in passed]
            prev = max(previous, key=lambda s: s["created"], default=None)
            if prev is None:
                return None, self.blobs.used_bytes(blob, snapshot=snap)
            try:
                d = self.blobs.diff(blob, prev["blob_snapshot"], snap)
            except (PreviousSnapshotNotFound, PreviousSnapshotCannotBeNewer):
                passed.add(str(prev["name"]))
                continue
            return str(prev["name"]), sum(n for _, n in d.written)

    def diff(self, base: str, target: str | None = None) -> dict[str, Any]:
        """Guest (disk) byte ranges written and cleared between incremental
        snapshot `base` and `target` (a later one of the same disk, or the
        disk now), for every disk type: the page blob's diff mapped through
        the VHD's layout, split by what the target reads as data."""
        b, d = self._blob_diff(base, target)
        with self.open_virtual(b["disk"], snapshot=target) as v, \
                self.open_virtual(b["disk"], snapshot=base) as was:
            changed = rg.merge_ranges([(o, o + n) for o, n in guest_ranges(v.image, d.written + d.cleared,
                                                                            was.image)])
            data = [(e.offset, e.offset + e.length) for s, e_ in changed
                    for e in v.allocation(s, e_ - s) if e.state.value == "data"]
        written = rg.merge_ranges(data)
        cleared = rg.subtract(changed, written)
        return {"base": base, "target": target or b["disk"], "unit": "disk bytes",
                "written": [{"offset": s, "length": e - s} for s, e in written],
                "cleared": [{"offset": s, "length": e - s} for s, e in cleared]}

    def iter_diff(self, base: str, target: str | None = None, offset: int = 0,
                  length: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """diff, lazily, as (offset, length, cleared) guest byte ranges in
        offset order, cut to [offset, offset+length) page-aligned outward
        (stamp.guestdiff): it holds one VHD block's ranges, not the diff, and
        no read transaction between the ranges it yields."""
        b, t = self._diff_ends(base, target)
        with self.open_virtual(b["disk"], snapshot=target) as v, \
                self.open_virtual(b["disk"], snapshot=base) as was:
            yield from guestdiff.iter_guest_diff(self.blobs, b["blob"], b["blob_snapshot"],
                                                 t["blob_snapshot"] if t else None, v.image, was.image,
                                                 offset, length)

    def blob_diff(self, base: str, target: str | None = None) -> dict[str, Any]:
        """The same diff in the disk's page blob's bytes (for a disk from an
        image: offsets in its differencing VHD file)."""
        b, d = self._blob_diff(base, target)
        return {"base": base, "target": target or b["disk"], "unit": "blob bytes", **d.to_json()}

    def _blob_diff(self, base: str, target: str | None) -> tuple[dict[str, Any], Diff]:
        b, t = self._diff_ends(base, target)
        return b, self.blobs.diff(b["blob"], b["blob_snapshot"], t["blob_snapshot"] if t else None)

    def _diff_ends(self, base: str, target: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The records of a diff's base and target snapshots (None: the disk), checked."""
        b = self.snapshot(base)
        if not b.get("blob_snapshot"):
            raise StampError(f"{base} is a full snapshot: diffs are between incremental snapshots")
        t = self.snapshot(target) if target else None
        if t is not None and (t["blob"] != b["blob"] or not t.get("blob_snapshot")):
            raise StampError(f"{target} is not an incremental snapshot of the same disk as {base}")
        if t is None and self._blob_of_disk(b["disk"]) != b["blob"]:
            raise StampError(f"disk {b['disk']!r} is no longer the disk {base} was taken of: name a later "
                             "snapshot of it as the target")
        return b, t

    def _blob_of_disk(self, name: str) -> str | None:
        with self.meta.read() as txn:
            obj = self.meta.get_json(txn, "resources", f"disk/{name}".encode())
        return None if obj is None else str(obj["blob"])

    def _intent(self, kind: str, name: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            return dict(self.meta.get_json(txn, "resources", f"{PENDING}{kind}/{name}".encode()))

    # -- the virtual disk -----------------------------------------------------------------

    def open_virtual(self, name: str, writable: bool = False, snapshot: str | None = None) -> VirtualDisk:
        """The disk (or a snapshot of it) as the guest sees it, through vhd. A
        writable one holds the disk blob's lease until closed."""
        if snapshot is not None:
            if writable:
                raise StampError("snapshots are read-only")
            snap = self.snapshot(snapshot)
            blob, blob_snap, source = snap["blob"], snap.get("blob_snapshot"), snap.get("source", {})
        else:
            obj = self._get("disk", name)
            blob, blob_snap, source = obj["blob"], None, obj.get("source", {})
        lease = self.blobs.acquire_writer_lease(blob) if writable else None
        file = SnapshotFile(self.stamp, blob, blob_snap) if blob_snap else \
            PageBlobFile(self.stamp, blob, lease=lease, writable=writable)
        resolver = None
        if "image" in source:
            image_blob = self.image(source["image"])["blob"]
            resolver = lambda child, header: open_image(  # noqa: E731
                PageBlobFile(self.stamp, image_blob, writable=False))
        try:
            img = open_recovered(file, resolver) if writable else open_image(file, resolver=resolver)
        except BaseException:
            if lease:
                self.blobs.release_lease(blob, lease)
            raise
        return VirtualDisk(img, self.blobs, blob, lease)

    def check_disk(self, name: str, repair: bool = False) -> Report:
        """vhd's check of the disk's VHD in its blob; with repair, what is safe
        to repair is (under the blob's writer lease, so not while attached)."""
        blob = self._get("disk", name)["blob"]
        lease = self.blobs.acquire_writer_lease(blob) if repair else None
        try:
            return vhd.check(PageBlobFile(self.stamp, blob, lease=lease, writable=repair), repair=repair)
        finally:
            if lease:
                self.blobs.release_lease(blob, lease)

    def export(self, name: str, path: str, fmt: str = "fixed", snapshot: str | None = None,
               show_progress: bool | None = None) -> dict[str, Any]:
        """Write a disk or snapshot to a local VHD file (fixed or dynamic), sparse."""
        with self.open_virtual(name, snapshot=snapshot) as src:
            return vhd.convert_device(src, path, fmt, show_progress=show_progress, label=name)

    # -- deleting: one transaction each ----------------------------------------------------------

    def _take(self, txn: lmdb.Transaction, kind: str, name: str) -> dict[str, Any]:
        """Read and delete a finished record inside a write transaction."""
        obj = self._finished(txn, kind, name)
        txn.delete(f"{kind}/{name}".encode(), db=self.meta.db["resources"])
        return obj

    def delete_disk(self, name: str) -> None:
        self._settle("disk", name)
        with self.meta.write() as txn:
            obj = self._take(txn, "disk", name)
            if obj["state"] in (DiskState.ATTACHED.value, DiskState.RESERVED.value):
                raise ResourceInUse(f"disk {name!r} is attached to {obj.get('attached_to')}: detach it first")
            if obj["state"] == DiskState.ACTIVE_SAS.value:  # a download is under way: revoke-access first
                raise ac.not_allowed("delete", "disk", name, obj["state"])
            if obj.get("access"):  # an upload's grant goes with the disk
                txn.delete(f"{GRANTS}{obj['access']['container']}".encode(), db=self.meta.db["resources"])
            lease = self._stale_writer_lease(txn, name, str(obj["blob"]))
            if not self._users_of_blob(txn, obj["blob"], "snapshot"):
                # (else its incremental snapshots keep the blob alive)
                self.blobs.delete_in(txn, obj["blob"], lease=lease, snapshots="include")
            elif lease is not None:
                self.blobs.break_lease_in(txn, str(obj["blob"]))

    def _stale_writer_lease(self, txn: lmdb.Transaction, name: str, blob: str) -> str | None:
        """ResourceInUse if a live process holds the disk's blob open for
        writing; the lease of one that died on this host (the delete breaks
        it), or None."""
        held = self.blobs.held_lease_in(txn, blob)
        if held is None:
            return None
        lease, props = held
        if holder_died(props):
            return lease
        raise ResourceInUse(f"disk {name!r} is open for writing by {props.get('lease_holder', 'another holder')}: "
                            "close it first")

    def replace_disk(self, name: str, source: str, *, overwrite: bool = True, **fields: Any) -> dict[str, Any]:
        """Disk `name` takes over disk `source`'s blob and size, in one transaction
        that also removes `source`'s record: a restore's swap. `name` is made when
        missing; an existing one (refused without `overwrite`: it was made since
        the caller looked) must be unattached and not open for writing (a dead
        writer's lease is broken), and its old blob goes unless snapshots keep it."""
        with self.meta.write() as txn:
            record = {**self._take(txn, "disk", source), **fields, "name": name}
            key = f"disk/{name}".encode()
            old = self.meta.get_json(txn, "resources", key)
            if old is not None and not overwrite:
                raise ResourceExists(f"a disk named {name!r} already exists: it was made meanwhile")
            if old is not None:
                if old["state"] != DiskState.UNATTACHED.value:
                    raise ResourceInUse(f"disk {name!r} is {old['state']}: detach it first")
                if self._stale_writer_lease(txn, name, str(old["blob"])) is not None:
                    self.blobs.break_lease_in(txn, str(old["blob"]))
            self.meta.put_json(txn, "resources", key, record)
            if old is not None:
                self._drop_if_unused(txn, str(old["blob"]))
        return record

    def delete_image(self, name: str) -> None:
        self._settle("image", name)
        with self.meta.write() as txn:
            img = self._take(txn, "image", name)
            users = [str(loads(v)["name"]) for kind in ("disk", "snapshot")
                     for _, v in self.meta.items(txn, "resources", f"{kind}/".encode())
                     if loads(v).get("source", {}).get("image") == name]
            if users:
                raise ResourceInUse(f"image {name!r} is the base of {', '.join(sorted(users))}: delete those first")
            self.blobs.delete_in(txn, img["blob"], snapshots="include")

    def delete_snapshot(self, name: str) -> None:
        self._settle("snapshot", name)
        with self.meta.write() as txn:
            snap = self._take(txn, "snapshot", name)
            if snap.get("access"):
                raise ac.not_allowed("delete", "snapshot", name, DiskState.ACTIVE_SAS.value)
            if not snap.get("blob_snapshot"):
                self.blobs.delete_in(txn, snap["blob"], snapshots="include")
                return
            self.blobs.delete_snapshot_in(txn, snap["blob"], snap["blob_snapshot"])
            self._drop_if_unused(txn, snap["blob"])

    def _drop_if_unused(self, txn: lmdb.Transaction, blob: str) -> None:
        """Delete a disk's blob that no disk and no snapshot names any more."""
        if not self._users_of_blob(txn, blob, "disk") and not self._users_of_blob(txn, blob, "snapshot"):
            self.blobs.delete_in(txn, blob, snapshots="include")


def owner_host(rec: dict[str, Any]) -> str | None:
    """The host a disk record says the disk is with: the one that attached it
    to a VM (state Attached, or Reserved: its VM deallocated) and recorded
    itself in `host`; None for a disk attached to no VM, or a record written
    before hosts were recorded (no `host`: no owner, as then)."""
    if rec.get("state") not in (DiskState.ATTACHED.value, DiskState.RESERVED.value):
        return None
    host = rec.get("host")
    return str(host) if host else None


def _open(grant: dict[str, Any]) -> dict[str, Any]:
    """A grant without a revoke's mark: its SAS works."""
    return {k: v for k, v in grant.items() if k != "revoking"}


def _not_uploading(operation: str, disk: dict[str, Any]) -> None:
    """A disk whose upload is not finished has no content to snapshot or copy."""
    if disk.get("state") in (DiskState.READY_TO_UPLOAD.value, DiskState.ACTIVE_UPLOAD.value):
        raise ac.not_allowed(operation, "disk", str(disk["name"]), str(disk["state"]))


def guest_ranges(image: Any, blob_ranges: list[tuple[int, int]], base: Any = None) -> list[tuple[int, int]]:
    """Changed page blob bytes -> changed guest bytes, through the VHD's
    layout: a fixed VHD's data is the blob's first `size` bytes; a sparse
    one's block b is its bitmap then its data at the BAT's offset. A changed
    bitmap changes how the sectors whose bits differ read: with `base` (the
    image as it was) exactly those, else the whole block (guestdiff.in_block)."""
    size = image.size
    if not isinstance(image, SparseImage):
        return [(o, min(n, size - o)) for o, n in blob_ranges if o < size]
    blocks = sorted((entry * 512, b) for b, entry in image.bat.items())
    starts = [start for start, _ in blocks]
    out: list[tuple[int, int]] = []
    for off, n in blob_ranges:
        end = off + n
        i = max(0, bisect.bisect_right(starts, off) - 1)  # the block holding `off`, if any
        for start, b in blocks[i:]:
            if start >= end:
                break
            out += guestdiff.in_block(image, base, b, start, off, end)
    return out


class SnapshotFile(PageBlobFile):
    """A read-only RawFile over a snapshot of a page blob."""

    stamp: Stamp  # a local stamp: snapshots are not part of what a host over the network reads

    def __init__(self, stamp: Stamp, blob: str, snapshot: str) -> None:
        self.stamp, self.blob, self.snapshot, self.lease, self.writable = stamp, blob, snapshot, None, False
        self.name = f"blob:{blob}@{snapshot}"
        self._size = int(stamp.blobs.snapshot_metadata(blob, snapshot)["size"])

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        return self.stamp.blobs.read(self.blob, offset, end - offset, snapshot=self.snapshot)

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        out = []  # the ranges of [offset, offset+length) only: an allocation map asked piece by piece stays linear
        for o, n in self.stamp.blobs.page_ranges(self.blob, snapshot=self.snapshot, offset=offset, length=length):
            s, e = max(o, offset), min(o + n, offset + length)
            if e > s:
                out.append((s, e - s))
        return out


def open_recovered(file: RawFile, resolver: Resolver | None) -> vhd.Image:
    """Open a disk's VHD for writing, recovering first from a crash between
    growing the blob and writing the footer at its new end (the end footer is
    damaged, its mirror at offset 0 is good): the footer is rewritten from the
    mirror, which is what `vhd check --repair` does; the space the dead write
    added is left unused (compact reclaims it)."""
    if read_footer(file)[1]:
        vhd.check(file, repair=True)
    return open_image(file, writable=True, resolver=resolver)


def _is_vhd(path: str) -> bool:
    from vhd.fileio import OsFile
    from vhd.image import is_vhd
    f = OsFile(path, lock=False)
    try:
        return is_vhd(f)
    finally:
        f.close()


class VirtualDisk:
    """A disk's virtual disk: the vhd image over its blob(s) as a block
    device; a writable one holds the disk blob's lease until closed."""

    def __init__(self, image: vhd.Image, blobs: HostBlobs, blob: str, lease: str | None) -> None:
        self.image, self.blobs, self.blob, self.lease = image, blobs, blob, lease
        self.size = image.size
        self.readonly = image.readonly

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.image.write(offset, data)

    def flush(self) -> None:
        self.image.flush()

    def discard(self, offset: int, length: int) -> None:
        self.image.discard(offset, length)

    def allocation(self, offset: int, length: int) -> list[vhd.Extent]:
        return self.image.allocation(offset, length)

    def close(self) -> None:
        try:
            self.image.close()
        finally:
            if self.lease is not None:
                try:
                    self.blobs.release_lease(self.blob, self.lease)
                except StampError:
                    pass
                self.lease = None

    def __enter__(self) -> VirtualDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
