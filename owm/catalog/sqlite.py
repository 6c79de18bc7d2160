"""The local catalog: volumes, generations, preserved images and sessions in one SQLite file.

Every change is one transaction, durable when the call returns (WAL, synchronous=FULL).  The
catalog is the truth about what exists and in what state; engines keep their chunk tables in
their own storage, and their small layout state (e.g. which mirror leg holds which image) in the
volume's ``engine_state`` column, written in the same transaction as the change that needs it.

A full disk.  The catalog shares its filesystem with the volumes' data, and it must still be able
to record state changes (an image broken by a full disk, a session that ended, a release) when
data writes fail, or a label would lie after a restart.  So the catalog keeps a *headroom file*,
``catalog.sqlite.reserve`` (1 MiB of allocated blocks, nothing else on the disk may use them):
when a change fails with SQLITE_FULL, the reserve is shortened by one step (128 KiB), which
frees those blocks at once, and the change is tried again.  Only one step is freed at a time, so
that data writes racing for the freed blocks can take little of what the catalog needs; eight
full-disk failures in a row are covered before the catalog fails too.  After a change succeeds
with the reserve short, the catalog grows it back step by step (at most once a second), so it
is whole again as soon as space returns.  Two settings keep the catalog's own need for new
blocks small: exclusive locking mode (the only user is the daemon that holds the pool), which
keeps the WAL index in memory instead of a ``-shm`` file that a restart on a full disk would
have to create, and a small auto-checkpoint, after which the WAL is rewritten in place rather
than grown.  What the reserve cannot do: blocks it freed are open to data writes as well,
until it is grown back.  A change that fails even so raises ``NoSpace``
("the pool's disk is full"), never a bare ``sqlite3.OperationalError``, and changed nothing.
SQLite's own preallocation (``SQLITE_FCNTL_CHUNK_SIZE``) was not chosen: Python's ``sqlite3``
cannot set it, and it would not cover the WAL.

Several processes (``owm serve --workers N``, ``shared=True``): the parent and each worker open
the same file.  Exclusive locking is then impossible, so the catalog uses normal locking (the
WAL index lives in a ``-shm`` file, which a start on a full disk may fail to create: the cost of
sharing), waits up to ``BUSY_TIMEOUT`` for another process's write, and every multi-statement
change starts with ``BEGIN IMMEDIATE`` (the write lock first, so that no transaction reads a
snapshot another process then invalidates).  The catalog keeps no cache of rows: every read asks
the file.  A meta key that several processes write (``groups``, a document of every worker's
groups) can be given a *merge* (``merge_meta``): the value a change writes is then computed from
the stored one inside the same transaction, a read-modify-write no other process can interleave.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from owm.catalog.base import ImageRow, VolumeRow, now
from owm.common.errors import NoSpace, OwmError

T = TypeVar("T")
log = logging.getLogger("owm.catalog")

RESERVE_BYTES = 1 << 20
RESERVE_STEP = 128 << 10  # freed per full-disk failure: a few changes' worth of WAL frames
REFILL_INTERVAL = 1.0  # seconds between attempts to re-create a missing reserve
AUTOCHECKPOINT_PAGES = 64
BUSY_TIMEOUT = 30.0  # seconds a shared catalog waits for another process's transaction
HEADROOM_CHECK = "check for headroom"
_SQLITE_FULL = 13
_SQLITE_IOERR = 10

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


def _is_full(exc: sqlite3.Error, where: Path) -> bool:
    """Whether ``exc`` means the disk is full (SQLITE_FULL, or an I/O error on a full disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and (code & 0xFF) == _SQLITE_FULL) or "full" in str(exc):
        return True
    if (code is not None and (code & 0xFF) == _SQLITE_IOERR) or "I/O error" in str(exc):
        try:
            st = os.statvfs(where)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 256 * 1024
    return False


