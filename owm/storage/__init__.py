"""The storage interface: the only way engines reach image data and tables.

Engines never open files.  They read, write, sync, allocate and discard *named objects* through a
``Storage``; local files are the embedded default (``owm.storage.local``), the power-loss
simulation is another implementation (``owm.storage.simulated``), and a RADOS backend would be a
third.  Objects are sparse: reading a range never written returns zeroes.

May import ``owm.common`` only.
"""

from __future__ import annotations

from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Storage(Protocol):
    async def read(self, name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes; holes and the range past the object's end read as zeroes."""
        ...

    async def write(self, name: str, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``, creating the object if it does not exist."""
        ...

    async def sync(self, name: str) -> None:
        """Make every completed write and discard on ``name`` durable."""
        ...

    async def allocate(self, name: str, size: int) -> None:
        """Create the object (sparse) with at least ``size`` bytes if it does not exist."""
        ...

    async def discard(self, name: str, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeroes afterwards and frees its space."""
        ...

    async def extents(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Cover [offset, offset+length) with (offset, length, is_data) runs, holes as False."""
        ...

    async def delete(self, name: str) -> None:
        """Remove the object; deleting a missing object is not an error."""
        ...

    def exists(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def bytes_used(self, name: str) -> int:
        """Bytes of real storage the object occupies (0 for a missing object)."""
        ...

    async def close(self) -> None: ...
