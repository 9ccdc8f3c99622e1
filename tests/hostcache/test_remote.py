"""Hosts over the network: two host folders over one stamp reached only
through `stamp serve` (a subprocess on a free port), as hosts on other
machines would share it."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from hostcache.cache import CachedBlob, CacheMode
from hostcache.errors import ConflictingUserInput, HostError
from hostcache.host import OS_LUN, Host
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.disks import Disks
from stamp.errors import LeaseAlreadyPresent
from stamp.remote import RemoteStamp
from stamp.rest import DEVSTORE_KEY
from tests.conftest import run
from tests.hostcache.test_host import make_image
from tests.stamp.rest.conftest import Server, start_server, stop_server

MIB = 1 << 20
SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))


@pytest.fixture
def served(tmp_path):
    stamp = Stamp.create(str(tmp_path / "st"))
    d = Disks(stamp)
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_empty("data1", 128, "Premium_LRS")
    d.create_empty("data2", 128, "Premium_LRS")
    stamp.close()
    server = start_server(str(tmp_path / "st"))
    yield server
    if server.alive():
        stop_server(server)


def host(tmp_path, server: Server, name: str) -> Host:
    return Host.create(str(tmp_path / name), server.endpoint, cache_bytes=32 * MIB, clock=FakeClock())


def test_a_disk_attached_by_one_host_cannot_be_attached_by_another(tmp_path, served):
    a, b = host(tmp_path, served, "a"), host(tmp_path, served, "b")
    with a, b:
        a.create_vm("vm1", "D8s_v3", "mbr")
        b.create_vm("vm2", "D8s_v3", "mbr")
        a.attach("vm1", "data1", 0, "ReadOnly")
        # the record names the host folder by its id (two machines may have host folders of one path)
        assert a.disks.record("data1")["host"] == a.config["id"] != b.config["id"]
        with pytest.raises(ConflictingUserInput, match="attached to only one VM.*vm1"):
            b.attach("vm2", "data1", 0, "ReadOnly")
        assert "0" not in b.vm("vm2")["data_disks"]
        a.detach("vm1", 0)
        b.attach("vm2", "data1", 0, "ReadOnly")  # free again
        assert b.disks.record("data1")["attached_to"] == "vm2"


def test_two_hosts_racing_to_attach_one_disk_one_wins(tmp_path, served):
    """The state moves Unattached -> Attached by compare-and-set in the stamp."""
    hosts = [host(tmp_path, served, f"h{i}") for i in range(4)]
    for i, h in enumerate(hosts):
        h.create_vm(f"vm{i}", "D8s_v3", "mbr")
    won, lost = [], []

    def attach(i: int) -> None:
        try:
            hosts[i].attach(f"vm{i}", "data2", 0)
            won.append(i)
        except ConflictingUserInput:
            lost.append(i)
    threads = [threading.Thread(target=attach, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 3
    for h in hosts:
        h.close()


@pytest.mark.parametrize("caching", ["ReadWrite", "None"])
def test_what_one_host_wrote_another_reads_exactly(tmp_path, served, caching):
    a, b = host(tmp_path, served, "a"), host(tmp_path, served, "b")
    with a, b:
        a.create_vm("vm1", "D8s_v3", "mbr")
        b.create_vm("vm2", "D8s_v3", "mbr")
        a.attach("vm1", "data1", 0, caching)
        disk = a.open_disk("vm1", 0)
        data = os.urandom(5 * MIB + 512)  # more than one 4 MiB Put Page
        disk.write(3 * 512, data)
        disk.write(100 * MIB, b"end".ljust(4096, b"\0"))
        a.detach("vm1", 0)  # flushes what the cache holds dirty
        b.attach("vm2", "data1", 0, "ReadOnly")
        got = b.open_disk("vm2", 0)
        assert got.read(3 * 512, len(data)) == data
        assert got.read(100 * MIB, 3) == b"end"
        assert got.read(0, 512) == bytes(512)


def test_a_host_does_not_serve_cached_lines_another_host_rewrote(tmp_path, served):
    """The version contract across hosts: b keeps its clean lines of a blob
    across opens only while the stamp's version is the one b recorded, and
    a write by a (another process, over its own connection) moves it on.
    (Detach drops a disk's lines anyway: here b reads the blob through its
    cache as it reads an image under its disks.)"""
    a, b = host(tmp_path, served, "a"), host(tmp_path, served, "b")
    with a, b:
        a.create_vm("vm1", "D8s_v3", "mbr")
        a.attach("vm1", "data1", 0, "ReadWrite")
        a.open_disk("vm1", 0).write(0, b"old" * 20000)
        a.detach("vm1", 0)
        blob = b.disks.record("data1")["blob"]

        def read_through_b() -> tuple[bytes, int]:
            before = b.cache.stats.read_misses
            f = CachedBlob(b.cache, b.stamp, blob, CacheMode.READONLY, writable=False)
            try:
                return f.pread(60000, 0), b.cache.stats.read_misses - before  # a fixed VHD: guest offsets
            finally:
                f.close()
        assert read_through_b() == (b"old" * 20000, 118)  # sectors missed
        assert read_through_b() == (b"old" * 20000, 0)  # unchanged: b's cached line is served
        a.attach("vm1", "data1", 0, "ReadWrite")
        a.open_disk("vm1", 0).write(4096, b"new" * 1000)
        a.detach("vm1", 0)
        want = bytearray(b"old" * 20000)
        want[4096:7096] = b"new" * 1000
        assert read_through_b() == (want, 118)  # read again from the stamp


def test_a_disk_made_again_under_its_name_never_shows_the_old_bytes(tmp_path, served):
    a, b = host(tmp_path, served, "a"), host(tmp_path, served, "b")
    with a, b:
        a.create_vm("vm1", "D8s_v3", "mbr", os_caching="ReadWrite")
        osd = a.open_disk("vm1", OS_LUN)
        image_bytes = osd.read(40 * MIB, 4096)
        osd.write(40 * MIB, b"secret".ljust(4096, b"\0"))
        assert osd.read(40 * MIB, 6) == b"secret"  # in a's cache, and (after the delete's flush) the stamp
        old_id = a.stamp.blobs.blob_id(a.disks.record("vm1-osdisk")["blob"])
        a.delete_vm("vm1", delete_os_disk=True)
        b.create_vm("vm1", "D8s_v3", "mbr", os_caching="ReadWrite")  # another host makes a disk of that name
        b.open_disk("vm1", OS_LUN).write(40 * MIB, b"other".ljust(4096, b"\0"))
        b.delete_vm("vm1", delete_os_disk=True)
        a.create_vm("vm1", "D8s_v3", "mbr", os_caching="ReadWrite")
        assert a.stamp.blobs.blob_id(a.disks.record("vm1-osdisk")["blob"]) != old_id
        assert a.open_disk("vm1", OS_LUN).read(40 * MIB, 4096) == image_bytes


def _write_until_stopped(h: Host, acked: list[int], stop: threading.Event, errors: list[BaseException]) -> None:
    disk = h.open_disk("vm1", 0)
    i = 0
    try:
        while not stop.is_set() and i < 2000:
            disk.write(i * 8192, i.to_bytes(4, "big") * 2048)
            disk.flush()  # acknowledged: from here it must survive
            acked.append(i)
            i += 1
    except BaseException as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("caching", ["ReadWrite", "None"])
def test_kill_9_of_the_server_while_a_host_writes_loses_no_flushed_write(tmp_path, caching):
    stamp = Stamp.create(str(tmp_path / "st"))
    d = Disks(stamp)
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_empty("data1", 128, "Premium_LRS")
    stamp.close()
    port = _free_port()
    server = start_server(str(tmp_path / "st"), "--port", str(port))
    h = host(tmp_path, server, "a")
    h.create_vm("vm1", "D8s_v3", "mbr")
    h.attach("vm1", "data1", 0, caching)
    acked: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    writer = threading.Thread(target=_write_until_stopped, args=(h, acked, stop, errors))
    writer.start()
    try:
        for _ in range(2):  # twice: each time the host retries into the next server
            while len(acked) < 20 and writer.is_alive():
                time.sleep(0.01)
            seen = len(acked)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            time.sleep(0.3)
            server = start_server(str(tmp_path / "st"), "--port", str(port))
            while len(acked) < seen + 20 and writer.is_alive():
                time.sleep(0.01)
            assert len(acked) >= seen + 20, errors
    finally:
        stop.set()
        writer.join()
    assert not errors
    h.detach("vm1", 0)
    h.close()
    stop_server(server)
    with Stamp.open(str(tmp_path / "st")) as stamp:  # the stamp itself, no server in between
        blob = Disks(stamp).record("data1")["blob"]
        from stamp.blobfile import PageBlobFile
        from vhd.image import open_image
        img = open_image(PageBlobFile(stamp, blob, writable=False))
        for i in acked:
            assert img.read(i * 8192, 8192) == i.to_bytes(4, "big") * 2048, i
        assert stamp.check().ok


def test_a_server_that_is_down_is_a_clear_error(tmp_path, served):
    h = host(tmp_path, served, "a")
    h.create_vm("vm1", "D8s_v3", "mbr")
    h.close()
    stop_server(served)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "hostcache", "--host", str(tmp_path / "a"), "vm", "attach", "vm1",
                          "data1", "--lun", "0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DISKSTAMP_REMOTE_RETRY_SECONDS": "1"})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "did not answer" in out.stderr and "connection refused" in out.stderr
    assert time.monotonic() - start < 60


def _init(tmp_path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostcache", "--host", str(tmp_path / name), "init", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DISKSTAMP_REMOTE_RETRY_SECONDS": "1"})


def test_init_over_a_url_and_its_clear_errors(tmp_path, served):
    ok = _init(tmp_path, "a", "--stamp", served.endpoint)
    assert ok.returncode == 0, ok.stderr
    assert '"stamp": "' + served.endpoint in ok.stdout
    wrong_key = DEVSTORE_KEY[:-8] + "AAAAAAA="
    bad = _init(tmp_path, "b", "--stamp", served.endpoint, "--account-key", wrong_key)
    assert bad.returncode == 1 and "refused the account key (403 AuthenticationFailed)" in bad.stderr
    assert not os.path.exists(tmp_path / "b" / "host.json")
    bad = _init(tmp_path, "c", "--stamp", "http://127.0.0.1:10000")
    assert bad.returncode == 1 and "http://HOST:PORT/ACCOUNT" in bad.stderr
    bad = _init(tmp_path, "d", "--stamp", served.endpoint, "--account-key", "not base64!")
    assert bad.returncode == 1 and "not base64" in bad.stderr
    bad = _init(tmp_path, "e", "--stamp", f"http://127.0.0.1:{_free_port()}/devstoreaccount1")
    assert bad.returncode == 1 and "did not answer" in bad.stderr
    for r in (ok, bad):
        assert "Traceback" not in r.stderr
    with open(tmp_path / "a" / "host.json") as f:
        assert "account_key" not in f.read()  # the default key is not written down
    keyed = _init(tmp_path, "f", "--stamp", served.endpoint, "--account-key", DEVSTORE_KEY)
    assert keyed.returncode == 0 and DEVSTORE_KEY not in keyed.stdout
    assert os.stat(tmp_path / "f" / "host.json").st_mode & 0o077 == 0


def test_a_vault_backup_of_a_remote_hosts_disk_is_a_clear_refusal(tmp_path, served):
    with host(tmp_path, served, "a") as h:
        h.create_vm("vm1", "D8s_v3", "mbr")
        with pytest.raises(HostError, match="vault backups are made where the stamp is"):
            h.backup("vm1", OS_LUN, vault=None)


def test_the_host_api_takes_the_account_key_only(served):
    with pytest.raises(Exception, match="refused the account key"):
        RemoteStamp(served.endpoint, DEVSTORE_KEY[:-8] + "AAAAAAA=")
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as e:  # no credentials at all
        urllib.request.urlopen(f"{served.endpoint}/$diskstamp/disks", timeout=10)
    assert e.value.code == 403 and e.value.headers["x-ms-error-code"] == "AuthorizationFailure"



def test_the_host_api_refuses_another_account_than_the_disks_owner(tmp_path, served):
    """The stamp's disks are the default account's: over Blob REST another
    account of the same server cannot read them, nor may it list, create,
    delete or attach them over the host API."""
    import base64

    from stamp.errors import AuthorizationFailure

    stop_server(served)
    other_key = base64.b64encode(b"k" * 32).decode()
    server = start_server(served.stamp, "--account", f"other:{other_key}")
    try:
        other = server.url + "/other"
        with pytest.raises(AuthorizationFailure, match="devstoreaccount1"):
            RemoteStamp(other, other_key)
        out = _init(tmp_path, "o", "--stamp", other, "--account-key", other_key)
        assert out.returncode == 1 and "AuthorizationFailure" in out.stderr and "Traceback" not in out.stderr
        with RemoteStamp(server.endpoint) as owner:
            assert "data1" in [d["name"] for d in owner.records().disks()]
    finally:
        stop_server(server)


class _Foreign:
    """An HTTP server that answers every request 200 with `answers[kind]`
    (headers, body): a broken server, or not a stamp at all."""

    def __init__(self, answers: dict[str, tuple[dict[str, str], bytes]]) -> None:
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                kind = "api" if "$diskstamp" in self.path else \
                    "ranges" if "comp=pagelist" in self.path else self.command
                headers, body = outer.answers.get(kind, ({}, b""))
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.answers = answers
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/devstoreaccount1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_broken_or_foreign_server_is_a_clear_error_never_a_traceback(tmp_path):
    from stamp.errors import StampError
    from stamp.remote import Malformed

    foreign = _Foreign({"api": ({}, b"<html>not a stamp</html>")})
    try:
        with pytest.raises(Malformed, match="does not send"):
            RemoteStamp(foreign.url, retry_seconds=0)
        out = _init(tmp_path, "x", "--stamp", foreign.url)
        assert out.returncode == 1 and "does not send" in out.stderr and "Traceback" not in out.stderr
        assert not os.path.exists(tmp_path / "x")
        foreign.answers["api"] = ({}, b'{"disks": 5, "lease": null, "holder": 7}')
        remote = RemoteStamp(foreign.url, retry_seconds=0)
        with pytest.raises(Malformed):
            remote.records().disks()
        with pytest.raises(Malformed):
            remote.blobs.acquire_writer_lease("disks/d")  # no lease in the answer
        foreign.answers["HEAD"] = ({"Content-Length": "0"}, b"")  # no x-diskstamp-* headers
        with pytest.raises(Malformed):
            remote.blobs.version("disks/d")
        foreign.answers["GET"] = ({"Content-Range": "bytes 0-3/10"}, b"abcd")  # not the bytes asked for
        for offset, n in ((4, 4), (0, 2), (0, 8)):
            with pytest.raises(Malformed):
                remote.blobs.read("disks/d", offset, n)
        foreign.answers["GET"] = ({}, b"abcd")  # no Content-Range
        with pytest.raises(Malformed):
            remote.blobs.read("disks/d", 0, 4)
        foreign.answers["ranges"] = ({}, b"<PageList><PageRange><Start>x</Start>")
        with pytest.raises(StampError):
            remote.blobs.page_ranges("disks/d")
        remote.close()
    finally:
        foreign.close()


def test_connections_of_threads_that_ended_are_closed(served):
    """One connection per thread, and a thread that ended leaves none open:
    a long run of short-lived threads (a boot, a caller's own threads) does
    not grow the client's sockets, nor the server's."""
    with RemoteStamp(served.endpoint) as remote:
        blob = remote.records().record("data1")["blob"]
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(100):
            t = threading.Thread(target=remote.blobs.read, args=(blob, 0, 512))
            t.start()
            t.join()
        assert len(os.listdir("/proc/self/fd")) <= before + 2
        assert len(remote.endpoint._all) <= 2


def test_a_host_api_body_without_a_length_is_refused_not_drained(served):
    """A chunked body (no Content-Length) is not taken for an empty one, nor
    read to its end: 411, and the connection is closed."""
    import http.client

    with RemoteStamp(served.endpoint) as remote:
        target, headers = remote.endpoint._signed("POST", "$diskstamp/flush", {}, {}, b"")
        del headers["Content-Length"]
        conn = http.client.HTTPConnection(served.url.split("//")[1], timeout=30)

        def endless():
            yield b'{"shared": true}'
            for _ in range(1024):  # 64 MiB: more than the server may read
                yield b" " * 65536

        try:
            conn.request("POST", target, body=endless(), headers=headers, encode_chunked=True)
        except OSError:
            pass  # the server closed the connection while the body was sent
        answer = conn.getresponse()
        assert answer.status == 411 and answer.getheader("x-ms-error-code") == "MissingContentLengthHeader"
        assert answer.will_close
        conn.close()


def test_a_server_trickling_or_flooding_its_answer_is_cut_never_waited_for_forever(monkeypatch):
    """A byte every 0.2 s keeps the socket's own timeout from ever firing;
    the whole answer is bounded all the same (ANSWER_TIMEOUT), and an answer
    far larger than any the stamp sends is not read."""
    import stamp.remote
    from stamp.remote import Unreachable

    monkeypatch.setattr(stamp.remote, "ANSWER_TIMEOUT", 1.5)
    listener = socket.create_server(("127.0.0.1", 0))
    mode = ["trickle"]

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if mode[0] == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(300):
                        conn.sendall(b"x")
                        time.sleep(0.2)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n" + b"{" * 65536)
                    time.sleep(5)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/devstoreaccount1"
    try:
        start = time.monotonic()
        with pytest.raises(Unreachable, match="no whole answer in 1.5 s"):
            RemoteStamp(url, retry_seconds=0)
        assert time.monotonic() - start < 15
        mode[0] = "flood"
        start = time.monotonic()
        with pytest.raises(Unreachable, match="1099511627776 bytes"):
            RemoteStamp(url, retry_seconds=0)
        assert time.monotonic() - start < 4
    finally:
        listener.close()


def test_a_state_change_keeps_only_fields_of_their_type(tmp_path, served):
    """A host's fields go into the disk record every other host reads: one
    that is not of its type (a hostile or broken client) is refused, never
    kept to make another host's attach a traceback."""
    from stamp.disks import DiskState
    from stamp.errors import StampError

    with RemoteStamp(served.endpoint) as remote:
        disks = remote.records()
        for fields in ({"throttle_credits": ["x"]}, {"throttle_credits": [float("nan")]}, {"lun": "0"},
                       {"lun": True}, {"attached_to": {"a": 1}}, {"host": 7}, {"throttle_credits": 3}):
            with pytest.raises(StampError, match="InvalidInput"):
                disks.set_state("data1", DiskState.UNATTACHED, None, **fields)
        assert disks.record("data1").get("throttle_credits") is None
        disks.set_state("data1", DiskState.UNATTACHED, None, throttle_credits=[1.5, 0], lun=None)
    h = host(tmp_path, served, "a")
    h.create_vm("vm1", "D8s_v3", "mbr")
    h.attach("vm1", "data1", 0)
    h.close()


def test_the_host_apis_writer_lease_is_for_disk_blobs_only(tmp_path, served):
    """An image's blob leased forever by a holder on another machine could
    never be deleted (LeaseIdMissing, and nobody here may break it)."""
    import uuid

    from stamp.errors import AuthorizationFailure

    far = {"lease_holder": "pid 4242 on far", "lease_pid": 4242, "lease_started": 7, "lease_host": "far"}
    with RemoteStamp(served.endpoint) as remote:
        image = remote.records().image("mbr")["blob"]
        for action in ({"action": "acquire", "lease": str(uuid.uuid4()), "holder": far}, {"action": "holder"}):
            with pytest.raises(AuthorizationFailure, match="disk"):
                remote.endpoint.api("POST", f"writer-lease/{image}", action)
    stop_server(served)
    with Stamp.open(served.stamp) as stamp:
        Disks(stamp).delete_image("mbr")

REGION = 256 * 1024  # the part of the disk the model covers (4 cache lines)


class RemoteDiskMachine(RuleBasedStateMachine):
    """A disk attached over the network, against a bytearray: writes, reads,
    flushes, and moves between two hosts (detach from one, attach to the
    other), with each host's cache checked after every step."""

    def __init__(self, server: Server, work: str, mode: str, n: int) -> None:
        super().__init__()
        self.name = f"m{n}"
        with Stamp.open(server.stamp) as stamp:  # another process of the stamp: the server is one
            Disks(stamp).create_empty(self.name, 1, "Premium_LRS")
        self.hosts = [Host.create(os.path.join(work, f"{self.name}-{i}"), server.endpoint, cache_bytes=2 * MIB,
                                  clock=FakeClock()) for i in range(2)]
        for i, h in enumerate(self.hosts):
            h.create_vm(f"{self.name}vm{i}", "D8s_v3", "mbr", os_caching="ReadOnly")
        self.mode, self.at = mode, 0
        self.model = bytearray(REGION)
        self._attach()

    def _attach(self) -> None:
        h = self.hosts[self.at]
        h.attach(f"{self.name}vm{self.at}", self.name, 0, self.mode)
        self.disk = h.open_disk(f"{self.name}vm{self.at}", 0)

    @rule(sector=st.integers(0, REGION // 512 - 1), count=st.integers(1, 200), value=st.integers(1, 255))
    def write(self, sector, count, value):
        count = min(count, REGION // 512 - sector)
        data = bytes([value]) * (count * 512)
        self.disk.write(sector * 512, data)
        self.model[sector * 512:(sector + count) * 512] = data

    @rule(offset=st.integers(0, REGION - 1), length=st.integers(1, 3 * 65536))
    def read(self, offset, length):
        length = min(length, REGION - offset)
        assert self.disk.read(offset, length) == bytes(self.model[offset:offset + length])

    @rule()
    def flush(self):
        self.disk.flush()
        other = self.hosts[1 - self.at]  # a fixed VHD: the blob's bytes are the guest's
        blob = other.disks.record(self.name)["blob"]
        assert other.stamp.blobs.read(blob, 0, REGION) == bytes(self.model)

    @rule()
    def move_to_the_other_host(self):
        self.hosts[self.at].detach(f"{self.name}vm{self.at}", 0)
        self.at = 1 - self.at
        self._attach()

    @invariant()
    def caches_check(self):
        for h in self.hosts:
            assert h.cache.check() == []

    def teardown(self):
        self.hosts[self.at].detach(f"{self.name}vm{self.at}", 0)
        blob = self.hosts[0].disks.record(self.name)["blob"]
        assert self.hosts[0].stamp.blobs.read(blob, 0, REGION) == bytes(self.model)
        for h in self.hosts:
            h.close()


@pytest.mark.parametrize("mode", ["ReadWrite", "ReadOnly", "None"])
def test_a_remote_attached_disk_against_a_model(tmp_path, served, mode):
    count = itertools.count()
    run_state_machine_as_test(lambda: RemoteDiskMachine(served, str(tmp_path), mode, next(count)),
                              settings=settings(max_examples=60 if SLOW else 6, stateful_step_count=25,
                                                deadline=None))


def _cli(host: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hostcache", "--host", host, *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    return r.stdout


def _serve(host: str, vm: str, sock: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "hostcache", "--host", host, "serve", vm, "--socket", sock, *args],
                            stdout=subprocess.PIPE, text=True)
    assert "serving" in proc.stdout.readline()  # type: ignore[union-attr]
    return proc


def test_every_host_command_over_the_network_and_nbd_between_two_hosts(tmp_path, served):
    """init, vm create, attach, boot, stop, start, serve (nbdcopy in), kill -9
    of the server (its writer lease left behind: the next command, in another
    process, finds its holder dead on this machine and takes it over), detach
    (writes back what the ReadWrite cache held), then another host: attach,
    serve (nbdcopy out), mount."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _cli(a, "init", "--stamp", served.endpoint)
    _cli(b, "init", "--stamp", served.endpoint)
    _cli(a, "vm", "create", "vma", "--size", "D8s_v3", "--image", "mbr")
    _cli(b, "vm", "create", "vmb", "--size", "D8s_v3", "--image", "mbr")
    _cli(a, "vm", "attach", "vma", "data1", "--lun", "0", "--caching", "ReadWrite")
    assert '"reads"' in _cli(a, "vm", "boot", "vma")
    _cli(a, "vm", "stop", "vma")
    _cli(a, "vm", "start", "vma")
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(4 * MIB))
    proc = _serve(a, "vma", str(tmp_path / "a.sock"))
    run("nbdcopy", str(src), f"nbd+unix:///lun0?socket={tmp_path / 'a.sock'}")
    proc.kill()  # no flush; the lease stays with a dead holder
    proc.wait()
    _cli(a, "vm", "detach", "vma", "--lun", "0")
    _cli(b, "vm", "attach", "vmb", "data1", "--lun", "0", "--caching", "ReadOnly")
    proc = _serve(b, "vmb", str(tmp_path / "b.sock"))
    try:
        run("nbdcopy", f"nbd+unix:///lun0?socket={tmp_path / 'b.sock'}", str(tmp_path / "out.raw"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    with open(tmp_path / "out.raw", "rb") as f:
        assert f.read(4 * MIB) == src.read_bytes()
    (tmp_path / "m").mkdir()
    try:
        _cli(b, "mount", "vmb", str(tmp_path / "m"), "--lun", "0")
        with open(tmp_path / "m" / "disk", "rb") as f:
            assert f.read(4 * MIB) == src.read_bytes()
    finally:
        subprocess.run([sys.executable, "-m", "hostcache", "--host", b, "umount", str(tmp_path / "m")],
                       capture_output=True)


def test_a_writer_lease_is_taken_over_only_from_the_holder_named_stale(served):
    """A holder on another machine is judged by the client on its own machine:
    the server breaks the lease only if its holder is exactly the one named."""
    import uuid

    with RemoteStamp(served.endpoint) as remote:
        blob = remote.records().record("data1")["blob"]
        elsewhere = {"lease_holder": "pid 4242 on far", "lease_pid": 4242, "lease_started": 7, "lease_host": "far"}
        first = str(uuid.uuid4())
        path = f"writer-lease/{blob}"
        assert remote.endpoint.api("POST", path, {"action": "acquire", "lease": first, "holder": elsewhere}) \
            == {"lease": first}
        assert remote.endpoint.api("POST", path, {"action": "acquire", "lease": first, "holder": elsewhere}) \
            == {"lease": first}  # the same acquire again (a retry): the same lease
        with pytest.raises(LeaseAlreadyPresent, match="pid 4242 on far"):
            remote.blobs.acquire_writer_lease(blob)  # alive as far as anyone here can tell
        other = {**elsewhere, "lease_started": 8}  # the pid reused by a later process there
        mine = str(uuid.uuid4())
        with pytest.raises(LeaseAlreadyPresent):
            remote.endpoint.api("POST", path, {"action": "acquire", "lease": mine, "holder": elsewhere,
                                                "stale": other})
        assert remote.endpoint.api("POST", path, {"action": "holder"})["holder"] == elsewhere
        assert remote.endpoint.api("POST", path, {"action": "acquire", "lease": mine, "holder": other,
                                                  "stale": elsewhere}) == {"lease": mine}
        remote.blobs.release_lease(blob, mine)
        remote.blobs.release_lease(blob, mine)  # released already: done


def test_a_live_holder_is_not_taken_over_by_a_client_naming_it_stale(served):
    """Only the holder's own machine may say it died: a holder on the server's
    machine is judged there (alive here: kept), and a client on one machine
    cannot declare a holder on a third one dead."""
    import uuid

    from stamp.pageblob import this_holder

    with RemoteStamp(served.endpoint) as remote:
        blob = remote.records().record("data1")["blob"]
        path = f"writer-lease/{blob}"
        live = remote.blobs.acquire_writer_lease(blob)  # this process, alive, on the server's machine
        holder = remote.endpoint.api("POST", path, {"action": "holder"})["holder"]
        for claimant in ({**this_holder(), "lease_pid": 1}, {**this_holder(), "lease_host": "far"}):
            with pytest.raises(LeaseAlreadyPresent):
                remote.endpoint.api("POST", path, {"action": "acquire", "lease": str(uuid.uuid4()),
                                                   "holder": claimant, "stale": holder})
        remote.blobs.write(blob, 0, b"x" * 512, live)  # still the writer
        remote.blobs.release_lease(blob, live)
        far = {"lease_holder": "pid 4242 on far", "lease_pid": 4242, "lease_started": 7, "lease_host": "far"}
        first = str(uuid.uuid4())
        remote.endpoint.api("POST", path, {"action": "acquire", "lease": first, "holder": far})
        near = {"lease_holder": "pid 9 on near", "lease_pid": 9, "lease_started": 1, "lease_host": "near"}
        with pytest.raises(LeaseAlreadyPresent):  # "near" cannot judge a process on "far"
            remote.endpoint.api("POST", path, {"action": "acquire", "lease": str(uuid.uuid4()), "holder": near,
                                               "stale": far})
        remote.blobs.release_lease(blob, first)


def test_two_serve_workers_over_the_network_write_what_is_read_back(tmp_path, served):
    """`hostcache serve --workers 2` over a URL: the supervisor takes the
    writer lease over the host API, both workers write under it (ReadWrite,
    one shared host cache), and what nbdcopy wrote over 4 connections is in
    the stamp after detach."""
    host_dir = str(tmp_path / "a")
    with host(tmp_path, served, "a") as h:
        h.create_vm("vm1", "D8s_v3", "mbr")
        h.attach("vm1", "data1", 0, "ReadWrite")
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(8 * MIB))
    sock = str(tmp_path / "w.sock")
    proc = _serve(host_dir, "vm1", sock, "--lun", "0", "--workers", "2")
    try:
        run("nbdcopy", "--connections=4", str(src), f"nbd+unix:///lun0?socket={sock}")
        run("nbdcopy", "--connections=4", f"nbd+unix:///lun0?socket={sock}", str(tmp_path / "out.raw"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    with open(tmp_path / "out.raw", "rb") as f:
        assert f.read(8 * MIB) == src.read_bytes()
    with Host(host_dir) as h:
        h.detach("vm1", 0)
    with Stamp.open(served.stamp) as stamp, Disks(stamp).open_virtual("data1") as v:
        assert v.read(0, 8 * MIB) == src.read_bytes()


def test_after_a_connection_failed_a_flush_covers_every_server_process(tmp_path):
    """The server's flush syncs what its own process appended: once a
    connection failed (the server may have restarted), the next flush asks
    for every process's writes (flush_shared), then plain flushes again."""
    Stamp.create(str(tmp_path / "st")).close()
    port = _free_port()
    server = start_server(str(tmp_path / "st"), "--port", str(port))
    sent: list[object] = []
    with RemoteStamp(server.endpoint) as remote:
        real = remote.endpoint.api

        def api(method: str, path: str, body: dict | None = None, idempotent: bool = True) -> object:
            if path == "flush":
                sent.append(body)
            return real(method, path, body, idempotent)
        remote.endpoint.api = api  # type: ignore[method-assign]
        remote.flush()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        server = start_server(str(tmp_path / "st"), "--port", str(port))
        assert remote.records().disks() == []  # its connection was dropped: retried on a new one
        remote.flush()
        remote.flush()
    stop_server(server)
    assert sent == [{"shared": False}, {"shared": True}, {"shared": False}]


def test_a_disk_attached_to_one_hosts_vm_gives_its_writer_lease_to_that_host_only(tmp_path, served):
    """The record of a disk attached to a VM (OS disk or data disk, running or
    deallocated) names the host folder that attached it, and the host API
    gives its writer lease to that host only: another host, or a client that
    names no host, is refused until the disk is detached, unless the lease
    is stale (its holder judged dead by the existing rule)."""
    from stamp.disks import ResourceInUse

    a, b = host(tmp_path, served, "a"), host(tmp_path, served, "b")
    with a, b, RemoteStamp(served.endpoint) as anonymous:
        assert a.identity() != b.identity()
        a.create_vm("vm1", "D8s_v3", "mbr")
        a.attach("vm1", "data1", 0, "None")
        os_blob = a.disks.record("vm1-osdisk")["blob"]
        data_blob = a.disks.record("data1")["blob"]
        assert a.disks.record("vm1-osdisk")["host"] == a.identity() == a.disks.record("data1")["host"]
        for blob in (os_blob, data_blob):
            for other in (b.stamp.blobs, anonymous.blobs):
                with pytest.raises(ResourceInUse, match="attached to VM vm1 of another host"):
                    other.acquire_writer_lease(blob)
        a.stamp.blobs.release_lease(data_blob, a.stamp.blobs.acquire_writer_lease(data_blob))  # its own host: yes
        a.stop("vm1")  # deallocated: Reserved, still vm1's
        with pytest.raises(ResourceInUse):
            b.stamp.blobs.acquire_writer_lease(os_blob)
        a.start("vm1")
        assert a.disks.record("vm1-osdisk")["host"] == a.identity()
        a.detach("vm1", 0)
        assert a.disks.record("data1").get("host") is None
        b.stamp.blobs.release_lease(data_blob, b.stamp.blobs.acquire_writer_lease(data_blob))  # detached: free
        # a lease left by a holder that died (on the server's machine: judged there) is taken over by anyone
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        from stamp.pageblob import own_start

        holder = {"lease_holder": f"pid {dead.pid}", "lease_pid": dead.pid, "lease_started": own_start(),
                  "lease_host": socket.gethostname()}
        a.stamp.endpoint.api("POST", f"writer-lease/{os_blob}", {"action": "acquire", "lease": str(uuid.uuid4()),
                                                                 "holder": holder, "host": a.identity()})
        taken = b.stamp.blobs.acquire_writer_lease(os_blob)
        b.stamp.blobs.release_lease(os_blob, taken)


def test_a_disk_record_without_a_host_has_no_owner(tmp_path, served):
    """Records written before disks named their host (an attached OS disk had
    no host field) read as they did: attached, owned by no host, their
    writer lease anyone's with the account key."""
    with host(tmp_path, served, "a") as a:
        a.create_vm("vm1", "D8s_v3", "mbr")
        blob = a.disks.record("vm1-osdisk")["blob"]
    with Stamp.open(served.stamp) as stamp:  # the record as an older version wrote it
        d = Disks(stamp)
        with stamp.meta.write() as txn:
            rec = stamp.meta.get_json(txn, "resources", b"disk/vm1-osdisk")
            del rec["host"]
            stamp.meta.put_json(txn, "resources", b"disk/vm1-osdisk", rec)
        assert d.record("vm1-osdisk")["state"] == "Attached"
    with RemoteStamp(served.endpoint) as anyone:
        anyone.blobs.release_lease(blob, anyone.blobs.acquire_writer_lease(blob))
