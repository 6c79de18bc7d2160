"""A mirror write that fails on some legs only must not leave the legs different for ever.

A write to a chunk whose write-intent bit is already durable goes straight to the legs.  When
one leg refuses it (a full disk) after another took it, the legs differ at that chunk; the
write's error reaches the client, but nothing may then clear the chunk's bit while the legs
still differ, or no resync ever makes them agree: reads would depend on the leg read, and a
preserve that splits that leg off would give the preserved image bytes the live image does not
have (or the other way round) under a transaction-consistent label.  Each case makes one leg
fail one write, clears the fault, flushes, and checks that every in-sync leg equals the live
view, that a preserve gives an image equal to the live view, and that both still hold after a
power loss and a reopen.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from faults import SimPool

from owm.common.errors import NoSpace
from owm.engine import base
from owm.engine.mirror import MirrorEngine
from owm.pool.volume import Session

CHUNK = 4096
CHUNKS = 64
SIZE = CHUNK * CHUNKS
BIG = 24 * CHUNK  # more than mirror.PARALLEL_BYTES: every leg is written at once


class Fault:
    """Refuse writes to one leg's data object while armed."""

    def __init__(self, leg: int, spread: bool = False) -> None:
        self.name = f"leg-{leg}.data"
        # Once it fired, every leg refuses writes to the bytes it refused (as when the disk
        # filled up just then; the maps and other chunks still fit).
        self.spread = spread
        self.armed = False
        self.fired = 0
        self.span: tuple[int, int] | None = None

    def __call__(self, name: str, offset: int, length: int) -> bool:
        if not self.armed:
            return False
        if name == self.name and not (self.spread and self.span):
            self.fired += 1
            self.span = self.span or (offset, offset + length)
            return True
        if self.spread and self.span is not None and name.endswith(".data"):
            return offset < self.span[1] and self.span[0] < offset + length
        return False


def _leg(sim: SimPool, i: int) -> bytes:
    obj = sim.storages["v"]._objects.get(f"leg-{i}.data")
    data = bytes(obj.current[:SIZE]) if obj is not None else b""
    return data + bytes(SIZE - len(data))


def _engine(sim: SimPool) -> MirrorEngine:
    engine = sim.p.volume("v").engine
    assert isinstance(engine, MirrorEngine)
    return engine


async def _session(sim: SimPool) -> Session:
    s = await sim.p.open_export("v", "test")
    assert isinstance(s, Session)
    return s


async def _read(sim: SimPool, export: str = "v") -> bytes:
    s = await sim.p.open_export(export, "reader")
    try:
        return bytes(await s.read(0, SIZE))
    finally:
        await s.close(clean=True)


def _differ(a: bytes, b: bytes) -> list[int]:
    return [c for c in range(CHUNKS)
            if a[c * CHUNK : (c + 1) * CHUNK] != b[c * CHUNK : (c + 1) * CHUNK]]


async def _check(sim: SimPool, where: str) -> None:
    """Every in-sync leg equals the live view (read twice: one answer), and an image preserved
    now equals the live view; the image is then released again."""
    engine = _engine(sim)
    await asyncio.wait_for(engine.wait_resynced(), 10)
    live = await _read(sim)
    assert await _read(sim) == live, where
    for i in engine._sync_legs():
        bad = _differ(_leg(sim, i), live)
        assert not bad, f"{where}: leg {i} differs at {bad}"
    name = await sim.p.preserve("v")
    image = await _read(sim, name)
    bad = _differ(image, live)
    assert not bad, f"{where}: the preserved image differs at {bad}"
    await sim.p.release(name)


async def _fill(sim: SimPool, s: Session) -> None:
    """Write every chunk and flush once: the write-intent bits are durable and still set, so
    the next write to a chunk goes straight to the legs (not held)."""
    await s.write(0, b"\x11" * SIZE)
    await s.flush()


async def _after(sim: SimPool, fault: Fault, s: Session | None) -> None:
    """The fault cleared: flush (and end s), then check now, after a power loss and after a
    clean restart."""
    assert fault.fired, "the fault never fired"
    fault.armed = False
    if s is not None:
        for _ in range(3):  # enough flushes to clear every bit a flush may clear
            await s.flush()
        await s.close(clean=True)
    await _check(sim, "after the failed write and three flushes")
    await sim.crash()
    sim.storages["v"].fail_writes = fault
    await _check(sim, "after a power loss and a reopen")
    await sim.restart()
    sim.storages["v"].fail_writes = fault
    await _check(sim, "after a clean restart")


async def _failed_direct_write(sim: SimPool, s: Session, fault: Fault, offset: int,
                               data: bytes) -> None:
    fault.armed = True
    with pytest.raises(NoSpace):
        await s.write(offset, data)
    fault.armed = False


