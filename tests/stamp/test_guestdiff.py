"""Disks.iter_diff, the lazy guest diff that Get Page Ranges with
x-ms-previous-snapshot-url streams, against Disks.diff (the whole diff,
built at once) as its model: the same entries, in order, for fixed disks
and disks from an image (a differencing VHD: blocks in allocation order),
whole and cut to windows, snapshot to snapshot and snapshot to live."""

from __future__ import annotations

import random

import pytest

import vhd
from stamp import Stamp
from stamp.disks import Disks

MIB = 1 << 20


def _model(d: dict, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    whole = sorted([(r["offset"], r["length"], False) for r in d["written"]]
                   + [(r["offset"], r["length"], True) for r in d["cleared"]])
    lo, hi = lo - lo % 512, -(-hi // 512) * 512
    return [(max(o, lo), min(o + n, hi) - max(o, lo), c) for o, n, c in whole if max(o, lo) < min(o + n, hi)]


@pytest.mark.parametrize("from_image", [False, True])
def test_iter_diff_is_diff_in_order_and_cut_to_windows(tmp_path, from_image):
    st = Stamp.create(str(tmp_path / "st"))
    disks = Disks(st)
    rnd = random.Random(7)
    if from_image:
        base = tmp_path / "base.vhd"
        with vhd.create(base, 64 * MIB, type="fixed") as img:
            img.write(0, b"base" * 4096)
            img.write(10 * MIB, b"B" * MIB)
        disks.create_image("img", path=str(base))
        disks.create_from_image("d", "img")
    else:
        disks.create_empty("d", 1)
    size = 64 * MIB

    def scribble(rounds: int) -> None:
        with disks.open_virtual("d", writable=True) as v:
            for _ in range(rounds):
                off = rnd.randrange(0, size // 512 - 64) * 512
                v.write(off, bytes([rnd.randrange(1, 256)]) * (512 * rnd.choice((1, 2, 7, 64))))
            v.write(2 * MIB - 1024, b"x" * 2048)  # across a 2 MiB block boundary
            v.write(20 * MIB, b"z" * 512)
            v.write(20 * MIB + 1024, b"z" * 512)  # alternate sectors in one block: its bitmap changes
        if not from_image:  # Clear Pages straight on a fixed disk's blob (guest offsets are blob offsets)
            for _ in range(5):
                st.blobs.clear(disks.record("d")["blob"], rnd.randrange(0, size // 512 - 8) * 512, 512 * 8)

    scribble(30)
    disks.create_snapshot("s1", "d")
    scribble(40)
    disks.create_snapshot("s2", "d")
    scribble(20)
    counts: list[int] = []
    windows = [(0, None), (512 * 3001 + 7, 5 * MIB), (2 * MIB - 512, 1024), (19 * MIB, 2 * MIB)]
    for target in ("s2", None):
        whole = disks.diff("s1", target)
        assert whole["written"] and (from_image or whole["cleared"])
        for off, n in windows:
            got = list(disks.iter_diff("s1", target, off, n))
            assert got == _model(whole, off, 1 << 40 if n is None else off + n), (target, off, n)
            counts.append(len(got))
    assert min(counts[0::4]) > 30 and min(counts[1:]) > 0, counts
    st.close()
