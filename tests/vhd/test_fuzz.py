"""A mutation fuzzer over real files: each case damages one region of a
small image (footer, mirror, dynamic header, BAT, parent locators, sector
bitmaps) of a fixed, dynamic or differencing image or of a differencing
image's parent, recomputing the checksums in half the cases so the deeper
checks are reached; then opens it (reading everything), writes to it,
checks it, repairs it, compacts it and merges it. The only exception allowed is VhdError, and each
case has a time limit (a hang fails). A short run by default; a long one
with DISKSTAMP_SLOW=1."""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import traceback

import pytest

import vhd
from vhd import dynamic_header as dh
from vhd import footer as ft

CASES = 3000 if os.environ.get("DISKSTAMP_SLOW") else 120
LIMIT_S = 20
REGIONS = ("footer", "mirror", "header", "bat", "locators", "bitmaps")
MIB = 1 << 20


class Hang(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001 - the signal handler's signature
    raise Hang()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz-originals")
    with vhd.create(d / "p.vhd", MIB, block_size=64 << 10) as p:
        p.write(0, b"p" * 8192)
        p.write(300 << 10, b"q" * 512)
    with vhd.create(d / "c.vhd", parent=d / "p.vhd", block_size=64 << 10) as c:
        c.write(4096, b"c" * 1024)
        c.write(700 << 10, b"d" * 70000)
    with vhd.create(d / "f.vhd", 256 << 10, type="fixed") as f:
        f.write(0, b"f" * 512)
    return {n: (d / n).read_bytes() for n in ("p.vhd", "c.vhd", "f.vhd")}


def _regions(raw: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of each structure in a (valid) image."""
    out: dict[str, list[tuple[int, int]]] = {"footer": [(len(raw) - 512, 512)]}
    if raw[:8] != ft.COOKIE:
        return out
    h = dh.DynamicHeader.unpack(raw[512:1536], 512)
    out["mirror"] = [(0, 512)]
    out["header"] = [(512, 1024)]
    out["bat"] = [(h.table_offset, 4 * h.max_table_entries)]
    out["locators"] = [(512 + 576, 192)] + [(loc.data_offset, max(loc.data_length, 1))
                                            for loc in h.locators if loc.platform]
    bat = struct.unpack_from(f">{h.max_table_entries}I", raw, h.table_offset)
    out["bitmaps"] = [(e * 512, 512) for e in bat if e != 0xFFFFFFFF]
    return out


def _mutate(raw: bytearray, rng: random.Random, region: str) -> None:
    ranges = _regions(bytes(raw)).get(region) or _regions(bytes(raw))["footer"]
    for _ in range(rng.randint(1, 4)):
        at, n = rng.choice(ranges)
        pos = at + rng.randrange(n)
        if rng.random() < 0.5:
            raw[pos] ^= 1 << rng.randrange(8)
        else:
            raw[pos] = rng.choice([0, 0xFF, rng.randrange(256)])
    if rng.random() < 0.5:  # valid checksums: reach the checks behind them
        for at in (0, len(raw) - 512):
            if raw[at:at + 8] == ft.COOKIE:
                struct.pack_into(">I", raw, at + 64, ft.checksum(raw[at:at + 512]))
        if raw[512:520] == dh.COOKIE:
            struct.pack_into(">I", raw, 512 + 36, dh.checksum(raw[512:1536]))


def _exercise(path: str, chain_top: str) -> None:
    """Everything a user may do with the damaged file; VhdError is fine."""
    for step in (_read_all, _write_some, _check, _repair, _compact, _merge):
        try:
            step(path if step is not _read_all else chain_top)
        except vhd.VhdError:
            pass


def _read_all(path: str) -> None:
    with vhd.open(path) as img:
        for off in range(0, img.size, 256 << 10):
            img.read(off, min(256 << 10, img.size - off))
        img.allocation(0, img.size)


def _write_some(path: str) -> None:
    with vhd.open(path, writable=True, ignore_timestamp=True) as img:
        for off in (0, img.size // 2 + 100, img.size - 4096):
            img.write(off, b"w" * 4096)
        img.flush()


def _compact(path: str) -> None:
    vhd.compact(path)


def _merge(path: str) -> None:
    vhd.merge(path, ignore_timestamp=True)


def _check(path: str) -> None:
    vhd.check(path).to_json()


def _repair(path: str) -> None:
    report = vhd.check(path, repair=True)
    if report.repaired:
        assert report.ok or any(p.where.startswith("parent") for p in report.problems), report.to_json()


@pytest.mark.parametrize("part", range(4))
def test_mutated_files_give_values_or_vhd_errors_and_never_hang(tmp_path, originals, part):
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in range(part, CASES, 4):
            rng = random.Random(case)
            target = rng.choice(["c.vhd", "c.vhd", "p.vhd", "f.vhd"])
            region = rng.choice(REGIONS)
            d = tmp_path / str(case)
            d.mkdir()
            for name, raw in originals.items():
                (d / name).write_bytes(raw)
            os.utime(d / "p.vhd", ns=(0, 10 ** 9))  # as old as a parent can be: its child accepts it
            raw = bytearray(originals[target])
            _mutate(raw, rng, region)
            (d / target).write_bytes(raw)
            if target == "p.vhd":
                os.utime(d / "p.vhd", ns=(0, 10 ** 9))  # bit rot, not a write
            top = str(d / ("f.vhd" if target == "f.vhd" else "c.vhd"))
            signal.alarm(LIMIT_S)
            try:
                _exercise(str(d / target), top)
            except Hang:
                pytest.fail(f"case {case} ({target}, {region}) did not finish in {LIMIT_S} s")
            except Exception:
                pytest.fail(f"case {case} ({target}, {region}): {traceback.format_exc()}")
            finally:
                signal.alarm(0)
            shutil.rmtree(d)
    finally:
        signal.signal(signal.SIGALRM, old)
