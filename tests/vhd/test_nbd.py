"""The NBD export against real clients (nbdinfo, nbdcopy, qemu-img, fio) and
against bad ones (a hand-written client that breaks the rules)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest

import vhd
from vhd import nbd

from ..conftest import run

MIB = 1 << 20


@pytest.fixture
def served(tmp_path):
    """A dynamic and a fixed image served on a unix socket by `vhd serve`."""
    dyn = tmp_path / "dyn.vhd"
    with vhd.create(dyn, 64 * MIB) as img:
        img.write(MIB, b"\xab" * 3 * MIB)
        img.write(40 * MIB, b"\xcd" * 4096)
    with vhd.create(tmp_path / "fix.vhd", 32 * MIB, type="fixed") as img:
        img.write(0, b"fixed" * 100)
    sock = str(tmp_path / "s.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(dyn), str(tmp_path / "fix.vhd"),
                             "--socket", sock], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert json.loads(line)["serving"] == ["dyn", "fix"]
    yield tmp_path, sock
    proc.terminate()
    proc.wait(timeout=10)


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def test_nbdinfo_sees_size_flags_and_our_allocation_map(served):
    d, sock = served
    info = json.loads(run("nbdinfo", "--json", uri(sock, "dyn")).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 64 * MIB and export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    maps = json.loads(run("nbdinfo", "--map", "--json", uri(sock, "dyn")).stdout)
    got = [(m["offset"], m["length"], m["type"]) for m in maps]
    assert got == [(0, 4 * MIB, 0), (4 * MIB, 36 * MIB, 3), (40 * MIB, 2 * MIB, 0), (42 * MIB, 22 * MIB, 3)]
    listed = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout
    assert {e["export-name"] for e in json.loads(listed)["exports"]} == {"dyn", "fix"}


def test_nbdcopy_both_ways_and_qemu_img_compare(served):
    d, sock = served
    out = d / "out.raw"
    run("nbdcopy", uri(sock, "dyn"), str(out))
    data = out.read_bytes()
    assert data[MIB:4 * MIB] == b"\xab" * 3 * MIB and data[40 * MIB:40 * MIB + 4096] == b"\xcd" * 4096
    src = d / "in.raw"
    src.write_bytes(os.urandom(8 * MIB) + bytes(24 * MIB))
    run("nbdcopy", str(src), uri(sock, "fix"))
    assert run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), uri(sock, "fix"),
               check=False).returncode == 0


def test_fio_verifies_what_it_wrote(served):
    d, sock = served
    proc = run("fio", "--name=v", "--ioengine=nbd", f"--uri={uri(sock, 'dyn')}", "--rw=randwrite", "--bs=4k",
               "--iodepth=16", "--size=16M", "--verify=crc32c", "--output-format=json",
               cwd=d)  # fio leaves a verify state file in its working folder
    result = json.loads(proc.stdout[proc.stdout.index("{"):])  # fio prints a line before its JSON
    job = result["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MIB


class Client:
    """A minimal NBD client that can also break the rules on purpose."""

    def __init__(self, sock: str, name: str, structured: bool = False) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(sock)
        magic, opt, _flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        self.s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        raw = name.encode()
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, len(raw)) + raw)
        self.size, self.flags = struct.unpack(">QH", self.recv(10))
        self.cookie = 0

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.s.recv(n - len(buf))
            if not more:
                raise ConnectionError("closed")
            buf += more
        return buf

    def request(self, kind: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, kind, self.cookie, offset, length) + data)
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and cookie == self.cookie
        body = self.recv(length) if kind == nbd.CMD_READ and not error else b""
        return error, body


def test_bad_requests_get_the_protocols_errors_and_others_are_served(served):
    d, sock = served
    c = Client(sock, "dyn")
    assert c.size == 64 * MIB
    assert c.request(nbd.CMD_READ, 64 * MIB - 512, 1024)[0] == 22  # EINVAL: past the end
    assert c.request(nbd.CMD_WRITE, 64 * MIB, 512, b"x" * 512)[0] == 28  # ENOSPC
    assert c.request(nbd.CMD_READ, 0, 64 * MIB)[0] == 75  # EOVERFLOW: over the maximum block size
    assert c.request(nbd.CMD_READ, 0, 0)[0] == 22
    assert c.request(nbd.CMD_BLOCK_STATUS, 0, 512)[0] == 22  # no meta context negotiated
    err, body = c.request(nbd.CMD_READ, MIB, 4096)
    assert err == 0 and body == b"\xab" * 4096
    assert c.request(nbd.CMD_WRITE, 5 * MIB, 512, b"u" * 512, flags=nbd.CMDF_FUA)[0] == 0
    ro = Client(sock, "fix")
    assert ro.request(nbd.CMD_READ, 0, 5)[1] == b"fixed"

    bad = Client(sock, "dyn")  # a broken request: its connection closes, nobody else's
    bad.s.sendall(b"\x00" * 28)
    with pytest.raises((ConnectionError, OSError)):
        bad.recv(16)
    vanish = Client(sock, "dyn")  # a client that disappears in the middle of a write
    vanish.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 6 * MIB, 8192) + b"v" * 100)
    vanish.s.close()
    time.sleep(0.2)
    assert c.request(nbd.CMD_READ, 6 * MIB, 512) == (0, bytes(512))  # the unacknowledged write left nothing
    assert c.request(nbd.CMD_READ, 5 * MIB, 512) == (0, b"u" * 512)


def test_read_only_exports_refuse_writes(tmp_path):
    with vhd.create(tmp_path / "ro.vhd", 8 * MIB) as img:
        img.write(0, b"keep" * 128)
    sock = str(tmp_path / "ro.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "ro.vhd"), "--socket", sock,
                             "--read-only"], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        c = Client(sock, "ro")
        assert c.flags & nbd.TF_READ_ONLY
        assert c.request(nbd.CMD_WRITE, 0, 512, b"x" * 512)[0] == 1  # EPERM
        assert c.request(nbd.CMD_READ, 0, 4)[1] == b"keep"
        many = [Client(sock, "ro") for _ in range(8)]  # several clients at once
        assert all(m.request(nbd.CMD_READ, 0, 4)[1] == b"keep" for m in many)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_option_parsers_refuse_malformed_data():
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_info_request(struct.pack(">I", 100) + b"x")
    with pytest.raises(nbd.ProtocolError):
        nbd.parse_meta_request(struct.pack(">I", 0) + struct.pack(">I", 5) + b"")
    assert nbd.parse_info_request(struct.pack(">I", 3) + b"abc" + struct.pack(">HH", 1, 3)) == ("abc", [3])


def test_qemu_img_convert_from_the_export(served):
    d, sock = served
    out = d / "conv.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock, "dyn"), str(out))
    ref = d / "ref.raw"
    run("nbdcopy", uri(sock, "dyn"), str(ref))
    assert run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(out), str(ref), check=False).returncode == 0


def test_scripted_with_libnbd(served):
    """python3-libnbd (Debian's bindings of the libnbd we did not write)."""
    import nbd as libnbd

    d, sock = served
    h = libnbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri(sock, "dyn"))
    assert h.get_size() == 64 * MIB and h.can_meta_context("base:allocation")
    assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua()
    assert h.pread(4096, MIB) == b"\xab" * 4096
    h.pwrite(b"libnbd!!" * 512, 10 * MIB, libnbd.CMD_FLAG_FUA)
    assert h.pread(4096, 10 * MIB) == b"libnbd!!" * 512
    h.zero(8192, 10 * MIB)
    assert h.pread(8192, 10 * MIB) == bytes(8192)
    h.trim(MIB, MIB)
    assert h.pread(512, MIB) == bytes(512)
    seen: list[tuple[int, int]] = []

    def collect(context, offset, entries, err):  # noqa: ANN001 - libnbd's callback shape
        seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0
    h.block_status(64 * MIB, 0, collect)
    assert sum(n for n, _ in seen) == 64 * MIB and {flags for _, flags in seen} <= {0, 3}
    h.set_strict_mode(0)  # let bad requests through to our server (libnbd checks bounds itself)
    for bad in ((4096, 64 * MIB - 512), (0, 64 * MIB + 512)):  # past the end: the server's EINVAL
        with pytest.raises(libnbd.Error) as e:
            h.pread(*bad)
        assert e.value.errno == "EINVAL" and "out of bounds" not in str(e.value)
    assert h.pread(512, 0) is not None  # and the connection still serves
    h.flush()
    h.shutdown()
    fix = libnbd.NBD()
    fix.connect_uri(uri(sock, "fix"))
    fix.set_strict_mode(0)
    with pytest.raises(libnbd.Error) as e:  # a write past the end: the server's ENOSPC
        fix.pwrite(b"x" * 512, 32 * MIB)
    assert e.value.errno == "ENOSPC"
    fix.shutdown()


