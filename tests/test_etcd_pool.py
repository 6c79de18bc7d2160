"""A pool whose catalog lives in etcd: the reference model over it, and a real daemon
(``owm serve --etcd``) driven through the CLI and its control API, killed with SIGKILL in the
middle of catalog changes, with etcd restarted under it, a second daemon refused, and an
unreachable or damaged etcd at start.

etcd is a real ``etcd`` process on loopback (tests/etcd_fixtures.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from cli_helpers import ok, one_sentence
from conftest import Daemon, run_owm, start_daemon
from hypothesis import HealthCheck, settings
from test_pool_model import PoolMachine

from owm.catalog import EtcdCatalog
from owm.pool.pool import Pool
from owm.testbed.etcd import EtcdServer

Holder = Callable[[Daemon, str], Any]


def etcd_daemon(pool: Path, server: EtcdServer, prefix: str) -> Daemon:
    return start_daemon(pool, "--etcd", server.url, "--etcd-prefix", prefix)


def chains(d: Daemon) -> dict[str, tuple[int, list[int]]]:
    """Volume -> (live generation, preserved generations), as the daemon reports them."""
    status, volumes = d.api("GET", "/v1/volumes")
    assert status == 200, volumes
    return {v["name"]: (v["live_generation"], [i["generation"] for i in v["images"]])
            for v in volumes}


# -- the reference model over an etcd catalog ----------------------------------------------

_SERVER: list[EtcdServer] = []


class EtcdCowMachine(PoolMachine):
    """tests/test_pool_model.py's machine, with the catalog in etcd (a new prefix each run)."""

    method = "cow"

    def __init__(self) -> None:
        self.prefix = f"/owm/model-{uuid.uuid4().hex[:12]}/"  # (hypothesis seeds random)
        super().__init__()

    async def _open(self) -> Pool:
        url = _SERVER[0].url
        return await Pool.open(self.dir, storage_factory=self._storage,
                               catalog_factory=lambda: EtcdCatalog(url, self.prefix))


class EtcdMirrorMachine(EtcdCowMachine):
    method = "mirror"


