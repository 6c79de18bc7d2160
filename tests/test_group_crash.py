"""A group preserve crashed at every await point is all or nothing after the restart.

The pool runs on power-loss storage (``faults.SimPool``).  One run without a crash counts the
group preserve's await points: every catalog call (crashed just before it, and just after it
committed) and every storage call of every member.  Then the scenario is rerun from scratch for
each of them, the power is cut there, the pool reopened, and: either every member has the new
set's image and the set is recorded, or no member has it and there is no set; no member has an
image outside a set; the data written with FUA before the cut is in every member image; and the
next group preserve works and takes the next set number.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from faults import FAST_DIR, SimPool, crash_points

from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage.simulated import PowerLost

CHUNK = 4096
SIZE = 8 * CHUNK
MEMBERS = {"a": "cow", "b": "log", "c": "mirror"}
FILL = {"a": 0x11, "b": 0x22, "c": 0x33}
LIMIT = 20  # crash points per kind of await point, spread evenly


class Crash:
    """Where to cut the power: the n-th catalog call (before or after it) or the n-th storage
    call of a member, counted from the start of the group preserve; None counts only."""

    def __init__(self, kind: str | None = None, n: int = 0) -> None:
        self.kind, self.n = kind, n
        self.db_calls = 0
        self.armed = False


def _wrap_db(db: Callable[[Any], Awaitable[Any]], crash: Crash) -> Callable[[Any], Any]:
    async def call(fn: Any) -> Any:
        if not crash.armed:
            return await db(fn)
        crash.db_calls += 1
        if crash.kind == "db-before" and crash.db_calls == crash.n:
            raise PowerLost("the power failed before a catalog call")
        result = await db(fn)
        if crash.kind == "db-after" and crash.db_calls == crash.n:
            raise PowerLost("the power failed after a catalog call")
        return result

    return call


async def _round(crash: Crash) -> dict[str, int]:
    """Run the scenario with ``crash``; returns the await points the preserve went through."""
    root = Path(tempfile.mkdtemp(prefix="owm-group-crash-", dir=FAST_DIR))
    sim = SimPool(root)
    where = f"crash {crash.kind} {crash.n}"
    try:
        pool = await sim.open()
        for name, method in MEMBERS.items():
            await pool.create_volume(name, SIZE, method, CHUNK, legs=4)
        await pool.groups.create("g", sorted(MEMBERS))
        first = await pool.groups.preserve("g")  # g@0, drained at once
        sessions: list[Session] = []
        for name in ("a", "b"):
            s = await pool.open_export(name, "t")
            assert isinstance(s, Session)
            await s.write(0, bytes([FILL[name]]) * (CHUNK + 100), fua=True)
            sessions.append(s)
        c = await pool.open_export("c", "t")
        assert isinstance(c, Session)
        await c.write(CHUNK, bytes([FILL["c"]]) * CHUNK, fua=True)
        await c.close()
        pool.groups._db = _wrap_db(pool.groups._db, crash)  # type: ignore[method-assign]
        for volume in pool.volumes.values():
            volume._db = _wrap_db(volume._db, crash)  # type: ignore[method-assign]
        start = {n: sim.storages[n].calls for n in MEMBERS}
        if crash.kind in MEMBERS:
            sim.storages[crash.kind].crash_at = start[crash.kind] + crash.n
        crash.armed = True
        # A writer beside the preserve, on a session opened before the cut.
        writer = asyncio.ensure_future(sessions[0].write(2 * CHUNK, b"w" * 700, fua=True))
        try:
            await pool.groups.preserve("g")
            cut_completed = True
        except PowerLost:
            cut_completed = False
        except Exception:
            if not any(s.crashed for s in sim.storages.values()):
                raise
            cut_completed = False
        crash.armed = False
        await asyncio.gather(writer, return_exceptions=True)
        counts = {"db": crash.db_calls, **{n: sim.storages[n].calls - start[n] for n in MEMBERS}}
        if crash.kind is None:
            assert cut_completed
        pool = await sim.crash()
        await _check(pool, where, first["number"])
        after = await pool.groups.preserve("g")
        sets = pool.groups.status("g")["sets"]
        assert after["number"] == max(s["number"] for s in sets), where
        assert len({s["number"] for s in sets}) == len(sets)
        await _check(pool, where + ", after one more preserve", first["number"])
        return counts
    finally:
        await sim.close()
        shutil.rmtree(root, ignore_errors=True)


async def _check(pool: Pool, where: str, first: int) -> None:
    group = pool.groups.status("g")
    numbers = [s["number"] for s in group["sets"]]
    assert first in numbers, where
    in_sets: dict[str, set[int]] = {m: set() for m in MEMBERS}
    for gset in group["sets"]:
        assert sorted(m["volume"] for m in gset["members"]) == sorted(MEMBERS), (where, gset)
        for m in gset["members"]:
            in_sets[m["volume"]].add(m["generation"])
    lives = set()
    for name in MEMBERS:
        volume = pool.volume(name)
        assert set(volume.images) == in_sets[name], (where, name, volume.images, group)
        lives.add(len(volume.images))
    assert len(lives) == 1, (where, lives)
    # Data acknowledged with FUA before the cut is in every member image after set g@0.
    for gset in group["sets"]:
        if gset["number"] == first:
            continue
        for m in gset["members"]:
            name = m["volume"]
            offset, length = (CHUNK, CHUNK) if name == "c" else (0, CHUNK + 100)
            got = await _read(pool, name, m["generation"], offset, length)
            assert got == bytes([FILL[name]]) * length, (where, m["name"])


async def _read(pool: Pool, name: str, gen: int, offset: int, length: int) -> bytes:
    reader = await pool.volume(name).open_reader(gen)
    try:
        return await reader.read(offset, length)
    finally:
        await reader.close()


def test_group_preserve_crashed_at_every_await_point() -> None:
    async def go() -> int:
        counts = await _round(Crash())
        tried = 0
        kinds: list[tuple[str, int]] = [("db-before", counts["db"]), ("db-after", counts["db"])]
        kinds += [(n, counts[n]) for n in MEMBERS]
        for kind, total in kinds:
            for n in crash_points(total, LIMIT) if total else []:
                await _round(Crash(kind, n))
                tried += 1
        return tried

    assert asyncio.run(go()) > 10
