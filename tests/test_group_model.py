"""Consistency groups through the real Pool, compared with the reference model (GroupModel).

A hypothesis state machine drives two member volumes of different engines (and a volume outside
the group): sessions on either member, writes, group preserves, single-volume preserves,
cutover and release of sets, clean restarts and power losses.  After every step every view of
every volume must equal the model's, and every set's drained state must be the model's.  A
second test checks the cut is one instant: while a group preserve is between two members'
splits, a session that opens on the first member and then one on the second both get the new
generation.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from owm.common.errors import OwmError
from owm.pool.model import GroupModel, Model
from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage.simulated import SimulatedStorage

CHUNK = 4096
SIZE = 2 * CHUNK + 500
VOLUMES = {"a": "cow", "b": "log", "c": "cow"}  # a and b are the group's members
MEMBERS = ["a", "b"]


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="owm-group-model-"))
        self.storages: dict[str, SimulatedStorage] = {}
        self.pool = self.run(self._open())
        self.model = GroupModel()
        for name, method in VOLUMES.items():
            self.run(self.pool.create_volume(name, SIZE, method, CHUNK))
            self.model.volumes[name] = Model(SIZE)
        self.run(self.pool.groups.create("g", MEMBERS))
        self.model.create_group("g", MEMBERS)
        self.live: dict[int, tuple[str, Session]] = {}
        self.next_id = 0
        # Bytes written since the last flush without FUA, per volume and view.
        self.uncertain: dict[str, dict[int, bytearray]] = {
            n: {0: bytearray(SIZE)} for n in VOLUMES}

    def run(self, coro: Any) -> Any:
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

    # -- sessions -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < 5)
    @rule(volume=st.sampled_from(sorted(VOLUMES)))
    def open_session(self, volume: str) -> None:
        session = self.run(self.pool.open_export(volume, "test"))
        assert isinstance(session, Session)
        self.next_id += 1
        gen = self.model.volumes[volume].open_session(self.next_id)
        assert session.generation == gen
        self.live[self.next_id] = (volume, session)

    def _pick(self, data: st.DataObject) -> tuple[int, str, Session]:
        sid = data.draw(st.sampled_from(sorted(self.live)))
        return sid, *self.live[sid]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), clean=st.booleans())
    def close_session(self, data: st.DataObject, clean: bool) -> None:
        sid, volume, session = self._pick(data)
        del self.live[sid]
        self.run(session.close(clean=clean))
        self.model.volumes[volume].close_session(sid)
        self._forget_drained()

    @precondition(lambda self: self.live)
    @rule(data=st.data(), offset=st.integers(0, SIZE - 1), length=st.integers(1, 2 * CHUNK),
          fua=st.booleans(), fill=st.integers(1, 255))
    def write(self, data: st.DataObject, offset: int, length: int, fua: bool, fill: int) -> None:
        _, volume, session = self._pick(data)
        length = min(length, SIZE - offset)
        gen = session.generation
        self.run(session.write(offset, bytes([fill]) * length, fua=fua))
        self.model.volumes[volume].write(gen, offset, bytes([fill]) * length)
        for view, mask in self.uncertain[volume].items():
            if view >= gen:
                mask[offset : offset + length] = (b"\0" if fua else b"\1") * length

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        _, volume, session = self._pick(data)
        self.run(session.flush())
        for mask in self.uncertain[volume].values():
            mask[:] = bytes(SIZE)

    # -- preserves, sets ----------------------------------------------------------------------
    def _new_view(self, volume: str, preserved: int) -> None:
        live = self.model.volumes[volume].live
        self.uncertain[volume][live] = bytearray(self.uncertain[volume][preserved])

    @precondition(lambda self: len(self.model.sets["g"]) < 3)
    @rule(instant=st.booleans())
    def preserve_group(self, instant: bool) -> None:
        result = self.run(self.pool.groups.preserve("g", instant=instant))
        number, images = self.model.preserve_group("g")
        assert result["name"] == f"g@{number}"
        assert {m["volume"]: m["generation"] for m in result["members"]} == images
        for volume, gen in images.items():
            self._new_view(volume, gen)
        if instant:
            self.model.cutover_set("g", number)
        self._forget_drained()

    @precondition(lambda self: len(self.model.volumes["a"].views) < 5)
    @rule(volume=st.sampled_from(["a", "c"]))
    def preserve_one(self, volume: str) -> None:
        name = self.run(self.pool.preserve(volume))
        gen = self.model.volumes[volume].preserve()
        assert name == f"{volume}@{gen}"
        self._new_view(volume, gen)
        self._forget_drained()

    @precondition(lambda self: self.model.sets["g"])
    @rule(data=st.data())
    def cutover_set(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.model.sets["g"])))
        self.run(self.pool.groups.cutover(f"g@{number}"))
        for volume, gen in self.model.sets["g"][number].items():
            if not self.model.volumes[volume].drained(gen):
                self.model.volumes[volume].cutover(gen)
        for sid, (volume, session) in self.live.items():
            assert session.generation == self.model.volumes[volume].sessions[sid]
        self._forget_drained()

    @precondition(lambda self: self.model.sets["g"])
    @rule(data=st.data())
    def release_set(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(sorted(self.model.sets["g"])))
        images = dict(self.model.sets["g"][number])
        if not self.model.set_drained("g", number):
            with pytest.raises(OwmError):
                self.run(self.pool.groups.release(f"g@{number}"))
            return
        member, gen = sorted(images.items())[0]
        with pytest.raises(OwmError, match="belongs to set"):
            self.run(self.pool.release(f"{member}@{gen}"))
        self.run(self.pool.groups.release(f"g@{number}"))
        self.model.release_set("g", number)
        for volume, gen in images.items():
            del self.uncertain[volume][gen]

    @precondition(lambda self: any(
        g != m.live and m.drained(g) and not any(g in s.values() for s in
                                                  self.model.sets["g"].values())
        for m in [self.model.volumes["a"]] for g in m.views))
    @rule(data=st.data())
    def release_single(self, data: st.DataObject) -> None:
        model = self.model.volumes["a"]
        in_sets = {s["a"] for s in self.model.sets["g"].values()}
        gens = [g for g in model.views if g != model.live and model.drained(g)
                and g not in in_sets]
        gen = data.draw(st.sampled_from(sorted(gens)))
        self.run(self.pool.release(f"a@{gen}"))
        model.release(gen)
        del self.uncertain["a"][gen]

    def _forget_drained(self) -> None:
        for volume, model in self.model.volumes.items():
            for gen in model.views:
                if model.drained(gen):
                    self.uncertain[volume][gen][:] = bytes(SIZE)

    # -- restarts -----------------------------------------------------------------------------
    @rule(how=st.sampled_from(["clean", "power-loss"]), seed=st.integers(0, 2**32 - 1))
    def restart(self, how: str, seed: int) -> None:
        if how == "clean":
            self.run(self.pool.close())
        else:
            self.run(self.pool.kill())
            rng = random.Random(seed)
            for name, storage in list(self.storages.items()):
                self.storages[name] = storage.power_loss(rng)
        for sid, (volume, _) in self.live.items():
            self.model.volumes[volume].close_session(sid)
        self.live.clear()
        self.pool = self.run(self._open())
        for volume, model in self.model.volumes.items():
            for gen in list(model.views):
                got = self.run(self._read_view(volume, gen))
                mask = self.uncertain[volume][gen]
                want = model.views[gen]
                for i in range(SIZE):
                    if not mask[i]:
                        assert got[i] == want[i], (volume, gen, i)
                model.views[gen][:] = got
                mask[:] = bytes(SIZE)
        self._forget_drained()

    # -- checks -------------------------------------------------------------------------------
    async def _read_view(self, name: str, gen: int) -> bytes:
        volume = self.pool.volume(name)
        if gen == volume.live:
            return await volume.engine.read(gen, 0, SIZE)
        reader = await volume.open_reader(gen)
        try:
            return await reader.read(0, SIZE)
        finally:
            await reader.close()

    @invariant()
    def views_match_model(self) -> None:
        for name, model in self.model.volumes.items():
            volume = self.pool.volume(name)
            assert volume.live == model.live, name
            assert sorted(volume.engine.views) == sorted(model.views), name
            for gen in model.views:
                got = self.run(self._read_view(name, gen))
                assert got == bytes(model.views[gen]), (name, gen)

    @invariant()
    def sets_match_model(self) -> None:
        listed = {s["number"]: s for s in self.pool.groups.status("g")["sets"]}
        assert sorted(listed) == sorted(self.model.sets["g"])
        for number, images in self.model.sets["g"].items():
            status = listed[number]
            assert {m["volume"]: m["generation"] for m in status["members"]} == images
            drained = status["state"] != "draining"
            assert drained == self.model.set_drained("g", number), status


TestGroupModel = GroupMachine.TestCase
TestGroupModel.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                   suppress_health_check=list(HealthCheck))


def test_the_cut_is_one_instant_across_members(tmp_path: Path) -> None:
    """While a group preserve of a, b, c is splitting b (a is split, c not yet), a session
    opened on a and then sessions on c and b must all be of the new generation: never new on
    one member and old on another member opened after it."""

    async def go() -> None:
        pool = await Pool.open(tmp_path, storage_factory=lambda n: SimulatedStorage())
        try:
            for name in ("a", "b", "c"):
                await pool.create_volume(name, SIZE, "cow", CHUNK)
            await pool.groups.create("g", ["a", "b", "c"])
            held = [await pool.open_export(n, "old") for n in ("a", "b", "c")]
            engine_b = pool.volume("b").engine
            split_b = engine_b.preserve
            in_split = asyncio.Event()

            async def slow_split() -> int:
                in_split.set()
                await asyncio.sleep(0.05)
                return await split_b()

            engine_b.preserve = slow_split  # type: ignore[method-assign]
            task = asyncio.ensure_future(pool.groups.preserve("g"))
            await in_split.wait()  # a is split, b is being split, c is not yet
            opened = {n: await pool.open_export(n, "new") for n in ("a", "c", "b")}
            result = await task
            images = {m["volume"]: m["generation"] for m in result["members"]}
            for name, session in opened.items():
                assert isinstance(session, Session)
                assert session.generation == images[name] + 1, name
            for s in held:
                assert isinstance(s, Session) and s.generation == 0
            for s in [*held, *opened.values()]:
                await s.close()
            assert await pool.groups.wait_drained(result["name"], 5)
        finally:
            await pool.close()

    asyncio.run(go())


def test_a_member_that_cannot_be_preserved_stops_the_group_before_any_cut(
        tmp_path: Path) -> None:
    async def go() -> None:
        pool = await Pool.open(tmp_path, storage_factory=lambda n: SimulatedStorage())
        try:
            await pool.create_volume("a", SIZE, "cow", CHUNK)
            await pool.create_volume("m", SIZE, "mirror", CHUNK, legs=2)
            await pool.preserve("m")  # the only spare leg now holds m@0
            await pool.groups.create("g", ["a", "m"])
            with pytest.raises(OwmError, match="spare leg"):
                await pool.groups.preserve("g")
            assert pool.volume("a").live == 0 and not pool.volume("a").images
            assert pool.volume("m").live == 1
            assert pool.groups.status("g")["sets"] == []
        finally:
            await pool.close()

    asyncio.run(go())
