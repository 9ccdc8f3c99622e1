"""Mount an image as a file (and its filesystem) through FUSE.

`mount` starts `vhd serve` on a private unix socket (a process of its own,
so the mount outlives the command), then nbdfuse (libnbd) exposes the export
as DIR/disk, read-write, through FUSE. With `fs`, the filesystem in the disk
(or in one of its partitions) is loop-mounted there too. `umount` undoes
everything in the reverse order: the filesystem (synced), the FUSE mount,
then the server, which flushes and closes the image on SIGTERM. The state of
each mount is a small JSON file in a runtime folder, removed with it. Needs
root (FUSE, loop). Rules kept: helpers run isolated from the working folder
(python -P, cwd /), their stderr goes to a log shown when they fail to start;
names in NBD URIs are percent-encoded; umount stops at the first layer that
refuses (busy), leaving the layers under it working, and says who holds it;
a helper is signalled only if its pid still names the process mount started
(its start time is kept beside it: a dead helper's pid may be reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from .errors import UsageError, VhdError
from .nbd import export_name
from .ops import open_device
from .partition import partitions
from .process import process_start

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


def helper(module: str, *args: str) -> list[str]:
    """The command line of a helper process (a server): this interpreter with -P,
    so nothing is imported from the working folder (mount runs as root: a
    concurrent.py there would run as uid 0). Popen it with cwd="/" too."""
    return [sys.executable, "-P", "-m", module, *args]


def nbd_unix_uri(export: str, socket: str) -> str:
    """nbd+unix:///EXPORT?socket=PATH, both percent-encoded (a space in a file name)."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket, safe='/')}"


def _tail(log: str) -> str:
    try:
        with open(log, errors="replace") as f:
            return f.read()[-2000:].strip()
    except OSError:
        return ""


def _wait(check: Any, what: str, proc: subprocess.Popen[Any] | None = None, log: str = "") -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            said = _tail(log) if log else ""
            raise VhdError(f"{what} failed to start (exit status {proc.returncode})" + (f": {said}" if said else ""))
        time.sleep(0.05)
    said = _tail(log) if log else ""
    raise VhdError(f"{what} did not come up within {WAIT:.0f} s" + (f": {said}" if said else ""))


def mount(image: str, mountpoint: str, *, readonly: bool = False, fs: str | None = None,
          partition: int | None = None, allow_dirs: Sequence[str] | None = None) -> dict[str, Any]:
    """Expose `image` as MOUNTPOINT/disk; with `fs`, also mount its filesystem there."""
    open_device(image, allow_dirs=allow_dirs).close()  # a clear error now for a bad image
    cmd = helper("vhd", "serve", os.path.abspath(image))
    cmd += ["--read-only"] if readonly else []
    for d in allow_dirs or []:
        cmd += ["--allow-dir", os.path.abspath(d)]
    name = export_name(image)  # what vhd serve calls it
    return mount_served(cmd, name, os.path.abspath(image), mountpoint, readonly=readonly, fs=fs,
                        partition=partition)


def _clear_stale_socket(sock: str) -> None:
    """Remove a socket file left by a mount killed before it wrote its state
    (nobody listens on it); refuse if a server still does."""
    if not os.path.exists(sock):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.settimeout(2)
        probe.connect(sock)
    except OSError:
        os.unlink(sock)  # dead: the new server makes it again
        return
    finally:
        probe.close()
    raise UsageError(f"a server from an earlier mount still listens at {sock}: stop it, then mount again")


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
    _clear_stale_socket(sock)  # the server's socket appearing is how we know it is up
    server_log, fuse_log = os.path.join(state_dir, "server.log"), os.path.join(state_dir, "nbdfuse.log")
    with open(server_log, "w") as log:  # a file, not a pipe nobody reads (a full pipe would block the server)
        proc = subprocess.Popen(server + ["--socket", sock], stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True, cwd="/")
    state: dict[str, Any] = {"image": what, "mountpoint": os.path.abspath(mountpoint),
                             "server_pid": proc.pid, "server_started": started(proc.pid), "fs": None,
                             "state_dir": state_dir}
    try:
        _wait(lambda: os.path.exists(sock), "the NBD server", proc, server_log)
        pidfile = os.path.join(state_dir, "nbdfuse.pid")
        fcmd = [nbdfuse, "-P", pidfile] + (["-r"] if readonly else []) + \
            [os.path.join(state["mountpoint"], "disk"), nbd_unix_uri(export, sock)]
        with open(fuse_log, "w") as log:
            fuse = subprocess.Popen(fcmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, cwd="/")
        state["fuse_pid"], state["fuse_started"] = fuse.pid, started(fuse.pid)
        _wait(lambda: os.path.exists(pidfile) and os.path.exists(os.path.join(mountpoint, "disk")), "nbdfuse", fuse,
              fuse_log)
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
        _teardown(state, strict=False)
        raise
    with open(os.path.join(state_dir, "state.json"), "w") as f:
        json.dump(state, f)
    return {**state, "disk": os.path.join(state["mountpoint"], "disk")}


