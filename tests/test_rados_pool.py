"""A daemon on a pool whose data lives in RADOS, driven through its real interfaces.

Each test starts ``owm serve --ceph-conf ... --rados-pool ...`` as a subprocess on the session's
throw-away cluster (every pool gets its own RADOS namespace) and drives it with real clients:
qemu-io, nbdcopy and fio for all three methods; preserve, drain, backup and release; SIGKILL and
a restart that must keep every write acknowledged with FUA or covered by a flush; and the plain
sentences of a monitor that cannot be reached or a pool served without its RADOS options.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from backup_helpers import create, ok, ok_json, preserve, read_image, write
from conftest import Daemon, run_owm, start_daemon
from nbd_fixtures import have, nbd_uri

from owm.nbd.client import NbdClient
from owm.pool.pool import Pool
from owm.testbed.ceph import CephCluster, free_port

METHODS = ["cow", "log", "mirror"]
MiB = 1 << 20


def rados_args(ceph: CephCluster, *extra: str) -> list[str]:
    return ["--ceph-conf", str(ceph.conf_path), "--rados-pool", ceph.pool, *extra]


def rados_keys(ceph: CephCluster, namespace: str) -> list[str]:
    import rados

    cluster = rados.Rados(conffile=str(ceph.conf_path))
    cluster.connect(timeout=10)
    try:
        ioctx = cluster.open_ioctx(ceph.pool)
        ioctx.set_namespace(namespace)
        try:
            return sorted(o.key for o in ioctx.list_objects())
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


@pytest.fixture
def rados_daemon(short_tmp: Path, ceph: CephCluster) -> Iterator[Daemon]:
    d = start_daemon(short_tmp / "pool", *rados_args(ceph, "--stripe-size", "1M"))
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"owm serve exited with {code} on SIGTERM:\n{d.log_text()}"


def one_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def check(*argv: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


@pytest.mark.clients
@pytest.mark.skipif(not have("qemu-io", "nbdcopy", "fio"), reason="qemu-io, nbdcopy or fio missing")
def test_real_clients_on_every_method(rados_daemon: Daemon, ceph: CephCluster,
                                      short_tmp: Path) -> None:
    d = rados_daemon
    for method in METHODS:
        create(d, method, "16M", "--method", method)
        uri = nbd_uri(d.nbd_socket, method)
        # qemu-io: patterns across the 1M stripes and 64K chunks, read back and verified.
        out = check("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1000K 3M",
                    "-c", "write -P 0x5a 9M 4K", "-c", "read -P 0xa5 1000K 3M",
                    "-c", "read -P 0x5a 9M 4K", "-c", "read -P 0 0 1000K", uri)
        assert "Pattern verification failed" not in out
        # nbdcopy in and out, several connections.
        source = short_tmp / f"{method}.in"
        source.write_bytes(random.Random(method).randbytes(16 * MiB))
        check("nbdcopy", "--connections=4", str(source), uri)
        back = short_tmp / f"{method}.out"
        check("nbdcopy", uri, str(back))
        assert back.read_bytes() == source.read_bytes()
        # One fio verify job through its nbd engine.
        result = check("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}",
                       "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M",
                       "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
                       "--do_verify=1", "--runtime=60", "--output-format=json")
        job = json.loads(result[result.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 8 * MiB and job["read"]["io_bytes"] == 8 * MiB
    # The data is in RADOS, not in the pool directory.
    where = ok_json(d.owm("status", "--json"))[0]["storage"]
    assert where["kind"] == "rados" and where["rados_pool"] == ceph.pool
    keys = rados_keys(ceph, where["namespace"])
    for method in METHODS:
        assert any(k.startswith(f"{method}/") for k in keys)
    assert not any((d.pool / "volumes").rglob("*.data"))


def test_preserve_drain_backup_release(rados_daemon: Daemon, ceph: CephCluster,
                                       short_tmp: Path, hold_session: object) -> None:
    d = rados_daemon
    create(d, "vol", "8M")
    before = random.Random("before").randbytes(8 * MiB)
    write(d, [(0, before)])
    holder = hold_session(d, "vol")  # type: ignore[operator]
    image = preserve(d)
    assert image == "vol@0"
    write(d, [(MiB, b"\x77" * MiB)])  # a new session: the live volume only
    status = ok_json(d.owm("status", "vol", "--json"))[0]
    assert status["images"][0]["state"] == "draining"
    holder.disconnect()  # its write of 4 KiB of "h" at 0 landed on the image and live
    ok(d.owm("wait", image, "--timeout", "30"))
    entry = ok_json(d.owm("status", "vol", "--json"))[0]["images"][0]
    assert (entry["state"], entry["consistency"]) == ("drained", "transaction-consistent")
    want_image = b"h" * 4096 + before[4096:]
    assert read_image(d, image) == want_image
    assert read_image(d, "vol") == b"h" * 4096 + before[4096:MiB] + b"\x77" * MiB + before[
        2 * MiB:]
    target = short_tmp / "b.raw"
    ok(d.owm("backup", image, "--to", target, "--verify", "--release"))
    assert target.read_bytes() == want_image
    assert ok_json(d.owm("status", "vol", "--json"))[0]["images"] == []
    # The image's own objects are gone from RADOS; the live volume's remain.
    namespace = ok_json(d.owm("status", "--json"))[0]["storage"]["namespace"]
    keys = rados_keys(ceph, namespace)
    assert keys and all(not k.startswith("vol/img-0") for k in keys), keys
    text = ok(d.owm("status"))
    assert f"RADOS pool '{ceph.pool}'" in text


async def _fua_and_flushed(d: Daemon) -> None:
    """Writes acknowledged with FUA and covered by a flush, then the session stays open."""
    fua = await NbdClient.connect(export="vol", unix_path=str(d.nbd_socket))
    await fua.write(0, b"F" * 65536, fua=True)
    flushed = await NbdClient.connect(export="vol", unix_path=str(d.nbd_socket))
    await flushed.write(3 * MiB + 123, b"L" * 100_000)
    await flushed.flush()


def test_kill_and_restart_keeps_every_fua_and_flushed_write(ceph: CephCluster,
                                                            short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    first = start_daemon(pool, *rados_args(ceph))
    try:
        create(first, "vol", "8M", "--method", "cow")
        write(first, [(MiB, b"B" * MiB)])
        held = asyncio.new_event_loop()
        try:
            held.run_until_complete(_fua_and_flushed(first))
            # A preserve while both sessions are open: the image is draining when we die.
            image = preserve(first)
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        finally:
            held.close()
    finally:
        first.stop(signal.SIGKILL)
    second = start_daemon(pool, *rados_args(ceph))
    try:
        live = read_image(second, "vol")
        assert live[:65536] == b"F" * 65536
        assert live[MiB:2 * MiB] == b"B" * MiB
        assert live[3 * MiB + 123:3 * MiB + 123 + 100_000] == b"L" * 100_000
        assert read_image(second, image) == live
        entry = ok_json(second.owm("status", "vol", "--json"))[0]["images"][0]
        # Its sessions were cut off by the crash: never transaction-consistent.
        assert (entry["state"], entry["unclean_sessions"], entry["consistency"]) == (
            "drained-unclean", 2, "crash-consistent")
    finally:
        assert second.stop() == 0


def test_a_pool_on_rados_is_refused_without_its_options(ceph: CephCluster,
                                                         short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    d = start_daemon(pool, *rados_args(ceph))
    try:
        create(d, "vol", "4M")
        write(d, [(0, b"kept")])
    finally:
        assert d.stop() == 0
    for extra in ([], ["--ceph-conf", str(ceph.conf_path), "--rados-pool", "elsewhere"],
                  [*rados_args(ceph), "--stripe-size", "8M"]):
        result = run_owm("--pool", pool, "serve", "--listen", "127.0.0.1:0", *extra, timeout=60)
        line = one_line(result)
        assert ceph.pool in line or "stripe" in line, line
    # Nothing was changed by the refusals: served properly, the volume is all there.
    again = start_daemon(pool, *rados_args(ceph))
    try:
        assert read_image(again, "vol")[:4] == b"kept"
    finally:
        assert again.stop() == 0
    # And a local pool with volumes is not served from RADOS.
    local = short_tmp / "local"

    async def make_local() -> None:
        p = await Pool.open(local)
        await p.create_volume("vol", MiB)
        await p.close()

    asyncio.run(make_local())
    line = one_line(run_owm("--pool", local, "serve", "--listen", "127.0.0.1:0",
                            *rados_args(ceph), timeout=60))
    assert "local files" in line


def test_an_unreachable_monitor_is_one_sentence_naming_it(short_tmp: Path) -> None:
    port = free_port()  # nothing listens there
    conf = short_tmp / "ceph.conf"
    conf.write_text(f"[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n")
    result = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "127.0.0.1:0",
                     "--ceph-conf", conf, "--rados-pool", "owm", timeout=30)
    line = one_line(result)
    assert f"127.0.0.1:{port}" in line and "monitor" in line, line
    missing = one_line(run_owm("--pool", short_tmp / "pool", "serve", "--ceph-conf",
                               short_tmp / "nope.conf", "--rados-pool", "owm", timeout=30))
    assert "nope.conf" in missing
    usage = run_owm("--pool", short_tmp / "pool", "serve", "--rados-pool", "owm", timeout=30)
    assert usage.returncode == 2 and "--ceph-conf" in usage.stderr
