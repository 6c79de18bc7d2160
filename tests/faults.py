"""Crash-point fault injection that any test can reuse: a pool on power-loss storage, a tracker of
what must survive a crash, and a driver that crashes an operation at each of its storage calls.

``SimPool`` opens a real ``Pool`` whose volumes live on ``SimulatedStorage``.  ``crash()`` stops
it the way a power failure does (nothing synced, closed or marked clean; unsynced writes lost, or
with an ``rng`` an arbitrary subset of them kept) and reopens it on what survived.

``Tracker`` keeps the reference model (``owm.pool.model``) and, per view and 512-byte sector,
whether the sector is *certain* (its last write was acknowledged with FUA or covered by a flush
that completed) or *loose* (a crash may leave it at any value it held since it was last
certain).  ``Tracker.check`` compares a reopened pool with it: certain sectors equal the model,
loose ones hold one of their candidate values, and every label is true (a transaction-consistent
image is drained, all its sessions finished their work, and every byte of it is certain).

``crash_matrix`` runs a scenario once to count the storage calls of its operation, then reruns it
from scratch for each crash point N (every N, or an even sample past ``limit``): crash at N,
reopen, check, finish what the crash interrupted (releases resume), check, lose power once more
and check again.  A scenario is a ``setup`` (not crashed) and an ``operation`` (crashed), both
given a ``Run``; the operation runs the work under test beside concurrent writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.common.errors import NotFound
from owm.engine import chunktable
from owm.pool.model import Model
from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage.simulated import PowerLost, SimulatedStorage

SECTOR = 512
VOLUME = "v"
# The catalog is a real SQLite file: on tmpfs its commits cost no disk flush.
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
SETTLE = 10.0  # seconds the tasks of a crashed run get to notice the crash before cancellation


class SimPool:
    """A Pool on ``SimulatedStorage`` that can be crashed and reopened on what survived."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storages: dict[str, SimulatedStorage] = {}
        self.pool: Pool | None = None

    def _storage(self, name: str) -> SimulatedStorage:
        return self.storages.setdefault(name, SimulatedStorage())

    async def open(self) -> Pool:
        self.pool = await Pool.open(self.root, storage_factory=self._storage)
        return self.pool

    @property
    def p(self) -> Pool:
        assert self.pool is not None
        return self.pool

    async def crash(self, rng: random.Random | None = None) -> Pool:
        """Lose power now (the pool stops as a killed process does) and reopen."""
        await self.p.kill()
        for name, storage in list(self.storages.items()):
            self.storages[name] = storage.power_loss(rng)
        return await self.open()

    async def restart(self) -> Pool:
        """A clean stop and start."""
        await self.p.close()
        return await self.open()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


@dataclass
class _Sectors:
    """Loose sectors of one view: candidate byte values and the sequence of their last write."""

    candidates: dict[int, bytearray] = field(default_factory=dict)
    last: dict[int, int] = field(default_factory=dict)

    def copy(self) -> _Sectors:
        return _Sectors({s: bytearray(c) for s, c in self.candidates.items()}, dict(self.last))


