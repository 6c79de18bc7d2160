"""Backup repository trust (issue 18, items 5-7 and the damaged-chain item), against a real daemon
and the CLI as a subprocess:

* a manifest with one field changed (size, state, generation) is *damaged*: listed so, named by
  verify, refused by restore and never the parent of an incremental; a manifest written before
  checksums (version 1) is read as "unverified" and never a parent;
* every path of a backup comes from its manifest's file name: a manifest whose ``id`` names
  another backup, or ``../../victim``, never makes delete touch anything but its own files;
* a volume deleted and created again in the same second is a new incarnation (a new uid): its
  backups never continue the old volume's chain;
* an incremental on top of a chunk that is missing or wrong re-reads it from the image;
* fault injection: every byte of a manifest and of a chunk map flipped in turn is detected.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import create, ok, ok_json, preserve, read_image, refused, repo_list, write
from conftest import Daemon, start_daemon

from owm.backup import Repository, run_backup, verify_backups
from owm.backup.manifest import DamagedManifest
from owm.backup.restore import restore_file
from owm.common.errors import OwmError
from owm.control.client import ControlClient
from owm.nbd.client import NbdClient

CHUNK = 64 * 1024
SIZE = 4 << 20


def manifest_path(repo: Path, backup_id: str) -> Path:
    return repo / "backups" / f"{backup_id}.json"


def edit(path: Path, change: Any, *, reseal: bool = False) -> None:
    """Change a manifest's JSON in place; ``reseal`` recomputes its checksum (a hostile edit)."""
    doc = json.loads(path.read_bytes())
    change(doc)
    if reseal:
        from owm.backup import manifest

        doc["checksum"] = manifest.canonical_digest(doc)
        path.write_bytes(manifest.serialize(doc))
    else:
        path.write_bytes(json.dumps(doc, indent=1).encode() + b"\n")


def two_backups(daemon: Daemon, repo: Path) -> tuple[str, str]:
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"a" * CHUNK), (5 * CHUNK, b"five" * 1000)])
    a = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    write(daemon, [(CHUNK, b"b" * CHUNK)])
    b = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    return a, b


# ---------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("field,value", [("size", SIZE - 4), ("state", "incomplete"),
                                         ("generation", 7), ("consistency", "crash-consistent")])
def test_a_changed_manifest_field_makes_the_backup_damaged(daemon: Daemon, short_tmp: Path,
                                                           field: str, value: Any) -> None:
    repo = short_tmp / "repo"
    a, b = two_backups(daemon, repo)
    edit(manifest_path(repo, a), lambda doc: doc.__setitem__(field, value))
    listed = {x["id"]: x for x in repo_list(daemon, repo)}
    assert listed[a]["state"] == "damaged" and "checksum" in listed[a]["error"]
    assert listed[b]["state"] == "complete"
    text = daemon.owm("backup", "list", repo)
    assert text.returncode == 0 and "damaged" in text.stdout
    result = daemon.owm("backup", "verify", repo)
    assert result.returncode == 1 and f"Backup {a} is damaged" in result.stderr, result
    result = daemon.owm("backup", "verify", repo, a)
    assert result.returncode == 1 and f"Backup {a} is damaged" in result.stderr, result
    ok(daemon.owm("backup", "verify", repo, b))
    line = refused(daemon.owm("restore", repo, a, "--to", short_tmp / "a.raw"))
    assert a in line and "checksum" in line
    assert not (short_tmp / "a.raw").exists() and not (short_tmp / "a.raw.partial").exists()


def test_a_damaged_manifest_is_never_an_incremental_parent(daemon: Daemon,
                                                           short_tmp: Path) -> None:
    """The issue's case: @0 claims to be @1, so an incremental of @2 would skip @1's changes."""
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"0" * CHUNK)])
    a = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    write(daemon, [(2 * CHUNK, b"1" * CHUNK)])
    preserve(daemon)  # vol@1, not backed up
    write(daemon, [(4 * CHUNK, b"2" * CHUNK)])
    second = preserve(daemon)
    edit(manifest_path(repo, a), lambda doc: doc.__setitem__("generation", 1))
    summary = ok_json(daemon.owm("backup", second, "--to", repo, "--json"))
    assert summary["parent"] is None and summary["incremental"] is False, summary
    target = short_tmp / "r.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", target))
    assert target.read_bytes() == read_image(daemon, second)


