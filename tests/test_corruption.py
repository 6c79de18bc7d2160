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
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OWM, REPO, Daemon, cli_env, start_daemon

from owm.common.errors import ImageDamaged
from owm.engine.chunktable import _RECORD, _RECORD_MAGIC, ChunkTable
from owm.nbd.client import NbdClient, NbdError
from owm.pool.integrity import CatalogDamaged
from owm.pool.model import Model
from owm.pool.pool import Pool
from owm.pool.volume import Session, Volume
from owm.storage.simulated import SimulatedStorage

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
            # A backup cannot launder it into a good-looking file.
            backup = daemon.owm("backup", "v@0", "--to", short_tmp / "v0.raw")
            assert backup.returncode == 1 and "Traceback" not in backup.stderr, backup
            assert len(backup.stderr.strip().splitlines()) == 1, backup.stderr
            assert not (short_tmp / "v0.raw").exists()
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


# ---------------------------------------------------------------------------------------------
# Random byte flips in every kind of metadata file (fixed seeds)

FLIP_SIZE = 256 * CHUNK
FLIPS = 36  # per method and shutdown kind


async def _write_some(rng: random.Random, s: Session, model: Model, n: int) -> None:
    for _ in range(n):
        offset = rng.randrange(FLIP_SIZE - 1)
        length = min(rng.choice([1, 100, CHUNK, 3 * CHUNK + 7]), FLIP_SIZE - offset)
        data = bytes([rng.randrange(1, 256)]) * length
        await s.write(offset, data)
        model.write(s.generation, offset, data)


async def _build_flip_pool(root: Path, method: str, crash: bool) -> Model:
    """Two preserved images with tables, journals and changed maps of their own; then a clean
    close (tables folded into checkpoints) or a crash (journals full of live records)."""
    rng = random.Random(11)
    model = Model(FLIP_SIZE)
    pool = await Pool.open(root)
    await pool.create_volume("v", FLIP_SIZE, method, CHUNK, legs=3)

    async def session(sid: int) -> Session:
        s = await pool.open_export("v", "flip")
        assert isinstance(s, Session)
        model.open_session(sid)
        return s

    a = await session(1)
    await _write_some(rng, a, model, 30)
    await a.flush()
    await pool.preserve("v")
    model.preserve()
    b = await session(2)
    await _write_some(rng, b, model, 30)
    await _write_some(rng, a, model, 20)  # the old session: lands in v@0 and the live volume
    await a.close()
    model.close_session(1)
    await pool.preserve("v")
    model.preserve()
    c = await session(3)
    await _write_some(rng, c, model, 30)
    await _write_some(rng, b, model, 15)
    for sid, s in ((2, b), (3, c)):
        await s.flush()
        await s.close()
        model.close_session(sid)
    if crash:
        await pool.kill()
    else:
        await pool.close()
    return model


async def _view(volume: Volume, gen: int) -> bytes:
    if gen == volume.live:
        return await volume.engine.read(gen, 0, FLIP_SIZE)
    reader = await volume.open_reader(gen)
    try:
        return await reader.read(0, FLIP_SIZE)
    finally:
        await reader.close()


def _labels(volume: Volume) -> dict[int, tuple[str, str, int]]:
    return {g: (i.state, i.consistency, i.unclean_sessions) for g, i in volume.images.items()}


