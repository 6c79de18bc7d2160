"""A backup killed with SIGKILL half-way never leaves a backup that claims to be complete.

The owm repository keeps an "incomplete" manifest (resume points every few hundredths of a
second here, through $OWM_BACKUP_CHECKPOINT_SECONDS); running the backup again resumes it and
the result restores byte for byte.  A killed raw backup leaves only ``PATH.partial``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from backup_helpers import create, fill_random, ok, ok_json, preserve, read_image, repo_list
from conftest import OWM, Daemon, cli_env

MiB = 1 << 20
DATA = 96 * MiB


def start_backup(daemon: Daemon, *args: str | Path) -> subprocess.Popen[str]:
    env = cli_env(OWM_BACKUP_CHECKPOINT_SECONDS="0.02")
    return subprocess.Popen([*OWM, "--pool", str(daemon.pool), "backup", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    try:
        while not ready():
            assert proc.poll() is None, f"the backup ended before it was killed: {proc.stderr}"
            assert time.monotonic() < deadline, "the backup made no visible progress"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def manifests(repo: Path) -> list[dict[str, object]]:
    out = []
    for path in (repo / "backups").glob("*.json"):
        if not path.name.startswith("."):
            out.append(json.loads(path.read_bytes()))
    return out


def test_killed_owm_backup_is_incomplete_then_resumes(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "128M")
    fill_random(daemon, DATA)
    image = preserve(daemon)
    repo = short_tmp / "repo"

    def checkpointed() -> bool:
        try:
            found = manifests(repo)
        except (OSError, ValueError):
            return False
        return any(int((m.get("resume") or {}).get("next_chunk", 0)) > 0  # type: ignore[union-attr]
                   for m in found)

    kill_when(start_backup(daemon, image, "--to", repo), checkpointed)

    found = manifests(repo)
    assert len(found) == 1 and found[0]["state"] == "incomplete"
    listed = repo_list(daemon, repo)
    assert [(b["image"], b["state"]) for b in listed] == [(image, "incomplete")]
    backup_id = listed[0]["id"]
    verified = ok(daemon.owm("backup", "verify", repo))
    assert "incomplete and was not verified" in verified
    refused = daemon.owm("restore", repo, backup_id, "--to", short_tmp / "x.raw")
    assert refused.returncode == 1 and "incomplete" in refused.stderr

    summary = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))
    assert summary["id"] == backup_id and summary["resumed"] is True
    assert summary["bytes_read"] < DATA, "a resumed backup does not read again what it stored"
    listed = repo_list(daemon, repo)
    assert [(b["id"], b["state"]) for b in listed] == [(backup_id, "complete")]
    ok(daemon.owm("backup", "verify", repo, backup_id))
    target = short_tmp / "r.raw"
    ok(daemon.owm("restore", repo, backup_id, "--to", target))
    assert target.read_bytes() == read_image(daemon, image)


def test_killed_raw_backup_leaves_only_a_partial(daemon: Daemon, short_tmp: Path) -> None:
    create(daemon, "vol", "128M")
    fill_random(daemon, DATA)
    image = preserve(daemon)
    target = short_tmp / "b.raw"
    partial = short_tmp / "b.raw.partial"

    def started() -> bool:
        try:
            return partial.stat().st_blocks > 0
        except FileNotFoundError:
            return False

    kill_when(start_backup(daemon, image, "--to", target), started)
    assert not target.exists()
    assert partial.exists()
    partial.unlink()
    ok(daemon.owm("backup", image, "--to", target))
    assert target.read_bytes() == read_image(daemon, image)
