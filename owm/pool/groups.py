"""Consistency groups: sets of volumes preserved at one instant, drained and released as a set.

A group names member volumes (a volume belongs to at most one group).  ``preserve`` of a group
makes set ``G@N``: one new image per member, all cut at the same instant, recorded in one
catalog transaction (``Catalog.record_group_preserve``), so that after a crash either every
member is cut or none is.  The set's label is rolled up from its members' labels: it is drained
when every member image is, and transaction-consistent only if every member image is.

Groups and their sets are kept as one JSON document under the catalog's meta key ``groups``;
it is written whole (from memory, one change at a time) and, for a preserve, in the same
transaction as the members' images.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from owm.catalog import ImageRow, now
from owm.common.errors import (
    AlreadyExists,
    InvalidRequest,
    NoSpace,
    NotFound,
    OwmError,
    WrongState,
)
from owm.common.names import check_volume_name, parse_image_name
from owm.engine.base import Progress
from owm.pool.volume import Volume

if TYPE_CHECKING:
    from owm.catalog import Catalog

T = TypeVar("T")
log = logging.getLogger("owm.pool.groups")
META_KEY = "groups"
MAX_MEMBERS = 64

DbCall = Callable[[Callable[["Catalog"], T]], Awaitable[T]]

# Weakest last: a set is as consistent as its least consistent member.
CONSISTENCY_ORDER = ("transaction-consistent", "crash-consistent", "damaged", "broken")
# The set's state: the first of these any member is in; "drained" when all are drained.
STATE_ORDER = ("releasing", "broken", "damaged", "draining", "drained-unclean")


@dataclass
class GroupSet:
    number: int
    images: dict[str, int]  # member volume -> its image's generation
    preserved_at: str


@dataclass
class Group:
    name: str
    members: list[str]
    created_at: str
    next_set: int = 0
    sets: dict[int, GroupSet] = field(default_factory=dict)


def dumps(groups: dict[str, Group]) -> str:
    return json.dumps({name: dataclasses.asdict(g) for name, g in sorted(groups.items())},
                      sort_keys=True)


def loads(text: str | None) -> dict[str, Group]:
    if not text:
        return {}
    out: dict[str, Group] = {}
    for name, raw in json.loads(text).items():
        sets = {int(n): GroupSet(int(s["number"]), {str(k): int(v) for k, v in
                                                    s["images"].items()}, str(s["preserved_at"]))
                for n, s in raw.get("sets", {}).items()}
        out[name] = Group(name, [str(m) for m in raw["members"]], str(raw["created_at"]),
                          int(raw.get("next_set", 0)), sets)
    return out


def roll_up(members: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The (state, consistency) of a set from its member images' status entries."""
    states = {m.get("state") for m in members}
    state = next((s for s in STATE_ORDER if s in states), "drained")
    ranks = [CONSISTENCY_ORDER.index(str(m.get("consistency")))
             if m.get("consistency") in CONSISTENCY_ORDER else len(CONSISTENCY_ORDER) - 1
             for m in members]
    consistency = CONSISTENCY_ORDER[max(ranks, default=0)]
    return state, consistency


