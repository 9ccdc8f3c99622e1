"""A stamp reached over the network: the client of `stamp serve` a host uses.

`RemoteStamp(url, key)` has what a host needs of a stamp (stamp.hosted's
HostStamp): `blobs` (RemoteBlobs: version, blob_id, size, read, write,
clear, resize, page_ranges, the writer lease), `flush`, `flush_shared`,
`close`; `RemoteDisks` has the disk records (record, disks, image,
set_state with compare-and-set, create_from_image, delete_disk). The data
path is the Blob REST protocol (Get Blob with a range, Put Page update and
clear, Get Blob Properties, Set Blob Properties for a resize, Get Page
Ranges); the records, the writer lease and flush are the host API
(stamp/rest/hostapi.py). Rules kept:
- the cache's contract holds as in-process: version() is Get Blob
  Properties, whose x-diskstamp-blob-id and x-diskstamp-content-version
  are the stamp's blob id (a blob made again under its name has another)
  and its observed content version (every change after it moves it on);
- every request is signed with the account's Shared Key (auth.py's string
  to sign, ordinal header order); a 403 is a StampError saying the key is wrong;
- one keep-alive HTTP connection per thread, closed once its thread has
  ended (when another connection is opened); a connection the server
  dropped is opened again; idempotent requests (reads, Put Page: the same
  bytes to the same place, a resize to a size, a lease acquire with the
  id the client chose, a release) are retried with backoff for
  `retry_seconds`, the others only when they never reached the server
  (connection refused) and are sent on a fresh connection if theirs sat idle;
- over https the server's certificate is verified against the CA file
  given (only it), else the system's CAs, and its name against the URL's
  host; a certificate not trusted, a name it does not hold, or a server
  that does not speak TLS is a StampError at once (Untrusted), never
  retried; connections are kept alive per thread as over http;
- every wait is bounded (connect; each whole answer, however slowly it
  trickles: a watchdog shuts the socket; and its size); a server that is down is
  a StampError naming the URL, never a traceback; so is an answer that is
  not what `stamp serve` sends (not JSON, a header missing or not a number,
  a range of other bytes than asked: a broken or foreign server);
- a Put Page is answered only once the stamp's write is acknowledged (the
  stamp's durability: survives a kill of the server); flush() asks the
  server to make the stamp durable as its own flush() does, or, after a
  connection failed (the server may have restarted: its flush would not
  cover what the process before it acknowledged), as flush_shared() does.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from . import errors as se
from .disks import DiskState, ResourceExists, ResourceInUse, ResourceNotFound
from .pageblob import MAX_WRITE, holder_died, this_holder
from .ranges import merge_ranges
from .rest import auth
from .rest.hostapi import ROOT
from .rest.pageblobs import ID_HEADER, VERSION_HEADER

API_VERSION = "2021-08-06"
CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 120.0  # a 4 MiB write on a loaded stamp; a whole answer not come by then fails (a watchdog)
MAX_ANSWER = 64 << 20  # bytes of an answer body (a read is 4 MiB at most): a longer one is not read
IDLE_REUSE = 4.0  # seconds a connection may have sat idle and still carry a request that is not retried
DEFAULT_RETRY_SECONDS = 30.0  # a server restarting (kill -9, then up again) within this loses nothing in flight
RETRY_ENV = "DISKSTAMP_REMOTE_RETRY_SECONDS"
RETRIED_STATUS = (503,)  # ServerBusy (too many requests, the stamp's nodes down): transient
# error code -> the stamp's exception (what the host catches by class)
CODES: dict[str, type[se.StampError]] = {
    "ResourceNotFound": ResourceNotFound, "ResourceExists": ResourceExists, "ResourceInUse": ResourceInUse,
    "OperationNotAllowed": se.OperationNotAllowed, "InvalidParameter": se.InvalidParameter,
    "BadRequest": se.BadRequest, "InvalidVhd": se.InvalidVhd, "BlobNotFound": se.BlobNotFound,
    "ContainerNotFound": se.ContainerNotFound, "LeaseAlreadyPresent": se.LeaseAlreadyPresent,
    "LeaseIdMismatchWithBlobOperation": se.LeaseIdMismatch, "LeaseLost": se.LeaseLost,
    "LeaseNotPresentWithBlobOperation": se.LeaseNotPresentWithBlobOperation,
    "LeaseIdMismatchWithLeaseOperation": se.LeaseIdMismatchWithLeaseOperation,
    "LeaseNotPresentWithLeaseOperation": se.LeaseNotPresentWithLeaseOperation,
    "LeaseIdMissing": se.LeaseIdMissing, "InvalidPageRange": se.InvalidPageRange, "InvalidRange": se.InvalidRange,
    "RequestBodyTooLarge": se.RequestBodyTooLarge, "AuthorizationFailure": se.AuthorizationFailure,
}


class Unreachable(se.StampError):
    """The stamp's endpoint did not answer (down, wrong address, timed out)."""


