"""Moving chunk batches from an image source to a backup writer, in parallel and in bounded memory.

Reads are asynchronous (the NBD client); hashing, compressing and writing are done by worker
threads (BLAKE3, zstd and file writes release the GIL), a few batches at a time.  The pipeline
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
WORKERS = 2
IN_FLIGHT = 6


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
    """Where batches go: ``zeroes`` runs inline (cheap), ``write`` on a worker thread."""

    def zeroes(self, batch: Batch) -> None: ...

    def write(self, batch: Batch) -> None: ...


class Pipeline:
    def __init__(self, writer: Writer, *, total: int, progress: Progress | None = None,
                 workers: int = WORKERS, in_flight: int = IN_FLIGHT,
                 checkpoint: Callable[[int], None] | None = None,
                 checkpoint_every: float = 5.0) -> None:
        self.writer = writer
        self.total = total
        self.done = 0
        self.progress = progress
        self.workers = workers
        self.in_flight = in_flight
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.watermark = 0
        self._busy: dict[int, Batch] = {}  # first chunk -> batch being written
        self._last_end = 0

    def _covered(self, batch: Batch) -> None:
        self.done += batch.length
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _advance(self) -> None:
        self.watermark = min(self._busy) if self._busy else self._last_end

    async def run(self, batches: AsyncIterator[Batch]) -> None:
        loop = asyncio.get_running_loop()
        last_checkpoint = time.monotonic()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="owm-backup") as pool:
            running: dict[asyncio.Future[None], Batch] = {}

            async def reap(block: bool) -> None:
                if not running:
                    return
                finished, _ = await asyncio.wait(
                    running, timeout=None if block else 0,
                    return_when=asyncio.FIRST_COMPLETED)
                for fut in finished:
                    batch = running.pop(fut)
                    fut.result()  # a writer error ends the backup
                    del self._busy[batch.first]
                    self._covered(batch)
                self._advance()

            try:
                async for batch in batches:
                    self._last_end = batch.first + batch.count
                    if batch.data is None:
                        self.writer.zeroes(batch)
                        self._covered(batch)
                    else:
                        self._busy[batch.first] = batch
                        fut = loop.run_in_executor(pool, self.writer.write, batch)
                        running[fut] = batch
                    while len(running) >= self.in_flight:
                        await reap(block=True)
                    await reap(block=False)
                    self._advance()
                    if (self.checkpoint is not None
                            and time.monotonic() - last_checkpoint >= self.checkpoint_every):
                        mark = self.watermark
                        await loop.run_in_executor(pool, self.checkpoint, mark)
                        last_checkpoint = time.monotonic()
                while running:
                    await reap(block=True)
            finally:
                if running:
                    await asyncio.wait(running)
                    for fut in running:
                        if not fut.cancelled():
                            fut.exception()
