"""An NBD server (newstyle, fixed) for any block device.

Protocol (NBD's proto.md): the server greets with NBDMAGIC, IHAVEOPT and its
handshake flags; the client answers with its flags, then sends options:
  EXPORT_NAME   go straight to transmission (no reply header)
  INFO / GO     describe an export (size, flags, name, block sizes); GO then
                enters transmission
  LIST          name every export
  STRUCTURED_REPLY, LIST_META_CONTEXT / SET_META_CONTEXT ("base:allocation")
  ABORT         acknowledge and close
In transmission each request (28 bytes) gets a reply: simple, or structured
chunks when negotiated. READ, WRITE (FUA: written, then flushed), FLUSH,
TRIM (discard), WRITE_ZEROES, BLOCK_STATUS (the device's allocation map:
ZERO extents are reported as hole and zero), CACHE, DISC.
Rules kept: a request outside the export gets EINVAL (ENOSPC for writes); a
read-only export refuses writes with EPERM; a request over MAX_REQUEST gets
EOVERFLOW (reads) or EINVAL; a command flag the specification does not give
that command (or an unknown one) gets EINVAL; WRITE_ZEROES with NO_HOLE writes
zeros (awaited on a device that waits), without it discards; a malformed
request (bad magic) or a client that vanishes closes only that connection;
every connection's replies are written whole, one at a time; a write is
acknowledged only after the device took it. On DISC every outstanding request
is answered and the connection closes once its replies have left (a client
taking none for stall_timeout is closed then). Requests of one connection are
served concurrently (as tasks), so a device whose I/O waits (a throttled disk)
sees the client's queue depth; their small replies that are ready in one pass
of the event loop leave in one send at the next pass (Replies).
Memory (budget.py): every request takes its bytes from one budget shared by
all connections before its payload is read or its work starts, and gives them
back once its reply has left (but for at most SEND_PIECE per connection still
buffered: large replies go out a piece at a time, so asyncio never copies more
than about two pieces of one). Out of budget, a connection stops reading
requests (backpressure). A large read from a file is read a piece at a time,
letting other connections in between; so is a large WRITE_ZEROES or TRIM,
on a device that waits too (a discard writes zeros on a differencing image,
and on a fixed one where the filesystem cannot punch holes).
A client that goes away has its pending
work cancelled and its buffer dropped; the error's traceback is cut so no
reference cycle keeps its data until gc. A block status reply describes at
most BLOCK_STATUS_SPAN. A unix socket a live server answers on is refused
(the server binds it: asyncio would unlink it), and removed on exit. At most
max_connections clients at once (one more is closed at once); a client that
takes over stall_timeout to finish its handshake or to send a large write's
data is closed (such a write holds its budget while it comes). Every request
costs at least REQUEST_OVERHEAD of the budget, a block status its largest
reply, so replies without data are held to it too.
Per request cost: a small READ or WRITE with no flags on a device that answers
at once (fio's 4 KiB I/O, a guest's) is served on a hot path of O(1) arithmetic:
the budget's take_nowait and give_back, the device, one send; no other call,
no timer, no task, no syscall but the device's and the reply's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket as socketlib
import stat
import struct
import sys
from dataclasses import dataclass, field

from .blockdev import ZERO_CHUNK, Alloc, BlockDevice, write_zeros
from .budget import Account, Budget, Ticket, fixed_mmap_threshold
from .errors import RangeError, ReadOnlyError, UsageError, VhdError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF, TF_CAN_MULTI_CONN, TF_SEND_CACHE = 32, 64, 128, 256, 1024

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMDF_FUA, CMDF_NO_HOLE, CMDF_DF, CMDF_REQ_ONE = 1, 2, 4, 8
# The flags each command may carry (proto.md: FUA on any command once SEND_FUA is
# advertised; NO_HOLE on WRITE_ZEROES; DF on READ with structured replies; REQ_ONE
# on BLOCK_STATUS). Any other flag, FAST_ZERO included (not advertised), is EINVAL.
ALLOWED_FLAGS = {CMD_READ: CMDF_FUA | CMDF_DF, CMD_WRITE: CMDF_FUA, CMD_FLUSH: CMDF_FUA, CMD_TRIM: CMDF_FUA,
                 CMD_CACHE: CMDF_FUA, CMD_WRITE_ZEROES: CMDF_FUA | CMDF_NO_HOLE,
                 CMD_BLOCK_STATUS: CMDF_FUA | CMDF_REQ_ONE}

CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_BLOCK_STATUS, CHUNK_ERROR = 0, 1, 5, 2**15 + 1
CHUNK_DONE = 1
STATE_HOLE, STATE_ZERO = 1, 2
META_BASE_ALLOCATION = "base:allocation"
META_ID = 1

MAX_REQUEST = 32 * 1024 * 1024  # what we advertise as the maximum block size
BLOCK_STATUS_SPAN = 64 * 1024 * 1024  # the most one block status reply describes (at most 1 MiB of descriptors)
SEND_PIECE = 256 * 1024  # replies larger than this are sent piece by piece (and small ones in one send)
MAX_OPTION = 64 * 1024  # longer option data is refused (no memory sized by the client)
MAX_CONNECTIONS = 64  # connections served at once (`serve --max-connections`); more are closed at once
STALL_TIMEOUT = 30.0  # seconds a client has to reach transmission, or to send a large request's payload
STALL_CHECKED = SEND_PIECE  # payloads larger than this are read under STALL_TIMEOUT (they hold much budget)
RESERVED = 128 * 1024  # the reserve holds a request of this size for every connection (server_budget)
REQUEST_OVERHEAD = 4096  # the least a request in flight costs of the budget (its task, its reply)

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_READ_CHUNK = struct.Struct(">IHHQIQ")  # a structured READ reply's chunk header and its offset, in one pack
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class ProtocolError(VhdError):
    """The client broke the protocol: its connection is closed."""


class Replies:
    """A connection's small replies that are ready, sent together: the first one
    added in a pass of the event loop schedules a flush at the next pass, which
    writes every reply added by then in one send. Under queue depth many waits
    end in one pass (a throttled disk's I/Os due at once), and their replies
    cost one syscall instead of one each; at queue depth 1 the reply waits one
    pass (no timer, no I/O in between). Replies are added whole, never while a
    large reply is being sent piece by piece (its sender flushes first, under
    the connection's lock), so none is cut into another."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()  # once: each call checks the process id (a getpid syscall)
        self.parts: list[bytes] = []
        self.size = 0
        self.scheduled = False

    def add(self, head: bytes, data: bytes = b"") -> None:
        self.parts.append(head)
        self.size += len(head)
        if data:
            self.parts.append(data)
            self.size += len(data)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if not self.parts:
            return
        parts, self.parts, self.size = self.parts, [], 0
        if not self.transport.is_closing():
            self.transport.write(b"".join(parts))

    def buffered(self) -> int:
        """Bytes of replies not yet taken by the client: here and in the transport."""
        return self.size + self.transport.get_write_buffer_size()


@dataclass
class Export:
    name: str
    device: BlockDevice
    description: str = ""
    readonly: bool = False

    def flags(self) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_SEND_CACHE | TF_CAN_MULTI_CONN
        if self.readonly or getattr(self.device, "readonly", False):
            f |= TF_READ_ONLY
        else:
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return f


@dataclass
class Connection:
    structured: bool = False
    meta: bool = False
    export: Export | None = None
    no_zeroes: bool = False
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    account: Account = field(default_factory=Account)  # what it holds of the server's budget


def opt_reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, kind, len(data)) + data


def info_export(export: Export) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, export.device.size, export.flags())


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """The export name and info types of an INFO or GO option."""
    if len(data) < 6:
        raise ProtocolError("INFO/GO option too short")
    n = struct.unpack_from(">I", data)[0]
    if 4 + n + 2 > len(data):
        raise ProtocolError("INFO/GO name length past the option")
    name = data[4:4 + n].decode("utf-8", "replace")
    count = struct.unpack_from(">H", data, 4 + n)[0]
    if 6 + n + 2 * count != len(data):
        raise ProtocolError("INFO/GO info request count does not match the option length")
    return name, list(struct.unpack_from(f">{count}H", data, 6 + n))


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    if len(data) < 8:
        raise ProtocolError("meta context option too short")
    n = struct.unpack_from(">I", data)[0]
    pos = 4 + n
    if pos + 4 > len(data):
        raise ProtocolError("meta context export name past the option")
    name = data[4:pos].decode("utf-8", "replace")
    count = struct.unpack_from(">I", data, pos)[0]
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ProtocolError("meta context query past the option")
        q = struct.unpack_from(">I", data, pos)[0]
        queries.append(data[pos + 4:pos + 4 + q].decode("utf-8", "replace"))
        pos += 4 + q
    if pos != len(data):
        raise ProtocolError("meta context option has trailing bytes")
    return name, queries


