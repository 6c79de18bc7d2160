"""Mirror: an old session's unflushed write fanned out to several legs, then a power loss that
kept it on some legs only, must not leave two images differing at a chunk that the changed map
between them does not name (an incremental backup would then restore the older image's chunk).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import SimPool

from owm.engine import base
from owm.engine.mirror import MirrorEngine
from owm.pool.pool import Pool

CHUNK = 4096
CHUNKS = 8


async def _image(pool: Pool, gen: int) -> bytes:
    # The engine's read: generation 2 is the live view, which has no image reader.
    return bytes(await pool.volume("v").engine.read(gen, 0, CHUNK * CHUNKS))


def _differ(a: bytes, b: bytes) -> set[int]:
    return {c for c in range(CHUNKS)
            if a[c * CHUNK:(c + 1) * CHUNK] != b[c * CHUNK:(c + 1) * CHUNK]}


@pytest.mark.parametrize("kept_on", ["image-1", "primary"])
async def test_old_write_kept_on_some_legs_only_is_in_the_changed_maps(
        tmp_path: Path, kept_on: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)
    sim = SimPool(tmp_path)
    pool = await sim.open()
    await pool.create_volume("v", CHUNK * CHUNKS, method="mirror", chunk_size=CHUNK, legs=3)
    old = await pool.volume("v").open_session("old")  # generation 0, open across both preserves
    await old.write(0, b"\0" * CHUNK * CHUNKS)
    for _ in range(3):  # the write-intent bits are cleared lazily, a flush or two later
        await old.flush()
    assert await pool.preserve("v") == "v@0"
    assert await pool.preserve("v") == "v@1"
    # Goes to the legs of V0, V1 and the live view V2; not flushed, so a power loss may keep it
    # on any of them.
    await old.write(3 * CHUNK + 10, b"\1" * 100)
    engine = pool.volume("v").engine
    assert isinstance(engine, MirrorEngine)
    await engine.commit_writeback()  # the held write reaches the legs' page cache
    leg = engine._image_leg(1) if kept_on == "image-1" else engine._primary()
    await engine.storage.sync(f"leg-{leg}.data")  # ... and one leg's disk
    pool = await sim.crash()
    try:
        images = [await _image(pool, g) for g in range(3)]
        assert _differ(images[0], images[2]) or _differ(images[1], images[2]) or \
            _differ(images[0], images[1]), "the scenario did not make the legs diverge"
        for since, upto in [(0, 1), (1, 2), (0, 2)]:
            changed = pool.changed_chunks(f"v@{upto}", since)
            assert changed is not None
            differ = _differ(images[since], images[upto])
            assert differ <= set(changed), (since, upto, sorted(differ), changed)
            assert set(changed) <= {3}, (since, upto, changed)  # never the whole image
        # Still so after a clean restart (the bits were made durable, not only set).
        pool = await sim.restart()
        for since, upto in [(0, 1), (1, 2), (0, 2)]:
            changed = pool.changed_chunks(f"v@{upto}", since)
            differ = _differ(images[since], images[upto])
            assert changed is not None and differ <= set(changed), (since, upto, changed)
    finally:
        await sim.close()


async def test_unflushed_write_from_before_a_preserve_kept_on_one_leg_is_in_the_map(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same hole one step earlier: a write made before the preserve (so it belongs to V0 and
    V1 alike) sits unsynced on every leg when one of them is split off; the power loss keeps it
    on the split leg only."""
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)
    sim = SimPool(tmp_path)
    pool = await sim.open()
    await pool.create_volume("v", CHUNK * CHUNKS, method="mirror", chunk_size=CHUNK, legs=2)
    old = await pool.volume("v").open_session("old")  # open: the preserve does not flush
    await old.write(5 * CHUNK, b"\2" * CHUNK)
    engine = pool.volume("v").engine
    assert isinstance(engine, MirrorEngine)
    await engine.commit_writeback()
    assert await pool.preserve("v") == "v@0"
    await engine.storage.sync(f"leg-{engine._image_leg(0)}.data")
    pool = await sim.crash()
    try:
        images = [await _image(pool, g) for g in range(2)]
        assert _differ(images[0], images[1]) == {5}, "the scenario did not make the legs diverge"
        changed = pool.changed_chunks("v@1", 0)
        assert changed is not None and 5 in changed, changed
    finally:
        await sim.close()
