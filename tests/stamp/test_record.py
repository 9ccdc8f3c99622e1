"""The extent record format: round trips, and corruption of any kind caught."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stamp import record as rec


@pytest.mark.parametrize("n", [1, 511, 4096, 4097, 10000, rec.MAX_RECORD])
def test_any_subrange_reads_back(n):
    data = os.urandom(n)
    raw = rec.pack_record(data, 8192)
    assert len(raw) == rec.record_size(n)
    assert rec.parse_header(raw[:16], 8192) == n
    for inner, length in [(0, n), (n - 1, 1), (n // 3, max(1, n // 3)), (min(4095, n - 1), 1)]:
        sp = rec.span(8192, n, inner, length)
        got = rec.verify_span(raw[sp.file_offset - 8192:sp.file_offset - 8192 + sp.file_length], 8192, sp, length)
        assert got == data[inner:inner + length]


def test_corruption_and_misplacement_are_caught():
    data = os.urandom(9000)
    raw = bytearray(rec.pack_record(data, 4096))
    sp = rec.span(4096, 9000, 0, 9000)
    assert rec.verify_span(bytes(raw), 4096, sp, 9000) == data
    for at in (0, 5, 9, 16, 24, 5000, len(raw) - 1):  # the header, a checksum, data in each chunk
        bad = bytearray(raw)
        bad[at] ^= 1
        with pytest.raises(rec.RecordError):
            rec.verify_span(bytes(bad), 4096, sp, 9000)
        with pytest.raises(rec.RecordError):
            rec.read_record(lambda n, o, b=bytes(bad): b[o - 4096:o - 4096 + n], 4096, 4096 + len(raw))
    with pytest.raises(rec.RecordError):  # the same bytes read as if stored elsewhere
        rec.verify_span(bytes(raw), 8192, rec.span(8192, 9000, 0, 9000), 9000)
    with pytest.raises(rec.RecordError):
        rec.parse_header(bytes(raw[:16]), 4608)


def test_scan_stops_at_a_torn_record():
    a, b = rec.pack_record(b"a" * 5000, 4096), None
    b = rec.pack_record(b"b" * 3000, 4096 + len(a))
    buf = bytes(4096) + a + b[:-10]
    assert rec.scan(lambda n, o: buf[o:o + n], 4096, len(buf)) == 4096 + len(a)


@given(st.binary(min_size=0, max_size=64), st.integers(0, 2**40))
def test_header_parser_closed_error_set(raw, offset):
    try:
        rec.parse_header(raw, offset)
    except rec.RecordError:
        pass


def test_layout_is_the_documented_one():
    """Header, then an 8-byte seeded checksum before each 4 KiB chunk, built
    by hand: the fast packing paths (one chunk; checksums by map) must land as
    this layout."""
    import struct

    import xxhash
    data = os.urandom(3 * 4096 + 512)
    at = 3 * 4096
    head = b"DSR1" + struct.pack("<I", len(data))
    want = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head, seed=at))
    for i in range(0, len(data), 4096):
        chunk = data[i:i + 4096]
        want += struct.pack("<Q", xxhash.xxh3_64_intdigest(chunk, seed=(at << 12) ^ (i // 4096))) + chunk
    assert rec.pack_record(data, at) == want
    one = data[:4096]
    want = head[:4] + struct.pack("<I", 4096)
    want += struct.pack("<QQ", xxhash.xxh3_64_intdigest(want, seed=at), xxhash.xxh3_64_intdigest(one, seed=at << 12))
    assert rec.pack_record(memoryview(one), at) == want + one


def test_one_chunk_reads_check_their_chunk():
    """The one-chunk read path (every 4 KiB read) checks the chunk it reads,
    with its index in the seed, in a small record and inside a large one."""
    data = os.urandom(3 * 4096)
    raw = rec.pack_record(data, 4096)
    for inner, length in [(4096, 4096), (8192 + 512, 1024)]:
        sp = rec.span(4096, len(data), inner, length)
        part = raw[sp.file_offset - 4096:sp.file_offset - 4096 + sp.file_length]
        assert rec.verify_span(part, 4096, sp, length) == data[inner:inner + length]
        for at in (0, 8, len(part) - 1):  # the checksum, the first and last data byte
            bad = bytearray(part)
            bad[at] ^= 0x40
            with pytest.raises(rec.RecordError):
                rec.verify_span(bytes(bad), 4096, sp, length)
        wrong = rec.span(4096, len(data), inner - 4096, length)  # the chunk before: another seed
        with pytest.raises(rec.RecordError):
            rec.verify_span(part, 4096, wrong._replace(file_length=len(part)), length)


@pytest.mark.parametrize("chunk", [0, 1, 517, 1023])
def test_a_corrupt_chunk_of_a_large_read_is_named(chunk):
    """A read of many chunks (checked in one pass) names the chunk that
    fails, whether its checksum or its data was damaged, and reads that
    start past it are not troubled by it."""
    data = os.urandom(rec.MAX_RECORD)
    raw = rec.pack_record(data, 8192)
    sp = rec.span(8192, len(data), 4096, len(data) - 4096)  # from chunk 1: no header
    place = 16 + chunk * (rec.CHUNK + rec.CHECK)
    for at in (place, place + rec.CHECK + 100):
        bad = bytearray(raw)
        bad[at] ^= 1
        window = bytes(bad[sp.file_offset - 8192:sp.file_offset - 8192 + sp.file_length])
        if chunk == 0:  # outside the span: it reads back whole
            assert rec.verify_span(window, 8192, sp, len(data) - 4096) == data[4096:]
            continue
        with pytest.raises(rec.RecordError, match=f"chunk {chunk} fails"):
            rec.verify_span(window, 8192, sp, len(data) - 4096)
