"""Reads, writes, discards and allocation maps of each image type, fed the
same data every way: whole, sector by sector, unaligned, across blocks."""

from __future__ import annotations

import os

import pytest

import vhd
from vhd import Alloc, Extent
from vhd.errors import BusyError, FormatError, RangeError, ReadOnlyError, UsageError

MIB = 1 << 20
BS = 64 << 10  # small blocks, so tests cross many block boundaries


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture(params=["fixed", "dynamic", "differencing"])
def image(request, tmp_path):
    kind = request.param
    if kind == "differencing":
        base = vhd.create(tmp_path / "base.vhd", 4 * MIB, block_size=BS)
        base.write(0, b"\xee" * (4 * MIB))
        base.close()
        img = vhd.create(tmp_path / "disk.vhd", parent=tmp_path / "base.vhd", block_size=BS)
    else:
        img = vhd.create(tmp_path / "disk.vhd", 4 * MIB, type=kind, block_size=BS)
    yield img
    img.close()


def background(img) -> int:
    return 0xEE if img.parent is not None else 0


@pytest.mark.parametrize("way", ["whole", "sectors", "unaligned", "across"])
def test_the_same_bytes_every_way(image, tmp_path, way):
    data = pattern(3 * BS + 1000, 5)
    off = BS - 700
    if way == "whole":
        image.write(off, data)
    elif way == "sectors":
        start = off - off % 512
        buf = bytearray(image.read(start, len(data) + 1024))
        buf[off - start:off - start + len(data)] = data
        for i in range(0, len(buf), 512):
            image.write(start + i, bytes(buf[i:i + 512]))
    elif way == "unaligned":
        for i in range(0, len(data), 333):
            image.write(off + i, data[i:i + 333])
    else:
        for i in range(0, len(data), BS // 2):
            image.write(off + i, data[i:i + BS // 2])
    image.flush()
    assert image.read(off, len(data)) == data
    assert image.read(off - 100, 100) == bytes([background(image)]) * 100
    path = image.path
    image.close()
    with vhd.open(path) as again:
        assert again.read(off, len(data)) == data
        for i in range(0, len(data), 4000):  # reads of odd sizes at odd places
            assert again.read(off + i, 4000)[:len(data) - i] == data[i:i + 4000]
    assert vhd.check(path).ok


def test_zero_writes_do_not_allocate_dynamic_blocks(tmp_path):
    with vhd.create(tmp_path / "d.vhd", 4 * MIB, block_size=BS) as img:
        img.write(0, bytes(2 * BS))
        img.flush()
        assert img.allocated_blocks() == []
        img.write(BS, b"\x01" * 512)
        assert img.allocated_blocks() == [1]
        assert img.allocation(0, 4 * MIB) == [Extent(0, BS, Alloc.ZERO), Extent(BS, BS, Alloc.DATA),
                                              Extent(2 * BS, 4 * MIB - 2 * BS, Alloc.ZERO)]


def test_differencing_reads_fall_through_by_sector(tmp_path):
    base = vhd.create(tmp_path / "base.vhd", MIB, block_size=BS)
    base.write(0, b"B" * MIB)
    base.close()
    with vhd.create(tmp_path / "c.vhd", parent=tmp_path / "base.vhd", block_size=BS) as c:
        c.write(1024, b"C" * 512)
        assert c.read(0, 2048) == b"B" * 1024 + b"C" * 512 + b"B" * 512
        assert c.allocation(0, 4096) == [Extent(0, 4096, Alloc.DATA)]
        assert c.block_bitmap(0)[0] == 0b00100000


def test_discard_reads_zeros_everywhere(image):
    image.write(0, b"\x55" * (4 * MIB))
    image.discard(BS + 512, 2 * BS)
    image.discard(3 * MIB, MIB)
    image.flush()
    assert image.read(BS + 512, 2 * BS) == bytes(2 * BS)
    assert image.read(BS, 512) == b"\x55" * 512
    assert image.read(3 * MIB, MIB) == bytes(MIB)
    if image.disk_type.name == "DYNAMIC":
        assert 2 in [b for b in range(64) if b not in image.allocated_blocks()]


def test_out_of_range_requests_are_errors(image):
    with pytest.raises(RangeError):
        image.read(4 * MIB - 512, 1024)
    with pytest.raises(RangeError):
        image.write(-512, b"x" * 512)
    with pytest.raises(RangeError):
        image.discard(0, 4 * MIB + 1)


def test_read_only_images_refuse_writes(image):
    path = image.path
    image.close()
    with vhd.open(path) as ro:
        with pytest.raises(ReadOnlyError):
            ro.write(0, b"x" * 512)


def test_a_second_writer_is_refused_not_corrupting(image):
    with pytest.raises(BusyError, match="in use"):
        vhd.open(image.path, writable=True)


def test_bad_sizes_and_block_sizes_are_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        vhd.create(tmp_path / "a.vhd", 1000)
    with pytest.raises(UsageError):
        vhd.create(tmp_path / "b.vhd", MIB, block_size=3 * MIB)
    with pytest.raises(UsageError):
        vhd.create(tmp_path / "c.vhd", 4 << 40)  # dynamic limit
    assert not os.path.exists(tmp_path / "b.vhd")


def test_truncated_and_foreign_files_are_format_errors(tmp_path):
    (tmp_path / "short").write_bytes(b"x" * 100)
    with pytest.raises(FormatError, match="shorter"):
        vhd.open(tmp_path / "short")
    (tmp_path / "raw").write_bytes(bytes(4096))
    with pytest.raises(FormatError, match="cookie"):
        vhd.open(tmp_path / "raw")
    img = vhd.create(tmp_path / "d.vhd", 4 * MIB, block_size=BS)
    img.write(0, b"x" * BS)
    img.close()
    raw = (tmp_path / "d.vhd").read_bytes()
    (tmp_path / "cut.vhd").write_bytes(raw[:-BS])  # truncated through the last block
    with pytest.raises(FormatError, match="BAT"):
        vhd.open(tmp_path / "cut.vhd")
    (tmp_path / "bad.vhd").write_bytes(raw[:-512] + bytes(512))  # end footer gone, mirror good
    with vhd.open(tmp_path / "bad.vhd") as damaged:
        assert damaged.footer_damaged and damaged.read(0, 1) == b"x"
    with pytest.raises(FormatError, match="damaged"):
        vhd.open(tmp_path / "bad.vhd", writable=True)
    report = vhd.check(str(tmp_path / "bad.vhd"), repair=True)
    assert report.ok and report.repaired
    assert (tmp_path / "bad.vhd").read_bytes() == raw


def test_bat_entries_past_the_end_or_overlapping_are_refused(tmp_path):
    import struct

    img = vhd.create(tmp_path / "d.vhd", 4 * MIB, block_size=BS)
    img.write(0, b"x" * (2 * BS))
    img.close()
    raw = bytearray((tmp_path / "d.vhd").read_bytes())
    first, second = struct.unpack(">II", raw[1536:1544])
    past = bytearray(raw)
    struct.pack_into(">I", past, 1536 + 8, 0x00FFFFFF)
    (tmp_path / "past.vhd").write_bytes(past)
    with pytest.raises(FormatError, match="BAT") as e:
        vhd.open(tmp_path / "past.vhd")
    assert e.value.offset == 1536 + 8
    overlap = bytearray(raw)
    struct.pack_into(">I", overlap, 1540, first + 1)
    (tmp_path / "overlap.vhd").write_bytes(overlap)
    with pytest.raises(FormatError, match="overlaps"):
        vhd.open(tmp_path / "overlap.vhd")
    assert not vhd.check(str(tmp_path / "overlap.vhd")).ok


def test_two_bat_entries_naming_one_block_are_refused_naming_both(tmp_path):
    """A duplicate entry names the other block, not itself ("entry 2 ...
    overlaps block 2" sent the reader looking for a block that is fine)."""
    import struct

    img = vhd.create(tmp_path / "d.vhd", 4 * MIB, block_size=BS)
    img.write(0, b"x" * (3 * BS))
    img.close()
    raw = bytearray((tmp_path / "d.vhd").read_bytes())
    struct.pack_into(">I", raw, 1536 + 4 * 2, struct.unpack(">I", raw[1536:1540])[0])  # entry 2: block 0's place
    (tmp_path / "dup.vhd").write_bytes(raw)
    with pytest.raises(FormatError, match="overlaps") as e:
        vhd.open(tmp_path / "dup.vhd")
    assert "entry 2" in str(e.value) and "overlaps block 0" in str(e.value), str(e.value)


def _can_punch(folder) -> bool:
    """Whether the filesystem of `folder` punches holes (util-linux fallocate -p)."""
    import shutil
    import subprocess

    probe = folder / "probe"
    probe.write_bytes(b"x" * 65536)
    os.sync()
    before = os.stat(probe).st_blocks
    ok = shutil.which("fallocate") is not None and subprocess.run(
        ["fallocate", "-p", "-o", "0", "-l", "65536", str(probe)], capture_output=True).returncode == 0
    ok = ok and os.stat(probe).st_blocks < before
    probe.unlink()
    return ok


def test_a_discard_on_a_fixed_image_frees_its_space(tmp_path):
    """A fixed image's discard wrote real zeros: the file kept every block
    it had (and a discard of unwritten space allocated it). Now the range
    is punched out (fallocate PUNCH_HOLE | KEEP_SIZE); it reads as zeros,
    ragged edges included, and the footer and the data around it stay."""
    if not _can_punch(tmp_path):
        pytest.skip("this filesystem cannot punch holes")
    path = tmp_path / "f.vhd"
    with vhd.create(path, 64 * MIB, type="fixed") as img:
        img.write(0, b"\x55" * (64 * MIB))
    used = os.stat(path).st_blocks * 512
    with vhd.open(path, writable=True) as img:
        img.discard(4096 + 100, 32 * MIB)
        assert img.read(4096 + 100, 32 * MIB) == bytes(32 * MIB)
        assert img.read(0, 4196) == b"\x55" * 4196
        assert img.read(4196 + 32 * MIB, 1000) == b"\x55" * 1000
    assert used - os.stat(path).st_blocks * 512 >= 32 * MIB - 8192
    assert os.path.getsize(path) == 64 * MIB + 512 and vhd.check(str(path)).ok
    with vhd.open(path) as img:
        assert img.read(MIB, 4096) == bytes(4096)


def test_a_discard_where_holes_cannot_be_punched_writes_zeros(tmp_path, monkeypatch):
    from vhd import fileio

    monkeypatch.setattr(fileio, "punch_hole", lambda fd, offset, length: False)
    path = tmp_path / "f.vhd"
    with vhd.create(path, 4 * MIB, type="fixed") as img:
        img.write(0, b"\x55" * (4 * MIB))
        img.discard(100, 2 * MIB)
        assert img.read(0, 4 * MIB) == b"\x55" * 100 + bytes(2 * MIB) + b"\x55" * (2 * MIB - 100)
    with vhd.open(path) as img, pytest.raises(ReadOnlyError):
        img.discard(0, 4096)


def test_a_discard_on_a_dynamic_image_frees_its_space(tmp_path):
    """A dynamic image's discard left unallocated blocks' space to compact and
    wrote zeros into parts of blocks: disk use never dropped. Both are now
    punched out; the range reads as zeros (before and after reopening) and
    the image checks clean."""
    if not _can_punch(tmp_path):
        pytest.skip("this filesystem cannot punch holes")
    path = tmp_path / "d.vhd"
    with vhd.create(path, 8 * MIB, block_size=BS) as img:
        img.write(0, b"\x55" * (8 * MIB))
    used = os.stat(path).st_blocks * 512
    want = b"\x55" * 100 + bytes(4 * MIB) + b"\x55" * (4 * MIB - 100)
    with vhd.open(path, writable=True) as img:
        img.discard(100, 4 * MIB)
        assert img.read(0, 8 * MIB) == want
    # a block's data follows its 512-byte bitmap, so the filesystem frees 15 of each 16 of its 4 KiB blocks
    assert used - os.stat(path).st_blocks * 512 >= 4 * MIB * 15 // 16 - 8192
    assert vhd.check(str(path)).ok
    with vhd.open(path) as img:
        assert img.read(0, 8 * MIB) == want and len(img.allocated_blocks()) == 128 - 63
