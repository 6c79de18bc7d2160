"""Application locks ([0053]): named FIFO locks that transactions hold from start to end.

These are the application's locks (the bank-account lock of the description), not the engine's
range locks: a transaction names the data it will touch ("account/17") and no other transaction
touches that data while it runs.  They live in memory, outside every volume, and are never part
of a backup.  ``LockSpace`` is the lock table of one process; ``LockService`` wraps it with
leases so that the daemon can serve it to workers in other processes (``owm.control.lock_routes``
and ``owm.control.lock_client``); both look the same to a transaction (the ``Locks`` protocol).

Conservative two-phase locking, and why the one-way mirror needs it
-------------------------------------------------------------------
A transaction declares every lock it needs when it starts, gets all of them before it does any
I/O, and releases them only when it has finished (``acquire`` refuses a second call by an owner
that still holds or waits for locks).  The reason is the preserve: a transaction that was
running at the preserve (an *old* transaction) reads and writes the preserved image A, and its
writes are mirrored onto the live image B.  If an old transaction could lock an account only
later, a *new* transaction (live image only) might already have changed that account on B; the
old transaction would then read the stale value from A, compute from it and write the result
to A and B, undoing the new transaction's change on B: a lost update.  With every lock taken
before the transaction starts, an old transaction already holds everything it will touch at
the moment of the preserve, so no new transaction can touch that data until the old one has
finished, and nothing an old transaction reads was ever changed by a newer one.  (The
coordinator also makes sure that "started" means "holds all its locks": a transaction still
waiting for a lock at the switch runs in the new generation.)

Deadlock freedom: the names are sorted and taken one at a time in that order, so no two
transactions can each hold a lock the other waits for.  Waiters are served strictly first come,
first served per lock: a lock released with waiters passes directly to the oldest of them, so a
later request can never barge in.

Leases and fencing tokens
-------------------------
A lease ends (closed, or not kept alive) possibly while one of its owners is still waiting:
that wait fails with ``LeaseGone`` and nothing taken under the lease stays held.  A lease id is
random, so an id from before a daemon restart is never taken for a new lease; an unknown id is
``LeaseGone`` (410 over the API).  A lease alone does not exclude a holder that was paused past
its ttl and carries on, so every completed ``acquire`` gets a *fencing token*: a number larger
than every token handed out before it, by this daemon or by an earlier run on the same pool
(its high-water mark is reserved in blocks in a small file in the pool, made durable before
any token of the block is handed out).  Whatever the transaction writes can carry its token,
and a store that has seen a larger token for the same data refuses the smaller one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import logging
import math
import secrets
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from owm.common.errors import InvalidRequest, NoSpace, OwmError, Timeout, WrongState
from owm.common.files import write_atomically

log = logging.getLogger("owm.locks.app")

JSON = dict[str, Any]

# The documented limits (README, OpenAPI).  Everything a client can make the daemon keep is
# bounded, and no call looks at more than the leases and locks it names.
MAX_NAME = 256  # characters of one lock name
MAX_LOCKS_PER_OWNER = 1024  # lock names one transaction declares
MAX_OWNER = 256  # characters of an owner (transaction) name
MAX_LABEL = 256  # characters of a lease label
MAX_TIMEOUT = 86400.0  # seconds an acquire may wait
MAX_OWNERS = 16384  # owners holding or waiting for locks at once, in one lock space
MAX_LOCKS = 65536  # distinct locks held or waited for at once, in one lock space
MAX_LEASES = 1024  # leases open at once on one daemon
MAX_OWNERS_PER_LEASE = 1024  # owners holding or waiting at once under one lease
FENCE_FILE = "applocks.fence"  # in the pool directory: the fencing tokens' high-water mark


class LeaseGone(WrongState):
    """A lock lease that was closed, expired, or was opened before the daemon restarted."""

    errno = errno.ESTALE


class LockLimit(WrongState):
    """A cap on leases, owners or locks is reached; try again when some are given back."""

    errno = errno.EAGAIN


class Locks(Protocol):
    """What a transaction needs from a lock space, local or served by the daemon."""

    async def acquire(
        self, owner: str, names: Sequence[str], timeout: float | None = None
    ) -> float:
        """Take every lock in ``names`` for ``owner`` (sorted, FIFO); return the seconds waited."""
        ...

    async def release(self, owner: str) -> list[str]:
        """Release everything ``owner`` holds (and give up a wait in progress)."""
        ...

    def fencing_token(self, owner: str) -> int | None:
        """The fencing token of ``owner``'s current grant (None unless it holds its locks)."""
        ...


