"""convert, merge, compact, resize, check --repair / --azure, and the CLI
contract: JSON where scripts read, exit 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import vhd
from vhd import footer as ft

from ..conftest import run

MIB = 1 << 20


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, input=input)


def test_convert_raw_to_dynamic_keeps_zeros_sparse(tmp_path):
    raw = tmp_path / "a.raw"
    data = bytearray(16 * MIB)
    data[3 * MIB:3 * MIB + 5000] = b"\x42" * 5000
    raw.write_bytes(data)
    out = vhd.convert(str(raw), str(tmp_path / "a.vhd"), "dynamic", show_progress=False)
    with vhd.open(tmp_path / "a.vhd") as img:
        assert img.allocated_blocks() == [1]
        assert img.read(0, img.size) == bytes(data)
    assert out["file_size"] < 3 * MIB
    with pytest.raises(vhd.UsageError, match="exists"):
        vhd.convert(str(raw), str(tmp_path / "a.vhd"), "fixed")


def test_convert_flattens_a_chain_for_azure(tmp_path):
    base = vhd.create(tmp_path / "b.vhd", 20 * MIB)
    base.write(0, b"b" * MIB)
    base.close()
    with vhd.create(tmp_path / "c.vhd", parent=tmp_path / "b.vhd") as c:
        c.write(512, b"c" * 512)
    vhd.convert(str(tmp_path / "c.vhd"), str(tmp_path / "flat.vhd"), "fixed", show_progress=False)
    assert vhd.check(str(tmp_path / "flat.vhd"), azure=True).ok
    with vhd.open(tmp_path / "flat.vhd") as f:
        assert f.read(0, 1536) == b"b" * 512 + b"c" * 512 + b"b" * 512


def test_merge_moves_the_child_into_its_parent(tmp_path):
    base = vhd.create(tmp_path / "b.vhd", 4 * MIB)
    base.write(0, b"b" * 4 * MIB)
    base.close()
    with vhd.create(tmp_path / "c.vhd", parent=tmp_path / "b.vhd") as c:
        c.write(MIB + 512, b"c" * 4096)
    before = (tmp_path / "c.vhd").stat().st_size
    assert vhd.merge(str(tmp_path / "c.vhd"), show_progress=False)["merged_bytes"] == 4096
    with vhd.open(tmp_path / "b.vhd") as b:
        assert b.read(MIB, 8192) == b"b" * 512 + b"c" * 4096 + b"b" * 3584
    with vhd.open(tmp_path / "c.vhd") as c:
        assert c.allocated_blocks() == [] and c.read(MIB + 512, 1) == b"c"
    assert (tmp_path / "c.vhd").stat().st_size < before
    assert vhd.check(str(tmp_path / "c.vhd")).ok
    with pytest.raises(vhd.UsageError, match="not a differencing"):
        vhd.merge(str(tmp_path / "b.vhd"))


def test_compact_drops_zero_blocks_and_leaked_space(tmp_path):
    path = tmp_path / "d.vhd"
    with vhd.create(path, 8 * MIB) as img:
        img.write(0, b"x" * 8 * MIB)
        img.write(2 * MIB, bytes(2 * MIB))  # block 1 now all zeros
        img.discard(6 * MIB, 2 * MIB)  # block 3 unallocated, its space leaked
    report = vhd.check(str(path))
    assert report.ok and report.leaked_bytes > 0
    result = vhd.compact(str(path), show_progress=False)
    assert result["blocks_kept"] == 2 and result["size_after"] < result["size_before"]
    with vhd.open(path) as img:
        assert img.read(0, 8 * MIB) == b"x" * 2 * MIB + bytes(2 * MIB) + b"x" * 2 * MIB + bytes(2 * MIB)
    assert vhd.check(str(path)).leaked_bytes == 0


@pytest.mark.parametrize("kind,new", [("fixed", 33 * MIB), ("dynamic", 40 * MIB), ("dynamic", 600 * MIB)])
def test_resize_grows_and_qemu_agrees(tmp_path, kind, new):
    path = tmp_path / "r.vhd"
    with vhd.create(path, 20 * MIB, type=kind) as img:
        img.write(20 * MIB - 512, b"e" * 512)
    how = vhd.resize(str(path), new)["how"]
    assert how == ("rewritten with a larger BAT" if new == 600 * MIB else "in place")
    with vhd.open(path) as img:
        assert img.size == new
        assert img.read(20 * MIB - 512, 1024) == b"e" * 512 + bytes(512)
    info = json.loads(run("qemu-img", "info", "-f", "vpc", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == new
    assert vhd.check(str(path)).ok
    with pytest.raises(vhd.UsageError, match="shrinking"):
        vhd.resize(str(path), MIB)


def test_check_repairs_checksums_and_mirror_but_not_the_bat(tmp_path):
    path = tmp_path / "d.vhd"
    with vhd.create(path, 4 * MIB) as img:
        img.write(0, b"d" * 4096)
    good = path.read_bytes()
    raw = bytearray(good)
    raw[64:68] = b"\0\0\0\0"  # mirror checksum
    raw[512 + 36] ^= 0xFF  # header checksum
    path.write_bytes(raw)
    report = vhd.check(str(path))
    assert not report.ok and all(p.repair for p in report.problems if p.severity == "error")
    fixed = vhd.check(str(path), repair=True)
    assert fixed.ok and len(fixed.repaired) == 2
    assert path.read_bytes() == good
    raw = bytearray(good)
    struct.pack_into(">I", raw, 1536, 0x7FFFFFFF)  # BAT entry past the end: reported, not touched
    path.write_bytes(raw)
    report = vhd.check(str(path), repair=True)
    assert not report.ok and path.read_bytes() == raw


def test_azure_rules_name_the_fixing_command(tmp_path):
    vhd.create(tmp_path / "small.vhd", 10 * MIB + 512, type="fixed").close()
    problems = vhd.check(str(tmp_path / "small.vhd"), azure=True).problems
    fixes = [p.fix for p in problems]
    assert any("vhd resize --size 11M" in (f or "") for f in fixes)
    assert any("vhd resize --size 20M" in (f or "") for f in fixes)
    vhd.create(tmp_path / "dyn.vhd", 32 * MIB).close()
    p = vhd.check(str(tmp_path / "dyn.vhd"), azure=True).problems
    assert any("vhd convert --to fixed" in (x.fix or "") for x in p)
    vhd.create(tmp_path / "ok.vhd", 32 * MIB, type="fixed").close()
    assert vhd.check(str(tmp_path / "ok.vhd"), azure=True).ok


def test_cli_round_trip_and_exit_codes(tmp_path):
    d = str(tmp_path)
    r = cli("create", f"{d}/a.vhd", "--size", "8M")
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == "dynamic"
    assert cli("write", f"{d}/a.vhd", "--offset", "1M", "--pattern", "0xab", "--length", "4K").returncode == 0
    assert cli("write", f"{d}/a.vhd", "--offset", "3M", input=b"hello").returncode == 0
    r = cli("read", f"{d}/a.vhd", "--offset", "1M", "--length", "4K")
    assert r.stdout == b"\xab" * 4096
    assert cli("read", f"{d}/a.vhd", "--offset", "3M", "--length", "5").stdout == b"hello"
    r = cli("map", f"{d}/a.vhd")
    assert [(e["state"], e["length"]) for e in json.loads(r.stdout)] == [("data", 4 * MIB), ("zero", 4 * MIB)]
    r = cli("check", f"{d}/a.vhd", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    assert cli("check", f"{d}/a.vhd", "--azure").returncode == 1
    assert cli("convert", f"{d}/a.vhd", f"{d}/a.raw", "--to", "raw").returncode == 0
    assert os.path.getsize(f"{d}/a.raw") == 8 * MIB
    r = cli("info", f"{d}/a.vhd")
    assert json.loads(r.stdout)["virtual_size"] == 8 * MIB


@pytest.mark.parametrize("args,code,words", [
    (["create", "X/a.vhd", "--size", "banana"], 2, "cannot read size"),
    (["create", "X/a.vhd", "--size", "1000"], 2, "multiple of 512"),
    (["create", "X/a.vhd"], 2, "--size is required"),
    (["info", "X/missing.vhd"], 1, "no such file"),
    (["info", "X/junk"], 1, "cookie"),
    (["resize", "X/f.vhd", "--size", "1M"], 2, "shrinking"),
    (["write", "X/f.vhd", "--offset", "64M", "--pattern", "1", "--length", "1K"], 1, "outside the disk"),
    (["merge", "X/f.vhd"], 2, "not a differencing"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, code, words):
    (tmp_path / "junk").write_bytes(b"j" * 4096)
    vhd.create(tmp_path / "f.vhd", 4 * MIB, type="fixed").close()
    r = cli(*[a.replace("X", str(tmp_path)) for a in args])
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert words in err and "Traceback" not in err


def test_footer_timestamp_is_seconds_since_2000():
    assert ft.vhd_timestamp(ft.EPOCH_2000 + 5) == 5
    assert ft.vhd_timestamp(0) == 0


def test_a_failed_convert_stops_its_reader_and_leaves_no_file(tmp_path, monkeypatch):
    import threading

    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(16 * MIB))
    calls = {"n": 0}
    real_write = vhd.SparseImage.write

    def failing_write(self, offset, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_write(self, offset, data)

    monkeypatch.setattr(vhd.SparseImage, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        vhd.convert(str(raw), str(tmp_path / "a.vhd"), "dynamic", show_progress=False)
    assert not (tmp_path / "a.vhd").exists()
    assert not [t for t in threading.enumerate() if t.name == "copy-reader"]
    r = cli("convert", str(raw), str(tmp_path / "b.vhd"), "--to", "dynamic", "--no-sync")
    assert r.returncode == 0
    with vhd.open(tmp_path / "b.vhd") as img:
        assert img.read(0, img.size) == raw.read_bytes()


@pytest.mark.parametrize("op", ["compact", "resize"])
def test_a_rewrite_through_a_symlink_rewrites_the_file_it_names(tmp_path, op):
    """compact and a resize that rebuilds the file used to rename the new
    file over the symlink: the link became a separate copy and the image it
    pointed to was left as it was."""
    (tmp_path / "real").mkdir()
    real, link = str(tmp_path / "real" / "d.vhd"), str(tmp_path / "d.vhd")
    with vhd.create(real, 8 << 20, block_size=1 << 20) as img:
        img.write(0, b"d" * (1 << 20))
        img.write(1 << 20, bytes(1 << 20))  # an all-zero block: compact drops it
    os.symlink(real, link)
    if op == "compact":
        vhd.compact(link)
    else:
        vhd.resize(link, 64 << 30)  # a bigger BAT than fits: rebuilt
    assert os.path.islink(link) and os.path.realpath(link) == real
    assert sorted(os.listdir(tmp_path / "real")) == ["d.vhd"]
    with vhd.open(real) as img:
        assert img.read(0, 4096) == b"d" * 4096
        assert len(img.allocated_blocks()) == 1 and img.size == (8 << 20 if op == "compact" else 64 << 30)


def test_resize_refuses_a_fixed_image_past_the_largest_fixed_size(tmp_path):
    """create refused a fixed image over 64 TiB, resize did not check: it
    went on to the filesystem (File too large on ext4, a 65 TiB file elsewhere)."""
    path = str(tmp_path / "f.vhd")
    vhd.create(path, 1 << 20, type="fixed").close()
    before = open(path, "rb").read()
    r = cli("resize", path, "--size", "65T")
    err = r.stderr.decode()
    assert r.returncode == 2 and "larger than" in err and "Traceback" not in err, err
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("to", ["raw", "fixed", "dynamic"])
def test_a_convert_killed_midway_leaves_nothing_under_the_real_name(tmp_path, to):
    """convert used to build its output under the real name and remove it
    on failure: a kill -9 midway left a half-written image there, which a
    script would then take for a finished one."""
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(8 * MIB))
    out = tmp_path / "a.out"
    killer = (
        "import os, signal, sys\n"
        "from vhd import ops\n"
        "def fill(dst):\n"
        "    src = ops.open_device(sys.argv[1])\n"
        "    dst.write(0, src.read(0, 4 << 20))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ops.write_new_file(sys.argv[2], sys.argv[3], 8 << 20, fill)\n"
    )
    r = subprocess.run([sys.executable, "-c", killer, str(raw), str(out), to], capture_output=True)
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("a.out.partial-")]
    r = cli("convert", str(raw), str(out), "--to", to)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.out", "a.raw"]  # the killed one's is gone
    dev = vhd.ops.open_device(str(out), fmt="raw" if to == "raw" else "auto")
    try:
        assert dev.read(0, dev.size) == raw.read_bytes()
    finally:
        dev.close()
