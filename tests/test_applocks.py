"""Application locks: FIFO, mutual exclusion, all-or-nothing, no deadlock, leases, and the same
lock space shared by several processes through the daemon (with a counter on a real volume
that only stays right if the locks exclude each other across processes)."""

from __future__ import annotations

import asyncio
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from owm.common.errors import InvalidRequest, Timeout, WrongState
from owm.control.client import ControlClient
from owm.control.lock_client import RemoteLocks
from owm.locks.app import (
    MAX_LEASES,
    MAX_LOCKS_PER_OWNER,
    MAX_NAME,
    FenceFile,
    LeaseGone,
    LockLimit,
    LockService,
    LockSpace,
    lock_names,
)
from owm.nbd.client import NbdClient
from owm.txn.coordinator import Transaction, TxnContext
from tests.conftest import REPO, Daemon, cli_env, start_daemon

# ---------------------------------------------------------------------------- one process


async def test_names_are_checked_and_sorted() -> None:
    assert lock_names(["b", "a", "b"]) == ["a", "b"]
    for bad in ([], [""], ["x" * 300], "ab", [3]):
        with pytest.raises(InvalidRequest):
            lock_names(bad)  # type: ignore[arg-type]


async def test_mutual_exclusion_under_contention() -> None:
    space = LockSpace()
    inside = 0
    most = 0
    done = 0

    async def txn(i: int) -> None:
        nonlocal inside, most, done
        await space.acquire(f"t{i}", ["acct/1"], timeout=10)
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0)
        await asyncio.sleep(0.001 * random.random())
        inside -= 1
        done += 1
        await space.release(f"t{i}")

    await asyncio.wait_for(asyncio.gather(*(txn(i) for i in range(50))), 20)
    assert most == 1 and done == 50
    assert space.snapshot() == [] and space.owners() == []


async def test_waiters_are_served_first_come_first_served() -> None:
    space = LockSpace()
    await space.acquire("holder", ["x"])
    order: list[str] = []

    async def wait_for(owner: str) -> None:
        await space.acquire(owner, ["x"], timeout=10)
        order.append(owner)
        await asyncio.sleep(0.001)
        await space.release(owner)

    tasks = []
    for owner in ("a", "b", "c", "d"):
        tasks.append(asyncio.create_task(wait_for(owner)))
        await asyncio.sleep(0.005)  # queue them in a known order
    assert space.waiting("x") == ["a", "b", "c", "d"]
    assert space.holder("x") == "holder"
    # A latecomer asking while the lock passes from hand to hand must not barge in.
    await space.release("holder")
    late = asyncio.create_task(wait_for("late"))
    await asyncio.wait_for(asyncio.gather(*tasks, late), 10)
    assert order == ["a", "b", "c", "d", "late"]


async def test_locks_taken_in_sorted_order_never_deadlock() -> None:
    space = LockSpace()
    rng = random.Random(7)
    names = [f"acct/{i}" for i in range(5)]
    held_together: list[tuple[str, ...]] = []

    async def txn(i: int) -> None:
        mine = rng.sample(names, rng.randint(1, 3))  # any order: the space sorts them
        await space.acquire(f"t{i}", mine, timeout=10)
        for name in mine:
            assert space.holder(name) == f"t{i}"
        held_together.append(tuple(mine))
        await asyncio.sleep(0.0005)
        assert sorted(await space.release(f"t{i}")) == sorted(mine)

    await asyncio.wait_for(asyncio.gather(*(txn(i) for i in range(200))), 30)
    assert len(held_together) == 200 and space.snapshot() == []


async def test_a_timeout_gives_back_what_was_taken() -> None:
    space = LockSpace()
    await space.acquire("t1", ["b"])
    started = time.monotonic()
    with pytest.raises(Timeout, match="'b' held by 't1'"):
        await space.acquire("t2", ["a", "b"], timeout=0.05)  # gets a, waits for b
    assert time.monotonic() - started < 2
    assert space.holder("a") is None and space.waiting("b") == []
    await space.acquire("t3", ["a"], timeout=1)  # a is free again
    await space.release("t1")
    assert space.holder("b") is None


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    space = LockSpace()
    await space.acquire("t1", ["x"])
    waiter = asyncio.create_task(space.acquire("t2", ["w", "x"]))
    await asyncio.sleep(0.01)
    assert space.holder("w") == "t2" and space.waiting("x") == ["t2"]
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert space.holder("w") is None and space.waiting("x") == []
    await space.release("t1")
    assert space.snapshot() == []


