"""The two-volume bank: accounts on one volume, an append-only ledger of transfers on another.

A transfer (``LedgerBank.transfer``) holds the locks of both accounts, reads them on the
accounts volume, writes the debited source there, appends its ledger entry on the ledger volume
(entry ``id`` in sector ``id``), works for its duration, then writes the credited destination:
three writes on two volumes, so images of the two volumes taken one after the other show torn
transfers, while a group preserve keeps every transfer whole on both.

``check_set`` checks a pair of images (the members of a backup set, say) against each other,
with nothing from outside: every entry of the ledger image is applied exactly on both of its
accounts, the accounts show no change the ledger image does not hold, and the money adds up.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from dataclasses import dataclass

from owm.txn.bank import OPENING, SECTOR, Account, Bank, Transfer, decode_account, encode_account
from owm.txn.bank import lock_name as account_lock
from owm.txn.checker import CheckReport, check_image
from owm.txn.coordinator import Transaction, TxnContext

LEDGER_MAGIC = b"OWMLEDG1"
_ENTRY = struct.Struct("<8sQIIqQQ")  # magic, id, src, dst, amount, src_seq, dst_seq
_CRC = struct.Struct("<I")


def encode_entry(t: Transfer) -> bytes:
    head = _ENTRY.pack(LEDGER_MAGIC, t.id, t.src, t.dst, t.amount, t.src_seq, t.dst_seq)
    return (head + _CRC.pack(zlib.crc32(head))).ljust(SECTOR, b"\0")


def parse_ledger(data: bytes | memoryview, report: CheckReport) -> list[Transfer]:
    """The entries of a ledger image, as committed transfers; bad sectors are problems."""
    view = memoryview(data)
    entries = []
    for number in range(len(view) // SECTOR):
        sector = view[number * SECTOR:(number + 1) * SECTOR]
        if not any(sector):
            continue
        head = bytes(sector[:_ENTRY.size])
        magic, tid, src, dst, amount, src_seq, dst_seq = _ENTRY.unpack(head)
        (crc,) = _CRC.unpack_from(sector, _ENTRY.size)
        if magic != LEDGER_MAGIC or crc != zlib.crc32(head) or tid != number:
            report.problem(f"ledger sector {number} is not a valid entry")
            continue
        entries.append(Transfer(tid, src, dst, amount, src_seq, dst_seq, 0, "", 0.0,
                                "committed"))
    return entries


def check_set(accounts_data: bytes | memoryview, ledger_data: bytes | memoryview,
              accounts: int, opening: int = OPENING) -> CheckReport:
    """Check the accounts image against the ledger image: every entry applied, nothing else."""
    probe = CheckReport(accounts, accounts * opening)
    entries = parse_ledger(ledger_data, probe)
    report = check_image(accounts_data, accounts, opening, ledger=entries,
                         expect={e.id for e in entries})
    for problem in probe.problems:
        report.problem(problem)
    return report


@dataclass
class LedgerBank(Bank):
    """A bank whose transfers also append to a ledger volume (see the module docstring)."""

    accounts_volume: str = "accounts"
    ledger_volume: str = "ledger"
    capacity: int = 4096  # ledger entries the ledger volume holds

    @property
    def ledger_size(self) -> int:
        return (self.capacity + 1) * SECTOR

    def transfer(
        self, src: int, dst: int, amount: int, duration: float | None = None
    ) -> Transaction[Transfer]:
        if src == dst or not (0 <= src < self.accounts and 0 <= dst < self.accounts):
            raise ValueError("a transfer needs two different accounts of the bank")
        txn_id = self._next_id
        if txn_id > self.capacity:
            raise ValueError(f"the ledger volume holds {self.capacity} entries; it is full")
        self._next_id += 1
        work = self.durations.draw(self.rng) if duration is None else duration

        async def body(ctx: TxnContext) -> Transfer:
            books = ctx.sessions[self.accounts_volume]
            journal = ctx.sessions[self.ledger_volume]
            raw_src, raw_dst = await asyncio.gather(
                books.read(self.offset(src), SECTOR), books.read(self.offset(dst), SECTOR))
            a = decode_account(raw_src, src, self.opening)
            b = decode_account(raw_dst, dst, self.opening)
            moved = max(0, min(amount, a.balance))
            entry = Transfer(txn_id, src, dst, moved, a.seq, b.seq, ctx.generation, ctx.worker,
                             work)
            self.ledger[txn_id] = entry
            await books.write(self.offset(src),
                              encode_account(Account(src, a.balance - moved, a.seq + 1, txn_id)))
            entry.state = "debited"
            await journal.write(txn_id * SECTOR, encode_entry(entry))
            await asyncio.sleep(work)
            await books.write(self.offset(dst),
                              encode_account(Account(dst, b.balance + moved, b.seq + 1, txn_id)))
            entry.state = "committed"
            return entry

        return Transaction((account_lock(src), account_lock(dst)), body, f"transfer-{txn_id}")
