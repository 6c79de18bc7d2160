"""The bank workload: accounts in fixed sectors of a volume, transfers between them.

Account ``i`` lives in sector ``i`` (512 bytes) of the volume.  An all-zero sector is an account
nobody has touched yet, holding the opening balance, so a fresh volume is a bank with every
account open and nothing to load.  A written sector holds a magic, the account number, the
number of transfers applied to it so far (``seq``), the balance, the id of the last transfer,
and a CRC.

A transfer holds the locks of both accounts (``account/N``, taken before it starts), reads both
sectors, writes the debited source, keeps working for its duration, then writes the credited
destination: two separate block writes, so a snapshot taken between them shows a torn transfer.
Every transfer is written into the ledger when it has read its accounts, with the position it
takes in each account's history (the ``seq`` it read); ``owm.txn.checker`` compares images with it.
Durations come from ``Durations``: mostly short, a few long (by default 1% last 2 s).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from owm.txn.coordinator import Coordinator, Transaction, TxnContext

JSON = dict[str, Any]

SECTOR = 512
MAGIC = b"OWMBANK1"
OPENING = 1000
_ACCOUNT = struct.Struct("<8sIQqQ")  # magic, number, seq, balance, last transfer id
_CRC = struct.Struct("<I")


class BadSector(ValueError):
    """A sector that is neither an untouched account nor a valid account record."""


def lock_name(account: int) -> str:
    return f"account/{account}"


@dataclass(frozen=True, slots=True)
class Account:
    number: int
    balance: int
    seq: int = 0  # transfers applied to this account so far
    last: int = 0  # id of the last of them (0: none)


def encode_account(account: Account) -> bytes:
    head = _ACCOUNT.pack(MAGIC, account.number, account.seq, account.balance, account.last)
    return (head + _CRC.pack(zlib.crc32(head))).ljust(SECTOR, b"\0")


def decode_account(sector: bytes | memoryview, number: int, opening: int = OPENING) -> Account:
    """The account stored in ``sector``; an all-zero sector is an untouched account."""
    if len(sector) != SECTOR:
        raise BadSector(f"account {number}: a sector of {len(sector)} bytes")
    if not any(sector):
        return Account(number, opening)
    head = bytes(sector[: _ACCOUNT.size])
    magic, stored, seq, balance, last = _ACCOUNT.unpack(head)
    (crc,) = _CRC.unpack_from(sector, _ACCOUNT.size)
    if magic != MAGIC:
        raise BadSector(f"account {number}: not an account record (bad magic)")
    if crc != zlib.crc32(head):
        raise BadSector(f"account {number}: the record's checksum is wrong")
    if stored != number:
        raise BadSector(f"account {number}: the sector holds account {stored}")
    return Account(number, balance, seq, last)


@dataclass
class Durations:
    """How long transfers work between their two writes: uniform short, a fraction long."""

    short_min: float = 0.001
    short_max: float = 0.005
    long_fraction: float = 0.01
    long_seconds: float = 2.0

    def draw(self, rng: random.Random) -> float:
        if self.long_fraction > 0 and rng.random() < self.long_fraction:
            return self.long_seconds
        return rng.uniform(self.short_min, self.short_max)


@dataclass
class Transfer:
    """One ledger entry: a transfer and the position it took in each account's history."""

    id: int
    src: int
    dst: int
    amount: int
    src_seq: int  # the source's seq it read: it is change number src_seq of the source
    dst_seq: int
    generation: int
    worker: str
    duration: float
    state: str = "read"  # read -> debited -> committed (or stays where it failed)

    @property
    def committed(self) -> bool:
        return self.state == "committed"


