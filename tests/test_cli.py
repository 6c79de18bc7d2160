"""The ``owm`` command line driven as a subprocess against a real daemon, command by command.

Each test types what a user types and checks the exit code, stdout and stderr: plain sentences
and tables for people, one JSON document with --json, exit 2 and a hint with no daemon, and a
one-line complaint (never a traceback) for every mistake.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import ok
from cli_helpers import one_sentence as refused
from conftest import OWM, Daemon, cli_env, run_owm, start_daemon

Holder = Callable[[Daemon, str], Any]


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


# ---------------------------------------------------------------------------------------------
# Without a daemon


def test_help_names_every_command_of_the_contract() -> None:
    out = ok(run_owm("--help"))
    for command in ("serve", "volume", "preserve", "status", "wait", "cutover", "release", "demo"):
        assert f"  {command}" in out
    volume_help = ok(run_owm("volume", "--help"))
    for sub in ("create", "list", "show", "delete"):
        assert f"  {sub}" in volume_help
    assert "--pool" in ok(run_owm("serve", "--help"))


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "vol"],
        ["volume", "list"],
        ["volume", "show", "vol"],
        ["volume", "create", "vol", "--size", "1G"],
        ["volume", "delete", "vol"],
        ["preserve", "vol"],
        ["wait", "vol@0", "--timeout", "1"],
        ["cutover", "vol@0"],
        ["release", "vol@0"],
        ["status", "--json"],
    ],
)
def test_no_daemon_says_so_and_exits_2(short_tmp: Path, args: list[str]) -> None:
    pool = short_tmp / "pool"
    line = refused(run_owm("--pool", pool, *args), code=2)
    assert str(pool) in line
    assert "owm --pool" in line and "serve" in line
    assert not pool.exists()  # asking must not create anything


def test_default_pool_is_env_then_cwd(short_tmp: Path) -> None:
    env_pool = short_tmp / "from-env"
    line = refused(run_owm("status", env=cli_env(OWM_POOL=str(env_pool))), code=2)
    assert str(env_pool) in line
    line = refused(run_owm("status", cwd=short_tmp), code=2)
    assert str(short_tmp / "owm-pool") in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["volume", "create", "vol"], "--size"),
        (["volume", "create", "vol", "--size", "12Q"], "not a size"),
        (["volume", "create", "vol", "--size", "0"], "greater than zero"),
        (["volume", "create", "vol", "--size", "1G", "--method", "raid5"], "--method"),
        (["volume", "create", "vol", "--size", "1G", "--legs", "0"], "--legs"),
        (["volume", "create", "vol", "--size", "1G", "--chunk-size", "lots"], "--chunk-size"),
        (["volume", "show"], "NAME"),
        (["wait", "vol"], "NAME@N"),
        (["wait", "vol@x"], "NAME@N"),
        (["wait", "vol@0", "--timeout", "-1"], "--timeout"),
        (["wait", "vol@0", "--timeout", "soon"], "--timeout"),
        (["cutover", "@3"], "NAME@N"),
        (["release", "vol"], "NAME@N"),
        (["preserve"], "NAME"),
        (["preserve", "vol", "--later"], "--later"),
        (["frobnicate"], "frobnicate"),
        (["serve", "--listen", "localhost"], "HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:99999"], "HOST:PORT"),
    ],
)
def test_bad_arguments_are_one_sentence_and_exit_2(
    short_tmp: Path, args: list[str], fragment: str
) -> None:
    line = refused(run_owm("--pool", short_tmp / "pool", *args), code=2)
    assert fragment in line
    assert not (short_tmp / "pool").exists()


# ---------------------------------------------------------------------------------------------
# serve


def test_serve_logs_one_line_records_and_stops_cleanly(short_tmp: Path) -> None:
    d = start_daemon(short_tmp / "pool")
    ok(d.owm("volume", "create", "vol", "--size", "8M"))
    mode = stat.S_IMODE(os.stat(d.control_socket).st_mode)
    assert mode == 0o600
    assert d.stop(signal.SIGINT) == 0
    log = d.log_text().splitlines()
    assert log and all(
        line.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in log
    ), log
    assert any("serving pool" in line for line in log)
    assert any("volume=vol" in line or "vol" in line for line in log if "created" in line)
    assert any("stopped" in line for line in log)
    assert not d.control_socket.exists()


def test_serve_refuses_a_second_daemon_on_the_same_pool(daemon: Daemon) -> None:
    line = refused(daemon.owm("serve", "--listen", "127.0.0.1:0", timeout=30))
    assert "already" in line and str(daemon.pool.absolute()) in line
    status = as_json(daemon.owm("status", "--json"))  # the first one is unharmed
    assert status == []


def test_serve_takes_pool_after_the_command_too(short_tmp: Path) -> None:
    pool = short_tmp / "p2"
    proc = subprocess.Popen(
        [*OWM, "serve", "--pool", str(pool), "--listen", "none"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            result = run_owm("status", "--pool", pool, "--json")
            if result.returncode == 0 or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert as_json(result) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_serve_on_a_busy_port_is_one_sentence(short_tmp: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_owm(
            "--pool", short_tmp / "pool", "serve", "--listen", f"127.0.0.1:{port}", timeout=30
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]
    assert "in use" in result.stderr


def test_sigterm_with_a_session_open_stops_promptly(short_tmp: Path, hold_session: Holder) -> None:
    d = start_daemon(short_tmp / "pool")
    ok(d.owm("volume", "create", "vol", "--size", "8M"))
    hold_session(d, "vol")
    assert ok(d.owm("preserve", "vol")).strip() == "vol@0"
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10
    d = start_daemon(short_tmp / "pool")
    try:
        image = as_json(d.owm("status", "vol", "--json"))[0]["images"][0]
        # The session was cut off by the shutdown: the image drained, but not cleanly.
        assert image["name"] == "vol@0" and image["state"] != "draining"
    finally:
        assert d.stop() == 0


def test_restart_brings_back_volumes_and_images(short_tmp: Path) -> None:
    d = start_daemon(short_tmp / "pool")
    ok(d.owm("volume", "create", "vol", "--size", "8M"))
    assert ok(d.owm("preserve", "vol")).strip() == "vol@0"
    assert d.stop() == 0
    d = start_daemon(short_tmp / "pool")
    try:
        volumes = as_json(d.owm("status", "--json"))
        assert [v["name"] for v in volumes] == ["vol"]
        assert [i["name"] for i in volumes[0]["images"]] == ["vol@0"]
        assert volumes[0]["images"][0]["state"] == "drained"
    finally:
        assert d.stop() == 0


# ---------------------------------------------------------------------------------------------
# volume create | list | show | delete


def test_volume_commands(daemon: Daemon) -> None:
    out = ok(daemon.owm("volume", "list"))
    assert "No volumes" in out and "owm volume create" in out

    out = ok(daemon.owm("volume", "create", "vol", "--size", "64M"))
    assert "Created volume vol" in out and "64M" in out and f"nbd://{daemon.nbd_tcp}/vol" in out
    created = as_json(
        daemon.owm("volume", "create", "small", "--size", "1.5M", "--chunk-size", "4K", "--json")
    )
    assert created["size"] == 1536 * 1024 and created["chunk_size"] == 4096
    assert created["method"] == "cow"

    line = refused(daemon.owm("volume", "create", "vol", "--size", "1G"))
    assert "vol" in line and "exists" in line

    out = ok(daemon.owm("volume", "list"))
    assert "vol" in out and "small" in out and "64M" in out
    listed = as_json(daemon.owm("volume", "list", "--json"))
    assert [v["name"] for v in listed] == ["small", "vol"]

    out = ok(daemon.owm("volume", "show", "vol"))
    assert "vol" in out and "64M" in out and "cow" in out
    shown = as_json(daemon.owm("volume", "show", "vol", "--json"))
    assert shown["name"] == "vol" and shown["size"] == 64 << 20
    line = refused(daemon.owm("volume", "show", "nope"))
    assert "nope" in line

    assert "Deleted volume small" in ok(daemon.owm("volume", "delete", "small"))
    assert as_json(daemon.owm("volume", "delete", "vol", "--json")) == {"deleted": "vol"}
    assert as_json(daemon.owm("volume", "list", "--json")) == []
    assert "nope" in refused(daemon.owm("volume", "delete", "nope"))


@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
def test_volume_create_each_method(daemon: Daemon, method: str) -> None:
    created = as_json(
        daemon.owm(
            "volume", "create", "v", "--size", "4M", "--method", method, "--legs", "3", "--json"
        )
    )
    assert created["method"] == method
    if method == "mirror":
        assert created["legs"] == 3


# ---------------------------------------------------------------------------------------------
# preserve, status, wait, cutover, release


def test_preserve_with_no_sessions_drains_at_once(daemon: Daemon) -> None:
    ok(daemon.owm("volume", "create", "vol", "--size", "8M"))
    assert ok(daemon.owm("preserve", "vol")) == "vol@0\n"
    out = ok(daemon.owm("wait", "vol@0", "--timeout", "5"))
    assert "vol@0 is drained" in out
    preserved = as_json(daemon.owm("preserve", "vol", "--json"))
    assert preserved["image"] == "vol@1" and preserved["status"]["state"] == "drained"
    out = ok(daemon.owm("status"))
    assert "vol@0" in out and "vol@1" in out and "drained" in out
    result = daemon.owm("release", "vol@0")
    assert "Released vol@0" in ok(result)
    assert result.stderr == ""  # no progress bar when piped
    released = as_json(daemon.owm("release", "vol@1", "--json"))
    assert released["released"] is True
    assert as_json(daemon.owm("status", "vol", "--json"))[0]["images"] == []
    assert "nope" in refused(daemon.owm("preserve", "nope"))
    assert "vol@7" in refused(daemon.owm("release", "vol@7"))


def test_wait_times_out_naming_the_sessions_then_drains(
    daemon: Daemon, hold_session: Holder
) -> None:
    ok(daemon.owm("volume", "create", "vol", "--size", "8M"))
    holder = hold_session(daemon, "vol")
    assert ok(daemon.owm("preserve", "vol")).strip() == "vol@0"

    status = as_json(daemon.owm("status", "--json"))
    image = status[0]["images"][0]
    assert image["state"] == "draining" and image["sessions_left"] == 1
    sessions = [s for g in status[0]["generations"] for s in g["sessions"]]
    assert len(sessions) == 1 and sessions[0]["bytes_written"] >= 4096
    out = ok(daemon.owm("status", "vol"))
    assert "draining, 1 session left" in out and "GEN" in out

    result = daemon.owm("wait", "vol@0", "--timeout", "0.3")
    assert result.returncode == 1, result
    assert "still draining" in result.stderr and "session" in result.stderr
    assert str(sessions[0]["id"]) in result.stderr
    assert "Traceback" not in result.stderr
    result = daemon.owm("wait", "vol@0", "--timeout", "0.2", "--json")
    assert result.returncode == 1
    waited = json.loads(result.stdout)
    assert waited["drained"] is False and len(waited["holding"]) == 1

    line = refused(daemon.owm("release", "vol@0"))
    assert "vol@0" in line or "drain" in line
    line = refused(daemon.owm("volume", "delete", "vol"))
    assert "vol" in line

    holder.disconnect()
    out = ok(daemon.owm("wait", "vol@0", "--timeout", "20"))
    assert "drained" in out and "transaction-consistent" in out
    ok(daemon.owm("release", "vol@0"))


def test_cutover_and_instant_preserve(daemon: Daemon, hold_session: Holder) -> None:
    ok(daemon.owm("volume", "create", "vol", "--size", "8M"))
    hold_session(daemon, "vol")
    assert ok(daemon.owm("preserve", "vol")).strip() == "vol@0"
    out = ok(daemon.owm("cutover", "vol@0"))
    assert "1 session moved" in out and "crash-consistent" in out
    waited = as_json(daemon.owm("wait", "vol@0", "--timeout", "10", "--json"))
    assert waited["drained"] is True
    assert waited["status"]["consistency"] == "crash-consistent"

    preserved = as_json(daemon.owm("preserve", "vol", "--instant", "--json"))
    assert preserved["image"] == "vol@1" and preserved["instant"] is True
    waited = as_json(daemon.owm("wait", "vol@1", "--timeout", "10", "--json"))
    assert waited["drained"] is True
    assert waited["status"]["consistency"] == "crash-consistent"
    assert "vol@9" in refused(daemon.owm("cutover", "vol@9"))


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a terminal")
def test_terminal_spinner_and_progress_bar(daemon: Daemon, hold_session: Holder) -> None:
    """On a terminal, wait shows a spinner and release a progress bar; both end cleanly."""

    def on_terminal(*args: str) -> subprocess.CompletedProcess[str]:
        command = shlex.join([*OWM, "--pool", str(daemon.pool), *args])
        return subprocess.run(
            ["script", "-qec", command, "/dev/null"],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(COLUMNS="100"),
            stdin=subprocess.DEVNULL,
        )

    ok(daemon.owm("volume", "create", "vol", "--size", "8M", "--method", "log"))
    holder = hold_session(daemon, "vol")
    ok(daemon.owm("preserve", "vol"))
    result = on_terminal("wait", "vol@0", "--timeout", "1")
    assert result.returncode == 1 and "waiting for vol@0" in result.stdout
    assert "still draining" in result.stdout
    holder.disconnect()
    result = on_terminal("wait", "vol@0", "--timeout", "20")
    assert result.returncode == 0 and "is drained" in result.stdout
    result = on_terminal("release", "vol@0")
    assert result.returncode == 0 and "Released vol@0" in result.stdout
    assert "Traceback" not in result.stdout


def test_json_outputs_are_single_documents(daemon: Daemon) -> None:
    ok(daemon.owm("volume", "create", "vol", "--size", "8M"))
    ok(daemon.owm("preserve", "vol"))
    for args in (
        ["status", "--json"],
        ["status", "vol", "--json"],
        ["volume", "list", "--json"],
        ["volume", "show", "vol", "--json"],
        ["wait", "vol@0", "--json"],
    ):
        result = daemon.owm(*args)
        assert result.returncode == 0, result
        json.loads(result.stdout)  # exactly one document, nothing else on stdout
        assert result.stderr == ""


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_runs_and_verifies() -> None:
    result = run_owm("demo", "--writers", "2", "--new-writers", "2", "--json", timeout=120)
    summary = json.loads(ok(result))
    assert summary["image_verified"] is True and summary["live_verified"] is True
    assert summary["bytes_to_image_after_preserve"] > 0
    assert summary["bytes_new_sessions_live_only"] > 0
    assert summary["seconds"] < 60


def test_demo_on_ceph_runs_on_rados_and_etcd() -> None:
    """``owm demo --ceph``: the same story with the data in RADOS and the catalog in etcd, on a
    cluster the demo starts and removes itself."""
    from owm.testbed import ceph, etcd

    why = ceph.missing() or (None if etcd.etcd_binary() else "etcd is not installed")
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ceph demo, but {why}", pytrace=False)
        pytest.skip(f"no throw-away Ceph cluster: {why}")
    result = run_owm("demo", "--ceph", "--writers", "2", "--new-writers", "2", "--json",
                     timeout=180)
    summary = json.loads(ok(result))
    assert summary["image_verified"] is True and summary["live_verified"] is True
    assert "RADOS pool" in summary["pool_on"] and "etcd" in summary["pool_on"]


def test_demo_prints_the_story_when_piped() -> None:
    out = ok(run_owm("demo", timeout=120))
    assert "preserve demo -> demo@0" in out
    assert "drained" in out and "released demo@0" in out
    assert "Summary" in out
