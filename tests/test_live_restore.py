"""Live restore: ``owm restore REPO ID --to NAME --live`` makes NAME usable at once and fills it
from the backup in the background.  Through real NBD clients against a real daemon: reads
while it fills return the backup, writes (partial chunks, whole chunks, zeroes) stick and are
never overwritten by backup data afterwards, ``owm status`` shows the progress, and the mark
goes once every chunk is filled.  Then the daemon is killed with SIGKILL again and again during
a live restore (and the restoring process once too): the restore resumes every time, and no
read ever returns backup data over a newer flushed write.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from backup_helpers import create, ok, ok_json, preserve, read_image, write
from conftest import OWM, REPO, Daemon, cli_env, start_daemon

from owm.nbd.client import NbdClient

CHUNK = 64 * 1024


def _seed(daemon: Daemon, size: int, pieces: int, seed: str) -> tuple[str, bytearray]:
    create(daemon, "vol", str(size))
    rng = random.Random(seed)
    write(daemon, [(rng.randrange(size - 200_000), rng.randbytes(rng.randint(1, 200_000)))
                   for _ in range(pieces)])
    image = preserve(daemon)
    return image, bytearray(read_image(daemon, image))


def _live_restore(daemon: Daemon, repo: Path, backup_id: str, pace: float) -> subprocess.Popen[str]:
    return subprocess.Popen([*OWM, "--pool", str(daemon.pool), "restore", str(repo), backup_id,
                             "--to", "new", "--live", "--pace", str(pace), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env(), cwd=REPO, text=True)


def _mark(daemon: Daemon) -> Any:
    status, doc = daemon.api("GET", "/v1/volumes/new")
    return doc.get("restore") if status == 200 else "missing"


def _wait_attached(daemon: Daemon, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        mark = _mark(daemon)
        if mark is None or (isinstance(mark, dict) and mark.get("source") == "attached"):
            return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the live restore did not start: {mark}"
        time.sleep(0.05)


async def _writes(daemon: Daemon, rng: random.Random, expected: bytearray, count: int,
                  written: list[tuple[int, int]] | None = None) -> None:
    """Random writes (partial chunks, whole chunks, zeroes), flushed; applied to ``expected``."""
    size = len(expected)
    client = await NbdClient.connect(export="new", unix_path=str(daemon.nbd_socket))
    try:
        for _ in range(count):
            kind = rng.random()
            if kind < 0.4:  # inside one chunk, or across a boundary
                length = rng.randint(1, 2 * CHUNK)
                offset = rng.randrange(size - length)
                data = rng.randbytes(length)
                await client.write(offset, data, fua=rng.random() < 0.3)
            elif kind < 0.8:  # whole chunks
                n = rng.randint(1, 4)
                offset = rng.randrange(size // CHUNK - n) * CHUNK
                data = rng.randbytes(n * CHUNK)
                await client.write(offset, data)
            else:
                length = rng.randint(1, 3 * CHUNK)
                offset = rng.randrange(size - length)
                data = bytes(length)
                await client.write_zeroes(offset, length)
            expected[offset:offset + len(data)] = data
            if written is not None:
                written.append((offset, len(data)))
        await client.flush()
        for _ in range(8):  # and read some of it back at once
            length = rng.randint(1, 3 * CHUNK)
            offset = rng.randrange(size - length)
            assert await client.read(offset, length) == expected[offset:offset + length]
    finally:
        await client.disconnect()


async def _check(daemon: Daemon, expected: bytearray, ranges: list[tuple[int, int]]) -> None:
    client = await NbdClient.connect(export="new", unix_path=str(daemon.nbd_socket))
    try:
        for offset, length in ranges:
            got = await client.read(offset, length)
            assert got == expected[offset:offset + length], \
                f"{length} bytes at {offset}: {_first_difference(got, expected[offset:])}"
    finally:
        await client.disconnect()


def _first_difference(got: bytes, want: bytes) -> str:
    for offset in range(0, len(want), CHUNK):
        if got[offset:offset + CHUNK] != want[offset:offset + CHUNK]:
            return f"chunk {offset // CHUNK} differs"
    return "same"


def test_live_restore_is_usable_at_once_and_keeps_writes(daemon: Daemon,
                                                        short_tmp: Path) -> None:
    size = 32 << 20
    image, expected = _seed(daemon, size, 60, "live")
    repo = short_tmp / "repo"
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    proc = _live_restore(daemon, repo, backup_id, pace=0.25)
    try:
        _wait_attached(daemon, proc)
        mark = _mark(daemon)
        if isinstance(mark, dict):  # still filling (it always is unless the machine stalled)
            assert mark["live"] is True and mark["chunks"] == size // CHUNK
            shown = daemon.owm("status", "new").stdout
            assert "LIVE RESTORE" in shown and "filled" in shown, shown
            assert "finish that restore first" in daemon.owm("preserve", "new").stderr
        rng = random.Random("live-writes")
        asyncio.run(_writes(daemon, rng, expected, 40))
        got = read_image(daemon, "new")
        assert got == expected, _first_difference(got, expected)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        assert json.loads(out)["to"] == "volume"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _mark(daemon) is None
    got = read_image(daemon, "new")
    assert got == expected, _first_difference(got, expected)
    assert not list((daemon.pool / "volumes").glob("new+restore/*"))
    assert ok(daemon.owm("preserve", "new")).strip() == "new@0"


def test_kill_9_during_live_restore_never_returns_backup_data_over_newer_writes(
        short_tmp: Path) -> None:
    size = 64 << 20
    pool = short_tmp / "pool"
    daemon = start_daemon(pool)
    proc: subprocess.Popen[str] | None = None
    try:
        image, expected = _seed(daemon, size, 80, "kill")
        repo = short_tmp / "repo"
        backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
        proc = _live_restore(daemon, repo, backup_id, pace=0.5)
        _wait_attached(daemon, proc)
        written: list[tuple[int, int]] = []
        rng = random.Random("kill-rounds")
        deadline = time.monotonic() + 40
        rounds = 0
        while rounds < 6 and time.monotonic() < deadline and isinstance(_mark(daemon), dict):
            rounds += 1
            asyncio.run(_writes(daemon, rng, expected, 25, written))
            if rounds == 3:
                # The restoring process dies too: running it again resumes (never restarts).
                proc.kill()
                proc.wait()
                attached = daemon.log_text().count("live restore source attached")
                proc = _live_restore(daemon, repo, backup_id, pace=0.5)
                wait_until = time.monotonic() + 60
                while daemon.log_text().count("live restore source attached") == attached:
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < wait_until, "the restore did not resume"
                    time.sleep(0.05)
            daemon.stop(signal.SIGKILL)
            daemon = start_daemon(pool)
            # Everything written so far, and some chunks not filled yet (those wait for the
            # source to come back); not everything, which would fill it all at once.
            some = [(rng.randrange(size // CHUNK) * CHUNK, CHUNK) for _ in range(8)]
            asyncio.run(_check(daemon, expected, written + some))
        assert rounds >= 2, "the live restore ended before the daemon could be killed twice"
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (out, err)
        assert _mark(daemon) is None
        got = read_image(daemon, "new")
        assert got == expected, _first_difference(got, expected)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        daemon.stop()
