"""Local-file storage: each named object is a sparse file in one directory.

The event loop must never wait for a disk, and a thread hop costs more than a 4 KiB copy, so:
on a memory-backed filesystem (tmpfs, ramfs) small reads and writes run inline, since there is no
disk to wait for; elsewhere small reads and writes are tried inline with RWF_NOWAIT, which the
kernel refuses (EAGAIN) when it would have to wait, and only then leave the loop (where the
kernel does not support RWF_NOWAIT for an operation, that operation leaves it, except: ext4
answers EOPNOTSUPP for writes, and there a small write within one 64 KiB piece runs inline while
``owm.storage.inlinewrite``'s guard allows it (little dirty memory, no recent blocked write) and
no queued write to the same file is outstanding.  Syncs always go to the thread pool.

On a disk every write that leaves the loop joins one queue.  The first one queued in a loop turn
hands the queue to a pool thread at the end of that turn, so every write of the turn (a receive
of 16 requests, a group commit's releases) shares the one hop; the thread writes what is queued,
in order, with one ``io_submit`` per batch (``owm.storage.aio``: Linux AIO on a page-cached file
is a vectored ``pwrite``, one GIL release for the batch), each request with its own result, and
wakes the loop once.  Without AIO it writes one ``pwritev`` per run of contiguous writes.  Either
way writes are cut at every 64 KiB boundary (``aio.PIECE``): ext4 sizes page-cache folios after
the writes that create them, and a small write into a big folio costs several times more.

A read of an object that does not exist answers zeroes from memory after the first miss: only
this instance creates files in its directory, and it forgets the absence before creating one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from owm.common.errors import NoSpace, OwmError
from owm.storage import Buffer
from owm.storage.aio import PIECE, open_batch_writer
from owm.storage.inlinewrite import InlineWriteGuard

T = TypeVar("T")
_QueuedWrite = tuple[int, int, Buffer, "asyncio.Future[None]"]

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_INLINE_LIMIT = 256 * 1024  # larger requests go to the pool without trying inline
# In memory (tmpfs) a request is a memcpy that never blocks: up to this size doing it on the loop
# costs less than the hop (a 1 MiB write: 230-270 µs of CPU inline against 350-390 µs through
# the pool, whose futures and GIL hand-offs made 20 futex calls per write).
_MEMORY_INLINE_LIMIT = 4 << 20
_MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
# Buffers one pwritev may take (more is EINVAL): a longer run of contiguous queued writes is
# split.  A group commit that releases hundreds of held writes at once queues such runs.
_IOV_MAX = 1024  # IOV_MAX on Linux


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path``, from the longest matching mount point."""
    best, kind = "", ""
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); falls back to writing zeroes where unsupported."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    if fallocate(fd, falloc_fl_keep_size | falloc_fl_punch_hole, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        size = os.fstat(fd).st_size
        end = min(offset + length, size)
        zeroes = bytes(1 << 20)
        while offset < end:
            n = min(len(zeroes), end - offset)
            os.pwrite(fd, zeroes[:n], offset)
            offset += n


def _translate(exc: OSError, what: str) -> OwmError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the pool's disk is full while {what}")
    return OwmError(f"storage error while {what}: {exc.strerror or exc}")


