"""What the NBD server and the control API need to know about a cluster: where a volume is served.

In a cluster of daemons sharing one pool (data in RADOS, catalog in etcd) every volume has one
owner at a time.  A daemon that is asked for a volume it does not own is a *front door*: it
forwards the client to the owner.  The layers that accept clients (``owm.nbd``, ``owm.control``)
sit below the cluster logic, so they see it only through this small interface, which the daemon
supplies (``owm.cluster`` implements it on etcd).  Without a cluster the daemon passes none and
everything is served locally, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Remote:
    """The daemon that owns a volume, as the other daemons reach it."""

    daemon: str  # the owner's daemon id (for logs and ``owm cluster status``)
    nbd: tuple[str, int]  # its NBD TCP listener
    control: tuple[str, int] | None  # its TCP control listener (token required), if any


class Directory(Protocol):
    """Where each volume of the cluster is served right now."""

    async def locate(self, volume: str) -> Remote | None:
        """The owner of ``volume`` if it is another daemon; None if this daemon serves it, or
        if no volume of that name exists in the cluster."""
        ...

    async def exports(self) -> list[str]:
        """Every volume of the cluster, whichever daemon owns it (for NBD_OPT_LIST)."""
        ...
