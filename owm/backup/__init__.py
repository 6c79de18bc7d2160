"""Backup, verify and restore of preserved images: raw files, qcow2 images and owm repositories.

A backup reads a drained image ``NAME@N`` over the daemon's NBD socket (block status first, so
holes are never read) and writes it as a sparse raw file, a qcow2 image, or into an owm
repository: content-addressed, zstd-compressed chunks shared between backups and volumes, one
manifest per backup, incremental from the newest older backup of the same volume.

The library entry points (used by the CLI, the demo and the coordinator)::

    from owm.backup import run_backup, restore_backup, verify_backups, Repository
    async with ControlClient(pool) as control:
        result = await run_backup(control, "vol@3", "backups", fmt="owm", verify=True)

Modules: ``source`` reads an image, ``pipeline`` moves batches to a writer on threads, ``raw``,
``qcow2`` and ``store`` write the three formats, ``repo`` and ``manifest`` are the repository,
``verify`` and ``restore`` read it back, ``run`` ties a backup together; the CLI commands are in
``owm.cli.backup``.

A client of the daemon: may import ``owm.common``, ``owm.nbd`` and ``owm.control``, never the
engines or the pool.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from owm.backup.repo import Repository
    from owm.backup.restore import RestoreResult, restore_backup
    from owm.backup.run import BackupResult, run_backup
    from owm.backup.verify import VerifyReport, verify_backups

# Loaded on first use, so that `owm status` does not pay for the backup machinery.
_HOME = {
    "Repository": "repo", "RestoreResult": "restore", "restore_backup": "restore",
    "BackupResult": "run", "run_backup": "run", "VerifyReport": "verify",
    "verify_backups": "verify",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'owm.backup' has no attribute {name!r}")
    return getattr(importlib.import_module(f"owm.backup.{_HOME[name]}"), name)


__all__ = [
    "BackupResult",
    "Repository",
    "RestoreResult",
    "VerifyReport",
    "restore_backup",
    "run_backup",
    "verify_backups",
]
