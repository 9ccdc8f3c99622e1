"""Streamed answers pin nothing while a client reads slowly: each piece of a
streamed Get Page Ranges comes from its own short LMDB read transaction,
resumed at the last range taken, so a client that stalls mid-body lets
writers reuse the pages they free (the metadata map does not grow) and holds
no slot of the reader table; what it reads in the end is well-formed (a
snapshot's listing and a diff between snapshots exactly; a live blob's with
each range as of some moment)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from stamp import Stamp
from stamp import ranges as rg
from stamp.rest import Accounts, Endpoint, Limits, Service

MIB = 1 << 20


@contextmanager
def served(st: Stamp) -> Iterator[int]:
    """An in-process endpoint over `st` on a loop of its own thread; its port."""
    ready: list[int] = []
    stop = threading.Event()

    async def run() -> None:
        svc = Service(st, Accounts.default(), Limits())
        runner = web.AppRunner(Endpoint(svc).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.append(runner.addresses[0][1])
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()
        svc.pool.shutdown()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    while not ready:
        time.sleep(0.01)
    try:
        yield ready[0]
    finally:
        stop.set()
        thread.join(30)


def _stalled_get(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A client with a small receive window that sends GET `path` and reads
    only the first bytes of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-ms-version: 2021-08-06\r\n\r\n".encode())
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock, head


def _read_rest(sock: socket.socket, first: bytes = b"") -> bytes:
    data = bytearray(first)
    sock.settimeout(60)
    while not data.endswith(b"0\r\n\r\n"):
        piece = sock.recv(1 << 20)
        if not piece:
            break
        data += piece
    sock.close()
    return bytes(data)


def _dechunk(raw: bytes) -> bytes:
    body = raw.split(b"\r\n\r\n", 1)[1]
    out, pos = bytearray(), 0
    while True:
        eol = body.index(b"\r\n", pos)
        n = int(body[pos:eol], 16)
        if n == 0:
            return bytes(out)
        out += body[eol + 2:eol + 2 + n]
        pos = eol + 2 + n + 2


def _ranges(body: bytes) -> list[tuple[int, int]]:
    root = ET.fromstring(body)
    return [(int(e.findtext("Start") or 0), int(e.findtext("End") or 0) + 1) for e in root if e.tag == "PageRange"]


def _used_pages(st: Stamp) -> int:
    return int(st.meta.env.info()["last_pgno"])


def _readers(st: Stamp) -> int:
    """Slots of the reader table holding a transaction now (txnid not '-')."""
    lines = st.meta.env.readers().splitlines()[1:]
    return sum(1 for line in lines if line.split() and line.split()[-1] != "-")


def _wait_until_stalled(st: Stamp, quiet: float = 1.0, limit: float = 15.0) -> None:
    """Wait until the server has filled the socket buffers and waits for the
    client: no read transaction seen for `quiet` seconds (it reads a piece
    while the buffers take more). A server that holds one all along is
    left to the test's assertions after `limit` seconds."""
    deadline, since = time.monotonic() + limit, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        if _readers(st):
            since = time.monotonic()
        time.sleep(0.01)


def test_a_client_stalled_mid_listing_pins_no_pages_while_others_write(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    n = 150_000  # ~9 MiB of XML: more than the socket buffers hold, so the server waits mid-body
    st.blobs.create("ccc/b", 2 * n * 512)
    empty = st.blobs.snapshot("ccc/b").id
    for p in range(n):  # alternate pages: n ranges
        st.blobs.write("ccc/b", 2 * p * 512, b"x" * 512)
    snap = st.blobs.snapshot("ccc/b").id
    frozen = [(o, o + k) for o, k in st.blobs.page_ranges("ccc/b", snapshot=snap)]
    st.blobs.create("ccc/w", 4 * MIB)
    with served(st) as port:
        for query in (f"&snapshot={snap}", f"&snapshot={snap}&prevsnapshot={empty}", ""):
            before = st.blobs.page_ranges("ccc/b")
            sock, head = _stalled_get(port, f"/devstoreaccount1/ccc/b?comp=pagelist{query}")
            _wait_until_stalled(st)
            used = _used_pages(st)
            for i in range(3000):  # overwrites elsewhere: each commit frees the pages the last one wrote
                st.blobs.write("ccc/w", (i % 64) * 65536, bytes([i % 251]) * 65536)
            for p in range(n - 1, n - 200, -1):  # and fill holes in the blob being listed, near its end
                st.blobs.write("ccc/b", (2 * p + 1) * 512, b"y" * 512)
            grown, held = (_used_pages(st) - used) * 4096, _readers(st)
            assert held == 0, st.meta.env.readers()  # no read transaction open while the client stalls
            assert grown < 4 * MIB, grown  # a pinned reader: every commit takes new pages (76 MiB here before)
            got = _ranges(_dechunk(_read_rest(sock, head)))
            after = st.blobs.page_ranges("ccc/b")
            if query:
                assert got == frozen  # a snapshot's listing, and a diff between snapshots, are exact
            else:  # a live one: sorted, disjoint, between the blob before and after the writes
                assert all(a[1] <= b[0] for a, b in zip(got, got[1:], strict=False))
                union = rg.merge_ranges(got)
                assert rg.subtract([(o, o + k) for o, k in before], union) == []
                assert rg.subtract(union, [(o, o + k) for o, k in after]) == []
    st.close()
