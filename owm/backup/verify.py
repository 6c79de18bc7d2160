"""``owm backup verify``: read every chunk a backup names and check it against its hash.

Each distinct chunk is read, decompressed and hashed once however many backups share it, on one
thread per core (zstd and BLAKE3 both release the GIL), in batches of about 2 MiB with a bounded
number of batches in flight, so memory stays a few MiB per thread whatever the repository's
size (``bounded_map``, which restore uses too); a failure is then reported for every backup
and every offset that uses the chunk, so the message names the offset in the image, not a file
name.  Incomplete backups are listed but not verified (they are not backups yet); damaged
manifests (unreadable, failing their checksum, or naming a map that fails its own) are failures
that name the backup.  A manifest written before checksums is verified as far as it can be and
said to be unverified.

Threads alone do not use two cores: the per-chunk Python work between zstd and BLAKE3 (open,
read, close, the checks) holds the GIL often enough that they serialise.  So a large verify
run from a process's main thread forks one worker process per core instead
(``_forked_checks``), each checking an interleaved shard of the distinct chunks and sending its
verdicts back over a pipe batch by batch; the parent keeps the repository's shared lock, turns
the verdicts into reports and moves damaged chunks aside exactly as the threaded path does.  A
worker that dies, fails, or stops short of its shard fails the whole verify with one sentence
(``VerifyAborted``): no chunk is ever counted good that a worker did not report checked.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import selectors
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from owm.backup.manifest import DamagedManifest, Manifest
from owm.backup.repo import ChunkDamaged, Repository
from owm.common.errors import OwmError

JSON = dict[str, Any]
Progress = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")
BATCH_BYTES = 2 << 20  # chunks checked per task: one future per chunk would cost more than some
# Below this many image bytes, forking workers costs more than the threads lose to the GIL.
FORK_MIN_BYTES = 32 << 20
_FRAME = struct.Struct(">I")
Key = tuple[bytes, int]  # a distinct chunk: its digest and its length in the image
Verdict = tuple[str | None, int]  # why it fails (None: it is good), the bytes of its file read


class VerifyAborted(OwmError):
    """A worker process of verify died or failed before reporting every chunk of its shard."""


def default_workers() -> int:
    """Threads that read, decompress and hash: one per core, at least two (I/O overlaps)."""
    return max(2, min(8, os.cpu_count() or 2))


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                name: str = "owm-worker") -> Iterator[tuple[T, R]]:
    """``fn`` over ``items`` on ``workers`` threads, results in order, with at most two tasks
    per thread submitted and not yet consumed (memory bounded by that, not by ``items``)."""
    window = 2 * workers
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


@dataclass
class ChunkFailure:
    chunk: int
    offset: int
    length: int
    reason: str

    def to_json(self) -> JSON:
        return {"chunk": self.chunk, "offset": self.offset, "length": self.length,
                "reason": self.reason}


@dataclass
class VerifyReport:
    """The verdict on one backup."""

    backup_id: str
    state: str  # complete | incomplete | damaged
    image: str | None = None
    chunks_checked: int = 0
    failures: list[ChunkFailure] = field(default_factory=list)
    damaged: str | None = None
    unverified: bool = False  # a version 1 manifest: no checksum to check it against

    @property
    def ok(self) -> bool:
        return self.state == "incomplete" or (self.damaged is None and not self.failures)

    def sentence(self) -> str:
        if self.damaged is not None:
            return f"backup {self.backup_id} is damaged: {self.damaged}"
        if self.state == "incomplete":
            return f"backup {self.backup_id} is incomplete and was not verified"
        if not self.failures:
            note = ("; its manifest has no checksum (written by an older owm), so only its "
                    "chunks and map could be checked" if self.unverified else "")
            return (f"backup {self.backup_id} is intact ({self.chunks_checked} chunks "
                    f"checked{note})")
        first = self.failures[0]
        more = len(self.failures) - 1
        return (f"backup {self.backup_id} is damaged: the chunk at offset {first.offset} "
                f"(chunk {first.chunk}, {first.length} bytes) fails its check: {first.reason}"
                + (f"; {more} more chunk{' fails' if more == 1 else 's fail'} too" if more else ""))

    def to_json(self) -> JSON:
        return {"id": self.backup_id, "image": self.image, "state": self.state, "ok": self.ok,
                "chunks_checked": self.chunks_checked, "damaged": self.damaged,
                "manifest": "unverified" if self.unverified else "checksummed",
                "failures": [f.to_json() for f in self.failures]}


@dataclass
class VerifyTotals:
    """What one run checked, each distinct chunk counted once: how much was read from the
    repository (``stored_bytes``, compressed and sealed as stored) and decoded from it
    (``image_bytes``), so a rate can be given of either and their ratio beside it."""

    chunks: int = 0
    image_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Image bytes per stored byte (the compression ratio of what was checked)."""
        return self.image_bytes / self.stored_bytes if self.stored_bytes else 0.0

    def to_json(self) -> JSON:
        return {"chunks": self.chunks, "image_bytes": self.image_bytes,
                "stored_bytes": self.stored_bytes, "ratio": round(self.ratio, 3),
                "seconds": round(self.seconds, 6)}


