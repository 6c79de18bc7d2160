"""nbd-tester-client's TLS tests (the nbd project's own client) against owm and nbdkit.

Runs ``bench/nbd_tester.py --suite tls`` as a user would: the ``tls`` test (the integrity
test over TLS, with a client certificate the server's CA signed) and ``tlswrongcert`` (a
client certificate from a CA the server does not trust, which must be refused) against
``owm serve --tls=require --tls-verify-peer`` and, when installed, nbdkit with the same
certificates. ``tlshuge`` is left to the benchmark: its 47.5 MiB requests are over owm's 32 MiB
maximum payload, which owm errors cleanly (see the README).

The client is found at $NBD_TESTER_CLIENT or /tmp/nbd-src/tests/run/, else built (about 30 s)
from the nbd sources at $NBD_SRC or /tmp/nbd-src with the packages scripts/setup installs.
Without sources the test is skipped; when sources are there, a failed build fails it under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench" / "nbd_tester.py"
BUILD_DIR = Path("/tmp/owm-nbd-tester-build")
TOOLS = ("make", "gcc", "pkg-config", "autoreconf", "bison", "flex")


def _usable(client: Path) -> bool:
    return os.access(client, os.X_OK) and (client.parent / "integrity-test.tr").is_file()


def _has_tls(client: Path) -> bool:
    # A client built without GnuTLS exits 77 ("TLS support not compiled in") on -K.
    done = subprocess.run([str(client), "-K", "x", "-N", "x", "-u", "/nonexistent"],
                          capture_output=True, timeout=30)
    return done.returncode != 77


def _tester_client() -> Path:
    given = os.environ.get("NBD_TESTER_CLIENT")
    for client in ([Path(given)] if given else []) + [
        Path("/tmp/nbd-src/tests/run/nbd-tester-client"),
        BUILD_DIR / "nbd" / "tests" / "run" / "nbd-tester-client",
    ]:
        if _usable(client):
            return client
    src = Path(os.environ.get("NBD_SRC", "/tmp/nbd-src"))
    if not (src / "tests" / "run" / "nbd-tester-client.c").is_file():
        pytest.skip(f"no nbd sources at {src} to build nbd-tester-client from (git clone "
                    "https://github.com/NetworkBlockDevice/nbd there, or set $NBD_SRC)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"building nbd-tester-client needs {', '.join(missing)} (scripts/setup)")
    done = subprocess.run([sys.executable, str(BENCH), "--build", str(src), "--build-dir",
                           str(BUILD_DIR)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        message = f"nbd-tester-client did not build: {done.stdout[-1500:]}{done.stderr[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return Path(done.stdout.strip().splitlines()[-1])


def test_nbd_tester_client_tls_tests_pass_against_owm_and_nbdkit(short_tmp: Path) -> None:
    client = _tester_client()
    if not _has_tls(client):
        if os.environ.get("CI"):
            pytest.fail(f"{client} was built without TLS (libgnutls28-dev is missing)",
                        pytrace=False)
        pytest.skip(f"{client} was built without TLS")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--suite", "tls", "--tests", "tls,tlswrongcert",
         "--client", str(client), "--dir", str(short_tmp), "--timeout", "120", "--json"],
        capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["tls"]
    targets = ["owm cow"] + (["nbdkit file"] if shutil.which("nbdkit") else [])
    for target in targets:
        for name in ("tls", "tlswrongcert"):
            outcome = results[target][name]["outcome"]
            assert outcome == "ok", (target, name, outcome, done.stderr[-3000:])
