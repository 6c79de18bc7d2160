"""Small disk writes on the event loop, and when they must leave it (owm.storage.inlinewrite).

The guard is driven with a fake clock and fake dirty-memory figures; the storage tests run a
real ``LocalStorage`` with its guard in place (on tmpfs too, where it is otherwise not used),
counting the writer thread's batches: an inline write makes none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from owm.storage import aio, local
from owm.storage.inlinewrite import (
    BUDGET,
    FIRST_BACKOFF,
    MAX_BACKOFF,
    SLOW,
    STALL,
    InlineWriteGuard,
)
from owm.storage.local import LocalStorage

GIB = 1 << 30


class Fake:
    def __init__(self) -> None:
        self.now = 100.0
        self.dirty = 0
        self.threshold = GIB
        self.broken = False

    def clock(self) -> float:
        return self.now

    def state(self) -> tuple[int, int]:
        if self.broken:
            raise OSError("no /proc here")
        return self.dirty, self.threshold


def test_guard_follows_the_dirty_memory_and_backs_off_after_a_stall() -> None:
    fake = Fake()
    guard = InlineWriteGuard(fake.state, fake.clock)
    assert guard.allows()
    fake.dirty = GIB // 2 + 1  # over half of the background threshold
    assert guard.allows(), "looked again before its 100 ms were up"
    fake.now += 0.11
    assert not guard.allows()
    fake.dirty = GIB // 4
    fake.now += 0.11
    assert guard.allows()
    # Writes blocked a little: allowed until they add up to more than the budget in a second.
    guard.took(SLOW / 2)
    guard.took(BUDGET / 2)
    assert guard.allows()
    fake.now += 1.5  # a new second: the budget is whole again
    guard.took(BUDGET / 2)
    guard.took(BUDGET / 3)
    assert guard.allows()
    guard.took(BUDGET / 3)
    assert not guard.allows(), "slow writes over the budget did not start a back-off"
    fake.now += FIRST_BACKOFF + 0.01
    assert guard.allows()
    # A write blocked long: off for a back-off at once, which doubles while stalls go on.
    fake.now += 300  # long past: the back-off starts afresh
    guard.took(STALL * 5)
    assert not guard.allows()
    fake.now += FIRST_BACKOFF + 0.01
    assert guard.allows()
    guard.took(STALL * 5)
    fake.now += FIRST_BACKOFF + 0.01
    assert not guard.allows(), "the second back-off did not double"
    fake.now += FIRST_BACKOFF
    assert guard.allows()
    for _ in range(12):
        guard.took(1.0)
    fake.now += MAX_BACKOFF - 0.01
    assert not guard.allows()
    fake.now += 0.02
    assert guard.allows(), "the back-off grew past its bound"
    # Long after the last stall a new one starts from the first back-off again.
    fake.now += 4 * MAX_BACKOFF + 1
    guard.took(1.0)
    fake.now += FIRST_BACKOFF + 0.01
    assert guard.allows()
    # Figures it cannot read: every write leaves the loop.
    fake.broken = True
    fake.now += 0.2
    assert not guard.allows()


def guarded(root: Path, fake: Fake) -> LocalStorage:
    storage = LocalStorage(root)
    storage._write_mode = None  # as on ext4: no RWF_NOWAIT writes
    storage._guard = InlineWriteGuard(fake.state, fake.clock)
    storage._piece = aio.PIECE
    return storage


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    inner = local._settle

    def counted(done: list[tuple[asyncio.Future[None], OSError | None]]) -> None:
        calls[0] += 1
        inner(done)

    monkeypatch.setattr(local, "_settle", counted)
    return calls


def rig(root: Path, monkeypatch: pytest.MonkeyPatch,
        dirty: int = 0) -> tuple[Fake, LocalStorage, list[int]]:
    """Fake figures, a guarded storage on them, and its count of writer batches."""
    fake = Fake()
    fake.dirty = dirty
    return fake, guarded(root, fake), count_batches(monkeypatch)


async def test_small_writes_run_inline_while_allowed_and_queue_when_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, storage, batches = rig(tmp_path, monkeypatch)
    try:
        await asyncio.gather(*(storage.write("obj", k * 4096, bytes([k + 1]) * 4096)
                               for k in range(16)))
        assert batches[0] == 0, "a write the guard allowed left the loop"
        # Across a 64 KiB boundary: through the writer, which cuts it there.
        await storage.write("obj", 60 * 1024, bytes([99]) * 8192)
        assert batches[0] == 1
        fake.dirty = GIB  # the kernel is about to throttle writers
        fake.now += 1
        await asyncio.gather(*(storage.write("obj", k * 4096, bytes([k + 50]) * 4096)
                               for k in range(8)))
        assert batches[0] == 2, "writes went inline while too much memory was dirty"
        got = await storage.read("obj", 0, 68 * 1024)
        want = b"".join(bytes([k + 50]) * 4096 for k in range(8))
        want += b"".join(bytes([k + 1]) * 4096 for k in range(8, 15)) + bytes([99]) * 8192
        assert got == want
    finally:
        await storage.close()


async def test_an_inline_write_never_passes_a_queued_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard allows again while a queued write to the same bytes is still outstanding:
    the next write queues behind it, and the later bytes win."""
    fake, storage, batches = rig(tmp_path, monkeypatch, dirty=GIB)
    try:
        await storage.write("obj", 0, b"\0")  # the object exists
        first = asyncio.ensure_future(storage.write("obj", 0, b"A" * 4096))
        await asyncio.sleep(0)  # queued; the writer takes it at the end of this turn
        assert storage._queue_busy
        fake.dirty = 0
        fake.now += 1
        await storage.write("obj", 0, b"B" * 4096)
        await first
        assert await storage.read("obj", 0, 4096) == b"B" * 4096
        assert batches[0] >= 1
    finally:
        await storage.close()


async def test_a_stalled_inline_write_sends_the_next_ones_to_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, storage, batches = rig(tmp_path, monkeypatch)
    ticks = [0.5, 0.0]  # the next inline write "takes" 500 ms
    real = local.time.perf_counter
    monkeypatch.setattr(local.time, "perf_counter", lambda: ticks.pop() if ticks else real())
    try:
        await storage.write("obj", 0, b"x" * 4096)
        assert batches[0] == 0
        await storage.write("obj", 4096, b"y" * 4096)
        assert batches[0] == 1, "a write right after a stall stayed on the loop"
        fake.now += FIRST_BACKOFF + 0.01
        for _ in range(200):  # the writer thread lets go of the queue just after its batch
            if not storage._queue_busy:
                break
            await asyncio.sleep(0.005)
        await storage.write("obj", 8192, b"z" * 4096)
        assert batches[0] == 1
        assert await storage.read("obj", 0, 12288) == b"x" * 4096 + b"y" * 4096 + b"z" * 4096
    finally:
        await storage.close()
