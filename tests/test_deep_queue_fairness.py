"""Fairness between sessions: a client with 256 requests in flight beside a light one doing
serial requests, through one FIFO device they both wait on (like the I/O threads of a pool on
disk); and the bytes of a WRITE payload still arriving count in the server's budget."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections import deque
from pathlib import Path

import pytest
from nbd_fixtures import MemoryDisk, MemoryExports, MemoryView, serve, wait_for

from owm.nbd import constants as c
from owm.nbd.client import NbdClient
from owm.nbd.server import FAIR_INFLIGHT_REQUESTS

pytestmark = pytest.mark.timeout(120)

HEAVY_DEPTH = 256
LIGHT_COUNT = 40
WARM_UP = 6  # light requests sent before the server has seen both sessions busy


class Device:
    """One FIFO queue served one request at a time; it logs whose (which view's) request it
    served."""

    def __init__(self) -> None:
        self.queue: deque[tuple[object, asyncio.Future[None]]] = deque()
        self.served: list[object] = []
        self.worker: asyncio.Task[None] | None = None

    async def run(self, who: object) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((who, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._serve())
        await fut

    async def _serve(self) -> None:
        while self.queue:
            who, fut = self.queue.popleft()
            await asyncio.sleep(0.0003)
            self.served.append(who)
            if not fut.done():
                fut.set_result(None)


class DeviceView(MemoryView):
    async def _yield(self) -> None:
        exports = self.exports
        assert isinstance(exports, DeviceExports)
        await exports.device.run(self)  # whose view


class DeviceExports(MemoryExports):
    def __init__(self) -> None:
        super().__init__(size=16 << 20)
        self.device = Device()
        self.delay = 1.0  # any non-zero value: every request goes through _yield

    async def open_export(self, name: str, peer: str) -> MemoryView:
        disk: MemoryDisk = self.disks[name]
        view = DeviceView(self, disk, peer)
        self.views.append(view)
        return view


async def test_a_light_session_is_served_beside_a_deep_queue(tmp_path: Path) -> None:
    exports = DeviceExports()
    async with serve(exports, tmp_path):
        sock = str(tmp_path / "nbd.sock")
        heavy = await NbdClient.connect("vol", unix_path=sock)
        light = await NbdClient.connect("vol", unix_path=sock)
        await light.write(8 << 20, b"L" * 4096)
        stop = asyncio.Event()
        heavy_done = 0

        async def heavy_worker(slot: int) -> None:
            nonlocal heavy_done
            for i in range(400):  # bounded, whatever happens
                if stop.is_set():
                    return
                await heavy.write((slot * 4 + i % 4) * 1024, b"h" * 1024)
                heavy_done += 1

        workers = [asyncio.ensure_future(heavy_worker(s)) for s in range(HEAVY_DEPTH)]
        await wait_for(lambda: heavy_done >= HEAVY_DEPTH, timeout=30)
        light_view = exports.views[-1]
        marks: list[int] = []  # device log length when each light request was served
        for _ in range(LIGHT_COUNT):
            assert await light.read(8 << 20, 4096) == b"L" * 4096
            marks.append(exports.device.served.index(light_view, marks[-1] + 1 if marks else 0))
        stop.set()
        await asyncio.gather(*workers)
        await light.disconnect()
        await heavy.disconnect()
    # The light session finished its bounded count, and between two of its requests the device
    # served a fair share of the heavy one's, not its whole queue.
    assert len(marks) == LIGHT_COUNT
    between = [b - a - 1 for a, b in itertools.pairwise(marks)][WARM_UP:]
    assert max(between) <= 2 * FAIR_INFLIGHT_REQUESTS, between
    assert heavy_done > HEAVY_DEPTH


async def test_a_write_payload_counts_in_the_budget_as_it_arrives(tmp_path: Path) -> None:
    exports = MemoryExports(size=64 << 20)
    async with serve(exports, tmp_path) as server:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "nbd.sock"))
        await reader.readexactly(18)
        writer.write(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
        name = b"vol"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        writer.write(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(data)) + data)
        while True:  # option replies up to the ACK
            _magic, _opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(length)
            if rtype == c.REP_ACK:
                break
        length = 32 << 20
        writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, length))
        writer.write(b"p" * (1 << 20))
        await writer.drain()
        await wait_for(lambda: server.buffered_bytes >= 1 << 20)
        # What arrived is counted, not the 32 MiB announced.
        assert server.buffered_bytes < 4 << 20
        writer.write(b"p" * (length - (1 << 20)))
        await writer.drain()
        magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, error, handle) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
        assert exports.disks["vol"].data[: 1 << 20] == b"p" * (1 << 20)
        writer.close()
        await wait_for(lambda: server.connection_count == 0)
        assert server.buffered_bytes == 0
