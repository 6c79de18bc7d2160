"""A small asyncio NBD client: fixed newstyle, GO, structured replies, base:allocation.

Used by the tests, the demo, the coordinator's workers and the benchmarks.  One client is one
connection (one session of the export).  Requests may be issued concurrently from several
tasks; each gets its own handle and replies are matched as they come, in any order.  Reads
and writes longer than the server's maximum block size are split.

    c = await NbdClient.connect(export="vol", unix_path="/pool/nbd.sock")
    await c.write(0, b"x" * 4096, fua=True)
    data = await c.read(0, 4096)
    await c.disconnect()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass, field
from types import TracebackType

from owm.common.errors import OwmError
from owm.nbd import constants as c

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_TAIL = struct.Struct(">IQ")
_CHUNK_TAIL = struct.Struct(">HHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_MAX_OPTION_REPLY = 1 << 20
_MAX_CHUNK = 64 << 20

_ERRNO_NAMES = {
    c.EPERM: "EPERM",
    c.EIO: "EIO",
    c.ENOMEM: "ENOMEM",
    c.EINVAL: "EINVAL",
    c.ENOSPC: "ENOSPC",
    c.EOVERFLOW: "EOVERFLOW",
    c.ENOTSUP: "ENOTSUP",
    c.ESHUTDOWN: "ESHUTDOWN",
}


class NbdError(OwmError):
    """A request or negotiation the server refused, or a broken connection.

    ``errno`` is the NBD error value (EIO when the connection broke); ``reply_type`` is the
    option error reply during negotiation, if that is what failed.
    """

    def __init__(self, message: str, errno: int = c.EIO, reply_type: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
        self.reply_type = reply_type


class ConnectionLost(NbdError):
    """The connection ended (closed, reset, or broken by a reply the client could not parse)
    before the request was answered: the server may or may not have carried it out."""


@dataclass(slots=True)
class _Pending:
    command: int
    offset: int
    length: int
    future: asyncio.Future[object]
    data: bytes | bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: tuple[int, str] | None = None
    covered: int = 0
    whole_hole: bool = False


class NbdClient:
    """One NBD connection in the transmission phase."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.export = export
        self.size = 0
        self.transmission_flags = 0
        self.description = ""
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = c.DEFAULT_MAX_BLOCK
        self.structured = False
        self.meta_context_id: int | None = None
        self._pending: dict[int, _Pending] = {}
        self._handles = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._broken: NbdError | None = None
        self._closed = False
        # Requests sent in one event-loop turn go out in one writelines call (one syscall
        # instead of one per request when many are in flight).
        self._out: list[bytes | bytearray | memoryview] = []
        self._flush_scheduled = False

    # ------------------------------------------------------------------------ properties

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & c.FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.transmission_flags & c.FLAG_CAN_MULTI_CONN)

    def can(self, flag: int) -> bool:
        """Whether the server set a transmission flag (``owm.nbd.constants.FLAG_*``)."""
        return bool(self.transmission_flags & flag)

    # ------------------------------------------------------------------------ connecting

    @staticmethod
    async def _open(
        unix_path: str | None, host: str | None, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if unix_path is not None:
            return await asyncio.open_unix_connection(unix_path)
        return await asyncio.open_connection(host or "127.0.0.1", port)

    @classmethod
    async def connect(
        cls,
        export: str = "",
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int = 10809,
        structured: bool = True,
        block_status: bool = True,
        timeout: float | None = 30.0,
    ) -> NbdClient:
        """Connect, negotiate and enter transmission on ``export``."""
        reader, writer = await asyncio.wait_for(cls._open(unix_path, host, port), timeout)
        client = cls(reader, writer, export)
        try:
            await asyncio.wait_for(client._handshake(structured, block_status), timeout)
        except BaseException:
            writer.close()
            raise
        client._reader_task = asyncio.get_running_loop().create_task(client._read_replies())
        return client

    @classmethod
    async def list_exports(
        cls,
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int = 10809,
        timeout: float | None = 30.0,
    ) -> list[tuple[str, str]]:
        """The (name, description) of every export the server lists."""
        reader, writer = await asyncio.wait_for(cls._open(unix_path, host, port), timeout)
        client = cls(reader, writer, "")
        try:
            return await asyncio.wait_for(client._list(), timeout)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @classmethod
    async def query(
        cls,
        export: str,
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int = 10809,
        timeout: float | None = 30.0,
    ) -> NbdClient:
        """What the server tells about ``export`` (NBD_OPT_INFO: size, flags, description, block
        sizes) without opening it; the connection is closed again, so the answer only carries
        those attributes."""
        reader, writer = await asyncio.wait_for(cls._open(unix_path, host, port), timeout)
        client = cls(reader, writer, export)
        try:
            async def ask() -> None:
                await client._greet()
                await client._describe(c.OPT_INFO)
                client._send_option(c.OPT_ABORT)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client._option_reply(c.OPT_ABORT), 1.0)

            await asyncio.wait_for(ask(), timeout)
        finally:
            client._closed = True
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return client

    async def _greet(self) -> None:
        magic, ihaveopt, flags = _GREETING.unpack(await self._reader.readexactly(_GREETING.size))
        if magic != c.NBDMAGIC or ihaveopt != c.IHAVEOPT:
            raise NbdError("The server does not speak newstyle NBD.")
        if not flags & c.FLAG_FIXED_NEWSTYLE:
            raise NbdError("The server does not support fixed newstyle negotiation.")
        client_flags = c.FLAG_C_FIXED_NEWSTYLE
        if flags & c.FLAG_NO_ZEROES:
            client_flags |= c.FLAG_C_NO_ZEROES
        self._no_zeroes = bool(client_flags & c.FLAG_C_NO_ZEROES)
        self._writer.write(_U32.pack(client_flags))

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._writer.write(_OPTION.pack(c.IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply_type, length = _OPTION_REPLY.unpack(
            await self._reader.readexactly(_OPTION_REPLY.size)
        )
        if magic != c.OPTION_REPLY_MAGIC or opt != option or length > _MAX_OPTION_REPLY:
            raise NbdError("The server sent a malformed option reply.")
        return reply_type, await self._reader.readexactly(length) if length else b""

    @staticmethod
    def _option_error(what: str, reply_type: int, payload: bytes) -> NbdError:
        message = payload.decode("utf-8", "replace") or f"reply type {reply_type:#x}"
        errno = c.EPERM if reply_type == c.REP_ERR_POLICY else c.EINVAL
        return NbdError(f"{what}: {message}", errno, reply_type)

    async def _list(self) -> list[tuple[str, str]]:
        await self._greet()
        self._send_option(c.OPT_LIST)
        exports = []
        while True:
            reply_type, payload = await self._option_reply(c.OPT_LIST)
            if reply_type == c.REP_ACK:
                break
            if reply_type & c.REP_ERR_BIT:
                raise self._option_error("The server refused to list exports", reply_type, payload)
            if reply_type == c.REP_SERVER and len(payload) >= 4:
                (n,) = _U32.unpack_from(payload)
                name = payload[4 : 4 + n].decode("utf-8", "replace")
                exports.append((name, payload[4 + n :].decode("utf-8", "replace")))
        self._send_option(c.OPT_ABORT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._option_reply(c.OPT_ABORT), 1.0)
        return exports

    async def _handshake(self, structured: bool, block_status: bool) -> None:
        await self._greet()
        name = self.export.encode("utf-8")
        if structured:
            self._send_option(c.OPT_STRUCTURED_REPLY)
            reply_type, _ = await self._option_reply(c.OPT_STRUCTURED_REPLY)
            self.structured = reply_type == c.REP_ACK
        if self.structured and block_status:
            query = c.BASE_ALLOCATION.encode()
            data = _U32.pack(len(name)) + name + _U32.pack(1) + _U32.pack(len(query)) + query
            self._send_option(c.OPT_SET_META_CONTEXT, data)
            while True:
                reply_type, payload = await self._option_reply(c.OPT_SET_META_CONTEXT)
                if reply_type == c.REP_META_CONTEXT and len(payload) >= 4:
                    if payload[4:] == query:
                        (self.meta_context_id,) = _U32.unpack_from(payload)
                elif reply_type == c.REP_ACK or reply_type & c.REP_ERR_BIT:
                    break
        await self._describe(c.OPT_GO)

    async def _describe(self, option: int) -> None:
        """Send GO or INFO for the export and take in what the server tells about it."""
        name = self.export.encode("utf-8")
        infos = (c.INFO_NAME, c.INFO_DESCRIPTION, c.INFO_BLOCK_SIZE)
        data = _U32.pack(len(name)) + name + _U16.pack(len(infos))
        data += b"".join(_U16.pack(i) for i in infos)
        self._send_option(option, data)
        got_export = False
        while True:
            reply_type, payload = await self._option_reply(option)
            if reply_type == c.REP_ACK:
                if not got_export:
                    raise NbdError("The server accepted GO without describing the export.")
                return
            if reply_type == c.REP_ERR_UNSUP and option == c.OPT_GO:
                await self._export_name_fallback(name)
                return
            if reply_type & c.REP_ERR_BIT:
                raise self._option_error(
                    f"The server refused export {self.export!r}", reply_type, payload
                )
            if reply_type != c.REP_INFO or len(payload) < 2:
                continue
            (info,) = _U16.unpack_from(payload)
            if info == c.INFO_EXPORT and len(payload) == 12:
                self.size, self.transmission_flags = struct.unpack_from(">QH", payload, 2)
                got_export = True
            elif info == c.INFO_DESCRIPTION:
                self.description = payload[2:].decode("utf-8", "replace")
            elif info == c.INFO_BLOCK_SIZE and len(payload) == 14:
                self.min_block, self.preferred_block, self.max_block = struct.unpack_from(
                    ">III", payload, 2
                )

    async def _export_name_fallback(self, name: bytes) -> None:
        self._send_option(c.OPT_EXPORT_NAME, name)
        try:
            raw = await self._reader.readexactly(10 if self._no_zeroes else 134)
        except asyncio.IncompleteReadError:
            raise NbdError(f"The server refused export {self.export!r}.") from None
        self.size, self.transmission_flags = struct.unpack_from(">QH", raw)

    # ------------------------------------------------------------------------ replies

    def _fail_all(self, error: NbdError) -> None:
        if self._broken is None:
            self._broken = error
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(error)

    async def _read_replies(self) -> None:
        reader = self._reader
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise
                    self._fail_all(ConnectionLost("The server closed the connection.", c.ESHUTDOWN))
                    return
                (magic,) = _U32.unpack(head)
                if magic == c.SIMPLE_REPLY_MAGIC:
                    error, handle = _SIMPLE_TAIL.unpack(await reader.readexactly(12))
                    p = self._pending.pop(handle, None)
                    if p is None:
                        raise NbdError(f"The server replied to unknown handle {handle}.")
                    if error:
                        self._finish(p, (error, ""))
                    elif p.command == c.CMD_READ:
                        p.data = await reader.readexactly(p.length) if p.length else b""
                        p.covered = p.length
                        self._finish(p, None)
                    else:
                        self._finish(p, None)
                elif magic == c.STRUCTURED_REPLY_MAGIC:
                    flags, rtype, handle, length = _CHUNK_TAIL.unpack(await reader.readexactly(16))
                    if length > _MAX_CHUNK:
                        raise NbdError(f"The server sent a reply chunk of {length} bytes.")
                    payload = await reader.readexactly(length) if length else b""
                    p = self._pending.get(handle)
                    if p is None:
                        raise NbdError(f"The server replied to unknown handle {handle}.")
                    self._chunk(p, rtype, payload)
                    if flags & c.REPLY_FLAG_DONE:
                        del self._pending[handle]
                        self._finish(p, p.error)
                else:
                    raise NbdError(f"The server sent a reply with bad magic {magic:#x}.")
        except NbdError as e:
            self._fail_all(e if isinstance(e, ConnectionLost) else ConnectionLost(str(e), e.errno))
            self._writer.close()
        except (OSError, asyncio.IncompleteReadError) as e:
            self._fail_all(ConnectionLost(f"The connection broke: {e}.", c.EIO))
            self._writer.close()

    def _chunk(self, p: _Pending, rtype: int, payload: bytes) -> None:
        if rtype == c.REPLY_TYPE_OFFSET_DATA or rtype == c.REPLY_TYPE_OFFSET_HOLE:
            if p.command != c.CMD_READ or len(payload) < (12 if rtype == 2 else 9):
                raise NbdError("The server sent a content chunk that does not fit the request.")
            (offset,) = _U64.unpack_from(payload)
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                n = len(payload) - 8
            else:
                (n,) = _U32.unpack_from(payload, 8)
            start = offset - p.offset
            if start < 0 or start + n > p.length or n == 0:
                raise NbdError("The server sent a content chunk outside the request.")
            p.covered += n
            if n == p.length and p.data is None:
                # The common case: one chunk covering the whole read.
                p.data = payload[8:] if rtype == c.REPLY_TYPE_OFFSET_DATA else None
                p.whole_hole = rtype == c.REPLY_TYPE_OFFSET_HOLE
                return
            if not isinstance(p.data, bytearray):
                # Chunks never overlap, so a fresh zeroed buffer already holds every hole.
                p.data = bytearray(p.length)
            if rtype == c.REPLY_TYPE_OFFSET_DATA:
                p.data[start : start + n] = memoryview(payload)[8:]
        elif rtype == c.REPLY_TYPE_BLOCK_STATUS:
            if len(payload) < 12 or (len(payload) - 4) % 8:
                raise NbdError("The server sent a malformed block status chunk.")
            (context,) = _U32.unpack_from(payload)
            if context == self.meta_context_id:
                values = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
                p.extents.extend(zip(values[0::2], values[1::2], strict=True))
        elif rtype == c.REPLY_TYPE_NONE:
            pass
        elif rtype & c.REPLY_TYPE_ERROR_BIT:
            if len(payload) >= 6:
                error, mlen = struct.unpack_from(">IH", payload)
                message = payload[6 : 6 + mlen].decode("utf-8", "replace")
            else:
                error, message = c.EIO, ""
            if p.error is None:
                p.error = (error or c.EIO, message)
        else:
            raise NbdError(f"The server sent an unknown reply chunk type {rtype}.")

    def _finish(self, p: _Pending, error: tuple[int, str] | None) -> None:
        if p.future.done():
            return
        if error is not None:
            errno, message = error
            name = _ERRNO_NAMES.get(errno, str(errno))
            what = c.COMMAND_NAMES.get(p.command, str(p.command))
            text = f"{what} failed with {name}" + (f": {message}" if message else ".")
            p.future.set_exception(NbdError(text, errno))
        elif p.command == c.CMD_READ:
            if p.covered != p.length:
                p.future.set_exception(NbdError("The server sent too little data for a READ."))
            elif p.whole_hole:
                p.future.set_result(bytes(p.length))
            elif isinstance(p.data, bytearray):
                p.future.set_result(bytes(p.data))
            else:
                p.future.set_result(p.data if p.data is not None else b"")
        elif p.command == c.CMD_BLOCK_STATUS:
            p.future.set_result(p.extents)
        else:
            p.future.set_result(None)

    # ------------------------------------------------------------------------ requests

    def _check_open(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise NbdError("The client is disconnected.", c.ESHUTDOWN)

    async def _request(
        self, command: int, offset: int, length: int, flags: int = 0, payload: object = None
    ) -> object:
        self._check_open()
        handle = next(self._handles)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[handle] = _Pending(command, offset, length, future)
        header = _REQUEST.pack(c.REQUEST_MAGIC, flags, command, handle, offset, length)
        try:
            if payload is None:
                self._queue(header)
            else:
                assert isinstance(payload, bytes | bytearray | memoryview)
                if length <= 65536:
                    self._queue(header + bytes(payload))
                else:
                    self._queue(header, payload)
                    self._flush_out()
                    await self._writer.drain()
        except (OSError, RuntimeError) as e:
            # The transport is gone (reset, or closed under us): the request never left.
            self._pending.pop(handle, None)
            if not future.done():
                future.cancel()
            raise ConnectionLost(f"The connection broke: {e}.", c.EIO) from None
        return await future

    def _queue(self, *data: bytes | bytearray | memoryview) -> None:
        self._out.extend(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if not out or self._writer.transport.is_closing():
            return  # a closed connection: the reader fails what is pending
        try:
            if len(out) == 1:
                self._writer.write(out[0])
            else:
                self._writer.writelines(out)
        except (OSError, RuntimeError):
            pass  # the reader sees the broken connection and fails what is pending

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``."""
        if length <= self.max_block:
            result = await self._request(c.CMD_READ, offset, length)
            assert isinstance(result, bytes)
            return result
        parts = await asyncio.gather(
            *(
                self.read(offset + o, min(self.max_block, length - o))
                for o in range(0, length, self.max_block)
            )
        )
        return b"".join(parts)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset``; with ``fua`` the reply waits until it is durable."""
        flags = c.CMD_FLAG_FUA if fua else 0
        n = len(data)
        if n <= self.max_block:
            await self._request(c.CMD_WRITE, offset, n, flags, data)
            return
        view = memoryview(data)
        await asyncio.gather(
            *(
                self._request(
                    c.CMD_WRITE,
                    offset + o,
                    min(self.max_block, n - o),
                    flags,
                    view[o : o + self.max_block],
                )
                for o in range(0, n, self.max_block)
            )
        )

    async def flush(self) -> None:
        """Make every write acknowledged so far durable."""
        await self._request(c.CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Tell the server the range is no longer needed (its contents become undefined)."""
        await self._request(c.CMD_TRIM, offset, length, c.CMD_FLAG_FUA if fua else 0)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        no_hole: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Zero the range; ``no_hole`` keeps it allocated, ``fast`` fails (ENOTSUP) if slow."""
        flags = (c.CMD_FLAG_NO_HOLE if no_hole else 0) | (c.CMD_FLAG_FAST_ZERO if fast else 0)
        flags |= c.CMD_FLAG_FUA if fua else 0
        await self._request(c.CMD_WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch the range."""
        await self._request(c.CMD_CACHE, offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation of the range as (length, flags) runs covering exactly the range."""
        if self.meta_context_id is None:
            raise NbdError("The server did not agree to base:allocation.", c.EINVAL)
        out: list[tuple[int, int]] = []
        done = 0
        while done < length:
            want = min(length - done, 0xFFFFFFFF)
            result = await self._request(c.CMD_BLOCK_STATUS, offset + done, want)
            assert isinstance(result, list)
            got = 0
            for ext_len, flags in result:
                ext_len = min(ext_len, length - done - got)
                if ext_len <= 0:
                    break
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + ext_len, flags)
                else:
                    out.append((ext_len, flags))
                got += ext_len
            if got == 0:
                raise NbdError("The server answered BLOCK_STATUS with no extents.")
            done += got
        return out

    async def raw_request(
        self, command: int, offset: int, length: int, flags: int = 0, payload: bytes | None = None
    ) -> object:
        """Send any request as is (tests use it for requests the typed methods would not make)."""
        return await self._request(command, offset, length, flags, payload)

    # ------------------------------------------------------------------------ ending

    async def disconnect(self, timeout: float = 30.0) -> None:
        """Wait for the requests in flight, send DISC, and wait until the server closes."""
        if self._closed:
            return
        pending = [p.future for p in self._pending.values()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._closed = True
        self._flush_out()
        if self._broken is None:
            with contextlib.suppress(OSError):
                self._writer.write(_REQUEST.pack(c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0))
            if self._reader_task is not None:
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(self._reader_task), timeout)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()

    def abort(self) -> None:
        """Drop the connection without DISC (the server sees an unclean end of the session)."""
        self._closed = True
        transport = self._writer.transport
        transport.abort()
        self._fail_all(ConnectionLost("The client aborted the connection.", c.ESHUTDOWN))
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.disconnect()
        else:
            self.abort()
