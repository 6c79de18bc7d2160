"""A blocking NBD reader for bulk image data, one connection per backup worker thread.

The asyncio client (owm.nbd.client) is what a backup uses to ask about the image (block
status).  Moving gigabytes through it costs several Python-level copies per byte on the
event loop's thread, which on a small machine competes with the daemon for the CPU.  This
reader does one thing: READ requests with simple replies, received with ``recv_into`` straight
into the buffer the backup writes from, in the worker thread that then hashes, compresses or
writes it.  Everything but a few lines per MiB runs without the GIL, so reading and writing
overlap across threads the way nbdcopy's do.

Only what a reader needs is negotiated: fixed newstyle, NO_ZEROES when offered, OPT_GO on the
export (no structured replies, so every reply is a 16-byte header and the data).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from owm.nbd import constants as c
from owm.nbd.client import NbdError

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_MAX_OPTION_REPLY = 1 << 20
PIECE = 256 << 10


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise NbdError("The server closed the connection.", c.ESHUTDOWN)
        view = view[n:]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exactly(sock, memoryview(buf))
    return bytes(buf)


class BulkReader:
    """One blocking NBD connection that reads ranges into caller-provided buffers."""

    def __init__(self, export: str, *, unix_path: str | None = None, host: str | None = None,
                 port: int = 10809, timeout: float = 60.0) -> None:
        if unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = unix_path
        else:
            self.sock = socket.create_connection((host or "127.0.0.1", port), timeout=timeout)
            address = ""
        try:
            self.sock.settimeout(timeout)
            if address:
                self.sock.connect(address)
            self.size, self.flags = self._handshake(export)
        except BaseException:
            self.sock.close()
            raise
        self._handles = 0

    def _handshake(self, export: str) -> tuple[int, int]:
        sock = self.sock
        magic, ihaveopt, flags = _GREETING.unpack(_recv(sock, _GREETING.size))
        if magic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT or not flags & c.FLAG_FIXED_NEWSTYLE:
            raise NbdError("The server does not speak fixed newstyle NBD.")
        client_flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES
                                                  if flags & c.FLAG_NO_ZEROES else 0)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">I", client_flags) + _OPTION.pack(c.IHAVEOPT, c.OPT_GO,
                                                                   len(data)) + data)
        size = tflags = -1
        while True:
            magic, option, reply, length = _OPTION_REPLY.unpack(_recv(sock, _OPTION_REPLY.size))
            if magic != c.OPTION_REPLY_MAGIC or option != c.OPT_GO or length > _MAX_OPTION_REPLY:
                raise NbdError("The server sent a malformed option reply.")
            payload = _recv(sock, length) if length else b""
            if reply == c.REP_ACK:
                break
            if reply & c.REP_ERR_BIT:
                said = payload.decode("utf-8", "replace") or f"reply type {reply:#x}"
                raise NbdError(f"The server refused export {export!r}: {said}", c.EINVAL, reply)
            if reply == c.REP_INFO and len(payload) == 12 and payload[:2] == b"\0\0":
                size, tflags = struct.unpack_from(">QH", payload, 2)
        if size < 0:
            raise NbdError("The server accepted GO without describing the export.")
        return size, tflags

    def read_into(self, ranges: list[tuple[int, memoryview]], piece: int = PIECE) -> None:
        """Fill each view with the export's bytes from its offset.

        Every range goes out as READs of at most ``piece`` bytes, all sent before the first
        reply is read (the server works on them together and answers in any order).
        Requests of a few hundred KiB are cheaper for the server than MiB-sized ones: its
        buffers stay in cache and need no fresh pages.
        """
        parts: dict[int, memoryview] = {}
        requests = []
        for offset, view in ranges:
            for start in range(0, len(view), piece):
                self._handles += 1
                part = view[start:start + piece]
                parts[self._handles] = part
                requests.append(_REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_READ, self._handles,
                                              offset + start, len(part)))
        self.sock.sendall(b"".join(requests))
        failed: NbdError | None = None
        while parts:
            magic, error, handle = _REPLY.unpack(_recv(self.sock, _REPLY.size))
            found = parts.pop(handle, None)
            if magic != c.SIMPLE_REPLY_MAGIC or found is None:
                raise NbdError("The server sent a reply that matches no READ.")
            if error:
                failed = failed or NbdError(f"A READ of the image failed with error {error}.",
                                            error)
                continue
            _recv_exactly(self.sock, found)
        if failed is not None:
            raise failed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(_REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0))
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(5)
            while self.sock.recv(4096):
                pass
        self.sock.close()


class ReaderPool:
    """One BulkReader per worker thread, opened on first use and all closed together."""

    def __init__(self, export: str, *, unix_path: str | None, host: str | None,
                 port: int) -> None:
        self._args = (export, unix_path, host, port)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[BulkReader] = []

    def reader(self) -> BulkReader:
        found: BulkReader | None = getattr(self._local, "reader", None)
        if found is None:
            export, unix_path, host, port = self._args
            found = BulkReader(export, unix_path=unix_path, host=host, port=port)
            self._local.reader = found
            with self._lock:
                self._all.append(found)
        return found

    def read(self, ranges: list[tuple[int, int]]) -> bytearray:
        """The bytes of every (offset, length), one after the other, in this thread's buffer,
        which stays valid until the thread's next read.

        Reusing the buffer spares the page faults of a fresh multi-MiB allocation each time.
        """
        total = sum(length for _, length in ranges)
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) != total:
            buf = self._local.buf = bytearray(total)
        view = memoryview(buf)
        targets = []
        at = 0
        for offset, length in ranges:
            targets.append((offset, view[at:at + length]))
            at += length
        self.reader().read_into(targets)
        return buf

    def close(self) -> None:
        with self._lock:
            readers, self._all = self._all, []
        for reader in readers:
            reader.close()
