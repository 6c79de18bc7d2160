"""``owm demo``: the whole one-way-mirror story, live, on a throw-away pool.

A daemon is started on a temporary pool and a volume created. Several writer sessions work on
it; in the middle of their work the volume is preserved. The sessions open at that instant
carry on to the end of their "transactions" on the preserved image (their writes reach the
live volume too), while new sessions start at once on the live volume. As the old sessions
finish one by one the image drains; it is then read back over NBD and compared with exactly
what the old sessions wrote (and with nothing the new ones wrote), the live volume is checked
to hold both, the image is released and a summary is printed.

Each writer owns its own region of the volume so that the expected content of every byte is
known without ambiguity. The new writers' regions are filled before the preserve and then
overwritten by them afterwards: the preserved image must still show the old content there
(the copy-on-write engine copied it aside), the live volume the new.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from owm.cli_output import image_state
from owm.control.client import ControlClient
from owm.errors import OwmError
from owm.sizes import format_size

JSON = dict[str, Any]

VOLUME = "demo"
REGION = 4 << 20  # bytes of the volume each writer owns
BLOCK = 4096
MAX_WRITE_BLOCKS = 16  # writes are 4K..64K
WARMUP = 1.0  # seconds of writing before the preserve
FIRST_FINISH = 0.8  # the first old session ends this long after the preserve...
STAGGER = 0.6  # ...and each next one this much later
TAIL = 0.4  # new sessions keep writing this long after the image drained
DAEMON_START_TIMEOUT = 20.0
DEMO_TIME_LIMIT = 90.0  # it normally takes under 10 s


class DemoFailed(OwmError):
    """The demo could not run, or what it checked was wrong."""


@dataclass
class Writer:
    """One NBD session writing into its own region, keeping a copy of what it wrote."""

    name: str
    generation: str  # "old" (open at the preserve) or "new"
    region: int  # index of its region in the volume
    model: bytearray = field(default_factory=lambda: bytearray(REGION))
    bytes_written: int = 0
    bytes_after_preserve: int = 0
    writes: int = 0
    state: str = "connecting"
    connected_at: float = 0.0
    first_ack_at: float | None = None
    latencies: list[float] = field(default_factory=list)
    latencies_before_preserve: list[float] = field(default_factory=list)

    @property
    def offset(self) -> int:
        return self.region * REGION


@dataclass
class Timeline:
    """Moments (time.perf_counter) the summary is computed from."""

    started: float = 0.0
    preserve_sent: float | None = None
    preserve_done: float | None = None
    drained: float | None = None


def _short_tempdir() -> Path:
    """A temporary directory short enough for Unix socket paths inside it."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="owm-demo-", dir=base))


@contextlib.contextmanager
def _daemon(pool: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``owm serve`` on ``pool`` (Unix sockets only) and stop it cleanly afterwards."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen", "none",
             "--log-level", "warning", "--grace", "5"],
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


def _pattern(rng: random.Random, writer: Writer, length: int) -> bytes:
    """Recognisable data: a tag naming the writer and write, then random bytes."""
    tag = f"[{writer.name} write {writer.writes}]".encode()
    return (tag + rng.randbytes(max(0, length - len(tag))))[:length]


