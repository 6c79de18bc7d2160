"""Helpers for the backup tests: write known data through NBD, read images back, run the CLI."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import uvloop
from cli_helpers import ok, one_sentence
from conftest import Daemon

from owm.nbd.client import NbdClient

Writes = list[tuple[int, bytes]]


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def refused(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The expected non-zero exit and one plain sentence on stderr, never a traceback."""
    return one_sentence(result, code, full_stop=True)


def create(daemon: Daemon, name: str = "vol", size: str = "8M", *extra: str) -> None:
    ok(daemon.owm("volume", "create", name, "--size", size, *extra))


def preserve(daemon: Daemon, name: str = "vol") -> str:
    return ok(daemon.owm("preserve", name)).strip()


async def _write(daemon: Daemon, export: str, writes: Writes, zero: list[tuple[int, int]]) -> None:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    try:
        await asyncio.gather(*(client.write(o, d) for o, d in writes))
        for offset, length in zero:
            await client.write_zeroes(offset, length)
        await client.flush()
    finally:
        await client.disconnect()


def write(daemon: Daemon, writes: Writes, export: str = "vol",
          zero: list[tuple[int, int]] | None = None) -> None:
    """Write through NBD in one session that ends cleanly."""
    asyncio.run(_write(daemon, export, writes, zero or []))


async def _read(daemon: Daemon, export: str, into: list[bytes]) -> None:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    step = 1 << 20
    window = asyncio.Semaphore(8)

    async def piece(offset: int) -> bytes:
        async with window:
            return await client.read(offset, min(step, client.size - offset))

    try:
        parts = await asyncio.gather(*(piece(o) for o in range(0, client.size, step)))
        into.append(b"".join(parts))
    finally:
        await client.disconnect()


def read_image(daemon: Daemon, export: str) -> bytes:
    # Not returned from the coroutine: the runner repr()s its main task, result and all,
    # which takes seconds for a 100 MiB bytes object.
    into: list[bytes] = []
    uvloop.run(_read(daemon, export, into))
    return into[0]


def random_writes(rng: random.Random, size: int, count: int, max_len: int = 200_000) -> Writes:
    """Writes of random bytes at random, unaligned places (some overlap chunk boundaries)."""
    out: Writes = []
    for _ in range(count):
        length = rng.randint(1, max_len)
        offset = rng.randrange(0, size - length)
        out.append((offset, rng.randbytes(length)))
    return out


def repo_list(daemon: Daemon, repo: Path) -> list[dict[str, Any]]:
    listed = ok_json(daemon.owm("backup", "list", repo, "--json"))
    assert isinstance(listed, list)
    return listed


async def _fill_random(daemon: Daemon, size: int, export: str) -> None:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    try:
        for offset in range(0, size, 8 << 20):
            await client.write(offset, random.randbytes(min(8 << 20, size - offset)))
        await client.flush()
    finally:
        await client.disconnect()


def fill_random(daemon: Daemon, size: int, export: str = "vol") -> None:
    """Write ``size`` bytes of random (incompressible) data from offset 0, then flush."""
    asyncio.run(_fill_random(daemon, size, export))
