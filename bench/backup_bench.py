#!/usr/bin/env python3
"""Backup speed in one run: owm backup to raw and to an owm repository beside nbdcopy, and an
incremental backup after 1% of the chunks changed.

A real ``owm serve`` keeps its pool on tmpfs (so disk speed is not what is measured).  A 4 GiB
volume (64 KiB chunks) gets half of it written, 1 MiB pieces of random data with a hole after
each, and is preserved.  Then, one at a time, each reading the same read-only export
``vol@0`` over the Unix socket and writing to tmpfs:

* ``nbdcopy`` (libnbd; four connections, many requests in flight) to a raw file;
* ``owm backup vol@0 --to F.raw`` (sparse raw file; block status, skips holes);
* ``owm backup vol@0 --to REPO`` (owm repository: BLAKE3, zstd, one file per chunk, synced);
* 1% of the volume's chunks are overwritten, the volume preserved again, and
  ``owm backup vol@1 --to REPO`` runs incrementally (only the changed chunks are read);
* once more after 1% changed and the daemon was killed with SIGKILL (the changed-chunk maps
  survive a crash: still incremental);
* ``owm restore REPO ID --to F.raw`` (read, decompress, hash on a thread per core) beside
  nbdcopy's row, ``owm backup verify REPO ID`` (its rate of stored bytes in the note) and
  ``owm backup prune REPO --keep-last 1`` (the collection included), one run each;
* ``restic backup`` of the same raw image into a fresh restic repository, when Debian's
  restic is installed (``apt-get install restic``; not part of ``scripts/setup``).

Each runs ``--rounds`` times, interleaved (the machine's load drifts), and the table shows the
median.  Rates are MB/s (10^6 bytes per second) of volume, i.e. volume size / wall time of the
command as a user runs it (process start included, for owm and nbdcopy alike); the owm rows
also show the time the backup itself reported.  The whole run is bounded by ``--time-limit``
(about a minute on two cores).

    .venv/bin/python bench/backup_bench.py [--size 4G] [--changed 0.01] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from owm.common.sizes import format_size, parse_size  # noqa: E402
from owm.nbd.client import NbdClient  # noqa: E402

OWM = [sys.executable, "-m", "owm"]
CHUNK = 64 * 1024
PIECE = 1 << 20


@dataclass
class Row:
    what: str
    seconds: float
    inner: float | None
    bytes_read: int | None
    note: str = ""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise SystemExit("backup_bench: the time limit ran out")
        return left


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "OWM_POOL"}
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def owm(pool: Path, *args: str | Path, deadline: Deadline) -> str:
    done = subprocess.run([*OWM, "--pool", str(pool), *map(str, args)], capture_output=True,
                          text=True, env=env(), cwd=REPO, timeout=deadline.left())
    if done.returncode != 0:
        raise SystemExit(f"owm {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout


def start_daemon(pool: Path, log: Path, deadline: Deadline) -> subprocess.Popen[bytes]:
    # The ready file, not the sockets: a daemon killed with SIGKILL leaves its socket files.
    ready = log.with_suffix(".ready")
    with open(log, "wb") as out:
        proc = subprocess.Popen([*OWM, "--pool", str(pool), "serve", "--listen", "none",
                                 "--ready-file", str(ready)],
                                stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"owm serve failed:\n{log.read_text()}")
        deadline.left()
        time.sleep(0.05)
    return proc


async def write_pieces(sock: Path, export: str, pieces: list[tuple[int, int]],
                       seed: int) -> None:
    """Random data at each (offset, length), 16 writes in flight, then a flush."""
    rng = random.Random(seed)
    client = await NbdClient.connect(export=export, unix_path=str(sock))
    window = asyncio.Semaphore(16)

    async def one(offset: int, length: int) -> None:
        try:
            await client.write(offset, rng.randbytes(length))
        finally:
            window.release()

    tasks = []
    for offset, length in pieces:
        await window.acquire()
        tasks.append(asyncio.ensure_future(one(offset, length)))
    await asyncio.gather(*tasks)
    await client.flush()
    await client.disconnect()


def timed(argv: list[str], deadline: Deadline) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=deadline.left())
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed: {done.stderr.strip()}")
    return seconds, done.stdout


def backup(pool: Path, image: str, to: Path, fmt: str, what: str,
           deadline: Deadline) -> tuple[Row, dict[str, object]]:
    seconds, out = timed([*OWM, "--pool", str(pool), "backup", image, "--to", str(to),
                          "--format", fmt, "--json"], deadline)
    summary = json.loads(out)
    return Row(what, seconds, float(summary["seconds"]), int(summary["bytes_read"])), summary


def median(rows: list[Row]) -> Row:
    """The row with the median wall time."""
    return sorted(rows, key=lambda r: r.seconds)[len(rows) // 2]


def print_table(rows: list[Row], size: int) -> None:
    nbdcopy = rows[0].seconds
    head = (f"{'':34} {'read':>9} {'wall s':>7} {'MB/s vol':>9} {'x nbdcopy':>9} "
            f"{'inner s':>8} {'MB/s inner':>10}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        rate = size / r.seconds / 1e6
        inner = f"{r.inner:8.2f} {size / r.inner / 1e6:10.0f}" if r.inner else f"{'-':>8} {'-':>10}"
        read = format_size(r.bytes_read) if r.bytes_read is not None else "-"
        print(f"{r.what:34} {read:>9} {r.seconds:7.2f} {rate:9.0f} {nbdcopy / r.seconds:9.2f} "
              f"{inner}  {r.note}")


def _after_crash(args: argparse.Namespace, pool: Path, sock: Path, work: Path,
                 daemon: subprocess.Popen[bytes], previous: str, repo: Path, rows: list[Row],
                 size: int, deadline: Deadline) -> subprocess.Popen[bytes]:
    """1% changed, the daemon killed with SIGKILL and restarted, then an incremental backup."""
    chunks = size // CHUNK
    changed = sorted(random.Random(9).sample(range(chunks), max(1, int(chunks * args.changed))))
    print(f"incremental after a crash: changing {len(changed)} chunks, then kill -9 ...",
          file=sys.stderr)
    owm(pool, "release", previous, deadline=deadline)
    asyncio.run(asyncio.wait_for(
        write_pieces(sock, "vol", [(c * CHUNK, CHUNK) for c in changed], 99), deadline.left()))
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    daemon = start_daemon(pool, work / "daemon-2.log", deadline)
    image = owm(pool, "preserve", "vol", deadline=deadline).strip()
    row, summary = backup(pool, image, repo, "owm", "owm backup (incr. after kill -9)",
                          deadline)
    row.note = (f"{summary['changed_chunks']} changed chunks read" if summary.get(
        "incremental") else "NOT incremental: the crash cost the changed-chunk map")
    rows.append(row)
    return daemon


def _repository_rows(pool: Path, repo: Path, work: Path, image: str, sock: Path, size: int,
                     deadline: Deadline) -> list[Row]:
    """Restore, verify and prune+GC of the repository; restic beside them when installed."""
    out: list[Row] = []
    listed = json.loads(owm(pool, "backup", "list", repo, "--json", deadline=deadline))
    newest = max(listed, key=lambda b: b["time"])["id"]
    print("restore, verify, prune ...", file=sys.stderr)
    target = work / "restored.raw"
    seconds, text = timed([*OWM, "restore", str(repo), newest, "--to", str(target), "--json"],
                          deadline)
    done = json.loads(text)
    out.append(Row("owm restore -> raw file", seconds, float(done["seconds"]),
                   int(done["bytes_written"]), "thread per core, every chunk hashed"))
    target.unlink()
    stored = sum(p.stat().st_size for p in (repo / "chunks").glob("*/*"))
    seconds, _ = timed([*OWM, "backup", "verify", str(repo), newest, "--json"], deadline)
    out.append(Row("owm backup verify (one backup)", seconds, None, stored,
                   f"{stored / seconds / 1e6:.0f} MB/s of stored chunks (wall)"))
    seconds, text = timed([*OWM, "backup", "prune", str(repo), "--keep-last", "1", "--json"],
                          deadline)
    pruned = json.loads(text)
    out.append(Row("owm backup prune --keep-last 1", seconds, float(pruned["seconds"]), None,
                   f"{len(pruned['removed'])} backups, {pruned['chunks_removed']} chunks "
                   "removed"))
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic): no restic row",
              file=sys.stderr)
        return out
    raw = work / "for-restic.raw"
    timed(["nbdcopy", f"nbd+unix:///{image}?socket={sock}", str(raw)], deadline)
    restic_env = {**env(), "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(work / "rr")}
    subprocess.run(["restic", "init"], env=restic_env, capture_output=True, check=True,
                   timeout=deadline.left())
    started = time.monotonic()
    subprocess.run(["restic", "backup", "--quiet", str(raw)], env=restic_env,
                   capture_output=True, check=True, timeout=deadline.left())
    out.append(Row("restic backup of the raw image", time.monotonic() - started, None, size,
                   "encrypted, content-defined chunks"))
    raw.unlink()
    return out


def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.time_limit)
    size = parse_size(args.size)
    for tool in ("nbdcopy",):
        if shutil.which(tool) is None:
            raise SystemExit(f"backup_bench needs {tool} (Debian package libnbd-bin)")
    free = shutil.disk_usage(args.tmpfs).free
    need = int(size * 1.2) + (256 << 20)  # pool (half) + repository (half) + one output
    if free < need:
        raise SystemExit(f"backup_bench needs {format_size(need)} free in {args.tmpfs}; "
                         f"it has {format_size(free)}")
    work = Path(tempfile.mkdtemp(prefix="owm-bb-", dir=args.tmpfs))
    pool = work / "pool"
    daemon = start_daemon(pool, work / "daemon.log", deadline)
    try:
        sock = pool / "nbd.sock"
        owm(pool, "volume", "create", "vol", "--size", str(size), "--chunk-size", "64K",
            deadline=deadline)
        pieces = [(o, PIECE) for o in range(0, size, 2 * PIECE)]
        print(f"filling {format_size(size)} volume: {len(pieces)} x 1M of random data, a 1M "
              "hole after each ...", file=sys.stderr)
        asyncio.run(asyncio.wait_for(write_pieces(sock, "vol", pieces, 1), deadline.left()))
        image = owm(pool, "preserve", "vol", deadline=deadline).strip()
        samples: dict[str, list[Row]] = {}
        repo = work / "repo"
        for n in range(args.rounds):
            print(f"round {n + 1} of {args.rounds}: nbdcopy, raw, owm ...", file=sys.stderr)
            target = work / "nbdcopy.raw"
            seconds, _ = timed(["nbdcopy", f"nbd+unix:///{image}?socket={sock}", str(target)],
                               deadline)
            samples.setdefault("nbdcopy", []).append(
                Row("nbdcopy -> raw file", seconds, None, None, "libnbd, 4 connections"))
            target.unlink()

            row, _ = backup(pool, image, work / "b.raw", "raw", "owm backup --format raw",
                            deadline)
            row.note = "sparse file, synced"
            samples.setdefault("raw", []).append(row)
            (work / "b.raw").unlink()

            shutil.rmtree(repo, ignore_errors=True)
            row, summary = backup(pool, image, repo, "owm", "owm backup --format owm (full)",
                                  deadline)
            row.note = (f"{summary['chunks_new']} chunks stored, "
                        f"{format_size(int(str(summary['bytes_written'])))} written")
            samples.setdefault("full", []).append(row)

        chunks = size // CHUNK
        rng = random.Random(2)
        previous = image
        for n in range(args.rounds):
            changed = sorted(rng.sample(range(chunks), max(1, int(chunks * args.changed))))
            print(f"incremental {n + 1} of {args.rounds}: changing {len(changed)} of {chunks} "
                  f"chunks ({args.changed:.0%}) ...", file=sys.stderr)
            asyncio.run(asyncio.wait_for(
                write_pieces(sock, "vol", [(c * CHUNK, CHUNK) for c in changed], 3 + n),
                deadline.left()))
            owm(pool, "release", previous, deadline=deadline)
            previous = owm(pool, "preserve", "vol", deadline=deadline).strip()
            row, summary = backup(pool, previous, repo, "owm", "owm backup --format owm (incr.)",
                                  deadline)
            row.note = (f"{summary['changed_chunks']} changed chunks read" if summary.get(
                "incremental") else "NOT incremental (the daemon gave no changed-chunk map)")
            samples.setdefault("incr", []).append(row)

        rows = [median(samples[k]) for k in ("nbdcopy", "raw", "full", "incr")]
        daemon = _after_crash(args, pool, sock, work, daemon, previous, repo, rows, size,
                              deadline)
        rows += _repository_rows(pool, repo, work, image, sock, size, deadline)
        full, incr = rows[2], rows[3]
        incr.note += (f"; {full.seconds / incr.seconds:.0f}x faster than full (wall), "
                      f"{(full.inner or 0) / (incr.inner or 1):.0f}x (inner)")
        print(f"\nowm backup speed: {format_size(size)} volume, half written, 64K chunks, "
              f"tmpfs, {os.cpu_count()} CPUs, median of {args.rounds} rounds\n")
        print_table(rows, size)
        raw_wall = rows[0].seconds / rows[1].seconds
        raw_inner = rows[0].seconds / (rows[1].inner or rows[1].seconds)
        speed_wall = full.seconds / incr.seconds
        speed_inner = (full.inner or 0) / (incr.inner or 1)
        print(f"\naims: raw >= nbdcopy: {raw_wall:.2f}x (wall), {raw_inner:.2f}x (inner); "
              f"incremental >= 20x faster than full: {speed_wall:.0f}x (wall), "
              f"{speed_inner:.0f}x (inner)")
        print("wall = the command as a user runs it, process start included (about 0.4 s of "
              "Python start-up for owm);\ninner = the time the backup reports, from connecting "
              "to the image until the backup is synced.")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4G", help="volume size (half of it is written)")
    parser.add_argument("--changed", type=float, default=0.01,
                        help="fraction of chunks changed before the incremental backup")
    parser.add_argument("--tmpfs", default="/dev/shm", help="where pool and backups live")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each (interleaved); the table shows the median")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the run")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
