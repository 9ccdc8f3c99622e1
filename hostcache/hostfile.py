"""The host folder's small state files (host.json, the CA a host trusts): written whole, private.

Rules kept:
- a file is written to a temporary name of its writer (`NAME.PID.tmp`),
  synced, renamed over NAME, then the folder is synced: a kill or a power
  loss at any instant leaves the old file or the new one, never a part of
  it (a host whose host.json is cut short does not open);
- the temporary file is created 0600 (O_CREAT with the mode, O_EXCL):
  host.json may hold the account key, and no instant sees it readable by
  others, whatever the umask;
- temporary files of writers that died (kill -9 between create and rename)
  are removed by the next write of the same file.
I/O only: what goes in the files is the caller's.
"""

from __future__ import annotations

import json
import os
from typing import Any

TMP = ".tmp"


def write_private(path: str, data: bytes) -> None:
    """`data` as the file `path` (mode 0600), replaced whole and durable."""
    folder, name = os.path.split(os.path.abspath(path))
    _sweep(folder, name)
    tmp = f"{path}.{os.getpid()}{TMP}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the data, then the name pointing at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    sync_folder(folder)


def write_json(path: str, obj: Any) -> None:
    write_private(path, json.dumps(obj, indent=2).encode())


def sync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(folder: str, name: str) -> None:
    """Remove NAME.PID.tmp files whose writer is no longer running (its own is made anew)."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    for entry in entries:
        pid = _writer(entry, name)
        if pid is not None and (pid == os.getpid() or not _alive(pid)):
            _unlink_quietly(os.path.join(folder, entry))


def _writer(entry: str, name: str) -> int | None:
    """The pid in a temporary file's name `NAME.PID.tmp`, else None."""
    middle = entry.removeprefix(name + ".").removesuffix(TMP)
    if not entry.startswith(name + ".") or not entry.endswith(TMP) or not middle.isdigit():
        return None
    return int(middle)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
