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
import copy
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Daemon, cli_env, start_daemon

from owm.engine.mirror import MirrorEngine
from owm.nbd.client import NbdClient
from owm.pool.model import Model
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
    # Write-back: the group commit lets the held writes reach the legs (unsynced) once their
    # bits are durable; without it they would still be in memory at the power loss.
    await engine_of(pool).commit_writeback()
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


class Pause:
    """A step hook that records the steps of the release and holds the one numbered ``at``."""

    def __init__(self, at: int | None, prefix: str = "release") -> None:
        self.at = at
        self.prefix = prefix
        self.seen: list[tuple[str, int]] = []
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def __call__(self, what: str, chunk: int) -> None:
        if not what.startswith(self.prefix):
            return
        self.seen.append((what, chunk))
        if len(self.seen) - 1 == self.at:
            self.reached.set()
            await self.go.wait()


class Scene:
    """Three legs: v@0 drained on leg 2, v@1 draining on leg 1 (session ``old``), live on leg 0
    with session ``new``; the model beside it."""

    chunks = 16

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.size = self.chunks * CHUNK
        self.storages: dict[str, SimulatedStorage] = {}
        self.model = Model(self.size)
        self.value = 0x40

    async def open(self) -> Pool:
        return await Pool.open(self.dir, storage_factory=lambda n: self.storages.setdefault(
            n, SimulatedStorage()))

    async def build(self) -> tuple[Pool, Session, Session]:
        pool = await self.open()
        await pool.create_volume("v", self.size, "mirror", CHUNK, legs=3)
        s = await session(pool)
        await self.write(s, 0, self.chunks, fill=FILL)
        await s.flush()
        await s.close()
        await pool.preserve("v")
        self.model.preserve()
        old = await session(pool)
        await self.write(old, 4, 6)  # before v@1: on legs 0 and 1, dirty on leg 2
        await pool.preserve("v")
        self.model.preserve()
        new = await session(pool)
        await self.write(new, 0, 4)  # live only: dirty on legs 1 and 2
        await self.write(old, 6, 7)  # the draining generation: legs 0 and 1, dirty on leg 2
        await old.flush()
        return pool, old, new

    async def write(self, s: Session, first: int, end: int, fill: int | None = None,
                    fua: bool = False) -> None:
        for c in range(first, end):
            if fill is None:
                self.value += 1
            data = bytes([fill if fill is not None else self.value]) * CHUNK
            await s.write(c * CHUNK, data, fua=fua)
            self.model.write(s.generation, c * CHUNK, data)

    def legs(self, pool: Pool) -> list[bytes]:
        out = []
        for i in range(3):
            storage = self.storages["v"]
            out.append(bytes(storage._objects[f"leg-{i}.data"].current[: self.size]))
        return out


async def _release_steps(tmp_path: Path) -> list[tuple[str, int]]:
    scene = Scene(tmp_path)
    pool, _old, _new = await scene.build()
    pause = Pause(None)
    engine_of(pool).step_hook = pause
    await pool.release("v@0")
    await pool.close()
    return pause.seen


