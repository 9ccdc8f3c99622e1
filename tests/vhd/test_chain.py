"""Parent resolution: each way of finding a parent, and each way it fails."""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import sys

import pytest

import vhd
from vhd import dynamic_header as dh
from vhd import footer as vhd_footer
from vhd import image as vhd_image
from vhd.errors import ParentLoopError, ParentMismatchError, ParentNotFoundError, ParentOutsideError, UsageError

from ..conftest import run

MIB = 1 << 20


def make_chain(d, depth: int) -> list[str]:
    paths = [str(d / "l0.vhd")]
    img = vhd.create(paths[0], 2 * MIB, block_size=64 << 10)
    img.write(0, b"0" * 2 * MIB)
    img.close()
    for i in range(1, depth + 1):
        paths.append(str(d / f"l{i}.vhd"))
        img = vhd.create(paths[-1], parent=paths[-2], block_size=64 << 10)
        img.write(i * 4096, bytes([0x30 + i]) * 4096)
        img.close()
    return paths


def test_a_deep_chain_reads_through_every_level(tmp_path):
    paths = make_chain(tmp_path, 6)
    with vhd.open(paths[-1]) as top:
        assert len(top.chain()) == 7
        for i in range(1, 7):
            assert top.read(i * 4096, 4096) == bytes([0x30 + i]) * 4096
        assert top.read(0, 4096) == b"0" * 4096


def test_locators_are_written_as_windows_paths(tmp_path):
    paths = make_chain(tmp_path, 1)
    with vhd.open(paths[1]) as child:
        h = child.header
        codes = [loc.platform for loc in h.locators if loc.platform]
        assert codes == [dh.W2RU, dh.W2KU]
        from vhd.chain import read_locator
        assert read_locator(child.file, h, 0) == ".\\l0.vhd"
        assert read_locator(child.file, h, 1) == os.path.abspath(paths[0])
        assert h.parent_name == "l0.vhd"


def test_moved_pair_opens_by_relative_locator(tmp_path):
    (tmp_path / "a").mkdir()
    make_chain(tmp_path / "a", 1)
    moved = tmp_path / "b"
    shutil.move(str(tmp_path / "a"), moved)
    with vhd.open(moved / "l1.vhd") as c:  # absolute locator is stale, relative one works
        assert c.read(4096, 1) == b"1"


def test_found_by_unicode_name_when_locators_fail(tmp_path):
    paths = make_chain(tmp_path, 1)
    raw = bytearray(open(paths[1], "rb").read())
    for i in range(2):  # wipe both locator codes, fix the checksum
        struct.pack_into(">I", raw, 512 + 576 + 24 * i, 0)
    struct.pack_into(">I", raw, 512 + 36, dh.checksum(raw[512:1536]))
    open(paths[1], "wb").write(raw)
    with vhd.open(paths[1]) as c:
        assert c.read(4096, 1) == b"1"


def test_caller_resolver_comes_first(tmp_path):
    paths = make_chain(tmp_path, 1)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    os.rename(paths[0], elsewhere / "renamed.vhd")
    with pytest.raises(ParentNotFoundError, match="l0.vhd"):
        vhd.open(paths[1])
    with vhd.open(paths[1], resolver=lambda child, header: str(elsewhere / "renamed.vhd")) as c:
        assert c.read(0, 1) == b"0"
    parent = vhd.open(elsewhere / "renamed.vhd")
    with vhd.open(paths[1], resolver=lambda child, header: parent) as c:
        assert c.read(0, 1) == b"0"


def test_wrong_parent_uuid_is_refused(tmp_path):
    paths = make_chain(tmp_path, 1)
    os.unlink(paths[0])
    vhd.create(paths[0], 2 * MIB).close()  # same name, new identity
    with pytest.raises(ParentMismatchError, match="UUID"):
        vhd.open(paths[1])


