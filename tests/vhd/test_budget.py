"""The NBD server's budget of in-flight bytes (vhd/budget.py), alone."""

from __future__ import annotations

import asyncio

import pytest

from vhd.budget import Account, Budget
from vhd.errors import UsageError

MIB = 1 << 20


def test_shares_the_reserve_and_wakes_a_waiter_when_bytes_come_back():
    async def scenario() -> None:
        b = Budget(limit=64 * MIB, per_connection=32 * MIB, reserve=2 * MIB, small=MIB)
        greedy1, greedy2, light = Account(), Account(), Account()
        t1 = await b.take(greedy1, 32 * MIB)
        assert b._try(greedy1, 1) is None  # its share is used
        t2 = await b.take(greedy2, 32 * MIB)
        assert b.used == b.limit and not b.take_nowait(4096)
        small = await b.take(light, 4096)  # nothing in flight, small: the reserve
        assert small.from_reserve and b.reserve_used == 4096
        assert b._try(light, 4096) is None  # but only one request at a time from it
        waiting = asyncio.ensure_future(b.take(greedy2, 32 * MIB))
        await asyncio.sleep(0)
        assert not waiting.done()
        b.give(t2)
        again = await asyncio.wait_for(waiting, 5)
        assert again.size == 32 * MIB and greedy2.held == 32 * MIB
        for t in (t1, again, small):
            b.give(t)
        assert (b.used, b.reserve_used, greedy1.held, greedy2.held, light.held) == (0, 0, 0, 0, 0)
        assert b.take_nowait(MIB) and b.used == MIB
        b.give_back(MIB)
        assert b.statistics()["waits"] == 1

    asyncio.run(scenario())


def test_refuses_a_budget_that_cannot_work():
    with pytest.raises(UsageError):
        Budget(limit=MIB, per_connection=2 * MIB)