@pytest.mark.parametrize("crash", [False, True], ids=["running", "power-loss"])
async def test_release_resync_keeps_writes_made_at_every_step(tmp_path: Path, crash: bool) -> None:
    """Issue 18 item 1 for mirror: pause the release's resync of leg 2 before each of its steps;
    the draining generation (v@1's session) and the live one write to chunks already copied,
    still to copy and outside the dirty map, with FUA and flushed; optionally the power fails
    there.  The leg must rejoin holding all of it, and every view must equal the model."""
    steps = await _release_steps(tmp_path / "probe")
    dirty = sorted(c for what, c in steps if what == "release-copy")
    assert dirty == list(range(7)) and steps[0][0] == "release-start"
    assert steps[-1][0] == "release-rejoin"
    for at, (what, chunk) in enumerate(steps):
        scene = Scene(tmp_path / f"{at}")
        pool, old, new = await scene.build()
        pause = Pause(at)
        engine_of(pool).step_hook = pause
        release = asyncio.create_task(pool.release("v@0"))
        await asyncio.wait_for(pause.reached.wait(), 10)
        done = [c for c in dirty if what == "release-rejoin" or c < chunk]
        todo = [c for c in dirty if c not in done]
        for s in (old, new):
            for c in (done[-1:] + todo[-1:] + [9 if s is old else 12]):
                await scene.write(s, c, c + 1, fua=s is new)
        await old.flush()
        # Acknowledged but never flushed: after a power loss each leg may or may not hold it.
        unsure = done[-1:] + todo[:1] + [13]
        before = {c: bytes(scene.model.views[2][c * CHUNK : (c + 1) * CHUNK]) for c in unsure}
        for c in unsure:
            await scene.write(new, c, c + 1)
        if crash:
            after = {n: st.power_loss(random.Random(at)) for n, st in scene.storages.items()}
            await pool.kill()
            pause.go.set()
            await asyncio.gather(release, return_exceptions=True)
            scene.storages = after
            pool = await scene.open()
            await pool.release("v@0")  # resumed at the start: wait for it
            new = await session(pool)
            for c in unsure:
                got = await new.read(c * CHUNK, CHUNK)
                assert got in (before[c], bytes(scene.model.views[2][c * CHUNK : (c + 1) * CHUNK]))
                scene.model.views[2][c * CHUNK : (c + 1) * CHUNK] = got
        else:
            pause.go.set()
            await asyncio.wait_for(release, 10)
        scene.model.release(0)
        await engine_of(pool).commit_writeback()  # held writes reach the legs looked at
        legs = scene.legs(pool)
        model = scene.model
        label = f"paused at {what} {chunk}"
        assert legs[0] == legs[2] == bytes(model.views[2]), label  # leg 2 rejoined, complete
        assert await new.read(0, scene.size) == bytes(model.views[2]), label
        assert await read_image(pool, "v@1", scene.size) == bytes(model.views[1]), label
        assert legs[1] == bytes(model.views[1]), label
        if not crash:
            await old.close()
        await new.close()
        await pool.release("v@1")
        await engine_of(pool).commit_writeback()
        legs = scene.legs(pool)
        assert legs[0] == legs[1] == legs[2] == bytes(model.views[2]), label
        await pool.close()


WRITER = r"""
import asyncio, sys
from owm.nbd.client import NbdClient

CHUNK = 4096

async def main():
    client = await NbdClient.connect(export="v", unix_path=sys.argv[1])
    for i in range(100000):
        v = bytes([20 + i % 200]) * CHUNK
        print("round", i, flush=True)
        await asyncio.gather(client.write(i % 64 * CHUNK, v, fua=True),
                             client.write((64 + i % 32) * CHUNK, v),
                             client.write((96 + i % 16) * CHUNK, v))
        print("acked", i, flush=True)

asyncio.run(main())
"""


def _round_chunks(i: int) -> list[int]:
    return [i % 64, 64 + i % 32, 96 + i % 16]


