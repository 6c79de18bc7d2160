"""The backup commands of the ``owm`` CLI: ``backup``, ``backup list|verify|delete|prune|copy``,
``restore``.

``owm backup NAME@N --to PATH`` backs an image up (the group treats a first argument that is
not one of its subcommands as an image, so ``owm backup create NAME@N`` is the same command);
``list``, ``verify`` and ``delete`` work on an owm repository and need no daemon; ``restore``
needs the daemon only to restore into a new volume.  Progress bars (bytes, rate, ETA) appear on
a terminal only; ``--json`` prints one JSON document.  ``owm.cli.main`` adds these commands.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from owm.cli.common import Fail, json_option, pool_option, state
from owm.common.errors import DaemonNotRunning, InvalidRequest, OwmError
from owm.common.names import parse_image_name as split_image
from owm.common.sizes import format_size

if TYPE_CHECKING:
    from rich.console import Console

    from owm.backup.image import DaemonApi
    from owm.control.client import ControlClient

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
JSON = dict[str, Any]
Progress = Callable[[int, int], None]

TAKE = "create"
FORMATS = ("raw", "qcow2", "owm")


# ----------------------------------------------------------------------------------------------
# Helpers


def _fail(message: str, code: int = 1) -> Exception:
    return Fail(message, code)


def _err() -> Console:
    # rich is imported where output is drawn: ``--json`` runs (scripts) never load it.
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _out() -> Console:
    return state().out


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def _image_arg(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        split_image(value)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _run(main: Awaitable[T]) -> T:
    import uvloop

    async def wrapped() -> T:
        return await main

    return uvloop.run(wrapped())


def _guarded(call: Callable[[], T]) -> T:
    """Map what can go wrong to one sentence and an exit code."""
    from owm.backup.crypto import KeyNeeded, WrongKey

    try:
        return call()
    except (DaemonNotRunning, WrongKey, KeyNeeded) as exc:
        raise _fail(str(exc), 2) from None
    except OwmError as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _fail(f"{exc.strerror or exc}{where}", 1) from None


def with_daemon(call: Callable[[ControlClient], Awaitable[T]]) -> T:
    """Run ``call`` with a control client of the pool's daemon."""
    from owm.control.client import ControlClient  # aiohttp: only for commands that need it

    pool = state().pool

    async def go() -> T:
        async with ControlClient(pool) as control:
            return await call(control)

    return _guarded(lambda: _run(go()))


class QuickControl:
    """The control API calls of a backup (``owm.backup.image.DaemonApi``) over the small
    blocking client of ``owm.cli.quick``, each on a thread of its own so the event loop runs
    on: a backup then never loads aiohttp, which with rich was about half the CPU of an
    incremental backup.

    The threads are daemon threads, not the loop's executor: a request can block for as long
    as an image takes to drain, and Ctrl-C must end the command then, not wait for it."""

    def __init__(self, pool: Path) -> None:
        from owm.cli.quick import QuickClient

        self._quick = QuickClient(pool)

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      timeout: float | None = None) -> Any:
        return await self._call(self._quick.request, method, path, body, timeout)

    async def health(self) -> JSON:
        result: JSON = await self._call(self._quick.health)
        return result

    async def volume(self, name: str) -> JSON:
        result: JSON = await self._call(self._quick.volume, name)
        return result

    async def image(self, image: str) -> JSON:
        result: JSON = await self._call(self._quick.image, image)
        return result

    async def wait(self, image: str, timeout: float | None = None) -> JSON:
        result: JSON = await self._call(self._quick.wait, image, timeout)
        return result

    async def release(self, image: str) -> JSON:
        result: JSON = await self._call(self._quick.release, image)
        return result

    @staticmethod
    async def _call(method: Callable[..., Any], *args: Any) -> Any:
        import asyncio
        import threading

        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():  # cancelled meanwhile: nobody waits for it
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = method(*args)
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: the command ended
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name="owm-control", daemon=True).start()
        return await done


