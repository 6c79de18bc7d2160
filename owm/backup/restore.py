"""``owm restore``: a backup from an owm repository back into a raw file or a new volume.

Every chunk is checked against its hash as it is read, so a restore never writes damaged data
silently: it stops with a sentence naming the offset.  Chunks of zeroes are not written at all
(the file stays sparse; a new volume reads zeroes there already).

* a file: written as ``PATH.partial``, synced, renamed to ``PATH`` (never over an existing file);
* a volume: created through the daemon with the backup's size and chunk size, written over NBD,
  flushed; if the restore fails the half-written volume is deleted again.  The volume is born
  marked as an incomplete restore (``"restore": {"state": "incomplete", "from": "REPO ID"}``
  in ``volume show``/``status``, kept in the daemon's catalog) and the mark is cleared only
  after the last byte is written and flushed, so a restore killed half-way (SIGTERM, SIGKILL,
  a crash) leaves a volume that says so and that refuses preserves and backups.  Running the
  same restore again starts over: the marked volume is deleted and restored afresh (the daemon
  cannot tell which of the half-written bytes reached the disk).  A marked volume of another
  restore, or an unmarked volume, is never touched.

Live (``--live``, a volume only): the volume is created marked ``"live": true`` and is usable at
once.  This process serves the backup over NBD on a private Unix socket (``owm.backup.serve``)
and attaches it as the volume's source; the daemon fills chunks on first access and the rest in
the background (``owm.pool.clone``), and this process reports the progress until every chunk
is filled, then clears the mark.  If the daemon restarts meanwhile, the source is attached
again as soon as it answers; if this process stops, the volume keeps every write and waits for
its source, and running the same restore again resumes it (a live restore is never started
over: the volume may hold writes newer than the backup).

``--to`` takes ``file:PATH`` or ``volume:NAME`` explicitly; a bare value is a file when it has a
``/`` or ends in .raw, .img or .bin, and a volume name otherwise.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from owm.backup.manifest import Manifest
from owm.backup.raw import create_partial
from owm.backup.repo import ChunkDamaged, Repository
from owm.backup.verify import bounded_map, default_workers
from owm.common.errors import AlreadyExists, InvalidRequest, OwmError, WrongState
from owm.common.files import fsync_dir
from owm.common.names import is_volume_name

if TYPE_CHECKING:
    # Imported where used: a restore into a file needs no control client (aiohttp costs a
    # fifth of a second of start-up).
    from owm.control.client import ControlClient

JSON = dict[str, Any]
Progress = Callable[[int, int], None]
GROUP_BYTES = 2 << 20


class RestoreFailed(OwmError):
    """A chunk needed for the restore is missing or damaged."""


@dataclass
class RestoreResult:
    backup_id: str
    image: str
    kind: str  # file | volume
    target: str
    size: int
    bytes_written: int
    chunks_written: int
    seconds: float

    def to_json(self) -> JSON:
        return {"id": self.backup_id, "image": self.image, "to": self.kind,
                "target": self.target, "size": self.size, "bytes_written": self.bytes_written,
                "chunks_written": self.chunks_written, "seconds": round(self.seconds, 3)}


def parse_target(to: str) -> tuple[str, str]:
    """('file', PATH) or ('volume', NAME) for the value of ``--to``."""
    kind, sep, rest = to.partition(":")
    if sep and kind in ("file", "volume"):
        if not rest:
            raise InvalidRequest(f"'--to {to}' names no {kind}")
        return kind, rest
    if "/" in to or to.lower().endswith((".raw", ".img", ".bin")):
        return "file", to
    if not is_volume_name(to):
        raise InvalidRequest(f"'{to}' is neither a file path nor a volume name; use "
                             "file:PATH or volume:NAME")
    return "volume", to


def _groups(manifest: Manifest) -> Iterator[list[tuple[int, bytes]]]:
    """Stored chunks in runs of consecutive chunks, about GROUP_BYTES each."""
    per_group = max(1, GROUP_BYTES // manifest.chunk_size)
    group: list[tuple[int, bytes]] = []
    for index, digest in manifest.chunk_map.entries():
        if group and (index != group[-1][0] + 1 or len(group) >= per_group):
            yield group
            group = []
        group.append((index, digest))
    if group:
        yield group


def _read_group(repo: Repository, manifest: Manifest,
                group: list[tuple[int, bytes]]) -> list[bytes]:
    parts = []
    for index, digest in group:
        try:
            parts.append(repo.get_chunk(digest, manifest.chunk_length(index)))
        except ChunkDamaged as exc:
            raise RestoreFailed(
                f"backup {manifest.id} cannot be restored: the chunk at offset "
                f"{index * manifest.chunk_size} fails its check ({exc})") from None
    return parts


def _restore_file(repo: Repository, manifest: Manifest, path: Path,
                  progress: Progress | None) -> tuple[int, int]:
    if path.exists():
        raise AlreadyExists(f"{path} already exists; restore into a new file")
    if not path.parent.is_dir():
        raise InvalidRequest(f"the directory {path.parent} does not exist")
    partial, fd = create_partial(path)
    written = chunks = 0
    try:
        os.ftruncate(fd, manifest.size)

        def one(group: list[tuple[int, bytes]]) -> int:
            parts = _read_group(repo, manifest, group)
            offset = group[0][0] * manifest.chunk_size
            # A run of consecutive chunks (up to GROUP_BYTES, chunk-aligned) in one pwritev:
            # no joined copy; a short write (rare) finishes with pwrite.
            total = sum(len(p) for p in parts)
            n = os.pwritev(fd, parts, offset)
            if n < total:
                view = memoryview(b"".join(parts))[n:]
                offset += n
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
            return total

        # Reading, decompressing, hashing and writing on two threads per core (a thread
        # waiting for a chunk file or for the write lets the other hash), a few groups each.
        workers = min(8, 2 * default_workers())
        for group, n in bounded_map(one, _groups(manifest), workers, "owm-restore"):
            written += n
            chunks += len(group)
            if progress is not None:
                progress(group[-1][0] * manifest.chunk_size + manifest.chunk_length(
                    group[-1][0]), manifest.size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    os.close(fd)
    os.rename(partial, path)
    fsync_dir(path.parent)
    if progress is not None:
        progress(manifest.size, manifest.size)
    return written, chunks


def restore_source(repo: Repository, manifest: Manifest) -> str:
    """What a restore mark names: the repository's absolute path and the backup id."""
    return f"{repo.root.resolve()} {manifest.id}"


