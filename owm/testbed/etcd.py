"""A throw-away single-member etcd on 127.0.0.1, in a temporary directory.

``start()`` runs Debian's ``etcd`` (package ``etcd-server``) on two free loopback ports (client
and peer) with its data directory in a fresh temporary directory (under ``/dev/shm`` when there
is one, so that etcd's fsyncs cost nothing in tests) and returns once ``/health`` answers.
``stop()`` ends it with SIGTERM, ``kill()`` with SIGKILL, ``restart()`` starts it again on the
same ports and data directory (what a client sees as "etcd went away and came back"), and
``close()`` stops it and removes the directory. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from owm.common.errors import OwmError

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class EtcdUnavailable(OwmError):
    """No ``etcd`` binary here, or it did not become ready in time."""


def etcd_binary() -> str | None:
    """The ``etcd`` executable, or None when the package is not installed."""
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd process and its directory; see the module docstring."""

    def __init__(self, base: Path, binary: str, *, quota_bytes: int | None = None) -> None:
        self.base = base
        self.binary = binary
        self.quota_bytes = quota_bytes
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = base / "data"
        self.log_path = base / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _spawn(self) -> None:
        args = [
            self.binary, "--name", "owm-test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"owm-test={self.peer_url}",
            "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
        ]
        if self.quota_bytes is not None:
            args += ["--quota-backend-bytes", str(self.quota_bytes)]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=0.5) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdUnavailable(
                    f"etcd exited with {self.proc.returncode} at start; see {self.log_path}")
            if time.monotonic() > deadline:
                self.kill()
                raise EtcdUnavailable(f"etcd did not become ready in {timeout:.0f} s; "
                                      f"see {self.log_path}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _end(self, sig: int) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, bounded; SIGKILL if it does not go."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (SIGKILL with ``hard``) and start again on the same ports and data directory."""
        if hard:
            self.kill()
        else:
            self.stop()
        self._spawn()

    def start_again(self) -> None:
        """Start a stopped server again (same ports, same data)."""
        if not self.running:
            self._spawn()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(*, quota_bytes: int | None = None, base: Path | None = None) -> EtcdServer:
    """A fresh etcd on loopback, ready to serve; raises EtcdUnavailable if it cannot be had."""
    binary = etcd_binary()
    if binary is None:
        raise EtcdUnavailable("etcd is not installed (Debian package etcd-server; "
                              "scripts/setup installs it)")
    if base is None:
        parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else None
        base = Path(tempfile.mkdtemp(prefix="owm-etcd-", dir=parent))
    server = EtcdServer(base, binary, quota_bytes=quota_bytes)
    try:
        server._spawn()
    except BaseException:
        server.close()
        raise
    return server
