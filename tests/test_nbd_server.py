"""The asyncio NBD server driven by owm's own client over Unix and TCP sockets, on uvloop.

The storage is the in-memory fake of tests/nbd_fixtures.py: these tests are about the server
(concurrency, ordering, session ends, shutdown, hostile clients), not about owm's engines.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from nbd_fixtures import MemoryExports, MemoryView, serve, wait_for

from owm.common.errors import OutOfRange
from owm.nbd import constants as c
from owm.nbd.client import NbdClient, NbdError
from owm.nbd.server import NbdServer

pytestmark = [
    pytest.mark.timeout(60),
    # The server runs on uvloop in production; pytest-asyncio deprecates this fixture in favour
    # of a conftest hook, and tests/conftest.py is not ours to change.
    pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture'),
]


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """uvloop is what the daemon runs; plain asyncio is the fallback it keeps working on."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
def exports() -> MemoryExports:
    return MemoryExports(size=16 * 1024 * 1024)


@pytest.fixture
async def server(exports: MemoryExports, tmp_path: Path) -> AsyncIterator[NbdServer]:
    async with serve(exports, tmp_path, tcp=True) as srv:
        yield srv


def sock(tmp_path: Path) -> str:
    return str(tmp_path / "nbd.sock")


async def connect(tmp_path: Path, export: str = "vol", **kw: object) -> NbdClient:
    return await NbdClient.connect(export, unix_path=sock(tmp_path), **kw)  # type: ignore[arg-type]


