"""Telling a service manager how the daemon is doing: sd_notify and a ready file.

The sd_notify protocol is one datagram of ``KEY=VALUE`` lines sent to the Unix datagram socket
named by ``$NOTIFY_SOCKET`` (a path, or an abstract name when it starts with ``@``). ``owm serve``
sends ``READY=1`` once every listener serves, ``STOPPING=1`` when it starts shutting down and,
when the manager asked for a watchdog (``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` is ours or
unset), ``WATCHDOG=1`` at half that interval from the event loop, so a hung loop stops the pings.

Without systemd, ``--ready-file PATH`` does the same job for scripts: the file appears (written
atomically, holding the pid) once the daemon is ready and is removed when it starts stopping.
A notification that cannot be sent is logged once and never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from owm.common.files import write_atomically

log = logging.getLogger("owm.daemon.notify")


class Notifier:
    """Sends sd_notify datagrams when ``$NOTIFY_SOCKET`` is set; does nothing otherwise."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = self._address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = self._watchdog(env)
        self._warned = False

    @staticmethod
    def _address(name: str) -> str | None:
        if not name:
            return None
        if name.startswith("@"):  # an abstract socket: a leading NUL instead of the @
            return "\0" + name[1:]
        return name if name.startswith("/") else None

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> float | None:
        """Seconds between watchdog pings: half of WATCHDOG_USEC, if the watchdog is ours."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and (not pid.isdigit() or int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``fields`` (``"READY=1"``, ...); True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager on %s: %s",
                            self.address.replace("\0", "@"), exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing requests in flight")

    async def watchdog(self) -> None:
        """Ping the watchdog until cancelled (nothing to do without a watchdog)."""
        if self.watchdog_interval is None or self.address is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


def write_ready_file(path: Path) -> None:
    """Create ``path`` (holding our pid) once the daemon serves, whole or not at all."""
    write_atomically(path, f"{os.getpid()}\n".encode())


def remove_ready_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
