"""The two-volume bank through a real daemon: accounts on one volume, the ledger on another.

With a group preserve mid-run (through the coordinator, one session per volume per worker) the
backup set, restored, passes ``check_set``: every ledger entry applied exactly, nothing else.
Images of the two volumes taken one after the other (``preserve --instant`` of each) show the
torn transfer that a group preserve keeps whole.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from cli_helpers import ok
from conftest import Daemon

from owm.control.client import ControlClient
from owm.locks.app import LockSpace
from owm.nbd.client import NbdClient
from owm.txn.bank import Durations
from owm.txn.checker import read_export
from owm.txn.coordinator import Connect, Coordinator
from owm.txn.ledger import LedgerBank, check_set


async def _setup(daemon: Daemon, bank: LedgerBank, workers: int) -> tuple[ControlClient,
                                                                         Coordinator]:
    control = ControlClient(daemon.pool)
    await control.create_volume("accounts", bank.size, chunk_size="4K")
    await control.create_volume("ledger", bank.ledger_size, chunk_size="4K")
    await control.request("POST", "/v1/groups", {"name": "bank",
                                                 "members": ["accounts", "ledger"]})
    sock = str(daemon.nbd_socket)

    def connect(volume: str) -> Connect:
        return lambda: NbdClient.connect(volume, unix_path=sock)

    c = Coordinator({"accounts": connect("accounts"), "ledger": connect("ledger")},
                    LockSpace(), workers)
    await c.start()
    return control, c


async def _group_split(control: ControlClient) -> str:
    return str((await control.request("POST", "/v1/groups/bank/preserve", {}))["name"])


async def test_a_group_preserve_mid_run_gives_a_backup_set_that_checks(
        daemon: Daemon, short_tmp: Path) -> None:
    bank = LedgerBank(64, durations=Durations(0.001, 0.004, 0.05, 0.3), seed=3, capacity=3000)
    control, c = await _setup(daemon, bank, 6)
    sock = str(daemon.nbd_socket)
    stop = False
    try:
        from owm.txn.bank import arrivals

        driver = asyncio.create_task(arrivals(c, bank.random_transfer, 250, lambda: stop,
                                              random.Random(4), limit=2000))
        await asyncio.sleep(0.5)
        handover = await c.preserve(lambda: _group_split(control))
        assert handover.image == "bank@0"
        assert await handover.wait_old_closed(10)
        waited = await control.request("POST", "/v1/sets/bank@0/wait", {"timeout": 10})
        assert waited["drained"] and waited["status"]["consistency"] == "transaction-consistent"
        await asyncio.sleep(0.3)
        stop = True
        tasks = await asyncio.wait_for(driver, 10)
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await c.close()
        old = {t.id for t in bank.ledger.values() if t.generation == 0}
        new = {t.id for t in bank.ledger.values() if t.generation == 1}
        assert len(old) > 30 and len(new) > 30

        repo, restored = short_tmp / "repo", short_tmp / "restored"
        loop = asyncio.get_running_loop()
        ok(await loop.run_in_executor(None, lambda: daemon.owm(
            "backup", "bank@0", "--to", repo, "--verify")))
        ok(await loop.run_in_executor(None, lambda: daemon.owm(
            "restore", repo, "bank@0", "--to", f"{restored}/")))
        report = check_set((restored / "accounts.raw").read_bytes(),
                           (restored / "ledger.raw").read_bytes(), bank.accounts)
        assert report.ok, report.problems
        assert set(report.applied) == old  # exactly the transfers of the old sessions, whole

        live = check_set(await read_export("accounts", bank.size, unix_path=sock),
                         await read_export("ledger", bank.ledger_size, unix_path=sock),
                         bank.accounts)
        assert live.ok and set(live.applied) == old | new, live.problems
    finally:
        stop = True
        await c.close()
        await control.close()


async def test_images_taken_one_after_the_other_tear_what_the_group_keeps_whole(
        daemon: Daemon) -> None:
    bank = LedgerBank(16, seed=5, capacity=64)
    control, c = await _setup(daemon, bank, 2)
    sock = str(daemon.nbd_socket)
    try:
        async def slow_transfer() -> None:
            task = c.submit(bank.transfer(1, 2, 100, duration=0.6))
            for _ in range(400):
                entry = bank.ledger.get(max(bank.ledger, default=0))
                if entry is not None and entry.state == "debited" and not task.done():
                    await asyncio.sleep(0.05)  # its ledger entry is written after the debit
                    return
                await asyncio.sleep(0.005)
            raise AssertionError("the slow transfer never got between its writes")

        # One volume after the other, the way most tools snapshot: the transfer is torn.
        await slow_transfer()
        first = (await control.preserve("accounts", instant=True))["image"]
        second = (await control.preserve("ledger", instant=True))["image"]
        report = check_set(await read_export(first, bank.size, unix_path=sock),
                           await read_export(second, bank.ledger_size, unix_path=sock),
                           bank.accounts)
        assert not report.ok and report.torn == [1], report.problems
        await asyncio.sleep(0.7)

        # A group preserve at the same point of a transfer keeps it whole on both volumes.
        await slow_transfer()
        tid = max(bank.ledger)
        handover = await c.preserve(lambda: _group_split(control))
        assert await handover.wait_old_closed(10)
        status = await control.request("POST", f"/v1/sets/{handover.image}/wait",
                                       {"timeout": 10})
        assert status["drained"]
        images = {m["volume"]: m["name"] for m in status["status"]["members"]}
        report = check_set(await read_export(images["accounts"], bank.size, unix_path=sock),
                           await read_export(images["ledger"], bank.ledger_size,
                                             unix_path=sock), bank.accounts)
        assert report.ok and tid in report.applied, report.problems
    finally:
        await c.close()
        await control.close()
