"""A real etcd on loopback for the tests: one per session, or a private one a test may restart.

Without Debian's ``etcd-server`` the tests that need it skip with one line, except under CI
(``CI`` set), where a missing etcd is a failure: CI must run them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from owm.testbed.etcd import EtcdServer, EtcdUnavailable, etcd_binary, start

MISSING = "etcd is not installed (Debian package etcd-server; scripts/setup installs it)"


def _need_etcd() -> None:
    if etcd_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING + "; CI must run the etcd tests", pytrace=False)
        pytest.skip(MISSING)


def _start(**kwargs: int) -> EtcdServer:
    try:
        return start(**kwargs)
    except EtcdUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session; tests keep apart by prefix (``etcd_prefix``)."""
    _need_etcd()
    server = _start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_prefix() -> str:
    """A prefix no other test uses."""
    return f"/owm/t-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def private_etcd() -> Iterator[Callable[..., EtcdServer]]:
    """``private_etcd(quota_bytes=None)``: an etcd of the test's own, to kill or restart."""
    _need_etcd()
    servers: list[EtcdServer] = []

    def make(**kwargs: int) -> EtcdServer:
        server = _start(**kwargs)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()
