"""The etcd catalog in cluster mode, on a real etcd: claims that only one daemon can win, and a
daemon whose lease ended (its volume taken over) refused every catalog change of that volume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from owm.catalog import EtcdCatalog, VolumeRow, now
from owm.catalog.etcd import CatalogConflict
from owm.testbed.etcd import EtcdServer


def row(name: str) -> VolumeRow:
    return VolumeRow(name, 1 << 20, 65536, "cow", 1, "fail-write", 0, {}, now())


@pytest.fixture
def members(etcd_server: EtcdServer, etcd_prefix: str) -> Iterator[list[EtcdCatalog]]:
    made: list[EtcdCatalog] = []
    try:
        for ident in ("a", "b"):
            catalog = EtcdCatalog(etcd_server.url, etcd_prefix)
            made.append(catalog)
            catalog.rados_address = f"127.0.0.1:0/{ident}"
            catalog.join(ident, {"host": "test"}, ttl=2)
        yield made
    finally:
        for catalog in made:
            catalog.abandon()


def test_concurrent_claims_have_one_winner(members: list[EtcdCatalog]) -> None:
    a = members[0]
    names = [f"v{i}" for i in range(8)]
    for name in names:
        a.add_volume(row(name))
        a.release_volume(name, clean=True)
    wins: dict[str, list[str]] = {n: [] for n in names}
    start = threading.Barrier(2)

    def claim(catalog: EtcdCatalog) -> None:
        start.wait()
        for name in names:
            try:
                if catalog.claim_volume(name, catalog.rados_address) is not None:
                    wins[name].append(str(catalog.daemon_id))
            except CatalogConflict:
                pass

    threads = [threading.Thread(target=claim, args=(c,)) for c in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(len(w) == 1 for w in wins.values()), wins
    view = a.cluster_view()
    assert {n: o["daemon"] for n, o in view["owners"].items()} == \
        {n: w[0] for n, w in wins.items()}


def test_a_daemon_that_lost_its_lease_cannot_change_the_catalog(
        members: list[EtcdCatalog]) -> None:
    a, b = members
    a.add_volume(row("vol"))
    with pytest.raises(CatalogConflict):
        b.claim_volume("vol", b.rados_address)  # owned: refused
    with pytest.raises(CatalogConflict, match="not served by this daemon"):
        b.save_engine_state("vol", {"x": 1})
    told: list[str] = []
    a.on_lost = told.append
    # a stops renewing (as if paused): its lease ends, b takes the volume over.
    task = a._member_keepalive
    assert task is not None
    a._loop.call_soon_threadsafe(task.cancel)
    deadline = time.monotonic() + 15
    before: dict[str, Any] | None = None
    while before is None:
        assert time.monotonic() < deadline, "the lease of a did not end"
        try:
            before = b.claim_volume("vol", b.rados_address)
        except CatalogConflict:
            time.sleep(0.2)
    assert before["daemon"] == "a" and before["fence"] == ["127.0.0.1:0/a"], before
    # Every change of the volume by a is refused now, and a is told it lost.
    with pytest.raises(CatalogConflict):
        a.save_engine_state("vol", {"stale": True})
    with pytest.raises(CatalogConflict):
        a.open_session("vol", 0, "late")
    assert told and a.lost is not None
    assert b.cluster_view()["owners"]["vol"]["daemon"] == "b"
    sid = b.open_session("vol", 0, "fresh")
    assert b.open_sessions("vol") == [(sid, 0)]


def test_directory_locates_the_owner(members: list[EtcdCatalog]) -> None:
    """``EtcdDirectory`` (what the front door asks): another daemon's volume is a Remote with
    that daemon's registered addresses; its own volume, and an unknown name, are None."""
    import asyncio
    from types import SimpleNamespace

    from owm.cluster.directory import EtcdDirectory
    from owm.common.cluster import Remote

    a, b = members
    a.add_volume(row("mine"))
    b.add_volume(row("theirs"))
    # b registered no addresses: re-join a third member with them, owning "far".
    c = EtcdCatalog(a.urls, a.prefix)
    try:
        c.join("c", {"nbd": "127.0.0.1:10900", "control": "[::1]:7000"}, ttl=2)
        c.add_volume(row("far"))

        async def db(fn: Any) -> Any:
            return await asyncio.to_thread(fn, None)

        member = SimpleNamespace(catalog=a, daemon_id="a", pool=SimpleNamespace(db=db))
        directory = EtcdDirectory(member)  # type: ignore[arg-type]

        async def ask() -> tuple[Any, ...]:
            return (await directory.locate("mine"), await directory.locate("nothing"),
                    await directory.locate("far"), await directory.exports())

        mine, nothing, far, exports = asyncio.run(ask())
        assert mine is None and nothing is None
        assert far == Remote("c", ("127.0.0.1", 10900), ("::1", 7000))
        assert exports == ["far", "mine", "theirs"]
    finally:
        c.abandon()
