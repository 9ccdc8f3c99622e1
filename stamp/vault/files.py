"""The vault's file access: private, synced, atomic. I/O only.

Rules: files are created 0600 and folders 0700 (a vault holds a user's data);
a file is written to a temporary name that carries its writer's lock id
(`NAME.WRITER.tmp`: two writers never share one, and a dead writer's leftovers
are known by its id), synced, then renamed over the final name (removed if that fails); a caller that
needs the rename itself to be durable syncs the folder (`sync_dirs`) before it
writes the pointer to the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TMP = ".tmp"


def make_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def write_atomic(path: str, data: bytes | list[bytes], writer: str) -> None:
    """`data` (or its parts, one after the other) as the file `path`."""
    tmp = f"{path}.{writer}{TMP}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            _write_all(fd, [data] if isinstance(data, bytes) else data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)  # a full file system: its bytes go now, not after the leftovers' grace
        raise


def _write_all(fd: int, parts: Iterable[bytes]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_dirs(paths: Iterable[str]) -> None:
    for path in sorted(set(paths)):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_writer(filename: str) -> str | None:
    """The writer id of a temporary file's name, or None if it is not one."""
    if not filename.endswith(TMP):
        return None
    stem = filename[:-len(TMP)]
    return stem.rsplit(".", 1)[1] if "." in stem else ""


def read_bounded(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)
