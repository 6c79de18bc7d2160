"""Instant restore: ``owm backup serve REPO ID`` serves a backup as a read-only NBD export with
nothing restored first.  Real clients read it: ``qemu-img compare`` and ``nbdcopy`` against the
source image, ``nbdinfo --map`` sees the chunks of zeroes as holes, a write is refused, and an
ext4 file system backed up from a volume is mounted read-only from the served backup through
``nbdfuse`` + ``mount -o ro,loop`` (skipped where FUSE or loop mounts are not usable).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backup_helpers import create, ok, ok_json, preserve, read_image, write
from conftest import OWM, REPO, Daemon, cli_env

from owm.nbd.client import NbdClient, NbdError

CHUNK = 64 * 1024
SIZE = 8 << 20


@contextmanager
def serving(repo: Path, backup_id: str, sock: Path, *extra: str | Path) -> Iterator[dict]:
    """``owm backup serve`` as a subprocess; yields its ready document; SIGTERM at the end."""
    proc = subprocess.Popen([*OWM, "backup", "serve", str(repo), backup_id, "--socket",
                             str(sock), "--json", *map(str, extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(),
                            cwd=REPO, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once listening; EOF if it failed
        assert line, proc.communicate(timeout=10)
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        assert code == 0, proc.stderr.read() if proc.stderr else code
        assert not sock.exists()


def _seed(daemon: Daemon) -> tuple[str, bytes]:
    create(daemon, "vol", "8M")
    rng = random.Random("instant")
    writes = [(n * CHUNK + rng.randrange(CHUNK), rng.randbytes(rng.randint(1, 3 * CHUNK)))
              for n in rng.sample(range(SIZE // CHUNK - 4), 30)]
    writes.append((SIZE - 10, b"0123456789"))
    write(daemon, writes)
    image = preserve(daemon)
    return image, read_image(daemon, image)


@pytest.mark.parametrize("encrypted", [False, True])
def test_served_backup_reads_as_the_source(daemon: Daemon, short_tmp: Path,
                                           encrypted: bool) -> None:
    image, content = _seed(daemon)
    source = short_tmp / "source.raw"
    source.write_bytes(content)
    repo, key = short_tmp / "repo", short_tmp / "key"
    extra: tuple[str | Path, ...] = ()
    if encrypted:
        ok(daemon.owm("repo", "init", repo, "--encrypt", "--key-file", key))
        extra = ("--key-file", key)
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json", *extra))["id"]
    sock = short_tmp / "b.sock"
    with serving(repo, backup_id, sock, *extra) as doc:
        assert doc["export"] == image and doc["size"] == SIZE
        uri = f"nbd+unix:///{image}?socket={sock}"
        compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source),
                                  uri], capture_output=True, text=True, timeout=60)
        assert compare.returncode == 0, compare
        copy = short_tmp / "copy.raw"
        run = subprocess.run(["nbdcopy", uri, str(copy)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run
        assert copy.read_bytes() == content
        # A client naming no export gets the backup too (the default export).
        default = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                                 capture_output=True, text=True, timeout=30)
        assert default.stdout.strip() == str(SIZE), default
        # Chunks of zeroes stay holes.
        mapped = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True,
                                text=True, timeout=30)
        assert mapped.returncode == 0, mapped
        extents = json.loads(mapped.stdout)
        holes = sum(e["length"] for e in extents if e["type"] == 3)
        stored = {o // CHUNK for o in range(0, SIZE, CHUNK) if content[o:o + CHUNK].strip(b"\0")}
        assert holes == (SIZE // CHUNK - len(stored)) * CHUNK
        assert all(e["type"] == 0 for e in extents if e["offset"] // CHUNK in stored)

        async def try_write() -> str:
            client = await NbdClient.connect(export=image, unix_path=str(sock))
            try:
                assert client.read_only
                await client.write(0, b"x" * 512)
            except NbdError as exc:
                return str(exc)
            finally:
                client.abort()
            return "written"

        assert asyncio.run(try_write()) != "written"


def test_unknown_backup_and_wrong_key_are_one_sentence(daemon: Daemon, short_tmp: Path) -> None:
    image, _ = _seed(daemon)
    repo, key = short_tmp / "repo", short_tmp / "key"
    ok(daemon.owm("repo", "init", repo, "--encrypt", "--key-file", key))
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--key-file", key,
                                   "--json"))["id"]
    other = short_tmp / "other"
    other.write_text("ab" * 32)
    sock = short_tmp / "x.sock"
    for args, code in (((backup_id, "--key-file", other), 2), (("nope", "--key-file", key), 1)):
        result = subprocess.run([*OWM, "backup", "serve", str(repo), *map(str, args),
                                 "--socket", str(sock)], capture_output=True, text=True,
                                timeout=30, env=cli_env(), cwd=REPO, stdin=subprocess.DEVNULL)
        assert result.returncode == code, result
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not sock.exists()


def _fuse_usable() -> str | None:
    """Why nbdfuse + a loop mount cannot be used here, or None."""
    if os.geteuid() != 0:
        return "mount -o loop needs root"
    for tool in ("nbdfuse", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def test_ext4_backup_mounts_from_the_served_backup(daemon: Daemon, short_tmp: Path) -> None:
    why = _fuse_usable()
    if why is not None:
        pytest.skip(f"FUSE is not usable here: {why}")
    # An ext4 file system with known files, put on a volume through NBD.
    tree = short_tmp / "tree"
    tree.mkdir()
    rng = random.Random("ext4")
    files = {f"file{n}.bin": rng.randbytes(rng.randint(1, 300_000)) for n in range(8)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    fs = short_tmp / "fs.img"
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs), "32M"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made
    create(daemon, "fsvol", "32M")
    copied = subprocess.run(["nbdcopy", str(fs), f"nbd+unix:///fsvol?socket={daemon.nbd_socket}"],
                            capture_output=True, text=True, timeout=60)
    assert copied.returncode == 0, copied
    image = preserve(daemon, "fsvol")
    repo = short_tmp / "repo"
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--json"))["id"]
    sock, fuse_dir, mnt = short_tmp / "s.sock", short_tmp / "fuse", short_tmp / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    with serving(repo, backup_id, sock):
        fuse = subprocess.Popen(["nbdfuse", "-r", str(fuse_dir / "disk"),
                                 f"nbd+unix:///{image}?socket={sock}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not (fuse_dir / "disk").exists():
                assert fuse.poll() is None, fuse.stderr.read() if fuse.stderr else ""
                assert time.monotonic() < deadline, "nbdfuse did not come up"
                time.sleep(0.1)
            mounted = subprocess.run(["mount", "-o", "ro,loop", str(fuse_dir / "disk"),
                                      str(mnt)], capture_output=True, text=True, timeout=30)
            if mounted.returncode != 0:
                pytest.skip(f"loop mounts are not usable here: {mounted.stderr.strip()}")
            try:
                for name, data in files.items():
                    assert (mnt / name).read_bytes() == data
            finally:
                subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        finally:
            subprocess.run(["umount", str(fuse_dir)], capture_output=True, timeout=30)
            fuse.terminate()
            try:
                fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