def _check(repo: Repository, digest: bytes, length: int) -> tuple[str | None, int]:
    """Why chunk ``digest`` fails (None: it decodes to ``length`` bytes named ``digest``), and
    the bytes of its file that were read."""
    try:
        packed = repo.read_stored(digest)
    except ChunkDamaged as exc:
        return str(exc), 0
    except OSError as exc:
        return f"its chunk file cannot be read ({exc.strerror})", 0
    try:
        repo.decode(digest, packed, length)
    except ChunkDamaged as exc:
        return str(exc), len(packed)
    return None, len(packed)


def _batches(keys: Iterable[Key]) -> Iterator[list[Key]]:
    """``keys`` in lists of about ``BATCH_BYTES`` of image data."""
    batch: list[Key] = []
    size = 0
    for key in keys:
        batch.append(key)
        size += key[1]
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _shard_worker(repo: Repository, shard: list[Key], fd: int) -> None:
    """In a forked worker: check ``shard`` in order, one frame of verdicts per batch, then an
    empty frame that says the shard is finished."""
    for batch in _batches(shard):
        frame = pickle.dumps([_check(repo, *key) for key in batch], pickle.HIGHEST_PROTOCOL)
        _write_all(fd, _FRAME.pack(len(frame)) + frame)
    _write_all(fd, _FRAME.pack(0))


