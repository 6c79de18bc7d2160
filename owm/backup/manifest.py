"""One backup's manifest in an owm repository: what was backed up and which chunk is where.

A manifest is a small JSON file, ``backups/ID.json``, with the facts a person wants (volume,
image, size, chunk size, state, consistency, times, statistics) and a reference to the backup's
*chunk map*: for every chunk of the image, the BLAKE3 digest of its content, or 32 zero bytes for
a chunk that reads as zeroes (stored nowhere).  The map lives beside it, zstd-compressed packed
digests in ``backups/ID.HASH.map`` (named after its own BLAKE3, which the manifest records, so
a damaged or mismatched map is detected rather than restored from).  Listing a repository reads
only the small JSON files; the map is loaded when it is needed.

Every manifest is complete in itself: an incremental backup copies its parent's map and
replaces the entries of the chunks that changed, so restoring any backup never needs another.

Trust (format version 2): every field is covered by ``checksum``, the BLAKE3 of the canonical
JSON (sorted keys, no spaces) of all the other fields, and the file must be byte for byte the
serialization ``dumps`` writes, so that any change to any byte is a *damaged* manifest rather
than a different backup.  The map is checked twice: its file against ``file_blake3`` and its
unpacked digests against ``blake3``; its name is derived from the backup id and that digest,
never taken from the manifest.  Version 1 manifests (written before checksums) are still read,
as *unverified*: restorable, listed and verified as such, but never the parent of an
incremental backup and never resumed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from owm.common.errors import InvalidRequest

JSON = dict[str, Any]

FORMAT = "owm-backup-manifest"
VERSION = 2
UNVERIFIED_VERSION = 1  # manifests written before checksums: read, but not trusted as parents
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)

COMPLETE = "complete"
INCOMPLETE = "incomplete"


class DamagedManifest(InvalidRequest):
    """A manifest file that cannot be read or does not match its own checksum."""


BACKUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,250}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def valid_id(backup_id: str) -> bool:
    """Whether ``backup_id`` can name a backup: one plain file name, no '/', no glob pattern."""
    return BACKUP_ID.fullmatch(backup_id) is not None


def map_name(backup_id: str, map_blake3: str) -> str:
    """The map file's name, derived from the backup id and the map's digest (never read)."""
    return f"{backup_id}.{map_blake3[:16]}.map"


def canonical_digest(doc: JSON) -> str:
    """BLAKE3 (hex) of the canonical JSON of ``doc`` without its ``checksum`` field."""
    rest = {k: v for k, v in doc.items() if k != "checksum"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False)
    return blake3.blake3(canonical.encode()).hexdigest()


def serialize(doc: JSON) -> bytes:
    """The exact bytes of a manifest file holding ``doc`` (what ``loads`` insists on)."""
    return json.dumps(doc, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


class ChunkMap:
    """The digest of every chunk of an image, packed; all-zero digest = a chunk of zeroes."""

    __slots__ = ("count", "raw")

    def __init__(self, count: int, raw: bytearray | None = None) -> None:
        self.count = count
        self.raw = raw if raw is not None else bytearray(count * DIGEST_SIZE)
        if len(self.raw) != count * DIGEST_SIZE:
            raise DamagedManifest("the chunk map has the wrong length for the image size")

    def copy(self) -> ChunkMap:
        return ChunkMap(self.count, bytearray(self.raw))

    def get(self, index: int) -> bytes | None:
        """The digest of chunk ``index``, or None when the chunk is all zeroes."""
        start = index * DIGEST_SIZE
        digest = bytes(self.raw[start : start + DIGEST_SIZE])
        return None if digest == ZERO_DIGEST else digest

    def put(self, index: int, digest: bytes | None) -> None:
        start = index * DIGEST_SIZE
        self.raw[start : start + DIGEST_SIZE] = digest if digest is not None else ZERO_DIGEST

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """(chunk index, digest) of every chunk that is stored (not all zeroes)."""
        raw = bytes(self.raw)
        for index in range(self.count):
            start = index * DIGEST_SIZE
            if raw.startswith(ZERO_DIGEST, start):
                continue
            yield index, raw[start : start + DIGEST_SIZE]

    def digests(self) -> set[bytes]:
        return {digest for _, digest in self.entries()}

    def pack(self) -> tuple[bytes, str]:
        """The compressed map file's content and the BLAKE3 (hex) of the packed digests."""
        packed = bytes(self.raw)
        return (zstandard.ZstdCompressor(level=3).compress(packed),
                blake3.blake3(packed).hexdigest())

    @classmethod
    def unpack(cls, data: bytes, count: int, expected: str, where: str,
               file_digest: str | None = None) -> ChunkMap:
        if file_digest is not None and blake3.blake3(data).hexdigest() != file_digest:
            raise DamagedManifest(f"the chunk map file of {where} does not match its checksum")
        try:
            packed = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=count * DIGEST_SIZE)
        except zstandard.ZstdError as exc:
            raise DamagedManifest(f"the chunk map of {where} cannot be decoded ({exc})") from None
        if blake3.blake3(packed).hexdigest() != expected:
            raise DamagedManifest(f"the chunk map of {where} does not match its checksum")
        return cls(count, bytearray(packed))


