"""A full disk must never wedge the daemon or make a label lie (issue 9 items 2 and 6).

Two halves.  The injection harness runs one fixed workload (writes, preserves, drains,
releases) through the real Pool on power-loss storage and makes the disk fill up at the Nth
storage write, or at the Nth catalog commit, for every N: each request then fails with a plain
error or succeeds, nothing acknowledged is lost, every label is true, the pool works again as
soon as the fault clears and after a power loss.  The real-filesystem tests run a real daemon
on a pool in a small tmpfs that the test fills up, through NBD, the control API and the CLI.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, start_daemon

from owm.catalog.sqlite import HEADROOM_CHECK, RESERVE_BYTES, SqliteCatalog
from owm.common.errors import NoSpace, OwmError
from owm.nbd.client import NbdClient, NbdError
from owm.pool.model import Model
from owm.pool.pool import Pool
from owm.pool.volume import Session
from owm.storage.simulated import SimulatedStorage

CHUNK = 4096
SIZE = 4 * CHUNK
STEP_TIMEOUT = 10.0  # no step of the workload may take longer: a hang is a failure


# ---------------------------------------------------------------------------------------------
# The injection harness


class StorageFault:
    """The disk fills up at the Nth storage write: it and every later one fail until cleared."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.count = 0
        self.cleared = False
        self.failed = 0  # writes refused so far

    def __call__(self, name: str, offset: int, length: int) -> bool:
        self.count += 1
        if self.at is None or self.cleared or self.count < self.at:
            return False
        self.failed += 1
        return True


class CatalogFault:
    """The disk fills up at the Nth catalog commit.  As on a real disk, each step of the reserve
    the catalog frees buys ``budget`` commits; beyond that every commit fails until cleared."""

    def __init__(self, catalog: SqliteCatalog, at: int | None, budget: int) -> None:
        self.catalog = catalog
        self.at = at
        self.budget = budget
        self.free = 0  # commits the freed reserve space still holds
        self.count = 0
        self.cleared = False
        self.fired = False

    @property
    def full(self) -> bool:
        return self.at is not None and not self.cleared and self.count >= self.at

    def __call__(self, what: str) -> bool:
        if what == HEADROOM_CHECK:
            return self.full and not self.catalog.has_reserve and self.free <= 0
        self.count += 1
        if not self.full:
            return False
        self.fired = True
        if self.free > 0:
            self.free -= 1
            return False
        if self.catalog.has_reserve:
            self.free += self.budget  # the catalog frees a step and tries again
        return True


