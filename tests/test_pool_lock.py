"""One pool, one daemon: a second ``owm serve`` on the same pool is refused before it touches it.

Real daemon subprocesses: B is started while A serves, and while A is still opening (A is stopped
with SIGSTOP right after it took the lock, in the middle of recovering a pool with many volumes).
B must exit 1 with one sentence naming the pool and A's pid, and every file of the pool (A's
sockets, the catalog, the tables) must be exactly as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import OWM, REPO, Daemon, cli_env, start_daemon

from owm.nbd.client import NbdClient


def snapshot(pool: Path) -> dict[str, tuple[str, int, str]]:
    """Every file of the pool: kind, mode and content hash (sockets by inode)."""
    out: dict[str, tuple[str, int, str]] = {}
    for path in sorted(pool.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(pool))
        if path.is_socket():
            out[rel] = ("socket", st.st_mode, str(st.st_ino))
        elif path.is_file():
            out[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir", st.st_mode, "")
    return out


def second_daemon(pool: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OWM, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        env=cli_env(), cwd=REPO,
    )


def assert_refused(result: subprocess.CompletedProcess[str], pool: Path, pid: int) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(pool) in lines[0] and f"pid {pid}" in lines[0], lines[0]


async def _write(daemon: Daemon, export: str, data: bytes) -> None:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    await client.write(0, data)
    await client.flush()
    await client.disconnect()


async def _read(daemon: Daemon, export: str, n: int) -> bytes:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    data = await client.read(0, n)
    await client.disconnect()
    return data


def test_second_daemon_is_refused_while_the_first_serves(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    a = start_daemon(pool)
    try:
        assert a.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
        asyncio.run(_write(a, "v", b"a" * 4096))
        assert a.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
        before = snapshot(pool)
        assert_refused(second_daemon(pool), pool.absolute(), a.proc.pid)
        assert snapshot(pool) == before
        # A still serves on the same sockets, the image is as it was.
        assert a.api("GET", "/v1/health")[0] == 200
        assert asyncio.run(_read(a, "v@0", 4096)) == b"a" * 4096
    finally:
        assert a.stop() == 0, a.log_text()
    # Once A is gone the pool is free again.
    c = start_daemon(pool)
    assert c.stop() == 0, c.log_text()


def test_second_daemon_is_refused_while_the_first_is_still_opening(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    first = start_daemon(pool)
    volumes = 60
    try:
        for i in range(volumes):
            name = f"v{i}"
            assert first.api("POST", "/v1/volumes", {"name": name, "size": "1M",
                                                     "chunk_size": "4K"})[0] == 201
            asyncio.run(_write(first, name, bytes([i + 1]) * 8192))
            assert first.api("POST", f"/v1/volumes/{name}/preserve", {})[0] == 201
    finally:
        first.stop(signal.SIGKILL)  # A will have to recover the pool: a slow opening
    log = pool.parent / "a.log"
    with open(log, "wb") as out:
        a = subprocess.Popen(
            [*OWM, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=cli_env(), cwd=REPO,
        )
    daemon = Daemon(pool, a, log)
    try:
        lock = pool / "lock"
        deadline = time.monotonic() + 30
        while True:  # stop A the moment it holds the lock (or starts recovering): it is opening
            try:
                text = lock.read_text()
            except FileNotFoundError:
                text = ""
            if text.strip() == str(a.pid) or "recovering" in log.read_text():
                os.kill(a.pid, signal.SIGSTOP)
                break
            assert a.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.0005)
        ready_when_stopped = "serving pool" in log.read_text()
        before = snapshot(pool)
        assert_refused(second_daemon(pool), pool.absolute(), a.pid)
        assert snapshot(pool) == before
        os.kill(a.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = daemon.api("GET", "/v1/health")
                if status == 200:
                    daemon.health = health
                    break
            except OSError:
                pass
            assert a.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        status, body = daemon.api("GET", "/v1/volumes")
        assert status == 200
        assert len(body["volumes"] if isinstance(body, dict) else body) == volumes
        for i in (0, volumes - 1):
            got = asyncio.run(_read(daemon, f"v{i}@0", 8192))
            assert got == bytes([i + 1]) * 8192
    finally:
        with_cont = a.poll() is None
        if with_cont:
            os.kill(a.pid, signal.SIGCONT)
        assert daemon.stop() == 0, daemon.log_text()
    # The opening was really under way when B came (else this test proves less than it says).
    assert not ready_when_stopped, daemon.log_text()
