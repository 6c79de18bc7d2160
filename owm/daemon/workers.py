"""``owm serve --workers N``: the volumes of one local pool served by N worker processes.

One asyncio process uses one core; this spreads a pool's volumes over N processes.

The **parent** locks the pool (``owm.daemon.serve.lock_pool``, before anything is read), checks
and prepares the catalog (``SqliteCatalog(shared=True)``: WAL with normal locking, shared by
every process), records which worker serves each volume (meta key ``workers``: a volume stays on
its worker across restarts; a new one goes to the worker with the fewest volumes), marks the pool
not clean, and starts the workers (``python -m owm.daemon.workers CONFIG``).  Each worker is a
daemon of its own on the same pool directory: ``Pool.open(cluster=True)`` opens no volume by
itself, the worker opens only its own (``Pool.open_volume``), serves them over NBD connections the
parent hands it (``owm.daemon.handoff``) and answers the control API on a private socket
(``POOL/worker-I.sock``, 0600).  Every worker holds the pool's lock descriptor too, so the pool
stays locked until the last process serving it has gone.

The parent listens for NBD (TCP and POOL/nbd.sock) and runs each handshake until the client names
an export, then passes the connection to that export's worker; it answers ``NBD_OPT_LIST`` with
every worker's exports.  It serves the control API on POOL/control.sock: a route about one volume
or image goes to its worker unchanged; ``GET /v1/volumes`` and ``GET /v1/groups`` gather from
all; ``POST /v1/volumes`` goes to the least-loaded worker; a group is created on the worker that
serves most of its members, the others moved there first if they are idle (no session, reader,
draining image or restore: the old worker closes the volume, the new one opens it, through each
worker's admin socket ``POOL/worker-I.admin.sock``), else refused with one sentence; the
application locks and everything else that belongs to no volume are served by worker 0.

A worker that dies (kill -9, a crash) is restarted by the parent (up to ``MAX_RESTARTS`` times in
``RESTART_WINDOW`` seconds, with a growing pause, one log line each); the restarted worker opens
its volumes as after a crash: the sessions it lost end unclean and their images say so.  A worker
notices the parent's death (``PR_SET_PDEATHSIG`` and the handoff channel's end) and stops the
careful way; the next ``owm serve`` then recovers the pool (the parent never marked it clean).
On a clean stop the parent stops every worker with SIGTERM and marks the pool clean only if every
one of them closed its volumes cleanly.

Not served with ``--workers`` above 1: STARTTLS (a TLS session cannot move to another process),
the metrics listener, ``--backup-repo``, etcd and RADOS pools, cluster mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import owm
from owm.catalog import Catalog
from owm.catalog.sqlite import SqliteCatalog
from owm.common.errors import InvalidRequest, OwmError, WrongState
from owm.common.names import check_volume_name
from owm.common.view import ExportInfo
from owm.control.server import (
    bind_private_unix_socket,
    check_unix_path,
    socket_in_use,
)
from owm.daemon.handoff import FrontDoor, channel_pair, receive_connection, send_connection
from owm.daemon.serve import (
    DaemonConfig,
    DataPlane,
    _endpoint,
    connect_restore_source,
    locked_pool,
    setup_logging,
)
from owm.nbd.access import AccessRules

log = logging.getLogger("owm.daemon.workers")

ASSIGNMENT_KEY = "workers"  # catalog meta: {"volumes": {name: worker index}}
MAX_RESTARTS = 5  # restarts of one worker within RESTART_WINDOW before the daemon gives up
RESTART_WINDOW = 60.0
FIRST_BACKOFF = 0.2  # seconds before the first restart; doubled each time, up to MAX_BACKOFF
MAX_BACKOFF = 5.0
WORKER_START_TIMEOUT = 60.0
HANDOFF_WAIT = 10.0  # seconds a client waits for its worker to come back
EXIT_UNCLEAN = 3  # a worker's exit code when it could not close every volume cleanly
JSON = dict[str, Any]


def worker_socket(pool_dir: Path, index: int) -> Path:
    return pool_dir / f"worker-{index}.sock"


def admin_socket(pool_dir: Path, index: int) -> Path:
    """The worker's own small API for its parent (moving a volume in or out), 0600."""
    return pool_dir / f"worker-{index}.admin.sock"


