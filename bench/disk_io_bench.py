#!/usr/bin/env python3
"""CPU per small write on a real file system, for each way of keeping the event loop off the disk.

Issue 17: ext4 refuses ``RWF_NOWAIT`` buffered writes, so every small write must leave the event
loop somehow.  This times the candidates on one file (``--dir``, default ``/var/tmp``), 4 KiB
overwrites at random offsets of a pre-filled file, ``--depth`` writers at once (the NBD queue
depth), and prints the process's CPU (all threads, kernel included) per write:

* ``inline``: ``os.pwrite`` in the loop (the floor; it blocks the loop when the disk does);
* ``executor``: ``run_in_executor`` per write;
* ``storage``: ``owm.storage.local.LocalStorage`` (what owm does: queued writes, one thread hop
  and one ``io_submit`` per batch);
* ``storage-pwritev``: the same queue written with one ``pwritev`` per run of contiguous writes
  (what owm did before: the GIL is released and taken back around every write);
* ``caio-aio`` / ``caio-uring``: the ``caio`` package's Linux AIO and io_uring contexts (when
  installed; Linux AIO on a buffered file runs synchronously in the submitting thread).

    .venv/bin/python bench/disk_io_bench.py [--dir /var/tmp] [--writes 20000] [--depth 16]
                                            [--only inline,storage] [--size 4096] [--busy 10]
                                            [--burst] [--folios]

``--busy US`` makes every writer spend that long in Python before each write, as the NBD server
does for a request (with an idle loop a thread hop looks cheaper than it is in the server).
``--folios`` instead measures what a 4 KiB overwrite costs the kernel in a 512 MiB file whose page
cache was written 4K, 64K or 1M at a time (ext4 sizes a folio after the write that made it).

One run each on whatever machine this is: on a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FILE_SIZE = 64 << 20
BURST = False
BUSY = 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(write: Callable[[int], Awaitable[object]], count: int, depth: int,
                 bs: int) -> tuple[float, float]:
    rng = random.Random(1)
    offsets = [rng.randrange(FILE_SIZE // bs) * bs for _ in range(count)]
    per = count // depth

    async def worker(k: int) -> None:
        for off in offsets[k * per:(k + 1) * per]:
            if BUSY:
                _spin(BUSY)
            await write(off)

    async def bursts() -> None:
        for k in range(0, count, depth):
            await asyncio.gather(*(write(off) for off in offsets[k:k + depth]))

    cpu, wall = _cpu(), time.perf_counter()
    if BURST:
        await bursts()
    else:
        await asyncio.gather(*(worker(k) for k in range(depth)))
    return _cpu() - cpu, time.perf_counter() - wall


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _folios(directory: str, count: int) -> None:
    size = 512 << 20  # the effect grows with the file: at 64 MiB 1M pieces cost far less
    data = os.urandom(4096)
    for fill in (4096, 65536, 1 << 20):
        path = Path(directory) / f"owm-folios-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            piece = os.urandom(fill)
            for off in range(0, size, fill):
                os.pwrite(fd, piece, off)
            rng = random.Random(1)
            offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
            cpu = _cpu()
            for off in offsets:
                os.pwrite(fd, data, off)
            per = (_cpu() - cpu) / count
            print(f"page cache written {fill // 1024:>5}K at a time: {per * 1e6:5.1f} us CPU per "
                  f"4K overwrite  (load {os.getloadavg()[0]:.1f})")
        finally:
            os.close(fd)
            path.unlink()


async def _candidate(name: str, path: Path, count: int, depth: int, bs: int) -> tuple[float, float]:
    data = os.urandom(bs)
    loop = asyncio.get_running_loop()
    if name in ("storage", "storage-pwritev"):
        from owm.storage.local import LocalStorage

        storage = LocalStorage(path.parent)
        storage._write_mode = None  # queued, as on ext4 (on tmpfs, writes would run inline)
        if name == "storage-pwritev" and storage._batch_writer is not None:
            storage._batch_writer.close()
            storage._batch_writer = None
        try:
            return await _drive(lambda off: storage.write(path.name, off, data), count, depth, bs)
        finally:
            await storage.close()
    fd = os.open(path, os.O_RDWR)
    try:
        if name == "inline":
            return await _drive(lambda off: _now(os.pwrite(fd, data, off)), count, depth, bs)
        if name == "executor":
            return await _drive(lambda off: loop.run_in_executor(None, os.pwrite, fd, data, off),
                                count, depth, bs)
        if name in ("caio-aio", "caio-uring"):
            if name == "caio-aio":
                from caio.linux_aio_asyncio import AsyncioContext
                ctx = AsyncioContext(max_requests=depth * 2)
            else:
                from caio.linux_uring_asyncio import AsyncioContext  # type: ignore[no-redef]
                ctx = AsyncioContext(max_requests=depth * 2, deferred=True)
            try:
                return await _drive(lambda off: ctx.write(data, fd, off), count, depth, bs)
            finally:
                ctx.close()
        raise SystemExit(f"no candidate {name!r}")
    finally:
        os.close(fd)


async def _now(value: object) -> object:
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096, help="bytes per write")
    ap.add_argument("--only",
                    default="inline,executor,storage,storage-pwritev,caio-aio,caio-uring")
    ap.add_argument("--busy", type=float, default=0.0, help="us of Python work per request")
    ap.add_argument("--folios", action="store_true", help="the page-cache folio cost instead")
    ap.add_argument("--burst", action="store_true",
                    help="writes in bursts of --depth that all end before the next burst")
    args = ap.parse_args()
    global BURST, BUSY
    BURST, BUSY = args.burst, args.busy / 1e6
    if args.folios:
        _folios(args.dir, args.writes)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="owm-diskio-") as tmp:
        path = Path(tmp) / "obj"
        with open(path, "wb") as f:  # pre-filled: the writes are overwrites, as in W2
            for _ in range(FILE_SIZE >> 20):
                f.write(os.urandom(1 << 20))
        for name in args.only.split(","):
            try:
                cpu, wall = asyncio.run(_candidate(name, path, args.writes, args.depth,
                                                   args.size))
            except ImportError as exc:
                print(f"{name:12s} not installed ({exc.name})")
                continue
            print(f"{name:12s} {cpu / args.writes * 1e6:7.1f} us CPU per write, "
                  f"{args.writes / wall:9,.0f} writes/s  (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
