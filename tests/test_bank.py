"""The bank workload and its checker: account records, the checker catching torn transfers, lost
updates and unknown changes, and end to end on a real daemon: the preserved image of a busy bank
holds exactly the transfers of the old generation, whole, while an instant snapshot tears the
transfer it cuts through."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from owm.control.client import ControlClient
from owm.locks.app import LockSpace
from owm.nbd.client import NbdClient
from owm.txn.bank import (
    OPENING,
    SECTOR,
    Account,
    BadSector,
    Bank,
    Durations,
    Transfer,
    arrivals,
    decode_account,
    encode_account,
    load_ledger,
)
from owm.txn.checker import check_image, main, read_export
from owm.txn.coordinator import Coordinator
from tests.conftest import Daemon

# ---------------------------------------------------------------------------- records


def test_account_records() -> None:
    account = Account(7, 1234, 3, 99)
    sector = encode_account(account)
    assert len(sector) == SECTOR and decode_account(sector, 7) == account
    assert decode_account(bytes(SECTOR), 5) == Account(5, OPENING)
    with pytest.raises(BadSector, match="holds account 7"):
        decode_account(sector, 8)
    corrupt = bytearray(sector)
    corrupt[20] ^= 1
    with pytest.raises(BadSector, match="checksum"):
        decode_account(bytes(corrupt), 7)
    with pytest.raises(BadSector, match="magic"):
        decode_account(b"x" * SECTOR, 7)


def test_durations() -> None:
    rng = random.Random(1)
    d = Durations(0.001, 0.002, 0.25, 2.0)
    draws = [d.draw(rng) for _ in range(2000)]
    long = sum(1 for x in draws if x == 2.0)
    assert 400 < long < 600
    assert all(0.001 <= x <= 0.002 for x in draws if x != 2.0)


# ---------------------------------------------------------------------------- the checker


class Image:
    """A bank image built by hand: apply transfers (or half of one) and check."""

    def __init__(self, accounts: int = 8) -> None:
        self.accounts = accounts
        self.data = bytearray(accounts * SECTOR)
        self.ledger: dict[int, Transfer] = {}

    def account(self, n: int) -> Account:
        return decode_account(bytes(self.data[n * SECTOR:(n + 1) * SECTOR]), n)

    def put(self, account: Account) -> None:
        self.data[account.number * SECTOR:(account.number + 1) * SECTOR] = encode_account(account)

    def transfer(self, tid: int, src: int, dst: int, amount: int, *, debit: bool = True,
                 credit: bool = True) -> Transfer:
        a, b = self.account(src), self.account(dst)
        entry = Transfer(tid, src, dst, amount, a.seq, b.seq, 0, "w1", 0.0, "committed")
        self.ledger[tid] = entry
        if debit:
            self.put(Account(src, a.balance - amount, a.seq + 1, tid))
        if credit:
            self.put(Account(dst, b.balance + amount, b.seq + 1, tid))
        return entry


def test_a_consistent_image_passes() -> None:
    img = Image()
    for tid, (s, d) in enumerate([(0, 1), (1, 2), (2, 0), (3, 4), (0, 4)], start=1):
        img.transfer(tid, s, d, 10 * tid)
    report = check_image(img.data, img.accounts, ledger=img.ledger, expect=set(img.ledger))
    assert report.ok, report.problems
    assert sorted(report.applied) == [1, 2, 3, 4, 5] and report.torn == []
    assert report.total == 8 * OPENING and report.touched_accounts == 5
    assert check_image(bytes(8 * SECTOR), 8).ok  # an untouched bank


def test_the_checker_catches_a_torn_transfer() -> None:
    img = Image()
    img.transfer(1, 0, 1, 50)
    img.transfer(2, 2, 3, 70, credit=False)  # the snapshot came between its two writes
    report = check_image(img.data, img.accounts, ledger=img.ledger)
    assert not report.ok and report.torn == [2]
    assert report.total == 8 * OPENING - 70
    assert any("transfer 2" in p and "source only" in p for p in report.problems)
    # Even without a ledger, the money does not add up.
    bare = check_image(img.data, img.accounts)
    assert not bare.ok and "not 8000" in bare.summary()


def test_the_checker_catches_a_lost_update() -> None:
    img = Image()
    before = bytes(img.data)
    img.transfer(1, 0, 1, 30)
    # Transfer 2 read account 0 before transfer 1 wrote it (no lock): it overwrites it.
    img.data[: 2 * SECTOR] = before[: 2 * SECTOR]
    img.transfer(2, 0, 2, 40)
    img.ledger[1].state = "committed"
    img.put(Account(1, OPENING + 30, 1, 1))
    report = check_image(img.data, img.accounts, ledger=img.ledger)
    assert not report.ok
    assert any("lost update" in p for p in report.problems)


def test_the_checker_catches_unknown_changes_and_wrong_sets() -> None:
    img = Image()
    img.transfer(1, 0, 1, 30)
    img.transfer(2, 1, 2, 5)
    img.put(Account(5, OPENING, 1, 77))  # a change no transfer made
    report = check_image(img.data, img.accounts, ledger=img.ledger, expect={1})
    assert not report.ok
    assert any("account 5" in p for p in report.problems)
    assert report.unexpected == [2]
    report = check_image(img.data, img.accounts, ledger=img.ledger, expect={1, 2, 3})
    assert report.missing == [3]


def test_the_checker_reads_raw_files_and_has_a_command_line(tmp_path: Path) -> None:
    img = Image()
    img.transfer(1, 0, 1, 30)
    path = tmp_path / "bank.raw"
    path.write_bytes(bytes(img.data))
    bank = Bank(img.accounts)
    bank.ledger = img.ledger
    bank.save_ledger(tmp_path / "ledger.jsonl")
    header, ledger = load_ledger(tmp_path / "ledger.jsonl")
    assert header["accounts"] == 8 and ledger[1].amount == 30
    assert main([str(path), "--ledger", str(tmp_path / "ledger.jsonl"),
                 "--expect-committed"]) == 0
    img.transfer(2, 2, 3, 9, credit=False)
    path.write_bytes(bytes(img.data))
    assert main([str(path), "--accounts", "8"]) == 1


# ---------------------------------------------------------------------------- end to end


async def _bank_daemon(daemon: Daemon, bank: Bank) -> tuple[ControlClient, Coordinator]:
    control = ControlClient(daemon.pool)
    await control.create_volume("bank", bank.size, chunk_size="4K")
    sock = str(daemon.nbd_socket)
    coordinator = Coordinator(lambda: NbdClient.connect("bank", unix_path=sock), LockSpace(), 8)
    await coordinator.start()
    return control, coordinator


async def test_a_preserved_busy_bank_passes_the_checker(daemon: Daemon) -> None:
    bank = Bank(256, durations=Durations(0.001, 0.004, 0.03, 0.4), seed=3)
    control, c = await _bank_daemon(daemon, bank)
    sock = str(daemon.nbd_socket)
    stop = False
    try:
        driver = asyncio.create_task(
            arrivals(c, bank.random_transfer, 300, lambda: stop, random.Random(4), limit=2000))
        await asyncio.sleep(0.6)

        async def split() -> str:
            return str((await control.preserve("bank"))["image"])

        handover = await c.preserve(split)
        assert await handover.wait_old_closed(10)
        assert (await control.wait(handover.image, timeout=10))["drained"]
        await asyncio.sleep(0.3)
        stop = True
        tasks = await asyncio.wait_for(driver, 10)
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await c.close()

        old = {t.id for t in bank.ledger.values() if t.generation == 0}
        new = {t.id for t in bank.ledger.values() if t.generation == 1}
        assert len(old) > 50 and len(new) > 50
        assert all(t.committed for t in bank.ledger.values())
        image = await read_export(handover.image, bank.size, unix_path=sock)
        report = check_image(image, bank.accounts, ledger=bank.ledger, expect=old)
        assert report.ok, report.problems  # exactly the old transfers, each one whole
        live = await read_export("bank", bank.size, unix_path=sock)
        report = check_image(live, bank.accounts, ledger=bank.ledger, expect=old | new)
        assert report.ok, report.problems  # the live volume equals the ledger
    finally:
        stop = True
        await c.close()
        await control.close()


@pytest.mark.parametrize("instant", [False, True])
async def test_an_instant_snapshot_tears_what_a_preserve_keeps_whole(
    daemon: Daemon, instant: bool
) -> None:
    bank = Bank(16, seed=5)
    control, c = await _bank_daemon(daemon, bank)
    sock = str(daemon.nbd_socket)
    try:
        slow = c.submit(bank.transfer(1, 2, 100, duration=0.5))
        for _ in range(200):
            if bank.ledger and next(iter(bank.ledger.values())).state == "debited":
                break
            await asyncio.sleep(0.005)
        assert bank.ledger[1].state == "debited"  # between its two writes

        async def split() -> str:
            return str((await control.preserve("bank", instant=instant))["image"])

        if instant:
            image_name = await split()  # the workers never hear of it
        else:
            image_name = (await c.preserve(split)).image
        await asyncio.wait_for(slow, 10)
        assert (await control.wait(image_name, timeout=10))["drained"]
        image = await read_export(image_name, bank.size, unix_path=sock)
        report = check_image(image, bank.accounts, ledger=bank.ledger)
        if instant:
            assert report.torn == [1] and not report.ok
            assert (await control.image(image_name))["consistency"] == "crash-consistent"
        else:
            assert report.ok and report.applied == [1]
    finally:
        await c.close()
        await control.close()
