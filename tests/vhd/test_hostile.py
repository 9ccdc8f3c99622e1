"""Files an adversary hands us: FIFOs, folders, symlink loops and hostile
locators as images or parents. Every one is a VhdError naming the file, at
once (never a hang, never an OSError or OverflowError from the API)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import vhd
from vhd import dynamic_header as dh
from vhd.errors import FileTypeError, ParentNotFoundError

from .test_chain import make_chain

MIB = 1 << 20


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The vhd command, bounded: a hang is a failure, not a stuck test run."""
    try:
        return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vhd {' '.join(args)} did not return within {timeout} s")


def test_a_fifo_as_the_image_is_refused_at_once(tmp_path):
    fifo = tmp_path / "x.vhd"
    os.mkfifo(fifo)
    for cmd in ("info", "check", "read", "map"):
        r = cli(cmd, str(fifo))
        assert r.returncode == 1, r.stderr
        assert "FIFO" in r.stderr and str(fifo) in r.stderr and "Traceback" not in r.stderr


def test_a_fifo_as_the_parent_is_refused_at_once(tmp_path):
    paths = make_chain(tmp_path, 1)
    os.unlink(paths[0])
    os.mkfifo(paths[0])
    r = cli("info", paths[1])
    assert r.returncode == 1 and "FIFO" in r.stderr and paths[0] in r.stderr, r.stderr
    with pytest.raises(FileTypeError, match="FIFO"):
        vhd.open(paths[1])


def test_folders_and_symlink_loops_are_vhd_errors_naming_the_file(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for bad in (tmp_path, tmp_path / "a"):
        with pytest.raises(FileTypeError, match=str(bad)):
            vhd.open(bad)
        with pytest.raises(vhd.VhdError, match=str(bad)):
            vhd.check(str(bad))
    paths = make_chain(tmp_path, 1)
    os.unlink(paths[0])
    os.mkdir(paths[0])  # the parent's name is a folder now
    with pytest.raises(FileTypeError, match="l0.vhd"):
        vhd.open(paths[1])
    os.rmdir(paths[0])
    os.symlink(paths[0], paths[0])  # a link to itself
    with pytest.raises(vhd.VhdError, match="l0.vhd"):
        vhd.open(paths[1])


def _set_locator(path: str, index: int, *, offset: int | None = None, text: str | None = None) -> None:
    """Point locator `index` at `offset`, or store `text` in its data space."""
    raw = bytearray(open(path, "rb").read())
    at = 512 + 576 + 24 * index
    code, space, length, res, off = struct.unpack_from(">IIIIQ", raw, at)
    if text is not None:
        data = text.encode("utf-16-le")
        raw[off:off + space] = data.ljust(space, b"\0")
        length = len(data)
    struct.pack_into(">IIIIQ", raw, at, code, space, length, res, off if offset is None else offset)
    struct.pack_into(">I", raw, 512 + 36, dh.checksum(raw[512:1536]))
    open(path, "wb").write(raw)


@pytest.mark.parametrize("offset", [1 << 63, (1 << 64) - 512, 1 << 40])
def test_a_locator_offset_past_the_file_does_not_hide_the_next_one(tmp_path, offset):
    paths = make_chain(tmp_path, 1)
    _set_locator(paths[1], 0, offset=offset)  # W2ru unreadable; W2ku (absolute) still good
    os.rename(tmp_path / "l0.vhd", tmp_path / "renamed.vhd")  # and the parent name is stale
    _set_locator(paths[1], 1, text=str(tmp_path / "renamed.vhd"))
    with vhd.open(paths[1]) as c:
        assert c.read(4096, 1) == b"1"
    r = cli("check", paths[1])  # reported as damage, without a traceback
    assert r.returncode == 1 and "parent locator 0" in r.stdout and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("text", ["", ".", ".\\", "sub", "..\\x\\.."])
def test_a_locator_naming_a_folder_is_skipped(tmp_path, text):
    paths = make_chain(tmp_path, 1)
    (tmp_path / "sub").mkdir()
    _set_locator(paths[1], 0, text=text)  # W2ru names the child's own folder (or one near it)
    with vhd.open(paths[1]) as c:  # W2ku still finds the parent
        assert c.read(4096, 1) == b"1"
    os.unlink(paths[0])
    with pytest.raises(vhd.VhdError):
        vhd.open(paths[1])
    _set_locator(paths[1], 0, text="")
    with pytest.raises(ParentNotFoundError, match="W2ru locator: '' names no file"):
        vhd.open(paths[1])


def test_a_format_error_in_a_parent_names_the_parents_file(tmp_path):
    paths = make_chain(tmp_path, 2)
    raw = bytearray(open(paths[0], "rb").read())
    raw[-512:-504] = b"garbage!"
    raw[:8] = b"garbage!"
    open(paths[0], "wb").write(raw)
    with pytest.raises(vhd.FormatError, match=r"^\S*l0\.vhd: footer: bad cookie"):
        vhd.open(paths[2])
    r = cli("info", paths[2])
    assert r.returncode == 1 and "l0.vhd" in r.stderr, r.stderr


def test_a_block_over_the_locator_data_is_refused(tmp_path):
    paths = make_chain(tmp_path, 0)
    child = str(tmp_path / "c.vhd")
    vhd.create(child, parent=paths[0], block_size=64 << 10).close()  # no blocks yet
    raw = bytearray(open(child, "rb").read())
    loc_at = struct.unpack_from(">Q", raw, 512 + 576 + 16)[0]
    footer = raw[-512:]
    raw[-512:] = bytes(512)
    raw += bytes(64 << 10) + footer  # room, so only the locator is in the way
    struct.pack_into(">I", raw, 1536, loc_at // 512)  # block 0 starts on the W2ru data
    open(child, "wb").write(raw)
    with pytest.raises(vhd.FormatError, match="parent locator 0"):
        vhd.open(child, writable=True)
    assert not vhd.check(child).ok


def test_check_refuses_a_sparse_file_that_is_not_whole_sectors(tmp_path):
    path = str(tmp_path / "d.vhd")
    vhd.create(path, MIB).close()
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-512] + b"\0" * 100 + raw[-512:])
    with pytest.raises(vhd.FormatError, match="sectors"):
        vhd.open(path)
    report = vhd.check(path)
    assert not report.ok and any("sectors" in p.message for p in report.problems)


