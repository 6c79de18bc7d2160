"""Bad input to prune and copy, one sentence each and nothing lost: a missing repository, one of
another format version, a half-written manifest, and a full disk in the middle of a collection
(then rerun, every remaining backup restores).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import time
from pathlib import Path

import blake3
import pytest
from backup_helpers import ok_json, refused
from conftest import run_owm

import owm.backup.repo as repo_module
from owm.backup.manifest import COMPLETE, ChunkMap, Manifest
from owm.backup.prune import Policy, prune
from owm.backup.repo import MARKER, Repository
from owm.backup.restore import restore_backup

CHUNK = 64 * 1024


def _backup(repo: Repository, backup_id: str, chunks: list[bytes], when: str) -> None:
    chunk_map = ChunkMap(len(chunks))
    for index, data in enumerate(chunks):
        digest = blake3.blake3(data).digest()
        repo.put_chunk(digest, data)
        chunk_map.put(index, digest)
    repo.sync()
    m = Manifest(id=backup_id, volume="vol", image="vol@0", generation=0,
                 size=len(chunks) * CHUNK, chunk_size=CHUNK, state=COMPLETE,
                 consistency="transaction-consistent", started_at=when, map_data=chunk_map,
                 preserved_at=when)
    m.completed_at = when
    repo.save(m)


def _two_backups(root: Path) -> tuple[Repository, list[bytes]]:
    """An old backup (a) and a newer one (b) sharing half their chunks, dated long ago."""
    repo = Repository.open(root, create=True)
    rng = random.Random("input")
    shared = [rng.randbytes(CHUNK) for _ in range(4)]
    newer = [*shared, *(rng.randbytes(CHUNK) for _ in range(4))]
    _backup(repo, "a", [*shared, *(rng.randbytes(CHUNK) for _ in range(6))],
            "2025-01-01T00:00:00Z")
    _backup(repo, "b", newer, "2025-01-02T00:00:00Z")
    old = time.time() - 3600
    for path in (root / "chunks").glob("*/*"):
        os.utime(path, (old, old))
    return repo, newer


def _restores(repo: Repository, backup_id: str, chunks: list[bytes]) -> None:
    target = repo.root.parent / f"{backup_id}.raw"
    asyncio.run(restore_backup(repo.root, backup_id, f"file:{target}"))
    assert target.read_bytes() == b"".join(chunks)
    target.unlink()


def test_a_full_disk_mid_collection_loses_nothing_and_a_rerun_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, newer = _two_backups(tmp_path / "repo")
    real_rename = os.rename
    calls = 0

    def full_disk(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_rename(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo_module.os, "rename", full_disk)
    with pytest.raises(OSError):
        prune(repo, Policy(last=1))
    monkeypatch.setattr(repo_module.os, "rename", real_rename)
    assert repo.manifest_ids() == ["b"]
    _restores(repo, "b", newer)
    result = prune(repo, Policy(last=1))
    assert result.removed == [] and result.chunks_removed == 6 - 2  # two went the first time
    names = {p.name for p in (repo.root / "chunks").glob("*/*")}
    assert names == {d.hex() for d in repo.load("b").chunk_map.digests()}
    _restores(repo, "b", newer)


def test_a_chunk_left_aside_by_a_stopped_collection_still_restores(tmp_path: Path) -> None:
    """Moved aside, then the collection died before putting it back (a backup had touched it
    and has named it since): readers find it, and the next collection puts it back."""
    repo, newer = _two_backups(tmp_path / "repo")
    digest = repo.load("b").chunk_map.digests().pop()
    path = repo.chunk_path(digest)
    path.rename(path.with_name(path.name + ".gc"))
    _restores(repo, "b", newer)
    repo.collect_garbage()
    assert path.exists() and not path.with_name(path.name + ".gc").exists()
    _restores(repo, "b", newer)


def test_bad_repositories_get_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert "no backup repository" in refused(run_owm("backup", "prune", missing,
                                                     "--keep-last", "1"))
    assert not missing.exists()
    repo, _ = _two_backups(tmp_path / "repo")
    marker = repo.root / MARKER
    config = json.loads(marker.read_bytes())
    marker.write_text(json.dumps({**config, "version": 99}))
    line = refused(run_owm("backup", "prune", repo.root, "--keep-last", "1"))
    assert "version 99" in line
    assert "version 99" in refused(run_owm("backup", "copy", repo.root, tmp_path / "dst"))
    marker.write_text(json.dumps(config))
    # A half-written manifest: the policy still applies to the others, but no chunk goes.
    (repo.root / "backups" / "c.json").write_bytes(b'{"format": "owm-backup-man')
    before = {p.name for p in (repo.root / "chunks").glob("*/*")}
    result = ok_json(run_owm("backup", "prune", repo.root, "--keep-last", "1", "--json"))
    assert [r["id"] for r in result["removed"]] == ["a"]
    assert result["chunks_removed"] == 0 and "c is damaged" in result["chunks_kept_because"]
    assert {p.name for p in (repo.root / "chunks").glob("*/*")} == before
    assert "--keep" in refused(run_owm("backup", "prune", repo.root, "--keep-last", "-1"), 2)