async def send(writer: asyncio.StreamWriter, head: bytes, data: bytes, stall: float) -> None:
    """Send a reply SEND_PIECE at a time, waiting while more than a piece is
    buffered: the transport never holds a copy of more than about two pieces."""
    writer.write(head)
    view = memoryview(data)
    for at in range(0, len(view), SEND_PIECE):
        if writer.transport.is_closing():
            raise ConnectionResetError("the client went away")
        writer.write(view[at:at + SEND_PIECE])
        if writer.transport.get_write_buffer_size() > SEND_PIECE:
            await drain(writer, stall)
    if not data and writer.transport.get_write_buffer_size() > SEND_PIECE:
        await drain(writer, stall)  # replies with no data (FLUSH, a block status) pile up too


async def drain(writer: asyncio.StreamWriter, stall: float) -> None:
    """Wait until the client has taken its replies down to SEND_PIECE. One that
    takes nothing for `stall` seconds is closed: its replies hold their budget
    until they leave, so a few clients that never read (5 with unread 32 MiB
    reads) would hold the whole budget, and starve every other client's larger
    requests, for as long as they stayed connected."""
    try:
        async with asyncio.timeout(stall):
            await writer.drain()
    except TimeoutError:
        writer.transport.abort()
        raise ConnectionResetError(f"the client took no reply for {stall:g} s") from None


