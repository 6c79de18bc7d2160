"""Verify and restore on a thread per core: results in order, memory bounded by the window (never
by the repository's size), and every damaged chunk found whichever batch and thread it fell in.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import blake3
import pytest

from owm.backup.manifest import COMPLETE, ChunkMap, Manifest
from owm.backup.repo import Repository, utc_now
from owm.backup.restore import restore_backup
from owm.backup.verify import bounded_map, verify_backups

CHUNK = 64 * 1024


def test_bounded_map_keeps_order_and_a_bounded_window() -> None:
    lock = threading.Lock()
    outstanding = peak = 0

    def work(n: int) -> int:
        nonlocal outstanding, peak
        with lock:
            outstanding += 1
            peak = max(peak, outstanding)
        time.sleep(random.random() / 500)
        return n * n

    got = []
    for n, square in bounded_map(work, range(200), 3):
        got.append((n, square))
        with lock:
            outstanding -= 1
        time.sleep(0.0005)  # a slow consumer: the workers must wait for it, not run ahead
    assert got == [(n, n * n) for n in range(200)]
    assert peak <= 2 * 3


def test_bounded_map_stops_at_the_first_error() -> None:
    def work(n: int) -> int:
        if n == 5:
            raise ValueError("five")
        return n

    seen = []
    with pytest.raises(ValueError, match="five"):
        for n, _ in bounded_map(work, range(10_000), 2):
            seen.append(n)
    assert seen == [0, 1, 2, 3, 4]


def _repository(root: Path, chunks: int) -> tuple[Repository, bytes]:
    repo = Repository.open(root, create=True)
    rng = random.Random("parallel")
    chunk_map = ChunkMap(chunks)
    image = bytearray()
    for index in range(chunks):
        data = (bytes([index % 251]) * 100 + rng.randbytes(60)) * (CHUNK // 160) + bytes(
            CHUNK % 160)
        digest = blake3.blake3(data).digest()
        repo.put_chunk(digest, data)
        chunk_map.put(index, digest)
        image += data
    repo.sync()
    m = Manifest(id="vol@0-x", volume="vol", image="vol@0", generation=0, size=chunks * CHUNK,
                 chunk_size=CHUNK, state=COMPLETE, consistency="transaction-consistent",
                 started_at=utc_now(), map_data=chunk_map)
    m.completed_at = utc_now()
    repo.save(m)
    return repo, bytes(image)


def test_parallel_verify_and_restore_find_every_damaged_chunk(tmp_path: Path) -> None:
    repo, image = _repository(tmp_path / "repo", 200)  # about 6 batches of 2 MiB
    out = tmp_path / "out.raw"
    asyncio.run(restore_backup(repo.root, "vol@0-x", f"file:{out}"))
    assert out.read_bytes() == image
    digests = {i: d for i, d in repo.load("vol@0-x").chunk_map.entries()}
    damaged = [3, 97, 199]
    for index in damaged:
        path = repo.chunk_path(digests[index])
        packed = bytearray(path.read_bytes())
        packed[len(packed) // 2] ^= 0x55
        path.write_bytes(bytes(packed))
    for workers in (1, 4):
        for index in damaged:  # verify moved them aside: put the damaged ones back
            bad = repo.chunk_path(digests[index]).with_name(digests[index].hex() + ".bad")
            if bad.exists():
                bad.rename(repo.chunk_path(digests[index]))
        [report] = verify_backups(repo, workers=workers)
        assert [f.chunk for f in report.failures] == damaged, workers
        assert report.chunks_checked == 200
    with pytest.raises(Exception, match=f"offset {3 * CHUNK}"):
        asyncio.run(restore_backup(repo.root, "vol@0-x", f"file:{tmp_path / 'bad.raw'}"))
    assert not (tmp_path / "bad.raw").exists()
