"""W2 after a fresh preserve, split into its phases: where a preserve costs owm its speed.

A W2 job (4K random writes, queue depth 16, fio's nbd engine) starts right after a preserve,
so at first nearly every write is the first to its chunk and copies it aside (``cow``) or makes
a delta chunk (``log``); later most writes hit a chunk already copied.  This prints the job's
IOPS every 500 ms (fio's own log), then runs a second W2 on the same image, where every chunk
the first one touched is copied already: the steady per-write cost with a preserve active.  The
server's CPU per I/O, split into user and system time, is shown beside each job, and the same
two jobs run with no preserve for comparison.

    .venv/bin/python bench/w2_phases.py --dir /var/tmp/owm-w2 [--method cow] [--size 512M]
                                        [--chunk 65536] [--runtime 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbd_fio
from _common import cpu_seconds

from owm.common.sizes import parse_size


def _times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _w2(uri: str, size: int, runtime: int, pid: int, log: Path) -> str:
    """One W2 job with fio's IOPS log every 500 ms; its figures as one line."""
    user0, sys0 = _times(pid)
    cpu0 = cpu_seconds(pid)
    done = subprocess.run(
        ["fio", "--name=w2", "--ioengine=nbd", f"--uri={uri}", f"--iodepth={nbd_fio.DEPTH}",
         "--rw=randwrite", "--bs=4k", f"--runtime={runtime}", "--time_based", f"--size={size}",
         f"--write_iops_log={log}", "--log_avg_msec=500", "--output-format=json"],
        capture_output=True, text=True, timeout=runtime * 3 + 120)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed: {done.stderr.strip()}")
    user1, sys1 = _times(pid)
    ios = max(1, int(json.loads(done.stdout[done.stdout.index("{"):])
                     ["jobs"][0]["write"]["total_ios"]))
    per = [line.split(",")[1].strip() for path in sorted(log.parent.glob(log.name + "_iops*"))
           for line in path.read_text().splitlines() if line.strip()]
    return (f"{ios / runtime / 1000:5.1f}K IOPS, {(cpu_seconds(pid) - cpu0) / ios * 1e6:4.0f} us "
            f"per I/O (user {(user1 - user0) / ios * 1e6:.0f}, system "
            f"{(sys1 - sys0) / ios * 1e6:.0f}); per 500 ms: {' '.join(per)}; "
            f"load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a directory on the disk to measure")
    parser.add_argument("--method", default="cow", choices=["cow", "log", "mirror"])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--runtime", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="owm-w2-", dir=args.dir))
    server = nbd_fio.OwmServer(work)
    try:
        for preserve in (False, True):
            name = f"v{int(preserve)}"
            server.ask("create", name, str(size), args.method, str(args.chunk))
            nbd_fio.fill(server.uri(name), size)
            if preserve:
                server.ask("preserve", name)
            what = "preserve active" if preserve else "no preserve"
            for job in ("first W2", "second W2"):
                line = _w2(server.uri(name), size, args.runtime, server.proc.pid,
                           work / f"{name}-{job.split()[0]}")
                print(f"{args.method}, {what}, {job}: {line}", flush=True)
            server.ask("delete", name)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