def unsupported(config: DaemonConfig) -> str | None:
    """Why ``config`` (a DaemonConfig) cannot run with several workers, or None."""
    if config.tls.mode != "off":
        return "--tls (a TLS session cannot be handed to another process)"
    for flag, value in (("--etcd", config.etcd), ("--ceph-conf", config.ceph_conf),
                        ("--daemon-id", config.daemon_id),
                        ("--metrics-listen", config.metrics_listen),
                        ("--backup-repo", config.backup_repos)):
        if value:
            return flag
    return None


# ------------------------------------------------------------------------- the catalog side

def load_assignment(catalog: Catalog) -> dict[str, int]:
    text = catalog.get_meta(ASSIGNMENT_KEY)
    try:
        raw = json.loads(text).get("volumes", {}) if text else {}
    except (ValueError, AttributeError):
        raw = {}
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}


def save_assignment(catalog: Catalog, assignment: dict[str, int]) -> None:
    catalog.set_meta(ASSIGNMENT_KEY, json.dumps({"volumes": assignment}, sort_keys=True))


def least_loaded(assignment: dict[str, int], count: int) -> int:
    load = [0] * count
    for index in assignment.values():
        if 0 <= index < count:
            load[index] += 1
    return min(range(count), key=lambda i: (load[i], i))


def merge_groups(mine: Callable[[], set[str]]) -> Callable[[str | None, str], str]:
    """The read-modify-write of the ``groups`` document for one worker: the groups whose members
    it serves come from what it writes, every other worker's groups stay as stored."""
    def merge(stored: str | None, written: str) -> str:
        own = mine()
        old = json.loads(stored) if stored else {}
        new = json.loads(written)
        out = {name: g for name, g in old.items() if not set(g.get("members", ())) & own}
        for name, g in new.items():
            members = set(g.get("members", ()))
            if members and members <= own:
                out[name] = g
        return json.dumps(dict(sorted(out.items())), sort_keys=True)

    return merge


# ----------------------------------------------------------------------------- the parent

@dataclass
class WorkerConfig:
    """What a worker is told on its command line (JSON)."""

    pool: str
    index: int
    channel_fd: int
    control: str
    admin: str
    clean: bool
    parent: int
    grace: float
    access_file: str | None
    log_level: str
    daemon: JSON = field(default_factory=dict)  # the parent's facts for /v1/health


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, index: int, control: Path, admin: Path) -> None:
        self.index = index
        self.control = control
        self.admin = admin
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: socket.socket | None = None
        self.ready = asyncio.Event()
        self.restarts: list[float] = []
        self.last_exit: int | None = None
        self.session: aiohttp.ClientSession | None = None

    async def admin_call(self, what: str, volume: str, clean: bool = True) -> tuple[int, JSON]:
        """POST the worker's admin API; (status, answer)."""
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.admin)),
            timeout=aiohttp.ClientTimeout(total=120.0, sock_connect=5.0),
        ) as session, session.post(f"http://worker/{what}/{volume}",
                                   params={"clean": "1" if clean else "0"}) as answer:
            data = await answer.json(content_type=None)
            return answer.status, data if isinstance(data, dict) else {}

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.control)),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0))
        return self.session


