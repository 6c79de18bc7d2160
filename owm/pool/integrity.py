"""Checks that a pool's catalog can be trusted before the pool writes anything into it.

A corrupt, truncated or missing catalog must stop the start with one sentence naming the file,
never a traceback and never an "empty pool" that recovery would then tidy up.  ``check_file``
runs before the catalog is opened for writing (it opens it read-only: SQLite's own structural
check plus the tables the pool needs); ``check_rows`` checks what the rows say before any of it
is used, so that a flipped byte that SQLite cannot see (a value inside a row) is refused when it
gives a value no pool could hold.  A clean shutdown also records a digest of every volume and
image row (``rows_digest``): after a clean shutdown any flipped byte in a row is refused, even
a plausible one; after a crash the rows are only checked for plausibility.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path

from owm.catalog import ImageRow, VolumeRow
from owm.common.errors import OwmError
from owm.engine import ENGINES
from owm.engine.base import ENOSPC_POLICIES, MAX_CHUNK, MIN_CHUNK

IMAGE_STATES = ("draining", "drained", "drained-unclean", "broken", "releasing", "damaged")
CONSISTENCIES = ("transaction-consistent", "crash-consistent", "broken", "damaged")
TABLES = ("meta", "volumes", "images", "sessions")


class CatalogDamaged(OwmError):
    """The pool's catalog is corrupt, truncated or missing: the daemon does not start."""


def _refuse(path: Path | str, why: str) -> CatalogDamaged:
    return CatalogDamaged(
        f"the catalog {path} {why}; the daemon did not start and changed nothing "
        "(restore the file from a copy, or move the pool aside)"
    )


def check_file(path: Path, volumes_dir: Path) -> None:
    """Refuse a catalog file that is missing, empty or unreadable while volumes exist."""
    has_volumes = volumes_dir.is_dir() and any(volumes_dir.iterdir())
    if not path.exists():
        if has_volumes:
            raise _refuse(path, f"is missing although {volumes_dir} holds volumes")
        return
    # After a crash the newest transactions (even the schema, in a new pool) may still be in
    # the WAL, which SQLite applies when the catalog is opened: then the main file alone need
    # not hold them, only be sound.
    wal = path.with_name(path.name + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0
    if path.stat().st_size == 0:
        if has_volumes and not pending:
            raise _refuse(path, "is empty (truncated)")
        return
    try:
        # Immutable: nothing is created or written beside it (no -shm, no WAL replay), even
        # on a full disk; the WAL is SQLite's to apply at the real open.
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise _refuse(path, f"cannot be opened ({exc})") from None
    try:
        result = db.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            detail = "; ".join(str(r[0]) for r in result[:3])
            raise _refuse(path, f"is corrupt ({detail})")
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = [t for t in TABLES if t not in names]
        if missing and not pending:
            raise _refuse(path, f"is corrupt (no table {', '.join(missing)})")
    except sqlite3.Error as exc:
        raise _refuse(path, f"is corrupt ({exc})") from None
    finally:
        db.close()


def check_rows(path: Path | str, volumes: list[VolumeRow],
               images: dict[str, list[ImageRow]]) -> None:
    """Refuse rows holding values no pool writes (the sign of a flipped byte inside a row)."""
    for v in volumes:
        where = f"volume {v.name!r}"
        if not isinstance(v.name, str) or not v.name or "/" in v.name or "@" in v.name:
            raise _refuse(path, f"is corrupt (a volume has the name {v.name!r})")
        ints = (v.size, v.chunk_size, v.legs, v.live_generation)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
            raise _refuse(path, f"is corrupt ({where} has a non-integer field)")
        if (v.method not in ENGINES or v.enospc_policy not in ENOSPC_POLICIES
                or not 0 < v.size <= 1 << 60 or v.live_generation < 0
                or not MIN_CHUNK <= v.chunk_size <= MAX_CHUNK
                or v.chunk_size & (v.chunk_size - 1)
                or not (2 <= v.legs <= 16 if v.method == "mirror" else v.legs == 1)
                or not isinstance(v.engine_state, dict)):
            raise _refuse(path, f"is corrupt ({where} has impossible settings)")
        for image in images.get(v.name, []):
            what = f"image {v.name}@{image.generation}"
            if (not isinstance(image.generation, int)
                    or not 0 <= image.generation < v.live_generation
                    or image.state not in IMAGE_STATES
                    or image.consistency not in CONSISTENCIES
                    or not isinstance(image.unclean_sessions, int)
                    or image.unclean_sessions < 0
                    or (image.state == "drained" and image.unclean_sessions)):
                raise _refuse(path, f"is corrupt ({what} has an impossible state)")


DIGEST_KEY = "rows_digest"


# The fields the digest covers: those that say what a volume and its images are.  Fields a
# later schema adds are not covered (a migration may fill them in before the check).
VOLUME_FIELDS = ("name", "size", "chunk_size", "method", "legs", "enospc_policy",
                 "live_generation", "engine_state", "created_at")
IMAGE_FIELDS = ("volume", "generation", "state", "consistency", "preserved_at", "drained_at",
                "unclean_sessions", "broken_reason")


def rows_digest(volumes: list[VolumeRow], images: dict[str, list[ImageRow]]) -> str:
    """A digest of every volume and image row, in a canonical form."""
    def pick(row: object, fields: tuple[str, ...]) -> dict[str, object]:
        values = dataclasses.asdict(row)  # type: ignore[call-overload]
        return {f: values.get(f) for f in fields}

    rows = [[pick(v, VOLUME_FIELDS), [pick(i, IMAGE_FIELDS) for i in images.get(v.name, [])]]
            for v in sorted(volumes, key=lambda v: v.name)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def check_digest(path: Path | str, recorded: str | None, volumes: list[VolumeRow],
                 images: dict[str, list[ImageRow]]) -> None:
    """After a clean shutdown the rows must be exactly those the digest was taken of."""
    if recorded is not None and recorded != rows_digest(volumes, images):
        raise _refuse(path, "is corrupt (its rows differ from the digest recorded at the last "
                            "clean shutdown)")
