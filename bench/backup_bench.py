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
* ``owm restore REPO ID --to F.raw`` (read, decompress, hash on two threads per core) in
  pairs with an nbdcopy of the image that backup was taken from (same load for both),
  ``--rounds`` pairs; then ``owm backup verify REPO ID`` (its rate of stored bytes and of
  image data in the note) and ``owm backup prune REPO --keep-last 1`` (the collection
  included), one run each;
* an encrypted full backup (``--encrypt --key-file``) beside the plain one;
* restic (Debian's, installed by ``scripts/setup``) beside owm's repository rows, its
  repository on the same tmpfs: ``restic backup`` of the image (full), again after the same
  changes as owm's first incremental, and ``restic restore`` of that snapshot.  restic cannot
  read NBD, so each image is first copied to a raw file on the tmpfs with nbdcopy (not timed)
  and restic reads that file; owm reads the same image over the Unix socket.  Both read from
  memory, and owm's rows include the daemon's work (its CPU is the "srv cpu" column).

``--data random`` (default) writes incompressible data; ``--data compressible`` writes 4 KiB
blocks of half text, half zeroes (each block different), which zstd stores in about a ninth;
``--data mixed`` (random 4 KiB blocks among those, 7 in 16) and ``--data usrlib`` (a tar of
``/usr/lib``, a real file tree) both come to about 2:1, the ratio of a typical VM image.  Every
verify row gives the compression ratio of what it checked beside its MB/s of stored data
(chunk files read) and of image data (what they decode to), by wall time, by verify's own
seconds and per CPU-second, from what ``verify --json`` reports; below the table, the limit:
what zstd and BLAKE3 alone do on the same chunks on one core, and so on every core.  The "srv
cpu" column is the CPU seconds the daemon used during the row (read from /proc; for restore
and verify, which do not use it, it shows what else ran meanwhile; "-" where not measured).
``--only verify`` makes one full backup and verifies it ``--rounds`` times, nothing else.
owm's modules are byte-compiled before anything is timed, as an installed owm's are (this
machine sets PYTHONDONTWRITEBYTECODE, which made every command compile them again: about 20 ms
of CPU per command).

