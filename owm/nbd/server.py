"""The asyncio NBD server: drives :mod:`owm.nbd.protocol` over TCP and Unix sockets.

Each connection is an ``asyncio.Protocol`` (no StreamReader on the hot path) that feeds the
received bytes to its :class:`~owm.nbd.protocol.ServerConnection` and turns its events into
calls on an ``owm.common.view.Exports`` / ``View``.  Requests of one connection run concurrently as
tasks and may complete out of order; each reply (header plus payload) is queued whole, and
the replies finished in one event-loop turn go out in one ``writelines`` call.

TLS (``NbdServer(tls_context=..., tls_mode=...)``) is offered or required on the TCP listener:
when the machine accepts STARTTLS the acknowledgement goes out in plain text, reading stops,
the transport is upgraded with ``loop.start_tls`` and the negotiation goes on over TLS; a
failed handshake drops the connection.  The Unix socket is guarded by its file mode instead
(0600, or 0660 for a group) and never offers TLS.  Access rules (:mod:`owm.nbd.access`), when
given, decide per client identity (the verified certificate's CN, or the Unix socket) which
exports LIST shows and INFO/GO/EXPORT_NAME may open, and which only read-only.

A connection opens its view when GO or EXPORT_NAME succeeds.  On DISC it stops reading,
finishes the requests in flight and closes the view with ``clean=True``; a connection that
drops without DISC closes it with ``clean=False`` once its requests have finished.  Reading is
paused while too many requests or payload bytes are in flight, or while the client is not
reading its replies, so a fast or hostile client cannot make the server buffer without bound.

Reply bytes are capped per connection (data of READs in flight plus replies queued in the
transport: ``MAX_CONNECTION_REPLY_BYTES``) and across the server (every request's bytes plus
every queued reply: ``MAX_BUFFERED_BYTES``).  A connection over either stops reading requests
until its writes drain or the server's total falls below the cap.  A connection with no request
in flight may always start one (unless its replies are over the transport's high-water mark),
so clients that read their replies keep being served beside clients that never do.

Fairness between sessions: a connection alone may keep ``MAX_INFLIGHT_REQUESTS`` requests in
flight, but while other sessions are busy too (sent a request within ``ACTIVE_WINDOW``) each
keeps at most ``FAIR_INFLIGHT_REQUESTS``, so a deep queue from one client cannot fill the
shared resources (the I/O threads, the engine's chunk queues) ahead of everybody else.  One
read's worth of requests is started ``DISPATCH_BATCH`` at a time, the other connections' events
running in between.  Bytes a connection has received but not turned into requests yet (a
WRITE payload still arriving, say) count toward the server's budget as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from owm.common.cluster import Directory, Remote
from owm.common.errors import InvalidRequest, NotFound, OwmError
from owm.common.names import parse_export_name
from owm.common.view import ExportInfo, Exports, View
from owm.nbd import constants as c
from owm.nbd import protocol as p
from owm.nbd.access import READ_ONLY, AccessRules, Client
from owm.nbd.proxy import Forwarder, ProxyView
from owm.nbd.tls import peer_identity

log = logging.getLogger("owm.nbd.server")
T = TypeVar("T")

MAX_INFLIGHT_REQUESTS = 256
FAIR_INFLIGHT_REQUESTS = 32  # per connection while other sessions are busy too
ACTIVE_WINDOW = 1.0  # seconds after its last request that a session counts as busy
SHARE_RECHECK = 0.1  # seconds between recounts of the busy sessions
DISPATCH_BATCH = 64  # requests started in one go before the other connections get a turn
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
MAX_CONNECTION_REPLY_BYTES = 32 * 1024 * 1024
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# Connections at once; past it a new one is closed at once (each may hold a request's buffer).
MAX_CONNECTIONS = 1024
BUDGET_RECHECK = 0.05  # seconds between recounts while connections wait for the server's budget
WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
RECV_BUFFER = 256 * 1024
HANDSHAKE_TIMEOUT = 60.0
DIRECT_MIN = 16 * 1024  # bodies still missing at least this much are read into place

_OPTION_ERRORS = {
    # How an OwmError from opening an export is told to a client during GO/INFO.
    "NotFound": c.REP_ERR_UNKNOWN,
    "WrongState": c.REP_ERR_UNKNOWN,
    "ReadOnly": c.REP_ERR_POLICY,
}


def _tune_tcp(sock: socket.socket) -> None:
    """No Nagle delay (the protocol document asks for it), and keepalive probes so that a peer
    that vanished without closing (a dead host, a cut network) ends its session within minutes
    instead of holding a preserved image in its draining state forever."""
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "SO_PEERCRED"):
        with contextlib.suppress(OSError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"unix:pid={pid},uid={uid}"
    return "unix"


async def _resume(coro: Coroutine[Any, Any, T], waiting: Any) -> T:
    """Drive ``coro``, which was started outside any task and is waiting on ``waiting``, to
    its end; its result (or exception) is this coroutine's.

    ``waiting`` is what the coroutine yielded: an asyncio future (it resumes once that is
    done and reads the outcome itself) or None (a bare yield, as ``asyncio.sleep(0)``).
    Cancelling this task cancels the future it waits on, which the coroutine then sees.
    """
    while True:
        if waiting is None:
            await asyncio.sleep(0)
        else:
            # A Task clears this flag when it takes a yielded future; nobody did for the first
            # yield, and a future still flagged refuses to be awaited again.
            waiting._asyncio_future_blocking = False
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await waiting
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            result: T = stop.value
            return result


class _Connection(asyncio.BufferedProtocol):
    """One client connection: protocol machine, view, requests in flight, reply batching.

    Reads land in a preallocated scratch buffer and are handed to the machine as one bytes
    object per read (small WRITE payloads are then slices of it, not copies), except while the
    machine collects a large body: then the socket reads straight into the payload buffer.
    """

    def __init__(self, server: NbdServer, unix: bool = False) -> None:
        self.server = server
        tls = p.TLS_OFF if unix or server.tls_context is None else server.tls_mode
        self.machine = p.ServerConnection(tls=tls, buffers=server.payload_buffers)
        self.client = Client(unix=unix)  # who the access rules see; the CN comes with TLS
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.view: View | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes | bytearray | memoryview] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._inflight_bytes = 0
        self._inflight_read_bytes = 0  # data of READs in flight: replies to come
        self._queued = 0  # reply bytes not sent yet (ours and the transport's), last looked at
        self._out_bytes = 0  # bytes in self._out
        self._idle: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._stalled = False  # parsing stopped at the in-flight limits
        self._write_paused = False
        self._option_busy = False  # an async option answer (GO, EXPORT_NAME) is running
        self._disconnecting = False  # DISC received
        self._lost = False
        self._closing = False  # we decided to close (ABORT, refused export, shutdown)
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._scratch = memoryview(bytearray(RECV_BUFFER))
        self._direct = False
        # After a payload read into place, the next read takes one request header only: if it
        # is another large WRITE, its payload then goes into place too, none of it through
        # the scratch buffer (a copy into a fresh bytes object each: page faults at 256K).
        self._header_next = False
        self._deadline: asyncio.TimerHandle | None = None
        self._stopping = False
        self._finishing = False
        self._last_request = float("-inf")  # loop time of the last request started
        self._process_scheduled = False
        self._held_input = 0  # the machine's buffered bytes, as counted in the server's total
        # (transcript, answers) of a connection handed over by another process (adopt).
        self._adopted: tuple[bytes, bytes] | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.peer = _peer_name(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            _tune_tcp(sock)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if len(self.server._connections) >= MAX_CONNECTIONS:
            self.server._refused_connection(self.peer)
            transport.close()
            return
        self.server._connections.add(self)
        self.server.accepted_connections += 1
        log.debug("connection from %s", self.peer)
        if self.server._stopping:
            transport.close()
            return
        self._deadline = self._loop.call_later(
            self.server.handshake_timeout, self._handshake_timed_out
        )
        greeting = self.machine.initiate()
        if self._adopted is not None:
            self._replay(*self._adopted)  # another process greeted the client already
            return
        transport.write(greeting)

    def _replay(self, transcript: bytes, answers: bytes) -> None:
        """Continue a handshake another process began (``NbdServer.adopt``): feed the client's
        bytes it read, skip the option events it answered already (one byte of ``answers``
        each: whether the export named existed), leaving the machine as those answers left its
        own (only a metadata context's answer changes the state), then go on as usual."""
        machine = self.machine
        if transcript:
            machine.receive_data(transcript)
        try:
            for existed in answers:
                event = machine.next_event()
                if isinstance(event, p.ListExports):
                    machine.reply_list(())
                elif isinstance(event, p.ExportInfoRequest):
                    machine.reply_option_error(c.REP_ERR_UNKNOWN)
                elif isinstance(event, p.MetaContextRequest):
                    machine.reply_meta_context(bool(existed))
                elif not isinstance(event, p.OptionHandled):
                    raise p.ProtocolError(f"the handed-over handshake diverged at {event!r}")
        except (p.ProtocolError, RuntimeError) as e:
            log.warning("client %s: the handed-over handshake cannot be replayed: %s",
                        self.peer, e)
            self._close_transport(abort=True)
            return
        self._process()

    def _handshake_timed_out(self) -> None:
        # An export being opened is no exemption: an open that never finishes must not keep
        # the socket forever (an open that does finish after this sees the loss and closes
        # its view again).
        if self.machine.state is not p.State.TRANSMISSION:
            log.info("%s did not finish negotiating in time", self.peer)
            self._close_transport(abort=True)

    def get_buffer(self, sizehint: int) -> memoryview:
        body = self.machine.body_buffer()
        if body is not None and len(body) >= DIRECT_MIN:
            self._direct = True
            return body
        self._direct = False
        if self._header_next and not self.machine.buffered:
            return self._scratch[: p.REQUEST_SIZE]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        machine = self.machine
        if self._direct:
            machine.body_received(nbytes)
            self._header_next = True
        else:
            self._header_next = False
            machine.receive_data(bytes(self._scratch[:nbytes]))
        # _process, inline (once per receive).
        self._process_events()
        if not self._lost:
            held = machine.buffered
            if held != self._held_input:
                self.server._buffered += held - self._held_input
                self._held_input = held

    def _account_input(self) -> None:
        """Count what the machine holds (unparsed input, a payload arriving) in the server's
        total, as it changes.  (``buffer_updated`` has its own copy of this.)"""
        if self._lost:
            return
        held = self.machine.buffered
        if held != self._held_input:
            self.server._buffered += held - self._held_input
            self._held_input = held

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self._unstall()
        self.server._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return  # a failed TLS upgrade may report the loss twice
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._out.clear()
        self.server._connections.discard(self)
        self.server._waiting.discard(self)
        self.server._buffered -= self._queued + self._held_input
        self._queued = 0
        self._held_input = 0
        log.debug("connection from %s lost (%s)", self.peer, exc or "closed")
        if not self._disconnecting and not self._option_busy:
            self._loop.create_task(self._finish(clean=False))

    # ----------------------------------------------------------------------- plumbing

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        want_pause = self._option_busy or self._disconnecting or self._closing or self._busy()
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost:
            return
        self._out.append(data)
        n = len(data)
        self._out_bytes += n
        # Counted as queued at once (see _busy): an upper bound until _refresh_queued looks.
        self._queued += n
        self.server._buffered += n
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _send_many(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        if self._lost:
            return
        self._out.extend(bufs)
        n = sum(map(len, bufs))
        self._out_bytes += n
        self._queued += n
        self.server._buffered += n
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        self._out_bytes = 0
        if not out or self._lost or self.transport is None:
            out.clear()
            return
        self._out = []
        transport = self.transport
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        # _refresh_queued, inline.
        if not self._lost:
            queued = transport.get_write_buffer_size() + self._out_bytes
            self.server._buffered += queued - self._queued
            self._queued = queued
        if self._stalled:
            # Requests that completed at once filled ``_out``; now that it is written out,
            # parsing may go on.
            self._unstall()

    def _refresh_queued(self) -> int:
        """Look at the bytes queued in the transport again and update the server's total."""
        transport = self.transport
        queued = 0
        if transport is not None and not self._lost:
            queued = transport.get_write_buffer_size() + self._out_bytes
        self.server._buffered += queued - self._queued
        self._queued = queued
        return queued

    def _close_transport(self, abort: bool = False) -> None:
        self._closing = True
        self._flush()
        if self.transport is not None and not self._lost:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------------- event dispatch

    def _busy(self, limit: int = 0) -> bool:
        """Too much in flight (or unread by the client) to start more requests now.

        ``limit`` is the request limit when the caller has it already (one look at the clock
        per received batch, not one per request)."""
        if not limit:
            limit = self.server._request_limit(self._loop.time())
        if self._inflight >= limit or self._write_paused:
            return True
        # ``_queued`` is never below the bytes really queued (sending adds to it at once; only
        # the transport draining makes it stale, high): when it is within every limit, the
        # exact figure is too, and the transport need not be asked.
        queued = self._queued
        if (self._inflight == 0 and queued < WRITE_HIGH_WATER) or (
            self._inflight_bytes < MAX_INFLIGHT_BYTES
            and self._inflight_read_bytes + queued < MAX_CONNECTION_REPLY_BYTES
            and self.server._buffered < MAX_BUFFERED_BYTES
        ):
            return False
        queued = self._refresh_queued()
        if self._inflight == 0 and queued < WRITE_HIGH_WATER:
            # One request may always go, whatever others hold, so a client that reads its
            # replies is never starved; one that does not stops at the write high-water mark.
            return False
        replies = self._inflight_read_bytes + queued
        return (
            self._inflight_bytes >= MAX_INFLIGHT_BYTES
            or replies >= MAX_CONNECTION_REPLY_BYTES
            or self.server._over_budget(self)
        )

    def _budget_freed(self) -> None:
        """The server's total fell below its cap: go on if this connection stopped for it."""
        if self._lost:
            return
        self._update_reading()
        self._unstall()

    def _process(self) -> None:
        self._process_events()
        self._account_input()

    def _process_later(self) -> None:
        self._process_scheduled = False
        self._process()

    def _process_events(self) -> None:
        machine = self.machine
        request_type = p.Request
        started = 0
        now = self._loop.time()
        server = self.server
        limit = server._request_limit(now)
        while not self._option_busy:
            if started >= DISPATCH_BATCH:
                # Let the other connections' events run before the rest of this read.
                if not self._process_scheduled:
                    self._process_scheduled = True
                    self._loop.call_soon(self._process_later)
                return
            # _busy's own first test, inline: below every limit, nothing to look at.
            if (
                self._inflight >= limit
                or self._write_paused
                or self._inflight_bytes >= MAX_INFLIGHT_BYTES
                or self._inflight_read_bytes + self._queued >= MAX_CONNECTION_REPLY_BYTES
                or server._buffered >= MAX_BUFFERED_BYTES
            ) and self._busy(limit):
                # Leave the rest parsed later: one read can hold thousands of requests.
                self._stalled = True
                self._update_reading()
                return
            try:
                event = machine.next_event()
            except p.ProtocolError as e:
                log.info("client %s broke the protocol: %s", self.peer, e)
                self._close_transport(abort=True)
                return
            kind = type(event)
            if kind is request_type:
                assert isinstance(event, p.Request)
                started += 1
                self._last_request = now
                self._start_request(event)
            elif event is p.NEED_DATA or event is p.PAUSED:
                return
            elif kind is p.RequestRejected:
                assert isinstance(event, p.RequestRejected)
                log.debug("%s: rejected %s: %s", self.peer, event.command, event.message)
                self._send(event.data)
            else:
                self._option_event(event)

    def _option_event(self, event: object) -> None:
        machine = self.machine
        if isinstance(event, p.OptionHandled):
            self._send(event.data)
        elif isinstance(event, p.StartTLS):
            self._begin_tls(event)
        elif isinstance(event, p.ListExports):
            if self._stopping:
                self._send(
                    machine.reply_option_error(c.REP_ERR_SHUTDOWN, "The server is stopping.")
                )
                return
            if self.server.forwarder is not None:
                self._begin_cluster_option(self._list_cluster())
                return
            try:
                exports = [
                    (i.name, i.description)
                    for i in self.server.exports.list_exports()
                    if self._access(i.name) is not None
                ]
            except Exception:
                log.exception("listing exports failed")
                self._send(machine.reply_option_error(c.REP_ERR_UNSUP, "Listing failed."))
                return
            self._send(machine.reply_list(exports))
        elif isinstance(event, p.ExportInfoRequest):
            if self._stopping:
                self._send(
                    machine.reply_option_error(c.REP_ERR_SHUTDOWN, "The server is stopping.")
                )
            elif event.go:
                self._begin_open(event.name, go=True)
            else:
                self._answer_info(event.name)
        elif isinstance(event, p.ExportNameRequest):
            if self._stopping:
                machine.refuse_export_name()
                self._close_transport()
            else:
                self._begin_open(event.name, go=False)
        elif isinstance(event, p.MetaContextRequest):
            info = self._lookup(event.export_name)
            if info is None and self.server.forwarder is not None:
                self._begin_cluster_option(self._meta_context_remote(event.export_name))
            elif info is not None and self._access(info.name) is None:
                self._send(machine.reply_option_error(c.REP_ERR_POLICY, self._denied(info.name)))
            else:
                self._send(machine.reply_meta_context(info is not None))
        elif isinstance(event, p.AbortRequest):
            self._send(event.data)
            self._close_transport()
        elif isinstance(event, p.Disconnect):
            self._disconnecting = True
            self._update_reading()
            self._loop.create_task(self._finish(clean=True))
        elif isinstance(event, p.ConnectionClosed):
            pass  # connection_lost does the rest

    def _resolve_name(self, name: str) -> str:
        """The export a client means: "" is the one live volume, if there is exactly one."""
        if name:
            return name
        live = [i.name for i in self.server.exports.list_exports() if "@" not in i.name]
        return live[0] if len(live) == 1 else name

    def _lookup(self, name: str) -> ExportInfo | None:
        return self._find(name)[0]

    def _find(self, name: str) -> tuple[ExportInfo | None, str]:
        """The export a client names, or None and the one sentence to tell the client why not.

        Never raises: whatever the name, the option gets an answer (a name that escaped here
        once left the option unanswered and its socket open for good).
        """
        missing = f"There is no export named {name!r}."
        try:
            resolved = self._resolve_name(name)
            parse_export_name(resolved)
            return self.server.exports.export_info(resolved), ""
        except NotFound:
            return None, missing
        except InvalidRequest as e:
            return None, f"{e}."
        except OwmError as e:
            log.info("export %r: %s", name, e)
            return None, missing
        except Exception:
            log.exception("looking up export %r failed", name)
            return None, missing

    def _answer_info(self, name: str) -> None:
        info, why = self._find(name)
        if info is None and self.server.forwarder is not None:
            self._begin_cluster_option(self._answer_info_remote(name, why))
            return
        if info is None:
            self._send(self.machine.reply_option_error(c.REP_ERR_UNKNOWN, why))
            return
        access = self._access(info.name)
        if access is None:
            self._send(self.machine.reply_option_error(c.REP_ERR_POLICY, self._denied(info.name)))
            return
        if access == READ_ONLY:
            info = dataclasses.replace(info, read_only=True)
        self._send(self.machine.reply_info(info))

    # ----------------------------------------------- the cluster's front door (owm.nbd.proxy)

    def _begin_cluster_option(self, answer: Coroutine[Any, Any, None]) -> None:
        """Answer an option that needs the cluster's directory, as a task (like GO)."""
        self._option_busy = True
        self._update_reading()
        self._loop.create_task(self._open(self._after_cluster_option(answer)))

    async def _after_cluster_option(self, answer: Coroutine[Any, Any, None]) -> None:
        await answer
        self._option_busy = False
        if self._lost:
            await self._finish(clean=False)
            return
        if self._stopping:  # the server began to stop while the directory was asked
            self._close_transport()
            if not self._finished.done():
                self._finished.set_result(None)
            return
        self._update_reading()
        self._process()

    def _forward_failed(self) -> None:
        """The owner of a forwarded export could not be found again: answer what is in flight
        (EIO) and close the connection."""
        self._loop.create_task(self._finish(clean=False))

    async def _owner(self, name: str) -> Remote | None:
        forwarder = self.server.forwarder
        if forwarder is None:
            return None
        try:
            return await forwarder.owner(name)
        except Exception:
            log.exception("locating export %r in the cluster failed", name)
            return None

    async def _list_cluster(self) -> None:
        assert self.server.forwarder is not None
        try:
            local = [(i.name, i.description) for i in self.server.exports.list_exports()]
            exports = await self.server.forwarder.list_exports(local)
        except Exception:
            log.exception("listing the cluster's exports failed")
            self._send(self.machine.reply_option_error(c.REP_ERR_UNSUP, "Listing failed."))
            return
        self._send(self.machine.reply_list([e for e in exports if self._access(e[0]) is not None]))

    async def _meta_context_remote(self, name: str) -> None:
        remote = await self._owner(name)
        if remote is not None and self._access(name) is None:
            self._send(self.machine.reply_option_error(c.REP_ERR_POLICY, self._denied(name)))
        else:
            self._send(self.machine.reply_meta_context(remote is not None))

    async def _answer_info_remote(self, name: str, why: str) -> None:
        assert self.server.forwarder is not None
        remote = await self._owner(name)
        access = self._access(name) if remote is not None else None
        if remote is None:
            self._send(self.machine.reply_option_error(c.REP_ERR_UNKNOWN, why))
        elif access is None:
            self._send(self.machine.reply_option_error(c.REP_ERR_POLICY, self._denied(name)))
        else:
            try:
                info = await self.server.forwarder.info(name, remote)
            except OwmError as e:
                reply = getattr(e, "reply_type", 0) or c.REP_ERR_UNKNOWN
                self._send(self.machine.reply_option_error(reply, str(e)))
                return
            if access == READ_ONLY:
                info = dataclasses.replace(info, read_only=True)
            self._send(self.machine.reply_info(info))

    # ------------------------------------------------------------------ access and TLS

    def _access(self, name: str) -> str | None:
        """"rw" or "ro" for the export this client names (resolved), or None if refused."""
        rules = self.server.access
        if rules is None:
            return "rw"
        return rules.decide(self.client, name)

    def _denied(self, name: str) -> str:
        """Log the refusal and return the sentence the client is told."""
        who = self.client.describe()
        log.warning("%s (%s) refused export %r by the access rules", self.peer, who, name)
        return f"Client {who} is not allowed to open export {name!r}."

    def _begin_tls(self, event: p.StartTLS) -> None:
        self._option_busy = True
        self._update_reading()
        self._send(event.data)
        self._flush()  # the acknowledgement goes out in plain text, before the upgrade
        self._loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        context = self.server.tls_context
        transport = self.transport
        assert context is not None and transport is not None
        try:
            # From here on every byte the machine is fed comes out of TLS (reading stopped
            # with the acknowledgement, and the raw socket now belongs to the SSL layer, which
            # may hand over the client's first option before start_tls returns).
            self.machine.tls_started()
        except p.ProtocolError as e:
            log.info("client %s broke the protocol: %s", self.peer, e)
            self._option_busy = False
            self._close_transport(abort=True)
            return
        try:
            upgraded = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except Exception as exc:
            # A bad certificate, a timeout, a reset, a closed transport: whatever it was, after
            # the acknowledgement there is no plain-text fallback, so the connection ends.
            log.info("%s: TLS handshake failed: %s", self.peer, exc or type(exc).__name__)
            self._option_busy = False
            self._close_transport(abort=True)
            if not self._lost:
                self.connection_lost(None)
            return
        if upgraded is None or self._lost:
            self._option_busy = False
            await self._finish(clean=False)
            return
        tls_transport = upgraded
        self.transport = tls_transport
        self._reading_paused = False  # start_tls resumed reading on the new transport
        tls_transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        ssl_object = tls_transport.get_extra_info("ssl_object")
        self.client = Client(common_name=peer_identity(ssl_object))
        version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else "TLS"
        log.info("%s: %s started, client %s", self.peer, version, self.client.describe())
        self._option_busy = False
        if self._stopping:
            self._close_transport()
            if not self._finished.done():
                self._finished.set_result(None)
            return
        self._update_reading()
        self._process()

    def _begin_open(self, name: str, go: bool) -> None:
        self._option_busy = True
        self._update_reading()
        self._loop.create_task(self._open(self._open_export(name, go)))

    async def _open(self, answer: Coroutine[Any, Any, None]) -> None:
        try:
            await answer
        except Exception:
            # A bug, not a client mistake; still, the option must not stay unanswered with the
            # socket open: drop the connection.
            log.exception("%s: answering an option failed", self.peer)
            self._option_busy = False
            self._close_transport(abort=True)
            if self._lost:
                await self._finish(clean=False)

    async def _open_export(self, name: str, go: bool) -> None:
        machine = self.machine
        view: View | None = None
        error: tuple[int, str] | None = None
        info, why = self._find(name)
        remote = await self._owner(name) if info is None else None
        if info is None and remote is None and self.server.forwarder is not None:
            # Mid-failover the volume may have no owner for a few seconds: wait for one.
            remote = await self.server.forwarder.await_owner(
                name, lambda: self._find(name)[0] is not None)
            if remote is None:
                info, why = self._find(name)
        access = self._access(info.name if info is not None else name)
        if info is None and remote is None:
            error = (c.REP_ERR_UNKNOWN, why)
        elif access is None:
            error = (c.REP_ERR_POLICY, self._denied(info.name if info is not None else name))
        else:
            try:
                if remote is not None:
                    assert self.server.forwarder is not None
                    proxied = await self.server.forwarder.open(
                        name, remote, self.peer, self._forward_failed)
                    view, info = proxied, proxied.info
                else:
                    assert info is not None
                    view = await self.server.exports.open_export(info.name, self.peer)
                if access == READ_ONLY:
                    info = dataclasses.replace(info, read_only=True)
            except OwmError as e:
                reply = getattr(e, "reply_type", 0) or _OPTION_ERRORS.get(
                    type(e).__name__, c.REP_ERR_UNKNOWN)
                error = (reply, str(e))
            except Exception:
                log.exception("opening export %r failed", name)
                error = (c.REP_ERR_UNKNOWN, "The export could not be opened.")
        if view is not None and (self._lost or self._stopping):
            # Transmission never started, so no I/O can have been torn: a clean end.
            with contextlib.suppress(Exception):
                await view.close(clean=True)
            view = None
            error = (c.REP_ERR_SHUTDOWN, "The server is stopping.")
        self._option_busy = False
        if self._lost:
            await self._finish(clean=False)
            return
        if view is not None:
            assert info is not None
            self.view = view
            info = dataclasses.replace(
                info, size=view.size, read_only=view.read_only or info.read_only
            )
            log.info("%s opened export %r", self.peer, info.name)
            self._send(machine.reply_info(info) if go else machine.reply_export_name(info))
            if self._deadline is not None:
                self._deadline.cancel()
        else:
            assert error is not None
            log.info("%s could not open export %r: %s", self.peer, name, error[1])
            if not go:
                machine.refuse_export_name()
                self._close_transport()
                return
            self._send(machine.reply_option_error(*error))
        self._update_reading()
        self._process()

    # ------------------------------------------------------------------------ requests

    def _start_request(self, req: p.Request) -> None:
        if self._stopping:
            self._send(self.machine.reply_error(req.handle, c.ESHUTDOWN, "The server is stopping."))
            return
        self._inflight += 1
        cmd = req.command
        length = req.length
        view = self.view
        assert view is not None
        # Run the request eagerly until it first has to wait: a request the storage completes
        # without blocking (page-cache I/O) then costs no Task at all.  One that blocks is
        # handed to a real Task for the rest of its life.  A READ or WRITE runs the view's
        # own coroutine, with no coroutine of the server's around it (one frame less each).
        # READ and WRITE hold their length in memory while in flight.
        coro: Coroutine[Any, Any, Any]
        if cmd == c.CMD_WRITE:
            self._inflight_bytes += length
            self.server._buffered += length
            if length:
                assert req.payload is not None
                coro = view.write(req.offset, req.payload, bool(req.flags & c.CMD_FLAG_FUA))
            else:
                coro = self._run(req)
        elif cmd == c.CMD_READ:
            self._inflight_bytes += length
            self.server._buffered += length
            self._inflight_read_bytes += length
            coro = view.read(req.offset, length) if length else self._run(req)
        else:
            coro = self._run(req)
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            if cmd <= c.CMD_WRITE and length:
                self._io_done(req, stop.value)
            return
        except Exception as e:  # raised by a view's read or write before it first waited
            self._failed(req, e)
            self._io_end(req)
            return
        task: asyncio.Task[Any]
        if cmd <= c.CMD_WRITE and length:
            task = self._loop.create_task(self._io_finish(req, coro, waiting))
        else:
            task = self._loop.create_task(_resume(coro, waiting))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _io_finish(self, req: p.Request, coro: Coroutine[Any, Any, Any],
                         waiting: Any) -> None:
        """The rest of a READ or WRITE that had to wait."""
        try:
            value = await _resume(coro, waiting)
        except Exception as e:
            self._failed(req, e)
            self._io_end(req)
        except BaseException:
            self._io_end(req)
            raise
        else:
            self._io_done(req, value)

    def _io_done(self, req: p.Request, value: Any) -> None:
        """A READ (``value``: its data) or WRITE succeeded: reply, and let go of it."""
        length = req.length
        if req.command == c.CMD_READ:
            if len(value) != length:
                self._failed(req, OwmError(f"The storage returned {len(value)} of {length} bytes."))
            else:
                self._send_many(self.machine.reply_read(req.handle, req.offset, value))
            self._inflight_read_bytes -= length
        else:
            self._send(self.machine.reply_ok(req.handle))
        self._request_done(length)

    def _io_end(self, req: p.Request) -> None:
        """A READ or WRITE failed (its error reply is queued): let go of it."""
        if req.command == c.CMD_READ:
            self._inflight_read_bytes -= req.length
        self._request_done(req.length)

    def _failed(self, req: p.Request, e: Exception) -> None:
        """Reply to a request that raised ``e``: an OwmError as itself, anything else as EIO."""
        machine = self.machine
        handle = req.handle
        cmd = req.command
        if isinstance(e, OwmError):
            self._send(machine.reply_error(handle, c.wire_errno(e.errno), str(e)))
        elif isinstance(e, OSError):
            log.warning("%s: %s failed: %s", self.peer, c.COMMAND_NAMES.get(cmd, cmd), e)
            self._send(machine.reply_error(handle, c.wire_errno(e.errno), "The storage failed."))
        else:
            log.error("%s: %s failed", self.peer, c.COMMAND_NAMES.get(cmd, cmd), exc_info=e)
            self._send(machine.reply_error(handle, c.EIO, "Internal server error."))

    def _request_done(self, held: int) -> None:
        """A request finished (its reply is queued); ``held``: the bytes it held in memory."""
        self._inflight -= 1
        if held:
            self._inflight_bytes -= held
            self.server._buffered -= held
        if self._stalled or self._reading_paused:
            self._unstall()
        if self.server._waiting:
            self.server._wake()
        if self._inflight == 0 and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def _run(self, req: p.Request) -> None:
        """Every command but a READ or WRITE of at least one byte."""
        machine = self.machine
        view = self.view
        cmd = req.command
        handle = req.handle
        try:
            assert view is not None
            if cmd == c.CMD_READ:  # of no bytes
                self._send_many(machine.reply_read(handle, req.offset, b""))
            elif cmd == c.CMD_WRITE:  # of no bytes
                self._send(machine.reply_ok(handle))
            elif cmd == c.CMD_FLUSH:
                await view.flush()
                self._send(machine.reply_ok(handle))
            elif cmd == c.CMD_BLOCK_STATUS:
                extents = await view.block_status(req.offset, req.length)
                self._send(
                    machine.reply_block_status(
                        handle,
                        req.length,
                        [(e.length, e.nbd_flags) for e in extents],
                        bool(req.flags & c.CMD_FLAG_REQ_ONE),
                    )
                )
            elif cmd == c.CMD_WRITE_ZEROES:
                flags = req.flags
                no_hole = bool(flags & c.CMD_FLAG_NO_HOLE)
                if flags & c.CMD_FLAG_FAST_ZERO and no_hole:
                    # Fully provisioned zeroes cost as much as a write: fail fast, as asked.
                    self._send(
                        machine.reply_error(handle, c.ENOTSUP, "Zeroing without holes is not fast.")
                    )
                else:
                    if req.length:
                        await view.write_zeroes(
                            req.offset, req.length, bool(flags & c.CMD_FLAG_FUA), not no_hole
                        )
                    self._send(machine.reply_ok(handle))
            elif cmd == c.CMD_TRIM:
                if req.length:
                    await view.trim(req.offset, req.length, bool(req.flags & c.CMD_FLAG_FUA))
                self._send(machine.reply_ok(handle))
            elif cmd == c.CMD_CACHE:
                if req.length:
                    await view.cache(req.offset, req.length)
                self._send(machine.reply_ok(handle))
            else:  # the machine only passes the commands above
                self._send(machine.reply_error(handle, c.EINVAL, "Unsupported command."))
        except Exception as e:
            self._failed(req, e)
        finally:
            self._request_done(0)

    def _unstall(self) -> None:
        """Parsing stopped at the limits; go on (from the loop, never recursively) once below."""
        if self._lost or self._busy():
            return
        if self._stalled:
            self._stalled = False
            self._loop.call_soon(self._process)
        self._update_reading()

    async def _wait_idle(self) -> None:
        while self._inflight:
            if self._idle is None:
                self._idle = self._loop.create_future()
            await self._idle

    # ------------------------------------------------------------------------- endings

    async def _finish(self, clean: bool) -> None:
        """Finish the requests in flight, close the view, then the connection."""
        if self._finishing:
            return
        self._finishing = True
        try:
            await self._wait_idle()
            self._flush()
            view, self.view = self.view, None
            if view is not None:
                try:
                    await view.close(clean=clean)
                except Exception:
                    log.exception("closing the view of %s failed", self.peer)
                how = "clean" if clean else "unclean"
                log.info("%s closed export %s (%s)", self.peer, view.export_name, how)
            self._close_transport()
        finally:
            if not self._finished.done():
                self._finished.set_result(None)
            self.server._connections.discard(self)

    def begin_shutdown(self) -> None:
        """Server stop: new requests get ESHUTDOWN; once idle, the session ends uncleanly."""
        if self._stopping:
            return
        self._stopping = True
        if self._lost or self._disconnecting:
            return
        if self.view is None and not self._option_busy:
            self._close_transport()
            if not self._finished.done():
                self._finished.set_result(None)
            return
        if not self._option_busy:
            self._loop.create_task(self._finish(clean=False))

    def drop(self) -> None:
        """Abort the connection the way a vanished client does: replies to requests in flight
        go nowhere, but the requests themselves run to their end (none is cut at an await)."""
        self._close_transport(abort=True)

    def force_close(self) -> None:
        self._close_transport(abort=True)
        for task in list(self._tasks):
            task.cancel()


def _bind_unix(path: str, mode: int, gid: int | None) -> socket.socket:
    """A Unix stream socket bound at ``path`` with exactly ``mode`` (and group ``gid``).

    bind() creates the file with the umask's permissions, so it is bound under a umask that
    leaves only the owner's bits; the group and the final mode are set before it listens.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
            bound = True
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


class NbdServer:
    """Serves an ``owm.common.view.Exports`` over NBD on TCP and/or a Unix socket."""

    def __init__(
        self,
        exports: Exports,
        *,
        tls_context: ssl.SSLContext | None = None,
        tls_mode: str = p.TLS_OFF,
        access: AccessRules | None = None,
        directory: Directory | None = None,
    ) -> None:
        if tls_mode not in p.TLS_MODES:
            raise ValueError(f"unknown TLS mode {tls_mode!r}")
        if tls_mode != p.TLS_OFF and tls_context is None:
            raise ValueError(f"TLS mode {tls_mode!r} needs an SSL context")
        self.exports = exports
        self.tls_context = tls_context if tls_mode != p.TLS_OFF else None
        self.tls_mode = tls_mode
        self.access = access
        # With a cluster's directory, exports served by other daemons are forwarded there.
        self.forwarder = Forwarder(directory, exports) if directory is not None else None
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path: str | None = None
        self._stopping = False
        self.tcp_port = 0
        # Seconds a client gets from connecting to entering transmission.
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        # Bytes held for every connection: requests in flight and replies queued (see _busy).
        self._buffered = 0
        self._waiting: set[_Connection] = set()  # stopped at MAX_BUFFERED_BYTES
        self._recheck: asyncio.TimerHandle | None = None
        self._busy_sessions = 0  # sessions that sent a request within ACTIVE_WINDOW
        self._busy_counted = float("-inf")
        self.refused_connections = 0
        self.accepted_connections = 0  # since start, for the daemon's metrics
        self._refusal_logged = -10.0
        # Buffers for WRITE payloads that arrive over several receives, used again once free.
        self.payload_buffers = p.PayloadBuffers()

    def use_directory(self, directory: Directory) -> None:
        """Forward exports served by other daemons of the cluster from now on (the daemon
        calls this once it has joined its cluster, when its own addresses are known)."""
        self.forwarder = Forwarder(directory, self.exports)

    def drop_volume(self, volume: str) -> int:
        """Close at once every connection to ``volume`` or one of its images, because this
        daemon no longer serves it (it moved to another daemon).  Requests in flight get no
        reply, so the client or front door that reconnects sends them again to the new owner;
        a reply of "this session is closed" would reach the client as an I/O error instead."""
        dropped = 0
        for conn in list(self._connections):
            view = conn.view
            if view is None or isinstance(view, ProxyView):
                continue
            name = view.export_name
            if name == volume or name.startswith(volume + "@"):
                conn.drop()
                dropped += 1
        if dropped:
            log.info("closed %d connection(s) to %s, which is no longer served here",
                     dropped, volume)
        return dropped

    def _refused_connection(self, peer: str) -> None:
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 10.0:  # one line per 10 s, however many are refused
            self._refusal_logged = now
            log.warning("refused a connection from %s: %d connections are open already "
                        "(%d refused so far)", peer, MAX_CONNECTIONS, self.refused_connections)

    def _request_limit(self, now: float) -> int:
        """Requests one connection may have in flight now (``now``: the loop's time): all of
        them while it is the only busy session, a fair share while others are busy too."""
        if now - self._busy_counted >= SHARE_RECHECK:
            self._busy_counted = now
            since = now - ACTIVE_WINDOW
            self._busy_sessions = sum(1 for conn in self._connections if conn._last_request > since)
        return MAX_INFLIGHT_REQUESTS if self._busy_sessions <= 1 else FAIR_INFLIGHT_REQUESTS

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for all connections: request data in flight and replies not yet sent."""
        return self._buffered

    def _recount(self) -> None:
        # Transports drain without telling (below their high-water mark): look again.
        for conn in list(self._connections):
            conn._refresh_queued()

    def _over_budget(self, conn: _Connection) -> bool:
        """True (and ``conn`` waits for :meth:`_wake`) while the server holds too much."""
        if self._buffered < MAX_BUFFERED_BYTES:
            return False
        self._recount()
        if self._buffered < MAX_BUFFERED_BYTES:
            return False
        self._waiting.add(conn)
        if self._recheck is None and not self._stopping:
            self._recheck = asyncio.get_running_loop().call_later(
                BUDGET_RECHECK, self._recheck_budget)
        return True

    def _recheck_budget(self) -> None:
        self._recheck = None
        if not self._waiting:
            return
        self._recount()
        self._wake()
        if self._waiting and self._recheck is None and not self._stopping:
            self._recheck = asyncio.get_running_loop().call_later(
                BUDGET_RECHECK, self._recheck_budget)

    def _wake(self) -> None:
        """Let the connections that stopped at the server's cap go on, once below it."""
        if not self._waiting or self._buffered >= MAX_BUFFERED_BYTES:
            return
        waiting, self._waiting = self._waiting, set()
        for conn in waiting:
            conn._budget_freed()

    @property
    def connection_count(self) -> int:
        """Connections currently open, in any phase."""
        return len(self._connections)

    @property
    def inflight_requests(self) -> int:
        """Requests received and not answered yet, over every connection."""
        return sum(conn._inflight for conn in self._connections)

    async def start(
        self,
        tcp: tuple[str, int] | None = None,
        unix_path: str | os.PathLike[str] | None = None,
        *,
        unix_mode: int = 0o600,
        unix_gid: int | None = None,
    ) -> None:
        """Listen on ``tcp`` (host, port; port 0 picks a free one) and/or ``unix_path``.

        The Unix socket gets ``unix_mode`` (0600 unless told otherwise) and, with ``unix_gid``,
        that group; it never exists with a wider mode, not even for a moment.
        """
        loop = asyncio.get_running_loop()
        factory: Callable[[], _Connection] = lambda: _Connection(self)  # noqa: E731
        unix_factory: Callable[[], _Connection] = lambda: _Connection(self, unix=True)  # noqa: E731
        if tcp is not None:
            host, port = tcp
            srv = await loop.create_server(factory, host, port, reuse_address=True, backlog=128)
            self._servers.append(srv)
            sockets = srv.sockets or ()
            if sockets:
                self.tcp_port = int(sockets[0].getsockname()[1])
        if unix_path is not None:
            path = os.fspath(unix_path)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            sock = _bind_unix(path, unix_mode, unix_gid)
            try:
                srv = await loop.create_unix_server(unix_factory, sock=sock, backlog=128)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            self._servers.append(srv)
            self._unix_path = path
        if not self._servers:
            raise ValueError("NbdServer.start needs a TCP address or a Unix socket path")

    async def adopt(self, sock: socket.socket, transcript: bytes, answers: bytes,
                    unix: bool = False) -> None:
        """Serve a client whose handshake another process began (``owm serve --workers``: the
        parent greets the client and answers options until GO or EXPORT_NAME, then passes the
        socket here).  ``transcript`` is every byte that process read from the client;
        ``answers`` has one byte per option event it answered itself (1: the export it named
        existed, which matters for a metadata context); the rest is answered here."""
        conn = _Connection(self, unix=unix)
        conn._adopted = (transcript, answers)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish the requests in flight (up to ``grace`` seconds), close views."""
        self._stopping = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for srv in self._servers:
            srv.close()
        connections = list(self._connections)
        for conn in connections:
            conn.begin_shutdown()
        waiters: list[Any] = [conn._finished for conn in connections]
        if waiters:
            _done, pending = await asyncio.wait(waiters, timeout=grace)
            if pending:
                log.warning("%d connections did not finish in %.1f s", len(pending), grace)
                for conn in connections:
                    if not conn._finished.done():
                        conn.force_close()
                await asyncio.wait(waiters, timeout=grace)
        self._servers.clear()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None
