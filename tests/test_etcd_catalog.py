"""The catalog contract, every method, run against both implementations (SQLite and etcd), and
what only the shared one has: the revision guard between two writers, the owner lease, a lost
or full etcd, and damaged values.

etcd is a real ``etcd`` process on loopback (tests/etcd_fixtures.py); the tests that stop it or
fill its quota use one of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from owm.catalog import Catalog, EtcdCatalog, ImageRow, SqliteCatalog, VolumeRow, now
from owm.catalog.etcd import CatalogConflict, CatalogUnavailable, CatalogValueDamaged
from owm.common.errors import NoSpace, OwmError
from owm.testbed.etcd import EtcdServer

Opener = Callable[[], Catalog]


@pytest.fixture(params=["sqlite", "etcd"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the catalog of one pool (again and again: the same pool each time)."""
    opened: list[Catalog] = []
    if request.param == "sqlite":
        def make() -> Catalog:
            opened.append(SqliteCatalog(tmp_path / "catalog.sqlite"))
            return opened[-1]
    else:
        server = request.getfixturevalue("etcd_server")
        prefix = request.getfixturevalue("etcd_prefix")

        def make() -> Catalog:
            opened.append(EtcdCatalog(server.url, prefix))
            return opened[-1]
    yield make
    for catalog in opened:
        catalog.close()


def volume(name: str = "v", **kw: Any) -> VolumeRow:
    row = VolumeRow(name, 1 << 20, 65536, "cow", 1, "fail-write", 0, {}, now())
    return dataclasses.replace(row, **kw)


def image(vol: str = "v", gen: int = 0, **kw: Any) -> ImageRow:
    row = ImageRow(vol, gen, "draining", "transaction-consistent", now(), None, 0, None)
    return dataclasses.replace(row, **kw)


def test_meta_and_volumes(opener: Opener) -> None:
    c = opener()
    assert c.get_meta("clean") is None and c.get_meta("clean", "1") == "1"
    c.set_meta("clean", "0")
    c.set_meta("clean", "1")
    assert c.get_meta("clean") == "1"
    c.add_volume(volume("b"))
    c.add_volume(volume("a", method="mirror", legs=2))
    with pytest.raises(OwmError):
        c.add_volume(volume("a"))
    rows = c.volumes()
    assert [r.name for r in rows] == ["a", "b"]
    assert rows[0].legs == 2 and all(len(r.uid) == 32 for r in rows)
    assert rows[0].uid != rows[1].uid
    c.save_engine_state("a", {"legs": [1, 2]})
    c.set_restore("b", {"state": "incomplete", "from": "repo"})
    c.save_engine_state("nope", {"x": 1})  # no such row: nothing happens, as an UPDATE
    rows = {r.name: r for r in c.volumes()}
    assert rows["a"].engine_state == {"legs": [1, 2]} and rows["a"].restore is None
    assert rows["b"].restore == {"state": "incomplete", "from": "repo"}
    c.set_restore("b", None)
    assert {r.name: r for r in c.volumes()}["b"].restore is None
    assert c.headroom() is True
    c.close()
    again = opener()
    assert [r.name for r in again.volumes()] == ["a", "b"]
    assert again.get_meta("clean") == "1"


def test_images_and_release(opener: Opener) -> None:
    c = opener()
    c.add_volume(volume())
    c.record_preserve(image(gen=0), 1, {"s": 1})
    c.record_preserve(image(gen=1, state="drained", drained_at=now()), 2, {"s": 2})
    assert [i.generation for i in c.images("v")] == [0, 1]
    assert c.volumes()[0].live_generation == 2 and c.volumes()[0].engine_state == {"s": 2}
    changed = image(gen=0, state="drained-unclean", consistency="crash-consistent",
                    drained_at=now(), unclean_sessions=2, broken_reason=None)
    c.update_image(changed)
    got = c.images("v")[0]
    assert (got.state, got.consistency, got.unclean_sessions) == (
        "drained-unclean", "crash-consistent", 2)
    c.finish_release("v", 0, {"s": 3})
    assert [i.generation for i in c.images("v")] == [1]
    assert c.volumes()[0].engine_state == {"s": 3}
    assert c.images("other") == []


