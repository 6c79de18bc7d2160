"""Instant restore: one backup of a repository served as a read-only NBD export.

``owm backup serve REPO ID`` reads nothing up front: a read fetches the chunks it touches from
the repository (checked against their hash, and opened if the repository is encrypted, like a
restore does) through a small cache, and block status answers from the manifest's chunk map, so
chunks of zeroes stay holes for ``qemu-img convert``, ``nbdcopy`` and ``nbdinfo --map``.  The
export is named after the backed-up image (``NAME@N``) and, so that a client naming no export
finds it, after the volume (``NAME``); both are read-only.  The repository stays shared-locked
while the server runs, so a delete cannot take chunks from under a reader.

A chunk that fails its check answers the read with EIO (the client sees an I/O error at that
offset) rather than wrong data.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from owm.backup.manifest import Manifest
from owm.backup.repo import ChunkDamaged, Repository
from owm.common.errors import NotFound, OutOfRange, OwmError, ReadOnly
from owm.common.view import ExportInfo, Extent, View

CACHE_CHUNKS = 64


class ChunkUnreadable(OwmError):
    """A chunk of the served backup is missing or fails its check."""

    errno = errno.EIO


class BackupReader:
    """The bytes of one backup, chunk by chunk from its repository (thread-safe)."""

    def __init__(self, repo: Repository, manifest: Manifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.size = manifest.size
        self.chunk_size = manifest.chunk_size
        self._map = manifest.chunk_map
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def stored(self, index: int) -> bool:
        """Whether chunk ``index`` holds data (else it reads as zeroes)."""
        return self._map.get(index) is not None

    def chunk(self, index: int) -> bytes:
        """The content of chunk ``index`` (zeroes for a hole); ChunkUnreadable if damaged."""
        length = self.manifest.chunk_length(index)
        digest = self._map.get(index)
        if digest is None:
            return bytes(length)
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
        try:
            data = self.repo.get_chunk(digest, length)
        except ChunkDamaged as exc:
            raise ChunkUnreadable(f"the chunk at offset {index * self.chunk_size} of backup "
                                  f"{self.manifest.id} fails its check ({exc})") from None
        except OSError as exc:
            raise ChunkUnreadable(f"the chunk at offset {index * self.chunk_size} of backup "
                                  f"{self.manifest.id} cannot be read ({exc.strerror})") from None
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def read(self, offset: int, length: int) -> bytes:
        cs = self.chunk_size
        out = bytearray()
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // cs
            start = pos - index * cs
            take = min(cs - start, end - pos)
            out += self.chunk(index)[start:start + take]
            pos += take
        return bytes(out)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Holes (chunks of zeroes) and data, merged, covering ``offset .. offset+length``."""
        cs = self.chunk_size
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            take = min((index + 1) * cs, end) - pos
            hole = not self.stored(index)
            if out and out[-1].hole == hole:
                out[-1] = Extent(out[-1].length + take, hole=hole, zero=hole)
            else:
                out.append(Extent(take, hole=hole, zero=hole))
            pos += take
        return out


class BackupView:
    """A read-only :class:`owm.common.view.View` of a backup."""

    read_only = True

    def __init__(self, reader: BackupReader, export_name: str,
                 pool: ThreadPoolExecutor) -> None:
        self.reader = reader
        self.export_name = export_name
        self.size = reader.size
        self._pool = pool

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"the request reaches past the end of the backup ({self.size} "
                             "bytes)")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.reader.read, offset, length)

    def _refuse(self) -> ReadOnly:
        return ReadOnly("a served backup is read-only")

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        raise self._refuse()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._refuse()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False,
                           may_trim: bool = True) -> None:
        raise self._refuse()

    async def flush(self) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        return self.reader.extents(offset, length)

    async def close(self, clean: bool = True) -> None:
        return None


class BackupExports:
    """The :class:`owm.common.view.Exports` of one served backup."""

    def __init__(self, reader: BackupReader, workers: int = 4) -> None:
        self.reader = reader
        manifest = reader.manifest
        self.names = (manifest.volume, manifest.image)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="owm-backup-serve")

    def _info(self, name: str) -> ExportInfo:
        m = self.reader.manifest
        return ExportInfo(name=name, description=f"backup {m.id} of {m.image} (read-only)",
                          size=m.size, read_only=True, preferred_block=m.chunk_size)

    def list_exports(self) -> list[ExportInfo]:
        return [self._info(self.names[0])]

    def export_info(self, name: str) -> ExportInfo:
        if name not in self.names:
            raise NotFound(f"this server serves only {self.names[1]}")
        return self._info(name)

    async def open_export(self, name: str, peer: str) -> View:
        return BackupView(self.reader, self.export_info(name).name, self._pool)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def serve_backup(repo: Repository, manifest: Manifest, *,
                       tcp: tuple[str, int] | None, unix_path: str | None,
                       stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve ``manifest``'s backup until ``stop`` is set; ``on_ready(tcp_port)`` once listening."""
    from owm.nbd.server import NbdServer

    exports = BackupExports(BackupReader(repo, manifest))
    server = NbdServer(exports)
    try:
        await server.start(tcp=tcp, unix_path=unix_path)
        if on_ready is not None:
            on_ready(server.tcp_port)
        await stop.wait()
    finally:
        await server.stop(grace=2.0)
        exports.close()