def test_parent_timestamp_is_checked_unless_ignored(tmp_path):
    paths = make_chain(tmp_path, 1)
    raw = bytearray(open(paths[0], "rb").read())
    for at in (0, len(raw) - 512):
        struct.pack_into(">I", raw, at + 24, 1)
        from vhd import footer as ft
        struct.pack_into(">I", raw, at + 64, ft.checksum(raw[at:at + 512]))
    open(paths[0], "wb").write(raw)
    with pytest.raises(ParentMismatchError, match="timestamp"):
        vhd.open(paths[1])
    with vhd.open(paths[1], ignore_timestamp=True) as c:
        assert c.read(0, 1) == b"0"


def test_parent_outside_the_allowed_folders_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "kids").mkdir()
    base = vhd.create(tmp_path / "base" / "b.vhd", MIB)
    base.close()
    vhd.create(tmp_path / "kids" / "k.vhd", parent=tmp_path / "base" / "b.vhd",
               allow_dirs=[str(tmp_path)]).close()
    with pytest.raises(ParentOutsideError, match="allow-dir"):
        vhd.open(tmp_path / "kids" / "k.vhd")
    with vhd.open(tmp_path / "kids" / "k.vhd", allow_dirs=[str(tmp_path)]) as k:
        assert k.size == MIB


def test_parent_loops_are_refused(tmp_path):
    paths = make_chain(tmp_path, 2)
    # make l0 claim to be a differencing child of l2: rewrite l0 as a copy of l1's
    # header pointing at l2 by name, with l2's UUID
    with vhd.open(paths[2]) as top:
        top_uuid, top_ts = top.footer.unique_id, top.footer.timestamp
    loop = vhd.create(tmp_path / "loop.vhd", parent=paths[2])
    loop.close()
    raw = bytearray(open(paths[0], "rb").read())
    with vhd.open(tmp_path / "loop.vhd") as lp:
        hdr_raw = lp.header.pack()
    # l0 becomes differencing with l2 as parent, l2 -> l1 -> l0 -> l2
    from vhd import footer as ft
    for at in (0, len(raw) - 512):
        struct.pack_into(">I", raw, at + 60, 4)
        struct.pack_into(">I", raw, at + 64, ft.checksum(raw[at:at + 512]))
    hdr = bytearray(raw[512:1536])
    hdr[40:56] = top_uuid.bytes
    struct.pack_into(">I", hdr, 56, top_ts)
    hdr[64:576] = hdr_raw[64:576]  # parent name "l2.vhd"
    hdr[576:768] = bytes(192)
    struct.pack_into(">I", hdr, 36, dh.checksum(hdr))
    raw[512:1536] = hdr
    open(paths[0], "wb").write(raw)
    with pytest.raises(ParentLoopError):
        vhd.open(paths[2])


def test_missing_parent_names_what_was_tried(tmp_path):
    paths = make_chain(tmp_path, 1)
    os.unlink(paths[0])
    with pytest.raises(ParentNotFoundError, match="W2ru locator"):
        vhd.open(paths[1])


def _vhd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("how", ["api", "cli", "qemu-io"])
def test_a_write_to_a_parent_after_its_child_is_detected(tmp_path, how):
    paths = make_chain(tmp_path, 1)
    with vhd.open(paths[1]) as child:
        before = child.read(0, 8192)
    if how == "api":
        with vhd.open(paths[0], writable=True) as p:
            p.write(0, b"X" * 512)
    elif how == "cli":
        assert _vhd_cli("write", paths[0], "--pattern", "0x58", "--length", "512").returncode == 0
    else:
        run("qemu-io", "-f", "vpc", "-c", "write -P 0x58 0 512", paths[0])
    with pytest.raises(ParentMismatchError, match="modified"):
        vhd.open(paths[1])
    report = vhd.check(paths[1])
    assert not report.ok and any("modified" in p.message for p in report.problems)
    r = _vhd_cli("info", paths[1])
    assert r.returncode == 1 and "--ignore-parent-timestamp" in r.stderr
    with vhd.open(paths[1], ignore_timestamp=True) as child:  # the user's override
        assert child.read(0, 8192) != before