def with_quick_daemon(call: Callable[[DaemonApi], Awaitable[T]]) -> T:
    """Run ``call`` with the pool's daemon reached through :class:`QuickControl`."""
    control = QuickControl(state().pool)
    return _guarded(lambda: _run(call(control)))


@contextlib.contextmanager
def progress_bar(what: str, enabled: bool) -> Iterator[Progress | None]:
    """A bar with bytes, rate and ETA on a terminal; nothing (None) otherwise."""
    import sys

    if not enabled or not sys.stderr.isatty():
        yield None
        return
    err = _err()
    if not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _rate(nbytes: int, seconds: float) -> str:
    return f"{format_size(int(nbytes / seconds))}/s" if seconds > 0 else "-"


def _ask_passphrase(confirm: bool) -> Callable[[], str | None]:
    """The passphrase of an encrypted repository: $OWM_REPO_PASSWORD, else asked on a
    terminal, else none (the command then says which key it needs)."""
    import os
    import sys

    from owm.backup.crypto import PASSWORD_ENV

    def ask() -> str | None:
        if os.environ.get(PASSWORD_ENV):
            return os.environ[PASSWORD_ENV]
        if not sys.stdin.isatty():
            return None
        value: str = click.prompt("Repository passphrase", hide_input=True, err=True,
                                  confirmation_prompt=confirm)
        return value or None

    return ask


DEST_PASSWORD_ENV = "OWM_DEST_REPO_PASSWORD"


def _ask_dest_passphrase(confirm: bool) -> Callable[[], str | None]:
    """The passphrase of ``backup copy``'s destination: $OWM_DEST_REPO_PASSWORD, else
    $OWM_REPO_PASSWORD (the same passphrase as the source), else asked on a terminal (twice
    for a destination the copy creates)."""
    import os
    import sys

    from owm.backup.crypto import PASSWORD_ENV

    def ask() -> str | None:
        for name in (DEST_PASSWORD_ENV, PASSWORD_ENV):
            if os.environ.get(name):
                return os.environ[name]
        if not sys.stdin.isatty():
            return None
        value: str = click.prompt("Destination repository passphrase", hide_input=True,
                                  err=True, confirmation_prompt=confirm)
        return value or None

    return ask


def _set_key(ctx: click.Context, _: click.Parameter, value: Path | None) -> Path | None:
    from owm.backup.crypto import KeySource, set_default_key

    set_default_key(KeySource(key_file=value,
                              passphrase=_ask_passphrase(ctx.info_name == "init")))
    return value


def key_option(f: F) -> F:
    """``--key-file F`` for every command that reads or writes a repository (encrypted ones
    need it, or a passphrase in $OWM_REPO_PASSWORD or typed on a terminal)."""
    return click.option(
        "--key-file", "key_file", metavar="FILE", type=click.Path(path_type=Path),
        callback=_set_key, is_eager=True,
        help="Key file of an encrypted repository (else the passphrase in "
             "$OWM_REPO_PASSWORD, or asked on a terminal).")(f)


# ----------------------------------------------------------------------------------------------
# owm repo init REPO [--encrypt] [--key-file F]


@click.group("repo")
def repo() -> None:
    """Create owm backup repositories.

    \b
    owm repo init REPO [--encrypt [--key-file F]] [--json]
    """


@repo.command("init")
@click.argument("path", metavar="REPO", type=click.Path(path_type=Path))
@click.option("--encrypt", is_flag=True,
              help="Encrypt chunks and manifests (key from --key-file, created if it does not "
                   "exist, or a passphrase).")
