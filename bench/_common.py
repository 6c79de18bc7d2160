"""What the benchmark scripts share: a process's CPU time, and running fio's nbd engine.

``cpu_seconds`` and ``thread_cpu`` read ``/proc``; ``run_fio`` runs one fio job and returns its
JSON report's job, raising with fio's own complaint if it failed; ``fill`` writes a whole export
once so that later reads and copies see data, not holes; ``wait_for`` waits for a server's
socket; ``cold_cache`` writes back and drops the page cache of a directory's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, summed by thread name (``comm``)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def run_fio(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``fio ... --output-format=json`` and return the report's first job."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed: {done.stderr.strip() or done.stdout[-500:]}")
    job: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
    return job


def fill(uri: str, size: int, depth: int = 16) -> None:
    """Write every byte of the export once, in 1M sequential writes."""
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                    "--bs=1M", f"--iodepth={depth}", f"--size={size}", "--output-format=json"],
                   check=True, capture_output=True, timeout=600)


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Wait until ``path`` exists (a server's socket), failing if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def cold_cache(root: Path) -> None:
    """Write back every regular file under ``root`` and drop its pages from the page cache.

    On a disk the cost of a small buffered write depends on what the page cache holds: ext4
    makes page-cache folios as large as the write that created them, and every later 4K write
    into a large folio costs more. Left alone, each server would inherit the folios of the jobs
    before it (an O_DIRECT row even empties the cache for the next one), so that a row measures
    its place in the run as much as its server. Called before every job, it gives every server
    the same start: its data on the disk, nothing cached. A no-op on tmpfs, whose pages are the
    data.
    """
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile, or not ours to open
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
