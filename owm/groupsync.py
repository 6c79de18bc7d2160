"""Group commit: many callers that each need "a sync that started after my write" share one.

A caller awaits ``GroupSync()``; if no sync is running one starts now; if one is running, the
caller waits for the *next* one, which starts when the running one ends and serves everyone who
arrived meanwhile.  Syncs are never reordered and never skipped, only shared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class GroupSync:
    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        self._sync = sync
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[None] | None = None
        self.count = 0  # syncs actually performed

    async def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None:
            fut: asyncio.Future[None] = loop.create_future()
            self._task = loop.create_task(self._drive(fut))
        else:
            if self._next is None:
                self._next = loop.create_future()
            fut = self._next
        await asyncio.shield(fut)

    async def _drive(self, fut: asyncio.Future[None]) -> None:
        current: asyncio.Future[None] | None = fut
        while current is not None:
            try:
                self.count += 1
                await self._sync()
            except Exception as exc:
                current.set_exception(exc)
            else:
                current.set_result(None)
            current, self._next = self._next, None
        self._task = None