def request_cost(kind: int, flags: int, length: int) -> int:
    """The bytes a request holds in memory while in flight (its budget): its
    data, a block status reply's largest size, and never less than
    REQUEST_OVERHEAD (a request in flight is a task and a reply even without
    data, so a client sending FLUSH or CACHE it never reads the replies of is
    held to the budget too)."""
    if kind == CMD_WRITE or (kind == CMD_READ and length <= MAX_REQUEST):
        cost = length  # a READ over the maximum is refused with no data
    elif kind == CMD_WRITE_ZEROES and flags & CMDF_NO_HOLE:
        cost = min(length, ZERO_CHUNK)
    elif kind == CMD_BLOCK_STATUS:
        cost = min(length, BLOCK_STATUS_SPAN) // 512 * 8  # a descriptor per sector at most
    else:
        cost = 0
    return max(cost, REQUEST_OVERHEAD)


def block_status(device: BlockDevice, offset: int, length: int, one: bool) -> bytes:
    """base:allocation descriptors for [offset, offset+length); at most
    BLOCK_STATUS_SPAN of it (proto.md lets a reply cover less than asked), so a
    reply's size does not grow with the client's length."""
    out = []
    for e in device.allocation(offset, min(length, BLOCK_STATUS_SPAN)):
        state = STATE_HOLE | STATE_ZERO if e.state is Alloc.ZERO else 0
        n = e.length
        while n > 0:  # descriptor lengths are u32
            m = min(n, 0x8000_0000)
            out.append(struct.pack(">II", m, state))
            n -= m
        if one:
            break
    return struct.pack(">I", META_ID) + b"".join(out[:1] if one else out)


def _errno(e: Exception, kind: int) -> int:
    """The NBD error of a device's exception: one from a layer under the
    device (the stamp out of healthy nodes, under an attached disk) is EIO too."""
    if isinstance(e, ReadOnlyError):
        return errno.EPERM
    if isinstance(e, RangeError):
        return errno.ENOSPC if kind in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
    return errno.EIO


