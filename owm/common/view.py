"""The contract between the storage layer and whoever serves it: views, extents, exports.

A *view* is what one NBD connection (or one in-process user) reads and writes: the live
volume as seen by a session of some generation, or a preserved image opened read-only.  The
NBD server, the daemon and the tests all speak only this interface; ``owm.pool.Pool`` is the
implementation that puts the engines behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes in a view with the same allocation state (NBD base:allocation)."""

    length: int
    hole: bool = False  # not allocated in the view's storage
    zero: bool = False  # reads as zeroes

    @property
    def nbd_flags(self) -> int:
        """The base:allocation flags: NBD_STATE_HOLE = 1, NBD_STATE_ZERO = 2."""
        return (1 if self.hole else 0) | (2 if self.zero else 0)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a client learns about an export before opening it."""

    name: str
    description: str
    size: int
    read_only: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024  # largest READ/WRITE payload accepted
    can_multi_conn: bool = True  # a FLUSH on one connection persists writes acked on all
    extra: dict[str, object] = field(default_factory=dict)


class View(Protocol):
    """One open view of a volume; every method is a coroutine safe to call concurrently.

    Offsets and lengths are in bytes.  Errors are ``owm.common.errors.OwmError`` subclasses carrying
    the errno an NBD client is told: OutOfRange / InvalidRequest -> EINVAL, ReadOnly -> EPERM,
    NoSpace -> ENOSPC, anything else -> EIO.
    """

    export_name: str
    size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None: ...

    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...

    async def close(self, clean: bool = True) -> None:
        """End the view.  ``clean=False`` means the client vanished without a disconnect."""
        ...


class Exports(Protocol):
    """What the NBD server needs from the pool: the export list and a way to open one."""

    def list_exports(self) -> list[ExportInfo]: ...

    def export_info(self, name: str) -> ExportInfo:
        """Raise owm.common.errors.NotFound for an unknown export."""
        ...

    async def open_export(self, name: str, peer: str) -> View:
        """Open ``NAME`` (a session of the newest generation) or ``NAME@N`` (read-only).

        Raise owm.common.errors.NotFound for an unknown export, WrongState for one that cannot be
        opened now (a released image).
        """
        ...
