"""The endpoint's byte budget (rest/call.Budget): never more than its limit
taken at once, a take waits while the budget is spent and goes on when bytes
are given back, and a cancelled wait leaves nothing behind."""

from __future__ import annotations

import asyncio

from stamp.rest.call import Budget


def run(coro):
    return asyncio.run(coro)


def test_a_take_that_fits_returns_at_once_and_one_that_does_not_waits_for_a_give():
    async def go() -> None:
        b = Budget(100)
        await b.take(60)
        waiter = asyncio.create_task(b.take(60))
        await asyncio.sleep(0.01)
        assert not waiter.done() and b.used == 60
        await b.give(60)
        await asyncio.wait_for(waiter, 1)
        assert b.used == 60
        await b.give(60)
        assert b.used == 0
    run(go())


def test_a_cancelled_wait_takes_nothing_and_later_takes_use_the_fast_way():
    async def go() -> None:
        b = Budget(100)
        await b.take(100)
        waiter = asyncio.create_task(b.take(1))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await b.give(100)
        assert b.used == 0
        await asyncio.wait_for(b.take(100), 1)  # nobody is left waiting: taken at once
        assert b.used == 100
    run(go())


def test_a_take_over_the_limit_takes_the_whole_budget():
    async def go() -> None:
        b = Budget(100)
        await b.take(1000)
        assert b.used == 100
        await b.give(1000)
        assert b.used == 0
    run(go())


def test_a_large_waiting_take_is_not_overtaken_by_small_ones_that_would_fit():
    async def go() -> None:
        b = Budget(100)
        await b.take(50)
        big = asyncio.create_task(b.take(100))
        await asyncio.sleep(0.01)
        small = [asyncio.create_task(b.take(10)) for _ in range(3)]  # 50 + 10 fits, but the big take came first
        await asyncio.sleep(0.01)
        assert not big.done() and not any(t.done() for t in small) and b.used == 50
        await b.give(50)
        await asyncio.wait_for(big, 1)
        assert b.used == 100 and not any(t.done() for t in small)
        await b.give(100)
        await asyncio.wait_for(asyncio.gather(*small), 1)
        assert b.used == 30
    run(go())


def test_a_cancelled_head_of_the_queue_lets_the_waiters_behind_it_go():
    async def go() -> None:
        b = Budget(100)
        await b.take(50)
        big = asyncio.create_task(b.take(100))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(b.take(10))
        await asyncio.sleep(0.01)
        assert not small.done()
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        await asyncio.wait_for(small, 1)
        assert b.used == 60
    run(go())


def test_a_take_cancelled_after_its_grant_gives_its_bytes_back():
    async def go() -> None:
        b = Budget(100)
        await b.take(100)
        waiter = asyncio.create_task(b.take(40))
        await asyncio.sleep(0.01)
        await b.give(100)  # grants the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs again
        await asyncio.gather(waiter, return_exceptions=True)
        assert b.used == 0
    run(go())
