"""The control API over its real sockets: answers, and a 4xx sentence for every bad request.

Most tests talk to a real ``owm serve`` (see conftest). A few serve the control application
alone over a real Unix socket in front of a scripted pool, to reach paths a real pool makes
hard to hit on demand: a bug inside the pool (a JSON 500, never a hang or an HTML page), a
shutdown while a client waits, release progress.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    OWM,
    Daemon,
    UnixHTTPConnection,
    cli_env,
    http_call,
    run_owm,
    start_daemon,
)

from owm.common.errors import NotFound, WrongState
from owm.control.app import ROUTE_TABLES
from owm.control.client import ControlClient, ControlError, DaemonNotRunning
from owm.control.context import ControlContext
from owm.control.openapi import openapi_document
from owm.control.server import ControlServer

JSON = dict[str, Any]


def assert_error(status: int, body: Any, expected: int) -> str:
    """The answer is ``expected`` and carries one plain sentence."""
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message
    assert "Traceback" not in message
    return message


def create(daemon: Daemon, name: str = "vol", size: str = "16M", **extra: Any) -> JSON:
    status, body = daemon.api("POST", "/v1/volumes", {"name": name, "size": size, **extra})
    assert status == 201, body
    assert isinstance(body, dict)
    return body


# ---------------------------------------------------------------------------------------------
# Against a real daemon


def test_health_and_socket_mode(daemon: Daemon) -> None:
    status, health = daemon.api("GET", "/v1/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["pool"] == str(daemon.pool.absolute())
    assert health["pid"] == daemon.proc.pid
    assert health["nbd"]["unix"].endswith("nbd.sock")
    assert health["nbd"]["tcp"].startswith("127.0.0.1:")
    mode = stat.S_IMODE(os.stat(daemon.control_socket).st_mode)
    assert mode == 0o600, oct(mode)


def test_openapi_document_covers_every_route(daemon: Daemon) -> None:
    status, doc = daemon.api("GET", "/v1/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    routed = {
        (r.method.lower(), r.path)
        for table in ROUTE_TABLES
        for r in table
        if isinstance(r, aiohttp.web.RouteDef)
    }
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routed == documented
    assert doc == openapi_document()


def test_volume_lifecycle(daemon: Daemon) -> None:
    body = create(daemon, "vol", "16M", chunk_size="4K")
    assert body["name"] == "vol"
    assert body["size"] == 16 << 20
    assert body["chunk_size"] == 4096
    status, listed = daemon.api("GET", "/v1/volumes")
    assert status == 200 and [v["name"] for v in listed] == ["vol"]
    status, shown = daemon.api("GET", "/v1/volumes/vol")
    assert status == 200 and shown["name"] == "vol"
    status, deleted = daemon.api("DELETE", "/v1/volumes/vol")
    assert status == 200 and deleted == {"deleted": "vol"}
    assert_error(*daemon.api("GET", "/v1/volumes/vol"), 404)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"vol"', "JSON object"),
        ({"size": "1G"}, "'name'"),
        ({"name": "vol"}, "'size'"),
        ({"name": 7, "size": "1G"}, "'name'"),
        ({"name": "vol", "size": "12Q"}, "not a size"),
        ({"name": "vol", "size": -5}, "negative"),
        ({"name": "vol", "size": 0}, "greater than zero"),
        ({"name": "vol", "size": True}, "'size'"),
        ({"name": "vol", "size": "1G", "method": "raid5"}, "'method'"),
        ({"name": "vol", "size": "1G", "legs": 0}, "'legs'"),
        ({"name": "vol", "size": "1G", "legs": "two"}, "'legs'"),
        ({"name": "vol", "size": "1G", "chunk_size": "3K"}, ""),
        ({"name": "vol", "size": "1G", "sise": 5}, "unknown field 'sise'"),
        ({"name": "a@1", "size": "1G"}, "'@'"),
        ({"name": "", "size": "1G"}, ""),
    ],
)
def test_create_volume_bad_requests_are_400(daemon: Daemon, body: Any, fragment: str) -> None:
    message = assert_error(*daemon.api("POST", "/v1/volumes", body), 400)
    assert fragment in message
    status, listed = daemon.api("GET", "/v1/volumes")
    assert status == 200 and listed == []


def test_duplicate_volume_is_409(daemon: Daemon) -> None:
    create(daemon, "vol")
    message = assert_error(*daemon.api("POST", "/v1/volumes", {"name": "vol", "size": "1M"}), 409)
    assert "vol" in message


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/volumes/nope", None),
        ("DELETE", "/v1/volumes/nope", None),
        ("POST", "/v1/volumes/nope/preserve", {}),
        ("GET", "/v1/images/nope@0", None),
        ("POST", "/v1/images/nope@0/wait", {"timeout": 1}),
        ("POST", "/v1/images/nope@0/cutover", None),
        ("POST", "/v1/images/nope@0/release", None),
        ("GET", "/v1/images/vol@7", None),
        ("POST", "/v1/images/vol@7/release", None),
    ],
)
def test_unknown_volumes_and_images_are_404(
    daemon: Daemon, method: str, path: str, body: JSON | None
) -> None:
    create(daemon, "vol")
    message = assert_error(*daemon.api(method, path, body), 404)
    assert "nope" in message or "vol@7" in message


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/v1/images/vol", None, 400),
        ("GET", "/v1/images/vol@x", None, 400),
        ("POST", "/v1/images/vol@/wait", {}, 400),
        ("POST", "/v1/volumes/vol/preserve", b"{", 400),
        ("POST", "/v1/volumes/vol/preserve", {"instant": "yes"}, 400),
        ("POST", "/v1/volumes/vol/preserve", {"now": True}, 400),
        ("POST", "/v1/images/vol@0/wait", {"timeout": -1}, 400),
        ("POST", "/v1/images/vol@0/wait", {"timeout": "soon"}, 400),
        ("POST", "/v1/images/vol@0/cutover", {"force": True}, 400),
        ("DELETE", "/v1/volumes/vol", b"not json", 400),
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v2", None, 404),  # "/" is the dashboard now
        ("PUT", "/v1/volumes", {}, 405),
        ("PATCH", "/v1/volumes/vol", {}, 405),
    ],
)
def test_malformed_requests_get_a_sentence(
    daemon: Daemon, method: str, path: str, body: Any, expected: int
) -> None:
    create(daemon, "vol")
    assert_error(*daemon.api(method, path, body), expected)


def test_wrong_states_are_409(daemon: Daemon, hold_session: Callable[..., Any]) -> None:
    create(daemon, "vol")
    holder = hold_session(daemon, "vol")
    status, preserved = daemon.api("POST", "/v1/volumes/vol/preserve", {})
    assert status == 201 and preserved["image"] == "vol@0"
    assert preserved["status"]["state"] == "draining"

    status, image = daemon.api("GET", "/v1/images/vol@0")
    assert status == 200 and image["sessions_left"] == 1
    assert len(image["holding"]) == 1 and image["holding"][0]["generation"] == 0

    message = assert_error(*daemon.api("POST", "/v1/images/vol@0/release"), 409)
    assert "vol@0" in message or "drain" in message
    assert_error(*daemon.api("DELETE", "/v1/volumes/vol"), 409)

    status, waited = daemon.api("POST", "/v1/images/vol@0/wait", {"timeout": 0.2})
    assert status == 200 and waited["drained"] is False and len(waited["holding"]) == 1

    holder.disconnect()
    status, waited = daemon.api("POST", "/v1/images/vol@0/wait", {"timeout": 20})
    assert status == 200 and waited["drained"] is True
    status, released = daemon.api("POST", "/v1/images/vol@0/release")
    assert status == 200 and released["released"] is True
    assert_error(*daemon.api("GET", "/v1/images/vol@0"), 404)
    assert_error(*daemon.api("POST", "/v1/images/vol@0/release"), 404)


def test_cutover_rebinds_and_image_is_crash_consistent(
    daemon: Daemon, hold_session: Callable[..., Any]
) -> None:
    create(daemon, "vol")
    hold_session(daemon, "vol")
    assert daemon.api("POST", "/v1/volumes/vol/preserve")[0] == 201
    status, result = daemon.api("POST", "/v1/images/vol@0/cutover")
    assert status == 200, result
    assert len(result["rebound"]) == 1
    status, waited = daemon.api("POST", "/v1/images/vol@0/wait", {"timeout": 10})
    assert status == 200 and waited["drained"] is True
    assert waited["status"]["consistency"] == "crash-consistent"


def test_no_request_makes_a_500(daemon: Daemon) -> None:
    create(daemon, "vol")
    garbage: list[tuple[str, str, Any]] = [
        ("POST", "/v1/volumes", {"name": "x" * 5000, "size": "1M"}),
        ("POST", "/v1/volumes", {"name": "a/b", "size": "1M"}),
        ("POST", "/v1/volumes", {"name": "big", "size": "99999999T"}),
        ("POST", "/v1/volumes", {"name": "c", "size": "1M", "chunk_size": 7}),
        ("POST", "/v1/volumes", {"name": "d", "size": "1M", "chunk_size": "4G"}),
        ("POST", "/v1/volumes", {"name": "e", "size": 1.5}),
        ("POST", "/v1/volumes", {"name": "f", "size": "1M", "method": "mirror", "legs": 10**9}),
        ("POST", "/v1/volumes", b"\x00" * 100),
        ("POST", "/v1/volumes", b"null"),
        ("GET", "/v1/volumes/%00", None),
        ("GET", "/v1/images/%40%40", None),
        ("POST", "/v1/images/vol@99999999999999999999/wait", {"timeout": 0}),
        ("POST", "/v1/images/vol@0/wait", {"timeout": 1e308}),
        ("POST", "/v1/images/vol@0/wait", {"timeout": float("nan")}),
    ]
    for method, path, body in garbage:
        try:
            status, answer = daemon.api(method, path, body)
        except ValueError:  # json.dumps refuses NaN only in strict mode; never mind
            continue
        assert 400 <= status < 500, (method, path, body, status, answer)
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str)


def test_token_protected_tcp_listener(short_tmp: Path) -> None:
    token_file = short_tmp / "token"
    token_file.write_text("s3cret-token\n")
    d = start_daemon(
        short_tmp / "pool", "--control-listen", "127.0.0.1:0", "--control-token-file", token_file
    )
    try:
        where = d.health["control"]["tcp"]
        assert where and where.startswith("127.0.0.1:")
        host, port = where.rsplit(":", 1)

        def call(
            path: str, method: str = "GET", headers: dict[str, str] | None = None, body: Any = None
        ) -> tuple[int, Any]:
            import http.client

            return http_call(
                http.client.HTTPConnection(host, int(port), timeout=10), method, path, body, headers
            )

        for path in ("/v1/health", "/v1/volumes", "/v1/openapi.json", "/v1/nothing"):
            assert_error(*call(path), 401)
            assert_error(*call(path, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(*call(path, headers={"Authorization": "Basic czNjcmV0"}), 401)
        assert_error(*call("/v1/volumes", "POST", body={"name": "v", "size": "1M"}), 401)
        status, listed = d.api("GET", "/v1/volumes")
        assert status == 200 and listed == []

        good = {"Authorization": "Bearer s3cret-token"}
        status, health = call("/v1/health", headers=good)
        assert status == 200 and health["status"] == "ok"
        status, _ = call("/v1/volumes", "POST", good, {"name": "v", "size": "1M"})
        assert status == 201
        assert_error(*call("/v1/nothing", headers=good), 404)

        async def through_client() -> list[JSON]:
            async with ControlClient(url=f"http://{where}", token="s3cret-token") as client:
                return await client.volumes()

        assert [v["name"] for v in asyncio.run(through_client())] == ["v"]
    finally:
        assert d.stop() == 0


def test_tcp_listener_needs_a_token(short_tmp: Path) -> None:
    result = run_owm(
        "--pool", short_tmp / "pool", "serve", "--control-listen", "127.0.0.1:0", timeout=30
    )
    assert result.returncode == 2
    assert "--control-token-file" in result.stderr and "Traceback" not in result.stderr
    empty = short_tmp / "empty"
    empty.write_text("\n")
    result = run_owm(
        "--pool",
        short_tmp / "pool",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
        "--control-token-file",
        empty,
        timeout=30,
    )
    assert result.returncode == 1
    assert "empty" in result.stderr and "Traceback" not in result.stderr


async def test_client_reports_a_missing_daemon(short_tmp: Path) -> None:
    async with ControlClient(short_tmp / "nowhere") as client:
        with pytest.raises(DaemonNotRunning, match="No owm daemon is running for pool"):
            await client.volumes()
    # A stale socket file (a daemon that crashed) is "not running" too.
    import socket

    stale = short_tmp / "stale"
    stale.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale / "control.sock"))
    sock.close()
    async with ControlClient(stale) as client:
        with pytest.raises(DaemonNotRunning):
            await client.health()


# ---------------------------------------------------------------------------------------------
# The application alone, in front of a scripted pool


class ScriptedPool:
    """Just enough of a pool to reach the control API's rarer paths."""

    def __init__(self) -> None:
        self.volumes: dict[str, JSON] = {}
        self.drained = asyncio.Event()
        self.release_gate = asyncio.Event()

    def status(self, name: str | None = None) -> list[JSON]:
        if name is not None:
            return [self.volumes[name]] if name in self.volumes else []
        return list(self.volumes.values())

    async def create_volume(
        self,
        name: str,
        size: int,
        method: str = "cow",
        chunk_size: int = 65536,
        legs: int = 2,
        enospc_policy: str = "fail-write",
    ) -> JSON:
        if name == "explode":
            raise RuntimeError("a bug in the pool")
        self.volumes[name] = {
            "name": name,
            "size": size,
            "method": method,
            "chunk_size": chunk_size,
            "legs": legs,
            "live_generation": 0,
            "generations": [],
            "images": [],
        }
        return self.volumes[name]

    async def delete_volume(self, name: str, force: bool = False) -> None:
        raise WrongState(f"volume '{name}' has open sessions")

    async def preserve(self, name: str, instant: bool = False) -> str:
        image = f"{name}@0"
        self.volumes[name]["images"].append(
            {
                "name": image,
                "generation": 0,
                "state": "draining",
                "sessions_left": 1,
                "release_progress": None,
            }
        )
        return image

    async def cutover(self, image: str) -> None:
        raise NotFound(f"no image {image}")

    async def wait_drained(self, image: str, timeout: float | None) -> bool:
        await self.drained.wait()
        return True

    async def release(self, image: str, progress: Callable[[int, int], None] | None = None) -> None:
        assert progress is not None
        progress(3, 10)
        await self.release_gate.wait()
        progress(10, 10)
        name = image.split("@")[0]
        self.volumes[name]["images"] = []


