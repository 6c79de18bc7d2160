"""Group commit: syncs are shared, never skipped, never reordered, and failures reach callers."""

from __future__ import annotations

import asyncio
import gc

import pytest

from owm.engine.groupsync import GroupSync


async def test_callers_share_syncs_but_each_gets_one_that_started_after_it() -> None:
    log: list[tuple[str, int]] = []
    writes = 0

    async def sync() -> None:
        seen = writes
        log.append(("start", seen))
        await asyncio.sleep(0.01)
        log.append(("end", seen))

    gs = GroupSync(sync)
    covered: list[bool] = []

    async def writer() -> None:
        nonlocal writes
        writes += 1
        mine = writes
        await gs()
        # The last sync that ended saw at least my write.
        covered.append(max(s for kind, s in log if kind == "end") >= mine)

    await asyncio.gather(*(writer() for _ in range(20)))
    assert all(covered)
    assert gs.count < 20  # shared
    starts = [i for i, (kind, _) in enumerate(log) if kind == "start"]
    assert all(log[i + 1][0] == "end" for i in starts)  # never two at once


async def test_a_failed_sync_reaches_its_callers_and_the_next_one_runs() -> None:
    calls = 0

    async def sync() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.005)
        if calls == 2:
            raise OSError("disk gone")

    gs = GroupSync(sync)
    results = await asyncio.gather(*(gs() for _ in range(5)), return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, OSError) for r in results[1:])
    await gs()  # the machinery recovers
    assert calls == 3


async def test_a_lone_caller_syncs_inline() -> None:
    gs = GroupSync(lambda: asyncio.sleep(0))
    for _ in range(3):
        await gs()
    assert gs.count == 3
    with pytest.raises(ZeroDivisionError):
        await GroupSync(lambda: asyncio.sleep(1 / 0))()


async def test_a_failed_sync_whose_followers_are_gone_is_not_reported_as_never_retrieved() -> None:
    """Followers cancelled while they waited (a session torn down, a crash in the tests): the
    next sync's failure reaches no one, and asyncio must not log it as an unretrieved error."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    gate = asyncio.Event()
    calls = 0

    async def sync() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        else:
            raise OSError("the disk went away")

    group = GroupSync(sync)
    leader = asyncio.ensure_future(group())
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(group())
    await asyncio.sleep(0)
    follower.cancel()
    gate.set()
    await leader
    for _ in range(5):  # the second sync runs and fails, with no one waiting for it
        await asyncio.sleep(0)
    assert calls == 2
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not unhandled, unhandled
