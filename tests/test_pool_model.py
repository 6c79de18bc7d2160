"""Random operation sequences through the real Pool, every engine, compared with the model.

A hypothesis state machine opens and closes sessions in any generation, writes (sub-chunk,
unaligned, straddling chunks, whole chunks), zeroes, trims, flushes, preserves, cuts over,
releases, restarts the pool cleanly and cuts its power.  After every step every view of the
volume must equal the model's; after a power loss, every byte written with FUA or covered by a
completed flush must be there, and drained images must not have changed.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from owm.pool.model import Model
from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage.simulated import SimulatedStorage

CHUNK = 4096
SIZE = 3 * CHUNK + 1000  # few chunks, so requests collide; the last is partial on purpose

offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.integers(0, SIZE // CHUNK).map(lambda c: min(c * CHUNK, SIZE - 1)),  # chunk-aligned
)
lengths = st.one_of(st.integers(1, 600), st.integers(1, 2 * CHUNK), st.just(CHUNK))


class PoolMachine(RuleBasedStateMachine):
    method = "cow"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="owm-model-"))
        self.storages: dict[str, SimulatedStorage] = {}
        self.pool = self.run(self._open())
        self.run(self.pool.create_volume("v", SIZE, self.method, CHUNK, legs=3))
        self.model = Model(SIZE)
        self.live: dict[int, Session] = {}
        self.model_id: dict[int, int] = {}  # pool session id -> model session id
        self.next_id = 0
        # Bytes of each view written since the last flush without FUA: lost or kept by a crash.
        self.uncertain: dict[int, bytearray] = {0: bytearray(SIZE)}

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Pool:
        return await Pool.open(self.dir, storage_factory=self._storage)

    def _storage(self, name: str) -> SimulatedStorage:
        return self.storages.setdefault(name, SimulatedStorage())

    def teardown(self) -> None:
        try:
            self.run(self.pool.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def volume(self):  # type: ignore[no-untyped-def]
        return self.pool.volume("v")

    # -- sessions ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < 4)
    @rule()
    def open_session(self) -> None:
        session = self.run(self.pool.open_export("v", "test"))
        assert isinstance(session, Session)
        self.next_id += 1
        self.model.open_session(self.next_id)
        assert session.generation == self.model.sessions[self.next_id]
        self.live[self.next_id] = session

    def _pick(self, data: st.DataObject) -> tuple[int, Session]:
        sid = data.draw(st.sampled_from(sorted(self.live)))
        return sid, self.live[sid]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), clean=st.booleans())
    def close_session(self, data: st.DataObject, clean: bool) -> None:
        sid, session = self._pick(data)
        del self.live[sid]
        self.run(session.close(clean=clean))
        self.model.close_session(sid)
        self._forget_drained()

    def _mark(self, gen: int, offset: int, length: int, fua: bool) -> None:
        for view, mask in self.uncertain.items():
            if view >= gen:
                mask[offset : offset + length] = (b"\0" if fua else b"\1") * length

    @precondition(lambda self: self.live)
    @rule(
        data=st.data(), offset=offsets, length=lengths, fua=st.booleans(), fill=st.integers(1, 255)
    )
    def write(self, data: st.DataObject, offset: int, length: int, fua: bool, fill: int) -> None:
        _, session = self._pick(data)
        length = min(length, SIZE - offset)
        payload = bytes([fill]) * length
        gen = session.generation
        self.run(session.write(offset, payload, fua=fua))
        self.model.write(gen, offset, payload)
        self._mark(gen, offset, length, fua)

    @precondition(lambda self: self.live)
    @rule(
        data=st.data(),
        offset=offsets,
        length=lengths,
        trim=st.booleans(),
        fua=st.booleans(),
        may_trim=st.booleans(),
    )
    def zero(
        self, data: st.DataObject, offset: int, length: int, trim: bool, fua: bool, may_trim: bool
    ) -> None:
        _, session = self._pick(data)
        length = min(length, SIZE - offset)
        gen = session.generation
        if trim:
            self.run(session.trim(offset, length, fua=fua))
        else:
            self.run(session.write_zeroes(offset, length, fua=fua, may_trim=may_trim))
        self.model.zero(gen, offset, length)
        self._mark(gen, offset, length, fua)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        _, session = self._pick(data)
        self.run(session.flush())
        for mask in self.uncertain.values():
            mask[:] = bytes(SIZE)

    # -- images -----------------------------------------------------------------------------
    @precondition(lambda self: self.method != "mirror" or len(self.model.views) < 3)
    @rule()
    def preserve(self) -> None:
        name = self.run(self.pool.preserve("v"))
        gen = self.model.preserve()
        assert name == f"v@{gen}"
        self.uncertain[self.model.live] = bytearray(self.uncertain[gen])
        self._forget_drained()

    @rule(data=st.data())
    def cutover(self, data: st.DataObject) -> None:
        images = [g for g in self.model.views if g != self.model.live]
        if not images:
            return
        gen = data.draw(st.sampled_from(images))
        self.run(self.pool.cutover(f"v@{gen}"))
        if not self.model.drained(gen):
            self.model.cutover(gen)
        for sid, session in self.live.items():
            assert session.generation == self.model.sessions[sid]
        self._forget_drained()

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        drained = [g for g in self.model.views if self.model.drained(g)]
        if not drained:
            return
        gen = data.draw(st.sampled_from(drained))
        self.run(self.pool.release(f"v@{gen}"))
        self.model.release(gen)
        del self.uncertain[gen]

    def _forget_drained(self) -> None:
        # A drained image was made durable when it drained.
        for gen in self.model.views:
            if self.model.drained(gen):
                self.uncertain[gen][:] = bytes(SIZE)

    # -- restarts ---------------------------------------------------------------------------
    def _sessions_vanish(self) -> None:
        for sid in self.live:
            self.model.close_session(sid)
        self.live.clear()

    @rule(how=st.sampled_from(["clean", "power-loss", "power-loss-writeback"]),
          seed=st.integers(0, 2**32 - 1))
    def restart(self, how: str, seed: int) -> None:
        if how == "clean":
            self._restart_clean()
        else:
            self._power_loss(seed, how == "power-loss-writeback")

    def _restart_clean(self) -> None:
        self.run(self.pool.close())
        self._sessions_vanish()
        self.pool = self.run(self._open())
        for mask in self.uncertain.values():
            mask[:] = bytes(SIZE)
        self._forget_drained()

    def _power_loss(self, seed: int, writeback: bool) -> None:
        self.run(self.pool.kill())
        rng = random.Random(seed) if writeback else None
        for name, storage in list(self.storages.items()):
            self.storages[name] = storage.power_loss(rng)
        self._sessions_vanish()
        self.pool = self.run(self._open())
        # Every certain byte must have survived; the uncertain ones become whatever survived.
        for gen in list(self.model.views):
            got = self.run(self._read_view(gen))
            want = self.model.views[gen]
            mask = self.uncertain[gen]
            for i in range(SIZE):
                if not mask[i]:
                    assert got[i] == want[i], (
                        f"view {gen} byte {i}: {got[i]} survived, {want[i]} was durable"
                    )
            self.model.views[gen][:] = got
            mask[:] = bytes(SIZE)
        self._forget_drained()

    # -- checks -----------------------------------------------------------------------------
    async def _read_view(self, gen: int) -> bytes:
        volume = self.volume
        if gen == volume.live:
            return await volume.engine.read(gen, 0, SIZE)
        reader = await volume.open_reader(gen)
        try:
            return await reader.read(0, SIZE)
        finally:
            await reader.close()

    @invariant()
    def views_match_model(self) -> None:
        volume = self.volume
        assert volume.live == self.model.live
        assert sorted(volume.engine.views) == sorted(self.model.views)
        for gen in self.model.views:
            assert self.run(self._read_view(gen)) == bytes(self.model.views[gen]), f"view {gen}"
            if gen != self.model.live:
                state = volume.images[gen].state
                assert (state != "draining") == self.model.drained(gen), (gen, state)

    @invariant()
    def changed_maps_cover_differences(self) -> None:
        gens = sorted(self.model.views)
        for i, since in enumerate(gens):
            for upto in gens[i + 1 :]:
                changed = self.volume.changed_chunks(since, upto)
                if changed is None:
                    continue
                a, b = self.model.views[since], self.model.views[upto]
                for chunk in range((SIZE + CHUNK - 1) // CHUNK):
                    piece = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
                    if a[piece] != b[piece]:
                        assert chunk in changed, (since, upto, chunk, changed)

    @invariant()
    def block_status_covers_views(self) -> None:
        for gen in self.model.views:
            extents = self.run(self.volume.engine.extents(gen, 0, SIZE))
            assert sum(e.length for e in extents) == SIZE
            pos = 0
            for e in extents:
                if e.zero:
                    assert not any(self.model.views[gen][pos : pos + e.length]), (gen, pos)
                pos += e.length


SETTINGS = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


class CowMachine(PoolMachine):
    method = "cow"


class LogMachine(PoolMachine):
    method = "log"


class MirrorMachine(PoolMachine):
    method = "mirror"


TestCow = CowMachine.TestCase
TestCow.settings = SETTINGS
TestLog = LogMachine.TestCase
TestLog.settings = SETTINGS
TestMirror = MirrorMachine.TestCase
TestMirror.settings = SETTINGS
