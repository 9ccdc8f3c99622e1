"""Grants: a process's prepaid share of a shared limiter, spent without the bucket file.

A process admitting I/O against a shared bucket (buckets.BucketStore) would
read, lock and write the bucket's file for every I/O. With grants it goes to
the file once for a run of I/Os instead:
- when it goes (a "refresh"), it admits the I/O at hand as before, then pays
  the shared limiter for GRANT_SECONDS more of its limit (the grant): the
  bucket it writes back holds that work as done, so every other process
  sees it as taken;
- the I/Os after that are admitted against a local copy of the limiter as it
  stood before the grant (so they are spaced exactly as the limiter would
  space them) and take their cost from the grant, with no file access;
- it goes back to the file when an I/O costs more than a grant has left, or
  arrives GRANT_LIFETIME after the grant was paid, and then first gives
  back what its grant has left (settle: also on statistics, pause, resume,
  a change of the disk's limits, and when the process closes the host).

Rules kept:
- the shared limiter is paid before a grant is spent, so the bucket never
  holds less work than was admitted: limits hold across processes as
  without grants, plus at most one grant per process (paid at one time,
  spent at a later one: over any interval, each process may spend one
  grant paid before it began), and an unspent grant is seen by the others
  as taken until it is given back;
- a grant lives by its units, not by the rate's time: a process below the
  limit (serving 400 I/Os a second against a P40's 7,500, say) would
  otherwise see 5 ms of its rate pass after two or three I/Os and go to the
  file for nearly every one. GRANT_LIFETIME only bounds how stale a
  process's copy of a limiter may grow. The I/Os spent on a grant count in
  the bucket back to back from its payment, without the idle time between
  them: the bucket's time is then earlier than the plain one only where
  that limiter was idle (by at most the last I/O's own length, once it
  has been given back), which admits alike inside its tolerance, and
  credits earn the same (the idle time is counted from the earlier time);
- what is given back is the grant's unspent fraction of what paying it moved
  (its time and credits), so a grant not spent at all leaves the limiter as
  if it had never been taken (credits included: the time comes back idle,
  earning as idle time does);
- a process that dies holding a grant loses that grant and no more: at most
  GRANT_SECONDS of each limiter on the path of its last refresh, counted as
  used though it was not;
- the arithmetic is pure: limiters in, limiters out; the Throttle does the
  file round trips.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .throttle import Limiter

GRANT_SECONDS = 0.005  # of a limiter's rate: what one refresh pays for beyond its own I/O
GRANT_LIFETIME = 1.0  # seconds after its payment a grant may still be spent


@dataclass
class Grant:
    local: Limiter  # the limiter as this process sees it: the shared one before the grant, plus what it spent
    size: float  # units paid for
    left: float  # units not yet spent
    moved_tat: float  # what paying moved the shared limiter's time on
    took_credits: float  # and took of its credits
    until: float  # an I/O arriving after this is not admitted on the grant (too old)

    def covers(self, cost: float, arrival: float) -> bool:
        return cost <= self.left and arrival <= self.until


def take(lim: Limiter, t: float, seconds: float) -> Grant:
    """Pay `lim` (the shared state, just loaded and charged with the I/O admitted
    at `t`) for a grant of `seconds` of its rate, and make the local copy."""
    local = copy.copy(lim)  # the state before the grant; statistics shared (the same object)
    tat0, credits0 = lim.state()
    units = seconds * lim.present_rate()
    lim.advance(t, units)
    tat1, credits1 = lim.state()
    return Grant(local, units, units, tat1 - tat0, credits0 - credits1, t + GRANT_LIFETIME)


def give_back(lim: Limiter, grant: Grant) -> None:
    """Return the unspent part of `grant` to `lim` (the shared state, just loaded)."""
    if grant.left <= 0 or grant.size <= 0:
        return
    part = grant.left / grant.size
    tat, credits = lim.state()
    lim.restore(tat - part * grant.moved_tat, credits + part * grant.took_credits)
    grant.left = 0.0
