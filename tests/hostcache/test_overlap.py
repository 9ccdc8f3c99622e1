"""Overlapped I/O of a disk over a remote stamp (hostcache/overlap.py): the
ordering rules on their own, then many NBD clients at queue depth against a
model, a FLUSH that covers concurrent writes across a kill -9, and a long run
that grows no threads or connections."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import signal
import socket
import struct
import threading
import time

import pytest

from hostcache.host import OS_LUN, AsyncDisk, Host
from hostcache.overlap import POOL_THREADS, InFlight, Overlapped, conflict, pages
from stamp import Stamp
from stamp.disks import Disks
from tests.hostcache.test_remote import _free_port, _serve, served  # noqa: F401 - a fixture
from tests.stamp.rest.conftest import Server, start_server, stop_server
from vhd import nbd

KIB = 1024


# -- the rules on their own -----------------------------------------------------------------


def test_pages_round_out_to_512_bytes_and_only_writes_conflict():
    assert pages(0, 512) == (0, 512)
    assert pages(100, 1) == (0, 512)
    assert pages(511, 2) == (0, 1024)
    a, b = (*pages(0, 100), False), (*pages(400, 10), False)
    assert not conflict(a, b)  # two reads of one page
    assert conflict(a, (*pages(400, 10), True))  # a partial-page write and a read of its page
    assert not conflict((*pages(0, 512), True), (*pages(512, 512), True))  # neighbours


def test_a_conflicting_io_waits_for_the_earlier_one_and_others_overlap():
    pool = concurrent.futures.ThreadPoolExecutor(4)
    o = Overlapped(pool)
    gate, order = threading.Event(), []

    def slow_write() -> None:
        gate.wait(10)
        order.append("write")

    w = o.submit(0, 4096, True, slow_write)
    r = o.submit(1000, 10, False, lambda: order.append("read same page"))
    other = o.submit(8192, 4096, True, lambda: order.append("elsewhere"))
    other.result(5)  # not held up by the write it does not touch
    assert not r.done() and order == ["elsewhere"]
    gate.set()
    r.result(5)
    assert order == ["elsewhere", "write", "read same page"]
    assert w.done() and len(o.inflight) == 0  # each I/O is forgotten once done
    pool.shutdown()


def test_a_failed_io_releases_those_waiting_for_it():
    pool = concurrent.futures.ThreadPoolExecutor(2)
    o = Overlapped(pool)

    def fail() -> None:
        raise OSError("the stamp went away")

    bad = o.submit(0, 512, True, fail)
    assert o.submit(0, 512, False, lambda: "read").result(5) == "read"
    with pytest.raises(OSError):
        bad.result()
    assert len(InFlight()) == 0 and len(o.inflight) == 0
    pool.shutdown()


def test_one_thread_still_serves_a_chain_of_conflicting_ios_in_order():
    """The pool takes work in order of arrival, so a wait is always for work already taken."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    o = Overlapped(pool)
    seen: list[int] = []
    jobs = [o.submit(0, 512, True, lambda i=i: seen.append(i)) for i in range(50)]
    concurrent.futures.wait(jobs, timeout=10)
    assert seen == list(range(50))
    pool.shutdown()


# -- over a remote stamp ---------------------------------------------------------------------


def _host_with_disk(tmp_path, server: Server, caching: str = "None") -> str:
    where = str(tmp_path / "h")
    with Host.create(where, server.endpoint, cache_bytes=32 << 20) as h:
        h.create_vm("vm1", "D8s_v3", "mbr")
        h.attach("vm1", "data1", 0, caching)
    return where


class Pipelined:
    """An NBD client that sends many requests before it reads any reply (queue depth)."""

    def __init__(self, sock: str, name: str = "lun0") -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(60)
        self.s.connect(sock)
        self._recv(18)
        self.s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        raw = name.encode()
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, len(raw)) + raw)
        self.size, _ = struct.unpack(">QH", self._recv(10))
        self.cookie = 0
        self.sent: dict[int, tuple[int, int]] = {}  # cookie -> (command, length)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            more = self.s.recv(n - len(buf))
            if not more:
                raise ConnectionError("closed")
            buf += more
        return bytes(buf)

    def send(self, kind: int, offset: int, length: int, data: bytes = b"") -> int:
        self.cookie += 1
        self.sent[self.cookie] = (kind, length)
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, kind, self.cookie, offset, length) + data)
        return self.cookie

    def replies(self) -> dict[int, bytes]:
        """Every reply still owed: cookie -> the data read (b"" for others); any error fails."""
        out = {}
        while self.sent:
            magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
            assert magic == nbd.SIMPLE_REPLY_MAGIC and error == 0, (cookie, error)
            kind, length = self.sent.pop(cookie)
            out[cookie] = self._recv(length) if kind == nbd.CMD_READ else b""
        return out

    def close(self) -> None:
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
        self.s.close()


REGION = 96 * KIB  # each client's own part of the disk: its I/Os overlap each other there


