"""RadosStorage against the real throw-away cluster: the Storage contract, striped.

Sparse reads of a 1 TiB object, writes across stripe boundaries against a reference buffer,
discard of whole and partial stripes (checked in RADOS itself), extents, bytes_used, delete,
names after reopening, many requests in flight at once, and a stopped OSD failing a request
with an OwmError (EIO) within the op timeout, then recovering.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from owm.common.errors import OwmError
from owm.storage.rados import RadosBackend, RadosStorage
from owm.testbed.ceph import CephCluster

STRIPE = 64 * 1024
TiB = 1 << 40


def rados_keys(ceph: CephCluster, namespace: str) -> set[str]:
    """The object names RADOS itself holds in ``namespace`` (not the storage's index)."""
    import rados

    cluster = rados.Rados(conffile=str(ceph.conf_path))
    cluster.connect(timeout=10)
    try:
        ioctx = cluster.open_ioctx(ceph.pool)
        ioctx.set_namespace(namespace)
        try:
            return {o.key for o in ioctx.list_objects()}
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


@pytest.fixture
async def backend(ceph: CephCluster) -> AsyncIterator[RadosBackend]:
    b = await RadosBackend.open(ceph.conf_path, ceph.pool, f"t-{uuid.uuid4().hex[:12]}", STRIPE)
    try:
        yield b
    finally:
        await b.close()


async def reopen(ceph: CephCluster, b: RadosBackend) -> RadosBackend:
    return await RadosBackend.open(ceph.conf_path, ceph.pool, b.namespace, b.stripe_size)


async def test_sparse_terabyte_object_reads_zeroes(backend: RadosBackend) -> None:
    st = backend.storage("v")
    assert not st.exists("live.data")
    await st.allocate("live.data", TiB)
    assert st.exists("live.data") and st.names() == ["live.data"]
    assert st.bytes_used("live.data") == 0
    assert await st.read("live.data", TiB - 4096, 4096) == bytes(4096)
    await st.write("live.data", TiB - 10, b"end of it!")
    got = await st.read("live.data", TiB - 20, 20)
    assert got == bytes(10) + b"end of it!"
    assert st.bytes_used("live.data") == STRIPE  # one stripe, written up to its end
    assert await st.read("missing", 123, 77) == bytes(77)  # a missing object is all zeroes
    runs = await st.extents("live.data", TiB - 3 * STRIPE, 3 * STRIPE)
    assert runs == [(TiB - 3 * STRIPE, 2 * STRIPE, False), (TiB - STRIPE, STRIPE, True)]


async def test_writes_across_stripes_match_a_reference(backend: RadosBackend,
                                                       ceph: CephCluster) -> None:
    st = backend.storage("v")
    size = 10 * STRIPE + 1234
    ref = bytearray(size)
    rng = random.Random(12)
    for _ in range(60):
        offset = rng.randrange(size - 1)
        length = min(rng.choice([1, 511, STRIPE, STRIPE + 1, 3 * STRIPE - 7]), size - offset)
        data = rng.randbytes(length)
        await st.write("obj", offset, data)
        ref[offset:offset + length] = data
    await st.write("obj", STRIPE - 3, b"abcdef")  # straddles a boundary by a few bytes
    ref[STRIPE - 3:STRIPE + 3] = b"abcdef"
    await st.sync("obj")
    assert await st.read("obj", 0, size + 100) == bytes(ref) + bytes(100)
    for _ in range(20):
        offset = rng.randrange(size)
        length = rng.randrange(1, 3 * STRIPE)
        want = bytes(ref[offset:offset + length]).ljust(length, b"\0")
        assert await st.read("obj", offset, length) == want
    # After a reopen, from RADOS alone (a new index), everything is still there.
    again = await reopen(ceph, backend)
    try:
        other = again.storage("v")
        assert other.names() == ["obj"]
        assert await other.read("obj", 0, size) == bytes(ref)
        assert other.bytes_used("obj") == st.bytes_used("obj")
    finally:
        await again.close()


async def test_discard_frees_whole_stripes_and_zeroes_partial_ones(backend: RadosBackend,
                                                                   ceph: CephCluster) -> None:
    st = backend.storage("v")
    data = os.urandom(4 * STRIPE)
    await st.write("d", 0, data)
    assert st.bytes_used("d") == 4 * STRIPE
    assert len([k for k in rados_keys(ceph, backend.namespace) if k.startswith("v/d/")]) == 4
    # Half of stripe 0, all of stripes 1 and 2, the tail of stripe 3 from its middle.
    await st.discard("d", STRIPE // 2, 3 * STRIPE)
    await st.sync("d")
    want = data[:STRIPE // 2] + bytes(3 * STRIPE) + data[3 * STRIPE + STRIPE // 2:]
    assert await st.read("d", 0, 4 * STRIPE) == want
    stripes = sorted(k for k in rados_keys(ceph, backend.namespace) if k.startswith("v/d/"))
    assert stripes == ["v/d/0000000000000000", "v/d/0000000000000003"]
    assert st.bytes_used("d") < 2 * STRIPE
    # Stripe 0 was truncated, 1 and 2 removed: holes; stripe 3 was zeroed inside: still data.
    assert await st.extents("d", 0, 4 * STRIPE) == [
        (0, STRIPE // 2, True), (STRIPE // 2, STRIPE * 5 // 2, False),
        (3 * STRIPE, STRIPE, True)]
    # Discarding the tail of the last stripe truncates it: the rest reads as a hole.
    await st.discard("d", 3 * STRIPE + STRIPE // 2, STRIPE // 2)
    runs = await st.extents("d", 3 * STRIPE, STRIPE)
    assert runs == [(3 * STRIPE, STRIPE // 2, True), (3 * STRIPE + STRIPE // 2, STRIPE // 2,
                                                       False)]
    want = want[:3 * STRIPE + STRIPE // 2] + bytes(STRIPE // 2)
    assert await st.read("d", 0, 4 * STRIPE) == want
    again = await reopen(ceph, backend)
    try:
        other = again.storage("v")
        assert await other.read("d", 0, 4 * STRIPE) == want
        assert other.bytes_used("d") == st.bytes_used("d")
    finally:
        await again.close()


async def test_delete_and_names_after_reopen(backend: RadosBackend, ceph: CephCluster) -> None:
    a, b = backend.storage("a"), backend.storage("b")
    await a.allocate("empty", 1 << 30)
    await a.write("full", 5, b"x" * (3 * STRIPE))
    await b.write("other", 0, b"y")
    await a.delete("nothing-there")  # not an error
    again = await reopen(ceph, backend)
    try:
        assert again.storage("a").names() == ["empty", "full"]
        assert again.storage("b").names() == ["other"]
    finally:
        await again.close()
    await a.delete("full")
    await a.delete("empty")
    assert a.names() == [] and not a.exists("full") and a.bytes_used("full") == 0
    assert await a.read("full", 0, 10) == bytes(10)
    assert {k for k in rados_keys(ceph, backend.namespace) if k.startswith("a/")} == set()
    again = await reopen(ceph, backend)
    try:
        assert again.storage("a").names() == []
        assert again.storage("b").names() == ["other"]
    finally:
        await again.close()


async def test_many_requests_in_flight_at_once(backend: RadosBackend,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    st = backend.storage("v")
    outstanding = {"now": 0, "max": 0}
    submit = RadosStorage._submit

    def counting(self: RadosStorage, start: Any, what: str, *rest: Any) -> asyncio.Future[Any]:
        fut = submit(self, start, what, *rest)
        outstanding["now"] += 1
        outstanding["max"] = max(outstanding["max"], outstanding["now"])

        def done(_: object) -> None:
            outstanding["now"] -= 1

        fut.add_done_callback(done)
        return fut

    monkeypatch.setattr(RadosStorage, "_submit", counting)
    blocks = [os.urandom(4096) for _ in range(256)]
    # The event loop keeps running while they are in flight: a ticker task gets its turns.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(st.write("c", i * 8192, blk) for i, blk in enumerate(blocks)))
        reads = await asyncio.gather(*(st.read("c", i * 8192, 4096) for i in range(256)))
    finally:
        tick.cancel()
    assert reads == blocks
    assert outstanding["max"] > 32, outstanding  # not one at a time
    assert outstanding["now"] == 0
    assert ticks > 10


async def retry(call: Any, tries: int = 20) -> Any:
    """``call()`` until it succeeds (bounded): the OSD may take a moment to answer again."""
    for _ in range(tries - 1):
        try:
            return await call()
        except OwmError:
            await asyncio.sleep(0.5)
    return await call()


async def stop(proc: Any) -> None:
    """SIGSTOP ``proc`` and wait (bounded) until every thread of it has stopped: the stop takes
    effect some milliseconds later on a busy machine, and a write sent meanwhile is answered."""
    proc.send_signal(signal.SIGSTOP)
    tasks = f"/proc/{proc.pid}/task"
    for _ in range(500):
        states = []
        for tid in os.listdir(tasks):
            with contextlib.suppress(OSError), open(f"{tasks}/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if states and all(state in "Tt" for state in states):
            return
        await asyncio.sleep(0.01)


async def test_a_stopped_osd_fails_requests_with_eio_then_recovers(ceph: CephCluster) -> None:
    b = await RadosBackend.open(ceph.conf_path, ceph.pool, f"t-{uuid.uuid4().hex[:12]}", STRIPE,
                                op_timeout=2)
    st = b.storage("v")
    osd = ceph.procs["osd.0"]
    try:
        await retry(lambda: st.write("x", 0, b"before"))  # a busy machine may be slow
        await stop(osd)
        try:
            with pytest.raises(OwmError) as caught:
                await asyncio.wait_for(st.write("x", 0, b"during"), 30)
        finally:
            osd.send_signal(signal.SIGCONT)
        assert caught.value.errno == errno.EIO
        assert "did not answer within 2 s" in str(caught.value)
        # Back: requests succeed again on the same storage.
        await retry(lambda: st.write("x", 0, b"after!"))
        assert await retry(lambda: st.read("x", 0, 6)) == b"after!"
    finally:
        osd.send_signal(signal.SIGCONT)
        await b.close()


async def test_a_read_past_a_stripes_end_is_zeroes(backend: RadosBackend) -> None:
    """python-rados hands back its whole, uninitialised buffer when a read returns 0 bytes."""
    st = backend.storage("v")
    await st.write("short", 0, b"s" * 100)
    junk = [os.urandom(n) for n in range(64, 4096, 97)]  # dirty the heap a little
    for length in range(64, 4096, 97):
        assert await st.read("short", 200, length) == bytes(length), length
        assert await st.read("short", 50, length) == b"s" * 50 + bytes(length - 50), length
    assert junk


async def test_a_discard_and_a_write_started_together_keep_their_order(
        backend: RadosBackend) -> None:
    """A discard over several stripes and a write beside it in one of them, started in one
    loop turn: RADOS must see the discard's calls first, as the index did, or the stripe's
    removal lands after the write and takes it."""
    st = backend.storage("v")
    await st.write("o", 0, b"a" * STRIPE)
    await st.write("o", STRIPE, b"b" * 4096)  # stripe 1 holds 4K
    # The discard covers stripe 1 up to its end (so it removes it); the write lands beyond.
    await asyncio.gather(st.discard("o", 0, STRIPE + 4096),
                         st.write("o", STRIPE + 8192, b"c" * 4096))
    got = await st.read("o", 0, STRIPE + 12288)
    assert got == bytes(STRIPE + 8192) + b"c" * 4096
    again = await RadosBackend.open(backend.conf_path, backend.pool, backend.namespace, STRIPE)
    try:
        assert await again.storage("v").read("o", STRIPE + 8192, 4096) == b"c" * 4096
    finally:
        await again.close()


async def test_a_cancelled_sync_leaves_the_writes_it_waited_for(backend: RadosBackend) -> None:
    st = backend.storage("v")
    await st.write("s", 0, b"0")
    writes = [asyncio.ensure_future(st.write("s", i * 4096, os.urandom(4096)))
              for i in range(64)]
    await asyncio.sleep(0)
    syncing = asyncio.ensure_future(st.sync("s"))
    await asyncio.sleep(0)
    syncing.cancel()
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert all(r is None for r in results), results  # none of them cancelled
    await st.sync("s")


async def test_completions_reach_the_loop_in_batches(backend: RadosBackend,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Many completions in flight wake the loop fewer times than there are completions."""
    st = backend.storage("v")
    await st.write("b", 0, b"0")
    loop = asyncio.get_running_loop()
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    n = 512
    await asyncio.gather(*(st.write("b", i * 4096, b"x" * 4096) for i in range(n)))
    assert wakeups < n, wakeups


async def test_a_sync_beside_a_discard_of_a_vanished_stripe_succeeds(
        backend: RadosBackend, ceph: CephCluster) -> None:
    """A discard's remove that finds its object already gone (-ENOENT) is no failure, for the
    discard or for a sync waiting on it."""
    import rados

    st = backend.storage("v")
    await st.write("g", 0, b"g" * STRIPE)
    cluster = rados.Rados(conffile=str(ceph.conf_path))
    cluster.connect(timeout=10)
    try:
        ioctx = cluster.open_ioctx(ceph.pool)
        ioctx.set_namespace(backend.namespace)
        ioctx.remove_object("v/g/0000000000000000")  # behind the storage's back
        ioctx.close()
    finally:
        cluster.shutdown()
    await asyncio.gather(st.discard("g", 0, STRIPE), st.sync("g"))
    assert await st.read("g", 0, 16) == bytes(16)
