"""A volume: its engine, its generation chain, its sessions and the drain of its images.

A session is bound to the live generation when it opens.  ``preserve`` freezes the live view as
image N and opens generation N+1 for every later session.  Image N is *drained* once no session of
generation <= N is open; ``cutover`` rebinds such sessions forward so that it stops changing now
(it is then only crash-consistent).  Sessions that end without a clean close still end, but
the images they held are marked drained-unclean with a count.  ``release`` hands a drained image to
the engine to reclaim, in the background, resuming after a restart.

Labels stay true when the catalog cannot be written (a full disk).  An unclean end is counted in
memory before the session leaves ``sessions`` (so no drain can complete without it) and in the
catalog in the same transaction as the session's end.  Every other state change is made in
memory only after the catalog has recorded it: a drain that could not be recorded stays
*draining* and is tried again in the background; an image that could not be marked broken is not
broken, because the write that would have broken it is refused; a release that failed part-way
stays *releasing* and the next ``release`` resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar

from owm.catalog import ImageRow, VolumeRow, now
from owm.common.errors import (
    ImageBroken,
    ImageDamaged,
    InvalidRequest,
    NoSpace,
    NotFound,
    OwmError,
    ReadOnly,
    WrongState,
)
from owm.common.view import Extent
from owm.engine import Engine
from owm.engine.base import Progress
from owm.engine.mirror import MirrorEngine
from owm.pool.clone import LiveRestore
from owm.storage import Buffer

if TYPE_CHECKING:
    from owm.catalog import Catalog

T = TypeVar("T")
log = logging.getLogger("owm.pool.volume")

SETTLE_RETRY_FIRST, SETTLE_RETRY_MAX = 0.5, 5.0  # seconds between tries to record a drain

DbCall = Callable[[Callable[["Catalog"], T]], Awaitable[T]]

# Upper bounds (seconds) of the request latency histograms and of the image-reader session
# histogram; the metrics collector turns the per-bucket counts into cumulative ones.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
READER_BOUNDS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)



def _never_transaction_consistent(image: ImageRow) -> None:
    """A session of a draining image ended uncleanly: its transactions may be half done, so
    the image can at best end crash-consistent.  Say so at once, not only once it drains: a
    label must never claim more than can still come true."""
    if image.consistency == "transaction-consistent":
        image.consistency = "crash-consistent"

class OpStats:
    """Counters of one kind of request: plain integers on the I/O path, nothing else."""

    __slots__ = ("bounds", "buckets", "bytes", "count", "errors", "seconds")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.count = 0
        self.bytes = 0
        self.errors = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf

    def done(self, nbytes: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.count += 1
        self.bytes += nbytes
        self.seconds += elapsed
        self.buckets[bisect_left(self.bounds, elapsed)] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "errors": self.errors,
                "seconds": self.seconds, "bounds": list(self.bounds),
                "buckets": list(self.buckets)}


class VolumeStats:
    """What a volume counts for the daemon's metrics (owm.control.metrics reads a snapshot)."""

    def __init__(self) -> None:
        self.read = OpStats()
        self.write = OpStats()
        self.zero = OpStats()  # WRITE_ZEROES and TRIM
        self.flush = OpStats()
        self.image_read = OpStats()  # reads of preserved images (backups pull through these)
        self.reader_sessions = OpStats(READER_BOUNDS)  # whole reader sessions, open to close
        self.sessions_opened = 0
        self.sessions_unclean = 0
        self.preserves = 0
        self.cutovers = 0
        self.releases = 0
        self.last_drain_seconds: float | None = None  # preserve -> drained, last image drained
        self.last_drain_image: int | None = None


