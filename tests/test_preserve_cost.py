"""What a preserve costs: nothing that grows with the volume's size or with the images outstanding.

* A 1 PiB volume (2^34 chunks of 64 KiB) preserves with bounded memory, traced with tracemalloc,
  and without holding the event loop: a ticker task runs beside the preserves and, at every tick,
  records how much memory the loop step before it allocated at its peak; no step may allocate
  more than a few MiB (a table proportional to the volume was 2 GiB in one step), and the ticker
  must get the loop during every preserve.  Counts of bytes and ticks, never times.
* With 1000 preserved images outstanding, the next preserve makes as many storage calls and
  table commits as the 100th did.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from owm.engine import base as engine_base
from owm.engine.base import SyncTracking
from owm.engine.chunktable import ChunkTable
from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage import Buffer
from owm.storage.simulated import SimulatedStorage

PIB = 1 << 50
MIB = 1 << 20
TIB = 1 << 40


@dataclass
class Ticker:
    ticks: int = 0
    worst_step: int = 0  # the most memory one loop step allocated above where it started
    last: int = 0
    done: bool = False

    async def run(self) -> None:
        self.last = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        while not self.done:
            await asyncio.sleep(0)
            self.ticks += 1
            current, peak = tracemalloc.get_traced_memory()
            self.worst_step = max(self.worst_step, peak - self.last)
            self.last = current
            tracemalloc.reset_peak()


async def _session(pool: Pool, name: str) -> Session:
    s = await pool.open_export(name, "test")
    assert isinstance(s, Session)
    return s


@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
async def test_preserving_a_1pib_volume_costs_bounded_memory_and_never_holds_the_loop(
    tmp_path: Path, method: str
) -> None:
    pool = await Pool.open(tmp_path)
    tracemalloc.start()
    ticker = Ticker()
    task = asyncio.get_running_loop().create_task(ticker.run())
    try:
        await pool.create_volume("big", PIB, method, legs=3)
        baseline = tracemalloc.get_traced_memory()[0]
        rounds = 2  # a mirror of 3 legs holds at most 2 images
        for i in range(rounds):
            old = await _session(pool, "big")  # keeps the image draining while it writes
            before = ticker.ticks
            image = await pool.preserve("big")
            assert ticker.ticks > before, "the loop never ran beside the preserve"
            new = await _session(pool, "big")
            # First writes after the preserve, far apart: table entries in distant pages.
            for offset in (0, TIB // 3, TIB - 4096):
                await new.write(offset, bytes([i + 1]) * 4096)
                await old.write(offset + 8192, bytes([i + 7]) * 4096)
            await new.flush()
            await old.close()
            await new.close()
            assert pool.status("big")[0]["images"][i]["name"] == image
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        ticker.done = True
        await task
        tracemalloc.stop()
        await pool.close()
    assert ticker.worst_step < 8 * MIB, ticker.worst_step
    assert retained < 8 * MIB, retained


class CountingStorage(SimulatedStorage):
    """The power-loss storage, counting every call an engine makes on it."""

    def __init__(self) -> None:
        super().__init__(yield_every_op=False)
        self.calls = 0

    async def read(self, name: str, offset: int, length: int) -> bytes:
        self.calls += 1
        return await super().read(name, offset, length)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        self.calls += 1
        await super().write(name, offset, data)

    async def sync(self, name: str) -> None:
        self.calls += 1
        await super().sync(name)

    async def discard(self, name: str, offset: int, length: int) -> None:
        self.calls += 1
        await super().discard(name, offset, length)

    async def delete(self, name: str) -> None:
        self.calls += 1
        await super().delete(name)

    def exists(self, name: str) -> bool:
        self.calls += 1
        return super().exists(name)

    def names(self) -> list[str]:
        self.calls += 1
        return super().names()


@pytest.mark.parametrize("method", ["cow", "log"])
async def test_a_thousand_outstanding_images_do_not_make_preserve_cost_more(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = 0
    real_commit = ChunkTable.commit

    def counted(self: ChunkTable) -> object:
        nonlocal commits
        commits += 1
        return real_commit(self)

    monkeypatch.setattr(ChunkTable, "commit", counted)
    # The write-back timer would commit the write's held work at a moment that depends on the
    # machine's load, sometimes inside the measured preserve; the preserve's flush commits it.
    monkeypatch.setattr(engine_base, "WRITEBACK_DELAY", 3600.0)
    storage = CountingStorage()
    pool = await Pool.open(tmp_path, storage_factory=lambda _name: storage)
    chunk = 4096
    try:
        await pool.create_volume("v", 64 * chunk, method, chunk)
        cost: dict[int, tuple[int, int]] = {}
        outstanding = 1000
        for i in range(outstanding + 1):
            s = await _session(pool, "v")
            # Each image gets data of its own (a copy, or a delta entry).
            await s.write((i % 64) * chunk, bytes([i % 251 + 1]) * chunk)
            await s.close()
            calls, tables = storage.calls, commits
            await pool.preserve("v")  # no session holds it: drained, and flushed, at birth
            cost[i] = (storage.calls - calls, commits - tables)
        assert len(pool.status("v")[0]["images"]) == outstanding + 1
    finally:
        await pool.close()
    # From image 65 on every preserve also prunes the oldest changed-chunk map (3 deletes):
    # compare with a preserve that did so too.
    early, late = cost[100], cost[outstanding]
    assert late[0] <= early[0] + 2, (early, late)  # storage calls
    assert late[1] <= early[1] + 2, (early, late)  # table commits


async def test_a_skipped_sync_never_returns_before_the_data_is_durable() -> None:
    """Skipping syncs of unchanged objects must not skip one while another is still running."""
    inner = SimulatedStorage()
    storage = SyncTracking(inner)
    await storage.write("o", 0, b"x" * 10)
    first = asyncio.ensure_future(storage.sync("o"))
    await asyncio.sleep(0)  # the first sync is under way, not done
    await storage.sync("o")
    assert await inner.power_loss().read("o", 0, 10) == b"x" * 10
    await first
    done = inner.syncs
    await storage.sync("o")  # nothing written since a completed sync: skipped
    assert inner.syncs == done
    await storage.write("o", 0, b"y")
    await storage.sync("o")
    assert inner.syncs == done + 1
