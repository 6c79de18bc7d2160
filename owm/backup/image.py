"""What a backup needs to know about the image it reads, gathered from the daemon in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


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
