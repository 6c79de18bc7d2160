"""Where each volume of the cluster is served: ``owm.common.cluster.Directory`` on etcd.

``locate`` answers from one etcd read of the owners and members (the owner's addresses are what
it registered under ``P daemons/<id>``); ``exports`` lists every volume in the catalog, whoever
owns it.  The daemon builds one and hands it to the NBD server and the control API (the front
door forwards what this daemon does not own).
"""

from __future__ import annotations

from typing import Any

from owm.cluster.member import Member
from owm.common.cluster import Remote


def parse_address(text: Any) -> tuple[str, int] | None:
    """``127.0.0.1:10809`` or ``[::1]:10809`` -> (host, port); None if absent or bad."""
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


class EtcdDirectory:
    """The cluster's volumes and their owners, read from etcd at each call."""

    def __init__(self, member: Member) -> None:
        self.member = member

    async def _view(self) -> dict[str, Any]:
        catalog = self.member.catalog
        view: dict[str, Any] = await self.member.pool.db(lambda _c: catalog.cluster_view())
        return view

    async def locate(self, volume: str) -> Remote | None:
        view = await self._view()
        owner = view["owners"].get(volume)
        if owner is None or owner.get("daemon") == self.member.daemon_id:
            return None
        record = view["daemons"].get(str(owner.get("daemon")), {})
        nbd = parse_address(record.get("nbd"))
        if nbd is None:
            return None
        return Remote(str(owner.get("daemon")), nbd, parse_address(record.get("control")))

    async def exports(self) -> list[str]:
        return sorted((await self._view())["volumes"])
