"""The shared catalog: volumes, generations, preserved images and sessions in etcd (v3 API).

Same semantics as ``SqliteCatalog``: every call is one atomic change, durable when it returns
(etcd acknowledges a transaction once its Raft log entry is committed and fsynced), or a read.

The client.  ``aetcd`` (PyPI, asyncio, gRPC on the v3 API) works against Debian 12's etcd 3.4:
the KV, lease and maintenance services it wraps have not changed since 3.3.  Its generated gRPC
stubs are used directly for transactions, since the wrapper does not return the revision a read
happened at nor accept range compares, and both are needed for the guard below.

Threads.  The ``Catalog`` protocol is synchronous and the pool calls it from one executor
thread.  This catalog owns a private asyncio loop on a background thread running the gRPC
client; each call submits a coroutine there and waits for it with a timeout.  A call that does
not finish in time, or finds etcd unreachable, raises ``CatalogUnavailable`` (EIO for NBD, 503
for the API, one sentence naming the endpoint); the gRPC channel reconnects by itself (with a
short backoff) once etcd is back, so no restart is needed.  A timeout is ambiguous (the change
may or may not have been applied), exactly as for a crash: it is one of the two states.

Keys (all under the pool's prefix ``P``, ``/owm/<pool-id>/`` by default)::

    P meta/<key>                  pool state (clean flag, rows digest)
    P volumes/<name>              a VolumeRow as JSON
    P images/<name>/<gen>         an ImageRow as JSON (gen zero-padded)
    P sessions/<name>/<id>        an open session
    P closed/<name>/<id>          a closed one (history, pruned like SQLite's)
    P counters/session            the last session id given out (ids never repeat)
    P stamp/<name>, stamp/-pool   bumped by every change of that scope (see below)
    P owner                       the daemon serving the pool, on its lease
    P daemons/<id>                cluster mode: a member daemon, on its lease
    P owners/<name>               cluster mode: the volume's owner, on the owner's lease
    P holder/<name>               cluster mode: who last owned it, epoch, closed cleanly or not
    P moves/<name>                cluster mode: a planned move to one named daemon

The guard.  Every change reads what it depends on at one revision R (one read transaction),
then commits one transaction whose compares say that nothing it read has changed: each key
read has ``mod_revision == seen`` (0 for a key that was absent), each prefix read has every
key's ``mod_revision < R + 1``, and the scope's stamp key (which every change of the volume,
or of the pool's meta, rewrites) is unchanged, which catches a key deleted from a prefix.
When the pool is claimed, the owner key must still hold this daemon's value.  So two writers
can never both win, and an interrupted change leaves the old state or the new one.  A lost
compare raises ``CatalogConflict`` naming the change; nothing was changed.

Ownership.  Alone, ``claim`` puts ``P owner`` on a lease kept alive by the loop; a second
daemon is refused with a sentence naming the holder.  In cluster mode (``join``) there is no
pool owner: each daemon registers ``P daemons/<id>`` on a lease of its own and owns volumes one
by one, ``P owners/<name>`` on that same lease, claimed by a transaction that succeeds only if
the key is absent.  Every change of a volume's scope then also compares that the owner key
still holds this daemon's value, and every change at all that the daemon's own key does, so a
daemon whose lease ended (or whose volume was taken over) cannot change anything; it is told
through ``on_lost`` and must stop serving.  ``P holder/<name>`` (no lease) keeps the last
owner, its RADOS client address, an epoch raised at every change of owner and whether that
owner closed the volume cleanly: what a taker needs to know whom to fence.

Space.  etcd has its own quota: once its backend is full it raises the NOSPACE alarm and
refuses writes with "mvcc: database space exceeded".  That is reported as ``NoSpace`` (the same
error and the same handling as a full disk under SQLite), and ``headroom()`` is False while
the alarm is raised, so a preserve is refused up front instead of failing half-way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from owm.catalog.base import ImageRow, VolumeRow, now
from owm.common.errors import (
    AlreadyExists,
    InvalidRequest,
    NoSpace,
    NotFound,
    OwmError,
    Unavailable,
    WrongState,
)

T = TypeVar("T")
log = logging.getLogger("owm.catalog.etcd")

CALL_TIMEOUT = 5.0  # seconds a catalog call may take before it is reported unavailable
CONNECT_TIMEOUT = 5.0  # seconds the first contact may take, over every endpoint
OWNER_TTL = 10  # seconds of the pool-owner lease
MAX_TXN_OPS = 100  # etcd refuses more than 128 operations in one transaction by default
GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.enable_retries": 0,
}


class CatalogUnavailable(Unavailable):
    """etcd cannot be reached, or did not answer in time."""


class CatalogConflict(WrongState):
    """Another writer changed what a change depended on; nothing was changed."""


class CatalogValueDamaged(ValueError):
    """A value in etcd that does not decode to a row (the pool reports it as CatalogDamaged)."""


def parse_endpoints(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``http://127.0.0.1:2379,127.0.0.1:22379`` -> [(host, port), ...]; InvalidRequest if bad."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else "http://" + item)
        if parts.scheme != "http":
            raise InvalidRequest(f"etcd endpoint {item!r}: only http:// is supported")
        try:
            port = parts.port or 2379
        except ValueError:
            raise InvalidRequest(f"etcd endpoint {item!r} has a bad port") from None
        if not parts.hostname:
            raise InvalidRequest(f"etcd endpoint {item!r} names no host")
        out.append((parts.hostname, port))
    if not out:
        raise InvalidRequest("no etcd endpoint was given")
    return out


def normalise_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or "//" in prefix or any(c.isspace() for c in prefix):
        raise InvalidRequest(f"etcd prefix {prefix!r} must start with '/' and hold no blanks")
    return prefix if prefix.endswith("/") else prefix + "/"


def _reason(detail: str) -> str:
    """The last, most specific part of a gRPC error text: 'Connection refused'."""
    return detail.splitlines()[0].rsplit(": ", 1)[-1].strip() or detail


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass
class _Read:
    """What one read transaction saw."""

    revision: int = 0
    keys: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)  # key -> (value, mod)
    singles: list[bytes] = field(default_factory=list)
    prefixes: list[bytes] = field(default_factory=list)

    def value(self, key: bytes) -> bytes | None:
        hit = self.keys.get(key)
        return None if hit is None else hit[0]

    def under(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        return sorted((k, v) for k, (v, _) in self.keys.items() if k.startswith(prefix))


@dataclass
class _Change:
    """The operations of one change, committed together with its guard."""

    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    delete_prefixes: list[bytes] = field(default_factory=list)
    result: Any = None
    # cluster mode: volumes this change makes this daemon the owner of (name -> owner value):
    # each owner key must be absent and is put on the daemon's lease
    claims: dict[str, bytes] = field(default_factory=dict)


def _decode(key: bytes, raw: bytes, kind: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CatalogValueDamaged(f"the value of {key.decode(errors='replace')} is not JSON") \
            from None
    if not isinstance(value, dict):
        raise CatalogValueDamaged(f"the value of {key.decode(errors='replace')} is not "
                                  f"a {kind} record")
    return value


def _volume_row(key: bytes, raw: bytes) -> VolumeRow:
    data = _decode(key, raw, "volume")
    try:
        row = VolumeRow(**data)
    except TypeError:
        raise CatalogValueDamaged(f"the value of {key.decode(errors='replace')} is not a "
                                  "volume record") from None
    return row


def _image_row(key: bytes, raw: bytes) -> ImageRow:
    data = _decode(key, raw, "image")
    try:
        return ImageRow(**data)
    except TypeError:
        raise CatalogValueDamaged(f"the value of {key.decode(errors='replace')} is not an "
                                  "image record") from None


async def _stopped(task: asyncio.Task[Any] | None) -> None:
    """Cancel a keep-alive task and wait for it to end, whatever it ends with."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