class Session:
    """A client session of the live export: a read-write view bound to a generation."""

    read_only = False

    def __init__(self, volume: Volume, sid: int, generation: int, peer: str) -> None:
        self.volume = volume
        self.id = sid
        self.generation = generation
        self.peer = peer
        self.opened_at = now()
        self.opened_mono = time.monotonic()
        self.bytes_read = 0
        self.bytes_written = 0
        self.closed = False
        self.export_name = volume.name
        self.size = volume.size

    def _check_open(self) -> None:
        if self.closed:
            raise WrongState("this session is closed")

    # read and write are the hot path: the in-flight count (_enter) and the statistics
    # (OpStats.done) are inlined, and a write with no live restore awaits the engine directly
    # rather than through a null context.

    async def read(self, offset: int, length: int) -> bytes:
        if self.closed:
            raise WrongState("this session is closed")
        volume = self.volume
        stats = volume.stats.read
        started = perf_counter()
        gen = self.generation
        inflight = volume._inflight
        inflight[gen] = inflight.get(gen, 0) + 1
        try:
            live = volume.live_restore
            if live is not None:
                await live.before_read(offset, length)
            data = await volume.engine.read(gen, offset, length)
        except Exception:
            stats.errors += 1
            raise
        finally:
            n = inflight[gen] - 1
            if n:
                inflight[gen] = n
            else:
                del inflight[gen]
                if volume._quiet is not None:
                    volume._quiet.set()
        elapsed = perf_counter() - started
        stats.count += 1
        stats.bytes += length
        stats.seconds += elapsed
        stats.buckets[bisect_left(stats.bounds, elapsed)] += 1
        self.bytes_read += length
        return data

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.closed:
            raise WrongState("this session is closed")
        volume = self.volume
        stats = volume.stats.write
        started = perf_counter()
        gen = self.generation
        inflight = volume._inflight
        inflight[gen] = inflight.get(gen, 0) + 1
        length = len(data)
        try:
            live = volume.live_restore
            if live is None:
                await volume.engine.write(gen, offset, data, fua)
            else:
                async with live.writing(offset, length):
                    await volume.engine.write(gen, offset, data, fua)
        except Exception:
            stats.errors += 1
            raise
        finally:
            n = inflight[gen] - 1
            if n:
                inflight[gen] = n
            else:
                del inflight[gen]
                if volume._quiet is not None:
                    volume._quiet.set()
        elapsed = perf_counter() - started
        stats.count += 1
        stats.bytes += length
        stats.seconds += elapsed
        stats.buckets[bisect_left(stats.bounds, elapsed)] += 1
        self.bytes_written += length

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._check_open()
        stats = self.volume.stats.zero
        started = time.perf_counter()
        gen = self.volume._enter(self.generation)
        try:
            async with self.volume.writing(offset, length):
                await self.volume.engine.zero(gen, offset, length, punch=may_trim, fua=fua)
        except Exception:
            stats.errors += 1
            raise
        finally:
            self.volume._leave(gen)
        stats.done(length, started)
        self.bytes_written += length

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Trimmed bytes read back as zeroes in owm: the model stays exact.
        await self.write_zeroes(offset, length, fua=fua, may_trim=True)

    async def flush(self) -> None:
        self._check_open()
        stats = self.volume.stats.flush
        started = time.perf_counter()
        try:
            await self.volume.engine.flush()
        except Exception:
            stats.errors += 1
            raise
        stats.done(0, started)

    async def cache(self, offset: int, length: int) -> None:
        self._check_open()
        self.volume.engine._check(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_open()
        live = self.volume.live_restore
        if live is not None and live.unfilled(offset, length):
            return [Extent(length)]  # not filled yet: data, whatever the volume holds now
        return await self.volume.engine.extents(self.generation, offset, length)

    async def close(self, clean: bool = True) -> None:
        if not self.closed:
            self.closed = True
            await self.volume._session_closed(self, clean)

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "peer": self.peer, "connected_since": self.opened_at,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


class ImageReader:
    """A read-only view of a preserved image; not a session of any generation."""

    read_only = True

    def __init__(self, volume: Volume, generation: int) -> None:
        self.volume = volume
        self.generation = generation
        self.export_name = f"{volume.name}@{generation}"
        self.size = volume.size
        self.closed = False
        self.opened_perf = time.perf_counter()
        self.bytes_read = 0

    def _check(self) -> None:
        if self.closed:
            raise WrongState("this reader is closed")
        image = self.volume.images.get(self.generation)
        if image is None or image.state == "releasing":
            raise WrongState(f"image {self.export_name} has been released")
        if image.state == "broken":
            raise ImageBroken(f"image {self.export_name} is broken: {image.broken_reason}")

    async def read(self, offset: int, length: int) -> bytes:
        self._check()
        stats = self.volume.stats.image_read
        started = time.perf_counter()
        try:
            data = await self.volume.engine.read(self.generation, offset, length)
        except Exception:
            stats.errors += 1
            raise
        stats.done(length, started)
        self.bytes_read += length
        return data

    async def _refuse(self) -> None:
        self._check()
        raise ReadOnly(f"{self.export_name} is a preserved image and is read-only")

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._refuse()

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        await self._refuse()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._refuse()

    async def flush(self) -> None:
        self._check()

    async def cache(self, offset: int, length: int) -> None:
        self._check()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check()
        return await self.volume.engine.extents(self.generation, offset, length)

    async def close(self, clean: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self.volume.readers[self.generation] -= 1
            self.volume.stats.reader_sessions.done(self.bytes_read, self.opened_perf)


class Volume:
    def __init__(self, row: VolumeRow, engine: Engine, db: DbCall[Any]) -> None:
        self.row = row
        self.engine = engine
        self._db = db
        self.sessions: dict[int, Session] = {}
        self.readers: Counter[int] = Counter()
        self.images: dict[int, ImageRow] = {}
        self._drained: dict[int, asyncio.Event] = {}
        self._inflight: dict[int, int] = {}  # requests under way, by generation (none: absent)
        self._quiet: asyncio.Event | None = None  # set when in-flight requests finish
        self._control = asyncio.Lock()  # one preserve / cutover / release at a time
        self._preserving: asyncio.Event | None = None
        self._releases: dict[int, asyncio.Task[None]] = {}
        self.release_progress: dict[int, tuple[int, int]] = {}
        self._settling = asyncio.Lock()
        self._settle_retry: asyncio.Task[None] | None = None
        self.closing = False
        self.live_restore: LiveRestore | None = None  # set while a live restore fills it
        engine.on_broken = self._image_broken
        self.stats = VolumeStats()
        self._preserved_perf: dict[int, float] = {}  # when each image of this run was preserved
        self._split_started = 0.0

    def writing(self, offset: int, length: int) -> AbstractAsyncContextManager[None]:
        """What surrounds a client write: a live restore's first-write work, else nothing."""
        if self.live_restore is None:
            return contextlib.nullcontext()
        return self.live_restore.writing(offset, length)

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def size(self) -> int:
        return self.row.size

    @property
    def live(self) -> int:
        return self.engine.views[-1]

    async def start(
        self, images: list[ImageRow], clean: bool, vanished: list[tuple[int, int]]
    ) -> None:
        """Open the engine, end the sessions a crash cut off (``vanished``: id, generation),
        settle drains and resume unfinished releases."""
        self.images = {i.generation: i for i in images}
        counted: dict[int, ImageRow] = {}
        for _sid, session_gen in vanished:
            for gen, image in self.images.items():
                if image.state == "draining" and gen >= session_gen:
                    image.unclean_sessions += 1
                    _never_transaction_consistent(image)
                    counted[gen] = image
        if vanished:
            # The sessions' ends and the counts they raise in one transaction: a crash between
            # the two would otherwise let the next start drain these images as clean.
            rows = [dataclasses.replace(i) for i in counted.values()]
            await self._db(lambda c: c.end_sessions_unclean(self.name, rows))
        views = [g for g, i in self.images.items() if i.state != "releasing"]
        releasing = [g for g, i in self.images.items() if i.state == "releasing"]
        await self.engine.open([*sorted(views), self.row.live_generation], releasing, clean)
        # After a crash, the changed-chunk maps of generations still being written may have
        # lost bits: incremental backups spanning them read everything instead.
        untrusted = [] if clean else [self.row.live_generation] + [
            g for g, i in self.images.items() if i.state == "draining"]
        await self.engine.load_changed(untrusted)
        await self._mark_damaged(self.engine.check_tables())
        for image in self.images.values():
            self._drained[image.generation] = asyncio.Event()
            if image.state != "draining":
                self._drained[image.generation].set()
            if image.state == "broken":
                self.engine.broken.add(image.generation)
        await self._db(lambda c: c.save_engine_state(self.name, self.engine.state))
        await self._settle_drains()
        for gen in releasing:
            self._start_release(gen, None)

    async def _mark_damaged(self, damaged: dict[int, str]) -> None:
        """Label what a corrupt chunk table left untrustworthy, and say so once in the log."""
        for gen, reason in sorted(damaged.items()):
            image = self.images.get(gen)
            if image is None:
                log.error("volume %s is damaged: %s; its reads and writes are refused",
                          self.name, reason)
            elif image.state not in ("damaged", "releasing"):
                image.state, image.consistency, image.broken_reason = "damaged", "damaged", reason
                await self._db(lambda c, i=image: c.update_image(i))  # type: ignore[misc]
                log.error("image %s@%d is damaged: %s; its reads are refused", self.name, gen,
                          reason)
        for warning in self.engine.warnings:
            log.warning("volume %s: %s", self.name, warning)

    # -- in-flight accounting (cutover waits for requests of the generations it rebinds) ------
    def _enter(self, gen: int) -> int:
        inflight = self._inflight
        inflight[gen] = inflight.get(gen, 0) + 1
        return gen

    def _leave(self, gen: int) -> None:
        inflight = self._inflight
        n = inflight[gen] - 1
        if n:
            inflight[gen] = n
            return
        del inflight[gen]
        if self._quiet is not None:
            self._quiet.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until no request of any generation is under way;
        whether it got there."""
        try:
            await asyncio.wait_for(self._wait_quiet(self.live), timeout)
        except TimeoutError:
            return False
        return True

    async def _wait_quiet(self, upto: int) -> None:
        while any(g <= upto for g in self._inflight):
            self._quiet = asyncio.Event()
            await self._quiet.wait()
        self._quiet = None

    # -- sessions ---------------------------------------------------------------------------
    async def open_session(self, peer: str) -> Session:
        if self._preserving is not None:
            await self._preserving.wait()
        gen = self.live
        sid = await self._db(lambda c: c.open_session(self.name, gen, peer))
        # The session is bound below, with no await after this loop.  A (group) preserve that
        # began while the catalog was written is waited for, so that no session binds while a
        # group's members are being split one after the other: the cut stays one instant
        # across every member (see owm.pool.groups).
        while self._preserving is not None:
            await self._preserving.wait()
        # A preserve that completed while the catalog was written did not count this session
        # among its holders: it opened after that preserve, so it belongs to the newest
        # generation (the catalog row is corrected when the session closes).
        session = Session(self, sid, self.live, peer)
        self.sessions[sid] = session
        self.stats.sessions_opened += 1
        return session

    async def _session_closed(self, session: Session, clean: bool) -> None:
        if clean and any(image.state == "draining" and gen >= session.generation
                         for gen, image in self.images.items()):
            # A clean close is recorded only once the session's writes are durable: recorded
            # first, a power failure during the drain's flush would bring the image back as
            # transaction-consistent without the session's last acknowledged writes.  The
            # session still holds its images while this runs.
            try:
                await self.engine.flush()
            except OwmError as exc:
                log.warning("session %d of %s closed, but its writes could not be made "
                            "durable (%s): counted as unclean", session.id, self.name, exc)
                clean = False
        # Count an unclean end before the session stops holding anything and before any await:
        # whatever sees the image drained (another session's drain, a status call) sees it.
        counted: list[ImageRow] = []
        if not clean:
            for gen, image in self.images.items():
                if image.state == "draining" and gen >= session.generation:
                    image.unclean_sessions += 1
                    _never_transaction_consistent(image)
                    counted.append(image)
        del self.sessions[session.id]
        if not clean:
            self.stats.sessions_unclean += 1
            log.warning("session %d of %s ended without a clean close", session.id, self.name)
        rows = [dataclasses.replace(i) for i in counted]
        try:
            await self._db(lambda c: c.close_session(session.id, clean, session.bytes_read,
                                                     session.bytes_written, session.generation,
                                                     rows))
        except OwmError as exc:
            # The catalog still has the session open: after a restart it counts as unclean,
            # which is the weaker label, never a stronger one.
            log.error("could not record the end of session %d of %s: %s", session.id,
                      self.name, exc)
        await self._settle_drains()

    def holders(self, gen: int) -> list[Session]:
        """Open sessions that keep image ``gen`` from draining."""
        return [s for s in self.sessions.values() if s.generation <= gen]

    async def _settle_drains(self) -> bool:
        """Mark every image that no session holds any more as drained, catalog first; False
        when one could not be recorded (a retry is then scheduled)."""
        async with self._settling:
            for gen, image in sorted(self.images.items()):
                if image.state != "draining" or self.holders(gen):
                    continue
                try:
                    # A drained image never changes again, crash or not: make it durable first.
                    await self.engine.flush()
                    row = dataclasses.replace(
                        image, state="drained-unclean" if image.unclean_sessions else "drained",
                        drained_at=now())
                    if image.unclean_sessions:
                        row.consistency = "crash-consistent"  # (a cutover set it already)
                    await self._db(lambda c, r=row: c.update_image(r))  # type: ignore[misc]
                except OwmError as exc:
                    # Not recorded, so not drained yet: say so, and try again shortly.
                    log.error("image %s@%d has drained but that could not be recorded (%s); "
                              "trying again", self.name, gen, exc)
                    self._retry_settle()
                    return False
                image.state, image.drained_at = row.state, row.drained_at
                image.consistency = row.consistency
                self._drained[gen].set()
                self._note_drained(gen)
                log.info("image %s@%d is %s", self.name, gen, image.state)
        return True

    def _note_drained(self, gen: int) -> None:
        """Remember how long image ``gen`` took to drain (known for images of this run)."""
        started = self._preserved_perf.pop(gen, None)
        if started is not None:
            self.stats.last_drain_seconds = time.perf_counter() - started
            self.stats.last_drain_image = gen

    def _retry_settle(self) -> None:
        if self._settle_retry is None and not self.closing:
            self._settle_retry = asyncio.get_running_loop().create_task(self._settle_later())

    async def _settle_later(self) -> None:
        delay = SETTLE_RETRY_FIRST
        try:
            while not self.closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, SETTLE_RETRY_MAX)
                if await self._settle_drains():
                    return
        finally:
            self._settle_retry = None

    # -- preserved images -------------------------------------------------------------------
    def image(self, gen: int) -> ImageRow:
        image = self.images.get(gen)
        if image is None:
            raise NotFound(f"volume {self.name} has no preserved image {gen}")
        return image

    async def open_reader(self, gen: int) -> ImageReader:
        image = self.image(gen)
        if image.state == "releasing":
            raise WrongState(f"image {self.name}@{gen} is being released")
        reader = ImageReader(self, gen)
        self.readers[gen] += 1
        return reader

    def check_preservable(self) -> None:
        """Refuse a preserve of a volume that cannot be preserved now, before anything moves."""
        if self.row.restore:
            raise WrongState(f"volume {self.name} is an incomplete restore of "
                             f"{self.row.restore.get('from')}; finish that restore first")
        if self.live in self.engine.damaged:
            raise ImageDamaged(f"volume {self.name} is damaged ({self.engine.damaged[self.live]});"
                               " it cannot be preserved")
        # The one refusal an engine makes in its split: checked here too, so that a group
        # preserve refuses before any member has split (a split cannot be undone).
        if isinstance(self.engine, MirrorEngine) and len(self.engine._sync_legs()) < 2:
            raise WrongState(f"every spare leg of mirror volume {self.name} already holds a "
                             "preserved image; release one first")

    def begin_preserve(self) -> None:
        """The cut: from here on no session of this volume binds until ``end_preserve``; the
        caller holds ``_control``.  No await happens here, so a group can cut all members at
        one instant."""
        assert self._preserving is None
        self._preserving = asyncio.Event()

    def end_preserve(self) -> None:
        if self._preserving is not None:
            self._preserving.set()
            self._preserving = None

    async def split(self) -> ImageRow:
        """Split the engine (between ``begin_preserve`` and ``end_preserve``); the image row
        to record.  Nothing is recorded or adopted in memory yet."""
        # An image drained from birth must, like any drained image, be durable first.
        # Flush before the split when no session is open (none can open meanwhile):
        # a flush failing on a full disk then leaves nothing half-done.
        flushed = not self.holders(self.live)
        if flushed:
            await self.engine.flush()
        self._split_started = time.perf_counter()  # the drain time (metrics) counts from here
        preserved = await self.engine.preserve()
        holders = self.holders(preserved)
        if not holders and not flushed:
            await self.engine.flush()
        return ImageRow(self.name, preserved, "draining" if holders else "drained",
                        "transaction-consistent", now(), None if holders else now(), 0, None)

    async def adopt(self, image: ImageRow) -> None:
        """Take a recorded preserve into memory."""
        self.images[image.generation] = image
        self._drained[image.generation] = asyncio.Event()
        self.stats.preserves += 1
        self._preserved_perf[image.generation] = self._split_started
        if image.state != "draining":
            self._drained[image.generation].set()
            self._note_drained(image.generation)
        await self.engine.prune_changed()

    async def preserve(self, instant: bool = False) -> int:
        self.check_preservable()
        async with self._control:
            # The engine splits in memory first and the catalog records it after; a record that
            # then failed could not be undone.  Refuse up front while the catalog has no room.
            if not await self._db(lambda c: c.headroom()):
                raise NoSpace(
                    f"the pool's disk is full: {self.name} was not preserved, as the catalog "
                    "could not record it; free some space and preserve again"
                )
            self.begin_preserve()
            try:
                image = await self.split()
                try:
                    await self._db(lambda c: c.record_preserve(image, self.live,
                                                               self.engine.state))
                except BaseException:
                    log.error("could not record the preserve of %s; restart to recover", self.name)
                    raise
                await self.adopt(image)
            finally:
                self.end_preserve()
            preserved = image.generation
            log.info("preserved %s@%d with %d sessions draining", self.name, preserved,
                     len(self.holders(preserved)))
            if instant:
                await self._cutover(preserved)
            return preserved

    async def cutover(self, gen: int) -> None:
        async with self._control:
            await self._cutover(gen)

    async def _cutover(self, gen: int) -> None:
        image = self.image(gen)
        if image.state != "draining":
            return
        successor = min(v for v in self.engine.views if v > gen)
        moved = self.holders(gen)
        for session in moved:
            session.generation = successor
        await self._wait_quiet(gen)
        for g, img in self.images.items():
            if g <= gen and img.state == "draining":
                img.consistency = "crash-consistent"
        self.stats.cutovers += 1
        log.info("cut over %d sessions of %s@%d to generation %d", len(moved), self.name, gen,
                 successor)
        await self._settle_drains()

    async def wait_drained(self, gen: int, timeout: float | None) -> bool:
        self.image(gen)
        try:
            await asyncio.wait_for(self._drained[gen].wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _image_broken(self, gen: int, reason: str) -> None:
        """The engine gave up preserving image ``gen`` (a full disk under break-image): record
        it before the write that overwrites the image's data may go on."""
        image = self.images.get(gen)
        if image is None:
            return
        row = dataclasses.replace(image, state="broken", broken_reason=reason,
                                  consistency="broken")
        try:
            await self._db(lambda c: c.update_image(row))
        except OwmError as exc:
            # Unrecorded, a restart would call the image good although the live volume went on
            # past it.  So it must not break: the engine forgets it, and the write that would
            # have broken it fails (the engine raises this before touching the shared chunk).
            self.engine.broken.discard(gen)
            log.error("image %s@%d could not be marked broken (%s); the write was refused",
                      self.name, gen, exc)
            raise NoSpace(
                f"the pool's disk is full: the write was refused because image {self.name}@{gen} "
                "could not be marked broken"
            ) from exc
        image.state, image.broken_reason, image.consistency = "broken", reason, "broken"
        self._drained[gen].set()
        log.error("image %s@%d is broken: %s", self.name, gen, reason)

    async def release(self, gen: int, progress: Progress | None = None) -> None:
        async with self._control:
            image = self.image(gen)
            if image.state == "draining" and not self.holders(gen):
                await self._settle_drains()  # drained, but not recorded yet (a full disk)
            if image.state == "draining":
                raise WrongState(
                    f"image {self.name}@{gen} is still draining ({len(self.holders(gen))} "
                    "sessions open); wait for it or cut over first"
                )
            if self.readers[gen]:
                raise WrongState(
                    f"image {self.name}@{gen} is being read by {self.readers[gen]} clients"
                )
            task = self._releases.get(gen)
            if task is None:
                if image.state != "releasing":
                    row = dataclasses.replace(image, state="releasing")
                    await self._db(lambda c: c.update_image(row))  # on failure nothing changed
                    image.state = "releasing"
                # else: an earlier release stopped part-way (e.g. a full disk): resume it.
                task = self._start_release(gen, progress)
        await asyncio.shield(task)

    def _start_release(self, gen: int, progress: Progress | None) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run_release(gen, progress))
        # A resumed release may have nobody waiting for it; its failure is logged already.
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        self._releases[gen] = task
        return task

    async def _run_release(self, gen: int, progress: Progress | None = None) -> None:
        def report(done: int, total: int) -> None:
            self.release_progress[gen] = (done, total)
            if progress is not None:
                progress(done, total)

        try:
            await self.engine.release(gen, report)
            await self._db(lambda c: c.finish_release(self.name, gen, self.engine.state))
            self.images.pop(gen, None)
            self._drained.pop(gen, None)
            self._preserved_perf.pop(gen, None)
            self.stats.releases += 1
            log.info("released %s@%d", self.name, gen)
        except OwmError as exc:
            # The image stays "releasing" in memory and in the catalog; the engine's release is
            # resumable, so the next release (or restart) picks it up where it stopped.
            log.error("the release of %s@%d stopped: %s; run the release again", self.name,
                      gen, exc)
            raise
        finally:
            self._releases.pop(gen, None)
            self.release_progress.pop(gen, None)

    def changed_chunks(self, since: int, image: int) -> list[int] | None:
        """Chunks that may differ between image ``since`` (possibly released) and ``image``
        (an image or the live generation); None when that is not known."""
        if image != self.live:
            self.image(image)
        if since < 0:
            raise InvalidRequest(f"there is no generation {since}")
        return self.engine.changed_chunks(since, image)

    # -- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        by_gen: dict[int, list[dict[str, Any]]] = {}
        for s in self.sessions.values():
            by_gen.setdefault(s.generation, []).append(s.status())
        images = []
        for gen, image in sorted(self.images.items()):
            progress = self.release_progress.get(gen)
            images.append({
                "name": f"{self.name}@{gen}", "generation": gen, "state": image.state,
                "sessions_left": len(self.holders(gen)) if image.state == "draining" else 0,
                "unclean_sessions": image.unclean_sessions, "consistency": image.consistency,
                "preserved_at": image.preserved_at, "drained_at": image.drained_at,
                "bytes_on_disk": self.engine.bytes_on_disk(gen)
                if image.state != "releasing" else 0,
                "broken_reason": image.broken_reason, "readers": self.readers[gen],
                "release_progress": None if progress is None
                else {"done": progress[0], "total": progress[1]},
            })
        resync = getattr(self.engine, "resync_progress", None)  # mirror, after an unclean stop
        return {
            "name": self.name, "size": self.size, "method": self.row.method,
            "chunk_size": self.row.chunk_size, "legs": self.row.legs,
            "enospc_policy": self.row.enospc_policy, "live_generation": self.live,
            "created_at": self.row.created_at, "uid": self.row.uid,
            "restore": None if not self.row.restore else {
                **self.row.restore,
                **(self.live_restore.status() if self.live_restore is not None else {})},
            "bytes_on_disk": self.engine.bytes_on_disk(self.live),
            "damaged": self.engine.damaged.get(self.live), "warnings": list(self.engine.warnings),
            "generations": [{"generation": g, "sessions": by_gen[g]} for g in sorted(by_gen)],
            "images": images,
            "resync_progress": None if resync is None
            else {"done": resync[0], "total": resync[1]},
        }

    def metrics(self) -> dict[str, Any]:
        """The counters of this volume and its engine, as plain values, for a metrics scrape."""
        stats = self.stats
        engine = self.engine
        resync = getattr(engine, "resync_progress", None)
        return {
            "name": self.name, "method": self.row.method, "live_generation": self.live,
            "ops": {op: getattr(stats, op).snapshot()
                    for op in ("read", "write", "zero", "flush", "image_read")},
            "reader_sessions": stats.reader_sessions.snapshot(),
            "inflight": sum(self._inflight.values()),
            "cow_copies": engine.cow_copies, "cow_copy_bytes": engine.cow_copy_bytes,
            "sessions_opened": stats.sessions_opened, "sessions_unclean": stats.sessions_unclean,
            "preserves": stats.preserves, "cutovers": stats.cutovers,
            "releases": stats.releases,
            "last_drain_seconds": stats.last_drain_seconds,
            "last_drain_image": stats.last_drain_image,
            "resync_progress": None if resync is None else list(resync),
        }

    def abandon(self) -> None:
        """Drop everything in memory without syncing (crash simulation)."""
        self.closing = True
        for task in [*self._releases.values(), self._settle_retry]:
            if task is not None:
                task.cancel()
        if self.live_restore is not None:
            self.live_restore.abandon()
        self.sessions.clear()
        self.engine.abandon()  # held write-back is lost, as a page cache is

    async def close(self) -> None:
        self.closing = True
        tasks = [t for t in (*self._releases.values(), self._settle_retry) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in list(self.sessions.values()):
            await session.close(clean=False)
        if self.live_restore is not None:
            await self.live_restore.close()
        await self.engine.close()
        await self.engine.storage.close()
