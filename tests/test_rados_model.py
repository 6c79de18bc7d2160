"""The hypothesis state machine of test_pool_model.py, over RadosStorage on the real cluster.

Every engine, with a small budget. The crash step is a kill (the pool abandoned as by SIGKILL,
the RADOS connection dropped) and a reopen from RADOS alone: RADOS keeps every acknowledged
write, so what is checked is that owm keeps its own promises on top of it (every byte written
with FUA or covered by a flush is there, drained images unchanged, the views equal the model).
"""

from __future__ import annotations

import shutil
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test
from test_pool_model import SIZE, PoolMachine

from owm.pool.pool import Pool
from owm.storage.rados import MIN_STRIPE, RadosBackend
from owm.testbed.ceph import CephCluster

BUDGET = settings(max_examples=12, stateful_step_count=30, deadline=None,
                  suppress_health_check=list(HealthCheck))


class RadosMachine(PoolMachine):
    cluster: CephCluster

    def __init__(self) -> None:
        self.namespace = f"model-{uuid.uuid4().hex[:12]}"
        self.backend: RadosBackend | None = None
        super().__init__()

    async def _open(self) -> Pool:
        self.backend = await RadosBackend.open(self.cluster.conf_path, self.cluster.pool,
                                               self.namespace, MIN_STRIPE)
        return await Pool.open(self.dir, storage_factory=self.backend.storage)

    async def _drop_backend(self) -> None:
        if self.backend is not None:
            await self.backend.close()
            self.backend = None

    @rule(how=st.sampled_from(["clean", "kill"]))
    def restart(self, how: str) -> None:  # type: ignore[override]
        if how == "clean":
            self.run(self.pool.close())
            self.run(self._drop_backend())
            self._sessions_vanish()
            self.pool = self.run(self._open())
            for mask in self.uncertain.values():
                mask[:] = bytes(SIZE)
            self._forget_drained()
            return
        self.run(self.pool.kill())
        self.run(self._drop_backend())
        self._sessions_vanish()
        self.pool = self.run(self._open())
        for gen in list(self.model.views):
            got = self.run(self._read_view(gen))
            want, mask = self.model.views[gen], self.uncertain[gen]
            for i in range(SIZE):
                if not mask[i]:
                    assert got[i] == want[i], f"view {gen} byte {i}: {got[i]}, durable {want[i]}"
            self.model.views[gen][:] = got
            mask[:] = bytes(SIZE)
        self._forget_drained()

    def teardown(self) -> None:
        try:
            self.run(self.pool.close())
            self.run(self._drop_backend())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("method", ["cow", "log", "mirror"])
def test_model_over_rados(ceph: CephCluster, method: str) -> None:
    machine = type(f"Rados{method.title()}Machine", (RadosMachine,),
                   {"method": method, "cluster": ceph})
    run_state_machine_as_test(machine, settings=BUDGET)
