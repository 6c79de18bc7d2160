"""Split mirror ([0062]-[0072]): every leg holds a full copy of the volume.

Before any preserve, writes go to every leg (RAID-1).  A preserve splits one in-sync leg off as
the preserved image; from then on a write by generation k goes to the legs of views k..live and
marks the chunk dirty (durably, before the write) on the legs of older views.  Releasing an image
resyncs its leg from a live leg, copying only its dirty chunks while I/O goes on (writes reach the
resyncing leg too), and the leg rejoins the mirror.  Up to legs-1 images can be outstanding.

Leg roles are kept in ``state["legs"]`` (persisted by the volume's catalog row):
``{"role": "sync"}``, ``{"role": "image", "view": g, "full": bool}`` or
``{"role": "resync", "full": bool}``; ``full`` means the dirty map cannot be trusted and a
resync copies every allocated chunk (only volumes from before the write-intent map get it).

The write-intent map (``intent.*``, md's write-intent bitmap) marks the chunks that may differ
between legs that receive the same writes: a chunk's bit is made durable before a write that
reaches more than one leg is issued, and cleared lazily, at a flush, once the chunk has seen no
write since the flush before (so every leg has synced it).  After an unclean stop only those
chunks can differ: ``open`` adds them to the dirty map of every split or resyncing leg (a release
recopies them) and serves at once, while a background task copies them from the primary (leg 0,
which every read of the live view uses, so reads get one answer meanwhile) to the other in-sync
legs; a write to such a chunk reaches every leg anyway.  Until the background resync has passed a
chunk, a preserve that splits a leg off copies the leg's pending chunks first.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from owm.common.errors import InvalidRequest, WrongState
from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer

log = logging.getLogger("owm.engine.mirror")

StepHook = Callable[[str, int], Awaitable[None]]
RESYNC_BATCH = 256  # chunks the background resync copies between two syncs of the legs
TRACK_LIMIT = 1 << 18  # chunks remembered per flush interval; beyond it no bit is cleared


def _leg(i: int) -> str:
    return f"leg-{i}.data"


class MirrorEngine(Engine):
    method = "mirror"
    # Awaited between the steps of the resyncs (tests pause them there, on an engine or on the
    # class before a restart); None in service.
    step_hook: StepHook | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.legs < 2:
            raise InvalidRequest("a mirror needs at least 2 legs")
        if "legs" not in self.state:  # a new volume keeps a write-intent map from the start
            self.state["legs"] = [{"role": "sync"} for _ in range(self.legs)]
            self.state["write_intent"] = True
        self.dirty: dict[int, ChunkTable] = {}
        self.intent = ChunkTable(self.storage, "intent", self.chunks)
        self._inflight: Counter[int] = Counter()  # chunks with a write under way
        # Chunks written since the last flush began, and in the interval before it; a chunk's
        # intent bit is cleared at a flush only when it is in neither.
        self._recent: set[int] = set()
        self._settled: set[int] = set()
        self._recent_over = self._settled_over = False  # too many to remember: clear none
        # The background resync after an unclean stop: the chunks it copies, ascending, and how
        # many of them are copied *and* synced; the rest may still differ between in-sync legs.
        self._resync_list: list[int] = []
        self._resync_done = 0
        self._resync_task: asyncio.Task[None] | None = None
        self.resync_progress: tuple[int, int] | None = None  # (done, total) while it runs
        self.resynced_chunks = 0  # chunks copied by the last background resync

    @property
    def roles(self) -> list[dict[str, Any]]:
        legs: list[dict[str, Any]] = self.state["legs"]
        return legs

    def _dirty_table(self, leg: int) -> ChunkTable:
        return ChunkTable(self.storage, f"leg-{leg}.dirty", self.chunks)

    async def _step(self, what: str, chunk: int) -> None:
        if self.step_hook is not None:
            await self.step_hook(what, chunk)

    async def open(self, views: list[int], releasing: list[int], clean: bool) -> None:
        self.views = list(views)
        for i, role in enumerate(self.roles):
            if role["role"] == "image" and role["view"] in releasing:
                self.roles[i] = role = {"role": "resync", "view": role["view"],
                                        "full": role.get("full", False)}
            if role["role"] != "sync":
                table = self._dirty_table(i)
                await table.load()
                self.dirty[i] = table
        await self.intent.load()
        if not clean and (not self.state.get("write_intent") or self.intent.damaged):
            # A volume from before the write-intent map, or whose map is damaged: any allocated
            # chunk may differ.
            for chunk in await self._data_chunks(list(range(self.legs))):
                self.intent.set(chunk)
            await self.intent.checkpoint()
        self.state["write_intent"] = True
        if not self.intent.count:
            return
        # A write may have reached some legs only.  Split and resyncing legs recopy those chunks
        # when they are released (durably noted before anything is served); the in-sync legs
        # are made equal to the primary in the background.
        many = self.intent.count > 4096
        for table in self.dirty.values():
            for chunk in self.intent:
                table.set(chunk)
            await (table.checkpoint() if many else table.commit())
        self._resync_list = list(self.intent)
        self._resync_done = 0
        self.resync_progress = (0, len(self._resync_list))
        log.info("mirror: resyncing the %d chunks of the write-intent map in the background",
                 len(self._resync_list))
        self._resync_task = asyncio.get_running_loop().create_task(self._background_resync())

    def chunk_tables(self) -> list[ChunkTable]:
        return [*self.dirty.values(), self.intent]

    def damaged_by_tables(self) -> dict[int, str]:
        """A damaged dirty map leaves the image's leg intact; only its resync must copy all.
        A damaged write-intent map made ``open`` resync every allocated chunk."""
        if self.intent.damaged:
            self.intent.warnings.append(f"{self.intent.damaged}; every allocated chunk is "
                                        "resynced instead")
        for i, table in self.dirty.items():
            if table.gone:  # a destroy was under way: an empty map would skip what it held
                self.roles[i]["full"] = True
                table.warnings.append(f"the dirty map of leg {i} was being deleted; the resync "
                                      "will copy every chunk")
            if table.damaged:
                self.roles[i]["full"] = True
                table.warnings.append(f"{table.damaged}; the resync of leg {i} will copy every "
                                      "chunk")
        return {}

    def _sync_legs(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r["role"] == "sync"]

    def _primary(self) -> int:
        return self._sync_legs()[0]

    def _image_leg(self, view: int) -> int:
        for i, r in enumerate(self.roles):
            if r["role"] == "image" and r["view"] == view:
                return i
        raise WrongState(f"no leg holds image {view}")

    def _leg_of(self, view: int) -> int:
        return self._primary() if view == self.views[-1] else self._image_leg(view)

    def objects_of(self, view: int) -> list[str]:
        if view == self.views[-1]:
            return [_leg(i) for i in self._sync_legs()]
        leg = self._image_leg(view)
        t = f"leg-{leg}.dirty"
        return [_leg(leg), t + ".ckpt0", t + ".ckpt1", t + ".journal", t + ".gone"]

    async def preserve(self) -> int:
        in_sync = self._sync_legs()
        if len(in_sync) < 2:
            raise WrongState(
                f"every spare leg of this {self.legs}-leg mirror already holds a preserved image; "
                "release one first"
            )
        leg = in_sync[-1]
        # The image must equal the live view: first bring over what the background resync has
        # not yet made equal on this leg (only chunks of the write-intent map, so it is small).
        await self._catch_up(leg)
        preserved = self.views[-1]
        self.roles[leg] = {"role": "image", "view": preserved, "full": False}
        self.dirty[leg] = self._dirty_table(leg)
        self.views.append(preserved + 1)
        return preserved

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        yield _leg(self._leg_of(view)), offset, length

    # -- writes -----------------------------------------------------------------------------
    def _targets(self, gen: int) -> list[int]:
        return [i for i, r in enumerate(self.roles)
                if r["role"] != "image" or r["view"] >= gen]

    async def _begin(self, gen: int, first: int, last: int) -> list[str]:
        """Before a write: note it in flight, durably mark the write-intent map (when it reaches
        more than one leg) and the dirty maps of images older than gen; return its legs."""
        chunks = range(first, last + 1)
        for chunk in chunks:
            self._inflight[chunk] += 1
        try:
            while True:  # roles may change while a commit is awaited: until nothing is new
                targets = self._targets(gen)
                tables = [self.dirty[i] for i, r in enumerate(self.roles)
                          if r["role"] == "image" and r["view"] < gen]
                if len(targets) > 1:
                    tables.append(self.intent)
                pending = []
                for table in tables:
                    marked = False
                    for chunk in chunks:
                        if not table.has(chunk):
                            table.set(chunk)
                            marked = True
                    if marked:
                        pending.append(table.commit())
                if not pending:
                    return [_leg(i) for i in targets]
                await asyncio.gather(*pending)
        except BaseException:
            self._end(first, last)
            raise

    def _end(self, first: int, last: int) -> None:
        for chunk in range(first, last + 1):
            n = self._inflight[chunk] - 1
            if n:
                self._inflight[chunk] = n
            else:
                del self._inflight[chunk]
        if len(self._recent) + last - first >= TRACK_LIMIT:
            self._recent_over = True
        else:
            self._recent.update(range(first, last + 1))

    async def _write(self, gen: int, offset: int, data: Buffer, ahead: bool = False) -> set[str]:
        first, last = self.chunk_range(offset, len(data))
        names = await self._begin(gen, first, last)
        try:
            # One leg after another: small writes complete inline, where a Task per leg would
            # cost more than the write; large ones run in the storage's threads either way.
            for name in names:
                await self.storage.write(name, offset, data)
        finally:
            self._end(first, last)
        return set(names)

    async def _zero(self, gen: int, offset: int, length: int, punch: bool,
                    ahead: bool = False) -> set[str]:
        first, last = self.chunk_range(offset, length)
        names = await self._begin(gen, first, last)
        try:
            await asyncio.gather(*(self.put_zero(n, offset, length, punch) for n in names))
        finally:
            self._end(first, last)
        return set(names)

    def _pending_resync(self, chunk: int) -> bool:
        """May the in-sync legs still differ at chunk (the background resync is not past it)?"""
        lst = self._resync_list
        i = bisect.bisect_left(lst, chunk, self._resync_done)
        return i < len(lst) and lst[i] == chunk

    def _may_clear(self, chunk: int) -> bool:
        return not (self._recent_over or self._settled_over or chunk in self._inflight
                    or chunk in self._recent or chunk in self._settled
                    or self._pending_resync(chunk))

    async def _flush(self) -> None:
        older = self._settled
        self._settled, self._settled_over = self._recent, self._recent_over
        self._recent, self._recent_over = set(), False
        await self.sync_objects([_leg(i) for i in range(self.legs)
                                 if self.storage.exists(_leg(i))])
        await asyncio.gather(*(t.commit() for t in self.dirty.values()))
        # Chunks last written before the previous flush began are now synced on every leg.
        # The clearing is lazy: it reaches the journal with the next commit of the map.
        for chunk in older:
            if self._may_clear(chunk):
                self.intent.clear(chunk)

    async def close(self) -> None:
        await self._stop_resync()
        await super().close()
        for table in self.dirty.values():
            await table.checkpoint()
        # Every leg is synced: only chunks the background resync has not reached may differ.
        for chunk in list(self.intent):
            if chunk not in self._inflight and not self._pending_resync(chunk):
                self.intent.clear(chunk)
        await self.intent.checkpoint()

    # -- the background resync of the in-sync legs after an unclean stop ----------------------
    async def wait_resynced(self) -> None:
        """Return once the background resync (if any) has ended."""
        task = self._resync_task
        if task is not None:
            await asyncio.shield(task)

    async def _stop_resync(self) -> None:
        task, self._resync_task = self._resync_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _background_resync(self) -> None:
        chunks = self._resync_list
        copied = 0  # chunks copied to at least one leg (none when a single leg is in sync)
        try:
            while self._resync_done < len(chunks):
                batch = chunks[self._resync_done : self._resync_done + RESYNC_BATCH]
                written: set[int] = set()
                for k, chunk in enumerate(batch):
                    await self._step("resync", chunk)
                    legs = await self._copy_chunk(chunk, lambda: self._sync_legs()[1:])
                    written.update(legs)
                    copied += bool(legs)
                    self.resync_progress = (self._resync_done + k + 1, len(chunks))
                await self.sync_objects([_leg(i) for i in written])
                self._resync_done += len(batch)
                for chunk in batch:
                    if self._may_clear(chunk):
                        self.intent.clear(chunk)
            await self.intent.commit()
            log.info("mirror: resync after an unclean stop done, %d chunks copied", copied)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The map keeps the chunks not yet done: the next start resyncs them again.
            log.error("mirror: the resync after an unclean stop failed (%s); it resumes at the "
                      "next start", exc)
        finally:
            self.resynced_chunks = copied
            self.resync_progress = None
            if self._resync_done >= len(chunks):
                self._resync_list, self._resync_done = [], 0

    async def _catch_up(self, leg: int) -> None:
        """Copy to leg (durably) every chunk the background resync has not yet made equal."""
        pending = self._resync_list[self._resync_done :]
        if not pending:
            return
        for chunk in pending:
            await self._copy_chunk(chunk, lambda: [leg])
        await self.group_sync(_leg(leg))()

    # -- release: resync the leg ------------------------------------------------------------
    async def _data_chunks(self, legs: list[int]) -> list[int]:
        chunks: set[int] = set()
        for leg in legs:
            if not self.storage.exists(_leg(leg)):
                continue
            for start, n, is_data in await self.storage.extents(_leg(leg), 0, self.size):
                if is_data:
                    chunks.update(range(start >> self.shift, (start + n - 1 >> self.shift) + 1))
        return sorted(chunks)

    async def _copy_chunk(self, chunk: int, targets: Callable[[], list[int]]) -> list[int]:
        """Copy one chunk from the primary to the legs targets() names once it is locked."""
        async with self.locks.locked(chunk, chunk, EXCLUSIVE):
            legs = targets()
            if legs:
                start = chunk << self.shift
                n = min(self.chunk_size, self.size - start)
                content = await self.storage.read(_leg(self._primary()), start, n)
                for leg in legs:
                    await self.put(_leg(leg), start, content)
            return legs

    async def release(self, view: int, progress: Progress | None = None) -> None:
        if view in self.views:
            self.views.remove(view)
        leg = next((i for i, r in enumerate(self.roles)
                    if r["role"] in ("image", "resync") and r.get("view") == view), None)
        if leg is None:
            return
        full = bool(self.roles[leg].get("full"))
        # From now on the leg receives every live write; only its dirty chunks need copying.
        self.roles[leg] = {"role": "resync", "view": view, "full": full}
        # Writes that chose their legs (and dirty marks) before the role changed finish first.
        await self.locks.barrier()
        # What the copy reads from the primary must be durable there first: written while the
        # primary was the only leg taking live writes it has no write-intent bit, so a power
        # loss after the rejoin would leave the legs different with nothing to resync them.
        await self.sync_objects([_leg(self._primary())])
        await self._step("release-start", -1)
        # Kept in self.dirty until the leg rejoins: a copy that fails (a full disk) leaves the
        # leg resyncing with its map, and a retried release starts again from it.
        table = self.dirty[leg]
        chunks = await self._data_chunks([self._primary(), leg]) if full else list(table)
        for k, chunk in enumerate(chunks):
            await self._step("release-copy", chunk)
            await self._copy_chunk(chunk, lambda: [leg])
            if progress is not None:
                progress(k + 1, len(chunks) + 1)
        await self.group_sync(_leg(leg))()
        await self._step("release-rejoin", -1)
        self.roles[leg] = {"role": "sync"}
        self.dirty.pop(leg, None)
        await table.destroy()
        if progress is not None:
            progress(1, 1)
