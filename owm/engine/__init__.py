"""The three engines behind one interface, and the factory that picks one per volume.

``base`` is the interface and what the engines share, ``cow``, ``log`` and ``mirror`` the
methods, ``chunktable`` the per-image lookup tables (bitmap, checkpoints, checksummed journal)
and ``groupsync`` the group commit of syncs.

May import ``owm.common``, ``owm.storage`` and ``owm.locks``; never the pool or anything above.
"""

from __future__ import annotations

from typing import Any

from owm.common.errors import InvalidRequest
from owm.engine.base import Engine, check_chunk_size
from owm.engine.cow import CowEngine
from owm.engine.log import LogEngine
from owm.engine.mirror import MirrorEngine
from owm.storage import Storage

ENGINES: dict[str, type[Engine]] = {e.method: e for e in (CowEngine, LogEngine, MirrorEngine)}


def make_engine(
    method: str,
    storage: Storage,
    size: int,
    chunk_size: int,
    *,
    legs: int = 2,
    enospc_policy: str = "fail-write",
    state: dict[str, Any] | None = None,
) -> Engine:
    cls = ENGINES.get(method)
    if cls is None:
        raise InvalidRequest(f"unknown method {method!r}; choose one of cow, log, mirror")
    return cls(storage, size, chunk_size, legs=legs, enospc_policy=enospc_policy, state=state)


__all__ = ["ENGINES", "Engine", "check_chunk_size", "make_engine"]
