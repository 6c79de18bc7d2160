"""Clients that pipeline 1 MiB reads and never read the replies (issue 9, item 8).

Each such client once made the daemon buffer about 150 MB of replies, with no cap across
clients.  Here several raw-socket clients do exactly that against a real daemon while a
well-behaved client beside them keeps writing and reading back; the daemon's resident memory
(``/proc/PID/status``) must stay under a generous bound, a stalled client that finally reads
gets every reply, and the daemon still stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon
from nbd_fixtures import MemoryExports, serve, wait_for
from test_hostile_names import info_payload, make_volume, nbd_connect, option, read_final_reply

from owm.nbd import constants as c
from owm.nbd import server as server_module
from owm.nbd.client import NbdClient

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20
DATA_MIB = 16  # the region the hostile clients read, filled with data (not zeroes)
HOSTILE = 10
REQUESTS_EACH = 300  # 300 MiB of replies asked for by each hostile client
RSS_GROWTH_LIMIT = 700 * MIB  # generous: without the caps ten such clients need > 1.3 GB
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_transmission(daemon: Daemon, export: str) -> socket.socket:
    """A raw connection in transmission, with simple replies (which always carry the data)."""
    sock = nbd_connect(daemon.nbd_socket)
    sock.sendall(option(c.OPT_GO, info_payload(export)))
    reply, message = read_final_reply(sock)
    assert reply == c.REP_ACK, message
    return sock


def read_request(handle: int, offset: int, length: int = MIB) -> bytes:
    return _REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, handle, offset, length)


def send_until_blocked(sock: socket.socket, count: int, budget: float = 5.0) -> int:
    """Send up to ``count`` READs, giving up once the server stops reading; returns how many
    headers went out whole (a torn last one does not matter: this client never reads)."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + budget
    sent = 0
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            sock.sendall(read_request(i, (i % DATA_MIB) * MIB))
            sent += 1
    except TimeoutError:
        pass
    return sent


async def well_behaved(daemon: Daemon, rounds: int, seed: int) -> int:
    """Write and read back 64 KiB blocks past the hostile clients' region; returns rounds."""
    rng = random.Random(seed)
    client = await NbdClient.connect(export="v", unix_path=str(daemon.nbd_socket))
    try:
        for i in range(rounds):
            offset = DATA_MIB * MIB + rng.randrange(256) * 65536
            block = rng.randbytes(65536)
            await asyncio.wait_for(client.write(offset, block, fua=i % 2 == 0), 30)
            await asyncio.wait_for(client.flush(), 30)
            got = await asyncio.wait_for(client.read(offset, 65536), 30)
            assert got == block, f"round {i}: read back other data"
        return rounds
    finally:
        await client.disconnect()


async def fill(daemon: Daemon) -> bytes:
    data = random.Random(1).randbytes(DATA_MIB * MIB)
    client = await NbdClient.connect(export="v", unix_path=str(daemon.nbd_socket))
    try:
        for i in range(DATA_MIB):
            await client.write(i * MIB, data[i * MIB:(i + 1) * MIB])
        await client.flush()
    finally:
        await client.disconnect()
    return data