def test_group_preserve_is_one_change_for_every_member(opener: Opener) -> None:
    c = opener()
    c.add_volume(volume("a"))
    c.add_volume(volume("b"))
    c.record_group_preserve([(image("a", 0), 1, {"a": 1}), (image("b", 0), 1, {"b": 1})],
                            '{"g": ["a", "b"]}')
    assert {v.name: (v.live_generation, v.engine_state) for v in c.volumes()} == {
        "a": (1, {"a": 1}), "b": (1, {"b": 1})}
    assert [i.generation for i in c.images("a")] == [0] == [i.generation for i in c.images("b")]
    assert c.get_meta("groups") == '{"g": ["a", "b"]}'
    # One member's image exists already: nothing of the set is recorded.
    c.record_preserve(image("b", 1), 2, {"b": 2})
    with pytest.raises(OwmError):
        c.record_group_preserve([(image("a", 1), 2, {"a": 2}), (image("b", 1), 2, {"b": 3})],
                                '{"g": ["a", "b"], "n": 1}')
    assert [i.generation for i in c.images("a")] == [0]
    assert c.volumes()[0].engine_state == {"a": 1}
    assert c.get_meta("groups") == '{"g": ["a", "b"]}'


def test_sessions(opener: Opener) -> None:
    c = opener()
    c.add_volume(volume())
    c.add_volume(volume("w"))
    c.record_preserve(image(gen=0), 1, {})
    a = c.open_session("v", 0, "peer-a")
    b = c.open_session("v", 1, "peer-b")
    w = c.open_session("w", 0, "peer-w")
    assert len({a, b, w}) == 3
    assert sorted(c.open_sessions("v")) == sorted([(a, 0), (b, 1)])
    # The end of a session and the image it leaves unclean: one change.
    c.close_session(a, False, 10, 20, 0, [image(gen=0, unclean_sessions=1)])
    assert c.open_sessions("v") == [(b, 1)]
    assert c.images("v")[0].unclean_sessions == 1
    c.close_session(b, True, 0, 0, 1)
    assert c.open_sessions("v") == []
    c.end_sessions_unclean("w", [])
    assert c.open_sessions("w") == []
    c.prune_sessions(keep=0)
    c.close()
    # Ids never come back, also after the catalog is opened again.
    again = opener()
    later = again.open_session("v", 1, "peer-c")
    assert later > max(a, b, w)
    again.end_sessions_unclean("v", [image(gen=0, unclean_sessions=2)])
    assert again.open_sessions("v") == [] and again.images("v")[0].unclean_sessions == 2
    again.delete_volume("v")
    assert [r.name for r in again.volumes()] == ["w"]
    assert again.images("v") == [] and again.open_sessions("v") == []


# -- etcd only ---------------------------------------------------------------------------------

def raw(server: EtcdServer, call: Callable[[Any], Any]) -> Any:
    """One call on a plain aetcd client of the test's own (what another writer does)."""
    async def run() -> Any:
        host, port = server.url.removeprefix("http://").split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            return await call(client)

    return asyncio.run(run())


class Racing(EtcdCatalog):
    """Waits at a barrier after every read: two of them read the same state, then both commit."""

    barrier: threading.Barrier | None = None

    async def _read(self, singles: Any = (), prefixes: Any = ()) -> Any:
        seen = await super()._read(singles, prefixes)
        if self.barrier is not None:
            self.barrier.wait(10)
        return seen


def race(cats: list[Racing], change: Callable[[Racing, int], Any]) -> list[Any]:
    barrier = threading.Barrier(len(cats))
    results: list[Any] = [None] * len(cats)

    def run(i: int) -> None:
        try:
            results[i] = change(cats[i], i)
        except OwmError as exc:
            results[i] = exc

    for c in cats:
        c.barrier = barrier
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for c in cats:
        c.barrier = None
    return results


