"""Fault injection for application locks (issue 18, "How it must be tested").

* Lease loss at every step of an acquire: the lease is closed, or expires, while its owner is
  queued for each of its locks in turn, or just after a lock was granted to it but before the
  acquire ran again, or together with a cancellation; deterministically (a fake clock, and the
  event loop stepped until the acquire is where the step needs it).  Every time: the acquire
  fails naming the lease, nothing of the lease is held or queued, the next in line gets every
  lock, no lock has a holder that is not a live owner, release says the lease is gone.
* Daemon restarts: a real ``owm serve`` killed with SIGKILL while one client holds locks and
  another waits for them, restarted on the same pool, three times: the old lease ids are
  refused, one holder per lock, fencing tokens keep growing.
* A worker process frozen with SIGSTOP past its ttl: another takes its lock; on SIGCONT its
  next call learns that its lease is gone, and its fencing token is below the new holder's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from owm.common.errors import OwmError
from owm.control.lock_client import RemoteLocks
from owm.locks.app import Grant, LeaseGone, LockService
from tests.conftest import REPO, Daemon, cli_env, start_daemon

NAMES = ["n0", "n1", "n2"]


def _check_invariants(service: LockService) -> None:
    """Every lock's holder is a live owner that lists it; every live owner is in a lease."""
    space = service.space
    owners = space._owners
    for name, lock in space._locks.items():
        if lock.holder is not None:
            assert owners.get(lock.holder.name) is lock.holder, f"{name}: dead holder"
            assert name in lock.holder.held
    for owner in owners.values():
        lease = owner.name.split("/", 1)[0]
        assert lease in service._leases, f"{owner.name} outlived its lease"
        for name in owner.held:
            assert space._locks[name].holder is owner


async def _settle(service: LockService) -> None:
    """Let every task that can run, run (a bounded number of loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)
    _check_invariants(service)


STEPS = [(step, moment) for step in range(len(NAMES)) for moment in
         ("queued", "granted", "cancelled")] + [(len(NAMES), "held")]


@pytest.mark.parametrize("how", ["close", "expire"])
@pytest.mark.parametrize(("step", "moment"), STEPS)
async def test_lease_loss_at_every_step_of_acquire(how: str, step: int, moment: str) -> None:
    now = [0.0]
    service = LockService(clock=lambda: now[0])
    holders = service.open_lease(ttl=1000)["lease"]
    for i, name in enumerate(NAMES):
        await service.acquire(holders, f"h{i}", [name])
    doomed = service.open_lease(ttl=10)["lease"]
    rival_lease = service.open_lease(ttl=1000)["lease"]
    victim = asyncio.create_task(service.acquire(doomed, "t", NAMES, timeout=60))
    await _settle(service)
    rival = asyncio.create_task(service.acquire(rival_lease, "q", NAMES, timeout=60))
    await _settle(service)
    assert service.space.waiting("n0") == [f"{doomed}/t", f"{rival_lease}/q"]

    # Lead the victim to the step: it holds n0 .. n(step-1) and is queued for n(step).
    for i in range(step):
        service.release(holders, f"h{i}")
        await _settle(service)
        assert service.space.holder(f"n{i}") == f"{doomed}/t"
    if step < len(NAMES):
        assert service.space.waiting(f"n{step}")[0] == f"{doomed}/t"
    else:
        assert victim.done()
        grant = victim.result()
        assert isinstance(grant, Grant)

    if moment in ("granted", "cancelled"):
        # The grant is on its way to the victim, which has not run since.
        service.release(holders, f"h{step}")
        assert service.space.holder(f"n{step}") == f"{doomed}/t" and not victim.done()
    if moment == "cancelled":
        victim.cancel()  # its client hung up in the same instant

    if how == "close":
        service.close_lease(doomed)
    else:
        now[0] += 11  # the doomed lease was not kept alive; the others were long
        service.reap()  # what the reaper's timer does
    _check_invariants(service)

    if step < len(NAMES):
        expected: type[BaseException] = (
            asyncio.CancelledError if moment == "cancelled" else LeaseGone
        )
        with pytest.raises(expected) as caught:
            await asyncio.wait_for(victim, 5)
        if expected is LeaseGone:
            assert doomed in str(caught.value)
    for entry in service.status()["locks"]:
        assert not str(entry["holder"]).startswith(doomed)
        assert not any(w.startswith(doomed) for w in entry["waiting"])
    with pytest.raises(LeaseGone, match=doomed):
        service.release(doomed, "t")
    with pytest.raises(LeaseGone, match=doomed):
        await service.acquire(doomed, "t2", ["n0"])

    # The next in line gets every lock once the holders let go: one holder each.
    for i in range(len(NAMES)):
        service.release(holders, f"h{i}")
        await _settle(service)
    got = await asyncio.wait_for(rival, 5)
    assert all(service.space.holder(name) == f"{rival_lease}/q" for name in NAMES)
    if step == len(NAMES):
        assert got.fencing_token > grant.fencing_token
    assert service.space.owners() == [f"{rival_lease}/q"]
    service.close()
    assert service.space.snapshot() == []


async def test_lease_loss_while_an_owner_waits_for_its_own_lease() -> None:
    """The issue's trigger: two owners of one lease, one waiting for the other's lock."""
    service = LockService()
    lease = service.open_lease(ttl=30)["lease"]
    await service.acquire(lease, "o1", ["m"])
    second = asyncio.create_task(service.acquire(lease, "o2", ["a", "m", "z"], timeout=30))
    await _settle(service)
    assert service.space.holder("a") == f"{lease}/o2"
    assert service.close_lease(lease) == ["a", "m"]
    with pytest.raises(LeaseGone, match=lease):
        await asyncio.wait_for(second, 5)
    assert service.space.snapshot() == [] and service.space.owners() == []
    service.close()


# ---------------------------------------------------------------------------- daemon restarts


async def _until(predicate: Any, what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    for _ in range(int(limit / 0.05) + 1):
        if await predicate():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _learns_gone(locks: RemoteLocks) -> None:
    """The next calls of an old client say its lease is gone (after at most a stale socket)."""
    for _ in range(5):
        try:
            await locks.keepalive()
        except LeaseGone as exc:
            assert locks.lease in str(exc)
            return
        except OwmError:  # a pooled connection to the killed daemon
            await asyncio.sleep(0.05)
    raise AssertionError(f"{locks.lease} was not reported gone")


async def test_daemon_killed_and_restarted_while_holders_wait(short_tmp: Path) -> None:
    pool = short_tmp / "pool"
    daemon = start_daemon(pool)
    tokens: list[int] = []
    leases: set[str] = set()
    clients: list[RemoteLocks] = []
    try:
        for round_ in range(3):
            holder = await RemoteLocks.open(pool, ttl=30, label=f"holder {round_}")
            waiter = await RemoteLocks.open(pool, ttl=30, label=f"waiter {round_}")
            clients += [holder, waiter]
            assert not {holder.lease, waiter.lease} & leases
            leases |= {holder.lease, waiter.lease}
            await holder.acquire("h", ["acct/1", "acct/2"], timeout=10)
            token = holder.fencing_token("h")
            assert token is not None and all(token > t for t in tokens)
            tokens.append(token)
            waiting = asyncio.create_task(waiter.acquire("w", ["acct/2"], timeout=60))

            async def queued(holder: RemoteLocks = holder, waiter: RemoteLocks = waiter) -> bool:
                status = await holder.status()
                return any(f"{waiter.lease}/w" in e["waiting"] for e in status["locks"])

            await _until(queued, "the waiter to queue")
            daemon.stop(signal.SIGKILL)
            with pytest.raises(OwmError):
                await asyncio.wait_for(waiting, 30)
            daemon = start_daemon(pool)

            for old in (holder, waiter):
                await _learns_gone(old)
                with pytest.raises(LeaseGone, match=old.lease):
                    await old.release("h")
                with pytest.raises(LeaseGone):
                    await old.acquire("again", ["acct/1"])
                assert old.fencing_token("h") is None
            for old_lease in leases:  # every id of every earlier run is refused
                status, body = daemon.api("POST", f"/v1/locks/leases/{old_lease}/acquire",
                                          {"owner": "x", "names": ["acct/1"]})
                assert status == 410 and old_lease in body["error"]

            async with await RemoteLocks.open(pool, ttl=30, label="new") as fresh:
                assert fresh.lease not in leases
                await fresh.acquire("f", ["acct/1", "acct/2"], timeout=5)
                token = fresh.fencing_token("f")
                assert token is not None and token > max(tokens)
                tokens.append(token)
                status = await fresh.status()
                assert {e["name"]: e["holder"] for e in status["locks"]} == {
                    "acct/1": f"{fresh.lease}/f", "acct/2": f"{fresh.lease}/f"}
                assert [entry["lease"] for entry in status["leases"]] == [fresh.lease]
            for old in (holder, waiter):
                await old.close()
            clients.clear()
    finally:
        for client in clients:
            await client.close()
        daemon.stop()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


# ---------------------------------------------------------------------------- SIGSTOP


FROZEN_WORKER = r"""
import asyncio, sys
from pathlib import Path
from owm.control.lock_client import RemoteLocks
from owm.locks.app import LeaseGone

