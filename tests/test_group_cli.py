"""Consistency groups through the real CLI against a real daemon, and kill -9 during group
preserves (the set is all or nothing after the restart)."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli_helpers import ok
from cli_helpers import one_sentence as refused
from conftest import Daemon, start_daemon

Holder = Callable[[Daemon, str], Any]


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def test_group_lifecycle_through_the_cli(daemon: Daemon, hold_session: Holder) -> None:
    for name in ("a", "b", "c"):
        ok(daemon.owm("volume", "create", name, "--size", "1M", "--chunk-size", "4K"))
    assert "Created group g of a, b" in ok(daemon.owm("group", "create", "g", "a", "b"))
    assert "already" in refused(daemon.owm("group", "create", "h", "b", "c"))
    assert "is a volume" in refused(daemon.owm("group", "create", "c", "a"))
    assert "no volume named" in refused(daemon.owm("group", "create", "h", "nope"))
    assert "no group named" in refused(daemon.owm("group", "show", "nope"))
    assert "is a group" in refused(daemon.owm("volume", "create", "g", "--size", "1M"))
    shown = as_json(daemon.owm("group", "show", "g", "--json"))
    assert shown["members"] == ["a", "b"] and shown["sets"] == []
    assert [g["name"] for g in as_json(daemon.owm("group", "list", "--json"))] == ["g"]

    holder = hold_session(daemon, "a")  # a transaction still running on a
    out = ok(daemon.owm("preserve", "g")).split()
    assert out == ["g@0", "a@0", "b@0"]
    status = as_json(daemon.owm("status", "g", "--json"))
    (gset,) = status["sets"]
    assert gset["name"] == "g@0" and gset["state"] == "draining"
    assert {m["name"]: m["state"] for m in gset["members"]} == {"a@0": "draining",
                                                                "b@0": "drained"}
    assert "g@0: draining" in ok(daemon.owm("status", "g"))
    assert daemon.owm("wait", "g@0", "--timeout", "0.3").returncode == 1
    assert "still draining" in refused(daemon.owm("release", "g@0"))
    assert "belongs to set g@0" in refused(daemon.owm("release", "a@0"))
    assert "member of group" in refused(daemon.owm("volume", "delete", "a", "--force"))
    assert "still has preserved sets" in refused(daemon.owm("group", "delete", "g"))

    holder.disconnect()
    assert "g@0 is drained (transaction-consistent)" in ok(daemon.owm("wait", "g@0",
                                                                      "--timeout", "30"))
    assert "Released g@0 (a@0, b@0" in ok(daemon.owm("release", "g@0"))

    holder = hold_session(daemon, "b")
    result = as_json(daemon.owm("preserve", "g", "--json"))
    assert result["name"] == "g@1"
    assert "Cut over g@1" in ok(daemon.owm("cutover", "g@1"))
    waited = as_json(daemon.owm("wait", "g@1", "--json"))
    assert waited["drained"] and waited["status"]["consistency"] == "crash-consistent"
    holder.disconnect()
    ok(daemon.owm("release", "g@1"))
    assert "no set g@1" in refused(daemon.owm("wait", "g@1"))
    ok(daemon.owm("preserve", "c"))  # a volume outside the group still preserves alone
    assert "Deleted group g" in ok(daemon.owm("group", "delete", "g"))
    ok(daemon.owm("volume", "delete", "a"))


def _check_all_or_nothing(d: Daemon) -> int:
    """Every set names an image on every member, and no member has an image outside a set,
    so every member has been cut equally often; returns the number of sets."""
    status, group = d.api("GET", "/v1/groups/g")
    assert status == 200, group
    in_sets: dict[str, set[int]] = {m: set() for m in group["members"]}
    for gset in group["sets"]:
        assert sorted(m["volume"] for m in gset["members"]) == sorted(group["members"]), gset
        for m in gset["members"]:
            in_sets[m["volume"]].add(m["generation"])
    lives = set()
    for member in group["members"]:
        status, vol = d.api("GET", f"/v1/volumes/{member}")
        assert status == 200
        assert {i["generation"] for i in vol["images"]} == in_sets[member], (member, vol)
        lives.add(vol["live_generation"])
    assert len(lives) == 1, lives
    return len(group["sets"])


def test_kill_9_during_group_preserves_is_all_or_nothing(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    d = start_daemon(pool)
    rng = random.Random(14)
    try:
        for name in ("a", "b", "c"):
            ok(d.owm("volume", "create", name, "--size", "4M", "--chunk-size", "4K"))
        ok(d.owm("group", "create", "g", "a", "b", "c"))
        deadline = time.monotonic() + 15
        rounds = 0
        while rounds < 6 and time.monotonic() < deadline:
            rounds += 1
            # Group preserves in a loop over the control socket from two threads (no CLI
            # start-up, so the kill lands among them however loaded the machine is), then
            # SIGKILL at a random moment.
            def preserve_until_killed(daemon: Daemon = d) -> None:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    for _ in range(500):
                        daemon.api("POST", "/v1/groups/g/preserve", {})

            threads = [threading.Thread(target=preserve_until_killed) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.4))
            d.stop(signal.SIGKILL)
            for t in threads:
                t.join(timeout=30)
            d = start_daemon(pool)
            _check_all_or_nothing(d)
        sets = _check_all_or_nothing(d)
        assert sets > 0, "no preserve completed in any round"
    finally:
        d.stop()
