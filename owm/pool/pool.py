"""A pool: one directory holding the catalog and every volume's storage; the Exports of the server.

Layout: ``POOL/catalog.sqlite`` and ``POOL/volumes/NAME/`` (the volume's storage objects).  Opening
a pool after any kind of stop recovers it: sessions the crash cut off are ended as unclean, their
images settle as drained-unclean, interrupted releases resume.  The pool is also what the NBD
server serves: ``NAME`` opens a session of the newest generation, ``NAME@N`` image N read-only.

In a cluster (``cluster=True``: several daemons on one shared pool, see ``owm.cluster``) the pool
opens no volume at start: it serves only the volumes this daemon owns, opened one by one with
``open_volume`` (recovered as after a crash unless their last owner closed them cleanly) and
closed with ``close_volume``; the pool-wide clean flag and rows digest are not used there (other
daemons change the catalog meanwhile; each volume's clean close is recorded with its owner).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from owm.catalog import Catalog, SqliteCatalog, VolumeRow, now
from owm.common.errors import AlreadyExists, InvalidRequest, NotFound, OwmError, WrongState
from owm.common.names import check_volume_name, parse_image_name
from owm.common.sizes import check_volume_size
from owm.common.view import ExportInfo, View
from owm.engine import ENGINES, make_engine
from owm.engine.base import ENOSPC_POLICIES, Progress, check_chunk_size
from owm.pool import integrity
from owm.pool.clone import Fetch, LiveRestore
from owm.pool.groups import Groups
from owm.pool.volume import Volume
from owm.storage import Storage
from owm.storage.local import LocalStorage

T = TypeVar("T")
log = logging.getLogger("owm.pool.pool")

StorageFactory = Callable[[str], Storage]
CatalogFactory = Callable[[], Catalog]  # called on the catalog's thread; None: POOL/catalog.sqlite
# Given where the catalog says the pool's data lives (None: nothing recorded, i.e. local files)
# and whether the pool has volumes, opens that storage: its factory and what to record.
StorageOpener = Callable[[dict[str, Any] | None, bool],
                         Awaitable[tuple[StorageFactory, dict[str, Any]]]]
STORAGE_KEY = "storage"
MAX_PAYLOAD = 32 * 1024 * 1024
RESTORE_SUFFIX = "+restore"  # the storage of a live restore's filled bits ('+': no volume name)


def _record_digest(c: Catalog) -> None:
    volumes = c.volumes()
    c.set_meta(integrity.DIGEST_KEY, integrity.rows_digest(
        volumes, {v.name: c.images(v.name) for v in volumes}))


CLOSE_IDLE_WAIT = 30.0  # seconds close_volume waits for requests under way to finish


class StorageRecordRaced(WrongState):
    """Another daemon recorded where the pool's data lives while this one was opening it."""


