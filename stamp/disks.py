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
"""

from __future__ import annotations

import enum
import os
import time
import uuid
from typing import Any

import vhd
from vhd import dynamic_header as dh
from vhd import footer as ft
from vhd.image import _write_sparse, create_fixed, open_image

from .blobfile import PageBlobFile
from .errors import StampError
from .meta import loads
from .pageblob import MAX_DISK_BLOB, PageBlobs
from .stamp import Stamp

GIB = 1024 ** 3
MIB = 1024 ** 2
SKUS = {"Standard_LRS": 32 * 1024, "StandardSSD_LRS": 32 * 1024, "Premium_LRS": 32 * 1024,
        "PremiumV2_LRS": 64 * 1024, "UltraSSD_LRS": 64 * 1024}  # max size in GiB


class DiskState(enum.Enum):
    UNATTACHED = "Unattached"
    ATTACHED = "Attached"
    RESERVED = "Reserved"  # attached to a stopped (deallocated) VM
    READY_TO_UPLOAD = "ReadyToUpload"


class ResourceNotFound(StampError):
    pass


class ResourceExists(StampError):
    pass


class ResourceInUse(StampError):
    """A delete or change that a dependent resource forbids."""


class Disks:
    def __init__(self, stamp: Stamp) -> None:
        self.stamp = stamp
        self.blobs = stamp.blobs
        self.meta = stamp.meta

    # -- records ---------------------------------------------------------------------

    def _get(self, kind: str, name: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            obj = self.meta.get_json(txn, "resources", f"{kind}/{name}".encode())
        if obj is None:
            raise ResourceNotFound(f"no {kind} named {name!r}")
        return dict(obj)

    def _put(self, kind: str, obj: dict[str, Any], new: bool = False) -> None:
        key = f"{kind}/{obj['name']}".encode()
        with self.meta.write() as txn:
            if new and txn.get(key, db=self.meta.db["resources"]) is not None:
                raise ResourceExists(f"a {kind} named {obj['name']!r} already exists")
            self.meta.put_json(txn, "resources", key, obj)

    def _delete(self, kind: str, name: str) -> None:
        with self.meta.write() as txn:
            txn.delete(f"{kind}/{name}".encode(), db=self.meta.db["resources"])

    def _list(self, kind: str) -> list[dict[str, Any]]:
        with self.meta.read() as txn:
            return [dict(loads(v)) for _, v in self.meta.items(txn, "resources", f"{kind}/".encode())]

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

    def set_state(self, name: str, state: DiskState, **fields: Any) -> dict[str, Any]:
        """For the host layer: attach, detach, deallocate."""
        obj = self._get("disk", name)
        obj["state"] = state.value
        obj.update(fields)
        self._put("disk", obj)
        return obj

    # -- creating disks -----------------------------------------------------------------

    @staticmethod
    def _check_sku(sku: str, size_gib: float) -> None:
        if sku not in SKUS:
            raise StampError(f"unknown SKU {sku!r}: one of {', '.join(SKUS)}")
        if not 0 < size_gib <= SKUS[sku]:
            raise StampError(f"{sku} disks are 1 GiB to {SKUS[sku]} GiB; asked for {size_gib} GiB")

    def _record(self, name: str, sku: str, size: int, option: str, blob: str, kind: str,
                **extra: Any) -> dict[str, Any]:
        return {"name": name, "sku": sku, "size_gib": size / GIB, "size_bytes": size,
                "state": DiskState.UNATTACHED.value, "create_option": option, "blob": blob,
                "vhd_type": kind, "created": time.time(), "attached_to": None, "lun": None, **extra}

    def _new_blob(self, blob: str, size: int = 0) -> None:
        if self.blobs.exists(blob):
            raise ResourceExists(f"blob {blob} already exists")
        self.blobs.create(blob, size, limit=MAX_DISK_BLOB)

    def create_empty(self, name: str, size_gib: int, sku: str = "Premium_LRS",
                     size_bytes: int | None = None) -> dict[str, Any]:
        """An empty disk: a fixed VHD page blob, sparse until written. `size_bytes`
        (a multiple of 1 MiB) instead of whole GiB: a restored disk keeps its size."""
        size = size_gib * GIB if size_bytes is None else size_bytes
        if size % MIB:
            raise StampError(f"a disk's size is a multiple of 1 MiB, not {size} bytes")
        self._check_sku(sku, size / GIB)
        blob = f"disks/{name}"
        record = self._record(name, sku, size, "Empty", blob, "fixed")
        self._put("disk", {**record, "state": "Creating"}, new=True)
        self._new_blob(blob)
        create_fixed(PageBlobFile(self.stamp, blob), size)
        self._put("disk", record)
        return record

    def create_from_image(self, name: str, image: str, size_gib: int | None = None,
                          sku: str = "Premium_LRS") -> dict[str, Any]:
        """A differencing VHD over the image's blob; only what the VM writes is stored."""
        img = self.image(image)
        size = img["size_bytes"] if size_gib is None else size_gib * GIB
        if size < img["size_bytes"]:
            raise StampError(f"disk size {size_gib} GiB is smaller than image {image!r}")
        self._check_sku(sku, size / GIB)
        blob = f"disks/{name}"
        record = self._record(name, sku, size, "FromImage", blob, "differencing", source={"image": image})
        self._put("disk", {**record, "state": "Creating"}, new=True)
        self._new_blob(blob)
        parent = (uuid.UUID(img["vhd_uuid"]), int(img["vhd_timestamp"]), str(img["blob"]))
        _write_sparse(PageBlobFile(self.stamp, blob), None, ft.DiskType.DIFFERENCING, size,
                      dh.DEFAULT_BLOCK_SIZE, parent, [], True, None)
        self._put("disk", record)
        return record

    def import_vhd(self, name: str, path: str, sku: str = "Premium_LRS", convert: bool = False) -> dict[str, Any]:
        """A disk from a local VHD that passes the upload rules (or, with
        convert, any VHD or raw image, made fixed and rounded up to 1 MiB)."""
        blob = f"disks/{name}"
        size, footer = self._load_vhd(path, blob, convert)
        try:
            self._check_sku(sku, size / GIB if size >= GIB else 1)
        except StampError:
            self.blobs.delete(blob)
            raise
        record = self._record(name, sku, size, "Import", blob, "fixed", source={"file": os.path.abspath(path)})
        self._put("disk", record, new=True)
        return record

    def _load_vhd(self, path: str, blob: str, convert: bool) -> tuple[int, ft.Footer]:
        """Copy a local image into a new fixed-VHD blob; returns (size, footer).
        A VHD that passes the upload rules is taken as it is; with convert, any
        VHD (flattened) or raw image becomes fixed, its size rounded up to 1 MiB."""
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
        except BaseException:
            if self.blobs.exists(blob):
                self.blobs.delete(blob)
            raise
        finally:
            src.close()
        return size, footer

    def create_copy(self, name: str, source_disk: str | None = None, source_snapshot: str | None = None,
                    sku: str | None = None) -> dict[str, Any]:
        """A new disk with the content of a disk or snapshot (sharing extents)."""
        if (source_disk is None) == (source_snapshot is None):
            raise StampError("copy needs exactly one source: a disk or a snapshot")
        if source_disk is not None:
            src = self._get("disk", source_disk)
            blob, snap, kind = src["blob"], None, src["vhd_type"]
            source = {"disk": source_disk}
        else:
            src = self.snapshot(str(source_snapshot))
            blob, snap, kind = src["blob"], src.get("blob_snapshot") or None, src["vhd_type"]
            source = {"snapshot": str(source_snapshot)}
        target = f"disks/{name}"
        if self.blobs.exists(target) or self._exists("disk", name):
            raise ResourceExists(f"a disk named {name!r} already exists")
        self.blobs.copy(blob, target, snapshot=snap)
        record = self._record(name, sku or src["sku"], src["size_bytes"], "Copy", target, kind, source=source)
        if "source" in src and "image" in src.get("source", {}):
            record["source"] = {**source, "image": src["source"]["image"]}
        self._put("disk", record, new=True)
        return record

    def _exists(self, kind: str, name: str) -> bool:
        try:
            self._get(kind, name)
            return True
        except ResourceNotFound:
            return False

    def create_for_upload(self, name: str, upload_bytes: int, sku: str = "Premium_LRS") -> dict[str, Any]:
        """A disk waiting for a fixed VHD to be written into its blob page by page."""
        if upload_bytes % MIB != 512 or upload_bytes < 20 * MIB + 512:
            raise StampError("upload size is the fixed VHD's file size: a multiple of 1 MiB plus 512, "
                             "at least 20 MiB + 512")
        blob = f"disks/{name}"
        record = self._record(name, sku, upload_bytes - 512, "Upload", blob, "fixed",
                              state=DiskState.READY_TO_UPLOAD.value)
        self._put("disk", record, new=True)
        self._new_blob(blob, upload_bytes)
        return record

    def finish_upload(self, name: str) -> dict[str, Any]:
        obj = self._get("disk", name)
        if obj["state"] != DiskState.READY_TO_UPLOAD.value:
            raise StampError(f"disk {name!r} is not waiting for an upload")
        report = vhd.check(PageBlobFile(self.stamp, obj["blob"], writable=False), azure=True)
        if not report.ok:
            raise StampError(f"the uploaded VHD is not valid: {'; '.join(str(p) for p in report.problems)}")
        obj["state"] = DiskState.UNATTACHED.value
        self._put("disk", obj)
        return obj

    # -- images and snapshots ---------------------------------------------------------------

    def create_image(self, name: str, path: str | None = None, disk: str | None = None,
                     convert: bool = False) -> dict[str, Any]:
        """An image from a local VHD file or from a disk (flattened to a fixed VHD)."""
        if (path is None) == (disk is None):
            raise StampError("an image comes from exactly one source: a VHD file or a disk")
        if self._exists("image", name):
            raise ResourceExists(f"an image named {name!r} already exists")
        blob = f"images/{name}"
        if path is not None:
            size, footer = self._load_vhd(path, blob, convert)
            source: dict[str, Any] = {"file": os.path.abspath(path)}
        else:
            with self.open_virtual(str(disk)) as src:
                size = src.size
                self._new_blob(blob)
                target = create_fixed(PageBlobFile(self.stamp, blob), size)
                vhd.copy_data(src, target)
                footer = target.footer
            source = {"disk": disk}
        record = {"name": name, "blob": blob, "size_bytes": size, "created": time.time(), "source": source,
                  "vhd_uuid": str(footer.unique_id), "vhd_timestamp": footer.timestamp}
        self._put("image", record, new=True)
        return record

    def create_snapshot(self, name: str, disk: str, incremental: bool = True) -> dict[str, Any]:
        src = self._get("disk", disk)
        if self._exists("snapshot", name):
            raise ResourceExists(f"a snapshot named {name!r} already exists")
        record: dict[str, Any] = {"name": name, "disk": disk, "incremental": incremental, "created": time.time(),
                                  "sku": src["sku"], "size_bytes": src["size_bytes"], "vhd_type": src["vhd_type"],
                                  "source": src.get("source", {})}
        if incremental:
            snap = self.blobs.snapshot(src["blob"])
            previous = [s for s in self.snapshots() if s["disk"] == disk and s["incremental"]]
            prev = max(previous, key=lambda s: s["created"], default=None)
            if prev is not None and prev["blob"] == src["blob"]:
                d = self.blobs.diff(src["blob"], prev["blob_snapshot"], snap.id)
                changed = sum(n for _, n in d.written)
            else:
                changed = self.blobs.used_bytes(src["blob"], snapshot=snap.id)
            record.update(blob=src["blob"], blob_snapshot=snap.id, changed_bytes=changed,
                          previous=prev["name"] if prev else None)
        else:
            blob = f"snapshots/{name}"
            self.blobs.copy(src["blob"], blob)
            record.update(blob=blob, blob_snapshot=None, used_bytes=self.blobs.used_bytes(blob))
        self._put("snapshot", record, new=True)
        return record

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
            img = open_image(file, writable=writable, resolver=resolver)
        except BaseException:
            if lease:
                self.blobs.release_lease(blob, lease)
            raise
        return VirtualDisk(img, self.blobs, blob, lease)

    def export(self, name: str, path: str, fmt: str = "fixed", snapshot: str | None = None,
               show_progress: bool | None = None) -> dict[str, Any]:
        """Write a disk or snapshot to a local VHD file (fixed or dynamic), sparse."""
        with self.open_virtual(name, snapshot=snapshot) as src:
            return vhd.convert_device(src, path, fmt, show_progress=show_progress, label=name)

    # -- deleting -----------------------------------------------------------------------------

    def delete_disk(self, name: str) -> None:
        obj = self._get("disk", name)
        if obj["state"] in (DiskState.ATTACHED.value, DiskState.RESERVED.value):
            raise ResourceInUse(f"disk {name!r} is attached to {obj.get('attached_to')}: detach it first")
        self._delete("disk", name)
        if not any(s["blob"] == obj["blob"] for s in self.snapshots()):
            self.blobs.delete(obj["blob"])  # else its incremental snapshots keep the blob alive

    def replace_disk(self, name: str, source: str, **fields: Any) -> dict[str, Any]:
        """Disk `name` takes over disk `source`'s blob and size, in one transaction
        that also removes `source`'s record: a restore's swap. `name` is made when
        missing; an existing one must be unattached, and its old blob goes unless
        snapshots keep it."""
        with self.meta.write() as txn:
            new = self.meta.get_json(txn, "resources", f"disk/{source}".encode())
            old = self.meta.get_json(txn, "resources", f"disk/{name}".encode())
            if new is None:
                raise ResourceNotFound(f"no disk named {source!r}")
            if old is not None and old["state"] != DiskState.UNATTACHED.value:
                raise ResourceInUse(f"disk {name!r} is {old['state']}: detach it first")
            record = {**dict(new), **fields, "name": name}
            self.meta.put_json(txn, "resources", f"disk/{name}".encode(), record)
            txn.delete(f"disk/{source}".encode(), db=self.meta.db["resources"])
        if old is not None and not any(s["blob"] == old["blob"] for s in self.snapshots()):
            self.blobs.delete(old["blob"])
        return record

    def delete_image(self, name: str) -> None:
        self.image(name)
        users = [d["name"] for d in self.disks() if d.get("source", {}).get("image") == name]
        users += [s["name"] for s in self.snapshots() if s.get("source", {}).get("image") == name]
        if users:
            raise ResourceInUse(f"image {name!r} is the base of {', '.join(sorted(users))}: delete those first")
        img = self.image(name)
        self._delete("image", name)
        self.blobs.delete(img["blob"])

    def delete_snapshot(self, name: str) -> None:
        snap = self.snapshot(name)
        self._delete("snapshot", name)
        if snap.get("blob_snapshot"):
            self.blobs.delete_snapshot(snap["blob"], snap["blob_snapshot"])
            disk_alive = any(d["blob"] == snap["blob"] for d in self.disks())
            if not disk_alive and not any(s["blob"] == snap["blob"] for s in self.snapshots()):
                self.blobs.delete(snap["blob"])
        else:
            self.blobs.delete(snap["blob"])


class SnapshotFile(PageBlobFile):
    """A read-only RawFile over a snapshot of a page blob."""

    def __init__(self, stamp: Stamp, blob: str, snapshot: str) -> None:
        self.stamp, self.blob, self.snapshot, self.lease, self.writable = stamp, blob, snapshot, None, False
        self.name = f"blob:{blob}@{snapshot}"
        self._size = int(stamp.blobs.snapshot_metadata(blob, snapshot)["size"])

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        lo, hi = offset - offset % 512, -(-end // 512) * 512
        data = self.stamp.blobs.read(self.blob, lo, hi - lo, snapshot=self.snapshot)
        return data[offset - lo:end - lo]

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        out = []
        for o, n in self.stamp.blobs.page_ranges(self.blob, snapshot=self.snapshot):
            s, e = max(o, offset), min(o + n, offset + length)
            if e > s:
                out.append((s, e - s))
        return out


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

    def __init__(self, image: vhd.Image, blobs: PageBlobs, blob: str, lease: str | None) -> None:
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