def _client_rounds(sock: str, c: int, rounds: int, model: bytearray, errors: list[BaseException]) -> None:
    """Rounds of 48 pipelined requests in the client's region (unaligned writes
    of 1 byte to 12 KiB over each other, reads between them), each read checked
    against the model as it stood when the read was sent (arrival order)."""
    rng = random.Random(c)
    base = c * REGION
    try:
        cl = Pipelined(sock)
        for _ in range(rounds):
            expect: dict[int, bytes] = {}
            for _ in range(48):
                off = base + rng.randrange(REGION - 1)
                n = rng.randint(1, min(12 * KIB, base + REGION - off))
                if rng.random() < 0.6:
                    data = rng.randbytes(n)
                    cl.send(nbd.CMD_WRITE, off, n, data)
                    model[off:off + n] = data
                else:
                    expect[cl.send(nbd.CMD_READ, off, n)] = bytes(model[off:off + n])
            got = cl.replies()
            for cookie, want in expect.items():
                assert got[cookie] == want, (c, cookie)
        cl.close()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_many_pipelined_clients_over_a_remote_stamp_agree_with_a_model(tmp_path, served):  # noqa: F811
    host_dir = _host_with_disk(tmp_path, served)
    sock = str(tmp_path / "n.sock")
    proc = _serve(host_dir, "vm1", sock, "--lun", "0")
    clients = 6
    model = bytearray(clients * REGION)
    errors: list[BaseException] = []
    try:
        threads = [threading.Thread(target=_client_rounds, args=(sock, c, 6, model, errors)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        whole = Pipelined(sock)  # another connection reads everything back
        cookies = [whole.send(nbd.CMD_READ, at, 32 * KIB) for at in range(0, len(model), 32 * KIB)]
        got = whole.replies()
        assert b"".join(got[c] for c in cookies) == bytes(model)
        whole.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_flush_after_concurrent_writes_covers_them_all_across_a_kill_9(tmp_path):
    stamp = Stamp.create(str(tmp_path / "st"))
    d = Disks(stamp)
    from tests.hostcache.test_host import make_image
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_empty("data1", 128, "Premium_LRS")
    stamp.close()
    port = _free_port()
    server = start_server(str(tmp_path / "st"), "--port", str(port))
    host_dir = _host_with_disk(tmp_path, server)
    sock = str(tmp_path / "n.sock")
    proc = _serve(host_dir, "vm1", sock, "--lun", "0")
    rng = random.Random(7)
    written: dict[int, bytes] = {}
    try:
        clients = [Pipelined(sock) for _ in range(4)]
        for i in range(256):  # 4 connections x 64 writes in flight, all acknowledged before the flush
            data = rng.randbytes(4 * KIB)
            clients[i % 4].send(nbd.CMD_WRITE, i * 8 * KIB, len(data), data)
            written[i * 8 * KIB] = data
        for cl in clients:
            cl.replies()
        clients[0].send(nbd.CMD_FLUSH, 0, 0)
        clients[0].replies()
    finally:
        proc.send_signal(signal.SIGKILL)  # no close, no detach: only the flush stands between
        proc.wait()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    server = start_server(str(tmp_path / "st"), "--port", str(port))  # up again: recovery of the stamp
    stop_server(server)
    with Stamp.open(str(tmp_path / "st")) as stamp:
        blob = Disks(stamp).record("data1")["blob"]
        from stamp.blobfile import PageBlobFile
        from vhd.image import open_image
        img = open_image(PageBlobFile(stamp, blob, writable=False))
        for at, data in written.items():
            assert img.read(at, len(data)) == data, at
        assert stamp.check().ok


def test_a_long_run_grows_no_threads_no_connections_and_forgets_every_io(tmp_path, served):  # noqa: F811
    host_dir = _host_with_disk(tmp_path, served)
    with Host(host_dir) as h:
        disk = AsyncDisk(h.open_disk("vm1", 0))
        assert disk.overlapped is not None and h.open_disk("vm1", OS_LUN).overlapped is None  # the OS disk caches
        rng = random.Random(1)
        model = bytearray(1 << 20)

        async def round_() -> None:
            ios = []
            for _ in range(64):
                off = rng.randrange(0, len(model) - 8 * KIB, 512)
                if rng.random() < 0.5:
                    data = rng.randbytes(4 * KIB)
                    model[off:off + len(data)] = data
                    ios.append(disk.write(off, data))
                else:
                    ios.append(disk.read(off, 4 * KIB))
            await asyncio.gather(*ios)

        async def run(rounds: int) -> tuple[int, int]:
            for _ in range(rounds):
                await round_()
            return threading.active_count(), len(h.stamp.endpoint._all)  # type: ignore[attr-defined]

        threads, conns = asyncio.run(run(3))
        started = time.monotonic()
        later = asyncio.run(run(30))
        # no growth (fewer is no leak: a thread of something else, asyncio.run's executor say, may have ended)
        assert later[0] <= threads and later[1] <= conns, (threads, conns, later, time.monotonic() - started)
        assert conns <= POOL_THREADS + 1  # the pool's threads and the caller's
        assert len(disk.overlapped.inflight) == 0
        assert asyncio.run(disk.read(0, len(model))) == bytes(model)
