"""Reading a preserved image over NBD for a backup: block status first, then only what holds data.

The image is read in chunk-aligned *batches* (runs of whole chunks, about a MiB each) with a
window of reads in flight, and handed out in order.  Block status (base:allocation) tells
which chunks read as zeroes; those are never read and come out as batches without data, so a
half-empty volume costs half the reading.  An incremental backup passes the chunk numbers that
changed and nothing else is looked at, not even by block status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from owm.nbd.client import NbdClient

NBD_STATE_ZERO = 2
BATCH_BYTES = 2 << 20
WINDOW = 8
STATUS_SPAN = 1 << 30  # bytes asked about per BLOCK_STATUS request


@dataclass(frozen=True, slots=True)
class Batch:
    """``count`` consecutive chunks from chunk ``first``; ``data`` None means all zeroes."""

    first: int
    count: int
    offset: int
    length: int
    data: bytes | None = None


def chunk_runs(chunks: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Sorted chunk numbers as (first, count) runs of consecutive chunks."""
    first = prev = -2
    for chunk in chunks:
        if chunk == prev + 1:
            prev = chunk
            continue
        if first >= 0:
            yield first, prev - first + 1
        first = prev = chunk
    if first >= 0:
        yield first, prev - first + 1


class ImageSource:
    """Chunk batches of one NBD export (normally a read-only ``NAME@N``)."""

    def __init__(self, client: NbdClient, chunk_size: int, *, batch_bytes: int = BATCH_BYTES,
                 window: int = WINDOW) -> None:
        self.client = client
        self.size = client.size
        self.chunk_size = chunk_size
        self.chunks = (self.size + chunk_size - 1) // chunk_size
        self.per_batch = max(1, batch_bytes // chunk_size)
        self.window = window
        self.bytes_read = 0
        self.has_status = client.meta_context_id is not None

    def _span(self, first: int, count: int) -> tuple[int, int]:
        offset = first * self.chunk_size
        return offset, min(count * self.chunk_size, self.size - offset)

    async def _zero_flags(self, first: int, count: int) -> list[bool]:
        """For each chunk of the run: does it read as zeroes (block status says so)?"""
        if not self.has_status:
            return [False] * count
        offset, length = self._span(first, count)
        flags = [True] * count
        pos = offset
        for ext_len, state in await self.client.block_status(offset, length):
            if not state & NBD_STATE_ZERO:
                lo = (pos - offset) // self.chunk_size
                hi = (pos + ext_len - 1 - offset) // self.chunk_size
                for i in range(lo, hi + 1):
                    flags[i] = False
            pos += ext_len
        return flags

    async def _plan(self, runs: Iterable[tuple[int, int]]) -> AsyncGenerator[Batch, None]:
        """Batches without data yet, in order: zero batches final, data batches to be read."""
        span_chunks = max(1, STATUS_SPAN // self.chunk_size)
        for run_first, run_count in runs:
            for sub in range(run_first, run_first + run_count, span_chunks):
                count = min(span_chunks, run_first + run_count - sub)
                zero = await self._zero_flags(sub, count)
                i = 0
                while i < count:
                    j = i + 1
                    limit = count if zero[i] else min(count, i + self.per_batch)
                    while j < limit and zero[j] == zero[i]:
                        j += 1
                    offset, length = self._span(sub + i, j - i)
                    yield Batch(sub + i, j - i, offset, length, None if zero[i] else b"")
                    i = j

    async def batches(self, chunks: list[int] | None = None,
                      start: int = 0) -> AsyncIterator[Batch]:
        """Every chunk from ``start`` (or just ``chunks``, sorted) in order, data read ahead."""
        if chunks is None:
            runs: Iterable[tuple[int, int]] = [(start, self.chunks - start)] if (
                start < self.chunks) else []
        else:
            runs = chunk_runs(c for c in chunks if c >= start)
        pending: deque[tuple[Batch, asyncio.Task[bytes] | None]] = deque()
        plan = self._plan(runs)
        try:
            async for batch in plan:
                task = None
                if batch.data is not None:
                    task = asyncio.ensure_future(self.client.read(batch.offset, batch.length))
                pending.append((batch, task))
                while len(pending) > self.window or (pending and pending[0][1] is None):
                    yield await self._next(pending)
            while pending:
                yield await self._next(pending)
        finally:
            for _, task in pending:
                if task is not None:
                    task.cancel()
            for _, task in pending:
                if task is not None:
                    with contextlib.suppress(BaseException):
                        await task
            await plan.aclose()

    async def _next(self, pending: deque[tuple[Batch, asyncio.Task[bytes] | None]]) -> Batch:
        batch, task = pending.popleft()
        if task is None:
            return batch
        data = await task
        self.bytes_read += len(data)
        return Batch(batch.first, batch.count, batch.offset, batch.length, data)