async def _write_until(
    writer: Writer, nbd_socket: Path, stop_at: asyncio.Event | float, timeline: Timeline,
    rng: random.Random,
) -> None:
    """Connect, write random blocks into the writer's region until told to stop, disconnect."""
    from owm.nbd.client import NbdClient

    started = time.perf_counter()
    client = await NbdClient.connect(export=VOLUME, unix_path=str(nbd_socket))
    writer.connected_at = time.perf_counter()
    writer.state = "writing"
    try:
        while True:
            if isinstance(stop_at, asyncio.Event):
                if stop_at.is_set():
                    break
            elif time.perf_counter() >= stop_at:
                break
            blocks = rng.randint(1, MAX_WRITE_BLOCKS)
            at = rng.randrange(0, REGION // BLOCK - blocks + 1) * BLOCK
            data = _pattern(rng, writer, blocks * BLOCK)
            sent = time.perf_counter()
            await client.write(writer.offset + at, data)
            acked = time.perf_counter()
            if timeline.preserve_sent is None:
                writer.latencies_before_preserve.append(acked - sent)
            else:
                writer.latencies.append(acked - sent)
            if writer.first_ack_at is None:
                writer.first_ack_at = acked
            writer.model[at:at + len(data)] = data
            writer.writes += 1
            writer.bytes_written += len(data)
            if timeline.preserve_sent is not None and sent >= timeline.preserve_sent:
                writer.bytes_after_preserve += len(data)
            # A little think time, as a transaction between its writes.
            await asyncio.sleep(rng.uniform(0, 0.004))
        writer.state = "flushing"
        await client.flush()
    finally:
        await client.disconnect()
    writer.state = f"done ({time.perf_counter() - started:.1f}s)"


async def _seed(nbd_socket: Path, writers: list[Writer], rng: random.Random) -> int:
    """Fill the writers' regions (before the preserve) and make their models start from it."""
    from owm.nbd.client import NbdClient

    client = await NbdClient.connect(export=VOLUME, unix_path=str(nbd_socket))
    try:
        for w in writers:
            w.model[:] = rng.randbytes(REGION)
            step = 1 << 20
            await asyncio.gather(*(client.write(w.offset + at, bytes(w.model[at:at + step]))
                                   for at in range(0, REGION, step)))
        await client.flush()
    finally:
        await client.disconnect()
    return REGION * len(writers)


async def _read_all(nbd_socket: Path, export: str, size: int) -> bytes:
    from owm.nbd.client import NbdClient

    client = await NbdClient.connect(export=export, unix_path=str(nbd_socket))
    try:
        step = 1 << 20
        parts = await asyncio.gather(*(client.read(off, min(step, size - off))
                                       for off in range(0, size, step)))
    finally:
        await client.disconnect()
    return b"".join(parts)


def _first_difference(got: bytes, want: bytes | bytearray) -> int | None:
    if got == want:
        return None
    for i in range(0, len(want), BLOCK):
        if got[i:i + BLOCK] != want[i:i + BLOCK]:
            return i
    return len(want)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class DemoView:
    """What the live display shows: the writers and the image, refreshed from the daemon."""

    def __init__(self, writers: list[Writer], timeline: Timeline) -> None:
        self.writers = writers
        self.timeline = timeline
        self.image: JSON | None = None
        self.events: list[str] = []

    def __rich__(self) -> RenderableType:
        now = time.perf_counter() - self.timeline.started
        table = Table(title=f"owm demo, t = {now:4.1f}s", title_justify="left")
        for column in ("session", "generation", "writes", "written", "after preserve", "state"):
            table.add_column(column, justify="right" if column in ("writes", "written",
                                                                     "after preserve") else "left")
        for w in self.writers:
            gen = Text("old → vol@0 + live", "yellow") if w.generation == "old" else Text(
                "new → live only", "cyan")
            table.add_row(w.name, gen, str(w.writes), format_size(w.bytes_written),
                          format_size(w.bytes_after_preserve), w.state)
        image = Text("not preserved yet", "dim")
        if self.image is not None:
            image = Text.assemble((f"{self.image.get('name')}: ", "bold"),
                                  image_state(self.image))
        return Group(table, image, *(Text(e) for e in self.events[-6:]))


async def _demo(old_count: int, new_count: int, console: Console | None) -> JSON:
    rng = random.Random(20261122)
    workdir = _short_tempdir()
    pool = workdir / "pool"
    log_path = workdir / "daemon.log"
    timeline = Timeline(started=time.perf_counter())
    old = [Writer(f"old-{i + 1}", "old", i) for i in range(old_count)]
    new = [Writer(f"new-{i + 1}", "new", old_count + i) for i in range(new_count)]
    size = REGION * (old_count + new_count)
    view = DemoView(old + new, timeline)
    image_name = f"{VOLUME}@0"

    def event(message: str) -> None:
        stamp = f"{time.perf_counter() - timeline.started:5.2f}s"
        view.events.append(f"{stamp}  {message}")
        if console is not None and not console.is_terminal:
            console.print(f"{stamp}  {message}", markup=False, highlight=False)

    live: Live | None = None
    if console is not None and console.is_terminal:
        live = Live(view, console=console, refresh_per_second=4, transient=False)
    try:
        with _daemon(pool, log_path) as proc, live or contextlib.nullcontext():
            async with ControlClient(pool) as control:
                health = await _wait_ready(control, proc, log_path)
                nbd_socket = Path(health["nbd"]["unix"])
                event(f"daemon up on the throw-away pool {pool}")
                await control.create_volume(VOLUME, size, method="cow")
                seeded = await _seed(nbd_socket, new, rng)
                seed = {w.name: bytes(w.model) for w in new}
                event(f"volume {VOLUME}: {format_size(size)}, cow; {format_size(seeded)} of data "
                      f"written where the new sessions will write later")
                event(f"{old_count} writers start their transactions")

                # Old sessions: already writing when the preserve comes; each ends later.
                warm_until = time.perf_counter() + WARMUP
                old_tasks = []
                for i, w in enumerate(old):
                    ends = warm_until + FIRST_FINISH + i * STAGGER
                    old_tasks.append(asyncio.create_task(
                        _write_until(w, nbd_socket, ends, timeline, random.Random(rng.random()))))
                await asyncio.sleep(WARMUP)

                timeline.preserve_sent = time.perf_counter()
                preserved = await control.preserve(VOLUME)
                timeline.preserve_done = time.perf_counter()
                image_name = str(preserved["image"])
                event(f"preserve {VOLUME} -> {image_name} in "
                      f"{(timeline.preserve_done - timeline.preserve_sent) * 1000:.1f} ms; "
                      f"{old_count} old sessions keep writing, {new_count} new sessions start")

                stop_new = asyncio.Event()
                new_tasks = [asyncio.create_task(_write_until(
                    w, nbd_socket, stop_new, timeline, random.Random(rng.random())))
                    for w in new]

                waiter = asyncio.create_task(control.wait(image_name, timeout=30))
                done_old: set[str] = set()
                while not waiter.done():
                    with contextlib.suppress(OwmError):
                        view.image = await control.image(image_name)
                    for w in old:
                        if w.state.startswith("done") and w.name not in done_old:
                            done_old.add(w.name)
                            event(f"{w.name} finished its transaction and disconnected")
                    await asyncio.wait({waiter}, timeout=0.1)
                for t in old_tasks:
                    await t  # surface a writer's failure
                result = waiter.result()
                if not result.get("drained"):
                    raise DemoFailed(f"{image_name} did not drain within 30 seconds")
                timeline.drained = time.perf_counter()
                for w in old:
                    if w.name not in done_old:
                        event(f"{w.name} finished its transaction and disconnected")
                view.image = result.get("status") or view.image
                event(f"{image_name} drained "
                      f"{timeline.drained - timeline.preserve_done:.2f}s after the preserve, "
                      "while the new sessions never stopped")
                await asyncio.sleep(TAIL)
                stop_new.set()
                for t in new_tasks:
                    await t

                # The check: the image holds exactly the old sessions' writes...
                image = await _read_all(nbd_socket, image_name, size)
                for w in old + new:
                    want = w.model if w.generation == "old" else seed[w.name]
                    bad = _first_difference(image[w.offset:w.offset + REGION], want)
                    if bad is not None:
                        raise DemoFailed(
                            f"{image_name} differs from what the old sessions wrote at byte "
                            f"{w.offset + bad} (region of {w.name})")
                event(f"{image_name} read back over NBD: every old session's write is there, "
                      "no new session's write is (what they overwrote was copied aside)")
                # ...and the live volume holds everyone's.
                live_data = await _read_all(nbd_socket, VOLUME, size)
                for w in old + new:
                    bad = _first_difference(live_data[w.offset:w.offset + REGION], w.model)
                    if bad is not None:
                        raise DemoFailed(f"the live volume differs at byte {w.offset + bad} "
                                         f"(region of {w.name})")
                event("live volume read back: it holds the writes of old and new sessions")

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
        shutil.rmtree(workdir, ignore_errors=True)

    assert timeline.preserve_sent is not None and timeline.preserve_done is not None
    assert timeline.drained is not None
    firsts = [w.first_ack_at - timeline.preserve_sent for w in new if w.first_ack_at]
    new_lat = [x for w in new for x in w.latencies]
    old_lat = [x for w in old for x in w.latencies]
    before = [x for w in old for x in w.latencies_before_preserve]
    return {
        "volume": VOLUME, "image": image_name, "volume_size": size,
        "old_sessions": old_count, "new_sessions": new_count,
        "preserve_ms": _ms(timeline.preserve_done - timeline.preserve_sent),
        "preserve_ms_in_daemon": preserved.get("preserve_ms"),
        "new_sessions_first_write_ms": _ms(max(firsts) if firsts else None),
        "new_sessions_max_write_ms": _ms(max(new_lat) if new_lat else None),
        "new_sessions_p99_write_ms": _ms(_p99(new_lat)),
        "old_sessions_max_write_ms": _ms(max(old_lat) if old_lat else None),
        "p99_write_ms_before_preserve": _ms(_p99(before)),
        "drained_after_s": round(timeline.drained - timeline.preserve_done, 3),
        "bytes_old_sessions_total": sum(w.bytes_written for w in old),
        "bytes_to_image_after_preserve": sum(w.bytes_after_preserve for w in old),
        "bytes_new_sessions_live_only": sum(w.bytes_written for w in new),
        "image_bytes_on_disk": on_disk,
        "image_verified": True, "live_verified": True,
        "seconds": round(time.perf_counter() - timeline.started, 2),
    }


def _summary_table(s: JSON) -> Table:
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("preserve (the only moment anything waited)",
                  f"{s['preserve_ms']:.1f} ms round trip, {s['preserve_ms_in_daemon']} ms in "
                  "the daemon")
    table.add_row("new sessions: first write acknowledged",
                  f"{s['new_sessions_first_write_ms']} ms after the preserve was sent "
                  "(connect included)")
    table.add_row("new sessions: write latency", f"p99 {s['new_sessions_p99_write_ms']} ms, "
                  f"max {s['new_sessions_max_write_ms']} ms (p99 before the preserve: "
                  f"{s['p99_write_ms_before_preserve']} ms)")
    table.add_row(f"{s['image']} drained", f"{s['drained_after_s']} s after the preserve, as "
                  "the last old session finished")
    table.add_row(f"old sessions -> {s['image']} and live",
                  f"{format_size(s['bytes_to_image_after_preserve'])} after the preserve "
                  f"({format_size(s['bytes_old_sessions_total'])} in all)")
    table.add_row("new sessions -> live only", format_size(s["bytes_new_sessions_live_only"]))
    table.add_row(f"{s['image']} on disk before release", format_size(s["image_bytes_on_disk"]))
    table.add_row("checks", f"{s['image']} = old sessions' writes exactly; live = everyone's")
    table.add_row("whole demo", f"{s['seconds']} s")
    return table


async def _bounded(old_count: int, new_count: int, console: Console | None) -> JSON:
    """The demo, stopped with a plain error if it ever hangs (a broken daemon, say)."""
    try:
        async with asyncio.timeout(DEMO_TIME_LIMIT):
            return await _demo(old_count, new_count, console)
    except TimeoutError:
        raise DemoFailed(f"the demo did not finish within {DEMO_TIME_LIMIT:.0f} seconds") from None


def run_demo(old_sessions: int = 4, new_sessions: int = 3, quiet: bool = False) -> JSON:
    """Run the demo (blocking); print it unless ``quiet``; return the summary."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = None if quiet else Console(highlight=False, width=120 if wide else None)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        summary = asyncio.run(_bounded(old_sessions, new_sessions, console))
    else:
        summary = uvloop.run(_bounded(old_sessions, new_sessions, console))
    if console is not None:
        console.print(_summary_table(summary))
    return dict(summary)
