"""Changed-chunk maps that survive a crash: an incremental backup after a kill -9 or a power loss
reads only the chunks that may have changed (a superset of those that did), never everything,
and never misses one.

The power-loss half crashes the simulated storage at every storage call of a run of first
writes and the group commits that make their bits durable (at a FLUSH, or on the write-back
timer), with the unsynced pages surviving at random, then checks every chunk whose bytes differ
between the two images against the map.  A planted reordering (held writes released before the
bits of their chunks are durable) must make that check fail.  The kill -9 half runs a real
daemon, kills it with unflushed writes outstanding, and backs up through the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from backup_helpers import create, ok, ok_json, preserve, random_writes, read_image, write
from conftest import start_daemon
from faults import SimPool

from owm.engine import base
from owm.engine.cow import CowEngine
from owm.engine.log import LogEngine
from owm.nbd.client import NbdClient
from owm.pool.pool import Pool
from owm.storage.simulated import PowerLost

SIM_CHUNK = 4096
SIM_CHUNKS = 16
CHUNK = 64 * 1024
SIZE = 8 << 20


async def _image(pool: Pool, name: str, gen: int) -> bytes:
    volume = pool.volume(name)
    reader = await volume.open_reader(gen)
    try:
        return bytes(await reader.read(0, SIM_CHUNK * SIM_CHUNKS))
    finally:
        await reader.close()


async def _first_writes(root: Path, method: str, crash_at: int | None,
                        seed: int) -> tuple[int, list[int] | None, set[int]]:
    """Preserve, then first writes to a few chunks in the new generation, losing power at the
    ``crash_at``-th storage call after the preserve.  Returns the storage calls the writes took
    (no crash), or the map the restarted pool reports and the chunks that really differ."""
    sim = SimPool(root)
    pool = await sim.open()
    await pool.create_volume("v", SIM_CHUNK * SIM_CHUNKS, method=method, chunk_size=SIM_CHUNK,
                             legs=3)
    first = await pool.volume("v").open_session("first")
    for c in range(SIM_CHUNKS):
        await first.write(c * SIM_CHUNK, bytes([c + 1]) * SIM_CHUNK)
    await first.flush()
    await first.close(clean=True)
    if method == "mirror":
        # A clean stop clears the write-intent map; otherwise every chunk written above would
        # still be in it, and the restart after the crash names those chunks in the changed
        # map (a chunk the legs may hold differently), defeating the tightness check below.
        pool = await sim.restart()
    assert await pool.preserve("v") == "v@0"
    storages = list(sim.storages.values())
    base = [s.calls for s in storages]
    if crash_at is not None:
        for s, b in zip(storages, base, strict=True):
            s.crash_at = b + crash_at
    written = [1, 4, 5]
    try:
        live = await pool.volume("v").open_session("live")
        # Concurrent first writes (group-committed), a partial one, one over two chunks, then
        # writes to chunks already marked; nothing flushed: only the page cache holds them.
        await asyncio.gather(*(live.write(c * SIM_CHUNK + 100, b"x" * 500) for c in written))
        await live.write(9 * SIM_CHUNK - 10, b"y" * 20)  # chunks 8 and 9
        await live.write(14 * SIM_CHUNK, b"z" * SIM_CHUNK)
        # The commit that makes the bits durable and releases the held writes (with the
        # timer at no delay, background commits ran between the writes too).
        await live.flush()
        await live.write(4 * SIM_CHUNK, b"w" * 10)  # its bit is durable: nothing to wait for
        # A first write, then a second one to the same chunk while its bit is not durable yet
        # (cow holds it too; log waits for the bit, as the write lands in the new entry).
        await live.write(12 * SIM_CHUNK + 8, b"t" * 100)
        await live.write(12 * SIM_CHUNK, b"s" * 10)
        await live.write(1 * SIM_CHUNK, b"u" * 10)  # never committed
    except PowerLost:
        pass
    if crash_at is None:
        calls = sum(s.calls - b for s, b in zip(storages, base, strict=True))
        await pool.close()
        return calls, None, set()
    pool = await sim.crash(random.Random(seed))
    try:
        assert await pool.preserve("v") == "v@1"
        changed = pool.changed_chunks("v@1", 0)
        old, new = await _image(pool, "v", 0), await _image(pool, "v", 1)
        differ = {c for c in range(SIM_CHUNKS)
                  if old[c * SIM_CHUNK:(c + 1) * SIM_CHUNK] != new[c * SIM_CHUNK:(c + 1) *
                                                                    SIM_CHUNK]}
    finally:
        await pool.close()
    return 0, changed, differ


async def _every_crash_point(root: Path, method: str) -> None:
    calls, _, _ = await _first_writes(root / "dry", method, None, 0)
    assert calls > 0
    for n in range(1, calls + 2):
        _, changed, differ = await _first_writes(root / f"crash{n}", method, n, n)
        assert changed is not None, f"crash at call {n}: the map was not trusted"
        assert differ <= set(changed), (n, sorted(differ), changed)
        # Only chunks that were written (or were about to be) are in it: never the whole image.
        assert set(changed) <= {1, 4, 5, 8, 9, 12, 14}, (n, changed)


@pytest.mark.parametrize("delay", [3600.0, 0.0], ids=["at-flush", "timer"])
@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
async def test_after_a_power_loss_the_map_is_a_superset_of_what_changed(
        tmp_path: Path, method: str, delay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WRITEBACK_DELAY", delay)
    await _every_crash_point(tmp_path, method)


async def test_held_writes_released_before_their_bits_are_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cow's group commit planted wrong: the held overwrites reach live.data before the changed
    maps' commit (the copies and entries still first)."""
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)

    async def reordered(self: CowEngine) -> None:
        changed = self._changed_batch()
        await self._commit_copies({v: set(c) for v, c in self._pending.items()})
        counts = {c: len(ops) for c, ops in self._held.items()}
        await asyncio.gather(*(self._release_held(c, k) for c, k in counts.items()))
        await self._commit_changed(changed)

    monkeypatch.setattr(CowEngine, "_commit_batch", reordered)
    with pytest.raises(AssertionError):
        await _every_crash_point(tmp_path, "cow")


