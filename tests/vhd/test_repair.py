"""check --repair never makes an image worse: it rewrites a damaged copy
only from one that verifies, never bakes a flipped bit in by recomputing a
checksum, never changes what children depend on, and never reports success
it did not achieve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import vhd

MIB = 1 << 20


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, text=True, timeout=120)


def flip(path, offset: int, bit: int) -> None:
    """One bit rots: the bytes change, the file's modification time does not."""
    st = os.stat(path)
    raw = bytearray(open(path, "rb").read())
    raw[offset if offset >= 0 else len(raw) + offset] ^= 1 << bit
    open(path, "wb").write(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def dynamic(tmp_path, name: str = "d.vhd") -> tuple[str, bytes, bytes]:
    path = str(tmp_path / name)
    with vhd.create(path, 4 * MIB, block_size=64 << 10) as img:
        img.write(0, b"d" * 8192)
        img.write(3 * MIB, b"e" * 512)
        view = img.read(0, img.size)
    return path, open(path, "rb").read(), view


# (byte in the footer, bit): data offset, current size, unique id, timestamp
END_FOOTER_FLIPS = [(22, 0), (22, 5), (23, 7), (47, 3), (53, 0), (51, 6), (70, 2), (27, 0)]


@pytest.mark.parametrize("byte,bit", END_FOOTER_FLIPS)
def test_a_damaged_end_footer_is_rewritten_from_the_good_mirror(tmp_path, byte, bit):
    path, good, view = dynamic(tmp_path)
    flip(path, -512 + byte, bit)
    with vhd.open(path) as img:  # through the mirror
        assert img.read(0, img.size) == view
    r = cli("check", "--repair", path)
    assert r.returncode == 0 and "rewrote the end footer from the mirror" in r.stdout, r.stdout + r.stderr
    assert open(path, "rb").read() == good
    with vhd.open(path) as img:
        assert img.read(0, img.size) == view


@pytest.mark.parametrize("byte,bit", [(70, 2), (75, 7), (27, 0), (24, 3)])  # unique id, timestamp
def test_repairing_a_parent_never_changes_what_its_children_depend_on(tmp_path, byte, bit):
    parent, good, _ = dynamic(tmp_path, "p.vhd")
    child = str(tmp_path / "c.vhd")
    with vhd.create(child, parent=parent, block_size=64 << 10) as c:
        c.write(MIB, b"c" * 4096)
        view = c.read(0, c.size)
    good = open(parent, "rb").read()
    flip(parent, -512 + byte, bit)
    assert cli("check", "--repair", parent).returncode == 0
    assert open(parent, "rb").read() == good
    with vhd.open(child) as c:
        assert c.read(0, c.size) == view
    assert vhd.check(child).ok


def _fixed(tmp_path) -> str:
    path = str(tmp_path / "f.vhd")
    vhd.create(path, MIB, type="fixed").close()
    return path


def _header_table_offset(tmp_path) -> str:
    path, _, _ = dynamic(tmp_path)
    flip(path, 512 + 16 + 6, 2)  # table offset 1536 -> 512: the BAT would sit on the header
    return path


def _child_parent_uuid(tmp_path) -> str:
    parent, _, _ = dynamic(tmp_path, "p.vhd")
    child = str(tmp_path / "c.vhd")
    vhd.create(child, parent=parent, block_size=64 << 10).close()
    flip(child, 512 + 40 + 3, 1)  # the parent's unique id as the child recorded it
    return child


@pytest.mark.parametrize("make,offset", [
    (_fixed, -512 + 70),  # fixed: one footer, no mirror; unique id flipped
    (_fixed, -512 + 26),  # fixed: timestamp flipped
    (_header_table_offset, None),
    (_child_parent_uuid, None),
])
def test_damage_without_a_good_copy_is_not_called_repairable(tmp_path, make, offset):
    path = make(tmp_path)
    if offset is not None:
        flip(path, offset, 4)
    before = open(path, "rb").read()
    report = vhd.check(path)
    assert not report.ok and not any(p.repair for p in report.problems)
    assert "repairable: vhd check --repair" not in cli("check", path).stdout
    r = cli("check", "--repair", path)
    assert r.returncode == 1 and "repaired:" not in r.stdout, r.stdout
    assert open(path, "rb").read() == before  # nothing written


def test_a_mirror_is_rebuilt_from_the_end_footer_and_the_report_is_true(tmp_path):
    path, good, _ = dynamic(tmp_path)
    flip(path, 70, 0)  # the mirror's unique id
    report = vhd.check(path)
    assert [p.repair for p in report.problems if p.severity == "error"] == ["copy the footer to offset 0"]
    fixed = vhd.check(path, repair=True)
    assert fixed.ok and fixed.repaired == ["copied the end footer to offset 0"]
    assert open(path, "rb").read() == good


def test_repair_of_a_sound_image_in_use_by_a_reader_reports_it_sound(tmp_path):
    """check --repair opened the image for writing before knowing whether
    anything needed repair: a sound image that another process was reading
    (or one on a read-only filesystem) was an error, 'in use by another process'."""
    path, _, _ = dynamic(tmp_path)
    with vhd.open(path):  # a reader holds it
        r = cli("check", "--repair", path)
        assert r.returncode == 0 and "ok" in r.stdout and "repaired" not in r.stdout, r.stdout + r.stderr
        flip(path, os.path.getsize(path) - 512 + 20, 0)  # now it needs a repair: that must wait for the reader
        r = cli("check", "--repair", path)
        assert r.returncode == 1 and "in use" in r.stderr, r.stdout + r.stderr
    r = cli("check", "--repair", path)
    assert r.returncode == 0 and "repaired" in r.stdout, r.stdout + r.stderr
