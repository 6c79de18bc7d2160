"""The transaction coordinator: dispatch, the generation split at a preserve (old transactions
finish on old sessions, new ones start on new sessions, old sessions close when done), both
handover modes, the lock-before-worker rule, quiesce, and the split as the daemon sees it."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from owm.common.errors import WrongState
from owm.control.client import ControlClient
from owm.locks.app import LockSpace
from owm.nbd.client import NbdClient
from owm.txn.coordinator import Coordinator, Transaction, TxnContext
from tests.conftest import Daemon


class FakeSession:
    """Stands in for an NbdClient: it only records that it was opened and closed."""

    ids = itertools.count(1)

    def __init__(self, opened_after_preserve: bool) -> None:
        self.id = next(self.ids)
        self.after_preserve = opened_after_preserve
        self.closed = asyncio.Event()

    async def disconnect(self, timeout: float = 30.0) -> None:
        self.closed.set()

    def abort(self) -> None:
        self.closed.set()


class Fixture:
    def __init__(self, workers: int = 3, connect_delay: float = 0.0) -> None:
        self.preserved = False
        self.sessions: list[FakeSession] = []
        self.connect_delay = connect_delay
        self.locks = LockSpace()
        self.coordinator = Coordinator(self.connect, self.locks, workers)  # type: ignore[arg-type]

    async def connect(self) -> FakeSession:
        if self.connect_delay:
            await asyncio.sleep(self.connect_delay)
        session = FakeSession(self.preserved)
        self.sessions.append(session)
        return session

    async def split(self) -> str:
        await asyncio.sleep(0.01)
        self.preserved = True
        return "vol@0"


def recording(locks: tuple[str, ...], gate: asyncio.Event | None = None) -> Transaction[Any]:
    """A transaction that returns the session it ran on (after ``gate``, if given)."""

    async def body(ctx: TxnContext) -> Any:
        if gate is not None:
            await asyncio.wait_for(gate.wait(), 10)
        await asyncio.sleep(0.001)
        return ctx.nbd, ctx.generation

    return Transaction(locks, body)


async def test_transactions_run_on_the_workers_sessions() -> None:
    f = Fixture(workers=3)
    async with f.coordinator as c:
        results = await asyncio.wait_for(
            asyncio.gather(*(c.run(recording((f"a/{i % 5}",))) for i in range(30))), 10
        )
        assert {session for session, _ in results} <= set(f.sessions)
        assert len(f.sessions) == 3 and {g for _, g in results} == {0}
        assert all(r.ok and r.generation == 0 for r in c.records)
        assert c.running == 0 and c.queued == 0
    assert all(s.closed.is_set() for s in f.sessions)


@pytest.mark.parametrize("mode", ["overlap", "gate"])
async def test_the_generation_split(mode: str) -> None:
    f = Fixture(workers=2)
    c = f.coordinator
    await c.start()
    old_sessions = list(f.sessions)
    hold = asyncio.Event()
    running = c.submit(recording(("x",), hold))  # an old transaction, still running...
    await asyncio.sleep(0.01)
    assert c.running == 1

    handover = await c.preserve(f.split, mode=mode)  # type: ignore[arg-type]
    assert handover.image == "vol@0" and c.generation == 1
    assert handover.old_running_at_switch == 1
    if mode == "gate":
        assert handover.no_start_s >= 0.01  # the split took 10 ms and nothing could start
    else:
        assert handover.no_start_s == 0.0
    # New transactions start at once, on sessions opened after the preserve.
    later = await asyncio.wait_for(
        asyncio.gather(*(c.run(recording((f"y/{i}",))) for i in range(10))), 10
    )
    assert all(session.after_preserve and g == 1 for session, g in later)
    # The idle old worker closed its session at the switch; the busy one is still open...
    assert sum(s.closed.is_set() for s in old_sessions) == 1
    assert not await handover.wait_old_closed(0.05)
    assert c.open_sessions(0) == 1
    # ...until its transaction ends on it.
    hold.set()
    session, generation = await asyncio.wait_for(running, 10)
    assert session in old_sessions and generation == 0
    assert await handover.wait_old_closed(5)
    assert all(s.closed.is_set() for s in old_sessions) and c.open_sessions(0) == 0
    assert handover.as_dict()["old_closed_after_s"] is not None
    assert {w.generation for w in c.workers()} == {1} and len(c.workers()) == 2
    await c.close()
    assert all(s.closed.is_set() for s in f.sessions)


async def test_a_transaction_waiting_for_a_lock_at_the_switch_runs_in_the_new_generation() -> (
    None
):
    f = Fixture(workers=4)
    c = f.coordinator
    await c.start()
    hold = asyncio.Event()
    holder = c.submit(recording(("acct/1",), hold))
    await asyncio.sleep(0.01)
    # Given a worker only after the switch, whatever it was doing before.
    waiter = c.submit(recording(("acct/1", "acct/2")))
    await asyncio.sleep(0.01)
    assert f.locks.waiting("acct/1") == [f"w-txn-{c.records[1].id}"]
    await c.preserve(f.split)
    hold.set()
    assert (await asyncio.wait_for(holder, 10))[1] == 0
    session, generation = await asyncio.wait_for(waiter, 10)
    assert generation == 1 and session.after_preserve
    await c.close()


async def test_gate_mode_lets_the_other_new_sessions_join_as_they_open() -> None:
    f = Fixture(workers=4, connect_delay=0.02)
    c = f.coordinator
    await c.start()
    handover = await c.preserve(f.split, mode="gate")
    assert len(c.workers()) == 1  # the gate opened with the first new session
    assert 0.02 <= handover.no_start_s < 5
    for _ in range(100):
        if len(c.workers()) == 4:
            break
        await asyncio.sleep(0.01)
    assert len(c.workers()) == 4 and all(w.generation == 1 for w in c.workers())
    await c.close()


async def test_one_handover_at_a_time() -> None:
    f = Fixture(workers=1)
    c = f.coordinator
    await c.start()

    async def slow_split() -> str:
        await asyncio.sleep(0.1)
        return "vol@0"

    first = asyncio.create_task(c.preserve(slow_split))
    await asyncio.sleep(0.01)
    with pytest.raises(WrongState):
        await c.preserve(f.split)
    with pytest.raises(WrongState):
        await c.quiesce(f.split)
    await first
    await c.close()


async def test_a_failed_split_leaves_the_old_generation_serving() -> None:
    f = Fixture(workers=2)
    c = f.coordinator
    await c.start()

    async def broken() -> str:
        raise WrongState("no such volume")

    with pytest.raises(WrongState):
        await c.preserve(broken, mode="gate")
    assert c.generation == 0
    assert (await asyncio.wait_for(c.run(recording(("a",))), 5))[1] == 0
    await c.close()


async def test_quiesce_waits_for_running_transactions_and_starts_nothing_meanwhile() -> None:
    f = Fixture(workers=3)
    c = f.coordinator
    await c.start()
    hold = asyncio.Event()
    running = c.submit(recording(("a",), hold))
    await asyncio.sleep(0.01)
    copied: list[int] = []

    async def copy() -> str:
        copied.append(c.running)
        return "copy"

    quiesce = asyncio.create_task(c.quiesce(copy))
    await asyncio.sleep(0.01)
    arriving = c.submit(recording(("b",)))  # arrives during the quiesce: must wait
    await asyncio.sleep(0.05)
    assert not arriving.done() and not copied
    hold.set()
    report = await asyncio.wait_for(quiesce, 10)
    assert copied == [0] and report.result == "copy" and report.running_at_request == 1
    await asyncio.wait_for(arriving, 10)
    assert report.no_start_s >= 0.05
    record = c.records[1]
    assert record.started is not None and record.started >= report.resumed
    await running
    await c.close()


async def test_errors_reach_the_submitter_and_free_the_locks() -> None:
    f = Fixture(workers=2)
    c = f.coordinator
    await c.start()

    async def fails(ctx: TxnContext) -> None:
        raise ValueError("insufficient funds")

    with pytest.raises(ValueError):
        await c.run(Transaction(("a",), fails))
    assert c.records[0].ok is False and "insufficient" in str(c.records[0].error)
    assert f.locks.holder("a") is None
    assert (await c.run(recording(("a",))))[1] == 0
    await c.close()
    with pytest.raises(WrongState):
        c.submit(recording(("a",)))


# ---------------------------------------------------------------------------- a real daemon


async def test_the_daemon_sees_old_and_new_sessions_in_their_generations(daemon: Daemon) -> None:
    async with ControlClient(daemon.pool) as control:
        await control.create_volume("vol", "4M", chunk_size="4K")
        sock = str(daemon.nbd_socket)
        c = Coordinator(lambda: NbdClient.connect("vol", unix_path=sock), LockSpace(), 3)
        await c.start()
        hold = asyncio.Event()

        async def writes(ctx: TxnContext) -> int:
            await ctx.nbd.write(0, b"o" * 4096)
            await asyncio.wait_for(hold.wait(), 20)
            await ctx.nbd.write(4096, b"o" * 4096)
            return ctx.generation

        old = c.submit(Transaction(("x",), writes))
        await asyncio.sleep(0.05)

        async def split() -> str:
            return str((await control.preserve("vol"))["image"])

        handover = await c.preserve(split)

        async def new_write(ctx: TxnContext) -> int:
            await ctx.nbd.write(8192, b"n" * 4096)
            return ctx.generation

        assert await c.run(Transaction(("y",), new_write)) == 1
        for _ in range(100):  # the idle old sessions' disconnects are on their way
            volume = await control.volume("vol")
            sessions = {g["generation"]: len(g["sessions"]) for g in volume["generations"]}
            if sessions.get(0) == 1:
                break
            await asyncio.sleep(0.02)
        assert sessions == {0: 1, 1: 3}  # the running old transaction; three new workers
        image = await control.image(handover.image)
        assert image["state"] == "draining" and image["sessions_left"] == 1
        hold.set()
        assert await asyncio.wait_for(old, 10) == 0
        assert await handover.wait_old_closed(10)
        assert (await control.wait(handover.image, timeout=10))["drained"]
        await c.close()
        reader = await NbdClient.connect(handover.image, unix_path=sock)
        data = await reader.read(0, 3 * 4096)
        await reader.disconnect()
        assert data == b"o" * 8192 + bytes(4096)  # the whole old transaction, nothing newer
