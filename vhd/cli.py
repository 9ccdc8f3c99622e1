"""The `vhd` command (also `python -m vhd`).

Exit codes: 0 ok, 1 a problem was found (bad image, failed check, missing
parent), 2 a usage error. Errors are one line on stderr, never a traceback.
Commands that scripts read print JSON (info, map, and --json elsewhere).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any

from . import dynamic_header as dh
from .blockdev import FileDevice, check_range
from .check import check
from .errors import UsageError, VhdError
from .image import FixedImage, SparseImage, create_differencing, create_dynamic, create_fixed, open_image
from .ops import compact, convert, info, merge, open_device, parse_size, resize

EPILOG = """examples:
  vhd create disk.vhd --size 64M                  dynamic, 2 MiB blocks
  vhd create disk.vhd --size 1G --type fixed      what a managed disk page blob holds
  vhd create child.vhd --parent base.vhd          differencing over base.vhd
  vhd write disk.vhd --offset 1M --pattern 0xab --length 4K
  vhd read disk.vhd --offset 1M --length 4K | xxd | head
  vhd info child.vhd                              JSON: type, sizes, chain
  vhd map child.vhd                               JSON: data and zero ranges
  vhd check disk.vhd --azure                      can it be uploaded as a managed disk?
  vhd convert child.vhd flat.vhd --to fixed       flattens the chain
  vhd merge child.vhd                             child's sectors into its parent