async def _judge(root: Path, model: Model, reference: dict[int, tuple[str, str, int]]) -> str:
    """Reopen the pool: 'refused', 'damaged', 'warned' or 'harmless'; any wrong data under a
    good label fails the test."""
    try:
        pool = await Pool.open(root)
    except CatalogDamaged as exc:
        assert "\n" not in str(exc) and "catalog" in str(exc)
        return "refused"
    outcome = "harmless"
    try:
        volume = pool.volume("v")
        assert volume.live == model.live
        labels = _labels(volume)
        for gen, want in model.views.items():
            if gen in volume.engine.damaged:
                outcome = "damaged"
                if gen != volume.live:
                    assert labels[gen][:2] == ("damaged", "damaged"), labels[gen]
                else:
                    assert volume.status()["damaged"]
                with pytest.raises(ImageDamaged):
                    await _view(volume, gen)
                continue
            got = await _view(volume, gen)
            assert got == bytes(want), f"view {gen} is wrong under a good label"
            if gen != volume.live:
                assert labels[gen] == reference[gen], (gen, labels[gen], reference[gen])
        gens = sorted(g for g in model.views if g not in volume.engine.damaged)
        for i, since in enumerate(gens):
            for upto in gens[i + 1 :]:
                changed = volume.changed_chunks(since, upto)
                if changed is None:
                    continue
                a, b = model.views[since], model.views[upto]
                for chunk in range(FLIP_SIZE // CHUNK):
                    piece = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
                    if a[piece] != b[piece]:
                        assert chunk in changed, ("changed map misses", since, upto, chunk)
        if outcome == "harmless" and volume.engine.warnings:
            outcome = "warned"
    finally:
        await pool.close()
    return outcome


def _metadata_files(pool: Path, with_catalog: bool) -> list[Path]:
    files = sorted(p for p in (pool / "volumes" / "v").iterdir()
                   if p.suffix in (".ckpt0", ".ckpt1", ".journal") and p.stat().st_size)
    return ([pool / "catalog.sqlite"] if with_catalog else []) + files


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "crash"])
@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
async def test_random_byte_flips_are_detected_or_harmless(
    tmp_path: Path, method: str, crash: bool
) -> None:
    pristine = tmp_path / "pristine"
    model = await _build_flip_pool(pristine, method, crash)
    # The unflipped pool reopens with every view equal to the model: the reference labels.
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    pool = await Pool.open(work)
    reference = _labels(pool.volume("v"))
    assert not pool.volume("v").engine.damaged
    await pool.close()
    shutil.rmtree(work)
    assert await _judge(_copy(pristine, work), model, reference) == "harmless"
    # After a crash SQLite's rows carry no checksum the pool could check (see integrity.py):
    # the catalog is flipped only after a clean shutdown, where its digest covers every row.
    files = _metadata_files(pristine, with_catalog=not crash)
    kinds = {p.suffix for p in files}
    assert {".journal"} <= kinds and ({".ckpt0", ".ckpt1"} & kinds or crash), kinds
    # Rows fill a small part of the catalog: it gets flips of its own besides its turn.
    targets = [files[k % len(files)] for k in range(FLIPS)]
    targets += [] if crash else [pristine / "catalog.sqlite"] * (FLIPS // 2)
    outcomes: dict[str, int] = {}
    for k, target in enumerate(targets):
        rng = random.Random(1000 * k + 7)
        shutil.rmtree(work, ignore_errors=True)
        _copy(pristine, work)
        victim = work / target.relative_to(pristine)
        data = bytearray(victim.read_bytes())
        # Half the flips anywhere, half where the file carries information (up to its last
        # non-zero byte: a bitmap page's tail past the volume's chunks, or zero padding, only
        # ever proves the obvious).
        informative = len(data.rstrip(b"\0")) or len(data)
        data[rng.randrange(len(data) if k % 2 else informative)] ^= rng.randrange(1, 256)
        victim.write_bytes(bytes(data))
        outcome = await _judge(work, model, reference)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The harness must actually meet corruption, not only flips in dead bytes.
    assert outcomes.get("harmless", 0) < len(targets), outcomes


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# The chunk table's judgement, case by case (power-loss storage)


async def _table(storage: SimulatedStorage, chunks: int = 100000) -> ChunkTable:
    table = ChunkTable(storage, "t", chunks)
    await table.load()
    return table


async def test_a_torn_tail_is_normal_and_a_flipped_last_record_is_not() -> None:
    storage = SimulatedStorage()
    table = await _table(storage)
    for chunk in range(0, 3000, 7):  # one batch per record: the journal spans pages
        await table.set_durable(chunk)
    for chunk in range(5000, 5400):  # one unsynced batch, lost in part at the power cut
        table.set(chunk)
    # The batch reaches the page cache but its sync never completes.
    records = table._pending
    table._pending = []
    first = table._journal_len
    out = bytearray()
    for i, (op, chunk) in enumerate(records):
        head = _RECORD.pack(_RECORD_MAGIC, table._epoch, op, first + i, first, chunk, 0)[:-4]
        out += head + zlib.crc32(head).to_bytes(4, "little")
    await storage.write("t.journal", first * _RECORD.size, bytes(out))
    lost_some = storage.power_loss(random.Random(3))
    torn = await _table(lost_some)
    assert torn.damaged is None
    assert all(torn.has(c) for c in range(0, 3000, 7))  # every acknowledged entry
    # The last acknowledged record flipped: not a tear (a tear leaves old bytes, not bad ones).
    synced = storage.power_loss()
    raw = bytearray(await synced.read("t.journal", 0, first * _RECORD.size))
    raw[(first - 1) * _RECORD.size + 21] ^= 0x10
    await synced.write("t.journal", 0, bytes(raw))
    flipped = await _table(synced)
    assert flipped.damaged is not None and "corrupt" in flipped.damaged


async def test_a_corrupt_newest_checkpoint_is_damage_once_the_journal_moved_on() -> None:
    storage = SimulatedStorage()
    table = await _table(storage)
    for chunk in range(10):
        table.set(chunk)
    await table.checkpoint()  # epoch 2, records of epoch 1 still behind it in the journal
    fresh = await _table(storage.power_loss())
    assert fresh.damaged is None and fresh.warnings == [] and fresh.count == 10
    # Flip the newest slot while the journal still holds what led to it: a warning.
    slot = f"t.ckpt{table._slot}"
    good = storage.power_loss()
    raw = bytearray(await good.read(slot, 0, 64))
    raw[40] ^= 1
    await good.write(slot, 0, bytes(raw))
    fallback = await _table(good)
    assert fallback.damaged is None and fallback.count == 10
    assert fallback.warnings and slot in fallback.warnings[0]
    # Once records of the newer epoch overwrote the journal, the old slot cannot stand in.
    await table.set_durable(50)
    moved = storage.power_loss()
    raw = bytearray(await moved.read(slot, 0, 64))
    raw[40] ^= 1
    await moved.write(slot, 0, bytes(raw))
    lost = await _table(moved)
    assert lost.damaged is not None and "moved on" in lost.damaged
    # Flips in records of an older epoch (dead bytes behind the journal's end) are harmless.
    stale = storage.power_loss()
    raw = bytearray(await stale.read("t.journal", 0, 4 * _RECORD.size))
    raw[3 * _RECORD.size + 22] ^= 0xFF
    await stale.write("t.journal", 0, bytes(raw))
    fine = await _table(stale)
    assert fine.damaged is None and fine.count == 11 and fine.has(50)


async def test_tables_of_the_previous_format_are_read_and_rewritten() -> None:
    """Pools written before the sparse format: a dense slot and 24-byte records."""
    storage = SimulatedStorage()
    chunks = 100
    bitmap = bytearray((chunks + 7) // 8)
    for chunk in (1, 5):
        bitmap[chunk >> 3] |= 1 << (chunk & 7)
    header = struct.pack("<IIQI", 0x4F574D43, 2, chunks, zlib.crc32(bytes(bitmap)))
    await storage.write("t.ckpt1", 0, header + bytes(bitmap))
    journal = b""
    for op, chunk in ((1, 7), (2, 5), (1, 99)):
        head = struct.pack("<IIBxxxQ", 0x4F574D4A, 2, op, chunk)
        journal += head + struct.pack("<I", zlib.crc32(head))
    await storage.write("t.journal", 0, journal)
    table = await _table(storage, chunks)
    assert table.damaged is None and sorted(table) == [1, 7, 99]
    assert not storage.exists("t.journal") and not storage.exists("t.ckpt1")
    again = await _table(storage.power_loss(), chunks)  # durable in the current format
    assert again.damaged is None and again.warnings == [] and sorted(again) == [1, 7, 99]