async def main():
    locks = await RemoteLocks.open(Path(sys.argv[1]), ttl=float(sys.argv[2]), label="frozen")
    await locks.acquire("t", ["acct/1"], timeout=30)
    print("held", locks.lease, locks.fencing_token("t"), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    try:
        await locks.release("t")
        print("released", flush=True)
    except LeaseGone as exc:
        print("gone", exc, flush=True)
    await locks.close()

asyncio.run(main())
"""


async def test_a_worker_frozen_past_its_ttl_learns_its_lease_is_gone(daemon: Daemon) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", FROZEN_WORKER, str(daemon.pool), "0.6"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=cli_env(), cwd=REPO,
    )
    assert worker.stdout is not None and worker.stdin is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 60)
        word, lease, token = line.split()
        assert word == "held", line
        worker.send_signal(signal.SIGSTOP)

        def lease_gone() -> bool:
            status, body = daemon.api("GET", "/v1/locks")
            return status == 200 and lease not in {e["lease"] for e in body["leases"]}

        async def gone() -> bool:
            return await asyncio.to_thread(lease_gone)

        await _until(gone, "the frozen worker's lease to expire")
        async with await RemoteLocks.open(daemon.pool, ttl=30, label="next") as locks:
            await locks.acquire("n", ["acct/1"], timeout=10)
            newer = locks.fencing_token("n")
            assert newer is not None and int(token) < newer
            worker.send_signal(signal.SIGCONT)
            worker.stdin.write("\n")
            worker.stdin.flush()
            out, err = await asyncio.to_thread(worker.communicate, timeout=60)
            assert worker.returncode == 0, err
            assert out.startswith("gone") and lease in out, (out, err)
            # The frozen worker's late release took nothing from the new holder.
            _, body = daemon.api("GET", "/v1/locks")
            assert [(e["name"], e["holder"]) for e in body["locks"]] == [
                ("acct/1", f"{locks.lease}/n")]
            assert await locks.release("n") == ["acct/1"]
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGCONT)
            worker.kill()
            worker.communicate(timeout=10)
