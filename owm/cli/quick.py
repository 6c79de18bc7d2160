"""A small blocking client of the control API over POOL/control.sock, for quick commands.

``owm status`` or ``owm preserve`` is one request and one answer. Importing aiohttp and asyncio
to send it costs several times more than the rest of the command, so these commands speak
HTTP/1.1 over the Unix socket themselves with the standard library's ``socket`` and ``json``:
one request per connection (``Connection: close``), a JSON body, a JSON answer with a
Content-Length (or chunked). Failures are the same sentences as ``owm.control.client``'s:
``DaemonNotRunning`` when nothing answers, ``QuickError`` (with the HTTP status) when the
daemon refused. Commands that show live progress while they wait keep the asyncio client.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

from owm.common.errors import DaemonNotRunning, InvalidRequest, OwmError

JSON = dict[str, Any]
MAX_UNIX_PATH = 107  # sun_path, without its terminating NUL
MAX_ANSWER = 64 * 1024 * 1024  # a status of many volumes is big; anything past this is a bug


class QuickError(OwmError):
    """The daemon answered with an error; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _q(name: str) -> str:
    return quote(name, safe="@")


class QuickClient:
    """Blocking requests to the daemon of ``pool``; no connection is kept between them."""

    def __init__(self, pool: Path, connect_timeout: float = 5.0) -> None:
        self.pool = pool.absolute()
        self.socket_path = self.pool / "control.sock"
        self.connect_timeout = connect_timeout

    def _connect(self) -> socket.socket:
        path = os.fsencode(self.socket_path)
        if len(path) > MAX_UNIX_PATH:
            raise InvalidRequest(
                f"the socket path {self.socket_path} is {len(path)} bytes long, over the "
                f"{MAX_UNIX_PATH} that Unix sockets allow; use a shorter pool directory")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(path)
        except PermissionError:
            sock.close()
            raise QuickError(f"the control socket of {self.pool} is not yours to use "
                             "(permission denied); run this as the daemon's user", 403) from None
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise QuickError(f"the daemon of {self.pool} did not answer in time",
                                 504) from None
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise DaemonNotRunning(
                    f"No owm daemon is running for pool {self.pool}; "
                    f"start one with 'owm --pool {shlex.quote(str(self.pool))} serve'"
                ) from None
            raise QuickError(f"cannot reach the daemon of {self.pool}: {exc.strerror}",
                             502) from None
        return sock

    def request(
        self, method: str, path: str, body: JSON | None = None, timeout: float | None = 30.0
    ) -> Any:
        """Send one request and return the decoded JSON answer, or raise an OwmError."""
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", "Host: owm", "Connection: close",
                "Accept: application/json", f"Content-Length: {len(data)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        sock = self._connect()
        try:
            sock.settimeout(timeout)
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
            status, raw = _read_answer(sock)
        except TimeoutError:
            raise QuickError(f"the daemon of {self.pool} did not answer in time", 504) from None
        except (ConnectionError, EOFError):
            raise QuickError(f"the daemon of {self.pool} closed the connection before "
                             "answering (did it stop?)", 503) from None
        finally:
            sock.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            raise QuickError(f"the daemon answered {status} with something that is not JSON",
                             status) from None
        if status >= 400:
            said = answer.get("error") if isinstance(answer, dict) else None
            raise QuickError(str(said or f"the daemon refused the request ({status})"), status)
        return answer

    # One method per endpoint, as in owm.control.client.ControlClient.

    def health(self) -> JSON:
        result: JSON = self.request("GET", "/v1/health", timeout=10)
        return result

    def volumes(self) -> list[JSON]:
        result: list[JSON] = self.request("GET", "/v1/volumes")
        return result

    def volume(self, name: str) -> JSON:
        result: JSON = self.request("GET", f"/v1/volumes/{_q(name)}")
        return result

    def create_volume(self, name: str, size: int, **options: Any) -> JSON:
        body = {"name": name, "size": size, **{k: v for k, v in options.items() if v is not None}}
        result: JSON = self.request("POST", "/v1/volumes", body, timeout=120)
        return result

    def delete_volume(self, name: str, force: bool = False) -> JSON:
        result: JSON = self.request("DELETE", f"/v1/volumes/{_q(name)}", {"force": force},
                                    timeout=120)
        return result

    def preserve(self, name: str, instant: bool = False) -> JSON:
        result: JSON = self.request("POST", f"/v1/volumes/{_q(name)}/preserve",
                                    {"instant": instant}, timeout=120)
        return result

    def image(self, image: str) -> JSON:
        result: JSON = self.request("GET", f"/v1/images/{_q(image)}")
        return result

    def wait(self, image: str, timeout: float | None = None) -> JSON:
        result: JSON = self.request("POST", f"/v1/images/{_q(image)}/wait", {"timeout": timeout},
                                    timeout=None if timeout is None else timeout + 30)
        return result

    def cutover(self, image: str) -> JSON:
        result: JSON = self.request("POST", f"/v1/images/{_q(image)}/cutover", timeout=120)
        return result

    def release(self, image: str) -> JSON:
        result: JSON = self.request("POST", f"/v1/images/{_q(image)}/release", timeout=None)
        return result


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer on a connection the server closes after it."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
        if len(buf) > 1 << 20:
            raise QuickError("the daemon's answer has an oversized header", 502)
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    rest = bytes(buf[end + 4:])
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise QuickError(f"the daemon answered something that is not HTTP: {lines[0][:60]!r}", 502)
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        key, _, val = line.partition(":")
        headers[key.strip().lower()] = val.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return status, _dechunk(sock, rest)
    length = headers.get("content-length")
    want = int(length) if length and length.isdigit() else None
    if want is not None and want > MAX_ANSWER:
        raise QuickError("the daemon's answer is too large", 502)
    body = bytearray(rest)
    while want is None or len(body) < want:
        chunk = sock.recv(max(65536, (want or 0) - len(body)))
        if not chunk:
            if want is not None:
                raise EOFError
            break
        body += chunk
        if len(body) > MAX_ANSWER:
            raise QuickError("the daemon's answer is too large", 502)
    return status, bytes(body if want is None else body[:want])


def _dechunk(sock: socket.socket, rest: bytes) -> bytes:
    """The body of a chunked answer (everything up to the close, then decoded)."""
    data = bytearray(rest)
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_ANSWER:
            raise QuickError("the daemon's answer is too large", 502)
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise EOFError
        size = int(bytes(data[pos:eol]).split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(body)
        body += data[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2