def lock_names(names: Iterable[str]) -> list[str]:
    """The names a transaction declared, checked, without duplicates, in locking order."""
    if isinstance(names, str):
        raise InvalidRequest("lock names must be a list of names, not one string")
    unique = set()
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidRequest(f"a lock name must be a string of 1 to {MAX_NAME} characters")
        unique.add(name)
        if len(unique) > MAX_LOCKS_PER_OWNER:
            raise InvalidRequest(f"a transaction may hold at most {MAX_LOCKS_PER_OWNER} locks")
    if not unique:
        raise InvalidRequest("a transaction must name at least one lock")
    return sorted(unique)


def check_timeout(timeout: float | None) -> float | None:
    """A lock wait's timeout in seconds (None: no limit), bounded to ``MAX_TIMEOUT``."""
    if timeout is None:
        return None
    # Comparisons of int and float are exact in Python, so even a 400-digit integer is refused
    # here with a sentence rather than overflowing in float() later.
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        0 <= timeout <= MAX_TIMEOUT
    ):
        raise InvalidRequest(f"a lock timeout must be from 0 to {MAX_TIMEOUT:g} seconds")
    return float(timeout)


# ---------------------------------------------------------------------------- fencing tokens


class Fence(Protocol):
    """Where fencing tokens come from: each ``next()`` is larger than every earlier one."""

    def next(self) -> int: ...


class CountingFence:
    """Tokens for a lock space that lives and dies with one process (and its transactions)."""

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self) -> int:
        self.last += 1
        return self.last


class FenceFile:
    """Tokens that keep growing across restarts of the daemon, crashes and power losses included.

    The file holds the end of the block of tokens the daemon may hand out.  Before the first
    token of a new block is handed out, the block's end is written to a temporary file, synced,
    renamed over the file and the directory synced; a restart starts above it.  That is one
    sync per ``block`` grants, and tokens skip at most a block at each restart.  A damaged file
    cannot prove a high-water mark, so the count then restarts from the wall clock in
    microseconds, which no count of grants can have reached (it logs an error saying so).
    """

    MAGIC = "owm-applock-fence 1"

    def __init__(self, path: Path, block: int = 4096) -> None:
        self.path = path
        self.block = block
        self.last = self._load()
        self.reserved = self.last

    def next(self) -> int:
        token = self.last + 1
        if token > self.reserved:
            end = token + self.block - 1
            self._write(end)
            self.reserved = end
        self.last = token
        return token

    def _load(self) -> int:
        try:
            text = self.path.read_bytes().decode("ascii")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            return self._damaged(str(exc))
        line, _, crc = text.rstrip("\n").rpartition(" ")
        head, _, value = line.rpartition(" ")
        if head != self.MAGIC or not value.isdigit() or crc != self._crc(line):
            return self._damaged("its contents do not check")
        return int(value)

    def _damaged(self, why: str) -> int:
        floor = time.time_ns() // 1000
        log.error("the fencing-token file %s is damaged (%s); tokens continue from the wall "
                  "clock (%d)", self.path, why, floor)
        return floor

    @staticmethod
    def _crc(line: str) -> str:
        return f"{zlib.crc32(line.encode('ascii')):08x}"

    def _write(self, value: int) -> None:
        line = f"{self.MAGIC} {value}"
        write_atomically(self.path, f"{line} {self._crc(line)}\n".encode("ascii"), mode=0o600)


# ---------------------------------------------------------------------------- one lock space


