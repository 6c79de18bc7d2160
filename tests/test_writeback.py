"""Ordered write-back in ``cow``, ``log`` and ``mirror``: a first write to a shared chunk is
acknowledged before its copy (or a split leg's dirty bit) is durable, and the power-loss
simulation proves the order still holds.

The scenarios hold overwrites on purpose (the background commit is pushed far off, so only FUA,
FLUSH, a drain, a release or a full backlog commit): first writes to shared chunks, a second
write and a zeroing of a held chunk, a preserve while overwrites are held (the new live view's
copy must come from the held data), old-generation writes to chunks that a newer image has a
pending copy of, a FUA write, a release with its move-down, and reads of every view checked
against the model between the steps.  ``faults.crash_matrix`` then loses power at every storage
call of the operation (every other time with a random subset of unsynced pages written back)
and checks, after the restart, that every drained image is unchanged, every FUA or flushed write
kept, every unflushed one either kept or lost sector by sector to a value the sector held since
it was last durable, and every label true.  A planted reordering (held overwrites released
before the copies and entries they follow are durable) must make that check fail.
"""

from __future__ import annotations

import asyncio

import pytest
from faults import VOLUME, Run, Scenario, crash_matrix, run_once

from owm.engine import base
from owm.engine.cow import CowEngine
from owm.engine.log import LogEngine
from owm.storage.simulated import PowerLost

CHUNK = 4096
CHUNKS = 12
SIZE = CHUNK * CHUNKS
LIMIT = 40


async def _verify(run: Run) -> None:
    """Before any crash every acknowledged write is visible, in exactly its views."""
    if run.crashed:
        return
    engine = run.pool.volume(VOLUME).engine
    try:
        for gen in run.t.model.views:
            if gen in engine.views and gen not in run.t.doomed:
                got = await engine.read(gen, 0, SIZE)
                assert got == bytes(run.t.model.views[gen]), f"view {gen} differs before a crash"
    except PowerLost:
        pass


async def _setup(run: Run) -> None:
    """@0 and @1 drained (each chunk of @1 partly its own), an open session of generation 2."""
    s = await run.session()
    for c in range(CHUNKS):
        await run.write(s, c * CHUNK, 1, CHUNK, fua=True)
    await run.finish(s)
    await run.preserve()
    s = await run.session()
    for c in range(0, CHUNKS, 3):
        await run.write(s, c * CHUNK, 2, CHUNK, fua=True)
    await run.finish(s)
    await run.preserve()
    run.state["old"] = await run.session()


async def _operation(run: Run) -> None:
    old = run.state["old"]
    for c in range(5):  # first writes to shared chunks: copies into @1, overwrites held
        await run.write(old, c * CHUNK, 0x10 + c, CHUNK)
    await run.write(old, 6 * CHUNK + 1024, 0x20, 2048)
    await _verify(run)
    await run.write(old, 0, 0x30, 2048)  # a second write to a held chunk
    await run.zero(old, 2 * CHUNK, CHUNK, punch=True)
    await run.zero(old, 4 * CHUNK, 1024, punch=False)
    await _verify(run)
    await run.preserve()  # @2, still draining: the cut includes the held overwrites
    new = await run.session()
    await run.write(new, 512, 0x40, 1024)  # copy into @2 through the held data
    await run.write(new, 7 * CHUNK, 0x41, CHUNK)
    await run.write(old, 8 * CHUNK, 0x42, CHUNK)  # old generation: a copy into @1
    await run.write(old, 0, 0x43, 512)  # to @2's pending copy and the held live chunk
    await _verify(run)
    await run.write(new, 9 * CHUNK, 0x44, CHUNK, fua=True)
    await run.write(new, 3 * CHUNK, 0x45, CHUNK)
    await run.flush(new)
    await run.write(new, 4 * CHUNK, 0x46, 2048)
    await run.write(old, 10 * CHUNK, 0x47, CHUNK)
    await _verify(run)
    release = run.spawn(run.release(1))  # move-down into @0 beside held overwrites
    await run.write(new, 6 * CHUNK, 0x48, CHUNK)
    await run.write(old, 11 * CHUNK, 0x49, 2048)
    await run.flush(old)
    await run.finish(old)  # @2 drains: durable first
    await release
    await run.write(new, 1 * CHUNK, 0x4A, CHUNK)
    await run.write(new, 5 * CHUNK + 2048, 0x4B, 1024)
    await _verify(run)
    await asyncio.sleep(0)


