"""Write logging ([0073]-[0091]): the oldest image holds the common data in place.

Storage is a stack of layers: ``base.data`` at the bottom, then one delta per newer generation
(``delta-g.data`` with its chunk table).  Each view owns a contiguous run of layers: the oldest
view owns the base, every other view its delta; a released view hands its layers to the next
newer view.  View v reads chunk c from the topmost layer at or below its own top that holds c
(the base holds everything).

A write by generation k goes into the topmost of k's own layers that holds the chunk (the base
counts), else creates an entry in k's top delta (reading the chunk from below first when the
write is partial; the data is durable before the entry is journaled).  Newer layers that hold a
copy of the chunk get the write too.  No write ever touches a layer owned by an older view.

Release folds: when a view owns two layers the upper one is merged into the lower, chunk by
chunk under the engine lock, while I/O goes on; then the upper one is deleted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer

BASE = "base.data"
Writer = Callable[[str, int, int, int], Awaitable[None]]
_DELTA = re.compile(r"^delta-(\d+)\.")


@dataclass
class Layer:
    gen: int  # the generation that created it (-1 for the base)
    table: ChunkTable | None  # None for the base, which holds every chunk

    @property
    def data(self) -> str:
        return BASE if self.table is None else f"delta-{self.gen}.data"

    def has(self, chunk: int) -> bool:
        return self.table is None or self.table.has(chunk)


class LogEngine(Engine):
    method = "log"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.layers: list[Layer] = [Layer(-1, None)]
        self._fold_lock = asyncio.Lock()

    def _delta(self, gen: int) -> Layer:
        return Layer(gen, ChunkTable(self.storage, f"delta-{gen}.table", self.chunks))

    async def open(self, views: list[int], releasing: list[int], clean: bool) -> None:
        self.views = list(views)
        gens = {int(m.group(1)) for n in self.storage.names() if (m := _DELTA.match(n))}
        gens |= set(views[1:])
        gens = {g for g in gens if g <= views[-1]}
        self.layers = [Layer(-1, None)]
        for gen in sorted(gens):
            layer = self._delta(gen)
            assert layer.table is not None
            await layer.table.load()
            self.layers.append(layer)
        keep = {BASE} | {n for layer in self.layers[1:] for n in self._layer_objects(layer)}
        for name in self.storage.names():
            if name not in keep and not name.startswith("changed-"):
                await self.storage.delete(name)

    def _layer_objects(self, layer: Layer) -> list[str]:
        if layer.table is None:
            return [BASE]
        t = layer.table.name
        # Tables before data: a crash mid-delete must never leave entries without their data.
        return [t + ".journal", t + ".ckpt0", t + ".ckpt1", layer.data]

    def _owner(self, layer: Layer) -> int:
        """The view owning a layer: the oldest view for the base, else the first view >= gen."""
        if layer.table is None:
            return self.views[0]
        return next(v for v in self.views if v >= layer.gen)

    def _own_range(self, view: int) -> tuple[int, int]:
        """Indices (lo, hi) of the layers owned by ``view``."""
        owned = [i for i, layer in enumerate(self.layers) if self._owner(layer) == view]
        return owned[0], owned[-1]

    def objects_of(self, view: int) -> list[str]:
        return [n for layer in self.layers if self._owner(layer) == view
                for n in self._layer_objects(layer)]

    async def preserve(self) -> int:
        preserved = self.views[-1]
        self.views.append(preserved + 1)
        self.layers.append(self._delta(preserved + 1))
        return preserved

    # -- resolution -------------------------------------------------------------------------
    def _resolve(self, top: int, chunk: int) -> Layer:
        for i in range(top, -1, -1):
            if self.layers[i].has(chunk):
                return self.layers[i]
        raise AssertionError("the base holds every chunk")

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        _, top = self._own_range(view)
        if not any(layer.table.count for layer in self.layers[1 : top + 1] if layer.table):
            yield BASE, offset, length
            return
        run: tuple[str, int, int] | None = None
        for chunk, _within, n, done in self.pieces(offset, length):
            name = self._resolve(top, chunk).data
            if run is not None and run[0] == name:
                run = (name, run[1], run[2] + n)
            else:
                if run is not None:
                    yield run
                run = (name, offset + done, n)
        if run is not None:
            yield run

    # -- writes -----------------------------------------------------------------------------
    async def _target(self, gen: int, chunk: int, within: int, n: int) -> Layer:
        """The layer a write by gen to chunk lands in, creating a delta entry if needed."""
        lo, hi = self._own_range(gen)
        for i in range(hi, lo - 1, -1):
            if self.layers[i].has(chunk):
                return self.layers[i]
        layer = self.layers[hi]
        assert layer.table is not None
        start = chunk << self.shift
        size = min(self.chunk_size, self.size - start)
        if n < size:  # partial write: the delta starts as a copy of the chunk seen from below
            below = self._resolve(hi - 1, chunk)
            content = await self.storage.read(below.data, start, size)
            await self.put(layer.data, start, content)
        return layer

    async def _apply(self, gen: int, offset: int, length: int, writer: Writer) -> set[str]:
        """Route every chunk piece of a request; ``writer(name, pos, done, n)`` does the I/O."""
        lo, hi = self._own_range(gen)
        if lo == 0 and not any(layer.table.count for layer in self.layers if layer.table):
            await writer(BASE, offset, 0, length)  # no delta holds anything: all in the base
            return {BASE}
        newer = self.layers[hi + 1 :]
        fresh: list[tuple[Layer, int]] = []
        touched: set[str] = set()
        # Consecutive pieces bound for the same layer go out as one request.
        run: list[Any] | None = None  # [name, pos, done, n]
        for chunk, within, n, done in self.pieces(offset, length):
            layer = await self._target(gen, chunk, within, n)
            if not layer.has(chunk):
                fresh.append((layer, chunk))
            pos = offset + done
            if run is not None and run[0] == layer.data:
                run[3] += n
            else:
                if run is not None:
                    await writer(*run)
                run = [layer.data, pos, done, n]
            touched.add(layer.data)
            for up in newer:
                if up.has(chunk):
                    await writer(up.data, pos, done, n)
                    touched.add(up.data)
        if run is not None:
            await writer(*run)
        if fresh:
            # The new delta chunks must be durable before any entry points at them.
            await self.sync_objects({layer.data for layer, _ in fresh})
            for layer, chunk in fresh:
                assert layer.table is not None
                layer.table.set(chunk)
        return touched

    async def _write(self, gen: int, offset: int, data: Buffer) -> set[str]:
        view = memoryview(data)

        async def put(name: str, pos: int, done: int, n: int) -> None:
            await self.storage.write(name, pos, view[done : done + n])

        return await self._apply(gen, offset, len(data), put)

    async def _zero(self, gen: int, offset: int, length: int, punch: bool) -> set[str]:
        async def put(name: str, pos: int, done: int, n: int) -> None:
            await self.put_zero(name, pos, n, punch)

        return await self._apply(gen, offset, length, put)

    async def sync_objects(self, names: set[str] | list[str]) -> None:
        await super().sync_objects(names)
        # A FUA write may have created entries: they must be durable too.
        await asyncio.gather(*(layer.table.commit() for layer in self.layers
                               if layer.table is not None and layer.data in names))

    async def _flush(self) -> None:
        await Engine.sync_objects(self, [layer.data for layer in self.layers
                                         if self.storage.exists(layer.data)])
        await asyncio.gather(*(layer.table.commit() for layer in self.layers if layer.table))

    async def close(self) -> None:
        await super().close()
        for layer in self.layers:
            if layer.table is not None:
                await layer.table.checkpoint()

    # -- release: fold layers ---------------------------------------------------------------
    async def release(self, view: int, progress: Progress | None = None) -> None:
        if view in self.views:
            self.views.remove(view)
        await self.locks.barrier()  # writes routed by the old ownership finish first
        async with self._fold_lock:
            await self._fold_all(progress)
        if progress is not None:
            progress(1, 1)

    async def _fold_all(self, progress: Progress | None) -> None:
        """Merge layers until every view owns exactly one."""
        while True:
            pair = next(
                (i for i in range(len(self.layers) - 1)
                 if self._owner(self.layers[i]) == self._owner(self.layers[i + 1])),
                None,
            )
            if pair is None:
                return
            await self._fold(pair, progress)

    async def _fold(self, i: int, progress: Progress | None) -> None:
        lower, upper = self.layers[i], self.layers[i + 1]
        assert upper.table is not None
        todo = list(upper.table)
        for k, chunk in enumerate(todo):
            async with self.locks.locked(chunk, chunk, EXCLUSIVE):
                if not upper.table.has(chunk):
                    continue
                start = chunk << self.shift
                n = min(self.chunk_size, self.size - start)
                content = await self.storage.read(upper.data, start, n)
                await self.put(lower.data, start, content)
                await self.group_sync(lower.data)()
                if lower.table is not None:
                    await lower.table.set_durable(chunk)
                upper.table.clear(chunk)
            if progress is not None:
                progress(k + 1, len(todo) + 1)
        # Every chunk of upper now lives in lower; reads through upper find nothing.
        self.layers.remove(upper)
        for name in self._layer_objects(upper):
            await self.storage.delete(name)
