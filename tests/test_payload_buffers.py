"""WRITE payloads on their way to the storage: as few copies and fresh buffers as they must.

A payload that arrives over several receives is collected in a buffer from the server's
:class:`~owm.nbd.protocol.PayloadBuffers`, used again only once nothing refers to it; a payload
already in one ``bytes`` object reaches python-rados as that object.  The end-to-end test sends
many 1M writes at once through a real NBD client to a write-back ``cow`` volume (a preserve makes
the writes first writes, held until their group commit) and reads every byte back.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from test_nbd_protocol import info_data, option

from owm.common.view import ExportInfo
from owm.nbd import constants as c
from owm.nbd import protocol as p
from owm.nbd.client import NbdClient
from owm.nbd.server import NbdServer
from owm.pool.pool import Pool
from owm.storage.rados import _as_bytes

MIB = 1 << 20
INFO = ExportInfo("vol", "live volume", 4 * MIB, False, max_block=MIB)


def _transmission(buffers: p.PayloadBuffers) -> p.ServerConnection:
    conn = p.ServerConnection(buffers=buffers)
    conn.initiate()
    conn.receive_data(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(option(c.OPT_GO, info_data(INFO.name)))
    ev = conn.next_event()
    assert isinstance(ev, p.ExportInfoRequest)
    conn.reply_info(INFO)
    assert conn.state is p.State.TRANSMISSION
    return conn


def _write(conn: p.ServerConnection, offset: int, data: bytes, split: int) -> p.Request:
    """Send a WRITE whose header and first ``split`` payload bytes arrive in one receive and
    the rest in a second one (the way a 1M write arrives through a 256K receive buffer)."""
    header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 9, offset, len(data))
    conn.receive_data(header + data[:split])
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(data[split:])
    ev = conn.next_event()
    assert isinstance(ev, p.Request) and ev.payload is not None
    return ev


def test_pool_never_hands_out_a_buffer_still_referred_to() -> None:
    pool = p.PayloadBuffers(limit=4 * MIB)
    first, _ = pool.get(MIB)
    held = memoryview(first)[100:200]  # what a write-back cache or a waiter would keep
    first_id = id(first)
    del first
    second, _ = pool.get(MIB)
    assert id(second) != first_id, "a buffer a view still refers to was handed out again"
    del held, second
    again, _ = pool.get(MIB)
    assert pool.reused == 1 and id(again) == first_id
    # The limit: buffers beyond it are not kept; free ones of another size make room.
    keep = [pool.get(MIB)[0] for _ in range(6)]
    assert pool._bytes <= 4 * MIB
    del keep, again
    other, _ = pool.get(MIB // 2)
    assert len(other) == MIB // 2 and pool._bytes <= 4 * MIB
    assert any(b is other for b in pool._buffers), "no free buffer made room for another size"
    # Small payload buffers are made afresh, never kept.
    small, _ = pool.get(4096)
    assert not any(b is small for b in pool._buffers)


def test_machine_collects_payloads_in_pooled_buffers_without_mixing_them() -> None:
    pool = p.PayloadBuffers()
    conn = _transmission(pool)
    one = bytes([1]) * (MIB - 7) + b"ABCDEFG"
    req1 = _write(conn, 0, one, 200_000)
    assert bytes(req1.payload or b"") == one
    # The first request is still in flight (its payload referred to): a second one gets its
    # own buffer, and the first one's bytes stay as they were.
    two = bytes([2]) * MIB
    req2 = _write(conn, MIB, two, 1)
    assert req2.payload is not req1.payload
    assert bytes(req1.payload or b"") == one and bytes(req2.payload or b"") == two
    assert pool.allocated == 2 and pool.reused == 0
    del req1
    three = bytes(range(256)) * (MIB // 256)
    req3 = _write(conn, 2 * MIB, three, 65536)
    assert bytes(req3.payload or b"") == three
    assert pool.reused == 1, "a free buffer was not used again"
    assert bytes(req2.payload or b"") == two


def test_rados_gets_a_payload_in_one_piece_without_a_copy() -> None:
    whole = bytes(range(256)) * 16
    assert _as_bytes(whole) is whole
    assert _as_bytes(memoryview(whole)) is whole
    assert _as_bytes(memoryview(whole)[0:]) is whole
    part = _as_bytes(memoryview(whole)[1:])
    assert part == whole[1:] and type(part) is bytes
    arr = bytearray(whole)
    copied = _as_bytes(memoryview(arr))
    assert copied == whole and type(copied) is bytes
    assert _as_bytes(memoryview(whole)[::2]) == whole[::2]


def test_a_payload_collected_over_receives_reaches_rados_without_a_copy() -> None:
    pool = p.PayloadBuffers()
    conn = _transmission(pool)
    data = bytes(range(256)) * (MIB // 256)
    req = _write(conn, 0, data, 100_000)
    assert type(req.payload) is bytes and req.payload == data
    assert _as_bytes(req.payload) is req.payload
    # Filled in place, it is still an ordinary bytes object to everyone else.
    assert req.payload[:4] == data[:4] and bytes(req.payload) is req.payload
    held = req.payload
    del req
    other = bytes([7]) * MIB
    req2 = _write(conn, MIB, other, 5)
    assert req2.payload is not held and held == data, "a held payload was filled again"


async def test_many_1m_writes_in_flight_through_write_back_read_back(tmp_path: Path) -> None:
    count, depth = 40, 16
    pool = await Pool.open(tmp_path / "pool")
    await pool.create_volume("vol", count * MIB, method="cow", chunk_size=65536)
    server = NbdServer(pool)
    sock = str(tmp_path / "nbd.sock")
    await server.start(unix_path=sock)
    try:
        client = await NbdClient.connect(export="vol", unix_path=sock)
        await client.write(0, bytes([0xEE]) * (count * MIB))
        await client.flush()
        await client.disconnect()
        await pool.preserve("vol")  # from now on first writes, held by the write-back

        def block(k: int) -> bytes:
            return struct.pack(">I", k) * (MIB // 4)

        client = await NbdClient.connect(export="vol", unix_path=sock)
        sem = asyncio.Semaphore(depth)

        async def one(k: int) -> None:
            async with sem:
                await client.write(k * MIB, block(k))

        # Two rounds with a flush between: the flush's group commit releases the first
        # round's held writes, so their buffers are free for the second round.
        half = count // 2
        await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(half))), 60)
        await client.flush()
        await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(half, count))), 60)
        for k in range(count):
            got = await client.read(k * MIB, MIB)
            assert got == block(k), f"the 1M write at {k} MiB reads back other bytes"
        await client.flush()
        await client.disconnect()
        image = await NbdClient.connect(export="vol@0", unix_path=sock)
        assert await image.read(0, count * MIB) == bytes([0xEE]) * (count * MIB)
        await image.disconnect()
        buffers = server.payload_buffers
        print(f"payload buffers: {buffers.allocated} allocated, {buffers.reused} reused")
        assert buffers.reused > 0, "no payload buffer was used again"
        assert buffers.allocated < count
    finally:
        await server.stop(grace=5)
        await pool.close()


async def test_large_write_payloads_are_received_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one 1M write, the next ones are read header first, then straight into their
    payload buffers: next to nothing of their payloads goes through the scratch buffer (and
    its copy into a fresh bytes object per receive)."""
    count, depth = 24, 8
    fed = [0]
    receive = p.ServerConnection.receive_data

    def counting(self: p.ServerConnection, data: bytes | bytearray | memoryview) -> None:
        if self.state is p.State.TRANSMISSION:
            fed[0] += len(data)
        receive(self, data)

    monkeypatch.setattr(p.ServerConnection, "receive_data", counting)
    pool = await Pool.open(tmp_path / "pool")
    await pool.create_volume("vol", count * MIB, method="cow", chunk_size=65536)
    server = NbdServer(pool)
    sock = str(tmp_path / "nbd.sock")
    await server.start(unix_path=sock)
    try:
        client = await NbdClient.connect(export="vol", unix_path=sock)
        sem = asyncio.Semaphore(depth)

        async def one(k: int) -> None:
            async with sem:
                await client.write(k * MIB, bytes([k + 1]) * MIB)

        await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(count))), 60)
        got = await client.read(0, count * MIB)
        await client.disconnect()
        assert got == b"".join(bytes([k + 1]) * MIB for k in range(count))
    finally:
        await server.stop(grace=5)
        await pool.close()
    # The first write's head and every header (and a READ's) may come through the scratch.
    print(f"{fed[0]} bytes of {count} MiB of writes through receive_data")
    assert fed[0] < MIB, f"{fed[0]} bytes of the payloads went through the scratch buffer"