async def test_a_cancel_racing_the_grant_does_not_leak_the_lock() -> None:
    space = LockSpace()
    await space.acquire("t1", ["x"])
    waiter = asyncio.create_task(space.acquire("t2", ["x"]))
    await asyncio.sleep(0.01)
    await space.release("t1")  # grants x to t2...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert space.holder("x") is None and space.owners() == []


async def test_locks_are_declared_once_per_transaction() -> None:
    space = LockSpace()
    await space.acquire("t1", ["a"])
    with pytest.raises(WrongState, match="declares all of its locks at once"):
        await space.acquire("t1", ["b"])
    assert space.held("t1") == ["a"]
    assert await space.release("t1") == ["a"]
    assert await space.release("t1") == []  # harmless


async def test_release_of_a_waiting_owner_fails_its_wait() -> None:
    space = LockSpace()
    await space.acquire("t1", ["x"])
    waiter = asyncio.create_task(space.acquire("t2", ["a", "x"]))
    await asyncio.sleep(0.01)
    assert space.release_now("t2") == ["a"]
    with pytest.raises(WrongState):
        await waiter
    assert space.waiting("x") == [] and space.holder("a") is None


async def test_an_expired_lease_releases_its_locks() -> None:
    service = LockService()
    lease = service.open_lease(ttl=0.2, label="doomed")["lease"]
    other = service.open_lease(ttl=30)["lease"]
    await service.acquire(lease, "t1", ["x"])
    # The other lease waits; the doomed one is never kept alive, so its lock comes free.
    started = time.monotonic()
    await asyncio.wait_for(service.acquire(other, "t2", ["x"]), 5)
    assert 0.1 < time.monotonic() - started < 3
    assert service.expired == 1
    with pytest.raises(LeaseGone, match=lease):
        service.keepalive(lease)
    status = service.status()
    assert [entry["holder"] for entry in status["locks"]] == [f"{other}/t2"]
    assert service.close_lease(other) == ["x"]
    service.close()


async def test_keepalive_keeps_a_lease() -> None:
    service = LockService()
    lease = service.open_lease(ttl=0.2)["lease"]
    await service.acquire(lease, "t1", ["x"])
    for _ in range(5):
        await asyncio.sleep(0.08)
        service.keepalive(lease)
    assert service.space.holder("x") == f"{lease}/t1"
    with pytest.raises(InvalidRequest):
        service.open_lease(ttl=0)
    service.close()
    assert service.space.snapshot() == []


# ---------------------------------------------------------------------------- through the daemon

COUNTER_WORKER = r"""
import asyncio, struct, sys
from pathlib import Path
from owm.control.lock_client import RemoteLocks
from owm.nbd.client import NbdClient

async def main():
    pool, sock, name, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    nbd = await NbdClient.connect("counter", unix_path=sock)
    async with await RemoteLocks.open(pool, label=name) as locks:
        for i in range(rounds):
            await locks.acquire(f"{name}-{i}", ["counter"], timeout=30)
            (value,) = struct.unpack_from("<Q", await nbd.read(0, 512))
            await asyncio.sleep(0.001)  # widen the window a lost update would need
            await nbd.write(0, struct.pack("<Q", value + 1).ljust(512, b"\0"))
            await locks.release(f"{name}-{i}")
    await nbd.disconnect()
    print("done", flush=True)

asyncio.run(main())
"""

HOLDER = r"""
import asyncio, sys
from pathlib import Path
from owm.control.lock_client import RemoteLocks

async def main():
    locks = await RemoteLocks.open(Path(sys.argv[1]), ttl=float(sys.argv[3]), label="holder")
    await locks.acquire("t", sys.argv[2].split(","), timeout=30)
    print("held", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await locks.release("t")
    print("released", flush=True)
    await locks.close()

asyncio.run(main())
"""


def _python(script: str, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=cli_env(), cwd=REPO,
    )


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"expected {word!r}, got {line!r}: {err}")


