"""Shared fixtures: a real ``owm serve`` on a throw-away pool, and the CLI run as a subprocess.

The daemon runs as its own process exactly as a user starts it (``python -m owm serve``) with
NBD on a free loopback port and on POOL/nbd.sock. Every fixture stops what it started: the
daemon with SIGTERM (its clean shutdown is part of what is tested), helpers with a kill.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["etcd_fixtures", "ceph_fixtures"]  # throw-away etcd and Ceph of the run

REPO = Path(__file__).resolve().parent.parent
OWM = [sys.executable, "-m", "owm"]
START_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OWM_POOL"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_owm(
    *args: str | Path,
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; stdout and stderr captured, stdin closed."""
    return subprocess.run(
        [*OWM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env or cli_env(),
        cwd=cwd or REPO,
    )


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket, to poke the control API without the project's client."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.unix_path))
        self.sock = sock


def http_call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON or None)."""
    payload = json.dumps(body).encode() if isinstance(body, dict | list) else body
    try:
        conn.request(method, path, body=payload, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None


@dataclass
class Daemon:
    """A running ``owm serve`` and how to talk to it."""

    pool: Path
    proc: subprocess.Popen[bytes]
    log: Path
    health: dict[str, Any] = field(default_factory=dict)

    @property
    def control_socket(self) -> Path:
        return self.pool / "control.sock"

    @property
    def nbd_socket(self) -> Path:
        return Path(self.health["nbd"]["unix"])

    @property
    def nbd_tcp(self) -> str:
        return str(self.health["nbd"]["tcp"])

    def api(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        return http_call(UnixHTTPConnection(self.control_socket), method, path, body, headers)

    def owm(
        self, *args: str | Path, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run_owm("--pool", self.pool, *args, timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                message = f"the daemon ignored {sig} for {timeout}s:\n{self.log_text()}"
                raise AssertionError(message) from None
        return int(self.proc.returncode)


def start_daemon(pool: Path, *extra: str | Path) -> Daemon:
    """Start ``owm serve`` on ``pool`` and wait until its control API answers."""
    pool.parent.mkdir(parents=True, exist_ok=True)
    log = pool.parent / f"daemon-{int(time.time() * 1000)}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*OWM, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0", *map(str, extra)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=REPO,
        )
    daemon = Daemon(pool, proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"owm serve exited with {proc.returncode}:\n{daemon.log_text()}")
        try:
            status, health = daemon.api("GET", "/v1/health")
            if status == 200:
                daemon.health = health
                return daemon
        except OSError:
            pass
        if time.monotonic() > deadline:
            daemon.stop(signal.SIGKILL)
            message = f"owm serve did not answer in {START_TIMEOUT}s:\n{daemon.log_text()}"
            raise AssertionError(message)
        time.sleep(0.05)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="owm-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A running daemon on a fresh pool; stopped with SIGTERM afterwards, which must succeed."""
    d = start_daemon(short_tmp / "pool")
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"owm serve exited with {code} on SIGTERM:\n{d.log_text()}"


HOLDER = r"""
import asyncio, sys
from owm.nbd.client import NbdClient

async def main():
    client = await NbdClient.connect(export=sys.argv[1], unix_path=sys.argv[2])
    await client.write(0, b"h" * 4096)
    await client.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await client.disconnect()
    print("done", flush=True)

asyncio.run(main())
"""


class SessionHolder:
    """A separate process holding one NBD session open until told to disconnect."""

    def __init__(self, daemon: Daemon, export: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, export, str(daemon.nbd_socket)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the session holder failed: {line!r} {err}")

    def disconnect(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"
        self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def hold_session() -> Iterator[Any]:
    """``hold_session(daemon, "vol")`` opens a session in another process; all are ended after."""
    holders: list[SessionHolder] = []

    def start(daemon: Daemon, export: str) -> SessionHolder:
        holder = SessionHolder(daemon, export)
        holders.append(holder)
        return holder

    try:
        yield start
    finally:
        for holder in holders:
            holder.kill()
