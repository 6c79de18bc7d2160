"""What ``owm cluster status`` and ``owm volume move`` do: they read and write etcd directly.

Both take the catalog's endpoints and prefix from the daemon the CLI talks to (its health), so
they work from any daemon of the cluster, whichever owns the volume.
"""

from __future__ import annotations

import time
from typing import Any

from owm.catalog.etcd import EtcdCatalog
from owm.common.errors import OwmError, Unavailable, WrongState


def _open(endpoints: list[str], prefix: str) -> EtcdCatalog:
    return EtcdCatalog(",".join(endpoints), prefix, connect_timeout=3.0)


def status(endpoints: list[str], prefix: str) -> dict[str, Any]:
    """Daemons (id, addresses, lease time left, owned volumes) and volumes without an owner."""
    catalog = _open(endpoints, prefix)
    try:
        view = catalog.cluster_view()
        owned: dict[str, list[str]] = {}
        for name, owner in view["owners"].items():
            owned.setdefault(str(owner.get("daemon")), []).append(name)
        daemons = []
        now = time.time()
        for daemon_id, record in sorted(view["daemons"].items()):
            lease = int(record.get("lease_id") or record.get("lease") or 0)
            left = catalog.lease_left(lease) if lease else -1
            started = record.get("started")
            daemons.append({
                "id": daemon_id, "host": record.get("host"), "pid": record.get("pid"),
                "nbd": record.get("nbd"), "control": record.get("control"),
                "rados": record.get("rados"), "since": record.get("since"),
                "age_seconds": round(now - float(started), 1) if started else None,
                "lease_ttl": record.get("ttl"), "lease_left": left,
                "volumes": sorted(owned.get(daemon_id, [])),
            })
        unowned = sorted(set(view["volumes"]) - set(view["owners"]))
        moves = {n: m for n, m in sorted(view["moves"].items()) if "refused" not in m}
        return {"prefix": prefix, "daemons": daemons, "unowned": unowned, "moves": moves}
    finally:
        catalog.close()


def move(endpoints: list[str], prefix: str, name: str, to: str, force: bool,
         timeout: float = 60.0) -> dict[str, Any]:
    """Ask the owner of ``name`` to hand it to daemon ``to`` and wait until ``to`` serves it,
    or the owner refuses (WrongState, its sentence), or ``timeout`` passes."""
    catalog = _open(endpoints, prefix)
    try:
        before = catalog.cluster_view()["owners"].get(name, {}).get("daemon")
        if before == to:
            return {"volume": name, "from": before, "to": to, "moved": False}
        catalog.request_move(name, to, force)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = catalog.cluster_view()
            move = view["moves"].get(name)
            if move is not None and "refused" in move:
                raise WrongState(str(move["refused"]))
            owner = view["owners"].get(name, {}).get("daemon")
            if owner == to and move is None:
                return {"volume": name, "from": before, "to": to, "moved": True}
            time.sleep(0.2)
        raise Unavailable(f"volume {name} was not served by daemon {to} within {timeout:.0f} s "
                          "(the move may still finish)")
    except OwmError:
        raise
    finally:
        catalog.close()
