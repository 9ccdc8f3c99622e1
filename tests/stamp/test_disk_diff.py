"""Disk snapshot diffs list guest (disk) offsets for every disk type: fixed,
from an image (a differencing VHD), and copies; the blob diff stays."""

from __future__ import annotations

import json
import random

import pytest

import vhd
from stamp import Stamp
from stamp.cli import main
from stamp.disks import Disks
from stamp.ranges import merge_ranges

MIB = 1 << 20


@pytest.fixture
def disks(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    d = Disks(st)
    with vhd.create(tmp_path / "base.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, b"BOOT" * 128)
        img.write(10 * MIB, b"base" * 1024)
    d.create_image("img", path=str(tmp_path / "base.vhd"))
    yield d
    st.close()


def make(disks: Disks, kind: str) -> None:
    if kind == "empty":
        disks.create_empty("d", 1)
    elif kind == "from image":
        disks.create_from_image("d", "img")
    else:  # a copy of a disk made from the image
        disks.create_from_image("src", "img")
        disks.create_copy("d", source_disk="src")


def as_pairs(ranges: list[dict]) -> list[tuple[int, int]]:
    return [(r["offset"], r["offset"] + r["length"]) for r in ranges]


@pytest.mark.parametrize("kind", ["empty", "from image", "copy"])
def test_a_disk_diff_lists_exactly_the_guest_bytes_written(disks, kind):
    make(disks, kind)
    rng = random.Random(kind)
    disks.create_snapshot("s0", "d")
    size = disks.record("d")["size_bytes"]
    span = min(size, 32 * MIB)
    written = []
    for i in (1, 2):
        with disks.open_virtual("d", writable=True) as v:
            for _ in range(12):
                off = rng.randrange(span // 512 - 16) * 512
                n = rng.randrange(1, 16) * 512
                v.write(off, bytes([i]) * n)
                written.append((off, off + n))
        disks.create_snapshot(f"s{i}", "d")
    diff = disks.diff("s0", "s2")
    assert as_pairs(diff["written"]) == merge_ranges(written) and diff["cleared"] == []
    assert diff["unit"] == "disk bytes"
    with disks.open_virtual("d", snapshot="s0") as a, disks.open_virtual("d", snapshot="s2") as b:
        outside = [(0, span)]
        for s, e in merge_ranges(written):
            assert a.read(s, e - s) != b.read(s, e - s)
        from stamp.ranges import subtract
        for s, e in subtract(outside, merge_ranges(written)):
            assert a.read(s, e - s) == b.read(s, e - s)


def test_a_fixed_disk_diff_lists_cleared_pages_as_cleared(disks):
    disks.create_empty("d", 1)
    with disks.open_virtual("d", writable=True) as v:
        v.write(0, b"x" * (4 * MIB))
    disks.create_snapshot("s1", "d")
    disks.blobs.clear(disks.record("d")["blob"], MIB, MIB)  # a Clear Pages on the disk's blob
    diff = disks.diff("s1")
    assert diff["written"] == [] and diff["cleared"] == [{"offset": MIB, "length": MIB}]


def test_the_cli_diff_speaks_disk_offsets_and_blob_offsets_on_request(disks, capsys):
    disks.create_from_image("d", "img")
    disks.create_snapshot("s1", "d")
    with disks.open_virtual("d", writable=True) as v:
        v.write(5 * MIB + 4096, b"x" * 4096)
    path = disks.stamp.path
    assert main(["--stamp", path, "snapshot", "diff", "s1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == [{"offset": 5 * MIB + 4096, "length": 4096}] and out["cleared"] == []
    assert main(["--stamp", path, "snapshot", "diff", "s1", "--blob"]) == 0
    blob = json.loads(capsys.readouterr().out)
    assert blob["unit"] == "blob bytes" and blob["written"] != out["written"]  # offsets in the VHD file
