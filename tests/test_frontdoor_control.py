"""The control API's front door: the CLI pointed at a daemon that does not own the volume.

The owner is a real ``owm serve`` with a TCP control listener and a token; the front door is a
``ControlServer`` in the test process on an empty local pool (plus one volume of its own), with
a test ``Directory``.  The CLI runs as a subprocess against the front door's control socket.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Daemon, UnixHTTPConnection, cli_env, http_call, start_daemon
from test_frontdoor import SIZE, FakeDirectory, create_volume, remote_of

from owm.control.context import ControlContext
from owm.control.server import ControlServer
from owm.pool.pool import Pool

pytestmark = pytest.mark.timeout(120)

TOKEN = "cluster-secret-token"


@dataclass
class Front:
    pool_dir: Path
    pool: Pool
    directory: FakeDirectory
    owner: Daemon

    async def owm(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "owm", "--pool", str(self.pool_dir), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=REPO,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        code = proc.returncode or 0
        if check:
            assert code == 0, (args, out, err)
        return code, out.decode(), err.decode()


@pytest.fixture
async def front(short_tmp: Path) -> AsyncIterator[Front]:
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    owner = await asyncio.to_thread(
        start_daemon, short_tmp / "owner", "--control-listen", "127.0.0.1:0",
        "--control-token-file", token_file)
    try:
        await asyncio.to_thread(create_volume, owner, "vol")
        pool_dir = short_tmp / "front"
        pool = await Pool.open(pool_dir)
        await pool.create_volume("here", SIZE)
        directory = FakeDirectory()
        directory.owners["vol"] = remote_of(owner, "owner")
        control = ControlServer(ControlContext(pool=pool, directory=directory,
                                               cluster_token=TOKEN))
        await control.start(pool_dir / "control.sock")
        try:
            yield Front(pool_dir, pool, directory, owner)
        finally:
            await control.stop()
            await pool.close()
    finally:
        await asyncio.to_thread(owner.stop, signal.SIGKILL)


async def test_cli_through_the_front_door(front: Front) -> None:
    _, out, _ = await front.owm("status", "vol", "--json")
    [entry] = json.loads(out)
    assert entry["name"] == "vol" and entry["size"] == SIZE

    _, out, _ = await front.owm("preserve", "vol")
    assert "vol@0" in out
    status, body = await asyncio.to_thread(front.owner.api, "GET", "/v1/images/vol@0")
    assert status == 200 and body["name"] == "vol@0"  # it happened on the owner

    _, out, _ = await front.owm("status", "--json")
    volumes = {v["name"]: v for v in json.loads(out)}
    assert set(volumes) == {"vol", "here"}
    assert volumes["vol"]["owner"] == "owner" and "owner" not in volumes["here"]
    assert [i["name"] for i in volumes["vol"]["images"]] == ["vol@0"]
    _, out, _ = await front.owm("status")
    assert "vol@0" in out and "here" in out

    await front.owm("wait", "vol@0", "--timeout", "10")
    _, out, err = await front.owm("cutover", "vol@0")
    assert "already" in out + err  # the owner's answer: it had drained, nothing cut over
    _, out, _ = await front.owm("release", "vol@0")
    status, body = await asyncio.to_thread(front.owner.api, "GET", "/v1/images/vol@0")
    assert status == 404  # released on the owner

    # A route naming a path on this host is not forwarded, and says so.
    status, body = await asyncio.to_thread(
        http_call, UnixHTTPConnection(front.pool_dir / "control.sock"), "POST",
        "/v1/volumes/vol/restore/source", {"from": "repo 1", "socket": "/tmp/x.sock"})
    assert status == 409 and "must be done on that daemon's host" in body["error"]

    # A volume's errors come back from its owner as they are: one sentence, exit 1.
    code, _, err = await front.owm("release", "vol@7", check=False)
    assert code == 1 and "vol@7" in err and "Traceback" not in err


async def test_unreachable_owner_is_a_plain_503(front: Front) -> None:
    await asyncio.to_thread(front.owner.stop, signal.SIGKILL)
    code, _, err = await front.owm("status", "vol", check=False)
    assert code != 0 and "Traceback" not in err
    assert "daemon owner at 127.0.0.1:" in err and "cannot be reached" in err
    code, out, _ = await front.owm("status", "--json")
    volumes = {v["name"]: v for v in json.loads(out)}
    assert volumes["vol"]["unreachable"] and "here" in volumes
    _, out, _ = await front.owm("status")
    assert "cannot be read" in out