class Parent:
    """The parent of ``owm serve --workers N`` (see the module's docstring)."""

    def __init__(self, config: DaemonConfig, pool_dir: Path, lock_fd: int, count: int,
                 log_level: str) -> None:
        self.config = config
        self.pool_dir = pool_dir
        self.lock_fd = lock_fd
        self.count = count
        self.log_level = log_level
        self.catalog: SqliteCatalog | None = None
        self.assignment: dict[str, int] = {}
        self.workers = [Worker(i, worker_socket(pool_dir, i), admin_socket(pool_dir, i))
                        for i in range(count)]
        self.stopping = False
        self.failed: str | None = None
        self.daemon: JSON = {}
        self.access = AccessRules.load(config.access_file) if config.access_file else None
        self.front = FrontDoor(self.route, self.list_exports, self.export_info, self.hand,
                               self.access)
        self._supervisors: list[asyncio.Task[None]] = []
        self._db_lock = asyncio.Lock()

    # -- the catalog ---------------------------------------------------------------------------
    def prepare_catalog(self) -> bool:
        """Check the catalog, record every volume's worker, mark the pool not clean; returns
        whether the last stop was clean (the workers' first start then trusts the volumes)."""
        from owm.pool import integrity

        path = self.pool_dir / "catalog.sqlite"
        (self.pool_dir / "volumes").mkdir(exist_ok=True)
        integrity.check_file(path, self.pool_dir / "volumes")
        try:
            catalog = SqliteCatalog(path, shared=True)
            rows = catalog.volumes()
            images = {r.name: catalog.images(r.name) for r in rows}
            clean = catalog.get_meta("clean", "1") == "1"
        except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
            raise integrity.CatalogDamaged(
                f"the catalog {path} is corrupt ({exc}); the daemon did not start and changed "
                "nothing (restore the file from a copy, or move the pool aside)") from None
        self.catalog = catalog
        integrity.check_rows(path, rows, images)
        if clean:
            integrity.check_digest(path, catalog.get_meta(integrity.DIGEST_KEY), rows, images)
        else:
            log.warning("pool %s was not shut down cleanly: the workers recover it", self.pool_dir)
        known = load_assignment(catalog)
        names = sorted(r.name for r in rows)
        assignment = {n: known[n] for n in names if 0 <= known.get(n, -1) < self.count}
        for name in names:
            if name not in assignment:
                assignment[name] = least_loaded(assignment, self.count)
        self.assignment = assignment
        save_assignment(catalog, assignment)
        catalog.set_meta("clean", "0")
        return clean

    def finish_catalog(self) -> None:
        """After the last worker stopped: mark the pool clean if every worker closed cleanly."""
        from owm.pool import integrity

        catalog = self.catalog
        if catalog is None:
            return
        clean = self.failed is None and all(w.last_exit == 0 for w in self.workers)
        try:
            if clean:
                rows = catalog.volumes()
                catalog.set_meta(integrity.DIGEST_KEY, integrity.rows_digest(
                    rows, {r.name: catalog.images(r.name) for r in rows}))
                catalog.set_meta("clean", "1")
        except OwmError as exc:
            log.error("the pool's catalog could not be marked clean: %s", exc)
            clean = False
        finally:
            catalog.close()
            self.catalog = None
        if clean:
            log.info("pool %s closed cleanly", self.pool_dir)
        else:
            log.warning("pool %s did not close cleanly; the next start recovers it as after a "
                        "crash", self.pool_dir)

    async def _record(self) -> None:
        catalog = self.catalog
        assert catalog is not None
        snapshot = dict(self.assignment)
        async with self._db_lock:
            await asyncio.to_thread(save_assignment, catalog, snapshot)

    # -- routing -------------------------------------------------------------------------------
    def route(self, export: str) -> int | None:
        """The worker of an export (``NAME`` or ``NAME@N``; "" is the one volume, if one)."""
        if not export:
            return next(iter(self.assignment.values())) if len(self.assignment) == 1 else None
        return self.assignment.get(export.partition("@")[0])

    async def list_exports(self) -> list[tuple[str, str]]:
        parts = await asyncio.gather(*(self._get(w, "/v1/volumes") for w in self.workers))
        out: list[tuple[str, str]] = []
        for part in parts:
            for v in part if isinstance(part, list) else []:
                out.append((str(v.get("name")), "live volume"))
                for image in v.get("images") or []:
                    if image.get("state") != "releasing":
                        out.append((str(image.get("name")),
                                    f"preserved image {image.get('generation')}, "
                                    f"{image.get('state')}"))
        return sorted(out)

    async def export_info(self, export: str) -> ExportInfo | None:
        """What NBD_OPT_INFO tells of ``export``, from its worker's status of the volume (the
        same figures the worker's own pool gives: ``owm.pool.pool.Pool._export``)."""
        from owm.pool.pool import MAX_PAYLOAD

        index = self.route(export)
        if index is None:
            return None
        name = export or next(iter(self.assignment))
        volume, _, gen = name.partition("@")
        status = await self._get(self.workers[index], f"/v1/volumes/{volume}")
        if not isinstance(status, dict):
            return None
        chunk = int(status.get("chunk_size", 65536))
        if not gen:
            return ExportInfo(volume, f"live volume, {status.get('method')}",
                              int(status["size"]), False, preferred_block=min(chunk, 65536),
                              max_block=MAX_PAYLOAD)
        images = {str(i.get("name")): i for i in status.get("images") or []}
        image = images.get(name)
        if image is None or image.get("state") == "releasing":
            return None
        return ExportInfo(name, f"preserved image {gen}, {image.get('state')}",
                          int(status["size"]), True, preferred_block=min(chunk, 65536),
                          max_block=MAX_PAYLOAD)

    async def hand(self, index: int, conn: socket.socket, transcript: bytes, answers: bytes,
                   unix: bool) -> bool:
        worker = self.workers[index]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.ready.wait(), HANDOFF_WAIT)
        if not worker.ready.is_set() or worker.channel is None:
            return False
        try:
            await send_connection(worker.channel, conn, transcript, answers, unix)
        except (OSError, TimeoutError) as exc:
            log.warning("handing a client to worker %d failed: %s", index, exc)
            return False
        return True

    # -- the workers ---------------------------------------------------------------------------
    async def start_worker(self, worker: Worker, clean: bool) -> None:
        parent_end, child_end = channel_pair()
        cfg = WorkerConfig(
            pool=str(self.pool_dir), index=worker.index, channel_fd=child_end.fileno(),
            control=str(worker.control), admin=str(worker.admin), clean=clean, parent=os.getpid(),
            grace=float(self.config.grace),
            access_file=str(self.config.access_file) if self.config.access_file else None,
            log_level=self.log_level, daemon=self.daemon)
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "owm.daemon.workers", json.dumps(asdict(cfg)),
                pass_fds=(child_end.fileno(), self.lock_fd), stdin=asyncio.subprocess.DEVNULL)
        finally:
            child_end.close()
        worker.channel = parent_end
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)
        await self._await_ready(worker)

    async def _await_ready(self, worker: Worker) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        assert worker.proc is not None
        while True:
            if worker.proc.returncode is not None:
                raise WrongState(f"worker {worker.index} exited with {worker.proc.returncode} "
                                 "while starting; see the log above")
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with worker.client().get("http://worker/v1/health") as answer:
                    if answer.status == 200:
                        worker.ready.set()
                        return
            if time.monotonic() > deadline:
                raise WrongState(f"worker {worker.index} did not start in "
                                 f"{WORKER_START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)

    async def supervise(self, worker: Worker, stop: asyncio.Event) -> None:
        """Restart ``worker`` whenever it dies, until the daemon stops or it died too often."""
        while True:
            proc = worker.proc
            assert proc is not None
            code = await proc.wait()
            worker.ready.clear()
            worker.last_exit = code
            if worker.channel is not None:
                worker.channel.close()
                worker.channel = None
            if self.stopping:
                return
            now = time.monotonic()
            worker.restarts = [t for t in worker.restarts if now - t < RESTART_WINDOW]
            if len(worker.restarts) >= MAX_RESTARTS:
                self.failed = (f"worker {worker.index} died {MAX_RESTARTS + 1} times within "
                               f"{RESTART_WINDOW:.0f} s")
                log.critical("%s; the daemon stops", self.failed)
                stop.set()
                return
            pause = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** len(worker.restarts))
            worker.restarts.append(now)
            how = f"signal {-code}" if code < 0 else f"code {code}"
            log.error("worker %d (pid %d) exited with %s; restarting it in %.1f s (restart %d "
                      "of at most %d per %.0f s); its volumes recover as after a crash",
                      worker.index, proc.pid, how, pause, len(worker.restarts), MAX_RESTARTS,
                      RESTART_WINDOW)
            await asyncio.sleep(pause)
            if self.stopping:
                return
            try:
                await self.start_worker(worker, clean=False)
            except (OwmError, OSError) as exc:
                log.error("worker %d did not restart: %s", worker.index, exc)
                if worker.proc is None or worker.proc.returncode is None:
                    self.failed = f"worker {worker.index} could not be restarted"
                    stop.set()
                    return

    async def stop_workers(self) -> None:
        self.stopping = True
        # No restart may start a worker behind this stop's back.
        for task in self._supervisors:
            task.cancel()
        if self._supervisors:
            await asyncio.wait(self._supervisors, timeout=5.0)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
        limit = float(self.config.grace) + 30.0
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.last_exit = await asyncio.wait_for(worker.proc.wait(), limit)
            except TimeoutError:
                log.error("worker %d did not stop in %.0f s; killed", worker.index, limit)
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
                worker.last_exit = -9
            if worker.session is not None:
                await worker.session.close()

    # -- the control API -----------------------------------------------------------------------
    async def _get(self, worker: Worker, path: str) -> Any:
        try:
            async with worker.client().get(f"http://worker{path}") as answer:
                if answer.status == 200:
                    return await answer.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.info("worker %d did not answer %s: %s", worker.index, path, exc)
        return None

    async def forward(self, request: web.Request, index: int, body: bytes) -> web.Response:
        worker = self.workers[index]
        headers = {k: request.headers[k] for k in ("Content-Type", "Accept")
                   if k in request.headers}
        try:
            async with worker.client().request(
                request.method, f"http://worker{request.rel_url}", data=body or None,
                headers=headers, allow_redirects=False,
            ) as answer:
                payload = await answer.read()
                return web.Response(body=payload, status=answer.status, headers={
                    "Content-Type": answer.headers.get("Content-Type", "application/json")})
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("forwarding %s %s to worker %d failed: %s", request.method,
                        request.path, index, exc)
            return _error(503, f"worker {index} of this daemon cannot be reached just now "
                               "(it is restarting); try again")

    async def _groups(self) -> dict[str, tuple[int, JSON]]:
        """Every group with members, and the worker that serves it."""
        parts = await asyncio.gather(*(self._get(w, "/v1/groups") for w in self.workers))
        found: dict[str, tuple[int, JSON]] = {}
        for index, part in enumerate(parts):
            for g in part if isinstance(part, list) else []:
                if isinstance(g, dict) and g.get("members"):
                    found[str(g.get("name"))] = (index, g)
        return found

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        parts = [p for p in path.split("/") if p]
        body = await request.read()
        if path == "/v1/health":
            return self.health()
        if parts[:2] == ["v1", "volumes"] and len(parts) == 2:
            if request.method == "GET":
                lists = await asyncio.gather(*(self._get(w, "/v1/volumes")
                                               for w in self.workers))
                merged = [{**v, "worker": i} for i, part in enumerate(lists)
                          for v in (part if isinstance(part, list) else [])]
                return web.json_response(sorted(merged, key=lambda v: str(v.get("name"))))
            if request.method == "POST":
                return await self._create(request, body)
        if parts[:2] in (["v1", "volumes"], ["v1", "images"]) and len(parts) >= 3:
            index = self.route(parts[2]) if parts[2] else None
            answer = await self.forward(request, 0 if index is None else index, body)
            if parts[1] == "volumes" and len(parts) == 3 and request.method == "DELETE" \
                    and answer.status < 300:
                self.assignment.pop(parts[2], None)
                await self._record()
            return answer
        if parts[:2] == ["v1", "groups"] or parts[:2] == ["v1", "sets"]:
            return await self._group_route(request, parts, body)
        return await self.forward(request, 0, body)

    async def _create(self, request: web.Request, body: bytes) -> web.Response:
        try:
            name = json.loads(body).get("name") if body else None
            if isinstance(name, str):
                check_volume_name(name)
            else:
                name = None
        except (ValueError, AttributeError, InvalidRequest):
            name = None  # worker 0 answers what is wrong with the request
        if name is None:
            return await self.forward(request, 0, body)
        new = name not in self.assignment
        index = self.assignment.get(name)
        if index is None:
            index = least_loaded(self.assignment, self.count)
            self.assignment[name] = index
            await self._record()  # before the volume exists: a restart finds it on its worker
        answer = await self.forward(request, index, body)
        if new and answer.status >= 300:
            self.assignment.pop(name, None)
            await self._record()
        return answer

    async def _group_route(self, request: web.Request, parts: list[str],
                           body: bytes) -> web.Response:
        groups = await self._groups()
        if len(parts) == 2 and request.method == "GET":
            return web.json_response([g for _, (_, g) in sorted(groups.items())])
        if len(parts) == 2 and request.method == "POST":
            try:
                data = json.loads(body) if body else {}
                name, members = data.get("name"), data.get("members")
            except (ValueError, AttributeError):
                return await self.forward(request, 0, body)
            if isinstance(name, str) and name in groups:
                return _error(409, f"a group named '{name}' already exists")
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                return await self.forward(request, 0, body)
            where = {m: self.assignment.get(m) for m in members}
            if any(i is None for i in where.values()):
                return await self.forward(request, 0, body)  # the worker names the missing one
            member_of = {m: g for g, (_, status) in groups.items()
                         for m in status.get("members", ())}
            taken = [m for m in members if m in member_of]
            if taken:
                return _error(409, f"volume '{taken[0]}' is in group '{member_of[taken[0]]}' "
                                   "already; a volume is in at most one group")
            places = [i for i in where.values() if i is not None]
            target = min(set(places), key=lambda i: (-places.count(i), i))
            for member in members:
                source = where[member]
                if source is not None and source != target:
                    refused = await self._move(member, source, target, str(name))
                    if refused is not None:
                        return refused
            return await self.forward(request, target, body)
        group = parts[2].partition("@")[0] if len(parts) >= 3 else ""
        found = groups.get(group)
        return await self.forward(request, found[0] if found else 0, body)

    async def _move(self, volume: str, source: int, target: int,
                    group: str) -> web.Response | None:
        """Move idle ``volume`` from worker ``source`` to ``target`` (so that group ``group``
        has its members on one worker); None once moved, else the answer to give."""
        try:
            status, answer = await self.workers[source].admin_call("move-out", volume)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("moving volume %s out of worker %d failed: %s", volume, source, exc)
            return _error(503, f"worker {source}, which serves volume '{volume}', cannot be "
                               "reached just now; try again")
        if status != 200:
            message = str(answer.get("error") or f"volume '{volume}' could not be moved")
            return _error(status, f"the members of group '{group}' are served by different "
                                  f"worker processes and {message[:1].lower()}{message[1:]}")
        clean = bool(answer.get("clean"))
        self.assignment[volume] = target
        await self._record()
        try:
            status, answer = await self.workers[target].admin_call("move-in", volume, clean)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            status, answer = 503, {"error": str(exc)}
        if status != 200:
            log.error("worker %d could not open volume %s (%s); it goes back to worker %d",
                      target, volume, answer.get("error"), source)
            self.assignment[volume] = source
            await self._record()
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                await self.workers[source].admin_call("move-in", volume, clean)
            return _error(503, f"volume '{volume}' could not be moved to worker {target} for "
                               f"group '{group}'; it stays on worker {source}")
        log.info("moved idle volume %s from worker %d to worker %d for group %s", volume,
                 source, target, group)
        return None

    def health(self) -> web.Response:
        ready = all(w.ready.is_set() for w in self.workers) and not self.stopping
        workers = [{"index": w.index, "pid": w.proc.pid if w.proc else None,
                    "ready": w.ready.is_set(), "restarts": len(w.restarts),
                    "volumes": sorted(n for n, i in self.assignment.items() if i == w.index)}
                   for w in self.workers]
        status = "closing" if self.stopping else "ok" if ready else "starting"
        return web.json_response({**self.daemon, "workers": workers, "status": status,
                                  "ready": status == "ok"}, status=200 if ready else 503)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bind_tcp(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def run(config: DaemonConfig, log_level: str = "INFO") -> None:
    """Blocking entry point of ``owm serve --workers N`` (N above 1): uvloop, then ``serve``."""
    setup_logging(log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve(config, log_level=log_level))
    else:
        uvloop.run(serve(config, log_level=log_level))


async def serve(config: DaemonConfig, stop: asyncio.Event | None = None,
                log_level: str = "INFO") -> None:
    """As ``owm.daemon.serve.serve``, with the volumes served by ``config.workers`` processes."""
    why = unsupported(config)
    if why is not None:
        raise InvalidRequest(f"--workers above 1 does not work with {why} yet")
    with locked_pool(config) as (pool_dir, token, plane, lock_fd):
        await serve_parent(config, pool_dir, lock_fd, config.workers, stop, plane, log_level,
                           token)


async def serve_parent(config: DaemonConfig, pool_dir: Path, lock_fd: int, count: int,
                       stop: asyncio.Event | None, plane: DataPlane, log_level: str,
                       token: str | None = None) -> None:
    """The parent's life, from a locked pool to every worker stopped (see the docstring)."""
    from owm.daemon.notify import Notifier, remove_ready_file, write_ready_file
    from owm.nbd.server import _bind_unix

    if socket_in_use(config.control_socket):
        raise WrongState(f"a daemon is already serving pool {pool_dir}")
    for index in range(count):
        check_unix_path(worker_socket(pool_dir, index))
        check_unix_path(admin_socket(pool_dir, index))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    if config.ready_file is not None:
        remove_ready_file(config.ready_file)
    parent = Parent(config, pool_dir, lock_fd, count, log_level)
    notifier = Notifier()
    runners: list[web.AppRunner] = []

    async def control_site(middlewares: list[Any]) -> web.AppRunner:
        app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", parent.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        runners.append(runner)
        return runner

    try:
        clean = await asyncio.to_thread(parent.prepare_catalog)
        try:
            if config.nbd_listen is not None:
                parent.front.listen(_bind_tcp(config.nbd_listen), unix=False)
            unix_path = str(config.nbd_socket_path)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(unix_path).st_mode):
                    os.unlink(unix_path)  # a stale one from a crash
            unix_sock = _bind_unix(unix_path, plane.socket_mode, plane.socket_gid)
            unix_sock.listen(128)
            parent.front.listen(unix_sock, unix=True)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise WrongState(f"cannot serve NBD on {_endpoint(config.nbd_listen) or ''} "
                             f"{config.nbd_socket_path}: {reason}") from None
        nbd_tcp = (config.nbd_listen[0], parent.front.tcp_port) if config.nbd_listen else None
        parent.daemon.update({
            "pool": str(pool_dir), "pid": os.getpid(), "version": owm.__version__,
            "nbd": {"tcp": _endpoint(nbd_tcp), "unix": str(config.nbd_socket_path.absolute()),
                    "tls": "off",
                    "access_rules": str(config.access_file) if config.access_file else None},
            "control": {"unix": str(config.control_socket.absolute()), "tcp": None},
            "catalog": {"kind": "sqlite", "path": str(pool_dir / "catalog.sqlite")},
            "metrics": None, "storage": {"kind": "local"}, "workers_count": count,
        })
        await asyncio.gather(*(parent.start_worker(w, clean) for w in parent.workers))
        parent._supervisors = [loop.create_task(parent.supervise(w, stop))
                               for w in parent.workers]
        parent.front.start()
        if config.control_listen is not None:
            from owm.control.app import bearer_token_check

            assert token is not None
            tcp_runner = await control_site([bearer_token_check(token)])
            host, port = config.control_listen
            try:
                await web.TCPSite(tcp_runner, host, port, reuse_address=True).start()
            except OSError as exc:
                raise InvalidRequest(f"cannot listen for control requests on {host}:{port}: "
                                     f"{exc.strerror}") from None
            bound = tcp_runner.addresses[0][:2]
            parent.daemon["control"]["tcp"] = _endpoint((str(bound[0]), int(bound[1])))
        runner = await control_site([])
        await web.SockSite(runner, bind_private_unix_socket(config.control_socket)).start()
        log.info("serving pool %s with %d volume(s) on %d worker processes: NBD on %s and %s, "
                 "control on %s%s (ready in %.0f ms)", pool_dir, len(parent.assignment), count,
                 _endpoint(nbd_tcp) or "no TCP", config.nbd_socket_path, config.control_socket,
                 f" and {parent.daemon['control']['tcp']} (token required)"
                 if parent.daemon["control"]["tcp"] else "",
                 (time.monotonic() - started) * 1000)
        if config.ready_file is not None:
            write_ready_file(config.ready_file)
        notifier.ready(f"serving {len(parent.assignment)} volume(s) of {pool_dir} on {count} "
                       "workers")
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if config.ready_file is not None:
            remove_ready_file(config.ready_file)
        notifier.stopping()
        log.info("stopping: the workers finish their requests in flight")
        parent.stopping = True
        await parent.front.stop()
        try:
            await parent.stop_workers()
        finally:
            for runner in runners:
                await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                config.control_socket.unlink()
            await asyncio.to_thread(parent.finish_catalog)
    if parent.failed is not None:
        raise WrongState(f"the daemon stopped: {parent.failed}")
    log.info("stopped")


