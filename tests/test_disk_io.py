"""Local storage on a disk: the batched write path and the cached absence of objects.

Small writes the kernel will not take inline (ext4 refuses ``RWF_NOWAIT`` buffered writes) are
queued and written by one thread per batch with one ``io_submit`` (``owm.storage.aio``).  These
tests force that path (as on ext4, whatever ``tmp_path`` is) and check what the engines rely on:
a burst of writes costs one hop, reads see every write that returned, a request that fails fails
alone (EIO for a bad descriptor, ENOSPC for a full device) while the rest of its batch lands, big
writes land whole in 64 KiB pieces, and a read of an object that does not exist does not open()
it each time, without missing the object once it is written.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from owm.common.errors import NoSpace, OwmError
from owm.storage import aio, local
from owm.storage.inlinewrite import InlineWriteGuard
from owm.storage.local import LocalStorage


def queued(root: Path, batch_writer: bool = True) -> LocalStorage:
    """A storage whose small writes all take the queued, batched path (with Linux AIO, or,
    where it cannot be had, one ``pwritev`` per run), cut in pieces as on a disk."""
    storage = LocalStorage(root, inline_writes=False)
    storage._piece = aio.PIECE
    if storage._batch_writer is None and batch_writer:  # a memory-backed tmp_path
        storage._batch_writer = aio.open_batch_writer()
        if storage._batch_writer is None:
            pytest.skip("Linux AIO is not available here")
    if storage._batch_writer is not None and not batch_writer:
        storage._batch_writer.close()
        storage._batch_writer = None
    return storage


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    inner = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


async def test_a_burst_of_small_writes_costs_one_hop(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    storage = queued(tmp_path)
    wakeups = count_calls(monkeypatch, local, "_settle")  # the loop woken once per batch
    try:
        await storage.write("obj", 0, b"\0")  # the object exists: its open is not counted
        for burst in range(3):
            wakeups[0] = 0
            batches = count_calls(monkeypatch, storage._batch_writer, "write_many")
            data = [bytes([burst * 16 + k + 1]) * 4096 for k in range(16)]
            await asyncio.gather(*(storage.write("obj", k * 8192, d) for k, d in enumerate(data)))
            assert (wakeups[0], batches[0]) == (1, 1)  # one thread hop, one io_submit
            for k, d in enumerate(data):
                assert await storage.read("obj", k * 8192, 4096) == d
    finally:
        await storage.close()


@pytest.mark.parametrize("batch_writer", [True, False], ids=["aio", "pwritev"])
async def test_reads_see_every_write_that_returned(tmp_path: Path, batch_writer: bool) -> None:
    storage = queued(tmp_path, batch_writer)
    rng = random.Random(3)
    size = 1 << 20
    want = bytearray(size)
    try:
        for _round in range(20):
            ops = []
            for _ in range(rng.randrange(1, 24)):
                length = rng.choice([512, 4096, 4096, 65536, 200000, 300000])
                offset = rng.randrange(0, size - length)
                ops.append((offset, rng.randbytes(length)))
            if rng.random() < 0.3:  # a run of contiguous writes, across a piece boundary
                base = rng.randrange(0, size - 16 * 8192)
                ops += [(base + k * 8192, rng.randbytes(8192)) for k in range(16)]
            # Overlapping writes issued in one turn land in the order issued.
            await asyncio.gather(*(storage.write("obj", o, memoryview(d)) for o, d in ops))
            for o, d in ops:
                want[o : o + len(d)] = d
            start = rng.randrange(0, size - 70000)
            assert await storage.read("obj", start, 70000) == bytes(want[start : start + 70000])
        assert await storage.read("obj", 0, size) == bytes(want)
    finally:
        await storage.close()


async def test_a_large_write_lands_whole_in_pieces(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB write at an unaligned offset is cut at every 64 KiB boundary, no byte lost."""
    storage = queued(tmp_path)
    writer = storage._batch_writer
    assert writer is not None
    seen: list[tuple[int, int]] = []
    inner = writer._write_part

    def spy(pieces: list[tuple[int, int, int, bytes]], results: list[OSError | None]) -> None:
        seen.extend((offset, len(data)) for _k, _fd, offset, data in pieces)
        inner(pieces, results)

    monkeypatch.setattr(writer, "_write_part", spy)
    try:
        data = random.Random(5).randbytes((1 << 20) + 777)
        await storage.write("obj", 12345, memoryview(data))
        assert await storage.read("obj", 12345, len(data)) == data
        assert await storage.read("obj", 0, 12345) == bytes(12345)
        assert sum(n for _o, n in seen) == len(data) and len(seen) == 17
        assert all(o // aio.PIECE == (o + n - 1) // aio.PIECE for o, n in seen)
    finally:
        await storage.close()


async def test_a_failing_request_fails_alone_with_eio(tmp_path: Path) -> None:
    storage = queued(tmp_path)
    try:
        await storage.write("bad", 0, b"\1" * 4096)
        await storage.write("good", 0, b"\0")
        # The kernel refuses writes through a read-only descriptor (EBADF) inside the batch.
        os.close(storage._fds["bad"])
        storage._fds["bad"] = os.open(tmp_path / "bad", os.O_RDONLY)
        names = ["good", "good", "bad", "good", "bad", "good"]
        results = await asyncio.gather(
            *(storage.write(n, k * 4096, bytes([k + 2]) * 4096) for k, n in enumerate(names)),
            return_exceptions=True)
        for k, (name, result) in enumerate(zip(names, results, strict=True)):
            if name == "bad":
                assert isinstance(result, OwmError) and result.errno == errno.EIO
                assert "writing bad" in str(result)
            else:
                assert result is None
                assert await storage.read("good", k * 4096, 4096) == bytes([k + 2]) * 4096
        assert await storage.read("bad", 0, 4096) == b"\1" * 4096
    finally:
        await storage.close()


def inline(root: Path) -> LocalStorage:
    """A storage whose small writes run on the loop (a guard that always allows), as on ext4."""
    storage = LocalStorage(root)
    storage._write_mode = None  # no RWF_NOWAIT writes
    storage._guard = InlineWriteGuard(lambda: (0, 1 << 30))
    storage._piece = aio.PIECE
    return storage


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("make", [queued, inline], ids=["queued", "inline"])
async def test_a_full_disk_fails_only_the_requests_that_hit_it(
    tmp_path: Path, make: Callable[[Path], LocalStorage]
) -> None:
    storage = make(tmp_path)
    try:
        (tmp_path / "full").symlink_to("/dev/full")  # every write to it: ENOSPC
        names = ["ok", "full", "ok", "ok", "full", "ok", "ok", "ok"]
        results = await asyncio.gather(
            *(storage.write(n, k * 4096, bytes([k + 1]) * 4096) for k, n in enumerate(names)),
            return_exceptions=True)
        for k, (name, result) in enumerate(zip(names, results, strict=True)):
            if name == "full":
                assert isinstance(result, NoSpace) and result.errno == errno.ENOSPC
            else:
                assert result is None
                assert await storage.read("ok", k * 4096, 4096) == bytes([k + 1]) * 4096
        await storage.write("ok", 0, b"\7" * 4096)  # the queue carries on
        assert await storage.read("ok", 0, 4096) == b"\7" * 4096
    finally:
        await storage.close()


async def test_reading_a_missing_object_opens_it_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    storage = queued(tmp_path)
    opens = count_calls(monkeypatch, local.os, "open")
    try:
        for _ in range(50):
            assert await storage.read("never", 4096, 4096) == bytes(4096)
        assert not storage.exists("never")
        assert opens[0] <= 1
        # Written (created) afterwards: seen at once, by read and exists.
        await storage.write("never", 4096, b"\5" * 4096)
        assert storage.exists("never")
        assert await storage.read("never", 4096, 4096) == b"\5" * 4096
        # Deleted: zeroes again, and a new write is seen again.
        await storage.delete("never")
        assert not storage.exists("never")
        assert await storage.read("never", 4096, 4096) == bytes(4096)
        await storage.write("never", 0, b"\6" * 512)
        assert await storage.read("never", 0, 512) == b"\6" * 512
        # allocate() creates it too.
        await storage.read("sized", 0, 512)
        await storage.allocate("sized", 8192)
        assert storage.exists("sized")
        await storage.write("sized", 0, b"\4" * 512)
        assert await storage.read("sized", 0, 512) == b"\4" * 512
    finally:
        await storage.close()
