"""Footer, dynamic header, BAT and bitmap: exact bytes, round trips, and a
closed error set for any input bytes."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhd import bat
from vhd import dynamic_header as dh
from vhd import footer as ft
from vhd.errors import ChecksumError, FormatError, VhdError
from vhd.fileio import MemFile
from vhd.geometry import chs_for_size
from vhd.image import create_dynamic, create_fixed, open_image


def make_footer(size: int = 64 << 20, disk_type: ft.DiskType = ft.DiskType.DYNAMIC) -> ft.Footer:
    data_offset = ft.FIXED_DATA_OFFSET if disk_type is ft.DiskType.FIXED else 512
    return ft.Footer(disk_type, size, size, chs_for_size(size), uuid.UUID(int=0x1234), 12345, data_offset)


def test_footer_layout_is_the_specifications():
    raw = make_footer().pack()
    assert len(raw) == 512
    assert raw[0:8] == b"conectix"
    assert struct.unpack(">I", raw[8:12])[0] == 2  # reserved feature bit
    assert struct.unpack(">I", raw[12:16])[0] == 0x00010000
    assert struct.unpack(">Q", raw[16:24])[0] == 512
    assert struct.unpack(">I", raw[24:28])[0] == 12345
    assert raw[28:32] == b"win " and raw[36:40] == b"Wi2k"
    assert struct.unpack(">QQ", raw[40:56]) == (64 << 20, 64 << 20)
    assert struct.unpack(">HBB", raw[56:60]) == tuple(chs_for_size(64 << 20))
    assert struct.unpack(">I", raw[60:64])[0] == 3
    assert raw[68:84] == uuid.UUID(int=0x1234).bytes
    assert raw[84:] == bytes(428)
    # one's complement of the byte sum without the checksum field
    assert struct.unpack(">I", raw[64:68])[0] == (~(sum(raw) - sum(raw[64:68]))) & 0xFFFFFFFF


@pytest.mark.parametrize("size,chs", [
    (64 << 20, (963, 8, 17)),           # small disks: 17 sectors per track
    (20 << 20, (602, 4, 17)),
    (1 << 30, (2080, 16, 63)),
    (127 << 30, (65278, 16, 255)),      # beyond 65535*16*63 sectors: 255 spt
    (1 << 40, (65535, 16, 255)),        # clamped
])
def test_chs_geometry_follows_the_appendix(size, chs):
    assert tuple(chs_for_size(size)) == chs


def test_footer_round_trip_and_checksum_errors():
    f = make_footer()
    raw = f.pack()
    assert ft.Footer.unpack(raw).pack() == raw
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(ChecksumError) as e:
        ft.Footer.unpack(bytes(bad), at=4096)
    assert e.value.field == "checksum" and e.value.offset == 4096 + 64
    wrong = b"conectiX" + raw[8:]
    with pytest.raises(FormatError, match="cookie"):
        ft.Footer.unpack(wrong)


def test_dynamic_header_round_trip_with_locators():
    locs = (dh.ParentLocator(dh.W2RU, 512, 20, 3072), dh.ParentLocator(dh.W2KU, 512, 40, 3584)) + \
        (dh.EMPTY_LOCATOR,) * 6
    h = dh.DynamicHeader(1536, 32, 2 << 20, uuid.UUID(int=7), 99, "base.vhd", locs)
    raw = h.pack()
    assert len(raw) == 1024 and raw[:8] == b"cxsparse"
    assert raw[64:64 + 16] == "base.vhd".encode("utf-16-be")
    assert raw[576:580] == b"W2ru"
    back = dh.DynamicHeader.unpack(raw, 512)
    assert back.pack() == raw and back.parent_name == "base.vhd" and back.locators == locs


@pytest.mark.parametrize("block_size", [0, 1000, 3 << 20, 1 << 29, 2048])
def test_block_size_must_be_a_sane_power_of_two(block_size):
    h = dh.DynamicHeader(1536, 1, 2 << 20)
    raw = bytearray(h.pack())
    struct.pack_into(">I", raw, 32, block_size)
    struct.pack_into(">I", raw, 36, dh.checksum(raw))
    with pytest.raises(FormatError, match="block size"):
        dh.DynamicHeader.unpack(bytes(raw), 512)


def test_bitmap_runs_and_bits():
    bm = bytearray(512)
    assert bat.set_bits(bm, 3, 10)
    assert not bat.set_bits(bm, 5, 2)
    assert bm[0] == 0b00011111 and bm[1] == 0b11111000
    assert list(bat.runs(bm, 0, 20)) == [(False, 0, 3), (True, 3, 10), (False, 13, 7)]
    assert bat.set_bits(bm, 0, 4096) and bat.all_set(bm, 4096)
    assert bat.clear_bits(bm, 0, 4096) and bat.none_set(bm, 4096)
    assert bat.bitmap_bytes(2 << 20) == 512 and bat.bitmap_bytes(4 << 20) == 1024


@given(st.binary(min_size=512, max_size=512))
def test_footer_parser_never_escapes_its_error_set(raw):
    try:
        ft.Footer.unpack(raw)
    except VhdError:
        pass


@given(st.binary(min_size=1024, max_size=1024))
def test_header_parser_never_escapes_its_error_set(raw):
    try:
        dh.DynamicHeader.unpack(raw, 512, verify_checksum=False)
    except VhdError:
        pass


def _small_dynamic() -> bytes:
    f = MemFile()
    img = create_dynamic(f, 1 << 20, block_size=64 << 10)
    img.write(0, b"\x11" * 4096)
    img.write(300 << 10, b"\x22" * 512)
    img.flush()
    return bytes(f.buf)


def _small_fixed() -> bytes:
    f = MemFile()
    img = create_fixed(f, 64 << 10)
    img.write(0, b"\x33" * 512)
    return bytes(f.buf)


IMAGES = {"dynamic": _small_dynamic(), "fixed": _small_fixed()}


@given(st.sampled_from(sorted(IMAGES)),
       st.lists(st.tuples(st.integers(0, 1 << 21), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans(), st.integers(0, 4096))
def test_mutated_images_open_or_fail_cleanly(kind, flips, fix_checksums, cut):
    """Random byte changes anywhere (optionally with valid checksums, so the
    parsers past the checksum are reached) and truncation: every outcome is
    an image that reads, or a VhdError."""
    raw = bytearray(IMAGES[kind])
    for pos, value in flips:
        raw[pos % len(raw)] = value
    if fix_checksums:
        for at in (0, len(raw) - 512):
            struct.pack_into(">I", raw, at + 64, ft.checksum(raw[at:at + 512]))
        struct.pack_into(">I", raw, 512 + 36, dh.checksum(raw[512:1536]))
    if cut:
        del raw[-cut:]
    try:
        img = open_image(MemFile(bytes(raw)))
    except VhdError:
        return
    try:
        for off in range(0, img.size, 64 << 10):
            img.read(off, min(64 << 10, img.size - off))
        img.allocation(0, img.size)
    except VhdError:
        pass


def test_huge_sizes_do_not_allocate_memory():
    """A header that claims 2**40 BAT entries must be refused before reading them."""
    raw = bytearray(IMAGES["dynamic"])
    struct.pack_into(">I", raw, 512 + 28, 0xFFFFFFFF)
    struct.pack_into(">I", raw, 512 + 36, dh.checksum(raw[512:1536]))
    with pytest.raises(FormatError, match="table offset"):
        open_image(MemFile(bytes(raw)))
    for at in (0, len(raw) - 512):
        struct.pack_into(">Q", raw, at + 48, (1 << 63) - 512)
        struct.pack_into(">I", raw, at + 64, ft.checksum(raw[at:at + 512]))
    with pytest.raises(FormatError, match="max table entries"):
        open_image(MemFile(bytes(raw)))


def test_a_paged_table_keeps_only_pages_with_allocated_entries():
    t = bat.Table(534_773_760)  # 2040 GiB of 4 KiB blocks
    assert t[534_773_759] == bat.UNALLOCATED and t.pages == {}
    t[5], t[300], t[1000] = 7, 9, 11
    assert sorted(t.pages) == [0, 2, 7] and list(t.items()) == [(5, 7), (300, 9), (1000, 11)]
    assert t.allocated() == 3 and t.next_allocated(6, 2000) == 300 and t.next_allocated(1001, 5000) == 5000
    t[300] = bat.UNALLOCATED
    assert sorted(t.pages) == [0, 7]  # a page back to all unallocated goes
    assert t.pack_entries(4, 2) == b"\xff\xff\xff\xff\x00\x00\x00\x07"
    assert t.pack_entries(256, 3) == b"\xff" * 12
    with pytest.raises(IndexError):
        t[534_773_760] = 1
    small = bat.Table(130)
    small[129] = 3
    assert list(small)[127:] == [bat.UNALLOCATED, bat.UNALLOCATED, 3] and len(list(small)) == 130


def test_a_table_is_read_a_chunk_at_a_time_and_refused_past_what_the_file_holds():
    raw = bytearray(b"\xff" * 4 * 600_000)
    for b, e in ((0, 3), (299_999, 9), (599_999, 12)):
        struct.pack_into(">I", raw, 4 * b, e)
    reads = []

    def pread(n, at):
        reads.append(n)
        return bytes(raw[at - 512:at - 512 + n])
    t = bat.Table.load(pread, 512, 600_000, max_allocated=3)
    assert list(t.items()) == [(0, 3), (299_999, 9), (599_999, 12)] and max(reads) <= bat.READ_CHUNK
    with pytest.raises(bat.TooManyAllocated) as e:
        bat.Table.load(pread, 512, 600_000, max_allocated=2)
    assert e.value.args == (3, 600_000)
    assert bat.first_above(bytes(raw[:8]), 5) is None and bat.first_above(bytes(raw), 10) == 599_999