@dataclass
class Run:
    """One run of the workload: the pool, the model and what the test knows of each byte."""

    method: str
    policy: str
    pool: Pool
    storages: dict[str, SimulatedStorage]
    model: Model = field(default_factory=lambda: Model(SIZE))
    # Per view: bytes whose content is unknown (a write to them failed), 1 = unknown.
    unknown: dict[int, bytearray] = field(default_factory=lambda: {0: bytearray(SIZE)})
    sessions: dict[str, Session] = field(default_factory=dict)
    model_sid: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    pending_releases: list[int] = field(default_factory=list)
    storage_fault: StorageFault | None = None

    @property
    def volume(self) -> Any:
        return self.pool.volume("v")

    async def step(self, what: str, op: Awaitable[Any]) -> tuple[bool, Any]:
        """Run one request; (True, result), or (False, None) when it failed as it may."""
        try:
            return True, await asyncio.wait_for(op, STEP_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"{what} hung on a full disk") from None
        except OwmError as exc:
            self.errors.append((what, exc))
            assert str(exc) and "\n" not in str(exc), (what, exc)
            return False, None

    async def open(self, key: str) -> None:
        ok, session = await self.step(f"open {key}", self.pool.open_export("v", key))
        if ok:
            self.sessions[key] = session
            self.model_sid[key] = len(self.model_sid) + 1
            gen = self.model.open_session(self.model_sid[key])
            assert session.generation == gen

    async def write(self, key: str, offset: int, fill: int, length: int) -> None:
        session = self.sessions.get(key)
        if session is None:
            return
        gen = session.generation
        data = bytes([fill]) * length
        refused = self.storage_fault.failed if self.storage_fault else 0
        ok, _ = await self.step(f"write by {key}", session.write(offset, data, fua=True))
        if self.policy == "fail-write" and self.storage_fault is not None:
            # A storage write that failed under this write means the write failed, and said so.
            assert ok == (self.storage_fault.failed == refused), (key, offset, ok)
        if ok:
            self.model.write(gen, offset, data)
            for view, mask in self.unknown.items():
                if view >= gen:
                    mask[offset : offset + length] = bytes(length)
        else:
            for view, mask in self.unknown.items():
                if view >= gen:
                    mask[offset : offset + length] = b"\1" * length

    async def close(self, key: str) -> None:
        session = self.sessions.pop(key, None)
        if session is None:
            return
        await self.step(f"close {key}", session.close(clean=True))
        self.model.close_session(self.model_sid[key])

    async def preserve(self) -> None:
        ok, name = await self.step("preserve", self.pool.preserve("v"))
        if ok:
            gen = self.model.preserve()
            assert name == f"v@{gen}"
            self.unknown[self.model.live] = bytearray(self.unknown[gen])

    async def release(self, gen: int) -> None:
        ok, _ = await self.step(f"release v@{gen}", self.pool.release(f"v@{gen}"))
        if ok:
            self._released(gen)
        else:
            self.pending_releases.append(gen)

    def _released(self, gen: int) -> None:
        self.model.release(gen)
        del self.unknown[gen]

    async def workload(self) -> None:
        await self.open("a")
        await self.write("a", 0, 0xA1, SIZE)
        await self.open("old")  # holds v@0 while it drains
        await self.preserve()  # v@0
        await self.open("new")
        await self.write("new", 0, 0xB2, 2 * CHUNK)  # copies (cow) or deltas (log)
        await self.write("old", 2 * CHUNK + 100, 0xC3, 300)  # lands in v@0 and live
        await self.close("a")
        await self.close("old")  # v@0 drains
        await self.preserve()  # v@1, held by "new"
        await self.write("new", CHUNK, 0xD4, 2 * CHUNK)
        await self.close("new")  # v@1 drains
        await self.open("late")
        await self.write("late", 3 * CHUNK, 0xE5, CHUNK)  # v@1 now owns chunk 3 (cow)
        for gen in (1, 0):  # v@1 first: cow moves chunk 3 down into v@0
            if gen in self.model.views and gen != self.model.live:
                await self.release(gen)
        await self.write("late", 0, 0xF6, CHUNK)
        await self.close("late")
        await self.preserve()  # no session open: drained from birth, after a flush

    # -- checks -------------------------------------------------------------------------------
    async def read_view(self, gen: int) -> bytes | None:
        """A view's bytes, or None when it is broken (and reading it says so)."""
        volume = self.volume
        if gen == volume.live:
            return bytes(await volume.engine.read(gen, 0, SIZE))
        image = volume.images[gen]
        reader = await volume.open_reader(gen)
        try:
            if image.state == "broken":
                with pytest.raises(OwmError, match="broken"):
                    await reader.read(0, SIZE)
                return None
            return bytes(await reader.read(0, SIZE))
        finally:
            await reader.close()

    async def check(self, when: str, settled: bool = True) -> None:
        """Every view against the model; with ``settled`` false, a drain not yet recorded (the
        disk was full) may still say draining: weaker, never stronger."""
        volume = self.volume
        assert volume.live == self.model.live, when
        assert sorted(volume.images) == sorted(g for g in self.model.views if g != volume.live)
        for gen in sorted(self.model.views):
            if gen != volume.live and volume.images[gen].state == "releasing":
                assert gen in self.pending_releases, (when, gen)  # a release stopped part-way
                continue
            got = await self.read_view(gen)
            if gen != volume.live:
                image = volume.images[gen]
                if image.state == "broken":
                    assert self.policy == "break-image", (when, gen, image)
                    assert image.consistency == "broken"
                    continue
                if self.model.drained(gen):
                    allowed = ("drained", "drained-unclean") + (
                        () if settled else ("draining",))
                    assert image.state in allowed, (when, gen, image)
                else:
                    assert image.state == "draining", (when, gen, image)
                if image.state == "drained":
                    assert image.consistency == "transaction-consistent", (when, gen, image)
            assert got is not None
            want = self.model.views[gen]
            mask = self.unknown[gen]
            bad = [i for i in range(SIZE) if not mask[i] and got[i] != want[i]]
            assert not bad, (f"{when}: view {gen} differs at {len(bad)} known bytes, first "
                             f"{bad[0]}: {got[bad[0]]:#x} instead of {want[bad[0]]:#x}")

    async def recover(self) -> None:
        """The fault has cleared: unfinished releases go through, the pool takes new work."""
        # Drains that could not be recorded are recorded by the background retry.
        for gen in list(self.model.views):
            if gen != self.model.live and self.model.drained(gen):
                assert await asyncio.wait_for(
                    self.volume.wait_drained(gen, None), STEP_TIMEOUT), gen
        for gen in list(self.pending_releases):
            if self.volume.images.get(gen) is not None:
                await asyncio.wait_for(self.pool.release(f"v@{gen}"), STEP_TIMEOUT)
            self._released(gen)
            self.pending_releases.remove(gen)
        await self.open("after")
        await self.write("after", CHUNK, 0x77, 100)
        assert not self.unknown[self.model.live][CHUNK : CHUNK + 100].count(1)
        await self.preserve()
        await self.close("after")
        image = max(g for g in self.model.views if g != self.model.live)
        await self.release(image)
        assert not self.pending_releases


