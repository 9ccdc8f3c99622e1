"""The stamp as a host uses it, in-process or over the network.

A host (hostcache) needs of a stamp its page blobs (HostBlobs), its disk
records (DiskRecords) and flush; `open_for_host(location)` gives both for a
stamp folder (stamp.Stamp and stamp.disks.Disks) or for the URL of a
`stamp serve` (stamp.remote: RemoteStamp and RemoteDisks), so the host's
code is one code over either. The Protocols say exactly what the host may
rely on: anything else of a local Stamp is not there over the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .errors import StampError

if TYPE_CHECKING:
    from .disks import DiskState


class HostBlobs(Protocol):
    def version(self, name: str) -> tuple[int, str]: ...
    def blob_id(self, name: str) -> int: ...
    def size(self, name: str) -> int: ...
    def read(self, name: str, offset: int, length: int) -> bytes: ...
    def write(self, name: str, offset: int, data: bytes | memoryview, lease: str | None = None) -> None: ...
    def resize(self, name: str, size: int, lease: str | None = None) -> None: ...
    def page_ranges(self, name: str) -> list[tuple[int, int]]: ...
    def acquire_writer_lease(self, name: str) -> str: ...
    def release_lease(self, name: str, lease: str) -> None: ...


class HostStamp(Protocol):
    path: str  # the stamp folder, or the endpoint's URL

    @property
    def blobs(self) -> HostBlobs: ...
    def flush(self) -> None: ...
    def flush_shared(self) -> None: ...
    def close(self) -> None: ...


class DiskRecords(Protocol):
    def record(self, name: str) -> dict[str, Any]: ...
    def disks(self) -> list[dict[str, Any]]: ...
    def image(self, name: str) -> dict[str, Any]: ...
    def set_state(self, name: str, state: DiskState, expect: DiskState | None = None,
                  **fields: Any) -> dict[str, Any]: ...
    def create_from_image(self, name: str, image: str, size_gib: int | None = None,
                          sku: str = "Premium_LRS") -> dict[str, Any]: ...
    def delete_disk(self, name: str) -> None: ...


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def open_for_host(location: str, account_key: str | None = None, ca_file: str | None = None,
                  host: str | None = None) -> tuple[HostStamp, DiskRecords]:
    """The stamp at `location` (a folder, or http(s)://HOST:PORT/ACCOUNT,
    an https one verified with the CA in `ca_file`) and its disk records;
    `host` is the identity of the host folder using it, which the host API
    checks a writer lease against (in-process, the host has the stamp
    folder itself: nothing to check it against)."""
    if is_url(location):
        from .remote import RemoteStamp
        remote = RemoteStamp(location, account_key, ca_file=ca_file, host=host)
        return remote, remote.records()
    if ca_file:
        raise StampError(f"a CA file is for an https:// stamp, not the folder {location}")
    from .disks import Disks
    from .stamp import Stamp
    local = Stamp.open(location)
    try:
        return local, Disks(local)
    except BaseException:
        local.close()
        raise


def is_remote(stamp: HostStamp) -> bool:
    """A stamp reached over the network: its space is reclaimed, and its
    vault backups made, where it is served."""
    return is_url(stamp.path)
