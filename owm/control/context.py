"""What the control handlers share: the pool they drive and facts about the running daemon.

``ControlledPool`` is the slice of ``owm.pool.Pool`` the control API uses, written as a
protocol so that this package does not import the storage stack and can be tested alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from owm.common.cluster import Directory
from owm.common.errors import NotFound
from owm.common.names import parse_image_name
from owm.locks.app import LockService

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from owm.control.repo_routes import BackupRepos

JSON = dict[str, Any]


class ControlledPool(Protocol):
    """The pool operations behind the control API (see /tmp contract: owm.pool.Pool)."""

    def status(self, name: str | None = None) -> list[JSON]: ...

    async def create_volume(
        self,
        name: str,
        size: int,
        method: str = "cow",
        chunk_size: int = 65536,
        legs: int = 2,
        enospc_policy: str = "fail-write",
    ) -> JSON: ...

    async def delete_volume(self, name: str, force: bool = False) -> None: ...

    async def preserve(self, name: str, instant: bool = False) -> str: ...

    async def cutover(self, image: str) -> None: ...

    async def wait_drained(self, image: str, timeout: float | None) -> bool: ...

    async def release(
        self, image: str, progress: Callable[[int, int], None] | None = None
    ) -> None: ...


Fetch = Callable[[int, int], Awaitable[bytes]]
SourceConnector = Callable[[str, str, int], Awaitable[tuple[Fetch, Callable[[], None]]]]


@dataclass
class ControlContext:
    """Shared by every handler of one daemon (and by both of its listeners)."""

    pool: ControlledPool
    daemon: JSON = field(default_factory=dict)  # pool path, pid, NBD endpoints, for /v1/health
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    # Release progress reported by the pool's callback, by image name, while a release runs.
    release_progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Application locks ([0053]) served to transaction workers: in memory, outside every volume.
    app_locks: LockService = field(default_factory=LockService)
    # Connects to a live restore's source, an NBD export on a Unix socket (socket, export,
    # volume size): its read(offset, length) and a way to drop it.  Set by the daemon.
    connect_source: SourceConnector | None = None
    # The daemon's own Prometheus registry (owm.control.metrics.build_registry), if any.
    metrics: CollectorRegistry | None = None
    # The backups of the repositories ``owm serve --backup-repo`` names, listed by the CLI's
    # owm.backup.listing (this package may not read repositories itself).  Set by the daemon.
    backup_repos: BackupRepos | None = None
    # In a cluster: where each volume is served (requests about volumes owned by another daemon
    # are forwarded there, owm.control.forward) and the control token the cluster shares.
    directory: Directory | None = None
    cluster_token: str | None = None

    def volume(self, name: str) -> JSON:
        """The status dict of one volume, NotFound if there is none of that name."""
        found = [v for v in self.pool.status(name) if v.get("name") == name]
        if not found:
            raise NotFound(f"there is no volume named '{name}'")
        return found[0]

    def image(self, image: str) -> tuple[JSON, JSON]:
        """The (volume, image) status dicts of ``NAME@N``."""
        name, _ = parse_image_name(image)
        volume = self.volume(name)
        for entry in volume.get("images", []):
            if entry.get("name") == image:
                progress = self.release_progress.get(image)
                if progress and entry.get("release_progress") is None:
                    done, total = progress
                    entry = {**entry, "release_progress": {"done": done, "total": total}}
                return volume, entry
        raise NotFound(f"volume '{name}' has no preserved image {image}")


def holding_sessions(volume: JSON, generation: int) -> list[JSON]:
    """The open sessions that keep image ``generation`` draining: those of generation <= it."""
    held = []
    for gen in volume.get("generations", []):
        if gen.get("generation", 0) <= generation:
            for session in gen.get("sessions", []):
                held.append({**session, "generation": gen.get("generation")})
    return held


CONTEXT: web.AppKey[ControlContext] = web.AppKey("owm_control", ControlContext)