async def raw_connection(tmp_path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(sock(tmp_path))
    greeting = await reader.readexactly(18)
    assert struct.unpack(">QQH", greeting)[:2] == (c.NBDMAGIC, c.IHAVEOPT)
    writer.write(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    return reader, writer


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data


async def read_until_closed(reader: asyncio.StreamReader, limit: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), limit)


# ----------------------------------------------------------------------------- basics


async def test_negotiation_reports_the_export(server: NbdServer, tmp_path: Path) -> None:
    client = await connect(tmp_path)
    assert client.size == 16 * 1024 * 1024
    assert not client.read_only
    assert client.can_multi_conn
    assert client.structured and client.meta_context_id is not None
    assert client.description == "live volume, memory, fake"
    assert (client.min_block, client.preferred_block, client.max_block) == (1, 4096, 32 << 20)
    for flag in (
        c.FLAG_SEND_FLUSH,
        c.FLAG_SEND_FUA,
        c.FLAG_SEND_TRIM,
        c.FLAG_SEND_WRITE_ZEROES,
        c.FLAG_SEND_FAST_ZERO,
        c.FLAG_SEND_CACHE,
        c.FLAG_SEND_DF,
    ):
        assert client.can(flag)
    assert server.connection_count == 1
    await client.disconnect()
    await wait_for(lambda: server.connection_count == 0)


async def test_read_write_round_trip(
    server: NbdServer, exports: MemoryExports, tmp_path: Path
) -> None:
    client = await connect(tmp_path)
    data = random.randbytes(100_000)
    await client.write(12345, data, fua=True)
    assert await client.read(12345, len(data)) == data
    assert exports.disks["vol"].data[12345 : 12345 + len(data)] == data
    assert exports.disks["vol"].fua_writes == 1
    await client.flush()
    assert exports.disks["vol"].flushes == 1
    assert await client.read(0, 0) == b""
    await client.write(0, b"")
    await client.cache(0, 65536)
    await client.disconnect()


async def test_tcp_listener(server: NbdServer, tmp_path: Path) -> None:
    assert server.tcp_port > 0
    client = await NbdClient.connect("vol", host="127.0.0.1", port=server.tcp_port)
    await client.write(0, b"over tcp")
    assert await client.read(0, 8) == b"over tcp"
    await client.disconnect()


async def test_zero_reads_come_back_as_zeroes_through_holes(
    server: NbdServer, tmp_path: Path
) -> None:
    client = await connect(tmp_path)
    assert await client.read(0, 1 << 20) == bytes(1 << 20)
    await client.write(4096, b"x" * 4096)
    assert await client.read(0, 12288) == bytes(4096) + b"x" * 4096 + bytes(4096)
    await client.disconnect()


async def test_without_structured_replies(server: NbdServer, tmp_path: Path) -> None:
    client = await connect(tmp_path, structured=False)
    assert not client.structured and not client.can(c.FLAG_SEND_DF)
    await client.write(0, b"simple")
    assert await client.read(0, 6) == b"simple"
    with pytest.raises(NbdError) as err:
        await client.read(16 * 1024 * 1024 - 2, 4)
    assert err.value.errno == c.EINVAL
    with pytest.raises(NbdError):
        await client.block_status(0, 4096)
    # The connection is still in step after the error.
    assert await client.read(0, 6) == b"simple"
    await client.disconnect()


async def test_zeroes_trim_and_block_status(server: NbdServer, tmp_path: Path) -> None:
    client = await connect(tmp_path)
    mib = 1 << 20
    assert await client.block_status(0, mib) == [(mib, c.STATE_HOLE | c.STATE_ZERO)]
    await client.write(0, b"d" * 65536)
    await client.write_zeroes(65536, 65536, no_hole=True)
    assert await client.block_status(0, 4 * 65536) == [
        (131072, 0),
        (131072, c.STATE_HOLE | c.STATE_ZERO),
    ]
    await client.write_zeroes(0, 8192)
    await client.trim(8192, 8192)
    status = await client.block_status(0, 65536)
    assert status == [(16384, c.STATE_HOLE | c.STATE_ZERO), (65536 - 16384, 0)]
    assert (await client.read(0, 65536))[:8192] == bytes(8192)
    # FAST_ZERO: refused quickly when the zeroes must stay allocated, done when they need not.
    with pytest.raises(NbdError) as err:
        await client.write_zeroes(0, 4096, no_hole=True, fast=True)
    assert err.value.errno == c.ENOTSUP
    await client.write_zeroes(0, 4096, fast=True)
    await client.disconnect()


async def test_block_status_over_the_whole_export_and_req_one(
    server: NbdServer, tmp_path: Path
) -> None:
    client = await connect(tmp_path)
    size = client.size
    for off in range(0, size, 1 << 20):
        await client.write(off, b"x")
    status = await client.block_status(0, size)
    assert sum(n for n, _ in status) == size
    assert len(status) == 32
    one = await client.raw_request(c.CMD_BLOCK_STATUS, 0, size, c.CMD_FLAG_REQ_ONE)
    assert one == [(4096, 0)]
    await client.disconnect()


async def test_large_requests_are_split_by_the_client(
    exports: MemoryExports, tmp_path: Path
) -> None:
    exports.add("small", 8 << 20, "small max block", max_block=1 << 20)
    async with serve(exports, tmp_path):
        client = await connect(tmp_path, "small")
        assert client.max_block == 1 << 20
        data = random.randbytes(3 * (1 << 20) + 5)
        await client.write(7, data)
        assert await client.read(7, len(data)) == data
        # A single request over the maximum is refused, and the stream stays in step.
        with pytest.raises(NbdError) as err:
            await client.raw_request(c.CMD_WRITE, 0, (1 << 20) + 1, 0, bytes((1 << 20) + 1))
        assert err.value.errno == c.EINVAL
        assert await client.read(7, 10) == data[:10]
        await client.disconnect()


# ----------------------------------------------------------------------------- errors


async def test_errors_map_to_nbd_errnos(server: NbdServer, tmp_path: Path) -> None:
    client = await connect(tmp_path)
    end = client.size
    cases = [
        (client.write(end - 1, b"ab"), c.ENOSPC),
        (client.write_zeroes(end - 1, 2), c.ENOSPC),
        (client.read(end - 1, 2), c.EINVAL),
        (client.trim(end, 1), c.EINVAL),
        (client.raw_request(c.CMD_RESIZE, 0, 0), c.EINVAL),
        (client.raw_request(c.CMD_READ, 0, 1, 1 << 9), c.EINVAL),
        (client.raw_request(c.CMD_FLUSH, 1, 0), c.EINVAL),
    ]
    for coro, errno in cases:
        with pytest.raises(NbdError) as err:
            await coro
        assert err.value.errno == errno, err.value
        assert str(err.value)
    await client.write(0, b"still fine")
    assert await client.read(0, 10) == b"still fine"
    await client.disconnect()


async def test_read_only_image(server: NbdServer, exports: MemoryExports, tmp_path: Path) -> None:
    exports.disks["vol@0"].data[0:5] = b"image"
    client = await connect(tmp_path, "vol@0")
    assert client.read_only
    assert not client.can(c.FLAG_SEND_TRIM)
    assert await client.read(0, 5) == b"image"
    for coro in (
        client.write(0, b"x"),
        client.raw_request(c.CMD_TRIM, 0, 512),
        client.raw_request(c.CMD_WRITE_ZEROES, 0, 512),
    ):
        with pytest.raises(NbdError) as err:
            await coro
        assert err.value.errno == c.EPERM
    assert exports.disks["vol@0"].data[0:5] == b"image"
    await client.disconnect()


async def test_storage_errors_become_nbd_errors(
    server: NbdServer, exports: MemoryExports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from owm.common.errors import NoSpace, WrongState

    async def full(self: MemoryView, offset: int, data: object, fua: bool = False) -> None:
        raise NoSpace("The pool is full.")

    async def busy(self: MemoryView) -> None:
        raise WrongState("Busy.")

    async def broken(self: MemoryView, offset: int, length: int) -> bytes:
        raise RuntimeError("a bug")

    async def short(self: MemoryView, offset: int, length: int) -> bytes:
        return b"x"

    client = await connect(tmp_path)
    monkeypatch.setattr(MemoryView, "write", full)
    monkeypatch.setattr(MemoryView, "flush", busy)
    with pytest.raises(NbdError) as err:
        await client.write(0, b"x")
    assert (err.value.errno, "The pool is full." in str(err.value)) == (c.ENOSPC, True)
    with pytest.raises(NbdError) as err:
        await client.flush()
    assert err.value.errno == c.EIO
    monkeypatch.setattr(MemoryView, "read", broken)
    with pytest.raises(NbdError) as err:
        await client.read(0, 10)
    assert err.value.errno == c.EIO
    monkeypatch.setattr(MemoryView, "read", short)
    with pytest.raises(NbdError) as err:
        await client.read(0, 10)
    assert err.value.errno == c.EIO
    await client.disconnect()
    # The same with simple replies: the stream must not lose step on a failed read.
    client = await connect(tmp_path, structured=False)
    for _ in range(3):
        with pytest.raises(NbdError):
            await client.read(0, 10)
    await client.disconnect()


async def test_unknown_export(server: NbdServer, tmp_path: Path) -> None:
    with pytest.raises(NbdError) as err:
        await connect(tmp_path, "nope")
    assert err.value.reply_type == c.REP_ERR_UNKNOWN
    assert "nope" in str(err.value)


async def test_default_export_is_the_only_live_volume(server: NbdServer, tmp_path: Path) -> None:
    client = await connect(tmp_path, "")
    assert client.size == 16 * 1024 * 1024 and not client.read_only
    await client.disconnect()


async def test_list_exports(server: NbdServer, tmp_path: Path) -> None:
    assert await NbdClient.list_exports(unix_path=sock(tmp_path)) == [
        ("vol", "live volume, memory, fake"),
        ("vol@0", "preserved image 0, drained"),
    ]
    assert server.connection_count == 0 or await wait_for(lambda: server.connection_count == 0)


# ----------------------------------------------------------------------------- concurrency


async def test_out_of_order_completion(tmp_path: Path) -> None:
    """A slow request does not hold back the replies of fast ones behind it."""
    exports = MemoryExports(size=1 << 20)
    release = asyncio.Event()
    original = MemoryView.read

    async def read(self: MemoryView, offset: int, length: int) -> bytes:
        if offset == 0:
            await release.wait()
        return await original(self, offset, length)

    MemoryView.read = read  # type: ignore[method-assign]
    try:
        async with serve(exports, tmp_path):
            client = await connect(tmp_path)
            slow = asyncio.ensure_future(client.read(0, 512))
            fast = [asyncio.ensure_future(client.read(4096 * i, 512)) for i in range(1, 20)]
            await asyncio.wait_for(asyncio.gather(*fast), 5)
            assert not slow.done()
            release.set()
            assert await slow == bytes(512)
            await client.disconnect()
    finally:
        MemoryView.read = original  # type: ignore[method-assign]


async def test_many_concurrent_requests_from_many_tasks(tmp_path: Path) -> None:
    exports = MemoryExports(size=4 << 20, delay=0.0005)
    model = bytearray(4 << 20)
    async with serve(exports, tmp_path):
        client = await connect(tmp_path)
        rng = random.Random(5)

        async def worker(slot: int) -> None:
            base = slot * 256 * 1024
            for _ in range(40):
                off = base + rng.randrange(0, 256 * 1024 - 8192)
                n = rng.randrange(1, 8192)
                if rng.random() < 0.6:
                    data = rng.randbytes(n)
                    await client.write(off, data)
                    model[off : off + n] = data
                else:
                    assert await client.read(off, n) == model[off : off + n]

        await asyncio.gather(*(worker(i) for i in range(16)))
        assert await client.read(0, 4 << 20) == model
        # A burst far beyond the in-flight limit completes (reading pauses and resumes).
        futures = [client.write(i * 512, b"b" * 512) for i in range(2000)]
        await asyncio.gather(*futures)
        await client.disconnect()


async def test_several_connections_share_the_export(server: NbdServer, tmp_path: Path) -> None:
    clients = [await connect(tmp_path) for _ in range(4)]
    assert server.connection_count == 4
    await asyncio.gather(
        *(cl.write(i * 4096, bytes([i + 1]) * 4096) for i, cl in enumerate(clients))
    )
    for cl in clients:
        await cl.flush()
    data = await clients[0].read(0, 4 * 4096)
    assert data == b"".join(bytes([i + 1]) * 4096 for i in range(4))
    for cl in clients:
        await cl.disconnect()
    await wait_for(lambda: server.connection_count == 0)


# ----------------------------------------------------------------------------- session ends


async def test_disc_closes_the_view_cleanly(
    server: NbdServer, exports: MemoryExports, tmp_path: Path
) -> None:
    client = await connect(tmp_path)
    await client.write(0, b"x")
    await client.disconnect()
    assert exports.closed == [("vol", True)]
    assert exports.opened[0][1].startswith("unix:pid=")


async def test_dropped_connection_closes_the_view_uncleanly(
    server: NbdServer, exports: MemoryExports, tmp_path: Path
) -> None:
    client = await connect(tmp_path)
    await client.write(0, b"x")
    client.abort()
    await wait_for(lambda: exports.closed == [("vol", False)])
    await wait_for(lambda: server.connection_count == 0)


async def test_disc_finishes_requests_in_flight_first(tmp_path: Path) -> None:
    exports = MemoryExports(size=1 << 20, delay=0.2)
    async with serve(exports, tmp_path):
        client = await connect(tmp_path)
        writes = [asyncio.ensure_future(client.write(i * 4096, b"w" * 4096)) for i in range(8)]
        await asyncio.sleep(0.02)  # the requests are on the wire, not yet done
        assert not any(w.done() for w in writes)
        client._writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0))
        await asyncio.wait_for(asyncio.gather(*writes), 5)
        await wait_for(lambda: exports.closed == [("vol", True)])
        assert bytes(exports.disks["vol"].data[: 8 * 4096]) == b"w" * 8 * 4096
        await client.disconnect()


