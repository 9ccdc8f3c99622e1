"""The backup vault: recovery points of managed disks, incremental and deduplicated.

A vault is a folder apart from the stamp:

    VAULT/vault.json      version; with a key: scrypt salt and a key check
    VAULT/chunks/ab/NAME  chunks (chunk.py), fanned out by the first two hex digits
    VAULT/points/ID.json  recovery point manifests
    VAULT/index/          LMDB: points (id -> summary), the quick listing

A recovery point holds the disk as the guest sees it, in CHUNK-sized pieces
(all-zero pieces are not stored), so it restores even if the image a
FromImage disk came from is gone. A backup:
  1. quiesce (the caller's hook: the host flushes its cache for the disk);
  2. take an incremental snapshot of the disk;
  3. find what changed since the disk's previous recovery point: the stamp's
     diff between the two snapshots, in page blob bytes, mapped to guest
     bytes (a fixed VHD maps one to one; a differencing VHD through its BAT:
     a changed block's data maps to itself, a changed bitmap to its block);
     the first backup reads the disk's allocated ranges only;
  4. read those pieces from the snapshot, store each new chunk once;
  5. write the manifest (temporary file, synced, renamed), then the index.
Chunks land before the manifest that names them, and the manifest before the
index: a backup killed at any moment leaves only unreferenced chunks, which
gc removes. gc spares chunks newer than its own start (a backup in flight
may be about to name them) and a backup refreshes the time of the old chunks
it reuses. With a key, chunk names are HMACs, chunks are AES-256-GCM and
manifests carry an HMAC: a wrong key fails at open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb

from vhd.ops import write_new_file
from vhd.progress import Progress

from ..disks import Disks, guest_ranges
from ..errors import StampError
from . import chunk as ck

VERSION = 1


class VaultError(StampError):
    """A vault operation that cannot proceed (wrong key, corrupt manifest, missing point)."""


class VaultKeyError(VaultError):
    """The key is missing or wrong."""


@dataclass
class BackupReport:
    point: str
    disk: str
    incremental: bool
    bytes_read: int = 0
    chunks_written: int = 0
    chunks_reused: int = 0
    new_bytes_stored: int = 0
    new_bytes_raw: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["compression_ratio"] = round(self.new_bytes_raw / self.new_bytes_stored, 2) if self.new_bytes_stored else None
        total = self.chunks_written + self.chunks_reused
        out["dedup_ratio"] = round(total / self.chunks_written, 2) if self.chunks_written else None
        return out


class Vault:
    def __init__(self, folder: str, passphrase: str | None = None) -> None:
        self.folder = folder
        try:
            with open(os.path.join(folder, "vault.json")) as f:
                self.config = json.load(f)
        except FileNotFoundError:
            raise VaultError(f"{folder} is not a vault (no vault.json): create one with Vault.create") from None
        self.enc_key = self.naming_key = self.mac_key = None
        if self.config.get("encrypted"):
            if passphrase is None:
                raise VaultKeyError("this vault is encrypted: give its passphrase")
            keys = hashlib.scrypt(passphrase.encode(), salt=bytes.fromhex(self.config["salt"]), n=2**14, r=8, p=1,
                                  dklen=96)
            self.enc_key, self.naming_key, self.mac_key = keys[:32], keys[32:64], keys[64:]
            check = hmac.new(self.mac_key, b"diskstamp vault key check", hashlib.sha256).hexdigest()
            if not hmac.compare_digest(check, self.config["key_check"]):
                raise VaultKeyError("wrong passphrase for this vault")
        elif passphrase is not None:
            raise VaultKeyError("this vault is not encrypted: give no passphrase")
        self.env = lmdb.open(os.path.join(folder, "index"), map_size=1 << 30, max_dbs=2)
        self.points_db = self.env.open_db(b"points")

    @classmethod
    def create(cls, folder: str, passphrase: str | None = None) -> Vault:
        if os.path.exists(os.path.join(folder, "vault.json")):
            raise VaultError(f"{folder} already holds a vault")
        os.makedirs(os.path.join(folder, "chunks"), exist_ok=True)
        os.makedirs(os.path.join(folder, "points"), exist_ok=True)
        config: dict[str, Any] = {"version": VERSION, "chunk_size": ck.CHUNK, "encrypted": passphrase is not None}
        if passphrase is not None:
            salt = os.urandom(16)
            keys = hashlib.scrypt(passphrase.encode(), salt=salt, n=2**14, r=8, p=1, dklen=96)
            config["salt"] = salt.hex()
            config["key_check"] = hmac.new(keys[64:], b"diskstamp vault key check", hashlib.sha256).hexdigest()
        _write_atomic(os.path.join(folder, "vault.json"), json.dumps(config, indent=2).encode())
        return cls(folder, passphrase)

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chunks ------------------------------------------------------------------------

    def _chunk_path(self, name: str) -> str:
        return os.path.join(self.folder, "chunks", name[:2], name)

    def put(self, data: bytes, report: BackupReport) -> str:
        name = ck.name_of(data, self.naming_key)
        path = self._chunk_path(name)
        if os.path.exists(path):
            os.utime(path)  # tell a concurrent gc this chunk is in use again
            report.chunks_reused += 1
            return name
        sealed = ck.seal(data, name, self.enc_key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, sealed)
        report.chunks_written += 1
        report.new_bytes_stored += len(sealed)
        report.new_bytes_raw += len(data)
        return name

    def get(self, name: str) -> bytes:
        try:
            with open(self._chunk_path(name), "rb") as f:
                raw = f.read(ck.CHUNK + 2 * 1024 * 1024)
        except FileNotFoundError:
            raise ck.ChunkError(f"chunk {name} is missing") from None
        return ck.open_chunk(raw, name, self.enc_key, self.naming_key)

    # -- manifests ------------------------------------------------------------------------

    def _seal_manifest(self, body: dict[str, Any]) -> bytes:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if self.mac_key is not None:
            mac = hmac.new(self.mac_key, canonical, hashlib.sha256).hexdigest()
            return json.dumps({"body": body, "hmac": mac}, indent=1).encode()
        return json.dumps({"body": body, "sha256": hashlib.sha256(canonical).hexdigest()}, indent=1).encode()

    def manifest(self, point: str) -> dict[str, Any]:
        path = os.path.join(self.folder, "points", f"{point}.json")
        try:
            with open(path, "rb") as f:
                outer = json.loads(f.read())
        except FileNotFoundError:
            raise VaultError(f"no recovery point {point}") from None
        except json.JSONDecodeError:
            raise VaultError(f"recovery point {point}: the manifest is not JSON") from None
        body = outer.get("body")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        if self.mac_key is not None:
            good = "hmac" in outer and hmac.compare_digest(
                hmac.new(self.mac_key, canonical, hashlib.sha256).hexdigest(), outer["hmac"])
        else:
            good = outer.get("sha256") == hashlib.sha256(canonical).hexdigest()
        if not good:
            raise VaultError(f"recovery point {point}: the manifest fails its checksum")
        return dict(body)

    def points(self, disk: str | None = None) -> list[dict[str, Any]]:
        with self.env.begin() as txn:
            pts = [json.loads(bytes(v)) for _, v in txn.cursor(db=self.points_db)]
        pts = [p for p in pts if disk is None or p["disk"] == disk]
        return sorted(pts, key=lambda p: p["time"])

    # -- backup ---------------------------------------------------------------------------

    def backup(self, disks: Disks, disk: str, quiesce: Callable[[], None] | None = None,
               show_progress: bool | None = None) -> BackupReport:
        started = time.monotonic()
        if quiesce is not None:
            quiesce()  # e.g. the host flushes its cache for this disk
        point = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        earlier = self.points(disk)
        previous = earlier[-1] if earlier else None
        snap_name = f"vault-{point}"
        snap = disks.create_snapshot(snap_name, disk, incremental=True)
        report = BackupReport(point, disk, previous is not None)
        with disks.open_virtual(disk, snapshot=snap_name) as v:
            size = v.size
            chunks: dict[str, str] = {}
            base = _snapshot_alive(disks, previous["snapshot"]) if previous is not None else None
            if previous is not None and base is not None and base["blob"] == snap["blob"]:
                # (a disk deleted and made again under its name has another blob: start over)
                chunks = dict(self.manifest(previous["id"])["chunks"])
                d = disks.blobs.diff(snap["blob"], base["blob_snapshot"], snap["blob_snapshot"])
                changed = guest_ranges(v.image, d.written + d.cleared)
            else:
                report.incremental = False
                changed = [(e.offset, e.length) for e in v.allocation(0, size) if e.state.value == "data"]
            touched = sorted({i for off, n in changed for i in range(off // ck.CHUNK, -(-(off + n) // ck.CHUNK))})
            progress = Progress(f"backup {disk}", len(touched) * ck.CHUNK, show_progress)
            for i in touched:
                progress.advance(ck.CHUNK)
                at = i * ck.CHUNK
                n = min(ck.CHUNK, size - at)
                if n <= 0:
                    continue
                data = v.read(at, n)
                report.bytes_read += n
                if data.count(0) == n:
                    chunks.pop(str(i), None)
                else:
                    chunks[str(i)] = self.put(data, report)
            for key in [k for k in chunks if int(k) * ck.CHUNK >= size]:
                del chunks[key]
            progress.close()
        rec = disks.record(disk)
        body = {"id": point, "disk": disk, "snapshot": snap_name, "time": time.time(), "size": size,
                "chunk_size": ck.CHUNK, "chunks": chunks, "previous": previous["id"] if previous else None,
                "source": rec.get("source", {}), "sku": rec["sku"]}
        _write_atomic(os.path.join(self.folder, "points", f"{point}.json"), self._seal_manifest(body))
        summary = {"id": point, "disk": disk, "snapshot": snap_name, "time": body["time"], "size": size,
                   "chunks": len(chunks)}
        with self.env.begin(write=True) as txn:
            txn.put(point.encode(), json.dumps(summary).encode(), db=self.points_db)
        if previous is not None and _snapshot_alive(disks, previous["snapshot"]):
            disks.delete_snapshot(previous["snapshot"])  # the new one is the next diff's base
        report.seconds = round(time.monotonic() - started, 3)
        return report

    # -- restore ----------------------------------------------------------------------------

    def pieces(self, point: str) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        m = self.manifest(point)
        return m, sorted((int(i) * m["chunk_size"], name) for i, name in m["chunks"].items())

    def restore_to_file(self, point: str, path: str, fmt: str = "fixed") -> dict[str, Any]:
        if fmt not in ("fixed", "dynamic", "raw"):
            raise VaultError("restore to fixed, dynamic or raw")
        m, pieces = self.pieces(point)
        if os.path.exists(path):
            raise VaultError(f"{path} already exists")
        write_new_file(path, fmt, m["size"], lambda target: self._write_pieces(pieces, m["size"], target))
        return {"point": point, "path": path, "format": fmt, "size": m["size"]}

    def restore_to_disk(self, point: str, disks: Disks, name: str, sku: str | None = None,
                        overwrite: bool = False) -> dict[str, Any]:
        """A new managed disk (or, with overwrite, an existing unattached one) holding the point."""
        m, pieces = self.pieces(point)
        gib = -(-m["size"] // (1024 ** 3))
        if overwrite:
            rec = disks.record(name)
            if rec["state"] != "Unattached":
                raise VaultError(f"disk {name} is {rec['state']}: detach it first")
        # the disk appears (or replaces the old one) only once every chunk is written
        rec = disks.create_filled(name, gib, sku or m.get("sku", "Premium_LRS"),
                                  lambda img: self._write_pieces(pieces, m["size"], img),
                                  replace=overwrite, restored_from=point)
        return {"point": point, "disk": name, "size_gib": rec["size_gib"]}

    def _write_pieces(self, pieces: list[tuple[int, str]], size: int, target: Any) -> None:
        for offset, name in pieces:
            try:
                data = self.get(name)  # verified: authenticated, sized, named by its content
            except ck.ChunkError as e:
                end = min(offset + ck.CHUNK, size)
                raise ck.ChunkError(f"bytes {offset} to {end} of the disk cannot be restored: {e}") from None
            target.write(offset, data[:max(0, size - offset)])

    # -- maintenance --------------------------------------------------------------------------

    def prune(self, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0, keep_monthly: int = 0,
              disks: Disks | None = None) -> list[str]:
        """Drop recovery points no rule keeps (the newest of each disk always stays)."""
        dropped = []
        for disk in {p["disk"] for p in self.points()}:
            pts = sorted(self.points(disk), key=lambda p: p["time"], reverse=True)
            keep = {pts[0]["id"]} | {p["id"] for p in pts[:keep_last]}
            for fmt, count in (("%Y-%m-%d", keep_daily), ("%G-%V", keep_weekly), ("%Y-%m", keep_monthly)):
                seen: list[str] = []
                for p in pts:
                    bucket = time.strftime(fmt, time.gmtime(p["time"]))
                    if bucket not in seen and len(seen) < count:
                        seen.append(bucket)
                        keep.add(p["id"])
            for p in pts:
                if p["id"] in keep:
                    continue
                with self.env.begin(write=True) as txn:
                    txn.delete(p["id"].encode(), db=self.points_db)
                os.unlink(os.path.join(self.folder, "points", f"{p['id']}.json"))
                dropped.append(p["id"])
        return dropped

    def _referenced(self) -> set[str]:
        live: set[str] = set()
        for p in self.points():
            live.update(self.manifest(p["id"])["chunks"].values())
        return live

    def gc(self) -> dict[str, int]:
        """Delete chunks no recovery point names; spare those newer than this gc."""
        started = time.time()
        live = self._referenced()
        removed = freed = 0
        for sub in os.listdir(os.path.join(self.folder, "chunks")):
            folder = os.path.join(self.folder, "chunks", sub)
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name in live or name.endswith(".tmp"):
                    continue
                st = os.stat(path)
                if st.st_mtime >= started - 1:
                    continue  # a backup in flight may be about to name it
                os.unlink(path)
                removed += 1
                freed += st.st_size
        return {"chunks_removed": removed, "bytes_freed": freed}

    def verify(self) -> dict[str, Any]:
        """Re-read every chunk a recovery point names; report bad ones and whom they hurt."""
        bad: dict[str, list[str]] = {}
        checked = 0
        for p in self.points():
            for name in self.manifest(p["id"])["chunks"].values():
                if name in bad:
                    bad[name].append(p["id"])
                    continue
                checked += 1
                try:
                    self.get(name)
                except ck.ChunkError:
                    bad[name] = [p["id"]]
        affected = sorted({pt for pts in bad.values() for pt in pts})
        return {"chunks_checked": checked, "bad_chunks": sorted(bad), "points_affected": affected, "ok": not bad}

    def check(self) -> list[str]:
        """Manifests valid, chunks present, index and manifests in agreement."""
        problems = []
        files = {f[:-5] for f in os.listdir(os.path.join(self.folder, "points")) if f.endswith(".json")}
        indexed = {p["id"] for p in self.points()}
        for orphan in files - indexed:
            problems.append(f"manifest {orphan} is not in the index (an interrupted backup; gc ignores it)")
        for missing in indexed - files:
            problems.append(f"recovery point {missing} has no manifest")
        for point in sorted(indexed & files):
            try:
                m = self.manifest(point)
            except VaultError as e:
                problems.append(str(e))
                continue
            for name in m["chunks"].values():
                if not os.path.exists(self._chunk_path(name)):
                    problems.append(f"recovery point {point}: chunk {name} is missing")
        return [p for p in problems if "interrupted backup" not in p]


def _snapshot_alive(disks: Disks, name: str) -> dict[str, Any] | None:
    """The snapshot's record, or None if it is gone."""
    try:
        return disks.snapshot(name)
    except StampError:
        return None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