def test_two_writers_racing_the_same_change_exactly_one_wins(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    cats = [Racing(etcd_server.url, etcd_prefix) for _ in range(2)]
    try:
        cats[0].add_volume(volume())
        for round_ in range(5):
            results = race(cats, lambda c, i, r=round_: c.save_engine_state(  # type: ignore[misc]
                "v", {"by": i, "r": r}))
            lost = [r for r in results if isinstance(r, CatalogConflict)]
            won = [i for i, r in enumerate(results) if r is None]
            assert len(won) == 1 and len(lost) == 1, results
            assert "changed by another writer" in str(lost[0])
            assert cats[1].volumes()[0].engine_state == {"by": won[0], "r": round_}
        # The same for the session counter: never one id given out twice.
        results = race(cats, lambda c, i: c.open_session("v", 0, f"p{i}"))
        ids = [r for r in results if isinstance(r, int)]
        assert len(ids) == 1 and sum(isinstance(r, CatalogConflict) for r in results) == 1
        assert cats[0].open_sessions("v") == [(ids[0], 0)]
        # And for a preserve against a concurrent preserve of the same generation.
        results = race(cats, lambda c, i: c.record_preserve(image(gen=0), 1, {"by": i}))
        assert sum(r is None for r in results) == 1
        assert [i.generation for i in cats[0].images("v")] == [0]
    finally:
        for c in cats:
            c.close()


def test_owner_lease_refuses_a_second_owner_and_fences_a_lost_one(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    first = EtcdCatalog(etcd_server.url, etcd_prefix)
    second = EtcdCatalog(etcd_server.url, etcd_prefix)
    try:
        first.claim({"host": "h1", "pid": 11})
        first.add_volume(volume())
        with pytest.raises(OwmError, match=r"already served by another daemon \(host h1, pid 11"):
            second.claim({"host": "h2", "pid": 22})
        # The lease ends (as after a long pause): the first may no longer change anything.
        raw(etcd_server, lambda c: c.revoke_lease(first._owner_lease))
        with pytest.raises(CatalogConflict, match="no longer owns"):
            first.save_engine_state("v", {"x": 1})
        second.claim({"host": "h2", "pid": 22})
        second.save_engine_state("v", {"x": 2})
        with pytest.raises(CatalogConflict):
            first.set_meta("clean", "1")
        assert second.volumes()[0].engine_state == {"x": 2}
    finally:
        first.close()
        second.close()
    # A clean close released the lease: a new owner is welcome at once.
    third = EtcdCatalog(etcd_server.url, etcd_prefix)
    third.claim({"host": "h3", "pid": 33})
    third.close()


def test_lost_etcd_is_one_sentence_then_recovers_by_itself(
    private_etcd: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = private_etcd()
    c = EtcdCatalog(server.url, etcd_prefix, call_timeout=2.0)
    try:
        c.add_volume(volume())
        server.kill()
        started = time.monotonic()
        with pytest.raises(CatalogUnavailable) as caught:
            c.save_engine_state("v", {"x": 1})
        assert time.monotonic() - started < 10
        message = str(caught.value)
        assert server.url in message and "\n" not in message and "could not record" in message
        with pytest.raises(CatalogUnavailable):
            c.volumes()
        server.start_again()
        deadline = time.monotonic() + 15
        while True:
            try:
                c.save_engine_state("v", {"x": 2})
                break
            except CatalogUnavailable:
                assert time.monotonic() < deadline, "the catalog did not recover"
                time.sleep(0.2)
        assert c.volumes()[0].engine_state == {"x": 2}
    finally:
        c.close()


def test_unreachable_etcd_at_open_is_one_sentence_naming_it(etcd_prefix: str) -> None:
    started = time.monotonic()
    with pytest.raises(CatalogUnavailable) as caught:
        EtcdCatalog("http://127.0.0.1:9,http://127.0.0.1:7", etcd_prefix, connect_timeout=2.0)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "http://127.0.0.1:9,http://127.0.0.1:7" in message and "\n" not in message


def test_etcd_quota_exceeded_is_no_space_and_no_headroom(
    private_etcd: Callable[..., EtcdServer], etcd_prefix: str
) -> None:
    server = private_etcd(quota_bytes=2 << 20)
    c = EtcdCatalog(server.url, etcd_prefix)
    try:
        c.add_volume(volume())
        assert c.headroom()
        blob = "x" * (512 << 10)
        with pytest.raises(NoSpace, match="catalog in etcd is full"):
            for i in range(64):
                c.set_meta(f"filler-{i}", blob)
        assert c.headroom() is False
        with pytest.raises(NoSpace):
            c.save_engine_state("v", {"x": 1})
        assert c.volumes()[0].engine_state == {}  # nothing half-done
    finally:
        c.close()


def test_undecodable_value_is_named(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    c = EtcdCatalog(etcd_server.url, etcd_prefix)
    try:
        c.add_volume(volume())
        raw(etcd_server, lambda e: e.put(f"{etcd_prefix}volumes/v".encode(), b"{not json"))
        with pytest.raises(CatalogValueDamaged, match=f"{etcd_prefix}volumes/v is not JSON"):
            c.volumes()
    finally:
        c.close()
