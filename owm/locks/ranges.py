"""Engine locks: a FIFO range lock manager over chunk numbers, one per volume.

A request locks the chunks it touches, shared (reads) or exclusive (writes, copies, merges),
for as long as its data and table updates take.  A request that conflicts with a holder, or with
an earlier waiter whose range overlaps its own, suspends on a future (FIFO, no spinning, no
polling); requests on disjoint ranges never wait for each other.  The locks live outside the
images and are never part of a backup.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

SHARED, EXCLUSIVE = False, True


@dataclass(slots=True)
class _Waiter:
    first: int
    last: int
    exclusive: bool
    future: asyncio.Future[None]
    barrier: bool = False  # waits for every holder to leave; is granted nothing


class RangeLockManager:
    def __init__(self) -> None:
        # chunk -> (exclusive?, holder count); an exclusive chunk has count 1.
        self._held: dict[int, list[int]] = {}
        self._waiters: deque[_Waiter] = deque()

    def _conflicts_held(self, first: int, last: int, exclusive: bool) -> bool:
        held = self._held
        if not held:
            return False
        if last - first + 1 > len(held):
            return any(
                first <= c <= last and (exclusive or state[0]) for c, state in held.items()
            )
        for c in range(first, last + 1):
            state = held.get(c)
            if state is not None and (exclusive or state[0]):
                return True
        return False

    def _grant(self, first: int, last: int, exclusive: bool) -> None:
        held = self._held
        for c in range(first, last + 1):
            state = held.get(c)
            if state is None:
                held[c] = [1 if exclusive else 0, 1]
            else:
                state[1] += 1

    def try_acquire(self, first: int, last: int, exclusive: bool) -> asyncio.Future[None] | None:
        """Take chunks first..last now (returns None) or queue and return a future to await."""
        if not self._waiters and not self._conflicts_held(first, last, exclusive):
            self._grant(first, last, exclusive)
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(first, last, exclusive, fut))
        # A queue with no conflicting holder may still admit it (behind disjoint waiters).
        self._wake()
        return fut

    def release(self, first: int, last: int) -> None:
        held = self._held
        for c in range(first, last + 1):
            state = held[c]
            state[1] -= 1
            if state[1] == 0:
                del held[c]
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Grant, in FIFO order, every waiter that conflicts neither with holders nor with an
        earlier waiter still queued over the same chunks."""
        blocked: list[_Waiter] = []
        remaining: deque[_Waiter] = deque()
        for w in self._waiters:
            if w.future.cancelled():
                continue
            behind = any(
                w.first <= b.last and b.first <= w.last and (w.exclusive or b.exclusive)
                for b in blocked
            )
            if w.barrier:
                if not behind and not self._held:
                    w.future.set_result(None)
                else:
                    blocked.append(w)
                    remaining.append(w)
                continue
            if not behind and not self._conflicts_held(w.first, w.last, w.exclusive):
                self._grant(w.first, w.last, w.exclusive)
                w.future.set_result(None)
            else:
                blocked.append(w)
                remaining.append(w)
        self._waiters = remaining

    async def acquire(self, first: int, last: int, exclusive: bool) -> None:
        fut = self.try_acquire(first, last, exclusive)
        if fut is None:
            return
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(first, last)  # granted just as we were cancelled
            else:
                self._wake()
            raise

    async def barrier(self) -> None:
        """Wait until every request that holds or awaits a lock now has finished.

        Requests that arrive meanwhile queue behind the barrier (FIFO) and proceed once it
        passes; nothing is held afterwards, so it costs no per-chunk state on any volume size.
        """
        if not self._waiters and not self._held:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(0, 1 << 62, True, fut, barrier=True))
        await fut
        self._wake()  # let the requests queued behind it go

    @asynccontextmanager
    async def locked(self, first: int, last: int, exclusive: bool) -> AsyncIterator[None]:
        await self.acquire(first, last, exclusive)
        try:
            yield
        finally:
            self.release(first, last)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def held_chunks(self) -> int:
        return len(self._held)