def umount(mountpoint: str) -> dict[str, Any]:
    """Undo `mount`, top down: the filesystem, the FUSE file, then the server
    (which flushes the image). A layer that refuses (busy) stops it there:
    what is under it keeps running, and the error names who holds it."""
    state_dir = _state_path(mountpoint)
    state_file = os.path.join(state_dir, "state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{mountpoint} is not a vhd mount") from None
    _teardown(state, state_file=state_file)
    shutil.rmtree(state_dir, ignore_errors=True)
    return {"unmounted": state["mountpoint"], "image": state["image"]}


def _teardown(state: dict[str, Any], strict: bool = True, state_file: str | None = None) -> None:
    """Unmount and stop each layer, top down. strict: stop at the first layer
    that refuses, with an error naming what holds it (the state file then
    records what is already gone, so a retry goes on from there); not strict
    (undoing a failed mount): go through every layer regardless."""
    if state.get("fs") and mounted(state["fs"]):
        subprocess.run(["sync"])
        proc = subprocess.run(["umount", state["fs"]], capture_output=True, text=True)
        if proc.returncode != 0 and strict:
            raise VhdError(_busy(state["fs"], proc.stderr))
        state["fs"] = None
        _save(state, state_file)
    if state.get("fuse_pid"):
        if mounted(state["mountpoint"]):
            proc = subprocess.run(["umount", state["mountpoint"]], capture_output=True, text=True)
            if proc.returncode != 0 and strict:
                raise VhdError(_busy(state["mountpoint"], proc.stderr))
        _stop(state["fuse_pid"], signal.SIGTERM, state.get("fuse_started"))
        state["fuse_pid"] = None
        _save(state, state_file)
    if state.get("server_pid"):
        _stop(state["server_pid"], signal.SIGTERM, state.get("server_started"))  # it flushes, closes the image
        state["server_pid"] = None
    if not strict and state.get("state_dir"):
        shutil.rmtree(state["state_dir"], ignore_errors=True)


def mounted(path: str) -> bool:
    """Whether something is mounted at `path`, by the kernel's mount table: a
    FUSE mount whose nbdfuse died cannot be stat'ed ("Transport endpoint is not
    connected"), so os.path.ismount calls it not a mount, and it would stay."""
    targets = {os.path.abspath(path), os.path.realpath(path)}  # the table has the path the kernel resolved
    try:
        with open("/proc/self/mounts") as f:
            table = f.read()
    except OSError:
        return os.path.ismount(path)
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) > 1 and _unescape(fields[1]) in targets:
            return True
    return False


def _unescape(field: str) -> str:
    """A /proc/mounts path: space, tab, newline and backslash are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _save(state: dict[str, Any], state_file: str | None) -> None:
    if state_file is not None:
        with open(state_file, "w") as f:
            json.dump(state, f)


def _busy(path: str, said: str) -> str:
    who = holders(path)
    return (f"{path} is busy ({said.strip() or 'umount refused'}); held by "
            f"{', '.join(who) if who else 'something not visible here (a loop device or a mount inside it?)'}. "
            "Nothing under it was touched: close those, then run umount again")


def holders(path: str) -> list[str]:
    """The processes whose working folder, root or open files are at or under `path`."""
    top = os.path.realpath(path)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if any(t == top or t.startswith(top + "/") for t in _links(pid)):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            found.append(f"{name} (pid {pid})")
    return found


def _links(pid: str) -> list[str]:
    names = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
    try:
        names += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        pass
    out = []
    for name in names:
        try:
            out.append(os.readlink(name))
        except OSError:
            continue
    return out


def started(pid: int) -> int | None:
    """When process `pid` started (vhd.process), or None if there is none."""
    return process_start(pid) or None


def _stop(pid: int, sig: int, start: int | None = None) -> None:
    """Stop our helper `pid`: SIGTERM, then SIGKILL if it lingers. If it died
    already (kill -9, a crash) and its pid went to another process, that one is
    left alone: `start` is when ours started."""
    if start is not None and started(pid) != start:
        return  # ours is gone; the pid, if alive, is someone else's
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
