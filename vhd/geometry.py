"""CHS disk geometry, computed as the VHD specification's appendix does.

The footer stores cylinders/heads/sectors-per-track derived from the size.
The largest geometry, 65535/16/255, covers about 127 GiB; bigger disks carry
that maximum. Readers here always take the size from the footer's current
size field, never from CHS (see docs/formats/vhd.md, "Which size wins").
"""

from __future__ import annotations

from typing import NamedTuple

MAX_CHS_SECTORS = 65535 * 16 * 255


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors


def chs_for_size(size: int) -> Geometry:
    """The specification's CHS algorithm for a disk of `size` bytes."""
    total = min(size // 512, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)
