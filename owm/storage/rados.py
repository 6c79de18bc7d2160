"""RADOS storage: each named object is striped over RADOS objects of a fixed size.

A named object ``NAME`` of volume ``VOL`` is a *head* object ``VOL/NAME`` (empty; it records that
the object exists, even when nothing was written to it) and stripe objects
``VOL/NAME/<index as 16 hex digits>``, each covering ``stripe_size`` bytes of the named object. A
stripe that does not exist reads as zeroes, and so does the part of a stripe past its end; a
discard removes the stripes it covers whole, and zeroes (or truncates, at a stripe's end) the
parts it covers partly. Every owm pool keeps its objects in its own RADOS namespace, so that
several pools (and RBD images) can share one RADOS pool.

Every RADOS call is librados's asynchronous one; its completion (on a librados thread) settles an
asyncio future with ``loop.call_soon_threadsafe``, so the event loop never waits on the network
and any number of requests are in flight at once. A RADOS write is durable once acknowledged, so
``write`` returns only then, and ``sync`` only waits for the writes still in flight on the object.

The synchronous calls of the protocol (``exists``, ``names``, ``bytes_used``) and ``extents`` are
answered from an in-memory index of every stripe and its size, loaded once when the backend is
opened (the daemon is the pool's only writer) and kept up to date by every write, discard and
delete. ``extents`` is therefore exact to the stripe and to each stripe's end, but a range zeroed
inside a stripe still reports as data (conservatively). RADOS errors become the errors the engines
handle for local storage: ``NoSpace`` for a full cluster, ``OwmError`` (EIO) for the rest, a lost
monitor or OSD included, which the client op timeouts turn into errors instead of hangs.

May import ``owm.common`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.common.errors import InvalidRequest, NoSpace, OwmError
from owm.storage import Buffer

log = logging.getLogger("owm.storage.rados")

DEFAULT_STRIPE = 4 << 20
MIN_STRIPE, MAX_STRIPE = 64 << 10, 64 << 20
OP_TIMEOUT = 30  # seconds a RADOS operation may take before it fails (EIO) instead of hanging
CONNECT_TIMEOUT = 10
_STAT_BATCH = 256


class RadosUnavailable(OwmError):
    """The cluster cannot be reached, or the rados binding is missing."""


class RadosFenced(OwmError):
    """The cluster refuses this client: it was blocklisted (another daemon took over)."""


def check_stripe_size(size: int) -> None:
    if size & (size - 1) or not MIN_STRIPE <= size <= MAX_STRIPE:
        raise InvalidRequest("a stripe size must be a power of two between 64K and 64M")


def _error(rv: int, what: str, timeout: float = OP_TIMEOUT) -> OwmError:
    code = -rv
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the RADOS pool is full while {what}")
    if code == errno.ESHUTDOWN:  # EBLOCKLISTED in Ceph
        return RadosFenced(f"storage error while {what}: the Ceph cluster refuses this daemon "
                           "(it was blocklisted: another daemon took its volumes over)")
    if code == errno.ETIMEDOUT:
        return OwmError(f"storage error while {what}: the Ceph cluster did not answer within "
                        f"{timeout:g} s")
    return OwmError(f"storage error while {what}: {os.strerror(code)} (from RADOS)")


@dataclass
class _Named:
    """What the index knows of one named object: whether its head exists, its stripes' sizes."""

    head: bool = False
    stripes: dict[int, int] = field(default_factory=dict)
    pending: set[asyncio.Future[None]] = field(default_factory=set)


Starter = Callable[[Any, Callable[..., None]], Any]  # (ioctx, on completion) -> Completion


def _aio_read(oid: str, length: int, offset: int) -> Starter:
    return lambda io, cb: io.aio_read(oid, length, offset, cb)


def _aio_write(oid: str, data: bytes, offset: int) -> Starter:
    return lambda io, cb: io.aio_write(oid, data, offset, oncomplete=cb)


def _aio_remove(oid: str) -> Starter:
    return lambda io, cb: io.aio_remove(oid, oncomplete=cb)


