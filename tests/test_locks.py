"""Engine range locks: exclusion, sharing, FIFO order, and the release barrier."""

from __future__ import annotations

import asyncio

from owm.locks.ranges import EXCLUSIVE, SHARED, RangeLockManager


async def test_overlapping_exclusive_requests_are_serialised_in_arrival_order() -> None:
    locks = RangeLockManager()
    order: list[int] = []

    async def job(i: int, first: int, last: int) -> None:
        async with locks.locked(first, last, EXCLUSIVE):
            order.append(i)
            await asyncio.sleep(0.001)

    await asyncio.gather(job(0, 0, 3), job(1, 2, 5), job(2, 5, 6), job(3, 0, 0))
    assert order.index(0) < order.index(1) < order.index(2)
    assert order.index(0) < order.index(3)
    assert locks.held_chunks == 0 and locks.waiting == 0


async def test_disjoint_and_shared_requests_do_not_wait() -> None:
    locks = RangeLockManager()
    assert locks.try_acquire(0, 1, SHARED) is None
    assert locks.try_acquire(0, 1, SHARED) is None
    assert locks.try_acquire(2, 3, EXCLUSIVE) is None
    fut = locks.try_acquire(1, 2, EXCLUSIVE)
    assert fut is not None and not fut.done()
    locks.release(0, 1)
    locks.release(0, 1)
    assert not fut.done()
    locks.release(2, 3)
    assert fut.done()
    locks.release(1, 2)


async def test_barrier_waits_for_holders_and_holds_back_later_requests() -> None:
    locks = RangeLockManager()
    events: list[str] = []
    assert locks.try_acquire(5, 5, EXCLUSIVE) is None

    async def barrier() -> None:
        await locks.barrier()
        events.append("barrier")

    async def later() -> None:
        await asyncio.sleep(0)
        async with locks.locked(9, 9, EXCLUSIVE):
            events.append("later")

    task = asyncio.gather(barrier(), later())
    await asyncio.sleep(0.01)
    assert events == []  # the barrier waits for chunk 5; the later request waits behind it
    locks.release(5, 5)
    await task
    assert events == ["barrier", "later"]
    await locks.barrier()  # nothing held: returns at once
