"""Write logging ([0073]-[0091]): the oldest image holds the common data in place.

Storage is a stack of layers: ``base.data`` at the bottom, then one delta per newer generation
(``delta-g.data`` with its chunk table).  Each view owns a contiguous run of layers: the oldest
view owns the base, every other view its delta; a released view hands its layers to the next
newer view.  View v reads chunk c from the topmost layer at or below its own top that holds c
(the base holds everything).

A write by generation k goes into the topmost of k's own layers that holds the chunk (the base
counts), else creates an entry in k's lowest delta (reading the chunk from below first when the
write is partial; the data is durable before the entry is journaled).  The write does not wait
for that (ordered write-back): the new entry is *pending* in its layer, where reads already find
it, and a group commit a few milliseconds later (or at FLUSH, FUA, a full backlog or a release)
syncs the deltas of a whole batch and only then puts the entries in their tables.  A crash
before that loses the entries, so the view reads what lies below: the unflushed write is lost,
as it may be.  Newer layers that hold a
copy of the chunk get the write too.  No write ever touches a layer owned by an older view.

Release folds: when a view owns two layers the upper one is merged into the lower, a batch of
chunks at a time under the engine lock, while I/O goes on.  Per batch the data is made durable
in the lower layer, then its entries, then the upper layer's clears, and only then are the locks
let go: a write that follows lands in the lower layer, and no crash can leave an upper entry
hiding it.  New entries never go into the upper layer (see above), and the fold lists the upper
table again until it is empty; then the upper layer is deleted, its table emptied durably first.
"""

from __future__ import annotations

import asyncio
import re
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer

BASE = "base.data"
Writer = Callable[[str, int, int, int], Awaitable[None]]
_DELTA = re.compile(r"^delta-(\d+)\.")
# A merge step moves up to this many chunks (and bytes) with one data sync and one commit per
# table, holding their engine locks meanwhile.
MERGE_BATCH, MERGE_BATCH_BYTES = 64, 4 << 20


@dataclass
class Layer:
    gen: int  # the generation that created it (-1 for the base)
    table: ChunkTable | None  # None for the base, which holds every chunk
    # Chunks written into this delta whose entry waits for the next commit (data not durable).
    pending: set[int] = field(default_factory=set)
    data: str = field(init=False)  # its data object (named once: every write asks for it)

    def __post_init__(self) -> None:
        self.data = BASE if self.table is None else f"delta-{self.gen}.data"

    def has(self, chunk: int) -> bool:
        return self.table is None or self.table.has(chunk) or chunk in self.pending

    @property
    def used(self) -> bool:
        """Does this delta hold anything (entries, or pending ones)?"""
        return self.table is not None and bool(self.table.count or self.pending)


ENTRY_BYTES = 64  # what a pending entry counts against the write-back cap