async def test_log_entries_before_their_bits_are_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """log's group commit planted wrong: the new entries committed before the changed maps."""
    monkeypatch.setattr(base, "WRITEBACK_DELAY", 3600.0)

    async def reordered(self: LogEngine) -> None:
        changed = self._changed_batch()
        for layer in self.layers:
            if layer.pending and layer.table is not None:
                await base.Engine.sync_objects(self, [layer.data])
                for chunk in layer.pending:
                    layer.table.set(chunk)
                layer.pending.clear()
                await layer.table.commit()
        await self._commit_changed(changed)

    monkeypatch.setattr(LogEngine, "_commit_batch", reordered)
    with pytest.raises(AssertionError):
        await _every_crash_point(tmp_path, "log")


async def _write_then_kill(socket: str, writes: list[tuple[int, bytes]],
                           kill: Callable[[], object]) -> None:
    client = await NbdClient.connect(export="vol", unix_path=socket)
    for offset, data in writes:
        await client.write(offset, data)  # acknowledged, never flushed
    # Write-back holds a first write to a chunk until its group commit (a few ms later) has made
    # the chunk's changed bit durable; a kill before that loses the write and its bit alike,
    # and the chunk did not change.  Give the commit its time, so that the chunks did change.
    await asyncio.sleep(0.5)
    kill()
    with contextlib.suppress(Exception):  # the daemon is gone
        await client.disconnect()


def test_incremental_after_kill_9_reads_only_changed_chunks(short_tmp: Path) -> None:
    pool, repo = short_tmp / "pool", short_tmp / "repo"
    first = start_daemon(pool)
    try:
        create(first, "vol", "8M")
        write(first, random_writes(random.Random("kill"), SIZE, 20))
        full = ok_json(first.owm("backup", preserve(first), "--to", repo, "--json"))
        assert full["incremental"] is False
        write(first, [(5 * CHUNK, b"\x42" * CHUNK), (20 * CHUNK + 7, b"flushed")])
        unflushed = [(33 * CHUNK + 1000, b"not flushed" * 100),
                     (64 * CHUNK - 3, b"across two chunks")]
        asyncio.run(_write_then_kill(str(first.nbd_socket), unflushed,
                                     lambda: first.stop(signal.SIGKILL)))
    finally:
        first.stop(signal.SIGKILL)
    second = start_daemon(pool)
    try:
        write(second, [(90 * CHUNK, b"after the crash")])
        image = preserve(second)
        summary = ok_json(second.owm("backup", image, "--to", repo, "--json"))
        expected = {5, 20, 33, 63, 64, 90}
        assert summary["incremental"] is True, summary
        assert summary["changed_chunks"] == len(expected), summary
        assert summary["bytes_read"] <= len(expected) * CHUNK, summary
        target = short_tmp / "r.raw"
        ok(second.owm("restore", repo, summary["id"], "--to", target))
        assert target.read_bytes() == read_image(second, image)
    finally:
        assert second.stop() == 0
