"""How the vault reads disks from the stamp: what changed since a point, and
where else a chunk's data may still be. I/O through Disks only.

Rules: a backup builds on the previous point only if that point's snapshot
is of the same disk and the same page blob (a restore over a disk gives it a
new blob, and a diff across blobs means nothing); changed page blob bytes
are mapped to guest bytes through the VHD's layout by the disks' own
mapping (a fixed VHD one to one; a sparse VHD through its BAT, a changed
bitmap adding exactly the sectors whose bits differ from the previous
point's); a snapshot that is gone already is not an error.
"""

from __future__ import annotations

from typing import Any

from ..disks import Disks, guest_ranges
from ..errors import StampError
from .errors import VaultError


def check_target(disks: Disks, name: str, overwrite: bool) -> None:
    try:
        rec = disks.record(name)
    except StampError:
        if overwrite:
            raise VaultError(f"no disk named {name!r} to restore over: use --to-disk {name} to make it") from None
        return
    if not overwrite:
        raise VaultError(f"a disk named {name!r} already exists: --over-disk {name} replaces it")
    if rec["state"] != "Unattached":
        raise VaultError(f"disk {name} is {rec['state']}: detach it first")


def changes(disks: Disks, v: Any, disk: str, snap_name: str,
             previous: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[tuple[int, int]]]:
    """The previous point's entries (None: there is nothing to build on) and the
    guest ranges to read: changed since that point, or every allocated range."""
    snap = disks.snapshot(snap_name)
    if previous is not None and snapshot_of(disks, previous["snapshot"], disk):
        base = disks.snapshot(previous["snapshot"])
        if base["blob"] == snap["blob"]:  # the same blob (a restore over the disk makes a new one)
            d = disks.blobs.diff(snap["blob"], base["blob_snapshot"], snap["blob_snapshot"])
            with disks.open_virtual(disk, snapshot=previous["snapshot"]) as was:
                return dict(previous["chunks"]), guest_ranges(v.image, d.written + d.cleared, was.image)
    return None, [(e.offset, e.length) for e in v.allocation(0, v.size) if e.state.value == "data"]


def snapshot_of(disks: Disks, name: str, disk: str) -> bool:
    try:
        return bool(disks.snapshot(name)["disk"] == disk)
    except StampError:
        return False


def drop_snapshot(disks: Disks, name: str) -> None:
    try:
        disks.delete_snapshot(name)
    except StampError:
        pass  # gone already; a leftover is cleaned by the next backup


def read_source(disks: Disks, disk: str, snapshot: str, offset: int, length: int) -> bytes | None:
    """The bytes of `disk` at `offset` from the vault's snapshot if it lives, else from the disk now."""
    try:
        which = snapshot if snapshot_of(disks, snapshot, disk) else None
        with disks.open_virtual(disk, snapshot=which) as v:
            return v.read(offset, length) if offset + length <= v.size else None
    except StampError:
        return None