def test_a_siblings_merge_is_detected_and_the_merged_child_still_opens(tmp_path):
    paths = make_chain(tmp_path, 1)
    sibling = str(tmp_path / "sibling.vhd")
    vhd.create(sibling, parent=paths[0], block_size=64 << 10).close()
    with vhd.open(paths[1]) as child:
        view = child.read(0, 2 * MIB)
    vhd.merge(paths[1])
    with vhd.open(paths[1]) as child:  # empty now, reading its data from the parent
        assert child.read(0, 2 * MIB) == view and child.allocated_blocks() == []
    with pytest.raises(ParentMismatchError):
        vhd.open(sibling)
    assert not vhd.check(sibling).ok and vhd.check(paths[1]).ok


def test_operations_that_keep_the_view_keep_children_working(tmp_path):
    paths = make_chain(tmp_path, 2)
    with vhd.open(paths[2]) as top:
        view = top.read(0, 2 * MIB)
    vhd.compact(paths[0])  # a rewrite of the bottom image: same data
    vhd.merge(paths[1])  # l1 into l0: l2 still reads l1 (now empty) over l0
    with vhd.open(paths[2]) as top:
        assert top.read(0, 2 * MIB) == view
    assert vhd.check(paths[2]).ok


def test_check_walks_each_member_of_a_chain_once(tmp_path, monkeypatch):
    checkmod = sys.modules["vhd.check"]  # the module (vhd.check is the function)
    paths = make_chain(tmp_path, 12)
    walked: list[str] = []
    real_walk = checkmod._walk
    monkeypatch.setattr(checkmod, "_walk", lambda w: (walked.append(w.file.name), real_walk(w))[1])
    assert vhd.check(paths[-1]).ok
    assert sorted(walked) == sorted(paths)  # once each: linear in the depth


def _deep_chain(d, depth: int) -> list[str]:
    paths = [str(d / "l0.vhd")]
    vhd.create(paths[0], MIB, block_size=64 << 10).close()
    for i in range(1, depth):
        paths.append(str(d / f"l{i}.vhd"))
        with vhd.create(paths[-1], parent=paths[-2], block_size=64 << 10) as img:
            img.write((i % 16) * 65536, bytes([i % 256]) * 512)
    return paths


def test_the_promised_256_levels_check_and_read_with_bounded_descriptors(tmp_path):
    import resource

    paths = _deep_chain(tmp_path, 256)

    def few_descriptors() -> None:  # the chain's 256 plus the interpreter's own
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    r = subprocess.run([sys.executable, "-m", "vhd", "check", paths[-1]], capture_output=True, text=True,
                       timeout=300, preexec_fn=few_descriptors)
    assert r.returncode == 0, r.stdout + r.stderr
    with vhd.open(paths[-1]) as top:
        assert len(top.chain()) == 256
        assert top.read(15 * 65536, 512) == bytes([255]) * 512
        assert top.read(0, 512) == bytes([240]) * 512
    with pytest.raises(vhd.UsageError, match="256"):
        vhd.create(tmp_path / "l256.vhd", parent=paths[-1])
    assert not os.path.exists(tmp_path / "l256.vhd")


