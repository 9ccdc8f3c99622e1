"""Range tables in LMDB against a plain list: overlapping() finds exactly the
ranges a linear scan finds, whatever prefixes lie around the one asked for."""

from __future__ import annotations

import lmdb
from hypothesis import given, settings
from hypothesis import strategies as st

from stamp import ranges as rg

U64 = rg.U64


@st.composite
def tables(draw):
    """Non-overlapping ranges under prefixes 0..3, some prefixes empty."""
    out: dict[int, list[tuple[int, int]]] = {}
    for prefix in range(4):
        pos, ranges = 0, []
        for _ in range(draw(st.integers(0, 12))):
            pos += draw(st.sampled_from([0, 1, 3, 50]))
            n = draw(st.integers(1, 20))
            ranges.append((pos, pos + n))
            pos += n
        out[prefix] = ranges
    return out


@settings(max_examples=150, deadline=None)
@given(tables(), st.integers(0, 3), st.integers(0, 400), st.integers(1, 60), st.booleans())
def test_overlapping_equals_a_linear_scan(tmp_path_factory, table, prefix, start, length, touching):
    env = lmdb.open(str(tmp_path_factory.mktemp("rg")), max_dbs=2, map_size=1 << 24)
    db = env.open_db(b"t")
    with env.begin(write=True) as txn:
        for p, ranges in table.items():
            for s, e in ranges:
                txn.put(U64.pack(p) + U64.pack(s), rg.END.pack(e) + b"v", db=db)
        got = [(s, e) for s, e, _ in rg.overlapping(txn, db, U64.pack(prefix), start, start + length, touching)]
    env.close()
    lo, hi = (start - 1, start + length + 1) if touching else (start, start + length)
    assert got == [(s, e) for s, e in table[prefix] if s < hi and e > lo]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5)), max_size=40), st.integers(1, 7),
       st.integers(0, 60))
def test_resumed_lists_what_one_iterator_does_each_chunk_from_its_own(gaps, chunk, start):
    """resumed() over a fixed list of ranges: the same ranges from `start`,
    every iterator it opened closed before the next one opens."""
    ranges, pos = [], 0
    for gap, n in gaps:
        ranges.append((pos + gap, n))
        pos += gap + n
    opened: list[dict[str, bool]] = []

    def open_at(at: int):
        state = {"closed": False}
        assert all(o["closed"] for o in opened)  # nothing is held between chunks
        opened.append(state)
        try:
            yield from (r for r in ranges if r[0] >= at)
        finally:
            state["closed"] = True

    assert list(rg.resumed(open_at, start, chunk)) == [r for r in ranges if r[0] >= start]
    assert all(o["closed"] for o in opened) and len(opened) >= 1