# -- conformance: every command with every flag, over libnbd with strict mode off ----------------

SLOT = 64 * 1024
READ, WRITE, FLUSH, TRIM, CACHE, ZERO, STATUS = "read", "write", "flush", "trim", "cache", "zero", "status"
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, UNKNOWN = 1, 2, 4, 8, 16, 0x4000
# proto.md: FUA is accepted on every command once SEND_FUA is advertised; NO_HOLE
# belongs to WRITE_ZEROES, DF to READ (with structured replies), REQ_ONE to
# BLOCK_STATUS; FAST_ZERO was not advertised; anything else is an unknown flag.
# "The server SHOULD return EINVAL if it receives an unknown command flag [or]
# a flag not explicitly documented as applicable to the given request."
SPEC_FLAGS = {READ: FUA | DF, WRITE: FUA, FLUSH: FUA, TRIM: FUA, CACHE: FUA, ZERO: FUA | NO_HOLE, STATUS: FUA | REQ_ONE}


def conformance(uri: str) -> None:
    """Run every command with every flag against an export of at least 4 MiB;
    each case in its own 64 KiB slot, filled with 0x55 first, checked after."""
    import nbd as libnbd

    h = libnbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    h.set_strict_mode(0)  # libnbd sends what we ask; the server has to judge
    slot = 0
    for command in SPEC_FLAGS:
        for flag in (0, FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, UNKNOWN):
            offset = slot * SLOT
            slot += 1
            h.pwrite(b"\x55" * SLOT, offset)
            valid = not flag & ~SPEC_FLAGS[command]
            try:
                got = _one(h, command, offset, flag)
            except libnbd.Error as e:
                assert not valid and e.errno == "EINVAL", (command, flag, e)
                assert h.pread(SLOT, offset) == b"\x55" * SLOT, (command, flag, "a refused request changed data")
                continue
            assert valid, (command, flag, "an invalid flag was accepted")
            after = h.pread(SLOT, offset)
            if command == READ:
                assert got == b"\x55" * SLOT
            if command == WRITE:
                assert after == b"\xaa" * SLOT, (command, flag)
            elif command == ZERO:
                assert after == bytes(SLOT), (command, flag, "an acknowledged WRITE_ZEROES left data")
            elif command == STATUS:
                assert got and sum(got) <= SLOT and (len(got) == 1 if flag & REQ_ONE else True), (flag, got)
            elif command in (READ, FLUSH, CACHE):
                assert after == b"\x55" * SLOT, (command, flag)
    h.shutdown()


