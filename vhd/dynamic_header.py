"""The dynamic disk header and its parent locators (specification:
"Dynamic Disk Header Format").

1024 bytes, big-endian, at the footer's data offset (512 in images made
here). Parent fields are used only by differencing images: parent UUID,
parent timestamp, the parent's name as UTF-16BE (512 bytes) and eight
24-byte locator entries pointing at platform-specific paths stored
elsewhere in the file. Locator paths are UTF-16LE ("W2ru" relative, "W2ku"
absolute). The data space field is read as a byte count when it is a
multiple of 512, else as a sector count (both appear in the wild; we write
bytes, as Hyper-V does).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from .checksum import ones_complement
from .errors import ChecksumError, FormatError

SIZE = 1024
COOKIE = b"cxsparse"
VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 256 * 1024 * 1024
LOCATOR_COUNT = 8
MAX_LOCATOR_BYTES = 64 * 1024

PLATFORM_NONE = 0
W2RU = int.from_bytes(b"W2ru", "big")
W2KU = int.from_bytes(b"W2ku", "big")
WI2R = int.from_bytes(b"Wi2r", "big")
WI2K = int.from_bytes(b"Wi2k", "big")
MAC = int.from_bytes(b"Mac ", "big")
MACX = int.from_bytes(b"MacX", "big")
KNOWN_PLATFORMS = {PLATFORM_NONE, W2RU, W2KU, WI2R, WI2K, MAC, MACX}

_LOCATOR = struct.Struct(">IIIIQ")
assert _LOCATOR.size == 24
_STRUCT = struct.Struct(">8sQQIIII16sII512s192s256s")
assert _STRUCT.size == SIZE
_CHECKSUM_AT = 36


def checksum(raw: bytes | bytearray) -> int:
    return ones_complement(raw, _CHECKSUM_AT)


def platform_name(code: int) -> str:
    return code.to_bytes(4, "big").decode("latin-1") if code else ""


@dataclass(frozen=True)
class ParentLocator:
    platform: int
    data_space: int  # as stored (bytes or sectors, see module comment)
    data_length: int
    data_offset: int

    @property
    def space_bytes(self) -> int:
        if self.data_space % 512 == 0 and self.data_space >= self.data_length:
            return self.data_space
        return self.data_space * 512

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform, self.data_space, self.data_length, 0, self.data_offset)

    @classmethod
    def unpack(cls, raw: bytes, at: int) -> ParentLocator:
        code, space, length, _res, off = _LOCATOR.unpack(raw)
        if code not in KNOWN_PLATFORMS:
            raise FormatError("parent locator", "platform code", at, f"{code:#010x}")
        if code != PLATFORM_NONE:
            if length > MAX_LOCATOR_BYTES:
                raise FormatError("parent locator", "data length", at + 8, f"{length} bytes is absurd")
            if off % 512:
                raise FormatError("parent locator", "data offset", at + 16, f"{off} is not sector aligned")
        return cls(code, space, length, off)


EMPTY_LOCATOR = ParentLocator(PLATFORM_NONE, 0, 0, 0)


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_uuid: uuid.UUID = uuid.UUID(int=0)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[ParentLocator, ...] = field(default=(EMPTY_LOCATOR,) * LOCATOR_COUNT)
    data_offset: int = NO_DATA_OFFSET
    version: int = VERSION
    checksum: int = 0  # as read; pack() recomputes

    def pack(self) -> bytes:
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 512:
            raise FormatError("dynamic header", "parent name", 64, "longer than 256 UTF-16 units")
        locs = b"".join(loc.pack() for loc in self.locators)
        raw = bytearray(_STRUCT.pack(
            COOKIE, self.data_offset, self.table_offset, self.version, self.max_table_entries,
            self.block_size, 0, self.parent_uuid.bytes, self.parent_timestamp, 0,
            name.ljust(512, b"\0"), locs, bytes(256)))
        struct.pack_into(">I", raw, _CHECKSUM_AT, checksum(raw))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes, at: int, verify_checksum: bool = True) -> DynamicHeader:
        if len(raw) != SIZE:
            raise FormatError("dynamic header", "length", at, f"{len(raw)} bytes, need {SIZE} (truncated file?)")
        (cookie, data_off, table_off, version, entries, bsize, csum, puid, pts, _r,
         pname, locs, _res) = _STRUCT.unpack(raw)
        if cookie != COOKIE:
            raise FormatError("dynamic header", "cookie", at, f"{cookie!r} is not {COOKIE!r}")
        if verify_checksum and csum != checksum(raw):
            raise ChecksumError("dynamic header", "checksum", at + _CHECKSUM_AT,
                                f"stored {csum:#010x}, computed {checksum(raw):#010x}")
        if version >> 16 != 1:
            raise FormatError("dynamic header", "header version", at + 24, f"{version:#010x}")
        if bsize & (bsize - 1) or not MIN_BLOCK_SIZE <= bsize <= MAX_BLOCK_SIZE:
            raise FormatError("dynamic header", "block size", at + 32,
                              f"{bsize} is not a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        if table_off % 512:
            raise FormatError("dynamic header", "table offset", at + 16, f"{table_off} is not sector aligned")
        try:
            name = pname.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            raise FormatError("dynamic header", "parent unicode name", at + 64, "not UTF-16BE") from None
        locators = tuple(ParentLocator.unpack(locs[i * 24:(i + 1) * 24], at + 576 + i * 24)
                         for i in range(LOCATOR_COUNT))
        return cls(table_off, entries, bsize, uuid.UUID(bytes=puid), pts, name, locators,
                   data_off, version, csum)

    def to_json(self) -> dict[str, object]:
        return {
            "table_offset": self.table_offset,
            "max_table_entries": self.max_table_entries,
            "block_size": self.block_size,
            "parent_uuid": str(self.parent_uuid),
            "parent_timestamp": self.parent_timestamp,
            "parent_name": self.parent_name,
            "parent_locators": [
                {"platform": platform_name(loc.platform), "offset": loc.data_offset,
                 "length": loc.data_length, "space": loc.space_bytes}
                for loc in self.locators if loc.platform != PLATFORM_NONE],
            "checksum": f"{self.checksum:#010x}",
        }
