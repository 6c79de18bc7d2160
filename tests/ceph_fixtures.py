"""The throw-away Ceph cluster of the test run: one monitor and one OSD for the whole session.

Tests that need it take the ``ceph`` fixture. Without the Ceph packages they skip with one line
saying why, except under CI (``CI`` set in the environment), where a missing cluster fails them:
CI must run these tests, not skip them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from owm.testbed import ceph as testbed


@pytest.fixture(scope="session")
def ceph() -> Iterator[testbed.CephCluster]:
    why = testbed.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ceph tests, but {why}", pytrace=False)
        pytest.skip(f"no throw-away Ceph cluster: {why}")
    cluster = testbed.start()
    try:
        yield cluster
    finally:
        cluster.stop()
