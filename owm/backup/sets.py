"""Backup sets: one backup of a group's preserved set ``G@N``, naming every member's backup.

``run_set_backup`` waits for the set to drain, backs every member image up into the same owm
repository (each incremental from that volume's newer backups, as a single-volume backup is),
verifies the member backups together, and only then writes the set's manifest
``REPO/sets/ID.json``: a set manifest exists only once every member backup is complete (and,
with ``verify``, read back), so a set listed is a set that can be restored whole.  Its label is
the roll-up of its members': transaction-consistent only if every member backup is.
``restore_set`` restores every member, into files in a directory or into new volumes named
PREFIX + member name.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from owm.backup.image import DaemonApi, refused_with
from owm.backup.repo import Repository
from owm.common.errors import InvalidRequest, NotFound, OwmError, Timeout
from owm.common.files import write_atomically
from owm.common.names import is_volume_name

if TYPE_CHECKING:
    # Imported where used: ``owm restore`` asks find_set first, and a restore into a file
    # should not pay for the control client (aiohttp) and the backup pipeline.
    from owm.control.client import ControlClient

JSON = dict[str, Any]
Notify = Callable[[str], None]
SETS_DIR = "sets"


class SetVerifyFailed(OwmError):
    """A member backup of a set does not read back as its image."""


def _q(name: str) -> str:
    return quote(name, safe="@")


async def is_set(control: DaemonApi, image: str) -> bool:
    """Whether ``image`` (X@N) names a group's set on the daemon."""
    try:
        await control.request("GET", f"/v1/sets/{_q(image)}", timeout=30)
    except OwmError as exc:
        if refused_with(exc) in (400, 404):
            return False
        raise
    return True


def _sets_dir(repo: Path) -> Path:
    return repo / SETS_DIR


def list_sets(repo: Path | str) -> list[JSON]:
    """Every set manifest of the repository, oldest first."""
    where = _sets_dir(Path(repo))
    if not where.is_dir():
        return []
    out = []
    for path in sorted(where.glob("*.json")):
        try:
            out.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            out.append({"id": path.stem, "state": "damaged", "set": "?", "members": []})
    return sorted(out, key=lambda s: (str(s.get("time", "")), str(s.get("id"))))


def find_set(repo: Path | str, ref: str) -> JSON | None:
    """The set manifest ``ref`` names: its id, or G@N (the newest backup of that set)."""
    found = [s for s in list_sets(repo) if s.get("id") == ref or s.get("set") == ref]
    return found[-1] if found else None


async def run_set_backup(
    control: DaemonApi,
    image: str,
    to: Path | str,
    *,
    verify: bool = False,
    release: bool = False,
    timeout: float | None = None,
    force: bool = False,
    notify: Notify | None = None,
) -> JSON:
    """Back set ``image`` (G@N) up into the owm repository ``to``; the set manifest."""
    from owm.backup.run import run_backup
    from owm.backup.verify import verify_backups

    repo_path = Path(to)
    if repo_path.exists() and not repo_path.is_dir():
        raise InvalidRequest(f"{repo_path} is a file; a backup set goes into an owm repository "
                             "directory")
    started = time.monotonic()
    status: JSON = await control.request("GET", f"/v1/sets/{_q(image)}", timeout=30)
    if status["state"] == "draining":
        if notify is not None:
            notify(f"{image} is draining ({status.get('sessions_left')} sessions left); waiting")
        waited: JSON = await control.request(
            "POST", f"/v1/sets/{_q(image)}/wait", {"timeout": timeout},
            timeout=None if timeout is None else timeout + 30)
        if not waited.get("drained"):
            raise Timeout(f"set {image} is still draining after {timeout:g}s; nothing was "
                          "backed up")
        status = waited["status"]
    members = []
    for member in status["members"]:
        result = await run_backup(control, str(member["name"]), repo_path, fmt="owm",
                                  timeout=timeout, force=force, notify=notify)
        members.append(result)
    repo = Repository.open(repo_path)
    try:
        verified = False
        if verify:
            reports = [r for m in members for r in verify_backups(repo, m.backup_id)]
            bad = [r for r in reports if not r.ok]
            if bad:
                raise SetVerifyFailed(f"backup set of {image} failed verification: "
                                      f"{bad[0].sentence()}; no set manifest was written")
            verified = True
        consistent = all(m.transaction_consistent for m in members)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        manifest: JSON = {
            "id": f"set-{stamp}-{secrets.token_hex(3)}", "set": image,
            "group": image.partition("@")[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "consistency": "transaction-consistent" if consistent else "crash-consistent",
            "transaction_consistent": consistent, "forced": any(m.forced for m in members),
            "verified": verified, "size": sum(m.size for m in members),
            "members": [{"volume": m.volume, "image": m.image, "backup": m.backup_id,
                         "consistency": m.consistency, "incremental": m.incremental,
                         "parent": m.parent, "size": m.size} for m in members],
        }
        with repo.locked(exclusive=False):
            where = _sets_dir(repo_path)
            where.mkdir(exist_ok=True)
            write_atomically(where / f"{manifest['id']}.json",
                             json.dumps(manifest, indent=1, sort_keys=True).encode())
    finally:
        repo.close()
    if release:
        await control.request("POST", f"/v1/sets/{_q(image)}/release", timeout=None)
    manifest["released"] = release
    manifest["seconds"] = round(time.monotonic() - started, 3)
    return manifest


def set_targets(manifest: JSON, to: str) -> dict[str, str]:
    """Each member's restore target: DIR/VOLUME.raw for a directory (a path with '/', or an
    existing directory), new volumes PREFIX+VOLUME for anything else."""
    members = [str(m["volume"]) for m in manifest["members"]]
    if "/" in to or os.path.isdir(to):
        return {m: f"file:{Path(to) / (m + '.raw')}" for m in members}
    names = {m: f"{to}{m}" for m in members}
    for name in names.values():
        if not is_volume_name(name):
            raise InvalidRequest(f"'{to}' is neither a directory nor a volume name prefix "
                                 f"('{name}' is not a valid volume name)")
    return {m: f"volume:{n}" for m, n in names.items()}


async def restore_set(repo: Path | str, ref: str, to: str, *,
                      control: ControlClient | None = None, method: str = "cow") -> JSON:
    """Restore every member of set ``ref`` (set id or G@N) of ``repo`` into ``to``."""
    from owm.backup.restore import restore_backup

    manifest = find_set(repo, ref)
    if manifest is None:
        raise NotFound(f"the repository {repo} has no backup set {ref}")
    targets = set_targets(manifest, to)
    if any(t.startswith("file:") for t in targets.values()):
        Path(to).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    restored = []
    for member in manifest["members"]:
        result = await restore_backup(repo, str(member["backup"]), targets[member["volume"]],
                                      control=control, method=method)
        restored.append({"volume": member["volume"], **result.to_json()})
    return {"set": manifest["set"], "id": manifest["id"],
            "consistency": manifest["consistency"], "members": restored,
            "seconds": round(time.monotonic() - started, 3)}
