#!/usr/bin/env python3
"""NBD speed side by side in one run: owm, nbdkit and qemu-nbd, all through fio's nbd engine.

Every target serves the same kind of disk on tmpfs (so storage speed is not what is measured)
and is driven by the same fio jobs, one at a time:

* 4K random writes, queue depth 16;
* 4K random reads, queue depth 16;
* 1M sequential writes, queue depth 16.

Peers: nbdkit's file plugin, qemu-nbd on the raw file, qemu-nbd on a qcow2 overlay of it (its
snapshot path), nbdkit's cow filter, and nbdkit's Python plugin (Python doing pread/pwrite
inside nbdkit).  owm rows: each method with no preserve; ``cow`` and ``log`` with a preserve
active and every write a first write (4 KiB chunks, a fresh preserve before each write job, the
volume pre-filled, fio's random map so no block is written twice); and after the release.
Snapshot-style peers get a fresh overlay per job for the same reason.  Each job is bounded by
``--runtime``; the whole run takes about (rows x 3 x runtime).

    .venv/bin/python bench/nbd_fio.py [--runtime 10] [--size 1G] [--only owm,qemu-nbd]

The table gives IOPS (4K) and GB/s (1M), the server's CPU use, and each figure as a ratio to
owm with no preserve on the same job; the aims of issue 3 are checked at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS = [
    ("4K randwrite", "randwrite", "4k"),
    ("4K randread", "randread", "4k"),
    ("1M write", "write", "1M"),
]
NBDKIT_PYTHON_PLUGIN = """
import os
API_VERSION = 2

def config(key, value):
    global path
    if key == "file":
        path = value

def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)

def get_size(h):
    return os.fstat(h).st_size

def can_multi_conn(h):
    return True

def pread(h, buf, offset, flags):
    n = os.preadv(h, [buf], offset)
    assert n == len(buf)

def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)

def flush(h, flags):
    os.fdatasync(h)

def close(h):
    os.close(h)
