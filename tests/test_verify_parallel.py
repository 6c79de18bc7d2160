"""``owm backup verify`` in forked worker processes (one per core, each on an interleaved shard
of the distinct chunks): a tampered chunk is found in every shard and named by its offset, and a
worker that is killed or fails makes verify fail in one sentence, never report chunks good that
it did not check, and leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from owm.backup import verify
from owm.backup.crypto import KeySource
from owm.backup.repo import Repository
from owm.backup.verify import VerifyAborted, VerifyTotals, verify_backups
from tests.conftest import run_owm
from tests.test_backup_parallel import CHUNK, _repository
from tests.test_backup_speedpaths import _two_backups


def _tamper(repo: Repository, indices: list[int]) -> None:
    digests = dict(repo.load("vol@0-x").chunk_map.entries())
    for index in indices:
        path = repo.chunk_path(digests[index])
        packed = bytearray(path.read_bytes())
        packed[len(packed) // 2] ^= 0x55
        path.write_bytes(bytes(packed))


def _count_forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    forks: list[int] = []
    real = os.fork

    def counting() -> int:
        pid = real()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counting)
    return forks


def _children() -> set[int]:
    """This process's children, zombies included (from every thread's /proc children list)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before() -> None:
    _BEFORE.clear()
    _BEFORE.update(_children())


def _no_children_left() -> None:
    """Every worker verify forked is gone and reaped (the suite's own children, such as a
    session's Ceph cluster, were there before the test and are not counted)."""
    assert _children() <= _BEFORE, _children() - _BEFORE


def test_forked_verify_finds_a_tampered_chunk_in_every_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, _ = _repository(tmp_path / "repo", 120)
    # Chunks 0..2 fall in shards 0, 1, 2 (they are dealt round-robin), 119 at the end of one.
    damaged = [0, 1, 2, 61, 119]
    _tamper(repo, damaged)
    forks = _count_forks(monkeypatch)
    totals = VerifyTotals()
    [report] = verify_backups(repo, workers=3, processes=True, totals=totals)
    assert len(forks) == 3
    assert [f.chunk for f in report.failures] == damaged
    assert [f.offset for f in report.failures] == [i * CHUNK for i in damaged]
    assert report.chunks_checked == 120 and totals.chunks == 120
    assert totals.image_bytes == 120 * CHUNK and totals.stored_bytes > 0
    # The parent moved every damaged chunk aside, as the threaded path does.
    digests = dict(repo.load("vol@0-x").chunk_map.entries())
    for index in damaged:
        assert not repo.chunk_path(digests[index]).exists()
    _no_children_left()
    # The same verdicts as the threads give.
    for index in damaged:
        bad = repo.chunk_path(digests[index])
        bad.with_name(bad.name + ".bad").rename(bad)
    [threaded] = verify_backups(repo, workers=3, processes=False)
    assert [f.to_json() for f in threaded.failures] == [f.to_json() for f in report.failures]


def _dies_at(victim: bytes, die: Callable[[], None]) -> Callable[..., tuple[str | None, int]]:
    parent = os.getpid()
    real = verify._check

    def check(repo: Repository, digest: bytes, length: int) -> tuple[str | None, int]:
        if digest == victim and os.getpid() != parent:
            die()
        return real(repo, digest, length)

    return check


def test_a_worker_killed_fails_verify_in_one_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, _ = _repository(tmp_path / "repo", 100)
    digests = dict(repo.load("vol@0-x").chunk_map.entries())
    monkeypatch.setattr(verify, "_check", _dies_at(
        digests[77], lambda: os.kill(os.getpid(), signal.SIGKILL)))
    with pytest.raises(VerifyAborted) as caught:
        verify_backups(repo, workers=2, processes=True)
    message = str(caught.value)
    assert "\n" not in message and "killed by signal 9 (SIGKILL)" in message
    assert "not known to be intact" in message
    _no_children_left()


def test_a_worker_that_fails_fails_verify(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo, _ = _repository(tmp_path / "repo", 60)
    digests = dict(repo.load("vol@0-x").chunk_map.entries())

    def boom() -> None:
        raise MemoryError

    monkeypatch.setattr(verify, "_check", _dies_at(digests[5], boom))
    with pytest.raises(VerifyAborted, match=r"failed \(exit status 70\) after checking"):
        verify_backups(repo, workers=2, processes=True)
    _no_children_left()


def test_off_the_main_thread_verify_uses_threads(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon's executor thread must not fork (other threads may hold locks)."""
    repo, _ = _repository(tmp_path / "repo", 40)
    _tamper(repo, [7])
    monkeypatch.setattr(verify, "FORK_MIN_BYTES", 0)
    forks = _count_forks(monkeypatch)
    chunks: list[int] = []
    thread = threading.Thread(target=lambda: chunks.extend(
        f.chunk for f in verify_backups(repo, workers=2)[0].failures))
    thread.start()
    thread.join(60)
    assert chunks == [7] and forks == []
    [report] = verify_backups(repo, workers=2)  # from the main thread: forked
    assert len(forks) == 2 and [f.chunk for f in report.failures] == [7]


def test_cli_verify_of_a_large_repository_forks_and_names_the_offset(tmp_path: Path) -> None:
    chunks = verify.FORK_MIN_BYTES // CHUNK + 8  # large enough for the CLI to fork
    repo, _ = _repository(tmp_path / "repo", chunks)
    result = run_owm("backup", "verify", repo.root)
    assert result.returncode == 0, result
    assert f"Checked {chunks} distinct chunks" in result.stdout
    _tamper(repo, [3, chunks - 2])
    result = run_owm("backup", "verify", repo.root)
    assert result.returncode == 1, result
    assert f"offset {3 * CHUNK}" in result.stderr and "1 more chunk fails" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_forked_verify_names_every_offset_of_a_shared_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool) -> None:
    """Two backups sharing chunks, one chunk three times in one of them: its damage, found by a
    worker process (the keyed hash and the seal in an encrypted repository), is named at
    every offset of both backups that use it."""
    key_file = tmp_path / "key"
    key_file.write_text("22" * 32 + "\n")
    repo, distinct = _two_backups(tmp_path / "repo",
                                  KeySource(key_file=key_file) if encrypted else None)
    shared = repo.load("vol@0-a").chunk_map.get(0)  # text[0]: chunk 0 of both backups
    thrice = repo.load("vol@0-a").chunk_map.get(4)  # text[1]: chunks 3, 4 and 5
    assert shared is not None and thrice is not None
    for digest in (shared, thrice):
        path = repo.chunk_path(digest)
        packed = bytearray(path.read_bytes())
        packed[len(packed) // 2] ^= 0x01
        path.write_bytes(bytes(packed))
    forks = _count_forks(monkeypatch)
    totals = VerifyTotals()
    first, second = verify_backups(repo, workers=2, processes=True, totals=totals)
    assert len(forks) == 2 and totals.chunks == len(distinct)
    assert [f.offset for f in first.failures] == [0, 3 * CHUNK, 4 * CHUNK, 5 * CHUNK]
    assert [f.offset for f in second.failures] == [0]
    reason = "fails authentication" if encrypted else "does not match its hash"
    assert all(reason in f.reason for f in first.failures + second.failures)
    _no_children_left()
