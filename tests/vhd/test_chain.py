"""Parent resolution: each way of finding a parent, and each way it fails."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

import vhd
from vhd import dynamic_header as dh
from vhd.errors import ParentLoopError, ParentMismatchError, ParentNotFoundError, ParentOutsideError

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
