#!/usr/bin/env python3
"""Server CPU per 4 KiB request with no preserve: owm cow beside nbdkit's file plugin, one run.

Both serve a 256 MiB disk on tmpfs over a Unix socket, filled once with 1M writes; then fio's
nbd engine runs 4K randwrite and 4K randread at queue depth 16 against each, and the server's
CPU time (user + system, all threads, from /proc) is divided by the I/Os fio completed.  owm is
the real daemon (``owm serve``, uvloop) with a ``cow`` volume of 64 KiB chunks made through its
CLI.  Issue 11's aim 3 is owm ≤ 1.5× nbdkit's CPU per request.

    .venv/bin/python bench/cpu_per_io.py [--runtime 10] [--rounds 2] [--before TREE]

``--before TREE`` adds a row ``owm before`` served from another checkout's ``owm`` (for
example ``/work/main``), in the same rounds, for a before/after comparison under one load.

The machine is shared: every line shows the 1-minute load average when its job ended, and the
figures are noisy in proportion.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, fill, run_fio, wait_for

REPO = Path(__file__).resolve().parent.parent
SIZE = 256 << 20
DEPTH = 16


class Owm:
    name = "owm cow"
    tree = REPO

    def __init__(self, work: Path) -> None:
        self.pool = work / "pool"
        self.sock = work / "owm.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "owm", "--pool", str(self.pool), "serve", "--listen", "none",
             "--socket", str(self.sock)], cwd=self.tree, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for(self.pool / "control.sock", self.proc, "owm serve")
        wait_for(self.sock, self.proc, "owm serve")
        subprocess.run([sys.executable, "-m", "owm", "--pool", str(self.pool), "volume",
                        "create", "vol", "--size", str(SIZE), "--method", "cow",
                        "--chunk-size", "64K"], cwd=self.tree, check=True, capture_output=True)
        self.uri = f"nbd+unix:///vol?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Nbdkit:
    name = "nbdkit file"

    def __init__(self, work: Path) -> None:
        disk = work / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        self.sock = work / "nbdkit.sock"
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", str(self.sock), "file", str(disk)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.sock, self.proc, "nbdkit")
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def job(server: Owm | Nbdkit, rw: str, runtime: int) -> tuple[float, float]:
    """(IOPS, server CPU µs per I/O) of one fio job."""
    before = cpu_seconds(server.proc.pid)
    report = run_fio(["fio", "--name=cpu", "--ioengine=nbd", f"--uri={server.uri}",
                      f"--rw={rw}", "--bs=4k", f"--iodepth={DEPTH}", f"--size={SIZE}",
                      "--time_based", f"--runtime={runtime}", "--randrepeat=0",
                      "--norandommap", "--output-format=json"], timeout=runtime + 120)
    used = cpu_seconds(server.proc.pid) - before
    side = report["write" if "write" in rw else "read"]
    ios = side["total_ios"]
    return side["iops"], used / max(ios, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tmpfs", default="/dev/shm")
    ap.add_argument("--before", metavar="TREE", help="also serve owm from this checkout")
    args = ap.parse_args()
    kinds: list[type[Owm] | type[Nbdkit]] = [Owm, Nbdkit]
    if args.before:
        before = type("OwmBefore", (Owm,), {"name": "owm before", "tree": Path(args.before)})
        kinds.insert(0, before)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _round in range(args.rounds):
        for kind in kinds:
            work = Path(tempfile.mkdtemp(prefix="owm-cpu-", dir=args.tmpfs))
            server = kind(work)
            try:
                fill(server.uri, SIZE)
                for rw in ("randwrite", "randread"):
                    iops, cpu = job(server, rw, args.runtime)
                    results.setdefault((server.name, rw), []).append((iops, cpu))
                    print(f"{server.name:12} {rw:9} {iops / 1000:6.1f}K IOPS "
                          f"{cpu:5.1f} µs/I/O  (load {os.getloadavg()[0]:.1f})", flush=True)
            finally:
                server.stop()
                shutil.rmtree(work, ignore_errors=True)
    print()
    kit_name = "nbdkit file"
    for rw in ("randwrite", "randread"):
        kit = [c for _i, c in results[(kit_name, rw)]]
        print(f"{rw}: {kit_name} {min(kit):.1f}–{max(kit):.1f} µs per I/O")
        for kind in kinds:
            if kind.name == kit_name:
                continue
            own = [c for _i, c in results[(kind.name, rw)]]
            ratios = [o / k for o, k in zip(own, kit, strict=True)]
            print(f"    {kind.name}: {min(own):.1f}–{max(own):.1f} µs per I/O; "
                  f"/ nbdkit per round {', '.join(f'{r:.2f}×' for r in ratios)}")


if __name__ == "__main__":
    main()