async def _second_leg(sim: SimPool, fault: Fault) -> None:
    """Leg 0 takes the write, leg 1 refuses it (legs are written one after another)."""
    s = await _session(sim)
    await _fill(sim, s)
    await _failed_direct_write(sim, s, fault, 5 * CHUNK + 100, b"\x22" * 300)
    await _after(sim, fault, s)


async def _primary_parallel(sim: SimPool, fault: Fault) -> None:
    """A large write runs on every leg at once: the primary refuses it, the others take it."""
    s = await _session(sim)
    await _fill(sim, s)
    await _failed_direct_write(sim, s, fault, 8 * CHUNK, b"\x33" * BIG)
    await _after(sim, fault, s)


async def _zeroing(sim: SimPool, fault: Fault) -> None:
    s = await _session(sim)
    await _fill(sim, s)
    fault.armed = True
    with pytest.raises(NoSpace):
        await s.write_zeroes(3 * CHUNK, 2 * CHUNK, may_trim=False)
    fault.armed = False
    await _after(sim, fault, s)


async def _image_leg(sim: SimPool, fault: Fault) -> None:
    """An old session's write after a preserve reaches the split leg (2) and the live legs; the
    split leg refuses it.  After the release the leg rejoins and must agree with the others."""
    s = await _session(sim)
    await _fill(sim, s)
    name = await sim.p.preserve("v")  # s keeps generation 0: leg 2 holds its draining image
    await _failed_direct_write(sim, s, fault, 6 * CHUNK + 10, b"\x44" * 200)
    for _ in range(3):
        await s.flush()
    await s.close(clean=True)
    image, live = await _read(sim, name), await _read(sim)
    assert image == live, f"the image differs from the live view at {_differ(image, live)}"
    await sim.p.release(name)
    await _after(sim, fault, None)


async def _held(sim: SimPool, fault: Fault) -> None:
    """A held write (its bit was new) is acknowledged; leg 1 refuses it at the group commit.
    It stays held and reaches every leg once the fault clears."""
    s = await _session(sim)
    fault.armed = True
    await s.write(2 * CHUNK, b"\x55" * 100)
    with pytest.raises(NoSpace):
        await s.flush()
    await _after(sim, fault, s)


async def _disk_fills(sim: SimPool, fault: Fault) -> None:
    """Leg 1 refuses the write and then the disk is full for every leg: the legs cannot be
    made to agree at once.  A preserve meanwhile is refused rather than split off a leg that
    differs, and flushes do not clear the chunk's write-intent bit: after a power loss the
    resync at the reopen makes the legs agree."""
    s = await _session(sim)
    await _fill(sim, s)
    fault.armed = True
    with pytest.raises(NoSpace):
        await s.write(5 * CHUNK + 100, b"\x66" * 300)
    with pytest.raises(NoSpace):
        await sim.p.preserve("v")
    assert not sim.p.volume("v").images
    for _ in range(3):
        await s.flush()
    # A first write elsewhere commits the write-intent map (with whatever the flushes cleared).
    await s.write(40 * CHUNK, b"\x67" * 10)
    await s.flush()
    fault.armed = False
    await sim.crash()
    sim.storages["v"].fail_writes = fault
    await _check(sim, "after a power loss while the legs differed")
    await _after(sim, fault, None)


async def _image_fills(sim: SimPool, fault: Fault) -> None:
    """The split leg refuses an old session's write and the disk is then full for every leg:
    the image may now differ from the live view, so its label must say broken."""
    s = await _session(sim)
    await _fill(sim, s)
    name = await sim.p.preserve("v")
    fault.armed = True
    with pytest.raises(NoSpace):
        await s.write(6 * CHUNK + 10, b"\x77" * 200)
    fault.armed = False
    await s.close(clean=True)
    image = sim.p.volume("v").images[0]
    assert (image.state, image.consistency) == ("broken", "broken"), image
    await sim.p.release(name)
    await _after(sim, fault, None)


CASES = {"disk-fills": (1, _disk_fills), "image-fills": (2, _image_fills),
         "second-leg": (1, _second_leg), "primary-parallel": (0, _primary_parallel),
         "zero": (1, _zeroing), "image-leg": (2, _image_leg), "held": (1, _held)}


@pytest.mark.parametrize("case", list(CASES))
async def test_legs_agree_after_a_write_failed_on_one_leg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)  # commits at flushes only
    leg, run = CASES[case]
    sim = SimPool(tmp_path)
    await sim.open()
    try:
        await sim.p.create_volume("v", SIZE, "mirror", CHUNK, legs=3)
        fault = Fault(leg, spread=case.endswith("-fills"))
        sim.storages["v"].fail_writes = fault
        await run(sim, fault)
    finally:
        await sim.close()
