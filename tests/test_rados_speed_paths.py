"""The RADOS write path's per-operation work, against the real throw-away cluster.

What a 4K write costs on the event loop is counted, not timed: one loop hop per write once its
completion arrives (no done callbacks, no shield), no ``asyncio.get_running_loop`` (a
``getpid`` system call) per RADOS call. And what the cheaper bookkeeping must still promise:
a sync waits for every earlier write on the object, the call of a cancelled request included,
and reports a failure among them; nothing is left behind that grows with the queue depth.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from owm.common.errors import OwmError
from owm.storage.rados import RadosBackend, _Named
from owm.testbed.ceph import CephCluster

STRIPE = 64 * 1024


@pytest.fixture
async def backend(ceph: CephCluster) -> AsyncIterator[RadosBackend]:
    b = await RadosBackend.open(ceph.conf_path, ceph.pool, f"s-{uuid.uuid4().hex[:12]}", STRIPE)
    try:
        yield b
    finally:
        await b.close()


async def test_a_one_stripe_write_costs_one_loop_hop(backend: RadosBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling a write's future wakes its request and nothing else: the in-flight tracking is
    done inline when the completion reaches the loop, not by callbacks or a shield."""
    st = backend.storage("v")
    await st.write("live.data", 0, b"h")  # the head exists: later writes are one call each
    loop = asyncio.get_running_loop()
    calls = 0
    real = loop.call_soon

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon", counting)
    n = 32
    for i in range(n):
        await st.write("live.data", i * 4096, os.urandom(4096))
    monkeypatch.undo()
    assert calls <= n * 3 // 2, calls  # four per write with done callbacks and a shield
    await st.sync("live.data")


async def test_no_running_loop_lookup_per_rados_call(backend: RadosBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    st = backend.storage("v")
    await st.write("o", 0, b"h")
    asked = 0
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal asked
        asked += 1
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    await asyncio.gather(*(st.write("o", i * 4096, b"w" * 4096) for i in range(32)))
    await st.sync("o")
    assert await st.read("o", 4096, 4096) == b"w" * 4096
    monkeypatch.undo()
    assert asked == 0, asked


async def test_a_sync_waits_for_the_call_of_a_cancelled_write(backend: RadosBackend) -> None:
    """A request cancelled while its write is in flight ends its own wait only: the call runs
    on, and a sync after it returns only once RADOS has acknowledged it."""
    st = backend.storage("v")
    await st.write("c", 0, b"h")
    blocks = [os.urandom(4096) for _ in range(16)]
    writes = [asyncio.ensure_future(st.write("c", i * 4096, blk)) for i, blk in enumerate(blocks)]
    await asyncio.sleep(0)  # every write has started its call
    for w in writes:
        w.cancel()
    await asyncio.gather(*writes, return_exceptions=True)
    await st.sync("c")
    named = st._index["c"]
    assert not named.pending and not named.waiting
    again = await RadosBackend.open(backend.conf_path, backend.pool, backend.namespace, STRIPE)
    try:
        got = await again.storage("v").read("c", 0, 16 * 4096)
    finally:
        await again.close()
    assert got == b"".join(blocks)


async def test_nothing_outlives_a_burst_of_writes_and_syncs(backend: RadosBackend) -> None:
    st = backend.storage("v")
    await asyncio.gather(*(st.write("b", i * 8192, b"x" * 8192) for i in range(64)),
                         *(st.sync("b") for _ in range(8)))
    await st.sync("b")
    named = st._index["b"]
    assert not named.pending and not named.waiting


async def test_the_waiters_of_sync_see_the_first_failure_only_of_their_own_calls() -> None:
    """The bookkeeping itself: a waiter ends with the last of the calls it waits for, gets the
    first failure among them (not a later call's), and a cancelled waiter is dropped."""
    loop = asyncio.get_running_loop()
    named = _Named()
    a, b, c = object(), object(), object()
    named.pending |= {a, b}
    first = named.idle(loop)
    cancelled = named.idle(loop)
    assert first is not None and cancelled is not None
    cancelled.cancel()
    named.pending.add(c)  # started after the sync: not waited for
    second = named.idle(loop)
    assert second is not None
    named.ended(a, -errno.EIO)
    assert not first.done()
    named.ended(c, None)
    named.ended(b, -errno.ETIMEDOUT)
    assert first.result() == -errno.EIO
    assert second.result() == -errno.EIO
    assert not named.pending and not named.waiting
    assert named.idle(loop) is None


async def test_a_failed_write_fails_the_next_sync(backend: RadosBackend,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that RADOS fails makes its write raise (EIO, with a log line) and the sync
    waiting for it raise too, even when the request that made it was cancelled."""
    st = backend.storage("v")
    await st.write("f", 0, b"h")
    ioctx = backend.ioctx

    class Failing:
        def __getattr__(self, attr: str) -> Any:
            return getattr(ioctx, attr)

        def aio_write(self, oid: str, data: bytes, offset: int, oncomplete: Any) -> Any:
            # A write past RADOS's object size limit: the OSD refuses it (EFBIG).
            return ioctx.aio_write(oid, data, (1 << 62), oncomplete=oncomplete)

    monkeypatch.setattr(backend, "ioctx", Failing())
    failing = asyncio.ensure_future(st.write("f", 4096, b"z" * 4096))
    syncing = asyncio.ensure_future(st.sync("f"))
    with pytest.raises(OwmError, match="storage error while writing f"):
        await failing
    with pytest.raises(OwmError, match="syncing f"):
        await syncing
    cancelled = asyncio.ensure_future(st.write("f", 8192, b"y" * 4096))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(OwmError, match="syncing f"):
        await st.sync("f")
    monkeypatch.undo()
    await st.sync("f")  # the failures were reported once; later syncs are clean


async def test_the_librados_callback_asks_librados_nothing(
        backend: RadosBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A completion's return value is asked for on the event loop's thread: python-rados
    releases the GIL around that call, and a librados thread doing so inside its callback
    must win the GIL back from the loop before it can deliver the next completion."""
    st = backend.storage("v")
    await st.write("g", 0, b"h")
    ioctx = backend.ioctx
    asked_on: list[int] = []

    class Completion:
        def __init__(self, real: Any) -> None:
            self.real = real

        def get_return_value(self) -> int:
            asked_on.append(threading.get_ident())
            return int(self.real.get_return_value())

    def wrap(cb: Any) -> Any:
        return lambda c, *data: cb(Completion(c), *data)

    class Watching:
        def __getattr__(self, attr: str) -> Any:
            return getattr(ioctx, attr)

        def aio_write(self, oid: str, data: bytes, offset: int, oncomplete: Any) -> Any:
            return ioctx.aio_write(oid, data, offset, wrap(oncomplete))

        def aio_read(self, oid: str, length: int, offset: int, oncomplete: Any) -> Any:
            return ioctx.aio_read(oid, length, offset, wrap(oncomplete))

    monkeypatch.setattr(backend, "ioctx", Watching())
    await asyncio.gather(*(st.write("g", i * 4096, b"q" * 4096) for i in range(16)))
    got = await asyncio.gather(*(st.read("g", i * 4096, 4096) for i in range(16)))
    monkeypatch.undo()
    assert got == [b"q" * 4096] * 16
    assert len(asked_on) == 32 and set(asked_on) == {threading.get_ident()}, set(asked_on)