@key_option
@json_option
def repo_init(path: Path, encrypt: bool, key_file: Path | None, as_json: bool) -> None:
    """Create an empty owm backup repository at REPO."""
    from owm.backup.repo import Repository, is_repository

    if key_file is not None and not encrypt:
        raise _fail("--key-file is for an encrypted repository; add --encrypt", 2)
    if is_repository(path):
        raise _fail(f"{path} is already an owm backup repository", 1)
    r = _guarded(lambda: Repository.open(path, create=True, encrypt=encrypt))
    doc = {"repository": str(path.absolute()), "encrypted": r.cipher is not None,
           "key": (r.config.get("encryption") or {}).get("key")}
    if as_json:
        _echo_json(doc)
        return
    how = (f"encrypted, key from {'the key file ' + str(key_file) if key_file else 'a passphrase'}"
           if encrypt else "not encrypted")
    _out().print(f"Created backup repository {path} ({how}).", markup=False)


# ----------------------------------------------------------------------------------------------
# owm backup NAME@N --to PATH ...


class BackupGroup(click.Group):
    """Dispatches ``owm backup NAME@N ...`` to the hidden ``create`` subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [TAKE, *args]
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group("backup", cls=BackupGroup)
def backup() -> None:
    """Back up a preserved image, or list, verify and delete backups.

    \b
    owm backup NAME@N --to PATH [--format raw|qcow2|owm] [--verify] [--release]
                                [--timeout S] [--force] [--json]
    owm backup list REPO | verify REPO [ID] | delete REPO ID
    owm backup serve REPO ID [--listen HOST:PORT] [--socket PATH]
    (an encrypted repository: --key-file F, or $OWM_REPO_PASSWORD)
    owm backup prune REPO [--keep-last N] [--keep-daily N] ... [--volume V] [--dry-run]
    owm backup copy SRC DST [ID...]

    The format follows PATH unless --format says: .raw/.img/.bin is a sparse raw file, .qcow2
    a qcow2 image, anything else an owm repository (deduplicated, compressed chunks;
    incremental when it already holds an older image of the volume).
    """


@backup.command(TAKE, hidden=True)
@pool_option
@key_option
@click.argument("image", metavar="NAME@N", callback=_image_arg)
@click.option("--to", "to", required=True, metavar="PATH", type=click.Path(path_type=Path),
              help="A raw or qcow2 file to create, or an owm repository directory.")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="raw, qcow2 or owm [default: from PATH].")
@click.option("--verify", is_flag=True, help="Read the backup back and check it.")
@click.option("--encrypt", is_flag=True,
              help="A new owm repository is created encrypted (see 'owm repo init').")
@click.option("--release", is_flag=True, help="Release the image once the backup is complete.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="How long to wait for a draining image [default: as long as it takes].")
@click.option("--force", is_flag=True,
              help="Back up a drained-unclean or broken image (recorded as not "
                   "transaction-consistent).")
@json_option
def create(image: str, to: Path, fmt: str | None, verify: bool, encrypt: bool, release: bool,
           timeout: float | None, force: bool, as_json: bool, key_file: Path | None) -> None:
    """Back up the preserved image NAME@N to PATH.

    A draining image is waited for (--timeout), naming the sessions that hold it.
    """
    from owm.backup.repo import is_repository
    from owm.backup.run import BackupResult, run_backup
    from owm.backup.sets import is_set, run_set_backup

    if is_repository(to):
        r = _open_repo(to)  # an encrypted repository: a wrong key stops here, before anything
        if encrypt and r.cipher is None:
            raise _fail(f"{to} is a repository that is not encrypted; drop --encrypt", 2)
    elif encrypt:
        if fmt not in (None, "owm"):
            raise _fail("--encrypt is for an owm repository", 2)
        from owm.backup.repo import Repository

        _guarded(lambda: Repository.open(to, create=True, encrypt=True))

    def notify(message: str) -> None:
        click.echo(message + ".", err=True)

    async def call(control: DaemonApi) -> BackupResult | JSON:
        if await is_set(control, image):
            if fmt not in (None, "owm"):
                raise _fail("a backup set goes into an owm repository (--format owm)", 2)
            return await run_set_backup(control, image, to, verify=verify, release=release,
                                        timeout=timeout, force=force, notify=notify)
        with progress_bar(f"backing up {image}", not as_json) as bar:
            return await run_backup(control, image, to, fmt=fmt, verify=verify,
                                    release=release, timeout=timeout, force=force,
                                    progress=bar, notify=notify)

    result = with_quick_daemon(call)
    if isinstance(result, dict):
        _print_set_backup(result, as_json)
        return
    if as_json:
        _echo_json(result.to_json())
        return
    s = result.stats
    what = result.format
    if result.backup_id:
        what += f", backup {result.backup_id}"
        if result.incremental and result.parent:
            n = result.changed_chunks
            what += (f", incremental from {result.parent}"
                     + (f" ({n} changed chunk{'' if n == 1 else 's'})" if n is not None else ""))
    lines = [
        f"Backed up {result.image} to {result.path} ({what}).",
        f"Read {format_size(s.bytes_read)} of {format_size(result.size)}, wrote "
        f"{format_size(s.bytes_written)}; {s.chunks_new} new chunks, {s.chunks_reused} reused, "
        f"{s.chunks_zero} zero; {result.seconds:.2f}s ({_rate(result.size, result.seconds)} of "
        "image).",
    ]
    if result.verified:
        lines.append("Verified: the backup reads back as the image.")
    if result.released:
        lines.append(f"Released {result.image}.")
    out = _out()
    out.print("\n".join(lines), markup=False)
    if not result.transaction_consistent:
        _err().print(f"Note: this backup is {result.consistency}, not transaction-consistent"
                     f"{' (forced)' if result.forced else ''}.", markup=False)


def _print_set_backup(result: JSON, as_json: bool) -> None:
    if as_json:
        _echo_json(result)
        return
    lines = [f"Backed up set {result['set']} to {result.get('id')}: "
             f"{len(result['members'])} member backups, {result['consistency']}"
             f"{', verified together' if result.get('verified') else ''}."]
    for m in result["members"]:
        kind = f"incremental from {m['parent']}" if m.get("incremental") else "full"
        lines.append(f"  {m['image']}: backup {m['backup']} ({kind})")
    if result.get("released"):
        lines.append(f"Released {result['set']}.")
    _out().print("\n".join(lines), markup=False)


# ----------------------------------------------------------------------------------------------
# owm backup list | verify | delete


def _open_repo(path: Path) -> Any:
    from owm.backup.repo import Repository

    return _guarded(lambda: Repository.open(path))


@backup.command("list")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@json_option
def backup_list(repo: Path, as_json: bool, key_file: Path | None) -> None:
    """List the backups in the owm repository REPO."""
    from owm.backup.repo import Repository

    r: Repository = _open_repo(repo)
    manifests, damaged = _guarded(r.manifests)
    rows = []
    for m in sorted(manifests, key=lambda m: (m.started_at, m.id)):
        row = m.summary()
        if not m.complete and r.running(m.id):
            row["state"] = "running"
        rows.append(row)
    rows += [{"id": i, "state": "damaged", "error": reason} for i, reason in damaged]
    from owm.backup.sets import list_sets

    sets = _guarded(lambda: list_sets(repo))
    for s in sets:
        # A set: its members' backups are listed above; this row names them together.
        rows.append({"id": s.get("id"), "image": s.get("set"), "time": s.get("time", ""),
                     "size": int(s.get("size") or 0), "state": s.get("state", "complete"),
                     "consistency": s.get("consistency", "?"), "forced": bool(s.get("forced")),
                     "incremental": any(m.get("incremental") for m in s.get("members", [])),
                     "set": True, "members": [m.get("backup") for m in s.get("members", [])]})
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        _out().print(f"No backups in {repo}.", markup=False)
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("ID", "left"), ("IMAGE", "left"), ("TIME (UTC)", "left"),
                            ("SIZE", "right"), ("STATE", "left"), ("CONSISTENCY", "left"),
                            ("KIND", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        if row["state"] == "damaged":
            table.add_row(Text(row["id"]), "-", "-", "-", "damaged", Text(row["error"]), "-")
            continue
        consistency = str(row["consistency"]) + (" (forced)" if row["forced"] else "")
        shown = row["state"] + (" (unverified)" if row.get("manifest") == "unverified" else "")
        kind = "incremental" if row["incremental"] else "full"
        if row.get("set"):
            kind = f"set of {len(row['members'])}"
        table.add_row(Text(str(row["id"])), Text(str(row["image"])),
                      str(row["time"]).replace("T", " ").rstrip("Z"),
                      format_size(int(row["size"])), shown, consistency, kind)
    _out().print(table)


@backup.command("verify")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@click.argument("backup_id", metavar="[ID]", required=False)
@json_option
def backup_verify(repo: Path, backup_id: str | None, as_json: bool,
                  key_file: Path | None) -> None:
    """Check every chunk of backup ID (or of every backup) in REPO against its hash.

    Exits 1 and names the offset of every chunk that fails.
    """
    from owm.backup.verify import VerifyReport, VerifyTotals, verify_backups

    r = _open_repo(repo)
    totals = VerifyTotals()
    with progress_bar("verifying", not as_json) as bar:
        reports: list[VerifyReport] = _guarded(
            lambda: verify_backups(r, backup_id, progress=bar, totals=totals))
    bad = [x for x in reports if not x.ok]
    if as_json:
        _echo_json({"ok": not bad, "backups": [x.to_json() for x in reports],
                    "checked": totals.to_json()})
    else:
        lines = []
        for report in reports:
            lines.append(report.sentence()[0].upper() + report.sentence()[1:] + ".")
            for failure in report.failures[1:]:
                lines.append(f"  also the chunk at offset {failure.offset} (chunk "
                             f"{failure.chunk}): {failure.reason}")
        if not reports:
            lines.append(f"No backups in {repo}.")
        elif totals.chunks and not bad:  # a failure is one sentence per backup, nothing more
            lines.append(f"Checked {totals.chunks} distinct chunks: "
                         f"{format_size(totals.image_bytes)} of image data from "
                         f"{format_size(totals.stored_bytes)} stored ({totals.ratio:.1f}:1), "
                         f"in {totals.seconds:.2f} s.")
        click.echo("\n".join(lines), err=bool(bad))
    if bad:
        raise _fail("", 1)


@backup.command("delete")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@click.argument("backup_id", metavar="ID")
@json_option
def backup_delete(repo: Path, backup_id: str, as_json: bool, key_file: Path | None) -> None:
    """Delete backup ID from REPO, and the chunks no other backup uses."""
    r = _open_repo(repo)
    result = _guarded(lambda: r.delete(backup_id))
    if as_json:
        _echo_json(result.to_json())
    elif result.chunks_kept_because:
        _out().print(f"Deleted backup {result.id}, but no chunk was removed because "
                     f"{result.chunks_kept_because}; delete that backup too to reclaim space.",
                     markup=False)
    else:
        _out().print(f"Deleted backup {result.id}: {result.chunks_removed} chunks no other "
                     f"backup used were removed ({format_size(result.bytes_freed)} freed).",
                     markup=False)


@backup.command("prune")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@click.option("--keep-last", "last", type=click.IntRange(min=0), default=0, metavar="N",
              help="Keep the N newest backups.")
@click.option("--keep-hourly", "hourly", type=click.IntRange(min=0), default=0, metavar="N",
              help="Keep the newest backup of each of the last N hours that have one.")
@click.option("--keep-daily", "daily", type=click.IntRange(min=0), default=0, metavar="N",
              help="... of each of the last N days.")
@click.option("--keep-weekly", "weekly", type=click.IntRange(min=0), default=0, metavar="N",
              help="... of each of the last N ISO weeks.")
@click.option("--keep-monthly", "monthly", type=click.IntRange(min=0), default=0, metavar="N",
              help="... of each of the last N months.")
@click.option("--keep-yearly", "yearly", type=click.IntRange(min=0), default=0, metavar="N",
              help="... of each of the last N years.")
@click.option("--volume", metavar="V", help="Prune only the backups of volume V.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
def backup_prune(repo: Path, last: int, hourly: int, daily: int, weekly: int, monthly: int,
                 yearly: int, volume: str | None, dry_run: bool, as_json: bool,
                 key_file: Path | None) -> None:
    """Remove the backups in REPO that no --keep-* rule keeps, then the chunks no remaining
    backup uses.

    The rules are restic's ("restic forget"), per volume: backups newest first, by the time
    their image was preserved (UTC); --keep-daily 7 keeps the newest backup of each of the 7
    most recent days that have one, and so on; a backup any rule keeps is kept.  Incomplete
    backups, the parent of an incomplete backup and damaged manifests are never removed.
    Safe while backups run; run it again if it was interrupted.
    """
    from owm.backup.prune import Policy, PruneResult, prune

    r = _open_repo(repo)
    policy: Policy = _guarded(lambda: Policy(last, hourly, daily, weekly, monthly, yearly))
    result: PruneResult = _guarded(lambda: prune(r, policy, volume=volume, dry_run=dry_run))
    if as_json:
        _echo_json(result.to_json())
        return
    lines = [f"{'Would remove' if dry_run else 'Removed'} {len(result.removed)} backup"
             f"{'' if len(result.removed) == 1 else 's'}, kept {len(result.kept)}"
             + (f" (and {len(result.protected)} incomplete or needed)" if result.protected
                else "") + "."]
    for row in result.removed:
        lines.append(f"  {'would remove' if dry_run else 'removed'} {row['id']} "
                     f"({row['time']})")
    for row in result.kept:
        lines.append(f"  kept {row['id']} ({row['time']}): {', '.join(row['reasons'])}")
    if result.chunks_kept_because:
        lines.append(f"No chunk was removed because {result.chunks_kept_because}.")
    else:
        lines.append(f"{'Would free' if dry_run else 'Freed'} {result.chunks_removed} chunks "
                     f"({format_size(result.bytes_freed)}).")
    _out().print("\n".join(lines), markup=False)


@backup.command("copy")
@pool_option
@key_option
@click.argument("source", metavar="SRC", type=click.Path(path_type=Path))
@click.argument("destination", metavar="DST", type=click.Path(path_type=Path))
@click.argument("backup_ids", metavar="[ID...]", nargs=-1)
@click.option("--dest-key-file", "dest_key_file", metavar="FILE", type=click.Path(path_type=Path),
              help="Key file of an encrypted DST (default: --key-file, unless "
                   "$OWM_DEST_REPO_PASSWORD is set; else the passphrase in "
                   "$OWM_DEST_REPO_PASSWORD or $OWM_REPO_PASSWORD, or asked on a terminal).  "
                   "Created when missing, for a DST this command creates.")
@click.option("--encrypt", is_flag=True,
              help="A DST this command creates is encrypted with a new key of its own.")
@click.option("--plain", is_flag=True,
              help="Store an encrypted SRC's backups decrypted: in a plain DST, or in a DST "
                   "this command creates, not encrypted.")
@json_option
def backup_copy(source: Path, destination: Path, backup_ids: tuple[str, ...],
                dest_key_file: Path | None, encrypt: bool, plain: bool, as_json: bool,
                key_file: Path | None) -> None:
    """Copy backups ID... (default: every complete backup) from the repository SRC into DST.

    DST is created when missing: as SRC is (plain, or encrypted with SRC's own master key
    wrapped by DST's key, so chunk files move as they are), or with --encrypt / --plain.
    Only the chunks DST lacks are written, each checked when read and again once stored;
    between different keys (or plain and encrypted) chunks are decrypted, renamed by DST's
    hash and sealed again.  Every backup comes with the chain of parents SRC holds; backups
    DST already has are skipped.  A wrong key for either side stops the copy before it writes
    anything.
    """
    from owm.backup.copy import CopyResult, copy_backups
    from owm.backup.crypto import KeySource, default_key
    from owm.backup.repo import is_repository

    if encrypt and plain:
        raise _fail("--encrypt and --plain cannot go together", 2)
    import os

    # Without --dest-key-file, DST's key is --key-file's, unless a passphrase is set for it.
    fallback = None if os.environ.get(DEST_PASSWORD_ENV) else key_file
    ask = _ask_dest_passphrase(confirm=not is_repository(destination))
    dest_key = KeySource(key_file=dest_key_file or fallback, passphrase=ask,
                         option="--dest-key-file", password_env=DEST_PASSWORD_ENV)
    create_as = "encrypted" if encrypt else "plain" if plain else "source"

    with progress_bar("copying", not as_json) as bar:
        result: CopyResult = _guarded(
            lambda: copy_backups(source, destination, list(backup_ids), progress=bar,
                                 key=default_key(), dest_key=dest_key, create_as=create_as,
                                 dest_key_given=dest_key_file is not None))
    if as_json:
        _echo_json(result.to_json())
        return
    n = len(result.copied)
    recoded = " (renamed and sealed again for the destination's key)" if result.recoded else ""
    lines = [f"Copied {n} backup{'' if n == 1 else 's'} into {result.destination}: "
             f"{result.chunks_copied} chunks moved ({format_size(result.bytes_written)} "
             f"written), {result.chunks_present} already there{recoded}; "
             f"{result.seconds:.2f}s."]
    lines += [f"  skipped {row['id']}: {row['why']}" for row in result.skipped]
    _out().print("\n".join(lines), markup=False)


# ----------------------------------------------------------------------------------------------
# owm backup serve REPO ID [--listen HOST:PORT] [--socket PATH]


def _endpoint(text: str) -> tuple[str, int] | None:
    """'HOST:PORT', ':PORT' (loopback) or 'none'."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"'{text}' is not HOST:PORT", param_hint="--listen")
    return (host or "127.0.0.1", int(port))


@backup.command("serve")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@click.argument("backup_id", metavar="ID")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="NBD over TCP ('none' for the Unix socket only) [default: 127.0.0.1 and a "
                   "free port, or none when --socket is given].")
