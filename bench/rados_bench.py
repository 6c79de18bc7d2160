#!/usr/bin/env python3
"""owm on RADOS against qemu-nbd serving an RBD image of the same pool, and ``rbd bench``.

On one throw-away cluster (owm.testbed.ceph: one monitor, one memstore OSD on this machine) in
one run, driven by fio's nbd engine, one job at a time:

* 4K random writes, queue depth 16;
* 4K random reads, queue depth 16;
* 1M sequential writes, queue depth 16.

Rows: ``owm cow`` (a daemon with ``--ceph-conf``, a cow volume), ``owm cow + preserve`` (a fresh
preserve before each job, released after it, so the writes are first writes that copy their
chunk), ``qemu-nbd rbd`` (qemu's rbd driver on an RBD image in the same RADOS pool) and ``rbd
bench`` (librbd with no NBD at all; its own process, so no server CPU). Each volume is filled
once first so that reads see data. The table gives IOPS (4K) or MB/s (1M), the server's CPU
per I/O in microseconds, and owm's figure as a ratio to qemu-nbd's.

Both servers run side by side, and every job runs on owm and then at once on qemu-nbd (``--pairs
N``: N such pairs, the order alternating, and each row's median), so that a ratio compares two
figures taken seconds apart: on a shared machine the load moves a lot more between the start and
the end of a run than within one pair.

    .venv/bin/python bench/rados_bench.py [--runtime 10] [--size 512M] [--pairs 1]

The OSD runs on the same cores as the servers and fio, so this measures the NBD servers' own
cost on top of a very fast (memory) RADOS, not a real cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))
from _common import cpu_seconds, fill, run_fio, thread_cpu  # noqa: E402

from owm.testbed import ceph as testbed  # noqa: E402

JOBS = [("4K randwrite", "randwrite", "4k"), ("4K randread", "randread", "4k"),
        ("1M write", "write", "1M")]


@dataclass
class Result:
    value: float  # IOPS (4K) or bytes/s (1M)
    ops: float  # I/Os done
    cpu: float | None  # server CPU seconds during the job (None: no server)
    threads: str = ""  # with --threads: the server's busiest threads, us of CPU per I/O

    def cpu_per_io_us(self) -> str:
        if self.cpu is None or not self.ops:
            return "no server"
        return f"{self.cpu / self.ops * 1e6:.0f} us cpu/io"


def fio(uri: str, rw: str, bs: str, runtime: int, size: int, pid: int | None,
        threads: bool = False) -> Result:
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            "--iodepth=16", "--numjobs=1", f"--runtime={runtime}", "--time_based",
            f"--size={size}", "--output-format=json"]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    per0 = thread_cpu(pid) if pid and threads else {}
    job = run_fio(argv, timeout=runtime * 3 + 60)
    cpu = cpu_seconds(pid) - cpu0 if pid else None
    side = job["read"] if "read" in rw else job["write"]
    value = side["iops"] if bs != "1M" else side["bw_bytes"]
    result = Result(float(value), float(side["total_ios"]), cpu)
    if pid and threads and result.ops:
        per = {name: t - per0.get(name, 0.0) for name, t in thread_cpu(pid).items()}
        busy = sorted(((t, name) for name, t in per.items() if t > 0), reverse=True)[:4]
        result.threads = ", ".join(f"{name} {t / result.ops * 1e6:.0f}" for t, name in busy)
    return result


def owm(pool: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "owm", "--pool", str(pool), *args],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"owm {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


@contextlib.contextmanager
def server(argv: list[str], ready: Path, log: Path) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        time.sleep(0.3)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(results: list[Result]) -> Result:
    """The result of the middle value (the lower middle of an even count)."""
    return sorted(results, key=lambda r: r.value)[(len(results) - 1) // 2]


def run_side_by_side(cluster: testbed.CephCluster, work: Path, size: int, runtime: int,
                     pairs: int = 1, threads: bool = False) -> dict[str, dict[str, Result]]:
    """owm (a cow volume) and qemu-nbd (an RBD image) both up; each job on one, then the other."""
    pool = work / "pool"
    owm_argv = [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen", "none",
                "--ceph-conf", str(cluster.conf_path), "--rados-pool", cluster.pool]
    conf = str(cluster.conf_path)
    subprocess.run(["rbd", "-c", conf, "create", "--size", f"{size // (1 << 20)}M",
                    f"{cluster.pool}/bench"], check=True, capture_output=True, timeout=60)
    sock = work / "qemu.sock"
    qemu_argv = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=8", "--cache=none",
                 f"--socket={sock}", "-x", "bench", f"rbd:{cluster.pool}/bench:conf={conf}"]
    runs: dict[str, dict[str, list[Result]]] = {
        "owm cow": {}, "owm cow + preserve": {}, "qemu-nbd rbd": {}}
    with server(owm_argv, pool / "control.sock", work / "owm.log") as owm_pid, \
            server(qemu_argv, sock, work / "qemu-nbd.log") as qemu_pid:
        owm(pool, "volume", "create", "vol", "--size", str(size), "--method", "cow")
        owm_uri = f"nbd+unix:///vol?socket={pool}/nbd.sock"
        qemu_uri = f"nbd+unix:///bench?socket={sock}"
        fill(owm_uri, size)
        fill(qemu_uri, size)
        sides = [("owm cow", owm_uri, owm_pid), ("qemu-nbd rbd", qemu_uri, qemu_pid)]
        for label, rw, bs in JOBS:
            for n in range(pairs):
                for row, uri, pid in (sides if n % 2 == 0 else sides[::-1]):
                    runs[row].setdefault(label, []).append(
                        fio(uri, rw, bs, runtime, size, pid, threads))
        for label, rw, bs in JOBS:
            for _ in range(pairs):
                image = owm(pool, "preserve", "vol")
                runs["owm cow + preserve"].setdefault(label, []).append(
                    fio(owm_uri, rw, bs, runtime, size, owm_pid, threads))
                owm(pool, "release", image)
    return {row: {label: median(results) for label, results in jobs.items()}
            for row, jobs in runs.items()}


def run_rbd_bench(cluster: testbed.CephCluster, size: int, runtime: int) -> dict[str, Result]:
    out: dict[str, Result] = {}
    conf = str(cluster.conf_path)
    for label, rw, bs in JOBS:
        kind = "read" if "read" in rw else "write"
        pattern = "rand" if rw.startswith("rand") else "seq"
        total = size if bs == "1M" else min(size, 256 << 20)
        done = subprocess.run(
            ["rbd", "-c", conf, "bench", "--io-type", kind, "--io-size", bs.upper(),
             "--io-threads", "16", "--io-pattern", pattern, "--io-total", str(total),
             f"{cluster.pool}/bench"], capture_output=True, text=True,
            timeout=runtime * 10 + 120)
        # e.g. "elapsed: 2   ops: 256   ops/sec: 118.3   bytes/sec: 118 MiB/s"
        found = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)\s+"
                          r"bytes/sec:\s*([\d.]+)\s*([KMGT]?)i?B/s", done.stdout)
        if done.returncode != 0 or not found:
            raise RuntimeError(f"rbd bench failed: {done.stderr.strip()[-300:]}")
        ops, iops = float(found.group(2)), float(found.group(3))
        bps = float(found.group(4)) * 1024 ** " KMGT".index(found.group(5) or " ")
        out[label] = Result(bps if bs == "1M" else iops, ops, None)
    return out


def fmt(job: str, value: float) -> str:
    return f"{value / 1e6:.0f} MB/s" if job.startswith("1M") else f"{value:.0f} IOPS"


def print_table(rows: dict[str, dict[str, Result]]) -> None:
    base = rows.get("qemu-nbd rbd", {})
    head = "| row | " + " | ".join(j for j, _, _ in JOBS) + " |"
    print(head)
    print("|" + "---|" * (len(JOBS) + 1))
    for name, results in rows.items():
        cells = []
        for job, _, _ in JOBS:
            res = results.get(job)
            if res is None:
                cells.append("-")
                continue
            ratio = f" ({res.value / base[job].value:.2f}x)" if job in base and name.startswith(
                "owm") else ""
            cells.append(f"{fmt(job, res.value)}{ratio}, {res.cpu_per_io_us()}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nratios: owm / qemu-nbd on rbd, same job; cpu/io: the NBD server's CPU per I/O.")
    print("Measured on a shared, noisy machine: print, do not tune on these.")
    split = [(name, job, res.threads) for name, results in rows.items()
             for job, res in results.items() if res.threads]
    if split:
        print("\nbusiest server threads, CPU us per I/O:")
        for name, job, threads in split:
            print(f"  {name}, {job}: {threads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--size", default="512M", help="volume and image size (K/M/G)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="runs of each job on each server, alternating (median shown)")
    parser.add_argument("--threads", action="store_true",
                        help="also print the servers' busiest threads, CPU us per I/O each")
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = args.size.upper()
    size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    for tool in ("fio", "qemu-nbd", "rbd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/setup installs it)")
    work = Path(tempfile.mkdtemp(prefix="owm-rbench-", dir="/tmp"))
    cluster = testbed.start(memstore_bytes=max(4 << 30, 5 * size))
    try:
        rows = run_side_by_side(cluster, work, size, args.runtime, max(1, args.pairs),
                                args.threads)
        rows["rbd bench"] = run_rbd_bench(cluster, size, args.runtime)
        print_table(rows)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