async def test_two_processes_exclude_each_other_through_the_daemon(daemon: Daemon) -> None:
    async with ControlClient(daemon.pool) as control:
        await control.create_volume("counter", "1M", chunk_size="4K")
    rounds = 40
    procs = [_python(COUNTER_WORKER, daemon.pool, daemon.nbd_socket, f"w{i}", rounds)
             for i in range(2)]
    try:
        for proc in procs:
            out, err = await asyncio.to_thread(proc.communicate, timeout=120)
            assert proc.returncode == 0 and out.strip() == "done", err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    nbd = await NbdClient.connect("counter", unix_path=str(daemon.nbd_socket))
    (value,) = struct.unpack_from("<Q", await nbd.read(0, 512))
    await nbd.disconnect()
    assert value == 2 * rounds  # every increment survived: no two were ever interleaved
    status, locks = daemon.api("GET", "/v1/locks")
    assert status == 200 and locks["locks"] == [] and locks["leases"] == []


async def test_fifo_across_processes_and_timeouts(daemon: Daemon) -> None:
    holder = _python(HOLDER, daemon.pool, "acct/1,acct/2", 30)
    try:
        await asyncio.to_thread(_expect, holder, "held")
        async with await RemoteLocks.open(daemon.pool, label="test") as locks:
            with pytest.raises(Timeout):
                await locks.acquire("early", ["acct/2"], timeout=0.1)
            first = asyncio.create_task(locks.acquire("first", ["acct/2"], timeout=30))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(locks.acquire("second", ["acct/1", "acct/2"],
                                                       timeout=30))
            await asyncio.sleep(0.1)
            status = await locks.status()
            by_name = {entry["name"]: entry for entry in status["locks"]}
            lease = locks.lease
            assert by_name["acct/2"]["waiting"] == [f"{lease}/first"]
            assert by_name["acct/1"]["waiting"] == [f"{lease}/second"]
            with pytest.raises(WrongState):
                await locks.acquire("first", ["acct/3"])
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            await asyncio.to_thread(_expect, holder, "released")
            await asyncio.wait_for(first, 10)
            assert not second.done()  # got acct/1, queued behind 'first' for acct/2
            assert await locks.release("first") == ["acct/2"]
            await asyncio.wait_for(second, 10)
            assert await locks.release("second") == ["acct/1", "acct/2"]
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)


async def test_a_killed_process_loses_its_locks_when_its_lease_expires(daemon: Daemon) -> None:
    holder = _python(HOLDER, daemon.pool, "acct/7", 0.5)
    try:
        await asyncio.to_thread(_expect, holder, "held")
        holder.kill()
        async with await RemoteLocks.open(daemon.pool) as locks:
            waited = await locks.acquire("t", ["acct/7"], timeout=10)
            assert 0 < waited < 5
            await locks.release("t")
            status = await locks.status()
        assert status["expired_leases"] == 1
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)


def test_lock_requests_are_checked(daemon: Daemon) -> None:
    status, body = daemon.api("POST", "/v1/locks/leases/nope/acquire",
                              {"owner": "t", "names": ["a"]})
    assert status == 410 and "nope" in body["error"]
    status, lease = daemon.api("POST", "/v1/locks/leases", {"ttl": 30, "label": "x"})
    assert status == 201
    path = f"/v1/locks/leases/{lease['lease']}"
    for bad in ({"owner": "t"}, {"owner": "t", "names": "a"}, {"owner": "t", "names": []},
                {"owner": "t/u", "names": ["a"]}, {"owner": "t", "names": ["a"], "x": 1}):
        status, body = daemon.api("POST", path + "/acquire", bad)
        assert status == 400, (bad, body)
    status, body = daemon.api("POST", path + "/acquire", {"owner": "t", "names": ["b", "a"]})
    assert status == 200 and body["names"] == ["a", "b"]
    status, body = daemon.api("DELETE", path)
    assert status == 200 and body["released"] == ["a", "b"]
    assert daemon.api("POST", path + "/keepalive")[0] == 410


# ---------------------------------------------------------------------------- issue 18, item 2


def _lock_holders(daemon: Daemon) -> dict[str, str | None]:
    status, body = daemon.api("GET", "/v1/locks")
    assert status == 200
    return {entry["name"]: entry["holder"] for entry in body["locks"]}