def test_manifests_without_a_checksum_are_read_as_unverified(daemon: Daemon,
                                                             short_tmp: Path) -> None:
    """Repositories written by the previous format stay readable; they are just not trusted."""
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, [(3 * CHUNK, b"old format" * 500)])
    image = preserve(daemon)
    a = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]

    def downgrade(doc: dict[str, Any]) -> None:
        doc["version"] = 1
        for key in ("checksum", "volume_uid"):
            doc.pop(key)
        doc["chunk_map"].pop("file_blake3")

    edit(manifest_path(repo, a), downgrade)
    listed = repo_list(daemon, repo)
    assert [(x["id"], x["state"], x["manifest"]) for x in listed] == [
        (a, "complete", "unverified")]
    assert "complete (unverified)" in ok(daemon.owm("backup", "list", repo))
    verified = ok(daemon.owm("backup", "verify", repo, a))
    assert "intact" in verified and "no checksum" in verified
    target = short_tmp / "a.raw"
    ok(daemon.owm("restore", repo, a, "--to", target))
    assert target.read_bytes() == read_image(daemon, image)
    write(daemon, [(0, b"new" * 100)])
    summary = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))
    assert summary["parent"] is None and summary["incremental"] is False
    assert summary["chunks_reused"] == 1  # deduplication still spares the unchanged data


# ---------------------------------------------------------------------------- item 6


def test_delete_derives_every_path_from_the_file_name(daemon: Daemon, short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    a, b = two_backups(daemon, repo)
    b_files = sorted(p.name for p in (repo / "backups").glob(f"{b}.*"))
    # A's manifest is B's, properly sealed: only the file name says which backup it is.
    manifest_path(repo, a).write_bytes(manifest_path(repo, b).read_bytes())
    listed = {x["id"]: x for x in repo_list(daemon, repo)}
    assert listed[a]["state"] == "damaged" and "names itself" in listed[a]["error"]
    result = daemon.owm("backup", "verify", repo, a)
    assert result.returncode == 1 and f"Backup {a} is damaged" in result.stderr
    deleted = ok_json(daemon.owm("backup", "delete", repo, a, "--json"))
    assert deleted["deleted"] == a
    assert sorted(p.name for p in (repo / "backups").glob(f"{b}.*")) == b_files
    assert not list((repo / "backups").glob(f"{a}.*"))
    ok(daemon.owm("backup", "verify", repo, b))
    target = short_tmp / "b.raw"
    ok(daemon.owm("restore", repo, b, "--to", target))
    assert target.read_bytes() == read_image(daemon, "vol@1")


def test_delete_never_leaves_the_repository(daemon: Daemon, short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    a, b = two_backups(daemon, repo)
    victims = [short_tmp / name for name in ("victim.json", "victim.lock", "victim.0.map")]
    for victim in victims:
        victim.write_text("not the repository's")
    edit(manifest_path(repo, a), lambda doc: doc.__setitem__("id", "../../victim"), reseal=True)
    edit(manifest_path(repo, b), lambda doc: doc["chunk_map"].__setitem__(
        "file", "../../victim.0.map"), reseal=True)
    listed = {x["id"]: x for x in repo_list(daemon, repo)}
    assert listed[a]["state"] == listed[b]["state"] == "damaged"
    for bad in (a, b):
        result = daemon.owm("backup", "verify", repo, bad)
        assert result.returncode == 1 and f"Backup {bad} is damaged" in result.stderr
    # A reference that is not a file's exact id is refused in one sentence.
    assert "no backup" in refused(daemon.owm("backup", "delete", repo, "../../victim"))
    line = refused(daemon.owm("backup", "delete", repo, a[:-2]))
    assert "exact id" in line
    ok(daemon.owm("backup", "delete", repo, a))
    ok(daemon.owm("backup", "delete", repo, b))
    assert all(v.read_text() == "not the repository's" for v in victims)
    assert repo_list(daemon, repo) == []


# ---------------------------------------------------------------------------- item 7


async def _nbd_write(daemon: Daemon, writes: list[tuple[int, bytes]]) -> None:
    client = await NbdClient.connect(export="vol", unix_path=str(daemon.nbd_socket))
    try:
        for offset, data in writes:
            await client.write(offset, data)
        await client.flush()
    finally:
        await client.disconnect()


async def _incarnations(daemon: Daemon, repo: Path) -> tuple[JSON, JSON, str]:
    """Volume vol, backed up, deleted and created again within one second; then its @1."""
    async with ControlClient(daemon.pool) as control:
        old = await control.create_volume("vol", SIZE)
        await _nbd_write(daemon, [(0, b"O" * CHUNK), (3 * CHUNK, b"o" * CHUNK)])
        image = (await control.preserve("vol"))["image"]
        await run_backup(control, image, repo)
        await control.delete_volume("vol", force=True)
        new = await control.create_volume("vol", SIZE)
        await _nbd_write(daemon, [(CHUNK, b"N" * CHUNK)])
        await control.preserve("vol")
        await _nbd_write(daemon, [(2 * CHUNK, b"n" * CHUNK)])
        second = str((await control.preserve("vol"))["image"])
        return old, new, second


JSON = dict[str, Any]


def test_a_volume_created_again_in_the_same_second_is_a_new_volume(daemon: Daemon,
                                                                   short_tmp: Path) -> None:
    deadline = time.monotonic() + 60  # a loaded machine may need many tries
    for attempt in range(20):
        if attempt and time.monotonic() > deadline:
            break
        # Start just after a second begins so that both creations fall in the same second.
        while time.time() % 1 > 0.05:
            time.sleep(0.01)
        repo = short_tmp / f"repo{attempt}"
        old, new, second = asyncio.run(_incarnations(daemon, repo))
        if old["created_at"] == new["created_at"]:
            break
        ok(daemon.owm("volume", "delete", "vol", "--force"))
    assert old["created_at"] == new["created_at"], "could not create twice in one second"
    summary = ok_json(daemon.owm("backup", second, "--to", repo, "--json"))
    target = short_tmp / "new.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", target))
    assert target.read_bytes() == read_image(daemon, second)
    assert summary["incremental"] is False and summary["parent"] is None, summary
    assert len(old["uid"]) == len(new["uid"]) == 32 and old["uid"] != new["uid"]
    shown = ok_json(daemon.owm("volume", "show", "vol", "--json"))
    assert shown["uid"] == new["uid"]
    assert ok_json(daemon.owm("status", "vol", "--json"))[0]["uid"] == new["uid"]
    manifests = {x["id"]: x for x in repo_list(daemon, repo)}
    assert manifests[summary["id"]]["volume_uid"] == new["uid"]