class Groups:
    """The pool's groups; every change is recorded in the catalog before memory changes."""

    def __init__(self, volumes: dict[str, Volume], db: DbCall[Any]) -> None:
        self.volumes = volumes
        self._db = db
        self.groups: dict[str, Group] = {}
        self._lock = asyncio.Lock()  # one change of the group record at a time

    async def load(self) -> None:
        """Read the groups; forget members and set images that no longer exist (a set release
        a crash interrupted, say).  Nothing is written: the disk may be full."""
        self.groups = loads(await self._db(lambda c: c.get_meta(META_KEY)))
        for group in self.groups.values():
            group.members = [m for m in group.members if m in self.volumes]
            for number, gset in list(group.sets.items()):
                gset.images = {m: g for m, g in gset.images.items()
                               if m in self.volumes and g in self.volumes[m].images}
                if not gset.images:
                    del group.sets[number]

    def group_of(self, volume: str) -> str | None:
        return next((g.name for g in self.groups.values() if volume in g.members), None)

    def set_of(self, volume: str, generation: int) -> str | None:
        for group in self.groups.values():
            for gset in group.sets.values():
                if gset.images.get(volume) == generation:
                    return f"{group.name}@{gset.number}"
        return None

    def group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            raise NotFound(f"there is no group named '{name}'")
        return group

    def _set(self, image: str) -> tuple[Group, GroupSet]:
        name, number = parse_image_name(image)
        group = self.group(name)
        gset = group.sets.get(number)
        if gset is None:
            raise NotFound(f"group '{name}' has no set {image}")
        return group, gset

    async def _save(self, groups: dict[str, Group]) -> None:
        text = dumps(groups)
        await self._db(lambda c: c.set_meta(META_KEY, text))
        self.groups = groups

    # -- membership ---------------------------------------------------------------------------
    async def create(self, name: str, members: Sequence[str]) -> dict[str, Any]:
        check_volume_name(name)
        if not members:
            raise InvalidRequest("a group needs at least one member volume")
        if len(members) > MAX_MEMBERS:
            raise InvalidRequest(f"a group has at most {MAX_MEMBERS} member volumes")
        if len(set(members)) != len(members):
            raise InvalidRequest("a volume is named twice among the group's members")
        async with self._lock:
            if name in self.groups:
                raise AlreadyExists(f"a group named '{name}' already exists")
            if name in self.volumes:
                raise AlreadyExists(f"'{name}' is a volume; a group needs a name of its own")
            for member in members:
                check_volume_name(member)
                if member not in self.volumes:
                    raise NotFound(f"there is no volume named '{member}'")
                other = self.group_of(member)
                if other is not None:
                    raise WrongState(f"volume '{member}' is in group '{other}' already; a "
                                     "volume is in at most one group")
            groups = dict(self.groups)
            groups[name] = Group(name, list(members), now())
            await self._save(groups)
        log.info("created group %s of %s", name, ", ".join(members))
        return self.status(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            group = self.group(name)
            if group.sets:
                sets = ", ".join(f"{name}@{n}" for n in sorted(group.sets))
                raise WrongState(f"group '{name}' still has preserved sets ({sets}); release "
                                 "them first")
            groups = {k: v for k, v in self.groups.items() if k != name}
            await self._save(groups)
        log.info("deleted group %s", name)

    # -- the cut ------------------------------------------------------------------------------
    async def preserve(self, name: str, instant: bool = False) -> dict[str, Any]:
        """Cut every member at one instant; the new set's status."""
        async with self._lock:
            group = self.group(name)
            members = [self.volumes[m] for m in sorted(group.members)]
            for volume in members:
                volume.check_preservable()
            async with contextlib.AsyncExitStack() as stack:
                # Every member's control lock, in name order (so two group preserves sharing a
                # volume cannot deadlock), before anything moves.
                for volume in members:
                    await stack.enter_async_context(volume._control)
                if not await self._db(lambda c: c.headroom()):
                    raise NoSpace(f"the pool's disk is full: group {name} was not preserved, as "
                                  "the catalog could not record it; free some space and try "
                                  "again")
                started = time.perf_counter()
                # The cut is this loop, with no await in it: from here on no session binds on
                # any member until every member has split and the set is recorded.  A session
                # bound before it keeps its old generation on its volume (it is a holder of
                # the member's new image); a session opening now waits in open_session and
                # binds to the new live generation.  So no session can get a new generation on
                # one member while a session that opened after it gets an old one on another.
                for volume in members:
                    volume.begin_preserve()
                try:
                    rows: list[ImageRow] = [await volume.split() for volume in members]
                    cuts = [(row, volume.live, dict(volume.engine.state))
                            for row, volume in zip(rows, members, strict=True)]
                    number = group.next_set
                    gset = GroupSet(number, {r.volume: r.generation for r in rows}, now())
                    groups = {k: dataclasses.replace(v, sets=dict(v.sets))
                              for k, v in self.groups.items()}
                    groups[name].sets[number] = gset
                    groups[name].next_set = number + 1
                    text = dumps(groups)
                    try:
                        await self._db(lambda c: c.record_group_preserve(cuts, text))
                    except BaseException:
                        log.error("could not record the preserve of group %s; restart to "
                                  "recover", name)
                        raise
                    self.groups = groups
                    for row, volume in zip(rows, members, strict=True):
                        await volume.adopt(row)
                finally:
                    for volume in members:
                        volume.end_preserve()
                elapsed_ms = (time.perf_counter() - started) * 1000
                log.info("preserved group %s as %s@%d (%s)", name, name, number,
                         ", ".join(f"{r.volume}@{r.generation}" for r in rows))
                if instant:
                    for volume, row in zip(members, rows, strict=True):
                        await volume._cutover(row.generation)
        return {**self.set_status(f"{name}@{number}"), "preserve_ms": round(elapsed_ms, 3),
                "instant": instant}

    # -- the set ------------------------------------------------------------------------------
    def _members(self, gset: GroupSet) -> list[tuple[Volume, int]]:
        """The member images still there (a release a crash interrupted may have taken some)."""
        return [(self.volumes[m], g) for m, g in sorted(gset.images.items())
                if m in self.volumes and g in self.volumes[m].images]

    async def cutover(self, image: str) -> None:
        _, gset = self._set(image)
        for volume, gen in self._members(gset):
            await volume.cutover(gen)

    async def wait_drained(self, image: str, timeout: float | None) -> bool:
        _, gset = self._set(image)
        waits = [volume.wait_drained(gen, None) for volume, gen in self._members(gset)]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            return False
        return True

    async def release(self, image: str, progress: Progress | None = None) -> None:
        """Release every member image (all must be drained), then forget the set."""
        group, gset = self._set(image)
        members = self._members(gset)
        for volume, gen in members:
            entry = volume.image(gen)
            if entry.state == "draining" and volume.holders(gen):
                raise WrongState(f"set {image} is still draining ({volume.name}@{gen} has "
                                 f"{len(volume.holders(gen))} sessions open); wait for it or "
                                 "cut over first")
            if volume.readers[gen]:
                raise WrongState(f"set {image} is being read ({volume.name}@{gen} by "
                                 f"{volume.readers[gen]} clients)")
        for volume, gen in members:
            await volume.release(gen, progress)
        async with self._lock:
            groups = {k: dataclasses.replace(v, sets=dict(v.sets)) for k, v in self.groups.items()}
            groups[group.name].sets.pop(gset.number, None)
            try:
                await self._save(groups)
            except OwmError as exc:
                # Every member image is gone already: the set is forgotten in memory now, and
                # the next start forgets it in the catalog too (``load``).
                log.error("set %s is released but that could not be recorded (%s)", image, exc)
                self.groups = groups
        log.info("released set %s", image)

    # -- reporting ----------------------------------------------------------------------------
    def set_status(self, image: str) -> dict[str, Any]:
        group, gset = self._set(image)
        entries = []
        for volume, gen in self._members(gset):
            found = next((i for i in volume.status()["images"] if i["generation"] == gen), None)
            if found is not None:
                entries.append({"volume": volume.name, **found})
        state, consistency = roll_up(entries)
        return {"name": f"{group.name}@{gset.number}", "group": group.name,
                "number": gset.number, "preserved_at": gset.preserved_at, "state": state,
                "consistency": consistency,
                "sessions_left": sum(int(e.get("sessions_left") or 0) for e in entries),
                "members": entries}

    def status(self, name: str) -> dict[str, Any]:
        group = self.group(name)
        return {"name": group.name, "members": list(group.members),
                "created_at": group.created_at,
                "sets": [self.set_status(f"{name}@{n}") for n in sorted(group.sets)]}

    def list(self) -> list[dict[str, Any]]:
        return [self.status(name) for name in sorted(self.groups)]