async def _until(predicate: Any, what: str, limit: float = 10.0) -> None:
    """Poll ``predicate`` (bounded in time and count) until it holds."""
    deadline = time.monotonic() + limit
    for _ in range(int(limit / 0.02) + 1):
        if await asyncio.to_thread(predicate):
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("how", ["close", "expire"])
async def test_a_waiter_whose_lease_ends_is_refused_and_holds_nothing(
    daemon: Daemon, how: str
) -> None:
    """Owner o1 holds 'm'; owner o2 of the same lease wants a, m, z and waits for m.  Ending
    the lease must fail o2's acquire (410 naming the lease) and leave none of a, m, z held."""
    ttl = 1.5 if how == "expire" else 60
    status, opened = daemon.api("POST", "/v1/locks/leases", {"ttl": ttl, "label": "doomed"})
    assert status == 201
    lease = opened["lease"]
    path = f"/v1/locks/leases/{lease}"
    assert daemon.api("POST", path + "/acquire", {"owner": "o1", "names": ["m"]})[0] == 200
    waiting = asyncio.create_task(asyncio.to_thread(
        daemon.api, "POST", path + "/acquire",
        {"owner": "o2", "names": ["a", "m", "z"], "timeout": 20}))

    def queued() -> bool:
        if how == "expire":  # alive until o2 is in line, then left to expire
            assert daemon.api("POST", path + "/keepalive")[0] == 200
        return _lock_holders(daemon).get("a") == f"{lease}/o2"

    await _until(queued, "o2 to queue for m")
    if how == "close":
        assert daemon.api("DELETE", path)[0] == 200
    status, body = await asyncio.wait_for(waiting, 30)
    assert status == 410, body
    assert lease in body["error"]
    assert _lock_holders(daemon) == {}
    # Another lease takes all three at once, and the dead lease's owners cannot release.
    status, other = daemon.api("POST", "/v1/locks/leases", {"ttl": 60})
    status, taken = daemon.api("POST", f"/v1/locks/leases/{other['lease']}/acquire",
                               {"owner": "t", "names": ["a", "m", "z"], "timeout": 5})
    assert status == 200 and taken["waited_ms"] < 5000
    for owner in ("o1", "o2"):
        status, body = daemon.api("POST", path + "/release", {"owner": owner})
        assert status == 410 and lease in body["error"]
    daemon.api("DELETE", f"/v1/locks/leases/{other['lease']}")


# ---------------------------------------------------------------------------- issue 18, item 3


