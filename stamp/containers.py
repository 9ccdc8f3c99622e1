"""Containers: named name spaces of page blobs, as the Blob service has them.

A container is a record in the `containers` table (name -> JSON {name,
created, modified, rev, metadata, public_access} and, when the REST
endpoint created it for an account other than its default one, `account`);
the page blobs in it are
the stamp's blobs named `CONTAINER/BLOB`. Rules:
- a container name is 3 to 63 characters of lower-case letters, digits and
  single hyphens, starting and ending with a letter or digit (Azure's rule),
  so it never holds "/" and `CONTAINER/` names exactly its blobs;
- the managed-disk resources keep their blobs under `disks/`, `images/` and
  `snapshots/` (stamp.disks). Those three are system containers: they always
  exist, cannot be created, deleted or listed, and no blob is created or
  deleted in them except by the resources' own code; a blob already in one
  may be read and written (a granted disk upload);
- deleting a container deletes its blobs and their snapshots in the same
  transaction: nothing of it is left half deleted;
- `rev` moves on with each change of the record, so an ETag made of it
  changes with the metadata.
`check()` proves the records are well formed and each is keyed by its name.
"""

from __future__ import annotations

import heapq
import itertools
import re
import time
from collections.abc import Iterator
from typing import Any

import lmdb

from .errors import AuthorizationFailure, ContainerAlreadyExists, ContainerNotFound, InvalidContainerName
from .meta import Meta, loads
from .pageblob import PageBlobs

NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")
SYSTEM = ("disks", "images", "snapshots")  # the managed-disk resources' blob prefixes (stamp.disks)
PUBLIC_ACCESS = (None, "blob", "container")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidContainerName(f"container name {name[:70]!r}: 3 to 63 lower-case letters, digits and "
                                   "single hyphens, starting and ending with a letter or digit")


def blob_name(container: str, blob: str) -> str:
    """The stamp blob that holds `blob` of `container`."""
    return f"{container}/{blob}"