def test_old_catalogs_get_a_uid_for_every_volume(short_tmp: Path) -> None:
    """The migration: a catalog without the uid and restore columns gains them, filled."""
    pool = short_tmp / "pool"
    first = start_daemon(pool)
    try:
        create(first, "vol", "1M")
        write(first, [(0, b"kept" * 100)])
    finally:
        assert first.stop() == 0
    db = sqlite3.connect(pool / "catalog.sqlite")
    db.execute("ALTER TABLE volumes DROP COLUMN uid")
    db.execute("ALTER TABLE volumes DROP COLUMN restore")
    db.commit()
    db.close()
    second = start_daemon(pool)
    try:
        shown = ok_json(second.owm("volume", "show", "vol", "--json"))
        assert len(shown["uid"]) == 32 and shown["restore"] is None
        assert read_image(second, "vol")[:400] == b"kept" * 100
    finally:
        assert second.stop() == 0
    third = start_daemon(pool)
    try:
        assert ok_json(third.owm("volume", "show", "vol", "--json"))["uid"] == shown["uid"]
    finally:
        assert third.stop() == 0


# ---------------------------------------------------------------------------- damaged chain


def test_an_incremental_re_reads_what_its_parent_lost(daemon: Daemon, short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, [(n * CHUNK, bytes([n + 1]) * CHUNK) for n in range(6)])
    a = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    repository = Repository.open(repo)
    entries = dict(repository.load(a).chunk_map.entries())
    repository.chunk_path(entries[1]).unlink()  # missing
    repository.chunk_path(entries[2]).write_bytes(b"not a chunk")  # wrong
    write(daemon, [(4 * CHUNK, b"\x77" * CHUNK)])
    image = preserve(daemon)
    summary = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    assert summary["incremental"] is True and summary["parent"] == a
    assert summary["changed_chunks"] == 3, summary  # chunk 4, plus 1 and 2 read again
    ok(daemon.owm("backup", "verify", repo, summary["id"]))
    target = short_tmp / "r.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", target))
    assert target.read_bytes() == read_image(daemon, image)
    # Chunks are named by content: reading them again repaired the parent too.
    ok(daemon.owm("backup", "verify", repo))


