"""Deterministic interleavings of a release with writes, for the log merge and the cow move-down.

The engine's step hook pauses the background work of a release at a named step (the chunks have
been listed, one batch is done, everything is merged), the test writes (FUA, or flushed) from
the live volume and from a still-draining older generation, then lets the release go on.  After
the release, after a power loss in the middle of it, and after the resumed release, every view
must equal the reference model: no acknowledged write may be lost, no drained image may change.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OWM, Daemon, cli_env, start_daemon
from faults import SimPool, Tracker

from owm.nbd.client import NbdClient

CHUNK = 4096
WAIT = 10.0  # bound on every wait for a paused step


class Pause:
    """A step hook that stops the release from the ``nth`` time it reaches step ``where`` on."""

    def __init__(self, where: str, nth: int = 1) -> None:
        self.where = where
        self.nth = nth
        self.seen = 0
        self.reached = asyncio.Event()
        self.go = asyncio.Event()
        self.steps: list[str] = []

    async def __call__(self, where: str, chunk: int) -> None:
        self.steps.append(where)
        if where == self.where:
            self.seen += 1
            if self.seen >= self.nth:
                self.reached.set()
                await asyncio.wait_for(self.go.wait(), WAIT)

    async def wait(self) -> None:
        await asyncio.wait_for(self.reached.wait(), WAIT)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimPool]:
    s = SimPool(tmp_path / "pool")
    await s.open()
    yield s
    await s.close()


async def check(sim: SimPool, t: Tracker, where: str) -> None:
    t.adopt(await t.check(sim.p, where))


def hook(sim: SimPool, pause: Pause) -> None:
    sim.p.volume("v").engine.step_hook = pause


# -- issue 9 item 1: the merge's clears must be durable before new writes go below ---------------

@pytest.mark.parametrize("fua", [True, False])
async def test_log_merge_keeps_a_write_to_a_merged_chunk_across_a_crash(
    sim: SimPool, fua: bool
) -> None:
    """Fill 0x01, preserve, overwrite 0x02 and flush (every chunk in the delta), release @0 and
    pause it after its first batch; write 0x03 over the merged chunk (FUA, or followed by a
    flush); power loss.  The chunk must read 0x03, before and after the resumed merge."""
    chunks = 8
    size = chunks * CHUNK
    t = Tracker(size)
    await sim.p.create_volume("v", size, "log", CHUNK)
    sim.p.volume("v").engine.merge_batch = 1  # type: ignore[attr-defined]
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\1" * size)
    await s.flush()
    t.wrote(0, 0, b"\1" * size, True)
    await sim.p.preserve("v")
    t.preserved()
    new = await sim.p.open_export("v", "t")
    await new.write(0, b"\2" * size)
    await new.flush()
    t.wrote(1, 0, b"\2" * size, True)
    await s.close()
    pause = Pause("fold-chunk")
    hook(sim, pause)
    t.doomed.add(0)
    release = asyncio.ensure_future(sim.p.release("v@0"))
    await pause.wait()
    await new.write(0, b"\3" * CHUNK, fua=fua)
    if not fua:
        await new.flush()
    t.wrote(1, 0, b"\3" * CHUNK, True)
    t.vanish()
    release.cancel()
    pool = await sim.crash()
    await check(sim, t, "after the power loss")
    await pool.release("v@0")
    t.model.release(0)
    await check(sim, t, "after the resumed merge")
    await sim.crash()
    await check(sim, t, "after a second power loss")


async def test_log_merge_then_crash_during_the_delete_of_a_checkpointed_delta(
    sim: SimPool,
) -> None:
    """A delta whose table was checkpointed (a clean restart) is merged; new writes go to the
    base; power is lost while the delta's objects are deleted: the table must not come back."""
    chunks = 8
    size = chunks * CHUNK
    t = Tracker(size)
    await sim.p.create_volume("v", size, "log", CHUNK)
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\1" * size)
    await s.close()
    await sim.p.preserve("v")
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\2" * size)
    await s.close()
    pool = await sim.restart()  # the delta's table is now a checkpoint, its journal empty
    t.wrote(0, 0, b"\1" * size, True)
    t.preserved()
    t.wrote(1, 0, b"\2" * size, True)
    pause = Pause("fold-merged")
    hook(sim, pause)
    t.doomed.add(0)
    release = asyncio.ensure_future(pool.release("v@0"))
    await pause.wait()
    s = await pool.open_export("v", "t")
    await s.write(0, b"\3" * size, fua=True)
    t.wrote(1, 0, b"\3" * size, True)
    storage = sim.storages["v"]
    storage.crash_at = storage.calls + 2  # the first delete runs, the second loses power
    pause.go.set()
    with pytest.raises(Exception, match="power failed"):
        await release
    t.vanish()
    await sim.crash()
    await check(sim, t, "after the power loss")
    await sim.p.release("v@0")
    t.model.release(0)
    await check(sim, t, "after the resumed merge")


