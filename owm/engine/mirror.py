"""Split mirror ([0062]-[0072]): every leg holds a full copy of the volume.

Before any preserve, writes go to every leg (RAID-1).  A preserve splits one in-sync leg off as
the preserved image; from then on a write by generation k goes to the legs of views k..live and
marks the chunk dirty (durably, before the write) on the legs of older views.  Releasing an image
resyncs its leg from a live leg, copying only its dirty chunks while I/O goes on (writes reach the
resyncing leg too), and the leg rejoins the mirror.  Up to legs-1 images can be outstanding.

Leg roles are kept in ``state["legs"]`` (persisted by the volume's catalog row):
``{"role": "sync"}``, ``{"role": "image", "view": g, "full": bool}`` or
``{"role": "resync", "full": bool}``; ``full`` means the dirty map cannot be trusted (after an
unclean shutdown) and a resync copies every allocated chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from owm.common.errors import InvalidRequest, WrongState
from owm.engine.base import Engine, Progress
from owm.engine.chunktable import ChunkTable
from owm.locks.ranges import EXCLUSIVE
from owm.storage import Buffer


def _leg(i: int) -> str:
    return f"leg-{i}.data"


class MirrorEngine(Engine):
    method = "mirror"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.legs < 2:
            raise InvalidRequest("a mirror needs at least 2 legs")
        self.state.setdefault("legs", [{"role": "sync"} for _ in range(self.legs)])
        self.dirty: dict[int, ChunkTable] = {}

    @property
    def roles(self) -> list[dict[str, Any]]:
        legs: list[dict[str, Any]] = self.state["legs"]
        return legs

    def _dirty_table(self, leg: int) -> ChunkTable:
        return ChunkTable(self.storage, f"leg-{leg}.dirty", self.chunks)

    async def open(self, views: list[int], releasing: list[int], clean: bool) -> None:
        self.views = list(views)
        for i, role in enumerate(self.roles):
            if role["role"] == "image" and role["view"] in releasing:
                self.roles[i] = role = {"role": "resync", "view": role["view"],
                                        "full": role.get("full", False)}
            if role["role"] != "sync":
                table = self._dirty_table(i)
                await table.load()
                self.dirty[i] = table
                if not clean:
                    role["full"] = True  # an unsynced write may have reached this leg alone
        if not clean:
            # In-sync legs may differ where writes were in flight: make them equal again.
            primary = self._primary()
            for i in self._sync_legs()[1:]:
                await self._copy_chunks(primary, i, await self._data_chunks([primary, i]), None)

    def _sync_legs(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r["role"] == "sync"]

    def _primary(self) -> int:
        return self._sync_legs()[0]

    def _image_leg(self, view: int) -> int:
        for i, r in enumerate(self.roles):
            if r["role"] == "image" and r["view"] == view:
                return i
        raise WrongState(f"no leg holds image {view}")

    def _leg_of(self, view: int) -> int:
        return self._primary() if view == self.views[-1] else self._image_leg(view)

    def objects_of(self, view: int) -> list[str]:
        if view == self.views[-1]:
            return [_leg(i) for i in self._sync_legs()]
        leg = self._image_leg(view)
        t = f"leg-{leg}.dirty"
        return [_leg(leg), t + ".ckpt0", t + ".ckpt1", t + ".journal"]

    async def preserve(self) -> int:
        in_sync = self._sync_legs()
        if len(in_sync) < 2:
            raise WrongState(
                f"every spare leg of this {self.legs}-leg mirror already holds a preserved image; "
                "release one first"
            )
        preserved = self.views[-1]
        leg = in_sync[-1]
        self.roles[leg] = {"role": "image", "view": preserved, "full": False}
        self.dirty[leg] = self._dirty_table(leg)
        self.views.append(preserved + 1)
        return preserved

    def _placement(self, view: int, offset: int, length: int) -> Iterator[tuple[str, int, int]]:
        yield _leg(self._leg_of(view)), offset, length

    # -- writes -----------------------------------------------------------------------------
    def _targets(self, gen: int) -> list[int]:
        return [i for i, r in enumerate(self.roles)
                if r["role"] != "image" or r["view"] >= gen]

    async def _mark_older(self, gen: int, first: int, last: int) -> None:
        """Durably mark chunks dirty on the legs of images older than gen, before the write."""
        if not self.dirty:
            return
        tables = [self.dirty[i] for i, r in enumerate(self.roles)
                  if r["role"] == "image" and r["view"] < gen]
        pending = []
        for table in tables:
            marked = False
            for chunk in range(first, last + 1):
                if not table.has(chunk):
                    table.set(chunk)
                    marked = True
            if marked:
                pending.append(table.commit())
        if pending:
            await asyncio.gather(*pending)

    async def _write(self, gen: int, offset: int, data: Buffer) -> set[str]:
        await self._mark_older(gen, *self.chunk_range(offset, len(data)))
        names = [_leg(i) for i in self._targets(gen)]
        # One leg after another: small writes complete inline, where a Task per leg would cost
        # more than the write; large ones run in the storage's threads either way.
        for name in names:
            await self.storage.write(name, offset, data)
        return set(names)

    async def _zero(self, gen: int, offset: int, length: int, punch: bool) -> set[str]:
        await self._mark_older(gen, *self.chunk_range(offset, length))
        names = [_leg(i) for i in self._targets(gen)]
        await asyncio.gather(*(self.put_zero(n, offset, length, punch) for n in names))
        return set(names)

    async def _flush(self) -> None:
        await self.sync_objects([_leg(i) for i in range(self.legs)
                                 if self.storage.exists(_leg(i))])
        await asyncio.gather(*(t.commit() for t in self.dirty.values()))

    async def close(self) -> None:
        await super().close()
        for table in self.dirty.values():
            await table.checkpoint()

    # -- release: resync the leg ------------------------------------------------------------
    async def _data_chunks(self, legs: list[int]) -> list[int]:
        chunks: set[int] = set()
        for leg in legs:
            for start, n, is_data in await self.storage.extents(_leg(leg), 0, self.size):
                if is_data:
                    chunks.update(range(start >> self.shift, (start + n - 1 >> self.shift) + 1))
        return sorted(chunks)

    async def _copy_chunks(
        self, source: int, target: int, chunks: list[int], progress: Progress | None
    ) -> None:
        for k, chunk in enumerate(chunks):
            async with self.locks.locked(chunk, chunk, EXCLUSIVE):
                start = chunk << self.shift
                n = min(self.chunk_size, self.size - start)
                content = await self.storage.read(_leg(source), start, n)
                await self.put(_leg(target), start, content)
            if progress is not None:
                progress(k + 1, len(chunks) + 1)
        await self.group_sync(_leg(target))()

    async def release(self, view: int, progress: Progress | None = None) -> None:
        if view in self.views:
            self.views.remove(view)
        leg = next((i for i, r in enumerate(self.roles)
                    if r["role"] in ("image", "resync") and r.get("view") == view), None)
        if leg is None:
            return
        full = bool(self.roles[leg].get("full"))
        # From now on the leg receives every live write; only its dirty chunks need copying.
        self.roles[leg] = {"role": "resync", "view": view, "full": full}
        # Writes that chose their legs (and dirty marks) before the role changed finish first.
        await self.locks.barrier()
        source = self._primary()
        table = self.dirty.pop(leg)
        chunks = await self._data_chunks([source, leg]) if full else list(table)
        await self._copy_chunks(source, leg, chunks, progress)
        self.roles[leg] = {"role": "sync"}
        await table.destroy()
        if progress is not None:
            progress(1, 1)
