"""What a catalog is: the rows it holds and the calls the pool makes on it.

The catalog is the truth about what exists and in what state (volumes, generations, preserved
images, sessions). ``owm.catalog.sqlite`` is the local implementation; a shared one (etcd)
implements the same ``Catalog`` protocol. Every call is one atomic change, durable when it
returns; a change that cannot be recorded raises an ``OwmError`` (``NoSpace`` for a full disk)
and changed nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class VolumeRow:
    name: str
    size: int
    chunk_size: int
    method: str
    legs: int
    enospc_policy: str
    live_generation: int
    engine_state: dict[str, Any]
    created_at: str
    uid: str = ""  # a random id per volume incarnation: a re-created volume gets a new one
    restore: dict[str, Any] | None = None  # set while a restore into the volume is unfinished


@dataclass
class ImageRow:
    volume: str
    generation: int
    state: str  # draining | drained | drained-unclean | broken | releasing
    consistency: str
    preserved_at: str
    drained_at: str | None
    unclean_sessions: int
    broken_reason: str | None


class Catalog(Protocol):
    """The calls the pool makes; each is one atomic, durable change (or a read)."""

    def close(self) -> None:
        ...

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        ...

    def set_meta(self, key: str, value: str) -> None:
        ...

    def volumes(self) -> list[VolumeRow]:
        ...

    def add_volume(self, v: VolumeRow) -> None:
        ...

    def delete_volume(self, name: str) -> None:
        ...

    def save_engine_state(self, name: str, state: dict[str, Any]) -> None:
        ...

    def set_restore(self, name: str, mark: dict[str, Any] | None) -> None:
        ...

    def images(self, volume: str) -> list[ImageRow]:
        ...

    def record_preserve(self, image: ImageRow, live: int, state: dict[str, Any]) -> None:
        ...

    def record_group_preserve(
        self, cuts: Sequence[tuple[ImageRow, int, dict[str, Any]]], groups: str
    ) -> None:
        """One group preserve, all or nothing: for every member its new image, new live
        generation and engine state (as ``record_preserve``), and the pool's group record
        (``groups``, stored as the meta key ``groups``), in one transaction."""

    def update_image(self, image: ImageRow) -> None:
        ...

    def finish_release(self, volume: str, generation: int, state: dict[str, Any]) -> None:
        ...

    def open_session(self, volume: str, generation: int, peer: str) -> int:
        ...

    def close_session(
        self, session: int, clean: bool, bytes_read: int, bytes_written: int, generation: int,
        images: Sequence[ImageRow] = (),
    ) -> None:
        """End a session and record ``images`` (their new unclean counts) atomically."""

    def open_sessions(self, volume: str) -> list[tuple[int, int]]:
        ...

    def end_sessions_unclean(self, volume: str, images: Sequence[ImageRow] = ()) -> None:
        """End the sessions a crash cut off and record ``images`` atomically."""

    def prune_sessions(self, keep: int = 10000) -> None:
        ...

    def headroom(self) -> bool:
        """Whether the next change can be recorded even if the data path finds the disk full."""
