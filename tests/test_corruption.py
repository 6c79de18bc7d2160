"""Corrupt metadata: a damaged catalog, chunk-table journals and checkpoints, random byte flips.

A catalog that is corrupt, truncated or missing stops ``owm serve`` with one sentence naming the
file (exit 1) and leaves it as it was.  A bad journal record followed by valid ones is corruption,
not a torn tail: what the table serves is marked *damaged* (reads refused with EIO) and said in
the log, the API and ``owm status``.  A bad checkpoint slot falls back to the other one, with a
warning.  Random byte flips in every kind of metadata file are each detected and reported, or
harmless: the views still equal the model; none gives wrong data under a good label.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import OWM, REPO, cli_env, start_daemon

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


def _bad_json(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE volumes SET engine_state='{\"legs'")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_garbage_header, _truncate_half, _truncate_zero, _delete,
                                    _impossible_state, _impossible_size, _bad_json])
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