def _settle(done: list[tuple[asyncio.Future[None], OSError | None]]) -> None:
    for fut, error in done:
        if fut.done():  # its writer was cancelled
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class LocalStorage:
    """Named objects as sparse files under ``root``."""

    def __init__(self, root: Path | str, *, threads: int = 8, inline_writes: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        # Objects known not to exist: a read of one answers zeroes without an open() each time.
        # Only this instance creates files in ``root`` (one storage per volume directory, in the
        # one daemon that holds the pool's lock), and it drops a name from here before creating it.
        self._absent: set[str] = set()
        self._fd_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="owm-io")
        self.memory_backed = _filesystem_type(self.root) in _MEMORY_FILESYSTEMS
        # Per operation: 0 = inline without asking, a flag = inline with RWF_NOWAIT, None = pool.
        self._read_mode: int | None = 0 if self.memory_backed else (_NOWAIT or None)
        self._write_mode: int | None = 0 if self.memory_backed else (_NOWAIT or None)
        # On a disk that refuses RWF_NOWAIT writes: small ones inline while this allows
        # (owm.storage.inlinewrite); ``inline_writes=False``: every write through the queue.
        self._guard = InlineWriteGuard() if inline_writes and not self.memory_backed else None
        if not inline_writes:
            self._write_mode = None
        self._inline_limit = _MEMORY_INLINE_LIMIT if self.memory_backed else _INLINE_LIMIT
        # Small writes bound for the pool: queued, written in order by one thread at a time.
        self._queue: list[_QueuedWrite] = []
        self._queue_lock = threading.Lock()
        self._queue_busy = False
        # Queued writes not yet settled on the loop, per file: an inline write to a file waits
        # its turn behind them (kept on the loop only).
        self._unsettled: dict[int, int] = {}
        # Linux AIO as a vectored pwrite for the queued writes (owm.storage.aio); None: one
        # pwritev per contiguous run instead.
        self._batch_writer = None if self.memory_backed else open_batch_writer()
        # Writes off the loop are cut at these boundaries on a disk (see aio.PIECE: page-cache
        # folios of a file written in big pieces make every later small write into them dear).
        self._piece = 0 if self.memory_backed else PIECE

    def _path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def _fd(self, name: str, create: bool) -> int | None:
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        if not create and name in self._absent:
            return None
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is None:
                flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
                path = self._path(name)
                self._absent.discard(name)
                try:
                    fd = os.open(path, flags, 0o600)
                except FileNotFoundError:
                    if not create:
                        self._absent.add(name)
                    return None
                self._fds[name] = fd
            return fd

    async def _run(self, fn: Callable[[], T], what: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn)
        except OSError as exc:
            raise _translate(exc, what) from exc

    async def read(self, name: str, offset: int, length: int) -> bytes:
        fd = self._fd(name, create=False)
        if fd is None:
            return bytes(length)
        mode = self._read_mode
        if mode is not None and length <= self._inline_limit:
            buf = bytearray(length)
            try:
                n = os.preadv(fd, [buf], offset, mode) if mode else os.preadv(fd, [buf], offset)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not mode:
                    raise _translate(exc, f"reading {name}") from exc
                self._read_mode = None
            else:
                if n == length:
                    return bytes(buf)
                if n < length and offset + n >= os.fstat(fd).st_size:
                    return bytes(buf)  # short read at end of file: the rest is zeroes
        return await self._run(lambda: self._read_blocking(fd, offset, length), f"reading {name}")

    @staticmethod
    def _read_blocking(fd: int, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return bytes(buf)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        fd = self._fd(name, create=True)
        assert fd is not None
        length = len(data)
        mode = self._write_mode
        if mode is not None and length <= self._inline_limit:
            try:
                n = os.pwritev(fd, [data], offset, mode) if mode else os.pwrite(fd, data, offset)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not mode:
                    raise _translate(exc, f"writing {name}") from exc
                self._write_mode = None
            else:
                if n == length:
                    return
                offset, data = offset + n, memoryview(data)[n:]
        elif (self._guard is not None and offset % PIECE + length <= PIECE
              and fd not in self._unsettled and self._guard.allows()):
            # Within one 64 KiB piece (the folio rule below holds inline too), and only with
            # nothing queued for this file, so that this write cannot pass an earlier one.
            began = time.perf_counter()
            try:
                n = os.pwrite(fd, data, offset)
            except OSError as exc:
                raise _translate(exc, f"writing {name}") from exc
            self._guard.took(time.perf_counter() - began)
            if n == length:
                return
            offset, data = offset + n, memoryview(data)[n:]
        if length <= _INLINE_LIMIT or self._piece:
            # On a disk every write leaves the loop through the one queue: written in the order
            # issued, big ones in pieces with the small ones of their batch.
            await self._queued_write(name, fd, offset, data)
            return
        await self._run(lambda: self._write_blocking(fd, offset, data), f"writing {name}")

    async def _queued_write(self, name: str, fd: int, offset: int, data: Buffer) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        unsettled = self._unsettled
        unsettled[fd] = unsettled.get(fd, 0) + 1
        with self._queue_lock:
            self._queue.append((fd, offset, data, fut))
            start, self._queue_busy = not self._queue_busy, True
        if start:
            # Hand the queue to the writer thread at the end of this loop turn, so that every
            # write this turn queues (a receive of 16 requests, a group commit's releases)
            # shares the one hop.
            loop.call_soon(self._start_writer, loop)
        try:
            await fut
        except OSError as exc:
            raise _translate(exc, f"writing {name}") from exc

    def _start_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._pool.submit(self._write_queued, loop)
        except RuntimeError as exc:  # the pool is shut down (the storage is closed)
            with self._queue_lock:
                batch, self._queue, self._queue_busy = self._queue, [], False
            self._written([item[0] for item in batch])
            for item in batch:
                if not item[3].done():
                    item[3].set_exception(OSError(errno.EBADF, f"the storage is closed ({exc})"))

    def _written(self, fds: list[int]) -> None:
        """On the loop: these queued writes (one fd each) are done."""
        unsettled = self._unsettled
        for fd in fds:
            n = unsettled[fd] - 1
            if n:
                unsettled[fd] = n
            else:
                del unsettled[fd]

    def _settle_batch(self, done: list[tuple[asyncio.Future[None], OSError | None]],
                      fds: list[int]) -> None:
        self._written(fds)
        _settle(done)

    def _write_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        """In a pool thread: write queued batches until the queue is empty."""
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._queue_busy = False
                    return
            done: list[tuple[asyncio.Future[None], OSError | None]]
            if self._batch_writer is not None:
                try:
                    errors = self._batch_writer.write_many([item[:3] for item in batch])
                except OSError as exc:  # the context itself failed: every write of it fails
                    errors = [exc] * len(batch)
                done = [(item[3], error) for item, error in zip(batch, errors, strict=True)]
            else:
                done = self._write_runs(batch)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._settle_batch, done, [item[0] for item in batch])

    def _write_runs(
        self, batch: list[_QueuedWrite]
    ) -> list[tuple[asyncio.Future[None], OSError | None]]:
        """Without AIO: one ``pwritev`` per run of writes that continue each other."""
        done: list[tuple[asyncio.Future[None], OSError | None]] = []
        i = 0
        while i < len(batch):
            fd, offset, data, _fut = batch[i]
            j, end, parts = i + 1, offset + len(data), [data]
            while (j < len(batch) and batch[j][0] == fd and batch[j][1] == end
                   and j - i < _IOV_MAX):
                parts.append(batch[j][2])
                end += len(batch[j][2])
                j += 1
            error: OSError | None = None
            try:
                self._writev_blocking(fd, offset, parts)
            except OSError as exc:
                error = exc
            done.extend((item[3], error) for item in batch[i:j])
            i = j
        return done

    def _writev_blocking(self, fd: int, offset: int, parts: list[Buffer]) -> None:
        total = sum(len(p) for p in parts)
        piece = self._piece
        if len(parts) == 1 or (piece and offset // piece != (offset + total - 1) // piece):
            for part in parts:  # cut at the piece boundaries, as the batch writer does
                self._write_blocking(fd, offset, part)
                offset += len(part)
            return
        n = os.pwritev(fd, parts, offset)
        if n < total:  # short: finish the rest plainly
            rest = memoryview(b"".join(bytes(p) for p in parts))[n:]
            self._write_blocking(fd, offset + n, rest)

    def _write_blocking(self, fd: int, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        piece = self._piece
        while view:
            step = min(len(view), piece - offset % piece) if piece else len(view)
            n = os.pwrite(fd, view[:step], offset)
            view, offset = view[n:], offset + n

    async def sync(self, name: str) -> None:
        fd = self._fd(name, create=False)
        if fd is not None and self.memory_backed:
            os.fdatasync(fd)  # a no-op on tmpfs: not worth a thread hop
            return
        if fd is not None:
            await self._run(lambda: os.fdatasync(fd), f"syncing {name}")

    async def allocate(self, name: str, size: int) -> None:
        fd = self._fd(name, create=True)
        assert fd is not None

        def grow() -> None:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
            dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

        await self._run(grow, f"creating {name}")

    async def discard(self, name: str, offset: int, length: int) -> None:
        fd = self._fd(name, create=False)
        if fd is not None and length > 0:
            await self._run(lambda: _punch_hole(fd, offset, length), f"discarding in {name}")

    async def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        fd = self._fd(name, create=False)
        if fd is None:
            return [(offset, length, False)]
        return await self._run(
            lambda: self._extents_blocking(fd, offset, length), f"mapping {name}"
        )

    @staticmethod
    def _extents_blocking(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = offset + length
        size = os.fstat(fd).st_size
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            if pos >= size:
                runs.append((pos, end - pos, False))
                break
            try:
                data = os.lseek(fd, pos, _SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            if data > pos:
                stop = min(data, end)
                runs.append((pos, stop - pos, False))
                pos = stop
                continue
            hole = os.lseek(fd, pos, _SEEK_HOLE)
            stop = min(hole, end)
            runs.append((pos, stop - pos, True))
            pos = stop
        return runs

    async def delete(self, name: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        with self._fd_lock:
            with contextlib.suppress(FileNotFoundError):
                self._path(name).unlink()
            self._absent.add(name)

    def exists(self, name: str) -> bool:
        if name in self._fds:
            return True
        if name in self._absent:
            return False
        return self._path(name).exists()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def bytes_used(self, name: str) -> int:
        try:
            return self._path(name).stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    async def close(self) -> None:
        with self._fd_lock:
            fds, self._fds = list(self._fds.values()), {}
        self._pool.shutdown(wait=True)
        for fd in fds:
            os.close(fd)
        if self._batch_writer is not None:
            self._batch_writer.close()
            self._batch_writer = None
