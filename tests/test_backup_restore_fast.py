"""``owm restore REPO ID --to FILE`` as a user runs it: byte for byte, sparse where the backup
has zero chunks, and without loading what a file restore does not need (the control client's
aiohttp, an asyncio event loop, the cryptography of encrypted repositories), which used to be
most of the wall time of a restore (issue 15's aim: restore at nbdcopy's speed or better).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

from backup_helpers import create, ok_json, preserve, read_image, write
from conftest import REPO, Daemon, cli_env

from owm.backup.restore import restore_backup

CHUNK = 64 * 1024


def test_a_file_restore_loads_no_event_loop_no_http_no_crypto(daemon: Daemon,
                                                              short_tmp: Path) -> None:
    create(daemon, "vol", "4M")
    rng = random.Random("fast")
    # Runs of chunks with holes between them, and a run longer than one write group.
    write(daemon, [(0, rng.randbytes(40 * CHUNK)), (50 * CHUNK, rng.randbytes(3 * CHUNK)),
                  (60 * CHUNK + 100, rng.randbytes(CHUNK))])
    image = preserve(daemon)
    expected = read_image(daemon, image)
    repo = short_tmp / "repo"
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    target = short_tmp / "out.raw"
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "owm", "restore", str(repo),
                           backup_id, "--to", str(target), "--json"], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    assert "owm.backup.restore" in loaded  # the measurement works
    for heavy in ("aiohttp", "asyncio", "cryptography", "uvloop", "owm.control.client",
                  "owm.nbd.client"):
        assert heavy not in loaded, heavy
    assert target.read_bytes() == expected
    assert target.stat().st_blocks * 512 < len(expected)  # the holes stayed holes
    # The API with an event loop (restore_backup, as restore_set uses it) restores alike.
    result = asyncio.run(restore_backup(repo, backup_id, f"file:{short_tmp / 'again.raw'}"))
    assert result.kind == "file" and (short_tmp / "again.raw").read_bytes() == expected
