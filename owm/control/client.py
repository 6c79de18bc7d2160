"""The control API's client, used by the CLI, the demo and the tests.

It speaks to ``POOL/control.sock`` (or a TCP URL with a bearer token) and turns every failure
into an ``OwmError`` with a plain sentence: ``DaemonNotRunning`` when nothing answers on the
socket, ``ControlError`` (carrying the HTTP status) when the daemon refused the request.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from owm.common.errors import DaemonNotRunning, OwmError
from owm.control.server import check_unix_path

JSON = dict[str, Any]
__all__ = ["ControlClient", "ControlError", "DaemonNotRunning"]


class ControlError(OwmError):
    """The daemon answered with an error; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def control_socket(pool: Path) -> Path:
    return pool / "control.sock"


def not_running_message(pool: Path) -> str:
    return (
        f"No owm daemon is running for pool {pool}; "
        f"start one with 'owm --pool {shlex.quote(str(pool))} serve'"
    )


class ControlClient:
    """One connection pool to one daemon; use as ``async with ControlClient(pool) as c:``."""

    def __init__(
        self,
        pool: Path | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if (pool is None) == (url is None):
            raise ValueError("give exactly one of pool or url")
        self.pool = pool.absolute() if pool is not None else None
        self._url = url.rstrip("/") if url is not None else "http://owm"
        self._token = token
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _where(self) -> str:
        return str(self.pool) if self.pool is not None else self._url

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self.pool is not None:
                check_unix_path(control_socket(self.pool))
                connector = aiohttp.UnixConnector(path=str(control_socket(self.pool)))
            else:
                connector = aiohttp.TCPConnector()
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    async def request(
        self, method: str, path: str, body: JSON | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return the decoded JSON answer, or raise an OwmError."""
        session = self._open()
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect_timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with session.request(
                method, self._url + path, data=data, headers=headers, timeout=limits
            ) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PermissionError):
                message = (f"the control socket of {self._where()} is not yours to use "
                           "(permission denied); run this as the daemon's user")
                raise ControlError(message, 403) from None
            if self.pool is not None:
                raise DaemonNotRunning(not_running_message(self.pool)) from None
            where = f"No owm daemon answers at {self._url} ({exc.strerror})"
            raise DaemonNotRunning(where) from None
        except aiohttp.ServerDisconnectedError:
            raise ControlError(
                f"the daemon of {self._where()} closed the connection before answering "
                "(did it stop?)", 503
            ) from None
        except TimeoutError:
            message = f"the daemon of {self._where()} did not answer in time"
            raise ControlError(message, 504) from None
        except aiohttp.ClientError as exc:
            message = f"talking to the daemon of {self._where()} failed: {exc}"
            raise ControlError(message, 502) from None
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            raise ControlError(f"the daemon answered {status} with something that is not JSON",
                               status) from None
        if status >= 400:
            said = answer.get("error") if isinstance(answer, dict) else None
            raise ControlError(str(said or f"the daemon refused the request ({status})"), status)
        return answer

    # One method per endpoint; each returns the decoded JSON.

    async def health(self) -> JSON:
        result: JSON = await self.request("GET", "/v1/health", timeout=10)
        return result

    async def volumes(self) -> list[JSON]:
        result: list[JSON] = await self.request("GET", "/v1/volumes", timeout=30)
        return result

    async def volume(self, name: str) -> JSON:
        result: JSON = await self.request("GET", f"/v1/volumes/{_q(name)}", timeout=30)
        return result

    async def create_volume(self, name: str, size: int | str, **options: Any) -> JSON:
        body = {"name": name, "size": size, **{k: v for k, v in options.items() if v is not None}}
        result: JSON = await self.request("POST", "/v1/volumes", body)
        return result

    async def delete_volume(self, name: str, force: bool = False) -> JSON:
        """Delete a volume; with ``force`` even while preserved images exist."""
        result: JSON = await self.request("DELETE", f"/v1/volumes/{_q(name)}", {"force": force})
        return result

    async def preserve(self, name: str, instant: bool = False) -> JSON:
        result: JSON = await self.request(
            "POST", f"/v1/volumes/{_q(name)}/preserve", {"instant": instant}, timeout=120
        )
        return result

    async def image(self, image: str) -> JSON:
        result: JSON = await self.request("GET", f"/v1/images/{_q(image)}", timeout=30)
        return result

    async def wait(self, image: str, timeout: float | None = None) -> JSON:
        result: JSON = await self.request(
            "POST", f"/v1/images/{_q(image)}/wait", {"timeout": timeout},
            timeout=None if timeout is None else timeout + 30,
        )
        return result

    async def cutover(self, image: str) -> JSON:
        result: JSON = await self.request("POST", f"/v1/images/{_q(image)}/cutover")
        return result

    async def release(self, image: str) -> JSON:
        result: JSON = await self.request("POST", f"/v1/images/{_q(image)}/release")
        return result


def _q(name: str) -> str:
    return quote(name, safe="@")
