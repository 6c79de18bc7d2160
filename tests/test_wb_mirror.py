"""Mirror write-back: after a power loss at any storage call of held writes and the group commits
that release them, the maps still cover every chunk where the legs may differ.

A 3-leg mirror with leg 2 split off as a drained image takes first writes (each sets a dirty bit
of leg 2 and a write-intent bit, so each is held), a flush, a held second write, a FUA write and
a write left held; the power fails at every storage call in turn, with the unsynced pages
reaching the disk at random.  After the restart the background resync (write-intent map) and
the release of the image (leg 2's dirty map) must leave all three legs equal to the live view:
a chunk where they differ that no map named would stay different for ever.  A planted
reordering (held writes released before the maps are durable) must make that fail.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from faults import SimPool

from owm.engine import base
from owm.engine.mirror import MirrorEngine
from owm.pool.volume import Session
from owm.storage.simulated import PowerLost

CHUNK = 4096
CHUNKS = 16
SIZE = CHUNK * CHUNKS


def _legs(sim: SimPool) -> list[bytes]:
    storage = sim.storages["v"]
    out = []
    for i in range(3):
        obj = storage._objects.get(f"leg-{i}.data")
        data = bytes(obj.current[:SIZE]) if obj is not None else b""
        out.append(data + bytes(SIZE - len(data)))
    return out


async def _session(sim: SimPool) -> Session:
    s = await sim.p.open_export("v", "test")
    assert isinstance(s, Session)
    return s


async def _run(root: Path, crash_at: int | None, seed: int) -> int:
    """The writes, with the power failing at their ``crash_at``-th storage call (None: never);
    returns the storage calls they took, after checking the legs when it crashed."""
    sim = SimPool(root)
    await sim.open()
    try:
        await sim.p.create_volume("v", SIZE, "mirror", CHUNK, legs=3)
        s = await _session(sim)
        await s.write(0, b"\x11" * SIZE)
        await s.flush()
        await s.flush()  # the fill's write-intent bits are cleared lazily, one flush later
        await s.close(clean=True)
        assert await sim.p.preserve("v") == "v@0"  # drained at once: leg 2 split off
        storage = sim.storages["v"]
        start = storage.calls
        if crash_at is not None:
            storage.crash_at = start + crash_at
        try:
            live = await _session(sim)
            await asyncio.gather(*(live.write(c * CHUNK + 100, bytes([c]) * 500)
                                   for c in (1, 4, 5)))
            await live.write(9 * CHUNK - 10, b"y" * 20)  # chunks 8 and 9
            await live.flush()
            await live.write(12 * CHUNK, b"t" * CHUNK)
            await live.write(12 * CHUNK + 8, b"s" * 100)  # held behind the first
            await live.write(14 * CHUNK, b"f" * CHUNK, fua=True)
            await live.write(3 * CHUNK, b"u" * 10)  # never committed
        except PowerLost:
            pass
        calls = storage.calls - start
        if crash_at is None:
            return calls
        await sim.crash(random.Random(seed))
        engine = sim.p.volume("v").engine
        assert isinstance(engine, MirrorEngine)
        await asyncio.wait_for(engine.wait_resynced(), 10)
        await sim.p.release("v@0")  # leg 2 resyncs from its dirty map and rejoins
        reader = await _session(sim)
        view = bytes(await reader.read(0, SIZE))
        await reader.close(clean=True)
        legs = _legs(sim)
        for i, leg in enumerate(legs):
            differ = [c for c in range(CHUNKS)
                      if leg[c * CHUNK : (c + 1) * CHUNK] != view[c * CHUNK : (c + 1) * CHUNK]]
            assert not differ, f"crash at call {crash_at}: leg {i} differs at chunks {differ}"
        return calls
    finally:
        await sim.close()


async def _every_crash_point(root: Path) -> None:
    calls = await _run(root / "dry", None, 0)
    assert calls > 0
    for n in range(1, calls + 2):
        await _run(root / f"crash{n}", n, n)


@pytest.mark.parametrize("delay", [3600.0, 0.0], ids=["at-flush", "timer"])
async def test_legs_agree_after_a_power_loss_at_every_point(
        tmp_path: Path, delay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WRITEBACK_DELAY", delay)
    await _every_crash_point(tmp_path)


async def test_held_writes_released_before_their_maps_are_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)

    async def reordered(self: MirrorEngine) -> None:
        counts = {c: len(ops) for c, ops in self._held.items()}
        changed = self._changed_batch()
        await asyncio.gather(*(self._release_held(c, k) for c, k in counts.items()))
        await self._commit_changed(changed)
        await self.intent.commit()
        await asyncio.gather(*(t.commit() for t in self.dirty.values()))

    monkeypatch.setattr(MirrorEngine, "_commit_batch", reordered)
    with pytest.raises(AssertionError, match="differs at chunks"):
        await _every_crash_point(tmp_path)


async def test_a_held_write_is_read_back_from_every_view_it_belongs_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its commit a held write is in the live view and, written by the preserved
    generation, in its image too; a write of the live generation is not in the image."""
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)
    sim = SimPool(tmp_path)
    await sim.open()
    try:
        await sim.p.create_volume("v", SIZE, "mirror", CHUNK, legs=3)
        old = await _session(sim)
        await old.write(0, b"\x11" * SIZE)
        await old.flush()
        await old.flush()
        assert await sim.p.preserve("v") == "v@0"  # old keeps generation 0: draining
        new = await _session(sim)
        engine = sim.p.volume("v").engine
        assert isinstance(engine, MirrorEngine)
        await old.write(CHUNK, b"o" * 100)  # to the image's leg and the live ones
        await new.write(2 * CHUNK, b"n" * 100)  # to the live legs only; leg 2 dirty
        assert engine.held_bytes > 0, "the first writes were not held"
        assert _legs(sim)[0][CHUNK : CHUNK + 100] == b"\x11" * 100, "not held"
        live = bytes(await new.read(0, SIZE))
        image = bytes(await old.read(0, SIZE))
        assert live[CHUNK : CHUNK + 100] == b"o" * 100 == image[CHUNK : CHUNK + 100]
        assert live[2 * CHUNK : 2 * CHUNK + 100] == b"n" * 100
        assert image[2 * CHUNK : 2 * CHUNK + 100] == b"\x11" * 100
        await new.flush()
        assert engine.held_bytes == 0
        legs = _legs(sim)
        assert legs[0] == legs[1] == live
        assert legs[2] == image
        await old.close(clean=True)
        await new.close(clean=True)
    finally:
        await sim.close()
