#!/usr/bin/env python3
"""The nbd project's own test client (nbd-tester-client) against owm and nbdkit, side by side.

Runs its write test (1 KiB writes over the whole export, as many in flight as the socket
holds), its flush test (the same with a FUA write and a FLUSH every 16 requests) and its
integrity test (a recorded transaction log of overlapping reads and writes, checked) against
an owm ``cow`` volume and nbdkit's file plugin on the same kind of disk, and prints each one's
wall time and the server's CPU time.  Aim (issue 11): owm within 2x nbdkit's time.

nbd-tester-client is a tool we run, not code we ship.  Build it once (Debian):

    apt-get install libglib2.0-dev libgnutls28-dev autoconf automake libtool bison flex \
        pkg-config autoconf-archive
    git clone https://github.com/NetworkBlockDevice/nbd /tmp/nbd-src
    cd /tmp/nbd-src && ./autogen.sh && ./configure --disable-manpages \
        && make -C tests/run nbd-tester-client

then run (``--client`` or $NBD_TESTER_CLIENT points at another build):

    .venv/bin/python bench/nbd_tester.py [--size 256M] [--only owm,nbdkit] [--dir /dev/shm]

Each test is bounded by ``--timeout`` seconds.  Figures on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_fio import OwmServer, cpu_seconds, peer_server

DEFAULT_CLIENT = "/tmp/nbd-src/tests/run/nbd-tester-client"
INTEGRITY_SIZE = 52428800  # the size the nbd project's own integrity test uses
CHUNK = 65536


def tests(client: Path, size: int) -> list[tuple[str, list[str], int]]:
    """(name, extra arguments, export size) of each test."""
    trace = client.parent / "integrity-test.tr"
    out = [("write", ["-w"], size), ("flush", ["-w", "-f"], size)]
    if trace.exists():
        out.append(("integrity", ["-i", "-t", str(trace)], INTEGRITY_SIZE))
    return out


def run_test(
    client: Path, sock: Path, export: str, args: list[str], pid: int, timeout: float
) -> tuple[str, float, float]:
    """(outcome, seconds, server CPU seconds) of one run of the client."""
    env = dict(os.environ, NBD_TEST_SILENT="1")
    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [str(client), "-u", str(sock), "-N", export, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        outcome = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        if proc.returncode:
            print(proc.stderr.strip()[-800:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        outcome = f"TIMEOUT ({timeout:.0f} s)"
    elapsed = time.monotonic() - start
    return outcome, elapsed, cpu_seconds(pid) - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", default=os.environ.get("NBD_TESTER_CLIENT", DEFAULT_CLIENT))
    parser.add_argument("--size", default="256M", help="export size of the write/flush tests")
    parser.add_argument("--dir", default="/dev/shm", help="where the disks live")
    parser.add_argument("--only", help="comma-separated: owm, nbdkit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test")
    args = parser.parse_args()
    client = Path(args.client)
    if not os.access(client, os.X_OK):
        print(f"skipped: {client} is not built (see the top of {Path(__file__).name})")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from owm.common.sizes import parse_size

    size = parse_size(args.size)
    only = set(args.only.split(",")) if args.only else {"owm", "nbdkit"}
    work = Path(tempfile.mkdtemp(prefix="owm-tester-", dir=args.dir))
    results: dict[str, dict[str, tuple[str, float, float]]] = {}
    try:
        for name, extra, export_size in tests(client, size):
            if "owm" in only:
                server = OwmServer(work / f"owm-{name}")
                try:
                    server.ask("create", "vol", str(export_size), "cow", str(CHUNK))
                    res = run_test(client, server.sock, "vol", extra, server.proc.pid,
                                   args.timeout)
                finally:
                    server.close()
                results.setdefault("owm cow", {})[name] = res
                print(f"  owm cow      {name:<10} {res[0]:<16} {res[1]:8.2f} s", flush=True)
            if "nbdkit" in only and shutil.which("nbdkit"):
                disk = work / f"{name}.raw"
                with open(disk, "wb") as f:
                    f.truncate(export_size)
                sock = work / "nbdkit.sock"
                argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                        "file", f"file={disk}"]
                with peer_server(argv, sock) as pid:
                    res = run_test(client, sock, "vol", extra, pid, args.timeout)
                disk.unlink()
                results.setdefault("nbdkit file", {})[name] = res
                print(f"  nbdkit file  {name:<10} {res[0]:<16} {res[1]:8.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = [t[0] for t in tests(client, size)]
    print(f"\nnbd-tester-client, write/flush on {args.size}, disks in {args.dir} "
          "(wall s / server CPU s; shared machine: noisy)")
    header = f"{'target':<14}" + "".join(f"{n:>26}" for n in names)
    print(header)
    print("-" * len(header))
    for target, row in results.items():
        cells = ""
        for n in names:
            if n in row:
                outcome, wall, cpu = row[n]
                cell = f"{wall:.2f} s / {cpu:.2f} s" if outcome == "ok" else outcome
            else:
                cell = "-"
            cells += f"{cell:>26}"
        print(f"{target:<14}{cells}")
    owm, peer = results.get("owm cow", {}), results.get("nbdkit file", {})
    for n in names:
        if n in owm and n in peer and owm[n][0] == peer[n][0] == "ok":
            ratio = owm[n][1] / peer[n][1]
            verdict = "ok" if ratio <= 2 else "BELOW"
            print(f"aim: {n} within 2x nbdkit: {verdict} ({ratio:.2f}x nbdkit's time)")


if __name__ == "__main__":
    main()
