"""Listings hold one page, not the whole container or blob: List Blobs
reads at most maxresults + 1 names from the index at a time, and answers
(entries, prefixes, NextMarker) as a model over the whole name list does."""

from __future__ import annotations

import asyncio
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.test_utils import TestServer

from stamp import Stamp
from stamp.disks import Disks
from stamp.rest import Accounts, Endpoint, Limits, Service
from stamp.rest.containers import parse_marker

T = TypeVar("T")


def _serve(st: Stamp, paths: list[str]) -> list[bytes]:
    """GET each path from an in-process endpoint; the bodies."""
    async def ask(s: aiohttp.ClientSession, url_of: Callable[[str], Any]) -> list[bytes]:
        out = []
        for path in paths:
            async with s.get(url_of(path)) as resp:
                assert resp.status == 200, await resp.text()
                out.append(await resp.read())
        return out
    return _against_endpoint(st, ask)


def _parse(body: bytes) -> tuple[list[tuple[str, str | None]], list[str], str | None]:
    root = ET.fromstring(body)
    blobs = [(b.findtext("Name") or "", b.findtext("Snapshot")) for b in root.iter("Blob")]
    prefixes = [p.findtext("Name") or "" for p in root.iter("BlobPrefix")]
    return blobs, prefixes, root.findtext("NextMarker") or None


Position = str | tuple[str, int]  # a blob name, or (name, entries of its group already listed)


def _model(names: list[str], snaps: dict[str, list[str]], prefix: str, marker: Position, delimiter: str,
           limit: int) -> tuple[list[tuple[str, str | None]], list[str], Position | None]:
    """One page over the whole sorted name list, as the service pages: at
    most `limit` entries, a blob's group (its snapshots, then it) kept whole
    unless it alone overflows a page."""
    start, done = (marker, 0) if isinstance(marker, str) else marker
    blobs: list[tuple[str, str | None]] = []
    prefixes: list[str] = []
    count = 0
    for name in sorted(n for n in names if n.startswith(prefix) and n >= start):
        cut = name.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
            folder = name[:cut + len(delimiter)]
            if prefixes and prefixes[-1] == folder:
                continue
            if count == limit:
                return blobs, prefixes, name
            prefixes.append(folder)
            count += 1
            continue
        group = [(name, s) for s in snaps.get(name, [])] + [(name, None)]
        group = group[done if name == start else 0:]
        if count + len(group) <= limit:
            blobs += group
            count += len(group)
            continue
        if count:
            return blobs, prefixes, name
        return blobs + group[:limit], prefixes, (name, (done if name == start else 0) + limit)
    return blobs, prefixes, None


