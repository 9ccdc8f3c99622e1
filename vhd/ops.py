"""Whole-image operations: info, convert, merge, compact, resize.

Each works on paths and leaves the image valid if interrupted:
- convert writes a new file (never over an existing one) as PATH.partial-PID
  and links it to PATH only when it is whole and synced, so PATH never names
  a half-written file; a failure removes the partial file, and one a killed
  convert left is removed by the next convert to the same PATH;
- merge writes the child's sectors into its parent and syncs the parent
  before it empties the child, so the chain reads the same at every instant;
  the parent then gets a new timestamp, recorded in the merged child, so
  the parent's other children see that it changed (docs/formats/vhd.md);
- compact and a resize that needs a bigger BAT build a new file beside the
  old one, sync it, and rename it into place; a file left by a killed one
  (NAME.rewrite-PID) is removed by the next compact or resize, which holds
  the image's lock;
- an in-place resize writes the new footer before removing the old one.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from . import bat as batlib
from . import dynamic_header as dh
from . import footer as ft
from .blockdev import Alloc, BlockDevice, FileDevice, is_zero
from .chain import read_locator
from .errors import FormatError, UsageError, VhdError
from .fileio import OsFile
from .geometry import chs_for_size
from .image import (
    MAX_FIXED_SIZE,
    FixedImage,
    Image,
    SparseImage,
    _write_sparse,
    create_dynamic,
    create_fixed,
    damaged_vhd_reason,
    file_mtime_ns,
    is_vhd,
    open_image,
    pin_parent_mtime,
)
from .process import pid_alive
from .progress import Progress

T = TypeVar("T")

COPY_CHUNK = 2 * 1024 * 1024
FORMATS = ("raw", "fixed", "dynamic")


def open_device(path: str, *, writable: bool = False, fmt: str = "auto",
                allow_dirs: Sequence[str] | None = None, ignore_timestamp: bool = False) -> BlockDevice:
    """A VHD (any type, with its chain) or a raw file, as a block device."""
    if fmt not in ("auto", "raw", "vhd"):
        raise UsageError(f"unknown source format {fmt!r}: use auto, raw or vhd")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "raw":
        return FileDevice(OsFile(path, writable=writable, allow_block=True), readonly=not writable)
    return open_image(path, writable=writable, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)


def detect_format(path: str) -> str:
    """"vhd" or "raw" for a path; a file that looks like a damaged VHD is
    refused rather than silently read as a raw disk."""
    probe = OsFile(path, lock=False, allow_block=True)
    try:
        if is_vhd(probe):
            return "vhd"
        why = damaged_vhd_reason(probe)
    finally:
        probe.close()
    if why:
        raise FormatError(f"{path}: looks like a damaged VHD", "cookie", 0,
                          f"{why}; run `vhd check {path}`, or pass --source-format raw to read it as a raw disk")
    return "raw"


def info(img: BlockDevice) -> dict[str, Any]:
    """What `vhd info` prints: type, sizes, fields, allocation, chain."""
    if not isinstance(img, (FixedImage, SparseImage)):
        return {"format": "raw", "virtual_size": img.size}
    file_size = img.file.size()
    out: dict[str, Any] = {
        "path": img.path, "format": "vhd", "type": img.disk_type.name.lower(),
        "virtual_size": img.size, "file_size": file_size,
        "footer": img.footer.to_json(),
    }
    if isinstance(img, SparseImage):
        blocks = img.allocated_blocks()
        out["block_size"] = img.block_size
        out["allocated_blocks"] = len(blocks)
        out["dynamic_header"] = img.header.to_json()
        out["footer_damaged"] = img.footer_damaged
    out["chain"] = [{"path": getattr(m, "path", None),
                     "type": m.disk_type.name.lower() if hasattr(m, "disk_type") else "device",
                     "unique_id": str(m.footer.unique_id) if hasattr(m, "footer") else None}
                    for m in img.chain()]
    return out


def data_extents(dev: BlockDevice, chunk: int = COPY_CHUNK) -> list[tuple[int, int]]:
    """The DATA parts of the allocation map, split into chunks of at most `chunk`."""
    pieces: list[tuple[int, int]] = []
    for e in dev.allocation(0, dev.size):
        if e.state is not Alloc.DATA:
            continue
        pos, end = e.offset, e.offset + e.length
        while pos < end:
            n = min(chunk - pos % chunk, end - pos)
            pieces.append((pos, n))
            pos += n
    return pieces


def copy_data(src: BlockDevice, dst: BlockDevice, progress: Progress | None = None,
              chunk: int = COPY_CHUNK) -> int:
    """Copy every DATA range of src that is not all zeros; returns bytes written.

    A source over a plain file is read by one reader thread into a ring of
    reused buffers while this thread writes (reads overlap writes, as in
    qemu-img's parallel requests); os.preadv and os.pwrite release the GIL.
    """
    pieces = data_extents(src, chunk)
    fd = _plain_fd(src)
    written = 0
    if fd is None:
        for off, n in pieces:
            data = src.read(off, n)
            if not is_zero(data):
                dst.write(off, data)
                written += n
            if progress:
                progress.advance(n)
        return written
    for off, n, view in _read_ahead(fd, pieces, chunk):
        if view is not None:
            dst.write(off, view)
            written += n
        if progress:
            progress.advance(n)
    return written


def _read_ahead(fd: int, pieces: list[tuple[int, int]], chunk: int,
                depth: int = 4) -> Iterator[tuple[int, int, memoryview | None]]:
    """Yield (offset, length, data or None if all zeros) for each piece, read
    by a helper thread into `depth` rotating buffers."""
    bufs = [bytearray(chunk) for _ in range(depth)]
    ready: queue.Queue[tuple[int, int, int, bool] | BaseException | None] = queue.Queue()
    free: queue.Queue[int] = queue.Queue()
    for i in range(depth):
        free.put(i)
    stop = threading.Event()

    def reader() -> None:
        try:
            for off, n in pieces:
                i = free.get()
                if stop.is_set():
                    return
                view = memoryview(bufs[i])[:n]
                got = os.preadv(fd, [view], off)
                if got != n:
                    raise VhdError(f"short read at {off}: {got} of {n} bytes")
                ready.put((off, n, i, is_zero(bufs[i]) if n == chunk else is_zero(view)))
            ready.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put(e)

    thread = threading.Thread(target=reader, name="copy-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            off, n, i, zero = item
            yield off, n, None if zero else memoryview(bufs[i])[:n]
            free.put(i)  # the consumer is done with buffer i
    finally:
        stop.set()
        free.put(0)
        thread.join()


def _plain_fd(dev: BlockDevice) -> int | None:
    """The descriptor whose bytes at offset o are the disk's bytes at o, if any."""
    if isinstance(dev, (FileDevice, FixedImage)) and isinstance(dev.file, OsFile):
        return dev.file.fd
    return None


def convert(src_path: str, dst_path: str, to: str, *, block_size: int = dh.DEFAULT_BLOCK_SIZE,
            src_format: str = "auto", allow_dirs: Sequence[str] | None = None,
            ignore_timestamp: bool = False, show_progress: bool | None = None,
            sync: bool = True) -> dict[str, Any]:
    """Copy a raw file or a VHD (a differencing chain is flattened) to a new
    raw, fixed or dynamic file; all-zero ranges stay sparse. With sync=False
    the result is not fsynced (qemu-img convert's default, cache=unsafe):
    faster, but a power cut soon after may leave it incomplete."""
    if to not in FORMATS:
        raise UsageError(f"unknown target format {to!r}: use one of {', '.join(FORMATS)}")
    if os.path.exists(dst_path):
        raise UsageError(f"{dst_path} already exists (refusing to overwrite)")
    src = open_device(src_path, fmt=src_format, allow_dirs=allow_dirs, ignore_timestamp=ignore_timestamp)
    try:
        result = convert_device(src, dst_path, to, block_size=block_size, show_progress=show_progress,
                                sync=sync, label=os.path.basename(src_path))
    finally:
        src.close()
    source_format = "vhd" if isinstance(src, (FixedImage, SparseImage)) else "raw"
    return {"source": src_path, "source_format": source_format, **result}


def convert_device(src: BlockDevice, dst_path: str, to: str, *, block_size: int = dh.DEFAULT_BLOCK_SIZE,
                   show_progress: bool | None = None, sync: bool = True, label: str = "") -> dict[str, Any]:
    """Copy any block device (a VHD chain, a raw file, a stamp disk) to a new
    raw, fixed or dynamic file, sparse; the file is removed if this fails."""
    def fill(dst: BlockDevice) -> int:
        progress = Progress(f"convert {label or dst_path}", _data_bytes(src), show_progress)
        written = copy_data(src, dst, progress)
        progress.close()
        return written

    written = write_new_file(dst_path, to, src.size, fill, block_size=block_size, sync=sync)
    return {"target": dst_path, "format": to, "virtual_size": src.size,
            "data_written": written, "file_size": os.stat(dst_path).st_size}


def write_new_file(path: str, to: str, size: int, fill: Callable[[BlockDevice], T], *,
                   block_size: int = dh.DEFAULT_BLOCK_SIZE, sync: bool = True) -> T:
    """Create a new raw, fixed or dynamic file of `size` bytes, let `fill`
    write it, then sync it once. It is built as PATH.partial-PID and linked
    to PATH only when whole, so PATH never names a half-written file, not
    even after kill -9; a failure removes the partial file, and one a killed
    process left is removed by the next write of the same PATH. Returns what
    `fill` returned."""
    if to not in FORMATS:
        raise UsageError(f"unknown target format {to!r}: use one of {', '.join(FORMATS)}")
    if os.path.lexists(path):
        raise UsageError(f"{path} already exists (refusing to overwrite)")
    remove_stale_partials(path)
    tmp = f"{path}.partial-{os.getpid()}"
    dst = _create_target(tmp, to, size, block_size)
    try:
        result = fill(dst)
        if sync:
            dst.flush()
        elif isinstance(dst, (FixedImage, SparseImage)):
            dst.sync_on_close = False
        dst.close()
        _publish(tmp, path, sync)
    except BaseException:
        dst.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return result


def _publish(tmp: str, path: str, sync: bool) -> None:
    """Give the finished file `tmp` its real name, never over a file that
    appeared there meanwhile (a hard link fails if the name exists)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} already exists (refusing to overwrite)") from None
    except OSError:  # a filesystem without hard links: re-check, then rename
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists (refusing to overwrite)") from None
        os.rename(tmp, path)
    else:
        os.unlink(tmp)
    if sync:
        _sync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_partials(path: str) -> list[str]:
    """Remove PATH.partial-PID files whose writer is gone (killed while
    building PATH); a live writer's file is left alone."""
    return _remove_leftovers(path, "partial", lambda pid: not pid_alive(pid))


def _remove_leftovers(path: str, kind: str, stale: Callable[[int], bool]) -> list[str]:
    """Remove the files PATH.KIND-PID that are regular files and `stale(PID)`."""
    pattern = re.compile(re.escape(os.path.basename(path)) + rf"\.{kind}-([0-9]+)")
    gone = []
    for name in glob.glob(glob.escape(path) + f".{kind}-*"):
        m = pattern.fullmatch(os.path.basename(name))
        if m and os.path.isfile(name) and stale(int(m.group(1))):
            os.unlink(name)
            gone.append(name)
    return gone


def _data_bytes(dev: BlockDevice) -> int:
    return sum(e.length for e in dev.allocation(0, dev.size) if e.state is Alloc.DATA)


def _create_target(path: str, to: str, size: int, block_size: int) -> BlockDevice:
    # Not synced while it is built: a failed convert removes the file, and a
    # finished one is synced once at the end (unless the caller said not to).
    if to == "fixed":
        return create_fixed(path, size, durable=False)
    if to == "dynamic":
        return create_dynamic(path, size, block_size=block_size, durable=False)
    if size % 512:
        raise UsageError(f"size {size} is not a multiple of 512")
    file = OsFile(path, writable=True, create=True)
    try:
        file.truncate(size)
    except BaseException:
        file.close()
        os.unlink(path)
        raise
    return FileDevice(file, readonly=False)


def merge(child_path: str, *, allow_dirs: Sequence[str] | None = None, ignore_timestamp: bool = False,
          show_progress: bool | None = None) -> dict[str, Any]:
    """Write a differencing image's own sectors into its parent, then empty it."""
    child = open_image(child_path, writable=True, parent_writable=True, allow_dirs=allow_dirs,
                       ignore_timestamp=ignore_timestamp)
    try:
        if not isinstance(child, SparseImage) or child.parent is None:
            raise UsageError(f"{child_path} is not a differencing image: nothing to merge")
        parent = child.parent
        runs = _own_runs(child)
        total = sum(n for _, n in runs)
        progress = Progress(f"merge {os.path.basename(child_path)}", total, show_progress)
        for off, n in runs:
            pos = off
            while pos < off + n:
                m = min(COPY_CHUNK, off + n - pos)
                parent.write(pos, child.read(pos, m))
                progress.advance(m)
                pos += m
        parent.flush()  # the parent holds everything before the child lets go of it
        progress.close()
        fd = getattr(child.file, "fd", None)
        times = None if fd is None else os.fstat(fd)
        _restamp(child, parent)
        _empty(child)
        if fd is not None and times is not None:  # the chain reads the same: the child's children must still accept it
            os.utime(fd, ns=(times.st_atime_ns, times.st_mtime_ns))
            os.fsync(fd)
        return {"child": child_path, "parent": getattr(parent, "path", None), "merged_bytes": total}
    finally:
        child.close()


def _restamp(child: SparseImage, parent: BlockDevice) -> None:
    """After a merge the parent holds new data: give it a new timestamp, so
    its other children no longer accept it, and record that timestamp in the
    merged child, whose view did not change. The child's header is written
    first: a crash in between leaves a mismatch that
    --ignore-parent-timestamp overrides, never a sibling reading new data."""
    if not isinstance(parent, (FixedImage, SparseImage)):
        return
    stamp = max(ft.vhd_timestamp() - 1, parent.footer.timestamp + 1)
    child.header = replace(child.header, parent_timestamp=stamp)
    child.file.pwrite(child.header.pack(), child.footer.data_offset)
    child.file.sync()
    footer = replace(parent.footer, timestamp=stamp)
    raw = footer.pack()
    parent.file.pwrite(raw, parent.file.size() - ft.SIZE)
    if isinstance(parent, SparseImage):
        parent.file.pwrite(raw, 0)
        parent._footer_raw = raw
    parent.footer = footer
    parent.file.sync()
    pin_parent_mtime(parent, child.footer)


def _own_runs(img: SparseImage) -> list[tuple[int, int]]:
    """Byte ranges whose sectors are present in this image itself."""
    out: list[tuple[int, int]] = []
    for b in img.allocated_blocks():
        bm = img.block_bitmap(b)
        base = b * img.block_size
        for present, s, n in batlib.runs(bm, 0, img.sectors_per_block):
            if present:
                lo = base + s * 512
                hi = min(lo + n * 512, img.size)
                if hi > lo:
                    out.append((lo, hi - lo))
    return out


def _empty(img: SparseImage) -> None:
    """Unallocate every block, then move the footer down and cut the file."""
    img.flush()
    img.bat.clear()
    batlib.write_empty(img.file.pwrite, img.header.table_offset, len(img.bat))
    img.file.sync()  # BAT empty: the chain now reads from the parent alone
    end = _metadata_end(img.header, img.file.size() - ft.SIZE)
    img.file.pwrite(img.footer.pack(), end)
    img.file.sync()
    img.file.truncate(end + ft.SIZE)
    img.file.sync()
    img.reload()


def _metadata_end(h: dh.DynamicHeader, file_end: int) -> int:
    """Where the metadata ends: the BAT and any locator data that lies in the
    file (a locator pointing outside it is damage, not space to keep)."""
    end = h.table_offset + batlib.table_bytes(h.max_table_entries)
    for loc in h.locators:
        if loc.platform != dh.PLATFORM_NONE and loc.data_offset + loc.space_bytes <= file_end:
            end = max(end, loc.data_offset + loc.space_bytes)
    return end


def compact(path: str, *, allow_dirs: Sequence[str] | None = None,
            show_progress: bool | None = None) -> dict[str, Any]:
    """Rebuild a dynamic or differencing image without all-zero (dynamic) or
    empty (differencing) blocks and without unreferenced space."""
    img = open_image(path, writable=True, allow_dirs=allow_dirs, ignore_timestamp=True)
    try:
        if not isinstance(img, SparseImage):
            raise UsageError(f"{path} is a fixed image: compact works on dynamic and differencing images")
        remove_stale_rewrites(path)
        before = img.file.size()
        kept = _rewrite(img, img.size, drop_empty=True, show_progress=show_progress)
    finally:
        img.close()
    return {"path": path, "blocks_kept": kept, "size_before": before, "size_after": os.stat(path).st_size}


def remove_stale_rewrites(path: str) -> list[str]:
    """Remove PATH.rewrite-PID files a killed compact or resize left. Call
    only while holding the image's write lock: then no rewrite of it runs."""
    return _remove_leftovers(os.path.realpath(path), "rewrite", lambda pid: True)  # where _rewrite puts them


def _rewrite(img: SparseImage, size: int, drop_empty: bool,
             show_progress: bool | None = None) -> int:
    """Write the image anew beside itself (same identity, new size), sync,
    rename over. Compacting (drop_empty) keeps the file's modification time:
    the disk reads the same, so its children must still accept it. A path
    that is a symlink is followed: the file it names is replaced, the link
    stays a link."""
    target = os.path.realpath(img.path or "")
    tmp = f"{target}.rewrite-{os.getpid()}"
    blocks = img.allocated_blocks()
    progress = Progress(f"rewrite {os.path.basename(img.path or '')}", len(blocks) * img.block_size, show_progress)
    out = OsFile(tmp, writable=True, create=True)
    try:
        locators = [(loc.platform, _locator_text(img, i)) for i, loc in enumerate(img.header.locators)
                    if loc.platform != dh.PLATFORM_NONE]
        parent_info = (img.header.parent_uuid, img.header.parent_timestamp, img.header.parent_name) \
            if img.parent is not None else None
        new = _write_sparse(out, tmp, img.disk_type, size, img.block_size, parent_info, locators,
                            False, img.footer.unique_id)
        new.footer = img.footer.with_size(size, chs_for_size(size))
        new._footer_raw = new.footer.pack()
        kept = 0
        for b in blocks:
            progress.advance(img.block_size)
            bm = img.block_bitmap(b)
            if drop_empty and _block_is_empty(img, b, bm):
                continue
            new.copy_block_from(img, b, bm)
            kept += 1
        new.flush()
        out.pwrite(new._footer_raw, 0)
        out.pwrite(new._footer_raw, out.size() - ft.SIZE)
        mtime = file_mtime_ns(img.file)
        if drop_empty and mtime is not None:
            os.utime(out.fd, ns=(mtime, mtime))
        os.fsync(out.fd)  # data, and the kept time, before the rename makes it the image
        progress.close()
        os.replace(tmp, target)
        _sync_dir(os.path.dirname(target))
    except BaseException:
        out.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    out.close()
    return kept


def _block_is_empty(img: SparseImage, b: int, bm: bytes) -> bool:
    if img.parent is not None:
        return batlib.none_set(bm, img.sectors_per_block)
    base = b * img.block_size
    n = min(img.block_size, img.size - base)
    return n <= 0 or img.read(base, n) == bytes(n)


def _locator_text(img: SparseImage, i: int) -> str:
    return read_locator(img.file, img.header, i)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resize(path: str, new_size: int, *, allow_dirs: Sequence[str] | None = None) -> dict[str, Any]:
    """Grow an image to `new_size` bytes (shrinking would drop data: refused)."""
    img = open_image(path, writable=True, allow_dirs=allow_dirs, ignore_timestamp=True)
    try:
        old = img.size
        if new_size < old:
            raise UsageError(f"{path}: {new_size} is smaller than {old}; shrinking would lose data")
        if new_size % 512:
            raise UsageError(f"size {new_size} must be a multiple of 512")
        if new_size == old:
            return {"path": path, "old_size": old, "new_size": new_size, "how": "unchanged"}
        if isinstance(img, FixedImage):
            if new_size > MAX_FIXED_SIZE:
                raise UsageError(f"size {new_size} is larger than a fixed image may be ({MAX_FIXED_SIZE} bytes)")
            how = _grow_fixed(img, new_size)
        else:
            how = _grow_sparse(img, new_size)
    finally:
        img.close()
    return {"path": path, "old_size": old, "new_size": new_size, "how": how}


def _grow_fixed(img: FixedImage, new_size: int) -> str:
    footer = img.footer.with_size(new_size, chs_for_size(new_size))
    img.file.pwrite(footer.pack(), new_size)
    img.file.sync()  # the new footer is the last one: the old one is now just data
    img.file.pwrite(bytes(ft.SIZE), img.size)
    img.file.sync()
    img.footer, img.size = footer, new_size
    return "in place"


def _grow_sparse(img: SparseImage, new_size: int) -> str:
    if new_size > 2040 * 1024 ** 3:
        raise UsageError(f"{new_size} is beyond the 2040 GiB a dynamic VHD may hold")
    entries = -(-new_size // img.block_size)
    h = img.header
    first_used = min([e * 512 for _, e in img.bat.items()] + [img.file.size() - ft.SIZE]
                     + [loc.data_offset for loc in h.locators if loc.platform != dh.PLATFORM_NONE])
    if h.table_offset + entries * 4 > first_used:
        remove_stale_rewrites(img.path or "")
        _rewrite(img, new_size, drop_empty=False)  # img now holds the replaced, unlinked file
        return "rewritten with a larger BAT"
    if entries > h.max_table_entries:
        extra = b"\xff\xff\xff\xff" * (entries - h.max_table_entries)
        img.file.pwrite(extra, h.table_offset + 4 * h.max_table_entries)
        img.file.sync()
        img.header = replace(h, max_table_entries=entries)
        img.file.pwrite(img.header.pack(), img.footer.data_offset)
        img.file.sync()
    footer = img.footer.with_size(new_size, chs_for_size(new_size))
    img.file.pwrite(footer.pack(), img.file.size() - ft.SIZE)
    img.file.pwrite(footer.pack(), 0)
    img.file.sync()
    return "in place"


def parse_size(text: str, *, zero_ok: bool = False) -> int:
    """'64M', '1G', '1.5GiB', '4096' -> bytes (powers of 1024); 0 ('0K')
    only with zero_ok (an offset)."""
    t = text.strip().upper().replace("IB", "").rstrip("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = float(t) * mult if "." in t else int(t) * mult
        size = int(value)  # OverflowError for a float past 1.8e308 (inf), ValueError for nan
    except (ValueError, OverflowError):
        raise UsageError(f"cannot read size {text!r}: use a number with an optional K, M, G or T") from None
    if size < 0 or (size == 0 and not zero_ok):
        raise UsageError(f"size {text!r} must be positive")
    return size


__all__ = ["open_device", "info", "convert", "convert_device", "merge", "compact", "resize", "parse_size", "copy_data",
           "Image", "VhdError"]