class NbdServer:
    """Serves `exports` (name -> Export); the first is also the default ("")."""

    def __init__(self, exports: dict[str, Export], budget: Budget | None = None,
                 max_connections: int = MAX_CONNECTIONS, stall_timeout: float = STALL_TIMEOUT) -> None:
        if not exports:
            raise VhdError("an NBD server needs at least one export")
        if max_connections < 1 or not stall_timeout > 0:
            raise UsageError("an NBD server needs at least one connection and a positive stall timeout")
        self.exports = exports
        self.budget = budget or server_budget(128, max_connections)
        if self.budget.per_connection < MAX_REQUEST:
            raise UsageError(f"the in-flight budget per connection must hold one request of {MAX_REQUEST >> 20} MiB")
        self.default = next(iter(exports.values()))
        self.server: asyncio.base_events.Server | None = None
        self.max_connections, self.stall_timeout = max_connections, stall_timeout
        self.connections = 0  # served so far
        self.active = 0  # open now: at most max_connections
        self.refused = 0  # closed at once: the server was full
        self.said: set[str] = set()  # the device errors already said on stderr

    def _error(self, e: Exception, kind: int) -> int:
        """The NBD error of a device's exception. One that is not the device's
        own (VhdError, OSError) is said on stderr, where the operator sees it,
        once: a client retrying must not grow the log (a mount's, in /run) for
        ever. A request the server does not answer would hang its client."""
        said = f"{type(e).__name__}: {e}"
        if not isinstance(e, (VhdError, OSError)) and said not in self.said and len(self.said) < 64:
            self.said.add(said)
            print(f"nbd: the device failed: {said} (each such error is said once)", file=sys.stderr, flush=True)
        return _errno(e, kind)

    def lookup(self, name: str) -> Export | None:
        return self.exports.get(name) or (self.default if name == "" else None)

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> asyncio.base_events.Server:
        self.server = await asyncio.start_server(self._client, host, port)
        return self.server

    async def serve_unix(self, path: str) -> asyncio.base_events.Server:
        """Listen on `path`; a file already there (a live server's socket) is an
        error: asyncio would unlink it and take its clients over. run_server's
        claim_socket removes a dead server's socket first."""
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"{path} is already in use (a server listens there, or a file is in the way): "
                                 "stop that server, or choose another --socket") from None
            raise
        self.server = await asyncio.start_unix_server(self._client, sock=sock)
        return self.server

    async def adopt(self, sock: socketlib.socket) -> None:
        """Serve a client another process accepted and handed over (hostcache
        serve --workers: the supervisor accepts, its workers serve); the same
        rules as a client of serve_tcp or serve_unix."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._client, loop=loop)
        await loop.connect_accepted_socket(lambda: protocol, sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            self.refused += 1  # full: closed before the greeting, holding nothing
            writer.transport.abort()
            return
        self.connections += 1
        self.active += 1
        try:
            await self._serve_connection(reader, writer)
        finally:
            self.active -= 1

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection()
        # drain() waits while more than SEND_PIECE is buffered: the slack a connection may hold
        # outside the budget (the rest of a reply that has mostly left, or small replies)
        writer.transport.set_write_buffer_limits(high=SEND_PIECE)
        try:
            # a client that dawdles in the handshake (slowloris) is closed: it holds a connection
            if await asyncio.wait_for(self._handshake(reader, writer, conn), self.stall_timeout):
                await self._transmission(reader, writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError, TimeoutError) as e:
            # the client vanished or broke the protocol: this connection only. A lost
            # connection's error is kept by the transport's reader, waiter and closed
            # future: its traceback would keep the frames it unwound, and the data they
            # held, in a reference cycle until gc. Cut it, so memory goes now.
            e.__traceback__ = None
        finally:
            for task in conn.pending:  # the client is gone: its unacknowledged work is dropped
                task.cancel()
            await asyncio.gather(*conn.pending, return_exceptions=True)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that reads no more replies: do not wait on it
            else:
                writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            lost = reader.exception()  # the transport's error, raised again by every wait on it
            if lost is not None:
                lost.__traceback__ = None  # cut last: each raise above added the frames it passed

    # -- handshake -------------------------------------------------------------------

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: Connection) -> bool:
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        client = struct.unpack(">I", await reader.readexactly(4))[0]
        if not client & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("the client does not speak fixed newstyle")
        conn.no_zeroes = bool(client & FLAG_NO_ZEROES)
        while True:
            magic, option, length = _OPT.unpack(await reader.readexactly(_OPT.size))
            if magic != IHAVEOPT:
                raise ProtocolError("bad option magic")
            if length > MAX_OPTION:
                raise ProtocolError(f"option of {length} bytes")
            data = await reader.readexactly(length)
            done = await self._option(writer, conn, option, data)
            await writer.drain()
            if done is not None:
                return done

    async def _option(self, writer: asyncio.StreamWriter, conn: Connection, option: int, data: bytes) -> bool | None:
        """Handle one option; True: enter transmission, False: close, None: more options."""
        if option == OPT_EXPORT_NAME:
            export = self.lookup(data.decode("utf-8", "replace"))
            if export is None:
                return False  # the protocol's only answer: close
            conn.export = export
            writer.write(struct.pack(">QH", export.device.size, export.flags()))
            if not conn.no_zeroes:
                writer.write(bytes(124))
            return True
        if option == OPT_ABORT:
            writer.write(opt_reply(option, REP_ACK))
            return False
        if option == OPT_LIST:
            if data:
                writer.write(opt_reply(option, REP_ERR_INVALID))
                return None
            for name in self.exports:
                raw = name.encode()
                writer.write(opt_reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw))
            writer.write(opt_reply(option, REP_ACK))
            return None
        if option in (OPT_INFO, OPT_GO):
            try:
                name, infos = parse_info_request(data)
            except ProtocolError:
                writer.write(opt_reply(option, REP_ERR_INVALID))
                return None
            export = self.lookup(name)
            if export is None:
                writer.write(opt_reply(option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode()))
                return None
            writer.write(opt_reply(option, REP_INFO, info_export(export)))
            if INFO_NAME in infos:
                writer.write(opt_reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode()))
            if INFO_DESCRIPTION in infos and export.description:
                writer.write(opt_reply(option, REP_INFO,
                                       struct.pack(">H", INFO_DESCRIPTION) + export.description.encode()))
            if INFO_BLOCK_SIZE in infos:
                writer.write(opt_reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                                      MAX_REQUEST)))
            writer.write(opt_reply(option, REP_ACK))
            if option == OPT_GO:
                conn.export = export
                return True
            return None
        if option == OPT_STRUCTURED_REPLY:
            conn.structured = not data
            writer.write(opt_reply(option, REP_ACK if not data else REP_ERR_INVALID))
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            try:
                name, queries = parse_meta_request(data)
            except ProtocolError:
                writer.write(opt_reply(option, REP_ERR_INVALID))
                return None
            if option == OPT_SET_META_CONTEXT and not conn.structured:
                writer.write(opt_reply(option, REP_ERR_INVALID, b"structured replies first"))
                return None
            if self.lookup(name) is None:
                writer.write(opt_reply(option, REP_ERR_UNKNOWN))
                return None
            wanted = (not queries and option == OPT_LIST_META_CONTEXT) or any(
                q in (META_BASE_ALLOCATION, "base:") for q in queries)
            if wanted:
                writer.write(opt_reply(option, REP_META_CONTEXT,
                                       struct.pack(">I", META_ID) + META_BASE_ALLOCATION.encode()))
                if option == OPT_SET_META_CONTEXT:
                    conn.meta = True
            writer.write(opt_reply(option, REP_ACK))
            return None
        writer.write(opt_reply(option, REP_ERR_UNSUP))  # STARTTLS and anything newer
        return None

    # -- transmission ------------------------------------------------------------------

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            conn: Connection) -> None:
        lock = asyncio.Lock()  # replies go out whole, one at a time
        assert conn.export is not None
        export = conn.export
        device = export.device
        waits = asyncio.iscoroutinefunction(getattr(device, "read", None))
        budget, transport, readexactly = self.budget, writer.transport, reader.readexactly
        writable, structured = not export.flags() & TF_READ_ONLY, conn.structured
        # a device that waits answers from tasks: their small replies go one send per loop pass
        replies = Replies(transport) if waits else None
        while True:
            magic, flags, kind, cookie, offset, length = _REQUEST.unpack(await readexactly(_REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise ProtocolError("bad request magic")
            if (not waits and kind <= CMD_WRITE and not flags and 0 < length <= SEND_PIECE
                    and offset + length <= device.size and (kind == CMD_READ or writable)):
                # The hot path (fio, a guest's small I/O): a small READ or WRITE with no flags, in range,
                # on a device that answers at once. Nothing to refuse, so no helper is called: the
                # budget's two integers, the device, one reply (what _serve would answer, byte for byte).
                # Its data is read with no timer (SEND_PIECE == STALL_CHECKED) and sent in one piece
                cost = length if length > REQUEST_OVERHEAD else REQUEST_OVERHEAD  # request_cost's
                if budget.take_nowait(cost):
                    try:
                        payload = await readexactly(length) if kind == CMD_WRITE else b""
                        try:
                            if kind == CMD_READ:
                                data = device.read(offset, length)
                            else:
                                device.write(offset, payload)
                                data = b""
                        except Exception as e:  # any failure of the device gets a reply (_errno), never none
                            head, data = self._reply(conn, kind, cookie, offset, self._error(e, kind), b"", b"")
                        else:
                            if not structured:
                                head = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
                            elif kind == CMD_READ:
                                head = _READ_CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_OFFSET_DATA,
                                                        cookie, 8 + len(data), offset)
                            else:
                                head = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_NONE, cookie, 0)
                        transport.write(head + data if data else head)  # one send
                        payload = data = b""
                        if transport.get_write_buffer_size() > SEND_PIECE:
                            await drain(writer, self.stall_timeout)  # the client reads slower than it asks: wait for it
                    finally:
                        budget.give_back(cost)
                    continue
            if kind == CMD_DISC:
                await asyncio.gather(*conn.pending)  # proto.md: outstanding requests are handled first
                if replies is not None:
                    replies.flush()  # and answered, before the connection closes
                if transport.get_write_buffer_size():  # every reply leaves (the client may read them after
                    transport.set_write_buffer_limits(high=0)  # its DISC), or it stalled: then closed
                    await drain(writer, self.stall_timeout)
                return
            if kind == CMD_WRITE and length > MAX_REQUEST:
                raise ProtocolError("write larger than the maximum block size")  # cannot skip safely
            cost = request_cost(kind, flags, length)
            if replies is not None:  # a device that waits
                # no budget, no more requests read: the client's sends block (backpressure)
                ticket = await budget.take(conn.account, cost)
                try:
                    payload = b"" if kind != CMD_WRITE else await self._payload(reader, length)  # whole, before any ack
                except BaseException:
                    budget.give(ticket)
                    raise
                task = asyncio.ensure_future(self._request(writer, lock, replies, conn, export, flags, kind,
                                                           cookie, offset, length, payload))
                conn.pending.add(task)
                task.add_done_callback(conn.pending.discard)
                # the budget is given back when the task ends, however: a task cancelled before it
                # started (requests pipelined behind a client that broke off) runs none of its code
                task.add_done_callback(functools.partial(_give, budget, ticket))
                continue
            # A device that answers at once (a file): served inline, in order, no task, no lock; one
            # request at a time, so the shared pool is all there is to check (requests the hot path
            # above does not take: flags, large ones, errors of range or of a read-only export)
            taken: Ticket | None = None if budget.take_nowait(cost) else await budget.take(conn.account, cost)
            try:
                if kind != CMD_WRITE:
                    payload = b""
                elif length <= STALL_CHECKED:
                    payload = await reader.readexactly(length)  # a small write: no timer
                else:
                    payload = await self._payload(reader, length)
                if kind == CMD_READ and length > SEND_PIECE:
                    head, data = await self._large_read(conn, export, flags, cookie, offset, length)
                elif kind in (CMD_WRITE_ZEROES, CMD_TRIM) and length > ZERO_CHUNK:
                    head, data = await self._large_zeroes(conn, export, flags, kind, cookie, offset, length)
                else:
                    head, data = self._serve(conn, export, flags, kind, cookie, offset, length, payload)
                payload = b""
                if len(data) <= SEND_PIECE:
                    writer.write(head + data if data else head)  # a small reply: one send
                    head = data = b""
                    if transport.get_write_buffer_size() > SEND_PIECE:
                        await drain(writer, self.stall_timeout)  # the client reads slower than it asks: wait for it
                else:
                    await send(writer, head, data, self.stall_timeout)
            finally:
                if taken is None:
                    budget.give_back(cost)
                else:
                    budget.give(taken)

    async def _payload(self, reader: asyncio.StreamReader, length: int) -> bytes:
        """A WRITE's data. A large one holds its bytes of the budget while it
        comes: a client that stops sending it midway (a few such clients would
        hold the whole budget for ever) is closed after STALL_TIMEOUT."""
        if length <= STALL_CHECKED:
            return await reader.readexactly(length)  # no timer per small write
        async with asyncio.timeout(self.stall_timeout):
            return await reader.readexactly(length)

    def _serve(self, conn: Connection, export: Export, flags: int, kind: int, cookie: int, offset: int,
               length: int, payload: bytes) -> tuple[bytes, bytes]:
        """One request against a device that does not wait: the reply (header, data)."""
        error, data, status = self._refuse(conn, export, flags, kind, offset, length), b"", b""
        if not error:
            try:
                data, status = self._execute(export.device, flags, kind, offset, length, payload)
            except Exception as e:  # any failure of the device gets a reply (_errno), never none
                error = self._error(e, kind)
        return self._reply(conn, kind, cookie, offset, error, data, status)

    async def _large_read(self, conn: Connection, export: Export, flags: int, cookie: int, offset: int,
                          length: int) -> tuple[bytes, bytes]:
        """A READ larger than SEND_PIECE from a device that does not wait, read a
        piece at a time with the loop let go in between: one client's 32 MiB
        reads do not hold up another's 4 KiB ones."""
        error = self._refuse(conn, export, flags, CMD_READ, offset, length)
        if error:
            return self._reply(conn, CMD_READ, cookie, offset, error, b"", b"")
        buf = bytearray(length)
        try:
            for at in range(0, length, SEND_PIECE):
                n = min(SEND_PIECE, length - at)
                buf[at:at + n] = export.device.read(offset + at, n)
                await asyncio.sleep(0)
        except Exception as e:  # any failure of the device gets a reply (_errno), never none
            return self._reply(conn, CMD_READ, cookie, offset, self._error(e, CMD_READ), b"", b"")
        return self._reply(conn, CMD_READ, cookie, offset, 0, buf, b"")  # type: ignore[arg-type]

    async def _large_zeroes(self, conn: Connection, export: Export, flags: int, kind: int, cookie: int,
                            offset: int, length: int) -> tuple[bytes, bytes]:
        """A WRITE_ZEROES or TRIM larger than ZERO_CHUNK (up to 4 GiB), done a
        piece at a time with the loop let go in between: it does not stop every
        other client for seconds (a discard writes zeros on a differencing
        image: 4 GiB took 12 s). On a device that waits (hostcache serve) its
        discard does not wait, so the same holds: the other tasks run between
        pieces.
        With NO_HOLE zeros are written, a ZERO_CHUNK at a time; otherwise the
        device discards pieces that end on multiples of its block size (never
        less than ZERO_CHUNK), so no block is split and whole blocks are still
        unallocated."""
        error = self._refuse(conn, export, flags, kind, offset, length)
        if not error:
            device, end = export.device, offset + length
            piece = ZERO_CHUNK if flags & CMDF_NO_HOLE else max(ZERO_CHUNK, getattr(device, "block_size", 0))
            try:
                at = offset
                while at < end:
                    n = min(end, at - at % piece + piece) - at
                    if kind == CMD_WRITE_ZEROES and flags & CMDF_NO_HOLE:
                        write_zeros(device, at, n)
                    else:
                        device.discard(at, n)  # reads as zeros afterwards (the block device contract)
                    at += n
                    await asyncio.sleep(0)
                if flags & CMDF_FUA:
                    device.flush()
            except Exception as e:  # any failure of the device gets a reply (_errno), never none
                error = self._error(e, kind)
        return self._reply(conn, kind, cookie, offset, error, b"", b"")

    @staticmethod
    def _execute(dev: BlockDevice, flags: int, kind: int, offset: int, length: int,
                 payload: bytes) -> tuple[bytes, bytes]:
        """Run an admitted request on a device that does not wait: (data, block status)."""
        data, status = b"", b""
        if kind == CMD_READ:
            data = dev.read(offset, length)
        elif kind == CMD_WRITE:
            dev.write(offset, payload)
        elif kind == CMD_TRIM or (kind == CMD_WRITE_ZEROES and not flags & CMDF_NO_HOLE):
            dev.discard(offset, length)  # reads as zeros afterwards (the block device contract)
        elif kind == CMD_WRITE_ZEROES:
            write_zeros(dev, offset, length)  # NO_HOLE: allocated zeros, in bounded chunks
        elif kind == CMD_BLOCK_STATUS:
            status = block_status(dev, offset, length, bool(flags & CMDF_REQ_ONE))
        if kind == CMD_FLUSH or (flags & CMDF_FUA and kind in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM)):
            dev.flush()
        return data, status  # CACHE is a hint: nothing to do

    @staticmethod
    async def _execute_waiting(dev: BlockDevice, flags: int, kind: int, offset: int, length: int,
                               payload: bytes) -> bytes:
        """READ, WRITE and WRITE_ZEROES with NO_HOLE on a device whose read and
        write are coroutines: awaited, so a zero write is written, not dropped."""
        if kind == CMD_READ:
            return await dev.read(offset, length)  # type: ignore[misc]
        if kind == CMD_WRITE:
            await dev.write(offset, payload)  # type: ignore[func-returns-value,misc]
        else:
            zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
            for at in range(offset, offset + length, len(zeros)):
                await dev.write(at, zeros[:min(len(zeros), offset + length - at)])  # type: ignore[func-returns-value,misc]
        if flags & CMDF_FUA:
            dev.flush()
        return b""

    async def _request(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, replies: Replies,
                       conn: Connection, export: Export, flags: int, kind: int, cookie: int, offset: int,
                       length: int, payload: bytes) -> None:
        """A request to a device that waits (its read and write are coroutines):
        data commands are awaited here; every other command is served as _serve
        does. A reply of up to SEND_PIECE joins the connection's Replies; a
        larger one is sent a piece at a time under the lock. Its budget is given
        back when its task ends (once the reply has left or joined the Replies,
        which hold at most SEND_PIECE before they are sent and drained; or it
        failed or was cancelled: _transmission's done callback)."""
        try:
            waits = kind in (CMD_READ, CMD_WRITE) or (kind == CMD_WRITE_ZEROES and flags & CMDF_NO_HOLE)
            error = self._refuse(conn, export, flags, kind, offset, length)
            if waits and not error:
                data = b""
                try:
                    data = await self._execute_waiting(export.device, flags, kind, offset, length, payload)
                except Exception as e:  # any failure of the device gets a reply (_errno), never none
                    error = self._error(e, kind)
                head, data = self._reply(conn, kind, cookie, offset, error, data, b"")
            elif kind in (CMD_WRITE_ZEROES, CMD_TRIM) and length > ZERO_CHUNK:
                head, data = await self._large_zeroes(conn, export, flags, kind, cookie, offset, length)
            else:
                head, data = self._serve(conn, export, flags, kind, cookie, offset, length, payload)
            payload = b""
            if len(data) <= SEND_PIECE and not lock.locked():
                replies.add(head, data)
                head = data = b""
                if replies.buffered() > SEND_PIECE:
                    async with lock:  # the client reads slower than it asks: wait for it
                        replies.flush()
                        await drain(writer, self.stall_timeout)
            else:
                async with lock:
                    replies.flush()  # the replies ready before it go first
                    await send(writer, head, data, self.stall_timeout)
        except ConnectionError as e:
            e.__traceback__ = None  # see _client; the client went away: _client cancels the rest of its work

    def _refuse(self, conn: Connection, export: Export, flags: int, kind: int, offset: int, length: int) -> int:
        """The error a request gets before it reaches the device, or 0."""
        allowed = ALLOWED_FLAGS.get(kind)
        if allowed is None or flags & ~allowed:
            return errno.EINVAL  # an unknown command, or a flag it does not take
        if flags & CMDF_DF and not conn.structured:
            return errno.EINVAL
        if kind == CMD_BLOCK_STATUS and not conn.meta:
            return errno.EINVAL
        return self._check(export, kind, offset, length)

    @staticmethod
    def _check(export: Export, kind: int, offset: int, length: int) -> int:
        size = export.device.size
        writes = (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM)
        if kind in writes and export.flags() & TF_READ_ONLY:
            return errno.EPERM
        if kind in (CMD_READ, CMD_WRITE) and length > MAX_REQUEST:
            return errno.EOVERFLOW if kind == CMD_READ else errno.EINVAL
        if kind in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS):
            if length == 0:  # (a block status of nothing would need a reply with no descriptor: invalid)
                return errno.EINVAL
            if offset + length > size:
                return errno.ENOSPC if kind in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
        return 0

    @staticmethod
    def _reply(conn: Connection, kind: int, cookie: int, offset: int, error: int, data: bytes,
               status: bytes) -> tuple[bytes, bytes]:
        """The reply as (header, data): the data is sent as it is, never copied into the header."""
        if not conn.structured:
            return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie), (data if not error else b"")
        if error:
            msg = b""
            payload = struct.pack(">IH", error, len(msg)) + msg
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_ERROR, cookie, len(payload)) + payload, b""
        if kind == CMD_READ:
            head = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_OFFSET_DATA, cookie, 8 + len(data))
            return head + struct.pack(">Q", offset), data
        if kind == CMD_BLOCK_STATUS:
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_BLOCK_STATUS, cookie, len(status)) + status, b""
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_NONE, cookie, 0), b""


