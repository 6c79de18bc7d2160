#!/usr/bin/env python3
"""The disruption benchmark: a backup of a busy bank taken three ways, side by side.

The same bank workload (``owm.txn.bank``: transfers as two separate block writes under both
accounts' locks; by default 16 workers, Poisson arrivals, 1% of transfers lasting 2 s) runs
through the transaction coordinator against a real ``owm serve``, and in the middle of it a
backup is taken:

* **owm**: ``preserve``; the transfers running then finish on their old sessions (image A),
  every transfer after it starts on new sessions (B) at once (``Coordinator.preserve``).
* **quiesce** (the prior art, Figure 3B): stop starting transfers, wait for every running one
  to finish, take a point-in-time copy (``preserve --instant`` of the idle volume), resume
  (``Coordinator.quiesce``).
* **instant** (QEMU fleecing, LVM, dm-snapshot): ``preserve --instant`` while the workers
  carry on; every session is cut over at that instant and the image is whatever was on disk.

After each run the image is backed up to a raw file (``owm.backup.run_backup``) and the
consistency checker (``owm.txn.checker``) reads the backup.  Per method the table gives: how many
backups passed the checker; the longest and the p99 wait of the transfers that arrived in the
backup window (the ``--window`` seconds after the backup started; wait = arrival to start, less
any time queued behind another transfer's account lock, which is the workload's own business);
the throughput dip (1 - transfers completed in the second after the backup started / in the
second before); torn transfers in the backup; and the time the coordinator could start nothing.
Runs of the three methods are interleaved so that drift hits them alike.  ``--methods
owm-gate`` adds the coordinator's gate handover (nothing starts from the preserve until the
first new session is open), whose no-start time is the preserve plus one connection.

The two-volume bank (``owm.txn.ledger``: accounts on one volume, an append-only ledger of
transfers on another; a transfer debits, appends its entry, works, credits) runs the same way
with ``--methods owm-2vol,quiesce-2vol,instant-2vol``: **owm-2vol** is a group preserve of
both volumes through the coordinator (one session per volume per worker); **quiesce-2vol**
stops both, waits, takes an instant image of each, resumes; **instant-2vol** takes
``preserve --instant`` of the accounts volume and then of the ledger volume, one after the
other, the way most tools snapshot several volumes.  The checker (``check_set``) reads the two
backups against each other: every ledger entry applied on both accounts, nothing else.

    .venv/bin/python bench/disruption.py [--runs 20] [--workers 16] [--rate 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from owm.backup import run_backup  # noqa: E402
from owm.control.client import ControlClient  # noqa: E402
from owm.locks.app import LockSpace  # noqa: E402
from owm.nbd.client import NbdClient  # noqa: E402
from owm.txn.bank import Bank, Durations, arrivals  # noqa: E402
from owm.txn.checker import check_image, read_file  # noqa: E402
from owm.txn.coordinator import Coordinator, TxnRecord  # noqa: E402
from owm.txn.ledger import LedgerBank, check_set  # noqa: E402

METHODS = ("owm", "quiesce", "instant", "owm-gate", "owm-2vol", "quiesce-2vol", "instant-2vol")
DEFAULT_METHODS = "owm,quiesce,instant"
JSON = dict[str, Any]


@dataclass
class Run:
    """One backup taken one way, and what it cost."""

    method: str
    index: int
    consistent: bool = False
    checker: str = ""
    torn: int = 0
    arrived_in_window: int = 0
    longest_wait_ms: float = 0.0
    p99_wait_ms: float = 0.0
    dip: float = 0.0
    no_start_ms: float = 0.0
    preserve_ms: float = 0.0
    running_at_backup: int = 0
    ready_after_s: float = 0.0
    transfers: int = 0
    lock_waits_over_10ms: int = 0
    extra: JSON = field(default_factory=dict)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


@contextlib.contextmanager
def daemon(pool: Path) -> Iterator[None]:
    log = open(pool.parent / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen", "none",
         "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def wait_ready(control: ControlClient) -> JSON:
    for _ in range(400):
        with contextlib.suppress(Exception):
            health: JSON = await control.health()
            return health
        await asyncio.sleep(0.05)
    raise SystemExit("the daemon did not start")


def measure(run: Run, records: list[TxnRecord], t0: float, window: float) -> None:
    arrived = [r for r in records if t0 <= r.arrived < t0 + window]
    waits = [r.system_wait for r in arrived if r.system_wait is not None]
    run.extra["never_started"] = sum(1 for r in arrived if r.started is None)
    run.arrived_in_window = len(arrived)
    run.longest_wait_ms = max(waits, default=0.0) * 1000
    run.p99_wait_ms = p99(waits) * 1000
    run.lock_waits_over_10ms = sum(1 for r in arrived if r.lock_blocked > 0.01)
    done = [r.finished for r in records if r.ok and r.finished is not None]
    before = sum(1 for f in done if t0 - 1.0 <= f < t0)
    after = sum(1 for f in done if t0 <= f < t0 + 1.0)
    run.dip = 1.0 - after / before if before else 0.0
    run.transfers = len(done)


async def one_run(control: ControlClient, sock: str, method: str, index: int,
                  args: argparse.Namespace, workdir: Path) -> Run:
    run = Run(method, index)
    volume = f"bank-{method}-{index}"
    bank = Bank(args.accounts, durations=Durations(
        args.short_min, args.short_max, args.long_fraction, args.long_seconds),
        seed=index * 7919 + METHODS.index(method))
    await control.create_volume(volume, bank.size, chunk_size=args.chunk_size)
    coordinator = Coordinator(lambda: NbdClient.connect(volume, unix_path=sock), LockSpace(),
                              args.workers)
    await coordinator.start()
    stop = False
    driver = asyncio.create_task(arrivals(coordinator, bank.random_transfer, args.rate,
                                          lambda: stop, random.Random(index)))
    await asyncio.sleep(args.warmup)

    async def split(instant: bool = False) -> str:
        return str((await control.preserve(volume, instant=instant))["image"])

    t0 = coordinator.clock()
    run.running_at_backup = coordinator.running
    expect: set[int] | None = None
    if method.startswith("owm"):
        handover = await coordinator.preserve(split, mode="gate" if method == "owm-gate"
                                              else "overlap")
        image = handover.image
        run.no_start_ms = handover.no_start_s * 1000
        run.preserve_ms = handover.preserve_ms
        run.extra["connect_ms"] = round(handover.connect_ms, 2)
        await handover.wait_old_closed(args.long_seconds + 30)
        await control.wait(image, timeout=30)
        run.ready_after_s = coordinator.clock() - t0
    elif method == "quiesce":
        before_copy: list[int] = []

        async def copy() -> str:
            before_copy.extend(t.id for t in bank.ledger.values())
            return await split(instant=True)

        quiesce = await coordinator.quiesce(copy)
        image = quiesce.result
        run.no_start_ms = quiesce.no_start_s * 1000
        run.ready_after_s = quiesce.resumed - t0
        expect = set(before_copy)
    else:
        started = coordinator.clock()
        image = await split(instant=True)
        run.preserve_ms = (coordinator.clock() - started) * 1000
        run.ready_after_s = coordinator.clock() - t0

    rest = t0 + args.window - coordinator.clock()
    if rest > 0:
        await asyncio.sleep(rest)
    stop = True
    tasks = await driver
    # Every transfer that arrived in the window must have started before it is measured (a
    # quiesce leaves a backlog); the ones still running then (long ones started late) do not
    # matter to the image: cut them short so that a run does not wait for them.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        r.started is None and r.ok is None for r in coordinator.records
        if r.arrived < t0 + args.window
    ):
        await asyncio.sleep(0.01)
    grace = asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(grace), 0.2)
    for task in tasks:
        task.cancel()
    await grace
    await coordinator.close(timeout=10)
    measure(run, coordinator.records, t0, args.window)

    if method.startswith("owm"):
        expect = {t.id for t in bank.ledger.values() if t.generation == 0}
    raw = workdir / f"{volume}.raw"
    await run_backup(control, image, raw, fmt="raw", force=True)
    report = check_image(read_file(raw, bank.size), bank.accounts, bank.opening, bank.ledger,
                         expect=expect)
    raw.unlink()
    run.consistent = report.ok
    run.checker = report.summary()
    run.torn = len(report.torn)
    await control.release(image)
    await control.delete_volume(volume)
    return run


async def _finish(coordinator: Coordinator, driver: asyncio.Task[Any], t0: float,
                  window: float) -> None:
    """Stop the arrivals at the end of the window, as ``one_run`` does."""
    tasks = await driver
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        r.started is None and r.ok is None for r in coordinator.records if r.arrived < t0 + window
    ):
        await asyncio.sleep(0.01)
    grace = asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(grace), 0.2)
    for task in tasks:
        task.cancel()
    await grace
    await coordinator.close(timeout=10)


async def one_run_two_volumes(control: ControlClient, sock: str, method: str, index: int,
                              args: argparse.Namespace, workdir: Path) -> Run:
    """One run of the two-volume bank: a group preserve, a quiesce of both, or instant
    images of the two volumes one after the other."""
    run = Run(method, index)
    accounts, ledger, group = (f"{k}-{method}-{index}" for k in ("acct", "ledg", "g"))
    capacity = int(args.rate * (args.warmup + args.window + args.long_seconds + 10)) + 100
    bank = LedgerBank(args.accounts, durations=Durations(
        args.short_min, args.short_max, args.long_fraction, args.long_seconds),
        seed=index * 7919 + METHODS.index(method), accounts_volume=accounts,
        ledger_volume=ledger, capacity=capacity)
    await control.create_volume(accounts, bank.size, chunk_size=args.chunk_size)
    await control.create_volume(ledger, bank.ledger_size, chunk_size=args.chunk_size)
    await control.request("POST", "/v1/groups", {"name": group, "members": [accounts, ledger]})
    coordinator = Coordinator(
        {accounts: lambda: NbdClient.connect(accounts, unix_path=sock),
         ledger: lambda: NbdClient.connect(ledger, unix_path=sock)}, LockSpace(), args.workers)
    await coordinator.start()
    stop = False
    driver = asyncio.create_task(arrivals(coordinator, bank.random_transfer, args.rate,
                                          lambda: stop, random.Random(index)))
    await asyncio.sleep(args.warmup)

    async def instant(volume: str) -> str:
        return str((await control.preserve(volume, instant=True))["image"])

    t0 = coordinator.clock()
    run.running_at_backup = coordinator.running
    set_name: str | None = None
    if method == "owm-2vol":
        async def split() -> str:
            return str((await control.request("POST", f"/v1/groups/{group}/preserve",
                                              {}))["name"])

        handover = await coordinator.preserve(split)
        set_name = handover.image
        run.no_start_ms = handover.no_start_s * 1000
        run.preserve_ms = handover.preserve_ms
        await handover.wait_old_closed(args.long_seconds + 30)
        waited = await control.request("POST", f"/v1/sets/{set_name}/wait", {"timeout": 30})
        images = {m["volume"]: m["name"] for m in waited["status"]["members"]}
        run.ready_after_s = coordinator.clock() - t0
    elif method == "quiesce-2vol":
        async def copy() -> dict[str, str]:
            return {accounts: await instant(accounts), ledger: await instant(ledger)}

        quiesce = await coordinator.quiesce(copy)
        images = quiesce.result
        run.no_start_ms = quiesce.no_start_s * 1000
        run.ready_after_s = quiesce.resumed - t0
    else:
        started = coordinator.clock()
        images = {accounts: await instant(accounts)}
        images[ledger] = await instant(ledger)
        run.preserve_ms = (coordinator.clock() - started) * 1000
        run.ready_after_s = coordinator.clock() - t0

    rest = t0 + args.window - coordinator.clock()
    if rest > 0:
        await asyncio.sleep(rest)
    stop = True
    await _finish(coordinator, driver, t0, args.window)
    measure(run, coordinator.records, t0, args.window)

    data = {}
    for volume, image in images.items():
        raw = workdir / f"{volume}.raw"
        await run_backup(control, image, raw, fmt="raw", force=True)
        size = bank.size if volume == accounts else bank.ledger_size
        data[volume] = read_file(raw, size)
        raw.unlink()
    report = check_set(data[accounts], data[ledger], bank.accounts, bank.opening)
    run.consistent = report.ok
    if method == "owm-2vol":  # and exactly the transfers that started before the cut
        run.consistent = report.ok and set(report.applied) == {
            t.id for t in bank.ledger.values() if t.generation == 0}
    run.checker = report.summary()
    run.torn = len(report.torn)
    if set_name is not None:
        await control.request("POST", f"/v1/sets/{set_name}/release", timeout=None)
    else:
        for image in images.values():
            await control.release(image)
    await control.request("DELETE", f"/v1/groups/{group}")
    await control.delete_volume(accounts)
    await control.delete_volume(ledger)
    return run


def summarise(runs: list[Run]) -> list[JSON]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue

        def med(key: str, rs: list[Run] = mine) -> float:
            return float(statistics.median(getattr(r, key) for r in rs))

        def worst(key: str, rs: list[Run] = mine) -> float:
            return float(max(getattr(r, key) for r in rs))

        rows.append({
            "method": method, "runs": len(mine),
            "consistent": sum(r.consistent for r in mine),
            "longest_wait_ms_median": round(med("longest_wait_ms"), 1),
            "longest_wait_ms_worst": round(worst("longest_wait_ms"), 1),
            "p99_wait_ms_median": round(med("p99_wait_ms"), 1),
            "p99_wait_ms_worst": round(worst("p99_wait_ms"), 1),
            "dip_median": round(med("dip"), 3), "dip_worst": round(worst("dip"), 3),
            "torn_median": med("torn"), "torn_max": worst("torn"),
            "runs_with_torn": sum(1 for r in mine if r.torn),
            "no_start_ms_median": round(med("no_start_ms"), 1),
            "no_start_ms_worst": round(worst("no_start_ms"), 1),
            "preserve_ms_median": round(med("preserve_ms"), 2),
            "arrived_in_window_median": med("arrived_in_window"),
            "running_at_backup_median": med("running_at_backup"),
            "ready_after_s_median": round(med("ready_after_s"), 2),
        })
    return rows


def markdown(rows: list[JSON], args: argparse.Namespace) -> str:
    out = [
        f"{args.workers} workers, {args.rate:g} transfers/s arriving (Poisson), "
        f"{args.long_fraction:.0%} lasting {args.long_seconds:g} s, others "
        f"{args.short_min * 1000:g}–{args.short_max * 1000:g} ms; {args.accounts} accounts; "
        f"backup window {args.window:g} s. Median over runs (worst run in brackets).",
        "",
        "| method | backups consistent | longest wait | p99 wait | throughput dip | "
        "torn transfers in backup | time nothing could start |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torn = (f"{r['torn_median']:g} ({r['torn_max']:g}); {r['runs_with_torn']}/{r['runs']} "
                "runs" if r["runs_with_torn"] else "0")
        out.append(
            f"| {r['method']} | {r['consistent']}/{r['runs']} "
            f"| {r['longest_wait_ms_median']:g} ms ({r['longest_wait_ms_worst']:g}) "
            f"| {r['p99_wait_ms_median']:g} ms ({r['p99_wait_ms_worst']:g}) "
            f"| {r['dip_median']:.0%} ({r['dip_worst']:.0%}) "
            f"| {torn} "
            f"| {r['no_start_ms_median']:g} ms ({r['no_start_ms_worst']:g}) |"
        )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> list[Run]:
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="owm-disrupt-", dir=base))
    pool = workdir / "pool"
    runs: list[Run] = []
    methods = [m for m in METHODS if m in args.methods.split(",")]
    started = time.monotonic()
    try:
        with daemon(pool):
            async with ControlClient(pool) as control:
                health = await wait_ready(control)
                sock = str(health["nbd"]["unix"])
                for index in range(args.runs):
                    for method in methods:
                        one = one_run_two_volumes if method.endswith("-2vol") else one_run
                        run = await one(control, sock, method, index, args, workdir)
                        runs.append(run)
                        print(f"[{time.monotonic() - started:6.1f}s] {method:8} run {index + 1:2}:"
                              f" longest wait {run.longest_wait_ms:7.1f} ms, p99 "
                              f"{run.p99_wait_ms:6.1f} ms, dip {run.dip:5.0%}, "
                              f"{'consistent' if run.consistent else 'INCONSISTENT'}"
                              f" ({run.torn} torn)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per method")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--rate", type=float, default=300.0, help="transfers arriving per second")
    parser.add_argument("--accounts", type=int, default=65536)
    parser.add_argument("--short-min", type=float, default=0.001)
    parser.add_argument("--short-max", type=float, default=0.005)
    parser.add_argument("--long-fraction", type=float, default=0.01)
    parser.add_argument("--long-seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.2, help="seconds before the backup")
    parser.add_argument("--window", type=float, default=2.0,
                        help="seconds after the backup starts whose arrivals are measured")
    parser.add_argument("--chunk-size", default="64K")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"any of {', '.join(METHODS)} (owm-gate: the handover that stops "
                             "starting transactions until the first new session is open)")
    parser.add_argument("--dir", help="where the pool goes (default: the temp dir)")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runs = asyncio.run(main_async(args))
    else:
        runs = uvloop.run(main_async(args))
    rows = summarise(runs)
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "summary": rows, "runs": [asdict(r) for r in runs],
        }, indent=2, default=str) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
