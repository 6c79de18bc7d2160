"""The server side of the NBD protocol as a pure state machine: no sockets, no asyncio.

Bytes from the client go in through :meth:`ServerConnection.receive_data`; parsed events come
out of :meth:`ServerConnection.next_event`; everything the server sends is built by a method
that returns bytes, which the caller writes to the client in the order it gets them (the way
h11 does HTTP).  The caller owns I/O, concurrency and the storage; this module owns the wire
format, the negotiation state and the validation rules of the protocol document.

Phases and their events:

* handshake: :meth:`~ServerConnection.initiate` gives the greeting; the client's flags are
  checked internally.
* option haggling: one event per option.  Options the machine can answer on its own (e.g.
  STRUCTURED_REPLY, unknown ones, malformed ones, anything refused for want of TLS) come out as
  :class:`OptionHandled` with the reply already built.  STARTTLS, when the machine's TLS mode
  offers it, is :class:`StartTLS`: the caller sends its acknowledgement, calls
  :meth:`~ServerConnection.tls_started` and upgrades the transport; the negotiation then goes
  on over TLS.
  The others (:class:`ListExports`, :class:`ExportInfoRequest`, :class:`ExportNameRequest`,
  :class:`MetaContextRequest`) need facts only the caller has; the machine then returns
  :data:`PAUSED` until the caller answers with the matching ``reply_*`` method.  A successful
  GO or EXPORT_NAME reply enters the transmission phase.
* transmission: each request is a :class:`Request` (valid, ready to execute) or a
  :class:`RequestRejected` (invalid; the error reply is already built).  A DISC is
  :class:`Disconnect`.  Replies are built with :meth:`reply_ok`, :meth:`reply_read`,
  :meth:`reply_error` and :meth:`reply_block_status`; they may be sent in any order.

A client that breaks the protocol in a way that cannot be answered (bad magic, bad client
flags, absurd lengths) makes :meth:`next_event` raise :class:`ProtocolError`; the caller then
drops the connection.  No other exception escapes the machine.  The machine never keeps more
than one message's worth of data: a request payload up to the advertised maximum block size,
an option up to ``MAX_OPTION_DATA``; longer WRITE payloads (up to ``MAX_WRITE_DRAIN``) and
options are read and discarded so the stream stays in step.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import struct
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from owm.common.errors import OwmError
from owm.common.view import ExportInfo
from owm.nbd import constants as c

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header followed by a 64-bit offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")
_CHUNK_ERROR = struct.Struct(">IHHQIIH")
_EXTENT = struct.Struct(">II")

REQUEST_SIZE = _REQUEST.size
_ZEROES_124 = bytes(124)
_META_CONTEXT_ID = 1  # the id base:allocation gets when a client selects it
_MAX_EXTENTS = 65536  # descriptors in one BLOCK_STATUS reply; the client asks again for the rest
_HOLE_MIN = 4096  # reads at least this long that are all zero go out as one OFFSET_HOLE chunk
# WRITE payloads still missing at least this much are collected in an anonymous mapping, whose
# pages the kernel provides only as bytes are written into them: a WRITE header whose payload
# never comes costs no memory, and a slow one costs what has arrived.
_LAZY_BODY = 64 * 1024
# ... unless the whole payload is at most this: mapping and unmapping a fresh buffer per
# request (page faults on receive, a TLB shootdown at unmap) cost a 1M write more than all
# the rest of its path, and a stalled header of this size costs little.
_EAGER_BODY = 1 << 20

_ALLOWED_FLAGS = {
    c.CMD_READ: c.CMD_FLAG_FUA | c.CMD_FLAG_DF,
    c.CMD_WRITE: c.CMD_FLAG_FUA,
    c.CMD_FLUSH: c.CMD_FLAG_FUA,
    c.CMD_TRIM: c.CMD_FLAG_FUA,
    c.CMD_CACHE: c.CMD_FLAG_FUA,
    c.CMD_WRITE_ZEROES: c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.CMD_BLOCK_STATUS: c.CMD_FLAG_FUA | c.CMD_FLAG_REQ_ONE,
}


class ProtocolError(OwmError):
    """The client broke the protocol in a way that cannot be answered: drop the connection."""

    errno = c.EINVAL


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # give the machine more bytes
PAUSED = _Sentinel("PAUSED")  # answer the pending option first


# TLS modes of the protocol document: NOTLS, SELECTIVETLS with every export optional, FORCEDTLS.
TLS_OFF = "off"
TLS_ON = "on"
TLS_REQUIRE = "require"
TLS_MODES = (TLS_OFF, TLS_ON, TLS_REQUIRE)

# Before TLS, FORCEDTLS answers every option but these with NBD_REP_ERR_TLS_REQD.
_ALLOWED_BEFORE_TLS = frozenset({c.OPT_STARTTLS, c.OPT_ABORT})


class State(enum.Enum):
    """Where the machine is in the conversation."""

    CLIENT_FLAGS = "client-flags"  # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = "options"  # waiting for the next option
    AWAIT_REPLY = "await-reply"  # an option is waiting for the caller's answer
    STARTING_TLS = "starting-tls"  # STARTTLS acknowledged; the caller is upgrading the transport
    TRANSMISSION = "transmission"
    CLOSED = "closed"  # ABORT, DISC or a refused EXPORT_NAME: nothing more is read
    FAILED = "failed"  # a ProtocolError was raised


@dataclass(slots=True)
class ListExports:
    """NBD_OPT_LIST: answer with :meth:`ServerConnection.reply_list`."""


@dataclass(slots=True)
class ExportInfoRequest:
    """NBD_OPT_INFO (``go`` False) or NBD_OPT_GO (``go`` True) for one export.

    Answer with :meth:`ServerConnection.reply_info` (a successful GO enters transmission) or
    :meth:`ServerConnection.reply_option_error`.
    """

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(slots=True)
class ExportNameRequest:
    """NBD_OPT_EXPORT_NAME: answer with :meth:`~ServerConnection.reply_export_name`, or
    :meth:`~ServerConnection.refuse_export_name` and close (this option cannot fail politely)."""

    name: str


@dataclass(slots=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT (``select`` False) or NBD_OPT_SET_META_CONTEXT (True).

    Answer with :meth:`ServerConnection.reply_meta_context`, saying whether the export exists.
    """

    export_name: str
    queries: tuple[str, ...]
    select: bool