def _scenario(name: str, method: str = "cow") -> Scenario:
    # A mirror needs a leg per image outstanding at once (@0, @1, @2) besides the live one.
    return Scenario(f"{name}-{method}", method, SIZE, _setup, _operation, chunk_size=CHUNK,
                    legs=4)


METHODS = ["cow", "log", "mirror"]


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only FUA, FLUSH, drains, releases and full backlogs commit (no timer)."""
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)


@pytest.mark.parametrize("method", METHODS)
async def test_a_first_write_is_acknowledged_before_any_sync(held: None, method: str) -> None:
    async def operation(run: Run) -> None:
        engine = run.pool.volume(VOLUME).engine
        synced: list[str] = []
        real_sync = run.storage.sync

        async def sync(name: str) -> None:
            synced.append(name)
            await real_sync(name)

        run.storage.sync = sync  # type: ignore[method-assign]
        await run.write(run.state["old"], 0, 0x10, CHUNK)
        await run.write(run.state["old"], CHUNK, 0x11, 1024)
        run.storage.sync = real_sync  # type: ignore[method-assign]
        # No copy, table entry, data or changed-chunk bit waits: the bit (write-ahead, so that
        # incremental backups after a crash miss nothing) is made durable by the group commit
        # that releases the write.
        assert not synced, f"a non-FUA first write waited for a sync of {synced}"
        assert engine._changed_ahead, "the changed bits were committed before the write"
        assert engine.held_bytes > 0
        await _verify(run)
        await run.flush(run.state["old"])
        assert engine.held_bytes == 0

    await run_once(Scenario("ack", method, SIZE, _setup, operation, chunk_size=CHUNK, legs=4),
                   None)


async def test_a_full_backlog_makes_writers_wait_for_a_commit(held: None) -> None:
    async def operation(run: Run) -> None:
        engine = run.pool.volume(VOLUME).engine
        engine.held_cap = 2 * CHUNK
        for c in range(CHUNKS):
            await run.write(run.state["old"], c * CHUNK, 0x10 + c, CHUNK)
            assert engine.held_bytes <= 3 * CHUNK
        await _verify(run)

    await run_once(Scenario("cap", "cow", SIZE, _setup, operation, chunk_size=CHUNK), None)


@pytest.mark.parametrize("method", METHODS)
async def test_power_loss_at_every_point_of_held_write_back(held: None, method: str) -> None:
    assert await crash_matrix(_scenario("writeback-held", method), LIMIT)


@pytest.mark.parametrize("method", METHODS)
async def test_power_loss_with_background_commits(method: str) -> None:
    """The timer commits on its own (after no delay), between and during the steps."""
    saved = base.WRITEBACK_DELAY
    base.WRITEBACK_DELAY = 0.0
    try:
        assert await crash_matrix(_scenario("writeback-timer", method), LIMIT // 2)
    finally:
        base.WRITEBACK_DELAY = saved


async def test_a_planted_reordering_is_caught(held: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Releasing held overwrites before their copies and entries are durable must fail."""
    original = CowEngine._commit_batch

    async def reordered(self: CowEngine) -> None:
        counts = {c: len(ops) for c, ops in self._held.items()}
        await asyncio.gather(*(self._release_held(c, k) for c, k in counts.items()))
        await original(self)

    monkeypatch.setattr(CowEngine, "_commit_batch", reordered)
    with pytest.raises(AssertionError, match=r"durable|ever written"):
        await crash_matrix(_scenario("writeback-reordered"), LIMIT)


async def test_log_entries_before_their_data_are_caught(
        held: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log's planted reordering: pending entries put in their tables (and so committed by
    the next flush or FUA) before the deltas they point into are synced."""

    async def reordered(self: LogEngine) -> None:
        for layer in self.layers:
            if layer.pending and layer.table is not None:
                for chunk in layer.pending:
                    layer.table.set(chunk)
                await layer.table.commit()
        await original(self)

    original = LogEngine._commit_batch
    monkeypatch.setattr(LogEngine, "_commit_batch", reordered)
    with pytest.raises(AssertionError, match=r"durable|ever written"):
        await crash_matrix(_scenario("writeback-reordered", "log"), LIMIT)
