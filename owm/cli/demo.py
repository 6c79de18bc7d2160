"""``owm demo``: the whole one-way-mirror story, live, on a throw-away pool.

A daemon is started on a temporary pool and a bank is opened on a volume (``owm.txn.bank``): every
account a sector, every transfer two separate block writes under both accounts' locks, which
the daemon serves (``owm.locks.app``).  A transaction coordinator (``owm.txn.coordinator``) runs the
transfers on a few worker sessions; some of them are long.  In the middle of the work the
volume is preserved: the transfers running at that instant finish on their old sessions (on the
preserved image, mirrored onto the live volume), every transfer after it starts at once on new
sessions (live volume only), and nobody waits.  As the old sessions close, the image drains; it
is backed up to a raw file while the bank keeps going, and the consistency checker
(``owm.txn.checker``) reads the backup: the money adds up, no transfer is torn, and it holds exactly
the transfers of the old sessions.  At the end the live volume is checked against the ledger
(every committed transfer, nothing lost), the image is released and a summary printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from owm.cli.output import image_state
from owm.common.errors import OwmError
from owm.common.sizes import format_size
from owm.control.client import ControlClient

JSON = dict[str, Any]

VOLUME = "demo"
ACCOUNTS = 4096  # 2 MiB of accounts
RATE_PER_WORKER = 40.0  # transfers arriving per second, per worker
WARMUP = 1.0  # seconds of banking before the preserve
FIRST_FINISH = 0.8  # the first long transfer running at the preserve ends this long after it...
STAGGER = 0.5  # ...and each next one this much later
TAIL = 0.4  # the bank keeps going this long after the backup was checked
DAEMON_START_TIMEOUT = 20.0
DEMO_TIME_LIMIT = 90.0  # it normally takes under 10 s


class DemoFailed(OwmError):
    """The demo could not run, or what it checked was wrong."""


@dataclass
class Timeline:
    """Moments (time.perf_counter, the coordinator's clock) the summary is computed from."""

    started: float = 0.0
    preserve_sent: float | None = None
    switched: float | None = None
    drained: float | None = None


def _short_tempdir() -> Path:
    """A temporary directory short enough for Unix socket paths inside it."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="owm-demo-", dir=base))


@contextlib.contextmanager
def _daemon(pool: Path, log_path: Path,
            extra: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``owm serve`` on ``pool`` (Unix sockets only) and stop it cleanly afterwards."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen", "none",
             "--log-level", "warning", "--grace", "5", *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _log_tail(log_path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def _wait_ready(client: ControlClient, proc: subprocess.Popen[bytes], log: Path) -> JSON:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise DemoFailed(f"the demo daemon exited at start-up: {_log_tail(log)}")
        try:
            return await client.health()
        except OwmError:
            if time.monotonic() > deadline:
                raise DemoFailed("the demo daemon did not start within 20 seconds") from None
            await asyncio.sleep(0.05)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class DemoView:
    """What the live display shows: the workers, the image, the last events."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.coordinator: Any = None
        self.retired: list[Any] = []
        self.image: JSON | None = None
        self.events: list[str] = []

    def __rich__(self) -> RenderableType:
        now = time.perf_counter() - self.timeline.started
        table = Table(title=f"owm demo, t = {now:4.1f}s", title_justify="left")
        for column in ("worker", "generation", "transfers", "state"):
            table.add_column(column, justify="right" if column == "transfers" else "left")
        workers = list(self.retired)
        if self.coordinator is not None:
            workers += [w for w in self.coordinator.workers() if w not in workers]
        for w in workers:
            gen = (Text("old → demo@0 + live", "yellow") if w.generation == 0 and
                   self.timeline.preserve_sent is not None else
                   Text("new → live only", "cyan") if w.generation > 0 else Text("live"))
            table.add_row(w.name, gen, str(w.transactions), w.state)
        image = Text("not preserved yet", "dim")
        if self.image is not None:
            image = Text.assemble((f"{self.image.get('name')}: ", "bold"),
                                  image_state(self.image))
        return Group(table, image, *(Text(e) for e in self.events[-6:]))


async def _demo(old_count: int, new_count: int, console: Console | None,
                cluster: Cluster | None = None) -> JSON:
    from owm.backup import run_backup
    from owm.control.lock_client import RemoteLocks
    from owm.nbd.client import NbdClient
    from owm.txn.bank import SECTOR, Bank, Durations, arrivals
    from owm.txn.checker import check_image, read_export, read_file
    from owm.txn.coordinator import Coordinator

    rng = random.Random(20261122)
    workdir = _short_tempdir()
    pool = workdir / "pool"
    log_path = workdir / "daemon.log"
    backup_path = workdir / "demo-0.raw"
    timeline = Timeline(started=time.perf_counter())
    view = DemoView(timeline)
    image_name = f"{VOLUME}@0"
    bank = Bank(ACCOUNTS, durations=Durations(0.002, 0.008, 0.0), seed=rng.randrange(1 << 30))

    def event(message: str) -> None:
        stamp = f"{time.perf_counter() - timeline.started:5.2f}s"
        view.events.append(f"{stamp}  {message}")
        if console is not None and not console.is_terminal:
            console.print(f"{stamp}  {message}", markup=False, highlight=False)

    live: Live | None = None
    if console is not None and console.is_terminal:
        live = Live(view, console=console, refresh_per_second=4, transient=False)
    stop = False
    try:
        extra = cluster.serve_args if cluster is not None else []
        with _daemon(pool, log_path, extra) as proc, live or contextlib.nullcontext():
            async with ControlClient(pool) as control:
                health = await _wait_ready(control, proc, log_path)
                sock = str(Path(health["nbd"]["unix"]))
                event(f"daemon up on the throw-away pool {pool}"
                      + (f" ({cluster.where})" if cluster is not None else ""))
                await control.create_volume(VOLUME, bank.size, method="cow")
                event(f"volume {VOLUME}: a bank of {ACCOUNTS} accounts of {bank.opening}, one "
                      f"per {SECTOR}-byte sector; account locks served by the daemon")
                locks = await RemoteLocks.open(control=control, label="owm demo")
                coordinator = Coordinator(lambda: NbdClient.connect(VOLUME, unix_path=sock),
                                          locks, old_count, name="w")
                view.coordinator = coordinator
                await coordinator.start()
                event(f"{old_count} workers start transfers, each on its own NBD session")
                driver = asyncio.create_task(arrivals(
                    coordinator, bank.random_transfer, RATE_PER_WORKER * old_count,
                    lambda: stop, random.Random(rng.random())))

                # Long transfers that will still be running at the preserve.
                await asyncio.sleep(WARMUP - 0.2)
                longs = []
                for i in range(max(1, old_count // 2)):
                    src, dst = rng.sample(range(ACCOUNTS), 2)
                    longs.append(coordinator.submit(bank.transfer(
                        src, dst, rng.randint(1, 100), duration=0.2 + FIRST_FINISH + i * STAGGER)))
                await asyncio.sleep(0.2)
                view.retired = coordinator.workers()

                async def split() -> str:
                    answer = await control.preserve(VOLUME)
                    return str(answer["image"])

                timeline.preserve_sent = time.perf_counter()
                handover = await coordinator.preserve(split, new_workers=new_count)
                timeline.switched = handover.switched
                image_name = handover.image
                event(f"preserve {VOLUME} -> {image_name} in {handover.preserve_ms:.1f} ms; "
                      f"{handover.old_running_at_switch} transfers still running on old sessions,"
                      f" every new one starts on {new_count} new sessions "
                      f"(nothing waited: {handover.no_start_s * 1000:.0f} ms without starts)")

                closed_seen: set[str] = set()
                waiter = asyncio.create_task(control.wait(image_name, timeout=30))
                while not waiter.done():
                    with contextlib.suppress(OwmError):
                        view.image = await control.image(image_name)
                    for w in view.retired:
                        if w.state == "closed" and w.name not in closed_seen:
                            closed_seen.add(w.name)
                            event(f"old worker {w.name} finished its transfer and closed its "
                                  "session")
                    await asyncio.wait({waiter}, timeout=0.1)
                result = waiter.result()
                if not result.get("drained"):
                    raise DemoFailed(f"{image_name} did not drain within 30 seconds")
                timeline.drained = time.perf_counter()
                for w in view.retired:
                    if w.name not in closed_seen:
                        event(f"old worker {w.name} finished its transfer and closed its session")
                view.image = result.get("status") or view.image
                event(f"{image_name} drained {timeline.drained - timeline.preserve_sent:.2f}s "
                      "after the preserve, while the new sessions never stopped")
                for t in longs:
                    await t  # surface a failure

                backup = await run_backup(control, image_name, backup_path, fmt="raw",
                                          verify=True)
                event(f"backed up {image_name} to {backup_path.name}: "
                      f"{format_size(backup.size)} in {backup.seconds:.2f}s, verified; "
                      "the bank kept going")
                old_ids = {t.id for t in bank.ledger.values() if t.generation == 0}
                image_report = check_image(read_file(backup_path, bank.size), bank.accounts,
                                           bank.opening, bank.ledger, expect=old_ids)
                if not image_report.ok:
                    raise DemoFailed(f"the backup of {image_name} is not consistent: "
                                     f"{image_report.summary()}")
                event(f"checker on the backup: {image_report.summary()}; exactly the "
                      f"{len(old_ids)} transfers of the old sessions")

                await asyncio.sleep(TAIL)
                stop = True
                tasks = await driver
                await asyncio.gather(*tasks)
                await coordinator.close()
                await locks.close()
                live_data = await read_export(VOLUME, bank.size, unix_path=sock)
                committed = {t.id for t in bank.committed()}
                live_report = check_image(live_data, bank.accounts, bank.opening, bank.ledger,
                                          expect=committed)
                if not live_report.ok or len(committed) != len(bank.ledger):
                    raise DemoFailed(f"the live volume does not match the ledger: "
                                     f"{live_report.summary()}")
                event(f"live volume against the ledger: all {len(committed)} transfers, none "
                      "lost or torn")

                status = await control.image(image_name)
                on_disk = int(status.get("bytes_on_disk") or 0)
                await control.release(image_name)
                event(f"released {image_name}, {format_size(on_disk)} reclaimed")
    except DemoFailed:
        raise
    except (OwmError, OSError) as exc:
        said = str(exc).rstrip(".")
        raise DemoFailed(f"{said}; the daemon log ends:\n{_log_tail(log_path, 3)}") from None
    finally:
        stop = True
        shutil.rmtree(workdir, ignore_errors=True)

    assert timeline.preserve_sent is not None and timeline.drained is not None
    records = coordinator.records
    t0 = timeline.preserve_sent
    old = [t for t in bank.ledger.values() if t.generation == 0]
    new = [t for t in bank.ledger.values() if t.generation != 0]
    # Writes by old sessions after the preserve: their debit if they started after it (the
    # overlap), their credit if they ended after it.
    old_writes_after = 0
    for r in records:
        if r.generation == 0 and r.finished is not None and r.finished >= t0:
            old_writes_after += 1 + (r.started is not None and r.started >= t0)
    window = [r.system_wait for r in records
              if r.arrived >= t0 and r.arrived <= timeline.drained and r.system_wait is not None]
    before = [r.system_wait for r in records if r.arrived < t0 and r.system_wait is not None]
    return {
        "volume": VOLUME, "image": image_name, "volume_size": bank.size,
        "accounts": ACCOUNTS,
        "old_sessions": old_count, "new_sessions": new_count,
        "preserve_ms": round(handover.preserve_ms, 2),
        "no_start_ms": round(handover.no_start_s * 1000, 2),
        "new_sessions_open_ms": round(handover.connect_ms, 2),
        "transfers_running_at_preserve": handover.old_running_at_switch,
        "transfers_old_generation": len(old),
        "transfers_new_generation": len(new),
        "max_wait_ms_while_draining": _ms(max(window) if window else None),
        "p99_wait_ms_while_draining": _ms(_p99(window)),
        "p99_wait_ms_before_preserve": _ms(_p99(before)),
        "drained_after_s": round(timeline.drained - t0, 3),
        "bytes_to_image_after_preserve": old_writes_after * SECTOR,
        "bytes_new_sessions_live_only": 2 * SECTOR * len(new),
        "backup": {"path": backup_path.name, "format": "raw", "size": backup.size,
                   "seconds": round(backup.seconds, 3), "verified": backup.verified},
        "checker_on_backup": image_report.as_dict(),
        "checker_on_live": live_report.as_dict(),
        "image_bytes_on_disk": on_disk,
        "image_verified": image_report.ok, "live_verified": live_report.ok,
        "seconds": round(time.perf_counter() - timeline.started, 2),
    }


def _summary_table(s: JSON) -> Table:
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("preserve", f"{s['preserve_ms']:.1f} ms; time no transfer could start: "
                  f"{s['no_start_ms']:.0f} ms (old sessions served while "
                  f"{s['new_sessions']} new ones opened in {s['new_sessions_open_ms']:.0f} ms)")
    table.add_row("transfers arriving while draining", f"waited p99 "
                  f"{s['p99_wait_ms_while_draining']} ms, max {s['max_wait_ms_while_draining']}"
                  f" ms (p99 before the preserve: {s['p99_wait_ms_before_preserve']} ms)")
    table.add_row(f"{s['image']} drained", f"{s['drained_after_s']} s after the preserve, as "
                  f"the {s['transfers_running_at_preserve']} transfers running then finished")
    table.add_row(f"old sessions -> {s['image']} and live",
                  f"{s['transfers_old_generation']} transfers, "
                  f"{format_size(s['bytes_to_image_after_preserve'])} written after the preserve")
    table.add_row("new sessions -> live only", f"{s['transfers_new_generation']} transfers")
    table.add_row("backup", f"raw, {format_size(s['backup']['size'])} in "
                  f"{s['backup']['seconds']} s, verified")
    c = s["checker_on_backup"]
    table.add_row("checker on the backup", f"{'consistent' if c['ok'] else 'INCONSISTENT'}: "
                  f"{c['applied']} transfers applied whole, {c['torn']} torn, money conserved")
    table.add_row("checker on the live volume", f"{'equals' if s['live_verified'] else 'DIFFERS'}"
                  f" the ledger ({s['checker_on_live']['applied']} transfers)")
    table.add_row(f"{s['image']} on disk before release", format_size(s["image_bytes_on_disk"]))
    table.add_row("whole demo", f"{s['seconds']} s")
    return table


@dataclass
class Cluster:
    """The throw-away Ceph cluster and etcd of ``owm demo --ceph``, and how to serve on them."""

    serve_args: list[str]
    where: str
    stop: Callable[[], None]


def _start_cluster(console: Console | None) -> Cluster:
    """One monitor + one OSD and one etcd on loopback: data in RADOS, the catalog in etcd."""
    from owm.testbed import ceph, etcd

    started = time.perf_counter()
    cluster = ceph.start()
    try:
        server = etcd.start()
    except BaseException:
        cluster.stop()
        raise

    def stop() -> None:
        try:
            server.stop()
        finally:
            cluster.stop()

    where = f"data in RADOS pool '{cluster.pool}', catalog in etcd at {server.url}"
    if console is not None:
        console.print(f"started a throw-away Ceph cluster (1 monitor, 1 OSD) and etcd in "
                      f"{time.perf_counter() - started:.1f}s: {where}", highlight=False)
    return Cluster(["--ceph-conf", str(cluster.conf_path), "--rados-pool", cluster.pool,
                    "--etcd", server.url, "--etcd-prefix", f"/owm-demo/{uuid.uuid4().hex}/"],
                   where, stop)


async def _bounded(old_count: int, new_count: int, console: Console | None,
                   cluster: Cluster | None = None) -> JSON:
    """The demo, stopped with a plain error if it ever hangs (a broken daemon, say)."""
    try:
        async with asyncio.timeout(DEMO_TIME_LIMIT):
            return await _demo(old_count, new_count, console, cluster)
    except TimeoutError:
        raise DemoFailed(f"the demo did not finish within {DEMO_TIME_LIMIT:.0f} seconds") from None


def run_demo(old_sessions: int = 4, new_sessions: int = 3, quiet: bool = False,
             on_ceph: bool = False) -> JSON:
    """Run the demo (blocking); print it unless ``quiet``; return the summary.  ``on_ceph``:
    on a throw-away Ceph cluster (data) and etcd (catalog) instead of local files."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = None if quiet else Console(highlight=False, width=120 if wide else None)
    cluster = _start_cluster(console) if on_ceph else None
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            summary = asyncio.run(_bounded(old_sessions, new_sessions, console, cluster))
        else:
            summary = uvloop.run(_bounded(old_sessions, new_sessions, console, cluster))
    finally:
        if cluster is not None:
            cluster.stop()
    if cluster is not None:
        summary["pool_on"] = cluster.where
    if console is not None:
        console.print(_summary_table(summary))
    return dict(summary)
