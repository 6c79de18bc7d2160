"""The three engines behind one interface, and the factory that picks one per volume."""

from __future__ import annotations

from typing import Any

from owm.engine.base import Engine, check_chunk_size
from owm.engine.cow import CowEngine
from owm.engine.log import LogEngine
from owm.engine.mirror import MirrorEngine
from owm.errors import InvalidRequest
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
