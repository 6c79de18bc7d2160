"""Backup and restore of a group's set through the real CLI against a real daemon: one backup
set naming every member's backup, incremental per member, verified together, listed as a set,
restored whole into files or new volumes."""

from __future__ import annotations

import random
from pathlib import Path

from backup_helpers import create, ok, ok_json, read_image, refused, repo_list, write
from conftest import Daemon

SIZE = 1 << 20


def test_backup_set_and_restore(daemon: Daemon, short_tmp: Path) -> None:
    rng = random.Random(7)
    for name in ("a", "b"):
        create(daemon, name, "1M", "--chunk-size", "4K")
        write(daemon, [(0, rng.randbytes(SIZE))], export=name)
    ok(daemon.owm("group", "create", "g", "a", "b"))
    assert ok(daemon.owm("preserve", "g")).split()[0] == "g@0"
    images0 = {n: read_image(daemon, f"{n}@0") for n in ("a", "b")}
    repo = short_tmp / "repo"
    first = ok_json(daemon.owm("backup", "g@0", "--to", repo, "--verify", "--json"))
    assert first["set"] == "g@0" and first["verified"]
    assert first["consistency"] == "transaction-consistent"
    assert [m["image"] for m in first["members"]] == ["a@0", "b@0"]
    ok(daemon.owm("release", "g@0"))

    write(daemon, [(8192, b"x" * 5000)], export="a")  # only a changes
    assert ok(daemon.owm("preserve", "g")).split()[0] == "g@1"
    images1 = {n: read_image(daemon, f"{n}@1") for n in ("a", "b")}
    out = ok(daemon.owm("backup", "g@1", "--to", repo, "--verify", "--release"))
    assert "Backed up set g@1" in out and "verified together" in out and "Released g@1" in out
    assert "incremental from" in out
    second = [r for r in repo_list(daemon, repo) if r.get("set") and r["image"] == "g@1"]
    assert len(second) == 1 and len(second[0]["members"]) == 2
    assert "set of 2" in ok(daemon.owm("backup", "list", repo))

    files = short_tmp / "restored"
    out = ok(daemon.owm("restore", repo, "g@1", "--to", f"{files}/"))
    assert "Restored backup set g@1" in out
    for name in ("a", "b"):
        assert (files / f"{name}.raw").read_bytes() == images1[name], name
    ok(daemon.owm("restore", repo, "g@0", "--to", "r0-"))
    for name in ("a", "b"):
        assert read_image(daemon, f"r0-{name}") == images0[name], name
    # A name that is neither a set nor a backup: one plain sentence from the single-backup path.
    refused(daemon.owm("restore", repo, "nope@3", "--to", "x-"))
