"""Binding the control application to its listeners: a 0600 Unix socket, optionally TCP.

The Unix socket is the normal way in; only the pool's owner can connect to it. The TCP
listener is for remote orchestration and runs a second copy of the application that refuses
every request without the bearer token read from a file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from aiohttp import web

from owm.common.errors import InvalidRequest, WrongState
from owm.control.app import create_app
from owm.control.context import ControlContext

# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_UNIX_PATH = 107


def check_unix_path(path: Path) -> None:
    """Unix socket paths are short; say so plainly instead of failing in bind()."""
    length = len(os.fsencode(path))
    if length > MAX_UNIX_PATH:
        raise InvalidRequest(
            f"the socket path {path} is {length} bytes long, over the {MAX_UNIX_PATH} that Unix "
            "sockets allow; use a shorter pool directory"
        )


def socket_in_use(path: Path) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def bind_private_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` readable and writable by its owner only.

    The umask is narrowed around bind() so the socket is never reachable by others, not even
    for the instant before a chmod. A stale socket file left by a crashed daemon is replaced;
    a live one is refused.
    """
    check_unix_path(path)
    if socket_in_use(path):
        raise WrongState(f"another process is already listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise InvalidRequest(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def read_token_file(path: Path) -> str:
    """The bearer token: the file's content without surrounding whitespace, never empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise InvalidRequest(f"the token file {path} is empty")
    return token


class ControlServer:
    """The control API's listeners for one daemon."""

    def __init__(self, ctx: ControlContext, shutdown_timeout: float = 5.0) -> None:
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.unix_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._runners: list[web.AppRunner] = []

    async def start(
        self,
        unix_path: Path,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
    ) -> None:
        """Listen on ``unix_path`` and, given ``tcp`` (which needs ``token``), on TCP too."""
        if tcp is not None and not token:
            raise InvalidRequest("a TCP control listener needs a bearer token file")
        sock = bind_private_unix_socket(unix_path)
        self.unix_path = unix_path
        try:
            runner = await self._runner(create_app(self.ctx))
            if tcp is not None:
                tcp_runner = await self._runner(create_app(self.ctx, token=token))
                site = web.TCPSite(tcp_runner, tcp[0], tcp[1], reuse_address=True)
                try:
                    await site.start()
                except OSError as exc:
                    raise InvalidRequest(
                        f"cannot listen for control requests on {tcp[0]}:{tcp[1]}: {exc.strerror}"
                    ) from None
                host, port = tcp_runner.addresses[0][:2]
                self.tcp_address = (str(host), int(port))
            # The Unix socket last: a client that sees it answer (GET /v1/health) must find
            # every listener's address already known.
            await web.SockSite(runner, sock).start()
        except BaseException:
            await self.stop()
            raise

    async def _runner(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout,
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def stop(self) -> None:
        """Stop listening, end long waits, let requests in flight finish, remove the socket."""
        self.ctx.closing.set()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()
            self.unix_path = None
