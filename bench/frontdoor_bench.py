#!/usr/bin/env python3
"""What the cluster's front door costs: the same fio jobs through a non-owner and on the owner.

One ``owm serve`` on a throw-away pool owns one volume.  A front door (an ``NbdServer`` on an
empty pool of its own, with a fixed directory naming that daemon as the owner; this script
starts it as a second process, ``--front-door``, so that its CPU is counted apart) forwards
to it.  fio's nbd engine runs each job once directly against the owner and once through the
front door:

* 4K random writes, queue depth 16;
* 4K random reads, queue depth 16;

and the table gives IOPS and mean latency of both, the ratio front door / direct, and the
server CPU per I/O of each process (user + system time from /proc over the job, divided by the
I/Os done).

    .venv/bin/python bench/frontdoor_bench.py [--runtime 5] [--size 256M]

Figures on a shared, loaded machine are noisy: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS = [("4K randwrite QD16", "randwrite", "write"), ("4K randread QD16", "randread", "read")]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_for_line(log: Path, proc: subprocess.Popen[bytes], marker: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"a server exited early:\n{log.read_text()}")
        for line in log.read_text(errors="replace").splitlines():
            if marker in line:
                return line
        time.sleep(0.05)
    sys.exit(f"a server did not start:\n{log.read_text()}")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)


def fio(uri: str, rw: str, runtime: int, size: str) -> dict[str, object]:
    result = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         "--iodepth=16", f"--size={size}", f"--runtime={runtime}", "--time_based",
         "--output-format=json"],
        capture_output=True, text=True, timeout=runtime + 60, check=True,
    )
    job: dict[str, object] = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    return job


async def front_door(owner: str, pool: Path) -> None:
    """The second process: a front door that forwards every export to ``owner``."""
    from owm.common.cluster import Remote
    from owm.nbd.server import NbdServer
    from owm.pool.pool import Pool

    host, port = owner.rsplit(":", 1)
    remote = Remote("owner", (host, int(port)), None)

    class Fixed:
        async def locate(self, volume: str) -> Remote | None:
            return remote

        async def exports(self) -> list[str]:
            return []

    local = await Pool.open(pool)
    server = NbdServer(local, directory=Fixed())
    await server.start(tcp=("127.0.0.1", 0))
    print(f"front door on 127.0.0.1:{server.tcp_port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()
    await local.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--size", default="256M", help="the volume's size")
    parser.add_argument("--front-door", nargs=2, metavar=("OWNER", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.front_door:
        asyncio.run(front_door(args.front_door[0], Path(args.front_door[1])))
        return
    if not shutil.which("fio"):
        sys.exit("fio is not installed (scripts/setup installs it)")
    base = Path(tempfile.mkdtemp(prefix="owm-frontdoor-", dir="/dev/shm"
                                 if os.path.isdir("/dev/shm") else None))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        owner_log, front_log = base / "owner.log", base / "front.log"
        owner = start([sys.executable, "-m", "owm", "--pool", str(base / "owner"), "serve",
                       "--listen", "127.0.0.1:0"], owner_log)
        procs.append(owner)
        line = wait_for_line(owner_log, owner, "NBD on ")
        owner_addr = line.split("NBD on ", 1)[1].split()[0]
        subprocess.run([sys.executable, "-m", "owm", "--pool", str(base / "owner"), "volume",
                        "create", "vol", "--size", args.size], check=True, cwd=REPO,
                       capture_output=True, timeout=60)
        front = start([sys.executable, __file__, "--front-door", owner_addr,
                       str(base / "front")], front_log)
        procs.append(front)
        line = wait_for_line(front_log, front, "front door on ")
        front_addr = line.split("front door on ", 1)[1].strip()
        # Fill the volume once so that reads read data, not holes.
        fio(f"nbd://{owner_addr}/vol", "write", 1, args.size)

        print(f"front door benchmark, {args.runtime} s per job, volume {args.size} "
              "(shared machine: noisy)")
        print(f"{'job':20} {'path':11} {'IOPS':>9} {'lat µs':>8} {'ratio':>6} "
              f"{'owner CPU µs/IO':>16} {'front CPU µs/IO':>16}")
        for title, rw, side in JOBS:
            rows = []
            for path, addr in (("direct", owner_addr), ("front door", front_addr)):
                cpu0 = (cpu_seconds(owner.pid), cpu_seconds(front.pid))
                job = fio(f"nbd://{addr}/vol", rw, args.runtime, args.size)
                cpu1 = (cpu_seconds(owner.pid), cpu_seconds(front.pid))
                stats = job[side]
                assert isinstance(stats, dict)
                ios = max(1, int(stats["total_ios"]))
                rows.append((path, float(stats["iops"]), float(stats["lat_ns"]["mean"]) / 1000,
                             (cpu1[0] - cpu0[0]) / ios * 1e6, (cpu1[1] - cpu0[1]) / ios * 1e6))
            direct_iops = rows[0][1] or 1.0
            for path, iops, lat, owner_cpu, front_cpu in rows:
                front_cell = f"{front_cpu:16.1f}" if path == "front door" else f"{'-':>16}"
                print(f"{title:20} {path:11} {iops:9.0f} {lat:8.0f} {iops / direct_iops:6.2f} "
                      f"{owner_cpu:16.1f} {front_cell}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
