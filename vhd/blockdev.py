"""The block device protocol every layer speaks (DESIGN.md, "contracts").

A block device has a size in bytes and five operations: read, write, flush,
discard and an allocation query. A raw file, a VHD image (any subformat and
chain), a stamp page blob and a host-cached blob all implement it, so layers
are tested alone and stacked freely. Rules:
- offsets and lengths are bytes; any offset works, 512-aligned is fastest;
- a request that reaches past `size` raises RangeError, never clamps;
- write is volatile until flush() returns (like a disk with a write cache);
- discard(o, n): afterwards [o, o+n) reads as zeros; space may be released;
- allocation(o, n) tiles [o, o+n) with Extents that are DATA or ZERO
  (ZERO: reads as zeros and holds no data here; for NBD block status and
  sparse copies). DATA may also read as zeros.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import RangeError, ReadOnlyError
from .fileio import OsFile, RawFile


class Alloc(enum.Enum):
    DATA = "data"
    ZERO = "zero"


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    state: Alloc

    def to_json(self) -> dict[str, object]:
        return {"offset": self.offset, "length": self.length, "state": self.state.value}


@runtime_checkable
class BlockDevice(Protocol):
    size: int
    readonly: bool

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def allocation(self, offset: int, length: int) -> list[Extent]: ...

    def close(self) -> None: ...


def check_range(size: int, offset: int, length: int) -> None:
    """Raise RangeError unless [offset, offset+length) lies inside [0, size)."""
    if offset < 0 or length < 0 or offset + length > size:
        raise RangeError(f"range {offset}+{length} is outside the disk (size {size})")


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours with the same state; drop empty extents."""
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        if out and out[-1].state is e.state and out[-1].offset + out[-1].length == e.offset:
            last = out.pop()
            e = Extent(last.offset, last.length + e.length, e.state)
        out.append(e)
    return out


def ranges_to_extents(offset: int, length: int, data: list[tuple[int, int]]) -> list[Extent]:
    """Tile [offset, offset+length) from a sorted list of DATA pieces."""
    out: list[Extent] = []
    pos = offset
    for start, n in data:
        if start > pos:
            out.append(Extent(pos, start - pos, Alloc.ZERO))
        out.append(Extent(start, n, Alloc.DATA))
        pos = start + n
    if pos < offset + length:
        out.append(Extent(pos, offset + length - pos, Alloc.ZERO))
    return merge_extents(out)


def align_write(read: Callable[[int, int], bytes], offset: int, data: bytes | bytearray | memoryview,
                unit: int = 512) -> tuple[int, bytes | bytearray | memoryview]:
    """Widen a write to whole `unit`s (sectors, pages) for stores that take no
    less: the partial units at each end are read and patched. An aligned
    write comes back unchanged."""
    length = len(data)
    if not (offset % unit or length % unit):
        return offset, data
    lo = offset - offset % unit
    hi = -(-(offset + length) // unit) * unit
    buf = bytearray(read(lo, hi - lo))
    buf[offset - lo:offset - lo + length] = data
    return lo, buf


ZERO_CHUNK = 1 << 20
_ZEROS = bytes(4 << 20)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero. bytes and bytearray compare with memcmp;
    a memoryview compares element by element (about 100x slower), so it is
    copied to bytes first."""
    if isinstance(data, memoryview):
        if data[:16].tobytes() != _ZEROS[:min(16, len(data))]:
            return False  # real data usually shows itself at once: no copy
        data = data.tobytes()
    n = len(data)
    if n <= len(_ZEROS):
        return data == (_ZEROS if n == len(_ZEROS) else _ZEROS[:n])
    return data.count(0) == n


def write_zeros(dev: BlockDevice, offset: int, length: int) -> None:
    """Write explicit zeros in bounded chunks (no buffer sized by the request)."""
    zeros = bytes(min(length, ZERO_CHUNK))
    while length > 0:
        n = min(length, len(zeros))
        dev.write(offset, zeros[:n] if n < len(zeros) else zeros)
        offset += n
        length -= n


class FileDevice:
    """A raw image: a RawFile whose bytes are the disk, size fixed at open."""

    def __init__(self, file: RawFile, readonly: bool = True, size: int | None = None) -> None:
        self.file = file
        self.readonly = readonly
        self.size = file.size() if size is None else size

    @classmethod
    def open(cls, path: str, readonly: bool = True) -> FileDevice:
        return cls(OsFile(path, writable=not readonly), readonly)

    def read(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        data = self.file.pread(length, offset)
        return data if len(data) == length else data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.file.name}: opened read-only")
        check_range(self.size, offset, len(data))
        self.file.pwrite(data, offset)

    def flush(self) -> None:
        if not self.readonly:
            self.file.sync()

    def discard(self, offset: int, length: int) -> None:
        """The range's space is freed where the file can punch holes
        (fileio.punch_hole), else zeros are written: it reads as zeros."""
        if self.readonly:
            raise ReadOnlyError(f"{self.file.name}: opened read-only")
        check_range(self.size, offset, length)
        punch = getattr(self.file, "punch_hole", None)
        if punch is None or not punch(offset, length):
            write_zeros(self, offset, length)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size, offset, length)
        return ranges_to_extents(offset, length, self.file.data_ranges(offset, length))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