@dataclass
class Manifest:
    """Everything recorded about one backup."""

    id: str
    volume: str
    image: str
    generation: int
    size: int
    chunk_size: int
    state: str  # COMPLETE or INCOMPLETE
    consistency: str  # transaction-consistent | crash-consistent
    started_at: str
    image_state: str = "drained"
    forced: bool = False
    preserved_at: str | None = None
    drained_at: str | None = None
    completed_at: str | None = None
    parent: str | None = None
    incremental: bool = False
    volume_created: str | None = None
    volume_uid: str | None = None  # the volume incarnation (None: written before uids)
    stats: JSON = field(default_factory=dict)
    next_chunk: int = 0  # incomplete backups: every chunk to back up below this is stored
    work: str = "all"  # incomplete backups: "all" chunks, or "changed" since the parent
    map_file: str | None = None  # name of the map file in backups/, once saved
    map_blake3: str | None = None
    map_file_blake3: str | None = None  # BLAKE3 of the map file's bytes (None: version 1)
    verified: bool = True  # False: a version 1 manifest, which has no checksum
    map_data: ChunkMap | None = field(default=None, repr=False)
    map_loader: Callable[[Manifest], ChunkMap] | None = field(default=None, repr=False)

    @property
    def chunk_map(self) -> ChunkMap:
        """The chunk map, loaded from its file on first use."""
        if self.map_data is None:
            if self.map_loader is None:
                raise DamagedManifest(f"backup {self.id} has no chunk map")
            self.map_data = self.map_loader(self)
        return self.map_data

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    @property
    def transaction_consistent(self) -> bool:
        return self.consistency == "transaction-consistent" and not self.forced

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def summary(self) -> JSON:
        """The JSON-ready listing of ``owm backup list --json`` (no chunk map)."""
        return {
            "id": self.id, "volume": self.volume, "image": self.image,
            "time": self.completed_at or self.started_at, "started_at": self.started_at,
            "completed_at": self.completed_at, "size": self.size, "chunk_size": self.chunk_size,
            "state": self.state, "transaction_consistent": self.transaction_consistent,
            "consistency": self.consistency, "image_state": self.image_state,
            "forced": self.forced, "incremental": self.incremental, "parent": self.parent,
            "preserved_at": self.preserved_at, "stats": self.stats,
            "volume_uid": self.volume_uid,
            "manifest": "checksummed" if self.verified else "unverified",
        }

    def to_json(self) -> JSON:
        doc: JSON = {
            "format": FORMAT, "version": VERSION, "id": self.id, "volume": self.volume,
            "image": self.image, "generation": self.generation, "size": self.size,
            "chunk_size": self.chunk_size, "hash": "blake3", "compression": "zstd",
            "state": self.state, "consistency": self.consistency,
            "image_state": self.image_state, "forced": self.forced,
            "preserved_at": self.preserved_at, "drained_at": self.drained_at,
            "started_at": self.started_at, "completed_at": self.completed_at,
            "parent": self.parent, "incremental": self.incremental,
            "volume_created": self.volume_created, "volume_uid": self.volume_uid,
            "stats": self.stats,
        }
        if not self.complete:
            doc["resume"] = {"next_chunk": self.next_chunk, "work": self.work}
        doc["chunk_map"] = {
            "file": self.map_file, "blake3": self.map_blake3,
            "file_blake3": self.map_file_blake3, "entries": self.chunks,
            "encoding": "zstd of packed 32-byte BLAKE3 digests, all-zero digest = zeroes",
        }
        doc["checksum"] = canonical_digest(doc)
        return doc

    def dumps(self) -> bytes:
        return serialize(self.to_json())

    @classmethod
    def loads(cls, raw: bytes, where: str,
              loader: Callable[[Manifest], ChunkMap] | None = None) -> Manifest:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise DamagedManifest(f"{where} is not a readable manifest (truncated?)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DamagedManifest(f"{where} is not an owm backup manifest")
        version = doc.get("version")
        if version not in (VERSION, UNVERIFIED_VERSION) or isinstance(version, bool):
            raise DamagedManifest(f"{where} has manifest version {version}, "
                                  f"this owm reads versions {UNVERIFIED_VERSION} and {VERSION}")
        verified = "checksum" in doc or version != UNVERIFIED_VERSION
        if verified:
            # Any manifest with a checksum is held to it, whatever its version says.
            try:
                intact, canonical = doc.get("checksum") == canonical_digest(doc), serialize(doc)
            except (TypeError, ValueError):
                intact = False
            if not intact:
                raise DamagedManifest(f"{where} does not match its checksum")
            if raw != canonical:
                raise DamagedManifest(f"{where} is not in the form owm writes (altered?)")
        try:
            size, chunk_size = int(doc["size"]), int(doc["chunk_size"])
            if size <= 0 or chunk_size <= 0:
                raise ValueError("size")
            resume = doc.get("resume") or {}
            ref = doc.get("chunk_map") or {}
            if not isinstance(ref, dict) or not isinstance(ref.get("blake3"), str) or \
                    not _HEX64.fullmatch(ref["blake3"]):
                raise DamagedManifest(f"{where} names no chunk map")
            backup_id = str(doc["id"])
            if not valid_id(backup_id):
                raise DamagedManifest(f"{where} has an id that cannot name a backup")
            # The map's name is derived, never taken from the file: no path comes from a manifest.
            if ref.get("file") != map_name(backup_id, ref["blake3"]):
                raise DamagedManifest(f"{where} names a chunk map that is not its own")
            file_digest = ref.get("file_blake3")
            if verified and (not isinstance(file_digest, str) or not _HEX64.fullmatch(file_digest)):
                raise DamagedManifest(f"{where} has no checksum for its chunk map file")
            parent = doc.get("parent")
            if parent is not None and (not isinstance(parent, str) or not valid_id(parent)):
                raise DamagedManifest(f"{where} names a parent that cannot be a backup")
            generation = int(doc["generation"])
            if generation < 0 or int(ref.get("entries", -1)) != chunk_count(size, chunk_size):
                raise ValueError("generation or entries")
            uid = doc.get("volume_uid")
            return cls(
                id=backup_id, volume=str(doc["volume"]), image=str(doc["image"]),
                generation=generation, size=size, chunk_size=chunk_size,
                state=str(doc["state"]), consistency=str(doc["consistency"]),
                started_at=str(doc["started_at"]),
                image_state=str(doc.get("image_state", "drained")),
                forced=bool(doc.get("forced", False)), preserved_at=doc.get("preserved_at"),
                drained_at=doc.get("drained_at"), completed_at=doc.get("completed_at"),
                parent=parent, incremental=bool(doc.get("incremental", False)),
                volume_created=doc.get("volume_created"),
                volume_uid=str(uid) if uid is not None and verified else None,
                stats=dict(doc.get("stats") or {}),
                next_chunk=int(resume.get("next_chunk", 0)),
                work=str(resume.get("work", "all")),
                map_file=ref["file"], map_blake3=ref["blake3"],
                map_file_blake3=file_digest if verified else None, verified=verified,
                map_loader=loader,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DamagedManifest(f"{where} lacks a valid field ({exc})") from None