def _volume_status(daemon: Daemon) -> dict[str, Any]:
    status, body = daemon.api("GET", "/v1/volumes/v")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def test_sigkill_with_writes_in_flight_resyncs_only_the_intent_map(short_tmp: Path) -> None:
    """A real daemon killed with SIGKILL while a client pipelines FUA and plain writes: the
    restarted daemon serves at once, resyncs only the chunks of the write-intent map (counted
    in its log), and afterwards every leg equals the data acknowledged; the split leg (v@0) is
    untouched and still drained, transaction-consistent."""
    size = 16 << 20
    pool = short_tmp / "pool"
    daemon = start_daemon(pool)
    writer: subprocess.Popen[str] | None = None
    try:
        created = daemon.owm("volume", "create", "v", "--size", "16M", "--method", "mirror",
                             "--chunk-size", "4K", "--legs", "3")
        assert created.returncode == 0, created.stderr
        client = await NbdClient.connect(export="v", unix_path=str(daemon.nbd_socket))
        for offset in range(0, size, 1 << 20):
            await client.write(offset, bytes([FILL]) * (1 << 20))
        await client.flush()
        await client.flush()  # the fill's intent bits are cleared lazily, one flush later
        await client.disconnect()
        preserved = daemon.owm("preserve", "v")
        assert preserved.stdout.strip() == "v@0", preserved.stderr
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(daemon.nbd_socket)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=cli_env(), cwd=REPO)
        assert writer.stdout is not None
        acked, sent = -1, -1
        deadline = time.monotonic() + 60
        while acked < 300:  # enough rounds that every chunk of the writer's was written
            assert time.monotonic() < deadline, "the writer made no progress"
            word, n = writer.stdout.readline().split()
            if word == "round":
                sent = int(n)
            else:
                acked = int(n)
        daemon.proc.send_signal(signal.SIGKILL)  # requests of round `sent` are in flight
        daemon.proc.wait(timeout=30)
        writer.kill()
        writer.wait(timeout=30)
        # Through the text wrapper: readline above may have buffered lines already (a later
        # "round"), which communicate() would skip, as it reads the pipe's descriptor itself.
        rest = writer.stdout.read()
        for line in rest.splitlines():
            word, n = line.split()
            if word == "acked":
                acked = int(n)
            else:
                sent = int(n)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.communicate(timeout=30)
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)

    want: dict[int, set[int]] = {}
    for i in range(acked + 1):
        for c in _round_chunks(i):
            want[c] = {20 + i % 200}
    for i in range(acked + 1, sent + 1):  # in flight when the daemon died: either
        for c in _round_chunks(i):
            want[c].add(20 + i % 200)

    daemon = start_daemon(pool)
    try:
        client = await NbdClient.connect(export="v", unix_path=str(daemon.nbd_socket))
        live = await client.read(0, size)  # served at once, whether or not the resync is done
        await client.disconnect()
        deadline = time.monotonic() + 60
        while _volume_status(daemon)["resync_progress"] is not None:
            assert time.monotonic() < deadline, "the resync did not end"
            time.sleep(0.05)
        text = daemon.log_text()
        started = re.search(r"resyncing the (\d+) chunks of the write-intent map", text)
        ended = re.search(r"resync after an unclean stop done, (\d+) chunks copied", text)
        assert started and ended, text
        assert 0 < int(started.group(1)) == int(ended.group(1)) <= 112  # not the 4096 allocated
        for c in range(size // CHUNK):
            piece = live[c * CHUNK : (c + 1) * CHUNK]
            allowed = {bytes([v]) * CHUNK for v in want.get(c, {FILL})}
            assert piece in allowed, (c, piece[:1], want.get(c))
        image = await NbdClient.connect(export="v@0", unix_path=str(daemon.nbd_socket))
        assert await image.read(0, size) == bytes([FILL]) * size
        await image.disconnect()
        status, row = daemon.api("GET", "/v1/images/v@0")
        assert status == 200 and (row["state"], row["consistency"]) == (
            "drained", "transaction-consistent"), row
        shown = json.loads(daemon.owm("status", "v", "--json").stdout)
        assert shown[0]["resync_progress"] is None
        # Leg files beside the image leg: the in-sync legs are equal now, the split one intact.
        daemon.stop()
        legs = [(pool / "volumes" / "v" / f"leg-{i}.data").read_bytes()[:size] for i in range(3)]
        assert legs[0] == legs[1] == live
        assert legs[2] == bytes([FILL]) * size
        daemon = start_daemon(pool)
        released = daemon.owm("release", "v@0")
        assert released.returncode == 0, released.stderr
    finally:
        assert daemon.stop() == 0
    legs = [(pool / "volumes" / "v" / f"leg-{i}.data").read_bytes()[:size] for i in range(3)]
    assert legs[0] == legs[1] == legs[2] == live


async def _crashed_mirror(root: Path) -> dict[str, SimulatedStorage]:
    """A 3-leg mirror whose power failed with chunks 2..9 written and never flushed, pages
    written back at random so that the legs differ there; the pool directory is ``root``."""
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(root, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    await pool.create_volume("v", 32 * CHUNK, "mirror", CHUNK, legs=3)
    s = await session(pool)
    await s.write(0, bytes([FILL]) * 32 * CHUNK)
    await s.flush()
    await s.flush()
    for c in range(2, 10):
        await s.write(c * CHUNK, bytes([c]) * CHUNK)
    await engine_of(pool).commit_writeback()  # the held writes reach the legs, unsynced
    after = {n: st.power_loss(random.Random(3)) for n, st in storages.items()}
    await pool.kill()
    legs = [bytes(after["v"]._objects[f"leg-{i}.data"].current) for i in range(3)]
    assert legs[0] != legs[1] or legs[0] != legs[2], "the test needs legs that differ"
    return after


def _legs(storages: dict[str, SimulatedStorage], size: int, n: int = 3) -> list[bytes]:
    out = []
    for i in range(n):
        data = bytes(storages["v"]._objects[f"leg-{i}.data"].current[:size])
        out.append(data + bytes(size - len(data)))
    return out


@pytest.mark.parametrize("action", ["write", "preserve", "power-loss", "close"])
async def test_background_resync_interleavings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """Hold the background resync before each of its chunks and write there (FUA, flushed),
    preserve (the split leg must equal the live view), lose power again or stop cleanly; the
    in-sync legs end equal to the live view and nothing acknowledged is lost."""
    size = 32 * CHUNK
    crashed = await _crashed_mirror(tmp_path / "crashed")
    probe = Pause(None, "resync")
    monkeypatch.setattr(MirrorEngine, "step_hook", probe)
    storages = copy.deepcopy(crashed)
    shutil.copytree(tmp_path / "crashed", tmp_path / "probe")
    pool = await Pool.open(tmp_path / "probe", storage_factory=lambda n: storages[n])
    await engine_of(pool).wait_resynced()
    await pool.close()
    steps = [c for _, c in probe.seen]
    assert steps and set(steps) <= set(range(2, 10)), steps

    for at, chunk in enumerate(steps):
        label = f"{action} before resyncing chunk {chunk}"
        root = tmp_path / f"{action}-{at}"
        shutil.copytree(tmp_path / "crashed", root)
        storages = copy.deepcopy(crashed)
        pause = Pause(at, "resync")
        monkeypatch.setattr(MirrorEngine, "step_hook", pause)
        pool = await Pool.open(root, storage_factory=lambda n, s=storages: s[n])  # type: ignore[misc]
        await asyncio.wait_for(pause.reached.wait(), 10)
        live = await session(pool)
        want = bytearray(await live.read(0, size))  # the primary's answer is the truth now
        done = steps[:at][-1:]
        later = steps[at + 1 :][:1]
        for n, c in enumerate([chunk, *done, *later, 20]):
            data = bytes([0x80 + n]) * CHUNK
            await live.write(c * CHUNK, data, fua=n % 2 == 0)
            want[c * CHUNK : (c + 1) * CHUNK] = data
        await live.flush()
        image = None
        if action == "preserve":
            await live.close()
            assert await pool.preserve("v") == "v@0"
            image = bytes(want)
            live = await session(pool)
            for c in steps:  # the new generation overwrites every chunk the resync has left
                await live.write(c * CHUNK, bytes([0xEE]) * CHUNK)
                want[c * CHUNK : (c + 1) * CHUNK] = bytes([0xEE]) * CHUNK
            await live.flush()
        if action == "power-loss":
            storages = {n: st.power_loss(random.Random(at)) for n, st in storages.items()}
            await pool.kill()
            pause.go.set()
        elif action == "close":  # stopped cleanly while held: the resync is cancelled there
            await live.close()
            await pool.close()
        if action in ("power-loss", "close"):
            monkeypatch.setattr(MirrorEngine, "step_hook", None)
            pool = await Pool.open(root, storage_factory=lambda n, s=storages: s[n])  # type: ignore[misc]
            live = await session(pool)
        pause.go.set()
        engine = engine_of(pool)
        await asyncio.wait_for(engine.wait_resynced(), 10)
        if action == "close":  # it resumed at the restart, with what it had left
            assert len(steps) - at <= engine.resynced_chunks <= len(steps), label
        assert await live.read(0, size) == bytes(want), label
        legs = _legs(storages, size)
        if image is None:
            assert legs[0] == legs[1] == legs[2] == bytes(want), label
        else:
            assert legs[0] == legs[1] == bytes(want), label
            assert legs[2] == image == await read_image(pool, "v@0", size), label
            await live.close()
            await pool.release("v@0")
            assert _legs(storages, size)[2] == bytes(want), label
        await pool.close()


async def test_a_mirror_from_before_the_intent_map_resyncs_all_its_data_in_the_background(
    tmp_path: Path,
) -> None:
    """A volume an older owm left after a crash has no write-intent map: every allocated chunk
    may differ, so all of them are resynced (in the background now), and the map starts."""
    import sqlite3

    size = 8 * CHUNK
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(tmp_path, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    await pool.create_volume("v", size, "mirror", CHUNK, legs=2)
    s = await session(pool)
    await s.write(0, bytes([FILL]) * (size - CHUNK))  # the last chunk stays a hole
    await s.flush()
    await s.flush()
    await s.write(3 * CHUNK, b"\x33" * CHUNK)
    after = {n: st.power_loss(random.Random(1)) for n, st in storages.items()}
    await pool.kill()
    for suffix in (".ckpt0", ".ckpt1", ".journal"):
        await after["v"].delete("intent" + suffix)
    with sqlite3.connect(tmp_path / "catalog.sqlite") as db:
        (raw,) = db.execute("SELECT engine_state FROM volumes WHERE name='v'").fetchone()
        state = json.loads(raw)
        assert state.pop("write_intent") is True
        db.execute("UPDATE volumes SET engine_state=? WHERE name='v'", (json.dumps(state),))
    db.close()
    pool = await Pool.open(tmp_path, storage_factory=lambda n: after[n])
    try:
        engine = engine_of(pool)
        await asyncio.wait_for(engine.wait_resynced(), 10)
        assert engine.resynced_chunks == 7  # every allocated chunk
        assert engine.state["write_intent"] is True
        legs = _legs(after, size, 2)
        live = await session(pool)
        assert legs[0] == legs[1] == await live.read(0, size)
        await live.close()
    finally:
        await pool.close()


async def test_intent_bits_clear_lazily_never_under_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's bit is set before its write reaches the legs, survives the next flush, is
    cleared at the one after (both legs synced it), stays while a write is under way, and stays
    when too many chunks were written to remember them."""
    storage = CountingStorage()
    pool = await Pool.open(tmp_path, storage_factory=lambda n: storage)
    try:
        await pool.create_volume("v", 64 * CHUNK, "mirror", CHUNK, legs=2)
        engine = engine_of(pool)
        s = await session(pool)
        await s.write(0, b"a" * 2 * CHUNK)
        assert list(engine.intent) == [0, 1]
        await s.flush()
        assert list(engine.intent) == [0, 1]
        storage.hold = "leg-1.data"  # the next write stops between its two legs
        pending = asyncio.create_task(s.write(CHUNK, b"b" * CHUNK))
        for _ in range(5):
            await asyncio.sleep(0)
        assert list(engine.intent) == [0, 1]
        await s.flush()
        assert list(engine.intent) == [1], "chunk 1 has a write under way"
        storage.gate.set()
        await pending
        await s.flush()
        await s.flush()
        assert list(engine.intent) == []
        monkeypatch.setattr("owm.engine.mirror.TRACK_LIMIT", 4)
        await s.write(0, b"c" * 8 * CHUNK)
        for _ in range(3):
            await s.flush()
        # A held write reaches the legs (and is remembered) chunk by chunk: the chunks past the
        # limit are not remembered, and their bits are never cleared.
        assert set(range(4, 8)) <= set(engine.intent), "too many to remember: not cleared"
        await s.close()
    finally:
        await pool.close()


def test_status_shows_the_resync_progress() -> None:
    """``owm status`` and ``owm volume list`` show a running resync as release progress is."""
    from rich.console import Console

    from owm.cli.output import status_view, volumes_table

    volume = {"name": "v", "size": 1 << 20, "method": "mirror", "chunk_size": 4096, "legs": 2,
              "live_generation": 0, "generations": [], "images": [],
              "resync_progress": {"done": 3, "total": 12}}
    console = Console(width=160, record=True)
    console.print(status_view([volume]))
    console.print(volumes_table([volume]))
    text = console.export_text()
    assert "resyncing its in-sync legs after an unclean stop: 25%" in text
    assert "2 (resyncing 25%)" in text
    console = Console(width=160, record=True)
    console.print(status_view([{**volume, "resync_progress": None}]))
    assert "resyncing" not in console.export_text()


async def test_a_released_leg_never_outlives_what_the_primary_lost(tmp_path: Path) -> None:
    """A release copies live data that was never flushed onto the returning leg and syncs it
    there; the primary must have it durable too, or a power loss leaves two in-sync legs that
    differ with no write-intent bit to resync them (the next preserve then splits off a leg
    that does not equal the live view). Found by the model test."""
    storages: dict[str, SimulatedStorage] = {}

    def factory(name: str) -> SimulatedStorage:
        return storages.setdefault(name, SimulatedStorage())

    pool = await Pool.open(tmp_path, storage_factory=factory)
    await pool.create_volume("v", 65536, "mirror", 4096, legs=3)
    await pool.preserve("v")
    await pool.preserve("v")  # two legs hold images: the primary is the only live leg
    s = await session(pool)
    await s.write(0, b"\x01" * 4096)  # acknowledged, never flushed; reaches the primary only
    await pool.release("v@0")
    await pool.kill()
    for name, storage in list(storages.items()):
        storages[name] = storage.power_loss()
    pool = await Pool.open(tmp_path, storage_factory=factory)
    live = await pool.volume("v").engine.read(pool.volume("v").live, 0, 65536)
    image = await pool.preserve("v")
    assert await read_image(pool, image, 65536) == live
    await pool.close()
