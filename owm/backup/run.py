"""``run_backup``: back a preserved image up, from asking the daemon about it to releasing it.

The steps: look the image up; if it is still draining, say which sessions hold it and wait
(bounded by ``timeout``); refuse a drained-unclean or broken image unless ``force`` (the backup
then records that it is not transaction-consistent); read it over the daemon's NBD socket into
the chosen format; optionally verify what was written; optionally release the image.  This is
the one entry point the CLI, the demo and the coordinator share::

    async with ControlClient(pool) as control:
        result = await run_backup(control, "vol@3", "/backups/repo", fmt="owm", verify=True)
    print(result.to_json())
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from owm.backup.bulkread import ReaderPool
from owm.backup.image import DaemonApi, ImageFacts, refused_with
from owm.backup.pipeline import Fetch, Pipeline, Progress, Stats
from owm.backup.qcow2 import backup_to_qcow2, compare_qcow2, nbd_uri
from owm.backup.raw import RawWriter, check_raw_file
from owm.backup.repo import Repository, is_repository
from owm.backup.source import Batch, ImageSource
from owm.backup.store import backup_to_repo
from owm.backup.verify import verify_backups
from owm.common.errors import ImageBroken, InvalidRequest, OwmError, Timeout, WrongState
from owm.common.names import parse_image_name as split_image
from owm.nbd.client import NbdClient

JSON = dict[str, Any]
FORMATS = ("raw", "qcow2", "owm")
Notify = Callable[[str], None]


class VerifyFailed(OwmError):
    """What was written does not read back as the image."""


@dataclass
class BackupResult:
    """The summary of one backup (``owm backup --json`` prints ``to_json()``)."""

    image: str
    volume: str
    format: str
    path: str
    consistency: str
    transaction_consistent: bool
    forced: bool
    size: int
    stats: Stats
    seconds: float
    backup_id: str | None = None
    parent: str | None = None
    incremental: bool = False
    changed_chunks: int | None = None
    resumed: bool = False
    verified: bool = False
    released: bool = False
    waited_seconds: float = 0.0
    extra: JSON = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Bytes of the image covered per second."""
        return self.size / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> JSON:
        return {
            "image": self.image, "volume": self.volume, "format": self.format,
            "path": self.path, "id": self.backup_id, "parent": self.parent,
            "incremental": self.incremental, "changed_chunks": self.changed_chunks,
            "resumed": self.resumed, "consistency": self.consistency,
            "transaction_consistent": self.transaction_consistent, "forced": self.forced,
            "size": self.size, **self.stats.to_json(), "seconds": round(self.seconds, 3),
            "waited_seconds": round(self.waited_seconds, 3), "verified": self.verified,
            "released": self.released, **self.extra,
        }


def infer_format(path: Path) -> str:
    """raw for .raw/.img/.bin, qcow2 for .qcow2, owm for a repository or anything else."""
    if is_repository(path) or path.is_dir():
        return "owm"
    suffix = path.suffix.lower()
    if suffix in (".raw", ".img", ".bin"):
        return "raw"
    if suffix == ".qcow2":
        return "qcow2"
    return "owm"


def describe_sessions(holding: list[JSON]) -> str:
    parts = []
    for s in holding:
        since = f" since {s['connected_since']}" if s.get("connected_since") else ""
        parts.append(f"session {s.get('id')} from {s.get('peer') or '?'}{since}")
    return ", ".join(parts) if parts else "no session listed"


def refuse_restoring(volume: JSON) -> None:
    """A volume a restore has not finished writing holds no backup-worthy state: refuse it."""
    mark = volume.get("restore")
    if mark:
        source = mark.get("from") if isinstance(mark, dict) else None
        raise WrongState(f"volume {volume.get('name')} is an incomplete restore"
                         f"{f' of {source}' if source else ''}; run that restore again to "
                         "finish it before backing it up")


