"""Vault locks, kept as restic and borg keep theirs: one file per holder in VAULT/locks/.

Backups, restores, verify, check and repair hold a shared lock; prune and gc
an exclusive one. Rules:
- a holder writes its lock file (synced) first and reads the others second,
  so of two that race, at least one sees the other and gives up: never both
  proceed;
- an exclusive lock conflicts with every other; two shared locks conflict only
  when both back up the same disk (they would build on the same point);
- a lock whose process is gone (this host, and its pid is not running or was
  started at another time) is stale for sure: the next locker removes it; one
  whose process runs on this host is live however old. Another host's
  lock not refreshed for STALE_AFTER may belong to a live process there:
  it is named in the error, and `stamp backup unlock` removes it. Holders
  refresh their lock every REFRESH while they work; one whose lock was removed
  meanwhile stops (a backup before its commit): a gc may have run;
- a holder's temporary files carry its lock id (files.py), so what a dead
  holder left is known: nothing alive will rename it. One whose id names no
  lock at all is a leftover only after GRACE (it may be a lock being written).
The lock file is sealed metadata (crypto.py), so it leaks nothing either.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..stream import own_start, pid_alive
from . import files
from .errors import VaultError, VaultLockedError

STALE_AFTER = 30 * 60.0
REFRESH = 5 * 60.0
GRACE = 60.0  # a temporary file with no lock behind it may be a lock being written

Seal = Callable[[Any, str], bytes]
Unseal = Callable[[bytes, str], Any]


def _alive(pid: int, start: int | None) -> bool:
    """The lock's process is alive: the stream layer's test, pid and start time."""
    return pid_alive(pid, start or 0)


def describe(info: dict[str, Any]) -> str:
    what = info.get("op", "?") + (f" of disk {info['disk']}" if info.get("disk") else "")
    age = time.time() - float(info.get("time", 0))
    return f"{what} by pid {info.get('pid')} on {info.get('host')}, refreshed {age:.0f} s ago"


def state(info: dict[str, Any], now: float | None = None) -> str:
    """'live', 'dead' (its process is gone: stale for sure) or 'old' (another
    host's, not refreshed for STALE_AFTER). On this host the process itself is
    asked: a live one holds its lock however long since it refreshed it (a long
    restore, or a backup storing nothing new, refreshes seldom)."""
    if info.get("host") == socket.gethostname():
        return "live" if _alive(int(info.get("pid", 0)), info.get("start")) else "dead"
    if (now or time.time()) - float(info.get("time", 0)) > STALE_AFTER:
        return "old"
    return "live"


@dataclass
class Lock:
    folder: str
    seal: Seal
    unseal: Unseal
    op: str
    exclusive: bool
    disk: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    refreshed: float = 0.0

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.id)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "exclusive": self.exclusive, "disk": self.disk, "pid": os.getpid(),
                "start": own_start() or None, "host": socket.gethostname(), "time": time.time(),
                **self.extra}

    def acquire(self, wait: float = 0.0) -> Lock:
        deadline = time.monotonic() + wait
        while True:
            self._write()
            try:
                self._check_others()
                return self
            except VaultLockedError:
                self.release()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def refresh(self) -> None:
        if time.monotonic() - self.refreshed >= REFRESH:
            self.ensure_held()
            self._write()

    def ensure_held(self) -> None:
        """VaultLockedError if the lock file is gone (`stamp backup unlock` took
        it for stale): a gc may have run since, so what this holder stored may
        be gone too, and it must not commit."""
        if not os.path.exists(self.path):
            raise VaultLockedError(f"{self.op}: its lock {self.id} was removed while it ran (`stamp backup "
                                   "unlock`?); a gc may have deleted what it stored, so it stops: run it again")

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write(self) -> None:
        files.write_atomic(self.path, self.seal(self.info(), f"lock {self.id}"), self.id)
        self.refreshed = time.monotonic()

    def _check_others(self) -> None:
        for other, info in read_all(self.folder, self.unseal).items():
            if other == self.id:
                continue
            if info is None:
                raise VaultLockedError(f"lock {other} in {self.folder} cannot be read (another key, or damaged): "
                                       "if no other process uses this vault, remove it with `stamp backup unlock`")
            if not (self.exclusive or info.get("exclusive") or (self.disk and self.disk == info.get("disk"))):
                continue
            kind = state(info)
            if kind == "dead":
                remove(self.folder, other)  # its process is gone: nothing it did is still in flight
                continue
            if kind == "old":
                raise VaultLockedError(f"the vault is locked by a stale lock {other} ({describe(info)}): if that "
                                       "process is gone, remove it with `stamp backup unlock`")
            raise VaultLockedError(f"the vault is locked: {describe(info)} (lock {other}); "
                                   f"{self.op} waits for it with --retry-lock SECONDS")


def read_all(folder: str, unseal: Unseal) -> dict[str, dict[str, Any] | None]:
    """Every lock file's contents (None: unreadable); temporary files are not locks."""
    out: dict[str, dict[str, Any] | None] = {}
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return out
    for name in names:
        if files.tmp_writer(name) is not None:
            continue
        try:
            info = unseal(files.read_bounded(os.path.join(folder, name), 1 << 16), f"lock {name}")
            out[name] = info if isinstance(info, dict) else None
        except FileNotFoundError:
            continue  # released meanwhile
        except VaultError:
            out[name] = None
    return out


def live_ids(folder: str, unseal: Unseal) -> set[str]:
    """Ids of the locks whose holders may still be at work (live or old, not dead)."""
    return {k for k, v in read_all(folder, unseal).items() if v is None or state(v) != "dead"}


def remove(folder: str, lock_id: str) -> None:
    try:
        os.unlink(os.path.join(folder, lock_id))
    except FileNotFoundError:
        pass
