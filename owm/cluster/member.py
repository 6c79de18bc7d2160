"""One daemon of a cluster: its membership in etcd and the volumes it owns.

Several ``owm serve --daemon-id ID`` processes share one pool (data in RADOS, catalog in etcd)
and each volume has exactly one owner.  A member

* joins: ``P daemons/<id>`` on a lease of its own (``--lease-ttl``), with its addresses;
* at start, and then every ``poll`` seconds (one etcd read), claims every volume that has no
  owner (an etcd transaction that needs the owner key absent, so two daemons never both win),
  unless a planned move reserves it for another live daemon;
* before opening a volume whose last owner did not close it cleanly, fences that owner (its
  RADOS client blocklisted, see ``owm.cluster.fence``), then opens it recovered as after a
  crash: the sessions the old owner lost end unclean, so draining images end drained-unclean;
* answers planned moves (``P moves/<name>``) of the volumes it owns: refused with one sentence
  while an image of the volume is still draining (unless forced), else the volume is closed
  (sessions end, everything flushed and persisted), marked cleanly closed and let go, and only
  the target claims it (no fencing after a clean close);
* stops serving at once (``on_lost``) when its lease ended, a volume was taken from it, or RADOS
  refuses it (blocklisted): it may no longer acknowledge anything.

At a clean stop it closes and hands back every volume (cleanly closed), then leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from owm.catalog.etcd import CatalogConflict, EtcdCatalog
from owm.cluster.fence import Fencer
from owm.common.errors import OwmError

if TYPE_CHECKING:
    from owm.pool.pool import Pool

log = logging.getLogger("owm.cluster.member")

DEFAULT_TTL = 5  # seconds of a member's lease
DEFAULT_POLL = 0.5  # seconds between two looks at the owners
STOP_WAIT = 30.0  # seconds a stop waits for the look under way to finish


@dataclass
class MemberConfig:
    daemon_id: str
    ttl: int = DEFAULT_TTL
    poll: float = DEFAULT_POLL


class Member:
    """The ownership side of one daemon (see the module docstring)."""

    def __init__(self, pool: Pool, config: MemberConfig, *, fencer: Fencer | None,
                 rados_address: str | None, on_lost: Callable[[str], None]) -> None:
        catalog = pool.catalog
        if not isinstance(catalog, EtcdCatalog):
            raise OwmError("a cluster needs its catalog in etcd (--etcd)")
        self.pool = pool
        self.catalog: EtcdCatalog = catalog
        self.config = config
        self.fencer = fencer
        self.rados_address = rados_address
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # Owned but not open yet: name -> (clean, RADOS addresses still to fence, last owner).
        self._pending: dict[str, tuple[bool, list[str], str]] = {}
        self._refused: set[tuple[str, str]] = set()  # (volume, move stamp) already answered
        self.lost: str | None = None
        self._stopping = asyncio.Event()
        self.last_view: dict[str, Any] = {}

    @property
    def daemon_id(self) -> str:
        return self.config.daemon_id

    async def _db(self, fn: Callable[[EtcdCatalog], Any]) -> Any:
        catalog = self.catalog
        return await self.pool.db(lambda _c: fn(catalog))

    # -- joining and losing -----------------------------------------------------------------
    async def join(self, record: dict[str, Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self.catalog.rados_address = self.rados_address
        self.catalog.on_lost = self._lost_threadsafe
        record = {**record, "rados": self.rados_address, "started": time.time()}
        await self._db(lambda c: c.join(self.daemon_id, record, ttl=self.config.ttl))
        log.info("joined the cluster %s as daemon %s (lease %d s)", self.catalog.prefix,
                 self.daemon_id, self.config.ttl)

    def _lost_threadsafe(self, sentence: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.lose, sentence)

    def lose(self, sentence: str) -> None:
        """This daemon may no longer serve: tell the daemon (once)."""
        if self.lost is not None:
            return
        self.lost = sentence
        self._on_lost(sentence)

    # -- the loop ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failing = False
        while self.lost is None and not self._stopping.is_set():
            try:
                await self.step()
                if failing:
                    log.info("the cluster's owners can be read again")
                failing = False
            except asyncio.CancelledError:
                raise
            except OwmError as exc:
                if not failing:
                    log.warning("could not look at the cluster's owners: %s", exc)
                failing = True
            except Exception:  # a bug must not silently end the watch: say it, keep going
                if not failing:
                    log.exception("looking at the cluster's owners failed")
                failing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.poll)

    async def stop(self) -> None:
        """End the watch after the step under way (a volume half opened or half handed back
        would be worse than a wait), cancelling it only if it takes too long."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._task), STOP_WAIT)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            self._task = None

    async def step(self) -> None:
        """One look at the cluster: answer moves, claim what has no owner, open what is ours."""
        view = await self._db(lambda c: c.cluster_view())
        self.last_view = view
        me = self.daemon_id
        daemons, owners, moves = view["daemons"], view["owners"], view["moves"]
        for name, move in sorted(moves.items()):
            if owners.get(name, {}).get("daemon") == me and "refused" not in move:
                await self._answer_move(name, move, daemons)
        for name in sorted(view["volumes"]):
            if name in owners:
                continue
            move = moves.get(name)
            if move and "refused" not in move and move.get("to") != me \
                    and move.get("to") in daemons:
                continue  # a planned move: only its target may take it
            await self._take(name)
        for name in sorted(self._pending):
            await self._open(name)

    async def _take(self, name: str) -> None:
        try:
            before = await self._db(lambda c: c.claim_volume(name, self.rados_address))
        except CatalogConflict:
            return  # another daemon was first
        if before is None:
            return
        fence = [str(a) for a in before.get("fence") or []]
        clean = not fence and (bool(before.get("clean")) or "epoch" not in before)
        previous = str(before.get("daemon") or "nobody")
        log.info("daemon %s took volume %s over from %s (epoch %d%s)", self.daemon_id, name,
                 previous, int(before.get("epoch", 0)) + 1,
                 "" if clean else ", not closed cleanly", extra={"volume": name})
        self._pending[name] = (clean, fence, previous)
        await self._open(name)

    async def _open(self, name: str) -> None:
        clean, fence, previous = self._pending[name]
        if not self.catalog.owns(name):
            self._pending.pop(name, None)
            return
        if fence:
            if self.fencer is None:
                log.error("volume %s: its last owner %s did not close it cleanly and this "
                          "daemon cannot fence it; not serving it", name, previous,
                          extra={"volume": name})
                return
            try:
                for address in fence:
                    await self.fencer.fence(address, previous)
                await self._db(lambda c: c.mark_fenced(name))
            except OwmError as exc:
                log.error("volume %s is not served yet: %s", name, exc, extra={"volume": name})
                return
            self._pending[name] = (clean, [], previous)
        try:
            await self.pool.open_volume(name, clean)
        except OwmError as exc:
            log.error("volume %s could not be opened (tried again): %s", name, exc,
                      extra={"volume": name})
            return
        self._pending.pop(name, None)

    # -- planned moves ----------------------------------------------------------------------
    def draining(self, name: str) -> list[str]:
        volume = self.pool.volumes.get(name)
        if volume is None:
            return []
        return [f"{name}@{g}" for g, i in sorted(volume.images.items()) if i.state == "draining"]

    async def _answer_move(self, name: str, move: dict[str, Any],
                           daemons: dict[str, Any]) -> None:
        target = str(move.get("to"))
        stamp = str(move.get("id"))
        refusal = None
        if target == self.daemon_id:
            refusal = f"volume {name} is already served by daemon {target}"
        elif target not in daemons:
            refusal = f"there is no daemon '{target}' in the cluster"
        elif name in self._pending:
            refusal = f"volume {name} is still being opened; try again"
        else:
            draining = self.draining(name)
            if draining and not move.get("force"):
                refusal = (f"wait for {', '.join(draining)} to drain, or cut it over, "
                           f"before moving volume {name} (or move it with --force)")
        if refusal is not None:
            if (name, stamp) not in self._refused:
                self._refused.add((name, stamp))
                await self._db(lambda c: c.answer_move(name, refusal))
            return
        await self.hand_back(name, f"moving it to daemon {target}")

    async def hand_back(self, name: str, why: str) -> None:
        """Close ``name`` (sessions end unclean: images they held stay honest) and let it go,
        recorded as cleanly closed when it was."""
        log.info("volume %s: %s", name, why, extra={"volume": name})
        clean = await self.pool.close_volume(name)
        await self._release(name, clean)

    async def _release(self, name: str, clean: bool) -> None:
        await self._db(lambda c: c.release_volume(name, clean))

    async def shutdown(self) -> None:
        """At a clean stop: every owned volume closed and handed back (clean)."""
        await self.stop()
        if self.lost is not None:
            return
        for name in self.catalog.owned():
            try:
                if name in self._pending:
                    # Never opened here: hand it back as found (whom to fence stays recorded).
                    clean = self._pending.pop(name)[0]
                    await self._release(name, clean)
                else:
                    await self.hand_back(name, "the daemon is stopping")
            except OwmError as exc:
                log.error("volume %s was not handed back cleanly: %s", name, exc,
                          extra={"volume": name})
