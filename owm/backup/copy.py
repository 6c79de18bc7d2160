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

Encrypted repositories: when both sides are plain, or both are encrypted with the same master
key (a destination this command created from an encrypted source gets the source's master
key, wrapped by the destination's own key file or passphrase), chunk files move as they are,
still sealed.  Otherwise (different keys, or plain on one side) every chunk is opened with the
source's key, named by the destination's hash (keyed BLAKE3 or plain BLAKE3), and sealed with
the destination's key; the manifest's chunk map is rewritten with the new names.  Names differ,
so whether the destination holds a chunk is only known once it is read: every chunk of the
backups copied is read, and only those missing are written.  Both keys are checked when the
repositories are opened, before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.backup.crypto import KeySource
from owm.backup.manifest import ChunkMap, DamagedManifest, Manifest
from owm.backup.repo import ChunkDamaged, Repository, is_repository
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
    recoded: bool = False  # chunks were opened and sealed again under other names

    def to_json(self) -> JSON:
        return {"source": self.source, "destination": self.destination, "copied": self.copied,
                "skipped": self.skipped, "chunks_copied": self.chunks_copied,
                "chunks_present": self.chunks_present, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "recoded": self.recoded,
                "seconds": round(self.seconds, 3)}


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
    """Copy one chunk the destination lacks, its file as it is (both repositories plain, or
    sharing one key); returns (bytes read, bytes written)."""
    stored = src.read_stored(digest)
    src.decode(digest, stored, length)  # checked before it moves
    written = dst.put_stored(digest, stored)
    try:
        dst.get_chunk(digest, length)  # verified on arrival
    except ChunkDamaged as exc:
        raise ChunkDamaged(f"it arrived damaged in the destination ({exc})") from None
    return length, written


def _recode(src: Repository, dst: Repository, digest: bytes,
            length: int) -> tuple[bytes, int, int]:
    """Copy one chunk between repositories with different keys (or one of them plain): opened
    with the source's key, named by the destination's hash, sealed with its key unless it is
    there already.  Returns (its name in the destination, bytes read, bytes written)."""
    data = src.get_chunk(digest, length)
    name = dst.chunk_id(data)
    if dst.chunk_present(name, length):
        return name, len(data), 0
    written = dst.put_chunk(name, data)
    try:
        dst.get_chunk(name, length)  # verified on arrival
    except ChunkDamaged as exc:
        raise ChunkDamaged(f"it arrived damaged in the destination ({exc})") from None
    return name, len(data), written


def _copy_one(src: Repository, dst: Repository, m: Manifest, result: CopyResult,
              progress: Progress | None, names: dict[bytes, bytes] | None) -> None:
    """Copy backup ``m``; ``names`` (None: chunk names are the same on both sides) maps the
    source's chunk names to the destination's, filled as chunks are recoded."""
    lengths: dict[bytes, int] = {}
    first_use: dict[bytes, int] = {}
    for index, digest in m.chunk_map.entries():
        if digest not in lengths:
            lengths[digest] = m.chunk_length(index)
            first_use[digest] = index
    if names is None:
        work = [d for d in lengths if not dst.chunk_present(d, lengths[d])]
    else:
        # A chunk recoded for an earlier backup of this copy is only touched (see prune).
        work = [d for d in lengths if d not in names or not dst.has_chunk(names[d])]
    present = len(lengths) - len(work)
    total = sum(lengths[d] for d in work)
    done = 0
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="owm-copy") as pool:
        futures: list[tuple[bytes, Future[Any]]] = [
            (d, pool.submit(_move if names is None else _recode, src, dst, d, lengths[d]))
            for d in work]
        try:
            for digest, future in futures:
                try:
                    if names is None:
                        read, written = future.result()
                    else:
                        names[digest], read, written = future.result()
                except ChunkDamaged as exc:
                    index = first_use[digest]
                    raise InvalidRequest(
                        f"backup {m.id} was not copied: the chunk at offset "
                        f"{index * m.chunk_size} (chunk {index}) {exc}") from None
                if written:
                    result.chunks_copied += 1
                else:
                    present += 1
                result.bytes_read += read
                result.bytes_written += written
                done += lengths[digest]
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for _, future in futures:
                future.cancel()
            raise
    result.chunks_present += present
    if names is not None:
        renamed = ChunkMap(m.chunks)
        for index, digest in m.chunk_map.entries():
            renamed.put(index, names[digest])
        m.map_data = renamed
    dst.sync()
    dst.save(m)  # a fresh checksum over the same fields; the map is rewritten beside it
    result.bytes_written += dst.manifest_bytes(m)
    result.copied.append(m.id)


