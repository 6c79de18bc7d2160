#!/usr/bin/env python3
"""Deep queues side by side: 1 KiB writes on one chunk with 1, 16 and 256 in flight.

owm (a ``cow`` volume, 64 KiB chunks, on tmpfs) and nbdkit's file plugin (C, on a tmpfs file)
are driven by the same libnbd client, which keeps N writes in flight, all inside the first
64 KiB (one owm chunk, so every write waits on the same engine lock).  For each depth the table
gives writes per second and the server's CPU time per write.  A second table puts a light
session (serial 4 KiB writes) beside a heavy one (256 writes in flight over 256 chunks) and
gives the light session's p50 and p99 latency: one busy session must not starve another.

    .venv/bin/python bench/deep_queue.py [--count 20000] [--only owm,nbdkit] [--no-fairness]

libnbd's Python bindings are importable only by Debian's /usr/bin/python3 (python3-libnbd), so
the client runs as a subprocess of that interpreter.  Every run is bounded by ``--count``
requests per measurement and ``--timeout`` seconds.  Figures on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_fio import OwmServer, cpu_seconds, peer_server

SYSTEM_PYTHON = "/usr/bin/python3"
SIZE = 64 * 1024 * 1024
CHUNK = 65536

# The client: ``writes URI DEPTH COUNT SPREAD`` keeps DEPTH 1 KiB writes in flight until COUNT
# have completed, inside the first chunk (SPREAD 0) or one per chunk over 256 chunks (SPREAD 1,
# so they all wait on the I/O threads together, not on one chunk's lock); ``light URI COUNT``
# waits a moment, then does COUNT serial 4 KiB writes far from those and gives each one's
# latency.  Both print one JSON line.
CLIENT = r"""
import json, sys, time
import nbd

def writes(uri, depth, count, spread):
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = nbd.Buffer.from_bytearray(bytearray(b"w" * 1024))
    issued = done = 0
    def completed(err):
        nonlocal done
        done += 1
        return 1
    start = time.monotonic()
    while done < count:
        while issued < count and issued - done < depth:
            off = (issued % 256) * 65536 if spread else (issued % 64) * 1024
            h.aio_pwrite(buf, off, completion=lambda err: completed(err))
            issued += 1
        h.poll(-1)
    elapsed = time.monotonic() - start
    h.shutdown()
    print(json.dumps({"elapsed": elapsed, "count": done}), flush=True)

def light(uri, count):
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = b"l" * 4096
    time.sleep(0.3)  # let the heavy session fill its queue first
    lat = []
    start = time.monotonic()
    for i in range(count):
        t = time.monotonic()
        h.pwrite(buf, CHUNK_AWAY + (i % 16) * 4096)
        lat.append(time.monotonic() - t)
    elapsed = time.monotonic() - start
    h.shutdown()
    print(json.dumps({"elapsed": elapsed, "count": count, "latencies": lat}), flush=True)

CHUNK_AWAY = 32 << 20
if sys.argv[1] == "writes":
    writes(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
else:
    light(sys.argv[2], int(sys.argv[3]))
"""


def client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", CLIENT, *args], stdout=subprocess.PIPE, text=True
    )


def result(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"the client did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the client failed (exit {proc.returncode})")
    data: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return data


def depth_row(
    uri: str, pid: int, depths: list[int], count: int, timeout: float
) -> list[tuple[float, float]]:
    """(writes per second, server CPU µs per write) at each depth."""
    row = []
    for depth in depths:
        cpu0 = cpu_seconds(pid)
        res = result(client("writes", uri, str(depth), str(count), "0"), timeout)
        cpu = cpu_seconds(pid) - cpu0
        n = float(res["count"])  # type: ignore[arg-type]
        row.append((n / float(res["elapsed"]), cpu / n * 1e6))  # type: ignore[arg-type]
    return row


def fairness_row(uri: str, light_count: int, heavy_count: int, timeout: float) -> dict[str, float]:
    """The light session's latency percentiles (ms) while a heavy one keeps 256 in flight."""
    heavy = client("writes", uri, "256", str(heavy_count), "1")
    light = client("light", uri, str(light_count))
    res = result(light, timeout)
    result(heavy, timeout)
    lat = sorted(res["latencies"])  # type: ignore[arg-type]
    return {
        "p50": lat[len(lat) // 2] * 1000,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "max": lat[-1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1,16,256", help="writes in flight, comma-separated")
    parser.add_argument("--count", type=int, default=20000, help="writes per measurement")
    parser.add_argument("--light", type=int, default=500, help="writes of the light session")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    parser.add_argument("--tmpfs", default="/dev/shm", help="where the disks live")
    parser.add_argument("--only", help="comma-separated: owm, nbdkit")
    parser.add_argument("--no-fairness", action="store_true", help="skip the light/heavy table")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True
    ).returncode:
        sys.exit("libnbd's Python bindings are missing (apt-get install python3-libnbd)")
    only = set(args.only.split(",")) if args.only else {"owm", "nbdkit"}
    work = Path(tempfile.mkdtemp(prefix="owm-deepq-", dir=args.tmpfs))
    rows: dict[str, list[tuple[float, float]]] = {}
    fair: dict[str, dict[str, float]] = {}
    try:
        if "owm" in only:
            server = OwmServer(work)
            try:
                server.ask("create", "vol", str(SIZE), "cow", str(CHUNK))
                rows["owm cow"] = depth_row(
                    server.uri("vol"), server.proc.pid, depths, args.count, args.timeout
                )
                if not args.no_fairness:
                    fair["owm cow"] = fairness_row(
                        server.uri("vol"), args.light, args.count, args.timeout
                    )
            finally:
                server.close()
        if "nbdkit" in only and shutil.which("nbdkit"):
            disk = work / "disk.raw"
            with open(disk, "wb") as f:
                f.truncate(SIZE)
            sock = work / "nbdkit.sock"
            argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                    "file", f"file={disk}"]
            with peer_server(argv, sock) as pid:
                uri = f"nbd+unix:///?socket={sock}"
                rows["nbdkit file"] = depth_row(uri, pid, depths, args.count, args.timeout)
                if not args.no_fairness:
                    fair["nbdkit file"] = fairness_row(uri, args.light, args.count, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n1 KiB writes on one 64 KiB chunk, {args.count} per depth (shared machine: noisy)")
    header = f"{'target':<14}" + "".join(f"{f'depth {d}':>24}" for d in depths)
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = "".join(f"{rate:>10.0f}/s {cpu:6.1f} µs/io" for rate, cpu in row)
        print(f"{name:<14}{cells}")
    owm = rows.get("owm cow")
    if owm and 16 in depths and 256 in depths:
        owm = [owm[depths.index(16)], owm[depths.index(16)], owm[depths.index(256)]]
        verdict = "ok" if owm[2][0] >= owm[1][0] else "BELOW"
        print(f"aim: depth 256 >= depth 16 on owm: {verdict} ({owm[2][0] / owm[1][0]:.2f}x)")
    if fair:
        print("\nlight session (serial 4 KiB writes) beside a heavy one (256 writes in flight)")
        for name, f in fair.items():
            print(f"{name:<14} p50 {f['p50']:7.2f} ms   p99 {f['p99']:7.2f} ms   "
                  f"max {f['max']:7.2f} ms")


if __name__ == "__main__":
    main()