def _one(h, command: str, offset: int, flag: int):  # noqa: ANN001, ANN202 - libnbd's handle
    if command == READ:
        return h.pread(SLOT, offset, flag)
    if command == WRITE:
        return h.pwrite(b"\xaa" * SLOT, offset, flag)
    if command == FLUSH:
        return h.flush(flag)
    if command == TRIM:
        return h.trim(SLOT, offset, flag)
    if command == CACHE:
        return h.cache(SLOT, offset, flag)
    if command == ZERO:
        return h.zero(SLOT, offset, flag)
    lengths: list[int] = []

    def collect(context, at, entries, err):  # noqa: ANN001 - libnbd's callback shape
        lengths.extend(entries[0::2])
        return 0
    h.block_status(SLOT, offset, collect, flag)
    return lengths


def test_every_command_with_every_flag(served):
    d, sock = served
    conformance(uri(sock, "dyn"))
    conformance(uri(sock, "fix"))


def test_a_second_server_on_a_live_socket_is_refused_and_the_description_is_no_path(served):
    d, sock = served
    with vhd.create(d / "other.vhd", 8 * MIB):
        pass
    second = subprocess.run([sys.executable, "-m", "vhd", "serve", str(d / "other.vhd"), "--socket", sock],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "already listening" in second.stderr, second.stderr
    info = run("nbdinfo", "--json", uri(sock, "dyn")).stdout  # the first server still answers
    assert json.loads(info)["exports"][0]["description"] == "dyn.vhd"  # not the full path


def test_the_socket_goes_with_the_server_and_a_stale_one_is_replaced(tmp_path):
    with vhd.create(tmp_path / "s.vhd", 8 * MIB):
        pass
    sock = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)  # a socket file nobody listens on: what a killed server leaves
    stale.close()
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "s.vhd"), "--socket", sock],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["serving"] == ["s"]  # type: ignore[union-attr]
        assert json.loads(run("nbdinfo", "--json", uri(sock, "s")).stdout)["exports"][0]["export-size"] == 8 * MIB
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not os.path.exists(sock)
    (tmp_path / "file").write_text("not a socket")
    r = subprocess.run([sys.executable, "-m", "vhd", "serve", str(tmp_path / "s.vhd"), "--socket",
                        str(tmp_path / "file")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not a socket" in r.stderr and (tmp_path / "file").read_text() == "not a socket"


# -- greedy clients: bounded memory, a light client still served -------------------------------------


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def settle(pid: int, bound: int, quiet: float = 1.0, most: float = 20.0) -> tuple[int, int]:
    """Poll the server's RSS until it holds still for `quiet` seconds (at most
    `most`) or passes `bound`; returns (last, highest). A wait, not a timing check."""
    highest = last = rss(pid)
    still_since = time.monotonic()
    deadline = still_since + most
    while time.monotonic() < deadline and highest <= bound:
        time.sleep(0.05)
        now = rss(pid)
        if abs(now - last) > MIB:
            still_since = time.monotonic()
        last, highest = now, max(highest, now)
        if time.monotonic() - still_since > quiet:
            break
    return last, highest


def p99(c: Client, offset: int, n: int = 200) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        err, _ = c.request(nbd.CMD_READ, offset + (i % 64) * 4096, 4096)
        times.append(time.perf_counter() - start)
        assert err == 0
    return sorted(times)[int(n * 0.99) - 1]


def greedy(sock: str, name: str, connections: int, reads: int, size: int = 32 * MIB) -> list[Client]:
    """Clients that send `reads` READs of `size` each and never read a reply."""
    out = []
    for _ in range(connections):
        c = Client(sock, name)
        c.s.setblocking(False)
        for i in range(reads):
            try:
                c.s.send(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, i, 0, size))
            except BlockingIOError:
                break  # the server stopped reading: backpressure reached the client
        out.append(c)
    return out


def hostile_load(sock: str, pid: int, greedy_export: str, light_export: str, connections: int,
                 budget: int) -> None:
    """Greedy clients beside a light one: the server's memory stays within its
    budget (plus slack) and goes back when they leave; the light client's p99
    stays within 50x its idle p99, or 25 ms (best of 3 tries: the machine is
    shared); a starved one waits behind the greedy clients' 32 MiB reads."""
    light = Client(sock, light_export)
    idle = p99(light, 0, 500)
    base = rss(pid)
    bound = base + budget + 64 * MIB
    hogs = greedy(sock, greedy_export, connections, 40)
    try:
        last, highest = settle(pid, bound)
        assert highest <= bound, f"RSS grew by {(highest - base) >> 20} MiB under greedy clients"
        busy = min(p99(light, 0, 500) for _ in range(3))
        allowed = max(50 * idle, 0.025)  # 25 ms at least: a shared machine's scheduler alone can cost a few ms
        assert busy <= allowed, f"light client p99 {busy * 1e3:.2f} ms beside greedy ones, {idle * 1e3:.2f} ms idle"
    finally:
        for h in hogs:
            h.s.close()
    deadline = time.monotonic() + 30  # the server notices them one by one: wait (not a timing check)
    while rss(pid) > base + 16 * MIB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rss(pid) <= base + 16 * MIB, f"{(rss(pid) - base) >> 20} MiB still held after the greedy clients left"
    light.s.close()


def test_greedy_clients_get_a_bounded_share_and_a_light_client_is_still_served(tmp_path):
    with vhd.create(tmp_path / "g.vhd", 64 * MIB, type="fixed") as img:
        img.write(0, b"\x77" * MIB)
    sock = str(tmp_path / "g.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "g.vhd"), "--socket", sock],
                            stdout=subprocess.PIPE, text=True)  # the default budget: 128 MiB
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        hostile_load(sock, proc.pid, "g", "g", connections=8, budget=128 * MIB)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# -- replies without data, a device that waits (hostcache serve's path) -------------------------------


class WaitingDevice:
    """A device whose read and write are coroutines (as hostcache's AsyncDisk),
    with a fragmented allocation map; counts the block status requests it served."""

    size = 64 * MIB
    readonly = False

    def __init__(self) -> None:
        self.statuses = 0
        piece = 64 * 1024  # a block status of the whole disk: 1,024 descriptors, an 8 KiB reply
        self.map = [vhd.Extent(o, piece, vhd.Alloc.DATA if (o // piece) % 2 else vhd.Alloc.ZERO)
                    for o in range(0, self.size, piece)]

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    async def write(self, offset: int, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def allocation(self, offset: int, length: int) -> list:
        self.statuses += 1
        return [e for e in self.map if offset <= e.offset < offset + length]

    def close(self) -> None:
        pass


class ServerThread:
    """An NbdServer on a unix socket, its event loop in a thread of this process
    (asyncio.run: on the way out the connections' tasks are cancelled, the loop closed)."""

    def __init__(self, server: nbd.NbdServer, sock: str) -> None:
        import asyncio
        import threading

        self.server, self.ready = server, threading.Event()

        async def main() -> None:
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            async with await server.serve_unix(sock):
                self.ready.set()
                await self.stop.wait()
        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def negotiate_meta(sock: str, name: str) -> socket.socket:
    """A client with structured replies and base:allocation, in transmission."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    c = Client.__new__(Client)
    c.s = s
    c.recv(18)
    s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))

    def option(kind: int, data: bytes) -> None:
        s.sendall(struct.pack(">QII", nbd.IHAVEOPT, kind, len(data)) + data)
        while True:
            _magic, _opt, reply, n = struct.unpack(">QIII", c.recv(20))
            c.recv(n)
            if reply == nbd.REP_ACK:
                return
            assert reply < 2**31, reply
    raw, query = name.encode(), nbd.META_BASE_ALLOCATION.encode()
    option(nbd.OPT_STRUCTURED_REPLY, b"")
    option(nbd.OPT_SET_META_CONTEXT, struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(query)) + query)
    option(nbd.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    return s


def test_replies_without_data_are_held_to_the_budget_on_a_device_that_waits(tmp_path):
    """A client that sends block status requests (FLUSH, CACHE...) and never reads
    a reply: the server stops reading them once the budget holds their replies,
    instead of queueing replies (and tasks) without end."""
    dev = WaitingDevice()
    sock = str(tmp_path / "w.sock")
    srv = ServerThread(nbd.NbdServer({"w": nbd.Export("w", dev)}), sock)  # type: ignore[arg-type]
    try:
        s = negotiate_meta(sock, "w")
        s.settimeout(10)  # no progress for that long: the server stopped reading
        sent = 0
        request = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_BLOCK_STATUS, 1, 0, 64 * MIB)
        try:
            while sent < 20000:  # 160 MiB of replies: more than twice the bound below
                s.sendall(request * 100)
                sent += 100
        except TimeoutError:
            pass  # the server stopped reading: backpressure reached the client
        last, still = -1, 0
        while still < 20:  # until the server stops serving (a wait, not a timing check)
            time.sleep(0.05)
            still, last = (still + 1, last) if dev.statuses == last else (0, dev.statuses)
        reply = 20 + 4 + 8 * len(dev.map)
        buffers = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        bound = srv.server.budget.per_connection + 2 * nbd.SEND_PIECE + 2 * buffers
        assert dev.statuses * reply <= bound, f"{dev.statuses * reply >> 20} MiB of replies for a client reading none"
        s.close()
    finally:
        srv.close()


def closed(s: socket.socket) -> bool:
    """The server closed `s` (end of file or reset) before sending anything more."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_past_the_cap_are_closed_and_a_silent_handshake_is_ended(tmp_path):
    """Each connection costs the server buffers outside the budget: their number
    is bounded, and a client that never finishes its handshake (slowloris) does
    not hold one for ever."""
    sock = str(tmp_path / "c.sock")
    server = nbd.NbdServer({"w": nbd.Export("w", WaitingDevice())}, max_connections=2,  # type: ignore[arg-type]
                           stall_timeout=0.5)
    srv = ServerThread(server, sock)
    try:
        silent = []
        for _ in range(2):  # greeted, then they say nothing
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(sock)
            assert len(s.recv(18)) == 18
            silent.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(sock)
        assert closed(extra)  # the server is full: closed with no greeting
        for s in silent:
            try:
                s.sendall(b"\x00\x00")  # half of the client flags, then nothing more
            except OSError:
                pass  # already closed by the timeout (a slow machine)
            assert closed(s)  # by the handshake timeout (the socket's 10 s is only a guard)
            s.close()
        deadline = time.monotonic() + 10
        while server.active and time.monotonic() < deadline:  # the server notices (a wait, not a timing check)
            time.sleep(0.02)
        c = Client(sock, "w")  # room again: served
        assert c.size == 64 * MIB and c.request(nbd.CMD_READ, 0, 512) == (0, bytes(512))
        assert server.refused == 1
    finally:
        srv.close()
    with pytest.raises(vhd.UsageError):
        nbd.NbdServer({"w": nbd.Export("w", WaitingDevice())}, max_connections=0)  # type: ignore[arg-type]


def test_a_second_server_binding_a_live_socket_is_refused_not_a_takeover(tmp_path):
    """Two servers started at once both find no server on the socket: the one
    that binds second must fail, not unlink the first's socket and take its
    clients (the first would live on, orphaned, holding its image)."""
    import asyncio

    sock = str(tmp_path / "t.sock")
    with vhd.create(tmp_path / "first.vhd", 8 * MIB) as first, vhd.create(tmp_path / "second.vhd", 4 * MIB) as second:
        srv = ServerThread(nbd.NbdServer({"first": nbd.Export("first", first)}), sock)
        try:
            other = nbd.NbdServer({"second": nbd.Export("second", second)})
            with pytest.raises(vhd.UsageError, match="already in use"):
                asyncio.run(other.serve_unix(sock))
            assert Client(sock, "").size == 8 * MIB  # the first server still has its socket
        finally:
            srv.close()


def test_serve_refuses_a_port_out_of_range_with_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhd", "serve", str(tmp_path / "x.vhd"), "--port", "99999"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "a TCP port" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_huge_zero_write_does_not_hold_up_another_client(tmp_path):
    """WRITE_ZEROES with NO_HOLE takes up to 4 GiB: written in one go it stopped
    every client for seconds (about 2.5 s a GiB here). A light client's read sent while it runs is
    answered before it (an order, not a time)."""
    import select

    with vhd.create(tmp_path / "z.vhd", 4 << 30):
        pass
    sock = str(tmp_path / "z.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "z.vhd"), "--socket", sock],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        greedy, light = Client(sock, "z"), Client(sock, "z")
        greedy.s.settimeout(120)
        greedy.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, nbd.CMDF_NO_HOLE, nbd.CMD_WRITE_ZEROES, 7, 0,
                                     1 << 30))
        time.sleep(0.3)  # the server has started it
        assert light.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
        answered, _, _ = select.select([greedy.s], [], [], 0)
        assert not answered, "the zero write was finished before a 4 KiB read sent after it was served"
        assert struct.unpack(">IIQ", greedy.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 7)
        assert light.request(nbd.CMD_READ, (1 << 30) - 4096, 4096) == (0, bytes(4096))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_file_name_that_is_not_utf8_is_served_under_a_utf8_name(tmp_path):
    """bad\\xff.vhd: the export's name (and description) went out as text that
    cannot be encoded, and every client's handshake ended in a traceback."""
    path = os.path.join(os.fsencode(tmp_path), b"bad\xff.vhd")
    with vhd.create(os.fsdecode(path), 8 * MIB) as img:
        img.write(0, b"odd name")
    assert nbd.export_name(os.fsdecode(path)) == "bad\ufffd"
    sock = str(tmp_path / "u.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", os.fsdecode(path), "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["serving"] == ["bad\ufffd"]  # type: ignore[union-attr]
        listed = json.loads(run("nbdinfo", "--json", "--list", f"nbd+unix://?socket={sock}").stdout)
        assert [e["export-name"] for e in listed["exports"]] == ["bad\ufffd"]
        from vhd.mount import nbd_unix_uri

        assert Client(sock, "bad\ufffd").request(nbd.CMD_READ, 0, 8)[1] == b"odd name"
        info = json.loads(run("nbdinfo", "--json", nbd_unix_uri("bad\ufffd", sock)).stdout)["exports"][0]
        assert (info["export-size"], info["description"]) == (8 * MIB, "bad\ufffd.vhd")  # the URI mount gives nbdfuse
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err


def test_writes_whose_data_never_comes_do_not_hold_the_budget_for_ever(tmp_path):
    """Four clients each send a 32 MiB WRITE's header and a few bytes of its data:
    they held the whole budget, and any other client's read over 1 MiB waited
    for ever. A payload that stalls closes its connection."""
    with vhd.create(tmp_path / "s.vhd", 64 * MIB) as img:
        img.write(0, b"\x42" * 2 * MIB)
    sock = str(tmp_path / "s.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "s.vhd"), "--socket", sock,
                             "--stall-timeout", "1"], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        hogs = []
        for _ in range(4):
            h = Client(sock, "s")
            h.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 32 * MIB) + b"h" * 100)
            hogs.append(h)
        c = Client(sock, "s")
        c.s.settimeout(30)  # a guard: the stall timeout is 1 s
        assert c.request(nbd.CMD_READ, 0, 2 * MIB) == (0, b"\x42" * 2 * MIB)
        assert all(closed(h.s) for h in hogs)
        assert c.request(nbd.CMD_READ, 0, 512) == (0, b"\x42" * 512)  # the stalled writes left nothing
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_block_status_of_zero_bytes_is_refused_and_the_connection_lives(served):
    """A reply with no descriptor breaks the protocol: libnbd dropped the
    connection ("invalid length in NBD_REPLY_TYPE_BLOCK_STATUS")."""
    import nbd as libnbd

    _, sock = served
    h = libnbd.NBD()
    h.add_meta_context("base:allocation")
    h.set_strict_mode(0)  # libnbd sends what we ask; the server has to judge
    h.connect_uri(uri(sock, "dyn"))
    for offset in (0, 64 * MIB):  # the start, the end of the export
        with pytest.raises(libnbd.Error) as refused:
            h.block_status(0, offset, lambda *a: 0)
        assert refused.value.errno == "EINVAL"
    assert h.pread(4096, MIB) == b"\xab" * 4096  # still connected
    h.shutdown()


class FailingDevice(WaitingDevice):
    """A device stacked on a layer with errors of its own (hostcache's attached
    disk over the stamp: NotEnoughNodes when the extent nodes are full)."""

    class LayerError(Exception):
        pass

    async def write(self, offset: int, data: bytes) -> None:
        raise self.LayerError("need 3 healthy extent nodes")


class FailingFileDevice(FailingDevice):
    """The same, answering at once (vhd serve's inline path)."""

    def write(self, offset: int, data: bytes) -> None:  # type: ignore[override]
        raise self.LayerError("need 3 healthy extent nodes")

    def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return bytes(length)


@pytest.mark.parametrize("device", [FailingDevice, FailingFileDevice])
def test_an_error_from_a_layer_under_the_device_is_eio_not_a_request_never_answered(tmp_path, capfd, device):
    """hostcache serve with every extent node full: the write's task died with
    NotEnoughNodes ("Task exception was never retrieved") and the client waited
    for its reply for ever."""
    sock = str(tmp_path / "f.sock")
    srv = ServerThread(nbd.NbdServer({"f": nbd.Export("f", device())}), sock)  # type: ignore[arg-type]
    try:
        c = Client(sock, "f")
        for _ in range(3):
            assert c.request(nbd.CMD_WRITE, 0, 512, b"w" * 512)[0] == 5  # EIO
        assert c.request(nbd.CMD_READ, 0, 512) == (0, bytes(512))  # the connection goes on
    finally:
        srv.close()
    said = capfd.readouterr().err
    assert "need 3 healthy extent nodes" in said  # the operator is told why, once (a retrying client
    assert said.count("need 3 healthy") <= 1  # would grow a mount's log in /run, in memory, for ever)


def test_a_light_client_is_served_when_others_hold_the_pool_and_the_reserve(tmp_path):
    """4 connections of unread 32 MiB reads take the shared pool; 8 more, each
    with one unread 1 MiB read, took the whole 8 MiB reserve, and a light
    client's 4 KiB read then waited for ever. The reserve now holds a small
    request for every connection the server admits."""
    with vhd.create(tmp_path / "r.vhd", 64 * MIB, type="fixed"):
        pass
    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "r.vhd"), "--socket", sock],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        hogs = greedy(sock, "r", 4, 10)
        for _ in range(8):
            h = Client(sock, "r")
            h.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 1, 0, MIB))
            hogs.append(h)
        time.sleep(1)  # the server takes their budget (an ordering aid, not a timing check)
        light = Client(sock, "r")
        light.s.settimeout(30)  # a guard: the answer comes at once or never
        assert light.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
        for h in hogs:
            h.s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class Recorder:
    """A transport and stream writer that keep what the server sends (the in-process hot path test)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.transport = self

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        pass


def small_requests(size: int, count: int) -> list[tuple[int, int, int, bytes]]:
    """(kind, offset, length, payload) of fio-like 4 KiB reads and writes, and a few other small sizes."""
    out = []
    for i in range(count):
        length = (512, 4096, 65536, nbd.SEND_PIECE)[i % 4]
        offset = (i * 7919 * 4096) % (size - length)
        kind = nbd.CMD_WRITE if i % 3 == 0 else nbd.CMD_READ
        out.append((kind, offset, length, bytes([i % 251]) * length if kind == nbd.CMD_WRITE else b""))
    return out


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_small_reads_and_writes_call_no_helper_and_answer_as_serve_does(tmp_path, kind, structured):
    """The hot path (small READ and WRITE, no flags) costs the budget's two
    calls per request and no other function of the server, and answers byte
    for byte what the general path (_serve) answers on a twin image. The
    in-flight budget's checks had cost eight calls per request, and fio's
    4 KiB figures 8-23%."""
    images = []
    for name in ("hot", "twin"):
        with vhd.create(tmp_path / f"{name}.vhd", 8 * MIB, type=kind) as img:
            img.write(MIB, b"\x5a" * MIB)
        images.append(vhd.open(tmp_path / f"{name}.vhd", writable=True))
    hot, twin = (nbd.Export(n, img) for n, img in zip(("hot", "twin"), images, strict=True))
    srv = nbd.NbdServer({"hot": hot, "twin": twin})
    conn = nbd.Connection(structured=structured, export=hot)
    requests = small_requests(8 * MIB, 200)
    stream = b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, k, cookie, off, n) + data
                      for cookie, (k, off, n, data) in enumerate(requests))
    stream += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0)
    server_files = {nbd.__file__, nbd.Budget.take_nowait.__code__.co_filename}
    calls = []

    def count(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and frame.f_code.co_filename in server_files:
            calls.append(frame.f_code.co_name)

    async def serve() -> Recorder:
        reader = asyncio.StreamReader(limit=len(stream) + 1)
        reader.feed_data(stream)
        reader.feed_eof()
        out = Recorder()
        sys.setprofile(count)
        try:
            await srv._transmission(reader, out, conn)  # type: ignore[arg-type]
        finally:
            sys.setprofile(None)
        return out

    try:
        sent = asyncio.run(serve()).sent
        once = {"_transmission": 1, "flags": 1}  # per connection: the export's read-only flag
        per_request = Counter(c for c in calls if c != "serve")
        assert per_request == {"take_nowait": len(requests), "give_back": len(requests), **once}
        twin_conn = nbd.Connection(structured=structured, export=twin)
        expected = [b"".join(srv._serve(twin_conn, twin, 0, k, cookie, off, n, data))
                    for cookie, (k, off, n, data) in enumerate(requests)]
        assert sent == expected
        assert srv.budget.used == 0  # every request gave its bytes back
        assert images[0].read(0, 8 * MIB) == images[1].read(0, 8 * MIB)
    finally:
        for img in images:
            img.close()


def settled_budget(server: nbd.NbdServer, most: float = 20.0) -> dict[str, int]:
    """The budget's statistics once it stops moving (a wait for the server's loop, not a timing check)."""
    last, still, deadline = None, 0, time.monotonic() + most
    while still < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = server.budget.statistics()
        still, last = (still + 1, last) if now == last else (0, now)
    return server.budget.statistics()


@pytest.mark.parametrize("ending", ["bad magic", "a write over the maximum", "cut mid-request", "cut mid-data"])
def test_requests_queued_behind_a_broken_connection_give_their_budget_back(tmp_path, ending):
    """On a device that waits (hostcache serve), requests already in the socket
    buffer are each given a task before any runs; a client that then broke the
    protocol or vanished had those tasks cancelled before they started, so their
    budget was never given back: 5 pipelined 1 MiB reads leaked 5 MiB a
    connection, and a few dozen such clients left the server no budget."""
    sock = str(tmp_path / "w.sock")
    srv = ServerThread(nbd.NbdServer({"w": nbd.Export("w", WaitingDevice())}), sock)  # type: ignore[arg-type]
    try:
        read = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 1, 0, MIB)
        huge = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 2, 0, nbd.MAX_REQUEST + 1)
        tail = {"bad magic": bytes(nbd._REQUEST.size), "a write over the maximum": huge, "cut mid-request": read[:11],
                "cut mid-data": struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 2, 0, 4096) + b"w" * 99}
        for _ in range(4):
            c = Client(sock, "w")
            c.s.sendall(read * 5 + tail[ending])
            c.s.shutdown(socket.SHUT_WR)
            c.s.close()
        stats = settled_budget(srv.server)
        assert (stats["used"], stats["reserve_used"]) == (0, 0), stats
        c = Client(sock, "w")  # and the server goes on
        assert c.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
    finally:
        srv.close()


@pytest.mark.parametrize("command", ["TRIM", "WRITE_ZEROES without NO_HOLE"])
@pytest.mark.parametrize("kind", ["differencing"])
def test_a_huge_trim_does_not_hold_up_another_client(tmp_path, kind, command):
    """TRIM and WRITE_ZEROES without NO_HOLE take up to 4 GiB too, and on a
    differencing image a discard writes zeros (on a fixed one too, where the
    filesystem cannot punch holes): done in one call it stopped every client
    (4 GiB: 12 s on a differencing image). A light client's read sent while
    it runs is answered before it (an order, not a time), and the range reads
    as zeros afterwards."""
    import select

    if kind == "fixed":
        with vhd.create(tmp_path / "z.vhd", 2 << 30, type="fixed") as img:
            img.write(0, b"\x77" * 4096)
    else:
        with vhd.create(tmp_path / "p.vhd", 2 << 30) as img:
            img.write(0, b"\x77" * 4096)
        with vhd.create(tmp_path / "z.vhd", parent=tmp_path / "p.vhd"):
            pass
    sock = str(tmp_path / "z.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vhd", "serve", str(tmp_path / "z.vhd"), "--socket", sock],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        greedy, light = Client(sock, "z"), Client(sock, "z")
        greedy.s.settimeout(120)
        cmd = nbd.CMD_TRIM if command == "TRIM" else nbd.CMD_WRITE_ZEROES
        greedy.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, 7, 0, 1 << 30))
        time.sleep(0.3)  # the server has started it
        assert light.request(nbd.CMD_READ, (1 << 30) + 4096, 4096) == (0, bytes(4096))
        answered, _, _ = select.select([greedy.s], [], [], 0)
        assert not answered, "the discard was finished before a 4 KiB read sent after it was served"
        assert struct.unpack(">IIQ", greedy.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 7)
        assert light.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_large_discard_of_a_dynamic_image_still_unallocates_whole_blocks(tmp_path):
    """A discard served a piece at a time never splits a block: the dynamic
    image's blocks in the range are unallocated, not filled with zeros."""
    with vhd.create(tmp_path / "d.vhd", 64 * MIB) as img:
        img.write(0, b"\x77" * 64 * MIB)
    srv = ServerThread(nbd.NbdServer({"d": nbd.Export("d", vhd.open(tmp_path / "d.vhd", writable=True))}),
                       str(tmp_path / "d.sock"))
    try:
        c = Client(str(tmp_path / "d.sock"), "d")
        assert c.request(nbd.CMD_TRIM, 3 * MIB, 40 * MIB)[0] == 0
        assert c.request(nbd.CMD_READ, 3 * MIB, 4096) == (0, bytes(4096))
        assert c.request(nbd.CMD_READ, 2 * MIB, 4096) == (0, b"\x77" * 4096)
        dev = srv.server.exports["d"].device
        zero = [(e.offset, e.length) for e in dev.allocation(0, 64 * MIB) if e.state is vhd.Alloc.ZERO]
        assert zero == [(4 * MIB, 38 * MIB)]  # blocks 2 to 20; the partial ones hold written zeros
        assert sum(1 for b in dev.bat if b != 0xFFFFFFFF) == 32 - 19
        c.s.close()
    finally:
        srv.close()


