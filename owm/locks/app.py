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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from owm.common.errors import InvalidRequest, NotFound, Timeout, WrongState

JSON = dict[str, Any]

MAX_NAME = 256
MAX_LOCKS_PER_OWNER = 1024


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


def lock_names(names: Iterable[str]) -> list[str]:
    """The names a transaction declared, checked, without duplicates, in locking order."""
    if isinstance(names, str):
        raise InvalidRequest("lock names must be a list of names, not one string")
    unique = set()
    for name in names:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidRequest(f"a lock name must be a string of 1 to {MAX_NAME} characters")
        unique.add(name)
    if not unique:
        raise InvalidRequest("a transaction must name at least one lock")
    if len(unique) > MAX_LOCKS_PER_OWNER:
        raise InvalidRequest(f"a transaction may hold at most {MAX_LOCKS_PER_OWNER} locks")
    return sorted(unique)


class LockSpace:
    """Exclusive named locks of one process, FIFO per lock, taken in sorted order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._locks: dict[str, _Lock] = {}
        self._owners: dict[str, _Owner] = {}
        self._clock = clock
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
        wanted = lock_names(names)
        if not owner:
            raise InvalidRequest("a lock owner needs a name")
        if owner in self._owners:
            raise WrongState(
                f"'{owner}' already holds or waits for locks; a transaction declares all of "
                "its locks at once and releases them when it ends"
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
                    self.waits += 1
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

    async def release(self, owner: str) -> list[str]:
        return self.release_now(owner)

    # ------------------------------------------------------------------------ the rest

    def release_now(self, owner: str) -> list[str]:
        """Release everything ``owner`` holds; a wait in progress fails with WrongState.

        Unknown owners release nothing (a release after a timeout is harmless).
        """
        me = self._owners.get(owner)
        if me is None:
            return []
        held = list(me.held)
        if me.waiting is not None:
            _, waiter = me.waiting
            if not waiter.future.done():
                waiter.future.set_exception(
                    WrongState(f"the locks of '{owner}' were released while it was waiting")
                )
        self._abandon(me)
        return held

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
                "held_s": round(now - lock.since, 3),
                "waiting": self.waiting(name),
            }
            for name, lock in sorted(self._locks.items())
        ]

    # ------------------------------------------------------------------------ internals

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
        held, me.held = me.held, []
        for name in held:
            lock = self._locks.get(name)
            if lock is not None and lock.holder is me:
                self._pass_on(name, lock)


# ---------------------------------------------------------------------------- leases


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
    """

    MIN_TTL = 0.2
    MAX_TTL = 3600.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.space = LockSpace(clock)
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self.expired = 0

    def open_lease(self, ttl: float = 10.0, label: str = "") -> JSON:
        if not self.MIN_TTL <= ttl <= self.MAX_TTL:
            raise InvalidRequest(
                f"a lease lives between {self.MIN_TTL:g} and {self.MAX_TTL:g} seconds"
            )
        self.reap()
        lease = _Lease(f"lease-{next(self._ids)}", label, ttl, self._clock() + ttl)
        self._leases[lease.id] = lease
        self._arm()
        return self._describe(lease)

    def keepalive(self, lease_id: str) -> JSON:
        lease = self._lease(lease_id)
        lease.expires = self._clock() + lease.ttl
        return self._describe(lease)

    def close_lease(self, lease_id: str) -> list[str]:
        lease = self._lease(lease_id)
        return self._drop(lease)

    async def acquire(
        self, lease_id: str, owner: str, names: Sequence[str], timeout: float | None = None
    ) -> float:
        lease = self._lease(lease_id)
        if not owner or "/" in owner:
            raise InvalidRequest("a lock owner needs a name without '/'")
        key = f"{lease.id}/{owner}"
        fresh = not self.space.has_owner(key)
        lease.owners.add(key)
        try:
            return await self.space.acquire(key, names, timeout)
        except BaseException:
            if fresh and not self.space.has_owner(key):
                lease.owners.discard(key)
            raise

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
        for lease in [lease for lease in self._leases.values() if lease.expires <= now]:
            self._drop(lease)
            self.expired += 1

    def close(self) -> None:
        """Release everything (the daemon is stopping)."""
        for lease in list(self._leases.values()):
            self._drop(lease)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------------ internals

    def _lease(self, lease_id: str) -> _Lease:
        self.reap()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(f"there is no lock lease '{lease_id}' (it may have expired)")
        return lease

    def _drop(self, lease: _Lease) -> list[str]:
        self._leases.pop(lease.id, None)
        released: list[str] = []
        for key in sorted(lease.owners):
            released += self.space.release_now(key)
        lease.owners.clear()
        return sorted(released)

    def _describe(self, lease: _Lease) -> JSON:
        return {"lease": lease.id, "label": lease.label, "ttl": lease.ttl}

    def _arm(self) -> None:
        """Keep one timer that reaps expired leases even when nobody calls in."""
        if self._timer is not None or not self._leases:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.05, min(lease.expires for lease in self._leases.values()) - self._clock())
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.reap()
        self._arm()
