"""``owm backup copy SRC DST [ID...]``: copy backups between repositories, moving only the
chunks the destination lacks.

Each chunk that moves is read from the source and checked against its hash (a damaged one
stops the copy of that backup, naming its offset), stored in the destination, then read back
from there and checked again before the manifest that names it is written ("verified on
arrival").  Chunks the destination already holds are touched, not moved (which also keeps a
prune running in the destination from collecting them meanwhile).  A backup is copied with its
whole chain of parents that the source holds, so incremental backups keep their parent in the
destination too; a backup the destination already has is skipped.  The destination's manifest
is written last, after a sync, as a backup writes its own: a copy killed half-way leaves only
unreferenced chunks (a later prune removes them), never a manifest naming a missing chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.backup.manifest import DamagedManifest, Manifest
from owm.backup.repo import ChunkDamaged, Repository
from owm.common.errors import InvalidRequest, NotFound

JSON = dict[str, Any]
Progress = Callable[[int, int], None]
WORKERS = 4


@dataclass
class CopyResult:
    source: str
    destination: str
    copied: list[str] = field(default_factory=list)
    skipped: list[JSON] = field(default_factory=list)
    chunks_copied: int = 0
    chunks_present: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def to_json(self) -> JSON:
        return {"source": self.source, "destination": self.destination, "copied": self.copied,
                "skipped": self.skipped, "chunks_copied": self.chunks_copied,
                "chunks_present": self.chunks_present, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3)}


def _chain(src: Repository, first: Manifest) -> list[Manifest]:
    """``first`` and every parent of it the source holds intact, oldest first."""
    chain = [first]
    seen = {first.id}
    while chain[-1].parent is not None and chain[-1].parent not in seen:
        try:
            parent = src.load(chain[-1].parent)
        except (NotFound, DamagedManifest):
            break  # pruned or damaged: the child is complete in itself all the same
        if not parent.complete or not parent.verified:
            break
        seen.add(parent.id)
        chain.append(parent)
    return chain[::-1]


def _selected(src: Repository, refs: list[str], result: CopyResult) -> list[Manifest]:
    if refs:
        picked = []
        for ref in refs:
            m = src.resolve(ref)
            if not m.complete:
                raise InvalidRequest(f"backup {m.id} is incomplete and cannot be copied")
            if not m.verified:
                raise InvalidRequest(f"backup {m.id} has no manifest checksum (an older owm wrote "
                                     "it), so its copy could not be trusted; it was not copied")
            picked.append(m)
    else:
        good, bad = src.manifests()
        picked = [m for m in good if m.complete and m.verified]
        result.skipped += [{"id": m.id, "why": "incomplete"} for m in good if not m.complete]
        result.skipped += [{"id": m.id, "why": "no manifest checksum"} for m in good
                           if m.complete and not m.verified]
        result.skipped += [{"id": i, "why": f"damaged: {why}"} for i, why in bad]
    order: list[Manifest] = []
    ids: set[str] = set()
    for m in sorted(picked, key=lambda m: (m.started_at, m.id)):
        for link in _chain(src, m):
            if link.id not in ids:
                ids.add(link.id)
                order.append(link)
    return order


def _move(src: Repository, dst: Repository, digest: bytes, length: int) -> tuple[int, int]:
    """Copy one chunk the destination lacks; returns (bytes read, bytes written)."""
    data = src.get_chunk(digest, length)
    written = dst.put_chunk(digest, data)
    try:
        dst.get_chunk(digest, length)  # verified on arrival
    except ChunkDamaged as exc:
        raise ChunkDamaged(f"it arrived damaged in the destination ({exc})") from None
    return len(data), written


def _copy_one(src: Repository, dst: Repository, m: Manifest, result: CopyResult,
              progress: Progress | None) -> None:
    lengths: dict[bytes, int] = {}
    first_use: dict[bytes, int] = {}
    for index, digest in m.chunk_map.entries():
        if digest not in lengths:
            lengths[digest] = m.chunk_length(index)
            first_use[digest] = index
    missing = [d for d in lengths if not dst.chunk_present(d, lengths[d])]
    result.chunks_present += len(lengths) - len(missing)
    total = sum(lengths[d] for d in missing)
    done = 0
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="owm-copy") as pool:
        futures = [(d, pool.submit(_move, src, dst, d, lengths[d])) for d in missing]
        try:
            for digest, future in futures:
                try:
                    read, written = future.result()
                except ChunkDamaged as exc:
                    index = first_use[digest]
                    raise InvalidRequest(
                        f"backup {m.id} was not copied: the chunk at offset "
                        f"{index * m.chunk_size} (chunk {index}) {exc}") from None
                result.chunks_copied += 1
                result.bytes_read += read
                result.bytes_written += written
                done += lengths[digest]
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for _, future in futures:
                future.cancel()
            raise
    dst.sync()
    dst.save(m)  # a fresh checksum over the same fields; the map is rewritten beside it
    result.bytes_written += dst.manifest_bytes(m)
    result.copied.append(m.id)


def copy_backups(source: Path | str, destination: Path | str, refs: list[str], *,
                 progress: Progress | None = None) -> CopyResult:
    """Copy backups ``refs`` (ids, prefixes or NAME@N; none: every complete backup) and their
    parents from the repository ``source`` into ``destination`` (created when missing)."""
    started = time.monotonic()
    src = Repository.open(source)
    if Path(destination).absolute() == Path(source).absolute():
        raise InvalidRequest("the source and the destination are the same repository")
    dst = Repository.open(destination, create=True)
    result = CopyResult(str(src.root), str(dst.root))
    with src.locked(exclusive=False), dst.locked(exclusive=False):
        for m in _selected(src, refs, result):
            if m.id in dst.manifest_ids():
                result.skipped.append({"id": m.id, "why": "already in the destination"})
                continue
            fd = dst.claim(m.id)  # a running-lock: a prune there spares what it touches
            if fd is None:
                raise InvalidRequest(f"backup {m.id} is being copied into {dst.root} already")
            try:
                _copy_one(src, dst, m, result, progress)
            finally:
                dst.finish(m.id, fd)
    result.seconds = time.monotonic() - started
    return result