class LogEngine(Engine):
    method = "log"
    generic_flush = True
    writeback = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.layers: list[Layer] = [Layer(-1, None)]
        self._fold_lock = asyncio.Lock()
        # view -> the indices of the layers it owns; forgotten whenever views or layers change
        # (``_reshaped``), so that a write does not recompute it per chunk.
        self._ranges: dict[int, tuple[int, int]] = {}
        # (gen, first, last) of the write ``_may_defer`` just found new to every layer.
        self._fresh_run: tuple[int, int, int] | None = None
        self.merge_batch = max(1, min(MERGE_BATCH, MERGE_BATCH_BYTES >> self.shift))

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
        self._reshaped()
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
        views = self.views
        if layer.table is None:
            return views[0]
        return views[bisect_left(views, layer.gen)]  # views ascend

    def _own_range(self, view: int) -> tuple[int, int]:
        """Indices (lo, hi) of the layers owned by ``view``."""
        got = self._ranges.get(view)
        if got is None:
            # Every view's range in one pass over the layers (their owners ascend with them):
            # with a thousand images, one per view would cost a pass each.
            ranges = self._ranges
            ranges.clear()
            for i, layer in enumerate(self.layers):
                owner = self._owner(layer)
                had = ranges.get(owner)
                ranges[owner] = (i, i) if had is None else (had[0], i)
            got = ranges[view]
        return got

    def _reshaped(self) -> None:
        """The views or the layers changed: who owns which layers is to be worked out again."""
        self._ranges.clear()

    def chunk_tables(self) -> list[ChunkTable]:
        return [layer.table for layer in self.layers if layer.table is not None]

    def damaged_by_tables(self) -> dict[int, str]:
        """A damaged delta misleads its owner and every newer view (the live one included)."""
        out: dict[int, str] = {}
        for layer in self.layers:
            if layer.table is not None and layer.table.damaged:
                owner = self._owner(layer)
                for v in self.views:
                    if v >= owner:
                        out.setdefault(v, layer.table.damaged)
        return out

    def objects_of(self, view: int) -> list[str]:
        lo, hi = self._own_range(view)
        return [n for layer in self.layers[lo : hi + 1] for n in self._layer_objects(layer)]

    async def preserve(self) -> int:
        preserved = self.views[-1]
        self.views.append(preserved + 1)
        self.layers.append(self._delta(preserved + 1))
        self._reshaped()
        return preserved

    # -- resolution -------------------------------------------------------------------------
    def _resolve(self, top: int, chunk: int, layers: list[Layer] | None = None) -> Layer:
        """The newest layer at or below ``top`` that holds ``chunk`` (in ``layers``, a copy of
        the stack, when the caller must not see a fold drop a layer meanwhile)."""
        stack = self.layers if layers is None else layers
        for i in range(top, -1, -1):
            if stack[i].has(chunk):
                return stack[i]
        raise AssertionError("the base holds every chunk")

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        _, top = self._own_range(view)
        # The caller reads between the runs yielded here, and a fold may drop a layer meanwhile
        # (an empty one, once every chunk of it is in the layer below): resolve in a copy of the
        # stack, not by index into the live list.
        stack = self.layers[: top + 1]
        if not any(layer.used for layer in stack[1:]):
            yield BASE, offset, length
            return
        run: tuple[str, int, int] | None = None
        for chunk, _within, n, done in self.pieces(offset, length):
            name = self._resolve(top, chunk, stack).data
            if run is not None and run[0] == name:
                run = (name, run[1], run[2] + n)
            else:
                if run is not None:
                    yield run
                run = (name, offset + done, n)
        if run is not None:
            yield run

    # -- writes -----------------------------------------------------------------------------
    async def _target(self, stack: list[Layer], lo: int, hi: int, chunk: int, n: int) -> Layer:
        """The layer a write to chunk by the view owning layers lo..hi of ``stack`` (the write's
        copy of the layer list) lands in, creating a delta entry if needed."""
        for i in range(hi, lo - 1, -1):
            if stack[i].has(chunk):
                return stack[i]
        # The entry goes into gen's lowest layer (a delta: the base holds every chunk).  While
        # a view owns several layers a release is folding them into that lowest one, and an
        # entry made in an upper layer after the fold listed its chunks would be deleted with it.
        layer = stack[lo]
        assert layer.table is not None
        start = chunk << self.shift
        size = min(self.chunk_size, self.size - start)
        if n < size:  # partial write: the delta starts as a copy of the chunk seen from below
            below = self._resolve(lo - 1, chunk, stack)
            content = await self.storage.read(below.data, start, size)
            await self.put(layer.data, start, content)
            self.cow_copies += 1
            self.cow_copy_bytes += size
        return layer

    async def _copy_in(self, layer: Layer, below: Layer, chunk: int, offset: int, length: int,
                       data: memoryview | None) -> bool:
        """Before a write covering part of ``chunk``, new to ``layer``'s delta: make the delta
        chunk a copy of the chunk seen from below (in ``below``).  With the write's ``data``
        the copy carries the write's piece already (one storage write instead of two) and True
        says that piece is done; a write covering the whole chunk needs no copy (False)."""
        start = chunk << self.shift
        size = min(self.chunk_size, self.size - start)
        lo_b, hi_b = max(offset, start), min(offset + length, start + size)
        if hi_b - lo_b == size:
            return False
        content = await self.storage.read(below.data, start, size)
        self.cow_copies += 1
        self.cow_copy_bytes += size
        name = layer.data
        if data is None:
            await self.put(name, start, content)
            return False
        patched = bytearray(content)
        patched[lo_b - start : hi_b - start] = data[lo_b - offset : hi_b - offset]
        await self.storage.write(name, start, patched)
        return True

    async def _apply(self, gen: int, offset: int, length: int, writer: Writer,
                     data: memoryview | None = None) -> set[str]:
        """Route every chunk piece of a request; ``writer(name, pos, done, n)`` does the I/O
        (``data``: the bytes of a write, which a chunk's copy may carry)."""
        hint, self._fresh_run = self._fresh_run, None
        lo, hi = self._ranges.get(gen) or self._own_range(gen)
        layers = self.layers
        if lo == 0 and not any(layer.used for layer in layers):
            await writer(BASE, offset, 0, length)  # no delta holds anything: all in the base
            return {BASE}
        if lo != hi:
            return await self._apply_folding(lo, hi, offset, length, writer)
        # The common case: gen owns one layer, so every piece lands in it, as one request.
        # Whatever it needs by index into the layer list is taken before its first await: a
        # fold may drop a layer meanwhile and shift the layers above it down one.  (What the
        # layers hold of this write's chunks stays put: it holds their locks.)
        layer = layers[lo]
        name = layer.data
        newer = layers[hi + 1 :] if hi + 1 < len(layers) else None
        start, end = offset, offset + length
        fresh: list[int] = []
        table = layer.table
        shift = self.shift
        first, last = offset >> shift, (end - 1) >> shift
        if table is not None:
            pending = layer.pending
            if hint is not None and hint == (gen, first, last):
                fresh = list(range(first, last + 1))
            elif first == last:
                if not (first in pending or table.has(first)):
                    fresh.append(first)
            else:
                fresh = [c for c in table.unset(first, last) if c not in pending]
            if fresh:
                # Only the first and the last piece can be partial (need a copy from below).
                size = self.size
                head, tail = first << shift, last << shift
                below_tail = self._resolve(lo - 1, last) if (
                    last != first and end < min(tail + self.chunk_size, size)
                    and fresh[-1] == last) else None
                if ((offset != head or end < min(head + self.chunk_size, size))
                        and fresh[0] == first
                        and await self._copy_in(layer, self._resolve(lo - 1, first), first,
                                                offset, length, data)):
                    start = min(end, head + self.chunk_size)
                if below_tail is not None and await self._copy_in(
                        layer, below_tail, last, offset, length, data):
                    end = tail
        if start < end:
            if data is None:
                await writer(name, start, start - offset, end - start)
            else:  # straight to the storage: no writer call for the common case
                await self.storage.write(name, start, data if end - start == length
                                         else data[start - offset : end - offset])
        touched = {name}
        if newer is not None:  # an old generation's write: newer copies of a chunk get it
            for chunk, _within, n, done in self.pieces(offset, length):
                for up in newer:
                    if up.has(chunk):
                        await writer(up.data, offset + done, done, n)
                        touched.add(up.data)
        if fresh:
            self._note_pending(layer, fresh)
        return touched

    async def _apply_folding(self, lo: int, hi: int, offset: int, length: int,
                             writer: Writer) -> set[str]:
        """``_apply`` for a view owning several layers (a release is folding them)."""
        stack = self.layers[:]  # by index across awaits: a copy (see ``_apply``)
        newer = stack[hi + 1 :]
        fresh: dict[str, tuple[Layer, list[int]]] = {}  # by data object: a Layer is unhashable
        touched: set[str] = set()
        # Consecutive pieces bound for the same layer go out as one request.
        run: list[Any] | None = None  # [name, pos, done, n]
        for chunk, _within, n, done in self.pieces(offset, length):
            layer = await self._target(stack, lo, hi, chunk, n)
            if not layer.has(chunk):
                fresh.setdefault(layer.data, (layer, []))[1].append(chunk)
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
        for layer, chunks in fresh.values():
            self._note_pending(layer, chunks)
        return touched

    def _note_pending(self, layer: Layer, chunks: list[int]) -> None:
        """Entries for new delta chunks, written and not yet durable: they must be durable
        before any entry points at them, so the entries wait for the next commit, which syncs
        the deltas first."""
        pending = layer.pending
        before = len(pending)
        pending.update(chunks)
        self.held_bytes += ENTRY_BYTES * (len(pending) - before)
        self.schedule_writeback()

    def writeback_pending(self) -> bool:
        return any(layer.pending for layer in self.layers)

    def abandon(self) -> None:
        super().abandon()
        for layer in self.layers:
            layer.pending.clear()

    def _may_defer(self, gen: int, first: int, last: int) -> bool:
        # Only writes that each make a new entry: their data is found through that entry only,
        # and the commit that puts it in its table makes the changed bits durable first.  A
        # write into a chunk some layer already holds (pending included) lands where a view
        # may read it after a crash, and waits for its bits.
        lo = (self._ranges.get(gen) or self._own_range(gen))[0]
        for layer in self.layers[lo:]:
            table = layer.table
            if table is None:
                return False  # the base holds every chunk
            pending, has = layer.pending, table.has
            if first == last:
                if first in pending or has(first):
                    return False
            else:
                for chunk in range(first, last + 1):
                    if chunk in pending or has(chunk):
                        return False
        # No layer holds any of them: the ``_apply`` that follows (at once, under the same
        # locks) need not look them up again.
        self._fresh_run = (gen, first, last)
        return True

    async def _commit_batch(self) -> None:
        """Sync the deltas holding pending entries and commit the changed bits of their writes,
        then put those entries in their tables (which the next flush, or a FUA write to them,
        commits)."""
        batch = [(layer, set(layer.pending)) for layer in self.layers if layer.pending]
        changed = self._changed_batch()  # taken with the batch: its writes' bits are in it
        results = await asyncio.gather(
            self._commit_changed(changed),
            Engine.sync_objects(self, [layer.data for layer, _ in batch]),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for layer, chunks in batch:
            assert layer.table is not None
            for chunk in chunks:
                layer.table.set(chunk)
            layer.pending -= chunks
            self.held_bytes -= ENTRY_BYTES * len(chunks)

    async def _write(self, gen: int, offset: int, data: Buffer, ahead: bool = False) -> set[str]:
        view = memoryview(data)

        async def put(name: str, pos: int, done: int, n: int) -> None:
            await self.storage.write(name, pos, view if n == len(view) else view[done : done + n])

        return await self._apply(gen, offset, len(data), put, view)

    async def _zero(self, gen: int, offset: int, length: int, punch: bool,
                    ahead: bool = False) -> set[str]:
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
            self._reshaped()
        await self.locks.barrier()  # writes routed by the old ownership finish first
        await self.commit_writeback()  # a fold lists table entries, not pending ones
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

    def _batches(self, todo: list[int]) -> Iterator[tuple[int, int]]:
        """Chunk ranges of at most ``merge_batch`` chunks covering ``todo`` (sorted)."""
        k = 0
        while k < len(todo):
            first = todo[k]
            while k < len(todo) and todo[k] - first < self.merge_batch:
                k += 1
            yield first, todo[k - 1]

    async def _fold(self, i: int, progress: Progress | None) -> None:
        lower, upper = self.layers[i], self.layers[i + 1]
        assert upper.table is not None
        done, total = 0, 0
        while True:
            todo = list(upper.table)
            total += len(todo)
            await self._step("fold-listed", -1)
            for first, last in self._batches(todo):
                async with self.locks.locked(first, last, EXCLUSIVE):
                    done += await self._merge(lower, upper, first, last)
                if progress is not None:
                    progress(min(done, total), total + 1)
                await self._step("fold-chunk", first)
            await self._step("fold-merged", -1)
            # A write that chose upper before the ownership changed has finished once this
            # passes; if one added an entry after the listing, merge again.
            await self.locks.barrier()
            await self.commit_writeback()
            if not upper.used:
                break
        await self._step("fold-drop", -1)
        # Every chunk of upper now lives in lower; reads through upper find nothing.
        self.layers.remove(upper)
        self._reshaped()
        await self._drop(upper)

    async def _merge(self, lower: Layer, upper: Layer, first: int, last: int) -> int:
        """Move upper's chunks in first..last into lower (the caller holds their locks)."""
        assert upper.table is not None
        chunks = [c for c in range(first, last + 1) if upper.table.has(c)]
        if not chunks:
            return 0
        k = 0
        while k < len(chunks):  # consecutive chunks are copied with one read and one write
            run = k
            while k + 1 < len(chunks) and chunks[k + 1] == chunks[k] + 1:
                k += 1
            start = chunks[run] << self.shift
            end = min((chunks[k] + 1) << self.shift, self.size)
            content = await self.storage.read(upper.data, start, end - start)
            await self.put(lower.data, start, content)
            k += 1
        await self.group_sync(lower.data)()
        if lower.table is not None:
            for chunk in chunks:
                lower.table.set(chunk)
            await lower.table.commit()
        # The clears are durable before the locks go: the next write to these chunks lands in
        # lower and syncs only lower, and an entry left in upper by a crash would hide it (and
        # the resumed merge would copy the old data over it).
        for chunk in chunks:
            upper.table.clear(chunk)
        await upper.table.commit()
        return len(chunks)

    async def _drop(self, layer: Layer) -> None:
        """Delete a merged, empty layer so that no crash part-way can bring its entries back."""
        table = layer.table
        assert table is not None and not table.count
        # Deleting the table's objects one by one could leave an older checkpoint slot as the
        # newest survivor, with the entries it had.  Write the empty table to both slots first
        # (a set and clear of one chunk forces each checkpoint).
        for _ in range(2):
            table.set(0)
            table.clear(0)
            await table.checkpoint()
        for name in self._layer_objects(layer):
            await self.storage.delete(name)
