"""The bank checker against a ledger of committed transfers: an all-zero or stale image is never
"consistent", and ``--generation N`` checks that image N holds exactly the committed transfers of
generations <= N.  Through the command line (``python -m owm.txn.checker`` as a subprocess) on
hand-built images, and end to end on a real daemon: a preserved image of a busy bank and its raw
backup pass for their own generation and fail for a later one (a stale copy)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

from backup_helpers import ok
from conftest import REPO, Daemon, cli_env

from owm.control.client import ControlClient
from owm.locks.app import LockSpace
from owm.nbd.client import NbdClient
from owm.txn.bank import (
    SECTOR,
    Account,
    Bank,
    Durations,
    Transfer,
    decode_account,
    encode_account,
    load_ledger,
)
from owm.txn.checker import check_image, committed_through, read_export
from owm.txn.coordinator import Coordinator

ACCOUNTS = 8


def checker(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "owm.txn.checker", *map(str, args)],
                          capture_output=True, text=True, timeout=60, env=cli_env(), cwd=REPO,
                          stdin=subprocess.DEVNULL)


def bank_files(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """A ledger of four committed transfers (1, 2 of generation 0; 3, 4 of generation 1) and
    three images: all zeroes, after generation 0 only (image @0), after both (the live one)."""
    data = bytearray(ACCOUNTS * SECTOR)
    bank = Bank(ACCOUNTS)
    after_zero = b""

    def account(n: int) -> Account:
        return decode_account(bytes(data[n * SECTOR:(n + 1) * SECTOR]), n)

    for tid, (src, dst, gen) in enumerate([(0, 1, 0), (2, 3, 0), (1, 2, 1), (4, 5, 1)], start=1):
        if tid == 3:
            after_zero = bytes(data)
        a, b = account(src), account(dst)
        bank.ledger[tid] = Transfer(tid, src, dst, 10, a.seq, b.seq, gen, "w", 0.0, "committed")
        data[src * SECTOR:(src + 1) * SECTOR] = encode_account(
            Account(src, a.balance - 10, a.seq + 1, tid))
        data[dst * SECTOR:(dst + 1) * SECTOR] = encode_account(
            Account(dst, b.balance + 10, b.seq + 1, tid))
    ledger = tmp / "ledger.jsonl"
    bank.save_ledger(ledger)
    zero, old, live = tmp / "zero.raw", tmp / "old.raw", tmp / "live.raw"
    zero.write_bytes(bytes(ACCOUNTS * SECTOR))
    old.write_bytes(after_zero)
    live.write_bytes(bytes(data))
    return ledger, zero, old, live


def test_an_all_zero_image_is_not_consistent_with_committed_transfers(tmp_path: Path) -> None:
    ledger, zero, old, live = bank_files(tmp_path)
    result = checker(zero, "--ledger", ledger)
    assert result.returncode == 1, result
    assert "INCONSISTENT" in result.stdout and "none of the ledger's 4 committed" in result.stdout
    assert "consistent:" not in result.stdout
    # Images that hold some of them still pass the rules that need no expectation.
    assert checker(old, "--ledger", ledger).returncode == 0
    assert checker(live, "--ledger", ledger).returncode == 0


def test_generation_n_wants_exactly_the_transfers_of_generations_up_to_n(tmp_path: Path) -> None:
    ledger, zero, old, live = bank_files(tmp_path)
    good = checker(old, "--ledger", ledger, "--generation", "0")
    assert good.returncode == 0 and good.stdout.startswith("consistent: "), good
    stale = checker(old, "--ledger", ledger, "--generation", "1")
    assert stale.returncode == 1 and "should be in the image are not" in stale.stdout, stale
    assert checker(live, "--ledger", ledger, "--generation", "1").returncode == 0
    newer = checker(live, "--ledger", ledger, "--generation", "0")
    assert newer.returncode == 1 and "should not be in the image" in newer.stdout
    for n in ("0", "1"):
        blank = checker(zero, "--ledger", ledger, "--generation", n)
        assert blank.returncode == 1 and "INCONSISTENT" in blank.stdout
    # Mistakes are one plain line from argparse, never a traceback.
    bad = checker(old, "--generation", "0", "--accounts", "8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--ledger" in bad.stderr


def test_an_empty_expectation_is_still_allowed(tmp_path: Path) -> None:
    """Image N taken before any transfer of generations <= N committed holds none: right."""
    ledger, zero, _, _ = bank_files(tmp_path)
    _, entries = load_ledger(ledger)
    for entry in entries.values():
        entry.generation += 5
    assert committed_through(entries, 4) == set()
    assert check_image(zero.read_bytes(), ACCOUNTS, ledger=entries, expect=set()).ok
    assert not check_image(zero.read_bytes(), ACCOUNTS, ledger=entries).ok


async def _busy_bank(daemon: Daemon, bank: Bank) -> str:
    """Run transfers on the bank, preserve in the middle, finish; returns the image name."""
    control = ControlClient(daemon.pool)
    await control.create_volume("bank", bank.size, chunk_size="4K")
    sock = str(daemon.nbd_socket)
    c = Coordinator(lambda: NbdClient.connect("bank", unix_path=sock), LockSpace(), 4)
    await c.start()
    rng = random.Random(7)
    try:
        for _ in range(40):
            src, dst = rng.sample(range(bank.accounts), 2)
            await c.submit(bank.transfer(src, dst, 5))

        async def split() -> str:
            return str((await control.preserve("bank"))["image"])

        handover = await c.preserve(split)
        assert await handover.wait_old_closed(10)
        for _ in range(40):
            src, dst = rng.sample(range(bank.accounts), 2)
            await c.submit(bank.transfer(src, dst, 5))
        assert (await control.wait(handover.image, timeout=10))["drained"]
        return handover.image
    finally:
        await c.close()
        await control.close()


def test_a_backup_of_image_n_passes_for_n_and_fails_as_a_stale_copy(daemon: Daemon,
                                                                     short_tmp: Path) -> None:
    bank = Bank(32, durations=Durations(0.0, 0.001, 0.0, 0.0), seed=1)
    image = asyncio.run(_busy_bank(daemon, bank))
    assert image == "bank@0"
    assert {t.generation for t in bank.ledger.values()} == {0, 1}
    ledger = short_tmp / "ledger.jsonl"
    bank.save_ledger(ledger)
    raw = short_tmp / "bank-0.raw"
    ok(daemon.owm("backup", image, "--to", raw))
    data = asyncio.run(read_export(image, bank.size, unix_path=str(daemon.nbd_socket)))
    assert raw.read_bytes()[:bank.size] == data
    assert checker(raw, "--ledger", ledger, "--generation", "0").returncode == 0
    stale = checker(raw, "--ledger", ledger, "--generation", "1")
    assert stale.returncode == 1 and "should be in the image are not" in stale.stdout
    live = f"nbd+unix:///bank?socket={daemon.nbd_socket}"
    assert checker(live, "--ledger", ledger, "--generation", "1").returncode == 0
    blank = short_tmp / "blank.raw"
    blank.write_bytes(bytes(bank.size))
    assert checker(blank, "--ledger", ledger).returncode == 1