async def image_facts(control: DaemonApi, image: str, *, timeout: float | None,
                      force: bool, notify: Notify | None = None) -> tuple[ImageFacts, float]:
    """Look the image up, wait for it to drain, apply the refusal rules; (facts, seconds waited)."""
    name, _ = split_image(image)
    refuse_restoring(await control.volume(name))
    info = await control.image(image)
    waited = 0.0
    if info.get("state") == "draining":
        holding = info.get("holding") or []
        if notify is not None:
            notify(f"Waiting for {image} to drain: {len(holding)} session"
                   f"{'' if len(holding) == 1 else 's'} still "
                   f"{'holds' if len(holding) == 1 else 'hold'} it "
                   f"({describe_sessions(holding)})")
        started = time.monotonic()
        answer = await control.wait(image, timeout)
        waited = time.monotonic() - started
        if not answer.get("drained"):
            holding = answer.get("holding") or []
            raise Timeout(f"gave up waiting after {timeout:g}s: {image} is still draining, "
                          f"held by {describe_sessions(holding)}")
        info = await control.image(image)
    state = info.get("state")
    if state == "releasing":
        raise WrongState(f"the image {image} is being released and cannot be backed up")
    if state == "broken" and not force:
        raise ImageBroken(f"the image {image} is broken ("
                          f"{info.get('broken_reason') or 'no reason given'}); pass --force to "
                          "try to back it up anyway")
    if state == "drained-unclean" and not force:
        n = int(info.get("unclean_sessions") or 0)
        raise WrongState(f"the image {image} is drained-unclean ({n} session"
                         f"{'' if n == 1 else 's'} "
                         "ended without a clean disconnect), so it may hold half a "
                         "transaction; pass --force to back it up as not transaction-consistent")
    volume = await control.volume(name)
    refuse_restoring(volume)
    forced = state != "drained"
    return ImageFacts.from_status(volume, info, forced), waited


async def changed_chunks(control: DaemonApi, image: str, since: int) -> list[int] | None:
    """The daemon's list of chunks of ``image`` changed since image ``since`` (None: unknown)."""
    try:
        answer = await control.request(
            "GET", f"/v1/images/{quote(image, safe='@')}/changed-chunks?since={since}",
            timeout=300)
    except OwmError as exc:
        # 502: an answer the client would not take (the CLI's caps answers at 64 MiB, some
        # seven million changed chunks): unknown too, and everything is read.
        if refused_with(exc) in (400, 404, 405, 409, 502):
            return None
        raise
    chunks = answer.get("chunks") if isinstance(answer, dict) else None
    if not isinstance(chunks, list) or not all(isinstance(c, int) for c in chunks):
        return None
    return sorted(set(chunks))


async def nbd_endpoint(control: DaemonApi) -> tuple[str | None, str | None]:
    """(Unix socket path, TCP HOST:PORT) the daemon serves NBD on."""
    health = await control.health()
    nbd = health.get("nbd") or {}
    unix, tcp = nbd.get("unix"), nbd.get("tcp")
    if unix and not Path(unix).exists():
        unix = None
    return unix, tcp


def _tcp(tcp: str) -> tuple[str, int]:
    host, _, port = tcp.rpartition(":")
    return host.strip("[]"), int(port)


async def connect_export(unix: str | None, tcp: str | None, export: str) -> NbdClient:
    if unix:
        return await NbdClient.connect(export=export, unix_path=unix)
    if tcp:
        host, port = _tcp(tcp)
        return await NbdClient.connect(export=export, host=host, port=port)
    raise InvalidRequest("the daemon serves NBD neither on a Unix socket nor on TCP")


def reader_pool(unix: str | None, tcp: str | None, export: str) -> ReaderPool:
    """Blocking connections for the worker threads that read the image's data."""
    if unix:
        return ReaderPool(export, unix_path=unix, host=None, port=0)
    host, port = _tcp(tcp or "")
    return ReaderPool(export, unix_path=None, host=host, port=port)


