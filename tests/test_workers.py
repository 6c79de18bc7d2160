"""``owm serve --workers 2``: real clients on volumes of both workers, the CLI on worker 1, a worker
killed with SIGKILL while the other's client goes on, the parent killed, the shared catalog."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, http_call, run_owm, start_daemon
from nbd_fixtures import have

from owm.catalog.sqlite import SqliteCatalog
from owm.daemon.workers import merge_groups
from owm.nbd.client import NbdClient, NbdError

MiB = 1 << 20


def _workers(d: Daemon) -> list[dict[str, Any]]:
    status, health = d.api("GET", "/v1/health")
    assert status in (200, 503), health  # 503 while a worker restarts
    return list(health["workers"])


def _worker_of(d: Daemon) -> dict[str, int]:
    status, volumes = d.api("GET", "/v1/volumes")
    assert status == 200
    return {v["name"]: v["worker"] for v in volumes}


def _create(d: Daemon, *names: str) -> None:
    for name in names:
        r = d.owm("volume", "create", name, "--size", "16M")
        assert r.returncode == 0, r.stderr


def _uri(d: Daemon, export: str) -> str:
    return f"nbd+unix:///{export}?socket={d.nbd_socket}"


def _stop(d: Daemon) -> None:
    code = d.stop()
    assert code == 0, f"owm serve exited with {code}:\n{d.log_text()}"


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (the test's own child) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not have("qemu-io", "nbdinfo", "nbdcopy"), reason="needs qemu-io and libnbd")
def test_clients_and_cli_on_volumes_of_both_workers(short_tmp: Path, hold_session: Any) -> None:
    token = short_tmp / "token"
    token.write_text("s3cret\n")
    d = start_daemon(short_tmp / "pool", "--workers", "2", "--control-listen", "127.0.0.1:0",
                     "--control-token-file", token)
    try:
        _create(d, "a", "b")
        assert _worker_of(d) == {"a": 0, "b": 1}
        host, port = d.health["control"]["tcp"].rsplit(":", 1)
        status, _ = http_call(http.client.HTTPConnection(host, int(port)), "GET", "/v1/volumes")
        assert status == 401
        status, listed = http_call(http.client.HTTPConnection(host, int(port)), "GET",
                                   "/v1/volumes", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and [v["name"] for v in listed] == ["a", "b"]
        pids = {w["pid"] for w in _workers(d)}
        assert len(pids) == 2 and d.proc.pid not in pids
        for name, pattern in (("a", "0x61"), ("b", "0x62")):
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 1M",
                                "-c", f"write -P {pattern} 15M 1M", _uri(d, name)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
        # The metadata context negotiated with the parent holds in the worker: block status.
        r = subprocess.run(["nbdinfo", "--map", _uri(d, "b")], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert [line.split()[:2] for line in r.stdout.splitlines()][:2] == [
            ["0", "1048576"], ["1048576", "14680064"]], r.stdout
        # Over TCP too, and nbdinfo asks about both workers' exports on one connection.
        r = subprocess.run(["nbdinfo", "--list", f"nbd://{d.nbd_tcp}"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert 'export="a"' in r.stdout and 'export="b"' in r.stdout
        for name, byte in (("a", b"a"), ("b", b"b")):
            out = short_tmp / f"{name}.raw"
            r = subprocess.run(["nbdcopy", f"nbd://{d.nbd_tcp}/{name}", str(out)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            data = out.read_bytes()
            assert data == byte * MiB + bytes(14 * MiB) + byte * MiB
        # The CLI on worker 1's volume: preserve, wait, backup (it reads over NBD), verify.
        r = d.owm("preserve", "b")
        assert r.returncode == 0 and r.stdout.strip() == "b@0", r.stderr
        assert d.owm("wait", "b@0", "--timeout", "10").returncode == 0
        backup = short_tmp / "b0.raw"
        r = d.owm("backup", "b@0", "--to", backup, "--format", "raw", "--verify")
        assert r.returncode == 0, r.stderr
        assert backup.read_bytes() == (short_tmp / "b.raw").read_bytes()
        # Unknown and hostile names get the parent's one sentence, as from one process.
        r = subprocess.run(["nbdinfo", _uri(d, "nope")], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0 and "Traceback" not in r.stderr

        async def refused(name: str) -> str:
            with pytest.raises(NbdError) as info:
                await NbdClient.connect(name, unix_path=str(d.nbd_socket), timeout=10)
            return str(info.value)

        assert "There is no export named 'nope'." in asyncio.run(refused("nope"))
        hostile = asyncio.run(refused("../a\x1b[31m"))
        assert hostile.endswith(".") and "Traceback" not in hostile
        # A group across workers: its idle member moves to the other member's worker, with
        # its data and images; a busy one makes the command fail in one sentence.
        r = d.owm("group", "create", "g", "a", "b")
        assert r.returncode == 0, r.stderr
        assert _worker_of(d) == {"a": 0, "b": 0}
        assert "moved idle volume b from worker 1 to worker 0 for group g" in d.log_text()
        r = subprocess.run(["nbdcopy", _uri(d, "b@0"), str(short_tmp / "b0-moved.raw")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert (short_tmp / "b0-moved.raw").read_bytes() == backup.read_bytes()
        r = d.owm("preserve", "g")
        assert r.returncode == 0 and r.stdout.split()[0] == "g@0", r.stdout
        _create(d, "c", "e", "f")
        assert [_worker_of(d)[n] for n in "cef"] == [1, 1, 0]
        hold_session(d, "c")
        r = d.owm("group", "create", "h", "f", "c")
        assert r.returncode == 1 and "different worker processes" in r.stderr, r.stderr
        assert "open session" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert _worker_of(d)["c"] == 1
    finally:
        _stop(d)
    # Every process closed cleanly: a one-process start trusts the pool as it is.
    d = start_daemon(short_tmp / "pool")
    try:
        assert "not shut down cleanly" not in d.log_text()
        r = d.owm("status", "--json")
        images = {i["name"]: i for v in json.loads(r.stdout) for i in v["images"]}
        assert images["b@0"]["consistency"] == "transaction-consistent"
        assert {"a@0", "b@1"} <= set(images)
    finally:
        _stop(d)


FUA_CLIENT = r"""
import asyncio, sys
from owm.nbd.client import NbdClient