class SqliteCatalog:
    """Blocking SQLite access; the pool calls it from one dedicated thread."""

    def __init__(self, path: Path, *, reserve_bytes: int = RESERVE_BYTES,
                 shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        # Meta keys written by several processes: key -> merge(stored, written) -> to store.
        self.merge_meta: dict[str, Callable[[str | None, str], str]] = {}
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        # Tests inject a full disk here: called with the change's name before each attempt,
        # True makes that attempt fail as SQLITE_FULL would; called with HEADROOM_CHECK, True
        # means the next change would fail even after the reserve is freed.
        self.fail_change: Callable[[str], bool] | None = None
        self._next_refill = 0.0
        try:
            self.db = self._connect()
        except sqlite3.Error as exc:
            # A restart on a full disk: the WAL must be created before the first change.  Any
            # other error (a damaged file, say) is left as it is for the pool to report.
            if not _is_full(exc, self.path.parent):
                raise
            if not self._release_reserve():
                raise self._translate(exc, "open its file") from exc
            try:
                self.db = self._connect()
            except sqlite3.Error as again:
                if not _is_full(again, self.path.parent):
                    raise
                raise self._translate(again, "open its file") from again
        self._migrate()
        self._refill(force=True)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=BUSY_TIMEOUT if self.shared else 5.0)
        try:
            if not self.shared:
                # Before the first WAL access, so that no -shm file is ever needed.
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            else:
                db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self) -> None:
        """Bring a catalog written by an older owm up to the schema (each step idempotent)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(volumes)")}
        if {"uid", "restore"} <= columns and self.db.execute(
                "SELECT 1 FROM volumes WHERE uid='' LIMIT 1").fetchone() is None:
            return  # nothing to do: no write on every start (the disk may be full)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(volumes)")}
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

    # -- the headroom reserve ------------------------------------------------------------------
    @property
    def reserve_size(self) -> int:
        try:
            return self.reserve_path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def has_reserve(self) -> bool:
        return self.reserve_size > 0

    def _release_reserve(self) -> bool:
        """Free one step of the reserve for the catalog; False when nothing was left."""
        size = self.reserve_size
        if size <= 0:
            return False
        left = max(0, size - RESERVE_STEP)
        try:
            os.truncate(self.reserve_path, left)
        except OSError as exc:
            log.warning("could not free the catalog's reserved headroom: %s", exc)
            return False
        log.warning("the pool's disk is full: the catalog is using its reserved headroom "
                    "(%d KiB left)", left >> 10)
        self._next_refill = time.monotonic() + REFILL_INTERVAL
        return True

    def _refill(self, force: bool = False) -> None:
        """Grow the reserve back, step by step, as far as there is room (rate-limited)."""
        size = self.reserve_size
        if size >= self.reserve_bytes or (not force and time.monotonic() < self._next_refill):
            return
        self._next_refill = time.monotonic() + REFILL_INTERVAL
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("could not reserve headroom for the catalog: %s", exc)
            return
        try:
            while size < self.reserve_bytes:
                step = min(RESERVE_STEP, self.reserve_bytes - size)
                try:
                    os.posix_fallocate(fd, size, step)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        log.warning("could not reserve headroom for the catalog: %s", exc)
                    break
                size += step
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)
        if size >= self.reserve_bytes and not force:
            log.info("the catalog's reserved headroom is back (%d KiB)", size >> 10)

    def headroom(self) -> bool:
        """Whether the next change can be recorded even on a full disk: a reserve exists, or
        the disk has plenty of room anyway."""
        if self.fail_change is not None:
            return not self.fail_change(HEADROOM_CHECK)
        self._refill()
        if self.reserve_bytes <= 0 or self.has_reserve:
            return True
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize > 2 * self.reserve_bytes

    def _translate(self, exc: sqlite3.Error, what: str) -> OwmError:
        if _is_full(exc, self.path.parent):
            return NoSpace(f"the pool's disk is full: the catalog could not {what}")
        return OwmError(f"the pool's catalog could not {what}: {exc}")

    def _change(self, what: str, fn: Callable[[], T]) -> T:
        """Run one change; on a full disk free the reserve and try once more."""
        for attempt in range(2):
            try:
                if self.fail_change is not None and self.fail_change(what):
                    raise sqlite3.OperationalError("database or disk is full")
                result = fn()
            except sqlite3.Error as exc:
                if attempt == 0 and _is_full(exc, self.path.parent) and self._release_reserve():
                    continue
                raise self._translate(exc, what) from exc
            self._refill()
            return result
        raise AssertionError("unreachable")

    # -- pool state ---------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        if key not in self.merge_meta:
            self._change("record the pool's state", lambda: self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))
            return

        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self._put_meta(key, value)

        self._change("record the pool's state", change)

    def _put_meta(self, key: str, value: str) -> None:
        """Write meta ``key`` inside the caller's transaction, through its merge if it has one
        (the stored value is read in the same transaction)."""
        merge = self.merge_meta.get(key)
        if merge is not None:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            value = merge(None if row is None else str(row[0]), value)
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
        self._change(f"record the new volume {v.name}", lambda: self.db.execute(
            "INSERT INTO volumes (name, size, chunk_size, method, legs, enospc_policy, "
            "live_generation, engine_state, created_at, uid, restore) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.size, v.chunk_size, v.method, v.legs, v.enospc_policy,
             v.live_generation, json.dumps(v.engine_state), v.created_at,
             v.uid or uuid.uuid4().hex, json.dumps(v.restore) if v.restore else None),
        ))

    def set_restore(self, name: str, mark: dict[str, Any] | None) -> None:
        """Mark a volume as being restored into (``mark``), or clear the mark (None)."""
        self._change(f"record the restore mark of volume {name}", lambda: self.db.execute(
            "UPDATE volumes SET restore=? WHERE name=?",
            (json.dumps(mark) if mark else None, name)))

    def delete_volume(self, name: str) -> None:
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM images WHERE volume=?", (name,))
                self.db.execute("DELETE FROM sessions WHERE volume=?", (name,))
                self.db.execute("DELETE FROM volumes WHERE name=?", (name,))

        self._change(f"record the deletion of volume {name}", change)

    def save_engine_state(self, name: str, state: dict[str, Any]) -> None:
        self._change(f"record the state of volume {name}", lambda: self.db.execute(
            "UPDATE volumes SET engine_state=? WHERE name=?", (json.dumps(state), name)
        ))

    # -- images -------------------------------------------------------------------------------
    def images(self, volume: str) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT volume, generation, state, consistency, preserved_at, drained_at, "
            "unclean_sessions, broken_reason FROM images WHERE volume=? ORDER BY generation",
            (volume,),
        ).fetchall()
        return [ImageRow(*r) for r in rows]

    def _insert_cut(self, image: ImageRow, live: int, state: dict[str, Any]) -> None:
        """One volume's part of a preserve (inside the caller's transaction)."""
        self.db.execute(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (image.volume, image.generation, image.state, image.consistency,
             image.preserved_at, image.drained_at, image.unclean_sessions, image.broken_reason),
        )
        self.db.execute(
            "UPDATE volumes SET live_generation=?, engine_state=? WHERE name=?",
            (live, json.dumps(state), image.volume),
        )

    def record_preserve(self, image: ImageRow, live: int, state: dict[str, Any]) -> None:
        """The new image and the new live generation, atomically."""
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self._insert_cut(image, live, state)

        self._change(f"record the preserve of {image.volume}@{image.generation}", change)

    def record_group_preserve(
        self, cuts: Sequence[tuple[ImageRow, int, dict[str, Any]]], groups: str
    ) -> None:
        """Every member's new image and live generation, and the group record, atomically:
        after a crash either every member is cut or none is."""
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for image, live, state in cuts:
                    self._insert_cut(image, live, state)
                self._put_meta("groups", groups)

        names = ", ".join(f"{i.volume}@{i.generation}" for i, _, _ in cuts)
        self._change(f"record the group preserve of {names}", change)

    def _update_image(self, image: ImageRow) -> None:
        self.db.execute(
            "UPDATE images SET state=?, consistency=?, drained_at=?, unclean_sessions=?, "
            "broken_reason=? WHERE volume=? AND generation=?",
            (image.state, image.consistency, image.drained_at, image.unclean_sessions,
             image.broken_reason, image.volume, image.generation),
        )

    def update_image(self, image: ImageRow) -> None:
        self._change(f"record the state of image {image.volume}@{image.generation}",
                     lambda: self._update_image(image))

    def finish_release(self, volume: str, generation: int, state: dict[str, Any]) -> None:
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "DELETE FROM images WHERE volume=? AND generation=?", (volume, generation)
                )
                self.db.execute(
                    "UPDATE volumes SET engine_state=? WHERE name=?", (json.dumps(state), volume)
                )

        self._change(f"record the release of {volume}@{generation}", change)

    # -- sessions -----------------------------------------------------------------------------
    def open_session(self, volume: str, generation: int, peer: str) -> int:
        def change() -> int:
            cur = self.db.execute(
                "INSERT INTO sessions (volume, generation, peer, opened_at) VALUES (?, ?, ?, ?)",
                (volume, generation, peer, now()),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        return self._change(f"record a new session of volume {volume}", change)

    def close_session(
        self, session: int, clean: bool, bytes_read: int, bytes_written: int, generation: int,
        images: Sequence[ImageRow] = (),
    ) -> None:
        """The end of a session and, in the same transaction, the images it leaves changed
        (an unclean end counts against every image it held)."""
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "UPDATE sessions SET closed_at=?, clean=?, bytes_read=?, bytes_written=?, "
                    "generation=? WHERE id=?",
                    (now(), int(clean), bytes_read, bytes_written, generation, session),
                )
                for image in images:
                    self._update_image(image)

        self._change(f"record the end of session {session}", change)

    def open_sessions(self, volume: str) -> list[tuple[int, int]]:
        """(id, generation) of sessions with no recorded end."""
        rows = self.db.execute(
            "SELECT id, generation FROM sessions WHERE volume=? AND closed_at IS NULL",
            (volume,),
        ).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def end_sessions_unclean(self, volume: str, images: Sequence[ImageRow] = ()) -> None:
        """End every session of ``volume`` a crash cut off and, atomically, record the images
        whose unclean count that raised."""
        def change() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "UPDATE sessions SET closed_at=?, clean=0 WHERE volume=? AND closed_at IS NULL",
                    (now(), volume),
                )
                for image in images:
                    self._update_image(image)

        self._change(f"record the sessions of volume {volume} a crash ended", change)

    def prune_sessions(self, keep: int = 10000) -> None:
        self._change("prune old sessions", lambda: self.db.execute(
            "DELETE FROM sessions WHERE closed_at IS NOT NULL AND id <= "
            "(SELECT MAX(id) FROM sessions) - ?",
            (keep,),
        ))
