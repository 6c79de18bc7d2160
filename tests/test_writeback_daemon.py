"""Write-back through the real interface: a daemon, an NBD client, SIGKILL in the middle.

After a preserve, a client makes first writes to shared chunks (acknowledged while their copies
are not yet durable), some with FUA, some covered by a FLUSH, some neither.  The daemon is then
killed with SIGKILL: what FUA or the FLUSH covered must be there after the restart, the drained
image must read exactly as it was preserved, and each unflushed chunk holds its old or its new
content, nothing else.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon

from owm.nbd.client import NbdClient

CHUNK = 64 * 1024
CHUNKS = 24


async def _client(daemon: Daemon, export: str) -> NbdClient:
    return await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))


@pytest.mark.parametrize("method", ["cow", "log"])
async def test_fua_and_flushed_first_writes_survive_sigkill(short_tmp: Path, method: str) -> None:
    pool = short_tmp / "pool"
    daemon = start_daemon(pool)
    try:
        done = daemon.owm("volume", "create", "vol", "--size", str(CHUNKS * CHUNK),
                          "--method", method, "--chunk-size", "64K")
        assert done.returncode == 0, done.stderr
        c = await _client(daemon, "vol")
        old = bytes(range(256)) * (CHUNK // 256)
        for k in range(CHUNKS):
            await c.write(k * CHUNK, old)
        await c.flush()
        await c.disconnect()
        done = daemon.owm("preserve", "vol")
        assert done.returncode == 0, done.stderr

        c = await _client(daemon, "vol")
        fua = range(0, 8)
        flushed = range(8, 16)
        loose = range(16, CHUNKS)
        for k in fua:  # first writes, partial: the rest of the chunk keeps its old bytes
            await c.write(k * CHUNK + 4096, bytes([0x10 + k]) * 4096, fua=True)
        for k in flushed:
            await c.write(k * CHUNK + 4096, bytes([0x10 + k]) * 4096)
        await c.flush()
        for k in loose:
            await c.write(k * CHUNK + 4096, bytes([0x10 + k]) * 4096)
        daemon.stop(signal.SIGKILL)
    finally:
        daemon.stop(signal.SIGKILL)

    daemon = start_daemon(pool)
    try:
        image = await _client(daemon, "vol@0")
        assert await image.read(0, CHUNKS * CHUNK) == old * CHUNKS, "the drained image changed"
        await image.disconnect()
        live = await _client(daemon, "vol")
        got = await live.read(0, CHUNKS * CHUNK)
        await live.disconnect()
        for k in range(CHUNKS):
            chunk = got[k * CHUNK : (k + 1) * CHUNK]
            new = old[:4096] + bytes([0x10 + k]) * 4096 + old[8192:]
            if k in loose:
                assert chunk in (old, new), f"chunk {k} holds neither its old nor its new bytes"
            else:
                assert chunk == new, f"chunk {k}: a FUA or flushed write was lost"
    finally:
        code = daemon.stop()
    assert code == 0
    await asyncio.sleep(0)
