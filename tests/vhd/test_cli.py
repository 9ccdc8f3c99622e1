"""The vhd command with numbers and files a user gets wrong: a clear
one-line error and exit 1, no traceback, no buffer sized by the request,
no partial output file, and no damaged VHD silently read as a raw disk."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import vhd
from vhd import cli as vhd_cli

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


class _Pipe(io.RawIOBase):
    """stdin as a pipe: hands out `data` and notes the largest read asked for."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.largest = data, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        self.largest = max(self.largest, len(buf))
        n = min(len(buf), len(self.data) - self.pos, 65536)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        self.largest = max(self.largest, size if size >= 0 else 1 << 62)
        return super().read(size)


@pytest.mark.parametrize("extra", [0, 1])
def test_write_from_stdin_reads_in_bounded_pieces(tmp_path, monkeypatch, extra):
    """`vhd write` read all of stdin (up to the disk's size) into one buffer:
    `vhd write big.vhd < /dev/zero` asked for a buffer the size of the disk."""
    path = str(tmp_path / "d.vhd")
    vhd.create(path, 24 * MIB).close()
    data = os.urandom(9 * MIB + 512 + extra)
    pipe = _Pipe(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(pipe, buffer_size=65536)))
    offset = 24 * MIB - 9 * MIB - 512
    code = vhd_cli.main(["write", path, "--offset", str(offset)])
    assert pipe.largest <= vhd_cli.CHUNK + 1
    with vhd.open(path) as img:
        if extra:  # one byte too many: refused, and nothing written
            assert code == 1 and img.allocation(0, img.size)[0].state is vhd.Alloc.ZERO and len(img.allocation(0, img.size)) == 1
        else:
            assert code == 0 and img.read(offset, len(data)) == data


@pytest.mark.parametrize("args", [["create", "X", "--size", "1.5e400"], ["read", "D", "--offset", "1.0e400"],
                                  ["read", "D", "--length", "9.9e999K"], ["create", "X", "--size", "nan.0"]])
def test_sizes_too_big_for_a_float_are_usage_errors(disk, tmp_path, args):
    args = [disk if a == "D" else str(tmp_path / "x.vhd") if a == "X" else a for a in args]
    r = cli(*args)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and "cannot read size" in err, err


def test_an_offset_of_zero_with_a_unit_is_zero(disk):
    r = cli("read", disk, "--offset", "0K", "--length", "4K")
    assert r.returncode == 0 and r.stdout == b"v" * 4096, r.stderr


def _cli_file_limit(*args: str, limit: int) -> subprocess.CompletedProcess[bytes]:
    """The vhd command with files limited to `limit` bytes: a write past it
    fails (EFBIG), as on a full disk."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, timeout=120, preexec_fn=cap)


@pytest.mark.parametrize("args", [["create", "OUT", "--size", "8M", "--type", "fixed"],
                                  ["create", "OUT", "--size", "64G", "--block-size", "4K"],
                                  ["convert", "D", "OUT", "--to", "dynamic", "--block-size", "4K"],
                                  ["convert", "D", "OUT", "--to", "fixed"], ["convert", "D", "OUT", "--to", "raw"]])
def test_an_image_that_cannot_be_written_whole_is_removed(disk, tmp_path, args):
    """A create or convert whose new file could not be laid out (a full
    disk) left the half-made file behind, and the next try said it exists."""
    out = tmp_path / "out.vhd"
    with vhd.open(disk, writable=True) as img:
        img.write(0, b"z" * 2 * MIB)  # more data than the limit lets a copy hold
    args = [disk if a == "D" else str(out) if a == "OUT" else a for a in args]
    r = _cli_file_limit(*args, limit=1 << 20)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert not out.exists(), err


def test_write_refuses_a_file_without_a_vhd_footer_unless_told_it_is_raw(tmp_path):
    """`vhd write notes.txt ...` overwrote any file that is not a VHD as a raw
    disk, silently and with exit 0 (read and map at least say so)."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\n" * 100)
    r = cli("write", str(notes), "--pattern", "0x41", "--length", "512")
    err = r.stderr.decode()
    assert r.returncode == 1 and "no VHD footer" in err and "--source-format raw" in err, err
    assert notes.read_bytes() == b"my notes\n" * 100
    r = cli("write", str(notes), "--pattern", "0x41", "--length", "512", "--source-format", "raw")
    assert r.returncode == 0 and notes.read_bytes()[:512] == b"A" * 512, r.stderr


@pytest.mark.parametrize("cmd", [["read", "--length", "512"], ["map"]])
def test_a_fixed_vhd_is_not_called_a_raw_disk(tmp_path, cmd):
    """A FixedImage is a FileDevice too: read and map said of every fixed
    VHD 'no VHD footer: read as a raw disk'."""
    path = str(tmp_path / "f.vhd")
    vhd.create(path, MIB, type="fixed").close()
    r = cli(cmd[0], path, *cmd[1:])
    assert r.returncode == 0 and b"raw disk" not in r.stderr, r.stderr
