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


class _Waiter:
    """A ``sync`` (or a close, a delete) waiting for the mutations that were in flight when it
    began: ``fut`` gets None once they all ended, or the first failure among them (a negative
    return value, or the exception of a task)."""

    __slots__ = ("failure", "fut", "left")

    def __init__(self, fut: asyncio.Future[Any], left: set[object]) -> None:
        self.fut = fut
        self.left = left
        self.failure: int | BaseException | None = None


@dataclass
class _Named:
    """What the index knows of one named object: whether its head exists, its stripes' sizes,
    and the mutations on it still in flight.

    A mutation in flight is a *token* (the future its completion settles, or the task of a
    mutation run as one) in ``pending``; it leaves ``pending`` when its RADOS call completed,
    whatever became of the future: the request that awaited it may have been cancelled
    meanwhile, and the call still runs to its end. ``waiting`` holds the syncs waiting for
    some of them. This bookkeeping runs inline when a completion is handed to the loop (no
    done callbacks, no shields), which is what keeps a 4K write cheap.
    """

    head: bool = False
    stripes: dict[int, int] = field(default_factory=dict)
    pending: set[object] = field(default_factory=set)
    waiting: list[_Waiter] = field(default_factory=list)

    def ended(self, token: object, failure: int | BaseException | None) -> None:
        """The mutation ``token`` has completed (``failure``: None, a return value <0, or an
        exception); wake the waiters it was the last one of."""
        self.pending.discard(token)
        if not self.waiting:
            return
        keep = []
        for waiter in self.waiting:
            if waiter.fut.done():
                continue  # a cancelled sync
            if token in waiter.left:
                waiter.left.discard(token)
                if failure is not None and waiter.failure is None:
                    waiter.failure = failure
                if not waiter.left:
                    waiter.fut.set_result(waiter.failure)
                    continue
            keep.append(waiter)
        self.waiting = keep

    def idle(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any] | None:
        """A future settled once every mutation now in flight has ended (its result: the first
        failure among them, or None); None when nothing is in flight."""
        if not self.pending:
            return None
        waiter = _Waiter(loop.create_future(), set(self.pending))
        self.waiting.append(waiter)
        return waiter.fut


def _write_failure(value: Any) -> int | None:
    """The failure a mutation's completion value reports for ``sync``: its return value if
    negative, except -ENOENT (a discard's remove that found nothing to remove)."""
    rv = value[0]
    return rv if rv < 0 and rv != -errno.ENOENT else None


Starter = Callable[[Any, Callable[..., None]], Any]  # (ioctx, on completion) -> Completion


def _aio_read(oid: str, length: int, offset: int) -> Starter:
    return lambda io, cb: io.aio_read(oid, length, offset, cb)


def _aio_write(oid: str, data: bytes, offset: int) -> Starter:
    return lambda io, cb: io.aio_write(oid, data, offset, cb)  # positional: no keyword parsing


def _aio_operate(op: Any, oid: str) -> Starter:
    return lambda io, cb: io.operate_aio_write_op(op, oid, oncomplete=cb)


def _aio_remove(oid: str) -> Starter:
    return lambda io, cb: io.aio_remove(oid, oncomplete=cb)


_RADOS_ERROR: type[Exception] | None = None


def _rados_error() -> type[Exception]:
    """``rados.Error``, imported once (the binding is optional until a pool uses RADOS)."""
    global _RADOS_ERROR
    if _RADOS_ERROR is None:
        import rados

        _RADOS_ERROR = rados.Error
    return _RADOS_ERROR


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
        self._completions: _Completions | None = None

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

    def completions(self) -> _Completions:
        """The completion queue of the running loop.

        Asked for on every RADOS call, so the common case costs no system call: the loop the
        queue belongs to is running in this thread, hence it is the running loop (a thread runs
        one loop at a time). ``asyncio.get_running_loop`` checks the process id, a ``getpid``
        system call each time: it is only asked when that does not hold.
        """
        queue = self._completions
        if (queue is not None and queue.thread == threading.get_ident()
                and queue.loop.is_running()):
            return queue
        loop = asyncio.get_running_loop()
        if queue is None or queue.loop is not loop:
            queue = self._completions = _Completions(loop)
        return queue

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
        _keep_freed_memory()
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