async def _start_over(control: ControlClient, name: str, source: str) -> None:
    """Delete what an interrupted run of this same restore left in ``name``, if anything."""
    import asyncio  # here: a restore into a file runs without an event loop

    from owm.control.client import ControlError

    try:
        current = await control.volume(name)
    except ControlError as exc:
        if exc.status == 404:
            return
        raise
    mark = current.get("restore")
    if not isinstance(mark, dict):
        raise AlreadyExists(f"a volume named '{name}' already exists; restore into a new volume")
    if mark.get("from") != source:
        raise WrongState(f"volume {name} is an incomplete restore of {mark.get('from')}; run "
                         "that restore again, or delete the volume")
    # The killed run's NBD session ends when the daemon notices its socket closed.
    deadline = time.monotonic() + 30
    while True:
        try:
            await control.delete_volume(name)
            return
        except ControlError as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def _restore_volume(repo: Repository, manifest: Manifest, name: str,
                          control: ControlClient, method: str,
                          progress: Progress | None) -> tuple[int, int]:
    import asyncio  # here: a restore into a file runs without an event loop

    from owm.backup.run import connect_export, nbd_endpoint

    source = restore_source(repo, manifest)
    await _start_over(control, name, source)
    where = f"/v1/volumes/{quote(name, safe='')}/restore"
    await control.request("POST", where, {"size": manifest.size, "method": method,
                                          "chunk_size": manifest.chunk_size, "from": source})
    loop = asyncio.get_running_loop()
    written = chunks = 0
    try:
        unix, tcp = await nbd_endpoint(control)
        client = await connect_export(unix, tcp, name)
        try:
            window = asyncio.Semaphore(4)
            tasks: set[asyncio.Task[None]] = set()

            async def one(group: list[tuple[int, bytes]]) -> None:
                nonlocal written, chunks
                try:
                    data = b"".join(await loop.run_in_executor(None, _read_group, repo,
                                                               manifest, group))
                    await client.write(group[0][0] * manifest.chunk_size, data)
                    written += len(data)
                    chunks += len(group)
                    if progress is not None:
                        progress(written, manifest.size)
                finally:
                    window.release()

            try:
                for group in _groups(manifest):
                    await window.acquire()
                    done = [t for t in tasks if t.done()]
                    for t in done:
                        tasks.discard(t)
                        t.result()
                    tasks.add(asyncio.ensure_future(one(group)))
                for t in list(tasks):
                    await t
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.flush()
        finally:
            await client.disconnect()
        # Every byte is written and flushed: only now is the volume a restore of the backup.
        await control.request("DELETE", where, {"from": source})
    except BaseException:
        with contextlib.suppress(Exception):
            await control.delete_volume(name)
        raise
    if progress is not None:
        progress(manifest.size, manifest.size)
    return written, chunks


RECONNECT_WAIT = 300.0  # seconds a live restore waits for a daemon that went away
POLL = 0.2


