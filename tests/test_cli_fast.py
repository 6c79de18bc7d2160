"""The quick commands stay quick: what ``owm --version``, ``status`` and ``preserve`` import.

Timings are not asserted (the machine is shared); what makes these commands slow is. They
must not import aiohttp or asyncio (the control API is reached with ``owm.cli.quick``), nor
the backup stack; ``--version`` and ``--json`` output need no rich either. Measured with
``python -X importtime`` on real runs against a real daemon, and the answers must still be
right. ``bench/cli_latency.py`` measures the time itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from owm.cli.quick import QuickClient, QuickError
from owm.common.errors import DaemonNotRunning
from tests.conftest import CLI_TIMEOUT, OWM, REPO, Daemon, cli_env

SLOW = ("aiohttp", "asyncio", "owm.control.client", "owm.backup", "owm.cli.backup",
        "importlib.metadata")


def imported(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the CLI under -X importtime: its result and every module it imported."""
    result = subprocess.run(
        [OWM[0], "-X", "importtime", *OWM[1:], *map(str, args)], capture_output=True, text=True,
        timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL, env=cli_env(), cwd=REPO,
    )
    modules = set()
    other = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":
                modules.add(name)
        else:
            other.append(line)
    result.stderr = "\n".join(other)
    return result, modules


def slow_ones(modules: set[str], *more: str) -> set[str]:
    return {m for m in modules for bad in (*SLOW, *more) if m == bad or m.startswith(bad + ".")}


def test_version_imports_nothing_heavy() -> None:
    result, modules = imported("--version")
    assert result.returncode == 0 and "0.1.0" in result.stdout
    assert not slow_ones(modules, "rich"), "owm --version imported these"


def test_status_and_preserve_are_quick_and_right(daemon: Daemon) -> None:
    assert daemon.owm("volume", "create", "v", "--size", "4M").returncode == 0
    result, modules = imported("--pool", daemon.pool, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert [v["name"] for v in json.loads(result.stdout)] == ["v"]
    assert not slow_ones(modules, "rich"), "owm status --json imported these"

    result, modules = imported("--pool", daemon.pool, "preserve", "v")
    assert result.returncode == 0 and result.stdout.strip() == "v@0", result.stderr
    assert not slow_ones(modules), "owm preserve imported these"

    result, modules = imported("--pool", daemon.pool, "status")
    assert result.returncode == 0 and "v@0" in result.stdout
    assert not slow_ones(modules), "owm status imported these"

    # A refusal comes back as the daemon's sentence, exit 1, through the quick client too.
    result, _ = imported("--pool", daemon.pool, "preserve", "nosuch")
    assert result.returncode == 1
    assert "nosuch" in result.stderr and "Traceback" not in result.stderr
    result, _ = imported("--pool", daemon.pool, "volume", "show", "v", "--json")
    assert json.loads(result.stdout)["images"][0]["name"] == "v@0"


def test_quick_client_failures_are_sentences(short_tmp: Path, daemon: Daemon) -> None:
    with pytest.raises(DaemonNotRunning, match="No owm daemon is running for pool"):
        QuickClient(short_tmp / "none").volumes()
    stale = short_tmp / "stale"
    stale.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale / "control.sock"))
    sock.close()
    with pytest.raises(DaemonNotRunning):
        QuickClient(stale).health()
    client = QuickClient(daemon.pool)
    assert client.health()["status"] == "ok"
    with pytest.raises(QuickError, match="no volume named 'x'") as refused:
        client.volume("x")
    assert refused.value.status == 404
    created = client.create_volume("q", 1 << 20, method="log")
    assert created["method"] == "log"
    assert client.wait(client.preserve("q")["image"], timeout=5)["drained"] is True
    assert client.release("q@0")["released"] is True
    assert client.delete_volume("q")["deleted"] == "q"


def test_help_still_lists_the_lazy_backup_commands() -> None:
    result, _ = imported("--help")
    assert result.returncode == 0
    out = result.stdout
    assert "  backup" in out and "  restore" in out
    assert out.index("  release") < out.index("  backup") < out.index("  demo")
    result, _ = imported("backup", "--help")
    assert result.returncode == 0 and "list" in result.stdout