@click.option("--socket", "unix_socket", metavar="PATH", type=click.Path(path_type=Path),
              help="NBD over this Unix socket too.")
@json_option
def backup_serve(repo: Path, backup_id: str, listen: str | None, unix_socket: Path | None,
                 as_json: bool, key_file: Path | None) -> None:
    """Serve backup ID of REPO as a read-only NBD export, without restoring it first.

    Runs until interrupted (SIGINT, SIGTERM).  The export is the backed-up image's name
    (NAME@N), and the default export too; reads fetch chunks from the repository as needed.
    """
    import asyncio
    import signal

    from owm.backup.serve import serve_backup

    tcp = _endpoint(listen) if listen is not None else (
        None if unix_socket is not None else ("127.0.0.1", 0))
    if tcp is None and unix_socket is None:
        raise _fail("give --socket PATH, or a --listen address other than none", 2)
    r = _open_repo(repo)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with r.locked(exclusive=False):
            manifest = await loop.run_in_executor(None, r.resolve, backup_id)
            if not manifest.complete:
                raise InvalidRequest(f"backup {manifest.id} is incomplete and cannot be served")
            await loop.run_in_executor(None, lambda: manifest.chunk_map)  # load and check it

            def ready(port: int) -> None:
                uris = []
                if tcp is not None:
                    uris.append(f"nbd://{tcp[0]}:{port}/{manifest.image}")
                if unix_socket is not None:
                    uris.append(f"nbd+unix:///{manifest.image}?socket={unix_socket.absolute()}")
                if as_json:
                    click.echo(json.dumps({"id": manifest.id, "image": manifest.image,
                                           "export": manifest.image, "size": manifest.size,
                                           "uris": uris, "tcp_port": port if tcp else None}))
                else:
                    click.echo(f"Serving backup {manifest.id} ({manifest.image}, "
                               f"{format_size(manifest.size)}) read-only at "
                               f"{' and '.join(uris)}; stop with Ctrl-C.")
                import sys

                sys.stdout.flush()

            await serve_backup(r, manifest, tcp=tcp,
                               unix_path=str(unix_socket) if unix_socket else None,
                               stop=stop, on_ready=ready)

    _guarded(lambda: _run(go()))


