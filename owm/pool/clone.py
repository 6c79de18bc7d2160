"""Live restore: a volume usable at once while it fills in from a source (dm-clone's idea).

A volume being restored live keeps one bit per chunk, *filled*: the chunk holds its final data
(from the source, or written by a client) and the source is never asked for it again.  The bits
are a storage object of their own (``filled``, one byte per eight chunks) beside the volume's.

* A read of chunks that are not filled fills them first (fetch from the source, write, make
  durable, set the bits), then reads the volume.
* A write to chunks that are not filled first fills the chunks it covers only in part, then
  writes, then makes the data durable and sets the bits before it is acknowledged.  A chunk is
  therefore never filled from the source after a client wrote it, even across a crash: its bit
  was durable before the write was acknowledged.
* A background task fills the rest in batches (fetch, write what is not zeroes, one flush, one
  durable bit update), skipping chunks that became filled meanwhile.

Order, always: data durable -> bit durable -> bit visible (others skip the chunk only after its
bit is on disk).  Every fill and every first write to a chunk holds that chunk's lock, taken in
ascending order, so fills and writes of one chunk never interleave.

The source is attached by whoever runs the restore (``owm restore --live`` serves the backup over
NBD and the control API connects the volume to it).  While no source is attached, requests that
need one wait for it (``SOURCE_WAIT`` seconds), then fail with EIO; requests on filled chunks
never wait.  After a restart the bits are read back and filling resumes once a source is
attached again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from owm.common.errors import OwmError
from owm.storage import Storage

log = logging.getLogger("owm.pool.clone")

OBJECT = "filled"
BATCH_BYTES = 2 << 20
SOURCE_WAIT = 10.0

Fetch = Callable[[int, int], Awaitable[bytes]]  # (offset, length) -> bytes from the source


class SourceUnavailable(OwmError):
    """The live restore's source is not attached (the restore is not running)."""