async def _raw(client: NbdClient, fetch: Fetch, facts: ImageFacts, path: Path, stats: Stats,
               verify: bool, progress: Progress | None) -> bool:
    writer = RawWriter(path, facts.size, facts.chunk_size, stats, keep_digests=verify)
    try:
        source = ImageSource(client, facts.chunk_size)
        await Pipeline(writer, fetch, total=facts.size, progress=progress).run(source.plan())
        await asyncio.get_running_loop().run_in_executor(None, writer.commit)
    except BaseException:
        writer.abandon()
        raise
    if not verify:
        return False
    assert writer.digests is not None
    problems = await asyncio.get_running_loop().run_in_executor(
        None, check_raw_file, path, facts.size, facts.chunk_size, writer.digests)
    if problems:
        raise VerifyFailed(f"the backup {path} fails verification: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return True


async def _allocated_bytes(client: NbdClient) -> int:
    if client.meta_context_id is None:
        return client.size
    total = 0
    for length, state in await client.block_status(0, client.size):
        if not state & 2:
            total += length
    return total


async def run_backup(
    control: DaemonApi,
    image: str,
    to: Path | str,
    *,
    fmt: str | None = None,
    verify: bool = False,
    release: bool = False,
    timeout: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> BackupResult:
    """Back ``image`` (NAME@N) up to ``to`` in ``fmt`` (raw, qcow2, owm; inferred if None).

    ``progress(done, total)`` is called with bytes of the image covered; ``notify(sentence)``
    with what the backup waits for.  Raises ``OwmError`` with one sentence on any refusal.
    """
    path = Path(to)
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown backup format '{fmt}'; choose raw, qcow2 or owm")
    if fmt == "owm" and path.exists() and not path.is_dir():
        raise InvalidRequest(f"{path} is a file; an owm backup goes into a repository directory")
    if fmt == "owm" and path.is_dir() and any(path.iterdir()) and not is_repository(path):
        raise InvalidRequest(f"{path} is a directory that is not empty and not an owm backup "
                             "repository")
    facts, waited = await image_facts(control, image, timeout=timeout, force=force,
                                      notify=notify)
    unix, tcp = await nbd_endpoint(control)
    stats = Stats()
    result = BackupResult(
        image=facts.image, volume=facts.volume, format=fmt, path=str(path.absolute()),
        consistency=facts.consistency, transaction_consistent=facts.transaction_consistent,
        forced=facts.forced, size=facts.size, stats=stats, seconds=0.0, waited_seconds=waited)
    started = time.monotonic()
    client = await connect_export(unix, tcp, facts.image)
    readers = reader_pool(unix, tcp, facts.image)

    def fetch(group: list[Batch]) -> bytearray:
        return readers.read([(b.offset, b.length) for b in group])

    try:
        if fmt == "raw":
            result.verified = await _raw(client, fetch, facts, path, stats, verify, progress)
        elif fmt == "qcow2":
            uri = nbd_uri(facts.image, unix, tcp)
            allocated = await _allocated_bytes(client)
            written = await backup_to_qcow2(uri, path, facts.size, progress=progress)
            stats.add(read=allocated, written=written,
                      new=(allocated + facts.chunk_size - 1) // facts.chunk_size)
            if verify:
                await compare_qcow2(uri, path)
                result.verified = True
        else:
            done = await backup_to_repo(
                client, facts, path, fetch=fetch, progress=progress,
                changed_since=lambda since: changed_chunks(control, facts.image, since))
            result.stats = stats = done.stats
            result.backup_id = done.manifest.id
            result.parent = done.manifest.parent
            result.incremental = done.manifest.incremental
            result.changed_chunks = done.changed_chunks
            result.resumed = done.resumed
            if verify:
                repo = Repository.open(path)
                reports = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: verify_backups(repo, done.manifest.id))
                bad = [r for r in reports if not r.ok]
                if bad:
                    raise VerifyFailed(bad[0].sentence())
                result.verified = True
        result.seconds = time.monotonic() - started
    finally:
        await asyncio.get_running_loop().run_in_executor(None, readers.close)
        await client.disconnect()
    if release:
        await control.release(facts.image)
        result.released = True
    return result