# ----------------------------------------------------------------------------- a worker

def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux); and if it died already, now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


async def run_worker(cfg: WorkerConfig) -> int:
    """One worker's life; its exit code (0: every volume closed cleanly)."""
    from owm.control.context import ControlContext
    from owm.control.server import ControlServer
    from owm.locks.app import LockService
    from owm.nbd.server import NbdServer
    from owm.pool.pool import Pool

    pool_dir = Path(cfg.pool)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _die_with_parent(cfg.parent)
    channel = socket.socket(fileno=cfg.channel_fd)
    channel.setblocking(False)
    holder: dict[str, Any] = {}

    def catalog() -> SqliteCatalog:
        c = SqliteCatalog(pool_dir / "catalog.sqlite", shared=True)
        c.merge_meta["groups"] = merge_groups(lambda: set(holder["pool"].volumes))
        return c

    pool = await Pool.open(pool_dir, catalog_factory=catalog, cluster=True)
    holder["pool"] = pool
    nbd: NbdServer | None = None
    control: ControlServer | None = None
    admin: web.AppRunner | None = None
    tasks: set[asyncio.Task[None]] = set()
    try:
        assignment = await pool.db(load_assignment)
        mine = sorted(n for n, i in assignment.items() if i == cfg.index)
        for name in mine:
            await pool.open_volume(name, cfg.clean)
        await pool.groups.load()  # now that its volumes are open: their groups' members
        access = AccessRules.load(Path(cfg.access_file)) if cfg.access_file else None
        nbd = NbdServer(pool, access=access)
        ctx = ControlContext(pool=pool, connect_source=connect_restore_source,
                             app_locks=LockService.for_pool(pool_dir) if cfg.index == 0
                             else LockService())
        ctx.daemon.update(cfg.daemon)
        ctx.daemon.update({"worker": cfg.index, "worker_pid": os.getpid(), "ready": True})
        control = ControlServer(ctx)
        await control.start(Path(cfg.control))
        admin = await _start_admin(pool, Path(cfg.admin), cfg.index)

        def on_handoff() -> None:
            assert nbd is not None
            while True:
                try:
                    got = receive_connection(channel)
                except BlockingIOError:
                    return
                except OSError as exc:
                    log.warning("worker %d: the handoff channel failed: %s", cfg.index, exc)
                    got = None
                if got is None:
                    if not stop.is_set():
                        log.warning("worker %d: the parent is gone; stopping", cfg.index)
                    loop.remove_reader(channel.fileno())
                    stop.set()
                    return
                sock, transcript, answers, unix = got
                task = loop.create_task(nbd.adopt(sock, transcript, answers, unix))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        loop.add_reader(channel.fileno(), on_handoff)
        log.info("worker %d serving %d volume(s)%s", cfg.index, len(mine),
                 "" if cfg.clean else " (recovered)")
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(channel.fileno())
        channel.close()
        if nbd is not None:
            await nbd.stop(cfg.grace)
        if control is not None:
            await control.stop()
        if admin is not None:
            await admin.cleanup()
            with contextlib.suppress(FileNotFoundError):
                Path(cfg.admin).unlink()
        await pool.close()
    return 0 if pool.closed_cleanly else EXIT_UNCLEAN