def test_a_killed_compacts_leftovers_are_removed_by_the_next_one(tmp_path):
    path = str(tmp_path / "d.vhd")
    with vhd.create(path, MIB) as img:
        img.write(0, b"x" * 512)
    stale = [tmp_path / "d.vhd.rewrite-4242", tmp_path / "d.vhd.rewrite-1"]
    for f in stale:
        f.write_bytes(b"half a rewrite")
    keep = [tmp_path / "d.vhd.rewrite-notes", tmp_path / "e.vhd.rewrite-7"]
    for f in keep:
        f.write_bytes(b"not ours")
    vhd.compact(path)
    assert not any(f.exists() for f in stale) and all(f.exists() for f in keep)
    with vhd.open(path) as img:
        assert img.read(0, 512) == b"x" * 512


def test_a_child_with_a_locator_outside_the_file_merges_and_compacts(tmp_path):
    paths = make_chain(tmp_path, 1)
    _set_locator(paths[1], 0, offset=1 << 63)  # found by W2ku; W2ru is damage
    vhd.merge(paths[1])
    with vhd.open(paths[1]) as c:
        assert c.read(4096, 1) == b"1" and c.file.size() < 1 << 20
    with pytest.raises(vhd.FormatError, match="parent locator"):
        vhd.compact(paths[1])  # the rewrite copies locators: it names the damaged one


