"""Deterministic scenarios for what DESIGN.md singles out, on every engine.

The property test (test_pool_model.py) explores random sequences; these pin down the cases that
matter most so that a regression names itself: partial writes to chunks an image owns, a full
disk under both policies (injected and real), release while I/O goes on, the drain states, bad
input that must change nothing, preserve on a 1 TiB volume, and concurrent overlapping requests
from several generations ending in some serial order.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from owm.common.errors import InvalidRequest, NoSpace, NotFound, OutOfRange, ReadOnly, WrongState
from owm.pool.model import Model
from owm.pool.pool import Pool
from owm.pool.volume import ImageReader, Session
from owm.storage.local import LocalStorage
from owm.storage.simulated import SimulatedStorage

METHODS = ["cow", "log", "mirror"]
CHUNK = 4096


@pytest.fixture
async def sim_pool(tmp_path: Path) -> AsyncIterator[tuple[Pool, dict[str, SimulatedStorage]]]:
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(tmp_path, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    yield pool, storages
    await pool.close()


async def session(pool: Pool, name: str = "v") -> Session:
    s = await pool.open_export(name, "test")
    assert isinstance(s, Session)
    return s


async def reader(pool: Pool, image: str) -> ImageReader:
    r = await pool.open_export(image, "test")
    assert isinstance(r, ImageReader)
    return r


@pytest.mark.parametrize("method", METHODS)
async def test_partial_write_by_old_session_keeps_both_copies(
    sim_pool: tuple[Pool, dict[str, SimulatedStorage]], method: str
) -> None:
    """The flowchart's "delete the entry" is wrong for partial writes: both copies change."""
    pool, _ = sim_pool
    await pool.create_volume("v", 4 * CHUNK, method, CHUNK)
    old = await session(pool)
    await old.write(0, b"a" * CHUNK)
    await pool.preserve("v")
    new = await session(pool)
    await new.write(0, b"b" * CHUNK)  # the image now owns its own copy of chunk 0 (or a delta)
    await old.write(100, b"c" * 10)  # partial write by the old session: lands in A and B
    r = await reader(pool, "v@0")
    assert await r.read(0, CHUNK) == b"a" * 100 + b"c" * 10 + b"a" * (CHUNK - 110)
    assert await new.read(0, CHUNK) == b"b" * 100 + b"c" * 10 + b"b" * (CHUNK - 110)
    await old.write(0, b"d" * CHUNK)  # a whole-chunk write by the old session: both again
    assert await r.read(0, CHUNK) == b"d" * CHUNK
    assert await new.read(0, CHUNK) == b"d" * CHUNK
    await r.close()


@pytest.mark.parametrize("policy", ["fail-write", "break-image"])
async def test_full_disk_injected_cow(
    sim_pool: tuple[Pool, dict[str, SimulatedStorage]], policy: str
) -> None:
    pool, storages = sim_pool
    await pool.create_volume("v", 4 * CHUNK, "cow", CHUNK, enospc_policy=policy)
    s = await session(pool)
    await s.write(0, b"a" * 4 * CHUNK)
    await s.close()
    await pool.preserve("v")
    live = await session(pool)
    storages["v"].fail_writes = lambda name, off, n: name.startswith("img-")
    if policy == "fail-write":
        with pytest.raises(NoSpace, match="preserved image 0 stays intact"):
            await live.write(0, b"b" * 10)
        assert await live.read(0, 10) == b"a" * 10
        r = await reader(pool, "v@0")
        assert await r.read(0, 4 * CHUNK) == b"a" * 4 * CHUNK
        await r.close()
        assert pool.status("v")[0]["images"][0]["state"] == "drained"
    else:
        await live.write(0, b"b" * 10)
        assert await live.read(0, 10) == b"b" * 10
        image = pool.status("v")[0]["images"][0]
        assert image["state"] == "broken"
        assert "disk filled up" in image["broken_reason"]
        r = await reader(pool, "v@0")
        with pytest.raises(Exception, match="broken"):
            await r.read(0, 10)
        await r.close()
        await pool.release("v@0")  # a broken image can still be released
    await live.close()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("policy", ["fail-write", "break-image"])
