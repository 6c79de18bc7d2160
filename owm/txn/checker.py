"""The consistency checker of the bank workload: is an image a state the bank could have been in?

It reads an image from anywhere (a preserved image or the live volume over NBD, a backup's raw
file, any raw file) and checks:

* every account sector is an untouched account or a valid record (magic, number, CRC);
* the total money is what the bank opened with (a torn transfer breaks it);
* with the ledger (``owm.txn.bank``): each transfer is applied on both of its accounts or on
  neither (torn otherwise), each account's balance is its opening balance plus exactly the
  transfers its ``seq`` says were applied, no account shows a change the ledger does not know,
  and no two transfers took the same place in an account's history (a lost update);
* with an expected set of transfers: exactly those are applied.  For the live volume after a
  run that is every committed transfer (the volume equals the ledger); for a preserved image
  ``NAME@N`` it is the committed transfers of generations <= N (``committed_through``), so an
  image that misses one of them (all zeroes, or stale: older than it claims) is inconsistent;
* with a ledger but no expected set, an image that holds none of the ledger's committed
  transfers is never called consistent: all zeroes or a stale copy look exactly like that, and
  only an expected set (e.g. generations <= N with none committed) can say it is right.

Command line: ``python -m owm.txn.checker IMAGE --accounts N [--ledger FILE]
[--expect-committed | --generation N]`` where IMAGE is a file path or
``nbd+unix:///EXPORT?socket=PATH`` / ``nbd://HOST:PORT/EXPORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from owm.txn.bank import OPENING, SECTOR, Account, BadSector, Transfer, decode_account, load_ledger

JSON = dict[str, Any]


@dataclass
class CheckReport:
    """What the checker found; ``ok`` when nothing is wrong."""

    accounts: int
    expected_total: int
    total: int = 0
    touched_accounts: int = 0
    applied: list[int] = field(default_factory=list)  # on both accounts
    not_applied: int = 0
    torn: list[int] = field(default_factory=list)  # on exactly one account
    missing: list[int] = field(default_factory=list)  # expected but not applied
    unexpected: list[int] = field(default_factory=list)  # applied but not expected
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, message: str, limit: int = 20) -> None:
        self.problem_count += 1
        if len(self.problems) < limit:
            self.problems.append(message)

    def summary(self) -> str:
        if self.ok:
            return (f"consistent: {self.accounts} accounts, total {self.total}, "
                    f"{len(self.applied)} transfers applied, {self.not_applied} not, none torn")
        more = self.problem_count - len(self.problems)
        return (f"INCONSISTENT: {self.problem_count} problem(s), {len(self.torn)} torn "
                f"transfer(s), total {self.total} instead of {self.expected_total}: "
                + "; ".join(self.problems[:3]) + (f" (and {more} more)" if more > 0 else ""))

    def as_dict(self) -> JSON:
        return {
            "ok": self.ok, "accounts": self.accounts, "total": self.total,
            "expected_total": self.expected_total, "touched_accounts": self.touched_accounts,
            "applied": len(self.applied), "not_applied": self.not_applied,
            "torn": len(self.torn), "missing": len(self.missing),
            "unexpected": len(self.unexpected), "problems": self.problem_count,
            "first_problems": self.problems,
        }


def parse_accounts(
    data: bytes | memoryview, accounts: int, opening: int, report: CheckReport
) -> list[Account | None]:
    """Every account of the image (None where the sector is not a valid record)."""
    if len(data) < accounts * SECTOR:
        report.problem(f"the image holds {len(data)} bytes, less than {accounts} accounts")
    view = memoryview(data)
    out: list[Account | None] = []
    for number in range(accounts):
        sector = view[number * SECTOR:(number + 1) * SECTOR]
        try:
            account = decode_account(sector, number, opening)
        except BadSector as exc:
            report.problem(str(exc))
            out.append(None)
            continue
        if account.seq:
            report.touched_accounts += 1
        out.append(account)
    return out


def committed_through(ledger: Mapping[int, Transfer] | Iterable[Transfer],
                      generation: int) -> set[int]:
    """Ids of the committed transfers of generations <= ``generation``: what image N holds."""
    entries = ledger.values() if isinstance(ledger, Mapping) else ledger
    return {t.id for t in entries if t.committed and t.generation <= generation}


def check_image(
    data: bytes | memoryview,
    accounts: int,
    opening: int = OPENING,
    ledger: Mapping[int, Transfer] | Iterable[Transfer] | None = None,
    expect: Collection[int] | None = None,
) -> CheckReport:
    """Check an image of the bank (see the module's docstring)."""
    report = CheckReport(accounts, accounts * opening)
    parsed = parse_accounts(data, accounts, opening, report)
    report.total = sum(a.balance for a in parsed if a is not None)
    if report.total != report.expected_total:
        report.problem(f"the accounts hold {report.total} in all, not {report.expected_total}")
    if ledger is None:
        return report
    entries = list(ledger.values()) if isinstance(ledger, Mapping) else list(ledger)

    # Each account's history from the ledger: position -> (transfer, change of balance).
    history: dict[int, dict[int, tuple[Transfer, int]]] = {}

    def claim(account: int, position: int, entry: Transfer, delta: int) -> None:
        slots = history.setdefault(account, {})
        other = slots.get(position)
        if other is not None:
            report.problem(f"lost update: transfers {other[0].id} and {entry.id} both were "
                           f"change #{position + 1} of account {account}")
            return
        slots[position] = (entry, delta)

    for entry in entries:
        if entry.state in ("debited", "committed"):  # it wrote the source
            claim(entry.src, entry.src_seq, entry, -entry.amount)
        if entry.state == "committed":  # and the destination
            claim(entry.dst, entry.dst_seq, entry, entry.amount)

    for account in parsed:
        if account is None:
            continue
        slots = history.get(account.number, {})
        balance = opening
        for position in range(account.seq):
            if position not in slots:
                report.problem(f"account {account.number} shows change #{position + 1}, "
                               "which no transfer in the ledger made")
                break
            balance += slots[position][1]
        else:
            if balance != account.balance:
                report.problem(f"account {account.number} holds {account.balance}, but its "
                               f"{account.seq} transfers give {balance}")
            last = slots[account.seq - 1][0].id if account.seq else 0
            if account.last != last:
                report.problem(f"account {account.number} names transfer {account.last} as its "
                               f"last, the ledger says {last}")

    def applied_on(number: int, position: int, entry: Transfer) -> bool:
        account = parsed[number] if 0 <= number < len(parsed) else None
        if account is None or position >= account.seq:
            return False
        slot = history.get(number, {}).get(position)
        return slot is not None and slot[0] is entry

    wanted = set(expect) if expect is not None else None
    for entry in entries:
        on_src = applied_on(entry.src, entry.src_seq, entry)
        on_dst = entry.state == "committed" and applied_on(entry.dst, entry.dst_seq, entry)
        if on_src and on_dst:
            report.applied.append(entry.id)
        elif not on_src and not on_dst:
            report.not_applied += 1
        else:
            report.torn.append(entry.id)
            side = "source" if on_src else "destination"
            report.problem(f"transfer {entry.id} ({entry.amount} from account {entry.src} to "
                           f"{entry.dst}) is applied on its {side} only")
        if wanted is not None:
            if entry.id in wanted and not (on_src and on_dst):
                report.missing.append(entry.id)
            elif entry.id not in wanted and (on_src or on_dst):
                report.unexpected.append(entry.id)
    if wanted is not None:
        known = {e.id for e in entries}
        report.missing += sorted(wanted - known)
        if report.missing:
            report.problem(f"{len(report.missing)} transfer(s) that should be in the image are "
                           f"not (first: {report.missing[0]})")
        if report.unexpected:
            report.problem(f"{len(report.unexpected)} transfer(s) that should not be in the image "
                           f"are (first: {report.unexpected[0]})")
    else:
        committed = sum(1 for e in entries if e.committed)
        if committed and not report.applied:
            report.problem(f"the image holds none of the ledger's {committed} committed "
                           "transfer(s): it is all zeroes or stale; say which transfers it "
                           "should hold (--generation N or --expect-committed)")
    return report


# ---------------------------------------------------------------------------- reading images


async def read_export(
    export: str,
    length: int,
    *,
    unix_path: str | None = None,
    host: str | None = None,
    port: int = 10809,
    step: int = 1 << 20,
) -> bytes:
    """The first ``length`` bytes of an NBD export (a preserved image, a live volume)."""
    from owm.nbd.client import NbdClient

    client = await NbdClient.connect(export, unix_path=unix_path, host=host, port=port)
    try:
        length = min(length, client.size)
        parts = await asyncio.gather(
            *(client.read(at, min(step, length - at)) for at in range(0, length, step))
        )
    finally:
        await client.disconnect()
    return b"".join(parts)


def read_file(path: Path, length: int) -> bytes:
    """The first ``length`` bytes of a raw file (a backup written as raw, a disk image)."""
    with open(path, "rb") as f:
        return f.read(length)


async def read_any(where: str, length: int) -> bytes:
    """A path, ``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT``."""
    url = urlparse(where)
    if url.scheme == "nbd+unix":
        socket = parse_qs(url.query).get("socket", [""])[0]
        return await read_export(url.path.lstrip("/"), length, unix_path=socket)
    if url.scheme == "nbd":
        return await read_export(url.path.lstrip("/"), length, host=url.hostname,
                                 port=url.port or 10809)
    return read_file(Path(where), length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owm.txn.checker", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("image", help="a file, nbd+unix:///EXPORT?socket=PATH or nbd://H:P/EXPORT")
    parser.add_argument("--accounts", type=int, help="accounts in the bank (default: ledger's)")
    parser.add_argument("--opening", type=int, default=None)
    parser.add_argument("--ledger", type=Path, help="JSON lines from Bank.save_ledger")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--expect-committed", action="store_true",
                       help="exactly the committed transfers must be applied (a final image)")
    which.add_argument("--generation", type=int, metavar="N",
                       help="exactly the committed transfers of generations <= N must be "
                            "applied (a preserved image NAME@N or its backup)")
    args = parser.parse_args(argv)
    if args.generation is not None and (args.generation < 0 or not args.ledger):
        parser.error("--generation needs --ledger and a generation of 0 or more")
    header: JSON = {}
    ledger = None
    if args.ledger:
        header, ledger = load_ledger(args.ledger)
    accounts = args.accounts or header.get("accounts")
    if not accounts:
        parser.error("give --accounts or --ledger")
    opening = args.opening if args.opening is not None else int(header.get("opening", OPENING))
    data = asyncio.run(read_any(args.image, accounts * SECTOR))
    expect: set[int] | None = None
    if ledger is not None and args.expect_committed:
        expect = {t.id for t in ledger.values() if t.committed}
    elif ledger is not None and args.generation is not None:
        expect = committed_through(ledger, args.generation)
    report = check_image(data, accounts, opening, ledger, expect)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
