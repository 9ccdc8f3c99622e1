"""The VHD hard disk footer (specification: "Hard Disk Footer Format").

512 bytes, big-endian, at the end of every VHD and mirrored at offset 0 of
dynamic and differencing images. The checksum is the one's complement of the
byte sum of the footer with the checksum field taken as zero. `unpack`
validates in a fixed order: cookie, checksum, version, type, then ranges, and
raises FormatError naming the field and the file offset.
"""

from __future__ import annotations

import enum
import struct
import time
import uuid
from dataclasses import dataclass, replace

from .checksum import ones_complement
from .errors import ChecksumError, FormatError
from .geometry import Geometry

SIZE = 512
COOKIE = b"conectix"
VERSION = 0x00010000
FEATURE_RESERVED = 0x00000002  # must always be set
FEATURE_TEMPORARY = 0x00000001
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
EPOCH_2000 = 946684800  # 2000-01-01T00:00:00Z as a Unix time

# What we write, and why: qemu takes the virtual size from CHS unless the
# creator is one it trusts ("win ", "d2v ", "qem2", "tap\0", "CTXS"); Hyper-V
# and Azure use the footer's current size. We write Hyper-V's creator
# identity so every reader agrees on the exact byte size (docs/formats/vhd.md).
CREATOR_APP = b"win "
CREATOR_VERSION = 0x000A0000
CREATOR_HOST = b"Wi2k"

_STRUCT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _STRUCT.size == SIZE
_CHECKSUM_AT = 64


class DiskType(enum.IntEnum):
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


def checksum(raw: bytes | bytearray) -> int:
    return ones_complement(raw, _CHECKSUM_AT)


def vhd_timestamp(unix: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, clamped into the u32 field."""
    t = int(time.time() if unix is None else unix) - EPOCH_2000
    return max(0, min(t, 0xFFFFFFFF))


@dataclass(frozen=True)
class Footer:
    disk_type: DiskType
    current_size: int
    original_size: int
    geometry: Geometry
    unique_id: uuid.UUID
    timestamp: int
    data_offset: int = FIXED_DATA_OFFSET
    features: int = FEATURE_RESERVED
    version: int = VERSION
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_host: bytes = CREATOR_HOST
    saved_state: int = 0
    checksum: int = 0  # as read; pack() always recomputes

    def pack(self) -> bytes:
        g = self.geometry
        raw = bytearray(_STRUCT.pack(
            COOKIE, self.features, self.version, self.data_offset, self.timestamp,
            self.creator_app, self.creator_version, self.creator_host,
            self.original_size, self.current_size, g.cylinders, g.heads, g.sectors,
            int(self.disk_type), 0, self.unique_id.bytes, self.saved_state, bytes(427)))
        struct.pack_into(">I", raw, _CHECKSUM_AT, checksum(raw))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, at: int = 0, verify_checksum: bool = True) -> Footer:
        """Parse 512 bytes found at file offset `at` (used in error messages)."""
        if len(raw) != SIZE:
            raise FormatError("footer", "length", at, f"{len(raw)} bytes, need {SIZE}")
        (cookie, features, version, data_offset, timestamp, app, app_ver, host,
         orig, cur, cyl, heads, spt, dtype, csum, uid, saved, _) = _STRUCT.unpack(raw)
        if cookie != COOKIE:
            raise FormatError("footer", "cookie", at, f"{cookie!r} is not {COOKIE!r}")
        if verify_checksum and csum != checksum(raw):
            raise ChecksumError("footer", "checksum", at + _CHECKSUM_AT,
                                f"stored {csum:#010x}, computed {checksum(raw):#010x}")
        if version >> 16 != 1:
            raise FormatError("footer", "file format version", at + 12, f"{version:#010x}")
        if dtype not in DiskType._value2member_map_:
            raise FormatError("footer", "disk type", at + 60, f"{dtype} is not 2, 3 or 4")
        if cur % 512:
            raise FormatError("footer", "current size", at + 48, f"{cur} is not a multiple of 512")
        dt = DiskType(dtype)
        if dt is DiskType.FIXED and data_offset != FIXED_DATA_OFFSET:
            raise FormatError("footer", "data offset", at + 16, f"{data_offset:#x} in a fixed disk")
        if dt is not DiskType.FIXED and (data_offset % 512 or data_offset == FIXED_DATA_OFFSET):
            raise FormatError("footer", "data offset", at + 16, f"{data_offset:#x} is not a header position")
        return cls(dt, cur, orig, Geometry(cyl, heads, spt), uuid.UUID(bytes=uid), timestamp,
                   data_offset, features, version, app, app_ver, host, saved, csum)

    def with_size(self, size: int, geometry: Geometry) -> Footer:
        return replace(self, current_size=size, geometry=geometry)

    def to_json(self) -> dict[str, object]:
        return {
            "disk_type": self.disk_type.name.lower(),
            "current_size": self.current_size,
            "original_size": self.original_size,
            "geometry": list(self.geometry),
            "unique_id": str(self.unique_id),
            "timestamp": self.timestamp,
            "timestamp_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.timestamp + EPOCH_2000)),
            "creator_app": self.creator_app.decode("latin-1"),
            "creator_version": f"{self.creator_version >> 16}.{self.creator_version & 0xFFFF}",
            "creator_host": self.creator_host.decode("latin-1"),
            "features": self.features,
            "saved_state": self.saved_state,
            "checksum": f"{self.checksum:#010x}",
        }