def _destination(destination: Path | str, src: Repository, key: KeySource | None,
                 create_as: str, key_given: bool) -> Repository:
    """Open the destination (with ``key``), or create it: ``create_as`` "source" makes it as
    the source is (plain, or encrypted with the source's own master key, wrapped by ``key``,
    so that chunks move as they are), "encrypted" with a new key, "plain" not encrypted.
    An encrypted source goes into a plain destination only with "plain"."""
    if is_repository(Path(destination)):
        dst = Repository.open(destination, key=key)
        if create_as == "encrypted" and dst.cipher is None:
            raise InvalidRequest(f"{dst.root} is a repository that is not encrypted; drop "
                                 "--encrypt")
        if create_as == "plain" and dst.cipher is not None:
            raise InvalidRequest(f"{dst.root} is an encrypted repository; drop --plain")
        if key_given and dst.cipher is None:
            raise InvalidRequest(f"{dst.root} is a repository that is not encrypted; drop "
                                 "--dest-key-file")
        if src.cipher is not None and dst.cipher is None and create_as != "plain":
            # Never decrypt by accident: the user says so.
            raise InvalidRequest(f"{dst.root} is not encrypted, so the backups of {src.root} "
                                 "would be stored there decrypted; add --plain to do that")
        return dst
    if key_given and (create_as == "plain" or (create_as == "source" and src.cipher is None)):
        raise InvalidRequest("--dest-key-file is for an encrypted destination; add --encrypt")
    if create_as == "source":
        return Repository.open(destination, create=True, encrypt=src.cipher is not None,
                               key=key, like=src.cipher)
    return Repository.open(destination, create=True, encrypt=create_as == "encrypted", key=key)


def copy_backups(source: Path | str, destination: Path | str, refs: list[str], *,
                 progress: Progress | None = None, key: KeySource | None = None,
                 dest_key: KeySource | None = None, create_as: str = "source",
                 dest_key_given: bool = False) -> CopyResult:
    """Copy backups ``refs`` (ids, prefixes or NAME@N; none: every complete backup) and their
    parents from the repository ``source`` (opened with ``key``) into ``destination`` (opened
    with ``dest_key``; created when missing, see :func:`_destination`).  ``dest_key_given``:
    the user named the destination's key file, which a plain destination refuses.

    Both keys are checked before anything is written: a wrong one raises WrongKey or
    KeyNeeded and leaves the destination as it was (not even created)."""
    started = time.monotonic()
    src = Repository.open(source, key=key)
    if Path(destination).absolute() == Path(source).absolute():
        raise InvalidRequest("the source and the destination are the same repository")
    dst = _destination(destination, src, dest_key, create_as, dest_key_given)
    same = (src.cipher is None and dst.cipher is None) or (
        src.cipher is not None and dst.cipher is not None and src.cipher.same_key(dst.cipher))
    names: dict[bytes, bytes] | None = None if same else {}
    result = CopyResult(str(src.root), str(dst.root))
    result.recoded = not same
    with src.locked(exclusive=False), dst.locked(exclusive=False):
        for m in _selected(src, refs, result):
            if m.id in dst.manifest_ids():
                result.skipped.append({"id": m.id, "why": "already in the destination"})
                continue
            fd = dst.claim(m.id)  # a running-lock: a prune there spares what it touches
            if fd is None:
                raise InvalidRequest(f"backup {m.id} is being copied into {dst.root} already")
            try:
                _copy_one(src, dst, m, result, progress, names)
            finally:
                dst.finish(m.id, fd)
    result.seconds = time.monotonic() - started
    return result