def _as_bytes(data: Buffer) -> bytes:
    """``data`` as the ``bytes`` python-rados insists on: bytes as they are, a view of the
    whole of a bytes object as that object (a payload received in one piece), else one copy."""
    if type(data) is bytes:
        return data
    if type(data) is memoryview:
        obj = data.obj
        if type(obj) is bytes and data.nbytes == len(obj) and data.c_contiguous:
            return obj
    return bytes(data)


_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 128 << 20


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed payload buffers instead of giving them back at once.

    Every 1M write allocates a payload (and python-rados's ``bytes``) that is freed as soon as
    librados has copied it. With glibc's default thresholds those land in fresh mappings, or
    at a heap top that is trimmed again, so each request pays page faults on first touch and an
    unmap: the daemon's largest cost per 1M write, more than the copies themselves. Raising the
    thresholds keeps up to ``_TRIM_THRESHOLD`` of freed memory for reuse. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    mallopt(-1, _TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


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
    # No "/": never taken for a volume's object.  One name per process: daemons of a cluster
    # starting together would otherwise remove each other's probe half-way.
    oid = f".owm-zero-probe-{os.getpid()}-{os.urandom(4).hex()}"
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


_PINNED: set[int] = set()


def _pin_thread_state() -> None:
    """Keep the calling librados thread's Python thread state alive from now on.

    python-rados calls back with ``PyGILState_Ensure``/``Release``. On a thread Python did not
    start, each such pair creates a thread state and deletes it again, and in CPython 3.11 a
    new thread state maps a fresh 16 KiB frame stack (a page fault) that its deletion unmaps
    (a TLB shoot-down that interrupts the event loop's core too): per completion. perf put a
    quarter of the completion thread's time there at 4K writes. One ``PyGILState_Ensure``
    that is never released keeps the count above zero, so the state, and its stack, stays.
    """
    import ctypes

    _PINNED.add(threading.get_ident())
    ctypes.pythonapi.PyGILState_Ensure()


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class _Completions:
    """Completions from librados's threads, handed to one event loop in batches.

    ``put`` (on a librados thread) queues a future, its librados completion and the data read;
    only the first ``put`` into an empty queue wakes the loop (one ``call_soon_threadsafe``, one
    write to its wake-up fd), and the loop then settles everything queued by the time it runs.

    The return value is asked of the completion on the loop, not in the callback: python-rados
    releases the GIL around that call, and a librados thread that gives the GIL up in the
    middle of its callback must win it back from the event loop before the next completion
    can be delivered (two more GIL hand-offs, futex waits and context switches per call).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # the thread running ``loop``
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], Any, bytes | None, _Named | None]] = []

    def put(self, fut: asyncio.Future[Any], completion: Any, data: bytes | None,
            named: _Named | None) -> None:
        """Queue the end of the call for ``fut`` (``data``: what a read got); ``named``: the
        object whose mutation it was. Makes no librados call (see the class docstring)."""
        if threading.get_ident() not in _PINNED:
            _pin_thread_state()
        with self._lock:
            ready = self._ready
            ready.append((fut, completion, data, named))
            if len(ready) > 1:
                return  # a wake-up is already on its way and will take this one too
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for fut, completion, data, named in ready:
            value = (completion.get_return_value(), data)
            if named is not None:
                named.ended(fut, _write_failure(value))
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

    def _submit(self, start: Starter, what: str,
                named: _Named | None = None) -> asyncio.Future[Any]:
        """Start one aio call; the future gets (return value, data or None).

        With ``named`` the call is a mutation of that object: it is in its ``pending`` from
        now until its completion reaches the loop, however its future ends (the caller may
        await the future directly: a cancelled request cancels only its own wait).
        """
        queue = self._backend.completions()
        fut: asyncio.Future[Any] = queue.loop.create_future()
        put = queue.put

        def done(completion: Any, *data: Any) -> None:
            put(fut, completion, data[0] if data else None, named)

        try:
            start(self._ioctx(), done)
        except _rados_error() as exc:
            raise OwmError(f"storage error while {what}: {exc}") from None
        if named is not None:
            named.pending.add(fut)
        return fut

    def _fail(self, rv: int, what: str) -> OwmError:
        err = _error(rv, what, self._backend.op_timeout)
        log.error("%s", err, extra={"volume": self.volume})
        self._backend.fenced(err)  # blocklisted: this daemon must stop serving at once
        return err

    async def _do(self, start: Starter, what: str,
                  missing_ok: bool = False) -> Any:
        rv, data = await self._submit(start, what)
        if rv < 0 and not (missing_ok and rv == -errno.ENOENT):
            raise self._fail(rv, what)
        return data if rv >= 0 else None

    def _track(self, named: _Named, coro: Any) -> asyncio.Future[Any]:
        """Run a mutation as a task whose end ``sync`` can wait for."""
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        named.pending.add(task)

        def ended(t: asyncio.Future[Any]) -> None:
            named.ended(t, None if t.cancelled() else t.exception())

        task.add_done_callback(ended)
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
        size = self.stripe_size
        number, inner = divmod(offset, size)
        if inner + length <= size:  # one stripe: the common case, no assembling
            if number not in named.stripes:
                return bytes(length)
            return await self._read_piece(name, number, inner, length)
        pieces = self._pieces(offset, length)
        reads: list[asyncio.Future[Any] | None] = []
        for number, inner, n in pieces:
            if number not in named.stripes:
                reads.append(None)
                continue
            oid = _stripe(self.volume, name, number)
            reads.append(self._submit(_aio_read(oid, n, inner), f"reading {name}"))
        out = bytearray()
        failure: OwmError | None = None
        for (_, _, n), fut in zip(pieces, reads, strict=True):
            if fut is None:
                out += bytes(n)
                continue
            rv, data = await fut  # every piece is awaited, even after one failed
            if rv < 0 and rv != -errno.ENOENT:
                failure = failure or self._fail(rv, f"reading {name}")
                continue
            out += _piece(rv, data, n)
        if failure is not None:
            raise failure
        return bytes(out)

    async def _read_piece(self, name: str, number: int, inner: int, n: int) -> bytes:
        oid = _stripe(self.volume, name, number)
        rv, data = await self._submit(_aio_read(oid, n, inner), f"reading {name}")
        if rv < 0 and rv != -errno.ENOENT:
            raise self._fail(rv, f"reading {name}")
        return _piece(rv, data, n)

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        named = self._named(name, create=True)
        assert named is not None
        length = len(data)
        if not length:
            return
        # Every call (the head's too, on a first write) is started here, at once, each in the
        # object's ``pending`` until it completes (``sync`` waits for those); this request
        # awaits their futures directly: its cancellation ends its wait, not the tracking.
        if named.head:
            futures = self._start_writes(name, named, offset, data)
            if len(futures) == 1:  # the common case: one stripe
                rv, _ = await futures[0]
                if rv < 0:
                    raise self._fail(rv, f"writing {name}")
                return
        else:
            futures = [self._start_head(name, named)]
            futures += self._start_writes(name, named, offset, data)
        what = f"writing {name}"
        failure: OwmError | None = None
        for fut in futures:
            rv, _ = await fut
            if rv < 0 and failure is None:
                failure = self._fail(rv, what)
        if failure is not None:
            raise failure

    def _start_head(self, name: str, named: _Named) -> asyncio.Future[Any]:
        """Start creating the object's head (empty); a failure lets the next write retry."""
        named.head = True  # at once, so that concurrent writes create it only once
        oid = _head(self.volume, name)
        try:
            fut = self._submit(lambda io, cb: io.aio_write_full(oid, b"", oncomplete=cb),
                               f"creating {name}", named)
        except BaseException:
            named.head = False
            raise

        def settled(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.result()[0] < 0:
                named.head = False

        fut.add_done_callback(settled)
        return fut

    def _start_writes(self, name: str, named: _Named, offset: int,
                      payload: Buffer) -> list[asyncio.Future[Any]]:
        size = self.stripe_size
        number, inner = divmod(offset, size)
        length = len(payload)
        what = f"writing {name}"
        if inner + length <= size:
            pieces = [(number, inner, length)]
        else:
            pieces = self._pieces(offset, length)
        stripes = named.stripes
        futures = []
        view = memoryview(payload) if len(pieces) > 1 else None
        pos = 0
        for number, inner, n in pieces:
            # The index first: a concurrent read of the stripe then asks RADOS, which orders
            # it after this write (same object, same client), or finds nothing yet (zeroes).
            end = inner + n
            if stripes.get(number, 0) < end:
                stripes[number] = end
            oid = _stripe(self.volume, name, number)
            piece = _as_bytes(payload if view is None else view[pos:pos + n])
            futures.append(self._submit(_aio_write(oid, piece, inner), what, named))
            pos += n
        return futures

    async def sync(self, name: str) -> None:
        named = self._named(name, create=False)
        if named is None:
            return
        # A cancelled sync cancels only its own waiter, never the writes it waits for.
        idle = named.idle(self._backend.completions().loop)
        if idle is None:
            return
        failure = await idle
        if failure is None:
            return
        result = self._fail(failure, f"writing {name}") if isinstance(failure, int) else failure
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
        # Like a write, every RADOS call is started here, right after the index changes (and
        # before any other request runs), so RADOS sees them in the index's order.
        what = f"discarding in {name}"
        futures: list[asyncio.Future[Any]] = []
        try:
            for number, inner, n in self._pieces(offset, length):
                size = named.stripes.get(number)
                if size is None or inner >= size:
                    continue
                oid = _stripe(self.volume, name, number)
                if inner == 0 and inner + n >= size:
                    del named.stripes[number]
                    fut = self._submit(_aio_remove(oid), what, named)
                else:
                    op = self._ioctx().create_write_op()
                    if inner + n >= size:
                        op.truncate(inner)
                        named.stripes[number] = inner
                    elif self._backend.zero_swapped:
                        op.zero(n, inner)
                    else:
                        op.zero(inner, n)
                    try:
                        fut = self._submit(_aio_operate(op, oid), what, named)
                    except BaseException:
                        op.release()
                        raise
                    fut.add_done_callback(_releaser(op))
                futures.append(fut)
        except _rados_error() as exc:
            raise OwmError(f"storage error while {what}: {exc}") from None
        failure: OwmError | None = None
        for fut in futures:
            # Shielded (discards are rare): the op is released when its call has completed,
            # never by a cancelled request while RADOS still runs it.
            rv, _ = await (fut if fut.done() else asyncio.shield(fut))
            if rv < 0 and rv != -errno.ENOENT and failure is None:
                failure = self._fail(rv, what)
        if failure is not None:
            raise failure

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
        idle = named.idle(asyncio.get_running_loop())
        if idle is not None:
            await idle  # (a failure of one of them does not matter: the object goes)
        with self._lock:
            self._index.pop(name, None)
        oids = [_stripe(self.volume, name, n) for n in named.stripes]
        oids.append(_head(self.volume, name))
        what = f"deleting {name}"
        futures = [self._submit(_aio_remove(oid), what) for oid in oids]  # all at once, now
        failure: OwmError | None = None
        for fut in futures:
            rv, _ = await fut
            if rv < 0 and rv != -errno.ENOENT and failure is None:
                failure = self._fail(rv, what)
        if failure is not None:
            raise failure

    def exists(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._index)

    def bytes_used(self, name: str) -> int:
        named = self._index.get(name)
        return 0 if named is None else sum(named.stripes.values())

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        waits = [w for named in list(self._index.values()) if (w := named.idle(loop)) is not None]
        if waits:
            await asyncio.wait(waits)


def _releaser(op: Any) -> Callable[[asyncio.Future[Any]], None]:
    """A done callback that releases a librados write op once its call has completed."""
    def release(_fut: asyncio.Future[Any]) -> None:
        op.release()
    return release


def _piece(rv: int, data: bytes | None, n: int) -> bytes:
    """The ``n`` bytes of a piece whose read returned ``rv`` (its length, or -ENOENT)."""
    if rv <= 0:
        # 0: python-rados (16) hands back its whole buffer, uninitialised, not an empty one.
        return bytes(n)
    assert data is not None
    if len(data) != rv:
        data = data[:rv]
    return data if rv == n else data + bytes(n - rv)


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