# ----------------------------------------------------------------------------------------------
# owm restore REPO ID --to PATH|NAME


@click.command("restore")
@pool_option
@key_option
@click.argument("repo", metavar="REPO", type=click.Path(path_type=Path))
@click.argument("backup_id", metavar="ID")
@click.option("--to", "to", required=True, metavar="PATH|NAME",
              help="A new raw file (a path with '/' or ending in .raw/.img/.bin, or "
                   "file:PATH) or a new volume (a name, or volume:NAME).")
@click.option("--method", type=click.Choice(["cow", "log", "mirror"]), default="cow",
              show_default=True, help="Method of the new volume.")
@click.option("--live", is_flag=True,
              help="Make the new volume usable at once and fill it in the background (runs "
                   "until filled; run it again to resume).")
@click.option("--pace", type=click.FloatRange(min=0, max=60), default=0.0, hidden=True,
              help="Seconds between background fill batches of a live restore.")
@json_option
def restore(repo: Path, backup_id: str, to: str, method: str, live: bool, pace: float,
            as_json: bool, key_file: Path | None) -> None:
    """Restore backup ID (an id, a unique prefix, or NAME@N for its newest backup) from REPO.

    Into a new raw file, or into a new volume created through the daemon.
    """
    from owm.backup.restore import RestoreResult, parse_target, restore_backup, restore_file
    from owm.backup.sets import find_set

    if _guarded(lambda: find_set(repo, backup_id)) is not None:
        _restore_set(repo, backup_id, to, method, as_json)
        return
    kind, path = _guarded(lambda: parse_target(to))
    if kind == "file" and live:
        raise _fail("a live restore goes into a new volume, not a file")

    def notify(message: str) -> None:
        click.echo(message[0].upper() + message[1:] + ".", err=True)

    async def call(control: ControlClient | None) -> RestoreResult:
        with progress_bar(f"restoring {backup_id}", not as_json) as bar:
            return await restore_backup(repo, backup_id, to, control=control, method=method,
                                        progress=bar, live=live, pace=pace,
                                        notify=None if as_json else notify)

    if kind == "file":  # no event loop, no daemon: start-up is most of a small restore
        with progress_bar(f"restoring {backup_id}", not as_json) as bar:
            result = _guarded(lambda: restore_file(repo, backup_id, path, progress=bar))
    else:
        result = with_daemon(call)
    if as_json:
        _echo_json(result.to_json())
        return
    where = f"file {result.target}" if result.kind == "file" else f"new volume {result.target}"
    _out().print(f"Restored backup {result.backup_id} ({result.image}, "
                 f"{format_size(result.size)}) into {where}: {format_size(result.bytes_written)}"
                 f" written in {result.seconds:.2f}s.", markup=False)


def _restore_set(repo: Path, ref: str, to: str, method: str, as_json: bool) -> None:
    """``owm restore REPO G@N|SET-ID --to DIR|PREFIX``: every member of a backup set."""
    from owm.backup.sets import find_set, restore_set, set_targets

    manifest = find_set(repo, ref)
    assert manifest is not None
    targets = _guarded(lambda: set_targets(manifest, to))

    async def call(control: ControlClient | None) -> JSON:
        return await restore_set(repo, ref, to, control=control, method=method)

    if any(t.startswith("volume:") for t in targets.values()):
        result = with_daemon(call)
    else:
        result = _guarded(lambda: _run(call(None)))
    if as_json:
        _echo_json(result)
        return
    lines = [f"Restored backup set {result['set']} ({result['id']}, {result['consistency']}):"]
    for m in result["members"]:
        where = f"file {m['target']}" if m["to"] == "file" else f"new volume {m['target']}"
        lines.append(f"  {m['volume']} into {where}")
    _out().print("\n".join(lines), markup=False)
