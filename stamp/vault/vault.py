"""The backup vault: recovery points of managed disks, incremental and deduplicated.

A vault is a folder apart from the stamp (files 0600, folders 0700):

    VAULT/vault.json      format version, the vault's id; with a key: the KDF's
                          parameters and a key check (crypto.py)
    VAULT/chunks/ab/NAME  chunks (chunk.py), fanned out by the first two hex digits
    VAULT/points/ID       recovery point manifests, sealed as "manifest ID"
    VAULT/locks/ID        locks (lock.py)
    VAULT/index/          LMDB, a cache: points (ID -> summary), unreadable
                          (ID -> why its manifest does not open), bad (chunk
                          NAME -> the points verify found it hurts)

A recovery point holds the disk as the guest sees it, in CHUNK-sized pieces
(all-zero pieces are not stored), so it restores even if the image a
FromImage disk came from is gone. A backup, under a shared lock on its disk:
  1. quiesce (the caller's hook: the host flushes its cache for the disk);
  2. take an incremental snapshot of the disk (named in the lock first);
  3. find what changed since the disk's previous recovery point: the stamp's
     diff between the two snapshots, mapped to guest bytes (source.py);
     the first backup reads the disk's allocated ranges only; pieces whose
     chunk is missing or known bad are read again, so the data is rewritten;
  4. read those pieces from the snapshot, store each new chunk once; a
     piece with few changed sectors is read only there and stored as a
     patch over its base (patch.py);
  5. sync the folders of the chunks it wrote or reused (another writer may
     not have synced a reused one yet), write the manifest (synced, renamed: the
     commit), then the index entry; drop the previous point's snapshot.
Rules:
- the manifests are the truth, the index a cache: it is rebuilt from them
  when it disagrees (checked at every open and before gc), so losing it
  loses nothing; gc refuses to run while a manifest does not open;
- a manifest is sealed under its own id and names its disk, previous point
  and sequence number, so a manifest copied or swapped to another name does
  not authenticate, and a backup builds only on a point of its own disk;
- prune and gc take an exclusive lock: nothing a running backup has stored,
  or may reuse, is ever deleted; what a dead writer left (temporary files,
  snapshots, half-restored disks) is removed by the next backup or gc;
- a restore to a disk fills a new disk, reads it back against what was
  written, and only then takes the target's place: on any failure the
  target is as it was and nothing is left behind;
- a chunk verify found bad, or a missing one, is never reused: the next
  backup reads that piece again and rewrites it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lmdb

from vhd.ops import write_new_file
from vhd.progress import Progress

from ..disks import Disks
from ..errors import StampError
from . import chunk as ck
from . import crypto, files, patch, source
from . import lock as lk
from .errors import ChunkError, VaultError, VaultKeyError

VERSION = 2
MIB = 1 << 20
_ID = re.compile(r"[0-9a-f]{16}\Z")
PASSPHRASE_VAR = "$DISKSTAMP_VAULT_PASSPHRASE"


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
    def __init__(self, folder: str, passphrase: str | None = None, *, keys: crypto.Keys | None = None) -> None:
        self.folder = folder
        self.config = _read_config(folder)
        self.id: str = self.config["id"]
        self.keys = self._keys(passphrase, keys)
        self._dirty: set[str] = set()
        files.make_dir(self._path("index"))
        self.env = _open_index(self._path("index"))
        self.points_db = self.env.open_db(b"points")
        self.unreadable_db = self.env.open_db(b"unreadable")
        self.bad_db = self.env.open_db(b"bad")
        self.sync_index()

    def _keys(self, passphrase: str | None, keys: crypto.Keys | None) -> crypto.Keys | None:
        if not self.config["encrypted"]:
            if passphrase is not None:
                raise VaultKeyError(f"vault {self.folder} is not encrypted: unset {PASSPHRASE_VAR}")
            return None
        if keys is None:
            if passphrase is None:
                raise VaultKeyError(f"vault {self.folder} is encrypted: set {PASSPHRASE_VAR} to its passphrase")
            keys = crypto.derive(passphrase, self.config["kdf"])
        if not hmac.compare_digest(keys.key_check(), str(self.config["key_check"])):
            raise VaultKeyError(f"wrong passphrase for vault {self.folder} (check {PASSPHRASE_VAR})")
        return keys

    @classmethod
    def create(cls, folder: str, passphrase: str | None = None, kdf_seconds: float = crypto.KDF_SECONDS) -> Vault:
        """A new vault; with a passphrase, encrypted, the KDF's cost calibrated for this machine."""
        if os.path.exists(os.path.join(folder, "vault.json")):
            raise VaultError(f"{folder} already holds a vault")
        config: dict[str, Any] = {"version": VERSION, "id": uuid.uuid4().hex[:12], "chunk_size": ck.CHUNK,
                                  "encrypted": passphrase is not None}
        keys = None
        if passphrase is not None:
            params, keys = crypto.calibrate(passphrase, kdf_seconds)
            config.update(kdf={"name": "scrypt", **params}, key_check=keys.key_check())
        files.make_dir(folder)
        for sub in ("chunks", "points", "locks", "index"):
            files.make_dir(os.path.join(folder, sub))
        files.write_atomic(os.path.join(folder, "vault.json"), json.dumps(config, indent=2).encode(), "init")
        return cls(folder, passphrase, keys=keys)

    def close(self) -> None:
        _close_index(self._path("index"))

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths, sealing, locks -----------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def _chunk_path(self, name: str) -> str:
        return self._path("chunks", name[:2], name)

    def _seal(self, obj: Any, what: str) -> bytes:
        return crypto.seal(obj, what, self.keys)

    def _unseal(self, raw: bytes, what: str) -> Any:
        return crypto.unseal(raw, what, self.keys)

    def _lock(self, op: str, exclusive: bool = False, disk: str | None = None, wait: float = 0.0,
              **extra: Any) -> lk.Lock:
        if not 0 <= wait < float("inf"):  # NaN too: it never reaches a deadline
            raise VaultError(f"{op}: --retry-lock is a number of seconds, 0 or more, not {wait}")
        files.make_dir(self._path("locks"))
        return lk.Lock(self._path("locks"), self._seal, self._unseal, op, exclusive, disk, extra).acquire(wait)

    def unlock(self) -> list[str]:
        """Remove stale locks (process gone, or not refreshed for lock.STALE_AFTER)."""
        removed = []
        for lock_id, info in lk.read_all(self._path("locks"), self._unseal).items():
            if info is None or lk.state(info) != "live":
                lk.remove(self._path("locks"), lock_id)
                removed.append(lock_id)
        return sorted(removed)

    # -- chunks ------------------------------------------------------------------------

    def put(self, data: bytes, report: BackupReport, writer: lk.Lock, bad: set[str] | None = None) -> str:
        """Store `data` as a chunk unless a good copy is there; its name."""
        name = ck.name_of(data, self.keys.naming if self.keys else None)
        if name not in (bad or ()) and os.path.exists(self._chunk_path(name)):
            self._dirty.add(os.path.dirname(self._chunk_path(name)))  # its writer may not have synced it yet
            report.chunks_reused += 1
            writer.refresh()  # a backup that stores nothing new still shows it is alive
            return name
        was_bad = bad is not None and name in bad
        report.new_bytes_stored += self._store(name, data, writer, was_bad)
        report.chunks_written += 1
        report.new_bytes_raw += len(data)
        if bad is not None:
            bad.discard(name)
        return name

    def _store(self, name: str, data: bytes, writer: lk.Lock, was_bad: bool) -> int:
        sealed = ck.seal_parts(data, name, self.keys.enc if self.keys else None)
        folder = os.path.dirname(self._chunk_path(name))
        files.make_dir(folder)
        files.write_atomic(self._chunk_path(name), sealed, writer.id)
        self._dirty.add(folder)
        if was_bad:
            with self.env.begin(write=True) as txn:
                txn.delete(name.encode(), db=self.bad_db)  # a good copy replaced it
        writer.refresh()
        return sum(len(part) for part in sealed)

    def get(self, name: str) -> bytes:
        try:
            raw = files.read_bounded(self._chunk_path(name), ck.MAX_STORED + 1024)
        except FileNotFoundError:
            raise ChunkError(f"chunk {name} is missing") from None
        return ck.open_chunk(raw, name, self.keys.enc if self.keys else None,
                             self.keys.naming if self.keys else None)

    def bad_chunks(self) -> set[str]:
        """Chunks verify found bad and nothing has rewritten since."""
        with self.env.begin() as txn:
            return {bytes(k).decode() for k, _ in txn.cursor(db=self.bad_db)}

    # -- manifests and the index -----------------------------------------------------------

    def manifest(self, point: str) -> dict[str, Any]:
        """The manifest of `point`, authenticated as that point's."""
        if not _ID.match(point):
            raise VaultError(f"no recovery point {point!r} (`stamp backup list` shows them)")
        try:
            raw = files.read_bounded(self._path("points", point), crypto.META_MAX)
        except FileNotFoundError:
            raise VaultError(f"no recovery point {point} (`stamp backup list` shows them)") from None
        except OSError as e:
            raise VaultError(f"manifest {point}: cannot be read ({e.strerror})") from None
        body = self._unseal(raw, f"manifest {point}")
        if not isinstance(body, dict) or body.get("id") != point or not isinstance(body.get("chunks"), dict):
            raise VaultError(f"manifest {point}: does not describe recovery point {point}")
        why = _malformed(body)
        if why:
            raise VaultError(f"manifest {point}: {why} (written by another version, or forged)")
        return body

    def _manifest_ids(self) -> set[str]:
        return {f for f in os.listdir(self._path("points")) if _ID.match(f)}

    def _read_index(self) -> tuple[dict[str, dict[str, Any]], dict[str, str], bool]:
        """Summaries, unreadable manifests (id -> why), and whether every entry opened."""
        summaries: dict[str, Any] = {}
        unreadable: dict[str, Any] = {}
        ok = True
        with self.env.begin() as txn:
            for db, out in ((self.points_db, summaries), (self.unreadable_db, unreadable)):
                for k, v in txn.cursor(db=db):
                    key = bytes(k).decode()
                    try:
                        out[key] = self._unseal(bytes(v), f"index {key}")
                    except VaultError:
                        ok = False
        return summaries, unreadable, ok

    def sync_index(self) -> bool:
        """Rebuild the index if it disagrees with the manifests; whether it did."""
        summaries, unreadable, ok = self._read_index()
        if ok and self._manifest_ids() == set(summaries) | set(unreadable):
            return False
        self.rebuild_index()
        return True

    def rebuild_index(self) -> dict[str, Any]:
        """The index made again from the manifests (`stamp backup rebuild-index`)."""
        summaries: dict[str, Any] = {}
        unreadable: dict[str, str] = {}
        for point in sorted(self._manifest_ids()):
            try:
                summaries[point] = _summary(self.manifest(point))
            except VaultError as e:
                unreadable[point] = str(e)
        with self.env.begin(write=True) as txn:
            txn.drop(self.points_db, delete=False)
            txn.drop(self.unreadable_db, delete=False)
            for db, items in ((self.points_db, summaries), (self.unreadable_db, unreadable)):
                for k, v in items.items():
                    txn.put(k.encode(), self._seal(v, f"index {k}"), db=db)
        return {"points": len(summaries), "unreadable": sorted(unreadable)}

    def points(self, disk: str | None = None) -> list[dict[str, Any]]:
        pts = [p for p in self._read_index()[0].values() if disk is None or p["disk"] == disk]
        return sorted(pts, key=lambda p: (p["time"], p["seq"]))

    def _previous(self, disk: str) -> dict[str, Any] | None:
        """The disk's newest point's manifest, refused unless it is that disk's. One
        that stopped opening since it was indexed is listed as unreadable, and the
        backup builds on nothing (it reads the disk in full)."""
        earlier = self.points(disk)
        if not earlier:
            return None
        try:
            m = self.manifest(earlier[-1]["id"])
        except VaultError:
            self.rebuild_index()
            return None
        if m["disk"] != disk or m["seq"] != earlier[-1]["seq"]:
            raise VaultError(f"recovery point {m['id']} claims disk {m['disk']} (sequence {m['seq']}), the index "
                             f"says {disk}: run `stamp backup rebuild-index`")
        return m

    # -- backup ---------------------------------------------------------------------------

    def backup(self, disks: Disks, disk: str, quiesce: Callable[[], None] | None = None,
               show_progress: bool | None = None) -> BackupReport:
        started = time.monotonic()
        point = uuid.uuid4().hex[:16]
        snap_name = f"vault-{self.id}-{point}"
        with self._lock("backup", disk=disk, snapshot=snap_name) as writer:
            self.sync_index()
            self.clean_leftovers(disks)
            previous = self._previous(disk)
            if quiesce is not None:
                quiesce()  # e.g. the host flushes its cache for this disk
            disks.create_snapshot(snap_name, disk, incremental=True)
            try:
                report, body = self._read_changes(disks, disk, point, snap_name, previous, writer, show_progress)
                writer.ensure_held()  # else a gc may have deleted what it stored
            except BaseException:
                source.drop_snapshot(disks, snap_name)
                raise
            self._commit(body, writer)
            if previous is not None:
                source.drop_snapshot(disks, previous["snapshot"])  # the new one is the next diff's base
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def _read_changes(self, disks: Disks, disk: str, point: str, snap_name: str, previous: dict[str, Any] | None,
                      writer: lk.Lock, show_progress: bool | None) -> tuple[BackupReport, dict[str, Any]]:
        report = BackupReport(point, disk, previous is not None)
        bad = self.bad_chunks()
        with disks.open_virtual(disk, snapshot=snap_name) as v:
            size = v.size
            chunks, changed = source.changes(disks, v, disk, snap_name, previous)
            report.incremental = incremental = chunks is not None
            chunks = chunks or {}
            per_chunk: dict[int, list[tuple[int, int]]] = {}
            for off, n in changed:
                for i in range(off // ck.CHUNK, -(-(off + n) // ck.CHUNK)):
                    per_chunk.setdefault(i, []).append((off, n))
            whole = {int(i) for i, entry in chunks.items()  # damaged or lost: the source rewrites it
                     if any(nm in bad or not os.path.exists(self._chunk_path(nm)) for nm in _names(entry))}
            touched = sorted(set(per_chunk) | whole)
            progress = Progress(f"backup {disk}", len(touched) * ck.CHUNK, show_progress)
            for i in touched:
                progress.advance(ck.CHUNK)
                at = i * ck.CHUNK
                n = min(ck.CHUNK, size - at)
                if n <= 0:
                    continue
                entry = chunks.get(str(i))
                new: str | list[str | None] | None = None
                if incremental and i not in whole:  # zeros at the previous point are a base too
                    new = self._patch(v, entry, per_chunk[i], at, at + n, report, writer, bad)
                if new is None:
                    new = self._whole(v, at, n, report, writer, bad)
                if new is None:
                    chunks.pop(str(i), None)
                else:
                    chunks[str(i)] = new
            for key in [k for k in chunks if int(k) * ck.CHUNK >= size]:
                del chunks[key]
            progress.close()
        rec = disks.record(disk)
        body = {"id": point, "disk": disk, "seq": previous["seq"] + 1 if previous else 1,
                "previous": previous["id"] if previous else None, "snapshot": snap_name, "time": time.time(),
                "size": size, "chunk_size": ck.CHUNK, "chunks": chunks, "source": rec.get("source", {}),
                "sku": rec["sku"]}
        return report, body

    def _whole(self, v: Any, at: int, n: int, report: BackupReport, writer: lk.Lock, bad: set[str]) -> str | None:
        """Read a whole chunk and store it; None if it is all zeros."""
        data = v.read(at, n)
        report.bytes_read += n
        return None if data.count(0) == n else self.put(data, report, writer, bad)

    def _patch(self, v: Any, entry: Any, ranges: list[tuple[int, int]], start: int, end: int,
               report: BackupReport, writer: lk.Lock, bad: set[str]) -> list[str | None] | None:
        """Read only the changed sectors and store them as a patch over the
        entry's base (None: zeros); None when a whole chunk is the better deal."""
        base, old = entry, []
        if isinstance(entry, list):
            base = entry[0]
            try:
                old = patch.decode(self.get(entry[1]), entry[1])
            except ChunkError:
                return None
        parts = patch.sector_ranges(ranges, start, end)
        if sum(n for _, n in parts) + patch.size(old) > patch.MAX:
            return None
        runs = [(off - start, v.read(off, n)) for off, n in parts]
        report.bytes_read += sum(n for _, n in parts)
        merged = patch.overlay(old, runs)
        return [base, self.put(patch.encode(merged), report, writer, bad)]

    def _commit(self, body: dict[str, Any], writer: lk.Lock) -> None:
        """Chunks durable, then the manifest (the commit), then the index entry."""
        files.sync_dirs(self._dirty | {self._path("chunks")})
        self._dirty.clear()
        point = body["id"]
        files.write_atomic(self._path("points", point), self._seal(body, f"manifest {point}"), writer.id)
        files.sync_dirs([self._path("points")])
        with self.env.begin(write=True) as txn:
            txn.put(point.encode(), self._seal(_summary(body), f"index {point}"), db=self.points_db)

    # -- restore ----------------------------------------------------------------------------

    def pieces(self, point: str) -> tuple[dict[str, Any], list[tuple[int, Any]]]:
        """The manifest, and its entries (a name, or [base, patch]) by disk offset."""
        m = self.manifest(point)
        return m, sorted(((int(i) * m["chunk_size"], entry) for i, entry in m["chunks"].items()),
                         key=lambda piece: piece[0])

    def _piece(self, entry: Any, length: int) -> bytes:
        if isinstance(entry, str):
            return self.get(entry)
        base = self.get(entry[0]) if entry[0] is not None else bytes(length)
        return patch.apply(base, patch.decode(self.get(entry[1]), entry[1]))

    def restore_to_file(self, point: str, path: str, fmt: str = "fixed") -> dict[str, Any]:
        if fmt not in ("fixed", "dynamic", "raw"):
            raise VaultError(f"restore to a fixed, dynamic or raw file, not {fmt!r}")
        if os.path.exists(path):
            raise VaultError(f"{path} already exists (refusing to overwrite)")
        with self._lock("restore") as held:
            m, pieces = self.pieces(point)
            write_new_file(path, fmt, m["size"], lambda target: self._write_pieces(pieces, m["size"], target, held))
        return {"point": point, "path": path, "format": fmt, "size": m["size"]}

    def restore_to_disk(self, point: str, disks: Disks, name: str, sku: str | None = None,
                        overwrite: bool = False) -> dict[str, Any]:
        """A new managed disk (or, with overwrite, an existing unattached one) holding
        the point. The data goes to a new disk first, is read back against the chunk
        names, and only then takes the name: on failure the target is untouched."""
        temp = f"vault.restoring-{self.id}-{uuid.uuid4().hex[:8]}"  # never longer than a name may be
        with self._lock("restore", restoring=temp) as held:
            m, pieces = self.pieces(point)
            source.check_target(disks, name, overwrite)
            size = -(-m["size"] // MIB) * MIB  # a disk is a whole number of MiB
            disks.create_empty(temp, 0, sku or m.get("sku", "Premium_LRS"), size_bytes=size)
            try:
                with disks.open_virtual(temp, writable=True) as v:
                    digests: list[bytes] = []
                    self._write_pieces(pieces, m["size"], v, held, digests)
                    v.flush()
                    self._read_back(pieces, digests, m["size"], v, held)
                rec = disks.replace_disk(name, temp, overwrite=overwrite, restored_from=point)
            except BaseException:
                disks.delete_disk(temp)
                raise
        return {"point": point, "disk": name, "size_bytes": rec["size_bytes"], "size_gib": rec["size_gib"]}

    def _write_pieces(self, pieces: list[tuple[int, Any]], size: int, target: Any, held: lk.Lock,
                      digests: list[bytes] | None = None) -> None:
        """Write every piece; with `digests`, append their SHA-256 there, for a
        read-back. The lock is refreshed as it goes: a long restore must not
        look abandoned to another host (which could then gc its chunks)."""
        for offset, entry in pieces:
            held.refresh()
            try:
                data = self._piece(entry, min(ck.CHUNK, size - offset))  # verified: authenticated, sized, named by its content
            except ChunkError as e:
                end = min(offset + ck.CHUNK, size)
                raise ChunkError(f"bytes {offset} to {end} of the disk cannot be restored: {e}") from None
            data = data[:max(0, size - offset)]
            target.write(offset, data)
            if digests is not None:
                digests.append(hashlib.sha256(data).digest())

    def _read_back(self, pieces: list[tuple[int, Any]], digests: list[bytes], size: int, target: Any,
                   held: lk.Lock) -> None:
        for (offset, _), digest in zip(pieces, digests, strict=True):
            held.refresh()
            if hashlib.sha256(target.read(offset, min(ck.CHUNK, size - offset))).digest() != digest:
                raise VaultError(f"restore: bytes {offset} of the new disk read back wrong; the target is untouched")

    # -- maintenance --------------------------------------------------------------------------

    def prune(self, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0, keep_monthly: int = 0,
              wait: float = 0.0) -> list[str]:
        """Drop recovery points no rule keeps (the newest of each disk always stays)."""
        rules = {"last": keep_last, "daily": keep_daily, "weekly": keep_weekly, "monthly": keep_monthly}
        for rule, value in rules.items():
            if value < 0:
                raise VaultError(f"prune: --keep-{rule} is a count, 0 or more, not {value}")
        if not any(rules.values()):
            raise VaultError("prune needs at least one rule (--keep-last, --keep-daily, --keep-weekly, "
                             "--keep-monthly): with none it would keep only each disk's newest point")
        dropped = []
        with self._lock("prune", exclusive=True, wait=wait):
            self.sync_index()
            for disk in sorted({p["disk"] for p in self.points()}):
                pts = self.points(disk)[::-1]
                keep = _kept(pts, keep_last, keep_daily, keep_weekly, keep_monthly)
                for p in pts:
                    if p["id"] not in keep:
                        os.unlink(self._path("points", p["id"]))  # the truth first, then its cache
                        with self.env.begin(write=True) as txn:
                            txn.delete(p["id"].encode(), db=self.points_db)
                        dropped.append(p["id"])
        return dropped

    def _referenced(self) -> set[str]:
        """Every chunk a manifest names; refused unless every manifest opens and the index agrees."""
        summaries, unreadable, ok = self._read_index()
        if unreadable:
            first = next(iter(unreadable.values()))
            raise VaultError(f"gc refuses to run: {len(unreadable)} manifest(s) do not open ({first}); a point it "
                             "cannot read may name any chunk. Put the manifest back, or remove the unwanted point")
        if not ok or self._manifest_ids() != set(summaries):
            raise VaultError("gc refuses to run: the index disagrees with the manifests; run "
                             "`stamp backup rebuild-index`, then gc")
        live: set[str] = set()
        for point, summary in summaries.items():
            try:
                m = self.manifest(point)
            except VaultError as e:
                self.rebuild_index()  # it opened when indexed: list it as unreadable
                raise VaultError(f"gc refuses to run: {e}; a point it cannot read may name any chunk. Put the "
                                 "manifest back, or remove the unwanted point") from None
            if _summary(m) != summary:
                raise VaultError(f"gc refuses to run: the index's entry for {point} disagrees with its manifest; "
                                 "run `stamp backup rebuild-index`, then gc")
            live.update(nm for entry in m["chunks"].values() for nm in _names(entry))
        return live

    def gc(self, wait: float = 0.0) -> dict[str, int]:
        """Delete chunks no recovery point names, under an exclusive lock."""
        removed = freed = 0
        with self._lock("gc", exclusive=True, wait=wait):
            self.sync_index()
            live = self._referenced()
            cleaned = self.clean_leftovers()
            for path in self._chunk_files():
                name = os.path.basename(path)
                if name in live or files.tmp_writer(name) is not None:
                    continue  # temporary files went with the leftovers
                freed += os.stat(path).st_size
                os.unlink(path)
                removed += 1
        return {"chunks_removed": removed, "bytes_freed": freed, "leftovers_removed": len(cleaned)}

    def _chunk_files(self) -> Iterator[str]:
        """Every file in a chunk folder (stray folders and files elsewhere are no chunks)."""
        with os.scandir(self._path("chunks")) as subs:
            folders = sorted(e.path for e in subs if e.is_dir(follow_symlinks=False))
        for folder in folders:
            with os.scandir(folder) as entries:
                yield from [e.path for e in entries if e.is_file(follow_symlinks=False)]

    def verify(self) -> dict[str, Any]:
        """Re-read every chunk a recovery point names; report bad ones and whom
        they hurt, and record them, so no backup reuses them."""
        with self._lock("verify") as held:
            self.sync_index()
            bad: dict[str, list[str]] = {}
            checked: set[str] = set()
            for p in self.points():
                try:
                    names = [nm for e in self.manifest(p["id"])["chunks"].values() for nm in _names(e)]
                except VaultError:
                    self.rebuild_index()  # it opened when indexed: the index now lists it as unreadable
                    continue
                for name in names:
                    if name in bad:
                        bad[name].append(p["id"])
                    elif name not in checked:
                        held.refresh()
                        checked.add(name)
                        try:
                            self.get(name)
                        except ChunkError:
                            bad[name] = [p["id"]]
            with self.env.begin(write=True) as txn:
                for name in checked:
                    if name in bad:
                        txn.put(name.encode(), self._seal(bad[name], f"bad {name}"), db=self.bad_db)
                    else:
                        txn.delete(name.encode(), db=self.bad_db)
        unreadable = sorted(self._read_index()[1])
        affected = sorted({pt for pts in bad.values() for pt in pts})
        return {"chunks_checked": len(checked), "bad_chunks": sorted(bad), "points_affected": affected,
                "unreadable_points": unreadable, "ok": not bad and not unreadable}

    def repair(self, disks: Disks) -> dict[str, Any]:
        """Verify, then rewrite every bad or missing chunk whose data a disk or a
        vault snapshot still holds (checked against the chunk's name)."""
        report = self.verify()
        repaired: list[str] = []
        naming = self.keys.naming if self.keys else None
        with self._lock("repair") as writer:
            users = self._users(set(report["bad_chunks"]))
            for name, places in sorted(users.items()):
                for disk, snapshot, offset, length in places:
                    data = source.read_source(disks, disk, snapshot, offset, length)
                    if data is not None and ck.name_of(data, naming) == name:
                        self._store(name, data, writer, True)
                        repaired.append(name)
                        break
            files.sync_dirs(self._dirty)
            self._dirty.clear()
        return {"repaired": repaired, "still_bad": sorted(set(report["bad_chunks"]) - set(repaired)),
                "points_affected": report["points_affected"]}

    def _users(self, names: set[str]) -> dict[str, list[tuple[str, str, int, int]]]:
        """Where each chunk's data was: (disk, snapshot, offset, length), newest first."""
        out: dict[str, list[tuple[str, str, int, int]]] = {}
        for p in self.points()[::-1]:
            m = self.manifest(p["id"])
            for i, name in m["chunks"].items():
                if isinstance(name, str) and name in names:  # a whole chunk: the disk held it
                    at = int(i) * m["chunk_size"]
                    out.setdefault(name, []).append((m["disk"], m["snapshot"], at, min(ck.CHUNK, m["size"] - at)))
        return out

    def check(self) -> list[str]:
        """Manifests open as what they claim, the index agrees, chunks present and
        not known bad. Problems as sentences; leftovers() lists what cleans itself up."""
        self.sync_index()
        summaries, unreadable, _ = self._read_index()
        problems = [f"recovery point {point}: {why}" for point, why in sorted(unreadable.items())]
        bad = self.bad_chunks()
        for point in sorted(summaries):
            try:
                m = self.manifest(point)
            except VaultError as e:
                problems.append(str(e))
                continue
            if _summary(m) != summaries[point]:
                problems.append(f"recovery point {point}: the index disagrees with the manifest "
                                "(`stamp backup rebuild-index`)")
            for name in (nm for entry in m["chunks"].values() for nm in _names(entry)):
                if not os.path.exists(self._chunk_path(name)):
                    problems.append(f"recovery point {point}: chunk {name} is missing")
                elif name in bad:
                    problems.append(f"recovery point {point}: chunk {name} is damaged (`stamp backup repair`, or "
                                    f"the next backup of {m['disk']} rewrites it if the disk still holds it)")
        return problems

    # -- leftovers ------------------------------------------------------------------------

    def leftovers(self, disks: Disks | None = None) -> list[str]:
        """What dead or interrupted writers left: stale locks, temporary files,
        and (given the stamp) snapshots and half-restored disks nothing needs."""
        return [what for what, _ in self._leftovers(disks)]

    def clean_leftovers(self, disks: Disks | None = None) -> list[str]:
        """Remove the leftovers of writers that are gone; what was removed."""
        out = []
        for what, remove in self._leftovers(disks):
            try:
                remove()
            except (OSError, StampError):
                continue  # raced with another cleaner
            out.append(what)
        return out

    def _leftovers(self, disks: Disks | None) -> list[tuple[str, Callable[[], None]]]:
        # What may be left is listed before the locks are read, and the index after:
        # a writer's lock (or, once it is done, its index entry) precedes anything it
        # makes, so nothing a running writer made can look abandoned.
        tmp_folders = [self._path("points"), self._path("locks"), self.folder]
        tmps = [p for p in [*self._chunk_files(), *(os.path.join(d, f) for d in tmp_folders for f in os.listdir(d))]
                if files.tmp_writer(os.path.basename(p)) is not None]
        snapshots = [s for s in disks.snapshots() if s["name"].startswith(f"vault-{self.id}-")] if disks else []
        restoring = [d["name"] for d in disks.disks() if f".restoring-{self.id}-" in d["name"]] if disks else []
        locks = lk.read_all(self._path("locks"), self._unseal)
        live = {k: v for k, v in locks.items() if v is None or lk.state(v) != "dead"}
        out: list[tuple[str, Callable[[], None]]] = []
        for lock_id in sorted(set(locks) - set(live)):
            out.append((f"lock {lock_id}: its process is gone ({lk.describe(locks[lock_id] or {})})",
                        partial(os.unlink, self._path("locks", lock_id))))
        for path in tmps:
            writer = files.tmp_writer(os.path.basename(path))
            if writer in live or (writer not in locks and _younger(path, lk.GRACE)):
                continue  # alive, or a lock being written right now
            out.append((f"{path}: a temporary file of a writer that is gone", partial(os.unlink, path)))
        if disks is not None:
            holders = [v for v in live.values() if v is not None]
            keep = {p["snapshot"] for p in self._newest_points()} | {v.get("snapshot") for v in holders}
            out += [(f"stamp snapshot {s['name']}: left by an interrupted backup, it pins old data of disk "
                     f"{s['disk']}", partial(disks.delete_snapshot, s["name"]))
                    for s in snapshots if s["name"] not in keep]
            out += [(f"disk {name}: left by an interrupted restore", partial(disks.delete_disk, name))
                    for name in restoring if name not in {v.get("restoring") for v in holders}]
        return out

    def _newest_points(self) -> list[dict[str, Any]]:
        newest: dict[str, dict[str, Any]] = {}
        for p in self.points():
            newest[p["disk"]] = p
        return list(newest.values())


_INDEXES: dict[str, list[Any]] = {}  # LMDB opens an environment once per process: [env, users]


def _open_index(path: str) -> lmdb.Environment:
    key = os.path.realpath(path)
    if key not in _INDEXES:
        _INDEXES[key] = [lmdb.open(path, map_size=1 << 30, max_dbs=4, mode=0o600), 0]
    _INDEXES[key][1] += 1
    return _INDEXES[key][0]


def _close_index(path: str) -> None:
    key = os.path.realpath(path)
    entry = _INDEXES.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _INDEXES[key]


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "vault.json")
    try:
        raw = files.read_bounded(path, 1 << 16)
    except FileNotFoundError:
        raise VaultError(f"{folder} is not a vault (no vault.json): make one with `stamp backup init`") from None
    except OSError as e:
        raise VaultError(f"{path} cannot be read: {e.strerror}") from None
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("version"), int):
        raise VaultError(f"{path} is damaged (not a vault's settings): put back a copy of it; the vault cannot "
                         "be opened without it")
    if config["version"] != VERSION:
        raise VaultError(f"{folder} is a vault of format {config['version']}; this diskstamp reads format {VERSION}")
    encrypted = config.get("encrypted")
    if (not isinstance(config.get("id"), str) or config.get("chunk_size") != ck.CHUNK
            or not isinstance(encrypted, bool)
            or (encrypted and (not isinstance(config.get("kdf"), dict) or config["kdf"].get("name") != "scrypt"))):
        raise VaultError(f"{path} is damaged (fields missing or out of range): put back a copy of it")
    return config