async def test_drop_with_requests_in_flight_waits_for_them(tmp_path: Path) -> None:
    exports = MemoryExports(size=1 << 20, delay=0.2)
    async with serve(exports, tmp_path):
        client = await connect(tmp_path)
        writes = [asyncio.ensure_future(client.write(i * 4096, b"w" * 4096)) for i in range(4)]
        await asyncio.sleep(0.05)
        client.abort()
        await asyncio.gather(*writes, return_exceptions=True)
        await asyncio.sleep(0.05)
        assert exports.closed == []  # the writes are still running: the view stays open
        await wait_for(lambda: exports.closed == [("vol", False)])
        assert bytes(exports.disks["vol"].data[: 4 * 4096]) == b"w" * 4 * 4096


async def test_stop_finishes_requests_and_closes_views(tmp_path: Path) -> None:
    exports = MemoryExports(size=1 << 20, delay=0.3)
    server = NbdServer(exports)
    await server.start(unix_path=sock(tmp_path))
    client = await connect(tmp_path)
    idle = await connect(tmp_path)
    reader, writer = await raw_connection(tmp_path)  # still negotiating
    write = asyncio.ensure_future(client.write(0, b"finished"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(grace=5), 10)
    assert await write is None
    assert exports.disks["vol"].data[:8] == b"finished"
    assert sorted(exports.closed) == [("vol", False), ("vol", False)]
    assert server.connection_count == 0
    assert await read_until_closed(reader) == b""
    assert not (tmp_path / "nbd.sock").exists()
    with pytest.raises(NbdError):
        await idle.read(0, 1)
    writer.close()
    client.abort()
    idle.abort()


async def test_stop_gives_up_after_grace(tmp_path: Path) -> None:
    exports = MemoryExports(size=1 << 20, delay=30)
    server = NbdServer(exports)
    await server.start(unix_path=sock(tmp_path))
    client = await connect(tmp_path)
    write = asyncio.ensure_future(client.write(0, b"never"))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await server.stop(grace=0.3)
    assert loop.time() - start < 5
    with pytest.raises(NbdError):
        await write
    client.abort()


# ----------------------------------------------------------------------------- hostile clients


async def test_garbage_is_disconnected_and_others_carry_on(
    server: NbdServer, tmp_path: Path
) -> None:
    good = await connect(tmp_path)
    for garbage in (b"\xff" * 4, struct.pack(">I", 3) + b"GARBAGE!" * 10):
        reader, writer = await asyncio.open_unix_connection(sock(tmp_path))
        await reader.readexactly(18)
        writer.write(garbage)
        await read_until_closed(reader)
        writer.close()
    await good.write(0, b"unaffected")
    assert await good.read(0, 10) == b"unaffected"
    await good.disconnect()


async def test_lying_lengths_and_truncated_messages(
    server: NbdServer, exports: MemoryExports, tmp_path: Path
) -> None:
    # A 4 GiB write is a lie: the connection ends, nothing is buffered for it.
    client = await connect(tmp_path)
    client._writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, 0xFFFFFFFF))
    await wait_for(lambda: exports.closed == [("vol", False)])
    client.abort()
    # A 4 GiB option is a lie too.
    reader, writer = await raw_connection(tmp_path)
    writer.write(struct.pack(">QII", c.IHAVEOPT, 99, 0xFFFFFFFF))
    assert await read_until_closed(reader) == b""
    writer.close()
    # A truncated header, then the client goes away.
    client = await connect(tmp_path)
    client._writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 1, 0, 512)[:13])
    await asyncio.sleep(0.05)
    client.abort()
    await wait_for(lambda: len(exports.closed) == 2)
    await wait_for(lambda: server.connection_count == 0)


