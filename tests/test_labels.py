"""Labels that must not lie: unclean ends counted before any drain, and the small label lies of
issue 9 item 14 (cutover on a drained image, volume delete with images, shutdown, the log).

The unclean-count test kills real NBD client processes with SIGKILL against a real daemon
subprocess, beside one that disconnects cleanly at the same moment, many rounds over.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import one_sentence as refused_line
from conftest import Daemon, SessionHolder, UnixHTTPConnection, http_call

from owm.common.errors import NoSpace
from owm.control.context import ControlContext
from owm.control.server import ControlServer
from owm.daemon.serve import DaemonConfig, serve
from owm.pool.pool import Pool
from owm.pool.volume import Volume

ROUNDS = 12
KILLED = 4  # sessions that vanish together in each round (four nbdfuse, in the issue)


def image_status(daemon: Daemon, image: str) -> dict[str, Any]:
    status, body = daemon.api("GET", f"/v1/images/{image}")
    assert status == 200, body
    return dict(body)


# ---------------------------------------------------------------------------------------------
# Item 5: several sessions vanish at once beside a clean one


def test_vanished_sessions_are_counted_before_the_drain(daemon: Daemon, short_tmp: Path) -> None:
    status, _ = daemon.api("POST", "/v1/volumes", {"name": "v", "size": "4M"})
    assert status == 201
    deadline = time.monotonic() + 240  # bounds the whole loop, whatever happens
    for round_no in range(ROUNDS):
        assert time.monotonic() < deadline, f"round {round_no} not reached in time"
        clean = SessionHolder(daemon, "v")
        doomed = [SessionHolder(daemon, "v") for _ in range(KILLED)]
        try:
            status, body = daemon.api("POST", "/v1/volumes/v/preserve", {})
            assert status == 201, body
            image = body["image"]
            assert body["status"]["state"] == "draining"
            # The clean disconnect and the kills land together.
            assert clean.proc.stdin is not None
            clean.proc.stdin.write("\n")
            clean.proc.stdin.flush()
            for holder in doomed:
                holder.proc.send_signal(signal.SIGKILL)
            assert clean.proc.stdout is not None
            assert clean.proc.stdout.readline().strip() == "done"
            clean.proc.wait(timeout=10)
        finally:
            for holder in [clean, *doomed]:
                holder.kill()
        status, waited = daemon.api("POST", f"/v1/images/{image}/wait", {"timeout": 20})
        assert status == 200 and waited["drained"], waited
        entry = image_status(daemon, image)
        assert (entry["state"], entry["unclean_sessions"], entry["consistency"]) == (
            "drained-unclean", KILLED, "crash-consistent"), (round_no, entry)
        if round_no % 2 == 0 or round_no == ROUNDS - 1:  # and the backup refuses it
            line = refused_line(daemon.owm("backup", image, "--to", short_tmp / "b.raw"))
            assert "drained-unclean" in line and "--force" in line
            assert not (short_tmp / "b.raw").exists()
        status, _ = daemon.api("POST", f"/v1/images/{image}/release", {})
        assert status == 200


def test_an_unclean_end_weakens_the_label_while_the_image_still_drains(daemon: Daemon) -> None:
    """One of two sessions holding an image is killed: the image still drains (the other holds
    it), but it can no longer end transaction-consistent, so its label says crash-consistent at
    once, not only when it drains."""
    status, _ = daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    assert status == 201
    keeper, doomed = SessionHolder(daemon, "v"), SessionHolder(daemon, "v")
    try:
        status, body = daemon.api("POST", "/v1/volumes/v/preserve", {})
        assert status == 201 and body["status"]["consistency"] == "transaction-consistent", body
        image = body["image"]
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        entry = image_status(daemon, image)
        while entry["unclean_sessions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            entry = image_status(daemon, image)
        assert (entry["state"], entry["unclean_sessions"], entry["consistency"]) == (
            "draining", 1, "crash-consistent"), entry
        keeper.disconnect()
    finally:
        keeper.kill()
        doomed.kill()
    status, waited = daemon.api("POST", f"/v1/images/{image}/wait", {"timeout": 20})
    assert status == 200 and waited["drained"], waited
    entry = image_status(daemon, image)
    assert (entry["state"], entry["consistency"]) == ("drained-unclean", "crash-consistent")


# ---------------------------------------------------------------------------------------------
# Item 14: cutover on a drained image leaves its label alone, and says so


def test_cutover_of_a_drained_image_keeps_its_label(daemon: Daemon) -> None:
    assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
    status, body = daemon.api("POST", "/v1/volumes/v/preserve", {})
    assert status == 201 and body["status"]["state"] == "drained"
    done = daemon.owm("cutover", "v@0")
    assert done.returncode == 0, done.stderr
    assert "crash-consistent" not in done.stdout
    assert "already drained" in done.stdout and "unchanged" in done.stdout
    entry = image_status(daemon, "v@0")
    assert (entry["state"], entry["consistency"]) == ("drained", "transaction-consistent")
    status, answer = daemon.api("POST", "/v1/images/v@0/cutover")
    assert status == 200 and answer["cut_over"] is False and answer["rebound"] == []
    assert answer["status"]["consistency"] == "transaction-consistent"


def test_cutover_of_a_draining_image_still_cuts_over(daemon: Daemon, hold_session: Any) -> None:
    assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
    holder = hold_session(daemon, "v")
    assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
    done = daemon.owm("cutover", "v@0")
    assert done.returncode == 0, done.stderr
    assert "crash-consistent" in done.stdout and "1 session" in done.stdout
    entry = image_status(daemon, "v@0")
    assert (entry["state"], entry["consistency"]) == ("drained", "crash-consistent")
    holder.disconnect()


# ---------------------------------------------------------------------------------------------
# Item 14: volume delete refuses while preserved images exist, unless --force


def test_volume_delete_refuses_preserved_images_unless_forced(daemon: Daemon) -> None:
    assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
    assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
    line = refused_line(daemon.owm("volume", "delete", "v"))
    assert "v@0" in line and "--force" in line
    status, body = daemon.api("DELETE", "/v1/volumes/v")
    assert status == 409 and "--force" in body["error"]
    assert image_status(daemon, "v@0")["state"] == "drained"  # nothing was deleted
    done = daemon.owm("volume", "delete", "v", "--force")
    assert done.returncode == 0, done.stderr
    assert daemon.api("GET", "/v1/volumes/v")[0] == 404
    # Without images no --force is needed, through the API as through the CLI.
    assert daemon.api("POST", "/v1/volumes", {"name": "w", "size": "1M"})[0] == 201
    assert daemon.owm("volume", "delete", "w").returncode == 0
    assert daemon.api("POST", "/v1/volumes", {"name": "x", "size": "1M"})[0] == 201
    assert daemon.api("DELETE", "/v1/volumes/x", {"force": False})[0] == 200


# ---------------------------------------------------------------------------------------------
# Item 14: a release that arrives during the SIGTERM shutdown is refused with a 503


async def test_release_during_shutdown_is_refused(short_tmp: Path) -> None:
    pool = await Pool.open(short_tmp / "pool")
    ctx = ControlContext(pool=pool)
    control = ControlServer(ctx)
    sock = short_tmp / "control.sock"
    await control.start(sock)
    try:
        await pool.create_volume("v", 1 << 20)
        await pool.preserve("v")
        ctx.closing.set()  # what the daemon does first when SIGTERM arrives

        def call() -> tuple[int, Any]:
            return http_call(UnixHTTPConnection(sock), "POST", "/v1/images/v@0/release", {})

        status, body = await asyncio.get_running_loop().run_in_executor(None, call)
        assert status == 503, body
        assert "shutting down" in body["error"] and "\n" not in body["error"]
        assert pool.status("v")[0]["images"][0]["state"] == "drained"
    finally:
        await control.stop()
        await pool.close()


# ---------------------------------------------------------------------------------------------
# Item 14: the log says one truth about how the pool closed


async def test_a_pool_that_did_not_close_cleanly_is_not_logged_as_clean(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool_dir = short_tmp / "pool"
    pool = await Pool.open(pool_dir)
    await pool.create_volume("v", 1 << 20)
    await pool.close()

    async def full_disk_close(self: Volume) -> None:
        raise NoSpace("the pool's disk is full while syncing")

    monkeypatch.setattr(Volume, "close", full_disk_close)
    stop = asyncio.Event()
    config = DaemonConfig(pool=pool_dir, nbd_listen=None, grace=1.0)
    caplog.set_level(logging.INFO)
    task = asyncio.ensure_future(serve(config, stop))
    deadline = asyncio.get_running_loop().time() + 20
    while not (pool_dir / "control.sock").exists():
        assert asyncio.get_running_loop().time() < deadline and not task.done()
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 30)
    messages = [r.getMessage() for r in caplog.records]
    assert any("did not close cleanly" in m for m in messages), messages
    assert not any("closed cleanly" in m and "not" not in m for m in messages), messages
    monkeypatch.undo()
    reopened = await Pool.open(pool_dir)
    try:
        assert reopened.was_clean is False  # and the pool itself knows it, too
    finally:
        await reopened.close()


# ---------------------------------------------------------------------------------------------
# Item 5 after a crash: the sessions a crash cut off are ended together with their count


async def test_a_crash_during_recovery_cannot_lose_the_unclean_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from owm.storage.simulated import SimulatedStorage

    storages: dict[str, SimulatedStorage] = {}

    def factory(name: str) -> SimulatedStorage:
        return storages.setdefault(name, SimulatedStorage())

    pool = await Pool.open(tmp_path, storage_factory=factory)
    await pool.create_volume("v", 1 << 20, chunk_size=4096)
    session = await pool.open_export("v", "t")
    await session.write(0, b"x" * 4096, fua=True)
    await pool.preserve("v")  # v@0 draining: the session holds it
    await pool.kill()

    async def crash(self: Volume) -> bool:
        raise RuntimeError("the power failed during recovery")

    # Recovery ends the cut-off session, then the power fails before the drain is recorded.
    monkeypatch.setattr(Volume, "_settle_drains", crash)
    half = Pool(tmp_path, factory)
    with pytest.raises(RuntimeError):
        await half._open()
    await half.kill()
    monkeypatch.undo()
    pool = await Pool.open(tmp_path, storage_factory=factory)
    try:
        image = pool.status("v")[0]["images"][0]
        assert (image["state"], image["unclean_sessions"], image["consistency"]) == (
            "drained-unclean", 1, "crash-consistent"), image
    finally:
        await pool.close()