class Tracker:
    """The model plus what a crash may and may not take back."""

    def __init__(self, size: int) -> None:
        assert size % SECTOR == 0
        self.size = size
        self.model = Model(size)
        self.loose: dict[int, _Sectors] = {0: _Sectors()}
        self.seq = 0
        self.cut: set[int] = set()  # images that a cutover made crash-consistent
        self.doomed: set[int] = set()  # images whose release was asked for
        self.done: set[int] = set()  # model sessions that finished their work (then close)
        self.opened_gen: dict[int, int] = {}  # model session -> generation it was bound to
        self.labels: dict[int, tuple[str, str]] = {}  # drained labels seen before a crash
        self._next_session = 0

    # -- what happened ------------------------------------------------------------------------
    def opened(self, generation: int) -> int:
        self._next_session += 1
        sid = self._next_session
        self.model.open_session(sid)
        assert self.model.sessions[sid] == generation, (self.model.sessions, generation)
        self.opened_gen[sid] = generation
        return sid

    def closed(self, sid: int) -> None:
        if sid in self.model.sessions:
            self.model.close_session(sid)

    def wrote(self, gen: int, offset: int, data: bytes, fua: bool) -> None:
        assert offset % SECTOR == 0 and len(data) % SECTOR == 0
        self.seq += 1
        first, last = offset // SECTOR, (offset + len(data)) // SECTOR
        for view, loose in self.loose.items():
            if view < gen:
                continue
            old = self.model.views[view]
            for s in range(first, last):
                if fua:
                    loose.candidates.pop(s, None)
                    loose.last.pop(s, None)
                    continue
                cands = loose.candidates.get(s)
                if cands is None:
                    cands = loose.candidates[s] = bytearray(
                        set(old[s * SECTOR : (s + 1) * SECTOR]))
                piece = data[(s - first) * SECTOR : (s - first + 1) * SECTOR]
                cands.extend(set(piece) - set(cands))
                loose.last[s] = self.seq
        self.model.write(gen, offset, data)

    def attempted(self, gen: int, offset: int, data: bytes) -> None:
        """A write that failed (or never returned) may still have landed, whole or in part."""
        first, last = offset // SECTOR, (offset + len(data)) // SECTOR
        for view, loose in self.loose.items():
            if view < gen:
                continue
            old = self.model.views[view]
            for s in range(first, last):
                cands = loose.candidates.get(s)
                if cands is None:
                    cands = loose.candidates[s] = bytearray(
                        set(old[s * SECTOR : (s + 1) * SECTOR]))
                piece = data[(s - first) * SECTOR : (s - first + 1) * SECTOR]
                cands.extend(set(piece) - set(cands))
                loose.last[s] = 1 << 62  # no flush that completed can have covered it

    def flushed(self, upto: int) -> None:
        """A flush that started when ``seq`` was ``upto`` completed."""
        for loose in self.loose.values():
            for s, seq in list(loose.last.items()):
                if seq <= upto:
                    del loose.last[s]
                    del loose.candidates[s]

    def preserved(self) -> int:
        gen = self.model.preserve()
        self.loose[self.model.live] = self.loose[gen].copy()
        return gen

    def cutover(self, gen: int) -> None:
        if not self.model.drained(gen):
            self.model.cutover(gen)
            for g in self.model.views:
                if g <= gen:
                    self.cut.add(g)

    def vanish(self) -> None:
        """Every session ends with the process."""
        for sid in list(self.model.sessions):
            self.model.close_session(sid)

    # -- checks -------------------------------------------------------------------------------
    async def read_view(self, pool: Pool, gen: int) -> bytes:
        volume = pool.volume(VOLUME)
        if gen == volume.live:
            return await volume.engine.read(gen, 0, self.size)
        reader = await volume.open_reader(gen)
        try:
            return await reader.read(0, self.size)
        finally:
            await reader.close()

    def _compare(self, gen: int, got: bytes, where: str) -> None:
        want = self.model.views[gen]
        if got == want:
            return
        loose = self.loose[gen]
        for s in range(self.size // SECTOR):
            piece = slice(s * SECTOR, (s + 1) * SECTOR)
            if got[piece] == want[piece]:
                continue
            cands = loose.candidates.get(s)
            assert cands is not None, (
                f"{where}: view {gen} sector {s} (byte {s * SECTOR}) holds "
                f"{sorted(set(got[piece]))}, but {sorted(set(want[piece]))} was durable")
            assert not got[piece].translate(None, bytes(cands)), (
                f"{where}: view {gen} sector {s} holds {sorted(set(got[piece]))}, none of which "
                f"was ever written there since it was durable ({sorted(cands)})")

    def _holders_done(self, gen: int) -> bool:
        return all(sid in self.done for sid, g in self.opened_gen.items() if g <= gen)

    async def check(self, pool: Pool, where: str) -> dict[int, bytes]:
        """Every view against the model, every label against the truth; returns what was read."""
        volume = pool.volume(VOLUME)
        assert volume.live == self.model.live, (where, volume.live, self.model.live)
        seen: dict[int, bytes] = {}
        for gen in sorted(self.model.views):
            if gen != self.model.live:
                image = volume.images.get(gen)
                if image is None or image.state == "releasing":
                    assert gen in self.doomed, f"{where}: image {gen} vanished unasked"
                    continue
                if not self.model.drained(gen):
                    assert image.state == "draining", (where, gen, image)
                    got = await self.read_view(pool, gen)
                    self._compare(gen, got, where)
                    seen[gen] = got
                    continue
                assert image.state in ("drained", "drained-unclean"), (where, gen, image)
                label = self.labels.get(gen)
                assert label is None or label == (image.state, image.consistency), (
                    f"{where}: image {gen} was {label} before the crash, {image} after")
                if image.consistency == "transaction-consistent":
                    assert image.state == "drained" and not image.unclean_sessions, (where, image)
                    assert gen not in self.cut, f"{where}: image {gen} was cut over: {image}"
                    assert self._holders_done(gen), (
                        f"{where}: image {gen} says transaction-consistent, but a session of it "
                        "had not finished")
                    assert not self.loose[gen].candidates, (
                        f"{where}: image {gen} says transaction-consistent while the tracker "
                        f"holds loose sectors {sorted(self.loose[gen].candidates)[:8]}")
                else:
                    assert image.consistency == "crash-consistent", (where, image)
            got = await self.read_view(pool, gen)
            self._compare(gen, got, where)
            seen[gen] = got
        expect = sorted(g for g in self.model.views if g != self.model.live)
        present = sorted(g for g, i in volume.images.items() if i.state != "releasing")
        assert set(present) <= set(expect), (where, present, expect)
        return seen

    def adopt(self, seen: dict[int, bytes]) -> None:
        """After a restart everything that survived is durable: it becomes the model."""
        for gen, got in seen.items():
            self.model.views[gen][:] = got
        for loose in self.loose.values():
            loose.candidates.clear()
            loose.last.clear()


class Run:
    """One run of a scenario: the pool, the tracker and tracked helpers for the workload."""

    def __init__(self, sim: SimPool, tracker: Tracker) -> None:
        self.sim = sim
        self.t = tracker
        self.ids: dict[int, int] = {}  # id(Session) -> model session id
        self.tasks: list[asyncio.Task[Any]] = []
        self.state: dict[str, Any] = {}  # whatever a scenario's setup hands to its operation

    @property
    def pool(self) -> Pool:
        return self.sim.p

    @property
    def storage(self) -> SimulatedStorage:
        return self.sim.storages[VOLUME]

    @property
    def crashed(self) -> bool:
        return self.storage.crashed

    async def session(self) -> Session:
        s = await self.pool.open_export(VOLUME, "faults")
        assert isinstance(s, Session)
        self.ids[id(s)] = self.t.opened(s.generation)
        return s

    async def write(self, s: Session, offset: int, fill: int, length: int,
                    fua: bool = False) -> None:
        gen = s.generation
        data = bytes([fill]) * length
        try:
            await s.write(offset, data, fua=fua)
        except BaseException:
            self.t.attempted(gen, offset, data)
            raise
        self.t.wrote(gen, offset, data, fua)

    async def zero(self, s: Session, offset: int, length: int, fua: bool = False,
                   punch: bool = True) -> None:
        gen = s.generation
        data = bytes(length)
        try:
            await s.write_zeroes(offset, length, fua=fua, may_trim=punch)
        except BaseException:
            self.t.attempted(gen, offset, data)
            raise
        self.t.wrote(gen, offset, data, fua)

    async def flush(self, s: Session) -> None:
        upto = self.t.seq
        await s.flush()
        self.t.flushed(upto)

    async def finish(self, s: Session) -> None:
        """The session's work is done (its last flush returned): now it closes cleanly."""
        sid = self.ids[id(s)]
        self.t.done.add(sid)
        await s.close()
        self.t.closed(sid)

    async def preserve(self) -> int:
        name = await self.pool.preserve(VOLUME)
        gen = self.t.preserved()
        assert name == f"{VOLUME}@{gen}"
        return gen

    async def release(self, gen: int) -> None:
        self.t.doomed.add(gen)
        await self.pool.release(f"{VOLUME}@{gen}")

    async def cutover(self, gen: int) -> None:
        await self.pool.cutover(f"{VOLUME}@{gen}")
        self.t.cutover(gen)
        for s in self.pool.volume(VOLUME).sessions.values():
            sid = self.ids.get(id(s))
            if sid is not None:
                assert s.generation == self.t.model.sessions[sid]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task


Step = Callable[[Run], Awaitable[None]]


@dataclass
class Scenario:
    name: str
    method: str
    size: int
    setup: Step
    operation: Step
    chunk_size: int = 4096
    legs: int = 3
    journal_limit: int | None = None  # checkpoint tables after this many journal records


async def _finish_releases(run: Run) -> None:
    for gen in sorted(run.t.doomed):
        if gen in run.t.model.views:
            with contextlib.suppress(NotFound):
                await run.pool.release(f"{VOLUME}@{gen}")
            run.t.model.release(gen)
            del run.t.loose[gen]


async def run_once(scenario: Scenario, crash_at: int | None, writeback: bool = False) -> int:
    """Run the scenario, crashing at storage call ``crash_at`` of the operation (None: at its
    end), and check everything after the restart; returns the operation's storage calls."""
    root = Path(tempfile.mkdtemp(prefix="owm-fault-", dir=FAST_DIR))
    sim = SimPool(root)
    tracker = Tracker(scenario.size)
    run = Run(sim, tracker)
    where = f"{scenario.name}, crash at call {crash_at}"
    saved_limit = chunktable._CHECKPOINT_AFTER
    if scenario.journal_limit is not None:
        chunktable._CHECKPOINT_AFTER = scenario.journal_limit
    try:
        pool = await sim.open()
        await pool.create_volume(VOLUME, scenario.size, scenario.method, scenario.chunk_size,
                                 legs=scenario.legs)
        await scenario.setup(run)
        storage = run.storage
        start = storage.calls
        storage.crash_at = None if crash_at is None else start + crash_at
        try:
            await asyncio.wait_for(scenario.operation(run), SETTLE)
        except PowerLost:
            pass
        except Exception:
            if not storage.crashed:
                raise
        if run.tasks:
            _done, pending = await asyncio.wait(run.tasks, timeout=SETTLE)
            for task in pending:
                task.cancel()
            assert not pending or storage.crashed, f"{where}: work hung without a crash"
            for task in run.tasks:
                if task.cancelled():
                    continue
                exc = task.exception()
                if exc is not None and not storage.crashed:
                    raise exc
        calls = storage.calls - start
        storage.crash_at = storage.calls + 1  # nothing more reaches this disk
        # A drain is recorded after the session's close is: a label seen now must come back.
        tracker.labels = {g: (i.state, i.consistency)
                          for g, i in sim.p.volume(VOLUME).images.items()
                          if i.state == "drained" and g not in tracker.doomed}
        tracker.vanish()
        rng = random.Random(crash_at) if writeback else None
        pool = await sim.crash(rng)
        tracker.adopt(await tracker.check(pool, where + ", after restart"))
        await _finish_releases(run)
        tracker.adopt(await tracker.check(pool, where + ", after the resumed work"))
        pool = await sim.crash()
        await tracker.check(pool, where + ", after a second power loss")
        return calls
    finally:
        chunktable._CHECKPOINT_AFTER = saved_limit
        await sim.close()
        shutil.rmtree(root, ignore_errors=True)


def crash_points(total: int, limit: int) -> list[int]:
    """1..total, or ``limit`` of them spread evenly (always the first and the last)."""
    if total <= limit:
        return list(range(1, total + 1))
    step = (total - 1) / (limit - 1)
    return sorted({1 + round(i * step) for i in range(limit)})


async def crash_matrix(scenario: Scenario, limit: int = 60) -> list[int]:
    """Crash the scenario's operation at each sampled storage call; returns the points tried."""
    total = await run_once(scenario, None)
    assert total > 0, f"{scenario.name}: the operation made no storage call"
    points = crash_points(total, limit)
    for i, n in enumerate(points):
        await run_once(scenario, n, writeback=bool(i % 2))
    return points
