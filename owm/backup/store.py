"""Backup into an owm repository: deduplicated chunks, incremental from the newest older backup.

The writer hashes every chunk read (BLAKE3), records the digest in the chunk map and stores the
chunk only when the repository does not hold it yet.  A chunk is taken as already stored when
this backup wrote it, when the parent backup names it (complete backups only name synced
chunks), or when its file is there and checks out (a leftover of a killed backup, or a chunk
another volume shares).

Incremental: when the repository holds a complete backup of an older image of the same volume,
the daemon is asked which chunks changed since that image; only those are read, and the map
starts as a copy of the parent's.  When the daemon cannot tell (None), everything is read and
deduplication still keeps the repository from growing by unchanged data.  "The same volume" is
the same incarnation: the volume's uid (a random id given when it was created) must match, so
a volume deleted and created again under the same name is never taken for the old one; a
parent must also have a checksummed manifest.

A damaged chain is re-read, never inherited: before a backup keeps a chunk of its parent's map
without reading it, the chunk file is read and checked against its hash; every chunk that is
missing or wrong is read again from the image (which also repairs the chunk file for the parent,
since chunks are named by their content).

Resumable: the manifest is saved as "incomplete" at the start and, every few seconds, after a
sync, with the chunk number below which everything is stored.  Running the same backup again
continues from there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from owm.backup.image import ImageFacts
from owm.backup.manifest import COMPLETE, INCOMPLETE, ChunkMap, Manifest, chunk_count
from owm.backup.pipeline import Fetch, Pipeline, Progress, Stats
from owm.backup.repo import Repository, utc_now
from owm.backup.source import Batch, ImageSource
from owm.nbd.client import NbdClient

log = logging.getLogger("owm.backup")

ChangedSince = Callable[[int], Awaitable["list[int] | None"]]


def checkpoint_interval() -> float:
    """Seconds between resume points ($OWM_BACKUP_CHECKPOINT_SECONDS, default 5)."""
    try:
        return max(0.0, float(os.environ.get("OWM_BACKUP_CHECKPOINT_SECONDS", "5")))
    except ValueError:
        return 5.0


class RepoWriter:
    """The pipeline's writer for a repository (see the module docstring)."""

    def __init__(self, repo: Repository, chunk_map: ChunkMap, chunk_size: int, stats: Stats,
                 trusted: set[bytes]) -> None:
        self.repo = repo
        self.map = chunk_map
        self.chunk_size = chunk_size
        self.stats = stats
        self.known = trusted
        self.zero = bytes(chunk_size)

    def zeroes(self, batch: Batch) -> None:
        for index in range(batch.first, batch.first + batch.count):
            self.map.put(index, None)
        self.stats.add(zero=batch.count)

    def write(self, batch: Batch) -> None:
        data, base = batch.data, batch.base
        assert data is not None
        view = memoryview(data)
        cs = self.chunk_size
        new = reused = zero = written = 0
        for k in range(batch.count):
            index = batch.first + k
            start = base + k * cs
            n = min(cs, batch.length - k * cs)
            if data.startswith(self.zero if n == cs else bytes(n), start):
                self.map.put(index, None)
                zero += 1
                continue
            piece = view[start:start + n]
            digest = self.repo.chunk_id(piece)  # keyed in an encrypted repository
            self.map.put(index, digest)
            if digest in self.known or (self.repo.has_chunk(digest)
                                        and self.repo.chunk_ok(digest, n)):
                reused += 1
            else:
                written += self.repo.put_chunk(digest, piece)
                new += 1
            self.known.add(digest)
        self.stats.add(read=batch.length, written=written, new=new, reused=reused, zero=zero)


@dataclass
class RepoBackup:
    """The outcome of a backup into a repository."""

    manifest: Manifest
    stats: Stats
    resumed: bool
    changed_chunks: int | None  # chunks read because they changed (incremental), else None


def _same_volume(m: Manifest, facts: ImageFacts) -> bool:
    """Whether ``m`` is a backup of this very volume incarnation (uids, not creation times)."""
    if m.volume != facts.volume or m.size != facts.size or m.chunk_size != facts.chunk_size:
        return False
    return m.verified and m.volume_uid is not None and m.volume_uid == facts.volume_uid


def _check_kept(repo: Repository, manifest: Manifest,
                reread: Callable[[int], bool]) -> tuple[set[bytes], list[int]]:
    """Check every stored chunk the map keeps (present, and a zstd frame of the right size)
    without reading it again from the image; damage inside a chunk is verify's to find.

    Returns the digests found intact and the chunk numbers whose chunk is missing or wrong.
    """
    where: dict[bytes, list[int]] = {}
    for index, digest in manifest.chunk_map.entries():
        if not reread(index):
            where.setdefault(digest, []).append(index)

    def intact(digests: list[bytes]) -> list[bool]:
        out = []
        for digest in digests:
            try:
                out.append(repo.chunk_present(digest, manifest.chunk_length(where[digest][0])))
            except OSError:
                out.append(False)
        return out

    # Two halves on two threads: a future per chunk would cost more than the check itself.
    digests = list(where)
    half = (len(digests) + 1) // 2
    with ThreadPoolExecutor(2, thread_name_prefix="owm-parent-check") as pool:
        verdicts = [v for part in pool.map(intact, [digests[:half], digests[half:]])
                    for v in part]
    good = {d for d, ok in zip(where, verdicts, strict=True) if ok}
    bad = sorted(i for d, ok in zip(where, verdicts, strict=True) if not ok for i in where[d])
    return good, bad


