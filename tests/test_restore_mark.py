"""An interrupted restore into a volume never looks complete (issue 18, item 8).

``owm restore REPO ID --to volume:NAME`` creates the volume already marked
``"restore": {"state": "incomplete", "from": "REPO ID"}`` (kept in the catalog) and clears the
mark only after its last byte is written and flushed.  Killed half-way with a real SIGTERM or
SIGKILL, the volume says so in ``volume show``/``status``/the API, across a daemon restart, and
refuses ``preserve`` and ``backup`` with one sentence; running the same restore again starts
over and ends with the backup's bytes and no mark.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backup_helpers import create, fill_random, ok, ok_json, preserve, read_image, refused
from conftest import OWM, Daemon, cli_env, start_daemon

MiB = 1 << 20
DATA = 64 * MiB


def backed_up(daemon: Daemon, repo: Path) -> tuple[str, bytes]:
    create(daemon, "vol", "80M")
    fill_random(daemon, DATA)
    image = preserve(daemon)
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    return backup_id, read_image(daemon, image)


def volume(daemon: Daemon, name: str) -> dict[str, Any] | None:
    status, body = daemon.api("GET", f"/v1/volumes/{name}")
    return body if status == 200 else None


def written(found: dict[str, Any]) -> int:
    return sum(int(s.get("bytes_written") or 0)
               for g in found.get("generations", []) for s in g.get("sessions", []))


def interrupt_restore(daemon: Daemon, repo: Path, backup_id: str, sig: int) -> None:
    """Start ``owm restore`` into volume:copy and send ``sig`` once it has written something."""
    proc = subprocess.Popen([*OWM, "--pool", str(daemon.pool), "restore", str(repo), backup_id,
                             "--to", "volume:copy"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 60
    try:
        while True:
            found = volume(daemon, "copy")
            if found is not None:
                # Marked from the moment it exists, before its first byte.
                assert found["restore"] is not None, found
                if written(found) > 0:
                    break
            assert proc.poll() is None, ("the restore ended before it was interrupted",
                                         proc.communicate())
            assert time.monotonic() < deadline, "the restore made no visible progress"
            time.sleep(0.002)
        proc.send_signal(sig)
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -sig


def assert_flagged(daemon: Daemon, source: str, short_tmp: Path) -> None:
    found = volume(daemon, "copy")
    assert found is not None
    assert found["restore"]["state"] == "incomplete" and found["restore"]["from"] == source
    assert "RESTORE INCOMPLETE" in ok(daemon.owm("volume", "show", "copy"))
    assert "RESTORE INCOMPLETE" in ok(daemon.owm("status"))
    assert ok_json(daemon.owm("status", "copy", "--json"))[0]["restore"]["from"] == source
    line = refused(daemon.owm("preserve", "copy"))
    assert "incomplete restore" in line
    line = refused(daemon.owm("backup", "copy@0", "--to", short_tmp / "no.raw"))
    assert "incomplete restore" in line
    assert not (short_tmp / "no.raw").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_restore_is_marked_until_a_rerun_finishes_it(
        daemon: Daemon, short_tmp: Path, sig: int) -> None:
    repo = short_tmp / "repo"
    backup_id, want = backed_up(daemon, repo)
    source = f"{repo.resolve()} {backup_id}"
    interrupt_restore(daemon, repo, backup_id, sig)
    assert_flagged(daemon, source, short_tmp)
    # Another restore never takes over a volume it did not start.
    other = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    line = refused(daemon.owm("restore", repo, other, "--to", "volume:copy"))
    assert f"incomplete restore of {source}" in line
    assert volume(daemon, "copy")["restore"]["from"] == source  # type: ignore[index]
    # The same restore again starts over and finishes.
    ok(daemon.owm("restore", repo, backup_id, "--to", "volume:copy"))
    found = volume(daemon, "copy")
    assert found is not None and found["restore"] is None
    assert "RESTORE INCOMPLETE" not in ok(daemon.owm("volume", "show", "copy"))
    assert read_image(daemon, "copy") == want
    assert preserve(daemon, "copy") == "copy@0"


def test_the_mark_survives_a_daemon_restart(short_tmp: Path) -> None:
    pool, repo = short_tmp / "pool", short_tmp / "repo"
    first = start_daemon(pool)
    try:
        backup_id, want = backed_up(first, repo)
        interrupt_restore(first, repo, backup_id, signal.SIGKILL)
    finally:
        first.stop(signal.SIGKILL)  # a crash of the daemon too
    second = start_daemon(pool)
    try:
        assert_flagged(second, f"{repo.resolve()} {backup_id}", short_tmp)
        ok(second.owm("restore", repo, backup_id, "--to", "volume:copy"))
        assert volume(second, "copy")["restore"] is None  # type: ignore[index]
        assert read_image(second, "copy") == want
    finally:
        assert second.stop() == 0


def test_the_restore_endpoints(daemon: Daemon) -> None:
    """The API a restore uses: create marked, clear only with the same source; 4xx otherwise."""
    status, body = daemon.api("POST", "/v1/volumes/t/restore",
                              {"size": "1M", "from": "/repo some-id"})
    assert status == 201 and body["restore"]["from"] == "/repo some-id", body
    assert body["restore"]["state"] == "incomplete" and len(body["uid"]) == 32
    status, body = daemon.api("POST", "/v1/volumes/t/preserve", {})
    assert status == 409 and "incomplete restore" in body["error"]
    status, body = daemon.api("POST", "/v1/volumes/t/restore", {"size": "1M", "from": "x"})
    assert status == 409
    status, body = daemon.api("DELETE", "/v1/volumes/t/restore", {"from": "/repo other"})
    assert status == 409 and "being restored from /repo some-id" in body["error"]
    for bad in ({}, {"from": ""}, {"from": 3}, {"from": "x", "extra": 1}):
        status, body = daemon.api("DELETE", "/v1/volumes/t/restore", bad)
        assert status == 400, (bad, body)
    status, body = daemon.api("DELETE", "/v1/volumes/nothing/restore", {"from": "x"})
    assert status == 404
    status, body = daemon.api("DELETE", "/v1/volumes/t/restore", {"from": "/repo some-id"})
    assert status == 200 and body["restore"] is None
    status, body = daemon.api("POST", "/v1/volumes/t/preserve", {})
    assert status == 201
    # An ordinary volume is never a restore target.
    create(daemon, "plain", "1M")
    status, body = daemon.api("GET", "/v1/volumes/plain")
    assert body["restore"] is None