@pytest.mark.parametrize("waits", [False, True])
def test_clients_that_never_take_their_replies_are_closed_after_the_stall_timeout(tmp_path, waits):
    """5 connections each sending 32 MiB reads and reading no reply held the
    whole budget for as long as they stayed: nbdcopy (256 KiB requests) and
    qemu-img convert beside them waited for ever. A reply the client takes
    nothing of for stall_timeout now closes its connection, freeing its budget;
    a client that does read is served."""
    if waits:
        device = WaitingDevice()
    else:
        with vhd.create(tmp_path / "g.vhd", 64 * MIB, type="fixed"):
            pass
        device = vhd.open(tmp_path / "g.vhd", writable=True)
    sock = str(tmp_path / "g.sock")
    srv = ServerThread(nbd.NbdServer({"g": nbd.Export("g", device)}, stall_timeout=1.0), sock)  # type: ignore[arg-type]
    try:
        hogs = []
        for _ in range(5):
            h = Client(sock, "g")
            h.s.sendall(b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, k, 0, 32 * MIB)
                                 for k in range(4)))
            hogs.append(h)
        reader = Client(sock, "g")
        reader.s.settimeout(60)  # a guard: served once the hogs are closed, or never
        assert reader.request(nbd.CMD_READ, 0, MIB) == (0, bytes(MIB))
        deadline = time.monotonic() + 60  # a guard: the hogs are closed (reading them would make them readers)
        while srv.server.active > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.active == 1, f"{srv.server.active - 1} clients that take no replies still served"
        stats = settled_budget(srv.server)
        assert (stats["used"], stats["reserve_used"]) == (0, 0), stats
        assert reader.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))  # the reader is not closed
    finally:
        srv.close()


