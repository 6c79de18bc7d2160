"""Handing NBD connections from the parent of ``owm serve --workers N`` to the worker that owns
the export: the parent's front door, and the file-descriptor passing both sides use.

The parent accepts every NBD client (TCP and POOL/nbd.sock), greets it and runs the option
phase with its own protocol machine (``owm.nbd.protocol``) until the client opens an export:
it answers structured replies, NBD_OPT_LIST (every worker's exports), NBD_OPT_INFO (from the
worker's status of the volume), the metadata-context options, and unknown or malformed names
(with the usual one sentence).  At GO or EXPORT_NAME of an export a worker serves it stops
reading and passes the socket to that worker with ``SCM_RIGHTS`` over a ``SOCK_SEQPACKET`` pair,
in one message: whether it came over the Unix socket, one byte per option event it answered
(whether the export named existed) and every byte it read from the client.  The worker's server
(``NbdServer.adopt``) replays those bytes through a fresh machine, skipping the answered events,
and answers GO itself; from then on the parent is out of the data path.  A client may so ask
about exports of several workers on one connection (``nbdinfo --list`` does) before it opens
one.

TLS is not handed over (an SSL session cannot move between processes): ``--workers`` above 1
refuses ``--tls`` (see ``owm.daemon.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from owm.common.errors import InvalidRequest
from owm.common.names import parse_export_name
from owm.common.view import ExportInfo
from owm.nbd import constants as c
from owm.nbd import protocol as p
from owm.nbd.access import READ_ONLY, AccessRules, Client

log = logging.getLogger("owm.daemon.handoff")

_HEADER = struct.Struct("!IB")  # answered option events, came over the Unix socket
MAX_TRANSCRIPT = 256 * 1024  # bytes a handshake may take before it is handed over
MAX_MESSAGE = _HEADER.size + MAX_TRANSCRIPT
HANDSHAKE_TIMEOUT = 60.0
RECV_SIZE = 64 * 1024


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The parent's and the worker's ends of a handoff channel (message boundaries kept)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setblocking(False)
    return parent, child


async def send_connection(channel: socket.socket, conn: socket.socket, transcript: bytes,
                          answers: bytes, unix: bool) -> None:
    """Pass ``conn`` and its handshake so far over ``channel`` (non-blocking) in one message."""
    message = _HEADER.pack(len(answers), int(unix)) + answers + transcript
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(channel, [message], [conn.fileno()])
            return
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(channel.fileno(), _wake, ready)
            try:
                await asyncio.wait_for(ready, 10.0)
            finally:
                loop.remove_writer(channel.fileno())


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def receive_connection(channel: socket.socket) -> tuple[socket.socket, bytes, bytes, bool] | None:
    """One handed-over connection from ``channel`` (readable now), or None when the parent
    closed its end (it died or stopped).  Raises BlockingIOError when nothing was there."""
    data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 4)
    if not fds:
        if not data:
            return None
        raise BlockingIOError("a handoff message without a connection")
    for extra in fds[1:]:
        os.close(extra)
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(False)
    if len(data) < _HEADER.size:
        conn.close()
        raise BlockingIOError("a truncated handoff message")
    count, unix = _HEADER.unpack_from(data)
    answers = bytes(data[_HEADER.size:_HEADER.size + count])
    return conn, bytes(data[_HEADER.size + count:]), answers, bool(unix)


# Given an export name: the index of the worker serving it, or None (no such volume).
Route = Callable[[str], int | None]
# The worker ``index`` takes the connection; False if it cannot now (it is restarting).
Hand = Callable[[int, socket.socket, bytes, bytes, bool], Awaitable[bool]]
# What NBD_OPT_INFO tells about an export (None: there is none of that name).
Info = Callable[[str], Awaitable[ExportInfo | None]]


class FrontDoor:
    """The parent's NBD listeners: handshakes up to the export name, then the handoff."""

    def __init__(self, route: Route, exports: Callable[[], Awaitable[list[tuple[str, str]]]],
                 info: Info, hand: Hand, access: AccessRules | None = None) -> None:
        self.route = route
        self.info = info
        self.exports = exports
        self.hand = hand
        self.access = access
        self.tcp_port = 0
        self.handed_over = 0
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_path: str | None = None

    def listen(self, sock: socket.socket, unix: bool) -> None:
        sock.setblocking(False)
        self._listeners.append((sock, unix))
        if not unix:
            self.tcp_port = int(sock.getsockname()[1])
        else:
            self._unix_path = str(sock.getsockname())

    def start(self) -> None:
        for sock, unix in self._listeners:
            self._spawn(self._accept(sock, unix))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop accepting; handshakes not handed over yet end (their sockets close)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for sock, _unix in self._listeners:
            sock.close()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)

    async def _accept(self, listener: socket.socket, unix: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("accepting an NBD client failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if not unix:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._handshake(conn, unix))

    def _allowed(self, client: Client, name: str) -> bool:
        return self.access is None or self.access.decide(client, name) is not None

    async def _answer_info(self, machine: p.ServerConnection, client: Client,
                           name: str) -> bytes:
        worker, why = self._name_error(name)
        info = await self.info(name) if worker is not None else None
        if info is None:
            return machine.reply_option_error(c.REP_ERR_UNKNOWN, why or
                                              f"There is no export named {name!r}.")
        access = self.access.decide(client, info.name) if self.access is not None else "rw"
        if access is None:
            who = client.describe()
            return machine.reply_option_error(
                c.REP_ERR_POLICY, f"Client {who} is not allowed to open export {info.name!r}.")
        if access == READ_ONLY:
            info = dataclasses.replace(info, read_only=True)
        return machine.reply_info(info)

    def _name_error(self, name: str) -> tuple[int | None, str]:
        """The worker of export ``name``, or None and the sentence the client is told."""
        try:
            if name:
                parse_export_name(name)
        except InvalidRequest as e:
            return None, f"{e}."
        worker = self.route(name)
        return worker, "" if worker is not None else f"There is no export named {name!r}."

    async def _handshake(self, conn: socket.socket, unix: bool) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                if not await self._negotiate(conn, unix):
                    conn.close()
        except TimeoutError:
            log.info("an NBD client did not name an export in time")
            conn.close()
        except (OSError, p.ProtocolError) as exc:
            log.info("an NBD client's handshake ended: %s", exc)
            conn.close()
        except BaseException:
            conn.close()
            raise

    async def _negotiate(self, conn: socket.socket, unix: bool) -> bool:
        """Run the option phase until an export of a worker is named: True once handed over
        (``conn`` then belongs to the worker), False to close it."""
        loop = asyncio.get_running_loop()
        machine = p.ServerConnection()
        client = Client(unix=unix)
        await loop.sock_sendall(conn, machine.initiate())
        transcript = bytearray()
        answers = bytearray()
        while True:
            event = machine.next_event()
            if event is p.NEED_DATA:
                data = await loop.sock_recv(conn, RECV_SIZE)
                if not data:
                    return False
                transcript += data
                if len(transcript) > MAX_TRANSCRIPT:
                    log.info("an NBD client's handshake was over %d bytes", MAX_TRANSCRIPT)
                    return False
                machine.receive_data(data)
                continue
            reply: bytes
            existed = False
            if isinstance(event, p.OptionHandled):
                reply = event.data
            elif isinstance(event, p.ListExports):
                exports = [e for e in await self.exports() if self._allowed(client, e[0])]
                reply = machine.reply_list(exports)
            elif isinstance(event, p.MetaContextRequest):
                name = event.export_name
                existed = self._name_error(name)[0] is not None and self._allowed(client, name)
                reply = machine.reply_meta_context(existed)
            elif isinstance(event, p.ExportInfoRequest) and not event.go:
                reply = await self._answer_info(machine, client, event.name)
            elif isinstance(event, p.ExportInfoRequest | p.ExportNameRequest):
                name = event.name
                worker, why = self._name_error(name)
                if worker is not None:
                    if await self.hand(worker, conn, bytes(transcript), bytes(answers), unix):
                        self.handed_over += 1
                        conn.close()  # the worker holds its own descriptor now
                        return True
                    why = "The export's worker process is restarting; try again shortly."
                if isinstance(event, p.ExportNameRequest):
                    machine.refuse_export_name()
                    return False
                code = c.REP_ERR_UNKNOWN if worker is None else c.REP_ERR_SHUTDOWN
                reply = machine.reply_option_error(code, why)
            elif isinstance(event, p.AbortRequest):
                await loop.sock_sendall(conn, event.data)
                return False
            else:  # closed, or anything a handshake does not have
                return False
            answers.append(int(existed))
            await loop.sock_sendall(conn, reply)
