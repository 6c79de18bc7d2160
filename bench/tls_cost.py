#!/usr/bin/env python3
"""What TLS costs on owm's data plane: the same daemon, volume and jobs, plain and over TLS.

One ``owm serve --tls=on`` (TLS offered, not required; client certificates optional) on a
throw-away pool on tmpfs serves one volume; fio's nbd engine (libnbd, so ``nbds://`` URIs with
``tls-certificates=``) runs each job twice in one run, once plain and once over TLS:

* 4K random writes, queue depth 16;
* 4K random reads, queue depth 16;
* 1M sequential writes, queue depth 16;

then nbdcopy copies the whole volume out, plain and over TLS.  Certificates are made for the
run with ``cryptography`` (tests/test_tls.py's ``make_pki``), so the dev extras are needed;
the client's credentials are put where libnbd looks by default (``$HOME/.pki/libnbd``, with
HOME pointed at the run's directory), as fio will not take ``tls-certificates=`` in a URI.

    .venv/bin/python bench/tls_cost.py [--runtime 5] [--size 512M]

Figures on a shared machine are noisy: compare the two columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

JOBS = [
    ("4K randwrite", "randwrite", "4k"),
    ("4K randread", "randread", "4k"),
    ("1M write", "write", "1M"),
]


def owm(pool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "owm", "--pool", str(pool), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=True)


def start_daemon(pool: Path, log: Path, tls_args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "owm", "--pool", str(pool), "serve", "--listen",
             "127.0.0.1:0", *tls_args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )
    # The start-up line names the TCP address: "... NBD on 127.0.0.1:PORT (TLS on, ...".
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"owm serve exited:\n{log.read_text()}")
        for line in log.read_text(errors="replace").splitlines():
            if "serving pool" in line and "NBD on " in line:
                return proc, line.split("NBD on ", 1)[1].split(" ", 1)[0]
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"could not find the daemon's NBD address:\n{log.read_text()}")


def fio(uri: str, rw: str, bs: str, runtime: int, size: str, env: dict[str, str]
        ) -> tuple[float, float]:
    """IOPS and bytes per second of one fio job."""
    result = subprocess.run(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         "--iodepth=16", f"--size={size}", f"--runtime={runtime}", "--time_based",
         "--output-format=json"],
        capture_output=True, text=True, timeout=runtime + 120, env=env,
    )
    if result.returncode != 0:
        raise SystemExit(f"fio failed on {uri}: {result.stderr.strip() or result.stdout[-500:]}")
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["iops"]), float(side["bw_bytes"])


def nbdcopy(uri: str, dest: Path, env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, timeout=600, env=env)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--size", default="512M", help="volume size")
    args = ap.parse_args()
    for tool in ("fio", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (scripts/setup installs it)")
    from test_tls import make_pki  # needs cryptography (the dev extras)

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix="owm-tls-bench-", dir=base))
    proc = None
    try:
        pki = make_pki(root / "pki")
        pool = root / "pool"
        proc, address = start_daemon(pool, root / "daemon.log", pki.serve_args("on", verify=False))
        owm(pool, "volume", "create", "vol", "--size", args.size)
        # fio's nbd engine refuses tls-certificates= in a URI (local file access), so the
        # client credentials go where libnbd looks by default: $HOME/.pki/libnbd.
        home = root / "home"
        shutil.copytree(pki.client_dir("alice"), home / ".pki" / "libnbd")
        env = {**os.environ, "HOME": str(home)}
        uris = {"plain": f"nbd://{address}/vol", "TLS": f"nbds://{address}/vol"}
        print(f"owm serve --tls=on, one {args.size} volume on {base}, fio qd16, "
              f"{args.runtime} s per job (noisy on a shared machine)")
        print(f"{'job':<14}{'plain':>14}{'TLS':>14}{'TLS/plain':>11}")
        for label, rw, bs in JOBS:
            row = {}
            for kind, uri in uris.items():
                iops, bw = fio(uri, rw, bs, args.runtime, args.size, env)
                row[kind] = iops if bs == "4k" else bw / 1e9
            unit = "K IOPS" if bs == "4k" else "GB/s"
            scale = 1000 if bs == "4k" else 1
            print(f"{label:<14}{row['plain'] / scale:>9.1f} {unit:<4}"
                  f"{row['TLS'] / scale:>9.1f} {unit:<4}{row['TLS'] / row['plain']:>10.2f}")
        times = {kind: nbdcopy(uri, root / f"out-{kind}.raw", env) for kind, uri in uris.items()}
        size = os.path.getsize(root / "out-plain.raw")
        speeds = {k: size / t / 1e9 for k, t in times.items()}
        print(f"{'nbdcopy out':<14}{speeds['plain']:>9.2f} GB/s{speeds['TLS']:>9.2f} GB/s"
              f"{speeds['TLS'] / speeds['plain']:>10.2f}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if os.environ.get("OWM_BENCH_KEEP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
