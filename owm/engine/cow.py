"""Copy-on-write ([0092]-[0108]): the live image holds the common data in place.

Each preserved image k has a chunk table and a sparse data object ``img-k.data`` holding its own
copies at their natural offsets.  View v reads chunk c from the first image j >= v (oldest first)
whose table has c, else from ``live.data``.  Before a write by generation k touches chunk c, the
newest image older than k must own c: if it does not, the chunk's current content is copied into
it, the copy is made durable, then its table entry, and only then is the shared chunk touched
(dm-snapshot's order, with group commit).

That order is kept without making the writer wait for it (ordered write-back): the copy goes to
the page cache and its entry is *pending* (reads of the image already resolve to the copy), the
overwrite of ``live.data`` is *held* in memory (reads of live.data see it), and the write is
acknowledged.  A group commit a few milliseconds later, or at FLUSH, FUA, a full backlog or a
release, syncs the copies of a whole batch, commits their entries, and only then lets the held
overwrites reach ``live.data``.  A crash before that leaves live.data and the tables as they
were: the held writes were never flushed, so losing them is allowed.  Later writes to a chunk
that still has held overwrites are held behind them, so they reach live.data in order.

Images at or after k that own a copy of c get the write too, so a partial write keeps both
copies right.  Releasing an image drops its table and data; if an older image still resolves
through it, those chunks move down first, into the nearest older table (one release at a time,
so that no move-down fills a table another one is emptying).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

from owm.common.errors import ImageBroken, NoSpace
from owm.common.view import Extent
from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE, SHARED
from owm.storage import Buffer

LIVE = "live.data"
ZERO_OP_BYTES = 64  # what a held zeroing counts against the backlog's cap

# A held overwrite of live.data: offset, bytes (None: zeroes), length, punch (zeroes only).
HeldOp = tuple[int, memoryview | None, int, bool]


def _data(view: int) -> str:
    return f"img-{view}.data"


class CowEngine(Engine):
    method = "cow"
    generic_flush = True
    writeback = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Tables of preserved images, oldest first; released-but-not-yet-merged ones included.
        self.tables: dict[int, ChunkTable] = {}
        self._release_lock = asyncio.Lock()
        # Per image: chunks copied into its data whose entry waits for the next commit.
        self._pending: dict[int, set[int]] = {}
        # Per chunk: overwrites of live.data held until the copies they follow are durable.
        self._held: dict[int, list[HeldOp]] = {}
        self._unsettled: set[int] = set()  # images with entries set but not yet committed

    def _table(self, view: int) -> ChunkTable:
        return ChunkTable(self.storage, f"img-{view}.table", self.chunks)

    async def open(self, views: list[int], releasing: list[int], clean: bool) -> None:
        self.views = list(views)
        wanted = sorted(set(views[:-1]) | set(releasing))
        self.tables = {}
        for view in wanted:
            table = self._table(view)
            await table.load()
            self.tables[view] = table
        # Drop leftovers of images the catalog does not know (a preserve that never committed).
        keep = {LIVE} | {n for v in wanted for n in self.objects_of(v)}
        for name in self.storage.names():
            if name not in keep and not name.startswith("changed-"):
                await self.storage.delete(name)

    def chunk_tables(self) -> list[ChunkTable]:
        return list(self.tables.values())

    def damaged_by_tables(self) -> dict[int, str]:
        """A damaged table of image k misleads every view that resolves through it: k and older."""
        out: dict[int, str] = {}
        for k, table in sorted(self.tables.items()):
            if table.damaged:
                for v in self.views[:-1]:
                    if v <= k:
                        out.setdefault(v, table.damaged)
        return out

    def objects_of(self, view: int) -> list[str]:
        if view == self.views[-1]:
            return [LIVE]
        base = f"img-{view}.table"
        return [_data(view), base + ".ckpt0", base + ".ckpt1", base + ".journal", base + ".gone"]

    async def preserve(self) -> int:
        preserved = self.views[-1]
        self.tables[preserved] = self._table(preserved)  # empty: nothing to write
        self.views.append(preserved + 1)
        return preserved

    # -- resolution -------------------------------------------------------------------------
    def _owner(self, view: int, chunk: int) -> str:
        pending = self._pending
        for j, table in self.tables.items():
            if j >= view and (table.has(chunk) or (pending and chunk in pending.get(j, ()))):
                return _data(j)
        return LIVE

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        if view == self.views[-1] or not any(
            t.count or j in self._pending for j, t in self.tables.items() if j >= view
        ):
            yield LIVE, offset, length
            return
        run: tuple[str, int, int] | None = None
        for chunk, _within, n, done in self.pieces(offset, length):
            name = self._owner(view, chunk)
            pos = offset + done
            if run is not None and run[0] == name:
                run = (name, run[1], run[2] + n)
            else:
                if run is not None:
                    yield run
                run = (name, pos, n)
            del chunk
        if run is not None:
            yield run

    async def read(self, view: int, offset: int, length: int) -> bytes:
        """``Engine.read`` for the common case, the live view with nothing held, in one
        coroutine around the storage's; anything else (or a change while it waited for its
        chunks) goes the general way."""
        views = self.views
        if view != views[-1] or self._held or self.damaged or \
                not 0 <= offset < offset + length <= self.size:
            return await super().read(view, offset, length)
        shift = self.shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        locks = self.locks
        fut = locks.try_acquire(first, last, SHARED)
        if fut is not None:
            await fut
        try:
            if fut is not None and (view != self.views[-1] or self._held):
                return await self._read_views(view, offset, length)
            return await self.storage.inner.read(LIVE, offset, length)
        finally:
            locks.release(first, last)

    def _read(self, view: int, offset: int, length: int) -> Coroutine[Any, Any, bytes]:
        # The common case, the live view with nothing held: the storage's own coroutine, with
        # none of the engine's around it (``Engine.read`` awaits it under its lock).
        if view == self.views[-1] and not self._held and not self.broken:
            return self.storage.inner.read(LIVE, offset, length)  # nothing to track
        return self._read_views(view, offset, length)

    async def _read_views(self, view: int, offset: int, length: int) -> bytes:
        if view in self.broken:
            raise ImageBroken(f"preserved image {view} is broken and cannot be read")
        if not self._held:
            return await super()._read(view, offset, length)
        parts = [
            await (self._read_live(start, n) if name == LIVE else
                   self.storage.read(name, start, n))
            for name, start, n in self._placement(view, offset, length)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_live(self, offset: int, length: int) -> bytes:
        """live.data as its views see it: the storage with the held overwrites on top."""
        held = self._held
        first, last = self.chunk_range(offset, length)
        # Taken before the read: an overwrite the commit removes meanwhile may not be in what
        # the read returns.  (None can be added: that takes the chunk's exclusive lock.)
        ops = [op for c in range(first, last + 1) for op in held.get(c, ())] if held else []
        content = await self.storage.read(LIVE, offset, length)
        if not ops:
            return content
        buf = bytearray(content)
        end = offset + length
        for at, piece, n, _punch in ops:
            lo, hi = max(at, offset), min(at + n, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = (
                    bytes(hi - lo) if piece is None else piece[lo - at : hi - at])
        return bytes(buf)

    # -- writes -----------------------------------------------------------------------------
    def _previous(self, gen: int) -> int | None:
        """The newest preserved image older than generation ``gen``, or None."""
        views = self.views
        if views[0] >= gen:
            return None
        if gen == views[-1]:
            return views[-2]
        return max(v for v in views if v < gen)

    async def _preserve_chunks(self, gen: int, first: int, last: int) -> bool:
        """Make the newest image older than ``gen`` own chunks first..last before they change.

        Copies what it lacks into its data and marks those entries pending.  Returns True when
        the write's overwrite of live.data must be held: a chunk's copy is not durable yet."""
        prev = self._previous(gen)
        if prev is None or prev in self.broken:
            return False
        table = self.tables[prev]
        pending = self._pending.get(prev)
        if first == last:
            if table.has(first):
                return False
            if pending is not None and first in pending:
                return True
            missing = [first]
        else:
            missing = [c for c in table.unset(first, last)
                       if pending is None or c not in pending]
            if not missing:
                return pending is not None and any(
                    c in pending for c in range(first, last + 1))
        target = _data(prev)
        try:
            for source, start, n in self._copy_runs(prev, missing):
                if source == LIVE:
                    content = await self._read_live(start, n)
                else:
                    content = await self.storage.read(source, start, n)
                await self.put(target, start, content)
                self.cow_copy_bytes += n
        except NoSpace as exc:
            if self.enospc_policy == "fail-write":
                raise NoSpace(
                    "the pool's disk is full: the live write was refused so that the "
                    f"preserved image {prev} stays intact"
                ) from exc
            await self._break(prev, f"the disk filled up while preserving chunk data ({exc})")
            return False
        # Reads of prev now resolve to the copy; the entry reaches the table, and its journal,
        # only once a commit has made the copy durable.
        self._pending.setdefault(prev, set()).update(missing)
        self.cow_copies += len(missing)
        return True

    def _copy_runs(self, prev: int, missing: list[int]) -> Iterator[tuple[str, int, int]]:
        """Consecutive missing chunks with the same source, as (source, offset, length) runs:
        a large write copies its chunks with one read and one write, not one per chunk."""
        run: tuple[str, int, int] | None = None
        for chunk in missing:
            start = chunk << self.shift
            n = min(self.chunk_size, self.size - start)
            source = self._owner(prev, chunk)
            if run is not None and run[0] == source and run[1] + run[2] == start:
                run = (source, run[1], run[2] + n)
                continue
            if run is not None:
                yield run
            run = (source, start, n)
        if run is not None:
            yield run

    async def _break(self, view: int, reason: str) -> None:
        for v in self.views[:-1]:
            if v <= view and v not in self.broken:
                self.broken.add(v)
                if self.on_broken is not None:
                    await self.on_broken(v, reason)

    def _copies(self, gen: int, chunk: int) -> list[str]:
        """Data objects besides live.data holding a copy of chunk that a write by gen updates."""
        pending = self._pending
        return [_data(j) for j, t in self.tables.items()
                if j >= gen and (t.has(chunk) or (pending and chunk in pending.get(j, ())))]

    def _has_copies(self, gen: int) -> bool:
        return any(t.count or j in self._pending for j, t in self.tables.items() if j >= gen)

    def _must_hold(self, first: int, last: int) -> bool:
        held = self._held
        if not held:
            return False
        if first == last:
            return first in held
        return any(c in held for c in range(first, last + 1))

    def _may_defer(self, gen: int, first: int, last: int) -> bool:
        # The overwrite of live.data can be held; a write to a newer image's copy cannot.
        if gen == self.views[-1] or not self._has_copies(gen):
            return True
        return not any(self._copies(gen, c) for c in range(first, last + 1))

    async def write(self, gen: int, offset: int, data: Buffer, fua: bool = False) -> None:
        """``Engine.write`` and ``_write`` in one coroutine for the common case: no preserved
        image (nothing to copy aside, no other copy to update), not FUA, no damaged view, the
        backlog below its cap.  Anything else goes the general way."""
        views = self.views
        length = len(data)
        if len(views) > 1 or fua or self.damaged or gen != views[0] or \
                self.held_bytes >= self.held_cap or not 0 <= offset < offset + length <= self.size:
            await super().write(gen, offset, data, fua)
            return
        shift = self.shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        locks = self.locks
        fut = locks.try_acquire(first, last, EXCLUSIVE)
        if fut is not None:
            await fut
            if len(self.views) > 1:
                # A preserve came while it waited for its chunks: nothing done yet, so it
                # lets go and goes the general way (copies aside, other copies updated).
                locks.release(first, last)
                await super().write(gen, offset, data, fua)
                return
        try:
            ahead = self._mark_changed(gen, first, last) if gen else False
            if ahead or (self._held and self._must_hold(first, last)):
                # As Engine.write: _may_defer is True for the live view, so a write whose
                # changed bit is not durable yet is held, as is one behind held overwrites.
                self._hold(offset, memoryview(bytes(data)), length, False)
            else:
                storage = self.storage
                try:
                    await storage.inner.write(LIVE, offset, data)
                finally:
                    storage.wrote(LIVE)
        finally:
            locks.release(first, last)
        if ahead:
            self.schedule_writeback()

    async def _write(self, gen: int, offset: int, data: Buffer, ahead: bool = False) -> set[str]:
        views = self.views
        length = len(data)
        shift = self.shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        # With no image older than ``gen`` (a volume never preserved, or a session of the
        # oldest image) there is nothing to copy aside.  Held too when its changed bit is not
        # durable yet (``ahead``): the commit that releases it makes the bit durable first.
        hold = gen != views[0] and await self._preserve_chunks(gen, first, last)
        if ahead or (self._held and self._must_hold(first, last)):
            hold = True
        touched = {LIVE}
        if gen != views[-1] and self._has_copies(gen):
            view = memoryview(data)
            for chunk, _within, n, done in self.pieces(offset, length):
                for name in self._copies(gen, chunk):
                    await self.storage.write(name, offset + done, view[done : done + n])
                    touched.add(name)
        if hold:
            self._hold(offset, memoryview(bytes(data)), length, False)
        else:
            # SyncTracking.write inlined (the hot path: no coroutine of ours around the
            # storage's write).
            storage = self.storage
            try:
                await storage.inner.write(LIVE, offset, data)
            finally:
                storage.wrote(LIVE)
        return touched

    async def _zero(self, gen: int, offset: int, length: int, punch: bool,
                    ahead: bool = False) -> set[str]:
        first, last = self.chunk_range(offset, length)
        hold = (await self._preserve_chunks(gen, first, last) or ahead
                or self._must_hold(first, last))
        touched = {LIVE}
        if self._has_copies(gen):
            for chunk, _within, n, done in self.pieces(offset, length):
                for name in self._copies(gen, chunk):
                    await self.put_zero(name, offset + done, n, punch)
                    touched.add(name)
        if hold:
            self._hold(offset, None, length, punch)
        else:
            await self.put_zero(LIVE, offset, length, punch)
        return touched

    # -- ordered write-back -----------------------------------------------------------------
    def _hold(self, offset: int, data: memoryview | None, length: int, punch: bool) -> None:
        """Keep an overwrite of live.data in memory, chunk by chunk, behind earlier ones."""
        held = self._held
        for chunk, _within, n, done in self.pieces(offset, length):
            piece = None if data is None else data[done : done + n]
            held.setdefault(chunk, []).append((offset + done, piece, n, punch))
            self.held_bytes += ZERO_OP_BYTES if data is None else n
        self.schedule_writeback()

    def writeback_pending(self) -> bool:
        return bool(self._held or self._pending or self._unsettled)

    async def _commit_batch(self) -> None:
        """One group commit: copies durable, then their entries, and the changed bits of the
        held overwrites' chunks, then the held overwrites."""
        # All taken at one instant: a held overwrite was held after the copy it follows was
        # marked pending, and after its changed bit was set, so each overwrite taken here
        # follows a copy and a bit taken here (or earlier).
        batch = {v: set(chunks) for v, chunks in self._pending.items()}
        counts = {c: len(ops) for c, ops in self._held.items()}
        changed = self._changed_batch()
        # The changed maps' journals sync while the copies do; both before any release.
        results = await asyncio.gather(self._commit_changed(changed),
                                       self._commit_copies(batch), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        # Only now may the overwrites touch the shared chunks.
        if counts:
            await asyncio.gather(*(self._release_held(c, k) for c, k in counts.items()))

    async def _commit_copies(self, batch: dict[int, set[int]]) -> None:
        """Sync the copies of ``batch``, then commit their entries."""
        if batch:
            await self.sync_objects([_data(v) for v in batch if v in self.tables])
        for v, chunks in batch.items():
            left = self._pending.get(v)
            if left is not None:
                left -= chunks
                if not left:
                    del self._pending[v]
            table = self.tables.get(v)
            if table is not None:
                for chunk in chunks:
                    table.set(chunk)
                self._unsettled.add(v)
        if self._unsettled:
            await asyncio.gather(*(self.tables[v].commit() for v in sorted(self._unsettled)
                                   if v in self.tables))
            self._unsettled.clear()

    async def _release_held(self, chunk: int, count: int) -> None:
        """Write a chunk's first ``count`` held overwrites to live.data, in order.  They stay
        held (and visible to reads) until written; writing one twice after an error is
        harmless, as the later ones follow it again."""
        ops = self._held[chunk]
        for at, piece, n, punch in ops[:count]:
            if piece is None:
                await self.put_zero(LIVE, at, n, punch)
            else:
                await self.storage.write(LIVE, at, piece)
        self.held_bytes -= sum(ZERO_OP_BYTES if p is None else n for _a, p, n, _z in ops[:count])
        del ops[:count]
        if not ops:
            del self._held[chunk]

    def abandon(self) -> None:
        super().abandon()
        self._held.clear()
        self._pending.clear()
        self.held_bytes = 0

    async def extents(self, view: int, offset: int, length: int) -> list[Extent]:
        # The storage knows nothing of held overwrites: let them reach it first.
        await self.commit_writeback()
        return await super().extents(view, offset, length)

    async def _flush(self) -> None:
        names = [LIVE] + [_data(v) for v in self.tables if self.storage.exists(_data(v))]
        await self.sync_objects(names)
        await asyncio.gather(*(t.commit() for t in self.tables.values()))

    async def close(self) -> None:
        await super().close()  # its flush commits the write-back
        for table in self.tables.values():
            await table.checkpoint()

    # -- release ----------------------------------------------------------------------------
    async def release(self, view: int, progress: Progress | None = None) -> None:
        if view in self.views:
            self.views.remove(view)
        # A write that chose its copy target before the view list changed must finish first,
        # and so must the commit of its copies: the move-down below reads committed entries.
        await self.locks.barrier()
        await self.commit_writeback()
        # One release at a time: a move-down lists its source's chunks once, and another
        # move-down into that source meanwhile (two releases, or two resumed after a crash)
        # would add chunks that are then deleted with it.
        async with self._release_lock:
            table = self.tables.get(view)
            if table is None:
                return
            if any(v < view for v in self.views):
                # Older images resolve through this table where they have no copy of their own.
                # Its chunks go to the nearest older table, even one being released itself
                # (whose own move-down, later, passes them on): an older image reads that one
                # first, so skipping it would give that image this table's newer copy.
                target = max(j for j in self.tables if j < view)
                await self._move_down(view, target, progress)
            del self.tables[view]
            self.broken.discard(view)
            await table.destroy()
            await self.storage.delete(_data(view))
        if progress is not None:
            progress(1, 1)

    async def _move_down(self, view: int, older: int, progress: Progress | None) -> None:
        source, target = self.tables[view], self.tables[older]
        todo = [c for c in source if not target.has(c)]
        await self._step("move-listed", -1)
        for i, chunk in enumerate(todo):
            async with self.locks.locked(chunk, chunk, EXCLUSIVE):
                if target.has(chunk) or not source.has(chunk):
                    continue
                start = chunk << self.shift
                n = min(self.chunk_size, self.size - start)
                content = await self.storage.read(_data(view), start, n)
                await self.put(_data(older), start, content)
                await self.group_sync(_data(older))()
                await target.set_durable(chunk)
            if progress is not None:
                progress(i + 1, len(todo) + 1)
            await self._step("move-chunk", chunk)