class Containers:
    """The containers of one stamp, over its page blobs."""

    def __init__(self, meta: Meta, blobs: PageBlobs) -> None:
        self.meta, self.blobs = meta, blobs
        self.db = meta.db["containers"]

    @staticmethod
    def _system(name: str) -> dict[str, Any]:
        return {"name": name, "created": 0.0, "modified": 0.0, "rev": 0, "metadata": {},
                "public_access": None, "system": True}

    def create(self, name: str, metadata: dict[str, str] | None = None, public_access: str | None = None,
               account: str | None = None) -> dict[str, Any]:
        check_name(name)
        if public_access not in PUBLIC_ACCESS:
            raise InvalidContainerName(f"public access {public_access!r}: blob, container or none")
        if name in SYSTEM:
            raise ContainerAlreadyExists(f"container {name!r} is the stamp's own (managed-disk blobs)")
        now = time.time()
        record = {"name": name, "created": now, "modified": now, "rev": 1, "metadata": metadata or {},
                  "public_access": public_access}
        if account is not None:
            record["account"] = account
        with self.meta.write() as txn:
            if txn.get(name.encode(), db=self.db) is not None:
                raise ContainerAlreadyExists(f"container {name!r} already exists")
            self.meta.put_json(txn, "containers", name.encode(), record)
        return record

    def get(self, name: str) -> dict[str, Any]:
        with self.meta.read() as txn:
            return self.get_in(txn, name)

    def get_in(self, txn: lmdb.Transaction, name: str) -> dict[str, Any]:
        if name in SYSTEM:
            return self._system(name)
        obj = self.meta.get_json(txn, "containers", name.encode()) if NAME.match(name) else None
        if obj is None:
            raise ContainerNotFound(f"container {name!r} does not exist")
        return dict(obj)

    def update(self, name: str, metadata: dict[str, str] | None = None,
               public_access: str | bool | None = False,
               policies: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
        """Replace the metadata and the stored access policies (when given)
        and the public access (when not False)."""
        if name in SYSTEM:
            raise AuthorizationFailure(f"container {name!r} is the stamp's own: its properties are fixed")
        if public_access is not False and public_access not in PUBLIC_ACCESS:
            raise InvalidContainerName(f"public access {public_access!r}: blob, container or none")
        with self.meta.write() as txn:
            obj = self.get_in(txn, name)
            if metadata is not None:
                obj["metadata"] = metadata
            if public_access is not False:
                obj["public_access"] = public_access
            if policies is not None:
                obj["policies"] = policies
            obj["modified"], obj["rev"] = time.time(), int(obj["rev"]) + 1
            self.meta.put_json(txn, "containers", name.encode(), obj)
        return obj

    def delete(self, name: str) -> None:
        """The container and every blob in it (with snapshots and leases), in one transaction."""
        if name in SYSTEM:
            raise AuthorizationFailure(f"container {name!r} is the stamp's own: delete its disks instead")
        with self.meta.write() as txn:
            self.get_in(txn, name)
            for blob in self._blob_names(txn, name):
                full = blob_name(name, blob)
                if self.blobs.held_lease_in(txn, full) is not None:
                    self.blobs.break_lease_in(txn, full)
                self.blobs.delete_in(txn, full, snapshots="include")
            txn.delete(name.encode(), db=self.db)

    def names(self, prefix: str = "", marker: str = "", limit: int = 5000
             ) -> tuple[list[dict[str, Any]], str | None]:
        """Containers named from `marker` on that start with `prefix`, at most
        `limit`, in name order, and the marker of the next page (None: done)."""
        out: list[dict[str, Any]] = []
        with self.meta.read() as txn:
            cur = txn.cursor(db=self.db)
            if not cur.set_range(max(prefix, marker).encode()):
                return out, None
            for key, raw in cur:
                name = bytes(key).decode()
                if not name.startswith(prefix):
                    break
                if len(out) == limit:
                    return out, name
                out.append(loads(bytes(raw)))
        return out, None

    def blob_names(self, container: str, prefix: str = "", marker: str = "", limit: int | None = None
                   ) -> list[str]:
        """The names (within the container) of its blobs that start with
        `prefix`, sorted, from `marker` on: at most `limit` of them, read in
        order from the index (a listing holds one page, not the container)."""
        with self.meta.read() as txn:
            self.get_in(txn, container)
            if container in SYSTEM:
                raise AuthorizationFailure(f"container {container!r} is the stamp's own: list its disks instead")
            return self._blob_names(txn, container, prefix, marker, limit)

    def _blob_names(self, txn: lmdb.Transaction, container: str, prefix: str = "", marker: str = "",
                    limit: int | None = None) -> list[str]:
        head = blob_name(container, "")
        within = (head + prefix).encode("utf-8", "surrogatepass")
        keyed = (key.decode("utf-8", "surrogatepass")[len(head):]
                 for key in self._keys_from(txn, within, (head + max(prefix, marker)).encode("utf-8", "surrogatepass")))
        long = (name[len(head):] for name in self._long_names(txn) if name.startswith(head + prefix)
                and name[len(head):] >= marker)
        merged = heapq.merge(keyed, sorted(long) if limit is None else heapq.nsmallest(limit, long))
        return list(merged if limit is None else itertools.islice(merged, limit))

    def _keys_from(self, txn: lmdb.Transaction, within: bytes, start: bytes) -> Iterator[bytes]:
        """Keys of the blobs table from `start` on while they begin with `within`."""
        cur = txn.cursor(db=self.meta.db["blobs"])
        if not cur.set_range(start):
            return
        for key in cur.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(within):
                return
            yield key

    def _long_names(self, txn: lmdb.Transaction) -> Iterator[str]:
        """Names too long for a key (blob_key): their records hold them."""
        for _, raw in self.meta.items(txn, "blobs", b"\xff"):
            yield str(loads(raw).get("name", ""))

    def check(self) -> list[str]:
        """Problems with the container records."""
        problems = []
        with self.meta.read() as txn:
            for key, raw in self.meta.items(txn, "containers"):
                name = key.decode("utf-8", "replace")
                try:
                    obj = loads(raw)
                except ValueError:
                    problems.append(f"container {name!r}: its record is not JSON")
                    continue
                if not NAME.match(name) or name in SYSTEM:
                    problems.append(f"container {name!r}: not a valid container name")
                if not isinstance(obj, dict) or obj.get("name") != name:
                    problems.append(f"container {name!r}: its record names another container")
                elif obj.get("public_access") not in PUBLIC_ACCESS or not isinstance(obj.get("metadata"), dict):
                    problems.append(f"container {name!r}: bad public access or metadata")
                elif not isinstance(obj.get("account", ""), str):
                    problems.append(f"container {name!r}: bad account")
        return problems
