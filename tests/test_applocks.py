"""Application locks: FIFO, mutual exclusion, all-or-nothing, no deadlock, leases, and the same
lock space shared by several processes through the daemon (with a counter on a real volume
that only stays right if the locks exclude each other across processes)."""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from owm.common.errors import InvalidRequest, Timeout, WrongState
from owm.control.client import ControlClient
from owm.control.lock_client import RemoteLocks
from owm.locks.app import LeaseGone, LockService, LockSpace, lock_names
from owm.nbd.client import NbdClient
from tests.conftest import REPO, Daemon, cli_env

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