@dataclass
class _Worker:
    pid: int
    shard: list[Key]
    buffer: bytearray = field(default_factory=bytearray)
    checked: int = 0  # chunks of the shard whose verdicts have arrived, in order
    finished: bool = False  # its closing frame arrived
    status: int | None = None  # its wait status, once reaped

    def frames(self) -> Iterator[list[Verdict]]:
        """The complete frames received so far (the closing one sets ``finished``)."""
        while len(self.buffer) >= _FRAME.size:
            (length,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + length:
                return
            body = bytes(self.buffer[_FRAME.size:_FRAME.size + length])
            del self.buffer[:_FRAME.size + length]
            if length == 0:
                self.finished = True
                return
            yield pickle.loads(body)

    def failure(self) -> str | None:
        """Why this worker's shard is not fully checked (None: it is)."""
        if self.status is not None and os.WIFSIGNALED(self.status):
            sig = os.WTERMSIG(self.status)
            how = f"was killed by signal {sig} ({signal.Signals(sig).name})"
        elif self.status is not None and os.WEXITSTATUS(self.status) != 0:
            how = f"failed (exit status {os.WEXITSTATUS(self.status)})"
        elif not self.finished or self.checked != len(self.shard):
            how = "stopped early"
        else:
            return None
        return (f"verify was aborted: its worker process {self.pid} {how} after checking "
                f"{self.checked} of its {len(self.shard)} chunks, so the backups are not known "
                "to be intact")


def _forked_checks(repo: Repository, keys: list[Key],
                   workers: int) -> Iterator[tuple[list[Key], list[Verdict]]]:
    """``(batch, verdicts)`` for every key, checked by ``workers`` forked processes, each on
    the interleaved shard ``keys[i::workers]`` (so damage clustered in one region of an image
    is spread over all of them); VerifyAborted if one of them does not check all of its
    shard.  Workers still running when this stops (an error, a consumer that gives up) are
    killed and reaped."""
    running: dict[int, _Worker] = {}  # read end of its pipe -> worker
    try:
        for i in range(min(workers, len(keys))):
            shard = keys[i::workers]
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: check, report, and leave without running any cleanup
                code = 0
                try:
                    os.close(read_fd)
                    for other in running:
                        os.close(other)
                    _shard_worker(repo, shard, write_fd)
                except BaseException:
                    code = 70
                finally:
                    os._exit(code)
            os.close(write_fd)
            running[read_fd] = _Worker(pid, shard)
        with selectors.DefaultSelector() as sel:
            for fd in running:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for sel_key, _ in sel.select():
                    fd = sel_key.fd
                    worker = running[fd]
                    data = os.read(fd, 1 << 16)
                    if not data:
                        sel.unregister(fd)
                        continue
                    worker.buffer += data
                    for verdicts in worker.frames():
                        start = worker.checked
                        batch = worker.shard[start:start + len(verdicts)]
                        if len(batch) != len(verdicts):  # more verdicts than chunks: a bug
                            raise VerifyAborted(f"verify was aborted: its worker process "
                                                f"{worker.pid} sent more verdicts than chunks")
                        worker.checked += len(verdicts)
                        yield batch, verdicts
        for worker in running.values():
            worker.status = os.waitpid(worker.pid, 0)[1]
        for worker in running.values():
            reason = worker.failure()
            if reason is not None:
                raise VerifyAborted(reason)
    finally:
        for fd, worker in running.items():
            os.close(fd)
            if worker.status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                worker.status = os.waitpid(worker.pid, 0)[1]


def _fork_allowed() -> bool:
    """Forking is only safe from the main thread of a process (the CLI's): in a daemon, other
    threads may hold locks the child would inherit held."""
    return hasattr(os, "fork") and threading.current_thread() is threading.main_thread()


def verify_backups(repo: Repository, ref: str | None = None, *, progress: Progress | None = None,
                   workers: int | None = None, processes: bool | None = None,
                   totals: VerifyTotals | None = None) -> list[VerifyReport]:
    """Verify backup ``ref`` (id, prefix or image name), or every backup of the repository;
    ``totals``, when given, is filled in with what was checked.  ``processes``: check in forked
    worker processes (True), on threads (False), or choose (None: processes when called from
    the main thread with at least ``FORK_MIN_BYTES`` to check and more than one worker)."""
    started = time.monotonic()
    totals = totals if totals is not None else VerifyTotals()
    with repo.locked(exclusive=False):
        reports: list[VerifyReport] = []
        manifests: list[Manifest] = []
        if ref is not None:
            try:
                manifests = [repo.resolve(ref)]
            except DamagedManifest as exc:
                backup_id = repo.resolve_id(ref)
                if backup_id is None:
                    raise
                reports.append(VerifyReport(backup_id, "damaged", damaged=str(exc)))
        else:
            good, bad = repo.manifests()
            manifests = good
            reports.extend(VerifyReport(i, "damaged", damaged=reason) for i, reason in bad)
        todo: dict[tuple[bytes, int], list[tuple[VerifyReport, int]]] = {}
        for m in manifests:
            report = VerifyReport(m.id, m.state, image=m.image, unverified=not m.verified)
            reports.append(report)
            if not m.complete:
                continue
            try:
                entries = list(m.chunk_map.entries())
            except DamagedManifest as exc:
                report.state, report.damaged = "damaged", str(exc)
                continue
            for index, digest in entries:
                todo.setdefault((digest, m.chunk_length(index)), []).append((report, index))
                report.chunks_checked += 1
        total = sum(length for _, length in todo)
        done = 0
        count = workers or default_workers()
        if processes is None:
            processes = count > 1 and total >= FORK_MIN_BYTES and _fork_allowed()

        def check(batch: list[Key]) -> list[Verdict]:
            return [_check(repo, *key) for key in batch]

        checked = (_forked_checks(repo, list(todo), count) if processes
                   else bounded_map(check, _batches(todo), count, "owm-verify"))
        for batch, verdicts in checked:
            for key, (reason, stored) in zip(batch, verdicts, strict=True):
                done += key[1]
                totals.chunks += 1
                totals.image_bytes += key[1]
                totals.stored_bytes += stored
                if reason is None:
                    continue
                repo.quarantine_chunk(key[0])  # the next backup that meets it stores it anew
                for report, index in todo[key]:
                    size = key[1]
                    chunk_size = next(m.chunk_size for m in manifests if m.id == report.backup_id)
                    report.failures.append(
                        ChunkFailure(index, index * chunk_size, size, reason))
            if progress is not None:
                progress(done, total)
        for report in reports:
            report.failures.sort(key=lambda f: f.chunk)
        reports.sort(key=lambda r: r.backup_id)
        totals.seconds = time.monotonic() - started
        return reports
