"""``owm serve``: one asyncio process holding the pool, its NBD server and its control API.

Start-up first locks the pool (an exclusive ``flock`` on POOL/lock, held for the daemon's life and
released by the kernel when the process dies, however it dies), so that a second daemon is refused
before it reads, writes, recovers or unlinks anything in the pool. Then it opens the pool
(recovering it after a crash), then listens for NBD on TCP and on
POOL/nbd.sock (mode 0600, or 0660 for ``--socket-group``) and for control requests on
POOL/control.sock. TLS settings and access rules are read before the pool is even locked, so a
wrong certificate path or a bad rules file stops the daemon at once with one sentence. SIGTERM
or SIGINT stops it the careful way: refuse new work, let requests in flight finish, sync, close
the pool so that the next start on the same directory finds every volume and image as it was.

Cluster mode (``--daemon-id ID``, with ``--etcd`` and the RADOS options): this daemon is one of
several sharing the pool; POOL/ holds only its own sockets and lock.  It opens no volume at
start: once listening it joins the cluster (``P daemons/ID`` on a lease of ``--lease-ttl``
seconds) and serves the volumes it owns (``owm.cluster.member``).  When it finds it has lost its
lease or a volume, or RADOS refuses it (blocklisted), it logs one sentence and exits at once
(code 75), acknowledging nothing more; a restart (systemd) joins anew with a new RADOS client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import owm
from owm.common.cluster import Directory, Remote
from owm.common.errors import InvalidRequest, OwmError, WrongState
from owm.control.context import ControlContext
from owm.control.server import ControlServer, check_unix_path, read_token_file, socket_in_use
from owm.locks.app import LockService
from owm.nbd.access import AccessRules
from owm.nbd.tls import TlsSettings, server_context

if TYPE_CHECKING:
    from owm.catalog.etcd import EtcdCatalog
    from owm.control.repo_routes import BackupRepos
    from owm.nbd.server import NbdServer

log = logging.getLogger("owm.daemon.serve")

DEFAULT_NBD_LISTEN = ("127.0.0.1", 10809)

# Record attributes other modules pass with ``extra=`` that the log line should show.
CONTEXT_FIELDS = ("volume", "image", "session", "peer", "export")


class OneLineFormatter(logging.Formatter):
    """``LEVEL TIME logger: message key=value ...``, one record per line, UTC timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{record.levelname:<7} {stamp}.{int(record.msecs):03d}Z {record.name}: "
        line += record.getMessage()
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line += f" {key}={value}"
        if record.exc_info:
            # Keep the one-line promise even for tracebacks: fold them onto the record's line.
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@dataclass
class DaemonConfig:
    """Everything ``owm serve`` was told on its command line."""

    pool: Path
    nbd_listen: tuple[str, int] | None = DEFAULT_NBD_LISTEN
    nbd_socket: Path | None = None  # default POOL/nbd.sock
    control_listen: tuple[str, int] | None = None
    control_token_file: Path | None = None
    grace: float = 30.0  # seconds in-flight NBD requests get at shutdown
    etcd: str | None = None  # URL[,URL...]: the catalog lives in etcd instead of POOL/
    etcd_prefix: str | None = None  # default /owm/<pool directory name>/
    # STARTTLS on the NBD TCP listener: off, on (offered) or require.
    tls: TlsSettings = field(default_factory=TlsSettings)
    access_file: Path | None = None  # per-export access rules (owm.nbd.access)
    socket_group: str | None = None  # the NBD Unix socket becomes 0660 for this group
    metrics_listen: tuple[str, int] | None = None  # read-only /metrics on TCP, no token
    ready_file: Path | None = None  # created once serving, removed when stopping
    ceph_conf: Path | None = None  # with rados_pool: the pool's data lives in RADOS
    rados_pool: str | None = None
    stripe_size: int | None = None  # RADOS stripe size of a new pool (default 4 MiB)
    # The repositories of --backup-repo, opened by the CLI (the daemon cannot read them).
    backup_repos: BackupRepos | None = None
    daemon_id: str | None = None  # cluster mode: this daemon's id among the pool's daemons
    lease_ttl: int = 5  # cluster mode: seconds of the member lease
    workers: int = 1  # above 1: owm.daemon.workers serves the pool (its ``run``)

    @property
    def control_socket(self) -> Path:
        return self.pool / "control.sock"

    @property
    def nbd_socket_path(self) -> Path:
        return self.nbd_socket if self.nbd_socket is not None else self.pool / "nbd.sock"


