"""One request as the operations see it, and the server state they share.

`Call` holds the parsed request (account, container, blob, snapshot, query,
headers) and the aiohttp request for its body. `Service` holds the stamp,
the thread pool that runs stamp calls (the stamp's I/O blocks: LMDB and
extent files; each call runs whole on one pool thread, so its transactions
start and commit there), and the byte budget that bounds memory:
- every body byte read and every response chunk held is taken from the
  budget first and given back when written out or stored; a request waits
  (and its client with it: TCP backpressure) while the budget is spent;
- one request takes at most MAX_CHUNK bytes at a time (a Put Page body or
  a 4 MiB piece of a Get Blob), so the budget bounds the data in flight
  whatever the number of clients;
- a client that stalls while sending a body or reading an answer for
  `stall_timeout` seconds gives its share back (408 RequestTimeout, or the
  connection is dropped), so stalled clients cannot hold the budget.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from ..stamp import Stamp
from .auth import Accounts
from .errors import RestError

T = TypeVar("T")
MAX_CHUNK = 4 * 1024 * 1024


class Budget:
    """Bytes in flight, shared by all requests; take() waits while spent.
    First come, first served: a take waits behind every earlier waiter, so
    a large take is not overtaken forever by small ones that would fit.
    All on the event loop's thread: a take that fits while nobody waits
    returns at once, and a give with nobody waiting wakes nobody (the
    common case of a 4 KiB Put Page); otherwise waiters queue in order and
    each give grants the head of the queue while its bytes fit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, n: int) -> None:
        n = min(n, self.limit)
        if not self._queue and self.used + n <= self.limit:
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._queue.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.used -= n  # granted as it was cancelled: give it back
            else:
                self._queue.remove(entry)
            self._grant()  # the queue's head may have changed
            raise

    async def give(self, n: int) -> None:
        self.used -= min(n, self.limit)
        if self._queue:
            self._grant()

    def _grant(self) -> None:
        """Grant waiters in order while the head's bytes fit."""
        while self._queue and self.used + self._queue[0][0] <= self.limit:
            n, fut = self._queue.popleft()
            self.used += n
            fut.set_result(None)


@dataclass
class Limits:
    inflight_bytes: int = 64 * 1024 * 1024  # request and response data held at once (all clients)
    max_requests: int = 256  # requests being served at once; more are answered 503 ServerBusy
    threads: int = 8  # stamp calls at once
    stall_timeout: float = 30.0  # seconds a client may stall mid-body (sending or receiving) before it is dropped


@dataclass
class Service:
    stamp: Stamp
    accounts: Accounts
    limits: Limits = field(default_factory=Limits)
    pool: ThreadPoolExecutor = field(init=False)
    budget: Budget = field(init=False)
    active: int = 0

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.limits.threads, thread_name_prefix="stamp")
        self.budget = Budget(self.limits.inflight_bytes)

    async def read_body(self, request: web.Request, n: int) -> bytes:
        """Exactly n body bytes; a client that stalls for stall_timeout is 408."""
        try:  # asyncio.timeout, not wait_for: no task of its own per body read
            async with asyncio.timeout(self.limits.stall_timeout):
                return await request.content.readexactly(n)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise RestError(408, "RequestTimeout", "The client did not send the request body in time.") \
                from None

    async def send(self, resp: web.StreamResponse, data: bytes) -> None:
        """Write a chunk out; a client that stops reading for stall_timeout is dropped."""
        try:
            async with asyncio.timeout(self.limits.stall_timeout):
                await resp.write(data)
        except TimeoutError:
            raise ConnectionResetError("the client stopped reading") from None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking stamp call on the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))


@dataclass
class Call:
    request: web.Request
    account: str
    container: str | None
    blob: str | None
    query: dict[str, str]
    version: str
    auth: str = ""
    granted: bool = False  # reached through a managed disk's grant (rest/managed.py), not its own container
    grant_id: str | None = None  # that grant's id (a Put Page lands only while the blob's mark names it)

    @property
    def headers(self) -> Any:
        return self.request.headers

    @property
    def snapshot(self) -> str | None:
        return self.query.get("snapshot")

    @property
    def method(self) -> str:
        return self.request.method