def test_a_rotten_chunk_is_quarantined_by_verify_and_stored_again(daemon: Daemon,
                                                                 short_tmp: Path) -> None:
    """An incremental checks kept chunks cheaply (present, a zstd frame of the right size), so
    a byte rotten inside one is verify's to find: verify names the backups, moves the chunk
    aside, and the next backup reads it from the image again, which repairs them all."""
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, [(n * CHUNK, bytes([n + 1]) * CHUNK) for n in range(6)])
    a = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    repository = Repository.open(repo)
    path = repository.chunk_path(dict(repository.load(a).chunk_map.entries())[3])
    packed = bytearray(path.read_bytes())
    packed[len(packed) // 2 + 9] ^= 0x40  # inside the payload: the frame header is intact
    path.write_bytes(bytes(packed))
    assert a in refused(daemon.owm("backup", "verify", repo, a))
    assert not path.exists() and path.with_name(path.name + ".bad").exists()
    write(daemon, [(4 * CHUNK, b"\x77" * CHUNK)])
    image = preserve(daemon)
    summary = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    assert summary["incremental"] is True and summary["changed_chunks"] == 2, summary
    ok(daemon.owm("backup", "verify", repo))  # the parent is whole again too
    target = short_tmp / "r.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", target))
    assert target.read_bytes() == read_image(daemon, image)


# ---------------------------------------------------------------------------- fault injection


def _restore_fails(repo: Path, backup_id: str, target: Path) -> bool:
    # restore_backup of a file target is restore_file on an executor thread; called directly,
    # thousands of attempts need no event loop and no thread pool each.
    try:
        restore_file(repo, backup_id, target)
    except OwmError:
        return not target.exists() and not target.with_name(target.name + ".partial").exists()
    return False


def test_every_flipped_byte_of_a_manifest_and_its_map_is_detected(daemon: Daemon,
                                                                  short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, [(n * 3 * CHUNK, bytes([n + 9]) * 999) for n in range(10)])
    image = preserve(daemon)
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    repository = Repository.open(repo)
    path = manifest_path(repo, backup_id)
    map_path = next((repo / "backups").glob(f"{backup_id}.*.map"))
    target = short_tmp / "x.raw"
    missed: list[str] = []
    for victim in (path, map_path):
        original = victim.read_bytes()
        assert len(original) < 4096  # small enough to flip every byte
        for at in range(len(original)):
            for mask in (0x01, 0x02):
                flipped = bytearray(original)
                flipped[at] ^= mask
                victim.write_bytes(flipped)
                report = verify_backups(repository, backup_id)
                if [r.state for r in report] != ["damaged"] or report[0].ok:
                    missed.append(f"{victim.name}[{at}]^{mask:#x}: verify said "
                                  f"{report[0].sentence()}")
                elif not _restore_fails(repo, backup_id, target):
                    missed.append(f"{victim.name}[{at}]^{mask:#x}: restored")
        victim.write_bytes(original)
    assert not missed, missed[:10]
    # Through the command line, a sample of positions across both files.
    for victim in (path, map_path):
        original = victim.read_bytes()
        for at in range(0, len(original), max(1, len(original) // 8)):
            flipped = bytearray(original)
            flipped[at] ^= 0x01
            victim.write_bytes(flipped)
            result = daemon.owm("backup", "verify", repo)
            assert result.returncode == 1, (victim.name, at, result)
            assert f"Backup {backup_id} is damaged" in result.stderr, (victim.name, at, result)
            refused(daemon.owm("restore", repo, backup_id, "--to", target))
            assert not target.exists()
        victim.write_bytes(original)
    ok(daemon.owm("backup", "verify", repo))
    with pytest.raises(DamagedManifest):
        path.write_bytes(path.read_bytes().replace(b'"size"', b'"Size"'))
        repository.load(backup_id)