def _give(budget: Budget, ticket: Ticket, _task: asyncio.Task[None]) -> None:
    """A request task's done callback: its budget back (_transmission)."""
    budget.give(ticket)


def export_name(path: str) -> str:
    """The export name of an image file: its name without the extension, as
    UTF-8 text (NBD names are UTF-8; a file name byte that is not, kept by
    Python as a surrogate, becomes U+FFFD instead of breaking every reply that
    names the export)."""
    return text(os.path.splitext(os.path.basename(path))[0])


def text(name: str) -> str:
    """`name` (a file name, perhaps with undecodable bytes) as valid UTF-8 text."""
    return os.fsencode(name).decode("utf-8", "replace")


def server_budget(mib: int, max_connections: int = MAX_CONNECTIONS) -> Budget:
    """The budget of `serve --max-inflight-mib`: at most half of it per connection,
    and at least one request of the maximum size; and a reserve that holds a
    small request (RESERVED bytes) for every connection at once, so however the
    others hold the pool and the reserve (4 connections of unread 32 MiB reads
    and 8 of one unread 1 MiB read each starved a light client for ever when
    the reserve was a fixed 8 MiB in 1 MiB requests), a light client is served."""
    if mib << 20 < MAX_REQUEST:
        raise UsageError(f"--max-inflight-mib must be at least {MAX_REQUEST >> 20} (one request of the maximum size)")
    return Budget(mib << 20, per_connection=max(MAX_REQUEST, (mib << 20) // 2), reserve=max_connections * RESERVED,
                  small=RESERVED)


MAX_SOCKET_PATH = 108  # bytes: sockaddr_un's sun_path on Linux


def claim_socket(path: str) -> None:
    """Make way for a server on unix socket `path`: refuse if a live server
    answers there (binding would silently take it over, orphaning that server
    and its image lock); remove a stale socket file left by a dead one. A path
    no socket can have (its folder missing, too long) is refused here, before
    the server opens anything."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"{path} is too long for a unix socket (at most {MAX_SOCKET_PATH} bytes): choose a "
                         "shorter --socket")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise UsageError(f"the folder of {path} does not exist: create it, or choose another --socket") from None
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket: choose another --socket")
    probe = socketlib.socket(socketlib.AF_UNIX)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a server that died
        return
    except OSError as e:
        raise UsageError(f"cannot tell whether a server listens on {path} ({e}): choose another --socket") from None
    finally:
        probe.close()
    raise UsageError(f"a server is already listening on {path}: stop it first, or choose another --socket")


def run_server(server: NbdServer, socket: str | None = None, bind: str = "127.0.0.1", port: int = 10809) -> None:
    """Serve until SIGTERM or SIGINT; print one JSON line when ready (scripts wait
    for it). A unix socket is refused if a live server answers on it, and
    removed on the way out."""
    import json
    import signal

    fixed_mmap_threshold()

    async def main() -> None:
        if socket:
            claim_socket(socket)
        srv = await (server.serve_unix(socket) if socket else server.serve_tcp(bind, port))
        mine = os.stat(socket).st_ino if socket else None
        where = f"unix socket {socket}" if socket else f"{bind}:{port}"
        print(json.dumps({"serving": list(server.exports), "at": where}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with srv:
                await stop.wait()  # then the caller closes its devices: flushed, unlocked
        finally:
            if socket and _inode(socket) == mine:
                os.unlink(socket)
    asyncio.run(main())


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
