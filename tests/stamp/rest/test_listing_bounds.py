"""Listings hold one page, not the whole container or blob: List Blobs
reads at most maxresults + 1 names from the index at a time, and answers
(entries, prefixes, NextMarker) as a model over the whole name list does."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from stamp import Stamp
from stamp.rest import Accounts, Endpoint, Limits, Service


def _serve(st: Stamp, paths: list[str]) -> list[bytes]:
    """GET each path from an in-process endpoint; the bodies."""
    async def run() -> list[bytes]:
        svc = Service(st, Accounts.default(), Limits())
        server = TestServer(Endpoint(svc).app())
        await server.start_server()
        try:
            out = []
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                for path in paths:
                    async with s.get(server.make_url(path)) as resp:
                        assert resp.status == 200, await resp.text()
                        out.append(await resp.read())
            return out
        finally:
            await server.close()
            svc.pool.shutdown()
    return asyncio.run(run())


def _parse(body: bytes) -> tuple[list[tuple[str, str | None]], list[str], str | None]:
    root = ET.fromstring(body)
    blobs = [(b.findtext("Name") or "", b.findtext("Snapshot")) for b in root.iter("Blob")]
    prefixes = [p.findtext("Name") or "" for p in root.iter("BlobPrefix")]
    return blobs, prefixes, root.findtext("NextMarker") or None


def _model(names: list[str], snaps: dict[str, list[str]], prefix: str, marker: str, delimiter: str,
           limit: int) -> tuple[list[tuple[str, str | None]], list[str], str | None]:
    """One page over the whole sorted name list, as the service pages."""
    blobs: list[tuple[str, str | None]] = []
    prefixes: list[str] = []
    count = 0
    for name in sorted(n for n in names if n.startswith(prefix) and n >= marker):
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
        if count and count + len(group) > limit:
            return blobs, prefixes, name
        blobs += group
        count += len(group)
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
    for n in ("a/005", "top010", "top011"):
        snaps[n] = [st.blobs.snapshot(f"ccc/{n}").id for _ in range(3)]
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
        pages, m, paths_done = [], marker, 0
        while True:  # walk every page by NextMarker, each request checked against the model
            q = f"restype=container&comp=list&prefix={prefix}&marker={m}&delimiter={delimiter}&maxresults={limit}"
            q += f"&include={include}" if include else ""
            read.clear()
            got = _parse(_serve(st, [f"/devstoreaccount1/ccc?{q}"])[0])
            assert got == _model(names, want_snaps, prefix, m, delimiter, limit), (prefix, m, delimiter, limit)
            assert read and max(read) <= limit + 1, read  # never more than one page of names at a time
            pages.append(got)
            paths_done += 1
            if got[2] is None:
                break
            m = got[2]
        whole = _model(names, want_snaps, prefix, marker, delimiter, 10 ** 6)
        assert [b for p in pages for b in p[0]] == whole[0]
        assert [x for p in pages for x in p[1]] == whole[1]
    st.close()
