#!/usr/bin/env python3
"""NBD write speed side by side in one run: owm and the peers that do the same job, all through
fio's nbd engine at queue depth 16, with the server's CPU time per I/O beside every figure.

Every target serves the same kind of disk on tmpfs (so storage speed is not what is measured),
or with ``--dir`` on a real file system (issue 17: ext4 under ``/var/tmp``; QEMU then opens its
files with ``cache.direct=on`` as issue 11 aim 4 asks, and with its default page cache too when
``--qemu-cache direct,default``), pre-filled with data, and gets a fresh snapshot (preserve,
overlay, fleece) before every job:

* W1: 4K writes, each the first to its chunk (a replayed fio iolog: one write in each of up
  to ``--w1-count`` chunks picked at random, in random order; fio's own random map cannot
  promise that once the block size is below the chunk size);
* W2: time-based 4K random writes;
* W3: time-based 1M sequential writes.

Rows, for each chunk size of ``--chunks`` (owm's chunk = qcow2's cluster = nbdkit's cow block,
so every snapshot copies the same amount per first write):

* ``owm cow, preserve active`` against QEMU's copy-before-write filter (fleecing, served by
  qemu-storage-daemon) with a qcow2 and with a raw fleece target (qemu 7.2 copies at least
  64K per first write whatever the cluster size);
* ``owm log, preserve active`` against qemu-nbd on a qcow2 overlay and nbdkit's cow filter;

and once: ``owm cow`` and ``owm mirror`` with no preserve against nbdkit's file plugin (C, the
practical limit) and qemu-nbd on the raw file.

``--p99-preserve cow,log`` adds, for each method named, the write latency around a preserve
(issue 17): a real ``owm serve`` daemon, fio's 4K random writes at queue depth 16 for
``--runtime`` seconds (at least 8) with every I/O's completion latency logged, and ``owm
preserve`` run through the CLI half-way through.  It prints the p99 (and the maximum) of the
second of writes before the preserve, of the second after the CLI was started, and of the second
after it returned; and, as a control, of the second after an ``owm status`` run 2.5 s before
the preserve (a CLI process that changes nothing: on a small machine starting one costs the
server CPU).

    .venv/bin/python bench/nbd_fio.py [--runtime 10] [--size 1G] [--chunks 4096,65536]
                                      [--only owm,qemu,nbdkit] [--dir /var/tmp]
                                      [--qemu-cache direct,default] [--jobs W1,W2,W3]
                                      [--p99-preserve cow,log]

The run takes about (rows x 3 x runtime) plus the fills; the aims of issue 11 are checked at
the end.  On a shared machine every figure is noisy: each progress line shows the 1-minute load
average when its job ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cold_cache, cpu_seconds

REPO = Path(__file__).resolve().parent.parent
JOBS = ["W1", "W2", "W3"]
DEPTH = 16


# ----------------------------------------------------------------------------- owm server


def owm_server_main(root: str, sock: str) -> None:
    """The owm side: a pool on tmpfs served over NBD, steered by commands on stdin."""
    import logging

    import uvloop

    # fio's nbd engine closes without NBD_CMD_DISC, so every fio session ends "unclean";
    # that is true and harmless here, and one warning per job would drown the table.
    logging.basicConfig(level=logging.ERROR)
    # The inline-write guard's back-offs move the figures: say when one happens.
    logging.getLogger("owm.storage").setLevel(logging.WARNING)
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
                elif cmd == "delete":  # frees the tmpfs space before the next volume
                    await pool.delete_volume(args[0], force=True)
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


@dataclass
class Result:
    value: float  # IOPS for 4K jobs, bytes/s for 1M
    cpu_per_io: float  # server CPU seconds per I/O


def w1_iolog(path: Path, size: int, chunk: int, count: int, seed: int = 1) -> int:
    """An fio iolog of 4K writes, each in its own chunk, in random order; returns the count."""
    chunks = size // chunk
    rng = random.Random(seed)
    picked = rng.sample(range(chunks), min(count, chunks))
    lines = ["fio version 2 iolog", "nbd add", "nbd open"]
    for n in picked:
        within = rng.randrange(0, chunk // 4096) * 4096 if chunk > 4096 else 0
        lines.append(f"nbd write {n * chunk + within} 4096")
    lines.append("nbd close")
    path.write_text("\n".join(lines) + "\n")
    return len(picked)


# With --dir: the bench's work directory, whose files' page cache is written back and dropped
# before every job (see cold_cache), so that every server starts each job alike.
COLD_ROOT: Path | None = None


def fio(uri: str, job: str, runtime: int, size: int, pid: int, iolog: Path) -> Result:
    if COLD_ROOT is not None:
        cold_cache(COLD_ROOT)
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--iodepth={DEPTH}",
            "--numjobs=1", "--output-format=json"]
    if job == "W1":
        argv += [f"--read_iolog={iolog}"]
    elif job == "W2":
        argv += ["--rw=randwrite", "--bs=4k", f"--runtime={runtime}", "--time_based",
                 f"--size={size}"]
    else:
        argv += ["--rw=write", "--bs=1M", f"--runtime={runtime}", "--time_based",
                 f"--size={size}"]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime * 3 + 600)
    cpu = cpu_seconds(pid) - cpu0
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip() or out.stdout[-500:]}")
    side = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["write"]
    ios = max(1, int(side["total_ios"]))
    value = side["iops"] if job != "W3" else side["bw_bytes"]
    return Result(float(value), cpu / ios)


def fill(uri: str, size: int) -> None:
    """Write every byte once so copies and reads see data, not holes."""
    subprocess.run(
        ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M",
         "--iodepth=8", f"--size={size}", "--output-format=terse", "--refill_buffers"],
        check=True,
        capture_output=True,
        timeout=600,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    name: str
    chunk: int  # 0: no snapshot, the chunk size does not apply
    results: dict[str, Result] = field(default_factory=dict)


def fmt(job: str, res: Result) -> str:
    value = f"{res.value / 1e9:.2f}GB/s" if job == "W3" else f"{res.value / 1000:.1f}K"
    return f"{value} {res.cpu_per_io * 1e6:5.0f}us"


def print_table(rows: list[Row]) -> None:
    print("\nIOPS (W1, W2) or GB/s (W3), and the server's CPU time per I/O; shared machine: noisy")
    header = f"{'target':<34}{'chunk':>7}" + "".join(f"{job:>20}" for job in JOBS)
    print(header)
    print("-" * len(header))
    for row in rows:
        chunk = f"{row.chunk // 1024}K" if row.chunk else "-"
        cells = "".join(
            f"{fmt(job, row.results[job]) if job in row.results else '-':>20}" for job in JOBS
        )
        print(f"{row.name:<34}{chunk:>7}{cells}")


def check_aims(rows: list[Row]) -> None:
    def find(name: str, chunk: int) -> Row | None:
        return next((r for r in rows if r.name == name and r.chunk == chunk), None)

    def cmp(owm_row: str, peer_row: str, chunk: int, jobs: list[str] = JOBS,
            aim: float = 1.0) -> None:
        a, b = find(owm_row, chunk), find(peer_row, chunk)
        if not a or not b:
            return
        for job in jobs:
            if job in a.results and job in b.results and b.results[job].value:
                ratio = a.results[job].value / b.results[job].value
                verdict = "ok   " if ratio >= aim else "BELOW"
                size = f"{chunk // 1024}K" if chunk else "-"
                print(f"  {verdict} {owm_row:<26} {size:>4} {job} {ratio:5.2f}x {peer_row}"
                      f" (aim >= {aim:.1f}x)")

    print("\naims (issues 11 and 17), owm / peer:")
    for tag in ("", ", direct"):
        for chunk in sorted({r.chunk for r in rows if r.chunk}):
            cmp("owm cow, preserve active", f"QEMU cbw, qcow2 fleece{tag}", chunk)
            cmp("owm cow, preserve active", f"QEMU cbw, raw fleece{tag}", chunk)
            cmp("owm log, preserve active", f"qemu-nbd qcow2 overlay{tag}", chunk)
            cmp("owm log, preserve active", f"qemu-nbd qcow2 overlay{tag}", chunk, aim=0.8)
        cmp("owm mirror", f"qemu-nbd raw{tag}", 0, ["W2"])
        cmp("owm cow", f"qemu-nbd raw{tag}", 0, ["W1", "W2"])
    for chunk in sorted({r.chunk for r in rows if r.chunk}):
        cmp("owm log, preserve active", "nbdkit cow filter", chunk)
    cmp("owm cow", "nbdkit file", 0, ["W3"])
    a, b = find("owm cow", 0), find("nbdkit file", 0)
    if a and b:
        for job in JOBS:
            if job in a.results and job in b.results and b.results[job].cpu_per_io:
                ratio = a.results[job].cpu_per_io / b.results[job].cpu_per_io
                verdict = "ok   " if ratio <= 1.5 else "ABOVE"
                print(f"  {verdict} owm cow CPU per I/O {job} {ratio:5.2f}x nbdkit file's "
                      "(aim <= 1.5x)")


class Peer:
    """How to serve one peer: its command line, its export name, and what to make fresh
    before each job (an overlay or fleece file)."""

    def __init__(self, name: str, chunk: int, argv: list[str], export: str = "",
                 fresh: Callable[[], None] | None = None) -> None:
        self.name, self.chunk, self.argv, self.export, self.fresh = name, chunk, argv, export, fresh


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def peers(work: Path, disk: Path, size: int, chunks: list[int], sock: Path,
          caches: list[str]) -> list[Peer]:
    """The peers' rows; QEMU's once per cache mode of ``caches`` ("default": the page cache,
    "direct": ``cache.direct=on``, O_DIRECT, which tmpfs refuses)."""
    nbdkit = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock)]
    out = [Peer("nbdkit file", 0, [*nbdkit, "file", f"file={disk}"])]
    for cache in caches:
        tag = ", direct" if cache == "direct" else ""
        qemu_nbd = ["qemu-nbd", "-k", str(sock), "--persistent", "--shared=16",
                    "--cache=none" if cache == "direct" else "--cache=writeback",
                    "--aio=threads", "-x", "disk"]
        out.append(Peer(f"qemu-nbd raw{tag}", 0, [*qemu_nbd, "-f", "raw", str(disk)], "disk"))
    for chunk in chunks:
        overlay = work / f"overlay-{chunk}.qcow2"
        fleece_q = work / f"fleece-{chunk}.qcow2"
        fleece_r = work / f"fleece-{chunk}.raw"

        def fresh_overlay(o: Path = overlay, c: int = chunk) -> None:
            o.unlink(missing_ok=True)
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={c}", "-b", str(disk),
                     "-F", "raw", str(o))

        def fresh_qcow2_fleece(f: Path = fleece_q, c: int = chunk) -> None:
            f.unlink(missing_ok=True)
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={c}", str(f), str(size))

        def fresh_raw_fleece(f: Path = fleece_r) -> None:
            f.unlink(missing_ok=True)
            with open(f, "wb") as fh:
                fh.truncate(size)

        def cbw(target: Path, fmt: str, direct: str) -> list[str]:
            return [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=sf,filename={disk}{direct}",
                "--blockdev", "driver=raw,node-name=src,file=sf",
                "--blockdev", f"driver=file,node-name=tf,filename={target}{direct}",
                "--blockdev", f"driver={fmt},node-name=tgt,file=tf",
                "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=cbw,name=disk,writable=on",
            ]

        for cache in caches:
            tag = ", direct" if cache == "direct" else ""
            direct = ",cache.direct=on" if cache == "direct" else ""
            qemu_nbd = ["qemu-nbd", "-k", str(sock), "--persistent", "--shared=16",
                        "--cache=none" if cache == "direct" else "--cache=writeback",
                        "--aio=threads", "-x", "disk"]
            out += [
                Peer(f"QEMU cbw, qcow2 fleece{tag}", chunk, cbw(fleece_q, "qcow2", direct),
                     "disk", fresh_qcow2_fleece),
                Peer(f"QEMU cbw, raw fleece{tag}", chunk, cbw(fleece_r, "raw", direct), "disk",
                     fresh_raw_fleece),
                Peer(f"qemu-nbd qcow2 overlay{tag}", chunk,
                     [*qemu_nbd, "-f", "qcow2", str(overlay)], "disk", fresh_overlay),
            ]
        out.append(Peer("nbdkit cow filter", chunk,
                        [*nbdkit, "--filter=cow", "file", f"file={disk}",
                         f"cow-block-size={chunk}"]))
    return out


def run(args: argparse.Namespace) -> list[Row]:
    size = args.size
    only = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="owm-bench-", dir=args.dir or args.tmpfs))
    global COLD_ROOT
    COLD_ROOT = work if args.dir else None
    rows: list[Row] = []
    iologs: dict[int, Path] = {}
    try:
        for chunk in [*args.chunks, 65536]:
            iologs[chunk] = work / f"w1-{chunk}.log"
            n = w1_iolog(iologs[chunk], size, chunk, args.w1_count)
        print(f"W1 replays {n} first writes per job", flush=True)
        iologs[0] = iologs[65536]
        disk = work / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(size)
        sock = work / "peer.sock"
        wanted = [p for p in peers(work, disk, size, args.chunks, sock, args.qemu_cache)
                  if only is None or any(o in p.name for o in only)]
        if wanted:
            print(f"filling {disk} ({size} bytes) ...", flush=True)
            with peer_server(["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                              "file", f"file={disk}"], sock):
                fill(f"nbd+unix:///?socket={sock}", size)
        for peer in wanted:
            row = Row(peer.name, peer.chunk)
            rows.append(row)
            for job in JOBS:
                if peer.fresh is not None:
                    peer.fresh()
                with peer_server(peer.argv, sock) as pid:
                    uri = f"nbd+unix:///{peer.export}?socket={sock}"
                    row.results[job] = fio(uri, job, args.runtime, size, pid,
                                           iologs[peer.chunk])
                print(f"  {peer.name:<30} {peer.chunk:>6} {job} {fmt(job, row.results[job])}"
                      f"  load {os.getloadavg()[0]:.1f}", flush=True)
        owm_rows = ["owm cow", "owm mirror", "owm cow, preserve active",
                    "owm log, preserve active"]
        if only is None or any(o in r for o in only for r in owm_rows):
            rows.extend(run_owm(work, size, args.runtime, args.chunks, iologs, only))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run_owm(
    work: Path, size: int, runtime: int, chunks: list[int], iologs: dict[int, Path],
    only: set[str] | None = None,
) -> list[Row]:
    def wanted(name: str) -> bool:
        return only is None or "owm" in only or any(o in name for o in only)

    rows: list[Row] = []
    server = OwmServer(work)
    pid = server.proc.pid
    try:
        for method in ("cow", "mirror"):
            if not wanted(f"owm {method}"):
                continue
            server.ask("create", method, str(size), method, "65536")
            print(f"filling owm {method} ...", flush=True)
            fill(server.uri(method), size)
            row = Row(f"owm {method}", 0)
            rows.append(row)
            for job in JOBS:
                row.results[job] = fio(server.uri(method), job, runtime, size, pid, iologs[0])
                print(f"  {row.name:<30} {'-':>6} {job} {fmt(job, row.results[job])}"
                      f"  load {os.getloadavg()[0]:.1f}", flush=True)
            server.ask("delete", method)
        for chunk in chunks:
            for method in ("cow", "log"):
                if not wanted(f"owm {method}, preserve active"):
                    continue
                name = f"{method}-{chunk}"
                server.ask("create", name, str(size), method, str(chunk))
                print(f"filling owm {name} ...", flush=True)
                fill(server.uri(name), size)
                row = Row(f"owm {method}, preserve active", chunk)
                rows.append(row)
                image = None
                for job in JOBS:
                    # A fresh preserve per job: every chunk is shared again.
                    if image is not None:
                        server.ask("release", image)
                    image = server.ask("preserve", name)
                    row.results[job] = fio(server.uri(name), job, runtime, size, pid,
                                           iologs[chunk])
                    print(f"  {row.name:<30} {chunk:>6} {job} "
                          f"{fmt(job, row.results[job])}  load {os.getloadavg()[0]:.1f}",
                          flush=True)
                assert image is not None
                server.ask("release", image)
                server.ask("delete", name)
    finally:
        server.close()
    return rows


# ------------------------------------------------------------------- p99 around a preserve


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p99_preserve(base: Path, method: str, size: int, runtime: int, chunk: int) -> dict[str, float]:
    """Write latency before and after a preserve issued through the CLI mid-run (issue 17)."""
    work = Path(tempfile.mkdtemp(prefix="owm-p99-", dir=base))
    pool = work / "pool"
    owm = [sys.executable, "-m", "owm", "--pool", str(pool)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen([*owm, "serve", "--listen", "127.0.0.1:0"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sock = pool / "nbd.sock"
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run([*owm, "status", "--json"], cwd=REPO, env=env,
                                   capture_output=True, timeout=60)
            if probe.returncode == 0 and sock.exists():
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                err = daemon.stderr.read().decode() if daemon.stderr else ""
                raise RuntimeError(f"owm serve did not start: {err[-2000:]}")
            time.sleep(0.2)
        subprocess.run([*owm, "volume", "create", "vol", "--size", str(size), "--method", method,
                        "--chunk-size", str(chunk)], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=60)
        uri = f"nbd+unix:///vol?socket={sock}"
        fill(uri, size)
        # The fill's dirty pages written back first, so the steady writes are not throttled by
        # them (the peers' and owm's table rows see the same thing; here it would blur the p99).
        for path in (pool / "volumes").rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        prefix = work / "lat"
        argv = ["fio", "--name=p99", "--ioengine=nbd", f"--uri={uri}", f"--iodepth={DEPTH}",
                "--rw=randwrite", "--bs=4k", f"--size={size}", f"--runtime={runtime}",
                "--time_based", f"--write_lat_log={prefix}", "--log_avg_msec=0",
                "--log_unix_epoch=1", "--output-format=json"]
        fio_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # A control first: a CLI command that changes nothing (``owm status``), so that what a
        # CLI process costs the machine (2 cores here) is seen apart from what the preserve does.
        time.sleep(runtime / 2 - 2.5)
        control = time.time()
        subprocess.run([*owm, "status", "vol", "--json"], cwd=REPO, env=env,
                       capture_output=True, timeout=120)
        control_returned = time.time()
        time.sleep(max(0.0, control + 2.5 - time.time()))
        issued = time.time()
        done = subprocess.run([*owm, "preserve", "vol"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        returned = time.time()
        _out, err = fio_proc.communicate(timeout=runtime * 3 + 120)
        if done.returncode != 0:
            raise RuntimeError(f"owm preserve failed: {done.stderr.strip()}")
        if fio_proc.returncode != 0:
            raise RuntimeError(f"fio failed: {err.decode().strip()[-500:]}")
        samples: list[tuple[float, float]] = []  # (completion time s, latency ms)
        for log in work.glob("lat_clat.*.log"):
            for line in log.read_text().splitlines():
                fields = line.split(",")
                if len(fields) >= 2:
                    samples.append((int(fields[0]) / 1000, int(fields[1]) / 1e6))
        start = min(t for t, _ in samples)

        def window(t0: float, t1: float) -> list[float]:
            return [lat for t, lat in samples if t0 <= t < t1]

        steady = window(max(start + 1.0, issued - 1.2), issued - 0.2)  # the second before
        after_control = window(control, control + 1.0)
        after_issue = window(issued, issued + 1.0)
        after_return = window(returned, returned + 1.0)
        result = {
            "steady_p99_ms": _percentile(steady, 0.99), "steady_max_ms": max(steady, default=0),
            "issued_p99_ms": _percentile(after_issue, 0.99),
            "issued_max_ms": max(after_issue, default=0),
            "returned_p99_ms": _percentile(after_return, 0.99),
            "returned_max_ms": max(after_return, default=0),
            "cli_seconds": returned - issued, "ios_after_issue": len(after_issue),
            "steady_iops": len(steady) / max(1e-9, issued - 0.2 - max(start + 1.0, issued - 1.2)),
            "control_p99_ms": _percentile(after_control, 0.99),
            "control_max_ms": max(after_control, default=0),
            "control_seconds": control_returned - control,
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    # How often the daemon's inline-write guard sent disk writes to the writer thread (a blocked
    # inline write, or too much dirty memory): either moves the steady p99.
    log_text = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
    result["guard_events"] = float(sum(("inline disk writes blocked" in line
                                        or "inline disk writes off" in line)
                                       for line in log_text.splitlines()))
    return result


def print_p99(method: str, r: dict[str, float]) -> None:
    ratio = r["issued_p99_ms"] / r["steady_p99_ms"] if r["steady_p99_ms"] else float("nan")
    verdict = "ok   " if ratio <= 2.0 else "ABOVE"
    print(f"  {verdict} owm {method}: write p99 steady {r['steady_p99_ms']:.2f} ms "
          f"(max {r['steady_max_ms']:.1f}); in the second after `owm preserve` started "
          f"{r['issued_p99_ms']:.2f} ms (max {r['issued_max_ms']:.1f}, "
          f"{r['ios_after_issue']:.0f} writes; steady {r['steady_iops']:.0f}/s), "
          f"after it returned {r['returned_p99_ms']:.2f} ms "
          f"(max {r['returned_max_ms']:.1f}); {ratio:.2f}x steady (aim <= 2x); the CLI took "
          f"{r['cli_seconds'] * 1000:.0f} ms.  Control, the second after `owm status` started: "
          f"{r['control_p99_ms']:.2f} ms (max {r['control_max_ms']:.1f}; it took "
          f"{r['control_seconds'] * 1000:.0f} ms); inline-write guard events "
          f"{r.get('guard_events', 0):.0f}; load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--owm-server":
        owm_server_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per W2/W3 job")
    parser.add_argument("--size", default="1G", help="disk size (K/M/G suffixes)")
    parser.add_argument("--chunks", default="4096,65536", help="chunk/cluster sizes, bytes")
    parser.add_argument("--w1-count", type=int, default=20000, help="first writes per W1 job")
    parser.add_argument("--tmpfs", default="/dev/shm", help="where the disks live")
    parser.add_argument("--only", help="comma-separated substrings of the targets to run")
    parser.add_argument("--jobs", default=",".join(JOBS), help="the jobs to run, of W1,W2,W3")
    parser.add_argument("--dir", help="a directory on a real disk (ext4: /var/tmp) instead of "
                        "tmpfs; QEMU then runs with cache.direct=on")
    parser.add_argument("--qemu-cache", help="QEMU's cache modes, comma-separated: direct "
                        "(cache.direct=on), default (the page cache); default: direct with "
                        "--dir, else default")
    parser.add_argument("--p99-only", action="store_true",
                        help="run only the --p99-preserve measurement, not the table")
    parser.add_argument("--p99-preserve", help="methods (cow,log,mirror) to measure the write "
                        "latency around a preserve for, through a real daemon and the CLI")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from owm.common.sizes import parse_size

    args.size = parse_size(args.size)
    JOBS[:] = [j for j in JOBS if j in args.jobs.split(",")]
    args.chunks = [int(c) for c in args.chunks.split(",")]
    args.qemu_cache = (args.qemu_cache or ("direct" if args.dir else "default")).split(",")
    if any(c not in ("direct", "default") for c in args.qemu_cache):
        sys.exit("--qemu-cache takes direct and/or default")
    for tool in ("fio", "nbdkit", "qemu-nbd", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/setup installs it; qemu-storage-daemon "
                     "comes with Debian's qemu-system-common)")
    if args.p99_preserve:
        print("\nwrite latency around a preserve (4K random writes, queue depth 16):", flush=True)
        base = Path(args.dir or args.tmpfs)
        for method in args.p99_preserve.split(","):
            print_p99(method, p99_preserve(base, method, args.size, args.runtime,
                                           args.chunks[-1]))
    if args.p99_only:
        return
    rows = run(args)
    print_table(rows)
    check_aims(rows)


if __name__ == "__main__":
    main()