async def _restore_live(repo: Repository, manifest: Manifest, name: str,
                        control: ControlClient, method: str, progress: Progress | None,
                        notify: Callable[[str], None] | None, pace: float) -> tuple[int, int]:
    import asyncio  # here: a restore into a file runs without an event loop
    import shutil
    import tempfile

    from owm.backup.serve import serve_backup
    from owm.common.errors import DaemonNotRunning
    from owm.control.client import ControlError

    source = restore_source(repo, manifest)
    where = f"/v1/volumes/{quote(name, safe='')}/restore"
    try:
        current: JSON | None = await control.volume(name)
    except ControlError as exc:
        if exc.status != 404:
            raise
        current = None
    mark = current.get("restore") if current is not None else None
    if current is not None and not (isinstance(mark, dict) and mark.get("live")):
        await _start_over(control, name, source)  # refuses what is not this restore's
        current = None
    elif isinstance(mark, dict) and mark.get("from") != source:
        raise WrongState(f"volume {name} is being restored live from {mark.get('from')}; run "
                         "that restore again, or delete the volume")
    if current is None:
        await control.request("POST", where, {"size": manifest.size, "method": method,
                                              "chunk_size": manifest.chunk_size,
                                              "from": source, "live": True})
    tmp = Path(tempfile.mkdtemp(prefix="owm-live-"))
    sock = tmp / "source.sock"
    stop = asyncio.Event()
    listening = asyncio.Event()
    server = asyncio.ensure_future(serve_backup(repo, manifest, tcp=None, unix_path=str(sock),
                                                stop=stop, on_ready=lambda _: listening.set()))
    attach = {"from": source, "socket": str(sock), "export": manifest.image, "pace": pace}
    try:
        waiter = asyncio.ensure_future(listening.wait())
        await asyncio.wait([server, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if server.done():
            server.result()  # it failed: say why
        try:
            await control.request("POST", where + "/source", attach)
        except (DaemonNotRunning, ControlError) as exc:
            if isinstance(exc, ControlError) and exc.status < 500:
                raise
            # The daemon went away just now: the loop below attaches once it is back.
        if notify is not None:
            notify(f"volume {name} is usable now; it fills from backup {manifest.id} in the "
                   "background")
        lost_since: float | None = None
        while True:
            try:
                status = await control.volume(name)
            except (DaemonNotRunning, ControlError) as exc:
                if isinstance(exc, ControlError) and exc.status == 404:
                    raise WrongState(f"volume {name} was deleted during its live "
                                     "restore") from None
                if isinstance(exc, ControlError) and exc.status < 500:
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_WAIT:
                    raise
                await asyncio.sleep(POLL)
                continue
            lost_since = None
            mark = status.get("restore")
            if not isinstance(mark, dict):
                break  # finished (by a run of this same restore)
            done, total = int(mark.get("filled") or 0), int(mark.get("chunks") or 1)
            if progress is not None:
                progress(min(manifest.size, done * manifest.chunk_size), manifest.size)
            if done >= total:
                await control.request("DELETE", where, {"from": source})
                break
            if mark.get("source") != "attached":
                # The daemon restarted (or lost the connection): give it the source again.
                with contextlib.suppress(ControlError, DaemonNotRunning):
                    await control.request("POST", where + "/source", attach)
            await asyncio.sleep(POLL)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await server
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(manifest.size, manifest.size)
    return manifest.size, manifest.chunks


def restore_file(repo_path: Path | str, ref: str, path: Path | str, *,
                 progress: Progress | None = None) -> RestoreResult:
    """Restore backup ``ref`` of the repository into the new raw file ``path``, with no event
    loop (``owm restore --to FILE`` calls it directly)."""
    repo = Repository.open(repo_path)
    started = time.monotonic()
    with repo.locked(exclusive=False):
        manifest = _restorable(repo, ref)
        written, chunks = _restore_file(repo, manifest, Path(path), progress)
    return RestoreResult(manifest.id, manifest.image, "file", str(Path(path).absolute()),
                         manifest.size, written, chunks, time.monotonic() - started)


def _restorable(repo: Repository, ref: str) -> Manifest:
    manifest = repo.resolve(ref)
    if not manifest.complete:
        raise InvalidRequest(f"backup {manifest.id} is incomplete and cannot be restored; "
                             "run the backup again to finish it")
    return manifest


async def restore_backup(
    repo_path: Path | str,
    ref: str,
    to: str,
    *,
    control: ControlClient | None = None,
    method: str = "cow",
    progress: Progress | None = None,
    live: bool = False,
    notify: Callable[[str], None] | None = None,
    pace: float = 0.0,
) -> RestoreResult:
    """Restore backup ``ref`` of the repository into ``to`` (see ``parse_target``); ``live``:
    into a volume usable at once (see the module docstring)."""
    import asyncio  # here: a restore into a file runs without an event loop

    kind, target = parse_target(to)
    if live and kind != "volume":
        raise InvalidRequest("a live restore goes into a new volume, not a file")
    loop = asyncio.get_running_loop()
    if kind == "file":
        return await loop.run_in_executor(
            None, lambda: restore_file(repo_path, ref, target, progress=progress))
    repo = Repository.open(repo_path)
    started = time.monotonic()
    with repo.locked(exclusive=False):
        manifest = await loop.run_in_executor(None, _restorable, repo, ref)
        if control is None:
            raise InvalidRequest("restoring into a volume needs the daemon")
        if live:
            written, chunks = await _restore_live(repo, manifest, target, control, method,
                                                  progress, notify, pace)
        else:
            written, chunks = await _restore_volume(repo, manifest, target, control,
                                                    method, progress)
    return RestoreResult(manifest.id, manifest.image, kind, target, manifest.size, written,
                         chunks, time.monotonic() - started)
