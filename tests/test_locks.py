"""Engine range locks: exclusion, sharing, FIFO order, and the release barrier."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ random interleavings

CHUNKS = 6
_op = st.one_of(
    st.tuples(
        st.just("acquire"), st.integers(0, CHUNKS - 1), st.integers(1, 3), st.booleans()
    ),
    st.tuples(st.just("release"), st.integers(0, 1 << 16)),
    st.tuples(st.just("cancel"), st.integers(0, 1 << 16)),
    st.tuples(st.just("barrier")),
)


@dataclass
class _Req:
    seq: int
    first: int
    last: int
    exclusive: bool
    future: asyncio.Future[None] | None
    granted: bool = False
    released: bool = False
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.released or self.cancelled

    def conflicts(self, other: _Req) -> bool:
        overlap = self.first <= other.last and other.first <= self.last
        return overlap and (self.exclusive or other.exclusive)


@dataclass
class _Barrier:
    seq: int
    task: asyncio.Task[None]


def _check(reqs: list[_Req], barriers: list[_Barrier]) -> None:
    """The lock manager's promises, given what every request and barrier saw so far."""
    for r in reqs:
        if r.future is not None and r.future.done() and not r.future.cancelled():
            r.granted = True
    holders = [r for r in reqs if r.granted and not r.released]
    for i, a in enumerate(holders):  # never two conflicting holders at once
        for b in holders[i + 1 :]:
            assert not a.conflicts(b), f"{a} and {b} hold conflicting chunks together"
    for b in reqs:
        pending = [x for x in barriers if x.seq < b.seq and not x.task.done()]
        earlier = [a for a in reqs if a.seq < b.seq and a.conflicts(b)]
        if b.granted:
            # FIFO per chunk: every earlier conflicting request went first (or gave up), and
            # no barrier it came after is still waiting.
            assert all(a.granted or a.cancelled for a in earlier), f"{b} jumped the queue"
            assert not pending, f"{b} passed a waiting barrier"
        elif not b.cancelled:
            # Nobody waits without a reason: an earlier conflicting request not finished, or
            # an earlier barrier still waiting (so nothing is forgotten: no deadlock).
            blockers = [a for a in earlier if not a.finished]
            assert blockers or pending, f"{b} waits for nothing"
    for x in barriers:
        before = [r for r in reqs if r.seq < x.seq]
        earlier_barriers = [y for y in barriers if y.seq < x.seq]
        free = all(r.finished for r in before) and all(y.task.done() for y in earlier_barriers)
        assert x.task.done() == free, f"barrier {x.seq} done={x.task.done()} but free={free}"


async def _settle() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


async def _interleave(ops: list[tuple[Any, ...]]) -> None:
    locks = RangeLockManager()
    reqs: list[_Req] = []
    barriers: list[_Barrier] = []
    for seq, op in enumerate(ops):
        if op[0] == "acquire":
            _, first, n, exclusive = op
            last = min(CHUNKS - 1, first + n - 1)
            fut = locks.try_acquire(first, last, exclusive)
            reqs.append(_Req(seq, first, last, exclusive, fut, granted=fut is None))
        elif op[0] == "release":
            holders = [r for r in reqs if r.granted and not r.released]
            if holders:
                r = holders[op[1] % len(holders)]
                locks.release(r.first, r.last)
                r.released = True
        elif op[0] == "cancel":
            waiting = [r for r in reqs if not r.granted and not r.cancelled]
            if waiting:
                r = waiting[op[1] % len(waiting)]
                assert r.future is not None
                r.future.cancel()
                r.cancelled = True
        else:
            barriers.append(_Barrier(seq, asyncio.ensure_future(locks.barrier())))
        await _settle()
        _check(reqs, barriers)
    # Release everything, oldest first, until nothing is left: every waiter gets its turn.
    for _ in range(len(reqs) + 1):
        holders = [r for r in reqs if r.granted and not r.released]
        if not holders:
            break
        for r in holders:
            locks.release(r.first, r.last)
            r.released = True
        await _settle()
        _check(reqs, barriers)
    assert all(r.finished for r in reqs)
    assert all(x.task.done() for x in barriers)
    assert locks.held_chunks == 0 and locks.waiting == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=40))
def test_random_interleavings_keep_exclusion_fifo_and_never_deadlock(
    ops: list[tuple[Any, ...]],
) -> None:
    asyncio.run(_interleave(ops))


class _CountingFuture(asyncio.Future[None]):
    """A future that counts how often the lock manager looks at it."""

    looks = 0

    def done(self) -> bool:
        _CountingFuture.looks += 1
        return super().done()

    def cancelled(self) -> bool:
        _CountingFuture.looks += 1
        return super().cancelled()


async def test_a_release_looks_at_a_bounded_number_of_waiters() -> None:
    """Thousands of waiters on one chunk: each release grants the next (FIFO) without looking
    at the others, so a deep queue costs O(1) per request, not O(queue)."""
    loop = asyncio.get_running_loop()
    loop.create_future = lambda: _CountingFuture(loop=loop)  # type: ignore[method-assign]
    _CountingFuture.looks = 0
    locks = RangeLockManager()
    n = 2000
    assert locks.try_acquire(0, 0, EXCLUSIVE) is None
    futures = [locks.try_acquire(0, 0, EXCLUSIVE) for _ in range(n)]
    for i, fut in enumerate(futures):
        locks.release(0, 0)
        assert fut is not None and fut.done()
        nxt = futures[i + 1] if i + 1 < n else None
        assert nxt is None or not nxt.done()
    locks.release(0, 0)
    await asyncio.sleep(0)
    assert locks.held_chunks == 0 and locks.waiting == 0
    # Our own asserts above look 2 n times; the manager may look a few times per request.
    assert _CountingFuture.looks <= 8 * n
