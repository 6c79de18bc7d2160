"""Fencing a daemon that lost its volumes: blocklisting its RADOS client.

An etcd lease can end while its holder still runs (a long pause, a partition), so a lease alone
does not keep a paused owner from writing once it wakes.  Before a daemon opens a volume whose
last owner did not close it cleanly, it asks the Ceph monitors to blocklist that owner's RADOS
client address (``osd blocklist add``) and waits until it has the osdmap that says so: from then
on every OSD refuses that client's operations (EBLOCKLISTED), so nothing it sends can land on
top of what the new owner writes.  Its catalog changes are refused by the owner-key compares of
``owm.catalog.etcd``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from owm.common.errors import Unavailable

log = logging.getLogger("owm.cluster.fence")

MON_TIMEOUT = 10  # seconds the monitors get to answer the blocklist command


class Fencer(Protocol):
    async def fence(self, address: str, who: str) -> None:
        """Make sure the client at ``address`` can no longer write; raise if that failed."""
        ...


class RadosFencer:
    """Blocklists RADOS clients through this daemon's own connection to the cluster."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle  # a connected rados.Rados

    async def fence(self, address: str, who: str) -> None:
        def blocking() -> None:
            command = json.dumps({"prefix": "osd blocklist", "blocklistop": "add",
                                  "addr": address})
            try:
                rv, _out, status = self._handle.mon_command(command, b"", timeout=MON_TIMEOUT)
            except Exception as exc:  # rados.Error and friends: the monitors are out of reach
                raise Unavailable(f"could not fence daemon {who} (blocklist its RADOS client "
                                  f"{address}): {exc}") from None
            if rv != 0:
                raise Unavailable(f"could not fence daemon {who} (blocklist its RADOS client "
                                  f"{address}): {status or rv}")
            # Only once this client has the osdmap with the blocklist entry may it open the
            # volume: every OSD it then talks to refuses the old client.
            self._handle.wait_for_latest_osdmap()

        await asyncio.get_running_loop().run_in_executor(None, blocking)
        log.warning("fenced daemon %s: its RADOS client %s is blocklisted", who, address)
