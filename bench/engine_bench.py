"""Engine-level write cost with and without a preserve, and the cost of a preserve itself.

For each method and each backing (tmpfs and the disk), 4 KiB writes at queue depth 16 go straight
to the Pool (no NBD) in three phases over the same set of distinct chunks:

  plain        no preserve outstanding
  first write  a preserve outstanding, every write the first to its chunk since the preserve
               (cow copies the chunk out, log allocates a delta chunk, mirror marks it dirty)
  copied       the same chunks again: the copy or entry already exists

and the ratios of their per-write cost to the plain one, with the process's CPU time (every
thread: the event loop and the storage's pool) per write in the plain and first-write phases.
Then the median time of ``preserve`` on a 1 TiB sparse volume and on a 1 MiB one (it should not
depend on the size).  Prints one table; nothing is asserted.

    .venv/bin/python bench/engine_bench.py [--writes N] [--disk DIR] [--tmpfs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import uvloop
from rich.console import Console
from rich.table import Table

from owm.pool.pool import Pool

CHUNK = 64 * 1024
BLOCK = 4096
DEPTH = 16


CPU: dict[str, float] = {}  # microseconds of process CPU per write, by the last phase's name


async def _run_writes(session: object, offsets: list[int], payload: bytes,
                      phase: str = "") -> float:
    """Writes per second for one pass over offsets at queue depth DEPTH."""
    queue = iter(offsets)

    async def worker() -> None:
        for off in queue:
            await session.write(off, payload)  # type: ignore[attr-defined]

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(DEPTH)))
    if phase:
        CPU[phase] = (time.process_time() - cpu) * 1e6 / len(offsets)
    return len(offsets) / (time.perf_counter() - start)


async def measure(root: Path, method: str, writes: int) -> dict[str, float]:
    pool = await Pool.open(root)
    try:
        size = max(writes * 2, 4096) * CHUNK
        await pool.create_volume("b", size, method, CHUNK)
        rng = random.Random(1)
        chunks = rng.sample(range(size // CHUNK), writes)
        offsets = [c * CHUNK + rng.randrange(CHUNK // BLOCK) * BLOCK for c in chunks]
        payload = random.randbytes(BLOCK)
        s = await pool.open_export("b", "bench")
        await _run_writes(s, offsets, payload)  # allocate the chunks: plain means overwrite
        plain = await _run_writes(s, offsets, payload, "plain")
        await s.close()
        await pool.preserve("b")
        s = await pool.open_export("b", "bench")
        first = await _run_writes(s, offsets, payload, "first")
        copied = await _run_writes(s, offsets, payload)
        await s.close()
        return {"plain": plain, "first": first, "copied": copied,
                "plain_cpu": CPU["plain"], "first_cpu": CPU["first"]}
    finally:
        await pool.close()


async def preserve_time(root: Path, method: str, size: int, rounds: int = 5) -> float:
    pool = await Pool.open(root)
    try:
        await pool.create_volume("t", size, method, CHUNK, legs=rounds + 1)
        s = await pool.open_export("t", "bench")
        await s.write(0, b"x" * BLOCK)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            await pool.preserve("t")
            times.append(time.perf_counter() - start)
            await s.write(0, b"y" * BLOCK)
        await s.close()
        return statistics.median(times) * 1000
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=4000, help="distinct chunks per phase")
    parser.add_argument("--tmpfs", default="/dev/shm", help="a directory on tmpfs")
    parser.add_argument("--disk", default="/var/tmp", help="a directory on the disk")
    parser.add_argument("--methods", default="cow,log,mirror")
    args = parser.parse_args()
    table = Table(title=f"owm engine: 4 KiB writes/s at queue depth {DEPTH}, {CHUNK >> 10} KiB "
                  "chunks (cost ratio = plain rate / rate)")
    for col in ("backing", "method", "plain w/s", "plain CPU µs/w", "first write w/s",
                "first CPU µs/w", "first ÷ plain cost",
                "copied w/s", "copied ÷ plain cost", "preserve 1 TiB", "preserve 1 MiB"):
        table.add_column(col, justify="right")
    for label, base in (("tmpfs", args.tmpfs), ("disk", args.disk)):
        for method in args.methods.split(","):
            root = Path(tempfile.mkdtemp(prefix="owm-bench-", dir=base))
            try:
                r = await measure(root / "pool", method, args.writes)
                big = await preserve_time(root / "pool2", method, 1 << 40)
                small = await preserve_time(root / "pool3", method, 1 << 20)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            table.add_row(label, method, f"{r['plain']:,.0f}", f"{r['plain_cpu']:.0f}",
                          f"{r['first']:,.0f}", f"{r['first_cpu']:.0f}",
                          f"{r['plain'] / r['first']:.2f}×", f"{r['copied']:,.0f}",
                          f"{r['plain'] / r['copied']:.2f}×", f"{big:.2f} ms",
                          f"{small:.2f} ms")
    Console().print(table)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
