"""The cluster's front door over NBD: a daemon that does not own a volume forwards its clients.

Owners are real ``owm serve`` subprocesses on their own local pools.  The front door is an
``NbdServer`` run in the test process on an empty local pool, with a small test ``Directory``
(the cluster branch implements the real one on etcd) that says which daemon owns which volume.
Clients are the real tools (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and owm's own client.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon
from nbd_fixtures import have, run, wait_for

from owm.common.cluster import Remote
from owm.nbd.access import AccessRules
from owm.nbd.client import NbdClient, NbdError
from owm.nbd.proxy import ProxyView
from owm.nbd.server import NbdServer
from owm.pool.pool import Pool

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not have("qemu-io", "qemu-img", "nbdinfo", "nbdcopy", "fio"),
        reason="the NBD client tools are not installed (scripts/setup installs them)",
    ),
]

MIB = 1024 * 1024
SIZE = 16 * MIB


class FakeDirectory:
    """Where each volume is served, as the test says (the real one lives in etcd)."""

    def __init__(self) -> None:
        self.owners: dict[str, Remote] = {}

    async def locate(self, volume: str) -> Remote | None:
        return self.owners.get(volume)

    async def exports(self) -> list[str]:
        return sorted(self.owners)


def remote_of(daemon: Daemon, name: str) -> Remote:
    host, port = daemon.nbd_tcp.rsplit(":", 1)
    control = daemon.health.get("control", {}).get("tcp")
    ctl = None
    if control:
        chost, cport = control.rsplit(":", 1)
        ctl = (chost, int(cport))
    return Remote(daemon=name, nbd=(host, int(port)), control=ctl)


def create_volume(daemon: Daemon, name: str, size: int = SIZE) -> None:
    status, body = daemon.api("POST", "/v1/volumes", {"name": name, "size": size})
    assert status == 201, body


@dataclass
class Cluster:
    """One or more owner daemons and a front door in this process."""

    base: Path
    directory: FakeDirectory
    server: NbdServer
    pool: Pool
    owners: list[Daemon] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.tcp_port

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    async def owner(self, pool: str, *volumes: str) -> Daemon:
        daemon = await asyncio.to_thread(start_daemon, self.base / pool)
        self.owners.append(daemon)
        for volume in volumes:
            await asyncio.to_thread(create_volume, daemon, volume)
            self.directory.owners[volume] = remote_of(daemon, pool)
        return daemon

    async def restart(self, daemon: Daemon) -> Daemon:
        new = await asyncio.to_thread(start_daemon, daemon.pool)
        self.owners.append(new)
        return new


@pytest.fixture
async def cluster(short_tmp: Path) -> AsyncIterator[Cluster]:
    pool = await Pool.open(short_tmp / "front")
    directory = FakeDirectory()
    server = NbdServer(pool, directory=directory)
    await server.start(tcp=("127.0.0.1", 0), unix_path=str(short_tmp / "front" / "nbd.sock"))
    c = Cluster(short_tmp, directory, server, pool)
    try:
        yield c
    finally:
        await server.stop(grace=5.0)
        await pool.close()
        for daemon in c.owners:
            await asyncio.to_thread(daemon.stop, signal.SIGKILL)


async def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    result = await run(*argv, uri, timeout=60)
    assert "failed" not in result.stdout and "error" not in result.stderr.lower(), result
    return result.stdout


async def test_real_clients_through_the_front_door(cluster: Cluster, tmp_path: Path) -> None:
    owner = await cluster.owner("owner", "vol")
    direct = f"nbd://{owner.nbd_tcp}/vol"
    await qemu_io(cluster.uri("vol"), "write -P 0xab 0 1M", "write -P 0xcd -f 3M 512k",
                  "write -z 5M 1M", "flush")
    # Read back through the front door and straight from the owner: the same bytes.
    for uri in (cluster.uri("vol"), direct):
        await qemu_io(uri, "read -P 0xab 0 1M", "read -P 0xcd 3M 512k", "read -P 0 5M 1M",
                      read_only=True)

    info = json.loads((await run("nbdinfo", "--json", cluster.uri("vol"))).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE and export["can_flush"] and export["can_fua"]
    assert export["can_trim"] and export["can_zero"] and export["can_multi_conn"]
    assert "base:allocation" in export["contexts"]
    listed = (await run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{cluster.port}")).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["vol"]

    # A whole-volume copy through the front door equals one taken from the owner.
    through, straight = tmp_path / "through.raw", tmp_path / "straight.raw"
    await run("nbdcopy", cluster.uri("vol"), str(through), timeout=60)
    await run("nbdcopy", direct, str(straight), timeout=60)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(through), str(straight))
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", cluster.uri("vol"),
              str(straight))

    # A preserved image is forwarded read-only.
    status, body = await asyncio.to_thread(owner.api, "POST", "/v1/volumes/vol/preserve", {})
    assert status == 201, body
    await qemu_io(cluster.uri("vol@0"), "read -P 0xab 0 1M", read_only=True)
    image = json.loads((await run("nbdinfo", "--json", cluster.uri("vol@0"))).stdout)
    assert image["exports"][0]["is_read_only"]
    refused = await run("qemu-io", "-f", "raw", "-c", "write 0 4k", cluster.uri("vol@0"),
                        check=False)
    assert refused.returncode != 0 or "failed" in refused.stdout
    # An export nobody serves is refused with the usual answer.
    missing = await run("nbdinfo", cluster.uri("nothing"), check=False)
    assert missing.returncode != 0 and "nothing" in missing.stderr


async def test_fio_deep_queue_through_the_front_door(cluster: Cluster) -> None:
    await cluster.owner("owner", "vol")
    result = await run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={cluster.uri('vol')}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M", "--verify=crc32c",
        "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1", "--runtime=60",
        "--output-format=json", timeout=90,
    )
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MIB and job["read"]["io_bytes"] == 8 * MIB


async def test_requests_in_flight_are_forwarded_at_once(cluster: Cluster) -> None:
    """64 requests sent together are all in flight upstream together (none waits for another)."""
    await cluster.owner("owner", "vol")
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        blocks = [bytes([i]) * 4096 for i in range(64)]
        await asyncio.gather(*(client.write(i * 8192, b, fua=True) for i, b in enumerate(blocks)))
        got = await asyncio.gather(*(client.read(i * 8192, 4096) for i in range(64)))
        assert got == blocks
        extents = await client.block_status(0, SIZE)
        assert sum(n for n, _ in extents) == SIZE
        await client.trim(0, 8192)
        await client.write_zeroes(8192, 8192, no_hole=True)
        assert await client.read(8192, 4096) == bytes(4096)
        await client.flush()
        await client.cache(0, 65536)


def proxied_view(cluster: Cluster) -> ProxyView:
    """The forwarded view of the one session of the front door."""
    views = [conn.view for conn in cluster.server._connections if conn.view is not None]
    assert len(views) == 1 and isinstance(views[0], ProxyView)
    return views[0]


async def fua_writer(client: NbdClient, acked: dict[int, int], stop: asyncio.Event,
                     lane: int, lanes: int) -> None:
    """FUA writes of a counter pattern, one at a time, recording each acknowledged one."""
    n = 0
    blocks = SIZE // 4096
    while not stop.is_set() and n < 5000:
        n += 1
        block = (n * lanes + lane) % blocks
        await client.write(block * 4096, (n % 251 + 1).to_bytes(1, "big") * 4096, fua=True)
        acked[block] = n % 251 + 1


async def test_owner_killed_and_restarted_under_fua_writes(cluster: Cluster) -> None:
    owner = await cluster.owner("owner", "vol")
    acked: dict[int, int] = {}
    stop = asyncio.Event()
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        lanes = 4
        writers = [asyncio.ensure_future(fua_writer(client, acked, stop, i, lanes))
                   for i in range(lanes)]
        await asyncio.sleep(0.5)
        before = len(acked)
        owner.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(owner.proc.wait)
        await asyncio.sleep(0.3)  # the writers are waiting on the proxy now
        new = await cluster.restart(owner)
        cluster.directory.owners["vol"] = remote_of(new, "owner-2")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)  # no writer saw an error
        assert len(acked) > before
        view = proxied_view(cluster)
        assert view._generation == 1 and view.remote == cluster.directory.owners["vol"]
        # Every acknowledged FUA write is there, through the front door and on the owner.
        for block, value in acked.items():
            assert await client.read(block * 4096, 4096) == bytes([value]) * 4096
    async with await NbdClient.connect("vol", host="127.0.0.1",
                                       port=int(new.nbd_tcp.rsplit(":", 1)[1])) as direct:
        for block, value in acked.items():
            assert await direct.read(block * 4096, 4096) == bytes([value]) * 4096


async def test_unflushed_writes_lost_with_the_owner_fail_the_next_flush(cluster: Cluster) -> None:
    """A flush re-sent to a new owner cannot vouch for writes the old one acknowledged without
    FUA: it fails with EIO once, and later flushes succeed."""
    owner = await cluster.owner("owner", "vol")
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        await client.write(0, b"a" * 4096)
        await client.flush()  # covered: no loss to report for it
        await client.write(4096, b"b" * 4096)  # acknowledged, never flushed
        owner.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(owner.proc.wait)
        new = await cluster.restart(owner)
        cluster.directory.owners["vol"] = remote_of(new, "owner-2")
        with pytest.raises(NbdError, match="EIO"):
            await client.flush()
        await client.write(8192, b"c" * 4096)
        await client.flush()
        assert await client.read(0, 4096) == b"a" * 4096


async def test_a_second_owner_takes_over_the_location(cluster: Cluster) -> None:
    first = await cluster.owner("first", "vol")
    second = await cluster.owner("second")
    await asyncio.to_thread(create_volume, second, "vol")
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        await client.write(0, b"1" * 4096, fua=True)
        cluster.directory.owners["vol"] = remote_of(second, "second")
        stop = asyncio.Event()
        acked: dict[int, int] = {}
        writer = asyncio.ensure_future(fua_writer(client, acked, stop, 0, 1))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(first.stop)  # a planned stop: ESHUTDOWN, then the close
        await asyncio.sleep(0.5)
        stop.set()
        await writer
        await client.write(4096, b"2" * 4096, fua=True)
        assert proxied_view(cluster).remote == cluster.directory.owners["vol"]
    async with await NbdClient.connect(
        "vol", port=int(second.nbd_tcp.rsplit(":", 1)[1])
    ) as direct:
        assert await direct.read(4096, 4096) == b"2" * 4096


async def test_bound_exceeded_fails_the_session_only(cluster: Cluster) -> None:
    assert cluster.server.forwarder is not None
    cluster.server.forwarder.relocate_total = 1.5
    owner = await cluster.owner("owner", "vol")
    other = await cluster.owner("other", "keep")
    await cluster.pool.create_volume("local", SIZE)
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        await client.write(0, b"x" * 4096, fua=True)
        owner.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(owner.proc.wait)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NbdError, match="EIO") as failed:
            await client.write(4096, b"y" * 4096, fua=True)
        assert "could not be found again" in str(failed.value)
        assert loop.time() - started < 10
        # ... and the front door closed the connection.
        for _ in range(100):
            if client._broken is not None:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(NbdError):
            await client.read(0, 4096)
    del other
    for export in ("keep", "local"):
        async with await NbdClient.connect(export, port=cluster.port) as fine:
            await fine.write(0, b"z" * 4096, fua=True)
            assert await fine.read(0, 4096) == b"z" * 4096


async def test_a_paused_owner_replaced_in_the_directory(cluster: Cluster) -> None:
    """SIGSTOP keeps the upstream connection open but silent: once the directory names another
    owner, the proxy gives the silent one up and carries on there."""
    assert cluster.server.forwarder is not None
    cluster.server.forwarder.stall_after = 0.5
    first = await cluster.owner("first", "vol")
    second = await cluster.owner("second")
    await asyncio.to_thread(create_volume, second, "vol")
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        await client.write(0, b"1" * 4096, fua=True)
        first.proc.send_signal(signal.SIGSTOP)
        try:
            writer = asyncio.ensure_future(client.write(4096, b"2" * 4096, fua=True))
            await asyncio.sleep(1.0)
            assert not writer.done()  # the paused owner holds it
            cluster.directory.owners["vol"] = remote_of(second, "second")
            await asyncio.wait_for(writer, 10)
            assert proxied_view(cluster).remote == cluster.directory.owners["vol"]
        finally:
            first.proc.send_signal(signal.SIGCONT)
    async with await NbdClient.connect(
        "vol", port=int(second.nbd_tcp.rsplit(":", 1)[1])
    ) as direct:
        assert await direct.read(4096, 4096) == b"2" * 4096


async def test_front_door_access_rules_apply_to_forwarded_exports(cluster: Cluster) -> None:
    rules = AccessRules.parse(
        '[[rule]]\nclient = "any"\nexports = ["open"]\naccess = "rw"\n'
        '[[rule]]\nclient = "any"\nexports = ["look"]\naccess = "ro"\n'
    )
    await cluster.owner("owner", "open", "look", "secret")
    guarded = NbdServer(cluster.pool, directory=cluster.directory, access=rules)
    await guarded.start(tcp=("127.0.0.1", 0))
    try:
        port = guarded.tcp_port
        listed = await NbdClient.list_exports(port=port)
        assert sorted(name for name, _ in listed) == ["look", "open"]
        with pytest.raises(NbdError, match="not allowed"):
            await NbdClient.connect("secret", port=port)
        with pytest.raises(NbdError, match="not allowed"):
            await NbdClient.query("secret", port=port)
        async with await NbdClient.connect("look", port=port) as ro:
            assert ro.read_only
            with pytest.raises(NbdError, match="EPERM"):
                await ro.write(0, b"w" * 4096)
        async with await NbdClient.connect("open", port=port) as rw:
            await rw.write(0, b"w" * 4096, fua=True)
    finally:
        await guarded.stop()


async def test_a_directory_naming_the_front_door_itself_fails_plainly(cluster: Cluster) -> None:
    cluster.directory.owners["loop"] = Remote("front", ("127.0.0.1", cluster.port), None)
    with pytest.raises(NbdError, match="Too many forwarded exports"):
        await NbdClient.connect("loop", port=cluster.port, timeout=30)
    await wait_for(lambda: cluster.server.connection_count == 0, timeout=10)


async def test_front_door_tls_applies_to_forwarded_exports(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    """TLS is the front door's business: a TLS client's certificate CN meets the front door's
    rules; the upstream hop to the owner is plain NBD on the cluster's network."""
    from test_tls import make_pki, nbds_uri, qemu_io_tls

    from owm.nbd.tls import TlsSettings, server_context

    pki = make_pki(tmp_path / "pki")
    await cluster.owner("owner", "vol")
    rules = AccessRules.parse('[[rule]]\nclient = "alice"\nexports = ["vol"]\naccess = "rw"\n')
    settings = TlsSettings("require", pki.server_cert, pki.server_key, pki.ca, verify_peer=True)
    tls = NbdServer(cluster.pool, directory=cluster.directory, access=rules,
                    tls_context=server_context(settings), tls_mode="require")
    await tls.start(tcp=("127.0.0.1", 0))
    try:
        address = f"127.0.0.1:{tls.tcp_port}"
        await run(*qemu_io_tls(address, "vol", pki.client_dir("alice"), "write -P 0x5a 0 64k",
                               "read -P 0x5a 0 64k"))
        bob = await run("nbdinfo", nbds_uri(address, "vol", pki.client_dir("bob")), check=False)
        assert bob.returncode != 0
        plain = await run("nbdinfo", f"nbd://{address}/vol", check=False)
        assert plain.returncode != 0
    finally:
        await tls.stop()
    await qemu_io(cluster.uri("vol"), "read -P 0x5a 0 64k", read_only=True)


async def test_the_front_door_becoming_the_owner_serves_the_session_here(cluster: Cluster) -> None:
    """The directory says None once this daemon serves the volume itself (it took it over):
    the session goes on on the local pool."""
    owner = await cluster.owner("owner", "vol")
    async with await NbdClient.connect("vol", port=cluster.port) as client:
        await client.write(0, b"o" * 4096, fua=True)
        await cluster.pool.create_volume("vol", SIZE)  # this daemon takes the volume over
        del cluster.directory.owners["vol"]
        owner.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(owner.proc.wait)
        await client.write(4096, b"h" * 4096, fua=True)
        assert proxied_view(cluster).remote is None
        assert await client.read(4096, 4096) == b"h" * 4096
    view = await cluster.pool.open_export("vol", "test")
    try:
        assert await view.read(4096, 4096) == b"h" * 4096
    finally:
        await view.close()