def _idle(volume: Any) -> str | None:
    """Why ``volume`` (an ``owm.pool.volume.Volume``) cannot move now, or None."""
    if volume.sessions:
        return f"volume '{volume.name}' has {len(volume.sessions)} open session(s)"
    if any(volume.readers.values()):
        return f"volume '{volume.name}' has images being read"
    if volume.live_restore is not None:
        return f"volume '{volume.name}' is being restored into"
    if any(i.state in ("draining", "releasing") for i in volume.images.values()):
        return f"volume '{volume.name}' has an image draining or being released"
    return None


async def _start_admin(pool: Any, path: Path, index: int) -> web.AppRunner:
    """The worker's admin API for its parent: ``move-out`` closes an idle volume (refused in
    one sentence if it is not idle), ``move-in`` opens one this worker is to serve now."""
    async def move_out(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        volume = pool.volumes.get(name)
        if volume is None:
            return _error(404, f"there is no volume named '{name}' on worker {index}")
        why = _idle(volume)
        if why is not None:
            return _error(409, f"{why}, so it cannot be moved to another worker; try again "
                               "once it is idle")
        # close_volume takes the volume out of the served ones before its first await: no
        # session can open on it here after the check above.
        clean = await pool.close_volume(name)
        await pool.groups.load()
        return web.json_response({"clean": clean})

    async def move_in(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        clean = request.query.get("clean") == "1"
        try:
            volume = await pool.open_volume(name, clean)
        except OwmError as exc:
            return _error(500, str(exc))
        if volume is None:
            return _error(404, f"there is no volume named '{name}'")
        await pool.groups.load()
        return web.json_response({"opened": name})

    app = web.Application()
    app.router.add_post("/move-out/{name}", move_out)
    app.router.add_post("/move-in/{name}", move_in)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, bind_private_unix_socket(path)).start()
    return runner


def main(argv: list[str]) -> None:
    """``python -m owm.daemon.workers CONFIG``: run one worker (started by the parent)."""
    raw = json.loads(argv[0])
    cfg = WorkerConfig(**raw)
    setup_logging(cfg.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        runner: Callable[[Any], int] = asyncio.run
    else:
        runner = uvloop.run
    try:
        code = runner(run_worker(cfg))
    except OwmError as exc:
        log.error("worker %d did not start: %s", cfg.index, exc)
        code = 1
    logging.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
