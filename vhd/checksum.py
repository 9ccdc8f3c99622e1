"""The checksum the VHD specification uses for the footer and the dynamic
header: the one's complement of the sum of all bytes, with the four bytes of
the checksum field itself counted as zero."""

from __future__ import annotations


def ones_complement(raw: bytes | bytearray, field_at: int) -> int:
    total = sum(raw) - sum(raw[field_at:field_at + 4])
    return ~total & 0xFFFFFFFF
