"""The one interface through which vhd touches bytes: RawFile.

A RawFile is a flat, growable byte store with positional I/O and a barrier
(`sync`). Images are written against it, so the same VHD code runs over a
local file (OsFile), memory (MemFile), a fault-injecting file in the tests, or
a stamp page blob later. Rules kept here:
- positional I/O only (os.pread/os.pwrite), no shared seek position;
- reads past the end return the bytes that exist (short), never raise;
- `sync` is the only durability barrier: nothing written before it may be
  lost after it returns;
- OsFile opens regular files only (block devices when the caller allows
  them): a FIFO, a directory or a socket is a FileTypeError at once, never a
  hang, and any other OSError of opening is a VhdError naming the path.
- `punch_hole` (optional: OsFile has it, other RawFiles need not) frees a
  range's space and leaves it reading as zeros, or returns False where the
  filesystem cannot (then the caller writes zeros); the file's size stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import stat
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from .errors import BusyError, FileTypeError, VhdError


@runtime_checkable
class RawFile(Protocol):
    """Positional byte store with a durability barrier."""

    name: str

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    def size(self) -> int: ...

    def truncate(self, size: int) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) pieces of [offset, offset+length) that may hold data."""
        ...


class OsFile:
    """A local file, accessed with os.pread/os.pwrite and locked with flock."""

    def __init__(self, path: str, writable: bool = False, create: bool = False,
                 lock: bool = True, allow_block: bool = False) -> None:
        self.fd = _open_regular(path, writable, create, allow_block)
        self.name = path
        self.writable = writable
        self._block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        if lock:
            self._lock(writable)

    def _lock(self, exclusive: bool) -> None:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                how = "for writing" if exclusive else "for reading"
                raise BusyError(f"{self.name}: in use by another process; cannot open {how}") from None
            raise

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def size(self) -> int:
        if self._block:  # a block device's st_size is 0: its end is its size
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def punch_hole(self, offset: int, length: int) -> bool:
        """Free [offset, offset+length) (fallocate PUNCH_HOLE | KEEP_SIZE): it
        reads as zeros afterwards, the size is kept. False, having changed
        nothing, on a block device or where the filesystem or C library
        cannot punch; another failure (EIO) is raised."""
        if self._block or length <= 0:
            return False
        return punch_hole(self.fd, offset, length)

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Ask the filesystem where holes are (SEEK_DATA/SEEK_HOLE)."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    start = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break
                    raise
                if start >= end:
                    break
                stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
                out.append((start, stop - start))
                pos = stop
        except OSError:
            return [(offset, length)]
        return out


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
# a filesystem (or kernel) that cannot punch: the caller writes zeros instead
_CANNOT_PUNCH = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EPERM}


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate, or None where this C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length) through libc
    (os has no fallocate; os.posix_fallocate only allocates). True if done."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT_PUNCH:
        return False
    raise OSError(err, os.strerror(err))


# errors of opening that say what the path is (a symlink loop, a socket, a
# path through a non-folder, a device without a driver), not how it went
_NOT_A_FILE = {errno.ELOOP, errno.ENXIO, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ENODEV, errno.EOPNOTSUPP}


def _open_regular(path: str, writable: bool, create: bool, allow_block: bool) -> int:
    """A descriptor for `path`, refused unless it is a regular file (or an
    allowed block device). O_NONBLOCK makes opening a FIFO return at once
    instead of waiting for a writer; it is cleared again before any I/O."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise VhdError(f"{path}: already exists (refusing to overwrite)") from None
    except FileNotFoundError:
        raise VhdError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileTypeError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise VhdError(f"{path}: permission denied") from None
    except OSError as e:  # ELOOP (a symlink loop), ENXIO (a socket), ENAMETOOLONG...
        if e.errno in (errno.EMFILE, errno.ENFILE):  # not the file's fault
            raise VhdError(f"{path}: cannot be opened: too many open files (each image of a chain "
                           "holds one descriptor while open); raise the limit (ulimit -n)") from None
        if e.errno in _NOT_A_FILE:
            raise FileTypeError(f"{path}: cannot be opened as an image file: {e.strerror or e}") from None
        raise VhdError(f"{path}: cannot be opened: {e.strerror or e}") from None  # EROFS, EIO...
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode))):
        os.close(fd)
        raise FileTypeError(f"{path}: is {_kind(mode)}, not a regular file; name the image file itself")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class MemFile:
    """A RawFile in memory: for tests, and for images that never touch disk."""

    def __init__(self, data: bytes = b"", name: str = "<memory>") -> None:
        self.buf = bytearray(data)
        self.name = name

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset, length)]
