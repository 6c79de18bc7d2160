"""Backup to a qcow2 image: ``qemu-img convert`` pulls the read-only NBD export.

qemu-img reads the export with block status itself, so unallocated ranges stay unallocated in
the qcow2 file.  It writes ``PATH.partial``; owm syncs it and renames it to ``PATH``.  Progress
comes from qemu-img's ``-p`` output.  ``--verify`` runs ``qemu-img compare`` between the export
and the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

from owm.backup.pipeline import Progress
from owm.backup.raw import create_partial, same_file
from owm.common.errors import AlreadyExists, InvalidRequest, OwmError
from owm.common.files import fsync_dir

_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class QemuImgFailed(OwmError):
    """qemu-img is missing or reported an error."""


def nbd_uri(export: str, unix_path: str | None, tcp: str | None) -> str:
    """The NBD URI of ``export`` for qemu and libnbd tools (Unix socket preferred)."""
    name = quote(export, safe="@")
    if unix_path:
        return f"nbd+unix:///{name}?socket={quote(unix_path, safe='/')}"
    if tcp:
        return f"nbd://{tcp}/{name}"
    raise InvalidRequest("the daemon serves NBD neither on a Unix socket nor on TCP")


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise QemuImgFailed("qcow2 backups need qemu-img (Debian package qemu-utils), which is "
                            "not installed")
    return found


async def _run(args: list[str], progress: Progress | None, total: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    said_out = b""
    try:
        while True:
            block = await proc.stdout.read(4096)
            if not block:
                break
            said_out = (said_out + block)[-4096:]
            found = _PERCENT.findall(block)
            if found and progress is not None:
                progress(int(total * float(found[-1]) / 100), total)
        code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        stderr = await errors
    if code != 0:
        said = (stderr or said_out).decode(errors="replace").replace("\r", "\n").split("\n")
        said = [line.strip() for line in said if line.strip()]
        reason = said[-1] if said else f"exit status {code}"
        raise QemuImgFailed(f"{os.path.basename(args[0])} {args[1]} failed: {reason}")


async def backup_to_qcow2(uri: str, path: Path, size: int, *,
                          progress: Progress | None = None) -> int:
    """Convert the export at ``uri`` into the qcow2 file ``path``; returns its bytes on disk."""
    qemu_img = _qemu_img()
    if path.exists():
        raise AlreadyExists(f"{path} already exists; remove it or choose another path")
    if not path.parent.is_dir():
        raise InvalidRequest(f"the directory {path.parent} does not exist")
    # qemu-img opens its target by name with O_TRUNC: give it a name that is ours alone, and
    # check afterwards that the name still is the file we created.
    partial, fd = create_partial(path)
    try:
        await _run([qemu_img, "convert", "-p", "-f", "raw", "-O", "qcow2", uri, str(partial)],
                   progress, size)
        if not same_file(partial, fd):
            raise QemuImgFailed(f"{partial} was replaced while qemu-img wrote it")
        os.fsync(fd)
        on_disk = os.fstat(fd).st_blocks * 512
        if path.exists():
            raise AlreadyExists(f"{path} appeared while the backup ran")
        os.rename(partial, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    finally:
        os.close(fd)
    if progress is not None:
        progress(size, size)
    return on_disk


async def compare_qcow2(uri: str, path: Path) -> None:
    """``qemu-img compare`` the export with the qcow2 file; QemuImgFailed if they differ."""
    await _run([_qemu_img(), "compare", "-f", "raw", "-F", "qcow2", uri, str(path)], None, 0)
