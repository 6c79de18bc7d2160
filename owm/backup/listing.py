"""The backups of the repositories ``owm serve --backup-repo`` names, a page at a time.

The daemon knows no repository and may not import this package, so the CLI opens each
repository here before the daemon starts and hands it a :class:`RepoListing` (it fits
``owm.control.repo_routes.BackupRepos``); the control API calls it on a worker thread.

Opening refuses, in one sentence, a path that is not a repository, a key file that cannot be
read or opens none of them. An encrypted repository whose key was not given (no key file that
opens it, no passphrase in ``$OWM_REPO_PASSWORD``) is still listed, as *locked*: its manifests
cannot be read without the key, but their number is in the file names.

Listing only reads: manifests are replaced by atomic renames, so no repository lock is taken
and a backup being written or deleted meanwhile is seen before or after, never half. The order
is newest first by the time in each backup's id (``IMAGE-YYYYmmddTHHMMSSZ[-N]``), which the
file name alone gives, so a page reads only its own manifests however many there are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owm.backup.crypto import PASSWORD_ENV, KeyNeeded, KeySource, WrongKey, read_key_file
from owm.backup.manifest import DamagedManifest, Manifest
from owm.backup.repo import MARKER, Repository
from owm.common.errors import InvalidRequest, NotFound, OwmError, Unavailable

JSON = dict[str, Any]

MAX_PAGE = 500
LOCKED = "encrypted, no key given"
_STAMPED = re.compile(r"-(\d{8}T\d{6}Z)(?:-(\d{1,3}))?$")


def backup_label(m: Manifest) -> str:
    """What a backup can claim to be, never more than its manifest proves: the weakest fits."""
    if "broken" in (m.image_state, m.consistency):
        return "broken"
    if "damaged" in (m.image_state, m.consistency):
        return "damaged"
    if m.image_state == "drained-unclean":
        return "drained-unclean"
    if m.transaction_consistent and m.image_state == "drained":
        return "transaction-consistent"
    if m.consistency in ("crash-consistent", "transaction-consistent"):
        return "crash-consistent"
    return "unknown"  # a consistency this owm does not know: claim nothing


def _newest_first(ids: list[str]) -> list[str]:
    def key(backup_id: str) -> tuple[str, int, str]:
        found = _STAMPED.search(backup_id)
        if found is None:
            return ("", 0, backup_id)  # not an id owm made: after every stamped one
        return (found.group(1), int(found.group(2) or 1), backup_id)

    return sorted(ids, key=key, reverse=True)


def _row(repo: Repository, m: Manifest) -> JSON:
    state = m.state
    try:
        if not m.complete and repo.running(m.id):
            state = "running"
    except OSError:
        pass  # its lock file cannot be opened: "incomplete" is all that is known
    stored = m.stats.get("bytes_written")
    return {
        "id": m.id, "volume": m.volume, "image": m.image, "state": state,
        "label": backup_label(m), "consistency": m.consistency, "image_state": m.image_state,
        "forced": m.forced, "preserved_at": m.preserved_at, "completed_at": m.completed_at,
        "started_at": m.started_at, "size": m.size,
        "stored_bytes": int(stored) if isinstance(stored, int | float) else None,
        "incremental": m.incremental, "parent": m.parent,
        # A checksummed manifest (version 2) is verified on every read; version 1 ones are not.
        "verified": m.verified, "manifest": "checksummed" if m.verified else "unverified",
    }


@dataclass
class _Entry:
    path: Path
    repo: Repository | None  # None: encrypted and locked
    encrypted: bool
    note: str | None = None


class RepoListing:
    """The repositories one daemon shows, in the order they were given (index 0 first)."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @classmethod
    def open(cls, paths: Sequence[Path], key_files: Sequence[Path] = ()) -> RepoListing:
        """Open every repository now (InvalidRequest/NotFound in one sentence if one cannot be)."""
        for key_file in key_files:
            read_key_file(key_file)  # missing or too short: refused before anything else
        used: set[Path] = set()
        seen: set[Path] = set()
        entries = []
        for path in paths:
            where = path.absolute()
            if where.resolve() in seen:
                raise InvalidRequest(f"--backup-repo {path} is given twice")
            seen.add(where.resolve())
            entries.append(cls._open_one(where, key_files, used))
        unused = [k for k in key_files if k not in used]
        if unused:
            raise InvalidRequest(f"the key file {unused[0]} opens none of the --backup-repo "
                                 "repositories")
        return cls(entries)

    @staticmethod
    def _open_one(path: Path, key_files: Sequence[Path], used: set[Path]) -> _Entry:
        if not path.is_dir():
            raise NotFound(f"--backup-repo {path}: there is no backup repository there")
        if not (path / MARKER).is_file():
            raise NotFound(f"--backup-repo {path} is not an owm backup repository "
                           f"(it has no {MARKER})")
        passphrase = KeySource(passphrase=lambda: os.environ.get(PASSWORD_ENV) or None)
        note = LOCKED
        try:
            return _Entry(path, Repository.open(path, key=passphrase), False)
        except KeyNeeded:
            pass
        except WrongKey:
            note = f"encrypted, and the passphrase in ${PASSWORD_ENV} does not open it"
        except OwmError as exc:
            raise InvalidRequest(f"--backup-repo {path}: {exc}") from None
        for key_file in key_files:
            try:
                repo = Repository.open(path, key=KeySource(key_file=key_file))
            except (KeyNeeded, WrongKey):
                continue
            used.add(key_file)
            return _Entry(path, repo, True)
        return _Entry(path, None, True, note)

    def _entry(self, index: int) -> _Entry:
        if not 0 <= index < len(self._entries):
            raise NotFound(f"there is no backup repository number {index} (this daemon shows "
                           f"{len(self._entries)})")
        return self._entries[index]

    @staticmethod
    def _ids(entry: _Entry) -> list[str]:
        backups = entry.path / "backups"
        try:
            names = os.listdir(backups)
        except OSError as exc:
            raise Unavailable(f"the backups of {entry.path} cannot be listed "
                              f"({exc.strerror})") from None
        return [n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != "."]

    def _summary(self, index: int, entry: _Entry) -> JSON:
        out: JSON = {"index": index, "path": str(entry.path), "encrypted": entry.encrypted,
                     "locked": entry.repo is None, "note": entry.note, "count": None,
                     "error": None}
        try:
            out["count"] = len(self._ids(entry))
        except Unavailable as exc:
            out["error"] = str(exc)
        return out

    def repositories(self) -> list[JSON]:
        """One summary per repository: path, encrypted, locked, how many backups."""
        return [self._summary(i, e) for i, e in enumerate(self._entries)]

    def backups(self, index: int, offset: int = 0, limit: int = 50) -> JSON:
        """Page ``offset``..``offset+limit`` (newest first) of repository ``index``'s backups."""
        entry = self._entry(index)
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"offset must be 0 or more and limit from 1 to {MAX_PAGE}")
        ids = _newest_first(self._ids(entry))
        page: JSON = {**self._summary(index, entry), "count": len(ids), "offset": offset,
                      "limit": limit, "backups": []}
        repo = entry.repo
        if repo is None:
            return page
        for backup_id in ids[offset:offset + limit]:
            try:
                page["backups"].append(_row(repo, repo.load(backup_id)))
            except NotFound:
                page["count"] -= 1  # deleted since the directory was read
            except DamagedManifest as exc:
                page["backups"].append({"id": backup_id, "state": "damaged", "label": "damaged",
                                     "error": str(exc)})
            except OSError as exc:
                page["backups"].append({"id": backup_id, "state": "damaged", "label": "damaged",
                                     "error": f"its manifest cannot be read ({exc.strerror})"})
        return page