class LiveRestore:
    """The filled bits of one volume and the work of filling it (see the module docstring).

    ``read``/``write``/``flush`` are the volume's engine calls for the live generation.
    """

    def __init__(self, name: str, storage: Storage, size: int, chunk_size: int,
                 write: Callable[[int, bytes], Awaitable[None]],
                 flush: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.storage = storage
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = (size + chunk_size - 1) // chunk_size
        self._write = write
        self._flush = flush
        self._filled = bytearray((self.chunks + 7) // 8)  # durable bits only
        self._staged = bytearray(len(self._filled))  # bits written, maybe not yet synced
        self.filled_count = 0
        self._locks: dict[int, asyncio.Lock] = {}
        self._source: Fetch | None = None
        self._source_changed = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._commit = asyncio.Lock()
        self.pace = 0.0  # seconds between background batches (a restore may ask to go slowly)
        self.error: str | None = None
        self.closed = False

    # -- state ------------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the durable bits back (a new volume has none)."""
        if self.storage.exists(OBJECT):
            raw = await self.storage.read(OBJECT, 0, len(self._filled))
            self._filled[:len(raw)] = raw
        else:
            await self.storage.allocate(OBJECT, len(self._filled))
            await self.storage.sync(OBJECT)
        self._staged[:] = self._filled
        self.filled_count = sum(1 for c in range(self.chunks) if self.is_filled(c))

    def is_filled(self, chunk: int) -> bool:
        return bool(self._filled[chunk >> 3] & (1 << (chunk & 7)))

    @property
    def complete(self) -> bool:
        return self.filled_count >= self.chunks

    def status(self) -> dict[str, Any]:
        return {"live": True, "chunks": self.chunks, "filled": self.filled_count,
                "source": "attached" if self._source is not None else "waiting",
                "error": self.error}

    def unfilled(self, offset: int, length: int) -> list[int]:
        if length <= 0:
            return []
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        return [c for c in range(first, last + 1) if not self.is_filled(c)]

    async def _mark(self, chunks: list[int]) -> None:
        """Make the bits of ``chunks`` (whose data is durable) durable, then visible."""
        async with self._commit:
            touched = sorted({c >> 3 for c in chunks})
            for c in chunks:
                self._staged[c >> 3] |= 1 << (c & 7)
            start = touched[0]
            end = touched[-1] + 1
            await self.storage.write(OBJECT, start, bytes(self._staged[start:end]))
            await self.storage.sync(OBJECT)
            for c in chunks:
                if not self.is_filled(c):
                    self._filled[c >> 3] |= 1 << (c & 7)
                    self.filled_count += 1

    @contextlib.asynccontextmanager
    async def _holding(self, chunks: list[int]) -> AsyncIterator[list[int]]:
        """Hold the locks of ``chunks`` (ascending); yields those still not filled."""
        held: list[asyncio.Lock] = []
        try:
            for c in sorted(chunks):
                lock = self._locks.setdefault(c, asyncio.Lock())
                await lock.acquire()
                held.append(lock)
            yield [c for c in chunks if not self.is_filled(c)]
        finally:
            for c, lock in zip(sorted(chunks), held, strict=False):
                lock.release()
                if self.is_filled(c) and not lock.locked() and self._locks.get(c) is lock:
                    del self._locks[c]

    # -- the source -------------------------------------------------------------------------
    def attach(self, fetch: Fetch, pace: float = 0.0) -> None:
        """Use ``fetch`` as the source from now on and (re)start the background fill."""
        self._source = fetch
        self.pace = max(0.0, pace)
        self.error = None
        self._source_changed.set()
        if self._filler is None or self._filler.done():
            self._filler = asyncio.ensure_future(self._fill_all())

    def detach(self, fetch: Fetch | None = None) -> None:
        if fetch is None or self._source is fetch:
            self._source = None

    async def _fetch(self, offset: int, length: int) -> bytes:
        deadline = time.monotonic() + SOURCE_WAIT
        while True:
            source = self._source
            if source is not None:
                try:
                    data = await source(offset, length)
                    if len(data) != length:
                        raise OSError(f"the source returned {len(data)} of {length} bytes")
                    return data
                except (OwmError, OSError, EOFError, ConnectionError) as exc:
                    log.warning("volume %s: the live restore's source failed (%s)", self.name,
                                exc)
                    self.error = str(exc)
                    self.detach(source)
            if self.closed or time.monotonic() >= deadline:
                raise SourceUnavailable(
                    f"volume {self.name} is being restored live and the restore is not "
                    "running; run the same 'owm restore ... --live' again")
            self._source_changed.clear()
            if self._source is None:  # not attached between the look above and the clear
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._source_changed.wait(),
                                           max(0.01, deadline - time.monotonic()))

    async def _fill(self, chunks: list[int]) -> None:
        """Write the source's data of ``chunks`` (held, not filled) into the volume; no flush."""
        cs = self.chunk_size
        for run in _runs(chunks):
            offset = run[0] * cs
            length = min(self.size, (run[-1] + 1) * cs) - offset
            data = await self._fetch(offset, length)
            for c in run:
                piece = data[(c - run[0]) * cs:(c - run[0] + 1) * cs]
                if piece.count(0) != len(piece):  # a new volume reads zeroes already
                    await self._write(c * cs, piece)

    # -- what the volume's views call -------------------------------------------------------
    async def before_read(self, offset: int, length: int) -> None:
        """Fill every chunk the read touches that is not filled yet."""
        if not self.unfilled(offset, length):
            return
        async with self._holding(self.unfilled(offset, length)) as todo:
            if todo:
                await self._fill(todo)
                await self._flush()
                await self._mark(todo)

    @contextlib.asynccontextmanager
    async def writing(self, offset: int, length: int) -> AsyncIterator[None]:
        """Around a client write (or zeroing) of ``offset .. offset+length``."""
        if not self.unfilled(offset, length):
            yield
            return
        cs = self.chunk_size
        end = offset + length
        async with self._holding(self.unfilled(offset, length)) as todo:
            partial = [c for c in todo
                       if offset > c * cs or end < min(self.size, (c + 1) * cs)]
            if partial:
                await self._fill(partial)
            yield
            if todo:
                await self._flush()
                await self._mark(todo)

    # -- the background fill ----------------------------------------------------------------
    async def _fill_all(self) -> None:
        per_batch = max(1, BATCH_BYTES // self.chunk_size)
        try:
            chunk = 0
            while chunk < self.chunks and not self.closed:
                batch = [c for c in range(chunk, min(self.chunks, chunk + per_batch))
                         if not self.is_filled(c)]
                chunk += per_batch
                if not batch:
                    continue
                try:
                    async with self._holding(batch) as todo:
                        if todo:
                            await self._fill(todo)
                            await self._flush()
                            await self._mark(todo)
                except SourceUnavailable:
                    chunk -= per_batch  # wait for the source again, then redo this batch
                    while self._source is None and not self.closed:
                        self._source_changed.clear()
                        if self._source is None:
                            await self._source_changed.wait()
                    continue
                if self.pace:
                    await asyncio.sleep(self.pace)
            if self.complete:
                log.info("volume %s: live restore filled every chunk", self.name)
        except asyncio.CancelledError:
            raise
        except (OwmError, OSError) as exc:
            self.error = str(exc)
            log.error("volume %s: the live restore stopped: %s", self.name, exc)

    async def close(self) -> None:
        self.closed = True
        self._source_changed.set()
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filler
        await self.storage.close()

    def abandon(self) -> None:
        self.closed = True
        if self._filler is not None:
            self._filler.cancel()

    async def destroy(self) -> None:
        """Drop the bits (the restore is complete, or the volume deleted)."""
        self.closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filler
        with contextlib.suppress(OSError):
            await self.storage.delete(OBJECT)
        await self.storage.close()


def _runs(chunks: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted chunk numbers."""
    out: list[list[int]] = []
    for c in sorted(chunks):
        if out and out[-1][-1] == c - 1:
            out[-1].append(c)
        else:
            out.append([c])
    return out
