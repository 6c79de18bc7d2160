"""Verify's measured paths (issue 15, aim 6): what ``owm backup verify`` reports it checked, each
distinct chunk once (repeated chunks and zero chunks cost nothing more), with the bytes read
from the repository beside the bytes of image data they decoded to and their ratio, so that a
rate can honestly be given of either; and that whatever makes it fast, a tampered byte of a
chunk, plain (BLAKE3 names) or encrypted (keyed names, sealed), is still named by its offset.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import create, ok, ok_json, preserve, read_image, refused, write
from conftest import OWM, REPO, Daemon, cli_env, run_owm

from owm.backup.crypto import KeySource
from owm.backup.manifest import COMPLETE, ChunkMap, Manifest
from owm.backup.repo import Repository, utc_now
from owm.backup.verify import VerifyTotals, verify_backups

CHUNK = 64 * 1024


def _text_chunk(rng: random.Random) -> bytes:
    """A chunk that zstd stores in about a tenth: a numbered line of text and zeroes."""
    line = b"%016x owm verify speed path\n" % rng.getrandbits(64)
    return (line * (CHUNK // 2 // len(line))).ljust(CHUNK, b"\0")


def _backup(repo: Repository, backup_id: str, chunks: list[bytes | None]) -> None:
    """A complete backup of ``chunks`` (None: a chunk of zeroes, stored nowhere)."""
    chunk_map = ChunkMap(len(chunks))
    for index, data in enumerate(chunks):
        if data is None:
            continue
        digest = repo.chunk_id(data)
        if not repo.has_chunk(digest):
            repo.put_chunk(digest, data)
        chunk_map.put(index, digest)
    repo.sync()
    m = Manifest(id=backup_id, volume="vol", image=backup_id.partition("-")[0], generation=0,
                 size=len(chunks) * CHUNK, chunk_size=CHUNK, state=COMPLETE,
                 consistency="transaction-consistent", started_at=utc_now(), map_data=chunk_map)
    m.completed_at = utc_now()
    repo.save(m)


def _two_backups(root: Path, key: KeySource | None = None) -> tuple[Repository, set[bytes]]:
    """Two backups sharing chunks, with a chunk repeated inside one and zero chunks: returns
    the repository and the distinct chunks the two name."""
    repo = Repository.open(root, create=True, encrypt=key is not None, key=key)
    rng = random.Random("speedpaths")
    text = [_text_chunk(rng) for _ in range(6)]
    noise = [rng.randbytes(CHUNK) for _ in range(3)]
    first: list[bytes | None] = [text[0], None, noise[0], text[1], text[1], text[1], None,
                                 noise[1], text[2]]
    second: list[bytes | None] = [text[0], noise[2], text[3], None, text[4], text[5], text[5],
                                  noise[1]]
    _backup(repo, "vol@0-a", first)
    _backup(repo, "vol@1-b", second)
    return repo, {d for d in first + second if d is not None}


def test_verify_reports_stored_and_image_bytes_each_distinct_chunk_once(tmp_path: Path) -> None:
    repo, distinct = _two_backups(tmp_path / "repo")
    stored = sum(repo.chunk_path(repo.chunk_id(d)).stat().st_size for d in distinct)
    image = len(distinct) * CHUNK
    assert image > 2 * stored > 0  # the mix compresses: the two figures differ

    done = run_owm("backup", "verify", repo.root, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] and [b["chunks_checked"] for b in doc["backups"]] == [7, 7]
    checked = doc["checked"]
    assert checked["chunks"] == len(distinct) == 9
    assert checked["image_bytes"] == image and checked["stored_bytes"] == stored
    assert checked["ratio"] == pytest.approx(image / stored, rel=1e-3)
    assert checked["seconds"] > 0

    said = run_owm("backup", "verify", repo.root, "vol@1-b")
    assert said.returncode == 0, said.stderr
    assert "Checked 6 distinct chunks" in said.stdout  # text[5] twice
    assert ":1), in " in said.stdout

    # In the library: each distinct chunk is read once per run, however many backups and
    # indices name it.
    reads: list[bytes] = []
    read_stored = repo.read_stored

    def counted(digest: bytes) -> bytes:
        reads.append(digest)
        return read_stored(digest)

    repo.read_stored = counted  # type: ignore[method-assign]
    totals = VerifyTotals()
    verify_backups(repo, totals=totals)
    assert sorted(reads) == sorted(repo.chunk_id(d) for d in distinct)
    assert (totals.chunks, totals.image_bytes, totals.stored_bytes) == (9, image, stored)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_tampered_byte_is_still_named_by_its_offset(tmp_path: Path, encrypted: bool) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("11" * 32 + "\n")
    key = KeySource(key_file=key_file) if encrypted else None
    repo, _ = _two_backups(tmp_path / "repo", key)
    digest = repo.load("vol@0-a").chunk_map.get(4)  # chunk 4 (text[1]) is also chunks 3 and 5
    assert digest is not None
    path = repo.chunk_path(digest)
    packed = bytearray(path.read_bytes())
    packed[len(packed) // 2] ^= 0x01
    path.write_bytes(bytes(packed))

    args = ("--key-file", key_file) if encrypted else ()
    done = run_owm("backup", "verify", repo.root, "vol@0-a", "--json", *args)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    [report] = doc["backups"]
    assert [f["offset"] for f in report["failures"]] == [3 * CHUNK, 4 * CHUNK, 5 * CHUNK]
    assert doc["checked"]["chunks"] == 5  # the damaged chunk counted once, like the others
    reason = report["failures"][0]["reason"]
    assert ("fails authentication" in reason) if encrypted else (
        "does not match its hash" in reason or "cannot be decompressed" in reason)


def test_verify_of_a_plain_repository_loads_only_what_it_uses(tmp_path: Path) -> None:
    """Start-up is part of every verify a user times: no tables (rich, which the ``group``
    commands load), no OpenSSL hashes or cryptography (an encrypted repository's), no event
    loop or HTTP client (the daemon's)."""
    repo, _ = _two_backups(tmp_path / "repo")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "owm", "backup", "verify",
                           str(repo.root), "--json"], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert "owm.backup.verify" in loaded  # the measurement works
    for heavy in ("rich", "owm.cli.group", "hashlib", "hmac", "secrets", "cryptography",
                  "asyncio", "aiohttp", "uvloop", "owm.control.client"):
        assert heavy not in loaded, heavy
    assert json.loads(done.stdout)["ok"]


def test_a_backup_speaks_to_the_daemon_without_aiohttp(daemon: Daemon, short_tmp: Path) -> None:
    """``owm backup`` asks the daemon through the small blocking client: an incremental backup
    of 1% of a volume was mostly start-up, a third of it aiohttp.  Full and incremental (only
    the changed chunks read) go that way (and so every backup of the other tests, a draining
    image waited for among them), and the backup restores byte for byte."""
    create(daemon, "vol", "4M")
    rng = random.Random("quick")
    first = [(0, rng.randbytes(20 * CHUNK)), (40 * CHUNK, rng.randbytes(4 * CHUNK))]
    write(daemon, first)
    image = preserve(daemon)
    repo = short_tmp / "repo"
    full = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    assert not full["incremental"] and full["chunks_new"] == 24
    write(daemon, [(5 * CHUNK, rng.randbytes(CHUNK)), (41 * CHUNK + 7, b"changed")])
    ok(daemon.owm("release", image))
    second = preserve(daemon)
    expected = read_image(daemon, second)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "owm", "--pool",
                           str(daemon.pool), "backup", second, "--to", str(repo), "--json"],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert "owm.backup.run" in loaded  # the measurement works
    for heavy in ("aiohttp", "owm.control.client", "rich"):
        assert heavy not in loaded, heavy
    summary = json.loads(done.stdout)
    assert summary["incremental"] and summary["changed_chunks"] == 2
    out = short_tmp / "out.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", out))
    assert out.read_bytes() == expected

    # The daemon's refusals are still one sentence: an image that does not exist.
    said = refused(daemon.owm("backup", "vol@9", "--to", repo))
    assert "vol@9" in said


