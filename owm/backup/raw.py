"""Backup to a sparse raw file: holes stay holes, the file appears only when it is whole.

The file is written as ``PATH.partial`` (always a new file, see :func:`create_partial`; sized
to the image with ftruncate, so everything not written is a hole), chunks that read as zeroes
are skipped (by block status, or by looking at them), and at the end it is synced and renamed
to ``PATH`` (and the directory synced).  A killed backup leaves only the ``.partial``.  With
``--verify`` the file is read back and every chunk compared with the BLAKE3 taken while
backing up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from owm.common.errors import AlreadyExists, InvalidRequest
from owm.common.files import fsync_dir

if TYPE_CHECKING:  # not at run time: a restore into a file needs neither (nor NBD's client)
    from owm.backup.pipeline import Stats
    from owm.backup.source import Batch


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def create_partial(path: Path) -> tuple[Path, int]:
    """Create a new temporary file for ``path`` in its directory: (its path, an fd to write).

    The name is ``PATH.partial``, or ``PATH.<random>.partial`` if that is taken; it is created
    with O_EXCL|O_NOFOLLOW, so a file or a symlink already there (planted, or left by a killed
    backup) is never followed, truncated or written: another name is drawn instead.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(100):
        candidate = (partial_path(path) if attempt == 0
                     else path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial"))
        try:
            return candidate, os.open(candidate, flags, 0o644)
        except FileExistsError:
            continue
    raise AlreadyExists(f"could not create a temporary file beside {path}")


def same_file(path: Path, fd: int) -> bool:
    """True if ``path`` (not followed if it is a link) is still the file open as ``fd``."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class RawWriter:
    """The pipeline's writer for a raw file (see the module docstring)."""

    def __init__(self, path: Path, size: int, chunk_size: int, stats: Stats, *,
                 keep_digests: bool = False) -> None:
        if path.exists():
            raise AlreadyExists(f"{path} already exists; remove it or choose another path")
        if not path.parent.is_dir():
            raise InvalidRequest(f"the directory {path.parent} does not exist")
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.stats = stats
        self.zero = bytes(chunk_size)
        self.digests: dict[int, bytes] | None = {} if keep_digests else None
        self.partial, self.fd = create_partial(path)
        os.ftruncate(self.fd, size)

    def zeroes(self, batch: Batch) -> None:
        self.stats.add(zero=batch.count)

    def write(self, batch: Batch) -> None:
        data, base = batch.data, batch.base
        assert data is not None
        view = memoryview(data)[base:base + batch.length]
        cs = self.chunk_size
        new = zero = 0
        run_start = -1  # start (in batch) of the run of non-zero chunks being collected
        for k in range(batch.count + 1):
            start = k * cs
            is_zero = True
            if k < batch.count:
                n = min(cs, batch.length - start)
                is_zero = data.startswith(self.zero if n == cs else bytes(n), base + start)
                if not is_zero and self.digests is not None:
                    self.digests[batch.first + k] = blake3.blake3(view[start:start + n]).digest()
            if is_zero and run_start >= 0:
                self._pwrite(view[run_start:start], batch.offset + run_start)
                run_start = -1
            if k == batch.count:
                break
            if is_zero:
                zero += 1
            else:
                new += 1
                if run_start < 0:
                    run_start = start
        self.stats.add(read=batch.length, new=new, zero=zero)

    def _pwrite(self, piece: memoryview, offset: int) -> None:
        while piece:
            n = os.pwrite(self.fd, piece, offset)
            self.stats.add(written=n)
            piece, offset = piece[n:], offset + n

    def commit(self) -> None:
        """Sync the file and give it its real name."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.path.exists():
            raise AlreadyExists(f"{self.path} appeared while the backup ran; the backup is "
                                f"left in {self.partial}")
        os.rename(self.partial, self.path)
        fsync_dir(self.path.parent)

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()


def check_raw_file(path: Path, size: int, chunk_size: int, digests: dict[int, bytes]) -> list[str]:
    """Read a raw backup back; one sentence per chunk that is not what was backed up."""
    problems: list[str] = []
    actual = path.stat().st_size
    if actual != size:
        return [f"{path} is {actual} bytes long instead of {size}"]
    zero = bytes(chunk_size)
    with open(path, "rb", buffering=0) as f:
        index = 0
        while True:
            data = f.read(chunk_size)
            if not data:
                break
            want = digests.get(index)
            good = (blake3.blake3(data).digest() == want if want is not None
                    else data == zero[: len(data)])
            if not good:
                problems.append(f"the chunk at offset {index * chunk_size} does not match "
                                "the image")
            index += 1
    return problems
