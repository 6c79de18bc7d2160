"""The daemon's application locks as seen from a worker process (the ``Locks`` protocol).

One ``RemoteLocks`` is one lease: it is opened with a time to live and kept alive in the
background every third of it, so the locks of a process that dies are released by the daemon
within ``ttl`` seconds.  Transactions take and release their locks through it exactly as they
would through a local ``owm.locks.app.LockSpace``:

    async with await RemoteLocks.open(pool_dir, label="bank worker 3") as locks:
        await locks.acquire("txn-17", ["account/4", "account/9"], timeout=30)
        token = locks.fencing_token("txn-17")  # pass it along with the work done under them
        ...
        await locks.release("txn-17")

A lease that the daemon no longer has (it expired while this process was frozen, it was
closed, or the daemon restarted) makes every later call raise ``LeaseGone`` naming it; the
fencing token of the grant stays lower than that of whoever took the locks since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from owm.common.errors import InvalidRequest, NotFound, OwmError, Timeout, WrongState
from owm.control.client import ControlClient, ControlError
from owm.locks.app import LeaseGone, LockLimit

log = logging.getLogger("owm.locks.ranges")

JSON = dict[str, Any]


def _q(name: str) -> str:
    return quote(name, safe="")


def _as_owm_error(exc: ControlError) -> OwmError:
    """The daemon's refusal as the error a local lock space would have raised."""
    kind: type[OwmError] = {
        400: InvalidRequest, 404: NotFound, 408: Timeout, 409: WrongState, 410: LeaseGone,
        429: LockLimit,
    }.get(exc.status, OwmError)
    return kind(str(exc))


class RemoteLocks:
    """A lease on the daemon's lock space; ``acquire``/``release`` as in ``owm.locks.app``."""

    def __init__(self, control: ControlClient, lease: str, ttl: float, own_client: bool) -> None:
        self._control = control
        self.lease = lease
        self.ttl = ttl
        self._own_client = own_client
        self._keeper: asyncio.Task[None] | None = None
        self.lost: OwmError | None = None  # set once the daemon said the lease is gone
        self._tokens: dict[str, int] = {}  # owner -> fencing token of its grant

    @classmethod
    async def open(
        cls,
        pool: Path | None = None,
        *,
        control: ControlClient | None = None,
        ttl: float = 10.0,
        label: str = "",
    ) -> RemoteLocks:
        """Open a lease on the daemon of ``pool`` (or through an existing ``control`` client)."""
        own = control is None
        if control is None:
            if pool is None:
                raise ValueError("give pool or control")
            control = ControlClient(pool)
        try:
            answer = await control.request(
                "POST", "/v1/locks/leases", {"ttl": ttl, "label": label}, timeout=30
            )
        except BaseException:
            if own:
                await control.close()
            raise
        locks = cls(control, str(answer["lease"]), float(answer["ttl"]), own)
        locks._keeper = asyncio.get_running_loop().create_task(locks._keep_alive())
        return locks

    async def _keep_alive(self) -> None:
        path = f"/v1/locks/leases/{_q(self.lease)}/keepalive"
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._control.request("POST", path, timeout=self.ttl / 3)
            except ControlError as exc:
                if exc.status in (404, 410):
                    self._lose(exc)
                    return
                log.warning("keeping lock lease %s alive failed: %s", self.lease, exc)
            except OwmError as exc:
                log.warning("keeping lock lease %s alive failed: %s", self.lease, exc)

    def _lose(self, exc: ControlError) -> LeaseGone:
        """The daemon said the lease is gone: every later call says so without asking."""
        if self.lost is None:
            self.lost = LeaseGone(str(exc))
            log.warning("lock lease %s is gone: %s", self.lease, exc)
        self._tokens.clear()
        return LeaseGone(str(exc))

    def _refusal(self, exc: ControlError) -> OwmError:
        return self._lose(exc) if exc.status == 410 else _as_owm_error(exc)

    async def acquire(
        self, owner: str, names: Sequence[str], timeout: float | None = None
    ) -> float:
        if self.lost is not None:
            raise LeaseGone(str(self.lost))
        body: JSON = {"owner": owner, "names": list(names), "timeout": timeout}
        try:
            answer = await self._control.request(
                "POST", f"/v1/locks/leases/{_q(self.lease)}/acquire", body,
                timeout=None if timeout is None else timeout + 30,
            )
        except ControlError as exc:
            raise self._refusal(exc) from None
        self._tokens[owner] = int(answer["fencing_token"])
        return float(answer["waited_ms"]) / 1000

    async def release(self, owner: str) -> list[str]:
        self._tokens.pop(owner, None)
        if self.lost is not None:
            raise LeaseGone(str(self.lost))
        try:
            answer = await self._control.request(
                "POST", f"/v1/locks/leases/{_q(self.lease)}/release", {"owner": owner},
                timeout=30,
            )
        except ControlError as exc:
            raise self._refusal(exc) from None
        return list(answer["released"])

    def fencing_token(self, owner: str) -> int | None:
        """The token the daemon granted ``owner``'s locks with (None once released or lost)."""
        return self._tokens.get(owner)

    async def keepalive(self) -> None:
        """Renew the lease now (the background task does it every ttl/3); LeaseGone if gone."""
        if self.lost is not None:
            raise LeaseGone(str(self.lost))
        try:
            await self._control.request(
                "POST", f"/v1/locks/leases/{_q(self.lease)}/keepalive", timeout=30
            )
        except ControlError as exc:
            raise self._refusal(exc) from None

    async def status(self) -> JSON:
        result: JSON = await self._control.request("GET", "/v1/locks", timeout=30)
        return result

    async def close(self) -> None:
        """Close the lease (releasing whatever is still held under it)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        try:
            with contextlib.suppress(ControlError):
                await self._control.request(
                    "DELETE", f"/v1/locks/leases/{_q(self.lease)}", timeout=30
                )
        finally:
            if self._own_client:
                await self._control.close()

    async def __aenter__(self) -> RemoteLocks:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