class EtcdCatalog:
    """A pool's catalog in etcd; blocking calls, made from one thread (see the docstring)."""

    def __init__(self, endpoints: str | Sequence[str], prefix: str, *,
                 call_timeout: float = CALL_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = normalise_prefix(prefix)
        self.call_timeout = call_timeout
        self._down = False  # etcd unreachable since the last call (logged once per outage)
        self._p = self.prefix.encode()
        self._index = 0
        self._client: Any = None
        self._owner_value: bytes | None = None
        self._owner_lease = 0
        self._owner_lost = False
        self._keepalive: asyncio.Task[None] | None = None
        self._sessions: dict[int, str] = {}  # open session id -> volume, for close_session
        # Cluster mode (``join``): this daemon's id, its member key's value and lease, the
        # owner-key values of the volumes it owns, and whom to tell once it lost them.
        self.daemon_id: str | None = None
        self._member_value: bytes | None = None
        self._member_lease = 0
        self._member_keepalive: asyncio.Task[None] | None = None
        self._owned: dict[str, bytes] = {}
        self.lost: str | None = None
        self.rados_address: str | None = None  # this daemon's RADOS client (for fencing)
        self.on_lost: Callable[[str], None] | None = None  # called on the catalog's own thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="owm-etcd")
        self._thread.start()
        try:
            self._run(self._first_contact(connect_timeout), connect_timeout + 2.0,
                      "reach etcd")
        except BaseException:
            self._shutdown()
            raise

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def urls(self) -> str:
        return ",".join(f"http://{h}:{p}" for h, p in self.endpoints)

    @property
    def location(self) -> str:
        """Where the catalog lives, for messages: ``etcd http://H:P/owm/pool/``."""
        return f"etcd {self.urls} (prefix {self.prefix})"

    def describe(self) -> dict[str, Any]:
        return {"kind": "etcd", "endpoints": [f"http://{h}:{p}" for h, p in self.endpoints],
                "prefix": self.prefix, "owner_lease": self._owner_lease or None}

    def _url(self) -> str:
        host, port = self.endpoints[self._index]
        return f"http://{host}:{port}"

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            error = CatalogUnavailable(
                f"the pool's catalog in etcd ({self._url()}) did not answer within "
                f"{timeout:.0f} s, so this daemon could not {what}")
            if not self._down:
                self._down = True
                log.error("lost contact with the pool's catalog in etcd: %s", error)
            raise error from None

    async def _stub(self) -> Any:
        import aetcd

        if self._client is None:
            host, port = self.endpoints[self._index]
            self._client = aetcd.Client(host=host, port=port, timeout=self.call_timeout,
                                        options=dict(GRPC_OPTIONS))
        await self._client.connect()
        return self._client

    async def _revoke(self, client: Any, lease: int,
                      errors: type[BaseException] = Exception) -> None:
        """Revoke ``lease`` if etcd lets us; a lease left behind simply runs out."""
        from aetcd import rpc

        with contextlib.suppress(errors):
            await client.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease),
                                               timeout=self.call_timeout)

    async def _rotate(self) -> None:
        """After a connection failure, use the next endpoint for the next call."""
        if len(self.endpoints) < 2:
            return
        client, self._client = self._client, None
        self._index = (self._index + 1) % len(self.endpoints)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _translate(self, exc: BaseException, what: str) -> OwmError:
        from aetcd import rpc

        if isinstance(exc, rpc.AioRpcError):
            code, detail = exc.code(), exc.details() or ""
            if "database space exceeded" in detail or code == rpc.StatusCode.RESOURCE_EXHAUSTED:
                return NoSpace(f"the pool's catalog in etcd is full ({detail}), so this "
                               f"daemon could not {what}")
            if code in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED,
                        rpc.StatusCode.CANCELLED):
                url = self._url()
                await self._rotate()
                reason = _reason(detail) if detail else code.name.lower()
                return CatalogUnavailable(f"the pool's catalog in etcd ({url}) cannot be "
                                          f"reached ({reason}), so this daemon could not "
                                          f"{what}")
            return OwmError(f"etcd refused to {what}: {detail or code.name}")
        return OwmError(f"the pool's catalog in etcd could not {what}: {exc}")

    async def _guarded(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        from aetcd import rpc

        try:
            result = await coro
        except OwmError:
            raise
        except (rpc.AioRpcError, OSError) as exc:
            error = await self._translate(exc, what)
            if isinstance(error, CatalogUnavailable) and not self._down:
                self._down = True
                log.error("lost contact with the pool's catalog in etcd: %s", error)
            raise error from None
        if self._down:
            self._down = False
            log.info("the pool's catalog in etcd (%s) answers again", self._url())
        return result

    def _call(self, what: str, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self._run(self._guarded(what, fn()), self.call_timeout + 1.0, what)

    async def _first_contact(self, timeout: float) -> None:
        """Reach one endpoint within ``timeout`` (each tried in turn), else one sentence."""
        from aetcd import rpc

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            for _ in self.endpoints:
                try:
                    client = await self._stub()
                    await client.maintenancestub.Status(
                        rpc.StatusRequest(), timeout=max(0.5, min(2.0, deadline - loop.time())))
                    return
                except rpc.AioRpcError as exc:
                    last = _reason(exc.details() or exc.code().name)
                    client, self._client = self._client, None
                    if client is not None:
                        with contextlib.suppress(Exception):
                            await client.close()
                    self._index = (self._index + 1) % len(self.endpoints)
            if loop.time() >= deadline:
                raise CatalogUnavailable(
                    f"cannot reach etcd at {self.urls} ({last}); the daemon did not start "
                    "and changed nothing")
            await asyncio.sleep(0.2)

    # -- reads and guarded changes ------------------------------------------------------------
    def _key(self, *parts: str) -> bytes:
        return self._p + "/".join(parts).encode()

    async def _read(self, singles: Sequence[bytes] = (), prefixes: Sequence[bytes] = ()) -> _Read:
        from aetcd import rpc

        client = await self._stub()
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in singles]
        ops += [rpc.RequestOp(request_range=rpc.RangeRequest(key=p, range_end=_range_end(p)))
                for p in prefixes]
        answer = await client.kvstub.Txn(rpc.TxnRequest(compare=[], success=ops),
                                         timeout=self.call_timeout)
        seen = _Read(answer.header.revision, {}, list(singles), list(prefixes))
        for response in answer.responses:
            for kv in response.response_range.kvs:
                seen.keys[bytes(kv.key)] = (bytes(kv.value), int(kv.mod_revision))
        return seen

    def _fence(self, scopes: Sequence[str] = (), claims: Sequence[str] = ()) -> list[Any]:
        """The compares that say this daemon may still change ``scopes``: alone, that it still
        owns the pool; in cluster mode, that its member key and the owner key of every volume
        in ``scopes`` (but those it is claiming now) still hold its values."""
        from aetcd import rpc

        if self.daemon_id is None:
            if self._owner_value is None:
                return []
            return [rpc.Compare(key=self._key("owner"), target=rpc.Compare.VALUE,
                                result=rpc.Compare.EQUAL, value=self._owner_value)]
        if self.lost is not None:
            raise CatalogConflict(self.lost)
        compares = []
        if self._member_value is not None:
            compares.append(rpc.Compare(key=self._key("daemons", self.daemon_id),
                                        target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL,
                                        value=self._member_value))
        for scope in scopes:
            if scope == "-pool" or scope in claims:
                continue
            value = self._owned.get(scope)
            if value is None:
                raise CatalogConflict(f"volume {scope} is not served by this daemon "
                                      f"({self.daemon_id}); nothing was changed")
            compares.append(rpc.Compare(key=self._key("owners", scope),
                                        target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL,
                                        value=value))
        return compares

    def _lose(self, sentence: str) -> None:
        """Cluster mode: this daemon lost its lease or a volume; say so once, refuse all else."""
        if self.lost is not None:
            return
        self.lost = sentence
        log.error("%s", sentence)
        if self.on_lost is not None:
            try:
                self.on_lost(sentence)
            except Exception:  # the catalog's loop must survive a bad callback
                log.exception("on_lost failed")

    async def _commit(self, what: str, seen: _Read, scopes: Sequence[str],
                      change: _Change) -> None:
        """Apply ``change`` if nothing ``seen`` (and no change of ``scopes``) moved since."""
        from aetcd import rpc

        compares = list(self._fence(scopes, list(change.claims)))
        for name in change.claims:
            compares.append(rpc.Compare(key=self._key("owners", name), target=rpc.Compare.CREATE,
                                        result=rpc.Compare.EQUAL, create_revision=0))
        for key in seen.singles:
            hit = seen.keys.get(key)
            compares.append(rpc.Compare(key=key, target=rpc.Compare.MOD,
                                        result=rpc.Compare.EQUAL,
                                        mod_revision=0 if hit is None else hit[1]))
        for prefix in seen.prefixes:
            compares.append(rpc.Compare(key=prefix, range_end=_range_end(prefix),
                                        target=rpc.Compare.MOD, result=rpc.Compare.LESS,
                                        mod_revision=seen.revision + 1))
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v))
               for k, v in change.puts.items()]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))
                for k in change.deletes]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=p, range_end=_range_end(p))) for p in change.delete_prefixes]
        ops += [rpc.RequestOp(request_put=rpc.PutRequest(
            key=self._key("owners", name), value=value, lease=self._member_lease))
            for name, value in change.claims.items()]
        stamp = _json({"change": what, "at": now()})
        ops += [rpc.RequestOp(request_put=rpc.PutRequest(key=self._key("stamp", s), value=stamp))
                for s in scopes]
        if len(ops) > MAX_TXN_OPS:
            raise OwmError(f"the pool's catalog in etcd could not {what}: it needs {len(ops)} "
                           f"operations in one transaction, more than etcd allows")
        client = await self._stub()
        answer = await client.kvstub.Txn(rpc.TxnRequest(compare=compares, success=ops),
                                         timeout=self.call_timeout)
        if answer.succeeded:
            self._owned.update(change.claims)
            return
        if self.daemon_id is not None:
            await self._check_membership(what, scopes, change)
        if self._owner_value is not None:
            owner = await self._read([self._key("owner")])
            if owner.value(self._key("owner")) != self._owner_value:
                self._owner_lost = True
                raise CatalogConflict(
                    f"this daemon no longer owns the pool {self.prefix} in etcd (its lease "
                    f"ended or another daemon took it over), so it could not {what}; nothing "
                    "was changed")
        raise CatalogConflict(
            f"the pool's catalog in etcd was changed by another writer while this daemon was "
            f"about to {what}; nothing was changed")

    async def _check_membership(self, what: str, scopes: Sequence[str],
                                change: _Change) -> None:
        """After a lost compare in cluster mode: if this daemon's member key or the owner key
        of a volume it changes no longer holds its value, it has lost them (fatal)."""
        keys = [self._key("daemons", str(self.daemon_id))]
        keys += [self._key("owners", s) for s in scopes if s in self._owned]
        seen = await self._read(keys)
        if self._member_value is not None and seen.value(keys[0]) != self._member_value:
            self._lose(f"daemon {self.daemon_id} lost its lease in etcd (it ended, or etcd "
                       "was out of reach too long): it stops serving, since another daemon "
                       "may take its volumes over")
        else:
            for key, scope in zip(keys[1:], [s for s in scopes if s in self._owned],
                                  strict=True):
                if seen.value(key) != self._owned[scope]:
                    self._lose(f"daemon {self.daemon_id} no longer owns volume {scope} in "
                               "etcd (another daemon took it over): it stops serving")
                    break
        if self.lost is not None:
            raise CatalogConflict(f"{self.lost}; so it could not {what}, and nothing was "
                                  "changed")

    def _change(self, what: str, scopes: Sequence[str], singles: Sequence[bytes],
                prefixes: Sequence[bytes], build: Callable[[_Read], _Change | None]) -> Any:
        """Read, build the change from what was read (None: nothing to do), commit guarded."""
        stamps = [self._key("stamp", s) for s in scopes]

        async def run() -> Any:
            # In cluster mode a change of volumes this daemon owns can lose a compare only to
            # another daemon's change of what they share (the session counter): it is read and
            # built again, a bounded number of times.  Pool-wide changes are not retried (a
            # blind retry of set_meta would overwrite what the other daemon recorded).
            tries = 5 if self.daemon_id is not None and "-pool" not in scopes else 1
            for attempt in range(tries):
                seen = await self._read([*singles, *stamps], prefixes)
                change = build(seen)
                if change is None:
                    return None
                try:
                    await self._commit(what, seen, scopes, change)
                except CatalogConflict:
                    if attempt + 1 >= tries or change.claims or self.lost is not None:
                        raise
                    continue
                return change.result
            return None

        return self._call(what, run)

    # -- the protocol: pool state ------------------------------------------------------------
    def close(self) -> None:
        if self._owner_lease:
            with contextlib.suppress(OwmError):
                self._run(self._release_owner(), 3.0, "release the pool")
        if self._member_lease:
            with contextlib.suppress(OwmError):
                self._run(self._leave(), 3.0, "leave the cluster")
        self._shutdown()

    async def _leave(self) -> None:
        """Cluster mode: drop the member lease (and with it any owner key still on it)."""
        from aetcd import rpc

        await _stopped(self._member_keepalive)
        self._member_keepalive = None
        lease, self._member_lease = self._member_lease, 0
        self._member_value = None
        await self._revoke(await self._stub(), lease, rpc.AioRpcError)

    def abandon(self) -> None:
        """Stop the way a crashed daemon stops: the owner lease is left to expire."""
        self._shutdown()

    def _shutdown(self) -> None:
        async def stop() -> None:
            for task in (self._keepalive, self._member_keepalive):
                await _stopped(task)
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.close()
                self._client = None

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(3.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        k = self._key("meta", key)

        async def run() -> str | None:
            raw = (await self._read([k])).value(k)
            return default if raw is None else raw.decode(errors="replace")

        return self._call("read the pool's state", run)

    def set_meta(self, key: str, value: str) -> None:
        k = self._key("meta", key)
        self._change("record the pool's state", ["-pool"], [k], [],
                     lambda seen: _Change(puts={k: value.encode()}))

    # -- volumes ------------------------------------------------------------------------------
    def volumes(self) -> list[VolumeRow]:
        prefix = self._key("volumes", "")

        async def run() -> list[VolumeRow]:
            seen = await self._read([], [prefix])
            return [_volume_row(k, v) for k, v in seen.under(prefix)]

        return self._call("read the volumes", run)

    def add_volume(self, v: VolumeRow) -> None:
        k = self._key("volumes", v.name)
        row = dataclasses.replace(v, uid=v.uid or uuid.uuid4().hex)

        def build(seen: _Read) -> _Change:
            if seen.value(k) is not None:
                raise AlreadyExists(f"a volume named '{v.name}' already exists")
            # Leftovers of an earlier volume of that name cannot be there (delete removes
            # them), but a new volume must never inherit any: clear them in the same change.
            change = _Change(puts={k: _json(dataclasses.asdict(row))},
                             delete_prefixes=[self._key("images", v.name, ""),
                                              self._key("sessions", v.name, "")])
            if self.daemon_id is not None:
                # In a cluster the daemon that creates a volume owns it from the start.
                holder = {"daemon": self.daemon_id, "rados": self.rados_address, "epoch": 1,
                          "clean": False, "since": now()}
                change.puts[self._key("holder", v.name)] = _json(holder)
                change.deletes.append(self._key("moves", v.name))
                change.claims[v.name] = self._owner_value_for(1)
            return change

        if self.daemon_id is not None and self._member_value is None:
            raise WrongState("this daemon has not joined its cluster yet; try again")
        self._change(f"record the new volume {v.name}", [v.name], [k], [], build)

    def _update_volume(self, name: str, what: str, edit: Callable[[VolumeRow], None]) -> None:
        k = self._key("volumes", name)

        def build(seen: _Read) -> _Change | None:
            raw = seen.value(k)
            if raw is None:
                return None  # like an UPDATE matching no row
            row = _volume_row(k, raw)
            edit(row)
            return _Change(puts={k: _json(dataclasses.asdict(row))})

        self._change(what, [name], [k], [], build)

    def set_restore(self, name: str, mark: dict[str, Any] | None) -> None:
        def edit(row: VolumeRow) -> None:
            row.restore = mark or None

        self._update_volume(name, f"record the restore mark of volume {name}", edit)

    def save_engine_state(self, name: str, state: dict[str, Any]) -> None:
        def edit(row: VolumeRow) -> None:
            row.engine_state = state

        self._update_volume(name, f"record the state of volume {name}", edit)

    def delete_volume(self, name: str) -> None:
        k = self._key("volumes", name)
        extra = [self._key(kind, name) for kind in ("owners", "holder", "moves")] \
            if self.daemon_id is not None else []
        self._change(f"record the deletion of volume {name}", [name], [k], [],
                     lambda seen: _Change(deletes=[k, *extra], delete_prefixes=[
                         self._key("images", name, ""), self._key("sessions", name, ""),
                         self._key("closed", name, "")]))
        self._sessions = {s: v for s, v in self._sessions.items() if v != name}
        self._owned.pop(name, None)

    # -- images -------------------------------------------------------------------------------
    def _image_key(self, volume: str, generation: int) -> bytes:
        return self._key("images", volume, f"{generation:012d}")

    def images(self, volume: str) -> list[ImageRow]:
        prefix = self._key("images", volume, "")

        async def run() -> list[ImageRow]:
            seen = await self._read([], [prefix])
            rows = [_image_row(k, v) for k, v in seen.under(prefix)]
            return sorted(rows, key=lambda r: r.generation)

        return self._call(f"read the images of volume {volume}", run)

    def record_preserve(self, image: ImageRow, live: int, state: dict[str, Any]) -> None:
        vk = self._key("volumes", image.volume)
        ik = self._image_key(image.volume, image.generation)
        what = f"record the preserve of {image.volume}@{image.generation}"

        def build(seen: _Read) -> _Change:
            raw = seen.value(vk)
            if raw is None:
                raise OwmError(f"the pool's catalog could not {what}: the volume is not in it")
            if seen.value(ik) is not None:
                raise OwmError(f"the pool's catalog could not {what}: that image exists")
            row = _volume_row(vk, raw)
            row.live_generation, row.engine_state = live, state
            return _Change(puts={ik: _json(dataclasses.asdict(image)),
                                 vk: _json(dataclasses.asdict(row))})

        self._change(what, [image.volume], [vk, ik], [], build)

    def record_group_preserve(
        self, cuts: Sequence[tuple[ImageRow, int, dict[str, Any]]], groups: str
    ) -> None:
        """Every member's new image and live generation, and the group record, in one guarded
        transaction: after a crash either every member is cut or none is."""
        names = ", ".join(f"{i.volume}@{i.generation}" for i, _, _ in cuts)
        what = f"record the group preserve of {names}"
        gk = self._key("meta", "groups")
        keys = [(self._key("volumes", i.volume), self._image_key(i.volume, i.generation))
                for i, _, _ in cuts]

        def build(seen: _Read) -> _Change:
            puts: dict[bytes, bytes] = {gk: groups.encode()}
            for (image, live, state), (vk, ik) in zip(cuts, keys, strict=True):
                raw = seen.value(vk)
                if raw is None:
                    raise OwmError(f"the pool's catalog could not {what}: volume "
                                   f"{image.volume} is not in it")
                if seen.value(ik) is not None:
                    raise OwmError(f"the pool's catalog could not {what}: image "
                                   f"{image.volume}@{image.generation} exists")
                row = _volume_row(vk, raw)
                row.live_generation, row.engine_state = live, state
                puts[ik] = _json(dataclasses.asdict(image))
                puts[vk] = _json(dataclasses.asdict(row))
            return _Change(puts=puts)

        self._change(what, ["-pool", *(i.volume for i, _, _ in cuts)],
                     [gk, *(k for pair in keys for k in pair)], [], build)

    def _image_puts(self, seen: _Read, images: Sequence[ImageRow]) -> dict[bytes, bytes]:
        """New values of ``images`` (the fields an update changes), those that exist only."""
        puts: dict[bytes, bytes] = {}
        for image in images:
            k = self._image_key(image.volume, image.generation)
            raw = seen.value(k)
            if raw is None:
                continue
            row = _image_row(k, raw)
            row.state, row.consistency = image.state, image.consistency
            row.drained_at, row.unclean_sessions = image.drained_at, image.unclean_sessions
            row.broken_reason = image.broken_reason
            puts[k] = _json(dataclasses.asdict(row))
        return puts

    def update_image(self, image: ImageRow) -> None:
        k = self._image_key(image.volume, image.generation)

        def build(seen: _Read) -> _Change | None:
            puts = self._image_puts(seen, [image])
            return _Change(puts=puts) if puts else None

        self._change(f"record the state of image {image.volume}@{image.generation}",
                     [image.volume], [k], [], build)

    def finish_release(self, volume: str, generation: int, state: dict[str, Any]) -> None:
        vk = self._key("volumes", volume)
        ik = self._image_key(volume, generation)

        def build(seen: _Read) -> _Change:
            change = _Change(deletes=[ik])
            raw = seen.value(vk)
            if raw is not None:
                row = _volume_row(vk, raw)
                row.engine_state = state
                change.puts[vk] = _json(dataclasses.asdict(row))
            return change

        self._change(f"record the release of {volume}@{generation}", [volume], [vk, ik], [],
                     build)

    # -- sessions -----------------------------------------------------------------------------
    def _session_key(self, kind: str, volume: str, session: int) -> bytes:
        return self._key(kind, volume, f"{session:016d}")

    def open_session(self, volume: str, generation: int, peer: str) -> int:
        counter = self._key("counters", "session")

        def build(seen: _Read) -> _Change:
            raw = seen.value(counter)
            try:
                last = int(raw) if raw is not None else 0
            except ValueError:
                raise CatalogValueDamaged(f"the value of {counter.decode()} is not a number") \
                    from None
            sid = last + 1
            record = {"volume": volume, "generation": generation, "peer": peer,
                      "opened_at": now()}
            change = _Change(puts={counter: str(sid).encode(),
                                   self._session_key("sessions", volume, sid): _json(record)})
            change.result = sid
            return change

        sid = int(self._change(f"record a new session of volume {volume}", [volume], [counter],
                               [], build))
        self._sessions[sid] = volume
        return sid

    def _find_session(self, session: int) -> str | None:
        volume = self._sessions.get(session)
        if volume is not None:
            return volume
        prefix = self._key("sessions", "")
        suffix = f"/{session:016d}".encode()

        async def run() -> str | None:
            client = await self._stub()
            from aetcd import rpc

            answer = await client.kvstub.Range(
                rpc.RangeRequest(key=prefix, range_end=_range_end(prefix), keys_only=True),
                timeout=self.call_timeout)
            for kv in answer.kvs:
                key = bytes(kv.key)
                if key.endswith(suffix):
                    return key[len(prefix):-len(suffix)].decode()
            return None

        return self._call(f"find session {session}", run)

    def close_session(
        self, session: int, clean: bool, bytes_read: int, bytes_written: int, generation: int,
        images: Sequence[ImageRow] = (),
    ) -> None:
        """The end of a session and, in the same transaction, the images it leaves changed."""
        volume = self._find_session(session)
        if volume is None:
            return  # like an UPDATE matching no row
        open_key = self._session_key("sessions", volume, session)
        image_keys = [self._image_key(i.volume, i.generation) for i in images]
        scopes = sorted({volume, *(i.volume for i in images)})

        def build(seen: _Read) -> _Change | None:
            raw = seen.value(open_key)
            if raw is None:
                return None
            record = _decode(open_key, raw, "session")
            record.update(closed_at=now(), clean=int(clean), bytes_read=bytes_read,
                          bytes_written=bytes_written, generation=generation)
            puts = {self._session_key("closed", volume, session): _json(record)}
            puts.update(self._image_puts(seen, images))
            return _Change(puts=puts, deletes=[open_key])

        self._change(f"record the end of session {session}", scopes, [open_key, *image_keys],
                     [], build)
        self._sessions.pop(session, None)

    def open_sessions(self, volume: str) -> list[tuple[int, int]]:
        """(id, generation) of sessions with no recorded end."""
        prefix = self._key("sessions", volume, "")

        async def run() -> list[tuple[int, int]]:
            seen = await self._read([], [prefix])
            out = []
            for k, v in seen.under(prefix):
                record = _decode(k, v, "session")
                try:
                    out.append((int(k[len(prefix):]), int(record["generation"])))
                except (KeyError, ValueError, TypeError):
                    raise CatalogValueDamaged(f"the value of {k.decode(errors='replace')} is "
                                              "not a session record") from None
            return out

        return self._call(f"read the sessions of volume {volume}", run)

    def end_sessions_unclean(self, volume: str, images: Sequence[ImageRow] = ()) -> None:
        """End every open session of ``volume`` and record ``images``, atomically."""
        prefix = self._key("sessions", volume, "")
        image_keys = [self._image_key(i.volume, i.generation) for i in images]
        scopes = sorted({volume, *(i.volume for i in images)})

        def build(seen: _Read) -> _Change | None:
            ended = [int(k[len(prefix):]) for k, _ in seen.under(prefix)]
            puts = self._image_puts(seen, images)
            if not ended and not puts:
                return None
            if ended:
                # One history record for all of them: a crash may leave more open sessions
                # than etcd allows operations in one transaction.
                puts[self._session_key("closed", volume, max(ended))] = _json(
                    {"volume": volume, "ended_by_crash": sorted(ended), "closed_at": now(),
                     "clean": 0})
            return _Change(puts=puts, delete_prefixes=[prefix] if ended else [])

        self._change(f"record the sessions of volume {volume} a crash ended", scopes,
                     image_keys, [prefix], build)
        self._sessions = {s: v for s, v in self._sessions.items() if v != volume}

    def prune_sessions(self, keep: int = 10000) -> None:
        prefix = self._key("closed", "")
        counter = self._key("counters", "session")

        async def run() -> None:
            from aetcd import rpc

            client = await self._stub()
            answer = await client.kvstub.Range(
                rpc.RangeRequest(key=prefix, range_end=_range_end(prefix), keys_only=True),
                timeout=self.call_timeout)
            top = (await self._read([counter])).value(counter)
            last = int(top) if top is not None and top.isdigit() else 0
            old = [bytes(kv.key) for kv in answer.kvs
                   if bytes(kv.key).rsplit(b"/", 1)[-1].isdigit()
                   and int(bytes(kv.key).rsplit(b"/", 1)[-1]) <= last - keep]
            for i in range(0, len(old), MAX_TXN_OPS):
                ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))
                       for k in old[i:i + MAX_TXN_OPS]]
                answer2 = await client.kvstub.Txn(
                    rpc.TxnRequest(compare=self._fence(), success=ops),
                    timeout=self.call_timeout)
                if not answer2.succeeded:
                    raise CatalogConflict("this daemon no longer owns the pool "
                                          f"{self.prefix} in etcd, so it could not prune old "
                                          "sessions; nothing was changed")

        self._call("prune old sessions", run)

    def headroom(self) -> bool:
        """False while etcd's NOSPACE alarm is raised (its quota is used up)."""
        async def run() -> bool:
            from aetcd import rpc

            client = await self._stub()
            answer = await client.maintenancestub.Alarm(
                rpc.AlarmRequest(action=rpc.AlarmRequest.GET, memberID=0,
                                 alarm=rpc.AlarmType.Value("NONE")),
                timeout=self.call_timeout)
            return not any(a.alarm == rpc.AlarmType.Value("NOSPACE") for a in answer.alarms)

        return bool(self._call("check the catalog's space", run))

    # -- ownership ----------------------------------------------------------------------------
    def claim(self, holder: dict[str, Any], *, ttl: int = OWNER_TTL,
              may_take_over: Callable[[dict[str, Any]], bool] = lambda h: False) -> None:
        """Become the pool's owner: ``P owner`` on a lease kept alive until ``close``.

        Refused (WrongState, one sentence naming the holder) while another daemon holds it,
        unless ``may_take_over(holder)`` proves that holder dead.
        """
        self._run(self._guarded("claim the pool", self._claim(holder, ttl, may_take_over)),
                  self.call_timeout * 3, "claim the pool")

    async def _claim(self, holder: dict[str, Any], ttl: int,
                     may_take_over: Callable[[dict[str, Any]], bool]) -> None:
        from aetcd import rpc

        client = await self._stub()
        key = self._key("owner")
        grant = await client.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl),
                                                  timeout=self.call_timeout)
        lease = int(grant.ID)
        value = _json({**holder, "token": uuid.uuid4().hex, "lease": lease, "since": now()})
        try:
            answer = await client.kvstub.Txn(rpc.TxnRequest(
                compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE,
                                     result=rpc.Compare.EQUAL, create_revision=0)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                                  lease=lease))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]),
                timeout=self.call_timeout)
            if not answer.succeeded:
                kvs = answer.responses[0].response_range.kvs
                if not kvs:
                    raise CatalogConflict(f"the owner of pool {self.prefix} in etcd changed "
                                          "while this daemon was claiming it; try again")
                current = kvs[0]
                try:
                    other = json.loads(bytes(current.value))
                    other = other if isinstance(other, dict) else {}
                except ValueError:
                    other = {}
                if not may_take_over(other):
                    who = ", ".join(f"{k} {other[k]}" for k in ("host", "pid", "pool", "since")
                                    if k in other) or "unknown holder"
                    raise WrongState(
                        f"pool {self.prefix} in etcd is already served by another daemon "
                        f"({who}); this one did not start and changed nothing")
                taken = await client.kvstub.Txn(rpc.TxnRequest(
                    compare=[rpc.Compare(key=key, target=rpc.Compare.MOD,
                                         result=rpc.Compare.EQUAL,
                                         mod_revision=current.mod_revision)],
                    success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                                      lease=lease))]),
                    timeout=self.call_timeout)
                if not taken.succeeded:
                    raise CatalogConflict(f"the owner of pool {self.prefix} in etcd changed "
                                          "while this daemon was claiming it; try again")
                if current.lease:
                    await self._revoke(client, current.lease, rpc.AioRpcError)
                log.warning("took pool %s in etcd over from a daemon that is gone (%s)",
                            self.prefix, other.get("pid"))
        except BaseException:
            await self._revoke(client, lease)
            raise
        self._owner_value, self._owner_lease = value, lease
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive(ttl))

    async def _keep_alive(self, ttl: int) -> None:
        """Refresh the owner lease every third of its ttl; say so when it could not be."""
        from aetcd import rpc

        failing = False
        while True:
            await asyncio.sleep(max(0.5, ttl / 3))
            try:
                client = await self._stub()
                alive = 0
                async for reply in client.leasestub.LeaseKeepAlive(
                        [rpc.LeaseKeepAliveRequest(ID=self._owner_lease)],
                        timeout=self.call_timeout):
                    alive = int(reply.TTL)
                    break
                if alive <= 0:
                    if not self._owner_lost:
                        log.error("the lease on pool %s in etcd has ended: this daemon can no "
                                  "longer change the catalog", self.prefix)
                    self._owner_lost = True
                elif failing:
                    log.info("the lease on pool %s in etcd is kept alive again", self.prefix)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("could not keep the lease on pool %s in etcd alive (%s)",
                                self.prefix, type(exc).__name__)
                failing = True
                with contextlib.suppress(Exception):
                    await self._rotate()

    # -- cluster mode ---------------------------------------------------------------------------
    def join(self, daemon_id: str, record: dict[str, Any], *, ttl: int,
             wait: float | None = None) -> None:
        """Become member ``daemon_id`` of the cluster: ``P daemons/<id>`` on a lease of its own,
        kept alive by the loop.  A key left by a dead daemon of the same id is waited for (it
        ends with its lease, within ``wait``, default the ttl and 2 s); a live one refuses."""
        self._run(self._guarded("join the cluster", self._join(
            daemon_id, record, ttl, ttl + 2.0 if wait is None else wait)),
            self.call_timeout * 3 + ttl + 2.0 + (wait or 0), "join the cluster")

    async def _join(self, daemon_id: str, record: dict[str, Any], ttl: int,
                    wait: float) -> None:
        from aetcd import rpc

        client = await self._stub()
        key = self._key("daemons", daemon_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            # A fresh lease for each attempt, granted just before the put: a lease granted
            # before waiting out a dead daemon's key would run out, unrefreshed, while waiting
            # (and the daemon would find it ended right after joining).
            grant = await client.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl),
                                                      timeout=self.call_timeout)
            lease = int(grant.ID)
            value = _json({**record, "id": daemon_id, "lease": lease, "ttl": ttl,
                           "token": uuid.uuid4().hex, "since": now()})
            try:
                answer = await client.kvstub.Txn(rpc.TxnRequest(
                    compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE,
                                         result=rpc.Compare.EQUAL, create_revision=0)],
                    success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                                      lease=lease))],
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]),
                    timeout=self.call_timeout)
            except BaseException:
                await self._revoke(client, lease)
                raise
            if answer.succeeded:
                break
            await self._revoke(client, lease)
            if loop.time() >= deadline:
                kvs = answer.responses[0].response_range.kvs
                other: dict[str, Any] = {}
                with contextlib.suppress(ValueError, IndexError):
                    loaded = json.loads(bytes(kvs[0].value))
                    other = loaded if isinstance(loaded, dict) else {}
                who = ", ".join(f"{k} {other[k]}" for k in ("host", "pid", "since")
                                if k in other) or "unknown holder"
                raise WrongState(f"daemon id {daemon_id} is already in use in the cluster "
                                 f"{self.prefix} ({who}); this one did not start and "
                                 "changed nothing")
            await asyncio.sleep(0.5)
        self.daemon_id, self._member_value, self._member_lease = daemon_id, value, lease
        self._member_keepalive = loop.create_task(self._keep_member(ttl))

    async def _keep_member(self, ttl: int) -> None:
        """Refresh the member lease every third of its ttl.  When etcd says it has ended, or no
        refresh got through for a whole ttl (etcd has let it end by then, or will before any
        change of ours could commit), the daemon has lost its volumes: ``_lose``."""
        from aetcd import rpc

        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while self.lost is None:
            await asyncio.sleep(max(0.2, ttl / 3))
            try:
                client = await self._stub()
                alive = 0
                async for reply in client.leasestub.LeaseKeepAlive(
                        [rpc.LeaseKeepAliveRequest(ID=self._member_lease)],
                        timeout=min(self.call_timeout, max(0.5, ttl / 3))):
                    alive = int(reply.TTL)
                    break
                if alive <= 0:
                    self._lose(f"daemon {self.daemon_id} found its lease in etcd ended (it "
                               "was paused or cut off for longer than the lease): it stops "
                               "serving, since another daemon may own its volumes now")
                    return
                last_ok = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if loop.time() - last_ok >= ttl:
                    self._lose(f"daemon {self.daemon_id} could not renew its lease in etcd "
                               f"for {ttl} s ({type(exc).__name__}): it stops serving, since "
                               "another daemon may own its volumes now")
                    return
                with contextlib.suppress(Exception):
                    await self._rotate()

    def owned(self) -> list[str]:
        return sorted(self._owned)

    def owns(self, name: str) -> bool:
        return name in self._owned

    def cluster_view(self) -> dict[str, Any]:
        """One consistent read of the cluster: volume names, daemons, owners, holders, moves
        (each a dict by name of the decoded records) and the etcd revision it was read at."""
        prefixes = {kind: self._key(kind, "") for kind in
                    ("volumes", "daemons", "owners", "holder", "moves")}

        async def run() -> dict[str, Any]:
            from aetcd import rpc

            client = await self._stub()
            ops = [rpc.RequestOp(request_range=rpc.RangeRequest(
                key=p, range_end=_range_end(p), keys_only=kind == "volumes"))
                for kind, p in prefixes.items()]
            answer = await client.kvstub.Txn(rpc.TxnRequest(compare=[], success=ops),
                                             timeout=self.call_timeout)
            view: dict[str, Any] = {"revision": int(answer.header.revision)}
            for (kind, p), response in zip(prefixes.items(), answer.responses, strict=True):
                found: dict[str, Any] = {}
                for kv in response.response_range.kvs:
                    name = bytes(kv.key)[len(p):].decode(errors="replace")
                    if kind == "volumes":
                        found[name] = {}
                        continue
                    with contextlib.suppress(ValueError, UnicodeDecodeError):
                        value = json.loads(bytes(kv.value))
                        found[name] = value if isinstance(value, dict) else {}
                    if kind in ("daemons", "owners") and kv.lease:
                        found.setdefault(name, {})["lease_id"] = int(kv.lease)
                view[kind] = found
            return view

        return self._call("read the cluster's members and owners", run)

    def lease_left(self, lease: int) -> int:
        """Seconds left on ``lease`` (-1: it has ended)."""
        async def run() -> int:
            from aetcd import rpc

            client = await self._stub()
            answer = await client.leasestub.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease), timeout=self.call_timeout)
            return int(answer.TTL)

        return int(self._call("read a lease", run))

    def _owner_value_for(self, epoch: int) -> bytes:
        return _json({"daemon": self.daemon_id, "epoch": epoch, "token": uuid.uuid4().hex,
                      "since": now()})

    def claim_volume(self, name: str, rados: str | None) -> dict[str, Any] | None:
        """Own volume ``name`` if nobody does: ``P owners/<name>`` on this daemon's lease and a
        new epoch in ``P holder/<name>``, in one transaction that needs the owner key absent.
        Returns the previous holder record ({} if none: never owned); CatalogConflict if another
        daemon owns it (or claimed it first); None if there is no such volume."""
        vk, hk = self._key("volumes", name), self._key("holder", name)
        mk = self._key("moves", name)

        def build(seen: _Read) -> _Change | None:
            if seen.value(vk) is None:
                return None
            raw = seen.value(hk)
            before = _decode(hk, raw, "holder") if raw is not None else {}
            epoch = int(before.get("epoch", 0)) + 1
            # Whom the new owner must fence before it opens the volume: the last owner if it
            # did not close it cleanly, and any an earlier taker had not fenced yet.
            fence = {str(a) for a in before.get("fence") or [] if a}
            if before and not before.get("clean") and before.get("rados"):
                fence.add(str(before["rados"]))
            fence.discard(str(rados))
            holder = {"daemon": self.daemon_id, "rados": rados, "epoch": epoch,
                      "clean": False, "since": now(), "fence": sorted(fence)}
            change = _Change(puts={hk: _json(holder)}, deletes=[mk],
                             claims={name: self._owner_value_for(epoch)})
            change.result = {**before, "fence": sorted(fence)}
            return change

        if self.daemon_id is None:
            raise WrongState("this daemon is not a member of a cluster")
        result = self._change(f"take volume {name} over", [name], [vk, hk, mk], [], build)
        return None if result is None else dict(result)

    def mark_fenced(self, name: str) -> None:
        """Every earlier owner of ``name`` is fenced: nobody needs fencing for it any more."""
        hk = self._key("holder", name)

        def build(seen: _Read) -> _Change | None:
            raw = seen.value(hk)
            if raw is None:
                return None
            holder = _decode(hk, raw, "holder")
            holder["fence"] = []
            return _Change(puts={hk: _json(holder)})

        self._change(f"record the fencing for volume {name}", [name], [hk], [], build)

    def release_volume(self, name: str, clean: bool) -> None:
        """Stop owning ``name``: record whether it was closed cleanly (a clean close needs no
        fencing by the next owner) and drop the owner key, in one transaction."""
        hk, ok_ = self._key("holder", name), self._key("owners", name)

        def build(seen: _Read) -> _Change:
            raw = seen.value(hk)
            holder = _decode(hk, raw, "holder") if raw is not None else {}
            holder.update(clean=clean, closed_at=now())
            return _Change(puts={hk: _json(holder)}, deletes=[ok_])

        if name not in self._owned:
            return
        self._change(f"hand volume {name} back", [name], [hk], [], build)
        self._owned.pop(name, None)

    def request_move(self, name: str, to: str, force: bool) -> None:
        """Ask the owner of ``name`` to hand it to daemon ``to`` (``P moves/<name>``)."""
        mk = self._key("moves", name)
        vk, dk = self._key("volumes", name), self._key("daemons", to)

        async def run() -> None:
            seen = await self._read([vk, dk, self._key("owners", name)])
            if seen.value(vk) is None:
                raise NotFound(f"there is no volume named '{name}' in the cluster")
            if seen.value(dk) is None:
                raise InvalidRequest(f"there is no daemon '{to}' in the cluster")
            owner = seen.value(self._key("owners", name))
            if owner is None:
                raise WrongState(f"volume '{name}' has no owner right now; try again in a "
                                 "few seconds")
            value = _json({"to": to, "force": force, "at": now(), "id": uuid.uuid4().hex})
            await self._commit(f"ask for the move of volume {name}", seen, [],
                               _Change(puts={mk: value}))

        self._call(f"ask for the move of volume {name}", run)

    def answer_move(self, name: str, refused: str) -> None:
        """The owner refuses a requested move: the reason goes into the move record."""
        mk = self._key("moves", name)

        def build(seen: _Read) -> _Change | None:
            raw = seen.value(mk)
            if raw is None:
                return None
            record = _decode(mk, raw, "move")
            record["refused"] = refused
            return _Change(puts={mk: _json(record)})

        self._change(f"refuse the move of volume {name}", [name], [mk], [], build)

    async def _release_owner(self) -> None:
        from aetcd import rpc

        await _stopped(self._keepalive)
        self._keepalive = None
        client = await self._stub()
        lease, self._owner_lease = self._owner_lease, 0
        self._owner_value = None
        await self._revoke(client, lease, rpc.AioRpcError)
