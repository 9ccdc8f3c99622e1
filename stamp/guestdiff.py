"""A managed disk's diff between two of its incremental snapshots in guest
(disk) offsets, taken lazily: what Get Page Ranges with
x-ms-previous-snapshot-url answers, streamed.

Rules: the answer is Disks.diff's ("written": the changed guest bytes the
target reads as data; "cleared": the rest of the changed bytes), as
(offset, length, cleared) entries in offset order, written and cleared
interleaved, touching entries of one kind joined, cut to [offset,
offset+length) page-aligned outward. It never holds the diff:
- a fixed VHD's guest bytes are its blob's first `size` bytes, so the blob's
  own lazy diff (PageBlobs.iter_diff: changed runs split by the target's
  data) is the answer, cut at the footer;
- a dynamic or differencing VHD's blocks lie in the blob in allocation
  order, not guest order: a first pass over the blob's diff notes which
  blocks changed (memory: one entry per changed block, as the image's own
  BAT), then each changed block, in guest order, is diffed alone (its bitmap
  and data in the blob) and mapped through the layout, so what is held is
  one block's ranges.
The blob's diff is read in short read transactions (PageBlobs.iter_diff
with `chunk`), none held while the answer waits for its client.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from vhd import bat as batlib
from vhd.image import SparseImage

from . import ranges as rg
from .pageblob import PageBlobs

Entry = tuple[int, int, bool]  # offset, length, cleared
CHUNK = 4096  # blob diff entries per read transaction


def iter_guest_diff(blobs: PageBlobs, blob: str, base: str, target: str | None, image: Any, was: Any,
                    offset: int = 0, length: int | None = None) -> Iterator[Entry]:
    """The guest diff of `blob` from snapshot `base` to `target` (None: live),
    `image` and `was` its VHD at the target and at the base."""
    end = image.size if length is None else min(image.size, offset + length)
    lo, hi = offset - offset % 512, -(-end // 512) * 512
    if lo >= hi:
        return
    if not isinstance(image, SparseImage):  # the guest's bytes are the blob's first `size`
        yield from blobs.iter_diff(blob, base, target, lo, hi - lo, chunk=CHUNK)
        return
    yield from _joined(_sparse(blobs, blob, base, target, image, was, lo, hi))


def _sparse(blobs: PageBlobs, blob: str, base: str, target: str | None, image: SparseImage, was: Any,
            lo: int, hi: int) -> Iterator[Entry]:
    bs, span = image.block_size, image.bitmap_size + image.block_size
    for b, start in _changed_blocks(blobs, blob, base, target, image):
        if (b + 1) * bs <= lo or b * bs >= hi:
            continue
        found = _blob_diff(blobs, blob, base, target, start, start + span)
        guest = [r for o, n in found for r in in_block(image, was, b, start, o, o + n)]
        changed = [(max(s, lo), min(e, hi)) for s, e in rg.merge_ranges([(o, o + n) for o, n in guest])
                   if max(s, lo) < min(e, hi)]
        yield from _split(image, changed)


def _blob_diff(blobs: PageBlobs, blob: str, base: str, target: str | None, lo: int, hi: int
               ) -> list[tuple[int, int]]:
    """The blob's changed (offset, length) ranges in [lo, hi): one block's."""
    return [(o, n) for o, n, _ in blobs.iter_diff(blob, base, target, lo, hi - lo, chunk=CHUNK)]


def _changed_blocks(blobs: PageBlobs, blob: str, base: str, target: str | None, image: SparseImage
                    ) -> list[tuple[int, int]]:
    """(block, its offset in the blob) of every block the blob's diff touches, by block."""
    placed = sorted((entry * 512, b) for b, entry in image.bat.items())
    starts = [start for start, _ in placed]
    span = image.bitmap_size + image.block_size
    touched: set[int] = set()
    for o, n, _ in blobs.iter_diff(blob, base, target, chunk=CHUNK):
        i = max(0, bisect.bisect_right(starts, o) - 1)
        while i < len(placed) and placed[i][0] < o + n:
            if placed[i][0] + span > o:
                touched.add(i)
            i += 1
    return sorted((placed[i][1], placed[i][0]) for i in touched)


def _split(image: Any, changed: list[tuple[int, int]]) -> Iterator[Entry]:
    """Changed guest ranges, each split into what the image reads as data
    (written) and the rest (cleared)."""
    for s, e in changed:
        pos = s
        data = rg.merge_ranges([(x.offset, x.offset + x.length) for x in image.allocation(s, e - s)
                                if x.state.value == "data"])
        for ds, de in data:
            if ds > pos:
                yield pos, ds - pos, True
            yield ds, de - ds, False
            pos = de
        if pos < e:
            yield pos, e - pos, True


def _joined(entries: Iterator[Entry]) -> Iterator[Entry]:
    """Touching entries of one kind as one (blocks are diffed apart)."""
    held: Entry | None = None
    for o, n, cleared in entries:
        if held is not None and held[2] == cleared and held[0] + held[1] == o:
            held = (held[0], held[1] + n, cleared)
            continue
        if held is not None:
            yield held
        held = (o, n, cleared)
    if held is not None:
        yield held


def in_block(image: Any, base: Any, b: int, start: int, off: int, end: int) -> list[tuple[int, int]]:
    """The guest (offset, length) ranges that changed blob bytes [off, end)
    change in block b, which lies at `start` in the blob: its data as is,
    and a changed bitmap as the sectors whose bits differ from `base` (the
    image as it was; None: the whole block)."""
    bs, bm, size = image.block_size, image.bitmap_size, image.size
    lo, hi = max(off, start), min(end, start + bm + bs)
    out: list[tuple[int, int]] = []
    if lo >= hi:
        return out
    if lo < start + bm:
        out += bitmap_changes(image, base, b)
        lo = start + bm
    if lo < hi:
        g0 = b * bs + lo - start - bm
        out.append((g0, min(hi - lo, size - g0)))
    return [(o, n) for o, n in out if n > 0]


def bitmap_changes(image: Any, base: Any, b: int) -> list[tuple[int, int]]:
    """Guest ranges of block b whose sector bits differ between `base` (a
    block it had not allocated has no bits set) and `image`."""
    bs, size = image.block_size, image.size
    if base is None:
        return [(b * bs, min(bs, size - b * bs))]
    new = image.block_bitmap(b)
    old = base.block_bitmap(b) if b < len(base.bat) and base.bat[b] != 0xFFFFFFFF else bytes(len(new))
    xor = (int.from_bytes(new, "big") ^ int.from_bytes(old, "big")).to_bytes(len(new), "big")
    return [(b * bs + first * 512, min(count * 512, size - b * bs - first * 512))
            for changed, first, count in batlib.runs(xor, 0, bs // 512) if changed]
