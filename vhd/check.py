"""check(): walk a VHD file and prove its invariants; repair what is safe.

The walk is lenient (it keeps going after a problem) where open() is strict,
so one run lists everything wrong. Problems are errors (the image is wrong)
or warnings (wasted space, fields other tools may read differently).
Repairable, because no data depends on the damaged copy: a footer or header
whose only fault is its checksum, a footer mirror that differs from the
footer, an end footer damaged while its mirror is good. Anything touching
the BAT or data is reported, never "fixed".
`azure_rules()` are exactly the rules for uploading a VHD as a managed disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import bat as batlib
from . import dynamic_header as dh
from . import footer as ft
from .errors import FormatError, VhdError
from .fileio import OsFile, RawFile
from .geometry import MAX_CHS_SECTORS, chs_for_size
from .image import open_image

MIB = 1024 * 1024
AZURE_MIN = 20 * MIB
AZURE_MAX = 32 * 1024 ** 4
QEMU_TRUSTED_CREATORS = {b"win ", b"d2v ", b"qem2", b"tap\0", b"CTXS"}


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    where: str
    offset: int
    message: str
    repair: str | None = None  # what --repair does, if it can
    fix: str | None = None  # a command that fixes it, for the user

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        text = f"{self.severity}: {self.where} at offset {self.offset}: {self.message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        elif self.repair:
            text += " (repairable: vhd check --repair)"
        return text


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    leaked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def add(self, severity: str, where: str, offset: int, message: str, **kw: str | None) -> None:
        self.problems.append(Problem(severity, where, offset, message, **kw))

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "ok": self.ok, "problems": [p.to_json() for p in self.problems],
                "repaired": self.repaired, "leaked_bytes": self.leaked_bytes}


@dataclass
class _Walk:
    file: RawFile
    report: Report
    footer: ft.Footer | None = None
    footer_at: int = 0
    header: dh.DynamicHeader | None = None
    mirror_ok: bool = False


def check(target: str | RawFile, *, repair: bool = False, azure: bool = False,
          allow_dirs: Sequence[str] | None = None, ignore_timestamp: bool = False) -> Report:
    """Check the VHD at `target` (a path, or an open RawFile: then its parent
    chain is not followed) and optionally repair it."""
    if not isinstance(target, str):
        report = Report(target.name)
        walk = _Walk(target, report)
        _walk(walk)
        if repair and any(p.repair for p in report.problems):
            _repair(walk)
            target.sync()
            again = check(target, azure=azure)
            again.repaired = [p.repair for p in report.problems if p.repair]
            return again
        if azure:
            azure_rules(target.name, walk.footer, target.size(), report)
        return report
    path = target
    report = Report(path)
    file = OsFile(path, writable=repair)
    try:
        walk = _Walk(file, report)
        _walk(walk)
        if repair and any(p.repair for p in report.problems):
            _repair(walk)
            file.sync()
            file.close()
            again = check(path, azure=azure, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
            again.repaired = [p.repair for p in report.problems if p.repair]
            return again
    finally:
        file.close()
    if report.ok and walk.footer is not None and walk.footer.disk_type is ft.DiskType.DIFFERENCING:
        _check_chain(path, report, allow_dirs, ignore_timestamp)
    if azure:
        azure_rules(path, walk.footer, os.stat(path).st_size, report)
    return report


def _walk(w: _Walk) -> None:
    size = w.file.size()
    if size < ft.SIZE:
        w.report.add("error", "file", 0, f"{size} bytes is shorter than a VHD footer")
        return
    _read_footers(w, size)
    if w.footer is None:
        return
    f = w.footer
    _footer_fields(w, f)
    if f.disk_type is ft.DiskType.FIXED:
        if size != f.current_size + ft.SIZE:
            w.report.add("error", "footer current size", w.footer_at + 48,
                         f"{f.current_size} but the file holds {size - ft.SIZE} bytes of data")
        return
    _walk_sparse(w, size)


def _read_footers(w: _Walk, size: int) -> None:
    """Pick the footer to trust: the one at the end, else a good mirror."""
    at = size - ft.SIZE
    end_raw = w.file.pread(ft.SIZE, at)
    end_report = Report(w.report.path)
    end = _lenient_footer(end_report, end_raw, at, "footer")
    mirror = None
    if size >= 3 * ft.SIZE and w.file.pread(8, 0) == ft.COOKIE:
        mirror_raw = w.file.pread(ft.SIZE, 0)
        mirror_report = Report(w.report.path)
        mirror = _lenient_footer(mirror_report, mirror_raw, 0, "footer mirror")
        w.mirror_ok = mirror is not None and mirror.pack() == mirror_raw
    if end is None and mirror is not None and w.mirror_ok and mirror.disk_type is not ft.DiskType.FIXED:
        w.report.add("error", "footer", at, "the footer at the end is damaged; its mirror at offset 0 is good",
                     repair="rewrite the end footer from the mirror")
        w.footer, w.footer_at = mirror, 0
        return
    w.report.problems += end_report.problems
    w.footer, w.footer_at = end, at
    if end is None or end.disk_type is ft.DiskType.FIXED:
        return
    if mirror is None:
        w.report.add("error", "footer mirror", 0, "no valid footer copy at offset 0",
                     repair="copy the footer to offset 0")
    elif mirror.pack() != end.pack() or not w.mirror_ok:
        w.report.add("error", "footer mirror", 0, "the copy at offset 0 differs from the footer",
                     repair="copy the footer to offset 0")


def _lenient_footer(report: Report, raw: bytes, at: int, name: str) -> ft.Footer | None:
    try:
        f = ft.Footer.unpack(raw, at, verify_checksum=False)
    except FormatError as e:
        report.add("error", name, e.offset, f"bad {e.field}: {e.detail}")
        return None
    if f.checksum != ft.checksum(raw):
        report.add("error", f"{name} checksum", at + 64,
                     f"stored {f.checksum:#010x}, computed {ft.checksum(raw):#010x}",
                     repair=f"recompute the {name} checksum")
    return f


def _footer_fields(w: _Walk, f: ft.Footer) -> None:
    at = w.footer_at
    if not f.features & ft.FEATURE_RESERVED:
        w.report.add("warning", "footer features", at + 8, "reserved bit 0x2 is not set")
    expected = chs_for_size(f.current_size)
    if f.geometry != expected and f.geometry.total_sectors != MAX_CHS_SECTORS:
        w.report.add("warning", "footer geometry", at + 56,
                     f"{tuple(f.geometry)} is not the specification's {tuple(expected)} for this size")
    chs_size = f.geometry.total_sectors * 512
    if (f.creator_app not in QEMU_TRUSTED_CREATORS and f.geometry.total_sectors != MAX_CHS_SECTORS
            and chs_size != f.current_size):
        w.report.add("warning", "footer creator application", at + 28,
                     f"creator {f.creator_app!r} makes qemu size the disk by CHS: {chs_size} bytes, "
                     f"not {f.current_size}")


def _walk_sparse(w: _Walk, size: int) -> None:
    f = w.footer
    assert f is not None
    end = size - ft.SIZE
    hoff = f.data_offset
    if hoff < ft.SIZE or hoff + dh.SIZE > end:
        w.report.add("error", "footer data offset", w.footer_at + 16, f"{hoff} is outside the file")
        return
    raw = w.file.pread(dh.SIZE, hoff)
    try:
        h = dh.DynamicHeader.unpack(raw, hoff, verify_checksum=False)
    except FormatError as e:
        w.report.add("error", "dynamic header", e.offset, f"bad {e.field}: {e.detail}")
        return
    w.header = h
    if h.checksum != dh.checksum(raw):
        w.report.add("error", "dynamic header checksum", hoff + 36,
                     f"stored {h.checksum:#010x}, computed {dh.checksum(raw):#010x}",
                     repair="recompute the dynamic header checksum")
    if h.data_offset != dh.NO_DATA_OFFSET:
        w.report.add("warning", "dynamic header data offset", hoff + 8, f"{h.data_offset:#x}, expected all ones")
    needed = -(-f.current_size // h.block_size)
    if h.max_table_entries < needed:
        w.report.add("error", "dynamic header max table entries", hoff + 28,
                     f"{h.max_table_entries} < {needed} blocks needed for the disk size")
    if h.table_offset < ft.SIZE or h.table_offset + 4 * h.max_table_entries > end:
        w.report.add("error", "dynamic header table offset", hoff + 16, "the BAT does not fit in the file")
        return
    table = batlib.unpack_table(w.file.pread(4 * h.max_table_entries, h.table_offset), h.max_table_entries)
    regions = [(0, ft.SIZE, "footer mirror"), (hoff, dh.SIZE, "dynamic header"),
               (h.table_offset, batlib.table_bytes(h.max_table_entries), "BAT")]
    if f.disk_type is ft.DiskType.DIFFERENCING:
        _check_locators(w, h, end, regions)
    span = batlib.bitmap_bytes(h.block_size) + h.block_size
    for b, entry in enumerate(table):
        if entry == batlib.UNALLOCATED:
            continue
        start = entry * 512
        if b >= needed:
            w.report.add("warning", f"BAT entry {b}", h.table_offset + 4 * b, "allocated past the disk size")
        if start + span > end:
            w.report.add("error", f"BAT entry {b}", h.table_offset + 4 * b,
                         f"block at {start} runs past the footer at {end}")
            continue
        regions.append((start, span, f"block {b}"))
    _check_overlaps(w, regions, end)


def _check_locators(w: _Walk, h: dh.DynamicHeader, end: int, regions: list[tuple[int, int, str]]) -> None:
    hoff = w.footer.data_offset if w.footer else 0
    if h.parent_uuid.int == 0:
        w.report.add("error", "dynamic header parent unique id", hoff + 40, "zero in a differencing image")
    for i, loc in enumerate(h.locators):
        if loc.platform == dh.PLATFORM_NONE:
            continue
        at = hoff + 576 + 24 * i
        if loc.data_offset + loc.space_bytes > end or loc.data_length > loc.space_bytes:
            w.report.add("error", f"parent locator {i}", at, "its data does not fit in the file")
            continue
        regions.append((loc.data_offset, loc.space_bytes, f"parent locator {i} data"))


def _check_overlaps(w: _Walk, regions: list[tuple[int, int, str]], end: int) -> None:
    regions.sort()
    pos, prev = 0, ""
    for start, n, name in regions:
        if start < pos:
            w.report.add("error", name, start, f"overlaps {prev}")
        elif start > pos:
            w.report.leaked_bytes += start - pos
        if start + n > pos:
            pos, prev = start + n, name
    if end > pos:
        w.report.leaked_bytes += end - pos
    if w.report.leaked_bytes:
        w.report.add("warning", "file", 0, f"{w.report.leaked_bytes} bytes are not used by any block "
                     "(left by an interrupted write or a discard)",
                     fix=f"vhd compact {w.report.path}" if isinstance(w.file, OsFile) else None)


def _check_chain(path: str, report: Report, allow_dirs: Sequence[str] | None, ignore_timestamp: bool) -> None:
    try:
        img = open_image(path, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
    except VhdError as e:
        report.add("error", "parent chain", 0, str(e))
        return
    try:
        for member in img.chain()[1:]:
            mpath = getattr(member, "path", None)
            if mpath:
                sub = check(mpath, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
                for p in sub.problems:
                    if p.severity == "error":
                        report.add("error", f"parent {mpath}: {p.where}", p.offset, p.message)
    finally:
        img.close()


def _repair(w: _Walk) -> None:
    """Rewrite the damaged copies from the good one; never touch BAT or data."""
    f = w.footer
    if f is None:
        return
    good = f.pack()  # pack() recomputes the checksum
    size = w.file.size()
    w.file.pwrite(good, size - ft.SIZE)
    if f.disk_type is not ft.DiskType.FIXED:
        w.file.pwrite(good, 0)
    if w.header is not None:
        w.file.pwrite(w.header.pack(), f.data_offset)


def azure_rules(path: str, f: ft.Footer | None, file_size: int, report: Report) -> None:
    """The managed-disk upload rules, each failure with the command that fixes it."""
    if f is None:
        report.add("error", "azure", 0, "no valid footer", fix=f"vhd check --repair {path}")
        return
    if f.disk_type is not ft.DiskType.FIXED:
        report.add("error", "azure", 0, f"a {f.disk_type.name.lower()} VHD; Azure takes fixed VHDs only",
                   fix=f"vhd convert --to fixed {path} {_fixed_name(path)}")
    size = f.current_size
    if size % MIB:
        report.add("error", "azure", 0, f"virtual size {size} is not a multiple of 1 MiB",
                   fix=f"vhd resize --size {-(-size // MIB)}M {path}")
    if size < AZURE_MIN:
        report.add("error", "azure", 0, f"virtual size {size} is below 20 MiB",
                   fix=f"vhd resize --size 20M {path}")
    if size > AZURE_MAX:
        report.add("error", "azure", 0, f"virtual size {size} is above 32 TiB (no fix: split the data)")
    if f.disk_type is ft.DiskType.FIXED and file_size != size + ft.SIZE:
        report.add("error", "azure", 0, f"file is {file_size} bytes, expected {size + ft.SIZE}")


def _fixed_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}-fixed{ext or '.vhd'}"