@dataclass
class Bank:
    """A bank of ``accounts`` accounts on a volume, and the ledger of its transfers."""

    accounts: int
    opening: int = OPENING
    durations: Durations = field(default_factory=Durations)
    seed: int = 0
    max_amount: int = 100
    ledger: dict[int, Transfer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accounts < 2:
            raise ValueError("a bank needs at least two accounts")
        self.rng = random.Random(self.seed)
        self._next_id = 1

    @property
    def size(self) -> int:
        """Bytes of volume the accounts take."""
        return self.accounts * SECTOR

    @property
    def total(self) -> int:
        return self.accounts * self.opening

    @staticmethod
    def offset(account: int) -> int:
        return account * SECTOR

    def transfer(
        self, src: int, dst: int, amount: int, duration: float | None = None
    ) -> Transaction[Transfer]:
        """A transfer of up to ``amount`` (no more than the source holds) from src to dst."""
        if src == dst or not (0 <= src < self.accounts and 0 <= dst < self.accounts):
            raise ValueError("a transfer needs two different accounts of the bank")
        txn_id = self._next_id
        self._next_id += 1
        work = self.durations.draw(self.rng) if duration is None else duration

        async def body(ctx: TxnContext) -> Transfer:
            raw_src, raw_dst = await asyncio.gather(
                ctx.nbd.read(self.offset(src), SECTOR), ctx.nbd.read(self.offset(dst), SECTOR)
            )
            a = decode_account(raw_src, src, self.opening)
            b = decode_account(raw_dst, dst, self.opening)
            moved = max(0, min(amount, a.balance))
            entry = Transfer(txn_id, src, dst, moved, a.seq, b.seq, ctx.generation, ctx.worker,
                             work)
            self.ledger[txn_id] = entry
            await ctx.nbd.write(self.offset(src),
                                encode_account(Account(src, a.balance - moved, a.seq + 1, txn_id)))
            entry.state = "debited"
            await asyncio.sleep(work)
            await ctx.nbd.write(self.offset(dst),
                                encode_account(Account(dst, b.balance + moved, b.seq + 1, txn_id)))
            entry.state = "committed"
            return entry

        return Transaction((lock_name(src), lock_name(dst)), body, f"transfer-{txn_id}")

    def random_transfer(self) -> Transaction[Transfer]:
        src, dst = self.rng.sample(range(self.accounts), 2)
        return self.transfer(src, dst, self.rng.randint(1, self.max_amount))

    def committed(self) -> list[Transfer]:
        return [t for t in self.ledger.values() if t.committed]

    def save_ledger(self, path: Path) -> None:
        """The ledger as JSON lines (``owm.txn.checker`` reads it back)."""
        with open(path, "w") as out:
            out.write(json.dumps({"accounts": self.accounts, "opening": self.opening}) + "\n")
            for entry in self.ledger.values():
                out.write(json.dumps(asdict(entry)) + "\n")


def load_ledger(path: Path) -> tuple[JSON, dict[int, Transfer]]:
    """(header, ledger) from a file written by ``Bank.save_ledger``."""
    with open(path) as f:
        header = json.loads(f.readline())
        ledger = {}
        for line in f:
            if line.strip():
                entry = Transfer(**json.loads(line))
                ledger[entry.id] = entry
    return header, ledger


async def arrivals(
    coordinator: Coordinator,
    make: Callable[[], Transaction[Transfer]],
    rate: float,
    stop: Callable[[], bool],
    rng: random.Random,
    limit: int = 1_000_000,
) -> list[asyncio.Task[Transfer]]:
    """Submit transactions as a Poisson process of ``rate`` per second until ``stop()``.

    Arrival times are scheduled on an absolute timeline and each transaction is submitted
    with the time it was due, so a late wake-up neither lowers the rate nor hides the delay:
    the late transactions arrive together, as they would from independent clients, and their
    wait counts from when they were due.
    """
    clock = coordinator.clock
    tasks: list[asyncio.Task[Transfer]] = []
    next_at = clock()
    while not stop() and len(tasks) < limit:
        next_at += rng.expovariate(rate)
        delay = next_at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop():
            break
        tasks.append(coordinator.submit(make(), arrived=next_at))
    return tasks

