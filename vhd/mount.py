"""Mount an image as a file (and its filesystem) through FUSE.

`mount` starts `vhd serve` on a private unix socket (a process of its own,
so the mount outlives the command), then nbdfuse (libnbd) exposes the export
as DIR/disk, read-write, through FUSE. With `fs`, the filesystem in the disk
(or in one of its partitions) is loop-mounted there too. `umount` undoes
everything in the reverse order: the filesystem (synced), the FUSE mount,
then the server, which flushes and closes the image on SIGTERM. The state of
each mount is a small JSON file in a runtime folder. Needs root (FUSE, loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import UsageError, VhdError
from .ops import open_device
from .partition import partitions

RUNTIME = os.environ.get("DISKSTAMP_RUNTIME", "/run/diskstamp" if os.geteuid() == 0 else "/tmp/diskstamp")
WAIT = 15.0


def _state_path(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(RUNTIME, key)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise VhdError(f"{tool} is missing: install the Debian package {package}")
    return path


def _wait(check: Any, what: str, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise VhdError(f"{what} failed to start (exit status {proc.returncode})")
        time.sleep(0.05)
    raise VhdError(f"{what} did not come up within {WAIT:.0f} s")


def mount(image: str, mountpoint: str, *, readonly: bool = False, fs: str | None = None,
          partition: int | None = None, allow_dirs: Sequence[str] | None = None) -> dict[str, Any]:
    """Expose `image` as MOUNTPOINT/disk; with `fs`, also mount its filesystem there."""
    open_device(image, allow_dirs=allow_dirs).close()  # a clear error now for a bad image
    cmd = [sys.executable, "-m", "vhd", "serve", image]
    cmd += ["--read-only"] if readonly else []
    for d in allow_dirs or []:
        cmd += ["--allow-dir", d]
    name = os.path.splitext(os.path.basename(image))[0]
    return mount_served(cmd, name, os.path.abspath(image), mountpoint, readonly=readonly, fs=fs,
                        partition=partition)


def mount_served(server: list[str], export: str, what: str, mountpoint: str, *, readonly: bool = False,
                 fs: str | None = None, partition: int | None = None) -> dict[str, Any]:
    """Start `server` (an NBD server command that takes --socket PATH and
    serves `export`), then mount as `mount` does. hostcache mounts attached
    disks with it."""
    if os.geteuid() != 0:
        raise UsageError("mounting needs root (FUSE and loop devices)")
    nbdfuse = _need("nbdfuse", "libnbd-bin")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint} is not a folder")
    if os.listdir(mountpoint):
        raise UsageError(f"{mountpoint} is not empty (already mounted?)")
    if fs is not None and not os.path.isdir(fs):
        raise UsageError(f"{fs} is not a folder")
    state_dir = _state_path(mountpoint)
    if os.path.exists(os.path.join(state_dir, "state.json")):
        raise UsageError(f"{mountpoint} is already a vhd mount (vhd umount {mountpoint})")
    os.makedirs(state_dir, exist_ok=True)
    sock = os.path.join(state_dir, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(server + ["--socket", sock], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state: dict[str, Any] = {"image": what, "mountpoint": os.path.abspath(mountpoint),
                             "server_pid": proc.pid, "fs": None}
    try:
        _wait(lambda: os.path.exists(sock), "the NBD server", proc)
        name = export
        pidfile = os.path.join(state_dir, "nbdfuse.pid")
        fcmd = [nbdfuse, "-P", pidfile] + (["-r"] if readonly else []) + \
            [os.path.join(mountpoint, "disk"), f"nbd+unix:///{name}?socket={sock}"]
        fuse = subprocess.Popen(fcmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        state["fuse_pid"] = fuse.pid
        _wait(lambda: os.path.exists(pidfile) and os.path.exists(os.path.join(mountpoint, "disk")), "nbdfuse", fuse)
        disk = os.path.join(mountpoint, "disk")
        if fs is not None:
            offset = 0
            if partition is not None:
                with open(disk, "rb") as f:
                    found = {p.number: p for p in partitions(lambda o, n: os.pread(f.fileno(), n, o))}
                if partition not in found:
                    raise UsageError(f"the disk has no partition {partition} (it has {sorted(found) or 'none'})")
                offset = found[partition].offset
            opts = f"loop,offset={offset}" + (",ro" if readonly else "")
            mounted = subprocess.run(["mount", "-o", opts, disk, fs], capture_output=True, text=True)
            if mounted.returncode != 0:
                raise VhdError(f"mounting the filesystem failed: {mounted.stderr.strip()}")
            state["fs"] = os.path.abspath(fs)
    except BaseException:
        _teardown(state)
        raise
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(state, f)
    return {**state, "disk": os.path.join(state["mountpoint"], "disk")}


def umount(mountpoint: str) -> dict[str, Any]:
    """Undo `mount`: the filesystem, the FUSE file, then the server (flushing the image)."""
    state_file = os.path.join(_state_path(mountpoint), "state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{mountpoint} is not a vhd mount") from None
    _teardown(state)
    os.unlink(state_file)
    return {"unmounted": state["mountpoint"], "image": state["image"]}


def _teardown(state: dict[str, Any]) -> None:
    errors = []
    if state.get("fs"):
        subprocess.run(["sync"])
        proc = subprocess.run(["umount", state["fs"]], capture_output=True, text=True)
        if proc.returncode != 0:
            errors.append(f"umount {state['fs']}: {proc.stderr.strip()}")
    if state.get("fuse_pid"):
        subprocess.run(["umount", state["mountpoint"]], capture_output=True)
        _stop(state["fuse_pid"], signal.SIGTERM)
    if state.get("server_pid"):
        _stop(state["server_pid"], signal.SIGTERM)  # the server flushes and closes the image
    if errors:
        raise VhdError("; ".join(errors))


def _stop(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (another vhd command started it): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            done = 0
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