_CHUNK_NAME = re.compile(r"[0-9a-f]{64}\Z")
_FIELDS: dict[str, Any] = {"disk": str, "seq": int, "snapshot": str, "time": (int, float), "size": int,
                           "chunk_size": int, "source": dict, "sku": str}


def _malformed(m: dict[str, Any]) -> str | None:
    """Why an authenticated manifest still cannot be used (None: it can): every
    field of its type, every entry a chunk name or [base or None, patch] inside the disk."""
    for name, kind in _FIELDS.items():
        if not isinstance(m.get(name), kind) or isinstance(m.get(name), bool):
            return f"field {name!r} is missing or of the wrong type"
    if m["seq"] < 1 or m["size"] < 0 or m["chunk_size"] != ck.CHUNK:
        return "sequence, size or chunk size out of range"
    if m.get("previous") is not None and not (isinstance(m["previous"], str) and _ID.match(m["previous"])):
        return "field 'previous' is not a recovery point's id"
    for key, entry in m["chunks"].items():
        if not (key.isdigit() and key.isascii() and int(key) * ck.CHUNK < m["size"]):
            return f"entry {key[:20]!r} is not a piece of the disk"
        if not _entry_ok(entry):
            return f"entry {key} names no chunk"
    return None


def _entry_ok(entry: Any) -> bool:
    if isinstance(entry, str):
        return bool(_CHUNK_NAME.match(entry))
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)
            and bool(_CHUNK_NAME.match(entry[1])) and (entry[0] is None or _entry_ok(entry[0]))
            and not isinstance(entry[0], list))


def _names(entry: Any) -> list[str]:
    """The chunks a manifest entry needs: its name, or its base (None: zeros) and patch."""
    return [entry] if isinstance(entry, str) else [nm for nm in entry if nm is not None]


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"id": m["id"], "disk": m["disk"], "seq": m["seq"], "previous": m["previous"], "snapshot": m["snapshot"],
            "time": m["time"], "size": m["size"], "chunks": len(m["chunks"])}


def _kept(pts: list[dict[str, Any]], last: int, daily: int, weekly: int, monthly: int) -> set[str]:
    """The ids the rules keep among one disk's points, newest first (the newest always)."""
    keep = {pts[0]["id"]} | {p["id"] for p in pts[:last]}
    for fmt, count in (("%Y-%m-%d", daily), ("%G-%V", weekly), ("%Y-%m", monthly)):
        seen: list[str] = []
        for p in pts:
            bucket = time.strftime(fmt, time.gmtime(p["time"]))
            if bucket not in seen and len(seen) < count:
                seen.append(bucket)
                keep.add(p["id"])
    return keep


def _younger(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < seconds
    except FileNotFoundError:
        return True  # renamed meanwhile: its writer is alive