SMALL = settings(max_examples=6, stateful_step_count=25, deadline=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture
def model_etcd(etcd_server: EtcdServer) -> Iterator[None]:
    _SERVER[:] = [etcd_server]
    yield
    _SERVER.clear()


@pytest.mark.usefixtures("model_etcd")
@pytest.mark.parametrize("machine", [EtcdCowMachine, EtcdMirrorMachine])
def test_model_over_etcd_catalog(machine: type[PoolMachine]) -> None:
    test_case = machine.TestCase
    test_case.settings = SMALL
    test_case().runTest()


# -- a daemon on an etcd catalog, through the CLI -------------------------------------------

def test_daemon_on_etcd_through_the_cli(
    short_tmp: Path, etcd_server: EtcdServer, etcd_prefix: str, hold_session: Holder
) -> None:
    pool = short_tmp / "pool"
    d = etcd_daemon(pool, etcd_server, etcd_prefix)
    try:
        ok(d.owm("volume", "create", "vol", "--size", "8M"))
        holder = hold_session(d, "vol")
        assert ok(d.owm("preserve", "vol")).strip() == "vol@0"
        out = ok(d.owm("status"))
        assert f"Catalog in etcd at {etcd_server.url}, prefix {etcd_prefix}." in out
        assert "draining, 1 session left" in out
        assert d.owm("wait", "vol@0", "--timeout", "0.3").returncode == 1
        holder.disconnect()
        ok(d.owm("wait", "vol@0", "--timeout", "20"))
        backup = short_tmp / "vol-0.raw"
        ok(d.owm("backup", "vol@0", "--to", backup, "--release"))
        assert backup.read_bytes()[:4096] == b"h" * 4096
        assert ok(d.owm("preserve", "vol")).strip() == "vol@1"
        status, before = d.api("GET", "/v1/volumes")
        assert status == 200
    finally:
        assert d.stop() == 0, d.log_text()
    assert not (pool / "catalog.sqlite").exists()  # the catalog really is in etcd
    d = etcd_daemon(pool, etcd_server, etcd_prefix)
    try:
        after = json.loads(ok(d.owm("status", "--json")))
        assert after[0]["catalog"]["kind"] == "etcd"
        assert after[0]["catalog"]["prefix"] == etcd_prefix
        strip = ("generations", "bytes_on_disk", "catalog")
        assert [{k: v for k, v in x.items() if k not in strip} for x in after] == \
            [{k: v for k, v in x.items() if k not in strip} for x in before]
        assert [i["name"] for i in after[0]["images"]] == ["vol@1"]
        assert after[0]["images"][0]["state"] == "drained"
        assert "not shut down cleanly" not in d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()


def test_kill_in_the_middle_of_catalog_changes_leaves_old_or_new_state(
    short_tmp: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """SIGKILL while preserves and creates stream in; after each restart every volume's chain
    is what was acknowledged, or that plus the one change in flight: never anything else."""
    pool = short_tmp / "pool"
    rng = random.Random(12)
    acked: dict[str, tuple[int, list[int]]] = {}
    pending: dict[str, tuple[int, list[int]]] = {}
    started = time.monotonic()
    rounds = 0
    while rounds < 6 and time.monotonic() - started < 25:
        rounds += 1
        d = etcd_daemon(pool, etcd_server, etcd_prefix)
        got = chains(d)
        for name, (live, images) in got.items():
            want = acked.get(name)
            in_flight = pending.get(name)
            assert (live, images) in [want, in_flight], (name, got[name], want, in_flight)
            assert images == list(range(live)), got[name]
        assert set(acked) <= set(got) <= set(acked) | set(pending)
        acked = got
        pending = {}
        stop = threading.Event()

        def work(d: Daemon = d, round_: int = rounds, stop: threading.Event = stop,
                 acked: dict[str, tuple[int, list[int]]] = acked,
                 pending: dict[str, tuple[int, list[int]]] = pending) -> None:
            pick = random.Random(round_)
            i = 0
            while not stop.is_set():
                i += 1
                names = sorted(acked)
                if not names or i % 4 == 0:
                    name = f"v{round_}-{i}"
                    pending[name] = (0, [])
                    status, _ = d.api("POST", "/v1/volumes", {"name": name, "size": 1 << 20})
                else:
                    name = pick.choice(names)
                    live, images = acked[name]
                    pending[name] = (live + 1, [*images, live])
                    status, _ = d.api("POST", f"/v1/volumes/{name}/preserve", {})
                if status >= 300:
                    return
                acked[name] = pending.pop(name)

        worker = threading.Thread(target=lambda: _quiet(work))
        worker.start()
        time.sleep(rng.uniform(0.2, 0.8))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        stop.set()
        worker.join(10)
    d = etcd_daemon(pool, etcd_server, etcd_prefix)
    try:
        assert chains(d).keys() >= acked.keys()
        assert sum(len(v[1]) for v in acked.values()) > rounds  # changes were in flight
    finally:
        assert d.stop() == 0


def _quiet(fn: Callable[[], None]) -> None:
    with contextlib.suppress(OSError):  # the daemon died under the request: that is the point
        fn()


def test_etcd_restart_while_the_daemon_runs_fails_clearly_then_recovers(
    short_tmp: Path, private_etcd: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = private_etcd()
    d = etcd_daemon(short_tmp / "pool", server, etcd_prefix)
    try:
        ok(d.owm("volume", "create", "vol", "--size", "4M"))
        server.kill()
        line = one_sentence(d.owm("preserve", "vol"))
        assert "etcd" in line and server.url in line, line
        status, body = d.api("POST", "/v1/volumes", {"name": "x", "size": 1 << 20})
        assert status == 503 and server.url in body["error"], (status, body)
        server.start_again()
        deadline = time.monotonic() + 20
        while d.owm("preserve", "vol").returncode != 0:
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.3)
        ok(d.owm("volume", "create", "y", "--size", "1M"))
        got = chains(d)
        assert got["vol"] == (1, [0]) and "x" not in got
        log = d.log_text()
        assert "lost contact with the pool's catalog in etcd" in log
        assert log.index("lost contact") < log.index("answers again")
    finally:
        assert d.stop() == 0, d.log_text()
    d = etcd_daemon(short_tmp / "pool", server, etcd_prefix)
    try:
        assert chains(d) == {"vol": (1, [0]), "y": (0, [])}
    finally:
        assert d.stop() == 0, d.log_text()


def test_second_daemon_on_the_same_etcd_pool_is_refused_naming_the_holder(
    short_tmp: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    d = etcd_daemon(short_tmp / "pool", etcd_server, etcd_prefix)
    try:
        result = run_owm("--pool", short_tmp / "elsewhere", "serve", "--listen", "none",
                         "--etcd", etcd_server.url, "--etcd-prefix", etcd_prefix, timeout=30)
        line = one_sentence(result)
        assert "already served by another daemon" in line and f"pid {d.proc.pid}" in line
        assert str(short_tmp / "pool") in line
    finally:
        assert d.stop() == 0
    # Released at the clean stop: another daemon may serve it now.
    d = etcd_daemon(short_tmp / "elsewhere", etcd_server, etcd_prefix)
    assert d.stop() == 0


def test_unreachable_etcd_at_start_is_one_sentence_naming_it(short_tmp: Path) -> None:
    started = time.monotonic()
    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "none",
                     "--etcd", "http://127.0.0.1:9", timeout=30)
    took = time.monotonic() - started
    line = one_sentence(result)
    assert "http://127.0.0.1:9" in line and "did not start" in line
    assert took < 15  # (10 s in the contract; a loaded machine adds interpreter start-up)


def test_damaged_value_in_etcd_stops_the_start_with_one_sentence(
    short_tmp: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    d = etcd_daemon(short_tmp / "pool", etcd_server, etcd_prefix)
    ok(d.owm("volume", "create", "vol", "--size", "4M"))
    assert d.stop() == 0

    async def spoil() -> None:
        host, port = etcd_server.url.removeprefix("http://").split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            await client.put(f"{etcd_prefix}volumes/vol".encode(), b'{"name": "vol"')

    asyncio.run(spoil())
    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "none",
                     "--etcd", etcd_server.url, "--etcd-prefix", etcd_prefix, timeout=30)
    line = one_sentence(result)
    assert "is corrupt" in line and f"{etcd_prefix}volumes/vol is not JSON" in line, line


def test_etcd_options_mistakes_are_one_sentence(short_tmp: Path) -> None:
    result = run_owm("--pool", short_tmp / "pool", "serve", "--etcd-prefix", "/owm/x/")
    assert "--etcd-prefix needs --etcd" in one_sentence(result, 2).replace("Error: ", "")
    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "none",
                     "--etcd", "https://127.0.0.1:2379")
    assert "only http:// is supported" in one_sentence(result)
    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "none",
                     "--etcd", "http://127.0.0.1:2379", "--etcd-prefix", "no-slash")
    assert "must start with '/'" in one_sentence(result)