@dataclass(frozen=True)
class Location:
    """http(s)://HOST:PORT/ACCOUNT, parsed."""

    scheme: str
    host: str
    port: int
    account: str

    @classmethod
    def parse(cls, url: str) -> Location:
        parts = urlsplit(url)
        account = parts.path.strip("/")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or not account or "/" in account \
                or port == -1 or parts.query:
            raise se.StampError(f"{url!r} is not a stamp endpoint: give http://HOST:PORT/ACCOUNT "
                                "(e.g. http://127.0.0.1:10000/devstoreaccount1: the address `stamp serve` prints, then the account)")
        return cls(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), account)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{self.account}"


class Untrusted(se.StampError):
    """The https endpoint's certificate is not trusted, or not for its name (or it does not speak TLS)."""


def tls_context(where: Location, ca_file: str | None) -> ssl.SSLContext | None:
    """The context an https endpoint is verified with: the CA file's
    certificates only (the one a self-signed `stamp serve` uses), else the
    system's; None over http, where a CA file is a mistake."""
    if where.scheme != "https":
        if ca_file:
            raise se.StampError(f"a CA file is for an https:// stamp, not {where.url}")
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise se.StampError(f"the CA file {ca_file} does not exist") from None
    except (OSError, ssl.SSLError, ValueError) as e:
        raise se.StampError(f"the CA file {ca_file} holds no PEM certificate ({e}): give the certificate "
                            "(-----BEGIN CERTIFICATE-----) of the CA that signed the stamp's, or the stamp's own "
                            "if it is self-signed") from None


def _untrusted(e: ssl.SSLError, where: Location) -> Untrusted | None:
    """The error for a TLS failure that no retry mends (a certificate, a plain
    http server), or None for a connection dropped mid-answer (retried)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return Untrusted(f"the certificate of the stamp at {where.url} is not for {where.host} "
                             f"({e.verify_message}): use a name the certificate holds in the URL, or serve one "
                             f"made for {where.host}")
        return Untrusted(f"the stamp at {where.url} presented a certificate this host does not trust "
                         f"({e.verify_message}): give the CA that signed it (hostcache init --ca-file CERT; "
                         "for a self-signed `stamp serve --cert`, that certificate)")
    if e.reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return Untrusted(f"the server at {where.url} does not speak TLS ({e.reason}): is `stamp serve` running "
                         "with --cert and --key? Else give an http:// URL")
    return None


class Malformed(se.StampError):
    """The server's answer is not what `stamp serve` sends."""


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _error(answer: Answer, where: str) -> se.StampError:
    """The stamp's exception for an error answer (x-ms-error-code, the XML body's message)."""
    code = answer.headers.get("x-ms-error-code", "") or f"HTTP{answer.status}"
    message = code
    try:
        root = ET.fromstring(answer.body) if answer.body else None
        found = None if root is None else root.findtext("Message")
        if found:
            message = found.split("\nRequestId:", 1)[0]
        detail = None if root is None else root.findtext("AuthenticationErrorDetail")
    except ET.ParseError:
        detail = None
    if answer.status == 403 and code == "AuthenticationFailed":
        return se.StampError(f"the stamp at {where} refused the account key (403 AuthenticationFailed): give the "
                             "account's key (--account-key, or DISKSTAMP_ACCOUNT_KEY)"
                             + (f"; {detail[:200]}" if detail and "date" in detail.lower() else ""))
    cls = CODES.get(code)
    if cls is None:
        return se.StampError(f"the stamp at {where} answered {answer.status} {code}: {message}")
    if issubclass(cls, (se.AzureError, se.ComputeError)):
        return cls(message.removeprefix(f"{code}: "))
    return cls(message)


