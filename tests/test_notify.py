"""Readiness for service managers: sd_notify to a fake notify socket, --ready-file, /v1/health.

The test binds the Unix datagram socket a service manager would, starts a real ``owm serve``
with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` pointing at it, and checks that READY=1 arrives only
when every export already answers, WATCHDOG=1 keeps coming, and SIGTERM brings STOPPING=1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from owm.control.context import ControlContext
from owm.control.metrics import health_answer
from owm.daemon.notify import Notifier
from owm.nbd.client import NbdClient
from tests.conftest import OWM, REPO, Daemon, cli_env, start_daemon

WAIT = 30.0


def receive(sock: socket.socket, until: float) -> list[str]:
    """The fields of the next datagram, or [] when ``until`` passed."""
    sock.settimeout(max(0.01, until - time.monotonic()))
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return []
    return data.decode().split("\n")


def wait_for_field(sock: socket.socket, field: str, timeout: float = WAIT) -> list[list[str]]:
    """Every datagram up to and including the first carrying ``field``."""
    until = time.monotonic() + timeout
    seen: list[list[str]] = []
    while time.monotonic() < until:
        fields = receive(sock, until)
        if fields:
            seen.append(fields)
            if field in fields:
                return seen
    raise AssertionError(f"no {field} within {timeout}s; got {seen}")


def test_ready_watchdog_and_stopping_on_a_fake_notify_socket(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    first = start_daemon(pool)
    assert first.owm("volume", "create", "v", "--size", "1M").returncode == 0
    assert first.stop() == 0

    notify_path = short_tmp / "notify"
    ready_file = short_tmp / "ready"
    ready_file.write_text("stale\n")  # left by a crash: must not say ready before we are
    log = short_tmp / "daemon.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        env = cli_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*OWM, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0",
                 "--ready-file", str(ready_file)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )
        daemon = Daemon(pool, proc, log)
        try:
            seen = wait_for_field(sock, "READY=1")
            ready = seen[-1]
            assert f"MAINPID={proc.pid}" in ready
            assert all("WATCHDOG=1" not in fields for fields in seen[:-1])
            # At READY=1 every listener already serves: no retry, no wait.
            assert ready_file.read_text().strip() == str(proc.pid)
            status, health = daemon.api("GET", "/v1/health")
            assert status == 200 and health["ready"] is True and health["status"] == "ok"
            daemon.health = health

            async def both_exports() -> None:
                tcp_host, tcp_port = daemon.nbd_tcp.rsplit(":", 1)
                for client in (
                    await NbdClient.connect(export="v", unix_path=str(daemon.nbd_socket)),
                    await NbdClient.connect(export="v", host=tcp_host, port=int(tcp_port)),
                ):
                    assert client.size == 1024 * 1024
                    await client.disconnect()

            asyncio.run(both_exports())
            # The watchdog is pinged while the daemon runs (every 0.1 s here).
            wait_for_field(sock, "WATCHDOG=1", timeout=10)
            wait_for_field(sock, "WATCHDOG=1", timeout=10)
            proc.send_signal(signal.SIGTERM)
            wait_for_field(sock, "STOPPING=1")
            assert proc.wait(timeout=WAIT) == 0, daemon.log_text()
            assert not ready_file.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_notifier_reads_the_environment(short_tmp: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).send("READY=1") is False
    assert Notifier({"NOTIFY_SOCKET": "@owm-test"}).address == "\0owm-test"
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).address is None
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000"}
    assert Notifier(mine).watchdog_interval == 1.5
    assert Notifier({**mine, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.5
    # A watchdog meant for another process (our parent's) is not ours to ping.
    assert Notifier({**mine, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier({**mine, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    # Nobody listening: the daemon carries on (the failure is logged, not raised).
    assert Notifier({"NOTIFY_SOCKET": str(short_tmp / "nobody")}).send("READY=1") is False


def test_health_is_ready_only_when_serving() -> None:
    ctx = ControlContext(pool=None)  # type: ignore[arg-type]
    ctx.daemon["ready"] = False
    assert health_answer(ctx).status == 503
    ctx.daemon["ready"] = True
    assert health_answer(ctx).status == 200
    ctx.closing.set()
    assert health_answer(ctx).status == 503


def test_ready_file_in_a_missing_directory_is_one_sentence(short_tmp: Path) -> None:
    from tests.conftest import run_owm

    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "127.0.0.1:0",
                     "--ready-file", short_tmp / "no" / "such" / "ready", timeout=WAIT)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "ready file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
