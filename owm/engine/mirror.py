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
recopies them) and to the changed map of every view but the oldest (the views' legs may hold a
fanned-out write differently too), and serves at once, while a background task copies them
from the primary (leg 0, which every read of the live view uses, so reads get one answer
meanwhile) to the other in-sync legs; a write to such a chunk reaches every leg anyway.  Until
the background resync has passed a chunk, a preserve that splits a leg off copies the leg's
pending chunks first.

Writes are ordered write-back, as in cow and log: a write that sets a bit (a split leg's dirty
bit, a write-intent bit, a changed-chunk bit) is *held* in memory, visible to reads of the views
whose legs it targets, and acknowledged; a group commit a few milliseconds later (or at FLUSH,
FUA, a full backlog or a release) makes the bits of a whole batch durable and only then lets the
held writes reach their legs.  Later writes to a chunk with held writes are held behind them,
so they reach the legs in order.  A crash before the commit loses the held writes (unflushed,
so that is allowed) and leaves every leg as it was: the dirty maps and the write-intent map
still cover every chunk where the legs may differ.  A held write keeps the legs it chose: one
held across a preserve goes to the split leg too, as it belongs to the preserved image.

A write that fails on some of its legs (a full disk, EIO) may have reached the others.  A held
one stays held and is written to every leg again at the next commit.  One that went straight
to its legs is mended before its error reaches the client, still under its chunk lock: the
failing leg's bytes of the range are copied to the other legs it targeted (the legs that took
the write have its space), so every view shows one answer there.  When that fails too, the
chunks stay *diverged*: their write-intent bits are not cleared (a restart resyncs them), a
flush, a preserve (refused if it cannot) and a release copy them from the primary to the legs
taking live writes first, and a split leg among the targets gets them in its dirty map and its
image is marked broken, as it may now hold bytes the live view does not.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from owm.common.errors import InvalidRequest, OwmError, WrongState
from owm.common.view import Extent
from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer

log = logging.getLogger("owm.engine.mirror")

StepHook = Callable[[str, int], Awaitable[None]]
# A held write: offset, bytes (None: zeroes), length, punch (zeroes only), the legs it goes to.
HeldOp = tuple[int, memoryview | None, int, bool, tuple[str, ...]]
ZERO_OP_BYTES = 64  # what a held zeroing counts against the backlog's cap
PARALLEL_BYTES = 64 * 1024  # writes larger than this go to every leg at once
RESYNC_BATCH = 256  # chunks the background resync copies between two syncs of the legs
TRACK_LIMIT = 1 << 18  # chunks remembered per flush interval; beyond it no bit is cleared


def _leg(i: int) -> str:
    return f"leg-{i}.data"