def test_list_blobs_reads_one_page_of_names_and_pages_as_the_model(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    names = [f"{d}/{i:03d}" for d in ("a", "b", "c") for i in range(60)] + [f"top{i:03d}" for i in range(80)]
    names += ["a0", "b/x/y", "c" + "é" * 3]
    for n in names:
        st.blobs.create(f"ccc/{n}", 512)
    snaps: dict[str, list[str]] = {}
    for n, k in (("a/005", 3), ("top010", 3), ("top011", 3), ("top012", 11)):
        snaps[n] = [st.blobs.snapshot(f"ccc/{n}").id for _ in range(k)]
    read: list[int] = []
    real = st.containers.blob_names

    def counted(*args: Any, **kwargs: Any) -> list[str]:
        out = real(*args, **kwargs)
        read.append(len(out))
        return out

    st.containers.blob_names = counted  # type: ignore[method-assign]
    cases = [("", "", "", 7), ("", "", "/", 2), ("a/", "", "", 10), ("", "top0", "", 5), ("", "b", "/", 3),
             ("t", "", "", 4), ("", "", "", 1), ("", "", "/", 5000), ("", "a/050", "/", 3), ("", "zzz", "", 3)]
    for prefix, marker, delimiter, limit in cases:
        include = "snapshots" if limit != 3 else ""
        want_snaps = snaps if include else {}
        pages, m, at = [], marker, marker
        while True:  # walk every page by NextMarker, each request checked against the model
            q = f"restype=container&comp=list&prefix={prefix}&marker={quote(m)}&delimiter={delimiter}"
            q += f"&maxresults={limit}" + (f"&include={include}" if include else "")
            read.clear()
            got = _parse(_serve(st, [f"/devstoreaccount1/ccc?{q}"])[0])
            want = _model(names, want_snaps, prefix, at, delimiter, limit)
            assert got[:2] == want[:2], (prefix, m, delimiter, limit)
            assert len(got[0]) + len(got[1]) <= limit
            assert read and max(read) <= limit + 1, read  # never more than one page of names at a time
            pages.append(got)
            if isinstance(want[2], tuple):  # the page ends inside a blob's snapshots: the marker says where
                name, k = want[2]
                epochs = [s.epoch for s in st.blobs.snapshots(f"ccc/{name}")]
                assert got[2] and parse_marker(got[2]) == (name, epochs[k] if k < len(epochs) else epochs[-1] + 1)
            else:
                assert got[2] == want[2], (prefix, m, delimiter, limit)
            if got[2] is None or want[2] is None:
                break
            m, at = got[2], want[2]
        whole = _model(names, want_snaps, prefix, marker, delimiter, 10 ** 6)
        assert [b for p in pages for b in p[0]] == whole[0]
        assert [x for p in pages for x in p[1]] == whole[1]
    st.close()


def _ranges_model(entries: list[tuple[int, int, bool]], lo: int, hi: int, marker: int, limit: int | None
                  ) -> tuple[list[tuple[int, int, bool]], str | None]:
    """One Get Page Ranges page over the whole list: cut to the window from
    the marker (page-aligned outward), then the first `limit`."""
    lo, hi = max(lo, marker), hi
    lo -= lo % 512
    hi = -(-hi // 512) * 512
    cut = [(max(o, lo), min(o + n, hi) - max(o, lo), c) for o, n, c in entries if max(o, lo) < min(o + n, hi)]
    if limit is not None and len(cut) > limit:
        return cut[:limit], str(cut[limit][0])
    return cut, None


def _parse_ranges(body: bytes) -> tuple[list[tuple[int, int, bool]], str | None]:
    root = ET.fromstring(body)
    out = [(int(e.findtext("Start") or 0), int(e.findtext("End") or 0) - int(e.findtext("Start") or 0) + 1,
            e.tag == "ClearRange") for e in root if e.tag in ("PageRange", "ClearRange")]
    return out, root.findtext("NextMarker") or None


def test_get_page_ranges_and_diffs_page_as_the_model(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    size = 1200 * 512
    st.blobs.create("ccc/b", size)
    for p in range(0, 1000, 2):  # alternate pages: 500 ranges
        st.blobs.write("ccc/b", p * 512, b"x" * 512)
    snap = st.blobs.snapshot("ccc/b").id
    for p in range(100, 400, 3):
        st.blobs.clear("ccc/b", p * 512, 512)
    for p in range(700, 1100, 5):
        st.blobs.write("ccc/b", p * 512, b"y" * 1024)
    live = [(o, n, False) for o, n in st.blobs.page_ranges("ccc/b")]
    frozen = [(o, n, False) for o, n in st.blobs.page_ranges("ccc/b", snapshot=snap)]
    d = st.blobs.diff("ccc/b", snap)
    diff = sorted([(o, n, False) for o, n in d.written] + [(o, n, True) for o, n in d.cleared])
    assert len(live) > 300 and len(diff) > 100
    kinds = [("", live), (f"&snapshot={snap}", frozen), (f"&prevsnapshot={snap}", diff)]
    windows = [(0, size), (512 * 37 + 100, 512 * 901 - 3)]
    for query, whole in kinds:
        for lo, hi in windows:
            for limit in (None, 1, 7, 100, 5000):
                marker, pages = 0, []
                while True:
                    q = f"comp=pagelist{query}" + (f"&maxresults={limit}" if limit else "")
                    q += f"&marker={marker}" if marker else ""
                    path = f"/devstoreaccount1/ccc/b?{q}"
                    got = _parse_ranges(_serve_ranged(st, path, lo, hi))
                    assert got == _ranges_model(whole, lo, hi, marker, limit), (query, lo, hi, limit, marker)
                    pages += got[0]
                    if got[1] is None:
                        break
                    marker = int(got[1])
                assert pages == _ranges_model(whole, lo, hi, 0, None)[0]
    st.close()


def _against_endpoint(st: Stamp, ask: Callable[[aiohttp.ClientSession, Callable[[str], Any]], Awaitable[T]]) -> T:
    """ask(session, url_of) run against an in-process endpoint serving `st`."""
    async def run() -> T:
        svc = Service(st, Accounts.default(), Limits())
        server = TestServer(Endpoint(svc).app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                return await ask(s, server.make_url)
        finally:
            await server.close()
            svc.pool.shutdown()
    return asyncio.run(run())


def _serve_ranged(st: Stamp, path: str, lo: int, hi: int) -> bytes:
    async def ask(s: aiohttp.ClientSession, url_of: Callable[[str], Any]) -> bytes:
        async with s.get(url_of(path), headers={"x-ms-range": f"bytes={lo}-{hi - 1}"}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()
    return _against_endpoint(st, ask)


def _peak_of_listing(st: Stamp, path: str, headers: dict[str, str] | None = None) -> tuple[int, int]:
    """(tracemalloc peak bytes while the endpoint answers `path`, ranges in
    the answer); the client counts ranges as they come and keeps none."""
    async def ask(s: aiohttp.ClientSession, url_of: Callable[[str], Any]) -> tuple[int, int]:
        tracemalloc.start()
        try:
            count, tail = 0, b""
            async with s.get(url_of(path), headers=headers or {}) as resp:
                assert resp.status == 200, await resp.text()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    text = tail + chunk
                    count += text.count(b"</PageRange>") + text.count(b"</ClearRange>")
                    cut = max(text.rfind(b"</PageRange>"), text.rfind(b"</ClearRange>"))
                    tail = text[cut + 12:] if cut >= 0 else text  # both closing tags are 12 bytes
            return tracemalloc.get_traced_memory()[1], count
        finally:
            tracemalloc.stop()
    return _against_endpoint(st, ask)


def test_a_listing_of_a_blob_in_very_many_ranges_holds_a_bounded_amount_of_memory(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    n = 60_000
    st.blobs.create("ccc/b", 2 * n * 512)
    snap = st.blobs.snapshot("ccc/b").id
    for p in range(n):  # alternate pages: n ranges
        st.blobs.write("ccc/b", 2 * p * 512, b"x" * 512)
    st.blobs.clear("ccc/b", 0, 2 * 512)  # one cleared range in the diff
    later = st.blobs.snapshot("ccc/b").id
    bound = 4 << 20  # the whole answer is ~3 MiB of XML; the old code held ~20 MiB
    for query, want in (("", n - 1), (f"&snapshot={later}", n - 1), (f"&prevsnapshot={snap}", n)):
        peak, count = _peak_of_listing(st, f"/devstoreaccount1/ccc/b?comp=pagelist{query}")
        assert count == want, (query, count)
        assert peak < bound, (query, peak)
    st.close()


def test_a_managed_disk_diff_in_very_many_ranges_holds_a_bounded_amount_of_memory(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    disks = Disks(st)
    disks.create_empty("d", 1)
    disks.create_snapshot("s1", "d")
    blob, n = disks.record("d")["blob"], 30_000
    for off in range(0, 2 * n * 512, 4 << 20):  # one changed run, then every other page of it cleared:
        st.blobs.write(blob, off, b"w" * (4 << 20))  # n written and n cleared ranges
    for p in range(n):
        st.blobs.clear(blob, (2 * p + 1) * 512, 512)
    disks.create_snapshot("s2", "d")
    urls = [urlsplit(disks.grant_access("snapshot", s, "Read", 3600)["accessSAS"]) for s in ("s1", "s2")]
    path = f"{urls[1].path}?comp=pagelist&{urls[1].query}"
    peak, count = _peak_of_listing(st, path, {"x-ms-previous-snapshot-url": urls[0].geturl()})
    assert count == 2 * n + 1  # and the rest of the last 4 MiB write
    assert peak < 4 << 20, peak  # the whole diff built first peaked at 29 MB
    st.close()


def _peak_of_page(st: Stamp, path: str) -> tuple[int, bytes]:
    async def ask(s: aiohttp.ClientSession, url_of: Callable[[str], Any]) -> tuple[int, bytes]:
        tracemalloc.start()
        try:
            async with s.get(url_of(path)) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.read()
            return tracemalloc.get_traced_memory()[1], body
        finally:
            tracemalloc.stop()
    return _against_endpoint(st, ask)


def test_a_page_of_a_blob_with_thousands_of_snapshots_holds_that_page(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    st.blobs.create("ccc/b", 4096)
    ids = [st.blobs.snapshot("ccc/b").id for _ in range(5000)]
    st.blobs.create("ccc/c", 512)
    marker, got = "", []
    for _ in range(3):
        path = "/devstoreaccount1/ccc?restype=container&comp=list&include=snapshots&maxresults=40"
        peak, body = _peak_of_page(st, path + (f"&marker={quote(marker)}" if marker else ""))
        page = _parse(body)
        assert len(page[0]) == 40 and page[2]
        assert peak < 1 << 20, peak  # one page; the code before read all 5,000 (counting them again for each): over 120 s a page
        got += page[0]
        marker = page[2]
    assert got == [("b", s) for s in ids[:120]]
    st.close()


def test_the_sdk_pager_lists_every_snapshot_a_page_at_a_time(server):
    cc = server.service().get_container_client("snappaged")
    cc.create_container()
    cc.get_blob_client("a").create_page_blob(512)
    b = cc.get_blob_client("b")
    b.create_page_blob(4096)
    ids = [b.create_snapshot()["snapshot"] for _ in range(23)]
    cc.get_blob_client("c").create_page_blob(512)
    want = [("a", None)] + [("b", s) for s in ids] + [("b", None), ("c", None)]
    for per_page in (1, 5, 24, 25, 5000):
        pages = [list(page) for page in cc.list_blobs(include=["snapshots"], results_per_page=per_page).by_page()]
        assert [(p.name, p.snapshot) for page in pages for p in page] == want, per_page
        assert max(len(page) for page in pages) <= per_page and len(pages) >= len(want) // per_page
    cc.delete_container()
