#!/usr/bin/env python3
"""owm in a real stack beside nbdkit's file plugin, one run: ext4 on a loop device on nbdfuse.

Issue 11's aim 3, second half: a fio job on an ext4 file system whose block device is a loop
device over the file nbdfuse makes of an NBD export, owm cow (the real daemon, ``owm serve``,
a 256 MiB volume of 64 KiB chunks) against ``nbdkit file`` on the same size of raw file, both
on tmpfs and served over a Unix socket.  Aim: owm ≥ 0.8× nbdkit's throughput.

Each round and server: mkfs.ext4 on the loop device, mount, lay out a 128 MiB file, then
``randwrite`` (4K, QD16, O_DIRECT, libaio, time-based, then fsync: what the ext4 and loop
layers hold back has to reach the server, so the rate counts the fsync's time too) and
``randread`` (the same, reads; the loop device is set to direct I/O where the kernel allows,
so reads reach the server instead of the loop's page cache).  The server's CPU per NBD request
is not shown: the stack merges and splits requests, so per I/O of fio it means little.

Needs root, loop devices, /dev/fuse and nbdfuse.  Cleans up its mounts, loop devices and
processes (only its own) at the end, whatever happens.

    sudo .venv/bin/python bench/stack_bench.py [--runtime 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import wait_for

REPO = Path(__file__).resolve().parent.parent
SIZE = 256 << 20
FILE_SIZE = "128M"
DEPTH = 16


def _run(argv: list[str], timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def _server(kind: str, work: Path) -> Iterator[str]:
    """Start one server; yield its NBD URI."""
    if kind == "owm cow":
        pool, sock = work / "pool", work / "owm.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen", "none",
             "--socket", str(sock)], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        uri = f"nbd+unix:///vol?socket={sock}"
    else:
        disk, sock = work / "disk.raw", work / "nbdkit.sock"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(disk)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uri = f"nbd+unix:///?socket={sock}"
    try:
        wait_for(sock, proc, kind)
        if kind == "owm cow":
            wait_for(work / "pool" / "control.sock", proc, kind)
            _run([sys.executable, "-m", "owm", "--pool", str(work / "pool"), "volume", "create",
                  "vol", "--size", str(SIZE), "--method", "cow", "--chunk-size", "64K"])
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _stack(uri: str, work: Path) -> Iterator[tuple[Path, bool]]:
    """nbdfuse -> loop device -> ext4, mounted; yields (mount point, loop direct I/O on)."""
    fuse_dir, mnt = work / "fuse", work / "ext4"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(fuse_dir), uri], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    loop = ""
    mounted = False
    try:
        wait_for(fuse_dir / "nbd", fuse, "nbdfuse")
        loop = _run(["losetup", "-f", "--show", str(fuse_dir / "nbd")]).strip()
        direct = subprocess.run(["losetup", "--direct-io=on", loop],
                                capture_output=True).returncode == 0
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop])
        _run(["mount", loop, str(mnt)])
        mounted = True
        yield mnt, direct
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=120)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)
        subprocess.run(["umount", str(fuse_dir)], capture_output=True, timeout=60)
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


def _fio(mnt: Path, rw: str, runtime: int) -> float:
    """IOPS of one job, counting the closing fsync's time for writes."""
    argv = ["fio", "--name=stack", f"--filename={mnt / 'f'}", f"--size={FILE_SIZE}",
            f"--rw={rw}", "--bs=4k", "--direct=1", "--ioengine=libaio",
            f"--iodepth={DEPTH}", "--time_based", f"--runtime={runtime}", "--randrepeat=0",
            "--norandommap", "--output-format=json"]
    if rw == "randwrite":
        argv.append("--end_fsync=1")
    started = time.monotonic()
    out = _run(argv, timeout=runtime + 300)
    wall = time.monotonic() - started
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if rw == "randwrite" else "read"]
    seconds = wall if rw == "randwrite" else side["runtime"] / 1000
    return float(side["total_ios"]) / max(seconds, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tmpfs", default="/dev/shm")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("stack_bench needs root (loop devices, mounts)")
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "nbdkit", "fio"):
        if shutil.which(tool) is None:
            sys.exit(f"stack_bench needs {tool}")
    kinds = ("owm cow", "nbdkit file")
    results: dict[tuple[str, str], list[float]] = {}
    for _round in range(args.rounds):
        for kind in kinds:
            work = Path(tempfile.mkdtemp(prefix="owm-stack-", dir=args.tmpfs))
            try:
                with _server(kind, work) as uri, _stack(uri, work) as (mnt, direct):
                    _run(["fio", "--name=layout", f"--filename={mnt / 'f'}",
                          f"--size={FILE_SIZE}", "--rw=write", "--bs=1M", "--end_fsync=1"])
                    for rw in ("randwrite", "randread"):
                        iops = _fio(mnt, rw, args.runtime)
                        results.setdefault((kind, rw), []).append(iops)
                        print(f"{kind:12} {rw:9} {iops / 1000:6.1f}K IOPS (loop direct I/O "
                              f"{'on' if direct else 'off'}, load {os.getloadavg()[0]:.1f})",
                              flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print()
    for rw in ("randwrite", "randread"):
        own, kit = results[("owm cow", rw)], results[("nbdkit file", rw)]
        ratios = ", ".join(f"{o / k:.2f}×" for o, k in zip(own, kit, strict=True))
        print(f"{rw}: owm {min(own) / 1000:.1f}–{max(own) / 1000:.1f}K, nbdkit "
              f"{min(kit) / 1000:.1f}–{max(kit) / 1000:.1f}K IOPS; owm/nbdkit per round {ratios}")


if __name__ == "__main__":
    main()