async def test_full_disk_real_filesystem_cow(tmp_path: Path, policy: str) -> None:
    """Fill a real 1 MiB filesystem, then make copy-on-write need space it does not have."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        pool = await Pool.open(tmp_path / "pool",
                               storage_factory=lambda n: LocalStorage(small / n))
        try:
            await pool.create_volume("v", 1 << 20, "cow", 64 << 10, enospc_policy=policy)
            s = await session(pool)
            await s.write(0, b"x" * (900 << 10))  # most of the filesystem
            await s.flush()
            await s.close()
            await pool.preserve("v")
            live = await session(pool)
            if policy == "fail-write":
                with pytest.raises(NoSpace):
                    for off in range(0, 900 << 10, 64 << 10):
                        await live.write(off, b"y" * 512)
                r = await reader(pool, "v@0")
                assert await r.read(0, 900 << 10) == b"x" * (900 << 10)
                await r.close()
            else:
                for off in range(0, 900 << 10, 64 << 10):
                    await live.write(off, b"y" * 512)
                assert await live.read(0, 512) == b"y" * 512
                assert pool.status("v")[0]["images"][0]["state"] == "broken"
            await live.close()
        finally:
            await pool.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("method", METHODS)
async def test_release_while_io_goes_on(tmp_path: Path, method: str) -> None:
    """cow moves chunks down, log merges its delta, mirror resyncs its leg, all under load."""
    pool = await Pool.open(tmp_path)
    size = 64 * CHUNK
    model = Model(size)
    rng = random.Random(7)
    try:
        await pool.create_volume("v", size, method, CHUNK, legs=3)
        a = await session(pool)
        model.open_session(1)
        await a.write(0, b"a" * size)
        model.write(0, 0, b"a" * size)
        await a.close()
        model.close_session(1)
        await pool.preserve("v")
        model.preserve()
        b = await session(pool)
        model.open_session(2)
        for i in range(0, 64, 2):
            await b.write(i * CHUNK, b"b" * CHUNK)
            model.write(1, i * CHUNK, b"b" * CHUNK)
        await b.close()
        model.close_session(2)
        await pool.preserve("v")  # image 1 holds b's writes; image 0 is older still
        model.preserve()
        c = await session(pool)
        model.open_session(3)
        progress: list[tuple[int, int]] = []

        async def load() -> None:
            for _ in range(200):
                off = rng.randrange(size - 100)
                data = bytes([rng.randrange(1, 256)]) * rng.randrange(1, 100)
                await c.write(off, data)
                model.write(2, off, data)
                await asyncio.sleep(0)

        release = pool.release("v@0" if method != "cow" else "v@1",
                               lambda d, t: progress.append((d, t)))
        await asyncio.gather(release, load())
        model.release(0 if method != "cow" else 1)
        assert progress and progress[-1][0] == progress[-1][1]
        assert await c.read(0, size) == bytes(model.views[2])
        for gen in model.views:
            if gen != model.live:
                r = await reader(pool, f"v@{gen}")
                assert await r.read(0, size) == bytes(model.views[gen]), gen
                await r.close()
        await c.close()
    finally:
        await pool.close()
    reopened = await Pool.open(tmp_path)  # and everything survives a restart
    try:
        s = await session(reopened)
        assert await s.read(0, size) == bytes(model.views[2])
        await s.close()
    finally:
        await reopened.close()


async def test_drain_states(sim_pool: tuple[Pool, dict[str, SimulatedStorage]]) -> None:
    pool, _ = sim_pool
    await pool.create_volume("v", 4 * CHUNK)
    a, b = await session(pool), await session(pool)
    assert await pool.preserve("v") == "v@0"
    assert pool.status("v")[0]["images"][0]["sessions_left"] == 2
    assert not await pool.wait_drained("v@0", 0.01)
    with pytest.raises(WrongState, match="still draining"):
        await pool.release("v@0")
    await a.close(clean=True)
    await b.close(clean=False)  # its process died: the image may be torn
    assert await pool.wait_drained("v@0", 1)
    image = pool.status("v")[0]["images"][0]
    assert image["state"] == "drained-unclean"
    assert image["unclean_sessions"] == 1
    assert image["consistency"] == "crash-consistent"

    c = await session(pool)
    assert await pool.preserve("v") == "v@1"
    await pool.cutover("v@1")  # c never ends: cut it over
    image = pool.status("v")[0]["images"][1]
    assert image["state"] == "drained" and image["consistency"] == "crash-consistent"
    assert c.generation == 2
    await c.close()

    assert await pool.preserve("v", instant=True) == "v@2"
    assert pool.status("v")[0]["images"][2]["state"] == "drained"


async def test_bad_input_changes_nothing(
    sim_pool: tuple[Pool, dict[str, SimulatedStorage]],
) -> None:
    pool, _ = sim_pool
    with pytest.raises(InvalidRequest, match="power of two"):
        await pool.create_volume("v", 1 << 20, chunk_size=3000)
    with pytest.raises(InvalidRequest, match="unknown method"):
        await pool.create_volume("v", 1 << 20, method="raid5")
    with pytest.raises(InvalidRequest, match="not a valid volume name"):
        await pool.create_volume("a@b", 1 << 20)
    assert pool.status() == []
    await pool.create_volume("v", 4 * CHUNK)
    with pytest.raises(NotFound, match="no volume named 'w'"):
        await pool.preserve("w")
    s = await session(pool)
    await s.write(0, b"x" * 10)
    with pytest.raises(OutOfRange):
        await s.write(4 * CHUNK - 5, b"y" * 10)
    with pytest.raises(OutOfRange):
        await s.read(4 * CHUNK, 1)
    with pytest.raises(InvalidRequest, match="at least one byte"):
        await s.write(0, b"")
    assert await s.read(0, 11) == b"x" * 10 + b"\0"
    await pool.preserve("v")
    r = await reader(pool, "v@0")
    with pytest.raises(ReadOnly):
        await r.write(0, b"z")
    with pytest.raises(NotFound):
        await pool.open_export("v@7", "test")
    with pytest.raises(InvalidRequest, match="not an image name"):
        await pool.release("v")
    assert await r.read(0, 10) == b"x" * 10
    await r.close()
    await s.close()


@pytest.mark.parametrize("method", METHODS)
async def test_preserve_on_a_1tib_sparse_volume_costs_no_storage(tmp_path: Path,
                                                                method: str) -> None:
    pool = await Pool.open(tmp_path)
    try:
        await pool.create_volume("big", 1 << 40, method)
        s = await session(pool, "big")
        await s.write((1 << 40) - 4096, b"end!" * 1024)
        # A mirror holds that write until a group commit a few ms later writes its intent
        # bit's journal: let it land before the listing, or the listings race with it.
        await s.flush()
        before = sorted(p.name for p in (tmp_path / "volumes" / "big").iterdir())
        assert await pool.preserve("big") == "big@0"
        after = sorted(p.name for p in (tmp_path / "volumes" / "big").iterdir())
        assert before == after  # tables are created lazily, not per chunk
        await s.close()
        assert pool.status("big")[0]["bytes_on_disk"] < 1 << 20
    finally:
        await pool.close()


@pytest.mark.parametrize("method", METHODS)
async def test_concurrent_overlapping_requests_are_serialisable(tmp_path: Path,
                                                                method: str) -> None:
    """Writes from three generations at once; every view equals one serial order of them."""
    pool = await Pool.open(tmp_path)
    chunks = 8
    size = chunks * CHUNK
    try:
        await pool.create_volume("v", size, method, CHUNK, legs=3)
        sessions = [await session(pool)]
        await pool.preserve("v")
        sessions.append(await session(pool))
        await pool.preserve("v")
        sessions.append(await session(pool))
        rng = random.Random(3)
        writes: list[tuple[int, int, int]] = []  # (generation, first chunk, chunk count)
        jobs = []
        for i in range(120):
            s = rng.choice(sessions)
            first = rng.randrange(chunks)
            count = rng.randint(1, min(3, chunks - first))
            writes.append((s.generation, first, count))
            data = (i + 1).to_bytes(2, "little") * (count * CHUNK // 2)
            jobs.append(s.write(first * CHUNK, data))
        await asyncio.gather(*jobs)
        # Per view and chunk, the surviving write must be the last one to touch it in some
        # single order of all writes: collect "w' before w" constraints and check for a cycle.
        after: dict[int, set[int]] = {i: set() for i in range(len(writes))}
        views = {0: None, 1: None, 2: None}
        for view in views:
            if view == 2:
                content = await sessions[2].read(0, size)
            else:
                r = await reader(pool, f"v@{view}")
                content = await r.read(0, size)
                await r.close()
            for chunk in range(chunks):
                piece = content[chunk * CHUNK : (chunk + 1) * CHUNK]
                word = int.from_bytes(piece[:2], "little")
                assert piece == piece[:2] * (CHUNK // 2), "a chunk mixes two writes"
                touching = [i for i, (g, f, c) in enumerate(writes)
                            if g <= view and f <= chunk < f + c]
                if not touching:
                    assert word == 0
                    continue
                winner = word - 1
                assert winner in touching, (view, chunk, winner)
                for other in touching:
                    if other != winner:
                        after[winner].add(other)
        # A serial order exists iff the "comes after" graph has no cycle.
        state: dict[int, int] = {}

        def acyclic(node: int) -> bool:
            state[node] = 1
            for prev in after[node]:
                if state.get(prev) == 1 or (prev not in state and not acyclic(prev)):
                    return False
            state[node] = 2
            return True

        assert all(state.get(n) == 2 or acyclic(n) for n in after)
        for s in sessions:
            await s.close()
    finally:
        await pool.close()
