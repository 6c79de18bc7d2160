"""NBD for owm: the pure protocol state machine, the asyncio server and a small client.

* :mod:`owm.nbd.constants` — the protocol's numbers;
* :mod:`owm.nbd.protocol` — the server side as a state machine with no I/O in it;
* :mod:`owm.nbd.server` — :class:`NbdServer`, which serves an ``owm.common.view.Exports``;
* :mod:`owm.nbd.client` — :class:`NbdClient`, an asyncio client for tests, demo and tools.

May import ``owm.common`` only: the server knows views, not pools or engines.
"""

from __future__ import annotations

from owm.nbd.client import NbdClient, NbdError
from owm.nbd.server import NbdServer

__all__ = ["NbdClient", "NbdError", "NbdServer"]