class Endpoint:
    """Signed HTTP requests to one account of a `stamp serve`, one keep-alive
    connection per thread."""

    def __init__(self, url: str, key: str | None = None, retry_seconds: float | None = None,
                 ca_file: str | None = None) -> None:
        self.where = Location.parse(url)
        self.tls = tls_context(self.where, ca_file)
        accounts = auth.Accounts()
        try:
            accounts.add(self.where.account, key or auth.DEVSTORE_KEY)
        except ValueError:
            raise se.StampError("the account key is not base64 (as the portal and `stamp serve` give it)") from None
        self.key = accounts.keys[self.where.account][0]
        self.retry_seconds = retry_seconds if retry_seconds is not None else _retry_seconds()
        self._local = threading.local()
        self._all: dict[http.client.HTTPConnection, threading.Thread] = {}  # each connection's thread
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, socket.socket]] = {}  # thread -> its request's deadline, its socket
        self._watchdog: threading.Thread | None = None
        self._late: set[int] = set()  # threads whose request the watchdog cut
        self.requests = 0  # sent, retries included (for tests and measurements)
        self.connects = 0  # connections opened (TCP, and over https a TLS handshake each)
        self.answered = 0  # answers read whole
        self.interrupted = False  # a connection failed since the last flush: the server may be another process

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- connections --------------------------------------------------------------------

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        """This thread's connection; `fresh`: not one that sat idle long
        enough for the server to be closing it (a request that is not
        retried must not be lost to that race)."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and fresh and time.monotonic() - self._local.used > IDLE_REUSE:
            self._drop()
            conn = None
        if conn is None:
            if self.tls is not None:
                conn = http.client.HTTPSConnection(self.where.host, self.where.port, timeout=CONNECT_TIMEOUT,
                                                   context=self.tls)
            else:
                conn = http.client.HTTPConnection(self.where.host, self.where.port, timeout=CONNECT_TIMEOUT)
            self.connects += 1
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(ANSWER_TIMEOUT)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn, self._local.used = conn, time.monotonic()
            with self._lock:
                for old in [c for c, t in self._all.items() if not t.is_alive()]:
                    old.close()  # its thread ended: nobody else uses it (a thread each: no leak)
                    del self._all[old]
                self._all[conn] = threading.current_thread()
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._all.pop(conn, None)
        self._local.conn = None

    # -- requests -----------------------------------------------------------------------

    def _signed(self, method: str, path: str, query: Mapping[str, str], headers: dict[str, str],
                body: bytes) -> tuple[str, dict[str, str]]:
        raw_path = "/" + quote(self.where.account) + "/" + quote(path, safe="/$")
        out = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": API_VERSION, **headers}
        if body or method in ("PUT", "POST"):
            out["Content-Length"] = str(len(body))
        areq = auth.Request(method, raw_path, list(query.items()), out, self.where.account, None, None, None, "",
                            self.where.scheme == "https")
        text = auth.shared_key_strings(areq)[0]  # the ordinal header order: the server accepts it
        out["Authorization"] = f"SharedKey {self.where.account}:{auth.sign(self.key, text)}"
        target = raw_path + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items()) if query else "")
        return target, out

    def request(self, method: str, path: str, query: Mapping[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | memoryview = b"",
                idempotent: bool = True) -> Answer:
        """Send a request and read its whole answer; an error answer is the stamp's exception."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        data = bytes(body)
        while True:
            target, signed = self._signed(method, path, query or {}, headers or {}, data)
            try:
                answer = self._once(method, target, signed, data, fresh=not idempotent)
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                self.interrupted = True
                if isinstance(e, ssl.SSLError) and (untrusted := _untrusted(e, self.where)) is not None:
                    raise untrusted from None
                reached = not isinstance(e, ConnectionRefusedError)
                with self._lock:
                    late = threading.get_ident() in self._late
                    self._late.discard(threading.get_ident())
                why = f"no whole answer in {ANSWER_TIMEOUT:g} s" if late else _why(e)
                if isinstance(e, http.client.RemoteDisconnected) and self.where.scheme == "http" and not self.answered:
                    why += "; a server that speaks TLS closes a plain http request so: is the URL https://?"
                if (reached and not idempotent) or time.monotonic() + delay > deadline:
                    raise Unreachable(f"the stamp at {self.where.url} did not answer ({why})"
                                      + ("" if idempotent else ": the request may or may not have been done")
                                      ) from None
            else:
                if answer.status not in RETRIED_STATUS or not idempotent or time.monotonic() + delay > deadline:
                    if answer.status >= 400:
                        raise _error(answer, self.where.url)
                    return answer
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _once(self, method: str, target: str, headers: dict[str, str], body: bytes, fresh: bool) -> Answer:
        conn = self._connection(fresh)
        self.requests += 1
        self._watch(conn.sock)
        try:
            conn.request(method, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            if resp.length is not None and resp.length > MAX_ANSWER:
                raise http.client.HTTPException(f"an answer of {resp.length} bytes (at most {MAX_ANSWER})")
            data = resp.read(MAX_ANSWER + 1)
            if len(data) > MAX_ANSWER:
                raise http.client.HTTPException(f"an answer of more than {MAX_ANSWER} bytes")
        finally:
            self._watch(None)
        if threading.get_ident() in self._late:  # what was read before the watchdog shut the socket: not an answer
            raise TimeoutError("the answer did not come whole in time")
        self._local.used = time.monotonic()
        self.answered += 1
        if resp.will_close:
            self._drop()
        return Answer(resp.status, resp.headers, data)

    def _watch(self, sock: socket.socket | None) -> None:
        """Give this thread's request ANSWER_TIMEOUT for its whole answer (None: it came)."""
        with self._lock:
            if sock is None:
                self._due.pop(threading.get_ident(), None)
                return
            self._late.discard(threading.get_ident())
            self._due[threading.get_ident()] = (time.monotonic() + ANSWER_TIMEOUT, sock)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._expire, name="stamp-remote-watchdog", daemon=True)
                self._watchdog.start()

    def _expire(self) -> None:
        """The watchdog: shuts the socket of a request whose answer is late (a
        server trickling it a byte at a time defeats the socket's own timeout,
        which bounds each wait only); it ends when no request is in flight."""
        while True:
            time.sleep(min(1.0, ANSWER_TIMEOUT / 4))
            with self._lock:
                if not self._due:
                    self._watchdog = None
                    return
                now = time.monotonic()
                for ident, (due, sock) in list(self._due.items()):
                    if now > due:
                        del self._due[ident]
                        self._late.add(ident)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)  # its reader gets an error at once
                        except OSError:
                            pass

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, idempotent: bool = True) -> Any:
        """A host API call: JSON in, a JSON object out."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        answer = self.request(method, f"{ROOT}/{path}", headers=headers, body=data, idempotent=idempotent)
        with self.parsing(f"{method} {path}"):
            out = json.loads(answer.body or b"{}")
            if not isinstance(out, dict):
                raise ValueError("not a JSON object")
            return out

    @contextmanager
    def parsing(self, what: str) -> Iterator[None]:
        """Reading an answer: what is not as `stamp serve` sends it is a Malformed error, not a traceback."""
        try:
            yield
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, ET.ParseError) as e:
            raise Malformed(f"the stamp at {self.where.url} answered {what} with what `stamp serve` does not send "
                            f"({type(e).__name__}: {str(e)[:100]}): is it a stamp endpoint?") from None


def _retry_seconds() -> float:
    """How long requests are retried: $DISKSTAMP_REMOTE_RETRY_SECONDS, else DEFAULT_RETRY_SECONDS."""
    raw = os.environ.get(RETRY_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise se.StampError(f"{RETRY_ENV}={raw!r}: give a number of seconds") from None
    return min(max(value, 0.0), 3600.0)


def _why(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused: is `stamp serve` running there?"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"no such host: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def _split(name: str) -> str:
    """A stamp blob name (CONTAINER/BLOB) as a URL path."""
    if "/" not in name:
        raise se.BlobNotFound(f"blob {name!r}: a stamp blob's name is CONTAINER/BLOB")
    return name


class RemoteBlobs:
    """The page blobs a host uses, over the Blob REST protocol (see the module header)."""

    def __init__(self, endpoint: Endpoint, host: str | None = None) -> None:
        self.ep = endpoint
        self.host = host  # the host folder this client acts for: the writer lease of a disk attached there
        self._sizes: dict[str, int] = {}  # blobs whose writer lease this client holds: nobody else resizes them
        self._leases: dict[str, str] = {}

    def _properties(self, name: str) -> Answer:
        return self.ep.request("HEAD", _split(name))

    def version(self, name: str) -> tuple[int, str]:
        h = self._properties(name).headers
        with self.ep.parsing(f"the properties of {name}"):
            return int(h[ID_HEADER]), str(h[VERSION_HEADER])

    def blob_id(self, name: str) -> int:
        return self.version(name)[0]

    def size(self, name: str) -> int:
        known = self._sizes.get(name)
        if known is not None:
            return known
        return self._length(name)

    def _length(self, name: str) -> int:
        h = self._properties(name).headers
        with self.ep.parsing(f"the properties of {name}"):
            return int(h["Content-Length"])

    def read(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if length > MAX_ANSWER:  # an answer the client takes whole
            parts = [self.read(name, at, min(MAX_WRITE, offset + length - at))
                     for at in range(offset, offset + length, MAX_WRITE)]
            return b"".join(parts)
        answer = self.ep.request("GET", _split(name), headers={"x-ms-range": f"bytes={offset}-{offset + length - 1}"})
        with self.ep.parsing(f"a read of {name}"):  # the bytes asked for (up to the blob's end), and only them
            span, _, total = answer.headers["Content-Range"].removeprefix("bytes ").partition("/")
            start, end = (int(x) for x in span.split("-"))
            n = len(answer.body)
            if start != offset or end - start + 1 != n or n > length or (n < length and end + 1 != int(total)):
                raise ValueError(f"Content-Range {answer.headers['Content-Range']} with {len(answer.body)} bytes "
                                 f"for {length} at {offset}")
        return answer.body

    def write(self, name: str, offset: int, data: bytes | bytearray | memoryview, lease: str | None = None) -> None:
        view = memoryview(data)
        for pos in range(0, len(view), MAX_WRITE):
            part = view[pos:pos + MAX_WRITE]
            self._page(name, offset + pos, len(part), "update", lease, part)

    def clear(self, name: str, offset: int, length: int, lease: str | None = None) -> None:
        if length:
            self._page(name, offset, length, "clear", lease, b"")

    def _page(self, name: str, offset: int, n: int, action: str, lease: str | None,
              body: bytes | memoryview) -> None:
        headers = {"x-ms-page-write": action, "x-ms-range": f"bytes={offset}-{offset + n - 1}"}
        if lease:
            headers["x-ms-lease-id"] = lease
        self.ep.request("PUT", _split(name), {"comp": "page"}, headers, body)  # same bytes, same place: retried

    def resize(self, name: str, size: int, lease: str | None = None) -> None:
        headers = {"x-ms-blob-content-length": str(size)}
        if lease:
            headers["x-ms-lease-id"] = lease
        self.ep.request("PUT", _split(name), {"comp": "properties"}, headers)
        if name in self._sizes:
            self._sizes[name] = size

    def page_ranges(self, name: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []  # [start, end) of each PageRange, merged at the end
        marker = ""
        while True:
            query = {"comp": "pagelist", **({"marker": marker} if marker else {})}
            body = self.ep.request("GET", _split(name), query).body
            with self.ep.parsing(f"the page ranges of {name}"):
                root = ET.fromstring(body)
                spans += [(int(r.findtext("Start") or 0), int(r.findtext("End") or -1) + 1)
                          for r in root.iter("PageRange")]
                marker = root.findtext("NextMarker") or ""
            if not marker:
                return [(s, e - s) for s, e in merge_ranges(spans)]

    # -- the writer lease (host API) ------------------------------------------------------

    def acquire_writer_lease(self, name: str) -> str:
        """The blob's writer lease for this process; one whose holder died on
        this machine (the server cannot tell: it is not here) is taken over."""
        lease, holder = str(uuid.uuid4()), this_holder()
        body: dict[str, Any] = {"action": "acquire", "lease": lease, "holder": holder, "host": self.host}
        path = f"writer-lease/{name}"
        try:
            got = self.ep.api("POST", path, body)
        except se.LeaseAlreadyPresent:
            stale = self.ep.api("POST", path, {"action": "holder"})
            with self.ep.parsing(f"POST {path}"):
                stale = dict(stale["holder"])
                died = holder_died(stale)
            if not died:
                raise
            got = self.ep.api("POST", path, {**body, "stale": stale})
        with self.ep.parsing(f"POST {path}"):
            if got["lease"] != lease:
                raise ValueError(f"lease {got['lease']!r}, not the {lease!r} proposed")
        self._leases[name] = lease
        self._sizes[name] = self._length(name)
        return lease

    def release_lease(self, name: str, lease: str) -> None:
        self._sizes.pop(name, None)
        self._leases.pop(name, None)
        self.ep.api("POST", f"writer-lease/{name}", {"action": "release", "lease": lease})


class RemoteDisks:
    """The disk records a host uses (hostapi.py), as stamp.disks.Disks has them."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.ep = endpoint

    def record(self, name: str) -> dict[str, Any]:
        return dict(self.ep.api("GET", f"disks/{quote(name, safe='')}"))

    def disks(self) -> list[dict[str, Any]]:
        answer = self.ep.api("GET", "disks")
        with self.ep.parsing("GET disks"):
            return [dict(d) for d in answer["disks"]]

    def image(self, name: str) -> dict[str, Any]:
        return dict(self.ep.api("GET", f"images/{quote(name, safe='')}"))

    def set_state(self, name: str, state: DiskState, expect: DiskState | None = None,
                  **fields: Any) -> dict[str, Any]:
        body = {"state": state.value, "expect": None if expect is None else expect.value, "fields": fields}
        # with expect, a retry after a lost answer would find its own change: not retried
        return dict(self.ep.api("POST", f"disks/{quote(name, safe='')}/state", body, idempotent=expect is None))

    def create_from_image(self, name: str, image: str, size_gib: int | None = None,
                          sku: str = "Premium_LRS") -> dict[str, Any]:
        body = {"image": image, "size_gib": size_gib, "sku": sku}
        return dict(self.ep.api("PUT", f"disks/{quote(name, safe='')}", body, idempotent=False))

    def delete_disk(self, name: str) -> None:
        self.ep.api("DELETE", f"disks/{quote(name, safe='')}", idempotent=False)


