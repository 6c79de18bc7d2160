"""Group commit: many callers that each need "a sync that started after my write" share one.

A caller awaits ``GroupSync()``.  If no sync is running, the caller runs one itself, inline.  If
one is running, the caller waits for the *next* one, which starts when the running one ends and
serves everyone who arrived meanwhile.  Syncs are never reordered and never skipped, only shared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class GroupSync:
    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        self._sync = sync
        self._running = False
        self._next: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None  # drives syncs for waiting followers
        self.count = 0  # syncs actually performed

    async def __call__(self) -> None:
        if not self._running:
            self._running = True
            try:
                self.count += 1
                await self._sync()
            finally:
                self._hand_off()
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # Its followers may all be gone (cancelled, or the process stopping) when it fails:
            # the failure then reaches no one, and asyncio would log it as never retrieved.
            self._next.add_done_callback(_retrieve)
        await asyncio.shield(self._next)

    def _hand_off(self) -> None:
        following, self._next = self._next, None
        if following is None:
            self._running = False
            self._task = None
        else:
            self._task = asyncio.get_running_loop().create_task(self._drive(following))

    async def _drive(self, fut: asyncio.Future[None]) -> None:
        try:
            self.count += 1
            await self._sync()
        except Exception as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)
        finally:
            self._hand_off()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