def test_ctrl_c_while_a_backup_waits_for_a_drain_ends_it(daemon: Daemon, short_tmp: Path,
                                                         hold_session: Any) -> None:
    """The wait for a draining image is a blocking request on a worker thread now: Ctrl-C
    still ends the command at once (that thread must not hold the process up), and the
    image is left to drain and be backed up as if nothing had happened."""
    create(daemon, "vol", "4M")
    holder = hold_session(daemon, "vol")
    image = preserve(daemon)
    proc = subprocess.Popen([*OWM, "--pool", str(daemon.pool), "backup", image, "--to",
                             str(short_tmp / "repo")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
    try:
        assert proc.stderr is not None
        notice = proc.stderr.readline()
        assert notice.startswith(f"Waiting for {image} to drain"), notice
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "Interrupted."
    holder.disconnect()
    summary = ok_json(daemon.owm("backup", image, "--to", short_tmp / "repo", "--json"))
    assert summary["transaction_consistent"] is True


def test_an_answer_too_large_for_the_quick_client_means_read_everything() -> None:
    """The blocking client caps an answer at 64 MiB (some seven million changed chunks): such
    a list of changed chunks is unknown, so the backup reads everything (and stores only what
    is new) instead of failing; a daemon that fails otherwise still fails the backup."""
    from owm.backup.run import changed_chunks
    from owm.cli.quick import QuickError

    class Refusing:
        def __init__(self, status: int) -> None:
            self.status = status

        async def request(self, method: str, path: str, body: Any = None, *,
                          timeout: float | None = None) -> Any:
            raise QuickError("the daemon's answer is too large", self.status)

    assert asyncio.run(changed_chunks(Refusing(502), "vol@1", 0)) is None  # type: ignore[arg-type]
    with pytest.raises(QuickError):
        asyncio.run(changed_chunks(Refusing(500), "vol@1", 0))  # type: ignore[arg-type]
