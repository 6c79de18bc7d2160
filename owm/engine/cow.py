"""Copy-on-write ([0092]-[0108]): the live image holds the common data in place.

Each preserved image k has a chunk table and a sparse data object ``img-k.data`` holding its own
copies at their natural offsets.  View v reads chunk c from the first image j >= v (oldest first)
whose table has c, else from ``live.data``.  Before a write by generation k touches chunk c, the
newest image older than k must own c: if it does not, the chunk's current content is copied into
it, the copy is made durable, then its table entry, and only then is the shared chunk touched
(dm-snapshot's order, with group commit).  Images at or after k that own a copy of c get the
write too, so a partial write keeps both copies right.  Releasing an image drops its table and
data; if an older image still resolves through it, those chunks move down first, into the
nearest older table (one release at a time, so that no move-down fills a table another one is
emptying).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from owm.common.errors import ImageBroken, NoSpace
from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer

LIVE = "live.data"


def _data(view: int) -> str:
    return f"img-{view}.data"


class CowEngine(Engine):
    method = "cow"
    generic_flush = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Tables of preserved images, oldest first; released-but-not-yet-merged ones included.
        self.tables: dict[int, ChunkTable] = {}
        self._release_lock = asyncio.Lock()

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
        for j, table in self.tables.items():
            if j >= view and table.has(chunk):
                return _data(j)
        return LIVE

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        if view == self.views[-1] or not any(t.count for j, t in self.tables.items() if j >= view):
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

    async def _read(self, view: int, offset: int, length: int) -> bytes:
        if view in self.broken:
            raise ImageBroken(f"preserved image {view} is broken and cannot be read")
        return await super()._read(view, offset, length)

    # -- writes -----------------------------------------------------------------------------
    def _previous(self, gen: int) -> int | None:
        """The newest preserved image older than generation ``gen``, or None."""
        views = self.views
        if views[0] >= gen:
            return None
        if gen == views[-1]:
            return views[-2]
        return max(v for v in views if v < gen)

    async def _preserve_chunks(self, gen: int, first: int, last: int) -> None:
        """Make the newest image older than ``gen`` own chunks first..last before they change."""
        prev = self._previous(gen)
        if prev is None or prev in self.broken:
            return
        table = self.tables[prev]
        if first == last:
            if table.has(first):
                return
            missing = [first]
        else:
            missing = [c for c in range(first, last + 1) if not table.has(c)]
            if not missing:
                return
        target = _data(prev)
        try:
            for source, start, n in self._copy_runs(prev, missing):
                content = await self.storage.read(source, start, n)
                await self.put(target, start, content)
                self.cow_copy_bytes += n
            await self.group_sync(target)()
        except NoSpace as exc:
            if self.enospc_policy == "fail-write":
                raise NoSpace(
                    "the pool's disk is full: the live write was refused so that the "
                    f"preserved image {prev} stays intact"
                ) from exc
            await self._break(prev, f"the disk filled up while preserving chunk data ({exc})")
            return
        for chunk in missing:
            table.set(chunk)
        await table.commit()
        self.cow_copies += len(missing)

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
        return [_data(j) for j, t in self.tables.items() if j >= gen and t.has(chunk)]

    async def _write(self, gen: int, offset: int, data: Buffer) -> set[str]:
        first, last = self.chunk_range(offset, len(data))
        await self._preserve_chunks(gen, first, last)
        touched = {LIVE}
        if gen != self.views[-1] and any(t.count for j, t in self.tables.items() if j >= gen):
            view = memoryview(data)
            for chunk, _within, n, done in self.pieces(offset, len(data)):
                for name in self._copies(gen, chunk):
                    await self.storage.write(name, offset + done, view[done : done + n])
                    touched.add(name)
        await self.storage.write(LIVE, offset, data)
        return touched

    async def _zero(self, gen: int, offset: int, length: int, punch: bool) -> set[str]:
        first, last = self.chunk_range(offset, length)
        await self._preserve_chunks(gen, first, last)
        touched = {LIVE}
        if any(t.count for j, t in self.tables.items() if j >= gen):
            for chunk, _within, n, done in self.pieces(offset, length):
                for name in self._copies(gen, chunk):
                    await self.put_zero(name, offset + done, n, punch)
                    touched.add(name)
        await self.put_zero(LIVE, offset, length, punch)
        return touched

    async def _flush(self) -> None:
        names = [LIVE] + [_data(v) for v in self.tables if self.storage.exists(_data(v))]
        await self.sync_objects(names)
        await asyncio.gather(*(t.commit() for t in self.tables.values()))

    async def close(self) -> None:
        await super().close()
        for table in self.tables.values():
            await table.checkpoint()

    # -- release ----------------------------------------------------------------------------
    async def release(self, view: int, progress: Progress | None = None) -> None:
        if view in self.views:
            self.views.remove(view)
        # A write that chose its copy target before the view list changed must finish first.
        await self.locks.barrier()
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