LOCK_FILE = "lock"


def lock_pool(pool_dir: Path) -> int:
    """Take the pool's exclusive lock and write our pid into it; return the open descriptor.

    The lock is on an open file description, so it lasts as long as the descriptor stays open
    (the daemon's life) and vanishes with the process. A second daemon is refused with one
    sentence naming the pool and, when it can be read, the holder's pid; it changes nothing.
    """
    path = pool_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise WrongState(f"cannot lock pool {pool_dir}: {exc.strerror} ({path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise WrongState(f"cannot lock pool {pool_dir}: {exc.strerror}") from None
        who = f"pid {holder}" if holder else "another process"
        raise WrongState(
            f"pool {pool_dir} is already served by another daemon ({who}); "
            "this one did not start and changed nothing"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isascii() and text.isdigit() else None
    return None


def unlock_pool(fd: int) -> None:
    """Drop the pool lock (at the very end of a clean stop). The pid is cleared first."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def etcd_catalog_factory(
    config: DaemonConfig, pool_dir: Path
) -> Callable[[], EtcdCatalog] | None:
    """With ``--etcd``: a factory opening the catalog in etcd and claiming the pool there (the
    owner key on a lease), else None (the local SQLite catalog)."""
    if config.etcd is None:
        return None
    from owm.catalog.etcd import EtcdCatalog, normalise_prefix, parse_endpoints

    endpoints = config.etcd
    parse_endpoints(endpoints)  # a bad URL is refused before anything is touched
    prefix = normalise_prefix(config.etcd_prefix or f"/owm/{pool_dir.name}/")
    st = os.stat(pool_dir)
    me = {"host": socket.gethostname(), "boot": _boot_id(), "pool": str(pool_dir),
          "dir": f"{st.st_dev}:{st.st_ino}", "pid": os.getpid()}

    def dead(holder: dict[str, Any]) -> bool:
        # We hold the flock of this very directory on this very kernel, so a holder recorded
        # from it is a daemon that died without releasing its lease: safe to take over.
        return all(holder.get(k) == me[k] for k in ("host", "boot", "dir")) and bool(me["boot"])

    def open_catalog() -> EtcdCatalog:
        catalog = EtcdCatalog(endpoints, prefix)
        if config.daemon_id is not None:
            return catalog  # a cluster has no pool owner: the member joins once listening
        try:
            catalog.claim(me, may_take_over=dead)
        except BaseException:
            catalog.abandon()
            raise
        return catalog

    return open_catalog


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _endpoint(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _group_id(name: str) -> int:
    """The gid of group NAME (or a number); InvalidRequest in one sentence if there is none."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidRequest(f"There is no group named {name!r} for --socket-group.") from None


@dataclass
class DataPlane:
    """What secures the NBD listeners, built from the config before anything starts."""

    tls_context: ssl.SSLContext | None
    access: AccessRules | None
    socket_mode: int
    socket_gid: int | None

    @classmethod
    def from_config(cls, config: DaemonConfig) -> DataPlane:
        context = server_context(config.tls)
        access = AccessRules.load(config.access_file) if config.access_file else None
        gid = _group_id(config.socket_group) if config.socket_group else None
        return cls(context, access, 0o660 if gid is not None else 0o600, gid)

    def nbd_server(self, pool: Any, config: DaemonConfig) -> NbdServer:
        from owm.nbd.server import NbdServer

        return NbdServer(pool, tls_context=self.tls_context, tls_mode=config.tls.mode,
                         access=self.access)
async def connect_restore_source(
    socket_path: str, export: str, size: int
) -> tuple[Callable[[int, int], Awaitable[bytes]], Callable[[], None]]:
    """An NBD client of a live restore's source (see owm.pool.clone): its read and its drop."""
    from owm.nbd.client import NbdClient

    try:
        client = await NbdClient.connect(export=export, unix_path=socket_path)
    except (OSError, OwmError) as exc:
        raise InvalidRequest(f"the restore source at {socket_path} cannot be reached "
                             f"({exc})") from None
    if client.size < size:
        client.abort()
        raise InvalidRequest(f"the restore source at {socket_path} is smaller than the volume")
    return client.read, client.abort


@contextlib.contextmanager
def locked_pool(config: DaemonConfig) -> Iterator[tuple[Path, str | None, DataPlane, int]]:
    """What every daemon checks before it touches its pool, then the pool's lock, held until
    the end: yields (pool directory, control token, data plane, lock fd)."""
    pool_dir = config.pool.absolute()
    check_unix_path(config.control_socket.absolute())
    check_unix_path(config.nbd_socket_path.absolute())
    token = read_token_file(config.control_token_file) if config.control_token_file else None
    if config.control_listen is not None and token is None:
        raise InvalidRequest("a TCP control listener needs a bearer token file")
    plane = DataPlane.from_config(config)
    if config.ready_file is not None and not config.ready_file.absolute().parent.is_dir():
        raise WrongState(f"the directory of the ready file {config.ready_file} does not exist")
    if not pool_dir.exists():
        pool_dir.mkdir(mode=0o700, parents=True)
    # Nothing in the pool is read, written, recovered or unlinked before this lock is ours.
    lock_fd = lock_pool(pool_dir)
    try:
        yield pool_dir, token, plane, lock_fd
    finally:
        unlock_pool(lock_fd)


async def serve(config: DaemonConfig, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly."""
    with locked_pool(config) as (pool_dir, token, plane, _lock_fd):
        await _serve_locked(config, pool_dir, token, stop, plane)


async def _serve_locked(
    config: DaemonConfig,
    pool_dir: Path,
    token: str | None,
    stop: asyncio.Event | None,
    plane: DataPlane,
) -> None:
    # Imported here so that the control client and the CLI do not pull in the storage stack.
    from owm.control.app import create_app
    from owm.control.metrics import MetricsListener, MetricsSources, build_registry
    from owm.daemon.notify import Notifier, remove_ready_file, write_ready_file

    if socket_in_use(config.control_socket):
        raise WrongState(f"a daemon is already serving pool {pool_dir}")

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("already stopping; %s ignored", signal.Signals(signum).name)
            return
        log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)

    notifier = Notifier()
    watchdog: asyncio.Task[None] | None = None
    if config.ready_file is not None:
        remove_ready_file(config.ready_file)  # a stale one from a crash must not say ready
    started = time.monotonic()
    ready = False
    backends: list[Any] = []
    pool = await _open_pool(config, pool_dir, backends)
    member: Any = None
    nbd: Any = None
    ctx = ControlContext(pool=pool, app_locks=LockService.for_pool(pool_dir),
                         connect_source=connect_restore_source,
                         backup_repos=config.backup_repos)
    control = ControlServer(ctx)
    metrics = MetricsListener(ctx)
    ctx.daemon["ready"] = False
    late: LateDirectory | None = None
    try:
        nbd = plane.nbd_server(pool, config)
        if config.daemon_id is not None:
            # Clients that connect before the daemon has joined its cluster wait for it
            # instead of being told that a volume owned elsewhere does not exist.
            late = LateDirectory()
            nbd.use_directory(late)
        ctx.metrics = build_registry(MetricsSources(
            status=pool.status,
            volumes=lambda: [v.metrics() for _, v in sorted(pool.volumes.items())],
            server=lambda: {"connections": nbd.connection_count,
                            "accepted": nbd.accepted_connections,
                            "refused": nbd.refused_connections,
                            "inflight": nbd.inflight_requests,
                            "buffered_bytes": nbd.buffered_bytes},
        ), ctx.daemon)
        try:
            await nbd.start(tcp=config.nbd_listen, unix_path=str(config.nbd_socket_path),
                            unix_mode=plane.socket_mode, unix_gid=plane.socket_gid)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            where = " and ".join(filter(None, (_endpoint(config.nbd_listen),
                                               str(config.nbd_socket_path))))
            raise WrongState(f"cannot serve NBD on {where}: {reason}") from None
        nbd_tcp = (config.nbd_listen[0], nbd.tcp_port) if config.nbd_listen else None
        ctx.daemon.update({
            "pool": str(pool_dir), "pid": os.getpid(), "version": owm.__version__,
            "nbd": {"tcp": _endpoint(nbd_tcp), "unix": str(config.nbd_socket_path.absolute()),
                    "tls": config.tls.mode,
                    "access_rules": str(config.access_file) if config.access_file else None},
            "control": {"unix": str(config.control_socket.absolute()), "tcp": None},
            "catalog": pool.catalog_info,
            "metrics": None,
            "storage": pool.storage_where,
        })
        if config.metrics_listen is not None:
            await metrics.start(*config.metrics_listen, app_factory=create_app, token=token)
            ctx.daemon["metrics"] = _endpoint(metrics.address)
        await control.start(config.control_socket, tcp=config.control_listen, token=token)
        ctx.daemon["control"]["tcp"] = _endpoint(control.tcp_address)
        if config.daemon_id is not None:
            pool.before_close = nbd.drop_volume
            member, directory = await _join_cluster(config, pool, backends, {
                "host": socket.gethostname(), "pid": os.getpid(), "pool": str(pool_dir),
                "nbd": _endpoint(nbd_tcp), "control": _endpoint(control.tcp_address)})
            # The front door: what another daemon owns is forwarded to it (NBD and control).
            assert late is not None
            late.set(directory)
            ctx.directory, ctx.cluster_token = directory, token
            ctx.daemon["cluster"] = {"daemon_id": config.daemon_id,
                                     "lease_ttl": config.lease_ttl}
        volumes = pool.status()
        log.info(
            "serving pool %s with %d volume(s): NBD on %s (TLS %s%s) and %s (mode %04o), "
            "control on %s%s%s (ready in %.0f ms)",
            pool_dir, len(volumes), _endpoint(nbd_tcp) or "no TCP", config.tls.mode,
            ", access rules " + str(config.access_file) if config.access_file else "",
            config.nbd_socket_path, plane.socket_mode, config.control_socket,
            f" and {_endpoint(control.tcp_address)} (token required)" if control.tcp_address
            else "",
            f", metrics on {_endpoint(metrics.address)}" if metrics.address else "",
            (time.monotonic() - started) * 1000,
        )
        ready = True
        # No await since the control socket started: no client saw the daemon before this.
        ctx.daemon["ready"] = True
        if config.ready_file is not None:
            write_ready_file(config.ready_file)
        notifier.ready(f"serving {len(volumes)} volume(s) of {pool_dir}")
        watchdog = loop.create_task(notifier.watchdog())
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        ctx.daemon["ready"] = False
        if config.ready_file is not None:
            remove_ready_file(config.ready_file)
        if ready:
            notifier.stopping()
            log.info("stopping: finishing requests in flight")
        ctx.closing.set()
        if member is not None:
            await member.stop()  # no more claims while stopping
        try:
            if nbd is not None:
                await nbd.stop(config.grace)
        finally:
            try:
                await metrics.stop()
                await control.stop()
            finally:
                try:
                    if member is not None:
                        await member.shutdown()  # each volume closed and handed back cleanly
                    await pool.close()
                finally:
                    for backend in backends:
                        await backend.close()
            if watchdog is not None:
                watchdog.cancel()
        if ready:
            # Whether the pool closed cleanly is logged by the pool itself, once and truly.
            log.info("stopped")


def cluster_status(endpoints: list[str], prefix: str) -> dict[str, Any]:
    """``owm cluster status``: daemons, their addresses and leases, owned volumes (from etcd)."""
    from owm.cluster import admin

    return admin.status(endpoints, prefix)


def cluster_move(endpoints: list[str], prefix: str, name: str, to: str,
                 force: bool) -> dict[str, Any]:
    """``owm volume move``: ask the owner to hand ``name`` to daemon ``to``, and wait."""
    from owm.cluster import admin

    return admin.move(endpoints, prefix, name, to, force)


JOIN_WAIT = 60.0  # seconds an NBD client that came early waits for the daemon to join


class LateDirectory:
    """The cluster's directory (``owm.common.cluster.Directory``) before the daemon has joined
    its cluster: the NBD listener is already up (its address is part of the membership record),
    and a client that connects in between, qemu reconnecting after a restart say, waits for the
    real directory instead of being refused."""

    def __init__(self) -> None:
        self._real: asyncio.Future[Directory] = asyncio.get_running_loop().create_future()

    def set(self, directory: Directory) -> None:
        self._real.set_result(directory)

    async def _directory(self) -> Directory:
        return await asyncio.wait_for(asyncio.shield(self._real), JOIN_WAIT)

    async def locate(self, volume: str) -> Remote | None:
        return await (await self._directory()).locate(volume)

    async def exports(self) -> list[str]:
        return await (await self._directory()).exports()


EXIT_LOST = 75  # cluster mode: the daemon lost its lease or volumes and stopped at once


def _exit_lost(daemon_id: str, sentence: str) -> None:
    """Stop at once: nothing more may be acknowledged (another daemon may own the volumes)."""
    log.critical("daemon %s stops at once: %s", daemon_id, sentence)
    logging.shutdown()
    os._exit(EXIT_LOST)


async def _join_cluster(config: DaemonConfig, pool: Any, backends: list[Any],
                        record: dict[str, Any]) -> tuple[Any, Any]:
    """Cluster mode: join, take what has no owner, and keep watching (the member and the
    Directory of the front door)."""
    from owm.cluster.directory import EtcdDirectory
    from owm.cluster.fence import RadosFencer
    from owm.cluster.member import Member, MemberConfig

    daemon_id = str(config.daemon_id)
    backend = backends[0] if backends else None
    fencer = RadosFencer(backend.cluster_handle) if backend is not None else None
    address = backend.client_address if backend is not None else None
    member = Member(pool, MemberConfig(daemon_id, ttl=config.lease_ttl), fencer=fencer,
                    rados_address=address,
                    on_lost=lambda sentence: _exit_lost(daemon_id, sentence))
    if backend is not None:
        backend.on_fenced = member.lose
        pool.before_open = backend.reload
    await member.join(record)
    await member.step()
    member.start()
    return member, EtcdDirectory(member)


async def _open_pool(config: DaemonConfig, pool_dir: Path, backends: list[Any]) -> Any:
    """Open the pool, on RADOS when the config says so (``backends`` gets what to close)."""
    from owm.pool.pool import Pool, StorageRecordRaced

    catalog_factory = etcd_catalog_factory(config, pool_dir)
    cluster = config.daemon_id is not None
    if config.ceph_conf is None or config.rados_pool is None:
        return await Pool.open(pool_dir, catalog_factory=catalog_factory, cluster=cluster)
    from owm.storage.rados import open_for_pool

    conf, rados_pool, stripe = config.ceph_conf.absolute(), config.rados_pool, config.stripe_size

    async def opener(recorded: dict[str, Any] | None, has_volumes: bool) -> tuple[Any, Any]:
        backend = await open_for_pool(conf, rados_pool, stripe, recorded, has_volumes)
        backends.append(backend)
        return backend.storage, backend.describe()

    for attempt in range(3):
        try:
            return await Pool.open(pool_dir, catalog_factory=catalog_factory,
                                   storage_opener=opener, cluster=cluster)
        except StorageRecordRaced:
            # Daemons of a cluster started together on a new pool: open again from the
            # record the other one made (the same RADOS namespace for all).
            for backend in backends:
                await backend.close()
            backends.clear()
            if attempt == 2:
                raise
            log.info("another daemon recorded where pool %s keeps its data at the same "
                     "instant; opening it again from that record", pool_dir)
        except BaseException:
            for backend in backends:
                await backend.close()
            backends.clear()
            raise
    raise AssertionError("unreachable")


def run(config: DaemonConfig, log_level: str = "INFO") -> None:
    """Blocking entry point for ``owm serve``: uvloop when available, then ``serve``."""
    setup_logging(log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