class RemoteStamp:
    """A stamp served by `stamp serve` at `url` (http://HOST:PORT/ACCOUNT)."""

    def __init__(self, url: str, key: str | None = None, retry_seconds: float | None = None,
                 ca_file: str | None = None, host: str | None = None) -> None:
        self.endpoint = Endpoint(url, key, retry_seconds, ca_file)
        self.path = self.endpoint.where.url
        self.blobs = RemoteBlobs(self.endpoint, host)
        self.endpoint.api("GET", "disks")  # a clear error now: unreachable, not a stamp, a wrong key

    def records(self) -> RemoteDisks:
        return RemoteDisks(self.endpoint)

    def flush(self) -> None:
        """The stamp durable: what this server process acknowledged (Stamp.flush);
        after a connection failed, what every process did (flush_shared), since
        the writes before it may have gone to a server process that is gone."""
        shared, self.endpoint.interrupted = self.endpoint.interrupted, False
        try:
            self.endpoint.api("POST", "flush", {"shared": shared})
        except BaseException:
            self.endpoint.interrupted = True
            raise

    def flush_shared(self) -> None:
        self.endpoint.api("POST", "flush", {"shared": True})

    def close(self) -> None:
        self.endpoint.close()

    def __enter__(self) -> RemoteStamp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
