"""Backups and restores never follow or truncate a file planted at ``PATH.partial`` (issue 9,
item 11).

A symlink planted at ``PATH.partial`` once had the backup written through it into another file
(and the "backup" renamed into a link to it).  Here a symlink to a precious file, a dangling
symlink and a plain file are planted before raw and qcow2 backups and a raw restore, run through
the CLI against a real daemon: each plant is left exactly as it was and the backup succeeds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from backup_helpers import create, ok, ok_json, preserve, read_image, write
from conftest import Daemon

pytestmark = pytest.mark.timeout(180)

PRECIOUS = b"precious data, not to be touched\n" * 100


class Plants:
    """A symlink, a dangling symlink and a plain file at the ``.partial`` of three targets."""

    def __init__(self, where: Path, stem: str, suffix: str) -> None:
        self.victim = where / f"{stem}-victim"
        self.victim.write_bytes(PRECIOUS)
        self.missing = where / f"{stem}-missing"
        self.targets = [where / f"{stem}-{kind}{suffix}" for kind in ("link", "dangling", "file")]
        link, dangling, plain = (t.with_name(t.name + ".partial") for t in self.targets)
        link.symlink_to(self.victim)
        dangling.symlink_to(self.missing)
        plain.write_bytes(b"planted")
        self.partials = (link, dangling, plain)

    def check_untouched(self) -> None:
        link, dangling, plain = self.partials
        assert self.victim.read_bytes() == PRECIOUS
        assert link.is_symlink() and os.readlink(link) == str(self.victim)
        assert dangling.is_symlink() and not self.missing.exists()
        assert not plain.is_symlink() and plain.read_bytes() == b"planted"
        for target in self.targets:
            assert target.is_file() and not target.is_symlink()


@pytest.fixture
def image(daemon: Daemon) -> str:
    create(daemon, "vol", "4M")
    write(daemon, [(0, b"\x5a" * 65536), (3 << 20, b"tail" * 1024)])
    return preserve(daemon)


def test_raw_backups_leave_planted_partials_alone(daemon: Daemon, short_tmp: Path,
                                                  image: str) -> None:
    plants = Plants(short_tmp, "b", ".raw")
    expected = read_image(daemon, image)
    for target in plants.targets:
        ok(daemon.owm("backup", image, "--to", target, "--verify"))
        assert target.read_bytes() == expected
    plants.check_untouched()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_qcow2_backups_leave_planted_partials_alone(daemon: Daemon, short_tmp: Path,
                                                    image: str) -> None:
    plants = Plants(short_tmp, "q", ".qcow2")
    raw = short_tmp / "reference.raw"
    raw.write_bytes(read_image(daemon, image))
    for target in plants.targets:
        ok(daemon.owm("backup", image, "--to", target, "--format", "qcow2"))
        compared = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(target)],
            capture_output=True, text=True, timeout=60)
        assert compared.returncode == 0, compared.stdout + compared.stderr
    plants.check_untouched()


def test_raw_restores_leave_planted_partials_alone(daemon: Daemon, short_tmp: Path,
                                                   image: str) -> None:
    repo = short_tmp / "repo"
    backup_id = ok_json(daemon.owm("backup", image, "--to", repo, "--format", "owm",
                                   "--json"))["id"]
    plants = Plants(short_tmp, "r", ".raw")
    expected = read_image(daemon, image)
    for target in plants.targets:
        ok(daemon.owm("restore", repo, backup_id, "--to", target))
        assert target.read_bytes() == expected
    plants.check_untouched()


def test_repository_temporary_files_never_follow_a_planted_link(tmp_path: Path) -> None:
    from owm.common.files import write_atomically

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    target = tmp_path / "manifest.json"
    (tmp_path / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomically(target, b"new")
    assert victim.read_bytes() == b"keep me"
    assert not target.exists()