Each runs ``--rounds`` times, interleaved (the machine's load drifts), and the table shows the
median.  Rates are MB/s (10^6 bytes per second) of volume, i.e. volume size / wall time of the
command as a user runs it (process start included, for owm and nbdcopy alike); the owm rows
also show the time the backup itself reported.  The whole run is bounded by ``--time-limit``
(about a minute on two cores).

    .venv/bin/python bench/backup_bench.py [--size 4G] [--changed 0.01] [--rounds 3]
        [--data random|compressible|mixed|usrlib] [--only verify]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
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
    server_cpu: float | None = None  # CPU seconds of the daemon during the row
    cpu: float | None = None  # CPU seconds of the command itself


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise SystemExit("backup_bench: the time limit ran out")
        return left


def env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE dropped: owm's modules run byte-compiled (see compile_owm), as
    # an installed owm's do, instead of being compiled again by every command timed.
    out = {k: v for k, v in os.environ.items()
           if k not in ("OWM_POOL", "PYTHONDONTWRITEBYTECODE")}
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def compile_owm() -> None:
    """Byte-compile owm's modules (into its ``__pycache__`` directories, which git ignores)
    before anything is timed: pip does as much when it installs owm."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "owm")], check=True,
                   env=env(), stdout=subprocess.DEVNULL)


def owm(pool: Path, *args: str | Path, deadline: Deadline) -> str:
    done = subprocess.run([*OWM, "--pool", str(pool), *map(str, args)], capture_output=True,
                          text=True, env=env(), cwd=REPO, timeout=deadline.left())
    if done.returncode != 0:
        raise SystemExit(f"owm {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout


class Daemon:
    """The ``owm serve`` under test; whichever process is current is stopped at the end (a
    restart after kill -9 replaces it, and a failing step must not leak it)."""

    def __init__(self, pool: Path) -> None:
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path, deadline: Deadline) -> None:
        self.proc = start_daemon(self.pool, log, deadline)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu(self) -> float:
        """CPU seconds (user + system, every thread) the daemon has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


_WORDS = [b"owm", b"backup", b"chunk", b"volume", b"preserve", b"image", b"drained",
          b"session", b"write", b"flush", b"transaction", b"consistent", b"the", b"of", b"and",
          b"a", b"to", b"2026-12-02", b"INFO", b"ERROR", b"select", b"from", b"where", b"id",
          b"=", b"42\n"]
_TEXT = b" ".join(random.Random(0).choices(_WORDS, k=40000))


DATA_KINDS = ("random", "compressible", "mixed", "usrlib")
MIXED_RANDOM = 7 / 16  # the share of random 4 KiB blocks that makes ``mixed`` about 2:1


class FileTree:
    """``usrlib``: the bytes of a tar of a real file tree (``/usr/lib``, about 2:1 under zstd
    in 64 KiB chunks, like a typical VM image's), made once on the tmpfs and handed out in
    order, from the start again when used up."""

    def __init__(self, path: Path, size: int, deadline: Deadline, tree: str = "usr/lib") -> None:
        with open(path, "wb") as out:
            tar = subprocess.Popen(["tar", "-cf", "-", "-C", "/", tree], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
            assert tar.stdout is not None
            left = size
            while left > 0:
                deadline.left()
                block = tar.stdout.read(min(left, 1 << 20))
                if not block:
                    break
                out.write(block)
                left -= len(block)
            tar.kill()
            tar.wait()
        self.data = path.read_bytes()
        if len(self.data) < 1 << 20:
            raise SystemExit(f"backup_bench: the tar of /{tree} is too small for --data usrlib")
        self.at = 0

    def take(self, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            piece = self.data[self.at:self.at + length - len(out)]
            self.at = (self.at + len(piece)) % len(self.data)
            out += piece
        return bytes(out)


_TREE: FileTree | None = None  # set by run() for --data usrlib


def _text_block(rng: random.Random) -> bytes:
    """4 KiB: 2 KiB of text (a numbered slice of a word list) and 2 KiB of zeroes."""
    start = rng.randrange(len(_TEXT) - 2048)
    block = (b"%016x " % rng.getrandbits(64)) + _TEXT[start:start + 2031]
    return block + bytes(4096 - len(block))


def piece_data(rng: random.Random, length: int, data: str) -> bytes:
    """``length`` bytes of one kind: ``random`` (incompressible), ``compressible`` (4 KiB
    text blocks, see _text_block: zstd stores about a ninth), ``mixed`` (4 KiB blocks, random
    with a chance of MIXED_RANDOM, else text: about 2:1) or ``usrlib`` (the next bytes of a
    tar of /usr/lib, see FileTree: about 2:1)."""
    if data == "random":
        return rng.randbytes(length)
    if data == "usrlib":
        assert _TREE is not None, "run() makes the tree first"
        return _TREE.take(length)
    out = bytearray()
    while len(out) < length:
        if data == "mixed" and rng.random() < MIXED_RANDOM:
            out += rng.randbytes(4096)
        else:
            out += _text_block(rng)
    return bytes(out[:length])


async def write_pieces(sock: Path, export: str, pieces: list[tuple[int, int]],
                       seed: int, data: str = "random") -> None:
    """Data (see piece_data) at each (offset, length), 16 writes in flight, then a flush."""
    rng = random.Random(seed)
    client = await NbdClient.connect(export=export, unix_path=str(sock))
    window = asyncio.Semaphore(16)

    async def one(offset: int, length: int) -> None:
        try:
            await client.write(offset, piece_data(rng, length, data))
        finally:
            window.release()

    tasks = []
    for offset, length in pieces:
        await window.acquire()
        tasks.append(asyncio.ensure_future(one(offset, length)))
    await asyncio.gather(*tasks)
    await client.flush()
    await client.disconnect()


def timed(argv: list[str], deadline: Deadline, extra_env: dict[str, str] | None = None,
          cwd: Path = REPO) -> tuple[float, str, float]:
    """Run a command: its wall seconds, its output and its CPU seconds (user + system)."""
    started = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, env={**env(), **(extra_env or {})},
                          cwd=cwd, timeout=deadline.left())
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed: {done.stderr.strip()}")
    return seconds, done.stdout, cpu


def served(daemon: Daemon, row: Row, before: float) -> Row:
    """``row`` with the daemon's CPU since ``before`` (a Daemon.cpu() reading)."""
    row.server_cpu = daemon.cpu() - before
    return row


def backup(daemon: Daemon, image: str, to: Path, fmt: str, what: str, deadline: Deadline,
           *extra: str | Path) -> tuple[Row, dict[str, object]]:
    before = daemon.cpu()
    seconds, out, cpu = timed([*OWM, "--pool", str(daemon.pool), "backup", image, "--to",
                               str(to), "--format", fmt, *map(str, extra), "--json"], deadline)
    summary = json.loads(out)
    row = Row(what, seconds, float(summary["seconds"]), int(summary["bytes_read"]), cpu=cpu)
    return served(daemon, row, before), summary


def nbdcopy(daemon: Daemon, image: str, target: Path, deadline: Deadline) -> Row:
    before = daemon.cpu()
    seconds, _, cpu = timed(["nbdcopy",
                             f"nbd+unix:///{image}?socket={daemon.pool / 'nbd.sock'}",
                             str(target)], deadline)
    return served(daemon, Row("nbdcopy -> raw file", seconds, None, None,
                              "libnbd, 4 connections", cpu=cpu), before)


def median(rows: list[Row]) -> Row:
    """The row with the median wall time."""
    return sorted(rows, key=lambda r: r.seconds)[len(rows) // 2]


def print_table(rows: list[Row], size: int, against_nbdcopy: bool = True) -> None:
    nbdcopy_s = rows[0].seconds if against_nbdcopy else float("nan")
    head = (f"{'':36} {'read':>9} {'wall s':>7} {'MB/s vol':>9} {'x nbdcopy':>9} "
            f"{'inner s':>8} {'MB/s inner':>10} {'cpu':>5} {'srv cpu':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        rate = size / r.seconds / 1e6
        inner = f"{r.inner:8.2f} {size / r.inner / 1e6:10.0f}" if r.inner else f"{'-':>8} {'-':>10}"
        read = format_size(r.bytes_read) if r.bytes_read is not None else "-"
        srv = f"{r.server_cpu:7.2f}" if r.server_cpu is not None else f"{'-':>7}"
        cpu = f"{r.cpu:5.2f}" if r.cpu is not None else f"{'-':>5}"
        print(f"{r.what:36} {read:>9} {r.seconds:7.2f} {rate:9.0f} {nbdcopy_s / r.seconds:9.2f} "
              f"{inner} {cpu} {srv}  {r.note}")


class Restic:
    """Debian's restic with a repository beside owm's (same tmpfs), reading raw image files."""

    def __init__(self, work: Path, deadline: Deadline) -> None:
        self.work = work
        self.deadline = deadline
        self.env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(work / "restic-repo"),
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self.raw = work / "restic-src" / "image.raw"
        self.raw.parent.mkdir()
        timed(["restic", "init"], deadline, self.env)

    def backup(self, daemon: Daemon, image: str, what: str, size: int) -> Row:
        """Copy ``image`` to the raw file (nbdcopy, not timed), then time ``restic backup``."""
        self.raw.unlink(missing_ok=True)
        nbdcopy(daemon, image, self.raw, self.deadline)
        seconds, out, cpu = timed(["restic", "backup", "--json", str(self.raw)],
                                  self.deadline, self.env)
        summary = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        done = next((d for d in summary if d.get("message_type") == "summary"), {})
        added = int(done.get("data_added", 0))
        return Row(what, seconds, float(done.get("total_duration", 0)) or None, size,
                   f"reads the raw file; {format_size(added)} added, encrypted, content-defined "
                   "chunks", cpu=cpu)

    def restore(self, what: str) -> Row:
        target = self.work / "restic-restored"
        seconds, _, cpu = timed(["restic", "restore", "latest", "--target", str(target)],
                                self.deadline, self.env)
        restored = target / self.raw.relative_to("/")
        same = restored.stat().st_size == self.raw.stat().st_size
        row = Row(what, seconds, None, restored.stat().st_size,
                  "-> raw file" + ("" if same else " (SIZE DIFFERS)"), cpu=cpu)
        shutil.rmtree(target, ignore_errors=True)
        return row


def _after_crash(args: argparse.Namespace, daemon: Daemon, work: Path, previous: str,
                 repo: Path, rows: list[Row], size: int, deadline: Deadline) -> str:
    """1% changed, the daemon killed with SIGKILL and restarted, then an incremental backup."""
    chunks = size // CHUNK
    changed = sorted(random.Random(9).sample(range(chunks), max(1, int(chunks * args.changed))))
    print(f"incremental after a crash: changing {len(changed)} chunks, then kill -9 ...",
          file=sys.stderr)
    owm(daemon.pool, "release", previous, deadline=deadline)
    asyncio.run(asyncio.wait_for(
        write_pieces(daemon.pool / "nbd.sock", "vol", [(c * CHUNK, CHUNK) for c in changed], 99,
                     args.data), deadline.left()))
    daemon.kill()
    daemon.start(work / "daemon-2.log", deadline)
    image = owm(daemon.pool, "preserve", "vol", deadline=deadline).strip()
    row, summary = backup(daemon, image, repo, "owm", "owm backup (incr. after kill -9)",
                          deadline)
    row.note = (f"{summary['changed_chunks']} changed chunks read" if summary.get(
        "incremental") else "NOT incremental: the crash cost the changed-chunk map")
    rows.append(row)
    return image


def verify_rows(daemon: Daemon | None, repo: Path, backup_id: str, rounds: int,
                deadline: Deadline) -> list[Row]:
    """``owm backup verify REPO ID``, ``rounds`` times (median): each row says the compression
    ratio of what was checked beside its rates of stored data (bytes read from the
    repository) and of image data (what they decode to), by wall time and by the command's own
    seconds, from what verify itself reports it checked."""
    rows = []
    for _ in range(rounds):
        before = daemon.cpu() if daemon is not None else 0.0
        seconds, text, cpu = timed([*OWM, "backup", "verify", str(repo), backup_id, "--json"],
                                   deadline)
        checked = json.loads(text)["checked"]
        stored, image = int(checked["stored_bytes"]), int(checked["image_bytes"])
        inner = float(checked["seconds"])
        row = Row("owm backup verify (one backup)", seconds, inner, stored,
                  f"{checked['ratio']:.2f}:1; wall: {stored / seconds / 1e6:.0f} MB/s stored, "
                  f"{image / seconds / 1e6:.0f} MB/s image; own: "
                  f"{stored / inner / 1e6:.0f} MB/s stored, {image / inner / 1e6:.0f} MB/s "
                  f"image; per CPU-second (start-up included): {stored / cpu / 1e6:.0f} MB/s "
                  f"stored, {image / cpu / 1e6:.0f} MB/s image", cpu=cpu)
        rows.append(served(daemon, row, before) if daemon is not None else row)
    return [median(rows)]


def decode_limits(repo: Path, backup_id: str, sample: int = 2048) -> str:
    """What zstd and BLAKE3 alone do on up to ``sample`` of the backup's chunks, in this
    process on one thread (CPU seconds of this thread, so the figures mean per core, whatever
    else runs), and what that makes the most that verify can do on every core of the machine:
    the limit its figures are to be read against."""
    import blake3
    import zstandard

    from owm.backup.repo import Repository

    r = Repository.open(repo)
    m = r.load(backup_id)
    seen: dict[bytes, int] = {}
    entries = list(m.chunk_map.entries())
    for index, digest in entries[:: max(1, len(entries) // sample)]:  # spread over the image
        seen.setdefault(digest, m.chunk_length(index))
    packed = [(r.read_stored(d), n) for d, n in seen.items()]
    dec = zstandard.ZstdDecompressor()
    plain = [dec.decompress(p, max_output_size=n) for p, n in packed]
    # Timed apart, each output dropped at once as verify does: memory that is reused, not
    # fresh pages to fault in (which would be charged to zstd).
    started = time.thread_time()
    for p, n in packed:
        dec.decompress(p, max_output_size=n)
    unpack = time.thread_time() - started
    started = time.thread_time()
    for data in plain:
        blake3.blake3(data).digest()
    hashing = time.thread_time() - started
    image = sum(len(p) for p in plain)
    stored = sum(len(p) for p, _ in packed)
    ratio = image / stored
    per_core = image / (unpack + hashing)
    cores = os.cpu_count() or 1
    return (f"limit (zstd and BLAKE3 alone, {len(plain)} of its chunks, {ratio:.2f}:1, per core): "
            f"zstd {image / unpack / 1e9:.2f} GB/s of image data, BLAKE3 "
            f"{image / hashing / 1e9:.2f} GB/s, both {per_core / 1e9:.2f} GB/s; on {cores} "
            f"cores at most {cores * per_core / 1e9:.2f} GB/s of image data = "
            f"{cores * per_core / ratio / 1e9:.2f} GB/s of stored data")


def _repository_rows(daemon: Daemon, repo: Path, work: Path, image: str, rounds: int,
                     deadline: Deadline) -> list[Row]:
    """Restore (beside nbdcopy of the image it was backed up from, in interleaved pairs, so
    that both meet the same load), verify and prune+GC of the repository.  The daemon takes
    no part in restore and verify; its CPU is shown all the same, as what else ran."""
    out: list[Row] = []
    listed = json.loads(timed([*OWM, "backup", "list", str(repo), "--json"], deadline)[1])
    newest = max(listed, key=lambda b: b["time"])["id"]
    print("restore beside nbdcopy, verify, prune ...", file=sys.stderr)
    target = work / "restored.raw"
    restores, copies = [], []
    for _ in range(rounds):
        copies.append(nbdcopy(daemon, image, target, deadline))
        target.unlink()
        before = daemon.cpu()
        seconds, text, cpu = timed([*OWM, "restore", str(repo), newest, "--to", str(target),
                                    "--json"], deadline)
        done = json.loads(text)
        restores.append(served(daemon, Row("owm restore -> raw file", seconds,
                                           float(done["seconds"]), int(done["bytes_written"]),
                                           cpu=cpu), before))
        target.unlink()
    beside, restored = median(copies), median(restores)
    beside.what = "nbdcopy -> raw file (beside restore)"
    beside.note = f"the image the restored backup was taken from; median of {rounds}"
    restored.note = (f"{beside.seconds / restored.seconds:.2f}x the nbdcopy beside it (wall); "
                     "two threads per core, every chunk hashed")
    out += [beside, restored]
    out += verify_rows(daemon, repo, newest, 1, deadline)
    seconds, text, cpu = timed([*OWM, "backup", "prune", str(repo), "--keep-last", "1",
                                "--json"], deadline)
    pruned = json.loads(text)
    out.append(Row("owm backup prune --keep-last 1", seconds, float(pruned["seconds"]), None,
                   f"{len(pruned['removed'])} backups, {pruned['chunks_removed']} chunks "
                   "removed", cpu=cpu))
    return out


def _verify_only(args: argparse.Namespace, daemon: Daemon, image: str, repo: Path, size: int,
                 deadline: Deadline) -> None:
    """``--only verify``: one full backup of the image, then verify ``--rounds`` times, its
    figures beside the limit zstd and BLAKE3 alone set on this machine."""
    print("one full backup, then verify ...", file=sys.stderr)
    row, summary = backup(daemon, image, repo, "owm", "owm backup --format owm (full)",
                          deadline)
    row.note = (f"{summary['chunks_new']} chunks stored, "
                f"{format_size(int(str(summary['bytes_written'])))} written")
    rows = [row, *verify_rows(daemon, repo, str(summary["id"]), args.rounds, deadline)]
    print(f"\nowm backup verify: {format_size(size)} volume, half written with {args.data} "
          f"data, 64K chunks, tmpfs, {os.cpu_count()} CPUs, median of {args.rounds} verify "
          "runs\n")
    print_table(rows, size, against_nbdcopy=False)
    print(f"\nverify >= 1 GB/s of stored data: {rows[-1].note}")
    print(decode_limits(repo, str(summary["id"])))
    print("wall = the command as a user runs it, process start included; own = the seconds "
          "verify reports (locking the repository, reading its manifest, checking);\nread = "
          "bytes of chunk files read; cpu = CPU seconds (user + system) of the command, which "
          "on a loaded machine are the steadier figure.")


def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.time_limit)
    size = parse_size(args.size)
    for tool in ("nbdcopy",):
        if shutil.which(tool) is None:
            raise SystemExit(f"backup_bench needs {tool} (Debian package libnbd-bin)")
    with_restic = shutil.which("restic") is not None
    if not with_restic:
        print("restic is not installed (scripts/setup installs it): no restic rows",
              file=sys.stderr)
    free = shutil.disk_usage(args.tmpfs).free
    # pool (half) + repositories (half, twice) + one output; restic: a raw copy and a repository;
    # usrlib: its tar (half)
    need = int(size * (1.7 + (1.5 if with_restic else 0) + (0.5 if args.data == "usrlib" else 0))
               ) + (256 << 20)
    if free < need:
        raise SystemExit(f"backup_bench needs {format_size(need)} free in {args.tmpfs}; "
                         f"it has {format_size(free)}")
    compile_owm()
    work = Path(tempfile.mkdtemp(prefix="owm-bb-", dir=args.tmpfs))
    daemon = Daemon(work / "pool")
    global _TREE
    try:
        if args.data == "usrlib":
            print("taking the first half of the volume's size of a tar of /usr/lib ...",
                  file=sys.stderr)
            _TREE = FileTree(work / "usrlib.tar", size // 2, deadline)
        daemon.start(work / "daemon.log", deadline)
        pool = daemon.pool
        sock = pool / "nbd.sock"
        owm(pool, "volume", "create", "vol", "--size", str(size), "--chunk-size", "64K",
            deadline=deadline)
        pieces = [(o, PIECE) for o in range(0, size, 2 * PIECE)]
        print(f"filling {format_size(size)} volume: {len(pieces)} x 1M of {args.data} data, a "
              "1M hole after each ...", file=sys.stderr)
        asyncio.run(asyncio.wait_for(write_pieces(sock, "vol", pieces, 1, args.data),
                                     deadline.left()))
        image = owm(pool, "preserve", "vol", deadline=deadline).strip()
        repo = work / "repo"
        if args.only == "verify":
            _verify_only(args, daemon, image, repo, size, deadline)
            return
        samples: dict[str, list[Row]] = {}
        key = work / "bench.key"
        for n in range(args.rounds):
            print(f"round {n + 1} of {args.rounds}: nbdcopy, raw, owm ...", file=sys.stderr)
            target = work / "nbdcopy.raw"
            samples.setdefault("nbdcopy", []).append(nbdcopy(daemon, image, target, deadline))
            target.unlink()

            row, _ = backup(daemon, image, work / "b.raw", "raw", "owm backup --format raw",
                            deadline)
            row.note = "sparse file, synced"
            samples.setdefault("raw", []).append(row)
            (work / "b.raw").unlink()

            shutil.rmtree(repo, ignore_errors=True)
            row, summary = backup(daemon, image, repo, "owm", "owm backup --format owm (full)",
                                  deadline)
            row.note = (f"{summary['chunks_new']} chunks stored, "
                        f"{format_size(int(str(summary['bytes_written'])))} written")
            samples.setdefault("full", []).append(row)

            shutil.rmtree(work / "repo-enc", ignore_errors=True)
            row, summary = backup(daemon, image, work / "repo-enc", "owm",
                                  "owm backup (full, encrypted)", deadline, "--encrypt",
                                  "--key-file", key)
            row.note = (f"ChaCha20-Poly1305, keyed names; "
                        f"{format_size(int(str(summary['bytes_written'])))} written")
            samples.setdefault("full-enc", []).append(row)
        shutil.rmtree(work / "repo-enc", ignore_errors=True)

        restic_rows: list[Row] = []
        restic = Restic(work, deadline) if with_restic else None
        if restic is not None:
            print("restic backup (full) ...", file=sys.stderr)
            restic_rows.append(restic.backup(daemon, image, "restic backup (full)", size))

        chunks = size // CHUNK
        rng = random.Random(2)
        previous = image
        for n in range(args.rounds):
            changed = sorted(rng.sample(range(chunks), max(1, int(chunks * args.changed))))
            print(f"incremental {n + 1} of {args.rounds}: changing {len(changed)} of {chunks} "
                  f"chunks ({args.changed:.0%}) ...", file=sys.stderr)
            asyncio.run(asyncio.wait_for(
                write_pieces(sock, "vol", [(c * CHUNK, CHUNK) for c in changed], 3 + n,
                             args.data), deadline.left()))
            owm(pool, "release", previous, deadline=deadline)
            previous = owm(pool, "preserve", "vol", deadline=deadline).strip()
            row, summary = backup(daemon, previous, repo, "owm", "owm backup --format owm (incr.)",
                                  deadline)
            row.note = (f"{summary['changed_chunks']} changed chunks read" if summary.get(
                "incremental") else "NOT incremental (the daemon gave no changed-chunk map)")
            samples.setdefault("incr", []).append(row)
            if restic is not None and n == 0:
                print("restic backup (after the same changes) ...", file=sys.stderr)
                restic_rows.append(restic.backup(daemon, previous,
                                                 "restic backup (incr., same changes)", size))
                restic_rows.append(restic.restore("restic restore (that snapshot)"))

        rows = [median(samples[k]) for k in ("nbdcopy", "raw", "full", "full-enc", "incr")]
        crashed = _after_crash(args, daemon, work, previous, repo, rows, size, deadline)
        rows += _repository_rows(daemon, repo, work, crashed, args.rounds, deadline)
        rows += restic_rows
        full, incr = rows[2], rows[4]
        incr.note += (f"; {full.seconds / incr.seconds:.0f}x faster than full (wall), "
                      f"{(full.inner or 0) / (incr.inner or 1):.0f}x (inner)")
        print(f"\nowm backup speed: {format_size(size)} volume, half written with {args.data} "
              f"data, 64K chunks, tmpfs, {os.cpu_count()} CPUs, median of {args.rounds} "
              "rounds\n")
        print_table(rows, size)
        raw_wall = rows[0].seconds / rows[1].seconds
        raw_inner = rows[0].seconds / (rows[1].inner or rows[1].seconds)
        speed_wall = full.seconds / incr.seconds
        speed_inner = (full.inner or 0) / (incr.inner or 1)
        restore = next(r for r in rows if r.what.startswith("owm restore"))
        beside = next(r for r in rows if r.what.startswith("nbdcopy -> raw file (beside"))
        print(f"\naims: raw >= nbdcopy: {raw_wall:.2f}x (wall), {raw_inner:.2f}x (inner); "
              f"incremental >= 20x faster than full: {speed_wall:.0f}x (wall), "
              f"{speed_inner:.0f}x (inner); restore >= nbdcopy: "
              f"{beside.seconds / restore.seconds:.2f}x (wall, against the nbdcopy beside it)")
        verified = next(r for r in rows if r.what.startswith("owm backup verify"))
        print(f"verify >= 1 GB/s of stored data: {verified.note}")
        print(decode_limits(repo, json.loads(timed([*OWM, "backup", "list", str(repo),
                                                      "--json"], deadline)[1])[-1]["id"]))
        print("wall = the command as a user runs it, process start included;\ninner = the time "
              "the command reports (owm: from connecting to the image until the backup is "
              "synced; restic: its total_duration);\ncpu = CPU seconds (user + system) of the "
              "command; srv cpu = of the owm daemon during the row (nbdcopy's and owm's reads "
              "are served by it): on a loaded machine the CPU figures are the steadier ones.")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4G", help="volume size (half of it is written)")
    parser.add_argument("--changed", type=float, default=0.01,
                        help="fraction of chunks changed before the incremental backup")
    parser.add_argument("--data", choices=DATA_KINDS, default="random",
                        help="what is written: incompressible random data; 4K blocks of half "
                             "text, half zeroes (about 9:1 under zstd); mixed, those and random "
                             "4K blocks (about 2:1); usrlib, a tar of /usr/lib (about 2:1)")
    parser.add_argument("--tmpfs", default="/dev/shm", help="where pool and backups live")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each (interleaved); the table shows the median")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the run")
    parser.add_argument("--only", choices=("verify",),
                        help="verify: only a full backup and then verify (--rounds runs), "
                             "beside the limit zstd and BLAKE3 alone set")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