async def one_run(tmp: Path, method: str, policy: str, *, storage_at: int | None = None,
                  catalog_at: int | None = None, budget: int = 1) -> tuple[Run, int, int]:
    """The workload with one fault; returns the run and the writes and commits it made."""
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(tmp, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    await pool.create_volume("v", SIZE, method, CHUNK, legs=3, enospc_policy=policy)
    run = Run(method, policy, pool, storages)
    catalog = pool.catalog
    assert isinstance(catalog, SqliteCatalog)
    writes = StorageFault(storage_at)
    commits = CatalogFault(catalog, catalog_at, budget)
    storages["v"].fail_writes = run.storage_fault = writes
    catalog.fail_change = commits
    try:
        await run.workload()
        await run.check("on the full disk", settled=False)
        writes.cleared = commits.cleared = True
        await run.check("once the fault cleared", settled=False)
        await run.recover()
        await run.check("after recovering")
        # A power loss now: what was acknowledged (every write is FUA) survives it, and so
        # does every broken mark.
        broken = {g for g, i in run.volume.images.items() if i.state == "broken"}
        await pool.kill()
        for name, storage in list(storages.items()):
            storages[name] = storage.power_loss()
        run.pool = await Pool.open(tmp, storage_factory=lambda n: storages.setdefault(
            n, SimulatedStorage()))
        for key in list(run.sessions):
            run.model.close_session(run.model_sid[key])
        run.sessions.clear()
        await run.check("after a power loss")
        assert broken <= {g for g, i in run.volume.images.items() if i.state == "broken"}
    finally:
        await run.pool.close()
    return run, writes.count, commits.count


def sample(total: int, most: int = 40) -> list[int]:
    """1..total, or an even sample of it (both ends included) when there are too many."""
    if total <= most:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (most - 1)) for i in range(most)})


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drains that could not be recorded are retried after 20 ms instead of half a second."""
    monkeypatch.setattr("owm.pool.volume.SETTLE_RETRY_FIRST", 0.02)


CASES = [("cow", "fail-write"), ("cow", "break-image"), ("log", "fail-write"),
         ("mirror", "fail-write")]


@pytest.mark.parametrize(("method", "policy"), CASES)
async def test_enospc_at_every_storage_write(tmp_path: Path, method: str, policy: str,
                                             quick_retries: None) -> None:
    _, total, _ = await one_run(tmp_path / "dry", method, policy)
    assert total > 5
    for n in sample(total):
        await one_run(tmp_path / f"w{n}", method, policy, storage_at=n)


@pytest.mark.parametrize(("method", "policy"), CASES)
async def test_sqlite_full_at_every_catalog_commit(tmp_path: Path, method: str, policy: str,
                                                   quick_retries: None) -> None:
    _, _, total = await one_run(tmp_path / "dry", method, policy)
    assert total > 5
    for n in sample(total, 30):
        # The reserve buys one commit, or (every third N) a few.
        for budget in (1, 3) if n % 3 == 0 else (1,):
            await one_run(tmp_path / f"c{n}-{budget}", method, policy, catalog_at=n,
                          budget=budget)


async def test_a_broken_image_stays_broken_when_its_mark_needs_the_reserve(
    tmp_path: Path,
) -> None:
    """Item 2 in small: the copy fails, the catalog is full too; the broken mark is recorded
    on the reserve's space and survives a power loss."""
    storages: dict[str, SimulatedStorage] = {}

    def factory(n: str) -> SimulatedStorage:
        return storages.setdefault(n, SimulatedStorage())

    pool = await Pool.open(tmp_path, storage_factory=factory)
    await pool.create_volume("v", SIZE, "cow", CHUNK, enospc_policy="break-image")
    session = await pool.open_export("v", "t")
    await session.write(0, b"a" * SIZE, fua=True)
    await session.close()
    await pool.preserve("v")
    live = await pool.open_export("v", "t")  # opened before the disk filled up
    catalog = pool.catalog
    assert isinstance(catalog, SqliteCatalog)
    catalog.fail_change = CatalogFault(catalog, 1, budget=1)
    storages["v"].fail_writes = lambda name, off, n: name.startswith("img-")
    await live.write(0, b"b" * CHUNK, fua=True)  # the copy fails: v@0 breaks
    assert pool.volume("v").images[0].state == "broken"
    assert catalog.reserve_size < RESERVE_BYTES  # the mark was recorded on the reserve's space
    await pool.kill()
    for name, storage in list(storages.items()):
        storages[name] = storage.power_loss()
    pool = await Pool.open(tmp_path, storage_factory=factory)
    try:
        image = pool.status("v")[0]["images"][0]
        assert image["state"] == "broken" and image["consistency"] == "broken"
    finally:
        await pool.close()


