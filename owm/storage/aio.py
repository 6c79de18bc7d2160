"""Many buffered writes in one system call: Linux AIO used as a vectored ``pwrite``.

Linux AIO performs a write to a file opened *without* ``O_DIRECT`` synchronously, inside
``io_submit``, in the submitting thread, one request after the other in the order given.  That
makes it useless as asynchronous I/O on a page-cached file, and exactly right for the thread that
writes ``LocalStorage``'s queued small writes: one ``io_submit`` of a batch is all its writes in
one system call, during which the thread releases the GIL once.  Written with one ``os.pwrite``
each, every write released and took back the GIL, and with the event loop busy in Python each of
those was a futex round trip between the two threads (about a context switch per write, the
largest part of owm's CPU per 4 KiB write on ext4).

Each request has its own result: one that fails (``ENOSPC``, ``EIO``, a bad descriptor) fails
alone.  A request the kernel will not take through AIO (a file type without ``write_iter``, such
as a character device) is written with a plain ``pwrite`` instead.

Only for descriptors opened without ``O_DIRECT``: with it the kernel would run the requests of
one submission concurrently and the order of overlapping ones would be lost.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from owm.storage import Buffer

# (io_setup, io_destroy, io_getevents, io_submit) by machine; elsewhere AIO is not used.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PWRITE = 1
_IOCB = struct.Struct("<QIIHhIQQqQII")  # struct iocb, 64 bytes (little-endian layout)
_EVENT = struct.Struct("<QQqq")  # struct io_event: data, obj, res, res2
_PYBUF_SIMPLE = 0
_PTR = ctypes.sizeof(ctypes.c_void_p)
# Writes are cut at every multiple of this.  The kernel sizes a new page-cache folio after the
# write that creates it, and ext4 (6.x, large folios, buffer heads) walks every block of a folio
# on each later write into it: a 4 KiB overwrite cost 21 us of kernel CPU in a file written
# 1 MiB at a time, 3.6 us in one written 64 KiB at a time, and a 1 MiB write costs about the
# same either way (bench/disk_io_bench.py --folios).
PIECE = 64 * 1024


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: a pinned view of an object's memory."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.c_void_p]
_release_buffer.restype = None

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall  # a CDLL call: the GIL is released for its duration
_syscall.restype = ctypes.c_long


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class BatchWriter:
    """An AIO context of ``depth`` slots, for one thread at a time."""

    def __init__(self, depth: int = 64) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, "Linux AIO is not wired up for this machine")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self.depth = depth
        ctx = ctypes.c_ulong(0)
        if _syscall(ctypes.c_long(self._setup), ctypes.c_long(depth), ctypes.byref(ctx)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._ctx: int | None = ctx.value
        self._iocbs = ctypes.create_string_buffer(_IOCB.size * depth)
        base = ctypes.addressof(self._iocbs)
        self._ptrs = (ctypes.c_void_p * depth)(*(base + i * _IOCB.size for i in range(depth)))
        self._ptr_base = ctypes.addressof(self._ptrs)
        self._events = ctypes.create_string_buffer(_EVENT.size * depth)
        self._views = (_PyBuffer * depth)()
        self._view_base = ctypes.addressof(self._views)

    def write_many(self, requests: list[tuple[int, int, Buffer]]) -> list[OSError | None]:
        """Write every ``(fd, offset, data)``, in order; each one's error, or None.

        A request is cut at every multiple of ``PIECE`` (see there); the pieces of one request
        share its result (its first error).
        """
        results: list[OSError | None] = [None] * len(requests)
        pieces: list[tuple[int, int, int, Buffer]] = []  # (request, fd, offset, data)
        for k, (fd, offset, data) in enumerate(requests):
            length = len(data)
            if offset % PIECE + length <= PIECE:
                pieces.append((k, fd, offset, data))
                continue
            view = memoryview(data)
            pos, end = offset, offset + length
            while pos < end:
                stop = min(end, (pos // PIECE + 1) * PIECE)
                pieces.append((k, fd, pos, view[pos - offset : stop - offset]))
                pos = stop
        for start in range(0, len(pieces), self.depth):
            self._write_part(pieces[start : start + self.depth], results)
        return results

    def _write_part(self, pieces: list[tuple[int, int, int, Buffer]],
                    results: list[OSError | None]) -> None:
        if self._ctx is None:
            raise OSError(errno.EBADF, "the AIO context is closed")
        size, view_size = _IOCB.size, ctypes.sizeof(_PyBuffer)
        views, view_base = self._views, self._view_base
        pinned = 0
        try:
            for i, (_k, fd, offset, data) in enumerate(pieces):
                view_addr = view_base + i * view_size
                try:
                    _get_buffer(data, view_addr, _PYBUF_SIMPLE)
                except BufferError:  # not contiguous: copy it
                    _get_buffer(bytes(data), view_addr, _PYBUF_SIMPLE)
                pinned += 1
                view = views[i]
                _IOCB.pack_into(self._iocbs, i * size, i, 0, 0, _IOCB_CMD_PWRITE, 0, fd,
                                view.buf or 0, view.len, offset, 0, 0, 0)
            self._submit_and_reap(pieces, results)
        finally:
            for i in range(pinned):
                _release_buffer(view_base + i * view_size)

    def _submit_and_reap(self, pieces: list[tuple[int, int, int, Buffer]],
                         results: list[OSError | None]) -> None:
        n = len(pieces)
        done = 0  # pieces [0, done) are submitted or written
        in_flight = 0
        while done < n:
            got = _syscall(ctypes.c_long(self._submit), ctypes.c_ulong(self._ctx or 0),
                           ctypes.c_long(n - done), ctypes.c_void_p(self._ptr_base + done * _PTR))
            if got >= 0:
                done += got
                in_flight += got
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            # The kernel refused piece ``done`` as a whole (EINVAL: its file has no AIO write;
            # EBADF; EAGAIN).  The ones before it are in flight: reap them first, so that a
            # plain write of this one still comes after them.
            self._reap(pieces, in_flight, results)
            in_flight = 0
            k, fd, offset, data = pieces[done]
            try:
                _pwrite_all(fd, data, offset)
            except OSError as exc:
                results[k] = results[k] or exc
            done += 1
        self._reap(pieces, in_flight, results)

    def _reap(self, pieces: list[tuple[int, int, int, Buffer]], count: int,
              results: list[OSError | None]) -> None:
        while count > 0:
            got = _syscall(ctypes.c_long(self._getevents), ctypes.c_ulong(self._ctx or 0),
                           ctypes.c_long(count), ctypes.c_long(count), self._events, None)
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, os.strerror(err))
            for e in range(got):
                index, _obj, res, _res2 = _EVENT.unpack_from(self._events, e * _EVENT.size)
                k, fd, offset, data = pieces[index]
                if res < 0:
                    results[k] = results[k] or OSError(-res, os.strerror(-res))
                elif res < len(data):  # short: the rest plainly, whose error is this one's
                    try:
                        _pwrite_all(fd, memoryview(data)[res:], offset + res)
                    except OSError as exc:
                        results[k] = results[k] or exc
            count -= got

    def close(self) -> None:
        if self._ctx is not None:
            _syscall(ctypes.c_long(self._destroy), ctypes.c_ulong(self._ctx))
            self._ctx = None


def open_batch_writer(depth: int = 64) -> BatchWriter | None:
    """A batch writer, or None where Linux AIO cannot be had (then write one by one)."""
    try:
        return BatchWriter(depth)
    except OSError:
        return None