class Pool:
    def __init__(self, root: Path, storage_factory: StorageFactory | None,
                 catalog_factory: CatalogFactory | None = None,
                 storage_opener: StorageOpener | None = None, cluster: bool = False) -> None:
        self.root = root
        self.cluster = cluster
        # Called with a volume's name before it is opened at run time (RADOS: reload its index).
        self.before_open: Callable[[str], Awaitable[None]] | None = None
        # Cluster mode: told a volume is about to stop being served here (the daemon closes
        # its NBD connections, so that their requests go again to the next owner).
        self.before_close: Callable[[str], object] | None = None
        self._factory = storage_factory or (lambda name: LocalStorage(root / "volumes" / name))
        self._catalog_factory = catalog_factory
        self.catalog_info: dict[str, Any] = {"kind": "sqlite",
                                             "path": str(root / "catalog.sqlite")}
        self._opener = storage_opener
        self.storage_where: dict[str, Any] = {"kind": "local"}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="owm-catalog")
        self.catalog: Catalog | None = None
        self.volumes: dict[str, Volume] = {}
        self.groups = Groups(self.volumes, self.db)
        self.was_clean = True
        self.closed_cleanly: bool | None = None  # set by close(): whether it marked the pool clean

    @classmethod
    async def open(
        cls, root: Path | str, *, storage_factory: StorageFactory | None = None,
        catalog_factory: CatalogFactory | None = None,
        storage_opener: StorageOpener | None = None, cluster: bool = False,
    ) -> Pool:
        pool = cls(Path(root), storage_factory, catalog_factory, storage_opener, cluster)
        try:
            await pool._open()
        except BaseException:
            pool._executor.shutdown(wait=False)
            raise
        return pool

    async def db(self, fn: Callable[[Catalog], T]) -> T:
        """Run a catalog call on the catalog's own thread."""
        catalog = self.catalog
        assert catalog is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: fn(catalog))

    async def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        sqlite_path = self.root / "catalog.sqlite"
        path: Path | str = sqlite_path  # how messages name the catalog
        loop = asyncio.get_running_loop()
        factory = self._catalog_factory
        if factory is None:
            # A corrupt or missing catalog stops the start before anything is written (#9
            # item 10).  The file checks are SQLite's; another catalog checks its own values.
            await loop.run_in_executor(self._executor, integrity.check_file, sqlite_path,
                                       self.root / "volumes")
            factory = lambda: SqliteCatalog(sqlite_path)  # noqa: E731
        (self.root / "volumes").mkdir(exist_ok=True)
        try:
            self.catalog = await loop.run_in_executor(self._executor, factory)
            describe = getattr(self.catalog, "describe", None)
            if describe is not None:
                self.catalog_info = dict(describe())
                path = str(getattr(self.catalog, "location", path))
            self.was_clean = self.cluster or \
                await self.db(lambda c: c.get_meta("clean", "1")) == "1"
            rows = await self.db(lambda c: c.volumes())
            images = {r.name: await self.db(lambda c, n=r.name: c.images(n))  # type: ignore[misc]
                      for r in rows}
        except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
            if self.catalog is not None:
                await self.db(lambda c: c.close())
                self.catalog = None
            raise integrity.CatalogDamaged(
                f"the catalog {path} is corrupt ({exc}); the daemon did not start and changed "
                "nothing (restore the file from a copy, or move the pool aside)") from None
        integrity.check_rows(path, rows, images)
        if self.was_clean and not self.cluster:
            recorded = await self.db(lambda c: c.get_meta(integrity.DIGEST_KEY))
            integrity.check_digest(path, recorded, rows, images)
        await self._open_storage(bool(rows))
        if self.cluster:
            await self.groups.load()
            return
        if not self.was_clean:
            log.warning("pool %s was not shut down cleanly: recovering", self.root)
        await self.db(lambda c: c.set_meta("clean", "0"))
        for row in rows:
            await self._start_volume(row, self.was_clean)
        await self.groups.load()

    async def open_volume(self, name: str, clean: bool) -> Volume | None:
        """Start serving volume ``name`` at run time (cluster mode: once this daemon owns it).

        Recovered as at a start after a crash unless ``clean`` (its last owner closed it
        cleanly): the sessions recorded open end unclean, so the images they held settle
        drained-unclean; the engine's tables are read from storage; a release resumes.
        None if the catalog has no such volume."""
        if name in self.volumes:
            return self.volumes[name]
        rows = [r for r in await self.db(lambda c: c.volumes()) if r.name == name]
        if not rows:
            return None
        if self.before_open is not None:
            await self.before_open(name)
        volume = await self._start_volume(rows[0], clean)
        log.info("serving volume %s%s", name, "" if clean else " (recovered)",
                 extra={"volume": name})
        return volume

    async def close_volume(self, name: str) -> bool:
        """Stop serving volume ``name``: its sessions end (unclean, so the images they held stay
        honest), what is held is flushed and its tables persisted.  Returns whether it closed
        cleanly (False: a storage error; the next owner then recovers it as after a crash)."""
        volume = self.volumes.pop(name, None)
        if volume is None:
            return True
        if self.before_close is not None:
            self.before_close(name)
        # Requests already under way finish before the engine closes under them.
        if not await volume.wait_idle(CLOSE_IDLE_WAIT):
            log.warning("volume %s still had requests under way after %.0f s; closing it anyway",
                        name, CLOSE_IDLE_WAIT, extra={"volume": name})
        try:
            await volume.close()
        except OwmError as exc:
            log.error("volume %s did not close cleanly: %s", name, exc, extra={"volume": name})
            await volume.engine.storage.close()
            return False
        log.info("stopped serving volume %s", name, extra={"volume": name})
        return True

    async def _open_storage(self, has_volumes: bool) -> None:
        """Check where the catalog says the data lives against how the pool is being opened.

        A pool whose data is elsewhere (RADOS) is refused when opened without it, before
        anything is written, rather than served as empty volumes."""
        text = await self.db(lambda c: c.get_meta(STORAGE_KEY))
        recorded = json.loads(text) if text else None
        try:
            if self._opener is None:
                if recorded and recorded.get("kind", "local") != "local":
                    raise WrongState(
                        f"pool {self.root} keeps its data in RADOS pool "
                        f"'{recorded.get('rados_pool')}' (Ceph configuration "
                        f"{recorded.get('ceph_conf')}); serve it with --ceph-conf and "
                        "--rados-pool")
                return
            self._factory, where = await self._opener(recorded, has_volumes)
        except BaseException:
            await self.db(lambda c: c.close())
            self.catalog = None
            raise
        if where != recorded:
            try:
                await self.db(lambda c: c.set_meta(STORAGE_KEY, json.dumps(where, sort_keys=True)))
            except WrongState:
                # Daemons of a cluster started together on a new pool: another recorded where
                # the data lives at the same instant (the guarded write let one win).  Fine if
                # it recorded the same place; else the opening must start again from its record
                # (a new RADOS pool gets a namespace of its own, and only one may be used).
                text = await self.db(lambda c: c.get_meta(STORAGE_KEY))
                if not text or json.loads(text) != where:
                    await self.db(lambda c: c.close())
                    self.catalog = None
                    raise StorageRecordRaced(
                        f"another daemon recorded where the data of pool {self.root} lives "
                        "at the same instant; open it again") from None
        self.storage_where = where

    async def _start_volume(self, row: VolumeRow, clean: bool) -> Volume:
        engine = make_engine(row.method, self._factory(row.name), row.size, row.chunk_size,
                             legs=row.legs, enospc_policy=row.enospc_policy,
                             state=row.engine_state)
        volume = Volume(row, engine, self.db)
        images = await self.db(lambda c: c.images(row.name))
        vanished = await self.db(lambda c: c.open_sessions(row.name))
        await volume.start(images, clean, vanished)
        if row.restore and row.restore.get("live"):
            live = LiveRestore(row.name, self._factory(row.name + RESTORE_SUFFIX), row.size,
                               row.chunk_size, lambda o, d: engine.write(volume.live, o, d),
                               engine.flush)
            await live.load()
            volume.live_restore = live
        self.volumes[row.name] = volume
        return volume

    async def close(self) -> None:
        clean = True
        for volume in list(self.volumes.values()):
            try:
                await volume.close()
            except OwmError as exc:
                # E.g. a full disk: what was acknowledged is durable already; the next open
                # recovers the rest as after a crash.
                log.error("volume %s did not close cleanly: %s", volume.name, exc)
                clean = False
                await volume.engine.storage.close()
        self.volumes.clear()
        if self.catalog is not None:
            try:
                await self.db(lambda c: c.prune_sessions())
                if clean and not self.cluster:
                    # The digest first: a pool marked clean without one is trusted unchecked.
                    await self.db(_record_digest)
                    await self.db(lambda c: c.set_meta("clean", "1"))
            except (OwmError, sqlite3.Error) as exc:
                log.error("the pool's catalog could not be marked clean: %s", exc)
                clean = False
            await self.db(lambda c: c.close())
            self.catalog = None
        self._executor.shutdown(wait=True)
        self.closed_cleanly = clean
        if clean:
            log.info("pool %s closed cleanly", self.root)
        else:
            log.warning("pool %s did not close cleanly; the next start recovers it as after a "
                        "crash", self.root)

    async def kill(self) -> None:
        """Stop the way a crashed process stops: nothing is synced, closed or marked clean."""
        for volume in self.volumes.values():
            volume.abandon()
        self.volumes.clear()
        if self.catalog is not None:
            await self.db(lambda c: c.close())
            self.catalog = None
        self._executor.shutdown(wait=True)

    # -- volumes ----------------------------------------------------------------------------
    def volume(self, name: str) -> Volume:
        volume = self.volumes.get(name)
        if volume is None:
            raise NotFound(f"there is no volume named '{name}'")
        return volume

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        volumes = [self.volume(name)] if name is not None else [
            v for _, v in sorted(self.volumes.items())]
        if self.storage_where.get("kind", "local") == "local":
            return [v.status() for v in volumes]
        return [{**v.status(), "storage": self.storage_where} for v in volumes]

    async def create_volume(
        self,
        name: str,
        size: int,
        method: str = "cow",
        chunk_size: int = 65536,
        legs: int = 2,
        enospc_policy: str = "fail-write",
        restore_from: str | None = None,
        live: bool = False,
    ) -> dict[str, Any]:
        """Create a volume; with ``restore_from`` it is born marked as an unfinished restore
        (``live``: usable at once, filled from a source attached with attach_restore_source)."""
        check_volume_name(name)
        if name in self.volumes:
            raise AlreadyExists(f"a volume named '{name}' already exists")
        if name in self.groups.groups:
            raise AlreadyExists(f"'{name}' is a group; a volume needs a name of its own")
        if method not in ENGINES:
            raise InvalidRequest(f"unknown method '{method}'; choose one of cow, log, mirror")
        check_chunk_size(chunk_size)
        if size <= 0:
            raise InvalidRequest("a volume's size must be more than zero bytes")
        check_volume_size(size, chunk_size)
        if method == "mirror" and not 2 <= legs <= 16:
            raise InvalidRequest("a mirror has between 2 and 16 legs")
        if method != "mirror":
            legs = 1
        if enospc_policy not in ENOSPC_POLICIES:
            raise InvalidRequest(
                f"unknown full-disk policy '{enospc_policy}'; choose fail-write or break-image"
            )
        mark: dict[str, Any] | None = None if restore_from is None else {
            "state": "incomplete", "from": restore_from, "since": now()}
        if mark is not None and live:
            mark["live"] = True
        row = VolumeRow(name, size, chunk_size, method, legs, enospc_policy, 0, {}, now(),
                        uuid.uuid4().hex, mark)
        await self.db(lambda c: c.add_volume(row))
        try:
            volume = await self._start_volume(row, clean=True)
        except OwmError:
            # E.g. a full disk: the volume must not appear at the next start half-made.
            await self.db(lambda c: c.delete_volume(name))
            shutil.rmtree(self.root / "volumes" / name, ignore_errors=True)
            shutil.rmtree(self.root / "volumes" / (name + RESTORE_SUFFIX), ignore_errors=True)
            raise
        log.info("created volume %s (%d bytes, %s)", name, size, method)
        return volume.status()

    async def delete_volume(self, name: str, force: bool = False) -> None:
        """Delete a volume; refused while it has preserved images (they would be lost, never
        backed up perhaps) unless ``force``."""
        volume = self.volume(name)
        group = self.groups.group_of(name)
        if group is not None:
            raise WrongState(f"volume '{name}' is a member of group '{group}'; delete the group "
                             "first")
        if volume.sessions or any(volume.readers.values()):
            raise WrongState(
                f"volume '{name}' still has {len(volume.sessions)} sessions and "
                f"{sum(volume.readers.values())} readers open"
            )
        if volume.images and not force:
            images = ", ".join(f"{name}@{g}" for g in sorted(volume.images))
            n = len(volume.images)
            raise WrongState(
                f"volume '{name}' still has {n} preserved image{'s' if n != 1 else ''} "
                f"({images}) that would be lost; back them up and release them, or delete "
                "with --force"
            )
        # Out of the pool first, so that nothing opens it meanwhile; the catalog next, so that a
        # failure there (a full disk) leaves the volume as it was.
        del self.volumes[name]
        try:
            await self.db(lambda c: c.delete_volume(name))
        except BaseException:
            self.volumes[name] = volume
            raise
        try:
            await volume.close()
            await volume.engine.destroy()
        except OwmError as exc:
            log.warning("volume %s: its storage was not closed cleanly (%s); removing it", name,
                        exc)
            await volume.engine.storage.close()
        if volume.live_restore is not None:
            await volume.live_restore.destroy()
        shutil.rmtree(self.root / "volumes" / name, ignore_errors=True)
        shutil.rmtree(self.root / "volumes" / (name + RESTORE_SUFFIX), ignore_errors=True)
        log.info("deleted volume %s%s", name, " and its preserved images" if force else "")

    async def finish_restore(self, name: str, restore_from: str) -> dict[str, Any]:
        """Clear the restore mark of ``name`` once that restore has written and flushed it all."""
        volume = self.volume(name)
        mark = volume.row.restore
        if mark is None:
            return volume.status()
        if mark.get("from") != restore_from:
            raise WrongState(f"volume '{name}' is being restored from {mark.get('from')}, "
                             f"not from {restore_from}")
        live = volume.live_restore
        if live is not None and not live.complete:
            raise WrongState(f"volume '{name}' is still being filled ({live.filled_count} of "
                             f"{live.chunks} chunks)")
        await self.db(lambda c: c.set_restore(name, None))
        volume.row.restore = None
        if live is not None:
            volume.live_restore = None
            await live.destroy()
        log.info("restore into volume %s is complete", name)
        return volume.status()

    def attach_restore_source(self, name: str, restore_from: str, fetch: Fetch,
                              pace: float = 0.0) -> dict[str, Any]:
        """Fill live-restore volume ``name`` from ``fetch`` (what ``restore_from`` serves)."""
        volume = self.volume(name)
        mark = volume.row.restore
        if not mark or not mark.get("live") or volume.live_restore is None:
            raise WrongState(f"volume '{name}' is not being restored live")
        if mark.get("from") != restore_from:
            raise WrongState(f"volume '{name}' is being restored from {mark.get('from')}, "
                             f"not from {restore_from}")
        volume.live_restore.attach(fetch, pace)
        log.info("volume %s: live restore source attached", name)
        return volume.status()

    def detach_restore_source(self, name: str, fetch: Fetch) -> None:
        volume = self.volumes.get(name)
        if volume is not None and volume.live_restore is not None:
            volume.live_restore.detach(fetch)

    # -- images -----------------------------------------------------------------------------
    def _image(self, image: str) -> tuple[Volume, int]:
        name, gen = parse_image_name(image)
        volume = self.volume(name)
        volume.image(gen)
        return volume, gen

    async def preserve(self, name: str, instant: bool = False) -> str:
        volume = self.volume(name)
        return f"{name}@{await volume.preserve(instant)}"

    async def cutover(self, image: str) -> None:
        volume, gen = self._image(image)
        await volume.cutover(gen)

    async def wait_drained(self, image: str, timeout: float | None) -> bool:
        volume, gen = self._image(image)
        return await volume.wait_drained(gen, timeout)

    async def release(self, image: str, progress: Progress | None = None) -> None:
        volume, gen = self._image(image)
        gset = self.groups.set_of(volume.name, gen)
        if gset is not None:
            raise WrongState(f"image {image} belongs to set {gset}; release the set with "
                             f"'owm release {gset}'")
        await volume.release(gen, progress)

    def changed_chunks(self, image: str, since: int) -> list[int] | None:
        """Chunks of ``image`` (NAME@N) that may differ from image NAME@since (None: unknown)."""
        name, gen = parse_image_name(image)
        return self.volume(name).changed_chunks(since, gen)

    # -- exports (what the NBD server serves) -----------------------------------------------
    def _export(self, volume: Volume, gen: int | None) -> ExportInfo:
        chunk = volume.row.chunk_size
        if gen is None:
            n = len(volume.sessions)
            flag = ", RESTORE INCOMPLETE" if volume.row.restore else ""
            return ExportInfo(volume.name,
                              f"live volume, {volume.row.method}, {n} sessions{flag}",
                              volume.size, False, preferred_block=min(chunk, 65536),
                              max_block=MAX_PAYLOAD)
        image = volume.image(gen)
        state = image.state
        if state == "draining":
            state = f"draining, {len(volume.holders(gen))} sessions left"
        return ExportInfo(f"{volume.name}@{gen}", f"preserved image {gen}, {state}",
                          volume.size, True, preferred_block=min(chunk, 65536),
                          max_block=MAX_PAYLOAD)

    def list_exports(self) -> list[ExportInfo]:
        out = []
        for _, volume in sorted(self.volumes.items()):
            out.append(self._export(volume, None))
            out.extend(self._export(volume, g) for g, i in sorted(volume.images.items())
                       if i.state != "releasing")
        return out

    def export_info(self, name: str) -> ExportInfo:
        if "@" in name:
            volume, gen = self._image(name)
            return self._export(volume, gen)
        return self._export(self.volume(name), None)

    async def open_export(self, name: str, peer: str) -> View:
        if "@" in name:
            volume, gen = self._image(name)
            return await volume.open_reader(gen)
        return await self.volume(name).open_session(peer)