def test_clients_that_never_read_replies_are_capped(daemon: Daemon) -> None:
    make_volume(daemon, "v", "64M")
    data = asyncio.run(fill(daemon))
    pid = daemon.proc.pid
    baseline = status_kib(pid, "VmRSS")

    hostile = [open_transmission(daemon, "v") for _ in range(HOSTILE)]
    try:
        for sock in hostile:
            assert send_until_blocked(sock, REQUESTS_EACH) > 0
        time.sleep(1.0)  # let the daemon do all the work it is going to do for them
        assert asyncio.run(well_behaved(daemon, 60, seed=2)) == 60
        peak = status_kib(pid, "VmHWM")
        rss = status_kib(pid, "VmRSS")
        assert rss - baseline < RSS_GROWTH_LIMIT, (baseline, rss)
        assert peak - baseline < RSS_GROWTH_LIMIT, (baseline, peak)

        # A stalled client that finally reads gets every reply, correct, in some order.
        stalled = open_transmission(daemon, "v")
        count = 80
        sender = threading.Thread(target=lambda: stalled.sendall(
            b"".join(read_request(i, (i % DATA_MIB) * MIB) for i in range(count))))
        sender.start()
        time.sleep(0.5)
        seen = set()
        stalled.settimeout(30)
        view = memoryview(bytearray(MIB))
        for _ in range(count):
            header = bytearray()
            while len(header) < _REPLY.size:
                header += stalled.recv(_REPLY.size - len(header))
            magic, error, handle = _REPLY.unpack(header)
            assert (magic, error) == (c.SIMPLE_REPLY_MAGIC, 0)
            got = 0
            while got < MIB:
                n = stalled.recv_into(view[got:], MIB - got)
                assert n, "the daemon closed the connection"
                got += n
            offset = (handle % DATA_MIB) * MIB
            assert view.tobytes() == data[offset:offset + MIB], f"reply {handle}"
            seen.add(handle)
        sender.join(30)
        assert seen == set(range(count))
        stalled.close()
    finally:
        for sock in hostile:
            sock.close()
    assert asyncio.run(well_behaved(daemon, 10, seed=3)) == 10
    assert os.path.exists(f"/proc/{pid}")
    assert "Traceback" not in daemon.log_text()


async def test_the_server_budget_is_shared_and_returns_to_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, with small caps: clients that never read hold at most their share, a
    reading client beside them is served, and every byte is given back once they are gone."""
    monkeypatch.setattr(server_module, "MAX_CONNECTION_REPLY_BYTES", 4 * MIB)
    monkeypatch.setattr(server_module, "MAX_BUFFERED_BYTES", 12 * MIB)
    exports = MemoryExports(size=16 * MIB)
    exports.disks["vol"].data[:] = random.Random(5).randbytes(16 * MIB)
    async with serve(exports, tmp_path) as server:
        peak = 0
        hostile = []
        for _ in range(6):
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "nbd.sock"))
            await reader.readexactly(18)
            writer.write(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
            writer.write(option(c.OPT_GO, info_payload("vol")))
            writer.write(b"".join(read_request(i, (i % 16) * MIB) for i in range(200)))
            hostile.append((reader, writer))
        client = await NbdClient.connect("vol", unix_path=str(tmp_path / "nbd.sock"))
        for i in range(50):
            got = await asyncio.wait_for(client.read((i % 16) * MIB, MIB), 30)
            assert got == exports.disks["vol"].data[(i % 16) * MIB:(i % 16 + 1) * MIB]
            peak = max(peak, server.buffered_bytes)
        await client.disconnect()
        # Per connection: its cap, the transport's high-water mark and one request at most.
        assert peak <= 12 * MIB + 6 * (server_module.WRITE_HIGH_WATER + 2 * MIB), peak
        for _, writer in hostile:
            writer.close()
        await wait_for(lambda: server.connection_count == 0, 10)
        await wait_for(lambda: server.buffered_bytes == 0, 10)


async def test_connections_past_the_cap_are_closed_and_the_rest_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection may hold a request's buffer, so their number is capped: one past the cap
    is closed at once (no greeting), those within it are served, and a place that comes free is
    usable again."""
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 3)
    exports = MemoryExports(size=MIB)
    path = str(tmp_path / "nbd.sock")
    async with serve(exports, tmp_path) as server:
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(18)  # greeted
            held.append(writer)
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(18), 10) == b""  # closed, not greeted
        writer.close()
        assert server.refused_connections == 1
        held.pop().close()
        await wait_for(lambda: server.connection_count == 2, 10)
        client = await NbdClient.connect("vol", unix_path=path)
        await client.write(0, b"x" * 4096)
        assert await client.read(0, 4096) == b"x" * 4096
        await client.disconnect()
        for w in held:
            w.close()