class SlowDiscardDevice(WaitingDevice):
    """A device that waits (as hostcache's AsyncDisk) whose discard takes 2 ms
    a MiB without waiting (as a cache writing zeros); logs its calls in order."""

    size = 2 << 30

    def __init__(self) -> None:
        self.statuses, self.map, self.log = 0, [], []

    async def read(self, offset: int, length: int) -> bytes:
        self.log.append(("read", offset, length))
        return bytes(length)

    def discard(self, offset: int, length: int) -> None:
        self.log.append(("discard", offset, length))
        time.sleep(0.002 * length / MIB)


@pytest.mark.parametrize("command", ["TRIM", "WRITE_ZEROES without NO_HOLE"])
def test_a_huge_trim_on_a_device_that_waits_does_not_hold_up_another_client(tmp_path, command):
    """On a device that waits (hostcache serve) a TRIM or WRITE_ZEROES without
    NO_HOLE of up to 4 GiB was one discard call run on the event loop: every
    client waited for it. Now it goes a piece at a time (ZERO_CHUNK) with the
    loop let go in between: a light client's read sent while it runs is
    served before its last piece (an order, not a time), and the pieces
    cover the range exactly."""
    dev = SlowDiscardDevice()
    sock = str(tmp_path / "w.sock")
    srv = ServerThread(nbd.NbdServer({"w": nbd.Export("w", dev)}), sock)  # type: ignore[arg-type]
    try:
        greedy, light = Client(sock, "w"), Client(sock, "w")
        greedy.s.settimeout(60)
        cmd = nbd.CMD_TRIM if command == "TRIM" else nbd.CMD_WRITE_ZEROES
        greedy.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, 7, MIB, 1 << 30))
        deadline = time.monotonic() + 30
        while not dev.log and time.monotonic() < deadline:  # the server has started it
            time.sleep(0.001)
        assert light.request(nbd.CMD_READ, 0, 4096) == (0, bytes(4096))
        assert struct.unpack(">IIQ", greedy.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 7)
        pieces = [(o, n) for what, o, n in dev.log if what == "discard"]
        assert max(n for _, n in pieces) <= nbd.ZERO_CHUNK
        assert pieces[0][0] == MIB and sum(n for _, n in pieces) == 1 << 30
        last = max(i for i, (what, _, _) in enumerate(dev.log) if what == "discard")
        assert dev.log.index(("read", 0, 4096)) < last, "the read waited for the whole discard"
    finally:
        srv.close()


