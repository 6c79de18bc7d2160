"""Corrupt metadata: a damaged catalog, chunk-table journals and checkpoints, random byte flips.

A catalog that is corrupt, truncated or missing stops ``owm serve`` with one sentence naming the
file (exit 1) and leaves it as it was.  A bad journal record followed by valid ones is corruption,
not a torn tail: what the table serves is marked *damaged* (reads refused with EIO) and said in
the log, the API and ``owm status``.  A bad checkpoint slot falls back to the other one, with a
warning.  Random byte flips in every kind of metadata file are each detected and reported, or
harmless: the views still equal the model; none gives wrong data under a good label.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OWM, REPO, Daemon, cli_env, start_daemon

from owm.nbd.client import NbdClient, NbdError

SERVE_TIMEOUT = 30


def serve_once(pool: Path) -> subprocess.CompletedProcess[str]:
    """``owm serve`` as a user starts it; a healthy start is stopped by the timeout."""
    return subprocess.run(
        [*OWM, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=SERVE_TIMEOUT, stdin=subprocess.DEVNULL,
        env=cli_env(), cwd=REPO,
    )


@pytest.fixture(scope="module")
def template_pool() -> Iterator[Path]:
    """A pool with a volume and a drained image, shut down cleanly."""
    root = Path(tempfile.mkdtemp(prefix="owm-c-", dir="/tmp"))
    pool = root / "pool"
    daemon = start_daemon(pool)
    try:
        assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
        assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    try:
        yield pool
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _garbage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"this is not sqlite")


def _truncate_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _truncate_zero(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


def _impossible_state(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE images SET state='drainde'")
    db.commit()
    db.close()


def _impossible_size(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE volumes SET chunk_size=65537")
    db.commit()
    db.close()


def _plausible_size(path: Path) -> None:
    """A value that could be right: only the digest of the last clean shutdown tells."""
    db = sqlite3.connect(path)
    db.execute("UPDATE volumes SET size=2097152")
    db.commit()
    db.close()


def _bad_json(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE volumes SET engine_state='{\"legs'")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_garbage_header, _truncate_half, _truncate_zero, _delete,
                                    _impossible_state, _impossible_size, _plausible_size,
                                    _bad_json])
def test_corrupt_catalog_refuses_to_start_in_one_sentence(
    template_pool: Path, short_tmp: Path, damage: Callable[[Path], None]
) -> None:
    pool = short_tmp / "pool"
    shutil.copytree(template_pool, pool, symlinks=True)
    catalog = pool / "catalog.sqlite"
    damage(catalog)
    before = hashlib.sha256(catalog.read_bytes()).hexdigest() if catalog.exists() else None
    volumes_before = sorted(str(p.relative_to(pool)) for p in (pool / "volumes").rglob("*"))
    result = serve_once(pool)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert str(catalog.absolute()) in lines[0], lines[0]
    after = hashlib.sha256(catalog.read_bytes()).hexdigest() if catalog.exists() else None
    assert after == before  # nothing overwritten, nothing created in its place
    assert sorted(str(p.relative_to(pool)) for p in (pool / "volumes").rglob("*")) == \
        volumes_before
    assert not (pool / "control.sock").exists() and not (pool / "nbd.sock").exists()


# ---------------------------------------------------------------------------------------------
# Chunk tables through a real daemon: a corrupt journal record, a corrupt checkpoint slot

CHUNK = 4096
CHUNKS = 48


async def _nbd(daemon: Daemon, export: str, writes: list[tuple[int, bytes]] | None = None,
               read: int = 0) -> bytes:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    try:
        for offset, data in writes or []:
            await client.write(offset, data, fua=True)  # one batch per write: many batches
        return await client.read(0, read) if read else b""
    finally:
        await client.disconnect()


async def _read_error(daemon: Daemon, export: str) -> NbdError:
    client = await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))
    try:
        with pytest.raises(NbdError) as caught:
            await client.read(0, CHUNK)
        return caught.value
    finally:
        await client.disconnect()


def _prepared(pool: Path, method: str, stop: int) -> None:
    """Volume v: 0x01 everywhere, preserved as v@0, then the live volume overwrites every
    chunk with 0x02, one FUA write (one journal batch) per chunk; then the daemon stops."""
    daemon = start_daemon(pool)
    try:
        assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": CHUNKS * CHUNK,
                                                  "method": method, "chunk_size": "4K"})[0] == 201
        asyncio.run(_nbd(daemon, "v", [(0, b"\x01" * CHUNKS * CHUNK)]))
        assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
        asyncio.run(_nbd(daemon, "v", [(i * CHUNK, b"\x02" * CHUNK) for i in range(CHUNKS)]))
    finally:
        daemon.stop(stop)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _image(daemon: Daemon, image: str) -> dict[str, Any]:
    status, body = daemon.api("GET", f"/v1/images/{image}")
    assert status == 200, body
    return dict(body)


@pytest.mark.parametrize("method", ["cow", "log"])
def test_a_corrupt_journal_record_in_the_middle_marks_what_it_serves_damaged(
    short_tmp: Path, method: str
) -> None:
    pool = short_tmp / "pool"
    _prepared(pool, method, signal.SIGKILL)  # a crash: the journal is not folded away
    table = "img-0.table" if method == "cow" else "delta-1.table"
    journal = pool / "volumes" / "v" / f"{table}.journal"
    size = journal.stat().st_size
    assert size > 0
    _flip(journal, size // 2)
    daemon = start_daemon(pool)
    try:
        if method == "cow":
            # The image resolves through the table: damaged, and said everywhere.
            image = _image(daemon, "v@0")
            assert image["state"] == "damaged" and image["consistency"] == "damaged"
            assert table in image["broken_reason"] and "corrupt" in image["broken_reason"]
            assert asyncio.run(_read_error(daemon, "v@0")).errno == errno.EIO
            # The live volume never reads the table: still served, still right.
            live = asyncio.run(_nbd(daemon, "v", read=CHUNKS * CHUNK))
            assert live == b"\x02" * CHUNKS * CHUNK
            shown = daemon.owm("status", "v")
            assert shown.returncode == 0, shown.stderr
            assert "damaged" in shown.stdout
        else:
            # The delta is the live volume's: the volume is damaged, its I/O refused.
            status, volume = daemon.api("GET", "/v1/volumes/v")
            assert status == 200 and volume["damaged"] and table in volume["damaged"]
            assert asyncio.run(_read_error(daemon, "v")).errno == errno.EIO
            # Its preserved image (the base) does not read through the delta: still good.
            assert _image(daemon, "v@0")["state"] == "drained"
            assert asyncio.run(_nbd(daemon, "v@0", read=CHUNKS * CHUNK)) == \
                b"\x01" * CHUNKS * CHUNK
            shown = daemon.owm("status", "v")
            assert shown.returncode == 0, shown.stderr
            assert "DAMAGED" in shown.stdout
            assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 409
        lines = [line for line in daemon.log_text().splitlines() if "is damaged" in line]
        assert len(lines) == 1 and lines[0].startswith("ERROR"), daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    # The label outlives the table's repair (the next start rewrote its checkpoint).
    daemon = start_daemon(pool)
    try:
        if method == "cow":
            assert _image(daemon, "v@0")["state"] == "damaged"
        else:
            assert daemon.api("GET", "/v1/volumes/v")[1]["damaged"]
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_a_corrupt_checkpoint_slot_falls_back_to_the_other_with_a_warning(
    short_tmp: Path
) -> None:
    pool = short_tmp / "pool"
    _prepared(pool, "cow", signal.SIGTERM)  # clean: the table is folded into a checkpoint
    folder = pool / "volumes" / "v"
    slots = sorted(folder.glob("img-0.table.ckpt*"))
    assert slots, sorted(p.name for p in folder.iterdir())
    newest = max(slots, key=lambda p: p.stat().st_mtime_ns)
    _flip(newest, newest.stat().st_size - 100)  # inside the bitmap pages
    daemon = start_daemon(pool)
    try:
        image = _image(daemon, "v@0")
        assert image["state"] == "drained", image
        assert asyncio.run(_nbd(daemon, "v@0", read=CHUNKS * CHUNK)) == b"\x01" * CHUNKS * CHUNK
        status, volume = daemon.api("GET", "/v1/volumes/v")
        assert status == 200 and not volume["damaged"]
        assert any(newest.name in w for w in volume["warnings"]), volume["warnings"]
        shown = daemon.owm("status", "v")
        assert shown.returncode == 0 and "warning:" in shown.stdout, shown.stdout
        assert any(line.startswith("WARNING") and newest.name in line
                   for line in daemon.log_text().splitlines()), daemon.log_text()
    finally:
        assert daemon.stop() == 0, daemon.log_text()