async def test_unknown_options_are_answered_not_disconnected(
    server: NbdServer, tmp_path: Path
) -> None:
    reader, writer = await raw_connection(tmp_path)
    for opt, expected in (
        (c.OPT_STARTTLS, c.REP_ERR_POLICY),
        (c.OPT_EXTENDED_HEADERS, c.REP_ERR_UNSUP),
        (1234, c.REP_ERR_UNSUP),
    ):
        writer.write(option(opt))
        _, got_opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        assert (got_opt, rtype) == (opt, expected)
    writer.write(option(c.OPT_ABORT))
    _, got_opt, rtype, _ = struct.unpack(">QIII", await reader.readexactly(20))
    assert (got_opt, rtype) == (c.OPT_ABORT, c.REP_ACK)
    assert await read_until_closed(reader) == b""
    writer.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
async def test_export_name_option(
    server: NbdServer, exports: MemoryExports, tmp_path: Path, no_zeroes: bool
) -> None:
    reader, writer = await asyncio.open_unix_connection(sock(tmp_path))
    await reader.readexactly(18)
    flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if no_zeroes else 0)
    writer.write(struct.pack(">I", flags) + option(c.OPT_EXPORT_NAME, b"vol"))
    reply = await reader.readexactly(10 if no_zeroes else 134)
    size, tflags = struct.unpack_from(">QH", reply)
    assert size == 16 * 1024 * 1024 and tflags & c.FLAG_HAS_FLAGS
    # Simple replies (structured were not negotiated): a read returns header + data.
    writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 42, 0, 4))
    magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
    assert (magic, error, handle) == (c.SIMPLE_REPLY_MAGIC, 0, 42)
    assert await reader.readexactly(4) == bytes(4)
    writer.write(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0))
    assert await read_until_closed(reader) == b""
    writer.close()
    await wait_for(lambda: exports.closed == [("vol", True)])


async def test_export_name_for_unknown_export_disconnects(
    server: NbdServer, tmp_path: Path
) -> None:
    reader, writer = await raw_connection(tmp_path)
    writer.write(option(c.OPT_EXPORT_NAME, b"nope"))
    assert await read_until_closed(reader) == b""
    writer.close()


async def test_requests_that_suspend_in_every_way(tmp_path: Path) -> None:
    """Requests start outside any task and finish in one when they block: whatever they
    wait on (a bare yield, an executor, a lock held by another request), and whether they
    fail before or after waiting, each gets exactly its own reply."""
    exports = MemoryExports(size=1 << 20)
    lock = asyncio.Lock()
    original_read = MemoryView.read

    async def read(self: MemoryView, offset: int, length: int) -> bytes:
        kind = offset // 65536
        if kind == 1:
            await asyncio.sleep(0)
        elif kind == 2:
            await asyncio.get_running_loop().run_in_executor(None, lambda: None)
        elif kind == 3:
            async with lock:
                await asyncio.sleep(0.001)
        elif kind == 4:
            await asyncio.sleep(0)
            raise OutOfRange("failed after waiting")
        elif kind == 5:
            raise OutOfRange("failed at once")
        assert asyncio.current_task() is not None or kind == 0
        return await original_read(self, offset, length)

    MemoryView.read = read  # type: ignore[method-assign]
    try:
        async with serve(exports, tmp_path):
            client = await connect(tmp_path)
            await client.write(0, bytes(range(256)) * 4096)
            offsets = [k * 65536 + i * 512 for k in range(6) for i in range(20)]
            random.shuffle(offsets)
            results = await asyncio.gather(
                *(client.read(off, 512) for off in offsets), return_exceptions=True
            )
            for off, got in zip(offsets, results, strict=True):
                if off // 65536 >= 4:
                    assert isinstance(got, NbdError) and got.errno == c.EINVAL
                else:
                    assert got == (bytes(range(256)) * 2)
            await client.disconnect()
    finally:
        MemoryView.read = original_read  # type: ignore[method-assign]


async def test_a_client_that_never_negotiates_is_dropped(server: NbdServer, tmp_path: Path) -> None:
    server.handshake_timeout = 0.2
    reader, writer = await raw_connection(tmp_path)  # greeted, then silent
    assert await read_until_closed(reader) == b""
    writer.close()
    # One that finishes in time keeps its connection however long it then stays idle.
    client = await connect(tmp_path)
    await asyncio.sleep(0.4)
    assert await client.read(0, 4) == bytes(4)
    await client.disconnect()
    await wait_for(lambda: server.connection_count == 0)


async def test_tcp_connections_use_keepalive(server: NbdServer) -> None:
    import socket

    client = await NbdClient.connect("vol", host="127.0.0.1", port=server.tcp_port)
    (conn,) = server._connections
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    await client.disconnect()


async def test_a_burst_of_large_reads_is_bounded_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of 1 MiB READs arriving in one go never have more than the in-flight byte
    limit being served at once (each would hold its data in memory)."""
    from owm.nbd import server as server_module

    monkeypatch.setattr(server_module, "MAX_INFLIGHT_BYTES", 16 * 1024 * 1024)
    exports = MemoryExports(size=64 * 1024 * 1024, delay=0.002)
    active = peak = 0
    original = MemoryView.read

    async def read(self: MemoryView, offset: int, length: int) -> bytes:
        nonlocal active, peak
        active += length
        peak = max(peak, active)
        try:
            return await original(self, offset, length)
        finally:
            active -= length

    monkeypatch.setattr(MemoryView, "read", read)
    async with serve(exports, tmp_path):
        client = await connect(tmp_path)
        mib = 1024 * 1024
        results = await asyncio.gather(*(client.read((i % 64) * mib, mib) for i in range(300)))
        assert all(r == bytes(mib) for r in results)
        assert 8 * mib <= peak <= 17 * mib
        await client.disconnect()
