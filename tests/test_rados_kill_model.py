"""The reference model against a real ``owm serve`` on RADOS and etcd, SIGKILL as the crash step.

A hypothesis state machine drives a daemon subprocess whose data lives in the throw-away Ceph
cluster and whose catalog lives in the throw-away etcd, through its real interfaces only: NBD
sessions (opened, written with and without FUA, flushed, ended cleanly or aborted), the control
API over its socket (preserve, release, the labels) and the process itself (SIGKILL, restart).
After every step every view, the live volume and each ``vol@N``, read over NBD, must equal the
model (owm/pool/model.py), and each image's label must be the one the model predicts: draining
while a session of its generation or older is open, then drained, or drained-unclean (and
crash-consistent) once one of them ended without a clean disconnect, a daemon kill included.

After a kill only the promises count: a byte written with FUA, or covered by an acknowledged
flush, or part of an image that drained before the kill, must read as written; a byte written
since without FUA may hold its durable value or any value written there since (each byte on its
own, so any mix of sectors old and new). Some kills come with writes still in flight.

Small on purpose (a daemon start is about a second): a few examples of short sequences per
method, bounded in steps and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import start_daemon
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from owm.nbd.client import NbdClient, NbdError
from owm.pool.model import Model
from owm.testbed.ceph import CephCluster
from owm.testbed.etcd import EtcdServer

CHUNK = 4096
SIZE = 4 * CHUNK
SETTLE = 10.0  # seconds the daemon may take to notice a session's end

# No shrinking: each step costs real processes, and a failing sequence is printed as it ran.
BUDGET = settings(max_examples=2, stateful_step_count=14, deadline=None,
                  phases=[Phase.explicit, Phase.reuse, Phase.generate],
                  suppress_health_check=list(HealthCheck))

offsets = st.one_of(st.integers(0, SIZE - 1),
                    st.integers(0, SIZE // CHUNK - 1).map(lambda c: c * CHUNK))
lengths = st.one_of(st.integers(1, 700), st.integers(1, 2 * CHUNK), st.just(CHUNK))
_run_ids = itertools.count()


class KillMachine(RuleBasedStateMachine):
    method = "cow"
    ceph: CephCluster
    etcd: EtcdServer
    root: Path

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool = self.root / f"p{next(_run_ids)}"
        self.args = ["--ceph-conf", str(self.ceph.conf_path), "--rados-pool", self.ceph.pool,
                     "--etcd", self.etcd.url, "--etcd-prefix", f"/owm/kill-{uuid.uuid4().hex}/"]
        self.daemon = start_daemon(self.pool, *self.args)
        self.api("POST", "/v1/volumes", {"name": "vol", "size": SIZE, "method": self.method,
                                         "chunk_size": CHUNK, "legs": 3})
        self.model = Model(SIZE)
        self.sessions: dict[int, NbdClient] = {}
        self.next_id = 0
        # Per view: what a crash must keep, and per byte the other values it may keep instead.
        self.durable: dict[int, bytearray] = {0: bytearray(SIZE)}
        self.maybe: dict[int, dict[int, set[int]]] = {0: {}}
        # Per preserved image: how many of the sessions holding it up ended unclean.
        self.unclean: dict[int, int] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, answer = self.daemon.api(method, path, body)
        assert status < 300, (method, path, status, answer)
        return answer

    def teardown(self) -> None:
        try:
            for client in self.sessions.values():
                self._abort(client)
            self.sessions.clear()
            code = self.daemon.stop()
            assert code == 0, f"owm serve exited with {code}:\n{self.daemon.log_text()}"
        finally:
            self.daemon.stop(signal.SIGKILL)
            self.loop.close()

    # -- the model's bookkeeping -------------------------------------------------------------
    def _written(self, gen: int, offset: int, data: bytes, fua: bool) -> None:
        self.model.write(gen, offset, data)
        for view in self.model.views:
            if view < gen:
                continue
            durable, maybe = self.durable[view], self.maybe[view]
            if fua:
                durable[offset:offset + len(data)] = data
            for i in range(offset, offset + len(data)):
                if fua:
                    maybe.pop(i, None)
                else:
                    maybe.setdefault(i, set()).add(data[i - offset])

    def _all_durable(self, view: int) -> None:
        self.durable[view][:] = self.model.views[view]
        self.maybe[view].clear()

    def _session_ended(self, sid: int, clean: bool, crash: bool = False) -> None:
        gen = self.model.sessions[sid]
        if not clean:
            for image in self.unclean:
                if image >= gen and not self.model.drained(image):
                    self.unclean[image] += 1
        self.model.close_session(sid)
        if not crash:  # an image drained by a crash was not made durable by a drain
            self._forget_drained()

    def _forget_drained(self) -> None:
        # An image that drained (a clean end of its last session) was made durable then.
        for gen in self.model.views:
            if self.model.drained(gen):
                self._all_durable(gen)

    # -- sessions ----------------------------------------------------------------------------
    @precondition(lambda self: len(self.sessions) < 3)
    @rule()
    def open_session(self) -> None:
        client = self.run(NbdClient.connect(export="vol", unix_path=str(self.daemon.nbd_socket)))
        self.next_id += 1
        self.model.open_session(self.next_id)
        self.sessions[self.next_id] = client

    def _pick(self, data: st.DataObject) -> tuple[int, NbdClient]:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        return sid, self.sessions[sid]

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), clean=st.booleans())
    def close_session(self, data: st.DataObject, clean: bool) -> None:
        sid, client = self._pick(data)
        del self.sessions[sid]
        if clean:
            self.run(client.disconnect())
        else:
            self._abort(client)
        self._session_ended(sid, clean)

    def _abort(self, client: NbdClient) -> None:
        client.abort()
        self.run(asyncio.sleep(0))  # its reader task, cancelled, ends
    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), offset=offsets, length=lengths, fua=st.booleans(),
          fill=st.integers(1, 255))
    def write(self, data: st.DataObject, offset: int, length: int, fua: bool, fill: int) -> None:
        sid, client = self._pick(data)
        length = min(length, SIZE - offset)
        payload = bytes([fill]) * length
        self.run(client.write(offset, payload, fua=fua))
        self._written(self.model.sessions[sid], offset, payload, fua)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        _, client = self._pick(data)
        self.run(client.flush())
        for view in self.model.views:
            self._all_durable(view)

    # -- images ------------------------------------------------------------------------------
    @precondition(lambda self: self.method != "mirror" or len(self.model.views) < 3)
    @rule()
    def preserve(self) -> None:
        answer = self.api("POST", "/v1/volumes/vol/preserve", {"instant": False})
        gen = self.model.preserve()
        assert answer["image"] == f"vol@{gen}", answer
        self.unclean[gen] = 0
        self.durable[self.model.live] = bytearray(self.durable[gen])
        self.maybe[self.model.live] = {i: set(v) for i, v in self.maybe[gen].items()}
        self._forget_drained()

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        drained = [g for g in self.model.views if self.model.drained(g)]
        if not drained:
            return
        gen = data.draw(st.sampled_from(drained))
        self.api("POST", f"/v1/images/vol@{gen}/release")
        self.model.release(gen)
        del self.durable[gen], self.maybe[gen], self.unclean[gen]

    # -- the crash ---------------------------------------------------------------------------
    @rule(data=st.data(), last=st.integers(0, 4))
    def kill_and_restart(self, data: st.DataObject, last: int) -> None:
        """SIGKILL the daemon right after a few last writes, and start it again.

        Each last write is with FUA or not, and waited for or left in flight: the kill comes
        as soon as the last one waited for is acknowledged, before the daemon has time to
        tidy up (a write-back, a table commit) behind it.
        """
        sent: list[asyncio.Future[None]] = []
        for _ in range(last if self.sessions else 0):
            sid, client = self._pick(data)
            offset = data.draw(offsets)
            length = min(data.draw(lengths), SIZE - offset)
            payload = bytes([data.draw(st.integers(1, 255))]) * length
            fua, wait = data.draw(st.booleans()), data.draw(st.booleans())
            gen = self.model.sessions[sid]
            if wait:
                self.run(client.write(offset, payload, fua=fua))
                self._written(gen, offset, payload, fua)
            else:
                sent.append(asyncio.ensure_future(client.write(offset, payload, fua=fua),
                                                  loop=self.loop))
                # Acknowledged or not, nothing made it durable: the crash may keep it or not.
                self._written(gen, offset, payload, fua=False)
        if sent:
            self.run(asyncio.sleep(0))  # let them go out
        draining = [g for g in self.unclean if not self.model.drained(g)]
        event(f"kill: {len(sent)} in flight, {len(self.sessions)} sessions, "
              f"{len(draining)} draining")
        assert self.daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        for sid, client in list(self.sessions.items()):
            self._abort(client)
            self._session_ended(sid, clean=False, crash=True)
        self.sessions.clear()
        for fut in sent:
            with contextlib.suppress(NbdError, OSError, asyncio.CancelledError):
                self.run(fut)
        self.daemon = start_daemon(self.pool, *self.args)
        for view in list(self.model.views):
            got = self.run(self._read_view(view))
            durable, maybe = self.durable[view], self.maybe[view]
            for i in range(SIZE):
                if got[i] != durable[i]:
                    assert got[i] in maybe.get(i, ()), (
                        f"{self.method}: view {view} byte {i} is {got[i]} after the kill; "
                        f"{durable[i]} was durable, {sorted(maybe.get(i, ()))} possible")
            self.model.views[view][:] = got
            self._all_durable(view)

    # -- checks ------------------------------------------------------------------------------
    async def _read_view(self, view: int) -> bytes:
        export = "vol" if view == self.model.live else f"vol@{view}"
        client = await NbdClient.connect(export=export, unix_path=str(self.daemon.nbd_socket))
        try:
            return await client.read(0, SIZE)
        finally:
            await client.disconnect()

    def _labels(self) -> dict[int, tuple[str, int, str]]:
        images = self.api("GET", "/v1/volumes/vol")["images"]
        return {i["generation"]: (i["state"], i["unclean_sessions"], i["consistency"])
                for i in images}

    def _expected_labels(self) -> dict[int, tuple[str, int, str]]:
        out = {}
        for gen, unclean in self.unclean.items():
            if not self.model.drained(gen):
                # An unclean end is counted at once, and the image can no longer end better
                # than crash-consistent: the label says so while it still drains.
                out[gen] = ("draining", unclean,
                            "crash-consistent" if unclean else "transaction-consistent")
                continue
            out[gen] = ("drained-unclean" if unclean else "drained", unclean,
                        "crash-consistent" if unclean else "transaction-consistent")
        return out

    @invariant()
    def views_and_labels_match_the_model(self) -> None:
        want = self._expected_labels()
        # The daemon learns of an aborted session when its socket closes: give it a moment.
        deadline = time.monotonic() + SETTLE
        got = self._labels()
        while got != want and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self._labels()
        assert got == want, f"{self.method}: labels {got}, the model says {want}"
        for view in self.model.views:
            assert self.run(self._read_view(view)) == bytes(self.model.views[view]), (
                f"{self.method}: view {view}")


@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
def test_model_over_a_killed_daemon_on_rados_and_etcd(method: str, ceph: CephCluster,
                                                      etcd_server: EtcdServer,
                                                      short_tmp: Path) -> None:
    machine = type(f"Kill{method.title()}Machine", (KillMachine,),
                   {"method": method, "ceph": ceph, "etcd": etcd_server, "root": short_tmp})
    run_state_machine_as_test(machine, settings=BUDGET)
