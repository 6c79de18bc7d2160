"""Planning the reads of a backup: which chunks of the image hold data, in chunk-aligned batches.

Block status (base:allocation, asked over the asyncio NBD client) tells which chunks read as
zeroes; those are never read and come out as *zero batches*.  The rest come out as *read
batches*, runs of whole chunks of about a MiB, which the backup's worker threads read (see
bulkread.py) and write.  An incremental backup passes the chunk numbers that changed and nothing
else is looked at, not even by block status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from owm.nbd.client import NbdClient

NBD_STATE_ZERO = 2
BATCH_BYTES = 4 << 20
STATUS_SPAN = 1 << 30  # bytes asked about per BLOCK_STATUS request


@dataclass(frozen=True, slots=True)
class Batch:
    """``count`` consecutive chunks from chunk ``first``: all zeroes, or, once read, held in
    ``data[base:base + length]`` (several batches read together share one buffer)."""

    first: int
    count: int
    offset: int
    length: int
    zero: bool = False
    data: bytes | bytearray | None = None
    base: int = 0

    def with_data(self, data: bytes | bytearray, base: int = 0) -> Batch:
        return Batch(self.first, self.count, self.offset, self.length, False, data, base)


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
    """The batches of one NBD export (normally a read-only ``NAME@N``)."""

    def __init__(self, client: NbdClient, chunk_size: int, *,
                 batch_bytes: int = BATCH_BYTES) -> None:
        self.client = client
        self.size = client.size
        self.chunk_size = chunk_size
        self.chunks = (self.size + chunk_size - 1) // chunk_size
        self.per_batch = max(1, batch_bytes // chunk_size)
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

    async def plan(self, chunks: list[int] | None = None,
                   start: int = 0) -> AsyncIterator[Batch]:
        """Every chunk from ``start`` (or just ``chunks``, sorted), in order, as batches."""
        if chunks is not None:
            # Changed chunks are read without asking block status first: they were written,
            # so they almost always hold data (the writer spots the rare chunk of zeroes), and
            # a status request per scattered run would cost more than it saves.
            for first, count in chunk_runs(c for c in chunks if c >= start):
                for sub in range(first, first + count, self.per_batch):
                    n = min(self.per_batch, first + count - sub)
                    offset, length = self._span(sub, n)
                    yield Batch(sub, n, offset, length)
            return
        runs = [(start, self.chunks - start)] if start < self.chunks else []
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
                    yield Batch(sub + i, j - i, offset, length, zero=zero[i])
                    i = j