async def test_lease_ids_and_fencing_tokens_across_a_daemon_restart(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    seen_leases: set[str] = set()
    tokens: list[int] = []
    daemon = start_daemon(pool)
    try:
        for round_ in range(3):
            status, opened = daemon.api("POST", "/v1/locks/leases", {"ttl": 60})
            assert status == 201 and opened["lease"] not in seen_leases
            lease = opened["lease"]
            seen_leases.add(lease)
            for i in range(2):
                status, body = daemon.api("POST", f"/v1/locks/leases/{lease}/acquire",
                                          {"owner": f"t{i}", "names": [f"acct/{i}"]})
                assert status == 200, body
                tokens.append(body["fencing_token"])
            daemon.stop(signal.SIGKILL if round_ % 2 == 0 else signal.SIGTERM)
            daemon = start_daemon(pool)
            # The old lease is gone, and says so by name, on every endpoint.
            for method, suffix, body in (("POST", "/keepalive", None),
                                         ("POST", "/release", {"owner": "t0"}),
                                         ("POST", "/acquire", {"owner": "t9", "names": ["x"]}),
                                         ("DELETE", "", None)):
                status, answer = daemon.api(method, f"/v1/locks/leases/{lease}{suffix}", body)
                assert status == 410 and lease in answer["error"], (suffix, answer)
            assert _lock_holders(daemon) == {}
    finally:
        daemon.stop()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens
    assert len(seen_leases) == 3


async def test_remote_locks_expose_the_token_and_learn_of_a_lost_lease(daemon: Daemon) -> None:
    async with await RemoteLocks.open(daemon.pool, ttl=30) as first:
        await first.acquire("t", ["acct/1"])
        token = first.fencing_token("t")
        assert token is not None and token >= 1
        status, _ = daemon.api("DELETE", f"/v1/locks/leases/{first.lease}")  # "lost"
        assert status == 200
        async with await RemoteLocks.open(daemon.pool, ttl=30) as second:
            await second.acquire("t", ["acct/1"], timeout=5)
            newer = second.fencing_token("t")
            assert newer is not None and newer > token
            with pytest.raises(LeaseGone, match=first.lease):
                await first.keepalive()
            with pytest.raises(LeaseGone, match=first.lease):
                await first.release("t")
            with pytest.raises(LeaseGone, match=first.lease):
                await first.acquire("u", ["acct/2"])
            assert first.fencing_token("t") is None
            assert await second.release("t") == ["acct/1"]
            assert second.fencing_token("t") is None


async def test_the_transaction_context_carries_the_fencing_token() -> None:
    from tests.test_coordinator import Fixture

    f = Fixture(workers=2)
    seen: list[int | None] = []

    async def body(ctx: TxnContext) -> None:
        seen.append(ctx.fencing_token)
        await asyncio.sleep(0.001)

    async with f.coordinator as c:
        for _ in range(5):
            await asyncio.wait_for(c.run(Transaction(["acct/1", "acct/2"], body)), 10)
    assert all(t is not None for t in seen)
    assert seen == sorted(seen) and len(set(seen)) == 5  # type: ignore[type-var]


def test_the_fencing_token_is_documented(daemon: Daemon) -> None:
    status, spec = daemon.api("GET", "/v1/openapi.json")
    assert status == 200
    answer = spec["paths"]["/v1/locks/leases/{lease}/acquire"]["post"]["responses"]
    assert "fencing_token" in answer["200"]["content"]["application/json"]["schema"][
        "properties"]
    assert "410" in answer
    readme = (REPO / "README.md").read_text()
    assert "fencing token" in readme and "410" in readme


def test_the_fence_file_never_goes_back(tmp_path: Path) -> None:
    path = tmp_path / "applocks.fence"
    fence = FenceFile(path, block=4)
    first = [fence.next() for _ in range(6)]
    assert first == [1, 2, 3, 4, 5, 6]
    # A restart (even after a crash that lost the unsynced rest) starts above the block.
    again = FenceFile(path, block=4)
    assert again.next() > max(first)
    later = [again.next() for _ in range(10)]
    assert FenceFile(path).next() > max(later)
    # A damaged file cannot prove its mark: continue from the wall clock, far above any count.
    path.write_bytes(b"owm-applock-fence 1 99 deadbeef\n")
    assert FenceFile(path).next() > 10**15


# ---------------------------------------------------------------------------- issue 18, item 4


async def test_a_short_lease_opened_after_a_long_one_is_reaped(daemon: Daemon) -> None:
    """Nobody calls in while the long lease waits: only the reaper can free the lock."""
    status, long_lease = daemon.api("POST", "/v1/locks/leases", {"ttl": 600})
    status, short = daemon.api("POST", "/v1/locks/leases", {"ttl": 0.3})
    assert status == 201
    status, _ = daemon.api("POST", f"/v1/locks/leases/{short['lease']}/acquire",
                           {"owner": "dead", "names": ["acct/3"]})
    assert status == 200
    status, body = await asyncio.to_thread(
        daemon.api, "POST", f"/v1/locks/leases/{long_lease['lease']}/acquire",
        {"owner": "t", "names": ["acct/3"], "timeout": 8})
    assert status == 200, body
    status, locks = daemon.api("GET", "/v1/locks")
    assert locks["expired_leases"] == 1


async def test_expiry_follows_keepalives_and_no_call_scans_every_lease() -> None:
    now = [0.0]
    service = LockService(clock=lambda: now[0])

    class Counting(dict[str, Any]):
        scans = 0

        def values(self) -> Any:
            Counting.scans += 1
            return super().values()

        def items(self) -> Any:
            Counting.scans += 1
            return super().items()

        def __iter__(self) -> Any:
            Counting.scans += 1
            return super().__iter__()

    leases = [service.open_lease(ttl=10)["lease"] for _ in range(200)]
    service._leases = Counting(service._leases)
    for step in range(50):  # every lease but the first is kept alive, 50 times in 50 s
        now[0] += 1.0
        for lease in leases[1:]:
            service.keepalive(lease)
        if step == 5:
            await service.acquire(leases[7], "t", ["x"])
            assert service.release(leases[7], "t") == ["x"]
    assert Counting.scans == 0
    assert service.expired == 1  # the first one only
    with pytest.raises(LeaseGone, match="expired"):
        service.keepalive(leases[0])
    assert len(service._expiry) <= 2 * len(leases) + 64
    service.close()


# ---------------------------------------------------------------------------- issue 18, smaller


def test_durations_beyond_their_limits_are_one_sentence(daemon: Daemon) -> None:
    huge = int("9" * 401)
    status, body = daemon.api("POST", "/v1/locks/leases", {"ttl": huge})
    assert status == 400 and "ttl" in body["error"]
    status, lease = daemon.api("POST", "/v1/locks/leases", {"ttl": 30})
    path = f"/v1/locks/leases/{lease['lease']}/acquire"
    for timeout in (huge, -huge, 1e308, 86401):
        status, body = daemon.api("POST", path, {"owner": "t", "names": ["a"],
                                                 "timeout": timeout})
        assert status == 400 and "timeout" in body["error"], (timeout, body)
    assert daemon.api("POST", path, {"owner": "t", "names": ["a"], "timeout": 86400})[0] == 200


def test_owner_and_label_lengths_are_bounded(daemon: Daemon) -> None:
    status, body = daemon.api("POST", "/v1/locks/leases", {"label": "x" * 100_000})
    assert status == 400 and "label" in body["error"]
    status, lease = daemon.api("POST", "/v1/locks/leases", {"ttl": 30, "label": "l" * 256})
    assert status == 201
    path = f"/v1/locks/leases/{lease['lease']}/acquire"
    status, body = daemon.api("POST", path, {"owner": "o" * 100_000, "names": ["a"]})
    assert status == 400 and "owner" in body["error"]
    assert daemon.api("POST", path, {"owner": "o" * 256, "names": ["a"]})[0] == 200


def test_the_number_of_leases_is_capped(daemon: Daemon) -> None:
    opened = []
    for _ in range(MAX_LEASES):
        status, body = daemon.api("POST", "/v1/locks/leases", {"ttl": 60})
        assert status == 201, body
        opened.append(body["lease"])
    status, body = daemon.api("POST", "/v1/locks/leases", {"ttl": 60})
    assert status == 429 and "close leases" in body["error"]
    assert daemon.api("DELETE", f"/v1/locks/leases/{opened[0]}")[0] == 200
    assert daemon.api("POST", "/v1/locks/leases", {"ttl": 60})[0] == 201


async def test_owners_and_locks_are_capped() -> None:
    service = LockService(max_owners_per_lease=3, max_owners=5, max_locks=8)
    one = service.open_lease(ttl=30)["lease"]
    two = service.open_lease(ttl=30)["lease"]
    for i in range(3):
        await service.acquire(one, f"t{i}", [f"a{i}"])
    with pytest.raises(LockLimit, match="one lease"):
        await service.acquire(one, "t3", ["b"])
    await service.acquire(two, "u0", ["b0"])
    with pytest.raises(LockLimit, match="at most 8"):
        await service.acquire(two, "u1", [f"c{i}" for i in range(5)])
    await service.acquire(two, "u1", ["b1"])
    with pytest.raises(LockLimit, match="transactions already hold"):
        await service.acquire(two, "u2", ["b2"])
    # A refusal leaves nothing behind, and giving back makes room again.
    assert service.space.owners() == [f"{one}/t{i}" for i in range(3)] + [
        f"{two}/u0", f"{two}/u1"]
    service.release(one, "t0")
    await service.acquire(one, "t3", ["b"])
    service.close()


def test_the_largest_documented_acquire_fits_the_body_limit(daemon: Daemon) -> None:
    status, lease = daemon.api("POST", "/v1/locks/leases", {"ttl": 60})
    path = f"/v1/locks/leases/{lease['lease']}"
    # 1024 names of 256 characters, each escaped by JSON as up to 12 bytes: about 3 MB.
    names = [f"{i:04d}" + ("é𝔄" * 126) for i in range(MAX_LOCKS_PER_OWNER)]
    assert all(len(n) == MAX_NAME for n in names)
    status, body = daemon.api("POST", path + "/acquire", {"owner": "big", "names": names})
    assert status == 200, body
    assert len(body["names"]) == MAX_LOCKS_PER_OWNER
    status, body = daemon.api("POST", path + "/release", {"owner": "big"})
    assert status == 200 and len(body["released"]) == MAX_LOCKS_PER_OWNER
    # Beyond the limits: a sentence each, and a body no valid request needs is 413.
    status, body = daemon.api("POST", path + "/acquire",
                              {"owner": "big", "names": [*names, "one more"]})
    assert status == 400 and str(MAX_LOCKS_PER_OWNER) in body["error"]
    status, body = daemon.api("POST", path + "/acquire",
                              {"owner": "big", "names": ["é" * (MAX_NAME + 1)]})
    assert status == 400 and str(MAX_NAME) in body["error"]
    status, body = daemon.api("POST", path + "/acquire",
                              {"owner": "big", "names": ["x"], "pad": "p" * (4 << 20)})
    assert status == 413 and "too large" in body["error"]