async def test_an_unrecordable_broken_mark_refuses_the_write(tmp_path: Path) -> None:
    """When not even the reserve is left, the image is not broken: the write is refused."""
    storages: dict[str, SimulatedStorage] = {}
    pool = await Pool.open(tmp_path, storage_factory=lambda n: storages.setdefault(
        n, SimulatedStorage()))
    try:
        await pool.create_volume("v", SIZE, "cow", CHUNK, enospc_policy="break-image")
        session = await pool.open_export("v", "t")
        await session.write(0, b"a" * SIZE, fua=True)
        await pool.preserve("v")
        live = await pool.open_export("v", "t")
        catalog = pool.catalog
        assert isinstance(catalog, SqliteCatalog)
        catalog.fail_change = CatalogFault(catalog, 1, budget=0)
        storages["v"].fail_writes = lambda name, off, n: name.startswith("img-")
        with pytest.raises(NoSpace, match="could not be marked broken"):
            await live.write(0, b"b" * CHUNK, fua=True)
        assert await live.read(0, CHUNK) == b"a" * CHUNK
        vol = pool.volume("v")
        assert vol.images[0].state == "draining" and 0 not in vol.engine.broken
        storages["v"].fail_writes = None
        catalog.fail_change = None
        await live.write(0, b"b" * CHUNK, fua=True)  # space is back: the copy is made
        await session.close()
        reader = await pool.open_export("v@0", "t")
        assert await reader.read(0, SIZE) == b"a" * SIZE
        await reader.close()
        await live.close()
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------
# A real small filesystem


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB mounted for the test (root only), unmounted afterwards."""
    path = short_tmp / "fs"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(fs: Path) -> Path:
    """Fill the filesystem to its last block with one file; returns it."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 16, 1 << 12):
            data = b"\xff" * block
            for _ in range(1 << 16):
                try:
                    os.write(fd, data)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def nbd(daemon: Daemon, export: str, action: Callable[[NbdClient], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
        try:
            return await action(client)
        finally:
            await client.disconnect()

    return asyncio.run(asyncio.wait_for(go(), 60))


def plain(status: int, body: Any, *allowed: int) -> None:
    """A plain answer: one of ``allowed``, and an error is one sentence, never a 500."""
    assert status in allowed, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and "\n" not in body["error"], body
        assert "internal error" not in body["error"].lower(), body


def write_all(daemon: Daemon, export: str, fill_byte: int, size: int) -> None:
    async def go(client: NbdClient) -> None:
        for off in range(0, size, 256 << 10):
            await client.write(off, bytes([fill_byte]) * (256 << 10))
        await client.flush()

    nbd(daemon, export, go)


def test_broken_image_stays_broken_across_restarts_on_a_full_disk(small_fs: Path) -> None:
    """Item 2: cow, break-image, catalog and data on one full filesystem."""
    pool = small_fs / "pool"
    daemon = start_daemon(pool)
    try:
        status, _ = daemon.api("POST", "/v1/volumes", {
            "name": "c", "size": "1M", "chunk_size": "64K", "enospc_policy": "break-image"})
        assert status == 201
        write_all(daemon, "c", 0x01, 1 << 20)
        assert daemon.api("POST", "/v1/volumes/c/preserve", {})[0] == 201
        fill(small_fs)

        async def overwrite(client: NbdClient) -> list[str]:
            failures = []
            for off in range(0, 1 << 20, 64 << 10):
                try:
                    await client.write(off, b"\x02" * (64 << 10), fua=True)
                except NbdError as exc:
                    failures.append(str(exc))
            return failures

        nbd(daemon, "c", overwrite)
        status, image = daemon.api("GET", "/v1/images/c@0")
        assert status == 200 and image["state"] == "broken", image
        daemon.stop(signal.SIGKILL)
        for how in (signal.SIGTERM, None):  # after a crash, then after a clean stop
            daemon = start_daemon(pool)  # on the still full disk
            status, image = daemon.api("GET", "/v1/images/c@0")
            assert status == 200, image
            assert (image["state"], image["consistency"]) == ("broken", "broken"), image
            if how is not None:
                assert daemon.stop(how) == 0, daemon.log_text()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log_text()


def test_a_full_disk_answers_plainly_and_recovers_without_a_restart(small_fs: Path) -> None:
    """Item 6: plain errors on a full disk, a release stopped part-way resumes, restarts."""
    pool = small_fs / "pool"
    daemon = start_daemon(pool)
    try:
        size = 2 << 20
        status, _ = daemon.api("POST", "/v1/volumes", {
            "name": "f", "size": "2M", "chunk_size": "64K"})
        assert status == 201
        write_all(daemon, "f", 0x01, size)
        assert daemon.api("POST", "/v1/volumes/f/preserve", {})[0] == 201  # f@0
        assert daemon.api("POST", "/v1/volumes/f/preserve", {})[0] == 201  # f@1
        write_all(daemon, "f", 0x02, size)  # f@1 owns copies of every chunk, f@0 none
        filler = fill(small_fs)

        # Every request on the full disk gets a plain answer.
        plain(*daemon.api("GET", "/v1/volumes"), 200)
        plain(*daemon.api("POST", "/v1/volumes", {"name": "g", "size": "1M"}), 201, 507)
        try:
            nbd(daemon, "f", lambda c: c.write(0, b"\x03" * 4096, fua=True))
        except NbdError as exc:
            assert "full" in str(exc) or "ENOSPC" in str(exc), exc
        status, body = daemon.api("POST", "/v1/images/f@1/release", {})
        plain(status, body, 507)  # moving f@1's chunks down into f@0 needs space
        assert "disk is full" in body["error"]
        status, image = daemon.api("GET", "/v1/images/f@1")
        assert status == 200 and image["state"] == "releasing"
        plain(*daemon.api("POST", "/v1/images/f@1/release", {}), 507)  # a retry: no KeyError
        cli = daemon.owm("release", "f@1")
        assert cli.returncode == 1 and "disk is full" in cli.stderr, cli
        assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        plain(*daemon.api("POST", "/v1/volumes/f/preserve", {}), 201, 507)

        # A crash and a restart on the full disk.
        daemon.stop(signal.SIGKILL)
        daemon = start_daemon(pool)
        status, image = daemon.api("GET", "/v1/images/f@1")
        assert status == 200 and image["state"] == "releasing", image

        # Space returns: the same release goes through, without another restart.
        filler.unlink()
        status, body = daemon.api("POST", "/v1/images/f@1/release", {})
        plain(status, body, 200)

        async def read_f0(client: NbdClient) -> bytes:
            return bytes(await client.read(0, size))

        assert nbd(daemon, "f@0", read_f0) == b"\x01" * size
        assert nbd(daemon, "f", read_f0)[4096:] == b"\x02" * (size - 4096)
        status, body = daemon.api("POST", "/v1/volumes/f/preserve", {})
        plain(status, body, 201)
        assert daemon.stop() == 0
        log = daemon.log_text()
        assert "Traceback" not in log and "internal error" not in log, log
    finally:
        daemon.stop()