@dataclass(slots=True)
class _Waiter:
    owner: _Owner
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Lock:
    holder: _Owner | None = None
    since: float = 0.0
    waiters: deque[_Waiter] = field(default_factory=deque)


@dataclass(slots=True, eq=False)
class _Owner:
    name: str
    held: list[str] = field(default_factory=list)
    waiting: tuple[str, _Waiter] | None = None
    token: int | None = None  # set once every lock is held
    # Set when the owner was released (its lease ended) while its acquire was still running:
    # the acquire raises it at its next step instead of carrying on for an owner that is gone.
    ended: OwmError | None = None


class LockSpace:
    """Exclusive named locks of one process, FIFO per lock, taken in sorted order."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        fence: Fence | None = None,
        *,
        max_owners: int = MAX_OWNERS,
        max_locks: int = MAX_LOCKS,
    ) -> None:
        self._locks: dict[str, _Lock] = {}
        self._owners: dict[str, _Owner] = {}
        self._clock = clock
        self._fence: Fence = fence if fence is not None else CountingFence()
        self._max_owners = max_owners
        self._max_locks = max_locks
        self.grants = 0  # locks granted at once
        self.waits = 0  # locks granted after a wait

    # ------------------------------------------------------------------------ the protocol

    async def acquire(
        self, owner: str, names: Sequence[str], timeout: float | None = None
    ) -> float:
        """Take every lock in ``names`` for ``owner``, in sorted order, waiting FIFO.

        All or nothing: on a timeout (``owm.common.errors.Timeout``), a cancellation or a release of
        the owner by someone else, whatever was taken so far is given back.
        """
        if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER:
            raise InvalidRequest(f"a lock owner needs a name of 1 to {MAX_OWNER} characters")
        return await self.acquire_sorted(owner, lock_names(names), check_timeout(timeout))

    async def release(self, owner: str) -> list[str]:
        return self.release_now(owner)

    def fencing_token(self, owner: str) -> int | None:
        me = self._owners.get(owner)
        return me.token if me is not None else None

    # ------------------------------------------------------------------------ the rest

    async def acquire_sorted(
        self, owner: str, wanted: list[str], timeout: float | None
    ) -> float:
        """``acquire`` for names already checked and sorted by ``lock_names``."""
        if owner in self._owners:
            raise WrongState(
                f"'{owner}' already holds or waits for locks; a transaction declares all of "
                "its locks at once and releases them when it ends"
            )
        if len(self._owners) >= self._max_owners:
            raise LockLimit(
                f"{len(self._owners)} transactions already hold or wait for locks, the most "
                "the lock space serves at once; try again when some have finished"
            )
        if len(self._locks) + sum(name not in self._locks for name in wanted) > self._max_locks:
            raise LockLimit(
                f"{len(self._locks)} locks are already held or waited for, and the lock space "
                f"serves at most {self._max_locks}; try again when some are released"
            )
        loop = asyncio.get_running_loop()
        me = _Owner(owner)
        self._owners[owner] = me
        started = loop.time()
        current = wanted[0]
        try:
            async with asyncio.timeout(timeout):
                for name in wanted:
                    current = name
                    lock = self._locks.get(name)
                    if lock is None:
                        lock = self._locks[name] = _Lock()
                    if lock.holder is None:
                        self._grant(lock, name, me)
                        self.grants += 1
                        continue
                    waiter = _Waiter(me, loop.create_future())
                    lock.waiters.append(waiter)
                    me.waiting = (name, waiter)
                    await waiter.future  # set by _pass_on, which also makes us the holder
                    me.waiting = None
                    if me.ended is not None:
                        # Released while the grant was on its way to us: what _pass_on gave
                        # us has been passed on already, and we are no longer an owner.
                        raise me.ended
                    self.waits += 1
            me.token = self._next_token()
        except TimeoutError:
            holder = self.holder(current)
            self._abandon(me)
            raise Timeout(
                f"'{owner}' waited {timeout:g} s for lock '{current}'"
                + (f" held by '{holder}'" if holder else "")
            ) from None
        except BaseException:
            self._abandon(me)
            raise
        return loop.time() - started

    def release_now(self, owner: str, reason: OwmError | None = None) -> list[str]:
        """Release everything ``owner`` holds; a wait in progress fails with ``reason``.

        Unknown owners release nothing (a release after a timeout is harmless).
        """
        me = self._owners.get(owner)
        if me is None:
            return []
        held = list(me.held)
        me.ended = reason or WrongState(
            f"the locks of '{owner}' were released while it was waiting"
        )
        if me.waiting is not None:
            _, waiter = me.waiting
            if not waiter.future.done():
                waiter.future.set_exception(me.ended)
        self._abandon(me)
        return held

    def release_together(
        self, owners: Iterable[str], reason: Callable[[str], OwmError]
    ) -> list[str]:
        """Release several owners at once (those of a lease that ends), ``reason(owner)`` for
        each wait in progress.  Their waits fail before anything is given back, so no lock is
        handed from one of them to another on its way to the next live owner in line."""
        ending = [me for me in map(self._owners.get, owners) if me is not None]
        for me in ending:
            me.ended = reason(me.name)
            if me.waiting is not None and not me.waiting[1].future.done():
                me.waiting[1].future.set_exception(me.ended)
        released: set[str] = set()
        for me in ending:
            released.update(me.held)
            self._abandon(me)
        return sorted(released)

    def holder(self, name: str) -> str | None:
        lock = self._locks.get(name)
        return lock.holder.name if lock is not None and lock.holder is not None else None

    def held(self, owner: str) -> list[str]:
        me = self._owners.get(owner)
        return list(me.held) if me is not None else []

    def waiting(self, name: str) -> list[str]:
        """Owners waiting for ``name``, oldest first."""
        lock = self._locks.get(name)
        if lock is None:
            return []
        return [w.owner.name for w in lock.waiters if not w.future.done()]

    def owners(self) -> list[str]:
        return list(self._owners)

    def has_owner(self, owner: str) -> bool:
        return owner in self._owners

    def snapshot(self) -> list[JSON]:
        """Every lock that is held: its holder, for how long, and who waits (oldest first)."""
        now = self._clock()
        return [
            {
                "name": name,
                "holder": lock.holder.name if lock.holder else None,
                "fencing_token": lock.holder.token if lock.holder else None,
                "held_s": round(now - lock.since, 3),
                "waiting": self.waiting(name),
            }
            for name, lock in sorted(self._locks.items())
        ]

    # ------------------------------------------------------------------------ internals

    def _next_token(self) -> int:
        try:
            return self._fence.next()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"cannot record the fencing-token counter: {reason}") from None
            raise WrongState(f"cannot record the fencing-token counter: {reason}") from None

    def _grant(self, lock: _Lock, name: str, owner: _Owner) -> None:
        lock.holder = owner
        lock.since = self._clock()
        owner.held.append(name)

    def _pass_on(self, name: str, lock: _Lock) -> None:
        """``lock`` was just freed: hand it to its oldest live waiter, or forget it."""
        lock.holder = None
        while lock.waiters:
            waiter = lock.waiters.popleft()
            if waiter.future.done():  # cancelled or failed while queued
                continue
            self._grant(lock, name, waiter.owner)
            waiter.future.set_result(None)
            return
        del self._locks[name]

    def _abandon(self, me: _Owner) -> None:
        """Forget ``me``: leave its queue, give back what it holds (to the next in line)."""
        if self._owners.get(me.name) is me:
            del self._owners[me.name]
        if me.waiting is not None:
            name, waiter = me.waiting
            me.waiting = None
            lock = self._locks.get(name)
            if lock is not None and lock.holder is not me:
                # Still queued (not granted): just leave the queue.
                with contextlib.suppress(ValueError):
                    lock.waiters.remove(waiter)
                if not waiter.future.done():
                    waiter.future.cancel()
                if lock.holder is None and not lock.waiters:
                    del self._locks[name]
        held, me.held = me.held, []
        for name in held:
            lock = self._locks.get(name)
            if lock is not None and lock.holder is me:
                self._pass_on(name, lock)


# ---------------------------------------------------------------------------- leases


@dataclass(frozen=True, slots=True)
class Grant:
    """An acquire that succeeded: how long it waited and its fencing token."""

    waited: float
    fencing_token: int


@dataclass(slots=True, eq=False)
class _Lease:
    id: str
    label: str
    ttl: float
    expires: float
    owners: set[str] = field(default_factory=set)


class LockService:
    """A ``LockSpace`` shared by several processes through the daemon, with leases.

    A worker process opens a lease (with a time to live) and keeps it alive; its transactions
    take and release locks under the lease.  When the process goes away without closing its
    lease (killed, host lost), the lease expires and every lock taken under it is released, so
    a dead worker cannot block the others for ever.  Owners are named ``LEASE/OWNER`` inside.

    Expiry is kept in a heap with one entry per lease: a keepalive only moves the lease's
    deadline, and the entry is queued again at the new deadline when the old one comes up.  One
    timer is armed for the earliest entry and re-armed whenever that changes, so a short lease
    opened after a long one is reaped on time.
    """

    MIN_TTL = 0.2
    MAX_TTL = 3600.0
    REMEMBERED = 4096  # ended leases whose end a later call is told about by name

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        fence: Fence | None = None,
        *,
        max_leases: int = MAX_LEASES,
        max_owners_per_lease: int = MAX_OWNERS_PER_LEASE,
        max_owners: int = MAX_OWNERS,
        max_locks: int = MAX_LOCKS,
    ) -> None:
        self.space = LockSpace(clock, fence, max_owners=max_owners, max_locks=max_locks)
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._expiry: list[tuple[float, int, str]] = []  # (deadline when queued, seq, lease)
        self._seq = itertools.count()
        self._ended: OrderedDict[str, str] = OrderedDict()  # lease id -> how it ended
        self._max_leases = max_leases
        self._max_owners_per_lease = max_owners_per_lease
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.expired = 0

    @classmethod
    def for_pool(cls, pool: Path) -> LockService:
        """The daemon's lock service: fencing tokens keep growing across its restarts."""
        return cls(fence=FenceFile(pool / FENCE_FILE))

    def open_lease(self, ttl: float = 10.0, label: str = "") -> JSON:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (
            self.MIN_TTL <= ttl <= self.MAX_TTL
        ):
            raise InvalidRequest(
                f"a lease lives between {self.MIN_TTL:g} and {self.MAX_TTL:g} seconds"
            )
        if not isinstance(label, str) or len(label) > MAX_LABEL:
            raise InvalidRequest(f"a lease label is a string of at most {MAX_LABEL} characters")
        self.reap()
        if len(self._leases) >= self._max_leases:
            raise LockLimit(
                f"{len(self._leases)} lock leases are open, the most the daemon serves at "
                "once; close leases that are no longer used"
            )
        lease_id = f"lease-{secrets.token_hex(8)}"
        while lease_id in self._leases or lease_id in self._ended:
            lease_id = f"lease-{secrets.token_hex(8)}"
        lease = _Lease(lease_id, label, float(ttl), self._clock() + ttl)
        self._leases[lease.id] = lease
        self._queue(lease)
        self._arm()
        return self._describe(lease)

    def keepalive(self, lease_id: str) -> JSON:
        lease = self._lease(lease_id)
        lease.expires = self._clock() + lease.ttl  # later only: its heap entry is requeued
        return self._describe(lease)

    def close_lease(self, lease_id: str) -> list[str]:
        lease = self._lease(lease_id)
        return self._drop(lease, "was closed")

    def require_lease(self, lease_id: str) -> None:
        """Raise ``LeaseGone`` unless ``lease_id`` is open."""
        self._lease(lease_id)

    async def acquire(
        self, lease_id: str, owner: str, names: Sequence[str], timeout: float | None = None
    ) -> Grant:
        lease = self._lease(lease_id)
        if not isinstance(owner, str) or not owner or "/" in owner or len(owner) > MAX_OWNER:
            raise InvalidRequest(
                f"a lock owner needs a name of 1 to {MAX_OWNER} characters without '/'"
            )
        wanted = lock_names(names)
        limit = check_timeout(timeout)
        key = f"{lease.id}/{owner}"
        fresh = key not in lease.owners
        if fresh and len(lease.owners) >= self._max_owners_per_lease:
            raise LockLimit(
                f"{len(lease.owners)} transactions of lease '{lease.id}' already hold or wait "
                "for locks, the most one lease may have; release some first"
            )
        lease.owners.add(key)
        try:
            waited = await self.space.acquire_sorted(key, wanted, limit)
        except BaseException:
            if fresh and not self.space.has_owner(key):
                lease.owners.discard(key)
            raise
        token = self.space.fencing_token(key)
        assert token is not None
        return Grant(waited, token)

    def release(self, lease_id: str, owner: str) -> list[str]:
        lease = self._lease(lease_id)
        key = f"{lease.id}/{owner}"
        lease.owners.discard(key)
        return self.space.release_now(key)

    def status(self) -> JSON:
        self.reap()
        now = self._clock()
        return {
            "leases": [
                {**self._describe(lease), "expires_in_s": round(lease.expires - now, 3),
                 "owners": sorted(o.split("/", 1)[1] for o in lease.owners)}
                for lease in self._leases.values()
            ],
            "locks": self.space.snapshot(),
            "expired_leases": self.expired,
        }

    def reap(self) -> None:
        """Drop every lease that was not kept alive in time, releasing its locks."""
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, _, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is None:  # closed since it was queued
                continue
            if lease.expires > now:  # kept alive since: queue it at its new deadline
                self._queue(lease)
                continue
            self.expired += 1
            self._drop(lease, f"expired (it was not kept alive within {lease.ttl:g} s)")

    def close(self) -> None:
        """Release everything (the daemon is stopping)."""
        for lease in list(self._leases.values()):
            self._drop(lease, "was closed when the daemon stopped")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    # ------------------------------------------------------------------------ internals

    def _lease(self, lease_id: str) -> _Lease:
        self.reap()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise self._gone(lease_id)
        return lease

    def _gone(self, lease_id: str) -> LeaseGone:
        shown = lease_id if len(lease_id) <= 80 else lease_id[:77] + "..."
        why = self._ended.get(lease_id)
        if why is not None:
            return LeaseGone(
                f"the lock lease '{shown}' {why}; no lock taken under it is held any more"
            )
        return LeaseGone(
            f"there is no lock lease '{shown}': it was closed, expired, or opened before the "
            "daemon restarted, and no lock taken under it is held"
        )

    def _drop(self, lease: _Lease, why: str) -> list[str]:
        self._leases.pop(lease.id, None)
        self._ended[lease.id] = why
        while len(self._ended) > self.REMEMBERED:
            self._ended.popitem(last=False)
        released = self.space.release_together(sorted(lease.owners),
                                               lambda _: self._gone(lease.id))
        lease.owners.clear()
        if len(self._expiry) > 2 * len(self._leases) + 64:
            # Closed leases leave their entries behind; rebuild in place now and then.
            self._expiry[:] = [(lz.expires, next(self._seq), lz.id)
                               for lz in self._leases.values()]
            heapq.heapify(self._expiry)
        return released

    def _describe(self, lease: _Lease) -> JSON:
        return {"lease": lease.id, "label": lease.label, "ttl": lease.ttl}

    def _queue(self, lease: _Lease) -> None:
        heapq.heappush(self._expiry, (lease.expires, next(self._seq), lease.id))

    def _arm(self) -> None:
        """Keep one timer, due at the earliest deadline, that reaps even when nobody calls in."""
        if not self._expiry:
            return
        due = self._expiry[0][0]
        if self._timer is not None and self._timer_at <= due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = loop.call_later(max(0.0, due - self._clock()) + 0.001, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.reap()
        self._arm()