Parents of differencing images are searched only in the folder of the image
you name; add others with --allow-dir. Exit status: 0 ok, 1 problem found,
2 usage error."""
CHUNK = 4 << 20  # read and write pieces: memory stays bounded whatever --length says


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (a clear usage error, not a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value
    return parse


def _offset(text: str) -> int:
    try:
        return parse_size(text, zero_ok=True)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _chain_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-dir", action="append", default=None, metavar="DIR",
                   help="a folder parent images may be found in (repeatable; "
                        "default: the folder of the image)")
    p.add_argument("--ignore-parent-timestamp", action="store_true",
                   help="accept a parent whose timestamp differs from the one the child recorded")


def _source_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-format", default="auto", choices=["auto", "raw", "vhd"],
                   help="auto (default): a VHD if it has a footer, else raw (said on stderr); "
                        "a file that looks like a damaged VHD is refused")


def _is_raw(dev: object) -> bool:
    """A raw file, not a VHD (a FixedImage is a FileDevice too)."""
    return isinstance(dev, FileDevice) and not isinstance(dev, (FixedImage, SparseImage))


def _say_raw(a: argparse.Namespace, dev: object) -> None:
    """Tell the user when auto-detection read the file as a raw disk."""
    if a.source_format == "auto" and _is_raw(dev):
        print(f"vhd {a.cmd}: {a.path}: no VHD footer: read as a raw disk", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vhd", description="Create, inspect, check, convert and edit VHD images "
                                  "(fixed, dynamic, differencing), byte-exact with the Microsoft specification.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="create an image", description="Create a VHD. Without --parent: "
                       "dynamic unless --type fixed. With --parent: a differencing image of the parent's size.")
    p.add_argument("path")
    p.add_argument("--size", type=_size, help="virtual size: 64M, 10G, ... (a multiple of 512; "
                   "keep it a multiple of 1M for Azure)")
    p.add_argument("--type", choices=["fixed", "dynamic", "differencing"])
    p.add_argument("--block-size", type=_size, default=dh.DEFAULT_BLOCK_SIZE,
                   help="dynamic/differencing block size (power of two, default 2M)")
    p.add_argument("--parent", help="parent image: makes a differencing image")
    _chain_opts(p)

    p = sub.add_parser("info", help="describe an image as JSON")
    p.add_argument("path")
    _chain_opts(p)

    p = sub.add_parser("check", help="verify every structure; --repair, --azure",
                       description="Walk footer, mirror, header, BAT, locators and the parent chain. "
                       "Exit 1 if any error is found.")
    p.add_argument("path")
    p.add_argument("--repair", action="store_true",
                   help="fix what is safe: bad checksums, a bad footer mirror or end footer")
    p.add_argument("--azure", action="store_true",
                   help="also apply the rules for uploading as a managed disk")
    p.add_argument("--json", action="store_true")
    _chain_opts(p)

    p = sub.add_parser("convert", help="copy to raw, fixed or dynamic (flattens chains)")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--to", required=True, choices=["raw", "fixed", "dynamic"])
    _source_format(p)
    p.add_argument("--block-size", type=_size, default=dh.DEFAULT_BLOCK_SIZE)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--no-sync", action="store_true",
                   help="do not fsync the result (qemu-img's default): faster, but a power cut "
                        "soon after may leave it incomplete")
    _chain_opts(p)

    p = sub.add_parser("merge", help="merge a differencing image into its parent")
    p.add_argument("path")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    _chain_opts(p)

    p = sub.add_parser("compact", help="drop empty blocks and unused space (dynamic, differencing)")
    p.add_argument("path")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    _chain_opts(p)

    p = sub.add_parser("resize", help="grow an image")
    p.add_argument("path")
    p.add_argument("--size", type=_size, required=True)
    _chain_opts(p)

    p = sub.add_parser("map", help="allocation map as JSON (data / zero ranges)")
    p.add_argument("path")
    _source_format(p)
    _chain_opts(p)

    p = sub.add_parser("read", help="write a range of the virtual disk to stdout or a file")
    p.add_argument("path")
    p.add_argument("--offset", type=_offset, default=0)
    p.add_argument("--length", type=_size, help="default: to the end of the disk")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    _source_format(p)
    _chain_opts(p)

    p = sub.add_parser("serve", help="export images over NBD (nbdinfo, nbdcopy, qemu-img, fio...)",
                       description="Serve one or more images (any VHD type and chain, or raw) over NBD "
                       "until interrupted. Export names are the file names without their extension.")
    p.add_argument("paths", nargs="+", metavar="IMAGE")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="a unix socket path (nbd+unix:///NAME?socket=PATH)")
    where.add_argument("--port", type=_int_in(1, 65535, "a TCP port, 1 to 65535"), default=10809,
                       help="TCP port on --bind (default 10809)")
    p.add_argument("--bind", default="127.0.0.1", help="TCP address (default 127.0.0.1, this machine only)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--max-inflight-mib", type=int, default=128,
                   help="memory for requests in flight, all clients together (default 128; at most half "
                   "per client); past it the server stops reading requests until replies have left")
    _connection_opts(p)
    _chain_opts(p)

    p = sub.add_parser("mount", help="expose an image as DIR/disk through FUSE (and mount its filesystem)",
                       description="Serve the image over NBD and let nbdfuse expose it as DIR/disk, read-write. "
                       "With --fs MNT, also loop-mount the filesystem (of --partition N) at MNT. Root only. "
                       "`vhd umount DIR` undoes it all and flushes the image.")
    p.add_argument("path")
    p.add_argument("dir")
    p.add_argument("--fs", metavar="MNT", help="also mount the filesystem in the disk here")
    p.add_argument("--partition", type=int, help="with --fs: the partition holding it (1-based)")
    p.add_argument("--read-only", action="store_true")
    _chain_opts(p)
    p = sub.add_parser("umount", help="undo vhd mount: filesystem, FUSE file, server (flushes)")
    p.add_argument("dir")

    p = sub.add_parser("write", help="write stdin, a file or a pattern into the virtual disk")
    p.add_argument("path")
    p.add_argument("--offset", type=_offset, default=0)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-i", "--input", help="file to read (default: stdin)")
    src.add_argument("--pattern", type=lambda t: int(t, 0), help="a byte value to repeat, e.g. 0xab")
    p.add_argument("--length", type=_size, help="bytes to write (with --pattern)")
    p.add_argument("--source-format", default="auto", choices=["auto", "raw", "vhd"],
                   help="auto (default): the file must be a VHD; raw: write it as a raw disk")
    _chain_opts(p)
    return top


def _chain_kw(a: argparse.Namespace) -> dict[str, Any]:
    return {"allow_dirs": a.allow_dir, "ignore_timestamp": a.ignore_parent_timestamp}


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_create(a: argparse.Namespace) -> int:
    kind = a.type or ("differencing" if a.parent else "dynamic")
    if kind == "differencing":
        if not a.parent:
            raise UsageError("--type differencing needs --parent")
        if a.size is not None:
            raise UsageError("a differencing image takes its parent's size: drop --size")
        img: Any = create_differencing(a.path, a.parent, block_size=a.block_size, allow_dirs=a.allow_dir)
    elif a.parent:
        raise UsageError(f"--parent makes a differencing image, not {kind}")
    elif a.size is None:
        raise UsageError("--size is required")
    elif kind == "fixed":
        img = create_fixed(a.path, a.size)
    else:
        img = create_dynamic(a.path, a.size, block_size=a.block_size)
    try:
        _print(info(img))
    finally:
        img.close()
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    with open_image(a.path, **_chain_kw(a)) as img:
        _print(info(img))
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    report = check(a.path, repair=a.repair, azure=a.azure, **_chain_kw(a))
    if a.json:
        _print(report.to_json())
    else:
        for line in report.repaired:
            print(f"repaired: {line}")
        for p in report.problems:
            print(p)
        print(f"{a.path}: {'ok' if report.ok else 'PROBLEMS FOUND'}")
    return 0 if report.ok else 1


def cmd_convert(a: argparse.Namespace) -> int:
    result = convert(a.source, a.target, a.to, block_size=a.block_size, src_format=a.source_format,
                     show_progress=a.progress, sync=not a.no_sync, **_chain_kw(a))
    if a.source_format == "auto" and result["source_format"] == "raw":
        print(f"vhd convert: {a.source}: no VHD footer: read as a raw disk", file=sys.stderr)
    _print(result)
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    _print(merge(a.path, show_progress=a.progress, **_chain_kw(a)))
    return 0


def cmd_compact(a: argparse.Namespace) -> int:
    _print(compact(a.path, allow_dirs=a.allow_dir, show_progress=a.progress))
    return 0


def cmd_resize(a: argparse.Namespace) -> int:
    _print(resize(a.path, a.size, allow_dirs=a.allow_dir))
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    with closing(open_device(a.path, fmt=a.source_format, **_chain_kw(a))) as dev:
        _say_raw(a, dev)
        _print([e.to_json() for e in dev.allocation(0, dev.size)])
    return 0


def cmd_read(a: argparse.Namespace) -> int:
    with closing(open_device(a.path, fmt=a.source_format, **_chain_kw(a))) as dev:
        _say_raw(a, dev)
        length = dev.size - a.offset if a.length is None else a.length
        check_range(dev.size, a.offset, length)  # before any output file exists
        if not a.output:
            _copy_out(dev, a.offset, length, sys.stdout.buffer)
            return 0
        _refuse_output_over_source(dev, a.output)
        created = not os.path.exists(a.output)
        try:
            with open(a.output, "wb") as out:
                _copy_out(dev, a.offset, length, out)
        except BaseException:
            if created and os.path.isfile(a.output):
                os.unlink(a.output)  # no partial file left behind
            raise
    return 0


def _refuse_output_over_source(dev: Any, output: str) -> None:
    """Opening -o truncates it: refuse a path that is (or links to) a file
    the read comes from, the image or any parent of its chain."""
    try:
        out = os.stat(output)
    except OSError:
        return  # not there yet (or not reachable: open() will say why)
    members = dev.chain() if hasattr(dev, "chain") else [dev]
    for member in members:
        fd = getattr(getattr(member, "file", None), "fd", -1)
        if fd >= 0 and os.path.samestat(os.fstat(fd), out):
            raise UsageError(f"{output} is the image being read ({member.file.name}): "
                             "writing the output there would destroy it")


def _copy_out(dev: Any, offset: int, length: int, out: Any) -> None:
    pos = offset
    while pos < offset + length:
        n = min(CHUNK, offset + length - pos)
        out.write(dev.read(pos, n))
        pos += n


def cmd_write(a: argparse.Namespace) -> int:
    if a.pattern is not None:
        if a.length is None:
            raise UsageError("--pattern needs --length")
        if not 0 <= a.pattern <= 255:
            raise UsageError("--pattern is one byte: 0 to 255")
    with closing(open_device(a.path, writable=True, fmt=a.source_format, **_chain_kw(a))) as dev:
        if a.source_format == "auto" and _is_raw(dev):  # a typo must not overwrite a file
            raise VhdError(f"{a.path}: no VHD footer: not written; to write it as a raw disk, "
                           "pass --source-format raw")
        if a.pattern is not None:
            check_range(dev.size, a.offset, a.length)  # before any buffer is built
            _write_pattern(dev, a.offset, a.length, a.pattern)
        else:
            with (open(a.input, "rb") if a.input else sys.stdin.buffer) as f:
                _write_input(dev, a.offset, f)
        dev.flush()
    return 0


def _write_input(dev: Any, offset: int, f: Any) -> None:
    """Write all of `f` at `offset`, in CHUNK pieces; an input too long for
    the disk is refused before anything is written. A regular file's length
    is known; a pipe is first copied into a temporary file (kept in memory
    up to CHUNK) to learn it."""
    length = _regular_file_left(f)
    if length is not None:
        check_range(dev.size, offset, length)
        _copy_in(dev, offset, f, length)
        return
    room = max(dev.size - offset, 0)
    with tempfile.SpooledTemporaryFile(max_size=CHUNK) as spool:
        total = 0
        while total <= room:  # one byte more than fits tells a too-long input
            piece = f.read(min(CHUNK, room + 1 - total))
            if not piece:
                break
            spool.write(piece)
            total += len(piece)
        check_range(dev.size, offset, total)
        spool.seek(0)
        _copy_in(dev, offset, spool, total)


def _regular_file_left(f: Any) -> int | None:
    """Bytes left to read in `f` if it is a regular file, else None."""
    try:
        st = os.fstat(f.fileno())
        return max(st.st_size - f.tell(), 0) if stat.S_ISREG(st.st_mode) else None
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


def _copy_in(dev: Any, offset: int, f: Any, length: int) -> None:
    pos, end = offset, offset + length
    while pos < end and (piece := f.read(min(CHUNK, end - pos))):
        dev.write(pos, piece)
        pos += len(piece)


def _write_pattern(dev: Any, offset: int, length: int, value: int) -> None:
    chunk = bytes([value]) * min(length, CHUNK)
    pos = offset
    while pos < offset + length:
        n = min(len(chunk), offset + length - pos)
        dev.write(pos, chunk if n == len(chunk) else chunk[:n])
        pos += n


def _connection_opts(p: argparse.ArgumentParser) -> None:
    """The serve options that bound what clients can hold (vhd serve and hostcache serve)."""
    from .nbd import MAX_CONNECTIONS, STALL_TIMEOUT

    p.add_argument("--max-connections", type=_int_in(1, 10_000, "1 to 10000"), default=MAX_CONNECTIONS,
                   help=f"clients served at once (default {MAX_CONNECTIONS}); one more is closed at once")
    p.add_argument("--stall-timeout", type=_int_in(1, 3600, "1 to 3600 seconds"), default=int(STALL_TIMEOUT),
                   help=f"seconds a client may take to finish its handshake, to send the data of a "
                   f"large write, or to take some of its replies (default {STALL_TIMEOUT:.0f}); a slower one "
                   "is closed")


def cmd_serve(a: argparse.Namespace) -> int:
    from .nbd import Export, NbdServer, claim_socket, export_name, run_server, server_budget, text

    exports: dict[str, Export] = {}
    devices = []
    budget = server_budget(a.max_inflight_mib, a.max_connections)
    if a.socket:
        claim_socket(a.socket)  # before the images are opened: a clear refusal, not a lock error
    try:
        for path in a.paths:
            name = export_name(path)
            if name in exports:
                raise UsageError(f"two images would both be exported as {name!r}")
            dev = open_device(path, writable=not a.read_only, **_chain_kw(a))
            devices.append(dev)
            exports[name] = Export(name, dev, text(os.path.basename(path)), a.read_only)  # not the full path
        run_server(NbdServer(exports, budget, a.max_connections, a.stall_timeout), a.socket, a.bind, a.port)
    except KeyboardInterrupt:
        pass
    finally:
        for dev in devices:
            dev.close()
    return 0


def cmd_mount(a: argparse.Namespace) -> int:
    from .mount import mount

    _print(mount(a.path, a.dir, readonly=a.read_only, fs=a.fs, partition=a.partition, allow_dirs=a.allow_dir))
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    from .mount import umount

    _print(umount(a.dir))
    return 0


COMMANDS = {"create": cmd_create, "info": cmd_info, "check": cmd_check, "convert": cmd_convert,
            "merge": cmd_merge, "compact": cmd_compact, "resize": cmd_resize, "map": cmd_map,
            "read": cmd_read, "write": cmd_write, "serve": cmd_serve, "mount": cmd_mount, "umount": cmd_umount}


def closed_pipe() -> int:
    """stdout's reader went away (`| head`): stop quietly, as cat does. stdout
    becomes /dev/null so the flush at exit does not complain either. The
    stamp and hostcache commands end the same way."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def standard_streams() -> None:
    """A command started with stdout or stderr closed (`>&-`) finds sys.stdout
    (or sys.stderr) None: its first flush was an AttributeError traceback, and
    an error printed to a None stderr went to stdout, into the JSON. The closed
    descriptor becomes /dev/null (so no file opened later takes descriptor 1 or
    2 and receives output): the command runs, its output discarded, as with a
    closed pipe. The stamp and hostcache commands start with it too."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))


def main(argv: Sequence[str] | None = None) -> int:
    standard_streams()
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.cmd](args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except UsageError as e:
        print(f"vhd {args.cmd}: {e}", file=sys.stderr)
        return 2
    except VhdError as e:
        print(f"vhd {args.cmd}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return closed_pipe()
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"vhd {args.cmd}:{where} {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vhd {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # a valid image of many scattered blocks, under a memory limit (ulimit -v)
        named = getattr(args, "path", None) or getattr(args, "source", None) or " ".join(getattr(args, "paths", []))
        print(f"vhd {args.cmd}: out of memory{' with ' + named if named else ''}: an open image holds up to "
              "about 1.7 KB per allocated block (docs/formats/vhd.md, \"Memory\"); allow more (ulimit -v)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