def _find_resumable(repo: Repository, facts: ImageFacts) -> tuple[Manifest, int] | None:
    manifests, _ = repo.manifests()
    for m in sorted(manifests, key=lambda m: m.started_at, reverse=True):
        if (m.state == INCOMPLETE and m.image == facts.image and _same_volume(m, facts)
                and m.preserved_at == facts.preserved_at):
            fd = repo.claim(m.id)
            if fd is not None:
                return m, fd
    return None


def _find_parent(repo: Repository, facts: ImageFacts) -> Manifest | None:
    manifests, _ = repo.manifests()
    older = [m for m in manifests if m.state == COMPLETE and _same_volume(m, facts)
             and (m.generation < facts.generation
                  or (m.generation == facts.generation and m.preserved_at == facts.preserved_at))
             and (m.preserved_at or "") <= (facts.preserved_at or "~")]
    if not older:
        return None
    return max(older, key=lambda m: (m.generation, m.completed_at or ""))


async def backup_to_repo(
    client: NbdClient,
    facts: ImageFacts,
    path: Path,
    *,
    fetch: Fetch,
    changed_since: ChangedSince,
    progress: Progress | None = None,
    checkpoint_every: float | None = None,
) -> RepoBackup:
    """Back the image behind ``client`` up into the repository at ``path`` (created if new).

    ``client`` answers block status; ``fetch`` reads a batch (on a worker thread).
    """
    loop = asyncio.get_running_loop()
    repo = await loop.run_in_executor(None, lambda: Repository.open(path, create=True))
    with repo.locked(exclusive=False):
        resumable = await loop.run_in_executor(None, _find_resumable, repo, facts)
        parent = None
        work: list[int] | None = None
        if resumable is not None:
            manifest, lock_fd = resumable
            resumed = True
            if manifest.parent is not None:
                try:
                    parent = await loop.run_in_executor(None, repo.load, manifest.parent)
                except Exception:
                    parent = None
            if manifest.work == "changed" and parent is not None:
                work = await changed_since(parent.generation)
            if work is None and manifest.work == "changed":
                manifest.work, manifest.next_chunk = "all", 0
            log.info("resuming backup %s from chunk %d", manifest.id, manifest.next_chunk)
        else:
            resumed = False
            parent = await loop.run_in_executor(None, _find_parent, repo, facts)
            if parent is not None:
                if parent.generation == facts.generation:
                    work = []  # the very same image again: nothing can have changed
                else:
                    work = await changed_since(parent.generation)
            backup_id, lock_fd = repo.new_id(facts.image)
            chunk_map = (parent.chunk_map.copy() if parent is not None and work is not None
                         else ChunkMap(chunk_count(facts.size, facts.chunk_size)))
            manifest = Manifest(
                id=backup_id, volume=facts.volume, image=facts.image,
                generation=facts.generation, size=facts.size, chunk_size=facts.chunk_size,
                state=INCOMPLETE, consistency=facts.consistency, started_at=utc_now(),
                map_data=chunk_map, image_state=facts.state, forced=facts.forced,
                preserved_at=facts.preserved_at, drained_at=facts.drained_at,
                parent=parent.id if parent is not None else None,
                incremental=work is not None, volume_created=facts.volume_created,
                volume_uid=facts.volume_uid, work="changed" if work is not None else "all",
            )
        try:
            start = manifest.next_chunk
            wanted = set(work) if work is not None else None

            def reread(index: int) -> bool:
                return index >= start and (wanted is None or index in wanted)

            trusted, damaged = await loop.run_in_executor(None, _check_kept, repo, manifest,
                                                          reread)
            if damaged:
                log.warning("backup %s: %d chunks its map would keep are missing or damaged in "
                            "the repository; reading them again", manifest.id, len(damaged))
                start = manifest.next_chunk = min(start, damaged[0])
                if work is not None:
                    work = sorted(set(work) | set(damaged))
            await loop.run_in_executor(None, repo.save, manifest)
            stats = Stats()
            writer = RepoWriter(repo, manifest.chunk_map, facts.chunk_size, stats, trusted)
            source = ImageSource(client, facts.chunk_size)
            if work is None:
                total = max(0, facts.size - start * facts.chunk_size)
            else:
                total = sum(min(facts.chunk_size, facts.size - c * facts.chunk_size)
                            for c in work if c >= start)
            started = time.monotonic()

            def checkpoint(mark: int) -> None:
                repo.sync()
                manifest.next_chunk = mark
                manifest.stats = {**stats.to_json(), "seconds": time.monotonic() - started}
                repo.save(manifest)

            every = checkpoint_interval() if checkpoint_every is None else checkpoint_every
            pipeline = Pipeline(writer, fetch, total=total, progress=progress,
                                checkpoint=checkpoint, checkpoint_every=every)
            await pipeline.run(source.plan(work, start))
            await loop.run_in_executor(None, repo.sync)
            manifest.state = COMPLETE
            manifest.completed_at = utc_now()
            manifest.next_chunk = 0
            manifest.stats = {**stats.to_json(), "seconds": round(time.monotonic() - started, 3),
                              "resumed": resumed, "reread_damaged": len(damaged),
                              "changed_chunks": len(work) if work is not None else None}
            await loop.run_in_executor(None, repo.save, manifest)
            stats.add(written=repo.manifest_bytes(manifest))
        finally:
            repo.finish(manifest.id, lock_fd)
    log.info("backup %s of %s complete: %d new chunks, %d reused", manifest.id, facts.image,
             stats.chunks_new, stats.chunks_reused)
    return RepoBackup(manifest, stats, resumed, len(work) if work is not None else None)