def _head(volume: str, name: str) -> str:
    return f"{volume}/{name}"


def _stripe(volume: str, name: str, index: int) -> str:
    return f"{volume}/{name}/{index:016x}"


class RadosBackend:
    """One connection to the cluster and the index of one owm pool's namespace in one RADOS pool.

    ``storage(volume)`` is the ``Pool``'s storage factory.
    """

    def __init__(self, cluster: Any, ioctx: Any, conf_path: Path, pool: str, namespace: str,
                 stripe_size: int) -> None:
        self._cluster = cluster
        self.ioctx = ioctx
        self.conf_path = conf_path
        self.pool = pool
        self.namespace = namespace
        self.stripe_size = stripe_size
        self.op_timeout: float = OP_TIMEOUT
        self.zero_swapped = False
        self.index: dict[str, dict[str, _Named]] = {}
        self.on_fenced: Callable[[str], None] | None = None  # told once a write is refused

    @property
    def client_address(self) -> str:
        """This connection's RADOS client address, what ``osd blocklist add`` takes."""
        return str(self._cluster.get_addrs()) if self._cluster is not None else ""

    @property
    def cluster_handle(self) -> Any:
        """The ``rados.Rados`` connection itself (for monitor commands), None once closed."""
        return self._cluster

    def fenced(self, error: OwmError) -> None:
        if isinstance(error, RadosFenced) and self.on_fenced is not None:
            self.on_fenced(str(error))

    async def reload(self, volume: str) -> None:
        """Load the index of one volume anew from RADOS: another daemon may have written it
        since this one opened (cluster mode: before taking a volume over)."""
        loop = asyncio.get_running_loop()
        prefix = volume + "/"

        def blocking() -> tuple[dict[str, _Named], list[tuple[str, str, int]]]:
            import rados

            found: dict[str, _Named] = {}
            stripes: list[tuple[str, str, int]] = []
            try:
                for obj in self.ioctx.list_objects():
                    if not obj.key.startswith(prefix):
                        continue
                    parts = obj.key.split("/")
                    if len(parts) == 2:
                        found.setdefault(parts[1], _Named()).head = True
                    elif len(parts) == 3:
                        with contextlib.suppress(ValueError):
                            stripes.append((parts[0], parts[1], int(parts[2], 16)))
                            found.setdefault(parts[1], _Named())
            except rados.Error as exc:
                raise _error(-getattr(exc, "errno", errno.EIO) or -errno.EIO,
                             f"listing the objects of volume {volume}") from None
            return found, stripes

        found, stripes = await loop.run_in_executor(None, blocking)
        index = self.index.setdefault(volume, {})
        index.clear()
        index.update(found)
        await self._load_sizes(stripes)

    @staticmethod
    def connect_blocking(conf_path: Path, *, timeout: float = CONNECT_TIMEOUT,
                         op_timeout: float = OP_TIMEOUT) -> Any:
        """Connect to the cluster of ``conf_path``; one sentence naming the monitors if not."""
        try:
            import rados
        except ImportError:
            raise RadosUnavailable("the Python rados binding is not installed (scripts/setup "
                                   "installs python3-rados)") from None
        if not conf_path.is_file():
            raise RadosUnavailable(f"the Ceph configuration {conf_path} does not exist")
        try:
            cluster = rados.Rados(conffile=str(conf_path), conf={
                "rados_osd_op_timeout": str(op_timeout),
                "rados_mon_op_timeout": str(op_timeout),
                "client_mount_timeout": str(int(timeout)),
                # librados's own complaints would land on the daemon's stderr beside owm's
                # one-line log; what went wrong is raised as one sentence instead.
                "log_to_stderr": "false", "err_to_stderr": "false",
            })
        except rados.Error as exc:
            raise RadosUnavailable(f"cannot use the Ceph configuration {conf_path}: "
                                   f"{exc}") from None
        try:
            mons = cluster.conf_get("mon_host") or "(none configured)"
        except rados.Error:
            mons = "(unknown)"
        if not _any_monitor_answers(str(mons), min(timeout, 3.0)):
            cluster.shutdown()
            raise RadosUnavailable(
                f"cannot reach the Ceph monitor at {mons} (from {conf_path}): nothing accepts "
                "a connection there")
        try:
            cluster.connect(timeout=int(timeout))
        except rados.Error as exc:
            cluster.shutdown()
            timed_out = isinstance(exc, rados.TimedOut | rados.InterruptedOrTimeoutError)
            within = f" within {timeout:.0f} s" if timed_out else ""
            raise RadosUnavailable(f"cannot reach the Ceph monitor at {mons} (from {conf_path})"
                                   f"{within}: {exc}") from None
        return cluster

    @classmethod
    async def open(cls, conf_path: Path, pool: str, namespace: str, stripe_size: int,
                   *, timeout: float = CONNECT_TIMEOUT,
                   op_timeout: float = OP_TIMEOUT) -> RadosBackend:
        """Connect, open ``pool`` and load the index of ``namespace`` (in a thread: start-up)."""
        check_stripe_size(stripe_size)
        loop = asyncio.get_running_loop()

        def blocking() -> tuple[Any, Any, dict[str, dict[str, _Named]],
                                list[tuple[str, str, int]], bool]:
            import rados

            cluster = cls.connect_blocking(conf_path, timeout=timeout, op_timeout=op_timeout)
            try:
                if not cluster.pool_exists(pool):
                    raise RadosUnavailable(f"the Ceph cluster of {conf_path} has no pool "
                                           f"named '{pool}'")
                ioctx = cluster.open_ioctx(pool)
                ioctx.set_namespace(namespace)
                swapped = _zero_args_swapped(ioctx)
                index: dict[str, dict[str, _Named]] = {}
                stripes: list[tuple[str, str, int]] = []
                for obj in ioctx.list_objects():
                    parts = obj.key.split("/")
                    if len(parts) == 2:
                        index.setdefault(parts[0], {}).setdefault(parts[1], _Named()).head = True
                    elif len(parts) == 3:
                        try:
                            number = int(parts[2], 16)
                        except ValueError:
                            continue
                        index.setdefault(parts[0], {}).setdefault(parts[1], _Named())
                        stripes.append((parts[0], parts[1], number))
            except rados.Error as exc:
                cluster.shutdown()
                raise RadosUnavailable(f"cannot list RADOS pool '{pool}': {exc}") from None
            except BaseException:
                cluster.shutdown()
                raise
            return cluster, ioctx, index, stripes, swapped

        cluster, ioctx, index, stripes, swapped = await loop.run_in_executor(None, blocking)
        backend = cls(cluster, ioctx, conf_path, pool, namespace, stripe_size)
        backend.zero_swapped = swapped
        backend.op_timeout = op_timeout
        backend.index = index
        try:
            await backend._load_sizes(stripes)
        except BaseException:
            await backend.close()
            raise
        log.info("RADOS pool %s namespace %s: %d objects in %d volumes", pool, namespace,
                 len(stripes), len(index))
        return backend

    async def _load_sizes(self, stripes: list[tuple[str, str, int]]) -> None:
        """Stat every stripe (in batches, asynchronously) for ``bytes_used`` and ``extents``."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(stripes), _STAT_BATCH):
            batch = stripes[start:start + _STAT_BATCH]
            futures = []
            for volume, name, number in batch:
                fut: asyncio.Future[int] = loop.create_future()

                def done(c: Any, size: int | None, mtime: Any,
                         fut: asyncio.Future[int] = fut) -> None:
                    rv = c.get_return_value()
                    loop.call_soon_threadsafe(_settle, fut, (size or 0) if rv >= 0 else rv)

                self.ioctx.aio_stat(_stripe(volume, name, number), done)
                futures.append(fut)
            for (volume, name, number), fut in zip(batch, futures, strict=True):
                size = await fut
                if size == -errno.ENOENT:
                    continue
                if size < 0:
                    raise RadosUnavailable(f"cannot stat the objects of RADOS pool "
                                           f"'{self.pool}': {os.strerror(-size)}")
                self.index[volume][name].stripes[number] = size

    def storage(self, volume: str) -> RadosStorage:
        return RadosStorage(self, volume, self.index.setdefault(volume, {}))

    def describe(self) -> dict[str, Any]:
        return {"kind": "rados", "ceph_conf": str(self.conf_path), "rados_pool": self.pool,
                "namespace": self.namespace, "stripe_size": self.stripe_size}

    async def close(self) -> None:
        """Close the connection (every storage must have been closed first)."""
        ioctx, cluster = self.ioctx, self._cluster
        self.ioctx = self._cluster = None
        if cluster is None:
            return

        def blocking() -> None:
            if ioctx is not None:
                ioctx.close()
            cluster.shutdown()

        await asyncio.get_running_loop().run_in_executor(None, blocking)


def _any_monitor_answers(mon_host: str, timeout: float) -> bool:
    """Whether a TCP connection to one of the monitors in ``mon_host`` is accepted.

    librados waits its whole mount timeout for a monitor that refuses connections; this says
    so at once. Addresses it cannot parse (a DNS name, a DNS SRV setup) count as answering and
    are left to librados.
    """
    import re
    import socket

    found = re.findall(r"(\d+\.\d+\.\d+\.\d+|\[[0-9A-Fa-f:]+\]):(\d+)", mon_host)
    if not found:
        return True
    for host, port in found:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _zero_args_swapped(ioctx: Any) -> bool:
    """Whether this python-rados passes ``WriteOp.zero(offset, length)`` to librados swapped.

    Ceph 16's binding does (a zero at offset 0 then asks for length 0, which the OSD answers by
    aborting); later ones do not. One probe object, written, zeroed in part and removed, tells.
    """
    oid = ".owm-zero-probe"  # no "/": never taken for a volume's object
    ioctx.write_full(oid, b"xxxx")
    op = ioctx.create_write_op()
    try:
        op.zero(1, 2)  # right: bytes 1-2; swapped: offset 2, length 1
        ioctx.operate_write_op(op, oid)
    finally:
        ioctx.release_write_op(op)
    got = ioctx.read(oid, 4)
    ioctx.remove_object(oid)
    return bool(got == b"xx\0x")


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class RadosStorage:
    """The named objects of one volume, striped over RADOS objects (see the module docstring)."""

    def __init__(self, backend: RadosBackend, volume: str, index: dict[str, _Named]) -> None:
        self._backend = backend
        self.volume = volume
        self.stripe_size = backend.stripe_size
        self._index = index
        self._lock = threading.Lock()  # only for the index's dict shape against names()

    # -- asyncio bridge ---------------------------------------------------------------------
    def _ioctx(self) -> Any:
        ioctx = self._backend.ioctx
        if ioctx is None:
            raise OwmError("storage error: the connection to the Ceph cluster is closed")
        return ioctx

    def _submit(self, start: Starter, what: str) -> asyncio.Future[Any]:
        """Start one aio call; the future gets its return value (and data, for reads)."""
        import rados

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(completion: Any, *data: Any) -> None:
            rv = completion.get_return_value()
            loop.call_soon_threadsafe(_settle, fut, (rv, data[0] if data else None))

        try:
            start(self._ioctx(), done)
        except rados.Error as exc:
            raise OwmError(f"storage error while {what}: {exc}") from None
        return fut

    async def _do(self, start: Starter, what: str,
                  missing_ok: bool = False) -> Any:
        rv, data = await self._submit(start, what)
        if rv < 0 and not (missing_ok and rv == -errno.ENOENT):
            err = _error(rv, what, self._backend.op_timeout)
            log.error("%s", err, extra={"volume": self.volume})
            self._backend.fenced(err)
            raise err
        return data if rv >= 0 else None

    def _track(self, named: _Named, coro: Any) -> asyncio.Future[None]:
        """Run a mutation as a task whose end ``sync`` can wait for."""
        task: asyncio.Future[None] = asyncio.ensure_future(coro)
        named.pending.add(task)
        task.add_done_callback(named.pending.discard)
        return task

    def _named(self, name: str, create: bool) -> _Named | None:
        if "/" in name or not name:
            raise ValueError(f"bad object name {name!r}")
        named = self._index.get(name)
        if named is None and create:
            with self._lock:
                named = self._index.setdefault(name, _Named())
        return named

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(stripe index, offset in the stripe, length) covering [offset, offset+length)."""
        out = []
        size = self.stripe_size
        pos, end = offset, offset + length
        while pos < end:
            number, inner = divmod(pos, size)
            n = min(size - inner, end - pos)
            out.append((number, inner, n))
            pos += n
        return out

    async def _ensure_head(self, name: str, named: _Named) -> None:
        if not named.head:
            named.head = True  # at once, so that concurrent writes create it only once
            oid = _head(self.volume, name)
            try:
                await self._do(lambda io, cb: io.aio_write_full(oid, b"", oncomplete=cb),
                               f"creating {name}")
            except BaseException:
                named.head = False
                raise

    # -- the Storage protocol ---------------------------------------------------------------
    async def read(self, name: str, offset: int, length: int) -> bytes:
        named = self._named(name, create=False)
        if named is None or length <= 0:
            return bytes(max(length, 0))
        pieces = self._pieces(offset, length)
        reads: list[asyncio.Future[Any] | None] = []
        for number, inner, n in pieces:
            if number not in named.stripes:
                reads.append(None)
                continue
            oid = _stripe(self.volume, name, number)
            reads.append(self._submit(_aio_read(oid, n, inner), f"reading {name}"))
        out = bytearray()
        for (_, _, n), fut in zip(pieces, reads, strict=True):
            if fut is None:
                out += bytes(n)
                continue
            rv, data = await fut
            if rv == -errno.ENOENT:
                data = b""
            elif rv < 0:
                err = _error(rv, f"reading {name}", self._backend.op_timeout)
                log.error("%s", err, extra={"volume": self.volume})
                self._backend.fenced(err)
                raise err
            # The return value is the length read: when it is 0, python-rados (16) hands back
            # its whole buffer, uninitialised, instead of an empty one.
            data = (data or b"")[:max(rv, 0)]
            out += data
            if len(data) < n:
                out += bytes(n - len(data))
        return bytes(out)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        named = self._named(name, create=True)
        assert named is not None
        if not len(data):
            return
        await self._track(named, self._write(name, named, offset, bytes(data)))

    async def _write(self, name: str, named: _Named, offset: int, data: bytes) -> None:
        steps = []
        if not named.head:
            steps.append(self._ensure_head(name, named))
        pos = 0
        for number, inner, n in self._pieces(offset, len(data)):
            # The index first: a concurrent read of the stripe then asks RADOS, which orders
            # it after this write (same object, same client), or finds nothing yet (zeroes).
            named.stripes[number] = max(named.stripes.get(number, 0), inner + n)
            oid = _stripe(self.volume, name, number)
            piece = data[pos:pos + n]
            steps.append(self._do(_aio_write(oid, piece, inner), f"writing {name}"))
            pos += n
        await _all(steps)

    async def sync(self, name: str) -> None:
        named = self._named(name, create=False)
        if named is None or not named.pending:
            return
        results = await asyncio.gather(*list(named.pending), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise OwmError(f"storage error while syncing {name}: an earlier write or "
                               f"discard on it failed ({result})")

    async def allocate(self, name: str, size: int) -> None:
        named = self._named(name, create=True)
        assert named is not None
        if not named.head:
            await self._track(named, self._ensure_head(name, named))

    async def discard(self, name: str, offset: int, length: int) -> None:
        named = self._named(name, create=False)
        if named is None or length <= 0:
            return
        await self._track(named, self._discard(name, named, offset, length))

    async def _discard(self, name: str, named: _Named, offset: int, length: int) -> None:
        import rados

        steps = []
        for number, inner, n in self._pieces(offset, length):
            size = named.stripes.get(number)
            if size is None or inner >= size:
                continue
            oid = _stripe(self.volume, name, number)
            if inner == 0 and inner + n >= size:
                del named.stripes[number]
                steps.append(self._do(_aio_remove(oid), f"discarding in {name}",
                                      missing_ok=True))
                continue
            op = self._ioctx().create_write_op()
            if inner + n >= size:
                op.truncate(inner)
                named.stripes[number] = inner
            elif self._backend.zero_swapped:
                op.zero(n, inner)
            else:
                op.zero(inner, n)
            steps.append(self._write_op(op, oid, f"discarding in {name}"))
        try:
            await _all(steps)
        except rados.Error as exc:
            raise OwmError(f"storage error while discarding in {name}: {exc}") from None

    async def _write_op(self, op: Any, oid: str, what: str) -> None:
        try:
            await self._do(lambda io, cb: io.operate_aio_write_op(op, oid, oncomplete=cb), what,
                           missing_ok=True)
        finally:
            op.release()

    async def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        named = self._named(name, create=False)
        runs: list[tuple[int, int, bool]] = []

        def add(start: int, n: int, data: bool) -> None:
            if n <= 0:
                return
            if runs and runs[-1][2] == data and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, data)
            else:
                runs.append((start, n, data))

        pos = offset
        for number, inner, n in self._pieces(offset, length):
            size = 0 if named is None else named.stripes.get(number, -1)
            if size < 0:
                size = 0
            data_end = min(inner + n, max(size, inner))
            add(pos, data_end - inner, True)
            add(pos + (data_end - inner), inner + n - data_end, False)
            pos += n
        return runs or [(offset, length, False)]

    async def delete(self, name: str) -> None:
        named = self._named(name, create=False)
        if named is None:
            return
        if named.pending:
            await asyncio.gather(*list(named.pending), return_exceptions=True)
        with self._lock:
            self._index.pop(name, None)
        oids = [_stripe(self.volume, name, n) for n in named.stripes]
        oids.append(_head(self.volume, name))
        steps = [self._do(_aio_remove(oid), f"deleting {name}", missing_ok=True)
                 for oid in oids]
        await _all(steps)

    def exists(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._index)

    def bytes_used(self, name: str) -> int:
        named = self._index.get(name)
        return 0 if named is None else sum(named.stripes.values())

    async def close(self) -> None:
        pending = [f for named in list(self._index.values()) for f in named.pending]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _all(steps: list[Any]) -> None:
    """Await every step (all of them, even after one failed), then raise the first failure."""
    if not steps:
        return
    if len(steps) == 1:
        await steps[0]
        return
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result