async def main():
    client = await NbdClient.connect(sys.argv[1], unix_path=sys.argv[2])
    n = int(sys.argv[3])
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        n += 1
        await client.write(n * 4096, bytes([n]) * 4096, fua=True)
        print("acked", n, flush=True)
    await client.disconnect()

asyncio.run(main())
"""


def test_kill_one_worker_then_the_parent(short_tmp: Path, hold_session: Any) -> None:
    from conftest import REPO, cli_env

    d = start_daemon(short_tmp / "pool", "--workers", "2")
    try:
        _create(d, "a", "b")
        assert _worker_of(d) == {"a": 0, "b": 1}
        writer = subprocess.Popen(
            [sys.executable, "-c", FUA_CLIENT, "a", str(d.nbd_socket), "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
        assert writer.stdin is not None and writer.stdout is not None

        def write_one() -> str:
            assert writer.stdin is not None and writer.stdout is not None
            writer.stdin.write("w\n")
            writer.stdin.flush()
            return writer.stdout.readline().strip()

        assert write_one() == "acked 1"
        hold_session(d, "b")  # a session of generation 0 on worker 1
        assert d.owm("preserve", "b").stdout.strip() == "b@0"
        victim = _workers(d)[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        # Worker 0's client goes on while worker 1 is dead and while it restarts.
        assert write_one() == "acked 2"
        _wait(lambda: _workers(d)[1]["ready"] and _workers(d)[1]["pid"] != victim,
              "worker 1 to be restarted")
        assert write_one() == "acked 3"
        assert re.search(r"worker 1 \(pid \d+\) exited with signal 9; restarting it",
                         d.log_text())
        r = d.owm("status", "b", "--json")
        image = json.loads(r.stdout)[0]["images"][0]
        assert (image["state"], image["consistency"]) == ("drained-unclean", "crash-consistent")
        writer.stdin.close()
        writer.wait(timeout=10)
        # Now the parent: its workers notice and go, and the pool lock with them.
        writer = subprocess.Popen(
            [sys.executable, "-c", FUA_CLIENT, "a", str(d.nbd_socket), "10"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
        assert writer.stdin is not None
        pids = [w["pid"] for w in _workers(d)]
        hold_session(d, "b")
        assert d.owm("preserve", "b").stdout.strip() == "b@1"
        assert [write_one() for _ in range(4)] == [f"acked {n}" for n in range(11, 15)]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)
        _wait(lambda: not any(_alive(p) for p in pids), "the workers to exit", 40.0)
        writer.kill()
        writer.wait(timeout=10)
    finally:
        if d.proc.poll() is None:
            _stop(d)
    d = start_daemon(short_tmp / "pool")  # one process: recovers everything
    try:
        async def read() -> bytes:
            client = await NbdClient.connect("a", unix_path=str(d.nbd_socket))
            try:
                live_b = await NbdClient.connect("b", unix_path=str(d.nbd_socket))
                try:
                    held = await live_b.read(0, 4096)  # flushed by the killed worker's client
                finally:
                    await live_b.disconnect()
                return held + await client.read(4096, 15 * 4096)
            finally:
                await client.disconnect()

        data = asyncio.run(read())
        assert data[:4096] == b"h" * 4096
        for n in (1, 2, 3, 11, 12, 13, 14):  # every write acknowledged with FUA is there
            assert data[n * 4096:(n + 1) * 4096] == bytes([n]) * 4096, n
        images = {i["name"]: i for i in json.loads(d.owm("status", "b", "--json").stdout)[0]
                  ["images"]}
        for name in ("b@0", "b@1"):
            assert images[name]["consistency"] != "transaction-consistent", images[name]
            assert images[name]["state"] == "drained-unclean", images[name]
    finally:
        _stop(d)


def test_what_workers_do_not_serve_is_one_sentence(short_tmp: Path) -> None:
    r = run_owm("--pool", short_tmp / "pool", "serve", "--workers", "2", "--tls-cert",
                short_tmp / "cert.pem", "--tls-key", short_tmp / "key.pem")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "--workers above 1 does not work with --tls (a TLS session cannot be handed to "
        "another process) yet."], r.stderr
    assert not (short_tmp / "pool").exists()  # refused before anything was touched


def test_shared_catalog_two_writers_and_group_merge(tmp_path: Path) -> None:
    """Two catalogs on one file (as two workers hold it) write at once; each one's groups
    survive the other's writes of the shared ``groups`` document."""
    path = tmp_path / "catalog.sqlite"
    one = SqliteCatalog(path, shared=True, reserve_bytes=0)
    two = SqliteCatalog(path, shared=True, reserve_bytes=0)
    one.merge_meta["groups"] = merge_groups(lambda: {"a"})
    two.merge_meta["groups"] = merge_groups(lambda: {"b"})
    errors: list[BaseException] = []

    def hammer(catalog: SqliteCatalog, volume: str) -> None:
        try:
            for _ in range(50):
                sid = catalog.open_session(volume, 0, "peer")
                catalog.close_session(sid, True, 0, 0, 0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c, v)) for c, v in ((one, "a"), (two, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    one.set_meta("groups", json.dumps({"ga": {"members": ["a"]}}))
    # Worker two never saw ga: its whole document does not remove it.
    two.set_meta("groups", json.dumps({"gb": {"members": ["b"]}}))
    assert set(json.loads(one.get_meta("groups") or "{}")) == {"ga", "gb"}
    one.set_meta("groups", json.dumps({}))  # ga deleted by its worker
    assert set(json.loads(two.get_meta("groups") or "{}")) == {"gb"}
    one.close()
    two.close()
