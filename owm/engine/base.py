"""The one small interface every engine implements, and the plumbing they share.

An engine keeps the views of one volume in fixed-size chunks on a ``Storage``.  Views are named
by generation; ``views`` lists the existing ones oldest first, the last being the live view.  A
write by generation k lands in views k..live; a read of view v returns view v.  The public
methods here validate the request and take the volume's engine locks (shared for reads,
exclusive for everything that changes data or tables), then call the engine's ``_``-methods,
which may assume they own the chunks they touch.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ClassVar

from owm.common.errors import ImageDamaged, InvalidRequest, OutOfRange
from owm.common.view import Extent
from owm.engine.chunktable import ChunkTable, chunks_of_page
from owm.engine.groupsync import GroupSync
from owm.locks.ranges import EXCLUSIVE, SHARED, RangeLockManager
from owm.storage import Buffer, Storage

Progress = Callable[[int, int], None]
BrokenCallback = Callable[[int, str], Awaitable[None]]
StepHook = Callable[[str, int], Awaitable[None]]

MIN_CHUNK, MAX_CHUNK = 4096, 1 << 20
WRITEBACK_CAP = 32 << 20  # bytes of overwrites an engine may hold before writers wait
WRITEBACK_DELAY = 0.003  # seconds held work waits for company before its group commit

log = logging.getLogger(__name__)
KEEP_CHANGED_MAPS = 64  # generations whose changed-chunk maps are kept
ENOSPC_POLICIES = ("fail-write", "break-image")


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < MIN_CHUNK or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise InvalidRequest(
            f"chunk size {chunk_size} is not a power of two between 4K and 1M"
        )


class SyncTracking:
    """The engine's storage, remembering which objects changed since their last sync.

    A sync of an object nothing wrote since its last completed sync is skipped, so that a
    flush costs what changed, not the number of objects (1000 outstanding images must not
    make every preserve and flush sync 1000 files).  An object is marked synced only when a
    sync completes and no write ended while it ran; a sync under way is never a reason to
    skip another.  Objects found at open count as unsynced.

    A write counts when it ends (its version bump and ``dirty`` mark come after the inner
    write, in a ``finally``): a write under way is not acknowledged, so no flush or FUA has to
    cover it yet, and a sync that ran while it did is not taken as covering it, since the
    write's bump comes after the sync read the version (if the write ends before the sync does,
    the sync sees the change and marks nothing).  An engine's hot path may do exactly this
    itself around ``inner.write`` (``CowEngine._write``), one coroutine fewer per write.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        # Per object: a version bumped when a write starts and again when it ends, and the
        # version a completed sync covered.  Equal means nothing changed since that sync.
        self._version: dict[str, int] = {}
        self._synced_at: dict[str, int] = {}
        self.dirty: set[str] = set()  # written since their last completed sync
        # Tables that may have something to commit, until a flush's commit leaves them idle.
        self.tables: set[ChunkTable] = set()
        self.settled = False  # a full flush ran since open: ``dirty`` is the whole story
        self.syncs = 0  # syncs passed on to the storage

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)  # test hooks of the storage behind (fail_writes, ...)

    def _changed(self, name: str) -> None:
        self.dirty.add(name)
        version = self._version
        version[name] = version.get(name, 0) + 1

    def note_table(self, table: ChunkTable) -> None:
        self.tables.add(table)

    def noted_tables(self) -> list[ChunkTable]:
        """The tables a flush must commit: those with records to commit and those whose commit
        is under way.  A table stays noted until a commit has left it idle, so that a flush
        running beside the one that commits it waits for that commit too."""
        return list(self.tables)

    def committed(self, tables: list[ChunkTable]) -> None:
        """``tables`` were committed: forget those that nothing was recorded in since."""
        for table in tables:
            if table.idle:
                self.tables.discard(table)

    def needs_sync(self, name: str) -> bool:
        return self._synced_at.get(name, -1) != self._version.get(name, 0)

    def read(self, name: str, offset: int, length: int) -> Coroutine[Any, Any, bytes]:
        # Nothing to track: the storage's own coroutine, with none of ours around it.
        return self.inner.read(name, offset, length)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        try:
            await self.inner.write(name, offset, data)
        finally:
            self.wrote(name)

    def wrote(self, name: str) -> None:
        """A write to ``name`` ended (successfully or not: part of it may have landed)."""
        version = self._version
        version[name] = version.get(name, 0) + 1
        self.dirty.add(name)

    async def sync(self, name: str) -> None:
        version = self._version.get(name, 0)
        if self._synced_at.get(name, -1) == version:
            return
        self.syncs += 1
        await self.inner.sync(name)
        if self._version.get(name, 0) == version:
            self._synced_at[name] = version
            self.dirty.discard(name)

    async def allocate(self, name: str, size: int) -> None:
        self._changed(name)
        try:
            await self.inner.allocate(name, size)
        finally:
            self._changed(name)

    async def discard(self, name: str, offset: int, length: int) -> None:
        self._changed(name)
        try:
            await self.inner.discard(name, offset, length)
        finally:
            self._changed(name)

    async def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.inner.extents(name, offset, length)

    async def delete(self, name: str) -> None:
        self._changed(name)
        try:
            await self.inner.delete(name)
        finally:
            self._changed(name)
            self._synced_at.pop(name, None)
            self.dirty.discard(name)  # nothing left to sync
            # A table whose files are deleted is gone (a folded log delta, a released image):
            # what it still had pending must not recreate them at the next flush.
            for table in [t for t in self.tables if name.startswith(t.name + ".")]:
                self.tables.discard(table)
                table.forget()

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def names(self) -> list[str]:
        return self.inner.names()

    def bytes_used(self, name: str) -> int:
        return self.inner.bytes_used(name)

    async def close(self) -> None:
        await self.inner.close()


