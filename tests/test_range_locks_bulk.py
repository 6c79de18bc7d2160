"""Requests over many chunks: the lock manager's span fast path and the changed map's bulk set.

A multi-chunk request that conflicts with nothing is granted as one span entry, with no per-chunk
queue, and keeps every rule of the per-chunk queues once something does come to its chunks:
exclusion, FIFO per chunk, shared holders together, cancellation, barriers.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from owm.engine import chunktable
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE, SHARED, RangeLockManager
from owm.pool.pool import Pool
from owm.storage.simulated import SimulatedStorage

# 1 MiB over 4 KiB chunks
WIDE = 256


def _clean(locks: RangeLockManager) -> bool:
    return not (locks._chunks or locks._solo or locks._spans or locks._span_firsts or
                locks._held) and locks.waiting == 0 and locks._live == 0


def test_a_free_wide_range_costs_no_per_chunk_state() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(0, WIDE - 1, EXCLUSIVE) is None
        assert locks.try_acquire(WIDE, 2 * WIDE - 1, SHARED) is None
        assert locks.try_acquire(2 * WIDE, 2 * WIDE, EXCLUSIVE) is None  # a solo beside
        assert not locks._chunks and len(locks._spans) == 2
        assert locks.held_chunks == 2 * WIDE + 1
        locks.release(0, WIDE - 1)
        locks.release(WIDE, 2 * WIDE - 1)
        locks.release(2 * WIDE, 2 * WIDE)
        assert _clean(locks)

    asyncio.run(main())


def test_overlapping_wide_ranges_wait_in_arrival_order() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(0, WIDE - 1, EXCLUSIVE) is None
        second = locks.try_acquire(200, 300, EXCLUSIVE)
        third = locks.try_acquire(250, 260, SHARED)  # overlaps the second only
        fourth = locks.try_acquire(10, 20, SHARED)  # overlaps the first only
        assert second is not None and third is not None and fourth is not None
        assert locks.try_acquire(400, 500, SHARED) is None  # disjoint: a span at once
        locks.release(0, WIDE - 1)
        await asyncio.sleep(0)
        assert second.done() and fourth.done() and not third.done()
        locks.release(200, 300)
        await asyncio.sleep(0)
        assert third.done()
        for first, last in ((250, 260), (10, 20), (400, 500)):
            locks.release(first, last)
        assert _clean(locks)

    asyncio.run(main())


def test_shared_wide_ranges_hold_together() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(0, WIDE - 1, SHARED) is None
        assert locks.try_acquire(100, WIDE + 100, SHARED) is None  # overlapping, shared
        assert locks.try_acquire(5, 5, SHARED) is None
        writer = locks.try_acquire(WIDE, WIDE, EXCLUSIVE)
        assert writer is not None
        late_reader = locks.try_acquire(WIDE, WIDE + 1, SHARED)  # behind the writer: FIFO
        assert late_reader is not None
        locks.release(0, WIDE - 1)
        locks.release(5, 5)
        await asyncio.sleep(0)
        assert not writer.done()
        locks.release(100, WIDE + 100)
        await asyncio.sleep(0)
        assert writer.done() and not late_reader.done()
        locks.release(WIDE, WIDE)
        await asyncio.sleep(0)
        assert late_reader.done()
        locks.release(WIDE, WIDE + 1)
        assert _clean(locks)

    asyncio.run(main())


def test_a_waiter_on_one_chunk_of_a_held_span() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(10, 10 + WIDE - 1, EXCLUSIVE) is None
        one = locks.try_acquire(100, 100, SHARED)
        assert one is not None
        assert locks.try_acquire(5, 5, EXCLUSIVE) is None  # outside: at once
        assert locks.try_acquire(10 + WIDE, 10 + WIDE, EXCLUSIVE) is None
        assert locks.held_chunks == WIDE + 2
        locks.release(10, 10 + WIDE - 1)
        await asyncio.sleep(0)
        assert one.done()
        for c in (100, 5, 10 + WIDE):
            locks.release(c, c)
        assert _clean(locks)

    asyncio.run(main())


def test_cancelled_waiter_behind_a_span_holds_nothing_back() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(0, WIDE - 1, EXCLUSIVE) is None
        cancelled = asyncio.ensure_future(locks.acquire(50, 300, EXCLUSIVE))
        await asyncio.sleep(0)
        behind = locks.try_acquire(280, 290, EXCLUSIVE)  # behind the cancelled one only
        after = locks.try_acquire(60, 60, SHARED)  # behind the span and the cancelled one
        assert behind is not None and after is not None
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0)
        assert behind.done() and not after.done()
        locks.release(0, WIDE - 1)
        await asyncio.sleep(0)
        assert after.done()
        locks.release(280, 290)
        locks.release(60, 60)
        assert _clean(locks)

    asyncio.run(main())


def test_a_barrier_waits_for_a_span() -> None:
    async def main() -> None:
        locks = RangeLockManager()
        assert locks.try_acquire(0, WIDE - 1, EXCLUSIVE) is None
        barrier = asyncio.ensure_future(locks.barrier())
        await asyncio.sleep(0)
        late = locks.try_acquire(WIDE, 2 * WIDE, EXCLUSIVE)  # free, but behind the barrier
        assert late is not None and not barrier.done()
        locks.release(0, WIDE - 1)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert barrier.done() and late.done()
        locks.release(WIDE, 2 * WIDE)
        assert _clean(locks)

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(5))
def test_random_wide_ranges_against_rules(seed: int) -> None:
    """Random narrow and wide requests, some cancelled while they wait: holders never
    conflict, every waiter conflicts with a holder or an earlier waiter (FIFO, no needless
    wait), and everything is let go in the end."""
    rng = random.Random(seed)

    async def main() -> None:
        locks = RangeLockManager()
        held: list[tuple[int, int, bool]] = []
        waiting: list[tuple[int, int, bool, asyncio.Task[None]]] = []

        def conflict(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> bool:
            return a[0] <= b[1] and b[0] <= a[1] and (a[2] or b[2])

        async def settle() -> None:
            nonlocal waiting
            for _ in range(3):
                await asyncio.sleep(0)
            still = []
            for first, last, excl, task in waiting:
                if task.cancelled():
                    continue
                if task.done():
                    held.append((first, last, excl))
                else:
                    still.append((first, last, excl, task))
            waiting = still

        for _ in range(300):
            r = rng.random()
            if held and r < 0.4:
                first, last, _excl = held.pop(rng.randrange(len(held)))
                locks.release(first, last)
            elif waiting and r < 0.5:
                waiting[rng.randrange(len(waiting))][3].cancel()
            else:
                first = rng.randrange(64)
                last = first if rng.random() < 0.4 else min(63, first + rng.randrange(24))
                excl = rng.random() < 0.5
                fut = locks.try_acquire(first, last, excl)
                if fut is None:
                    held.append((first, last, excl))
                else:
                    async def wait(f: asyncio.Future[None] = fut, a: int = first,
                                   b: int = last) -> None:
                        try:
                            await f
                        except asyncio.CancelledError:
                            if f.done() and not f.cancelled():
                                locks.release(a, b)
                            raise

                    waiting.append((first, last, excl, asyncio.ensure_future(wait())))
            await settle()
            for i, a in enumerate(held):
                for b in held[i + 1:]:
                    assert not conflict(a, b), (a, b)
            for j, (first, last, excl, _task) in enumerate(waiting):
                me = (first, last, excl)
                assert any(conflict(me, h) for h in held) or any(
                    conflict(me, (w[0], w[1], w[2])) for w in waiting[:j]
                ), me
        for _ in range(1000):
            if not (held or waiting):
                break
            if held:
                first, last, _excl = held.pop()
                locks.release(first, last)
            await settle()
        assert _clean(locks)

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# ChunkTable.set_range: a run of chunks in one call.

_PAGE = 1 << chunktable.PAGE_SHIFT  # chunks per bitmap page


def test_set_range_sets_a_run_without_a_call_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    table = ChunkTable(SimulatedStorage(), "t", 4 * _PAGE)
    calls = 0

    def counting(*args: object) -> bool:
        nonlocal calls
        calls += 1
        return True

    monkeypatch.setattr(table, "set", counting)
    monkeypatch.setattr(table, "_flip", counting)
    table.set_range(_PAGE - 100, _PAGE + WIDE)  # across a page boundary
    assert calls == 0
    assert table.count == WIDE + 101
    assert table._pending == [(chunktable._SET, c) for c in range(_PAGE - 100, _PAGE + WIDE + 1)]
    table._pending.clear()
    table.set_range(_PAGE - 50, _PAGE + 10)  # already set: nothing new, nothing pending
    assert calls == 0 and table.count == WIDE + 101 and not table._pending


@pytest.mark.parametrize("seed", range(3))
async def test_set_range_agrees_with_set_per_chunk_and_survives_a_power_loss(seed: int) -> None:
    """Random runs over byte and page boundaries, over chunks partly set already: the same
    bits, counts and journal records (in the same order) as one ``set`` per chunk; committed,
    they are what a power loss and a load give back."""
    rng = random.Random(seed)
    chunks = 3 * _PAGE
    storage = SimulatedStorage()
    bulk = ChunkTable(storage, "bulk", chunks)
    each = ChunkTable(SimulatedStorage(), "each", chunks)
    for _ in range(60):
        first = rng.choice([rng.randrange(chunks), _PAGE - rng.randrange(1, 20),
                            2 * _PAGE - rng.randrange(1, 300)])
        last = min(chunks - 1, first + rng.choice([1, 7, 8, 9, 63, 64, 65, 300, _PAGE]))
        if rng.random() < 0.3:
            c = rng.randrange(first, last + 1)
            bulk.set(c)
            each.set(c)
        bulk.set_range(first, last)
        for c in range(first, last + 1):
            each.set(c)
        assert bulk._pending == each._pending
        assert bulk.count == each.count and bulk._page_count == each._page_count
        if rng.random() < 0.3:
            await bulk.commit()
            each._pending.clear()
        else:
            each._pending = list(bulk._pending)
        probe = rng.randrange(chunks - 400)
        probe_last = probe + rng.choice([0, 1, 64, 399])
        assert bulk.unset(probe, probe_last) == [
            c for c in range(probe, probe_last + 1) if not each.has(c)]
    await bulk.commit()
    assert bulk._pages == each._pages
    after = ChunkTable(storage.power_loss(), "bulk", chunks)
    await after.load()
    assert after.damaged is None and after._pages == each._pages and after.count == each.count


# --------------------------------------------------------------------------------------------
# Through an engine: a 1 MiB write over 4 KiB chunks with a preserve active.


@pytest.mark.parametrize("method", ["cow", "log"])
async def test_a_wide_write_takes_its_lock_and_bits_in_bulk(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its chunks are copied and their changed bits durable, a 1 MiB write queues on no
    chunk and sets no bit one by one; what it wrote reads back from the live volume, and the
    preserved image keeps what it had."""
    pool = await Pool.open(tmp_path / "pool")
    try:
        await pool.create_volume("v", 4 << 20, method=method, chunk_size=4096)
        s = await pool.open_export("v", "test")
        await s.write(1 << 20, b"a" * (1 << 20))
        await s.close()
        assert await pool.preserve("v") == "v@0"
        s = await pool.open_export("v", "test")
        await s.write(1 << 20, b"b" * (1 << 20))  # first write: copies, bits set and committed
        await s.flush()  # and the engine's own entries for it
        enqueued: list[int] = []
        real_enqueue = RangeLockManager._enqueue

        def counting_enqueue(self: RangeLockManager, req: Any) -> None:
            enqueued.append(req.first)
            real_enqueue(self, req)

        real_set = ChunkTable.set

        def no_set(self: ChunkTable, chunk: int) -> None:
            if self.name.startswith("changed-"):
                raise AssertionError("changed bit set per chunk")
            real_set(self, chunk)

        monkeypatch.setattr(RangeLockManager, "_enqueue", counting_enqueue)
        monkeypatch.setattr(ChunkTable, "set", no_set)
        for _ in range(3):
            await s.write(1 << 20, b"c" * (1 << 20))
        assert not enqueued
        monkeypatch.undo()
        assert await s.read((1 << 20) - 4096, (1 << 20) + 8192) == \
            b"\0" * 4096 + b"c" * (1 << 20) + b"\0" * 4096
        await s.close()
        image = await pool.open_export("v@0", "test")
        assert await image.read(1 << 20, 1 << 20) == b"a" * (1 << 20)
        await image.close()
    finally:
        await pool.close()
