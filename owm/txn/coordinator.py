"""The transaction coordinator: the transaction queue 502 and processes 503–508 of [0050]–[0052].

Transactions are submitted to a queue and dispatched to *workers*; each worker holds one NBD
session to the live export and runs one transaction at a time on it.  A transaction declares
its application locks (``owm.locks.app``) and takes all of them before it starts; it is *started*
the moment it is given a worker, and its generation is that worker's.

At a preserve (``Coordinator.preserve``) the coordinator asks the daemon to split the volume,
then opens new sessions, which the daemon binds to the live image B, and switches: from that
instant every transaction starts on a new worker, while the transactions already running finish
on their old workers (on the preserved image A, their writes mirrored onto B).  An old worker
takes no new transaction; it closes its session when its transaction ends, and when the last
one has closed, the image is drained, transaction-consistent, ready for backup.

Two ways to switch, both consistent:

* ``overlap`` (the default): old workers keep starting transactions while the new sessions are
  being opened, and the switch happens once they are all open.  No transaction ever waits for
  the preserve: the time during which nothing could start is zero.  The preserved image then
  also holds the transactions that started in those few milliseconds, whole (a transaction's
  generation is the worker it started on, and every worker of the old generation ends).
* ``gate`` (the description's Figure 4 read literally): nothing starts from the moment the
  preserve is asked for until the first new session is open.  That interval is measured and
  reported as ``no_start_ms``; it is the preserve itself plus one NBD connection.

Why transactions take their locks *before* being given a worker: a transaction that was
waiting for a lock at the switch must not run on an old worker, where it would read A and might
undo a new transaction's change on B (see ``owm.locks.app``).  Taking the locks first and the
worker second makes "running on an old worker" imply "held every lock before the switch".

``quiesce`` is the prior art of Figure 3B, kept for comparison: stop starting transactions,
wait for every running one, take a point-in-time copy, resume.

Several volumes (``connect`` a mapping of volume name to connect function): every worker holds
one session per volume, all opened before it takes a transaction, and a transaction reaches
them as ``ctx.sessions``.  With a group preserve as ``split``, a worker's sessions are either
all of the old cut (opened before the preserve was asked for) or all of the new one (opened
after it returned), so a running transaction finishes on its old sessions on every volume and
a new one starts on new sessions everywhere.  A worker whose sessions were being opened while
a preserve began (a replacement for a broken worker, a late joiner) could straddle the cut, one
volume old and another new: it is closed instead of put in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from owm.common.errors import OwmError, Timeout, WrongState
from owm.locks.app import Locks
from owm.nbd.client import NbdClient, NbdError

log = logging.getLogger("owm.txn.coordinator")

T = TypeVar("T")
R = TypeVar("R")
JSON = dict[str, Any]
Connect = Callable[[], Awaitable[NbdClient]]
Mode = Literal["overlap", "gate"]


@dataclass(slots=True)
class TxnRecord:
    """What happened to one transaction (times from the coordinator's clock, in seconds)."""

    id: int
    name: str
    locks: tuple[str, ...]
    arrived: float
    locked: float | None = None
    started: float | None = None
    finished: float | None = None
    generation: int | None = None
    worker: str | None = None
    ok: bool | None = None
    error: str | None = None
    lock_blocked: float = 0.0  # seconds the lock space made it wait (others held its locks)

    @property
    def wait(self) -> float | None:
        """Arrival to start: everything the transaction waited for."""
        return None if self.started is None else self.started - self.arrived

    @property
    def ready_wait(self) -> float | None:
        """All locks held to start: the time it could have run but was not given a worker."""
        if self.started is None or self.locked is None:
            return None
        return self.started - self.locked

    @property
    def lock_wait(self) -> float | None:
        return None if self.locked is None else self.locked - self.arrived

    @property
    def system_wait(self) -> float | None:
        """Arrival to start, less the time spent queued behind another transaction's lock:
        what the system (a pause, a busy loop, no free worker) made it wait."""
        if self.started is None:
            return None
        return self.started - self.arrived - self.lock_blocked


@dataclass(slots=True)
class TxnContext:
    """What a transaction's body gets: its worker's NBD session and who it is.

    ``fencing_token`` is the token its locks were granted with (``owm.locks.app``): stamp the
    work with it, so that whatever receives that work can refuse it once it has seen a larger
    token for the same data (the locks were lost, e.g. a lease that expired, and taken since).
    """

    nbd: NbdClient
    generation: int
    worker: str
    record: TxnRecord
    fencing_token: int | None = None
    sessions: Mapping[str, NbdClient] = field(default_factory=dict)  # by volume (several)


@dataclass(frozen=True)
class Transaction(Generic[T]):
    """A unit of work: the locks it needs (all taken before it starts) and its body."""

    locks: Sequence[str]
    body: Callable[[TxnContext], Awaitable[T]]
    name: str = "txn"


@dataclass(slots=True, eq=False)
class Worker:
    """One session to the live export, bound to the generation it was opened in."""

    name: str
    generation: int
    client: NbdClient
    busy: bool = False
    transactions: int = 0
    state: str = "idle"
    sessions: dict[str, NbdClient] = field(default_factory=dict)  # by volume (several)
    cuts: int = 0  # the coordinator's preserve count when its sessions began to open


@dataclass(eq=False)
class Handover:
    """The report of one preserve: when each step happened and what it cost."""

    image: str
    mode: Mode
    old_generation: int
    new_generation: int
    requested: float
    preserved: float = 0.0
    switched: float = 0.0
    old_closed: float | None = None
    new_workers: int = 0
    old_running_at_switch: int = 0
    no_start_s: float = 0.0
    _closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def preserve_ms(self) -> float:
        return (self.preserved - self.requested) * 1000

    @property
    def connect_ms(self) -> float:
        return (self.switched - self.preserved) * 1000

    async def wait_old_closed(self, timeout: float | None = None) -> bool:
        """True once every old worker has closed its session (the image can drain)."""
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True

    def as_dict(self) -> JSON:
        return {
            "image": self.image, "mode": self.mode,
            "old_generation": self.old_generation, "new_generation": self.new_generation,
            "preserve_ms": round(self.preserve_ms, 3),
            "connect_ms": round(self.connect_ms, 3),
            "no_start_ms": round(self.no_start_s * 1000, 3),
            "old_running_at_switch": self.old_running_at_switch,
            "new_workers": self.new_workers,
            "old_closed_after_s": None if self.old_closed is None
            else round(self.old_closed - self.requested, 3),
        }


@dataclass(slots=True)
class Quiesce(Generic[R]):
    """The report of a quiesce: how long nothing could start, and what the copy returned."""

    requested: float
    idle: float
    resumed: float
    running_at_request: int
    result: R

    @property
    def no_start_s(self) -> float:
        return self.resumed - self.requested


class Coordinator:
    """Dispatches transactions to workers; at a preserve, hands over to a new generation.

    ``connect`` opens one NBD session to the live export; ``locks`` is the application lock
    space (local, or the daemon's through ``owm.control.lock_client``).
    """

    def __init__(
        self,
        connect: Connect | Mapping[str, Connect],
        locks: Locks,
        workers: int = 4,
        *,
        lock_timeout: float | None = 60.0,
        name: str = "w",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if workers < 1:
            raise ValueError("a coordinator needs at least one worker")
        if isinstance(connect, Mapping):
            if not connect:
                raise ValueError("a coordinator of several volumes needs at least one")
            self._volume_connects: dict[str, Connect] = dict(connect)
            self._connect = next(iter(connect.values()))
        else:
            self._volume_connects = {}
            self._connect = connect
        self._cuts = 0  # preserves begun: a worker opened across one may straddle the cut
        self.locks = locks
        self.size = workers
        self.lock_timeout = lock_timeout
        self.name = name
        self.clock = clock
        self.generation = 0
        self.records: list[TxnRecord] = []
        self.handovers: list[Handover] = []
        self._workers: list[Worker] = []
        self._idle: deque[Worker] = deque()
        self._want: deque[asyncio.Future[Worker]] = deque()
        self._busy = 0
        self._all_idle = asyncio.Event()
        self._all_idle.set()
        self._paused = False
        self._switching = False
        self._closing = False
        self._open_sessions: dict[int, int] = {}  # generation -> sessions not yet disconnected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._worker_ids = itertools.count(1)

    # ------------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open the first generation's sessions."""
        workers = await self._connect_many(self.generation, self.size)
        for w in workers:
            self._add(w)

    async def close(self, timeout: float = 60.0) -> None:
        """Let submitted transactions finish (bounded), then close every session."""
        self._closing = True
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=10)
        for w in list(self._workers):
            if not w.busy:
                self._retire(w)
        # Closing sessions can start more of it (a late new session closes as it opens).
        deadline = time.monotonic() + 30
        while self._background and time.monotonic() < deadline:
            await asyncio.wait(list(self._background), timeout=deadline - time.monotonic())

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------ transactions

    def submit(self, txn: Transaction[T], arrived: float | None = None) -> asyncio.Task[T]:
        """Queue a transaction; the task ends with its body's result (or error).

        ``arrived`` (on ``self.clock``) is when the request came, if earlier than now: a
        workload generator passes the time it meant to submit it, so that a busy event loop
        counts as waiting too.
        """
        if self._closing:
            raise WrongState("the coordinator is closing; it takes no new transactions")
        now = self.clock()
        record = TxnRecord(next(self._ids), txn.name, tuple(txn.locks),
                           now if arrived is None else min(arrived, now))
        self.records.append(record)
        task = asyncio.get_running_loop().create_task(self._run(txn, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, txn: Transaction[T]) -> T:
        return await self.submit(txn)

    async def _run(self, txn: Transaction[T], record: TxnRecord) -> T:
        owner = f"{self.name}-txn-{record.id}"
        try:
            record.lock_blocked = await self.locks.acquire(owner, txn.locks, self.lock_timeout)
        except BaseException as exc:
            record.ok, record.error = False, _describe(exc)
            raise
        record.locked = self.clock()
        token = self.locks.fencing_token(owner)
        try:
            worker = await self._take_worker()
            record.started = self.clock()
            record.generation, record.worker = worker.generation, worker.name
            worker.transactions += 1
            worker.state = f"running {txn.name}"
            try:
                result = await txn.body(TxnContext(worker.client, worker.generation,
                                                   worker.name, record, token,
                                                   worker.sessions))
            except BaseException as exc:
                record.ok, record.error = False, _describe(exc)
                self._give_back(worker, broken=isinstance(exc, NbdError))
                raise
            record.ok = True
            self._give_back(worker)
            return result
        finally:
            record.finished = self.clock()
            try:
                await self.locks.release(owner)
            except OwmError as exc:  # a lease that expired released them already
                log.warning("releasing the locks of %s failed: %s", owner, exc)

    # ------------------------------------------------------------------------ workers

    async def _take_worker(self) -> Worker:
        if not self._paused and self._idle and not self._want:
            return self._hand_out(self._idle.popleft())
        future: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._want.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._give_back(future.result())
            raise

    def _hand_out(self, worker: Worker) -> Worker:
        worker.busy = True
        self._busy += 1
        self._all_idle.clear()
        return worker

    def _give_back(self, worker: Worker, broken: bool = False) -> None:
        worker.busy = False
        worker.state = "idle"
        self._busy -= 1
        if self._busy == 0:
            self._all_idle.set()
        if broken or worker.generation != self.generation or self._closing:
            self._retire(worker)
            if broken and not self._closing and worker.generation == self.generation:
                self._spawn(self._replace(worker.generation))
            return
        self._idle.append(worker)
        self._dispatch()

    def _dispatch(self) -> None:
        while not self._paused and self._idle and self._want:
            future = self._want.popleft()
            if future.done():
                continue
            future.set_result(self._hand_out(self._idle.popleft()))

    def _add(self, worker: Worker) -> None:
        self._workers.append(worker)
        self._idle.append(worker)
        self._dispatch()

    async def _connect_one(self, generation: int) -> Worker:
        cuts = self._cuts
        sessions: dict[str, NbdClient] = {}
        if self._volume_connects:
            sessions = await self._connect_volumes()
            client = next(iter(sessions.values()))
        else:
            client = await self._connect()
        worker = Worker(f"{self.name}{next(self._worker_ids)}", generation, client,
                        sessions=sessions, cuts=cuts)
        self._open_sessions[generation] = self._open_sessions.get(generation, 0) + 1
        return worker

    async def _connect_volumes(self) -> dict[str, NbdClient]:
        """One session per volume, all of them or none."""
        names = list(self._volume_connects)
        results = await asyncio.gather(*(self._volume_connects[n]() for n in names),
                                       return_exceptions=True)
        opened = {n: r for n, r in zip(names, results, strict=True) if isinstance(r, NbdClient)}
        failed = [r for r in results if not isinstance(r, NbdClient)]
        if failed:
            for client in opened.values():
                with contextlib.suppress(OwmError, OSError):
                    await client.disconnect(timeout=10)
            raise failed[0]
        return opened

    def _straddles(self, worker: Worker) -> bool:
        """Whether a preserve began while ``worker``'s sessions of several volumes opened."""
        return bool(self._volume_connects) and worker.cuts != self._cuts

    async def _connect_many(self, generation: int, count: int) -> list[Worker]:
        results = await asyncio.gather(
            *(self._connect_one(generation) for _ in range(count)), return_exceptions=True
        )
        workers = [r for r in results if isinstance(r, Worker)]
        failed = [r for r in results if not isinstance(r, Worker)]
        if failed:
            for w in workers:
                self._close_session(w)
            raise failed[0]
        return workers

    async def _replace(self, generation: int) -> None:
        try:
            worker = await self._connect_one(generation)
        except OwmError as exc:
            log.warning("could not replace a broken worker: %s", exc)
            return
        if generation == self.generation and not self._closing and not self._straddles(worker):
            self._add(worker)
        else:
            self._close_session(worker)

    def _retire(self, worker: Worker) -> None:
        """Take ``worker`` out of service and close its session in the background."""
        if worker in self._workers:
            self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        self._close_session(worker)

    def _close_session(self, worker: Worker) -> None:
        worker.state = "closing"

        async def close() -> None:
            try:
                for client in worker.sessions.values() or [worker.client]:
                    try:
                        await client.disconnect(timeout=30)
                    except (OwmError, OSError) as exc:
                        log.warning("closing a session of %s failed: %s", worker.name, exc)
                        client.abort()
            finally:
                worker.state = "closed"
                self._open_sessions[worker.generation] -= 1
                self._check_handovers()

        self._spawn(close())

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _check_handovers(self) -> None:
        for h in self.handovers:
            if h.old_closed is None and h.switched and not any(
                n for g, n in self._open_sessions.items() if g <= h.old_generation
            ):
                h.old_closed = self.clock()
                h._closed.set()

    # ------------------------------------------------------------------------ preserve

    async def preserve(
        self,
        split: Callable[[], Awaitable[str]],
        *,
        mode: Mode = "overlap",
        new_workers: int | None = None,
        connect_timeout: float = 30.0,
    ) -> Handover:
        """Split the volume with ``split`` (which asks the daemon and returns the image name),
        then hand over to new sessions.  Returns once the new generation is serving; wait for
        the old one with ``handover.wait_old_closed()`` (and for the image with the daemon).
        """
        if self._switching:
            raise WrongState("a preserve or a quiesce is already under way")
        if mode not in ("overlap", "gate"):
            raise ValueError(f"unknown handover mode {mode!r}")
        self._switching = True
        self._cuts += 1
        requested = self.clock()
        if mode == "gate":
            self._paused = True
        try:
            image = await split()
            preserved = self.clock()
            count = new_workers or self.size
            new_generation = self.generation + 1
            # Gate: open one session alone (racing all of them makes the first one slower),
            # switch, and let the others join as they open.  Overlap: switch once all are open.
            first = 1 if mode == "gate" else count
            tasks: list[asyncio.Future[Worker]] = [
                asyncio.ensure_future(self._connect_one(new_generation)) for _ in range(first)
            ]
            ready = await self._first_connected(tasks, first, connect_timeout)
        except BaseException:
            self._paused = False
            self._dispatch()
            self._switching = False
            raise
        handover = Handover(image, mode, self.generation, new_generation, requested,
                            preserved=preserved, new_workers=count)
        self.handovers.append(handover)
        self._switch(handover, ready)
        for _ in range(count - first):
            self._spawn(self._connect_one(new_generation)).add_done_callback(self._join_late)
        self._switching = False
        return handover

    async def _first_connected(
        self, tasks: list[asyncio.Future[Worker]], need: int, timeout: float
    ) -> list[Worker]:
        pending: set[asyncio.Future[Worker]] = set(tasks)
        ready: list[Worker] = []
        deadline = time.monotonic() + timeout
        try:
            while len(ready) < need:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    raise Timeout(f"the new sessions did not open within {timeout:g} s")
                for task in done:
                    ready.append(task.result())
        except BaseException:
            for task in pending:
                task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    self._close_session(task.result())
            raise
        return ready

    def _switch(self, handover: Handover, ready: list[Worker]) -> None:
        """The instant of the handover: one step of the event loop, nothing can interleave."""
        handover.switched = self.clock()
        handover.no_start_s = (
            handover.switched - handover.requested if handover.mode == "gate" else 0.0
        )
        self.generation = handover.new_generation
        old_idle = list(self._idle)
        handover.old_running_at_switch = sum(1 for w in self._workers if w.busy)
        for w in old_idle:
            self._retire(w)
        for w in ready:
            self._workers.append(w)
            self._idle.append(w)
        self._paused = False
        self._dispatch()
        self._check_handovers()
        log.info("handover to generation %d: %s", self.generation, handover.as_dict())

    def _join_late(self, task: asyncio.Future[Worker]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.warning("a new session could not be opened: %s", exc)
            return
        worker = task.result()
        if (worker.generation == self.generation and not self._closing
                and not self._straddles(worker)):
            self._add(worker)
        else:
            self._close_session(worker)

    # ------------------------------------------------------------------------ quiesce

    async def quiesce(self, copy: Callable[[], Awaitable[R]]) -> Quiesce[R]:
        """The prior art (Figure 3B): stop starting transactions, wait until none runs, run
        ``copy`` (a point-in-time copy), resume."""
        if self._switching:
            raise WrongState("a preserve or a quiesce is already under way")
        self._switching = True
        requested = self.clock()
        running = self._busy
        self._paused = True
        try:
            await self._all_idle.wait()
            idle = self.clock()
            result = await copy()
        finally:
            self._paused = False
            self._switching = False
            self._dispatch()
        return Quiesce(requested, idle, self.clock(), running, result)

    # ------------------------------------------------------------------------ looking in

    @property
    def running(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return sum(1 for f in self._want if not f.done())

    def workers(self) -> list[Worker]:
        """Workers in service (closing ones are no longer listed)."""
        return list(self._workers)

    def open_sessions(self, generation: int) -> int:
        return self._open_sessions.get(generation, 0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return str(exc) or type(exc).__name__
