"""In-memory storage that can lose power: the crash half of the durability tests.

Every write and discard is visible at once, as with a page cache, but only a completed ``sync``
of its object makes it durable.  ``power_loss()`` returns what a disk would hold after the power
failed at this instant: the durable state plus, in the "writeback" mode, an arbitrary subset of the
unsynced pages (the kernel may have written back any of them, in any order).  Faults such as a full
disk are injected with ``fail_writes``.

``crash_at`` is a countdown for crash-point tests: the storage call with that number (counting
every read, write, sync, allocate, discard, extents and delete from 1 in ``calls``) loses power
instead of running, and so does every call after it (``PowerLost``); the state at that instant
is what ``power_loss()`` then returns.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from owm.common.errors import NoSpace
from owm.storage import Buffer

PAGE = 4096


class PowerLost(Exception):
    """The simulated power failed: the storage takes no more calls."""


@dataclass
class _Object:
    durable: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    dirty_pages: set[int] = field(default_factory=set)  # pages of `current` not yet synced


def _fit(buf: bytearray, size: int) -> None:
    if len(buf) < size:
        buf.extend(bytes(size - len(buf)))


class SimulatedStorage:
    """Named objects in memory with a durable and a current copy of each."""

    def __init__(self, *, yield_every_op: bool = True) -> None:
        self._objects: dict[str, _Object] = {}
        self._durable_names: set[str] = set()
        self.fail_writes: Callable[[str, int, int], bool] | None = None
        self.syncs = 0
        self._yield = yield_every_op  # let other tasks interleave, as real I/O would
        self.calls = 0
        self.crash_at: int | None = None
        self.crashed = False

    def _call(self) -> None:
        """Count one storage call; lose power instead when the countdown says so."""
        if not self.crashed:
            self.calls += 1
            if self.crash_at is None or self.calls < self.crash_at:
                return
            self.crashed = True
        raise PowerLost(f"the power failed at storage call {self.crash_at}")

    async def _pause(self) -> None:
        if self._yield:
            await asyncio.sleep(0)

    def _obj(self, name: str) -> _Object:
        obj = self._objects.get(name)
        if obj is None:
            obj = self._objects[name] = _Object()
        return obj

    async def read(self, name: str, offset: int, length: int) -> bytes:
        self._call()
        await self._pause()
        obj = self._objects.get(name)
        if obj is None:
            return bytes(length)
        chunk = obj.current[offset : offset + length]
        return bytes(chunk) + bytes(length - len(chunk))

    def _mark(self, obj: _Object, offset: int, length: int) -> None:
        obj.dirty_pages.update(range(offset // PAGE, (offset + length + PAGE - 1) // PAGE))

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        self._call()
        if self.fail_writes is not None and self.fail_writes(name, offset, len(data)):
            raise NoSpace(f"the pool's disk is full while writing {name}")
        await self._pause()
        obj = self._obj(name)
        _fit(obj.current, offset + len(data))
        obj.current[offset : offset + len(data)] = data
        self._mark(obj, offset, len(data))

    async def sync(self, name: str) -> None:
        self._call()
        await self._pause()
        obj = self._objects.get(name)
        self.syncs += 1
        if obj is None:
            return
        obj.durable = bytearray(obj.current)
        obj.dirty_pages.clear()
        self._durable_names.add(name)

    async def allocate(self, name: str, size: int) -> None:
        self._call()
        obj = self._obj(name)
        _fit(obj.current, size)
        _fit(obj.durable, size)
        self._durable_names.add(name)

    async def discard(self, name: str, offset: int, length: int) -> None:
        self._call()
        await self._pause()
        obj = self._objects.get(name)
        if obj is None:
            return
        end = min(offset + length, len(obj.current))
        if end > offset:
            obj.current[offset:end] = bytes(end - offset)
            self._mark(obj, offset, end - offset)

    async def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        # Allocation is not tracked at page level here: report data where any byte is non-zero.
        data = await self.read(name, offset, length)
        runs: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < length:
            step = min(PAGE - (offset + pos) % PAGE, length - pos)
            is_data = any(data[pos : pos + step])
            if runs and runs[-1][2] == is_data:
                start, run_len, _ = runs[-1]
                runs[-1] = (start, run_len + step, is_data)
            else:
                runs.append((offset + pos, step, is_data))
            pos += step
        return runs

    async def delete(self, name: str) -> None:
        self._call()
        # Deleting is a metadata operation: durable at once, like an unlink followed by fsync.
        self._objects.pop(name, None)
        self._durable_names.discard(name)

    def exists(self, name: str) -> bool:
        return name in self._objects

    def names(self) -> list[str]:
        return sorted(self._objects)

    def bytes_used(self, name: str) -> int:
        obj = self._objects.get(name)
        return 0 if obj is None else sum(1 for i in range(0, len(obj.current), PAGE)
                                         if any(obj.current[i : i + PAGE]))

    async def close(self) -> None:
        pass

    def power_loss(self, rng: random.Random | None = None) -> SimulatedStorage:
        """The storage as found after power returns.

        With no ``rng`` every unsynced write is lost.  With one, each unsynced page independently
        did or did not reach the disk before the failure.
        """
        after = SimulatedStorage(yield_every_op=self._yield)
        for name, obj in self._objects.items():
            survived = bytearray(obj.durable)
            if rng is not None:
                for page in sorted(obj.dirty_pages):
                    if rng.random() < 0.5:
                        start = page * PAGE
                        piece = obj.current[start : start + PAGE]
                        _fit(survived, start + len(piece))
                        survived[start : start + len(piece)] = piece
            if name in self._durable_names or any(survived):
                after._objects[name] = _Object(durable=bytearray(survived),
                                               current=bytearray(survived))
                after._durable_names.add(name)
        return after
