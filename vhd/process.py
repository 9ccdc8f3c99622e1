"""Process identity: a pid and the time its process started.

A pid is reused once its process is gone, so a pid alone cannot say whether
the process that wrote a lock, a lease or a state file still runs. The pid
and its start time together name one process, never a later one given the
same pid. Linux only (/proc/PID/stat); where the start time cannot be read
the answer falls back to the pid alone. A zombie (ended, not yet waited
for by its parent) is not alive.
"""

from __future__ import annotations

import os


def _stat(pid: int) -> tuple[bytes, int]:
    """Process `pid`'s state letter and start time (clock ticks after boot:
    fields 3 and 22 of /proc/PID/stat); (b"", 0) if they cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        fields = raw.rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return b"", 0


def process_start(pid: int) -> int:
    """When process `pid` started (clock ticks after boot: field 22 of
    /proc/PID/stat), 0 if that cannot be read."""
    return _stat(pid)[1]


def own_start() -> int:
    """This process's start time (see process_start)."""
    return process_start(os.getpid())


def pid_alive(pid: int, started: int = 0) -> bool:
    """Is process `pid` alive and, if `started` is known, the one that started
    then (not a later process given the same pid)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state, now = _stat(pid)
    if state in (b"Z", b"X"):
        # A zombie (killed, not yet waited for by its parent: a companion
        # reclaimer killed -9 under a serve that goes on) answers kill(0) and
        # keeps its start time, but it will never act again: it is dead.
        return False
    if not started:
        return True
    return now in (0, started)  # 0: unreadable (gone meanwhile, or no /proc): keep it
