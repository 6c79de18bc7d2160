"""The front door of a cluster: an NBD session forwarded to the daemon that owns its volume.

In a cluster every daemon accepts clients for every volume, but only the owner holds a volume's
sessions, generations and engine locks.  When a client asks a daemon for an export it does not
serve and the cluster's :class:`~owm.common.cluster.Directory` names another owner, the server
opens a :class:`ProxyView`: an ordinary ``View`` whose every request goes to the owner over one
NBD connection of its own (``owm.nbd.client``).  The server in front of it works as for a local
view, so the client's TLS and access rules, the limits on requests in flight and the reply
batching all stay the front door's; the upstream connection carries as many requests at once as
the client sends, matched by handle, with no per-request work that grows with the queue depth.

Why forwarding rather than moving the ownership to where the sessions are: a volume's sessions
(all generations of them, and the draining images they hold) must live in one process, and a
client of any daemon may open one at any moment; moving the owner for each new client would
make every connection a failover and would ping-pong a volume between daemons whose clients
share it.  Forwarding costs one extra hop per request and keeps ownership where the cluster
layer put it.

**Owner changes.**  When the upstream connection ends (the owner was killed, moved or failed
over, or it answers ESHUTDOWN because it is stopping), the proxy asks the directory again where
the volume is, with backoff, for at most ``relocate_total`` seconds; it reconnects (or opens the
volume locally if this daemon is now its owner) and sends again every request that had no
answer yet.  The client sees only answers the owner gave.  The new upstream connection is a new
session of the owner: the old session ended uncleanly, so an image it was draining ends
*drained-unclean* there and its label stays true.  When the bound runs out, every waiting
request fails with EIO and the client connection is closed.

**Durability: the proxy keeps NBD's promise and adds none of its own.**  A write acknowledged
with FUA is durable on the owner that acknowledged it, so it survives any failover.  A write
acknowledged *without* FUA may be lost by an owner that dies before a flush (NBD allows a server
that) — and a FLUSH sent again to the *new* owner would succeed without covering it, so hiding
the reconnection would make that flush lie.  The proxy therefore counts writes acknowledged
without FUA and not yet covered by a completed flush; if an upstream connection ends with any,
the next FLUSH of every session of that volume through this front door (the export says
CAN_MULTI_CONN, so a flush on one connection speaks for all) fails with EIO once, as an fsync
does after lost write-back, and only later flushes succeed again.  (Keeping those writes to
replay them on the new owner would not be safe: another session may have written the same
blocks there since, and a replay would put older data over newer.)  Requests that had no answer
are sent again as they are: the client had no acknowledgement of them, so nothing it sent after
them may depend on their order.  A paused owner that resumes after being replaced must be kept
from writing by the cluster's fencing; the proxy has dropped its connection by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from owm.common.cluster import Directory, Remote
from owm.common.errors import NotFound, OwmError, Unavailable
from owm.common.names import parse_export_name
from owm.common.view import ExportInfo, Exports, Extent, View
from owm.nbd import constants as c
from owm.nbd.client import ConnectionLost, NbdClient, NbdError

log = logging.getLogger("owm.nbd.proxy")

RELOCATE_TOTAL = 30.0  # seconds a session may spend finding its volume's owner again
RELOCATE_FIRST_DELAY = 0.05  # first wait between attempts; doubles up to the next
RELOCATE_MAX_DELAY = 1.0
CONNECT_TIMEOUT = 5.0  # one attempt to reach an owner
OPEN_TOTAL = 10.0  # an owner unreachable while a client opens its export: retried this long
# Forwarded opens waiting on an owner at once.  A directory that names this daemon itself, or
# two daemons that each name the other mid-failover, would chain connections without end;
# past this many the open is refused and the whole chain unwinds with errors.
MAX_OPENING = 64
STALL_AFTER = 2.0  # no answer for this long with requests waiting: ask whether the owner moved

T = TypeVar("T")

# What a request is, for the flush accounting.
_READ, _WRITE, _WRITE_FUA, _FLUSH = range(4)


def _retryable(error: NbdError) -> bool:
    """Whether the request was not carried out for a reason another owner may not have: the
    connection ended before an answer, or the owner is stopping (ESHUTDOWN)."""
    return isinstance(error, ConnectionLost) or error.errno == c.ESHUTDOWN


class _Upstream:
    """An NBD connection to the owner, with the ``View`` methods the proxy forwards to."""

    def __init__(self, client: NbdClient, remote: Remote) -> None:
        self.client = client
        self.remote = remote
        self.size = client.size
        self.read_only = client.read_only

    def read(self, offset: int, length: int) -> Awaitable[bytes]:
        return self.client.read(offset, length)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool
    ) -> Awaitable[None]:
        return self.client.write(offset, data, fua)

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None]:
        return self.client.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> Awaitable[None]:
        return self.client.write_zeroes(offset, length, no_hole=not may_trim, fua=fua)

    def flush(self) -> Awaitable[None]:
        return self.client.flush()

    def cache(self, offset: int, length: int) -> Awaitable[None]:
        return self.client.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.client.meta_context_id is None:
            return [Extent(length)]  # the owner offers no allocation map: all data
        runs = await self.client.block_status(offset, length)
        return [Extent(n, hole=bool(f & 1), zero=bool(f & 2)) for n, f in runs]

    async def close(self, clean: bool = True) -> None:
        if clean:
            await self.client.disconnect(timeout=10.0)
        else:
            self.client.abort()


def _describe(remote: Remote) -> str:
    host, port = remote.nbd
    return f"daemon {remote.daemon} at {host}:{port}"


def info_of(name: str, client: NbdClient) -> ExportInfo:
    """The export as the owner described it to ``client``."""
    return ExportInfo(
        name=name,
        description=client.description,
        size=client.size,
        read_only=client.read_only,
        min_block=client.min_block,
        preferred_block=client.preferred_block,
        max_block=client.max_block,
        can_multi_conn=client.can_multi_conn,
    )


class Forwarder:
    """The front door of one NBD server: finds owners, opens proxied views, lists the cluster."""

    def __init__(
        self,
        directory: Directory,
        local: Exports,
        *,
        relocate_total: float = RELOCATE_TOTAL,
        open_total: float = OPEN_TOTAL,
        stall_after: float = STALL_AFTER,
    ) -> None:
        self.directory = directory
        self.local = local
        self.relocate_total = relocate_total
        self.open_total = open_total
        self.stall_after = stall_after
        self._opening = 0
        # Per volume: how many upstream connections ended holding writes acknowledged without
        # FUA and not flushed (see the module's docstring).  Only grows, one int per volume.
        self._lost_writes: dict[str, int] = {}

    async def owner(self, name: str) -> Remote | None:
        """The other daemon that serves export ``name`` (``NAME`` or ``NAME@N``), if any."""
        try:
            volume, _ = parse_export_name(name)
        except OwmError:
            return None
        return await self.directory.locate(volume)

    async def await_owner(self, name: str, served_here: Callable[[], bool]) -> Remote | None:
        """The owner of export ``name`` when its volume exists in the cluster but has no owner
        at this instant (its owner died and no daemon has taken it over yet): wait for one,
        bounded by ``open_total``, instead of telling the client there is no such export (a
        definite answer that makes qemu's reconnecting client give up).  None at once for a
        volume the cluster does not know; None as soon as ``served_here()`` (this daemon took
        it over itself) or once the bound is spent."""
        try:
            volume, _ = parse_export_name(name)
        except OwmError:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_total
        delay = RELOCATE_FIRST_DELAY
        try:
            if volume not in await self.directory.exports():
                return None
            while loop.time() + delay < deadline:
                if served_here():
                    return None
                remote = await self.directory.locate(volume)
                if remote is not None:
                    return remote
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELOCATE_MAX_DELAY)
        except Exception as exc:  # etcd unreachable, say: the client is told "no such export"
            log.warning("could not find the owner of export %r: %s", name, exc)
        return None

    async def _connect(
        self, name: str, remote: Remote, *, info_only: bool, timeout: float
    ) -> NbdClient:
        host, port = remote.nbd
        if info_only:
            return await NbdClient.query(name, host=host, port=port, timeout=timeout)
        return await NbdClient.connect(name, host=host, port=port, timeout=timeout)

    async def _reach(self, name: str, remote: Remote, *, info_only: bool) -> NbdClient:
        """Connect to the owner, retrying (bounded) while it cannot be reached or is stopping;
        a definite refusal (no such export, not allowed) is raised at once."""
        if self._opening >= MAX_OPENING:
            raise Unavailable(f"Too many forwarded exports are being opened at once; does the "
                              f"directory name this daemon as the owner of {name!r}?")
        self._opening += 1
        try:
            return await self._reach_owner(name, remote, info_only=info_only)
        finally:
            self._opening -= 1

    async def _reach_owner(self, name: str, remote: Remote, *, info_only: bool) -> NbdClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_total
        delay = RELOCATE_FIRST_DELAY
        while True:
            remaining = deadline - loop.time()
            try:
                return await self._connect(
                    name, remote, info_only=info_only, timeout=max(0.1, min(CONNECT_TIMEOUT,
                                                                         remaining)))
            except NbdError as e:
                if e.reply_type and e.reply_type != c.REP_ERR_SHUTDOWN:
                    raise
                why = str(e)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                why = str(e) or type(e).__name__
            if loop.time() + delay >= deadline:
                raise Unavailable(f"The owner of export {name!r} ({_describe(remote)}) cannot "
                                  f"be reached: {why.rstrip('.')}.")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RELOCATE_MAX_DELAY)
            newer = await self.owner(name)
            if newer is not None:
                remote = newer

    async def info(self, name: str, remote: Remote) -> ExportInfo:
        """What the owner tells about export ``name`` (for NBD_OPT_INFO), without opening it."""
        return info_of(name, await self._reach(name, remote, info_only=True))

    async def open(
        self, name: str, remote: Remote, peer: str, on_fail: Callable[[], None]
    ) -> ProxyView:
        """A view of export ``name`` on its owner, for the client ``peer``.  ``on_fail`` is
        called when the session cannot go on (the re-locate bound ran out): close the client."""
        client = await self._reach(name, remote, info_only=False)
        volume, _ = parse_export_name(name)
        log.info("%s: export %r forwarded to %s", peer, name, _describe(remote))
        return ProxyView(self, name, volume, peer, _Upstream(client, remote), on_fail)

    async def list_exports(self, local: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The local exports, then every other export of the cluster (no description)."""
        seen = {name for name, _ in local}
        out = list(local)
        for name in await self.directory.exports():
            if name not in seen:
                seen.add(name)
                out.append((name, ""))
        return out

    def lost_writes(self, volume: str) -> int:
        return self._lost_writes.get(volume, 0)

    def note_lost_writes(self, volume: str) -> None:
        self._lost_writes[volume] = self._lost_writes.get(volume, 0) + 1


class ProxyView:
    """A ``View`` served by the volume's owner over NBD (see the module's docstring)."""

    def __init__(
        self,
        forwarder: Forwarder,
        name: str,
        volume: str,
        peer: str,
        upstream: _Upstream,
        on_fail: Callable[[], None],
    ) -> None:
        self.export_name = name
        self.size = upstream.size
        self.read_only = upstream.read_only
        self.info = info_of(name, upstream.client)
        self._forwarder = forwarder
        self._volume = volume
        self._peer = peer
        self._target: _Upstream | View = upstream
        self._generation = 0  # bumped each time the upstream connection is given up
        self._relocating: asyncio.Task[None] | None = None
        self._failed: OwmError | None = None
        self._on_fail = on_fail
        self._closed = False
        # Writes acknowledged without FUA (a running count) and how many of them a completed
        # flush covers; the difference is what an owner's crash may lose.
        self._unforced = 0
        self._flushed = 0
        self._lost_seen = forwarder.lost_writes(volume)
        # Requests waiting on the upstream, and when it last answered one: an owner that was
        # paused and replaced keeps its connection open, so silence is checked too (_watch).
        self._waiting = 0
        self._answered = 0.0
        self._watcher: asyncio.Task[None] | None = None

    @property
    def remote(self) -> Remote | None:
        """The owner this view forwards to now (None once it is served locally)."""
        return self._target.remote if isinstance(self._target, _Upstream) else None

    # ------------------------------------------------------------------------ forwarding

    async def _call(self, kind: int, op: Callable[[_Upstream | View], Awaitable[T]]) -> T:
        """Run ``op`` on the current target; on a lost upstream, wait for the next one and run
        it again, until it gets an answer or the session fails."""
        while True:
            if self._failed is not None:
                raise self._failed
            relocating = self._relocating
            if relocating is not None:
                await asyncio.shield(relocating)
                continue
            target, generation = self._target, self._generation
            covered = self._unforced
            if self._waiting == 0:
                self._answered = asyncio.get_running_loop().time()
                if self._watcher is None and isinstance(target, _Upstream):
                    self._watcher = asyncio.get_running_loop().create_task(self._watch())
            self._waiting += 1
            try:
                result = await op(target)
            except NbdError as e:
                if not isinstance(target, _Upstream) or not _retryable(e) or self._closed:
                    raise
                self._lost(generation, e)
                continue
            finally:
                self._waiting -= 1
                self._answered = asyncio.get_running_loop().time()
            if kind == _WRITE:
                if generation == self._generation:
                    self._unforced += 1
                else:
                    # Acknowledged by an upstream given up meanwhile: nothing flushes it now.
                    self._forwarder.note_lost_writes(self._volume)
            elif kind == _FLUSH:
                if generation == self._generation:
                    self._flushed = max(self._flushed, covered)
                lost = self._forwarder.lost_writes(self._volume)
                if lost != self._lost_seen:
                    self._lost_seen = lost
                    raise OwmError(
                        f"Writes to {self._volume} acknowledged without FUA before its owner "
                        "changed may have been lost; this flush cannot vouch for them."
                    )
            return result

    async def _watch(self) -> None:
        """While requests wait, ask the directory whether the owner changed once the upstream
        has been silent for ``stall_after`` seconds (a paused owner that the cluster fenced and
        replaced never closes its connection); if it did, give the upstream up."""
        loop = asyncio.get_running_loop()
        stall = self._forwarder.stall_after
        try:
            while not self._closed and self._waiting:
                await asyncio.sleep(max(0.05, self._answered + stall - loop.time()))
                target, generation = self._target, self._generation
                if (self._closed or not self._waiting or self._relocating is not None
                        or loop.time() - self._answered < stall
                        or not isinstance(target, _Upstream)):
                    continue
                try:
                    now = await self._forwarder.owner(self.export_name)
                except Exception as e:
                    log.warning("%s: locating %r failed: %s", self._peer, self.export_name, e)
                    now = target.remote
                if now != target.remote and generation == self._generation:
                    self._lost(generation, ConnectionLost(
                        f"no answer for {loop.time() - self._answered:.1f} s and the "
                        f"directory names {_describe(now) if now else 'this daemon'} now"))
                else:
                    self._answered = loop.time()  # the same owner, just slow: look again later
        finally:
            self._watcher = None

    def _lost(self, generation: int, error: NbdError) -> None:
        """The upstream of ``generation`` is gone: give it up and find the owner again."""
        if generation != self._generation or self._relocating is not None:
            return
        if self._unforced > self._flushed:
            self._forwarder.note_lost_writes(self._volume)
            self._flushed = self._unforced
        self._generation += 1
        old = self._target
        if isinstance(old, _Upstream):
            log.warning("%s: the connection to %s for %r ended (%s); finding the owner again",
                        self._peer, _describe(old.remote), self.export_name, error)
            old.client.abort()  # every request still waiting on it moves on at once
        self._relocating = asyncio.get_running_loop().create_task(self._relocate())

    async def _relocate(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._forwarder.relocate_total
        delay = RELOCATE_FIRST_DELAY
        why = "no attempt finished"
        try:
            while not self._closed:
                remaining = deadline - loop.time()
                try:
                    target = await asyncio.wait_for(self._next_target(remaining), remaining)
                except asyncio.CancelledError:
                    raise
                except (OwmError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                    why = str(e) or type(e).__name__
                else:
                    if self._closed:
                        await _quietly_close(target)
                        return
                    if target.size != self.size or (target.read_only and not self.read_only):
                        await _quietly_close(target)
                        self._fail(f"Export {self.export_name!r} changed its size or became "
                                   "read-only while its owner changed.")
                        return
                    self._target = target
                    where = _describe(target.remote) if isinstance(target, _Upstream) else "here"
                    log.info("%s: export %r now served by %s", self._peer, self.export_name,
                             where)
                    return
                if loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELOCATE_MAX_DELAY)
            if self._closed:
                return
            self._fail(f"The owner of {self.export_name!r} could not be found again within "
                       f"{self._forwarder.relocate_total:g} s: {why.rstrip('.')}.")
        finally:
            self._relocating = None

    async def _next_target(self, remaining: float) -> _Upstream | View:
        remote = await self._forwarder.owner(self.export_name)
        if remote is None:
            # This daemon serves the volume now (it took it over), or nobody does.
            try:
                self._forwarder.local.export_info(self.export_name)
            except NotFound:
                raise NotFound(f"No daemon serves {self.export_name!r} now.") from None
            return await self._forwarder.local.open_export(self.export_name, self._peer)
        timeout = max(0.1, min(CONNECT_TIMEOUT, remaining))
        client = await self._forwarder._connect(
            self.export_name, remote, info_only=False, timeout=timeout)
        return _Upstream(client, remote)

    def _fail(self, message: str) -> None:
        log.warning("%s: %s", self._peer, message)
        self._failed = Unavailable(message)
        if not self._closed:
            self._on_fail()

    # ------------------------------------------------------------------------ View

    async def read(self, offset: int, length: int) -> bytes:
        return await self._call(_READ, lambda t: t.read(offset, length))

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        await self._call(_WRITE_FUA if fua else _WRITE, lambda t: t.write(offset, data, fua))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._call(_WRITE_FUA if fua else _WRITE, lambda t: t.trim(offset, length, fua))

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        await self._call(
            _WRITE_FUA if fua else _WRITE,
            lambda t: t.write_zeroes(offset, length, fua, may_trim),
        )

    async def flush(self) -> None:
        await self._call(_FLUSH, lambda t: t.flush())

    async def cache(self, offset: int, length: int) -> None:
        await self._call(_READ, lambda t: t.cache(offset, length))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self._call(_READ, lambda t: t.block_status(offset, length))

    async def close(self, clean: bool = True) -> None:
        """End the upstream session the way the client ended its own (clean or not)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        relocating = self._relocating
        if relocating is not None:
            relocating.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relocating
        await _quietly_close(self._target, clean)


async def _quietly_close(target: _Upstream | View, clean: bool = False) -> None:
    try:
        await target.close(clean=clean)
    except Exception:
        log.exception("closing the upstream of a forwarded session failed")
