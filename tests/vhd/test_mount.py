"""vhd mount: mkfs, write files, unmount, and find them in the VHD with tools
we did not write (libvhdi, qemu-img, debugfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import vhd
from vhd.partition import partitions

from ..conftest import require, run

MIB = 1 << 20


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, text=True)


def debugfs_cat(raw: str, path: str) -> str:
    require("debugfs")
    return run("debugfs", "-R", f"cat {path}", raw).stdout


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "fs").mkdir()
    yield tmp_path
    for d in ("fs", "m"):  # leave nothing mounted whatever happened
        subprocess.run(["umount", str(tmp_path / d)], capture_output=True)
    cli("umount", str(tmp_path / "m"))


def test_mkfs_write_unmount_and_find_the_file_through_libvhdi(dirs):
    import pyvhdi

    img = dirs / "disk.vhd"
    vhd.create(img, 64 * MIB).close()
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    disk = json.loads(r.stdout)["disk"]
    run("mkfs.ext4", "-q", "-F", disk)
    assert cli("umount", str(dirs / "m")).returncode == 0
    assert cli("mount", str(img), str(dirs / "m"), "--fs", str(dirs / "fs")).returncode == 0
    (dirs / "fs" / "hello.txt").write_text("hello from a VHD\n")
    assert cli("umount", str(dirs / "m")).returncode == 0
    assert vhd.check(str(img)).ok
    f = pyvhdi.file()
    f.open(str(img))
    raw = dirs / "disk.raw"
    raw.write_bytes(f.read_buffer_at_offset(f.get_media_size(), 0))
    f.close()
    assert debugfs_cat(str(raw), "/hello.txt") == "hello from a VHD\n"


def test_a_filesystem_in_a_partition(dirs):
    img = dirs / "part.vhd"
    with vhd.create(img, 64 * MIB, type="fixed") as disk:
        mbr = bytearray(512)
        mbr[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (100000).to_bytes(4, "little")
        mbr[510:512] = b"\x55\xaa"
        disk.write(0, bytes(mbr))
        assert [(p.number, p.offset) for p in partitions(disk.read)] == [(1, MIB)]
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={MIB}", json.loads(r.stdout)["disk"], "40M")
    assert cli("umount", str(dirs / "m")).returncode == 0
    r = cli("mount", str(img), str(dirs / "m"), "--fs", str(dirs / "fs"), "--partition", "1")
    assert r.returncode == 0, r.stderr
    os.makedirs(dirs / "fs" / "etc")
    (dirs / "fs" / "etc" / "motd").write_text("partitioned\n")
    assert cli("umount", str(dirs / "m")).returncode == 0
    raw = dirs / "part.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(img), str(raw))
    part = dirs / "p1.raw"
    with open(raw, "rb") as src, open(part, "wb") as dst:
        src.seek(MIB)
        dst.write(src.read(40 * MIB))
    assert debugfs_cat(str(part), "/etc/motd") == "partitioned\n"


def test_mount_errors_are_clear(dirs):
    img = dirs / "d.vhd"
    vhd.create(img, 8 * MIB).close()
    (dirs / "full").mkdir()
    (dirs / "full" / "x").write_text("x")
    r = cli("mount", str(img), str(dirs / "full"))
    assert r.returncode == 2 and "not empty" in r.stderr
    r = cli("umount", str(dirs / "m"))
    assert r.returncode == 2 and "not a vhd mount" in r.stderr
    r = cli("mount", str(dirs / "nope.vhd"), str(dirs / "m"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = cli("mount", str(img), str(dirs / "m"), "--fs", str(dirs / "fs"), "--partition", "3")
    assert r.returncode == 2 and "no partition 3" in r.stderr
    assert not os.listdir(dirs / "m")  # the failed mount was undone


def test_a_busy_filesystem_stops_umount_there_and_the_stack_keeps_working(dirs):
    img = dirs / "busy.vhd"
    vhd.create(img, 64 * MIB).close()
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    run("mkfs.ext4", "-q", "-F", json.loads(r.stdout)["disk"])
    assert cli("umount", str(dirs / "m")).returncode == 0
    assert cli("mount", str(img), str(dirs / "m"), "--fs", str(dirs / "fs")).returncode == 0
    held = open(dirs / "fs" / "held.txt", "w")  # noqa: SIM115 - held open across the umount on purpose
    try:
        r = cli("umount", str(dirs / "m"))
        assert r.returncode == 1 and "busy" in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr
        assert os.path.exists(dirs / "m" / "disk")  # nbdfuse and the server still run under the filesystem
        held.write("written after the refused umount\n")
    finally:
        held.close()
    os.sync()
    assert cli("umount", str(dirs / "m")).returncode == 0
    raw = dirs / "busy.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(img), str(raw))
    assert debugfs_cat(str(raw), "/held.txt") == "written after the refused umount\n"


def test_the_server_imports_nothing_from_the_working_folder_and_a_space_in_the_name_works(dirs):
    """mount runs as root: a concurrent.py in the working folder must not run."""
    evil = dirs / "cwd"
    evil.mkdir()
    marker = dirs / "ran-as-root"
    (evil / "concurrent.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    img = dirs / "my disk.vhd"
    with vhd.create(img, 8 * MIB) as d:
        d.write(0, b"spaced")
    r = subprocess.run([sys.executable, "-P", "-m", "vhd", "mount", str(img), str(dirs / "m")],
                       capture_output=True, text=True, cwd=evil)
    assert r.returncode == 0, r.stderr
    with open(json.loads(r.stdout)["disk"], "rb") as f:
        assert f.read(6) == b"spaced"
    assert not marker.exists()
    assert cli("umount", str(dirs / "m")).returncode == 0


def test_umount_after_the_server_died_leaves_a_process_that_reused_its_pid_alone(dirs):
    """The state file names the server by pid: once the server is dead (kill -9)
    the pid may belong to another process, which umount (as root) must not
    signal: SIGTERM, then SIGKILL after 15 s."""
    import signal

    from vhd.mount import _state_path

    img = dirs / "gone.vhd"
    vhd.create(img, 8 * MIB).close()
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    state_file = os.path.join(_state_path(str(dirs / "m")), "state.json")
    with open(state_file) as f:
        state = json.load(f)
    os.kill(state["server_pid"], signal.SIGKILL)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state["server_pid"] = bystander.pid  # what a reused pid looks like to umount
        with open(state_file, "w") as f:
            json.dump(state, f)
        assert cli("umount", str(dirs / "m")).returncode == 0
        assert bystander.poll() is None, "umount signalled a process that is not its server"
    finally:
        bystander.kill()
        bystander.wait()


def test_umount_after_nbdfuse_died_removes_its_dead_mount(dirs):
    """A FUSE mount whose nbdfuse was killed cannot be stat'ed: umount took it
    for no mount, said it had unmounted, and left the folder unusable
    ("Transport endpoint is not connected") and no longer a vhd mount."""
    import signal

    from vhd.mount import mounted

    img = dirs / "fuse gone.vhd"
    vhd.create(img, 8 * MIB).close()
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    os.kill(json.loads(r.stdout)["fuse_pid"], signal.SIGKILL)
    assert mounted(str(dirs / "m"))
    r = cli("umount", str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    assert not mounted(str(dirs / "m"))
    r = cli("mount", str(img), str(dirs / "m"))  # the folder can be used again
    assert r.returncode == 0, r.stderr
    assert cli("umount", str(dirs / "m")).returncode == 0


def test_a_socket_left_by_a_mount_killed_at_this_mountpoint_does_not_fail_the_next(dirs):
    """A mount killed before it wrote its state (a crash, kill -9, a machine
    reset) leaves the server's socket file in the mountpoint's state folder.
    The next mount at the same path found the file, took the server as up,
    and nbdfuse's connect to the dead socket was refused: the mount failed
    until someone removed the file by hand."""
    import socket

    from vhd.mount import _state_path

    img = dirs / "disk.vhd"
    vhd.create(img, 64 * MIB).close()
    state_dir = _state_path(str(dirs / "m"))
    os.makedirs(state_dir, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(os.path.join(state_dir, "nbd.sock"))  # a socket file nobody listens on
    dead.close()
    r = cli("mount", str(img), str(dirs / "m"))
    assert r.returncode == 0, r.stderr
    assert cli("umount", str(dirs / "m")).returncode == 0
