"""Moving chunk batches from an image source to a backup writer, in parallel and in bounded memory.

Batches are planned on the event loop (block status); reading (``fetch``, a blocking NBD
connection per thread), hashing, compressing and writing are done by worker threads, which
release the GIL for all of it, a few batches at a time.  The pipeline
reports progress in bytes of the image covered (zero chunks count: they are done by knowing
them), and tracks the *watermark*: the chunk number below which every batch has been handled,
which is what a resumable backup may record as done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from owm.backup.source import Batch

Progress = Callable[[int, int], None]
Fetch = Callable[[list[Batch]], "bytes | bytearray"]
WORKERS = 2
GROUP_BYTES = 2 << 20


@dataclass
class Stats:
    """What a backup did, counted by the writer threads."""

    bytes_read: int = 0
    bytes_written: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    chunks_zero: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, read: int = 0, written: int = 0, new: int = 0, reused: int = 0,
            zero: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            self.chunks_new += new
            self.chunks_reused += reused
            self.chunks_zero += zero

    def to_json(self) -> dict[str, Any]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "chunks_new": self.chunks_new, "chunks_reused": self.chunks_reused,
                "chunks_zero": self.chunks_zero}


class Writer(Protocol):
    """Where batches go: ``zeroes`` runs inline (cheap), ``write`` (data read) on a worker."""

    def zeroes(self, batch: Batch) -> None: ...

    def write(self, batch: Batch) -> None: ...


class Pipeline:
    def __init__(self, writer: Writer, fetch: Fetch, *, total: int,
                 progress: Progress | None = None, workers: int = WORKERS,
                 checkpoint: Callable[[int], None] | None = None,
                 checkpoint_every: float = 5.0) -> None:
        self.writer = writer
        self.fetch = fetch
        self.total = total
        self.done = 0
        self.progress = progress
        self.workers = workers
        self.in_flight = workers * 2
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.watermark = 0
        self._busy: dict[int, Batch] = {}  # first chunk of each group not yet written
        self._last_end = 0

    def _covered(self, length: int) -> None:
        self.done += length
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _work(self, group: list[Batch]) -> None:
        data = self.fetch(group)  # the group's batches one after the other
        base = 0
        for batch in group:
            self.writer.write(batch.with_data(data, base))
            base += batch.length

    def _advance(self) -> None:
        self.watermark = min(self._busy) if self._busy else self._last_end

    async def run(self, batches: AsyncIterator[Batch]) -> None:
        """Write every batch; small ones travel to the workers in groups of about GROUP_BYTES."""
        loop = asyncio.get_running_loop()
        last_checkpoint = time.monotonic()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="owm-backup") as pool:
            running: dict[asyncio.Future[None], list[Batch]] = {}
            group: list[Batch] = []
            group_bytes = 0

            def dispatch() -> None:
                nonlocal group, group_bytes
                running[loop.run_in_executor(pool, self._work, group)] = group
                group, group_bytes = [], 0

            async def reap(block: bool) -> None:
                if running:
                    finished, _ = await asyncio.wait(
                        running, timeout=None if block else 0,
                        return_when=asyncio.FIRST_COMPLETED)
                    for fut in finished:
                        done = running.pop(fut)
                        fut.result()  # a reader or writer error ends the backup
                        del self._busy[done[0].first]
                        self._covered(sum(b.length for b in done))
                self._advance()

            try:
                async for batch in batches:
                    self._last_end = batch.first + batch.count
                    if batch.zero:
                        self.writer.zeroes(batch)
                        self._covered(batch.length)
                    else:
                        if not group:
                            self._busy[batch.first] = batch  # busy from now: not yet stored
                        group.append(batch)
                        group_bytes += batch.length
                        if group_bytes >= GROUP_BYTES:
                            dispatch()
                    while len(running) >= self.in_flight:
                        await reap(block=True)
                    if (self.checkpoint is not None
                            and time.monotonic() - last_checkpoint >= self.checkpoint_every):
                        await reap(block=False)
                        mark = self.watermark
                        await loop.run_in_executor(pool, self.checkpoint, mark)
                        last_checkpoint = time.monotonic()
                if group:
                    dispatch()
                while running:
                    await reap(block=True)
            finally:
                if running:
                    await asyncio.wait(running)
                    for fut in running:
                        if not fut.cancelled():
                            fut.exception()
