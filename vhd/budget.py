"""A server's budget of in-flight bytes, shared by all its connections.

Every request that carries or returns data (a READ's reply, a WRITE's payload,
a zero-write's buffer) takes its bytes from the budget before the server reads
its payload or starts it, and gives them back once its reply has left the
socket. A connection that cannot take stops reading requests (backpressure:
the client's sends block), so memory is bounded by the budget whatever the
clients do. Rules kept:
- the server holds at most `limit` bytes for requests, plus `reserve`;
- one connection holds at most `per_connection` of `limit` (a greedy client
  cannot take it all);
- a connection with nothing in flight may take a small request (at most
  `small` bytes) from the `reserve` when `limit` is used up, so a light client
  is served beside greedy ones that hold the rest and do not read replies
  (the NBD server sizes the reserve to hold one for every connection it
  admits: nbd.server_budget);
- `take` waits (never fails); a request larger than the budget is refused by
  the caller beforehand (MAX_REQUEST <= per_connection <= limit);
- a connection that serves one request at a time (the NBD server's inline
  path) is within its share by construction: `take_nowait`/`give_back` check
  and count only the shared pool, two integers per request.
asyncio only: one event loop, no locks. A server process also fixes glibc's
mmap threshold (fixed_mmap_threshold), so the buffers the budget admits go
back to the system when freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import NamedTuple

from .errors import UsageError

MIB = 1 << 20


@dataclass
class Account:
    """What one connection holds."""

    held: int = 0


class Ticket(NamedTuple):
    """Bytes taken for one request, and from which pool (a tuple: cheap, one per request)."""

    account: Account
    size: int
    from_reserve: bool


class Budget:
    def __init__(self, limit: int = 128 * MIB, per_connection: int = 64 * MIB, reserve: int = 8 * MIB,
                 small: int = MIB) -> None:
        if not 0 < per_connection <= limit or not 0 < small <= reserve:
            raise UsageError("a budget needs 0 < per_connection <= limit and 0 < small <= reserve")
        self.limit, self.per_connection, self.reserve, self.small = limit, per_connection, reserve, small
        self.used = self.reserve_used = 0
        self.waits = 0  # how many takes had to wait (statistics)
        self._waiters: list[asyncio.Future[None]] = []

    def take_nowait(self, size: int) -> bool:
        """Take `size` bytes now for a connection with nothing else in flight (so
        within its share: size <= MAX_REQUEST <= per_connection); False if the
        shared pool has no room. The inline path's fast path: two integers."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        """Give back what take_nowait took."""
        self.used -= size
        if self._waiters:
            self._wake()

    def _try(self, account: Account, size: int) -> Ticket | None:
        if self.used + size <= self.limit and account.held + size <= self.per_connection:
            self.used += size
            account.held += size
            return Ticket(account, size, False)
        if account.held == 0 and size <= self.small and self.reserve_used + size <= self.reserve:
            self.reserve_used += size
            account.held += size
            return Ticket(account, size, True)
        return None

    async def take(self, account: Account, size: int) -> Ticket:
        """Take `size` bytes for a connection, waiting until something is given back if need be."""
        ticket = self._try(account, size)
        if ticket is not None:
            return ticket
        self.waits += 1
        while ticket is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            ticket = self._try(account, size)
        return ticket

    def give(self, ticket: Ticket) -> None:
        """Give a ticket's bytes back and wake every waiting connection to try again."""
        if ticket.from_reserve:
            self.reserve_used -= ticket.size
        else:
            self.used -= ticket.size
        ticket.account.held -= ticket.size
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def statistics(self) -> dict[str, int]:
        return {"limit": self.limit, "used": self.used, "reserve_used": self.reserve_used, "waits": self.waits}


def fixed_mmap_threshold() -> None:
    """Large buffers (request data, replies) straight from mmap, returned to
    the system at free: glibc otherwise raises its mmap threshold after the
    first large buffer is freed and keeps later ones in its heaps, so a
    server's memory could stay above what its budget admits after the
    clients that used it left. Call once, in a server process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed at 256 KiB
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy
