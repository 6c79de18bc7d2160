"""Real NBD clients against owm's server on a real pool: qemu-io, qemu-img, nbdinfo, qemu-nbd,
nbdcopy, fio and libnbd's Python bindings, on a volume of each method (cow, log, mirror), a
preserved image of it, and across a preserve.  Also owm's own client against nbdkit and
qemu-nbd, so both ends of owm's NBD are checked against independent implementations.

Every tool runs as an asyncio subprocess (the server shares the test's event loop), bounded in
time; Debian's libnbd bindings run under /usr/bin/python3 through tests/helpers/libnbd_driver.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from nbd_fixtures import SYSTEM_PYTHON, have, have_libnbd_python, nbd_uri, run, wait_for

from owm.nbd import constants as c
from owm.nbd.client import NbdClient, NbdError
from owm.nbd.server import NbdServer
from owm.pool.pool import Pool

pytestmark = [
    pytest.mark.clients,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture'),
    pytest.mark.skipif(
        not have("qemu-io", "qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy", "nbdkit", "fio"),
        reason="the NBD client tools are not installed (scripts/setup installs them)",
    ),
]

METHODS = ["cow", "log", "mirror"]
SIZE = 64 * 1024 * 1024
MIB = 1024 * 1024
DRIVER = Path(__file__).parent / "helpers" / "libnbd_driver.py"
needs_libnbd = pytest.mark.skipif(not have_libnbd_python(), reason="python3-libnbd missing")


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


@dataclass
class Env:
    pool: Pool
    server: NbdServer
    sock: Path
    tmp: Path

    def uri(self, export: str) -> str:
        return nbd_uri(self.sock, export)

    async def client(self, export: str) -> NbdClient:
        return await NbdClient.connect(export, unix_path=str(self.sock))

    async def sessions(self, volume: str) -> int:
        status = self.pool.status(volume)[0]
        return sum(len(g["sessions"]) for g in status["generations"])


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    pool = await Pool.open(tmp_path / "pool")
    for method in METHODS:
        await pool.create_volume(method, SIZE, method=method, chunk_size=65536)
    server = NbdServer(pool)
    sock = tmp_path / "nbd.sock"
    await server.start(unix_path=str(sock))
    try:
        yield Env(pool, server, sock, tmp_path)
    finally:
        await server.stop(grace=5.0)
        await pool.close()


async def qemu_io(uri: str, *commands: str, check: bool = True) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for cmd in commands:
        argv += ["-c", cmd]
    result = await run(*argv, uri, check=check)
    return result.stdout + result.stderr


class Libnbd:
    """One long-lived libnbd handle in a /usr/bin/python3 subprocess."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls) -> Libnbd:
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            str(DRIVER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line, "the libnbd driver died"
        result: dict[str, Any] = json.loads(line)
        return result

    async def ok(self, op: str, **args: Any) -> dict[str, Any]:
        result = await self(op, **args)
        assert result["ok"], result
        return result

    async def error(self, op: str, **args: Any) -> str:
        result = await self(op, **args)
        assert not result["ok"], result
        return str(result["errno"])

    async def close(self) -> None:
        if self.proc.returncode is None:
            with_quit = self.proc.stdin is not None and not self.proc.stdin.is_closing()
            if with_quit:
                await self("quit")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


# ----------------------------------------------------------------------------- qemu


@pytest.mark.parametrize("method", METHODS)
async def test_qemu_io_patterns(env: Env, method: str) -> None:
    uri = env.uri(method)
    out = await qemu_io(
        uri,
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -z 64k 64k",
        "read -P 0 64k 64k",
        "write -z -u 128k 192k",
        "read -P 0 128k 192k",
        "write -z -u -n 320k 64k",
        "read -P 0 320k 64k",
        "discard 1M 1M",
        "flush",
        "write -f -P 0xcd 4M 4k",
        "read -P 0xcd 4M 4k",
        "aio_write -P 0x11 8M 64k",
        "aio_write -P 0x22 9M 64k",
        "aio_flush",
        "read -P 0x11 8M 64k",
        "read -P 0x22 9M 64k",
        "read -P 0xab 384k 640k",
        "write -P 0x33 1000 3000",
        "read -P 0x33 1000 3000",
    )
    assert "failed" not in out, out
    # Zeroes that must stay allocated cannot be fast: refused, and nothing changes.
    out = await qemu_io(uri, "write -z -n 512k 4k", check=False)
    assert "Operation not supported" in out
    await qemu_io(uri, "read -P 0xab 512k 4k")
    # Every qemu-io session ended with a clean disconnect.
    await wait_for(lambda: env.server.connection_count == 0)
    assert await env.sessions(method) == 0


@pytest.mark.parametrize("method", METHODS)
async def test_qemu_img_info_map_convert_compare(env: Env, method: str) -> None:
    uri = env.uri(method)
    await qemu_io(uri, "write -P 0x5a 0 1M", "write -P 0xa5 32M 64k")
    info = json.loads((await run("qemu-img", "info", "--output=json", uri)).stdout)
    assert info["virtual-size"] == SIZE and info["format"] == "raw"
    ranges = json.loads((await run("qemu-img", "map", "--output=json", "-f", "raw", uri)).stdout)
    assert sum(r["length"] for r in ranges) == SIZE
    data = [(r["start"], r["length"]) for r in ranges if r["data"]]
    assert any(s <= 0 and s + n >= MIB for s, n in data), ranges
    assert any(s <= 32 * MIB and s + n >= 32 * MIB + 65536 for s, n in data), ranges
    # Out to a file, and a random file back in.
    copy = env.tmp / "copy.raw"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy))
    assert copy.stat().st_size == SIZE
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy), uri)
    src = env.tmp / "src.raw"
    src.write_bytes(random.randbytes(SIZE // 2) + bytes(SIZE // 2))
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    different = await run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(copy), uri, check=False
    )
    assert different.returncode == 1


async def test_qemu_nbd_list(env: Env) -> None:
    image = await env.pool.preserve("cow")
    out = (await run("qemu-nbd", "-L", "-k", str(env.sock))).stdout
    for name in [*METHODS, image]:
        assert f"export: '{name}'" in out
    assert "live volume, cow" in out and "preserved image 0" in out
    assert "base:allocation" in out
    assert re.search(r"flags: 0x[0-9a-f]+ \( readonly", out)


# ----------------------------------------------------------------------------- libnbd tools


async def test_nbdinfo(env: Env) -> None:
    await qemu_io(env.uri("log"), "write -P 1 0 2M")
    image = await env.pool.preserve("log")
    listing = (await run("nbdinfo", "--list", "--json", env.uri(""))).stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {*METHODS, image}
    assert exports["log"]["description"].startswith("live volume, log")
    assert exports[image]["description"].startswith("preserved image 0")
    assert exports[image]["is_read_only"] and not exports["log"]["is_read_only"]
    assert (await run("nbdinfo", "--size", env.uri("log"))).stdout.strip() == str(SIZE)
    for export in ("log", image):
        await run("nbdinfo", "--can", "multi-conn", env.uri(export))
    await run("nbdinfo", "--is", "read-only", env.uri(image))
    totals = (await run("nbdinfo", "--map", "--totals", env.uri(image))).stdout
    rows = {int(m[3]): int(m[1]) for m in re.finditer(r"(\d+)\s+([\d.]+)%\s+(\d+)", totals)}
    assert sum(rows.values()) == SIZE
    assert rows.get(0, 0) >= 2 * MIB  # the written data is allocated


# ----------------------------------------------------------------------------- nbdcopy


@pytest.mark.parametrize("method", METHODS)
async def test_nbdcopy_both_directions_with_several_connections(env: Env, method: str) -> None:
    src = env.tmp / "src.raw"
    content = random.randbytes(24 * MIB) + bytes(16 * MIB) + random.randbytes(24 * MIB)
    src.write_bytes(content)
    opened: list[str] = []
    open_export = env.pool.open_export

    async def spy(name: str, peer: str) -> Any:
        opened.append(name)
        return await open_export(name, peer)

    env.pool.open_export = spy  # type: ignore[method-assign]
    await run(
        "nbdcopy", "-C", "4", "-T", "4", "--requests=16", str(src), env.uri(method), timeout=120
    )
    assert opened.count(method) == 4  # multi-conn is offered, so nbdcopy used 4 connections
    back = env.tmp / "back.raw"
    await run("nbdcopy", "-C", "4", env.uri(method), str(back), timeout=120)
    assert back.read_bytes() == content
    # A backup tool pulls a drained preserved image the same way.
    image = await env.pool.preserve(method)
    assert await env.pool.wait_drained(image, 10)
    await qemu_io(env.uri(method), "write -P 0xee 0 8M")  # the live volume moves on
    pulled = env.tmp / "image.raw"
    await run("nbdcopy", "-C", "4", env.uri(image), str(pulled), timeout=120)
    assert pulled.read_bytes() == content


# ----------------------------------------------------------------------------- fio


@pytest.mark.parametrize("method", METHODS)
async def test_fio_verify(env: Env, method: str) -> None:
    result = await run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={env.uri(method)}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--runtime=60",
        "--output-format=json",
        timeout=120,
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MIB
    assert job["read"]["io_bytes"] == 8 * MIB  # everything written was read back and verified


# ----------------------------------------------------------------------------- libnbd


@needs_libnbd
@pytest.mark.parametrize("method", METHODS)
async def test_libnbd_session_across_a_preserve(env: Env, method: str) -> None:
    old = await Libnbd.start()
    try:
        info = await old.ok("connect", uri=env.uri(method))
        assert info["size"] == SIZE and info["multi_conn"] and info["structured"]
        await old.ok("pwrite", off=0, len=65536, byte=0x41)
        image = await env.pool.preserve(method)
        assert image == f"{method}@0"
        assert not await env.pool.wait_drained(image, 0.1)  # the old session holds it
        # The old session's writes go to the image and the live volume ...
        await old.ok("pwrite", off=65536, len=65536, byte=0x42)
        await old.ok("pipelined", off=2 * MIB, count=64, len=4096, byte=0x44)
        # ... a new session's only to the live volume, which the old session does not see.
        async with await env.client(method) as new:
            await new.write(131072, b"C" * 65536)
        assert (await old.ok("pread", off=131072, len=65536))["bytes"] == [0]
        await old.ok("flush")
        await old.ok("shutdown")  # a clean disconnect ends the session: the image drains
        assert await env.pool.wait_drained(image, 10)
        status = env.pool.status(method)[0]
        (img,) = status["images"]
        assert (img["state"], img["consistency"]) == ("drained", "transaction-consistent")
        async with await env.client(image) as ro:
            assert ro.read_only
            assert await ro.read(0, 131072) == b"A" * 65536 + b"B" * 65536
            assert await ro.read(131072, 65536) == bytes(65536)
            assert await ro.read(2 * MIB, 64 * 4096) == b"D" * 64 * 4096
            with pytest.raises(NbdError) as err:
                await ro.write(0, b"x")
            assert err.value.errno == c.EPERM
        async with await env.client(method) as live:
            expected = b"A" * 65536 + b"B" * 65536 + b"C" * 65536
            assert await live.read(0, 3 * 65536) == expected
    finally:
        await old.close()


@needs_libnbd
async def test_libnbd_killed_session_marks_the_image_unclean(env: Env) -> None:
    proc = await Libnbd.start()
    await proc.ok("connect", uri=env.uri("cow"))
    await proc.ok("pwrite", off=0, len=4096, byte=1)
    image = await env.pool.preserve("cow")
    proc.kill()
    await proc.proc.wait()
    assert await env.pool.wait_drained(image, 10)
    (img,) = env.pool.status("cow")[0]["images"]
    assert img["state"] == "drained-unclean" and img["unclean_sessions"] == 1


@needs_libnbd
async def test_libnbd_deliberately_bad_requests(env: Env) -> None:
    image = await env.pool.preserve("cow")
    h = await Libnbd.start()
    try:
        await h.ok("connect", uri=env.uri("cow"), strict=False)
        await h.ok("pwrite", off=0, len=4096, byte=7)
        assert await h.error("pread", off=SIZE - 100, len=4096) == "EINVAL"
        assert await h.error("pread", off=SIZE + 4096, len=1) == "EINVAL"
        assert await h.error("pwrite", off=SIZE - 100, len=4096, byte=1) == "ENOSPC"
        assert await h.error("zero", off=SIZE - 100, len=4096) == "ENOSPC"
        assert await h.error("trim", off=SIZE, len=4096) == "EINVAL"
        assert await h.error("block_status", off=SIZE, len=4096) == "EINVAL"
        # A payload over the advertised maximum is read and refused; the stream stays in step.
        assert await h.error("pwrite", off=0, len=32 * MIB + 4096, byte=9) == "EINVAL"
        assert await h.error("pread", off=0, len=32 * MIB + 4096) == "EINVAL"
        # Flags that do not belong to the command.
        assert await h.error("pread", off=0, len=512, flags=c.CMD_FLAG_REQ_ONE) == "EINVAL"
        assert await h.error("pwrite", off=0, len=512, flags=c.CMD_FLAG_NO_HOLE) == "EINVAL"
        fast_no_hole = c.CMD_FLAG_FAST_ZERO | c.CMD_FLAG_NO_HOLE
        assert await h.error("zero", off=0, len=4096, flags=fast_no_hole) == "ENOTSUP"
        # Zero-length requests are harmless.
        assert (await h.ok("pread", off=0, len=0))["len"] == 0
        await h.ok("pwrite", off=0, len=0)
        # After all that, the session still works.
        assert (await h.ok("pread", off=0, len=4096))["bytes"] == [7]
        one = await h.ok("block_status", off=0, len=SIZE, flags=c.CMD_FLAG_REQ_ONE)
        assert len(one["extents"]) == 1
        await h.ok("cache", off=0, len=65536)
        await h.ok("shutdown")
        # The preserved image refuses every kind of write.
        await h.ok("connect", uri=env.uri(image), strict=False)
        assert (await h.ok("info"))["read_only"]
        assert await h.error("pwrite", off=0, len=4096, byte=1) == "EPERM"
        assert await h.error("trim", off=0, len=4096) == "EPERM"
        assert await h.error("zero", off=0, len=4096) == "EPERM"
        # The session that wrote 7s opened after the preserve: the image never saw them.
        assert (await h.ok("pread", off=0, len=4096))["bytes"] == [0]
        await h.ok("shutdown")
    finally:
        await h.close()


# ----------------------------------------------------------------------------- our client


@pytest.fixture(params=["nbdkit", "qemu-nbd"])
async def foreign_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    sock = tmp_path / "foreign.sock"
    if request.param == "nbdkit":
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "memory", "64M"]
    else:
        disk = tmp_path / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        argv = [
            "qemu-nbd",
            "-k",
            str(sock),
            "-f",
            "raw",
            "-x",
            "disk",
            "--shared=4",
            "--persistent",
            "--cache=writeback",
            str(disk),
        ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_for(lambda: sock.exists(), timeout=20)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 3)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_owm_client_against_other_servers(foreign_server: str) -> None:
    exports = await NbdClient.list_exports(unix_path=foreign_server)
    assert len(exports) == 1
    name = exports[0][0]
    client = await NbdClient.connect(name, unix_path=foreign_server)
    assert client.size == SIZE and client.structured
    data = random.randbytes(3 * MIB)
    await asyncio.gather(
        client.write(MIB, data, fua=True),
        client.write(0, b"head" * 1024),
    )
    assert await client.read(MIB, len(data)) == data
    await client.flush()
    await client.write_zeroes(MIB, MIB)
    assert await client.read(MIB, MIB) == bytes(MIB)
    status = await client.block_status(0, SIZE)
    assert sum(n for n, _ in status) == SIZE
    assert status[-1][1] & c.STATE_ZERO
    await client.trim(16 * MIB, MIB)
    reads = await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(64)))
    assert b"".join(reads[:1]) == b"head" * 1024
    await client.disconnect()