def _hostile_table(path: str, size: int, block_size: int, entries: int) -> None:
    """A dynamic image of `size` bytes whose BAT has `entries` entries, all
    zero (every one "allocated" at sector 0) and left a hole in a sparse file."""
    header = dh.DynamicHeader(1536, entries, block_size)
    footer = vhd.Footer(vhd.DiskType.DYNAMIC, size, size, vhd.chs_for_size(size),
                        __import__("uuid").uuid4(), 0, 512)
    end = 1536 + -(-entries * 4 // 512) * 512
    with open(path, "wb") as f:
        f.write(footer.pack() + header.pack())
        f.truncate(end)
        f.seek(end)
        f.write(footer.pack())


def _limited(*args: str, limit: int = 1 << 30) -> subprocess.CompletedProcess[str]:
    """The vhd command with `limit` bytes of address space (1 GiB: a table
    read or walked whole, entry by entry, does not fit)."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        return subprocess.run([sys.executable, "-m", "vhd", *args], capture_output=True, text=True,
                              timeout=120, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vhd {' '.join(args)} did not return within 120 s")


@pytest.mark.parametrize("size,block,entries", [(8 * MIB, 2 * MIB, 1 << 28), (64 << 30, 4096, 1 << 24)],
                         ids=["a 1 GiB table for an 8 MiB disk", "a zero table of 16M entries"])
def test_a_huge_hostile_table_is_refused_in_bounded_memory(tmp_path, size, block, entries):
    path = str(tmp_path / "t.vhd")
    _hostile_table(path, size, block, entries)
    for cmd in ("info", "check", "map"):
        r = _limited(cmd, path)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "MemoryError" not in r.stderr, (cmd, r.stderr)
        assert "BAT" in r.stdout + r.stderr, (cmd, r.stdout, r.stderr)


def test_running_out_of_descriptors_is_said_as_such(tmp_path):
    """EMFILE while opening a chain was a FileTypeError, "cannot be opened as
    an image file", as if the file were a FIFO or a folder."""
    import resource

    paths = make_chain(tmp_path, 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    held = []
    try:
        while True:  # use up every descriptor
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        os.close(held.pop())  # one left: the image opens, its parent does not
        with pytest.raises(vhd.VhdError) as e:
            vhd.open(paths[-1])
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not isinstance(e.value, FileTypeError) and "too many open files" in str(e.value).lower()
    assert "ulimit -n" in str(e.value)


def test_the_map_of_a_big_empty_image_with_small_blocks_fits_in_bounded_memory(tmp_path):
    """allocation() made one Extent per block before joining them: `vhd map`
    of an empty 16 GiB image with 4 KiB blocks (4M blocks) took 900 MB, and
    the 2040 GiB such an image may have would take over 100 GB."""
    path = str(tmp_path / "big.vhd")
    vhd.create(path, 16 << 30, block_size=4096).close()
    with vhd.open(path, writable=True) as img:
        img.write(5 << 30, b"x" * 4096)
    r = _limited("map", path, limit=600 << 20)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"offset": 0, "length": 5 << 30, "state": "zero"},
                                    {"offset": 5 << 30, "length": 4096, "state": "data"},
                                    {"offset": (5 << 30) + 4096, "length": (11 << 30) - 4096, "state": "zero"}]


def test_a_2040_gib_image_of_4_kib_blocks_opens_reads_and_writes_in_bounded_memory(tmp_path):
    """The largest dynamic image the specification allows, with its smallest
    blocks: 534M BAT entries (a 2 GiB table on disk). Opening it built an
    array of the whole table plus per-block state, about 7 GB, in `vhd info`,
    `check`, `map`, `read` and `write` alike; now what is held grows with the
    allocated blocks only."""
    path = str(tmp_path / "huge.vhd")
    size = 2040 << 30
    vhd.create(path, size, block_size=4096).close()
    limit = 400 << 20
    r = _limited("write", path, "--offset", str(1000 << 30), "--pattern", "0xab", "--length", "8K", limit=limit)
    assert r.returncode == 0, r.stderr
    r = _limited("info", path, limit=limit)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["virtual_size"] == size and info["allocated_blocks"] == 2
    out = tmp_path / "out"
    r = _limited("read", path, "--offset", str((1000 << 30) - 4096), "--length", "16K", "-o", str(out),
                 limit=limit)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == bytes(4096) + b"\xab" * 8192 + bytes(4096)
    r = _limited("map", path, limit=limit)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"offset": 0, "length": 1000 << 30, "state": "zero"},
                                    {"offset": 1000 << 30, "length": 8192, "state": "data"},
                                    {"offset": (1000 << 30) + 8192, "length": (1040 << 30) - 8192,
                                     "state": "zero"}]
    r = _limited("check", path, limit=limit)
    assert r.returncode == 0, (r.stdout, r.stderr)


