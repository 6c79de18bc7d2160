"""``owm backup prune``: which backups a retention policy keeps, removing the others, then
collecting the chunks no remaining backup uses.

The keep rules are restic's (``restic forget``), applied per volume: the complete backups of a
volume are taken newest first; ``--keep-last N`` keeps the N newest; ``--keep-hourly N`` keeps
the newest backup of each of the N most recent hours that have one, and likewise daily, weekly
(ISO weeks), monthly and yearly.  A backup kept by any rule is kept; each rule counts only the
backups it keeps itself.  A backup's time is the instant its image was preserved (the time the
data is from; the start of the backup when that is unknown), in UTC.  With no rule nothing is
removed (restic refuses the same way).

Never removed: incomplete backups (running, or killed and resumable), the parent of an
incomplete backup (its resume continues from that parent's map), and damaged manifests (which
also stop the collection from removing any chunk: which chunks they need cannot be known).
Every owm backup is complete in itself (an incremental copies its parent's map), so a complete
backup depends on no other and removing a parent never breaks its children.

The collection is :meth:`Repository.collect_garbage`: safe while backups run, resumable when
killed.  Prune takes the repository's shared lock (so ``backup delete`` waits) and its own
``gc.lock`` exclusively (so two prunes never run at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from owm.backup.manifest import Manifest
from owm.backup.repo import Repository
from owm.common.errors import InvalidRequest, WrongState

JSON = dict[str, Any]
RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Policy:
    """How many backups each rule keeps (0: the rule is off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, rule) < 0:
                raise InvalidRequest(f"--keep-{rule} must be zero or more")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, rule) for rule in RULES)

    def to_json(self) -> JSON:
        return {rule: getattr(self, rule) for rule in RULES}


def bucket(rule: str, when: datetime, index: int) -> tuple[int, ...]:
    """The period of ``rule`` that ``when`` falls in (``last``: every backup its own)."""
    if rule == "last":
        return (index,)
    if rule == "hourly":
        return (when.year, when.month, when.day, when.hour)
    if rule == "daily":
        return (when.year, when.month, when.day)
    if rule == "weekly":
        year, week, _ = when.isocalendar()
        return (year, week)
    if rule == "monthly":
        return (when.year, when.month)
    return (when.year,)


def apply_policy(items: list[tuple[str, datetime]],
                 policy: Policy) -> tuple[dict[str, list[str]], list[str]]:
    """Split backups (id, time) of one volume into kept (id -> the rules that keep it) and
    removed ids, both newest first (ties broken by id, the later id being newer)."""
    order = sorted(items, key=lambda item: (item[1], item[0]), reverse=True)
    left = {rule: getattr(policy, rule) for rule in RULES}
    seen: dict[str, tuple[int, ...] | None] = dict.fromkeys(RULES)
    keep: dict[str, list[str]] = {}
    remove: list[str] = []
    for index, (backup_id, when) in enumerate(order):
        reasons = []
        for rule in RULES:
            if left[rule] <= 0:
                continue
            period = bucket(rule, when, index)
            if period != seen[rule]:
                seen[rule] = period
                left[rule] -= 1
                reasons.append(rule)
        if reasons:
            keep[backup_id] = reasons
        else:
            remove.append(backup_id)
    return keep, remove


def backup_time(m: Manifest) -> datetime:
    """The time a backup stands for: when its image was preserved, else when it started."""
    stamp = m.preserved_at or m.started_at
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)  # unreadable: the oldest, kept only by a rule


@dataclass
class PruneResult:
    policy: Policy
    dry_run: bool
    kept: list[JSON] = field(default_factory=list)
    removed: list[JSON] = field(default_factory=list)
    protected: list[JSON] = field(default_factory=list)  # kept whatever the policy says
    chunks_removed: int = 0
    bytes_freed: int = 0
    chunks_kept_because: str | None = None
    seconds: float = 0.0

    def to_json(self) -> JSON:
        return {"dry_run": self.dry_run, "policy": self.policy.to_json(), "kept": self.kept,
                "removed": self.removed, "protected": self.protected,
                "chunks_removed": self.chunks_removed, "bytes_freed": self.bytes_freed,
                "chunks_kept_because": self.chunks_kept_because,
                "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def _gc_lock(repo: Repository) -> Iterator[None]:
    fd = os.open(repo.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WrongState(f"another prune is running in the repository {repo.root}") from None
        yield
    finally:
        os.close(fd)


def _row(m: Manifest, reasons: list[str] | None = None) -> JSON:
    row: JSON = {"id": m.id, "volume": m.volume, "image": m.image,
                 "time": backup_time(m).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if reasons is not None:
        row["reasons"] = reasons
    return row


def prune(repo: Repository, policy: Policy, *, volume: str | None = None,
          dry_run: bool = False) -> PruneResult:
    """Apply ``policy`` to every volume's backups (or to ``volume``'s), remove the backups it
    does not keep, then collect the chunks no remaining backup uses (unless ``dry_run``)."""
    if policy.empty:
        raise InvalidRequest("no --keep-* rule was given, so nothing would be kept; prune "
                             "removes nothing without one")
    started = time.monotonic()
    result = PruneResult(policy, dry_run)
    with repo.locked(exclusive=False), _gc_lock(repo):
        manifests, damaged = repo.manifests()
        needed = {m.parent for m in manifests if not m.complete and m.parent is not None}
        by_volume: dict[str, list[Manifest]] = {}
        for m in manifests:
            if volume is not None and m.volume != volume:
                continue
            if not m.complete:
                result.protected.append({**_row(m), "why": "incomplete"})
                continue
            by_volume.setdefault(m.volume, []).append(m)
        doomed: list[Manifest] = []
        for _, group in sorted(by_volume.items()):
            ids = {m.id: m for m in group}
            keep, remove = apply_policy([(m.id, backup_time(m)) for m in group], policy)
            for backup_id, reasons in keep.items():
                result.kept.append(_row(ids[backup_id], reasons))
            for backup_id in remove:
                if backup_id in needed:
                    result.protected.append({**_row(ids[backup_id]),
                                             "why": "the parent of an incomplete backup"})
                else:
                    doomed.append(ids[backup_id])
                    result.removed.append(_row(ids[backup_id]))
        if damaged:
            result.chunks_kept_because = (f"backup {damaged[0][0]} is damaged ({damaged[0][1]})")
        if dry_run:
            if not damaged:
                result.chunks_removed, result.bytes_freed = _would_free(repo, manifests, doomed)
        else:
            for m in doomed:
                repo.remove_manifest(m.id)
            if not damaged:
                try:
                    result.chunks_removed, result.bytes_freed = repo.collect_garbage()
                except WrongState as exc:  # a manifest damaged meanwhile
                    result.chunks_kept_because = str(exc)
    result.seconds = time.monotonic() - started
    return result


def _would_free(repo: Repository, manifests: list[Manifest],
                doomed: list[Manifest]) -> tuple[int, int]:
    gone = {m.id for m in doomed}
    kept: set[bytes] = set()
    for m in manifests:
        if m.id not in gone:
            kept.update(m.chunk_map.digests())
    freed: set[bytes] = set()
    for m in doomed:
        freed.update(d for d in m.chunk_map.digests() if d not in kept)
    size = 0
    for digest in freed:
        with contextlib.suppress(OSError):
            size += repo.chunk_path(digest).stat().st_size
    return len(freed), size