"""


# ----------------------------------------------------------------------------- owm server


def owm_server_main(root: str, sock: str) -> None:
    """The owm side: a pool on tmpfs served over NBD, steered by commands on stdin."""
    import logging

    import uvloop

    # fio's nbd engine closes without NBD_CMD_DISC, so every fio session ends "unclean";
    # that is true and harmless here, and one warning per job would drown the table.
    logging.basicConfig(level=logging.ERROR)
    sys.path.insert(0, str(REPO))
    from owm.nbd.server import NbdServer
    from owm.pool.pool import Pool

    async def main() -> None:
        pool = await Pool.open(root)
        server = NbdServer(pool)
        await server.start(unix_path=sock)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        while line := (await reader.readline()).decode().split():
            cmd, *args = line
            try:
                if cmd == "create":
                    name, size, method, chunk = args
                    await pool.create_volume(name, int(size), method=method, chunk_size=int(chunk))
                    reply = "ok"
                elif cmd == "preserve":
                    reply = await pool.preserve(args[0])
                elif cmd == "release":
                    await pool.release(args[0])
                    reply = "ok"
                elif cmd == "quit":
                    break
                else:
                    reply = f"error unknown command {cmd}"
            except Exception as e:
                reply = f"error {e}"
            print(reply, flush=True)
        await server.stop(grace=5)
        await pool.close()

    uvloop.run(main())


class OwmServer:
    def __init__(self, work: Path) -> None:
        self.sock = work / "owm.sock"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--owm-server", str(work / "pool"), str(self.sock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.ask_line() == "ready"

    def ask_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("the owm bench server died")
        return line

    def ask(self, *words: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        reply = self.ask_line()
        if reply.startswith("error"):
            raise RuntimeError(f"owm: {' '.join(words)}: {reply}")
        return reply

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- peers


@contextlib.contextmanager
def peer_server(argv: list[str], sock: Path) -> Iterator[int]:
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{argv[0]} did not start: {err}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    value: float  # IOPS for 4K jobs, bytes/s for 1M
    cpu: float  # server CPU, fraction of one core


def fio(uri: str, rw: str, bs: str, runtime: int, size: int, pid: int | None) -> Result:
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        "--iodepth=16",
        "--numjobs=1",
        f"--runtime={runtime}",
        "--time_based",
        f"--size={size}",
        "--output-format=json",
    ]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime * 3 + 60)
    elapsed = time.monotonic() - start
    cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else 0.0
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip() or out.stdout[-500:]}")
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    value = side["iops"] if bs != "1M" else side["bw_bytes"]
    return Result(float(value), cpu)


def fill(uri: str, size: int) -> None:
    """Write every byte once so reads and copies see data, not holes."""
    subprocess.run(
        [
            "fio",
            "--name=fill",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            f"--size={size}",
            "--output-format=terse",
            "--refill_buffers",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    name: str
    group: str  # "owm", "owm-preserve", "owm-released" or "peer"
    results: dict[str, Result] = field(default_factory=dict)


def fmt(job: str, value: float) -> str:
    return f"{value / 1e9:.2f} GB/s" if job == "1M write" else f"{value / 1000:.1f}K"


def print_table(rows: list[Row]) -> None:
    base = {
        job: next((r.results.get(job) for r in rows if r.name == "owm cow"), None)
        for job, _, _ in JOBS
    }
    header = f"{'target':<40}" + "".join(f"{job:>26}" for job, _, _ in JOBS)
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for job, _, _ in JOBS:
            res = row.results.get(job)
            if res is None:
                cells.append(f"{'-':>26}")
                continue
            b = base[job]
            ratio = f" {res.value / b.value:4.2f}x" if b and b.value else ""
            cells.append(f"{fmt(job, res.value):>12} {res.cpu * 100:3.0f}%cpu{ratio:>6}")
        print(f"{row.name:<40}" + "".join(cells))
    print("\nratios are to 'owm cow' (no preserve) on the same job; cpu is the server's.")


def check_aims(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}

    def cmp(owm_row: str, peer_row: str, what: str) -> None:
        a, b = by_name.get(owm_row), by_name.get(peer_row)
        if not a or not b:
            return
        for job, _, _ in JOBS:
            if job in a.results and job in b.results:
                ratio = a.results[job].value / b.results[job].value
                verdict = "ok " if ratio >= 1 else "BELOW"
                print(f"  {verdict} {owm_row:<34} {job:<13} {ratio:5.2f}x {what} ({peer_row})")

    print("\naims (issue 3):")
    for method in ("cow", "log", "mirror"):
        cmp(f"owm {method}", "qemu-nbd raw", ">= qemu-nbd raw")
    for method in ("cow", "log"):
        cmp(f"owm {method}, preserve active", "qemu-nbd qcow2 overlay", ">= qcow2 overlay")
    for row in rows:
        if row.group != "peer":
            cmp(row.name, "nbdkit python plugin", "never below nbdkit python")


def run(args: argparse.Namespace) -> list[Row]:
    size = args.size
    only = set(args.only.split(",")) if args.only else None
    base = Path(args.tmpfs)
    work = Path(tempfile.mkdtemp(prefix="owm-bench-", dir=base))
    rows: list[Row] = []
    try:
        disk = work / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(size)
        plugin = work / "file_plugin.py"
        plugin.write_text(NBDKIT_PYTHON_PLUGIN)
        sock = work / "peer.sock"
        nbdkit = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock)]
        qemu_nbd = [
            "qemu-nbd",
            "-k",
            str(sock),
            "--persistent",
            "--shared=16",
            "--cache=writeback",
            "--aio=threads",
            "-x",
            "disk",
        ]
        overlay = work / "overlay.qcow2"
        peers: list[tuple[str, list[str], str, bool]] = [
            ("nbdkit file", [*nbdkit, "file", f"file={disk}"], "", False),
            ("qemu-nbd raw", [*qemu_nbd, "-f", "raw", str(disk)], "disk", False),
            ("qemu-nbd qcow2 overlay", [*qemu_nbd, "-f", "qcow2", str(overlay)], "disk", True),
            ("nbdkit cow filter", [*nbdkit, "--filter=cow", "file", f"file={disk}"], "", False),
            ("nbdkit python plugin", [*nbdkit, "python", str(plugin), f"file={disk}"], "", False),
        ]
        wanted_peers = [p for p in peers if only is None or any(o in p[0] for o in only)]
        if wanted_peers:
            print(f"filling {disk} ({size} bytes) ...", flush=True)
            with peer_server([*nbdkit, "file", f"file={disk}"], sock):
                fill(f"nbd+unix:///?socket={sock}", size)
        for name, argv, export, fresh_overlay in wanted_peers:
            row = Row(name, "peer")
            rows.append(row)
            for job, rw, bs in JOBS:
                if fresh_overlay:
                    with contextlib.suppress(FileNotFoundError):
                        overlay.unlink()
                    subprocess.run(
                        [
                            "qemu-img",
                            "create",
                            "-q",
                            "-f",
                            "qcow2",
                            "-b",
                            str(disk),
                            "-F",
                            "raw",
                            str(overlay),
                        ],
                        check=True,
                    )
                with peer_server(argv, sock) as pid:
                    uri = f"nbd+unix:///{export}?socket={sock}"
                    row.results[job] = fio(uri, rw, bs, args.runtime, size, pid)
                print(f"  {name:<32} {job:<13} {fmt(job, row.results[job].value)}", flush=True)
        if only is None or "owm" in only:
            rows.extend(run_owm(work, size, args.runtime))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run_owm(work: Path, size: int, runtime: int) -> list[Row]:
    rows: list[Row] = []
    server = OwmServer(work)
    pid = server.proc.pid
    try:
        for method in ("cow", "log", "mirror"):
            server.ask("create", method, str(size), method, "65536")
            print(f"filling owm {method} ...", flush=True)
            fill(server.uri(method), size)
            row = Row(f"owm {method}", "owm")
            rows.append(row)
            for job, rw, bs in JOBS:
                row.results[job] = fio(server.uri(method), rw, bs, runtime, size, pid)
                print(f"  {row.name:<32} {job:<13} {fmt(job, row.results[job].value)}", flush=True)
        for method in ("cow", "log"):
            name = f"first-{method}"
            server.ask("create", name, str(size), method, "4096")
            print(f"filling owm {name} ...", flush=True)
            fill(server.uri(name), size)
            active = Row(f"owm {method}, preserve active", "owm-preserve")
            released = Row(f"owm {method}, after release", "owm-released")
            rows += [active, released]
            image = None
            for job, rw, bs in JOBS:
                # A fresh preserve per job: every chunk is shared again, so every write
                # (4 KiB chunks, fio's random map) is the first write to its chunk.
                if image is not None:
                    server.ask("release", image)
                image = server.ask("preserve", name)
                active.results[job] = fio(server.uri(name), rw, bs, runtime, size, pid)
                print(
                    f"  {active.name:<32} {job:<13} {fmt(job, active.results[job].value)}",
                    flush=True,
                )
            assert image is not None
            server.ask("release", image)
            for job, rw, bs in JOBS:
                released.results[job] = fio(server.uri(name), rw, bs, runtime, size, pid)
                print(
                    f"  {released.name:<32} {job:<13} {fmt(job, released.results[job].value)}",
                    flush=True,
                )
    finally:
        server.close()
    return rows


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--owm-server":
        owm_server_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--size", default="1G", help="disk size (K/M/G suffixes)")
    parser.add_argument("--tmpfs", default="/dev/shm", help="where the disks live")
    parser.add_argument("--only", help="comma-separated substrings of the targets to run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from owm.common.sizes import parse_size

    args.size = parse_size(args.size)
    for tool in ("fio", "nbdkit", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/setup installs it)")
    rows = run(args)
    print_table(rows)
    check_aims(rows)


if __name__ == "__main__":
    main()
