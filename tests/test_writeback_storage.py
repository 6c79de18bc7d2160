"""Local storage's queued writes: small writes bound for the thread pool share one hop per batch.

The queue is forced (as on a disk whose kernel refuses RWF_NOWAIT writes), and concurrent
writes, contiguous ones (joined into one ``pwritev``), overlapping ones (kept in order) and a
cancelled writer must all leave the file exactly as the same writes done one by one would.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from owm.storage.local import LocalStorage


async def test_queued_writes_land_in_order_and_whole(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, inline_writes=False)  # every write through the pool
    rng = random.Random(7)
    size = 256 * 1024
    want = bytearray(size)
    try:
        ops = []
        for k in range(400):
            length = rng.choice([512, 4096, 8192])
            offset = rng.randrange(0, size - length) // 512 * 512
            if k % 5 == 0 and ops:  # continue the previous write: joined into one pwritev
                prev_off, prev_data = ops[-1]
                offset = min(prev_off + len(prev_data), size - length)
            ops.append((offset, bytes([k % 251 + 1]) * length))
        # Issued in list order without waiting in between; overlapping ones must keep it.
        await asyncio.gather(*(storage.write("obj", off, data) for off, data in ops))
        for off, data in ops:
            want[off : off + len(data)] = data
        assert await storage.read("obj", 0, size) == bytes(want)
        # The pool thread settles the last batch, then looks once more and finds the queue
        # empty: idle a moment after the last write returned, not necessarily at once.
        for _ in range(200):
            if not storage._queue and not storage._queue_busy:
                break
            await asyncio.sleep(0.01)
        assert not storage._queue and not storage._queue_busy

        task = asyncio.ensure_future(storage.write("obj", 0, b"\xee" * 4096))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await storage.write("obj", 4096, b"\xdd" * 4096)  # the queue still works after it
        got = await storage.read("obj", 4096, 4096)
        assert got == b"\xdd" * 4096
    finally:
        await storage.close()


async def test_a_run_longer_than_iov_max_is_written_whole(tmp_path: Path) -> None:
    """A group commit may release thousands of contiguous held writes at once: one pwritev
    takes at most IOV_MAX buffers (more is EINVAL), so the run must be split."""
    storage = LocalStorage(tmp_path, inline_writes=False)
    piece = 512
    count = 3000
    try:
        await asyncio.gather(*(storage.write("obj", k * piece, bytes([k % 251 + 1]) * piece)
                               for k in range(count)))
        got = await storage.read("obj", 0, count * piece)
        assert got == b"".join(bytes([k % 251 + 1]) * piece for k in range(count))
    finally:
        await storage.close()
