"""Backups end to end against a real daemon: known data written through NBD, preserved, backed up
in every format, restored, and compared byte for byte; incremental chains; verify finding a
damaged chunk; delete keeping shared chunks; waiting for a draining image; refusing an unclean
one; and every mistake answered with one sentence.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard
from backup_helpers import (
    create,
    ok,
    ok_json,
    preserve,
    random_writes,
    read_image,
    refused,
    repo_list,
    write,
)
from conftest import OWM, Daemon, cli_env

from owm.backup import Repository, restore_backup, run_backup, verify_backups
from owm.control.client import ControlClient

CHUNK = 64 * 1024
SIZE = 8 << 20


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def seed(daemon: Daemon, rng: random.Random, method: str = "cow") -> None:
    create(daemon, "vol", "8M", "--method", method)
    writes = random_writes(rng, SIZE, 12)
    writes.append((SIZE - 100, b"tail" * 25))  # the last chunk too
    writes.append((3 * CHUNK, bytes(CHUNK)))  # an allocated chunk of zeroes
    write(daemon, writes)


@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
def test_every_format_restores_byte_for_byte(daemon: Daemon, short_tmp: Path,
                                             method: str) -> None:
    rng = random.Random(f"formats-{method}")
    seed(daemon, rng, method)
    image = preserve(daemon)
    assert image == "vol@0"
    # New writes on the live volume after the preserve must not reach the backup.
    write(daemon, [(0, b"\xee" * CHUNK)])
    want = read_image(daemon, image)
    assert want[:CHUNK] != b"\xee" * CHUNK

    raw, qcow, repo = short_tmp / "b.raw", short_tmp / "b.qcow2", short_tmp / "repo"
    summary = ok_json(daemon.owm("backup", image, "--to", raw, "--verify", "--json"))
    assert summary["format"] == "raw" and summary["verified"] is True
    assert summary["transaction_consistent"] is True
    assert raw.read_bytes() == want
    assert raw.stat().st_blocks * 512 < SIZE, "holes of the image must stay holes"
    assert not (short_tmp / "b.raw.partial").exists()

    summary = ok_json(daemon.owm("backup", image, "--to", qcow, "--verify", "--json"))
    assert summary["format"] == "qcow2"
    check = qemu_img("check", qcow)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, qcow)
    assert compare.returncode == 0, compare.stdout + compare.stderr

    summary = ok_json(daemon.owm("backup", image, "--to", repo, "--format", "owm", "--verify",
                                 "--json"))
    assert summary["format"] == "owm" and summary["incremental"] is False
    assert summary["chunks_new"] > 0 and summary["chunks_zero"] > 0
    assert summary["bytes_read"] < SIZE
    for key in ("bytes_read", "bytes_written", "chunks_new", "chunks_reused", "seconds"):
        assert key in summary

    restored = short_tmp / "r.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", restored))
    assert restored.read_bytes() == want
    ok(daemon.owm("restore", repo, summary["id"], "--to", "back"))
    assert read_image(daemon, "back") == want
    shown = ok_json(daemon.owm("volume", "show", "back", "--json"))
    assert shown["size"] == SIZE and shown["chunk_size"] == CHUNK


def test_incremental_chain_restores_every_point(daemon: Daemon, short_tmp: Path) -> None:
    rng = random.Random("chain")
    seed(daemon, rng)
    repo = short_tmp / "repo"
    images: dict[str, bytes] = {}
    summaries: list[dict[str, Any]] = []
    for step in range(4):
        if step:
            writes = random_writes(rng, SIZE, 3, max_len=3 * CHUNK)
            # Step 2 turns a whole data chunk back into zeroes.
            zero = [(4 * CHUNK, CHUNK)] if step == 2 else []
            write(daemon, writes, zero=zero)
        image = preserve(daemon)
        images[image] = read_image(daemon, image)
        summaries.append(ok_json(daemon.owm("backup", image, "--to", repo, "--json")))
        if step >= 2:
            # The change maps outlive the image: an incremental needs no old image around.
            ok(daemon.owm("release", f"vol@{step - 2}"))
    assert summaries[0]["incremental"] is False
    total_chunks = SIZE // CHUNK
    for s in summaries[1:]:
        assert s["incremental"] is True, s
        assert s["changed_chunks"] is not None and s["changed_chunks"] <= 12, s
        assert s["bytes_read"] <= s["changed_chunks"] * CHUNK
        assert s["chunks_new"] + s["chunks_reused"] + s["chunks_zero"] <= total_chunks
    listed = repo_list(daemon, repo)
    assert [b["image"] for b in listed] == list(images)
    assert all(b["state"] == "complete" and b["transaction_consistent"] for b in listed)
    assert [b["parent"] for b in listed[1:]] == [b["id"] for b in listed[:-1]]
    for n, (image, want) in enumerate(images.items()):
        target = short_tmp / f"r{n}.raw"
        ok(daemon.owm("restore", repo, image, "--to", target))
        assert target.read_bytes() == want, image
    ok(daemon.owm("backup", "verify", repo))


def test_the_same_image_twice_reads_nothing_and_a_new_volume_dedups(daemon: Daemon,
                                                                   short_tmp: Path) -> None:
    rng = random.Random("dedup")
    seed(daemon, rng)
    image = preserve(daemon)
    repo = short_tmp / "repo"
    first = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    again = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    assert again["incremental"] is True and again["bytes_read"] == 0
    assert again["chunks_new"] == 0
    # Another volume with the same data shares every chunk.
    data = read_image(daemon, image)
    create(daemon, "twin", "8M")
    write(daemon, [(0, data)], export="twin")
    twin = preserve(daemon, "twin")
    other = ok_json(daemon.owm("backup", twin, "--to", repo, "--json"))
    assert other["incremental"] is False
    assert other["chunks_new"] == 0 and other["chunks_reused"] == first["chunks_new"] + first[
        "chunks_reused"]


def test_verify_names_the_offset_of_a_damaged_chunk(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "8M")
    pieces = [(n * CHUNK, bytes([n + 1]) * CHUNK) for n in range(0, 40, 3)]
    write(daemon, pieces)
    image = preserve(daemon)
    repo = short_tmp / "repo"
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    ok(daemon.owm("backup", "verify", repo, backup_id))

    repository = Repository.open(repo)
    victim = next(d for i, d in repository.load(backup_id).chunk_map.entries() if i == 9)
    path = repository.chunk_path(victim)
    # Well-formed zstd of the wrong content: only the hash can tell.
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\x99" * CHUNK))

    result = daemon.owm("backup", "verify", repo, backup_id)
    assert result.returncode == 1, result
    assert f"offset {9 * CHUNK}" in result.stderr and "chunk 9" in result.stderr
    doc = json.loads(daemon.owm("backup", "verify", repo, "--json").stdout)
    assert doc["ok"] is False
    assert [f["offset"] for f in doc["backups"][0]["failures"]] == [9 * CHUNK]

    line = refused(daemon.owm("restore", repo, backup_id, "--to", short_tmp / "x.raw"))
    assert f"offset {9 * CHUNK}" in line
    assert not (short_tmp / "x.raw").exists() and not (short_tmp / "x.raw.partial").exists()

    # verify moved the damaged chunk aside (NAME.bad), so the next backup stores it anew.
    assert not path.exists() and path.with_name(path.name + ".bad").exists()
    path.write_bytes(b"not zstd at all")
    assert f"offset {9 * CHUNK}" in daemon.owm("backup", "verify", repo).stderr
    path.unlink(missing_ok=True)
    assert "missing" in daemon.owm("backup", "verify", repo).stderr


def test_delete_removes_only_chunks_no_other_backup_uses(daemon: Daemon,
                                                         short_tmp: Path) -> None:
    create(daemon, "vol", "8M")
    write(daemon, [(0, b"\x01" * CHUNK), (CHUNK, b"\x02" * CHUNK)])
    first = preserve(daemon)
    write(daemon, [(CHUNK, b"\x03" * CHUNK)])
    second = preserve(daemon)
    repo = short_tmp / "repo"
    a = ok_json(daemon.owm("backup", first, "--to", repo, "--json"))["id"]
    b = ok_json(daemon.owm("backup", second, "--to", repo, "--json"))["id"]
    repository = Repository.open(repo)
    only_a = repository.load(a).chunk_map.digests() - repository.load(b).chunk_map.digests()
    assert len(only_a) == 1
    deleted = ok_json(daemon.owm("backup", "delete", repo, a, "--json"))
    assert deleted == {"deleted": a, "chunks_removed": 1, "bytes_freed": deleted["bytes_freed"],
                       "chunks_kept_because": None}
    assert not any(repository.has_chunk(d) for d in only_a)
    assert [x["id"] for x in repo_list(daemon, repo)] == [b]
    ok(daemon.owm("backup", "verify", repo))
    target = short_tmp / "b.raw"
    ok(daemon.owm("restore", repo, b, "--to", target))
    assert target.read_bytes() == read_image(daemon, second)
    refused(daemon.owm("backup", "delete", repo, a))  # gone already


def test_backup_waits_for_a_draining_image(daemon: Daemon, short_tmp: Path,
                                           hold_session: Any) -> None:
    create(daemon, "vol", "4M")
    holder = hold_session(daemon, "vol")
    image = preserve(daemon)
    timed_out = daemon.owm("backup", image, "--to", short_tmp / "a.raw", "--timeout", "0.5")
    assert timed_out.returncode == 1 and "Traceback" not in timed_out.stderr
    waiting, gave_up = timed_out.stderr.strip().splitlines()
    assert waiting.startswith(f"Waiting for {image} to drain: 1 session still holds it")
    assert gave_up.startswith("Gave up waiting after 0.5s") and "held by session" in gave_up
    assert not (short_tmp / "a.raw").exists()

    proc = subprocess.Popen([*OWM, "--pool", str(daemon.pool), "backup", image, "--to",
                             str(short_tmp / "b.raw"), "--timeout", "60", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    try:
        assert proc.stderr is not None
        notice = proc.stderr.readline()  # printed once the backup is waiting
        assert notice.startswith(f"Waiting for {image} to drain"), notice
        holder.disconnect()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["transaction_consistent"] is True
    assert (short_tmp / "b.raw").read_bytes() == read_image(daemon, image)


def test_unclean_image_is_refused_unless_forced(daemon: Daemon, short_tmp: Path,
                                                hold_session: Any) -> None:
    create(daemon, "vol", "4M")
    holder = hold_session(daemon, "vol")
    image = preserve(daemon)
    holder.kill()  # the session ends without a disconnect
    deadline = time.monotonic() + 20
    while daemon.api("GET", f"/v1/images/{image}")[1]["state"] == "draining":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    repo = short_tmp / "repo"
    line = refused(daemon.owm("backup", image, "--to", repo))
    assert "drained-unclean" in line and "--force" in line
    assert not (repo / "backups").exists() or not list((repo / "backups").glob("*.json"))
    summary = ok_json(daemon.owm("backup", image, "--to", repo, "--force", "--json"))
    assert summary["transaction_consistent"] is False and summary["forced"] is True
    listed = repo_list(daemon, repo)
    assert listed[0]["transaction_consistent"] is False
    assert listed[0]["consistency"] == "crash-consistent"
    text = ok(daemon.owm("backup", "list", repo))
    assert "crash-consistent (forced)" in text


def test_release_after_backup(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"x" * 5000)])
    image = preserve(daemon)
    out = ok(daemon.owm("backup", image, "--to", short_tmp / "repo", "--release", "--verify"))
    assert "Released vol@0" in out and "Verified" in out
    images = ok_json(daemon.owm("volume", "show", "vol", "--json"))["images"]
    assert images == []


def test_library_entry_points(daemon: Daemon, short_tmp: Path) -> None:
    """What the demo and the coordinator call: run_backup, verify_backups, restore_backup."""
    create(daemon, "vol", "4M")
    write(daemon, [(12345, b"library" * 1000)])
    image = preserve(daemon)
    seen: list[tuple[int, int]] = []

    async def go() -> tuple[Any, Any]:
        async with ControlClient(daemon.pool) as control:
            result = await run_backup(control, image, short_tmp / "repo",
                                      progress=lambda d, t: seen.append((d, t)))
            restored = await restore_backup(short_tmp / "repo", result.backup_id or "",
                                            str(short_tmp / "lib.raw"))
            return result, restored

    result, restored = asyncio.run(go())
    assert result.format == "owm" and result.transaction_consistent
    assert seen and seen[-1][0] == seen[-1][1] == 4 << 20
    assert restored.bytes_written > 0
    assert (short_tmp / "lib.raw").read_bytes() == read_image(daemon, image)
    reports = verify_backups(Repository.open(short_tmp / "repo"))
    assert [r.ok for r in reports] == [True]


def test_mistakes_are_one_sentence(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "4M")
    image = preserve(daemon)
    repo = short_tmp / "repo"
    ok(daemon.owm("backup", image, "--to", repo))
    exists = short_tmp / "exists.raw"
    exists.write_bytes(b"x")
    notrepo = short_tmp / "notrepo"
    notrepo.mkdir()
    (notrepo / "file").write_text("x")
    cases: list[tuple[list[str | Path], int, str]] = [
        (["backup", "vol", "--to", repo], 2, "NAME@N"),
        (["backup", image], 2, "--to"),
        (["backup", image, "--to", repo, "--format", "zip"], 2, "zip"),
        (["backup", image, "--to", repo, "--timeout", "-1"], 2, "timeout"),
        (["backup", "vol@7", "--to", repo], 1, "vol@7"),
        (["backup", "nosuch@0", "--to", repo], 1, "nosuch"),
        (["backup", image, "--to", exists], 1, "already exists"),
        (["backup", image, "--to", short_tmp / "no" / "dir.raw"], 1, "does not exist"),
        (["backup", image, "--to", notrepo], 1, "not an owm backup repository"),
        (["backup", "list", short_tmp / "nowhere"], 1, "no backup repository"),
        (["backup", "list", notrepo], 1, "not an owm backup repository"),
        (["backup", "verify", repo, "nosuch"], 1, "no backup 'nosuch'"),
        (["backup", "delete", repo], 2, "ID"),
        (["backup", "delete", repo, "nosuch"], 1, "no backup"),
        (["restore", repo, "nosuch", "--to", short_tmp / "r.raw"], 1, "no backup"),
        (["restore", repo, image, "--to", exists], 1, "already exists"),
        (["restore", repo, image, "--to", "vol"], 1, "already exists"),
        (["restore", repo, image, "--to", "bad name!"], 1, "neither a file path"),
        (["restore", repo, image], 2, "--to"),
    ]
    for args, code, fragment in cases:
        line = refused(daemon.owm(*args), code)
        assert fragment in line, (args, line)


def test_no_daemon_backup_says_so_but_repository_commands_work(short_tmp: Path,
                                                               daemon: Daemon) -> None:
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"q" * 100)])
    image = preserve(daemon)
    repo = short_tmp / "repo"
    ok(daemon.owm("backup", image, "--to", repo))
    other_pool = short_tmp / "elsewhere"
    env_args = ["--pool", str(other_pool)]
    result = subprocess.run([*OWM, *env_args, "backup", image, "--to", repo], text=True,
                            capture_output=True, env=cli_env(), timeout=60)
    assert result.returncode == 2 and "No owm daemon" in result.stderr
    for args in (["backup", "list", str(repo)], ["backup", "verify", str(repo)],
                 ["restore", str(repo), image, "--to", str(short_tmp / "x.raw")]):
        done = subprocess.run([*OWM, *env_args, *args], text=True, capture_output=True,
                              env=cli_env(), timeout=60)
        assert done.returncode == 0, done.stderr
    assert (short_tmp / "x.raw").read_bytes()[:100] == b"q" * 100
    line = refused(subprocess.run([*OWM, *env_args, "restore", str(repo), image, "--to",
                                   "newvol"], text=True, capture_output=True, env=cli_env(),
                                  timeout=60), 2)
    assert "No owm daemon" in line


def test_help_shows_the_backup_commands() -> None:
    from conftest import run_owm

    out = ok(run_owm("--help"))
    assert "  backup" in out and "  restore" in out
    text = ok(run_owm("backup", "--help"))
    for fragment in ("owm backup NAME@N --to PATH", "list", "verify", "delete"):
        assert fragment in text
    assert "--release" in ok(run_owm("backup", "vol@0", "--help"))


def test_repository_survives_leftovers(short_tmp: Path) -> None:
    """Temporary files of a killed writer are swept by the next delete; nothing else is."""
    repo = Repository.open(short_tmp / "repo", create=True)
    stray = repo.root / "chunks" / "ab" / ".abcdef.123.456.tmp"
    stray.write_bytes(b"half")
    unreferenced = repo.root / "chunks" / "cd" / ("cd" * 32)
    unreferenced.write_bytes(b"orphan")
    removed, _ = repo.collect_garbage()
    assert removed == 1 and not stray.exists() and not unreferenced.exists()
    shutil.rmtree(repo.root / "chunks" / "00")
    os.mkdir(repo.root / "chunks" / "00")


def test_after_a_daemon_crash_the_next_backup_is_incremental_and_dedups(
        short_tmp: Path) -> None:
    """Change maps survive a crash (their bits are durable before the data they describe): the
    next backup reads only the changed chunks and stores only news."""
    import signal

    from conftest import start_daemon

    pool = short_tmp / "pool"
    repo = short_tmp / "repo"
    first = start_daemon(pool)
    try:
        create(first, "vol", "8M")
        write(first, random_writes(random.Random("crash"), SIZE, 10))
        ok(first.owm("backup", preserve(first), "--to", repo))
        write(first, [(5 * CHUNK, b"\x42" * CHUNK)])
    finally:
        first.stop(signal.SIGKILL)
    second = start_daemon(pool)
    try:
        write(second, [(7 * CHUNK + 5, b"after the crash")])
        image = preserve(second)
        summary = ok_json(second.owm("backup", image, "--to", repo, "--json"))
        assert summary["incremental"] is True and summary["changed_chunks"] == 2, summary
        assert summary["chunks_new"] <= 2 and summary["bytes_read"] <= 2 * CHUNK
        target = short_tmp / "r.raw"
        ok(second.owm("restore", repo, summary["id"], "--to", target))
        assert target.read_bytes() == read_image(second, image)
    finally:
        assert second.stop() == 0


def test_damaged_manifests_are_reported_not_trusted(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"a" * CHUNK)])
    first = preserve(daemon)
    write(daemon, [(CHUNK, b"b" * CHUNK)])
    second = preserve(daemon)
    repo = short_tmp / "repo"
    a = ok_json(daemon.owm("backup", first, "--to", repo, "--json"))["id"]
    b = ok_json(daemon.owm("backup", second, "--to", repo, "--json"))["id"]
    manifest = repo / "backups" / f"{a}.json"
    manifest.write_bytes(manifest.read_bytes()[:100])  # a torn manifest
    listed = {x["id"]: x for x in repo_list(daemon, repo)}
    assert listed[a]["state"] == "damaged" and listed[b]["state"] == "complete"
    result = daemon.owm("backup", "verify", repo)
    assert result.returncode == 1 and f"Backup {a} is damaged" in result.stderr
    # While one backup is damaged, deleting another removes no chunk it may still need.
    c = ok_json(daemon.owm("backup", second, "--to", repo, "--json"))["id"]
    deleted = ok_json(daemon.owm("backup", "delete", repo, c, "--json"))
    assert deleted["chunks_removed"] == 0 and "damaged" in deleted["chunks_kept_because"]
    assert len([p for p in (repo / "chunks").rglob("*") if p.is_file()]) == 2
    ok(daemon.owm("backup", "verify", repo, b))
    # A map that does not match its manifest is caught too.
    map_file = next((repo / "backups").glob(f"{b}.*.map"))
    map_file.write_bytes(zstandard.ZstdCompressor().compress(bytes(64 * 32)))
    result = daemon.owm("backup", "verify", repo, b)
    assert result.returncode == 1 and "does not match its checksum" in result.stderr
    line = refused(daemon.owm("restore", repo, b, "--to", short_tmp / "x.raw"))
    assert "checksum" in line
    # Damaged backups can be deleted by their id; then the repository is clean again.
    ok(daemon.owm("backup", "delete", repo, a))
    ok(daemon.owm("backup", "delete", repo, b))
    assert repo_list(daemon, repo) == []
    assert not [p for p in (repo / "chunks").rglob("*") if p.is_file()]
    assert list((repo / "backups").iterdir()) == []