@dataclass(slots=True)
class OptionHandled:
    """An option the machine answered itself; send ``data`` to the client."""

    option: int
    reply_type: int
    message: str
    data: bytes


@dataclass(slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS accepted: send ``data`` (the acknowledgement) in plain text, stop
    reading, call :meth:`ServerConnection.tls_started` as the transport is handed to TLS, and
    drop the connection if the handshake fails (after the acknowledgement there is no going
    back)."""

    data: bytes


@dataclass(slots=True)
class AbortRequest:
    """NBD_OPT_ABORT: send ``data`` (the acknowledgement), then close the connection."""

    data: bytes


@dataclass(slots=True)
class Request:
    """A valid transmission request, ready to execute.

    ``payload`` is the WRITE data (a read-only view into received bytes, or a buffer the
    machine filled: a pooled ``bytes``, a small bytearray); it is None for other commands.
    """

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    payload: memoryview | bytes | bytearray | None


@dataclass(slots=True)
class RequestRejected:
    """A request that fails validation; send ``data`` (its error reply) to the client."""

    handle: int
    command: int
    error: int
    message: str
    data: bytes


@dataclass(slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish the requests in flight, then close the connection."""


@dataclass(slots=True)
class ConnectionClosed:
    """The client closed its side (``receive_data(b"")``); ``partial`` bytes of an unfinished
    message were thrown away."""

    partial: int


Event = (
    ListExports
    | ExportInfoRequest
    | ExportNameRequest
    | MetaContextRequest
    | OptionHandled
    | StartTLS
    | AbortRequest
    | Request
    | RequestRejected
    | Disconnect
    | ConnectionClosed
)


def _decode_string(raw: bytes) -> str | None:
    """A protocol string, or None if it is not valid: too long, not UTF-8, or containing NUL."""
    if len(raw) > c.MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _encode_message(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) > c.MAX_STRING:
        raw = raw[: c.MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return _OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


_zero_cache: dict[int, bytes] = {}


def _zeroes(n: int) -> bytes:
    z = _zero_cache.get(n)
    if z is None:
        z = bytes(n)
        if n <= 1 << 20 and len(_zero_cache) < 32:
            _zero_cache[n] = z
    return z


def _lazy_buffer(n: int) -> bytearray | mmap.mmap:
    """``n`` writable bytes whose memory is provided as they are written (an anonymous
    mapping), or an ordinary bytearray if no mapping can be had."""
    try:
        return mmap.mmap(-1, n)
    except OSError:
        return bytearray(n)


def _free_refs() -> int:
    """What ``sys.getrefcount`` says, inside :meth:`PayloadBuffers._free`'s loop, of a buffer
    that only the pool refers to (measured with the same code shape, so that it holds whatever
    the interpreter counts)."""
    pool = [bytearray(1)]
    for buf in pool:
        return sys.getrefcount(buf)
    raise AssertionError("unreachable")


_FREE_REFS = _free_refs()
_POOLED_MIN = 64 * 1024  # smaller payload buffers are made afresh


def _filled_in_place(n: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``n`` (> 1) bytes and a writable view of its own storage.

    A payload collected over several receives is handed on as a ``bytes`` object, so that a
    storage binding that takes nothing else (python-rados's writes) needs no copy of it: a
    1 MiB copy cost a RADOS write more than the rest of owm's Python path for it. The object
    is written only through this view, only by the machine collecting a body into it, and only
    while nothing else refers to it (see :class:`PayloadBuffers`); it is never hashed.
    """
    data = bytes(n)  # a fresh object: only b"" and one-byte bytes are shared constants
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    return data, memoryview((ctypes.c_ubyte * n).from_address(address or 0)).cast("B")


class PayloadBuffers:
    """WRITE payload buffers that are used again once nothing refers to them.

    A payload collected over several receives needs a buffer of its own; a fresh 1 MiB buffer
    per request costs a zero fill, and (from glibc's mmap'd allocations) page faults and an
    munmap.  The pool keeps up to ``limit`` bytes of the buffers it hands out and gives one out
    again only when the pool alone refers to it: a payload still held by anyone (a write-back
    cache, a lock waiter, a storage call in a thread, the request itself, a memoryview of it)
    is never overwritten.  Pooled buffers are ``bytes`` objects filled in place (see
    :func:`_filled_in_place`): the pool keeps each one's writable view beside it, and whoever
    fills one holds the object itself while it does, so the view never outlives its memory.
    Not thread-safe: one pool per event loop.
    """

    def __init__(self, limit: int = 32 << 20) -> None:
        self.limit = limit
        self._buffers: list[bytes] = []
        self._views: dict[int, memoryview] = {}  # id of a pooled buffer -> its writable view
        self._bytes = 0
        self.reused = 0  # counters, for tests and metrics
        self.allocated = 0

    def _free(self, n: int) -> bytes | None:
        """A pooled buffer nobody else refers to, of ``n`` bytes (any size with ``n`` < 0)."""
        for buf in self._buffers:
            if sys.getrefcount(buf) <= _FREE_REFS and (n < 0 or len(buf) == n):
                return buf
        return None

    def get(self, n: int) -> tuple[bytes | bytearray, memoryview | bytearray]:
        """A buffer of ``n`` bytes that nothing else refers to (its content is stale), and
        where to write it: the payload to hand on, and its writable view (the same bytearray,
        for a small one). Hold the payload for as long as the view is used."""
        if n < _POOLED_MIN:
            small = bytearray(n)  # small: cheap to make, and not worth a slot
            return small, small
        buf = self._free(n)
        if buf is not None:
            self.reused += 1
            return buf, self._views[id(buf)]
        self.allocated += 1
        buf, view = _filled_in_place(n)
        if n > self.limit:
            return buf, view
        while self._bytes + n > self.limit:
            old = self._free(-1)
            if old is None:
                return buf, view  # all held: this one is not kept
            self._buffers.remove(old)
            del self._views[id(old)]
            self._bytes -= len(old)
        self._buffers.append(buf)
        self._views[id(buf)] = view
        self._bytes += n
        return buf, view


class ServerConnection:
    """The protocol state of one client connection, server side."""

    def __init__(self, tls: str = TLS_OFF, buffers: PayloadBuffers | None = None) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {tls!r}")
        self.tls_mode = tls
        self.tls_active = False  # the transport was upgraded (STARTTLS, then tls_started)
        self.state = State.CLIENT_FLAGS
        self.client_flags = 0
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None  # set when transmission starts
        self.transmission_flags = 0
        self.meta_context_id = 0  # nonzero once base:allocation is active for the export
        self._meta_export: str | None = None
        self._meta_selected = False
        self._pending: (
            ListExports | ExportInfoRequest | ExportNameRequest | MetaContextRequest | None
        ) = None
        self._pending_option = 0
        # Receive buffer: the received bytes objects not parsed yet, in order, a read position
        # in the first, and the count of unread bytes.  Each byte is appended once and parsed
        # once, so receiving costs O(bytes) however much is queued unparsed.
        self._chunks: deque[bytes] = deque()
        self._pos = 0
        self._avail = 0
        self._eof = False
        self._eof_reported = False
        # A message body being collected: an option's data or a WRITE payload.
        self._body: bytearray | mmap.mmap | memoryview | None = None
        self._body_filled = 0
        self._payload: bytes | bytearray | None = None  # what a pooled ``_body`` fills
        self._body_kind = 0  # 0 none, 1 option data, 2 write payload
        # WRITE payload buffers (shared by the connections of one server, on one loop).
        self._buffers = buffers if buffers is not None else PayloadBuffers(4 << 20)
        self._option = 0
        self._header: tuple[int, int, int, int, int] | None = None  # (handle, cmd, flags, off, len)
        # Bytes to skip (an oversize WRITE or option) and what to emit afterwards.
        self._drain = 0
        self._after_drain: RequestRejected | OptionHandled | None = None
        # Limits taken from the export once transmission starts.
        self._size = 0
        self._read_only = True
        self._min_block = 1
        self._max_block = c.DEFAULT_MAX_BLOCK

    # ----------------------------------------------------------------------------- input

    def initiate(self) -> bytes:
        """The server greeting, sent as soon as the client connects."""
        return _GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self.state in (State.CLOSED, State.FAILED):
            return  # nothing after ABORT/DISC is read, per the protocol
        if type(data) is not bytes:
            data = bytes(data)
        if self._drain:
            n = min(self._drain, len(data))
            self._drain -= n
            if n == len(data):
                return
            data = data[n:]
        if self._body is not None:
            need = len(self._body) - self._body_filled
            n = min(need, len(data))
            piece = data if n == len(data) else memoryview(data)[:n]
            self._body[self._body_filled : self._body_filled + n] = piece
            self._body_filled += n
            if n == len(data):
                return
            data = data[n:]
        if not self._avail:
            self._chunks.clear()
            self._pos = 0
        self._chunks.append(data)
        self._avail += len(data)

    # The receive buffer: the parsers read it only through these.

    def _unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        """Parse (and consume) the next ``fmt.size`` (<= available) bytes."""
        n = fmt.size
        first = self._chunks[0]
        pos = self._pos
        if len(first) - pos >= n:
            self._consume(n)
            return fmt.unpack_from(first, pos)
        # A header split over receives: join its bytes (only its own).
        return fmt.unpack_from(self._take_bytes(n))

    def _consume(self, n: int) -> None:
        """Drop the next ``n`` (<= available) bytes."""
        self._avail -= n
        chunks = self._chunks
        pos = self._pos + n
        while pos and chunks and pos >= len(chunks[0]):
            pos -= len(chunks.popleft())
        self._pos = pos

    def _take_bytes(self, n: int) -> bytes:
        """The next ``n`` (<= available) bytes, as a new object."""
        out = bytearray()
        chunks = self._chunks
        pos = self._pos
        self._avail -= n
        while n:
            first = chunks[0]
            piece = min(n, len(first) - pos)
            out += memoryview(first)[pos : pos + piece]
            n -= piece
            pos += piece
            if pos == len(first):
                chunks.popleft()
                pos = 0
        self._pos = pos
        return bytes(out)

    def _take_into(self, out: bytearray | mmap.mmap | memoryview, n: int) -> None:
        """Copy the next ``n`` (<= available, <= ``len(out)``) bytes to the start of ``out``."""
        chunks = self._chunks
        pos = self._pos
        self._avail -= n
        done = 0
        while done < n:
            first = chunks[0]
            piece = min(n - done, len(first) - pos)
            out[done : done + piece] = memoryview(first)[pos : pos + piece]
            done += piece
            pos += piece
            if pos == len(first):
                chunks.popleft()
                pos = 0
        self._pos = pos

    def _take_view(self, n: int) -> memoryview:
        """The next ``n`` (<= available) bytes: a view into what was received when they lie in
        one piece (no copy), else a copy."""
        if not n:
            return memoryview(b"")
        first = self._chunks[0]
        pos = self._pos
        if len(first) - pos >= n:
            self._consume(n)
            return memoryview(first)[pos : pos + n]
        return memoryview(self._take_bytes(n))

    def _clear(self) -> None:
        self._chunks.clear()
        self._pos = 0
        self._avail = 0

    def body_buffer(self) -> memoryview | None:
        """Where the rest of a message body being collected (a WRITE payload, an option's data)
        can be received directly, without a copy; None when no body is being collected.

        Fill it and report the count with :meth:`body_received` (a socket's ``recv_into``).
        """
        body = self._body
        if body is None or self._body_filled >= len(body):
            return None
        return memoryview(body)[self._body_filled :]

    def body_received(self, n: int) -> None:
        """``n`` bytes were written into the view :meth:`body_buffer` returned."""
        body = self._body
        if body is None or n < 0 or self._body_filled + n > len(body):
            raise ValueError("body_received without a matching body_buffer")
        self._body_filled += n

    @property
    def buffered(self) -> int:
        """Bytes the machine holds on to (unparsed input plus the part of a message body that
        has arrived)."""
        body = self._body_filled if self._body is not None else 0
        return self._avail + body

    def next_event(self) -> Event | _Sentinel:
        """The next event, or NEED_DATA, or PAUSED while an option waits for its answer."""
        state = self.state
        if state is State.TRANSMISSION:
            # The fast path: a READ or WRITE whose header (and payload) lie whole in the first
            # received piece and that passes every check at once.  Anything else, valid or
            # not, goes the full way through _next_request, nothing consumed here.
            if self._avail >= 28 and self._body is None and self._after_drain is None:
                first = self._chunks[0]
                pos = self._pos
                end = len(first)
                if end - pos >= 28:
                    magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(first, pos)
                    if (
                        magic == c.REQUEST_MAGIC
                        and cmd <= c.CMD_WRITE
                        and not flags & ~c.CMD_FLAG_FUA
                        and length <= self._max_block
                        and offset + length <= self._size
                        and (
                            self._min_block == 1
                            or not (offset % self._min_block or length % self._min_block)
                        )
                    ):
                        payload: memoryview | None = None
                        if cmd == c.CMD_READ:
                            n = 28
                        elif not self._read_only and end - pos - 28 >= length:
                            n = 28 + length
                            payload = memoryview(first)[pos + 28 : pos + n]
                        else:
                            return self._next_request()
                        self._avail -= n
                        pos += n
                        if pos == end:
                            self._chunks.popleft()
                            pos = 0
                        self._pos = pos
                        return Request(handle, cmd, flags, offset, length, payload)
            elif (
                not self._avail
                and self._body is None
                and self._after_drain is None
                and not self._eof
            ):
                return NEED_DATA  # everything received was parsed (what _need says here)
            return self._next_request()
        if state is State.OPTIONS:
            return self._next_option()
        if state is State.AWAIT_REPLY or state is State.STARTING_TLS:
            return PAUSED
        if state is State.CLIENT_FLAGS:
            return self._client_flags()
        if state is State.FAILED:
            raise ProtocolError("The connection already failed.")
        return self._eof_event(0)

    # ----------------------------------------------------------------------- parsing

    def _fail(self, message: str) -> ProtocolError:
        self.state = State.FAILED
        self._clear()
        self._body = self._payload = None
        return ProtocolError(message)

    def _eof_event(self, partial: int) -> ConnectionClosed | _Sentinel:
        if self._eof and not self._eof_reported:
            self._eof_reported = True
            self._clear()
            self._body = self._payload = None
            return ConnectionClosed(partial)
        return NEED_DATA

    def _need(self) -> ConnectionClosed | _Sentinel:
        """Not enough bytes for the next message."""
        partial = self._avail
        if self._body is not None:
            partial += self._body_filled
        return self._eof_event(partial + (1 if self._drain else 0))

    def _client_flags(self) -> Event | _Sentinel:
        if self._avail < 4:
            return self._need()
        (flags,) = self._unpack(_U32)
        if flags & ~(c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
            raise self._fail(f"The client sent unknown handshake flags {flags:#x}.")
        self.client_flags = flags
        self.no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        return self._next_option()

    def _finish_drain(self) -> Event | _Sentinel | None:
        """While a refused payload is still being discarded, wait for more bytes; once it is
        gone, the event that reports the refusal.  None when nothing is being discarded."""
        if self._after_drain is None:
            return None
        if self._drain:
            return self._need()
        done = self._after_drain
        self._after_drain = None
        return done

    def _next_option(self) -> Event | _Sentinel:
        pending = self._finish_drain()
        if pending is not None:
            return pending
        if self._body is not None:
            if self._body_filled < len(self._body):
                return self._need()
            body = bytes(self._body)
            self._body = None
            return self._option_event(self._option, body)
        if self._avail < _OPTION_HEADER.size:
            return self._need()
        magic, option, length = self._unpack(_OPTION_HEADER)
        if magic != c.IHAVEOPT:
            raise self._fail("The client sent an option without the IHAVEOPT magic.")
        if length > c.MAX_OPTION_DATA:
            if length > c.MAX_OPTION_DRAIN or option == c.OPT_EXPORT_NAME:
                raise self._fail(f"The client sent an option of {length} bytes.")
            have = min(length, self._avail)
            self._consume(have)
            self._drain = length - have
            if self.tls_mode == TLS_REQUIRE and not self.tls_active:
                # Before TLS, FORCEDTLS answers every option this way, however long.
                self._after_drain = self._handled(
                    option, c.REP_ERR_TLS_REQD, "This server requires TLS: send STARTTLS first."
                )
            else:
                self._after_drain = OptionHandled(
                    option,
                    c.REP_ERR_TOO_BIG,
                    "The option is too large.",
                    option_reply(option, c.REP_ERR_TOO_BIG, b"The option is too large."),
                )
            return self._next_option()
        if self._avail >= length:
            return self._option_event(option, self._take_bytes(length))
        self._option = option
        self._body = bytearray(length)
        have = self._avail
        self._body[:have] = self._take_bytes(have)
        self._body_filled = have
        return self._need()

    def _handled(self, option: int, reply_type: int, message: str = "") -> OptionHandled:
        payload = _encode_message(message) if message else b""
        return OptionHandled(option, reply_type, message, option_reply(option, reply_type, payload))

    def _await(
        self,
        option: int,
        event: ListExports | ExportInfoRequest | ExportNameRequest | MetaContextRequest,
    ) -> Event:
        self.state = State.AWAIT_REPLY
        self._pending = event
        self._pending_option = option
        return event

    def _option_event(self, option: int, data: bytes) -> Event | _Sentinel:
        if (
            self.tls_mode == TLS_REQUIRE
            and not self.tls_active
            and option not in _ALLOWED_BEFORE_TLS
        ):
            if option == c.OPT_EXPORT_NAME:
                # EXPORT_NAME has no error reply: the protocol says to end the session.
                raise self._fail("The client chose an export without TLS, which is required.")
            return self._handled(
                option, c.REP_ERR_TLS_REQD, "This server requires TLS: send STARTTLS first."
            )
        if option == c.OPT_EXPORT_NAME:
            name = _decode_string(data)
            if name is None:
                raise self._fail("The client sent an invalid export name.")
            return self._await(option, ExportNameRequest(name))
        if option in (c.OPT_INFO, c.OPT_GO):
            return self._parse_info(option, data)
        if option == c.OPT_STRUCTURED_REPLY:
            if data:
                return self._handled(option, c.REP_ERR_INVALID, "The option takes no data.")
            self.structured = True
            return self._handled(option, c.REP_ACK)
        if option == c.OPT_LIST:
            if data:
                return self._handled(option, c.REP_ERR_INVALID, "The option takes no data.")
            return self._await(option, ListExports())
        if option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            return self._parse_meta_context(option, data)
        if option == c.OPT_ABORT:
            self.state = State.CLOSED
            return AbortRequest(option_reply(option, c.REP_ACK))
        if option == c.OPT_STARTTLS:
            if data:
                return self._handled(option, c.REP_ERR_INVALID, "The option takes no data.")
            if self.tls_mode == TLS_OFF:
                return self._handled(option, c.REP_ERR_POLICY, "This server does not offer TLS.")
            if self.tls_active:
                return self._handled(option, c.REP_ERR_INVALID, "TLS is already active.")
            if self.buffered:
                # The client must wait for the acknowledgement: whatever follows STARTTLS in
                # plain text may have been injected on the path (the STARTTLS injection bug).
                raise self._fail("The client sent more data right behind STARTTLS.")
            self.state = State.STARTING_TLS
            return StartTLS(option_reply(option, c.REP_ACK))
        if option == c.OPT_EXTENDED_HEADERS:
            return self._handled(option, c.REP_ERR_UNSUP, "Extended headers are not supported.")
        return self._handled(option, c.REP_ERR_UNSUP, f"Option {option} is not supported.")

    def _parse_info(self, option: int, data: bytes) -> Event:
        if len(data) < 6:
            return self._handled(option, c.REP_ERR_INVALID, "The option data is too short.")
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            return self._handled(option, c.REP_ERR_INVALID, "The export name overruns the option.")
        name = _decode_string(data[4 : 4 + name_len])
        if name is None:
            return self._handled(option, c.REP_ERR_INVALID, "The export name is not valid.")
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            return self._handled(
                option, c.REP_ERR_INVALID, "The information request list has the wrong length."
            )
        requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
        return self._await(option, ExportInfoRequest(name, requests, option == c.OPT_GO))

    def _parse_meta_context(self, option: int, data: bytes) -> Event:
        select = option == c.OPT_SET_META_CONTEXT
        if select:
            # SET replaces the selection even when it fails.
            self._meta_selected = False
            self._meta_export = None
            if not self.structured:
                return self._handled(
                    option, c.REP_ERR_INVALID, "Structured replies must be negotiated first."
                )
        invalid = "The metadata context request is malformed."
        if len(data) < 8:
            return self._handled(option, c.REP_ERR_INVALID, invalid)
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 8:
            return self._handled(option, c.REP_ERR_INVALID, invalid)
        name = _decode_string(data[4 : 4 + name_len])
        if name is None:
            return self._handled(option, c.REP_ERR_INVALID, "The export name is not valid.")
        pos = 4 + name_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(count):
            if len(data) - pos < 4:
                return self._handled(option, c.REP_ERR_INVALID, invalid)
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > len(data) - pos:
                return self._handled(option, c.REP_ERR_INVALID, invalid)
            query = _decode_string(data[pos : pos + qlen])
            pos += qlen
            if query is None:
                return self._handled(option, c.REP_ERR_INVALID, "A query is not valid.")
            queries.append(query)
        if pos != len(data):
            return self._handled(option, c.REP_ERR_INVALID, invalid)
        return self._await(option, MetaContextRequest(name, tuple(queries), select))

    # -------------------------------------------------------------------- handshake replies

    def _take_pending(self, kind: type) -> object:
        pending = self._pending
        if self.state is not State.AWAIT_REPLY or not isinstance(pending, kind):
            raise RuntimeError(f"No {kind.__name__} is waiting for an answer.")
        self._pending = None
        self.state = State.OPTIONS
        return pending

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> bytes:
        """Answer NBD_OPT_LIST with (name, description) pairs."""
        self._take_pending(ListExports)
        out = []
        for name, description in exports:
            raw = name.encode("utf-8")
            payload = _U32.pack(len(raw)) + raw + _encode_message(description)
            out.append(option_reply(c.OPT_LIST, c.REP_SERVER, payload))
        out.append(option_reply(c.OPT_LIST, c.REP_ACK))
        return b"".join(out)

    def reply_option_error(self, reply_type: int, message: str = "") -> bytes:
        """Answer the pending option with an error reply (e.g. REP_ERR_UNKNOWN)."""
        if not reply_type & c.REP_ERR_BIT:
            raise ValueError("reply_option_error needs an error reply type")
        if self.state is not State.AWAIT_REPLY or isinstance(self._pending, ExportNameRequest):
            raise RuntimeError("No option that can fail is waiting for an answer.")
        option = self._pending_option
        self._pending = None
        self.state = State.OPTIONS
        payload = _encode_message(message) if message else b""
        return option_reply(option, reply_type, payload)

    def _flags_for(self, info: ExportInfo) -> int:
        flags = c.FLAG_HAS_FLAGS | c.FLAG_SEND_FLUSH | c.FLAG_SEND_FUA | c.FLAG_SEND_CACHE
        if info.read_only:
            flags |= c.FLAG_READ_ONLY
        else:
            flags |= c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES | c.FLAG_SEND_FAST_ZERO
        if self.structured:
            flags |= c.FLAG_SEND_DF
        if info.can_multi_conn:
            flags |= c.FLAG_CAN_MULTI_CONN
        return flags

    def _enter_transmission(self, name: str, info: ExportInfo) -> None:
        self.state = State.TRANSMISSION
        self.export = info
        self.transmission_flags = self._flags_for(info)
        self._size = info.size
        self._read_only = info.read_only
        self._min_block = max(1, info.min_block)
        self._max_block = info.max_block
        if self._meta_selected and self._meta_export == name:
            self.meta_context_id = _META_CONTEXT_ID

    def reply_info(self, info: ExportInfo) -> bytes:
        """Answer NBD_OPT_INFO / NBD_OPT_GO for an export that exists (and, for GO, is open).

        After a GO this enters the transmission phase.
        """
        request = self._take_pending(ExportInfoRequest)
        assert isinstance(request, ExportInfoRequest)
        option = c.OPT_GO if request.go else c.OPT_INFO
        flags = self._flags_for(info)
        out = [option_reply(option, c.REP_INFO, _INFO_EXPORT.pack(c.INFO_EXPORT, info.size, flags))]
        if c.INFO_NAME in request.requests:
            raw = _U16.pack(c.INFO_NAME) + info.name.encode("utf-8")
            out.append(option_reply(option, c.REP_INFO, raw))
        if c.INFO_DESCRIPTION in request.requests and info.description:
            raw = _U16.pack(c.INFO_DESCRIPTION) + _encode_message(info.description)
            out.append(option_reply(option, c.REP_INFO, raw))
        block = _INFO_BLOCK_SIZE.pack(
            c.INFO_BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block
        )
        out.append(option_reply(option, c.REP_INFO, block))
        out.append(option_reply(option, c.REP_ACK))
        if request.go:
            self._enter_transmission(request.name, info)
        return b"".join(out)

    def reply_export_name(self, info: ExportInfo) -> bytes:
        """Accept NBD_OPT_EXPORT_NAME and enter the transmission phase."""
        request = self._take_pending(ExportNameRequest)
        assert isinstance(request, ExportNameRequest)
        self._enter_transmission(request.name, info)
        reply = _EXPORT_NAME_REPLY.pack(info.size, self.transmission_flags)
        return reply if self.no_zeroes else reply + _ZEROES_124

    def refuse_export_name(self) -> None:
        """Refuse NBD_OPT_EXPORT_NAME: the protocol has no error reply, so close now."""
        self._take_pending(ExportNameRequest)
        self.state = State.CLOSED

    def tls_started(self) -> None:
        """The transport now speaks TLS: every byte fed from now on came out of TLS.

        Call it when the caller hands the connection to its TLS layer, before any decrypted
        byte is fed (the handshake may still be running; if it fails, drop the connection).
        Bytes the client sent in plain text after STARTTLS (already buffered here) could have
        been injected by anyone on the path, so they are a protocol error, never options.  What
        was negotiated in plain text (structured replies, the metadata context) is forgotten,
        as nbdkit does, so that nothing chosen before TLS shapes the session after it.
        """
        if self.state is not State.STARTING_TLS:
            raise RuntimeError("tls_started without an accepted STARTTLS")
        if self.buffered or self._drain:
            raise self._fail("The client sent plain-text data after STARTTLS.")
        self.tls_active = True
        self.structured = False
        self._meta_selected = False
        self._meta_export = None
        self.state = State.OPTIONS

    def reply_meta_context(self, export_exists: bool) -> bytes:
        """Answer NBD_OPT_LIST/SET_META_CONTEXT; only ``base:allocation`` is offered."""
        request = self._take_pending(MetaContextRequest)
        assert isinstance(request, MetaContextRequest)
        option = c.OPT_SET_META_CONTEXT if request.select else c.OPT_LIST_META_CONTEXT
        if not export_exists:
            message = _encode_message(f"There is no export named {request.export_name!r}.")
            return option_reply(option, c.REP_ERR_UNKNOWN, message)
        if request.select:
            found = c.BASE_ALLOCATION in request.queries
        else:
            found = not request.queries or any(
                q in ("base:", c.BASE_ALLOCATION) for q in request.queries
            )
        out = []
        if found:
            context_id = _META_CONTEXT_ID if request.select else 0
            payload = _U32.pack(context_id) + c.BASE_ALLOCATION.encode()
            out.append(option_reply(option, c.REP_META_CONTEXT, payload))
        if request.select:
            self._meta_selected = found
            self._meta_export = request.export_name
        out.append(option_reply(option, c.REP_ACK))
        return b"".join(out)

    # ------------------------------------------------------------------------ transmission

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Why a request must be refused, as (NBD error, message), or None if it is valid."""
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return c.EINVAL, f"Command {cmd} is not supported."
        if flags & ~allowed:
            return c.EINVAL, f"Flags {flags:#x} are not valid for this command."
        if flags & c.CMD_FLAG_DF and not self.structured:
            return c.EINVAL, "The DF flag needs structured replies."
        writes = cmd in (c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES)
        if writes and self._read_only:
            return c.EPERM, "The export is read-only."
        if cmd == c.CMD_FLUSH:
            if offset or length:
                return c.EINVAL, "A flush must have zero offset and length."
            return None
        if cmd == c.CMD_BLOCK_STATUS:
            if not self.meta_context_id:
                return c.EINVAL, "No metadata context was negotiated."
            if length == 0:
                return c.EINVAL, "A block status request needs a length."
        if length > self._max_block and cmd in (c.CMD_READ, c.CMD_WRITE, c.CMD_CACHE):
            return c.EINVAL, f"The request is longer than the maximum block size {self._max_block}."
        if offset + length > self._size:
            if cmd in (c.CMD_WRITE, c.CMD_WRITE_ZEROES):
                return c.ENOSPC, "The request reaches past the end of the export."
            return c.EINVAL, "The request reaches past the end of the export."
        mb = self._min_block
        if mb > 1 and (offset % mb or length % mb):
            return c.EINVAL, f"The request is not aligned to the minimum block size {mb}."
        return None

    def _next_request(self) -> Event | _Sentinel:
        pending = self._finish_drain()
        if pending is not None:
            return pending
        if self._body is not None:
            if self._body_filled < len(self._body):
                return self._need()
            header = self._header
            assert header is not None
            filled, pooled = self._body, self._payload
            self._body = self._payload = None
            self._header = None
            payload: memoryview | bytes | bytearray
            if pooled is not None:
                payload = pooled
            else:
                payload = filled if isinstance(filled, bytearray) else memoryview(filled)
            return Request(header[0], header[1], header[2], header[3], header[4], payload)
        if self._avail < 28:
            return self._need()
        magic, flags, cmd, handle, offset, length = self._unpack(_REQUEST)
        if magic != c.REQUEST_MAGIC:
            raise self._fail(f"The client sent a request with bad magic {magic:#x}.")
        if cmd == c.CMD_WRITE:
            problem = self._check(cmd, flags, offset, length)
            avail = self._avail
            if problem is not None:
                if length > c.MAX_WRITE_DRAIN:
                    raise self._fail(f"The client sent a WRITE of {length} bytes.")
                have = min(avail, length)
                self._consume(have)
                rejected = self._rejected(handle, cmd, *problem)
                if have == length:
                    return rejected
                self._drain = length - have
                self._after_drain = rejected
                return self._need()
            if avail >= length:
                return Request(handle, cmd, flags, offset, length, self._take_view(length))
            lazy = length - avail >= _LAZY_BODY and length > _EAGER_BODY
            body: bytearray | mmap.mmap | memoryview
            if lazy:
                body = _lazy_buffer(length)
            else:
                self._payload, body = self._buffers.get(length)
            if avail:
                self._take_into(body, avail)
            self._body = body
            self._body_filled = avail
            self._header = (handle, cmd, flags, offset, length)
            return self._need()
        if cmd == c.CMD_DISC:
            self.state = State.CLOSED
            self._clear()
            return Disconnect()
        problem = self._check(cmd, flags, offset, length)
        if problem is not None:
            return self._rejected(handle, cmd, *problem)
        return Request(handle, cmd, flags, offset, length, None)

    def _rejected(self, handle: int, cmd: int, error: int, message: str) -> RequestRejected:
        return RequestRejected(
            handle, cmd, error, message, self.reply_error(handle, error, message)
        )

    # -------------------------------------------------------------------- transmission replies

    def reply_ok(self, handle: int) -> bytes:
        """Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE)."""
        return _SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read(
        self, handle: int, offset: int, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """Success of a READ: the buffers to write, in order, as one message.

        With structured replies, a read of at least 4 KiB that is all zeroes is sent as one
        OFFSET_HOLE chunk; anything else as one OFFSET_DATA chunk (valid with DF too).
        """
        n = len(data)
        if not self.structured:
            return [_SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, handle), data]
        if n == 0:
            return [
                _CHUNK.pack(
                    c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, handle, 0
                )
            ]
        if n >= _HOLE_MIN and data[:1] == b"\0" and data == _zeroes(n):
            return [
                _CHUNK_HOLE.pack(
                    c.STRUCTURED_REPLY_MAGIC,
                    c.REPLY_FLAG_DONE,
                    c.REPLY_TYPE_OFFSET_HOLE,
                    handle,
                    12,
                    offset,
                    n,
                )
            ]
        header = _CHUNK_OFFSET.pack(
            c.STRUCTURED_REPLY_MAGIC,
            c.REPLY_FLAG_DONE,
            c.REPLY_TYPE_OFFSET_DATA,
            handle,
            n + 8,
            offset,
        )
        return [header, data]

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """Failure of any request: a structured ERROR chunk (with the message) if structured
        replies are on, else a simple reply carrying the error number."""
        if error not in c.WIRE_ERRORS:
            error = c.EIO
        if not self.structured:
            return _SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, handle)
        raw = _encode_message(message)
        return (
            _CHUNK_ERROR.pack(
                c.STRUCTURED_REPLY_MAGIC,
                c.REPLY_FLAG_DONE,
                c.REPLY_TYPE_ERROR,
                handle,
                6 + len(raw),
                error,
                len(raw),
            )
            + raw
        )

    def reply_block_status(
        self, handle: int, length: int, extents: Sequence[tuple[int, int]], req_one: bool = False
    ) -> bytes:
        """Success of a BLOCK_STATUS of ``length`` bytes: (length, flags) runs from its offset.

        Runs are merged when their flags are equal, clipped to the requested length (one run
        with REQ_ONE) and capped in number; an empty answer becomes one run of flags 0.
        """
        out: list[int] = []
        total = 0
        last_flags = -1
        for ext_len, ext_flags in extents:
            if ext_len <= 0:
                continue
            ext_len = min(ext_len, length - total)
            if ext_flags == last_flags:
                out[-2] += ext_len
            else:
                if len(out) >= 2 * _MAX_EXTENTS:
                    break
                out.append(ext_len)
                out.append(ext_flags)
                last_flags = ext_flags
            total += ext_len
            if total >= length:
                break
        if not out:
            out = [length, 0]
        if req_one:
            out = out[:2]
        count = len(out) // 2
        header = _CHUNK.pack(
            c.STRUCTURED_REPLY_MAGIC,
            c.REPLY_FLAG_DONE,
            c.REPLY_TYPE_BLOCK_STATUS,
            handle,
            4 + 8 * count,
        )
        return header + _U32.pack(self.meta_context_id) + struct.pack(f">{2 * count}I", *out)
