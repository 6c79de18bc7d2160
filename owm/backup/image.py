"""What a backup needs to know about the image it reads, gathered from the daemon in one place,
and the part of the daemon's control API a backup uses (``DaemonApi``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

JSON = dict[str, Any]


class DaemonApi(Protocol):
    """The control API calls a backup makes: ``owm.control.client.ControlClient`` has them
    (aiohttp), and so has the CLI's adapter of its small blocking client, which spares a
    backup's start-up the loading of aiohttp.  A refusal is an ``OwmError`` with the HTTP
    status as ``status`` (see :func:`refused_with`)."""

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      timeout: float | None = None) -> Any: ...

    async def health(self) -> JSON: ...

    async def volume(self, name: str) -> JSON: ...

    async def image(self, image: str) -> JSON: ...

    async def wait(self, image: str, timeout: float | None = None) -> JSON: ...

    async def release(self, image: str) -> JSON: ...


def refused_with(exc: BaseException) -> int | None:
    """The HTTP status of a refusal from the daemon (None: not the daemon's answer)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


@dataclass(frozen=True)
class ImageFacts:
    """A preserved image as the daemon describes it, and the volume it belongs to."""

    image: str
    volume: str
    generation: int
    size: int
    chunk_size: int
    state: str
    consistency: str
    preserved_at: str | None
    drained_at: str | None
    volume_created: str | None
    forced: bool = False
    volume_uid: str | None = None  # the volume incarnation: what tells a re-created volume apart

    @classmethod
    def from_status(cls, volume: JSON, image: JSON, forced: bool) -> ImageFacts:
        consistency = str(image.get("consistency") or "crash-consistent")
        state = str(image.get("state"))
        if state == "drained-unclean":
            consistency = "crash-consistent"
        elif state == "broken":
            consistency = "broken"
        return cls(
            image=str(image["name"]), volume=str(volume["name"]),
            generation=int(image["generation"]), size=int(volume["size"]),
            chunk_size=int(volume["chunk_size"]), state=state, consistency=consistency,
            preserved_at=image.get("preserved_at"), drained_at=image.get("drained_at"),
            volume_created=volume.get("created_at"), forced=forced,
            volume_uid=str(volume["uid"]) if volume.get("uid") else None,
        )

    @property
    def transaction_consistent(self) -> bool:
        return self.consistency == "transaction-consistent" and not self.forced