class GatedDevice(WaitingDevice):
    """A device whose I/Os all wait until `n` of them are waiting, then end in one pass of the loop."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.waiting = n, 0
        self.gate = asyncio.Event()

    async def _wait(self) -> None:
        self.waiting += 1
        if self.waiting == self.n:
            self.gate.set()
        await self.gate.wait()

    async def read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return bytes([offset // 4096 % 251]) * length

    async def write(self, offset: int, data: bytes) -> None:
        await self._wait()


def test_replies_ready_in_one_pass_of_the_loop_go_out_in_one_send():
    """hostcache serve's path (a device that waits): 64 I/Os whose waits end
    together are answered in one send, not one each (the lead's profile: one
    send per reply, ~120 us each under load); every reply whole and right."""
    n = 64
    dev = GatedDevice(n)
    srv = nbd.NbdServer({"d": nbd.Export("d", dev)})  # type: ignore[arg-type]
    conn = nbd.Connection(export=srv.exports["d"])
    requests = [(nbd.CMD_WRITE if i % 2 else nbd.CMD_READ, i * 4096, 4096) for i in range(n)]
    stream = b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, k, cookie, off, length)
                      + (b"\x01" * length if k == nbd.CMD_WRITE else b"")
                      for cookie, (k, off, length) in enumerate(requests))
    stream += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0)

    async def serve() -> Recorder:
        reader = asyncio.StreamReader(limit=len(stream) + 1)
        reader.feed_data(stream)
        reader.feed_eof()
        out = Recorder()
        await srv._transmission(reader, out, conn)  # type: ignore[arg-type]
        return out

    sent = asyncio.run(serve()).sent
    assert len(sent) <= 2  # the last I/O's reply may go a pass before the others'
    raw, at, answered = b"".join(sent), 0, {}
    while at < len(raw):
        magic, error, cookie = struct.unpack_from(">IIQ", raw, at)
        assert magic == nbd.SIMPLE_REPLY_MAGIC and error == 0
        at += 16
        kind, off, length = requests[cookie]
        if kind == nbd.CMD_READ:
            answered[cookie] = raw[at:at + length]
            at += length
        else:
            answered[cookie] = b""
    assert answered == {c: bytes([off // 4096 % 251]) * length if k == nbd.CMD_READ else b""
                        for c, (k, off, length) in enumerate(requests)}


class FileLikeDevice(WaitingDevice):
    """WaitingDevice's map, but a read and write that answer at once (as a file's)."""

    def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize("device", [FileLikeDevice, WaitingDevice])
def test_a_client_that_disconnects_before_reading_its_replies_gets_them_all(tmp_path, device):
    """NBD_CMD_DISC sent behind pipelined reads (libnbd's aio_disconnect with
    commands in flight): proto.md has the server handle every outstanding
    request first, so each reply reaches the client whole, however slowly it
    reads them, before the server closes. The server aborted a connection whose
    replies were still in its buffer, cutting the last one off."""
    sock = str(tmp_path / "d.sock")
    srv = ServerThread(nbd.NbdServer({"d": nbd.Export("d", device())}), sock)  # type: ignore[arg-type]
    try:
        c = Client(sock, "d")
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # what the server sends stays in its buffer
        n, size = 4, 4 * MIB
        for cookie in range(1, n + 1):
            c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, cookie, 0, size))
        c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, n + 1, 0, 0))
        cookies = []
        for _ in range(n):
            magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, error) == (nbd.SIMPLE_REPLY_MAGIC, 0)
            for _piece in range(size // (64 * 1024)):  # a slow reader: the server's buffer stays full
                c.recv(64 * 1024)
                time.sleep(0.001)
            cookies.append(cookie)
        assert sorted(cookies) == list(range(1, n + 1))
        assert c.s.recv(1) == b""  # then the server closes
        c.s.close()
    finally:
        srv.close()