class Engine(ABC):
    method: ClassVar[str]
    # Awaited at the named steps of background work (a release's merge, move-down or resync),
    # with the chunk it is at (-1: none), so that a test can pause it there, act and resume it;
    # set on an engine, or on its class before a restart.  None in service.
    step_hook: StepHook | None = None
    # The engine's ``_flush`` is exactly "sync its data objects, then commit its tables", so
    # once a full flush ran, a flush may visit only what changed since (see ``flush``).
    generic_flush: ClassVar[bool] = False
    # The engine holds some overwrites in memory until a group commit orders them after what
    # they depend on (``commit_writeback``); FUA, FLUSH and a full backlog wait for it.
    writeback: ClassVar[bool] = False

    def __init__(
        self,
        storage: Storage,
        size: int,
        chunk_size: int,
        *,
        legs: int = 2,
        enospc_policy: str = "fail-write",
        state: dict[str, Any] | None = None,
    ) -> None:
        check_chunk_size(chunk_size)
        if size <= 0:
            raise InvalidRequest("a volume's size must be more than zero bytes")
        if enospc_policy not in ENOSPC_POLICIES:
            raise InvalidRequest(f"unknown full-disk policy {enospc_policy!r}")
        self.storage = SyncTracking(storage)
        self.size = size
        self.chunk_size = chunk_size
        self.shift = chunk_size.bit_length() - 1
        self.chunks = (size + chunk_size - 1) >> self.shift
        self.legs = legs
        self.enospc_policy = enospc_policy
        self.state: dict[str, Any] = dict(state or {})  # persisted by the volume's catalog row
        self.views: list[int] = [0]
        self.locks = RangeLockManager()
        self.on_broken: BrokenCallback | None = None
        self.broken: set[int] = set()  # preserved views that lost data (full disk)
        # Views a corrupt chunk table leaves untrustworthy (view -> why); reads and writes of
        # them are refused with EIO.  Kept in ``state`` so that it outlives the table's repair.
        self.damaged: dict[int, str] = {}
        self.warnings: list[str] = []  # what loading the tables found and repaired
        self._syncs: dict[str, GroupSync] = {}
        self.zero_chunk = bytes(chunk_size)
        # Chunks written by each generation >= 1, for incremental backups.  A chunk's bit is
        # durable before any write to it in its generation can change what a view shows after
        # a crash (write-ahead), so the maps stay a superset of what changed across a kill or
        # a power loss.  A write-back engine holds such a write until its group commit has made
        # the bit durable (``_may_defer``); the others wait for the bit's commit first.
        self.changed: dict[int, ChunkTable] = {}
        # Chunks (and their bytes) copied aside so that a preserved image keeps its data: plain
        # counters, read by the daemon's metrics at scrape time.
        self.cow_copies = 0
        self.cow_copy_bytes = 0
        # Per generation: chunks whose changed bit is set in memory but not known durable (set
        # since the last commit of the map that covered them, or a commit of it failed).  A
        # write to one of them is held or waits, as a first write does.
        self._changed_ahead: dict[int, set[int]] = {}
        self.held_bytes = 0  # memory held by a write-back engine's overwrites
        self.held_cap = WRITEBACK_CAP
        self._committer = GroupSync(self._commit_batch)
        self._wb_timer: asyncio.TimerHandle | None = None
        self._wb_task: asyncio.Task[None] | None = None

    # -- lifecycle (engine-specific) ----------------------------------------------------------
    @abstractmethod
    async def open(self, views: list[int], releasing: list[int], clean: bool) -> None:
        """Load tables for ``views`` (oldest first, live last) after a restart; ``releasing``
        are views whose release had begun and is to be resumed by ``release``."""

    @abstractmethod
    async def preserve(self) -> int:
        """Freeze the live view as a preserved image and start a new live view; return the
        preserved generation.  Must cost the same whatever the volume's size."""

    @abstractmethod
    async def release(self, view: int, progress: Progress | None = None) -> None:
        """Discard drained view ``view`` and reclaim the storage only it used (resumable)."""

    async def close(self) -> None:
        await self.flush()
        if self._wb_timer is not None:
            self._wb_timer.cancel()
            self._wb_timer = None
        for table in self.changed.values():
            await table.checkpoint()

    # -- ordered write-back ([writeback engines]) ---------------------------------------------
    def abandon(self) -> None:
        """Drop what is held in memory without writing it (a crash)."""
        if self._wb_timer is not None:
            self._wb_timer.cancel()
            self._wb_timer = None
        if self._wb_task is not None:
            self._wb_task.cancel()
        self.held_bytes = 0
        self._changed_ahead.clear()

    def writeback_pending(self) -> bool:
        """Is anything held that a commit would make durable or release?"""
        return False

    async def _commit_batch(self) -> None:
        """One group commit of what is held (write-back engines).  An engine takes what it
        releases, then ``_changed_batch()``, at one instant, and releases nothing that a view
        shows after a crash before ``_commit_changed`` of that batch has returned."""
        await self._commit_changed(self._changed_batch())

    async def commit_writeback(self) -> None:
        """Make everything held so far reach its storage in order (what it depends on durable
        first); group-committed: it waits for a commit that started after the call."""
        if self.writeback_pending() or self._changed_ahead:
            await self._committer()

    def schedule_writeback(self) -> None:
        """A commit soon, shared by whatever is held meanwhile."""
        if self._wb_timer is None:
            self._wb_timer = asyncio.get_running_loop().call_later(
                WRITEBACK_DELAY, self._start_writeback)

    def _start_writeback(self) -> None:
        self._wb_timer = None
        self._wb_task = asyncio.get_running_loop().create_task(self._background_commit())

    async def _background_commit(self) -> None:
        try:
            await self.commit_writeback()
        except Exception as exc:  # the next FLUSH, FUA or full backlog retries and reports it
            log.warning("write-back commit failed, retried at the next flush: %s", exc)
            return
        if self.writeback_pending() or self._changed_ahead:
            self.schedule_writeback()

    async def destroy(self) -> None:
        for name in self.storage.names():
            await self.storage.delete(name)

    def bytes_on_disk(self, view: int) -> int:
        return sum(self.storage.bytes_used(n) for n in self.objects_of(view))

    @abstractmethod
    def objects_of(self, view: int) -> list[str]:
        """Storage objects that belong to ``view`` alone (for size reporting)."""

    async def _step(self, what: str, chunk: int) -> None:
        if self.step_hook is not None:
            await self.step_hook(what, chunk)

    # -- changed-chunk maps -------------------------------------------------------------------
    def _changed_table(self, gen: int) -> ChunkTable:
        return ChunkTable(self.storage, f"changed-{gen}", self.chunks)

    async def load_changed(self, untrusted: list[int]) -> None:
        """Load the maps found in storage; remember which generations cannot be trusted.

        ``untrusted`` are the generations that were being written when the engine stopped
        uncleanly.  Their maps are trusted anyway once every write they saw was preceded by a
        durable bit (``state["changed_durable"]``, set at the first start of an owm that does
        so): only maps an older owm left after a crash are distrusted.
        """
        gens = sorted({int(n.split("-")[1].split(".")[0]) for n in self.storage.names()
                       if n.startswith("changed-")})
        self.changed = {}
        for gen in gens:
            table = self._changed_table(gen)
            await table.load()
            self.changed[gen] = table
        known = set(self.state.get("changed_untrusted", []))
        if not self.state.get("changed_durable"):
            known |= set(untrusted)
        self.state["changed_untrusted"] = sorted(known)
        # Saved with the engine's state before the volume serves anything, so every write
        # from now on is one whose bit is durable first.
        self.state["changed_durable"] = True

    def _mark_changed(self, gen: int, first: int, last: int) -> bool:
        """Set the chunks' bits in generation ``gen``'s map.  True when one of them is not
        known durable: then nothing the write changes may reach what a view shows after a crash
        before a commit of the map (``_commit_changed``) has made it durable.  A write to chunks
        whose bits are durable costs a lookup."""
        if gen == 0:
            return False  # an incremental backup always starts from an image, never before gen 1
        table = self.changed.get(gen)
        if table is None:
            table = self.changed[gen] = self._changed_table(gen)
        ahead = self._changed_ahead.get(gen)
        if first == last:
            # The common case, one chunk: its bit set and durable costs one lookup.
            if table.has(first):
                if not ahead or first not in ahead:
                    return False
            else:
                table.set(first)
            if ahead is None:
                ahead = self._changed_ahead[gen] = set()
            ahead.add(first)
            return True
        before = table.count
        table.set_range(first, last)
        if table.count == before:
            # Every bit was set already: the write waits only if one of them is not durable.
            if not ahead:
                return False
            if len(ahead) <= last - first:
                if not any(first <= c <= last for c in ahead):
                    return False
            elif ahead.isdisjoint(range(first, last + 1)):
                return False
        if ahead is None:
            ahead = self._changed_ahead[gen] = set()
        ahead.update(range(first, last + 1))
        return True

    def _changed_batch(self, gen: int | None = None) -> dict[int, set[int]]:
        """What a commit of the changed maps covers (of generation ``gen`` alone, or all)."""
        ahead = self._changed_ahead
        if gen is not None:
            return {gen: set(ahead[gen])} if ahead.get(gen) else {}
        return {g: set(chunks) for g, chunks in ahead.items() if chunks}

    async def _commit_changed(self, batch: dict[int, set[int]]) -> None:
        """Make the bits of ``batch`` durable; only then are they known durable (a failed
        commit leaves them ahead: the next write to them waits again)."""
        if not batch:
            return
        await asyncio.gather(*(self.changed[g].commit() for g in batch if g in self.changed))
        for g, chunks in batch.items():
            if g not in self.changed:  # pruned meanwhile: nothing left to make durable
                self._changed_ahead.pop(g, None)
                continue
            left = self._changed_ahead.get(g)
            if left is not None:
                left -= chunks
                if not left:
                    del self._changed_ahead[g]

    def _may_defer(self, gen: int, first: int, last: int) -> bool:
        """Can the engine hold this write (visible to reads) until its group commit has made
        the changed bits durable, instead of waiting for them before it starts?  Only when
        nothing the write puts on storage before that commit is shown by a view after a
        crash."""
        return False

    async def prune_changed(self) -> None:
        for gen in sorted(self.changed)[:-KEEP_CHANGED_MAPS]:
            await self.changed.pop(gen).destroy()

    def changed_chunks(self, since: int, upto: int) -> list[int] | None:
        """Chunks that may differ between view ``since`` and view ``upto`` (None: unknown)."""
        if since >= upto:
            raise InvalidRequest(f"generation {since} is not older than generation {upto}")
        untrusted = set(self.state.get("changed_untrusted", []))
        oldest_kept = min(self.changed, default=since + 1)
        gens = range(since + 1, upto + 1)
        if any(g in untrusted for g in gens) or (since + 1 < oldest_kept and
                                                   len(self.changed) >= KEEP_CHANGED_MAPS):
            return None
        merged: dict[int, int] = {}  # page by page: the cost follows the chunks set
        for gen in gens:
            table = self.changed.get(gen)
            if table is not None:
                for first, bits in table.page_bits():
                    merged[first] = merged.get(first, 0) | bits
        return [c for first in sorted(merged) for c in chunks_of_page(first, merged[first])]

    # -- damaged tables -----------------------------------------------------------------------
    def chunk_tables(self) -> list[ChunkTable]:
        """The engine's own loaded tables (besides the changed-chunk maps)."""
        return []

    def damaged_by_tables(self) -> dict[int, str]:
        """Views that the engine's damaged tables leave untrustworthy (view -> why)."""
        return {}

    def check_tables(self) -> dict[int, str]:
        """After ``open`` and ``load_changed``: gather what the tables' loading found.  Damaged
        changed-chunk maps only make their generations untrusted; damaged engine tables damage
        views.  Returns every damaged view (also those recorded at earlier starts)."""
        warnings: list[str] = []
        untrusted = set(self.state.get("changed_untrusted", []))
        for gen, table in sorted(self.changed.items()):
            if table.gone:  # being pruned: empty would claim "nothing changed"
                untrusted.add(gen)
            if table.damaged:
                untrusted.add(gen)
                warnings.append(f"{table.damaged}; incremental backups over generation {gen} "
                                "read every chunk")
            warnings.extend(table.warnings)
        self.state["changed_untrusted"] = sorted(untrusted)
        found = self.damaged_by_tables()
        for table in self.chunk_tables():
            warnings.extend(table.warnings)
        known = {int(k): str(v) for k, v in self.state.get("damaged", {}).items()
                 if int(k) in self.views}
        for view, reason in found.items():
            known.setdefault(view, reason)
        if known:
            self.state["damaged"] = {str(k): v for k, v in sorted(known.items())}
        else:
            self.state.pop("damaged", None)
        self.damaged = known
        self.warnings = warnings
        return dict(known)

    def _refuse_damaged(self, view: int, writing: bool = False) -> None:
        if not self.damaged:
            return
        hit = [v for v in self.damaged if v >= view and v in self.views] if writing else \
            [view] if view in self.damaged else []
        if hit:
            what = "the live volume" if hit[0] == self.views[-1] else f"image {hit[0]}"
            raise ImageDamaged(f"{what} is damaged ({self.damaged[hit[0]]}); owm refuses to "
                               "serve it")

    # -- data path ----------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if length <= 0:
            raise InvalidRequest("a request must cover at least one byte")
        if offset < 0 or offset + length > self.size:
            raise OutOfRange(
                f"bytes {offset}..{offset + length} lie outside the volume of {self.size} bytes"
            )

    def _check_view(self, view: int) -> None:
        if view not in self.views:
            raise InvalidRequest(f"generation {view} has no view")

    def _refuse(self, view: int, offset: int, length: int, writing: bool) -> None:
        """Every check of a request, in order: its range, its view, damaged tables.  The data
        path calls it only when its one combined test says one of them may fail (or some view
        is damaged, which needs the full look)."""
        self._check(offset, length)
        self._check_view(view)
        self._refuse_damaged(view, writing)

    def chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self.shift, (offset + length - 1) >> self.shift

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Split a byte range per chunk: (chunk, offset in chunk, length, offset in request)."""
        done = 0
        mask = self.chunk_size - 1
        while done < length:
            pos = offset + done
            chunk, within = pos >> self.shift, pos & mask
            n = min(self.chunk_size - within, length - done)
            yield chunk, within, n, done
            done += n

    # read and write are the hot path: one combined test stands for the three checks (the
    # full ones run only when it fails), and the chunk range is computed inline.

    async def read(self, view: int, offset: int, length: int) -> bytes:
        if not 0 <= offset < offset + length <= self.size or self.damaged or \
                view not in self.views:
            self._refuse(view, offset, length, False)
        shift = self.shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        locks = self.locks
        fut = locks.try_acquire(first, last, SHARED)
        if fut is not None:
            await fut
        try:
            return await self._read(view, offset, length)
        finally:
            locks.release(first, last)

    async def write(self, gen: int, offset: int, data: Buffer, fua: bool = False) -> None:
        length = len(data)
        if not 0 <= offset < offset + length <= self.size or self.damaged or \
                gen not in self.views:
            self._refuse(gen, offset, length, True)
        # A full backlog waits here, before taking any lock (a commit takes none); only a
        # write-back engine holds bytes.
        while self.held_bytes >= self.held_cap and self.writeback:
            await self.commit_writeback()
        shift = self.shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        locks = self.locks
        fut = locks.try_acquire(first, last, EXCLUSIVE)
        if fut is not None:
            await fut
        try:
            # Generation 0 keeps no changed map (see _mark_changed).
            ahead = self._mark_changed(gen, first, last) if gen else False
            if ahead and not self._may_defer(gen, first, last):
                await self._commit_changed(self._changed_batch(gen))
                ahead = False
            touched = await self._write(gen, offset, data, ahead)
        finally:
            locks.release(first, last)
        if ahead:
            self.schedule_writeback()
        if fua:
            if self.writeback:
                await self.commit_writeback()  # what it left held reaches the storage first
            await self.sync_objects(touched)

    async def zero(
        self, gen: int, offset: int, length: int, punch: bool = True, fua: bool = False
    ) -> None:
        self._check(offset, length)
        self._check_view(gen)
        self._refuse_damaged(gen, writing=True)
        if self.writeback:
            while self.held_bytes >= self.held_cap:
                await self.commit_writeback()
        first, last = self.chunk_range(offset, length)
        async with self.locks.locked(first, last, EXCLUSIVE):
            ahead = self._mark_changed(gen, first, last)
            if ahead and not self._may_defer(gen, first, last):
                await self._commit_changed(self._changed_batch(gen))
                ahead = False
            touched = await self._zero(gen, offset, length, punch, ahead)
        if ahead:
            self.schedule_writeback()
        if fua:
            if self.writeback:
                await self.commit_writeback()
            await self.sync_objects(touched)

    async def extents(self, view: int, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        self._check_view(view)
        self._refuse_damaged(view)
        first, last = self.chunk_range(offset, length)
        async with self.locks.locked(first, last, SHARED):
            runs: list[tuple[int, int, bool]] = []
            for name, start, n in self._placement(view, offset, length):
                runs.extend(await self.storage.extents(name, start, n))
        return merge_runs(runs)

    async def _read(self, view: int, offset: int, length: int) -> bytes:
        parts = [
            await self.storage.read(name, start, n)
            for name, start, n in self._placement(view, offset, length)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @abstractmethod
    async def _write(self, gen: int, offset: int, data: Buffer, ahead: bool = False) -> set[str]:
        """Apply the write; return the storage objects it wrote (a FUA syncs them).  ``ahead``:
        its changed bits are not durable yet (``_may_defer`` said it can hold the write until
        the group commit has made them so)."""

    @abstractmethod
    async def _zero(self, gen: int, offset: int, length: int, punch: bool,
                    ahead: bool = False) -> set[str]: ...

    @abstractmethod
    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        """Where view's bytes live: (object, offset in object, length) runs in order."""

    # -- durability ---------------------------------------------------------------------------
    def group_sync(self, name: str) -> GroupSync:
        gs = self._syncs.get(name)
        if gs is None:
            gs = self._syncs[name] = GroupSync(lambda: self.storage.sync(name))
        return gs

    async def sync_objects(self, names: set[str] | list[str]) -> None:
        names = [n for n in names if self.storage.needs_sync(n)]
        if len(names) == 1:
            await self.group_sync(names[0])()  # the common case: no task to gather one sync
        elif names:
            await asyncio.gather(*(self.group_sync(n)() for n in names))

    async def flush(self) -> None:
        """Make every write completed so far durable in every view.

        The cost follows what changed since the last flush, not the number of objects or
        tables (a thousand outstanding images must not make every flush visit each)."""
        if self.writeback:
            await self.commit_writeback()  # held overwrites reach the storage first
        storage = self.storage
        if self.generic_flush and storage.settled:
            # Data first, then table entries (which only ever point at durable data).
            await self.sync_objects(sorted(storage.dirty))
            # Every noted table, not only those no other flush is committing: a flush that
            # found them taken and returned would acknowledge writes whose entries were still
            # on their way to the journal.
            tables = storage.noted_tables()
            await asyncio.gather(*(t.commit() for t in tables))
            storage.committed(tables)
            return
        await self._flush()
        await asyncio.gather(*(t.commit() for t in self.changed.values()))
        storage.settled = True

    @abstractmethod
    async def _flush(self) -> None:
        """The engine's own part of flush: its data objects and tables."""

    # -- helpers for engines ------------------------------------------------------------------
    async def put(self, name: str, offset: int, data: Buffer, punch: bool = True) -> None:
        """Write data, or punch a hole when it is all zeroes and punching is allowed."""
        if punch and self.all_zero(data):
            await self.storage.discard(name, offset, len(data))
        else:
            await self.storage.write(name, offset, data)

    def all_zero(self, data: Buffer) -> bool:
        """Is data all zeroes?  Compared a chunk at a time with a zeroed chunk (a memcmp):
        ``any(data)`` walks the bytes one by one, milliseconds for a mostly empty 64 KiB chunk,
        which every copy of a chunk paid."""
        zero = self.zero_chunk
        step = len(zero)
        if isinstance(data, bytes) and len(data) <= step:  # a chunk's copy: no slice to make
            return data == (zero if len(data) == step else zero[: len(data)])
        view = memoryview(data)
        for at in range(0, len(view), step):
            piece = view[at : at + step].tobytes()
            if piece != (zero if len(piece) == step else zero[: len(piece)]):
                return False
        return True

    async def put_zero(self, name: str, offset: int, length: int, punch: bool) -> None:
        if punch:
            await self.storage.discard(name, offset, length)
            return
        step = 1 << 20
        zero = bytes(min(step, length))
        done = 0
        while done < length:
            n = min(step, length - done)
            await self.storage.write(name, offset + done, zero[:n] if n < len(zero) else zero)
            done += n


def merge_runs(runs: list[tuple[int, int, bool]]) -> list[Extent]:
    out: list[Extent] = []
    for _start, length, is_data in runs:
        hole = not is_data
        if out and out[-1].hole == hole:
            out[-1] = Extent(out[-1].length + length, hole=hole, zero=hole)
        else:
            out.append(Extent(length, hole=hole, zero=hole))
    return out


def group_runs(
    items: Iterator[tuple[str, int, int]],
) -> Iterator[tuple[str, int, int]]:
    """Join consecutive (object, offset, length) runs that continue each other."""
    cur: tuple[str, int, int] | None = None
    for name, off, n in items:
        if cur is not None and cur[0] == name and cur[1] + cur[2] == off:
            cur = (name, cur[1], cur[2] + n)
            continue
        if cur is not None:
            yield cur
        cur = (name, off, n)
    if cur is not None:
        yield cur
