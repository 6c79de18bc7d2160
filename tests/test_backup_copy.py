"""``owm backup copy SRC DST [ID...]`` through the CLI: incremental chains arrive whole, only the
chunks the destination lacks move, every copy restores byte for byte, a damaged source chunk
stops the copy of its backup in one sentence, and mistakes are one sentence each.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from backup_helpers import create, ok_json, preserve, random_writes, read_image, refused, write
from conftest import Daemon, run_owm

from owm.backup.repo import Repository
from owm.backup.restore import restore_backup

CHUNK = 64 * 1024


def _restores(repo: Path, backup_id: str, expected: bytes) -> None:
    target = repo.parent / "check.raw"
    asyncio.run(restore_backup(repo, backup_id, f"file:{target}"))
    assert target.read_bytes() == expected, backup_id
    target.unlink()


def test_copy_moves_only_missing_chunks_and_chains_whole(daemon: Daemon,
                                                         short_tmp: Path) -> None:
    src, dst = short_tmp / "src", short_tmp / "dst"
    create(daemon, "vol", "4M")
    write(daemon, random_writes(random.Random("copy"), 4 << 20, 8))
    images: dict[str, bytes] = {}
    ids = []
    for n in range(3):
        if n:
            write(daemon, [(n * 7 * CHUNK, random.randbytes(2 * CHUNK))])
        image = preserve(daemon)
        images[image] = read_image(daemon, image)
        ids.append(ok_json(daemon.owm("backup", image, "--to", src, "--json"))["id"])
    # The middle incremental: its parent comes with it.
    first = ok_json(run_owm("backup", "copy", src, dst, ids[1], "--json"))
    assert first["copied"] == ids[:2], first
    total = len(Repository.open(src).load(ids[1]).chunk_map.digests() |
                Repository.open(src).load(ids[0]).chunk_map.digests())
    assert first["chunks_copied"] == total and first["chunks_present"] > 0
    # Everything else: only the newest backup's two new chunks move.
    rest = ok_json(run_owm("backup", "copy", src, dst, "--json"))
    assert rest["copied"] == [ids[2]] and rest["chunks_copied"] == 2, rest
    assert {s["id"] for s in rest["skipped"]} == set(ids[:2])
    copies = {b["id"]: b for b in ok_json(run_owm("backup", "list", dst, "--json"))}
    assert set(copies) == set(ids) and copies[ids[2]]["incremental"] is True
    for backup_id in ids:
        _restores(dst, backup_id, images[copies[backup_id]["image"]])
    assert ok_json(run_owm("backup", "verify", dst, "--json"))["ok"]
    again = ok_json(run_owm("backup", "copy", src, dst, "--json"))
    assert again["copied"] == [] and again["chunks_copied"] == 0


def test_a_damaged_source_chunk_stops_its_backup_in_one_sentence(daemon: Daemon,
                                                                  short_tmp: Path) -> None:
    src, dst = short_tmp / "src", short_tmp / "dst"
    create(daemon, "vol", "1M")
    write(daemon, [(0, random.randbytes(CHUNK)), (5 * CHUNK, random.randbytes(CHUNK))])
    backup_id = ok_json(daemon.owm("backup", preserve(daemon), "--to", src, "--json"))["id"]
    r = Repository.open(src)
    digest = sorted(r.load(backup_id).chunk_map.digests())[0]
    path = r.chunk_path(digest)
    packed = bytearray(path.read_bytes())
    packed[-1] ^= 0xFF
    path.write_bytes(bytes(packed))
    line = refused(run_owm("backup", "copy", src, dst, backup_id))
    assert backup_id in line and "was not copied" in line
    assert Repository.open(dst).manifest_ids() == []  # nothing claims to be there
    assert "no backup repository" in refused(run_owm("backup", "copy", short_tmp / "nope", dst))
    assert "same repository" in refused(run_owm("backup", "copy", src, src))
    assert "no backup" in refused(run_owm("backup", "copy", src, dst, "missing-id"))