class MirrorEngine(Engine):
    method = "mirror"
    writeback = True
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
        # Per chunk: writes held until the bits they follow are durable (still in flight).
        self._held: dict[int, list[HeldOp]] = {}
        # Per generation: the legs its writes go to and the maps they mark (``_route``);
        # forgotten whenever a leg's role or map changes (``_rerouted``).
        self._routes: dict[int, tuple[list[str], list[ChunkTable]]] = {}
        # Chunks where a failed write left the legs different and mending them failed too
        # (``_diverge``): their write-intent bits stay until ``_repair_diverged`` copied them.
        self._diverged: set[int] = set()

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
        self._rerouted()
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
        await self._fold_into_changed(many)
        self._resync_list = list(self.intent)
        self._resync_done = 0
        self.resync_progress = (0, len(self._resync_list))
        log.info("mirror: resyncing the %d chunks of the write-intent map in the background",
                 len(self._resync_list))
        self._resync_task = asyncio.get_running_loop().create_task(self._background_resync())

    async def _fold_into_changed(self, checkpoint: bool) -> None:
        """Name the write-intent chunks in the changed map of every view but the oldest.

        The views' legs may differ there too, not only the in-sync legs: a write of generation
        k goes to the legs of views k..live, and a power loss may have kept it on some of them
        only, so two views differ at a chunk that no generation between them wrote.  With the
        chunk in the maps of views[1:], the map between any two views names it.  Durable before
        the background resync starts clearing intent bits, so a second crash cannot lose it.
        This costs bits only after an unclean stop (the intent map is small); marking newer
        generations' maps at every old-generation write instead would grow every incremental
        backup of a newer image by all its older sessions' writes.
        """
        for gen in self.views[1:]:
            table = self._changed_table(gen)
            await table.load()
            if table.gone or table.damaged:
                continue  # its generation is untrusted anyway (``check_tables``)
            for chunk in self.intent:
                table.set(chunk)
            await (table.checkpoint() if checkpoint else table.commit())

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
        # Nor may it differ where a failed write left the legs apart: copy those chunks first
        # (a failure refuses the preserve rather than split off a leg the live view disagrees
        # with).
        await self._repair_diverged()
        preserved = self.views[-1]
        self.roles[leg] = {"role": "image", "view": preserved, "full": False}
        self.dirty[leg] = self._dirty_table(leg)
        self.views.append(preserved + 1)
        self._rerouted()
        return preserved

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        yield _leg(self._leg_of(view)), offset, length

    # -- writes -----------------------------------------------------------------------------
    def _targets(self, gen: int) -> list[int]:
        return [i for i, r in enumerate(self.roles)
                if r["role"] != "image" or r["view"] >= gen]

    def _route(self, gen: int) -> tuple[list[str], list[ChunkTable]]:
        """The legs a write by gen goes to, and the maps it marks: the dirty maps of images
        older than gen, and the write-intent map when it reaches more than one leg."""
        route = self._routes.get(gen)
        if route is None:
            targets = self._targets(gen)
            tables = [self.dirty[i] for i, r in enumerate(self.roles)
                      if r["role"] == "image" and r["view"] < gen]
            if len(targets) > 1:
                tables.append(self.intent)
            route = self._routes[gen] = ([_leg(i) for i in targets], tables)
        return route

    def _rerouted(self) -> None:
        """A leg's role or dirty map changed: work the routes out again."""
        self._routes.clear()

    def _begin(self, gen: int, first: int, last: int) -> tuple[list[str], bool]:
        """Before a write: note it in flight, mark the write-intent map (when it reaches more
        than one leg) and the dirty maps of images older than gen; return its legs, and whether
        a bit was new (then the write is held until a commit has made it durable)."""
        inflight = self._inflight
        names, tables = self._routes.get(gen) or self._route(gen)
        marked = False
        if first == last:  # the common case, without a range to walk
            inflight[first] += 1
            for table in tables:
                if not table.has(first):
                    table.set(first)
                    marked = True
            return names, marked
        chunks = range(first, last + 1)
        for chunk in chunks:
            inflight[chunk] += 1
        for table in tables:
            for chunk in chunks:
                if not table.has(chunk):
                    table.set(chunk)
                    marked = True
        return names, marked

    def _end(self, first: int, last: int) -> None:
        inflight = self._inflight
        for chunk in range(first, last + 1) if first != last else (first,):
            n = inflight[chunk] - 1
            if n:
                inflight[chunk] = n
            else:
                del inflight[chunk]
        recent = self._recent
        if len(recent) + last - first >= TRACK_LIMIT:
            self._recent_over = True
        elif first == last:
            recent.add(first)
        else:
            recent.update(range(first, last + 1))

    def _may_defer(self, gen: int, first: int, last: int) -> bool:
        return True  # every write whose bits are not durable is held

    def _must_hold(self, first: int, last: int) -> bool:
        held = self._held
        if not held:
            return False
        if first == last:
            return first in held
        return any(c in held for c in range(first, last + 1))

    async def _write(self, gen: int, offset: int, data: Buffer, ahead: bool = False) -> set[str]:
        first, last = self.chunk_range(offset, len(data))
        names, marked = self._begin(gen, first, last)
        if marked or ahead or (self._held and self._must_hold(first, last)):
            self._hold(offset, memoryview(bytes(data)), len(data), False, names)
            return set(names)
        try:
            if len(data) > PARALLEL_BYTES and len(names) > 1:
                # Large writes run in the storage's threads: every leg's at once.
                await self._on_legs(names, offset, len(data),
                                    lambda name: self.storage.write(name, offset, data))
            else:
                # One leg after another: small writes complete inline, where a Task per leg
                # would cost more than the write.
                name = names[0]
                try:
                    for name in names:
                        await self.storage.write(name, offset, data)
                except OwmError:  # what the storage raises for a full disk, EIO, ...
                    await self._mend(offset, len(data), names, name)
                    raise
                except BaseException:  # cancelled (or stopped) part way: await nothing now
                    self._diverge(offset, len(data), names)
                    raise
        finally:
            self._end(first, last)
        return set(names)

    async def _on_legs(self, names: list[str], offset: int, length: int,
                       op: Callable[[str], Awaitable[None]]) -> None:
        """Run op on every leg at once; return once all are done (never while one still
        writes).  When it failed on a leg, the legs may differ over the range: make them agree
        again (``_mend``), then raise the first error to the client."""
        try:
            results = await asyncio.gather(*(op(name) for name in names),
                                           return_exceptions=True)
        except BaseException:  # cancelled part way: nothing can be awaited now
            self._diverge(offset, length, names)
            raise
        for name, result in zip(names, results, strict=True):
            if isinstance(result, OwmError):
                await self._mend(offset, length, names, name)
                raise result
            if isinstance(result, BaseException):
                self._diverge(offset, length, names)
                raise result

    async def _mend(self, offset: int, length: int, names: list[str], failed: str) -> None:
        """A write to names failed on ``failed``: copy that leg's bytes of the range to the
        other legs the write targeted, so that every view shows one answer there (the failed
        write may have landed in part or not at all; either is allowed).  The legs that took
        the write have its space, so on a full disk this mostly succeeds; when it does not,
        the range is left to ``_diverge``.  Runs under the write's exclusive chunk lock."""
        try:
            content = await self.storage.read(failed, offset, length)
            for name in names:
                if name != failed and await self.storage.read(name, offset, length) != content:
                    await self.storage.write(name, offset, content)
        except OwmError as exc:
            log.error("mirror: the legs differ at bytes %d-%d after a failed write, and "
                      "making them agree failed too (%s)", offset, offset + length - 1, exc)
            self._diverge(offset, length, names)
            await self._break_split(offset, length, names, str(exc))
        except BaseException:
            # Anything else (the process stopping) leaves it to the write-intent bits.
            self._diverge(offset, length, names)
            raise

    async def _zero(self, gen: int, offset: int, length: int, punch: bool,
                    ahead: bool = False) -> set[str]:
        first, last = self.chunk_range(offset, length)
        names, marked = self._begin(gen, first, last)
        if marked or ahead or self._must_hold(first, last):
            self._hold(offset, None, length, punch, names)
            return set(names)
        try:
            await self._on_legs(names, offset, length,
                                lambda name: self.put_zero(name, offset, length, punch))
        finally:
            self._end(first, last)
        return set(names)

    def _diverge(self, offset: int, length: int, names: list[str]) -> None:
        """The legs may differ over the range and could not be made to agree now.  Its chunks
        keep their write-intent bits (durable already: the write went straight to the legs)
        until ``_repair_diverged`` has copied them from the primary to the other legs that take
        live writes; a split leg among names gets the chunks in its dirty map, so its release
        recopies them."""
        first, last = self.chunk_range(offset, length)
        self._diverged.update(range(first, last + 1))
        for i, role in enumerate(self.roles):
            if role["role"] == "image" and _leg(i) in names:
                for chunk in range(first, last + 1):
                    self.dirty[i].set(chunk)

    async def _break_split(self, offset: int, length: int, names: list[str],
                           reason: str) -> None:
        """A split leg among names may now hold bytes the live view lacks (or lack some it
        has): its image can no longer be called consistent, so it is marked broken."""
        for i, role in enumerate(self.roles):
            view = role.get("view")
            if (role["role"] == "image" and _leg(i) in names and view is not None
                    and view not in self.broken):
                self.broken.add(view)
                if self.on_broken is not None:
                    await self.on_broken(view, f"a write failed on its leg and the legs could "
                                               f"not be made to agree ({reason})")

    async def _repair_diverged(self) -> None:
        """Copy every chunk ``_diverge`` noted from the primary to the other legs that take
        live writes (in sync or resyncing), durably; raises when that fails."""
        if not self._diverged:
            return
        chunks = sorted(self._diverged)
        written: set[int] = set()
        for chunk in chunks:
            written.update(await self._copy_chunk(chunk, lambda: [
                i for i, r in enumerate(self.roles)
                if r["role"] != "image" and i != self._primary()]))
        await self.sync_objects([_leg(i) for i in written])
        # Their bits clear the usual way now: after a flush has seen no write to them.
        self._diverged.difference_update(chunks)
        self._recent.update(chunks)

    # -- ordered write-back -----------------------------------------------------------------
    def _hold(self, offset: int, data: memoryview | None, length: int, punch: bool,
              names: list[str]) -> None:
        """Keep a write in memory, chunk by chunk, behind earlier ones; it stays in flight (its
        chunks' write-intent bits are not cleared) until it reaches its legs."""
        held = self._held
        legs = tuple(names)
        for chunk, _within, n, done in self.pieces(offset, length):
            piece = None if data is None else data[done : done + n]
            held.setdefault(chunk, []).append((offset + done, piece, n, punch, legs))
            self.held_bytes += ZERO_OP_BYTES if data is None else n
        self.schedule_writeback()

    def writeback_pending(self) -> bool:
        return bool(self._held)

    async def _commit_batch(self) -> None:
        """One group commit: the dirty maps, the write-intent map and the changed maps durable,
        then the held writes reach their legs."""
        # Taken at one instant: every write held here set its bits before it was held.
        counts = {c: len(ops) for c, ops in self._held.items()}
        changed = self._changed_batch()
        results = await asyncio.gather(
            self._commit_changed(changed), self.intent.commit(),
            *(t.commit() for t in self.dirty.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if counts:
            await asyncio.gather(*(self._release_held(c, k) for c, k in counts.items()))

    async def _release_held(self, chunk: int, count: int) -> None:
        """Write a chunk's first ``count`` held writes to their legs, in order.  They stay held
        (and visible to reads) until written; writing one twice after an error is harmless, as
        the later ones follow it again."""
        ops = self._held[chunk]
        for at, piece, n, punch, legs in ops[:count]:
            for name in legs:
                if piece is None:
                    await self.put_zero(name, at, n, punch)
                else:
                    await self.storage.write(name, at, piece)
        self.held_bytes -= sum(ZERO_OP_BYTES if op[1] is None else op[2] for op in ops[:count])
        del ops[:count]
        if not ops:
            del self._held[chunk]
        for _ in range(count):
            self._end(chunk, chunk)

    def abandon(self) -> None:
        super().abandon()
        self._held.clear()

    async def _read(self, view: int, offset: int, length: int) -> bytes:
        held = self._held
        if not held:
            return await super()._read(view, offset, length)
        name = _leg(self._leg_of(view))
        first, last = self.chunk_range(offset, length)
        # Taken before the read: a write the commit releases meanwhile may not be in what the
        # read returns.  (None can be added: that takes the chunk's exclusive lock.)
        ops = [op for c in range(first, last + 1) for op in held.get(c, ()) if name in op[4]]
        content = await self.storage.read(name, offset, length)
        if not ops:
            return content
        buf = bytearray(content)
        end = offset + length
        for at, piece, n, _punch, _legs in ops:
            lo, hi = max(at, offset), min(at + n, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = (
                    bytes(hi - lo) if piece is None else piece[lo - at : hi - at])
        return bytes(buf)

    async def extents(self, view: int, offset: int, length: int) -> list[Extent]:
        # The storage knows nothing of held writes: let them reach it first.
        await self.commit_writeback()
        return await super().extents(view, offset, length)

    def _pending_resync(self, chunk: int) -> bool:
        """May the in-sync legs still differ at chunk (the background resync is not past it)?"""
        lst = self._resync_list
        i = bisect.bisect_left(lst, chunk, self._resync_done)
        return i < len(lst) and lst[i] == chunk

    def _may_clear(self, chunk: int) -> bool:
        return not (self._recent_over or self._settled_over or chunk in self._inflight
                    or chunk in self._recent or chunk in self._settled
                    or chunk in self._diverged or self._pending_resync(chunk))

    async def _flush(self) -> None:
        older = self._settled
        self._settled, self._settled_over = self._recent, self._recent_over
        self._recent, self._recent_over = set(), False
        try:
            await self._repair_diverged()
        except OwmError as exc:  # retried at the next flush; the bits stay meanwhile
            log.warning("mirror: the legs still differ at %d chunks (%s)", len(self._diverged),
                        exc)
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
            if (chunk not in self._inflight and chunk not in self._diverged
                    and not self._pending_resync(chunk)):
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
        self._rerouted()
        # Writes that chose their legs (and dirty marks) before the role changed finish first,
        # and so do the held ones among them: they were not meant for this leg, which the copy
        # below reads from the primary.
        await self.locks.barrier()
        await self.commit_writeback()
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
        # Chunks a failed write left different on the legs taking live writes, this one too.
        await self._repair_diverged()
        await self.group_sync(_leg(leg))()
        await self._step("release-rejoin", -1)
        self.roles[leg] = {"role": "sync"}
        self.dirty.pop(leg, None)
        self._rerouted()
        await table.destroy()
        if progress is not None:
            progress(1, 1)
