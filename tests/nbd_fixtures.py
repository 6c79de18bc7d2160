"""Shared helpers of the NBD tests: an in-memory Exports, servers on temporary sockets, tools.

``MemoryExports`` is a fake of ``owm.common.view.Exports`` with a bytearray per export and a 4 KiB
allocation map (so block status has holes and data to report); it records every open and close
so tests can check which sessions ended cleanly.  The NBD tests use it where the server alone
is under test; tests that are about owm's storage use a real ``owm.pool.Pool``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.common.errors import NotFound, OutOfRange, ReadOnly
from owm.common.view import ExportInfo, Extent
from owm.nbd.server import NbdServer

BLOCK = 4096


@dataclass
class MemoryDisk:
    """One export's bytes and which 4 KiB blocks are allocated."""

    info: ExportInfo
    data: bytearray
    allocated: set[int] = field(default_factory=set)
    flushes: int = 0
    fua_writes: int = 0


class MemoryView:
    """A view of a MemoryDisk; optional ``delay`` makes every request yield to the loop."""

    def __init__(self, exports: MemoryExports, disk: MemoryDisk, peer: str) -> None:
        self.exports = exports
        self.disk = disk
        self.peer = peer
        self.export_name = disk.info.name
        self.size = disk.info.size
        self.read_only = disk.info.read_only
        self.closed: bool | None = None  # the ``clean`` it was closed with

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange("The request reaches past the end of the volume.")

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly("The export is read-only.")

    async def _yield(self) -> None:
        if self.exports.delay:
            await asyncio.sleep(self.exports.delay)

    def _set_allocated(self, offset: int, length: int, allocated: bool) -> None:
        first = offset // BLOCK
        last = (offset + length + BLOCK - 1) // BLOCK
        if allocated:
            self.disk.allocated.update(range(first, last))
            return
        # Only whole blocks become holes.
        first = (offset + BLOCK - 1) // BLOCK
        last = (offset + length) // BLOCK
        self.disk.allocated.difference_update(range(first, last))

    async def read(self, offset: int, length: int) -> bytes:
        self._range(offset, length)
        await self._yield()
        return bytes(memoryview(self.disk.data)[offset : offset + length])

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        self._writable()
        self._range(offset, len(data))
        await self._yield()
        self.disk.data[offset : offset + len(data)] = data
        self._set_allocated(offset, len(data), True)
        if fua:
            self.disk.fua_writes += 1

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, fua, may_trim=True)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._writable()
        self._range(offset, length)
        await self._yield()
        self.disk.data[offset : offset + length] = bytes(length)
        self._set_allocated(offset, length, not may_trim)
        if may_trim:
            # Partial blocks at the edges stay allocated (they hold other data).
            pass

    async def flush(self) -> None:
        await self._yield()
        self.disk.flushes += 1

    async def cache(self, offset: int, length: int) -> None:
        self._range(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._range(offset, length)
        await self._yield()
        out: list[Extent] = []
        pos = offset
        end = offset + length
        while pos < end:
            block = pos // BLOCK
            hole = block not in self.disk.allocated
            run_end = min(end, (block + 1) * BLOCK)
            while run_end < end and ((run_end // BLOCK) not in self.disk.allocated) == hole:
                run_end = min(end, run_end + BLOCK)
            out.append(Extent(run_end - pos, hole=hole, zero=hole))
            pos = run_end
        return out

    async def close(self, clean: bool = True) -> None:
        self.closed = clean
        self.exports.closed.append((self.export_name, clean))


class MemoryExports:
    """A fake owm.common.view.Exports: ``vol`` (read-write) and ``vol@0`` (read-only) by default."""

    def __init__(self, size: int = 64 * 1024 * 1024, *, delay: float = 0.0) -> None:
        self.disks: dict[str, MemoryDisk] = {}
        self.opened: list[tuple[str, str]] = []
        self.closed: list[tuple[str, bool]] = []
        self.views: list[MemoryView] = []
        self.delay = delay
        self.add("vol", size, "live volume, memory, fake")
        self.add("vol@0", size, "preserved image 0, drained", read_only=True)

    def add(
        self,
        name: str,
        size: int,
        description: str = "",
        read_only: bool = False,
        **info: Any,
    ) -> MemoryDisk:
        disk = MemoryDisk(ExportInfo(name, description, size, read_only, **info), bytearray(size))
        self.disks[name] = disk
        return disk

    def list_exports(self) -> list[ExportInfo]:
        return [d.info for d in self.disks.values()]

    def export_info(self, name: str) -> ExportInfo:
        disk = self.disks.get(name)
        if disk is None:
            raise NotFound(f"There is no export named {name!r}.")
        return disk.info

    async def open_export(self, name: str, peer: str) -> MemoryView:
        disk = self.disks.get(name)
        if disk is None:
            raise NotFound(f"There is no export named {name!r}.")
        self.opened.append((name, peer))
        view = MemoryView(self, disk, peer)
        self.views.append(view)
        return view


@asynccontextmanager
async def serve(exports: object, tmp_path: Path, tcp: bool = False) -> AsyncIterator[NbdServer]:
    """An NbdServer on ``tmp_path/nbd.sock`` (and 127.0.0.1:free port with ``tcp``)."""
    server = NbdServer(exports)  # type: ignore[arg-type]
    await server.start(tcp=("127.0.0.1", 0) if tcp else None, unix_path=str(tmp_path / "nbd.sock"))
    try:
        yield server
    finally:
        await server.stop(grace=5.0)


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    """Poll ``predicate()`` until it is true (bounded)."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


SYSTEM_PYTHON = "/usr/bin/python3"


def have_libnbd_python() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    return result.returncode == 0


def nbd_uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


async def run(
    *argv: str, timeout: float = 60.0, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool without blocking the loop the server runs on; bounded in time."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[0]} did not finish in {timeout} s") from None
    result = subprocess.CompletedProcess(
        list(argv), proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}"
        )
    return result
