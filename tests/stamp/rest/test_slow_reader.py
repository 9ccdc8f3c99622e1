"""A client that reads a streamed answer slowly, beside writers in other
processes: what the metadata may grow by while it reads."""

from __future__ import annotations

import socket

from stamp import Stamp

from .conftest import start_server, stop_server

MIB = 1 << 20


def _used(st: Stamp) -> int:
    return (int(st.meta.env.info()["last_pgno"]) + 1) * int(st.meta.env.stat()["psize"])


def test_a_slow_reader_of_a_page_list_does_not_make_the_metadata_grow_with_other_writes(tmp_path):
    path = str(tmp_path / "st")
    st = Stamp.create(path)
    st.containers.create("ccc")
    st.containers.update("ccc", public_access="container")
    n = 60_000  # ~5 MiB of XML: more than the server's socket buffers take at once
    st.blobs.create("ccc/b", 2 * n * 512)
    for p in range(n):  # alternate pages: n ranges
        st.blobs.write("ccc/b", 2 * p * 512, b"x" * 512)
    st.blobs.create("w", 1 << 20)
    for i in range(200):  # the steady state of an overwrite: freed pages are reused
        st.blobs.write("w", (i % 64) * 4096, bytes([i % 251]) * 4096)
    srv = start_server(path)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        client.sendall(b"GET /devstoreaccount1/ccc/b?comp=pagelist HTTP/1.1\r\nHost: x\r\n"
                       b"x-ms-version: 2021-08-06\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        before = _used(st)
        for i in range(4000):  # another process's writes, while the client reads a little at a time
            st.blobs.write("w", (i % 64) * 4096, bytes([i % 251]) * 4096)
            if i % 100 == 0:
                client.recv(4096)
        grown = _used(st) - before
    finally:
        client.close()
        stop_server(srv)
        st.close()
    # Without the reader 4,000 overwrites grow it by a few MiB (up to ~10 on a loaded machine: a
    # piece's short read transaction may be open at a commit); a held one grew it by ~94 MiB.
    assert grown < 24 * MIB, f"the metadata grew by {grown / MIB:.1f} MiB over 4,000 overwrites of 4 KiB"
