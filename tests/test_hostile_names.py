"""Hostile names: one parser, ASCII digits and the canonical form only, everywhere (issue 9, items
7 and 9).

``x@²`` once left an NBD option unanswered with its socket open for good, ``x@00`` opened
``x@0`` over NBD while the API said there was no such image, and the volume name ``"ab\\n"``
passed a ``$``-anchored pattern.  These tests drive a real daemon: raw NBD sockets and libnbd
for the NBD side, the control socket and the CLI for the rest.  The raw-socket helpers here are
also used by the other hostile-client tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Daemon, run_owm
from nbd_fixtures import MemoryExports, MemoryView, have, serve, wait_for

from owm.backup.restore import parse_target
from owm.common.errors import InvalidRequest
from owm.common.names import parse_image_name
from owm.common.view import ExportInfo
from owm.nbd import constants as c

pytestmark = pytest.mark.timeout(180)

BAD_IMAGE_NAMES = ["x@²", "x@00", "x@٠", "x@+1", "x@ 1", "x@1 ", "x@0\n", "x@-0", "x@0x0", "x@"]


# ------------------------------------------------------------------------- raw NBD helpers


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        block = sock.recv(n - len(out))
        if not block:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += block
    return bytes(out)


def nbd_connect(path: Path | str, timeout: float = 10.0) -> socket.socket:
    """A Unix-socket NBD connection past the greeting (fixed newstyle, no zeroes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    magic, opt, _flags = struct.unpack(">QQH", recv_exactly(sock, 18))
    assert (magic, opt) == (c.NBDMAGIC, c.IHAVEOPT)
    sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    return sock


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


def info_payload(name: str) -> bytes:
    """The data of NBD_OPT_GO / NBD_OPT_INFO: the name and no information requests."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    assert magic == c.OPTION_REPLY_MAGIC
    return opt, reply, recv_exactly(sock, length)


def read_final_reply(sock: socket.socket) -> tuple[int, bytes]:
    """Skip REP_INFO replies; the final reply's type and payload."""
    for _ in range(16):
        _opt, reply, payload = read_option_reply(sock)
        if reply != c.REP_INFO:
            return reply, payload
    raise AssertionError("more than 16 option replies")


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset) within the socket timeout."""
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds_at_most(pid: int, limit: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= limit or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def make_volume(daemon: Daemon, name: str, size: str = "1M", **extra: object) -> None:
    status, body = daemon.api("POST", "/v1/volumes", {"name": name, "size": size, **extra})
    assert status == 201, body


# ---------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("image", [*BAD_IMAGE_NAMES, "@0", "ab\n@0", "a/b@0", "x"])
def test_the_parser_refuses_every_spelling_but_the_canonical_one(image: str) -> None:
    with pytest.raises(InvalidRequest, match="not an image name"):
        parse_image_name(image)


def test_the_parser_takes_canonical_names() -> None:
    from owm.common.names import parse_export_name

    assert parse_image_name("x@0") == ("x", 0)
    assert parse_image_name("vol.a-b_c@12") == ("vol.a-b_c", 12)
    assert parse_export_name("vol") == ("vol", None)
    with pytest.raises(InvalidRequest):
        parse_export_name("ab\n")


# ----------------------------------------------------------------------- NBD, real daemon


def test_bad_image_names_get_an_nbd_error_and_leak_nothing(daemon: Daemon) -> None:
    make_volume(daemon, "x")
    status, body = daemon.api("POST", "/v1/volumes/x/preserve", {})
    assert status == 201, body
    pid = daemon.proc.pid

    # The good name works, and warms up whatever the daemon opens lazily.
    sock = nbd_connect(daemon.nbd_socket)
    sock.sendall(option(c.OPT_GO, info_payload("x@0")))
    assert read_final_reply(sock)[0] == c.REP_ACK
    sock.close()
    time.sleep(0.2)
    baseline = fd_count(pid)

    modes = (c.OPT_GO, c.OPT_INFO, c.OPT_EXPORT_NAME)
    for i in range(20):
        name, mode = BAD_IMAGE_NAMES[i % len(BAD_IMAGE_NAMES)], modes[i % len(modes)]
        sock = nbd_connect(daemon.nbd_socket)
        try:
            if mode == c.OPT_EXPORT_NAME:
                sock.sendall(option(mode, name.encode()))
                assert closed_by_server(sock), f"EXPORT_NAME {name!r} was not refused"
                continue
            sock.sendall(option(mode, info_payload(name)))
            reply, message = read_final_reply(sock)
            assert reply & c.REP_ERR_BIT, (name, reply)
            assert b"not an image name" in message, message
            # The connection is still in option haggling and answers the next option.
            sock.sendall(option(c.OPT_GO, info_payload("x@0")))
            assert read_final_reply(sock)[0] == c.REP_ACK
        finally:
            sock.close()

    if have("nbdinfo"):  # libnbd over TCP too: an error, no hang
        for name in ("x@²", "x@00"):
            uri = f"nbd://{daemon.nbd_tcp}/{quote(name, safe='@')}"
            result = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=30)
            assert result.returncode != 0, result.stdout
        good = subprocess.run(["nbdinfo", f"nbd://{daemon.nbd_tcp}/x@0"], capture_output=True,
                              text=True, timeout=30)
        assert good.returncode == 0, good.stderr

    assert wait_fds_at_most(pid, baseline) <= baseline
    assert "Traceback" not in daemon.log_text()
    started = time.monotonic()
    assert daemon.stop(timeout=10) == 0
    assert time.monotonic() - started < 10


def test_the_api_refuses_non_canonical_image_names(daemon: Daemon) -> None:
    make_volume(daemon, "x")
    assert daemon.api("POST", "/v1/volumes/x/preserve", {})[0] == 201
    assert daemon.api("GET", "/v1/images/x@0")[0] == 200
    for name in BAD_IMAGE_NAMES[:-1]:
        path = quote(name, safe="@")
        for method, url in (("GET", f"/v1/images/{path}"), ("POST", f"/v1/images/{path}/wait"),
                            ("POST", f"/v1/images/{path}/release")):
            status, body = daemon.api(method, url)
            assert status == 400, (name, method, status, body)
            assert "not an image name" in body["error"], body
    status, body = daemon.api("GET", "/v1/images/x@0/changed-chunks?since=%C2%B2")
    assert status == 400, body
    assert "Traceback" not in daemon.log_text()


# ----------------------------------------------------------------------- volume names (item 9)


@pytest.mark.parametrize("name", ["ab\n", "ab\r\n", "\nab", "ab\x00", "ａｂ", "ab@0", "a" * 65])
def test_the_api_refuses_bad_volume_names(daemon: Daemon, name: str) -> None:
    status, body = daemon.api("POST", "/v1/volumes", {"name": name, "size": "1M"})
    assert status == 400, body
    assert "not a valid volume name" in body["error"]
    assert os.listdir(daemon.pool / "volumes") == []
    assert daemon.api("GET", "/v1/volumes")[1] == []


def test_the_cli_refuses_a_volume_name_with_a_newline(daemon: Daemon) -> None:
    result = daemon.owm("volume", "create", "ab\n", "--size", "1M")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a valid volume name" in result.stderr
    assert os.listdir(daemon.pool / "volumes") == []
    assert daemon.owm("volume", "create", "ab", "--size", "1M").returncode == 0


def test_restore_does_not_take_a_name_with_a_newline_for_a_volume() -> None:
    assert parse_target("ab") == ("volume", "ab")
    with pytest.raises(InvalidRequest):
        parse_target("ab\n")


def test_cli_image_arguments_use_the_same_parser(short_tmp: Path) -> None:
    result = run_owm("--pool", short_tmp / "pool", "release", "x@00")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "not an image name" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------- the server alone, any Exports


class _BrokenLookup(MemoryExports):
    """Exports whose lookup raises what a bug would (not an OwmError), and whose open of
    ``slow`` never finishes."""

    def __init__(self) -> None:
        super().__init__(size=1 << 20)
        self.add("slow", 1 << 20)
        self.opening = asyncio.Event()

    def export_info(self, name: str) -> ExportInfo:
        if name == "vol@1":
            raise ValueError("int() says no")
        return super().export_info(name)

    async def open_export(self, name: str, peer: str) -> MemoryView:
        if name == "slow":
            self.opening.set()
            await asyncio.Event().wait()
        return await super().open_export(name, peer)


async def _raw(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    await reader.readexactly(18)
    writer.write(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    return reader, writer


async def _final_reply(reader: asyncio.StreamReader) -> int:
    while True:
        _magic, _opt, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if reply != c.REP_INFO:
            return reply


async def test_a_lookup_that_raises_still_answers_the_option(tmp_path: Path) -> None:
    exports = _BrokenLookup()
    async with serve(exports, tmp_path) as server:
        reader, writer = await _raw(tmp_path / "nbd.sock")
        for opt in (c.OPT_INFO, c.OPT_GO, c.OPT_INFO):
            writer.write(option(opt, info_payload("vol@1")))
            reply = await asyncio.wait_for(_final_reply(reader), 5)
            assert reply == c.REP_ERR_UNKNOWN
        writer.write(option(c.OPT_GO, info_payload("vol")))
        assert await asyncio.wait_for(_final_reply(reader), 5) == c.REP_ACK
        writer.close()
        await wait_for(lambda: server.connection_count == 0)


async def test_the_handshake_timeout_applies_while_an_export_is_opening(tmp_path: Path) -> None:
    exports = _BrokenLookup()
    async with serve(exports, tmp_path) as server:
        server.handshake_timeout = 0.3
        reader, writer = await _raw(tmp_path / "nbd.sock")
        writer.write(option(c.OPT_GO, info_payload("slow")))
        await asyncio.wait_for(exports.opening.wait(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, not held forever
        writer.close()
        await wait_for(lambda: server.connection_count == 0)


def test_volume_names_in_urls_use_the_parser(daemon: Daemon) -> None:
    make_volume(daemon, "ab")
    assert daemon.api("GET", "/v1/volumes/ab")[0] == 200
    for path in ("/v1/volumes/ab%0A", "/v1/volumes/%C2%B2"):
        status, body = daemon.api("GET", path)
        assert status == 400, (path, status, body)
        assert "not a valid volume name" in body["error"] and "\n" not in body["error"]
    status, body = daemon.api("POST", "/v1/volumes/ab%0A/preserve", {})
    assert status == 400, body
    assert daemon.api("GET", "/v1/volumes/nope")[0] == 404