# -- issue 18 item 1: writes while the merge runs must not land in the delta it deletes --------

async def _filled_log_volume(sim: SimPool, t: Tracker, size: int) -> None:
    """A log volume "v" of ``size`` bytes, all 0x01, durable (generation 0, no session open)."""
    await sim.p.create_volume("v", size, "log", CHUNK)
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\1" * size, fua=True)
    t.wrote(0, 0, b"\1" * size, True)
    await s.close()


async def _open(sim: SimPool, t: Tracker, generation: int) -> Any:
    """A session of the live generation, which must be ``generation``."""
    s = await sim.p.open_export("v", "t")
    assert s.generation == generation
    t.opened(generation)
    return s


async def _four_generations_log(sim: SimPool, t: Tracker, size: int) -> tuple[Any, Any]:
    """@0, @1 drained, @2 held by an open session of generation 2, live generation 3."""
    await _filled_log_volume(sim, t, size)
    sim.p.volume("v").engine.merge_batch = 1  # type: ignore[attr-defined]
    await sim.p.preserve("v")
    t.preserved()
    s = await sim.p.open_export("v", "t")
    for c in range(0, size // CHUNK, 2):  # delta-1: even chunks
        await s.write(c * CHUNK, b"\2" * CHUNK, fua=True)
        t.wrote(1, c * CHUNK, b"\2" * CHUNK, True)
    await s.close()
    await sim.p.preserve("v")
    t.preserved()
    old = await sim.p.open_export("v", "t")
    assert old.generation == 2
    t.opened(2)
    for c in range(0, size // CHUNK, 4):  # delta-2: every fourth chunk
        await old.write(c * CHUNK, b"\4" * CHUNK, fua=True)
        t.wrote(2, c * CHUNK, b"\4" * CHUNK, True)
    await sim.p.preserve("v")
    t.preserved()
    live = await sim.p.open_export("v", "t")
    t.opened(3)
    return old, live


@pytest.mark.parametrize("step,nth", [("fold-listed", 1), ("fold-chunk", 1), ("fold-chunk", 3),
                                      ("fold-merged", 1)])
async def test_log_merge_keeps_a_draining_generations_writes(
    sim: SimPool, step: str, nth: int
) -> None:
    """Release @1 while @2 drains: the merge folds delta-2 into delta-1.  Paused at ``step``,
    the draining session writes chunks no delta holds yet (FUA, and flushed), the live session
    writes too; then the merge goes on.  Nothing may be lost, now or after a power loss."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    old, live = await _four_generations_log(sim, t, size)
    pause = Pause(step, nth)
    hook(sim, pause)
    t.doomed.add(1)
    release = asyncio.ensure_future(sim.p.release("v@1"))
    await pause.wait()
    for c, fill in ((1, 5), (3, 6), (9, 7)):  # fresh chunks, before and after the merge cursor
        await old.write(c * CHUNK, bytes([fill]) * CHUNK, fua=True)
        t.wrote(2, c * CHUNK, bytes([fill]) * CHUNK, True)
    await old.write(13 * CHUNK + 512, b"\x08" * 1024)  # partial, then flushed
    await old.write(4 * CHUNK, b"\x09" * CHUNK)  # a chunk delta-2 holds
    await live.write(5 * CHUNK, b"\x0a" * CHUNK)
    await old.flush()
    t.wrote(2, 13 * CHUNK + 512, b"\x08" * 1024, True)
    t.wrote(2, 4 * CHUNK, b"\x09" * CHUNK, True)
    t.wrote(3, 5 * CHUNK, b"\x0a" * CHUNK, True)
    pause.go.set()
    await asyncio.wait_for(release, WAIT)
    t.model.release(1)
    del t.loose[1]
    await check(sim, t, "after the merge")
    await old.flush()
    old_sid = min(t.model.sessions)  # the first session the tracker saw open: generation 2
    t.done.add(old_sid)
    await old.close()
    t.closed(old_sid)
    await check(sim, t, "after @2 drained")
    t.vanish()
    await sim.crash()
    await check(sim, t, "after a power loss")
    await sim.restart()
    await check(sim, t, "after a clean restart")


async def test_log_read_across_the_end_of_a_merge(sim: SimPool) -> None:
    """A read of the live view that spans several layers is under way when the merge drops
    its emptied layer: it must still return the live view (it resolved layers by index)."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await _filled_log_volume(sim, t, size)
    for gen in (1, 2):
        await sim.p.preserve("v")
        t.preserved()
        s = await sim.p.open_export("v", "t")
        for c in range(gen - 1, chunks, 2):  # delta-1 even chunks, delta-2 odd ones
            await s.write(c * CHUNK, bytes([gen + 1]) * CHUNK, fua=True)
            t.wrote(gen, c * CHUNK, bytes([gen + 1]) * CHUNK, True)
        await s.close()
    live = await sim.p.open_export("v", "t")
    pause = Pause("fold-drop")
    hook(sim, pause)
    t.doomed.add(0)
    release = asyncio.ensure_future(sim.p.release("v@0"))
    await pause.wait()
    read = asyncio.ensure_future(live.read(0, size))
    for _ in range(3):  # the read resolves its first runs and waits on storage
        await asyncio.sleep(0)
    pause.go.set()
    await asyncio.wait_for(release, WAIT)
    assert await asyncio.wait_for(read, WAIT) == bytes(t.model.views[2])
    t.model.release(0)
    del t.loose[0]
    await live.close()
    await check(sim, t, "after the merge")



async def test_log_write_across_the_end_of_a_merge(sim: SimPool) -> None:
    """A write of the draining generation over two chunks is copying its first (partial) chunk
    from below when the merge drops its emptied layer.  It routed by layer index: its second
    piece went to the layer that moved into the dropped one's place, the live view's delta,
    and view 2 lost it without any crash (found while tracing release-draining-log)."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await _filled_log_volume(sim, t, size)
    for _ in range(2):
        await sim.p.preserve("v")
        t.preserved()
    old = await sim.p.open_export("v", "t")
    assert old.generation == 2
    t.opened(2)
    await sim.p.preserve("v")
    t.preserved()
    live = await sim.p.open_export("v", "t")
    t.opened(3)
    await live.write(5 * CHUNK, b"\3" * CHUNK, fua=True)  # the live delta holds chunk 5
    t.wrote(3, 5 * CHUNK, b"\3" * CHUNK, True)
    pause = Pause("fold-drop")
    hook(sim, pause)
    t.doomed.add(1)
    release = asyncio.ensure_future(sim.p.release("v@1"))
    await pause.wait()  # delta-2 (empty) folded into delta-1, about to be dropped
    storage = sim.storages["v"]
    real_read, copying, gate = storage.read, asyncio.Event(), asyncio.Event()

    async def read(name: str, offset: int, length: int) -> bytes:
        if name == "base.data" and offset == 4 * CHUNK and not gate.is_set():
            copying.set()  # the write's copy of chunk 4 from below
            await gate.wait()
        return await real_read(name, offset, length)

    storage.read = read  # type: ignore[method-assign]
    data = b"\x77" * CHUNK
    write = asyncio.ensure_future(old.write(4 * CHUNK + 1024, data, fua=True))
    await asyncio.wait_for(copying.wait(), WAIT)
    pause.go.set()
    for _ in range(20):  # the merge drops delta-2 now, or waits for the write
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(write, WAIT)
    t.wrote(2, 4 * CHUNK + 1024, data, True)
    await asyncio.wait_for(release, WAIT)
    t.model.release(1)
    del t.loose[1]
    await check(sim, t, "after the merge")
    t.vanish()
    await sim.crash()
    await check(sim, t, "after a power loss")


async def test_log_write_above_a_merge_across_its_end(sim: SimPool) -> None:
    """The same under a write of a view above the folding pair: release @0 folds delta-1 into
    the base while @2's session writes a chunk the live delta holds.  The write waited for its
    own delta when the merge dropped delta-1; it then looked for newer copies past its own
    index, which now named the end of the list, and the live view missed the write."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await _filled_log_volume(sim, t, size)
    await sim.p.preserve("v")
    t.preserved()
    s = await sim.p.open_export("v", "t")
    await s.write(2 * CHUNK, b"\2" * CHUNK, fua=True)  # delta-1 holds something to merge
    t.wrote(1, 2 * CHUNK, b"\2" * CHUNK, True)
    await s.close()
    await sim.p.preserve("v")
    t.preserved()
    old = await _open(sim, t, 2)
    await sim.p.preserve("v")
    t.preserved()
    live = await _open(sim, t, 3)
    await live.write(7 * CHUNK, b"\3" * CHUNK, fua=True)  # the live delta holds chunk 7
    t.wrote(3, 7 * CHUNK, b"\3" * CHUNK, True)
    pause = Pause("fold-drop")
    hook(sim, pause)
    t.doomed.add(0)
    release = asyncio.ensure_future(sim.p.release("v@0"))
    await pause.wait()  # delta-1 merged into the base, about to be dropped
    storage = sim.storages["v"]
    real_write, writing, gate = storage.write, asyncio.Event(), asyncio.Event()

    async def write_gated(name: str, offset: int, data: Any) -> None:
        if name == "delta-2.data" and not gate.is_set():
            writing.set()  # the write, into @2's own delta
            await gate.wait()
        await real_write(name, offset, data)

    storage.write = write_gated  # type: ignore[method-assign]
    data = b"\x77" * CHUNK
    write = asyncio.ensure_future(old.write(7 * CHUNK, data, fua=True))
    await asyncio.wait_for(writing.wait(), WAIT)
    pause.go.set()
    for _ in range(20):  # the merge drops delta-1
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(write, WAIT)
    t.wrote(2, 7 * CHUNK, data, True)
    await asyncio.wait_for(release, WAIT)
    t.model.release(0)
    del t.loose[0]
    await check(sim, t, "after the merge")
    t.vanish()
    await sim.crash()
    await check(sim, t, "after a power loss")

# -- cow: the move-down --------------------------------------------------------------------------

async def _four_generations_cow(sim: SimPool, t: Tracker, size: int) -> None:
    """@0, @1, @2 preserved, no session open.  Table 0 holds chunks 0-3, table 1 chunks 4-8,
    table 2 chunks 8-11: view 0 resolves 4-8 through table 1 and 9-11 through table 2, and
    chunk 8 differs between tables 1 and 2."""
    await sim.p.create_volume("v", size, "cow", CHUNK)
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\1" * size, fua=True)
    t.wrote(0, 0, b"\1" * size, True)
    await s.close()
    for gen, fill, first, count in ((1, 2, 0, 4), (2, 3, 4, 5), (3, 4, 8, 4)):
        await sim.p.preserve("v")
        t.preserved()
        s = await sim.p.open_export("v", "t")
        assert s.generation == gen
        await s.write(first * CHUNK, bytes([fill]) * count * CHUNK, fua=True)
        t.wrote(gen, first * CHUNK, bytes([fill]) * count * CHUNK, True)
        await s.close()


async def test_cow_two_releases_at_once_keep_the_oldest_image(sim: SimPool) -> None:
    """Release @2 (its chunks move down into table 1) and, while that move-down is paused after
    listing its chunks, release @1 (its chunks move into table 0).  @0 must keep its content:
    the chunks @2 moves into table 1 after @1's move-down listed its own must not be lost."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await _four_generations_cow(sim, t, size)
    pause = Pause("move-listed")
    hook(sim, pause)
    t.doomed.update({1, 2})
    first = asyncio.ensure_future(sim.p.release("v@2"))
    await pause.wait()
    pause.where = "none"
    second = asyncio.ensure_future(sim.p.release("v@1"))
    await asyncio.sleep(0.05)
    pause.go.set()
    await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    for gen in (1, 2):
        t.model.release(gen)
        del t.loose[gen]
    await check(sim, t, "after both releases")
    await sim.crash()
    await check(sim, t, "after a power loss")


async def test_cow_two_releases_resumed_after_a_crash(sim: SimPool) -> None:
    """Both releases are recorded, then power is lost before either moved anything: the two
    resumed move-downs run together after the restart and must still keep @0 whole."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await _four_generations_cow(sim, t, size)
    pause = Pause("move-listed")
    hook(sim, pause)
    t.doomed.update({1, 2})
    first = asyncio.ensure_future(sim.p.release("v@2"))
    await pause.wait()
    second = asyncio.ensure_future(sim.p.release("v@1"))  # pauses too, or waits for the first
    volume = sim.p.volume("v")
    for _ in range(1000):
        image = volume.images.get(1)
        if image is None or (image.state == "releasing" and 1 not in volume.engine.views):
            break
        await asyncio.sleep(0.01)
    first.cancel()
    second.cancel()
    await sim.crash()
    for gen in (2, 1):
        try:
            await asyncio.wait_for(sim.p.release(f"v@{gen}"), WAIT)
        except Exception as exc:  # already finished by the resumed task
            assert "no preserved image" in str(exc)
        t.model.release(gen)
        del t.loose[gen]
    await check(sim, t, "after the resumed releases")


@pytest.mark.parametrize("step,nth", [("move-listed", 1), ("move-chunk", 2)])
async def test_cow_move_down_keeps_a_draining_generations_writes(
    sim: SimPool, step: str, nth: int
) -> None:
    """Release @1 while @2 drains (its session open): table 1 moves down into table 0.  Paused
    at ``step``, the draining session and the live one write (FUA and flushed) chunks table 1
    holds and chunks nobody holds; then the move-down goes on.  Every view equals the model."""
    chunks = 16
    size = chunks * CHUNK
    t = Tracker(size)
    await sim.p.create_volume("v", size, "cow", CHUNK)
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\1" * size, fua=True)
    t.wrote(0, 0, b"\1" * size, True)
    await s.close()
    await sim.p.preserve("v")
    t.preserved()
    s = await sim.p.open_export("v", "t")
    await s.write(0, b"\2" * 6 * CHUNK, fua=True)  # table 0 gets chunks 0-5
    t.wrote(1, 0, b"\2" * 6 * CHUNK, True)
    await s.close()
    await sim.p.preserve("v")
    t.preserved()
    old = await sim.p.open_export("v", "t")
    t.opened(2)
    await old.write(2 * CHUNK, b"\3" * 8 * CHUNK, fua=True)  # table 1 gets chunks 2-9
    t.wrote(2, 2 * CHUNK, b"\3" * 8 * CHUNK, True)
    await sim.p.preserve("v")
    t.preserved()
    live = await sim.p.open_export("v", "t")
    t.opened(3)
    pause = Pause(step, nth)
    hook(sim, pause)
    t.doomed.add(1)
    release = asyncio.ensure_future(sim.p.release("v@1"))
    await pause.wait()
    await old.write(7 * CHUNK, b"\5" * CHUNK, fua=True)  # table 1 holds it, table 0 does not
    t.wrote(2, 7 * CHUNK, b"\5" * CHUNK, True)
    await old.write(12 * CHUNK, b"\6" * CHUNK)  # nobody holds it
    await live.write(8 * CHUNK + 1024, b"\7" * 512)  # a copy into table 2 first
    await live.write(14 * CHUNK, b"\x08" * CHUNK, fua=True)
    await old.flush()
    t.wrote(2, 12 * CHUNK, b"\6" * CHUNK, True)
    t.wrote(3, 8 * CHUNK + 1024, b"\7" * 512, True)
    t.wrote(3, 14 * CHUNK, b"\x08" * CHUNK, True)
    pause.go.set()
    await asyncio.wait_for(release, WAIT)
    t.model.release(1)
    del t.loose[1]
    await check(sim, t, "after the move-down")
    t.vanish()
    await sim.crash()
    await check(sim, t, "after a power loss")


# -- issue 9 item 1 through the real interface ---------------------------------------------------

def _progress(daemon: Daemon) -> tuple[int, int] | None:
    status, body = daemon.api("GET", "/v1/volumes/f")
    assert status == 200, body
    for image in body["images"]:
        if image["generation"] == 0:
            p = image.get("release_progress")
            return None if p is None else (p["done"], p["total"])
    return None


def test_fua_write_during_a_log_release_survives_kill_9(short_tmp: Path) -> None:
    """The issue's reproduction: log, 4K chunks, fill 0x01, preserve, overwrite 0x02 and flush,
    ``owm release f@0`` in the background; once the merge is past the first 1 MiB, FUA writes of
    0x03 over it, no flush; kill -9 the daemon, restart: the range reads 0x03."""
    size = 32 << 20
    daemon = start_daemon(short_tmp / "pool")
    release: subprocess.Popen[bytes] | None = None
    try:
        assert daemon.owm("volume", "create", "f", "--size", str(size), "--method", "log",
                          "--chunk-size", "4K").returncode == 0

        async def fill(byte: int) -> None:
            client = await NbdClient.connect(export="f", unix_path=str(daemon.nbd_socket))
            step = 4 << 20
            for off in range(0, size, step):
                await client.write(off, bytes([byte]) * step)
            await client.flush()
            await client.disconnect()

        asyncio.run(fill(1))
        assert daemon.owm("preserve", "f").stdout.strip() == "f@0"
        asyncio.run(fill(2))
        release = subprocess.Popen(
            [*OWM, "--pool", str(daemon.pool),
             "release", "f@0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=cli_env())
        deadline = time.monotonic() + 60
        while True:
            p = _progress(daemon)
            if p is not None and p[0] > 300:  # past the first 256 chunks = 1 MiB
                break
            assert time.monotonic() < deadline, "the merge never got past 1 MiB"
            time.sleep(0.01)

        async def fua() -> None:
            client = await NbdClient.connect(export="f", unix_path=str(daemon.nbd_socket))
            for off in range(0, 1 << 20, 64 << 10):
                await client.write(off, b"\3" * (64 << 10), fua=True)
            client.abort()

        asyncio.run(fua())
        still_running = _progress(daemon) is not None
        daemon.stop(signal.SIGKILL)
        release.wait(timeout=30)
        daemon = start_daemon(short_tmp / "pool")

        async def read() -> bytes:
            client = await NbdClient.connect(export="f", unix_path=str(daemon.nbd_socket))
            data = await client.read(0, 1 << 20)
            await client.disconnect()
            return data

        got = asyncio.run(read())
        lost = sum(1 for off in range(0, 1 << 20, 4096) if got[off : off + 4096] != b"\3" * 4096)
        assert lost == 0, f"{lost} of 256 FUA-written chunks were lost (merge running: " \
                          f"{still_running})"
        assert daemon.owm("release", "f@0", timeout=120).returncode in (0, 1)
        got = asyncio.run(read())
        assert got == b"\3" * (1 << 20)
    finally:
        if release is not None and release.poll() is None:
            release.kill()
            release.wait()
        daemon.stop()
