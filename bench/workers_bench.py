"""Aggregate throughput against worker processes: ``owm serve`` and ``owm serve --workers 2``.

1, 2 and 4 volumes (cow, 64K chunks, no preserve), each with 2 fio clients (fio's nbd engine over
POOL/nbd.sock, 4K random writes at queue depth 16, time-based), all clients at once; the pool on
tmpfs.  For each run: the aggregate IOPS, the server's CPU seconds (parent and workers) per I/O,
and from that per-core cost what 16 worker cores would serve (an upper bound: it leaves out the
clients, the kernel's share and the parent, which is out of the data path).  The scaling ratio
to read is IOPS with 2 workers over IOPS with 1, within one run of this script.

    .venv/bin/python bench/workers_bench.py [--runtime 5] [--workers 1,2] [--volumes 1,2,4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
OWM = [sys.executable, "-m", "owm"]
DEPTH = 16
SIZE = "256M"


def owm(pool: Path, *args: str) -> str:
    done = subprocess.run([*OWM, "--pool", str(pool), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return done.stdout


def health(pool: Path) -> dict[str, Any]:
    """The daemon's ``GET /v1/health`` (raises OSError while it is not listening yet)."""
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(pool / "control.sock"))

    conn = Conn("localhost", timeout=10)
    try:
        conn.request("GET", "/v1/health")
        answer = conn.getresponse()
        data: dict[str, Any] = json.loads(answer.read())
        if answer.status != 200:
            raise OSError("not ready")
        return data
    finally:
        conn.close()


def start(pool: Path, workers: int, log: Path) -> subprocess.Popen[bytes]:
    extra = ["--workers", str(workers)] if workers > 1 else []
    with open(log, "wb") as out:
        proc = subprocess.Popen([*OWM, "--pool", str(pool), "serve", "--listen", "none", *extra],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"owm serve exited: {log.read_text()[-2000:]}")
        try:
            health(pool)
            return proc
        except (OSError, ValueError):
            time.sleep(0.2)
    raise RuntimeError("owm serve did not start")


def server_pids(pool: Path, proc: subprocess.Popen[bytes]) -> list[int]:
    return [proc.pid] + [int(w["pid"]) for w in health(pool).get("workers", [])]


def run_one(work: Path, workers: int, volumes: int, runtime: int) -> dict[str, Any]:
    pool = work / f"pool-w{workers}-v{volumes}"
    proc = start(pool, workers, work / f"w{workers}-v{volumes}.log")
    try:
        names = [f"v{i}" for i in range(volumes)]
        for name in names:
            owm(pool, "volume", "create", name, "--size", SIZE)
        pids = server_pids(pool, proc)
        sock = pool / "nbd.sock"
        clients = []
        cpu0 = sum(cpu_seconds(p) for p in pids)
        for name in names:
            for n in range(2):
                argv = ["fio", f"--name=c{n}", "--ioengine=nbd",
                        f"--uri=nbd+unix:///{name}?socket={sock}", "--rw=randwrite", "--bs=4k",
                        f"--iodepth={DEPTH}", f"--size={SIZE}", "--time_based",
                        f"--runtime={runtime}", "--output-format=json"]
                clients.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
        ios = 0
        iops = 0.0
        for client in clients:
            out, err = client.communicate(timeout=runtime + 120)
            if client.returncode != 0:
                raise RuntimeError(f"fio failed: {err.strip()}")
            job = json.loads(out[out.index("{"):])["jobs"][0]
            ios += int(job["write"]["total_ios"])
            iops += float(job["write"]["iops"])
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    us = cpu / ios * 1e6 if ios else float("nan")
    return {"workers": workers, "volumes": volumes, "clients": 2 * volumes, "iops": iops,
            "cpu_us_per_io": us, "cpu_s": cpu, "sixteen_cores": 16e6 / us if ios else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--volumes", default="1,2,4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("fio") is None:
        sys.exit("fio is not installed")
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="owm-wb-", dir=base))
    rows = []
    try:
        for volumes in [int(v) for v in args.volumes.split(",")]:
            for workers in [int(w) for w in args.workers.split(",")]:
                rows.append(run_one(work, workers, volumes, args.runtime))
                print(f"# done: {workers} worker(s), {volumes} volume(s)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{os.cpu_count()} cores on this machine; 4K randwrite QD{DEPTH}, 2 fio clients per "
          f"volume, {args.runtime} s each (noisy if the machine is shared)")
    print(f"{'volumes':>7} {'workers':>7} {'IOPS':>9} {'vs 1 worker':>11} {'CPU us/IO':>9} "
          f"{'16 cores (IOPS, bound)':>22}")
    single = {r["volumes"]: r["iops"] for r in rows if r["workers"] == 1}
    for r in rows:
        ratio = r["iops"] / single[r["volumes"]] if single.get(r["volumes"]) else float("nan")
        print(f"{r['volumes']:>7} {r['workers']:>7} {r['iops']:>9.0f} {ratio:>10.2f}x "
              f"{r['cpu_us_per_io']:>9.1f} {r['sixteen_cores']:>22.0f}")


if __name__ == "__main__":
    main()
