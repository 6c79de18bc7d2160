"""A throw-away single-node Ceph cluster on loopback: one monitor, one memstore OSD, no auth.

``start()`` builds it in a temporary directory (or one given), on 127.0.0.1 with a free port,
creates one replicated pool of size 1 and returns once that pool has taken a write; ``stop()``
kills both daemons and removes the directory. No manager daemon is started (nothing here needs
one). ``paxos propose interval`` is lowered so that the monitor commits maps at once instead of
batching them for a second. Every wait is bounded and names what did not come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owm.common.errors import OwmError

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool")
START_TIMEOUT = 30.0


class CephUnavailable(OwmError):
    """The Ceph packages (or the Python rados binding) are not installed."""


class CephStartFailed(OwmError):
    """A daemon of the throw-away cluster did not come up in time."""


def missing() -> str | None:
    """Why a throw-away cluster cannot run here (one sentence), or None when it can."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return (f"Ceph is not installed ({', '.join(absent)} not found; scripts/setup installs "
                "ceph-mon and ceph-osd)")
    try:
        import rados  # noqa: F401
    except ImportError:
        return "the Python rados binding is not importable (scripts/setup links python3-rados)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf_text(fsid: str, port: int, root: Path, memstore_bytes: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
log to file = true
crash dir = {root}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon max pg per osd = 1000
paxos propose interval = 0.01
paxos min wait = 0.01
mon osd reporter subtree level = osd
[mon]
mon data = {root}/mon/$cluster-$id
[osd]
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd op num shards = 1
osd op num threads per shard = 2
osd heartbeat grace = 20
osd max object name len = 1024
osd max object namespace len = 256
"""


@dataclass
class CephCluster:
    """A running throw-away cluster; ``conf_path`` is what clients are given."""

    root: Path
    conf_path: Path
    pool: str
    mon_address: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    remove_root: bool = True

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.root / "log" / f"{name}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """Kill both daemons (no clean shutdown is needed: the data is thrown away)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(args: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CephStartFailed(f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise CephStartFailed(f"{what} failed: {detail[-1] if detail else done.returncode}")


def _command(cluster: Any, cmd: dict[str, Any], what: str, timeout: float) -> str:
    import json

    ret, out, err = cluster.mon_command(json.dumps(cmd), b"", timeout=max(1, int(timeout)))
    if ret != 0:
        raise CephStartFailed(f"{what} failed: {err or os.strerror(-ret)}")
    return bytes(out).decode(errors="replace").strip()


def start(
    pool: str = "owm",
    *,
    root: Path | None = None,
    pg_num: int = 8,
    memstore_bytes: int = 2 << 30,
    timeout: float = START_TIMEOUT,
) -> CephCluster:
    """Start a monitor and an OSD on loopback and create ``pool``; bounded by ``timeout``."""
    why = missing()
    if why:
        raise CephUnavailable(why)
    import rados

    deadline = time.monotonic() + timeout
    own_root = root is None
    base = Path(tempfile.mkdtemp(prefix="owm-ceph-")) if root is None else root
    for sub in ("run", "log", "crash", "mon/ceph-a", "osd/ceph-0"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    conf = base / "ceph.conf"
    conf.write_text(_conf_text(fsid, port, base, memstore_bytes))
    cluster = CephCluster(base, conf, pool, f"127.0.0.1:{port}", remove_root=own_root)
    env = {**os.environ, "CEPH_CONF": str(conf)}

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    def spawn(name: str, args: list[str]) -> None:
        cluster.procs[name] = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True)

    try:
        monmap = str(base / "monmap")
        _run(["monmaptool", "--create", "--clobber", "--fsid", fsid, "--addv", "a",
              f"[v2:127.0.0.1:{port}]", monmap], "monmaptool", left())
        _run(["ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap", monmap],
             "ceph-mon --mkfs", left())
        spawn("mon.a", ["ceph-mon", "-c", str(conf), "-f", "-i", "a"])
        # The OSD's store can be made while the monitor starts: mkfs needs no monitor here.
        mkfs_osd = subprocess.Popen(
            ["ceph-osd", "-c", str(conf), "--no-mon-config", "--mkfs", "-i", "0",
             "--osd-uuid", osd_uuid,
             "--monmap", monmap],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        client = rados.Rados(conffile=str(conf), conf={
            "rados_mon_op_timeout": "5", "rados_osd_op_timeout": "5",
            # A write sent while the OSD is still down is resent at the next tick: tick often.
            "objecter_tick_interval": "0.05"})
        try:
            _connect(client, cluster, deadline)
            try:
                out, _ = mkfs_osd.communicate(timeout=left())
            except subprocess.TimeoutExpired:
                mkfs_osd.kill()
                raise CephStartFailed("ceph-osd --mkfs did not finish in time") from None
            if mkfs_osd.returncode != 0:
                lines = out.decode(errors="replace").strip().splitlines()
                raise CephStartFailed(f"ceph-osd --mkfs failed: {lines[-1] if lines else '?'}")
            _command(client, {"prefix": "osd new", "uuid": osd_uuid, "id": 0}, "osd new", left())
            spawn("osd.0", ["ceph-osd", "-c", str(conf), "-f", "-i", "0"])
            _command(client, {"prefix": "osd pool create", "pool": pool, "pg_num": pg_num,
                              "pgp_num": pg_num, "pool_type": "replicated"},
                     f"creating pool {pool}", left())
            _command(client, {"prefix": "osd pool application enable", "pool": pool,
                              "app": "rbd", "yes_i_really_mean_it": True},
                     f"tagging pool {pool}", left())
            _wait_writable(client, cluster, deadline)
        finally:
            client.shutdown()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _check_alive(cluster: CephCluster) -> None:
    for name, proc in cluster.procs.items():
        if proc.poll() is not None:
            raise CephStartFailed(f"{name} exited with status {proc.returncode} while starting: "
                                  f"{cluster.log_tail(name) or 'no log'}")


def _connect(client: Any, cluster: CephCluster, deadline: float) -> None:
    import rados

    while True:
        _check_alive(cluster)
        try:
            client.connect(timeout=1)
            return
        except (rados.Error, OSError) as exc:
            if time.monotonic() > deadline:
                raise CephStartFailed(f"the monitor on {cluster.mon_address} did not answer in "
                                      f"time ({exc}): {cluster.log_tail('mon.a')}") from None
            time.sleep(0.05)


def _collect(into: list[int]) -> Any:
    return lambda completion: into.append(completion.get_return_value())


def _wait_writable(client: Any, cluster: CephCluster, deadline: float) -> None:
    """Until a write to the pool is acknowledged: the OSD is up and its PGs are active."""
    import rados

    ioctx = client.open_ioctx(cluster.pool)
    try:
        while True:
            _check_alive(cluster)
            # The write waits (up to the op timeout) until the PG is active; poll it so that a
            # daemon dying meanwhile is seen at once.
            done: list[int] = []
            ioctx.aio_write_full("owm-testbed-probe", b"ok", oncomplete=_collect(done))
            while not done:
                _check_alive(cluster)
                if time.monotonic() > deadline:
                    raise CephStartFailed(
                        f"pool {cluster.pool} did not accept a write in time (the OSD did not "
                        f"come up): {cluster.log_tail('osd.0')}")
                time.sleep(0.01)
            if done[0] >= 0:
                with contextlib.suppress(rados.Error):
                    ioctx.remove_object("owm-testbed-probe")
                return
    finally:
        ioctx.close()