async def open_for_pool(conf_path: Path, pool: str, stripe_size: int | None,
                        recorded: dict[str, Any] | None, has_volumes: bool,
                        *, timeout: float = CONNECT_TIMEOUT) -> RadosBackend:
    """Open the RADOS storage of an owm pool, checked against what its catalog recorded.

    A new pool gets a namespace of its own; a pool on RADOS keeps its namespace and stripe
    size; a pool whose volumes are local files (nothing recorded) is refused.
    """
    import uuid

    if recorded is None or recorded.get("kind", "local") == "local":
        if has_volumes:
            raise InvalidRequest("this pool's volumes are local files; it cannot be served "
                                 "from RADOS (serve it without --ceph-conf)")
        namespace = f"owm-{uuid.uuid4().hex[:16]}"
        stripe = stripe_size or DEFAULT_STRIPE
    else:
        if recorded.get("kind") != "rados":
            raise InvalidRequest(f"this pool keeps its data in '{recorded.get('kind')}' storage, "
                                 "not in RADOS")
        if recorded.get("rados_pool") != pool:
            raise InvalidRequest(f"this pool keeps its data in RADOS pool "
                                 f"'{recorded.get('rados_pool')}', not '{pool}'")
        namespace = str(recorded["namespace"])
        stripe = int(recorded["stripe_size"])
        if stripe_size is not None and stripe_size != stripe:
            raise InvalidRequest(f"this pool's objects are striped in {stripe} bytes; a pool's "
                                 "stripe size cannot change (leave --stripe-size out)")
    return await RadosBackend.open(conf_path, pool, namespace, stripe, timeout=timeout)