def test_a_parent_write_between_two_children_made_in_one_second_is_seen_by_the_first(tmp_path, monkeypatch):
    """Making a second child used to set the parent's mtime back to before
    itself: a write to the parent after the first child, within the same
    second, then looked older than the first child and went unseen. The
    clock is frozen (sleeping advances it) so both children fall in one second."""
    clock = [vhd_footer.vhd_timestamp()]
    monkeypatch.setattr(vhd_footer, "vhd_timestamp", lambda unix=None: clock[0])
    monkeypatch.setattr(vhd_image.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + math.ceil(s)))
    base = str(tmp_path / "base.vhd")
    vhd.create(base, 2 * MIB).close()
    vhd.create(str(tmp_path / "c1.vhd"), parent=base).close()
    with vhd.open(base, writable=True) as p:
        p.write(0, b"X" * 512)
    at = (clock[0] + vhd_footer.EPOCH_2000) * 10 ** 9 + 5 * 10 ** 8  # the write, on the frozen clock
    os.utime(base, ns=(at, at))
    vhd.create(str(tmp_path / "c2.vhd"), parent=base).close()
    with pytest.raises(ParentMismatchError, match="modified"):
        vhd.open(str(tmp_path / "c1.vhd"))
    with vhd.open(str(tmp_path / "c2.vhd")) as c2:  # made after the write: it reads the new data
        assert c2.read(0, 512) == b"X" * 512


def test_a_parent_modified_in_the_future_is_refused_as_a_parent(tmp_path):
    base = str(tmp_path / "base.vhd")
    vhd.create(base, 2 * MIB).close()
    later = (vhd_footer.vhd_timestamp() + vhd_footer.EPOCH_2000 + 3600) * 10 ** 9
    os.utime(base, ns=(later, later))
    with pytest.raises(vhd.VhdError, match="in the future"):
        vhd.create(str(tmp_path / "c.vhd"), parent=base)
    assert not (tmp_path / "c.vhd").exists()


def test_a_child_refused_for_an_existing_name_lets_go_of_its_parent(tmp_path):
    """create(parent=) over an existing file raised, but left the parent open
    and share-locked for the life of the process (no finalizer closes it):
    the parent could no longer be opened for writing ("in use by another process")."""
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "c.vhd")
    vhd.create(base, 2 * MIB).close()
    vhd.create(child, parent=base).close()
    with pytest.raises(vhd.VhdError, match="already exists"):
        vhd.create(child, parent=base)
    vhd.open(base, writable=True).close()


def test_a_write_to_a_parent_a_resolver_opened_is_detected(tmp_path):
    """A resolver that returns an opened image (not a path) had only its UUID
    and footer timestamp checked, which writes do not change: a write to it
    after the child was made went unseen. Its file's mtime is checked too."""
    paths = make_chain(tmp_path, 1)

    def resolver(child, header):
        return vhd.open(paths[0])
    with vhd.open(paths[1], resolver=resolver) as child:
        before = child.read(0, 8192)
    with vhd.open(paths[0], writable=True) as p:
        p.write(0, b"X" * 512)
    with pytest.raises(ParentMismatchError, match="modified"):
        vhd.open(paths[1], resolver=resolver)
    with vhd.open(paths[1], resolver=resolver, ignore_timestamp=True) as child:
        assert child.read(0, 8192) != before


def test_a_block_device_is_refused_as_a_parent(tmp_path):
    """A write to a block device changes neither its node's mtime nor the VHD
    footer on it, so a child could not detect it: a child of a device is
    refused when it would be made (it could never be opened by its locators
    either), with the way out in the message."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    vhd.create(tmp_path / "base.vhd", 8 * MIB, type="fixed").close()
    r = subprocess.run(["losetup", "-f", "--show", str(tmp_path / "base.vhd")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    loop = r.stdout.strip()
    try:
        with pytest.raises(UsageError, match="block device.*regular file"):
            vhd.create(tmp_path / "child.vhd", parent=loop)
        assert not (tmp_path / "child.vhd").exists()
        cli = _vhd_cli("create", str(tmp_path / "child.vhd"), "--parent", loop)
        assert cli.returncode == 2 and "vhd convert" in cli.stderr and "Traceback" not in cli.stderr
        with vhd.open(loop) as dev:  # the device itself still opens, named by the user
            assert dev.size == 8 * MIB and vhd_image.file_mtime_ns(dev.file) is None
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
