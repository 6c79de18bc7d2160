"""The local catalog: volumes, generations, preserved images and sessions in one SQLite file.

Every change is one transaction, durable when the call returns (WAL, synchronous=FULL).  The
catalog is the truth about what exists and in what state; engines keep their chunk tables in
their own storage, and their small layout state (e.g. which mirror leg holds which image) in the
volume's ``engine_state`` column, written in the same transaction as the change that needs it.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from owm.catalog.base import ImageRow, VolumeRow, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    method TEXT NOT NULL,
    legs INTEGER NOT NULL,
    enospc_policy TEXT NOT NULL,
    live_generation INTEGER NOT NULL DEFAULT 0,
    engine_state TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    uid TEXT NOT NULL DEFAULT '',
    restore TEXT
);
CREATE TABLE IF NOT EXISTS images (
    volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    consistency TEXT NOT NULL DEFAULT 'transaction-consistent',
    preserved_at TEXT NOT NULL,
    drained_at TEXT,
    unclean_sessions INTEGER NOT NULL DEFAULT 0,
    broken_reason TEXT,
    PRIMARY KEY (volume, generation)
);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    volume TEXT NOT NULL,
    generation INTEGER NOT NULL,
    peer TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    closed_at TEXT,
    clean INTEGER,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_written INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteCatalog:
    """Blocking SQLite access; the pool calls it from one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a catalog written by an older owm up to the schema (each step idempotent)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(volumes)")}
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if "uid" not in columns:
                self.db.execute("ALTER TABLE volumes ADD COLUMN uid TEXT NOT NULL DEFAULT ''")
            if "restore" not in columns:
                self.db.execute("ALTER TABLE volumes ADD COLUMN restore TEXT")
            # Volumes from before uids get one now: from here on they are told apart from any
            # later volume of the same name.
            for (name,) in self.db.execute("SELECT name FROM volumes WHERE uid=''").fetchall():
                self.db.execute("UPDATE volumes SET uid=? WHERE name=?", (uuid.uuid4().hex, name))

    def close(self) -> None:
        self.db.close()

    # -- pool state ---------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- volumes ------------------------------------------------------------------------------
    def volumes(self) -> list[VolumeRow]:
        rows = self.db.execute(
            "SELECT name, size, chunk_size, method, legs, enospc_policy, live_generation, "
            "engine_state, created_at, uid, restore FROM volumes ORDER BY name"
        ).fetchall()
        return [
            VolumeRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9],
                      json.loads(r[10]) if r[10] else None)
            for r in rows
        ]

    def add_volume(self, v: VolumeRow) -> None:
        self.db.execute(
            "INSERT INTO volumes (name, size, chunk_size, method, legs, enospc_policy, "
            "live_generation, engine_state, created_at, uid, restore) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.size, v.chunk_size, v.method, v.legs, v.enospc_policy,
             v.live_generation, json.dumps(v.engine_state), v.created_at,
             v.uid or uuid.uuid4().hex, json.dumps(v.restore) if v.restore else None),
        )

    def set_restore(self, name: str, mark: dict[str, Any] | None) -> None:
        """Mark a volume as being restored into (``mark``), or clear the mark (None)."""
        self.db.execute("UPDATE volumes SET restore=? WHERE name=?",
                        (json.dumps(mark) if mark else None, name))

    def delete_volume(self, name: str) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM images WHERE volume=?", (name,))
            self.db.execute("DELETE FROM sessions WHERE volume=?", (name,))
            self.db.execute("DELETE FROM volumes WHERE name=?", (name,))

    def save_engine_state(self, name: str, state: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE volumes SET engine_state=? WHERE name=?", (json.dumps(state), name)
        )

    # -- images -------------------------------------------------------------------------------
    def images(self, volume: str) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT volume, generation, state, consistency, preserved_at, drained_at, "
            "unclean_sessions, broken_reason FROM images WHERE volume=? ORDER BY generation",
            (volume,),
        ).fetchall()
        return [ImageRow(*r) for r in rows]

    def record_preserve(self, image: ImageRow, live: int, state: dict[str, Any]) -> None:
        """The new image and the new live generation, atomically."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (image.volume, image.generation, image.state, image.consistency,
                 image.preserved_at, image.drained_at, image.unclean_sessions,
                 image.broken_reason),
            )
            self.db.execute(
                "UPDATE volumes SET live_generation=?, engine_state=? WHERE name=?",
                (live, json.dumps(state), image.volume),
            )

    def update_image(self, image: ImageRow) -> None:
        self.db.execute(
            "UPDATE images SET state=?, consistency=?, drained_at=?, unclean_sessions=?, "
            "broken_reason=? WHERE volume=? AND generation=?",
            (image.state, image.consistency, image.drained_at, image.unclean_sessions,
             image.broken_reason, image.volume, image.generation),
        )

    def finish_release(self, volume: str, generation: int, state: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "DELETE FROM images WHERE volume=? AND generation=?", (volume, generation)
            )
            self.db.execute(
                "UPDATE volumes SET engine_state=? WHERE name=?", (json.dumps(state), volume)
            )

    # -- sessions -----------------------------------------------------------------------------
    def open_session(self, volume: str, generation: int, peer: str) -> int:
        cur = self.db.execute(
            "INSERT INTO sessions (volume, generation, peer, opened_at) VALUES (?, ?, ?, ?)",
            (volume, generation, peer, now()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def close_session(
        self, session: int, clean: bool, bytes_read: int, bytes_written: int, generation: int
    ) -> None:
        self.db.execute(
            "UPDATE sessions SET closed_at=?, clean=?, bytes_read=?, bytes_written=?, "
            "generation=? WHERE id=?",
            (now(), int(clean), bytes_read, bytes_written, generation, session),
        )

    def open_sessions(self, volume: str) -> list[tuple[int, int]]:
        """(id, generation) of sessions with no recorded end."""
        rows = self.db.execute(
            "SELECT id, generation FROM sessions WHERE volume=? AND closed_at IS NULL",
            (volume,),
        ).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def end_sessions_unclean(self, volume: str) -> None:
        self.db.execute(
            "UPDATE sessions SET closed_at=?, clean=0 WHERE volume=? AND closed_at IS NULL",
            (now(), volume),
        )

    def prune_sessions(self, keep: int = 10000) -> None:
        self.db.execute(
            "DELETE FROM sessions WHERE closed_at IS NOT NULL AND id <= "
            "(SELECT MAX(id) FROM sessions) - ?",
            (keep,),
        )
