"""Engine locks: a FIFO range lock manager over chunk numbers, one per volume.

A request locks the chunks it touches, shared (reads) or exclusive (writes, copies, merges),
for as long as its data and table updates take.  A request that conflicts with a holder, or with
an earlier waiter whose range overlaps its own, suspends on a future (FIFO, no spinning, no
polling); requests on disjoint ranges never wait for each other.  The locks live outside the
images and are never part of a backup.

How: every chunk that is locked or awaited has a queue of the requests on it in arrival order.
The front of a queue that may run together (one exclusive request, or a run of shared ones) is
its *ready* part; a request is granted once it is ready on every chunk it touches.  The ready
part only grows at its end, so each request enters it once per chunk, and a release only looks
at the requests that become ready because of it: acquire and release cost O(chunks touched),
amortised, however many requests wait.  As every queue is in the one arrival order, a request
only ever waits for earlier ones, so multi-chunk requests cannot deadlock.

The common case costs less still: a one-chunk request on a chunk nobody holds or awaits is
granted as a *solo* holder, one dict entry (chunk -> exclusive) with no request or queue
objects; it is turned into a queued request of its own (``_materialise``) only if another
request comes to that chunk while it holds it.  A multi-chunk request on chunks nobody holds or
awaits is granted likewise as a *span*, whatever its length: an entry in a sorted list of
disjoint ranges (found by bisection) with no per-chunk state, turned into a queued request
(``_materialise_span``, O(chunks), paid once) only when another request touches one of its
chunks.  So a 1 MiB request over 4 KiB chunks that conflicts with nothing costs O(log spans)
plus a look for per-chunk state in its range (O(min(chunks, queued or solo chunks))), not 256
queue entries.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

SHARED, EXCLUSIVE = False, True
_COMPACT = 64  # a queue drops its finished front once it is at least this long


class _Request:
    __slots__ = (
        "done", "exclusive", "first", "future", "last", "missing", "queued", "ready_on", "seq"
    )

    def __init__(self, seq: int, first: int, last: int, exclusive: bool) -> None:
        self.seq = seq  # arrival order
        self.first = first
        self.last = last
        self.exclusive = exclusive
        self.future: asyncio.Future[None] | None = None  # set only when it has to wait
        self.missing = last - first + 1  # chunks on which it is not ready yet
        self.ready_on: set[int] | None = None  # chunks on which it is ready, while missing > 0
        self.queued = False  # in the chunk queues (not behind a barrier)
        self.done = False  # released, or abandoned by a cancelled waiter


class _Chunk:
    """The queue of one chunk: ``queue[head:ready]`` is its ready part (done ones included)."""

    __slots__ = ("exclusive", "head", "live", "queue", "ready")

    def __init__(self, holder: _Request | None = None) -> None:
        """An empty queue, or one whose only request, ``holder``, is ready (granted)."""
        self.head = 0
        if holder is None:
            self.queue: list[_Request] = []
            self.ready = 0
            self.live = 0  # requests of the ready part not done yet
            self.exclusive = False  # the ready part is one exclusive request
        else:
            self.queue = [holder]
            self.ready = self.live = 1
            self.exclusive = holder.exclusive


class RangeLockManager:
    def __init__(self) -> None:
        self._chunks: dict[int, _Chunk] = {}
        self._held: dict[tuple[int, int], list[_Request]] = {}  # granted, by range
        self._live = 0  # requests in the chunk queues not done yet
        self._waiting = 0
        # While a barrier waits, later requests (and later barriers, as bare futures) queue
        # here behind it, in order.
        self._later: deque[_Request | asyncio.Future[None]] = deque()
        self._barrier: asyncio.Future[None] | None = None
        self._seq = 0
        self._woken: list[_Request] = []  # granted waiters not told yet (see _wake_up)
        # Chunks held by one request granted on the fast path, with nothing else on them:
        # chunk -> exclusive.  Never in ``_chunks``; counted in ``_live``.
        self._solo: dict[int, bool] = {}
        # Multi-chunk ranges held by one request granted on the fast path, with nothing else on
        # any of their chunks: disjoint, their first chunks sorted in ``_span_firsts`` and
        # first -> (last, exclusive) in ``_spans``.  Never in ``_chunks``; counted in ``_live``.
        self._span_firsts: list[int] = []
        self._spans: dict[int, tuple[int, bool]] = {}

    # ------------------------------------------------------------------------ internals

    def _materialise(self, c: int) -> _Chunk:
        """Chunk ``c``'s solo holder becomes a granted request in a queue of its own (another
        request is about to queue behind it).  Its arrival number is 0: it is granted, so it is
        never among the woken waiters that are ordered by it."""
        req = _Request(0, c, c, self._solo.pop(c))
        req.queued = True
        req.missing = 0
        ch = self._chunks[c] = _Chunk(req)
        holders = self._held.get((c, c))
        if holders is None:
            self._held[(c, c)] = [req]
        else:
            holders.append(req)
        return ch

    def _overlapping_span(self, first: int, last: int) -> int | None:
        """The first chunk of a span that overlaps first..last (the last such), or None."""
        firsts = self._span_firsts
        i = bisect_right(firsts, last)
        if i:
            f = firsts[i - 1]
            if self._spans[f][0] >= first:
                return f
        return None

    def _materialise_span(self, f: int) -> None:
        """The span starting at chunk ``f`` becomes a granted request with a queue on each of
        its chunks (another request is about to queue on one of them); see ``_materialise``."""
        last, exclusive = self._spans.pop(f)
        del self._span_firsts[bisect_right(self._span_firsts, f) - 1]
        req = _Request(0, f, last, exclusive)
        req.queued = True
        req.missing = 0
        chunks = self._chunks
        for c in range(f, last + 1):
            chunks[c] = _Chunk(req)
        holders = self._held.get((f, last))
        if holders is None:
            self._held[(f, last)] = [req]
        else:
            holders.append(req)

    def _free(self, first: int, last: int) -> bool:
        """No chunk of first..last has a queue or a solo holder (spans aside)."""
        chunks, solo = self._chunks, self._solo
        n = len(chunks) + len(solo)
        if not n:
            return True
        if n <= last - first:
            return not any(first <= c <= last for c in chunks) and \
                not any(first <= c <= last for c in solo)
        return not any(c in chunks or c in solo for c in range(first, last + 1))

    def _enqueue(self, req: _Request) -> None:
        """Put ``req`` at the end of each chunk's queue; it becomes ready where nothing earlier
        conflicts, and is granted if that is everywhere."""
        req.queued = True
        if self._spans:
            while (f := self._overlapping_span(req.first, req.last)) is not None:
                self._materialise_span(f)
        self._live += 1
        chunks = self._chunks
        solo = self._solo
        for c in range(req.first, req.last + 1):
            ch = chunks.get(c)
            if ch is None:
                if c in solo:
                    ch = self._materialise(c)
                else:
                    ch = chunks[c] = _Chunk()
            ch.queue.append(req)
            self._advance(c, ch)

    def _advance(self, c: int, ch: _Chunk) -> None:
        """Extend the ready part of chunk ``c`` as far as FIFO order lets it go."""
        queue = ch.queue
        n = len(queue)
        while ch.ready < n:
            req = queue[ch.ready]
            if req.done:  # abandoned while waiting: it holds nothing back
                ch.ready += 1
                continue
            if ch.live:
                if ch.exclusive or req.exclusive:
                    break
            else:
                ch.exclusive = req.exclusive
            ch.live += 1
            ch.ready += 1
            self._ready(req, c)
            if ch.exclusive:
                break
        if ch.live == 0:  # every request on the chunk is done: forget it
            del self._chunks[c]
            return
        if ch.head >= _COMPACT and ch.head * 2 >= n:
            del queue[: ch.head]
            ch.ready -= ch.head
            ch.head = 0

    def _ready(self, req: _Request, c: int) -> None:
        req.missing -= 1
        if req.missing:
            if req.ready_on is None:
                req.ready_on = set()
            req.ready_on.add(c)
            return
        req.ready_on = None
        fut = req.future
        if fut is not None:
            if fut.done():
                return  # cancelled: its done callback (already scheduled) lets go of it
            self._waiting -= 1
            self._woken.append(req)
        key = (req.first, req.last)
        holders = self._held.get(key)
        if holders is None:
            self._held[key] = [req]
        else:
            holders.append(req)

    def _finish(self, req: _Request, ready_on: set[int] | None = None) -> None:
        """``req`` lets go of its chunks (all of them, or those in ``ready_on``): on each, the
        requests behind it may become ready."""
        req.done = True
        self._live -= 1
        chunks = self._chunks
        for c in range(req.first, req.last + 1):
            ch = chunks[c]
            if ready_on is not None and c not in ready_on:
                # Not ready there; if it was first in line, the ones behind may move up.
                if ch.ready < len(ch.queue) and ch.queue[ch.ready] is req:
                    self._advance(c, ch)
                continue
            ch.live -= 1
            if ch.live == 0:
                ch.exclusive = False
                ch.head = ch.ready
                self._advance(c, ch)
        if self._barrier is not None and self._live == 0:
            self._pass_barriers()

    def _abandoned(self, req: _Request, fut: asyncio.Future[None]) -> None:
        """Done callback of a waiter's future: a cancelled waiter leaves its queues."""
        if not fut.cancelled() or req.done:
            return
        self._waiting -= 1
        if not req.queued:
            req.done = True  # still behind a barrier: it is skipped there
            return
        self._finish(req, (req.ready_on or set()) if req.missing else None)
        self._wake_up()

    def _wake_up(self) -> None:
        """Tell the waiters granted by one operation, in arrival order (as one FIFO queue
        would), whatever order their chunks were freed in."""
        woken = self._woken
        if not woken:
            return
        self._woken = []
        if len(woken) > 1:
            woken.sort(key=lambda r: r.seq)
        for req in woken:
            assert req.future is not None
            if not req.future.done():
                req.future.set_result(None)
            else:  # cancelled meanwhile: let go of what it was granted
                self._release_request(req)

    def _release_request(self, req: _Request) -> None:
        holders = self._held[(req.first, req.last)]
        holders.remove(req)
        if not holders:
            del self._held[(req.first, req.last)]
        self._finish(req)

    def _wait(self, req: _Request) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req.future = fut
        self._waiting += 1
        fut.add_done_callback(lambda f: self._abandoned(req, f))
        return fut

    def _admit_later(self) -> None:
        """No barrier is pending: queue the requests held back, up to the next barrier."""
        later = self._later
        while later:
            item = later.popleft()
            if isinstance(item, _Request):
                if not item.done:
                    self._enqueue(item)
            elif not item.done():
                self._barrier = item
                return

    def _pass_barriers(self) -> None:
        """Nothing before the pending barrier is left: let it go, and what came after it."""
        while self._barrier is not None and self._live == 0:
            barrier, self._barrier = self._barrier, None
            if not barrier.done():
                barrier.set_result(None)
            self._admit_later()

    # -------------------------------------------------------------------------- the API

    def try_acquire(self, first: int, last: int, exclusive: bool) -> asyncio.Future[None] | None:
        """Take chunks first..last now (returns None) or queue and return a future to await."""
        if first == last:
            if self._barrier is None and first not in self._chunks and \
                    first not in self._solo and \
                    (not self._spans or self._overlapping_span(first, first) is None):
                # The common case, one chunk nobody holds or awaits: granted at once, as a solo
                # holder (no request object, no queue; see the module's docstring).
                self._solo[first] = exclusive
                self._live += 1
                return None
        elif self._barrier is None and self._overlapping_span(first, last) is None and \
                self._free(first, last):
            # Several chunks nobody holds or awaits: granted at once, as a span.
            firsts = self._span_firsts
            firsts.insert(bisect_right(firsts, first), first)
            self._spans[first] = (last, exclusive)
            self._live += 1
            return None
        self._seq += 1
        req = _Request(self._seq, first, last, exclusive)
        if self._barrier is not None:
            fut = self._wait(req)
            self._later.append(req)
            return fut
        self._enqueue(req)
        if req.missing == 0:
            return None
        return self._wait(req)

    def release(self, first: int, last: int) -> None:
        """Let go of chunks first..last, granted to a request of exactly that range."""
        if first == last and first in self._solo:
            # Its solo holder, nobody else on the chunk: forget it.
            del self._solo[first]
            self._live -= 1
            if self._barrier is not None and self._live == 0:
                self._pass_barriers()
                self._wake_up()
            return
        if first != last:
            span = self._spans.get(first)
            if span is not None and span[0] == last:
                # Its span holder, nobody else on any of its chunks: forget it.
                del self._spans[first]
                firsts = self._span_firsts
                del firsts[bisect_right(firsts, first) - 1]
                self._live -= 1
                if self._barrier is not None and self._live == 0:
                    self._pass_barriers()
                    self._wake_up()
                return
        key = (first, last)
        holders = self._held.get(key)
        if not holders:
            raise RuntimeError(f"chunks {first}..{last} are released but not held")
        req = holders.pop()
        if not holders:
            del self._held[key]
        if first == last:
            ch = self._chunks[first]
            if ch.live == 1 and len(ch.queue) == ch.ready:
                # Its only live holder, nobody waiting behind: forget the chunk, as _finish
                # would after finding nothing to advance.
                req.done = True
                self._live -= 1
                del self._chunks[first]
                if self._barrier is not None and self._live == 0:
                    self._pass_barriers()
                    self._wake_up()
                return
        self._finish(req)
        self._wake_up()

    async def acquire(self, first: int, last: int, exclusive: bool) -> None:
        fut = self.try_acquire(first, last, exclusive)
        if fut is None:
            return
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(first, last)  # granted just as we were cancelled
            raise

    async def barrier(self) -> None:
        """Wait until every request that holds or awaits a lock now has finished.

        Requests that arrive meanwhile queue behind the barrier (FIFO) and proceed once it
        passes; nothing is held afterwards, so it costs no per-chunk state on any volume size.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._barrier is None:
            if self._live == 0:
                return
            self._barrier = fut
        else:
            self._later.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if self._barrier is fut:
                self._barrier = None
                self._admit_later()
                self._pass_barriers()
                self._wake_up()
            raise

    @asynccontextmanager
    async def locked(self, first: int, last: int, exclusive: bool) -> AsyncIterator[None]:
        await self.acquire(first, last, exclusive)
        try:
            yield
        finally:
            self.release(first, last)

    @property
    def waiting(self) -> int:
        """Requests waiting for their chunks (or behind a barrier)."""
        return self._waiting

    @property
    def held_chunks(self) -> int:
        """Chunks that some granted request holds."""
        return len(
            {c for reqs in self._held.values() for r in reqs for c in range(r.first, r.last + 1)}
            | self._solo.keys()
        ) + sum(last - f + 1 for f, (last, _) in self._spans.items())