async def test_scripted_pool_paths(short_tmp: Path) -> None:
    pool = ScriptedPool()
    server = ControlServer(ControlContext(pool=pool), shutdown_timeout=2)
    await server.start(short_tmp / "control.sock")
    stopped = False
    try:
        async with ControlClient(short_tmp) as client:
            # A bug in the pool is a JSON 500 naming the daemon's log, not a dropped connection.
            with pytest.raises(ControlError, match="internal error") as raised:
                await client.create_volume("explode", "1M")
            assert raised.value.status == 500

            await client.create_volume("vol", "1M")
            with pytest.raises(ControlError, match="open sessions") as raised:
                await client.delete_volume("vol")
            assert raised.value.status == 409
            assert (await client.preserve("vol"))["image"] == "vol@0"

            # Release progress from the pool's callback shows in the image's status.
            releasing = asyncio.ensure_future(client.release("vol@0"))
            for _ in range(100):
                progress = (await client.image("vol@0")).get("release_progress")
                if progress:
                    break
                await asyncio.sleep(0.01)
            assert progress == {"done": 3, "total": 10}
            pool.release_gate.set()
            assert (await releasing)["released"] is True

            # A wait in progress when the daemon stops gets a 503 sentence, not a hang.
            await pool.preserve("vol")
            waiting = asyncio.ensure_future(client.wait("vol@0"))
            await asyncio.sleep(0.1)
            await server.stop()
            stopped = True
            with pytest.raises(ControlError, match="shutting down") as raised:
                await waiting
            assert raised.value.status == 503
    finally:
        if not stopped:
            await server.stop()
    assert not (short_tmp / "control.sock").exists()


async def test_control_socket_refuses_a_second_server(short_tmp: Path) -> None:
    first = ControlServer(ControlContext(pool=ScriptedPool()))
    await first.start(short_tmp / "control.sock")
    try:
        second = ControlServer(ControlContext(pool=ScriptedPool()))
        with pytest.raises(WrongState, match="already listening"):
            await second.start(short_tmp / "control.sock")
        status, _ = await asyncio.to_thread(
            http_call, UnixHTTPConnection(short_tmp / "control.sock"), "GET", "/v1/health"
        )
        assert status == 200
    finally:
        await first.stop()


def test_cli_subprocess_sanity() -> None:
    """The test environment runs the CLI from this checkout."""
    result = subprocess.run(
        [*OWM, "--version"], capture_output=True, text=True, timeout=30, env=cli_env()
    )
    assert result.returncode == 0 and "0.1.0" in result.stdout
