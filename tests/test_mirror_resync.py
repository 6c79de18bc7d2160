"""The mirror engine after an unclean stop, and its resyncs raced with writes.

After a crash a mirror serves at once and resyncs in the background only the chunks of its
write-intent map (issue 9 item 13): tested with the power-loss storage (writes in flight, pages
written back at random so the legs really differ) and with a real daemon killed with SIGKILL.
The release of a split leg (resync from the live leg by its dirty map) is paused between each
of its steps while the draining and the live generation write, flush and crash (issue 18
item 1): the leg must rejoin holding every write, and every acknowledged write must survive.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from owm.engine.mirror import MirrorEngine
from owm.pool.pool import Pool
from owm.pool.volume import ImageReader, Session
from owm.storage import Buffer
from owm.storage.simulated import SimulatedStorage

CHUNK = 4096
FILL = 0x11


class CountingStorage(SimulatedStorage):
    """Simulated storage that counts requests per object and can hold writes to one object."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, list[tuple[int, int]]] = {}  # object -> (offset, length) read
        self.written: dict[str, list[int]] = {}  # object -> offsets written or discarded
        self.hold: str | None = None
        self.gate = asyncio.Event()

    @classmethod
    def adopt(cls, other: SimulatedStorage) -> CountingStorage:
        storage = cls()
        storage._objects = other._objects
        storage._durable_names = other._durable_names
        return storage

    def peek(self, name: str, size: int) -> bytes:
        """An object's current bytes, without counting a read."""
        obj = self._objects.get(name)
        data = bytes(obj.current[:size]) if obj is not None else b""
        return data + bytes(size - len(data))

    def reset(self) -> None:
        self.reads.clear()
        self.written.clear()

    async def read(self, name: str, offset: int, length: int) -> bytes:
        self.reads.setdefault(name, []).append((offset, length))
        return await super().read(name, offset, length)

    async def _count_write(self, name: str, offset: int) -> None:
        if name == self.hold:
            await self.gate.wait()
        self.written.setdefault(name, []).append(offset)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        await self._count_write(name, offset)
        await super().write(name, offset, data)

    async def discard(self, name: str, offset: int, length: int) -> None:
        await self._count_write(name, offset)
        await super().discard(name, offset, length)


def engine_of(pool: Pool, name: str = "v") -> MirrorEngine:
    engine = pool.volume(name).engine
    assert isinstance(engine, MirrorEngine)
    return engine


async def session(pool: Pool, name: str = "v") -> Session:
    s = await pool.open_export(name, "test")
    assert isinstance(s, Session)
    return s


async def read_image(pool: Pool, image: str, size: int) -> bytes:
    r = await pool.open_export(image, "test")
    assert isinstance(r, ImageReader)
    try:
        return await r.read(0, size)
    finally:
        await r.close()


def image_row(pool: Pool, gen: int, name: str = "v") -> dict[str, Any]:
    return next(i for i in pool.status(name)[0]["images"] if i["generation"] == gen)


async def test_power_loss_serves_at_once_and_resyncs_only_the_intent_map(tmp_path: Path) -> None:
    chunks = 256
    size = chunks * CHUNK
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(tmp_path, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    await pool.create_volume("v", size, "mirror", CHUNK, legs=3)
    s = await session(pool)
    await s.write(0, bytes([FILL]) * size)
    await s.flush()
    await s.flush()  # the fill's intent bits are cleared lazily, one flush later
    await s.close()
    assert await pool.preserve("v") == "v@0"  # drained at once: leg 2 is split off
    live = await session(pool)
    fua = range(10, 20)  # acknowledged with FUA: must survive
    plain = range(20, 30)  # acknowledged, never flushed: may or may not survive, per leg
    flying = range(30, 40)  # in flight at the power loss
    for c in fua:
        await live.write(c * CHUNK, bytes([c]) * CHUNK, fua=True)
    for c in plain:
        await live.write(c * CHUNK, bytes([c]) * CHUNK)
    tasks = [asyncio.create_task(live.write(c * CHUNK, bytes([c]) * CHUNK)) for c in flying]
    for _ in range(3):
        await asyncio.sleep(0)
    rng = random.Random(5)  # unsynced pages reach the disk at random: the legs differ
    after = {n: CountingStorage.adopt(st.power_loss(rng)) for n, st in storages.items()}
    await pool.kill()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    storage = after["v"]
    legs = [storage.peek(f"leg-{i}.data", size) for i in range(3)]
    assert legs[0] != legs[1], "the test needs legs that differ after the power loss"
    storage.hold = "leg-1.data"  # the resync cannot write to leg 1 until the gate opens
    storage.reset()
    pool = await asyncio.wait_for(Pool.open(tmp_path, storage_factory=lambda n: after[n]), 10)
    try:
        engine = engine_of(pool)
        live = await session(pool)
        # Served at once: reads are answered while the resync is held at its first chunk
        # (which it has locked), pending chunks of the map included.
        held = next(iter(engine.intent))
        got = await asyncio.wait_for(live.read(0, held * CHUNK), 10)
        rest = await asyncio.wait_for(live.read((held + 1) * CHUNK, size - (held + 1) * CHUNK), 10)
        assert engine.resync_progress is not None
        assert got == legs[0][: held * CHUNK]  # the primary's answer: one consistent view
        assert rest == legs[0][(held + 1) * CHUNK :]
        storage.gate.set()
        await asyncio.wait_for(engine.wait_resynced(), 10)
        copied = sorted(off // CHUNK for off in storage.written.get("leg-1.data", []))
        # Only the write-intent map was resynced: chunks of writes since the last flushes.
        assert set(range(20, 30)) <= set(copied) <= set(range(10, 40)), copied
        assert len(copied) == len(set(copied)) == engine.resynced_chunks
        # It read each of those chunks once from the primary, and nothing else.
        resync_reads = [r for r in storage.reads["leg-0.data"] if r[1] == CHUNK]
        assert sorted(off // CHUNK for off, _ in resync_reads) == copied
        assert len(storage.reads["leg-0.data"]) == len(copied) + 2  # and the two reads above
        assert engine.resync_progress is None
        now = [storage.peek(f"leg-{i}.data", size) for i in range(3)]
        assert now[0] == now[1] == await live.read(0, size)
        for c in range(chunks):
            piece = now[0][c * CHUNK : (c + 1) * CHUNK]
            allowed = {bytes([c]) * CHUNK} if c in fua else {bytes([FILL]) * CHUNK}
            if c in plain or c in flying:
                allowed.add(bytes([c]) * CHUNK)
            assert piece in allowed, c
        # The split leg is the preserved image: untouched and still labelled true.
        assert now[2] == bytes([FILL]) * size
        assert await read_image(pool, "v@0", size) == bytes([FILL]) * size
        row = image_row(pool, 0)
        assert (row["state"], row["consistency"]) == ("drained", "transaction-consistent")
        await live.close()
        await pool.release("v@0")
        assert storage.peek("leg-2.data", size) == now[0]
    finally:
        await pool.close()
