"""Prometheus metrics of a real daemon after a known workload of real NBD clients.

The counters (never timings) must say exactly what was done: requests and bytes per kind,
copy-on-write copies, sessions per generation and their unclean ends, images by state, the
reads of a preserved image by a backup-like reader. The text is parsed with prometheus_client's
own parser, on the control socket and on the read-only ``--metrics-listen`` listener.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from owm.nbd.client import NbdClient
from tests.conftest import Daemon, UnixHTTPConnection, start_daemon

K = 1024
CHUNK = 64 * K
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(conn: http.client.HTTPConnection, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(daemon: Daemon) -> Samples:
    status, ctype, text = fetch(UnixHTTPConnection(daemon.control_socket))
    assert status == 200, text
    assert ctype.startswith("text/plain")
    return parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def ops(samples: Samples, volume: str, op: str) -> tuple[float, float, float]:
    """(requests, bytes, histogram count) of one kind of request."""
    return (value(samples, "owm_volume_requests_total", volume=volume, op=op),
            value(samples, "owm_volume_request_bytes_total", volume=volume, op=op),
            value(samples, "owm_volume_request_seconds_count", volume=volume, op=op))


@pytest.fixture
def metrics_daemon(short_tmp: Path) -> Any:
    d = start_daemon(short_tmp / "pool", "--metrics-listen", "127.0.0.1:0")
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_text()


async def session(daemon: Daemon, export: str) -> NbdClient:
    return await NbdClient.connect(export=export, unix_path=str(daemon.nbd_socket))


def test_counters_follow_a_known_workload(metrics_daemon: Daemon, hold_session: Any) -> None:
    d = metrics_daemon
    assert d.owm("volume", "create", "v", "--size", "4M", "--chunk-size", "64K").returncode == 0

    async def before_preserve() -> NbdClient:
        old = await session(d, "v")
        for i in range(3):
            await old.write(i * CHUNK, bytes([i + 1]) * CHUNK)
        await old.flush()
        await old.read(0, CHUNK)
        await old.read(CHUNK, CHUNK)
        return old

    loop = asyncio.new_event_loop()
    try:
        old = loop.run_until_complete(before_preserve())
        preserved = d.owm("preserve", "v")
        assert preserved.returncode == 0 and preserved.stdout.strip() == "v@0", preserved.stderr
        new = loop.run_until_complete(session(d, "v"))
        # A new-generation write over two chunks the image shares: two copies aside.
        loop.run_until_complete(new.write(0, b"n" * (2 * CHUNK)))

        s = scrape(d)
        assert ops(s, "v", "read") == (2, 2 * CHUNK, 2)
        assert ops(s, "v", "write") == (4, 5 * CHUNK, 4)
        assert ops(s, "v", "flush")[0] == 1
        assert value(s, "owm_volume_cow_copies_total", volume="v") == 2
        assert value(s, "owm_volume_cow_copy_bytes_total", volume="v") == 2 * CHUNK
        assert value(s, "owm_volume_sessions", volume="v", generation="0") == 1
        assert value(s, "owm_volume_sessions", volume="v", generation="1") == 1
        assert value(s, "owm_volume_sessions_opened_total", volume="v") == 2
        assert value(s, "owm_volume_images", volume="v", state="draining") == 1
        assert value(s, "owm_volume_images", volume="v", state="drained") == 0
        assert value(s, "owm_image_sessions_left", volume="v", image="v@0") == 1
        assert value(s, "owm_volume_preserves_total", volume="v") == 1
        assert value(s, "owm_volume_live_generation", volume="v") == 1
        assert value(s, "owm_volume_inflight_requests", volume="v") == 0
        assert value(s, "owm_nbd_connections") == 2
        assert value(s, "owm_ready") == 1
        assert value(s, "owm_image_storage_bytes", volume="v", image="v@0") >= 2 * CHUNK
        assert value(s, "process_resident_memory_bytes") > 0

        loop.run_until_complete(old.disconnect())
        loop.run_until_complete(new.disconnect())
        assert d.owm("wait", "v@0", "--timeout", "30").returncode == 0

        async def backup_read() -> None:
            reader = await session(d, "v@0")
            assert await reader.read(0, 4 * CHUNK) == (b"\x01" * CHUNK + b"\x02" * CHUNK
                                                       + b"\x03" * CHUNK + bytes(CHUNK))
            await reader.disconnect()

        loop.run_until_complete(backup_read())
    finally:
        loop.close()

    # A session killed with SIGKILL ends unclean: counted so, with its write and flush.
    holder = hold_session(d, "v")
    holder.kill()
    deadline_scrapes = 100
    for _ in range(deadline_scrapes):
        s = scrape(d)
        if value(s, "owm_volume_sessions_unclean_total", volume="v") == 1:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert value(s, "owm_volume_sessions_unclean_total", volume="v") == 1
    assert value(s, "owm_volume_sessions_opened_total", volume="v") == 3
    assert ops(s, "v", "write") == (5, 5 * CHUNK + 4096, 5)
    assert ops(s, "v", "flush")[0] == 2
    assert ops(s, "v", "image_read") == (1, 4 * CHUNK, 1)
    assert value(s, "owm_backup_read_seconds_count", volume="v") == 1
    assert value(s, "owm_backup_read_bytes_total", volume="v") == 4 * CHUNK
    assert value(s, "owm_volume_images", volume="v", state="drained") == 1
    assert value(s, "owm_volume_images", volume="v", state="draining") == 0
    assert ("owm_volume_last_drain_seconds", frozenset({("volume", "v"), ("image", "v@0")})) in s
    assert value(s, "owm_nbd_connections_accepted_total") == 4
    assert value(s, "owm_volume_sessions", volume="v", generation="1") == 0

    # The same numbers on the read-only TCP listener, which needs no token and changes nothing.
    host, port = d.health["metrics"].rsplit(":", 1)
    status, _, text = fetch(http.client.HTTPConnection(host, int(port), timeout=30))
    assert status == 200
    tcp = parse(text)
    assert ops(tcp, "v", "write") == ops(s, "v", "write")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/volumes/v/preserve", body=b"{}")
    response = conn.getresponse()
    # No control token was configured: the dashboard's actions are off on this listener.
    assert response.status == 403 and b"control-token-file" in response.read()
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("DELETE", "/v1/volumes/v")
    response = conn.getresponse()
    assert response.status == 403 and b"read-only" in response.read()
    conn.close()
    assert value(scrape(d), "owm_volume_preserves_total", volume="v") == 1
    status, _, text = fetch(http.client.HTTPConnection(host, int(port), timeout=30), "/v1/health")
    assert status == 200 and '"ready": true' in text


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")
def test_qemu_io_workload_is_counted(daemon: Daemon) -> None:
    """An unmodified client: qemu-io's writes and reads show up byte for byte."""
    assert daemon.owm("volume", "create", "q", "--size", "8M", "--method", "log").returncode == 0
    uri = f"nbd+unix:///q?socket={daemon.nbd_socket}"
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 512K", uri],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    s = scrape(daemon)
    assert ops(s, "q", "write")[1] == 1024 * K
    assert ops(s, "q", "read")[1] == 512 * K
    assert value(s, "owm_volume_sessions_opened_total", volume="q") == 1
    assert value(s, "owm_volume_info", volume="q", method="log") == 1
