"""The vhd command with numbers and files a user gets wrong: a clear
one-line error and exit 1, no traceback, no buffer sized by the request,
no partial output file, and no damaged VHD silently read as a raw disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import vhd

MIB = 1 << 20


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, input=input, timeout=120)


@pytest.fixture
def disk(tmp_path) -> str:
    path = str(tmp_path / "d.vhd")
    with vhd.create(path, 8 * MIB) as img:
        img.write(0, b"v" * 4096)
    return path


@pytest.mark.parametrize("length", ["9223372036854775808", "20G", "8M", "18446744073709551616"])
def test_a_write_longer_than_the_disk_is_refused_before_any_buffer(disk, length):
    before = open(disk, "rb").read()
    r = cli("write", disk, "--offset", "512", "--pattern", "0xab", "--length", length)
    err = r.stderr.decode()
    assert r.returncode == 1 and "outside the disk" in err and "Traceback" not in err, err
    assert open(disk, "rb").read() == before


def test_stdin_longer_than_the_disk_is_refused(disk):
    r = cli("write", disk, "--offset", "8M", input=b"x")
    assert r.returncode == 1 and b"outside the disk" in r.stderr


def test_a_read_past_the_end_leaves_no_output_file(disk, tmp_path):
    out = tmp_path / "p.raw"
    r = cli("read", disk, "--length", "9M", "-o", str(out))
    assert r.returncode == 1 and b"outside the disk" in r.stderr
    assert not out.exists()
    assert cli("read", disk, "--length", "8M", "-o", str(out)).returncode == 0
    assert out.read_bytes()[:4096] == b"v" * 4096 and out.stat().st_size == 8 * MIB


def _damage_cookies(path: str) -> None:
    raw = bytearray(open(path, "rb").read())
    raw[0:2] = b"XX"  # the mirror's cookie
    raw[-512:-510] = b"XX"  # the footer's cookie
    open(path, "wb").write(raw)


@pytest.mark.parametrize("cmd", [["read", "--length", "4K"], ["map"], ["convert", "OUT", "--to", "raw"]])
def test_a_vhd_with_damaged_cookies_is_not_read_as_raw(disk, tmp_path, cmd):
    _damage_cookies(disk)
    args = [a.replace("OUT", str(tmp_path / "out.raw")) for a in cmd]
    r = cli(args[0], disk, *args[1:])
    err = r.stderr.decode()
    assert r.returncode == 1 and "looks like a damaged VHD" in err and "vhd check" in err, err
    assert not (tmp_path / "out.raw").exists()
    r = cli(args[0], disk, *args[1:], "--source-format", "raw")  # the user's explicit choice
    assert r.returncode == 0, r.stderr


def test_a_raw_disk_is_read_with_a_note_saying_so(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MIB))
    r = cli("map", str(raw))
    assert r.returncode == 0 and b"read as a raw disk" in r.stderr
    r = cli("read", str(raw), "--length", "512")
    assert r.returncode == 0 and r.stdout == raw.read_bytes()[:512] and b"raw disk" in r.stderr


@pytest.mark.parametrize("target", ["image", "parent", "link"])
def test_read_refuses_to_write_its_output_over_an_image_it_reads(tmp_path, target):
    """`vhd read x.vhd -o x.vhd` (or -o its parent, or a link to either)
    truncated the image it was reading and exited 0."""
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    with vhd.create(base, 4 * MIB) as img:
        img.write(0, b"b" * 4096)
    vhd.create(child, parent=base).close()
    out = {"image": child, "parent": base, "link": str(tmp_path / "link.vhd")}[target]
    if target == "link":
        os.symlink(base, out)
    before = {p: open(p, "rb").read() for p in (base, child)}
    r = cli("read", child, "-o", out)
    err = r.stderr.decode()
    assert r.returncode == 2 and "is the image being read" in err and "Traceback" not in err, err
    assert {p: open(p, "rb").read() for p in (base, child)} == before
    assert vhd.open(child).read(0, 4096) == b"b" * 4096