def _declaring(path: str, what: str) -> None:
    """A small image (a differencing one for the locator cases) with one
    declared size changed to what the file cannot hold, checksums fixed."""
    import dataclasses

    folder = os.path.dirname(path)
    if what == "a fixed disk's current size of 2**62":
        vhd.create(path, MIB, type="fixed").close()
        with open(path, "r+b") as f:
            f.seek(-512, os.SEEK_END)
            footer = vhd.Footer.unpack(f.read(512))
            f.seek(-512, os.SEEK_END)
            f.write(dataclasses.replace(footer, current_size=1 << 62).pack())
        return
    vhd.create(os.path.join(folder, "p.vhd"), 4 * MIB).close()
    vhd.create(path, parent=os.path.join(folder, "p.vhd")).close()
    with open(path, "r+b") as f:
        f.seek(512)
        header = dh.DynamicHeader.unpack(f.read(dh.SIZE), 512)
        loc = header.locators[0]
        changed = {
            "a BAT offset of 2**63": dataclasses.replace(header, table_offset=1 << 63),
            "2**32-1 table entries": dataclasses.replace(header, max_table_entries=0xFFFFFFFF),
            "a locator length of 2**31": dataclasses.replace(header, locators=(
                dataclasses.replace(loc, data_length=1 << 31, data_space=1 << 31),) + header.locators[1:]),
            "a locator offset of 2**63": dataclasses.replace(header, locators=(
                dataclasses.replace(loc, data_offset=1 << 63),) + header.locators[1:]),
            "a locator space of 2**32-1 sectors": dataclasses.replace(header, locators=(
                dataclasses.replace(loc, data_space=0xFFFFFFFF),) + header.locators[1:]),
        }[what]
        f.seek(512)
        f.write(changed.pack())


@pytest.mark.parametrize("what", ["a fixed disk's current size of 2**62", "a BAT offset of 2**63",
                                  "2**32-1 table entries", "a locator length of 2**31",
                                  "a locator offset of 2**63", "a locator space of 2**32-1 sectors"])
def test_a_declared_size_the_file_cannot_have_is_a_clear_error_in_bounded_memory(tmp_path, what):
    path = str(tmp_path / "d.vhd")
    _declaring(path, what)
    for cmd in ("info", "check", "map"):
        r = _limited(cmd, path, limit=400 << 20)
        assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, (cmd, r.stderr)
        assert r.returncode in (0, 1), (cmd, r.returncode, r.stderr)
        if cmd == "check":
            assert r.returncode == 1, (what, r.stdout)


def test_an_image_of_scattered_blocks_too_large_for_the_memory_limit_is_a_clear_error(tmp_path):
    """One allocated entry in each BAT page (64 GiB of 4 KiB blocks: 131072
    pages, about 80 MB kept) is a valid image, held at its documented bound;
    with less address space than that, every command says it ran out of
    memory, never a MemoryError traceback."""
    path = str(tmp_path / "t.vhd")
    size, block = 64 << 30, 4096
    entries = size // block
    header = dh.DynamicHeader(1536, entries, block)
    footer = vhd.Footer(vhd.DiskType.DYNAMIC, size, size, vhd.chs_for_size(size),
                        __import__("uuid").uuid4(), 0, 512)
    first = (1536 + entries * 4) // 512
    table = bytearray(b"\xff" * (entries * 4))
    for n, b in enumerate(range(0, entries, 128)):
        struct.pack_into(">I", table, 4 * b, first + n * 9)  # a 512-byte bitmap and 4 KiB of data each
    with open(path, "wb") as f:
        f.write(footer.pack() + header.pack() + table)
        f.truncate((first + entries // 128 * 9) * 512)
        f.seek(0, os.SEEK_END)
        f.write(footer.pack())
    for cmd in ("info", "check", "map"):
        r = _limited(cmd, path, limit=100 << 20)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "MemoryError" not in r.stderr, (cmd, r.stderr)
        assert "out of memory" in r.stderr and path in r.stderr, (cmd, r.stderr)


def test_check_counts_a_hole_of_a_table_claiming_2_to_the_32_entries_without_reading_it(tmp_path):
    """A header claiming 2**32 - 1 entries over a 16 GiB hole (zeros: every
    entry "allocated") cost `vhd check` 16 GiB of reads (100 s); a hole's
    entries are counted from its length, and its data is never read."""
    from vhd.fileio import OsFile

    path = str(tmp_path / "t.vhd")
    _hostile_table(path, 8 * MIB, 2 * MIB, 0xFFFFFFFF)

    class Counting(OsFile):
        read = 0

        def pread(self, length: int, offset: int) -> bytes:
            Counting.read += length
            return super().pread(length, offset)

    report = vhd.check(Counting(path))
    assert Counting.read < 64 * MIB, Counting.read
    warned = [p for p in report.problems if "entries past the 4" in p.message]
    assert warned and str(0xFFFFFFFF - 4) in warned[0].message, report.problems
