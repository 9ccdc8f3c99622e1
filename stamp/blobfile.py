"""A page blob as a vhd RawFile, so the vhd package reads and writes the VHD
that a managed disk's page blob holds (DESIGN.md: a disk's virtual disk is
opened through vhd over its page blobs).

RawFile asks for byte-granular positional I/O on a growable file; a page
blob has 512-byte pages and a fixed size. So: a write past the end grows the
blob first (the VHD code appends blocks by writing past its footer, "as a
file would"); a write that is not page-aligned reads, patches and writes the
pages it touches; reads past the end are short, as a file's are. sync() makes
the stamp durable against power loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vhd.blockdev import align_write

from .pageblob import MAX_WRITE, PAGE

if TYPE_CHECKING:
    from .hosted import HostStamp


class PageBlobFile:
    def __init__(self, stamp: HostStamp, blob: str, lease: str | None = None, writable: bool = True) -> None:
        self.stamp, self.blob, self.lease, self.writable = stamp, blob, lease, writable
        self.name = f"blob:{blob}"
        self._size = stamp.blobs.size(blob)

    @property
    def repair_command(self) -> str | None:
        """What vhd's errors tell the user to run: a managed disk's blob is
        repaired by the stamp command (vhd cannot open a page blob)."""
        if not self.blob.startswith("disks/"):
            return None
        rest = self.blob[len("disks/"):]
        disk = rest.rpartition("/")[0] or rest  # disks/NAME/N (disks/NAME in a stamp made before)
        if "://" in self.stamp.path:  # a stamp over the network: repaired where it is
            return f"stamp --stamp STAMP-FOLDER disk check --repair {disk} (where {self.stamp.path} is served)"
        return f"stamp --stamp {self.stamp.path} disk check --repair {disk}"

    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        return self.stamp.blobs.read(self.blob, offset, end - offset)  # any range, as Get Blob

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if not self.writable:
            raise PermissionError(f"{self.name} is open read-only")
        n = len(data)
        if offset + n > self._size:
            self.truncate(-(-(offset + n) // PAGE) * PAGE)
        offset, data = align_write(lambda o, k: self.pread(k, o).ljust(k, b"\0"), offset, data, PAGE)
        view = memoryview(data)
        for pos in range(0, len(view), MAX_WRITE):
            self.stamp.blobs.write(self.blob, offset + pos, view[pos:pos + MAX_WRITE], lease=self.lease)

    def truncate(self, size: int) -> None:
        size = -(-size // PAGE) * PAGE
        self.stamp.blobs.resize(self.blob, size, lease=self.lease)
        self._size = size

    def sync(self) -> None:
        self.stamp.flush()

    def close(self) -> None:
        pass

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        out = []
        for o, n in self.stamp.blobs.page_ranges(self.blob):
            s, e = max(o, offset), min(o + n, offset + length)
            if e > s:
                out.append((s, e - s))
        return out
