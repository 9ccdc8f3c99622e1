"""check(): walk a VHD file and prove its invariants; repair what is safe.

The walk is lenient (it keeps going after a problem) where open() is strict,
so one run lists everything wrong. Problems are errors (the image is wrong)
or warnings (wasted space, fields other tools may read differently).

Repair rules (issue 16: a repair never makes an image worse):
- a footer copy "verifies" when its checksum and fields are right and it
  agrees with the file (a fixed disk's size, a sparse disk's header);
- a damaged copy is rewritten only from a copy that verifies, never from
  itself with a recomputed checksum: with one bit flipped anywhere the
  checksum cannot say which field is wrong, and a flipped unique id or
  timestamp would break every child;
- two verifying copies that disagree on the identity children record
  (unique id, timestamp) are reported, not chosen between;
- the dynamic header has no copy: its checksum is recomputed only when the
  file then passes the whole walk and, for a differencing image, still
  opens with its parent;
- every repair is planned first and tried on an overlay of the file; if
  the result would not check clean nothing is written, and the report says
  so. The file's modification time is kept (children check it).
Anything touching the BAT or data is reported, never "fixed".
A chain is checked by opening it once and walking each member's file once.
`azure_rules()` are exactly the rules for uploading a VHD as a managed disk.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import bat as batlib
from . import dynamic_header as dh
from . import footer as ft
from .errors import FormatError, VhdError
from .fileio import OsFile, RawFile
from .geometry import MAX_CHS_SECTORS, chs_for_size
from .image import SECTOR, load_table, open_image

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
    footer_trusted: bool = False  # a copy verified: repairs may build on it
    header: dh.DynamicHeader | None = None
    patches: list[tuple[int, bytes, str]] = field(default_factory=list)  # what --repair writes


class _Overlay:
    """A read-only view of a file with planned repairs applied: the repair
    is checked on it before a byte is written."""

    def __init__(self, base: RawFile, patches: list[tuple[int, bytes, str]]) -> None:
        self.base, self.patches, self.name = base, patches, base.name

    def pread(self, length: int, offset: int) -> bytes:
        data = bytearray(self.base.pread(length, offset))
        for at, raw, _ in self.patches:
            lo, hi = max(at, offset), min(at + len(raw), offset + len(data))
            if lo < hi:
                data[lo - offset:hi - offset] = raw[lo - at:hi - at]
        return bytes(data)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise VhdError(f"{self.name}: a repair overlay is read-only")

    def size(self) -> int:
        return self.base.size()

    def truncate(self, size: int) -> None:
        raise VhdError(f"{self.name}: a repair overlay is read-only")

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass  # the base file belongs to the caller

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset, length)]


def check(target: str | RawFile, *, repair: bool = False, azure: bool = False,
          allow_dirs: Sequence[str] | None = None, ignore_timestamp: bool = False) -> Report:
    """Check the VHD at `target` (a path, or an open RawFile: then its parent
    chain is not followed, and a repair that changes a differencing image's
    header is refused, as it cannot be tried with the parent) and optionally
    repair it. A path is opened for writing only once a repair is needed."""
    path = target if isinstance(target, str) else None
    file = OsFile(target, allow_block=True) if isinstance(target, str) else target
    report = Report(file.name)
    try:
        walk = _Walk(file, report)
        _walk(walk)
        _vet_repairs(walk, path, allow_dirs, ignore_timestamp)
        size = file.size()
    finally:
        if path is not None:
            file.close()
    if repair and walk.patches:
        repaired = _repair(target, allow_dirs, ignore_timestamp)
        again = check(target, azure=azure, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
        again.repaired = repaired
        return again
    if path is not None and report.ok and walk.footer is not None \
            and walk.footer.disk_type is ft.DiskType.DIFFERENCING:
        _check_chain(path, report, allow_dirs, ignore_timestamp)
    if azure:
        azure_rules(file.name, walk.footer, size, report)
    return report


def _repair(target: str | RawFile, allow_dirs: Sequence[str] | None, ignore_timestamp: bool) -> list[str]:
    """Hold the image for writing (a path is opened so; a RawFile is the
    caller's, open as it is), plan and vet the repairs again (the file may
    have changed since it was read), write them; what was repaired."""
    path = target if isinstance(target, str) else None
    file = OsFile(target, writable=True, allow_block=True) if isinstance(target, str) else target
    try:
        walk = _Walk(file, Report(file.name))
        _walk(walk)
        _vet_repairs(walk, path, allow_dirs, ignore_timestamp)
        if walk.patches:
            _apply(walk)
        return [what for _, _, what in walk.patches]
    finally:
        if path is not None:
            file.close()


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
    if size % SECTOR:
        w.report.add("error", "file length", size, f"{size} bytes is not a whole number of sectors")
    _walk_sparse(w, size)


def _verify_footer(file: RawFile, raw: bytes, at: int, size: int) -> tuple[ft.Footer | None, str]:
    """The footer in `raw` if it verifies (see the module comment), else the reason it does not."""
    try:
        f = ft.Footer.unpack(raw, at)
    except FormatError as e:
        return None, f"bad {e.field}: {e.detail}"
    if f.disk_type is ft.DiskType.FIXED:
        if size != f.current_size + ft.SIZE:
            return None, f"current size {f.current_size} does not match the file's {size - ft.SIZE} bytes of data"
        return f, ""
    hoff = f.data_offset
    if hoff < ft.SIZE or hoff + dh.SIZE > size - ft.SIZE:
        return None, f"data offset {hoff} is outside the file"
    try:
        h = dh.DynamicHeader.unpack(file.pread(dh.SIZE, hoff), hoff, verify_checksum=False)
    except FormatError as e:
        return None, f"data offset {hoff} does not lead to a dynamic header (bad {e.field})"
    if h.max_table_entries * h.block_size < f.current_size:
        return None, f"current size {f.current_size} is more than the BAT at {hoff} can map"
    return f, ""


def _read_footers(w: _Walk, size: int) -> None:
    """Pick the footer copy to trust: the one at the end, else a mirror that verifies."""
    at = size - ft.SIZE
    end_raw = w.file.pread(ft.SIZE, at)
    end, why = _verify_footer(w.file, end_raw, at, size)
    mirror_raw = w.file.pread(ft.SIZE, 0) if size >= 3 * ft.SIZE else b""
    mirror, _ = _verify_footer(w.file, mirror_raw, 0, size) if mirror_raw[:8] == ft.COOKIE else (None, "")
    if end is not None:
        w.footer, w.footer_at, w.footer_trusted = end, at, True
        if end.disk_type is not ft.DiskType.FIXED and mirror_raw != end_raw:
            _mirror_differs(w, end, mirror, end_raw)
        return
    if mirror is not None and mirror.disk_type is not ft.DiskType.FIXED:
        w.report.add("error", "footer", at, f"the footer at the end is damaged ({why}); "
                     "its mirror at offset 0 verifies", repair="rewrite the end footer from the mirror")
        w.patches.append((at, mirror_raw, "rewrote the end footer from the mirror at offset 0"))
        w.footer, w.footer_at, w.footer_trusted = mirror, 0, True
        return
    # No copy verifies: say what is wrong and keep walking with what parses,
    # but repair nothing (there is no copy to repair from).
    w.footer, w.footer_at = _lenient_footer(w.report, end_raw, at, "footer"), at
    if w.footer is not None and w.footer.disk_type is not ft.DiskType.FIXED:
        w.report.add("error", "footer mirror", 0, "the copy at offset 0 does not verify either: "
                     "not repairable (no good copy to repair from)")


def _mirror_differs(w: _Walk, end: ft.Footer, mirror: ft.Footer | None, end_raw: bytes) -> None:
    if mirror is not None and (mirror.unique_id, mirror.timestamp) != (end.unique_id, end.timestamp):
        w.report.add("error", "footer mirror", 0,
                     f"both footer copies verify but name different images (unique id {mirror.unique_id} / "
                     f"{end.unique_id}, timestamp {mirror.timestamp} / {end.timestamp}); children record one "
                     "of them, so neither is chosen: not repairable")
        return
    w.report.add("error", "footer mirror", 0, "the copy at offset 0 differs from the footer",
                 repair="copy the footer to offset 0")
    w.patches.append((0, end_raw, "copied the end footer to offset 0"))


def _lenient_footer(report: Report, raw: bytes, at: int, name: str) -> ft.Footer | None:
    try:
        f = ft.Footer.unpack(raw, at, verify_checksum=False)
    except FormatError as e:
        report.add("error", name, e.offset, f"bad {e.field}: {e.detail}")
        return None
    if f.checksum != ft.checksum(raw):
        report.add("error", f"{name} checksum", at + 64,
                   f"stored {f.checksum:#010x}, computed {ft.checksum(raw):#010x}; with no second copy "
                   "that verifies, any field may be the damaged one: not repairable")
    return f


def _vet_repairs(w: _Walk, path: str | None, allow_dirs: Sequence[str] | None, ignore_timestamp: bool) -> None:
    """Drop the planned repairs (and their "repairable" labels) unless the
    file with them applied checks clean and, if the header changes in a
    differencing image, still opens with its parent."""
    if not w.patches:
        return
    overlay = _Overlay(w.file, w.patches)
    trial = _Walk(overlay, Report(w.report.path))
    _walk(trial)
    reason = "; ".join(str(p) for p in trial.report.problems if p.severity == "error")
    header_changes = any(at == (w.footer.data_offset if w.footer else -1) for at, _, _ in w.patches)
    if not reason and header_changes and trial.footer and trial.footer.disk_type is ft.DiskType.DIFFERENCING:
        try:
            open_image(overlay, path=path, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp).close()
        except VhdError as e:
            reason = str(e)
    if not reason:
        return
    w.patches.clear()
    for p in w.report.problems:
        p.repair = None
    w.report.add("error", "repair", 0, f"not repairable: after the planned repair the image would still "
                 f"be broken ({reason})")


def _apply(w: _Walk) -> None:
    """Write the vetted copies, sync, and keep the file's modification time:
    a repaired parent reads the same, so its children must still accept it."""
    fd = getattr(w.file, "fd", None)
    st = os.fstat(fd) if fd is not None else None
    for at, raw, _ in w.patches:
        w.file.pwrite(raw, at)
    w.file.sync()
    if fd is not None and st is not None:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)


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
        if w.footer_trusted:
            w.report.add("error", "dynamic header checksum", hoff + 36,
                         f"stored {h.checksum:#010x}, computed {dh.checksum(raw):#010x}",
                         repair="recompute the dynamic header checksum")
            w.patches.append((hoff, h.pack(), "recomputed the dynamic header checksum"))
        else:
            w.report.add("error", "dynamic header checksum", hoff + 36,
                         f"stored {h.checksum:#010x}, computed {dh.checksum(raw):#010x}")
    if h.data_offset != dh.NO_DATA_OFFSET:
        w.report.add("warning", "dynamic header data offset", hoff + 8, f"{h.data_offset:#x}, expected all ones")
    needed = -(-f.current_size // h.block_size)
    if h.max_table_entries < needed:
        w.report.add("error", "dynamic header max table entries", hoff + 28,
                     f"{h.max_table_entries} < {needed} blocks needed for the disk size")
    if h.table_offset < ft.SIZE or h.table_offset + 4 * h.max_table_entries > end:
        w.report.add("error", "dynamic header table offset", hoff + 16, "the BAT does not fit in the file")
        return
    used = min(needed, h.max_table_entries)
    _entries_past_the_disk(w, h, used)
    regions = [(0, ft.SIZE, "footer mirror"), (hoff, dh.SIZE, "dynamic header"),
               (h.table_offset, batlib.table_bytes(h.max_table_entries), "BAT")]
    if f.disk_type is ft.DiskType.DIFFERENCING:
        _check_locators(w, h, end, regions)
    span = batlib.bitmap_bytes(h.block_size) + h.block_size
    try:
        table = load_table(w.file, h.table_offset, used, span, end)
    except FormatError as e:
        w.report.add("error", "BAT", e.offset, e.detail)
        return
    for b, entry in table.items():
        start = entry * 512
        if start + span > end:
            w.report.add("error", f"BAT entry {b}", h.table_offset + 4 * b,
                         f"block at {start} runs past the footer at {end}")
            continue
        regions.append((start, span, f"block {b}"))
    _check_overlaps(w, regions, end)


def _entries_past_the_disk(w: _Walk, h: dh.DynamicHeader, used: int) -> None:
    """Warn about allocated entries past those the disk size needs (they map
    nothing), read a piece at a time: a hostile table may claim 2**32. A hole
    of the file reads as zeros, entries allocated at sector 0: they are
    counted from its length, not read (16 GiB of hole took 100 s). The file
    is asked for its holes a window at a time (no list sized by the table)."""
    piece, window = 1 << 20, 1 << 26
    allocated = 0
    stop = h.table_offset + 4 * h.max_table_entries
    for lo in range(h.table_offset + 4 * used, stop, window):
        hi = min(lo + window, stop)
        pos = lo
        for at, n in [*w.file.data_ranges(lo, hi - lo), (hi, 0)]:
            allocated += (at - pos) // 4  # a hole: whole sectors of zero entries (the table is sector aligned)
            for first in range(at, at + n, piece):
                k = min(piece, at + n - first) // 4
                part = array("I", w.file.pread(4 * k, first).ljust(4 * k, b"\xff"))
                allocated += k - part.count(batlib.UNALLOCATED)  # all ones either way round: no byte swap
            pos = at + n
    if allocated:
        w.report.add("warning", "BAT", h.table_offset + 4 * used,
                     f"{allocated} entries past the {used} the disk size needs are allocated (they map nothing)")


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
    """Open the chain once (which proves the links) and walk each parent's
    file once through the descriptor the chain holds: linear in the depth,
    one descriptor per member."""
    try:
        img = open_image(path, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
    except VhdError as e:
        report.add("error", "parent chain", 0, str(e))
        return
    try:
        for member in img.chain()[1:]:
            file = getattr(member, "file", None)
            if file is None:
                continue
            sub = Report(file.name)
            _walk(_Walk(file, sub))
            for p in sub.problems:
                if p.severity == "error":
                    report.add("error", f"parent {file.name}: {p.where}", p.offset, p.message)
    finally:
        img.close()


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

