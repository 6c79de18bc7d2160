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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from owm.common.errors import InvalidRequest

JSON = dict[str, Any]

FORMAT = "owm-backup-manifest"
VERSION = 1
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)

COMPLETE = "complete"
INCOMPLETE = "incomplete"


class DamagedManifest(InvalidRequest):
    """A manifest file that cannot be read or does not match its own checksum."""


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
    def unpack(cls, data: bytes, count: int, expected: str, where: str) -> ChunkMap:
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
    stats: JSON = field(default_factory=dict)
    next_chunk: int = 0  # incomplete backups: every chunk to back up below this is stored
    work: str = "all"  # incomplete backups: "all" chunks, or "changed" since the parent
    map_file: str | None = None  # name of the map file in backups/, once saved
    map_blake3: str | None = None
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
            "volume_created": self.volume_created, "stats": self.stats,
        }
        if not self.complete:
            doc["resume"] = {"next_chunk": self.next_chunk, "work": self.work}
        doc["chunk_map"] = {
            "file": self.map_file, "blake3": self.map_blake3, "entries": self.chunks,
            "encoding": "zstd of packed 32-byte BLAKE3 digests, all-zero digest = zeroes",
        }
        return doc

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1).encode()

    @classmethod
    def loads(cls, raw: bytes, where: str,
              loader: Callable[[Manifest], ChunkMap] | None = None) -> Manifest:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedManifest(f"{where} is not a readable manifest (truncated?)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DamagedManifest(f"{where} is not an owm backup manifest")
        if doc.get("version") != VERSION:
            raise DamagedManifest(f"{where} has manifest version {doc.get('version')}, "
                                  f"this owm reads version {VERSION}")
        try:
            size, chunk_size = int(doc["size"]), int(doc["chunk_size"])
            if size <= 0 or chunk_size <= 0:
                raise ValueError("size")
            resume = doc.get("resume") or {}
            ref = doc.get("chunk_map") or {}
            if not isinstance(ref.get("file"), str) or not isinstance(ref.get("blake3"), str):
                raise DamagedManifest(f"{where} names no chunk map")
            return cls(
                id=str(doc["id"]), volume=str(doc["volume"]), image=str(doc["image"]),
                generation=int(doc["generation"]), size=size, chunk_size=chunk_size,
                state=str(doc["state"]), consistency=str(doc["consistency"]),
                started_at=str(doc["started_at"]),
                image_state=str(doc.get("image_state", "drained")),
                forced=bool(doc.get("forced", False)), preserved_at=doc.get("preserved_at"),
                drained_at=doc.get("drained_at"), completed_at=doc.get("completed_at"),
                parent=doc.get("parent"), incremental=bool(doc.get("incremental", False)),
                volume_created=doc.get("volume_created"), stats=dict(doc.get("stats") or {}),
                next_chunk=int(resume.get("next_chunk", 0)),
                work=str(resume.get("work", "all")),
                map_file=ref["file"], map_blake3=ref["blake3"], map_loader=loader,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedManifest(f"{where} lacks a valid field ({exc})") from None
