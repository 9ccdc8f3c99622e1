"""vhd: VHD images (fixed, dynamic, differencing) as block devices.

Byte-exact with the Microsoft Virtual Hard Disk Image Format Specification;
interchangeable with qemu-img and libvhdi. The bottom layer of diskstamp: it
imports neither stamp nor hostcache. Public API:

    img = vhd.create("disk.vhd", 64 << 20)                 # dynamic
    img = vhd.create("disk.vhd", 64 << 20, type="fixed")
    img = vhd.create("child.vhd", parent="base.vhd")       # differencing
    with vhd.open("child.vhd", writable=True) as img:
        img.write(0, b"...512 bytes..."); img.flush(); img.read(0, 512)
        img.allocation(0, img.size)                        # [Extent(DATA/ZERO)]
    vhd.check("disk.vhd", azure=True).ok
    vhd.convert("child.vhd", "flat.vhd", to="fixed")
"""

from __future__ import annotations

import os
from typing import Any

from .blockdev import Alloc, BlockDevice, Extent, FileDevice
from .check import Problem, Report, check
from .dynamic_header import DEFAULT_BLOCK_SIZE, DynamicHeader, ParentLocator
from .errors import (
    BusyError,
    ChecksumError,
    FormatError,
    ParentError,
    ParentLoopError,
    ParentMismatchError,
    ParentNotFoundError,
    ParentOutsideError,
    RangeError,
    ReadOnlyError,
    UsageError,
    VhdError,
)
from .fileio import MemFile, OsFile, RawFile
from .footer import DiskType, Footer
from .geometry import Geometry, chs_for_size
from .image import FixedImage, Image, SparseImage, create_differencing, create_dynamic, create_fixed, open_image
from .ops import compact, convert, convert_device, copy_data, info, merge, open_device, parse_size, resize


def create(path: str | os.PathLike[str], size: int | None = None, *, type: str | None = None,
           parent: str | os.PathLike[str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
           **kw: Any) -> Image:
    """Create a VHD: dynamic by default, fixed with type="fixed",
    differencing when `parent` is given (its size is the parent's)."""
    kind = type or ("differencing" if parent is not None else "dynamic")
    if kind == "differencing":
        if parent is None:
            raise UsageError("a differencing image needs a parent")
        return create_differencing(path, parent, block_size=block_size, **kw)
    if size is None:
        raise UsageError("size is required")
    if kind == "fixed":
        return create_fixed(path, size, **kw)
    if kind == "dynamic":
        return create_dynamic(path, size, block_size=block_size, **kw)
    raise UsageError(f"unknown image type {kind!r}: fixed, dynamic or differencing")


open = open_image  # noqa: A001 - vhd.open mirrors gzip.open

__all__ = [
    "Alloc", "BlockDevice", "BusyError", "ChecksumError", "DEFAULT_BLOCK_SIZE", "DiskType",
    "DynamicHeader", "Extent", "FileDevice", "FixedImage", "Footer", "FormatError", "Geometry",
    "Image", "MemFile", "OsFile", "ParentError", "ParentLocator", "ParentLoopError",
    "ParentMismatchError", "ParentNotFoundError", "ParentOutsideError", "Problem", "RangeError",
    "RawFile", "ReadOnlyError", "Report", "SparseImage", "UsageError", "VhdError", "check",
    "chs_for_size", "compact", "convert", "convert_device", "copy_data", "create", "create_differencing", "create_dynamic",
    "create_fixed", "info", "merge", "open", "open_device", "open_image", "parse_size", "resize",
]
