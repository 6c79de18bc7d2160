"""How long the quick commands take as an operator types them: median of repeated runs.

Starts a daemon on a throw-away pool with one volume, then runs ``owm --version``,
``owm status`` (on a pseudo-terminal, as typed, and piped), ``owm status --json`` and
``owm preserve`` ``--runs`` times each as separate processes, and prints the median, the
fastest and the 90th percentile wall time of each, and the median CPU time (user + system) of
the command's process, which other load on the machine disturbs much less than the wall time.
The aim is a median of at most 150 ms.
``--src DIR`` runs another checkout's code (e.g. the main branch, for a before/after).
Nothing is asserted; on a shared machine the figures are noisy.

    .venv/bin/python bench/cli_latency.py [--runs N] [--src DIR]
"""

from __future__ import annotations

import argparse
import os
import pty
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str], env: dict[str, str], tty: bool) -> tuple[float, float]:
    """Wall and CPU time of one run of ``cmd``; output to a pty (as typed) or a pipe."""
    cpu = child_cpu()
    if tty:
        leader, follower = pty.openpty()
        try:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower,
                                    stderr=follower, env=env, cwd="/")
            os.close(follower)
            while True:  # drain the terminal so the command never blocks on it
                try:
                    if not os.read(leader, 65536):
                        break
                except OSError:
                    break
            code = proc.wait()
            elapsed = time.perf_counter() - started
        finally:
            os.close(leader)
    else:
        started = time.perf_counter()
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                              cwd="/")
        elapsed = time.perf_counter() - started
        code = done.returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return elapsed, child_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command")
    parser.add_argument("--src", type=Path, default=REPO, help="the checkout whose owm to run")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OWM_POOL"}
    env["PYTHONPATH"] = str(args.src.resolve())
    # Run from "/": ``python -m`` puts the working directory first on sys.path, and a checkout
    # there would win over --src.
    owm = [sys.executable, "-m", "owm"]
    tmp = Path(tempfile.mkdtemp(prefix="owm-cli-", dir="/tmp"))
    pool = tmp / "pool"
    daemon = subprocess.Popen([*owm, "--pool", str(pool), "serve", "--listen", "127.0.0.1:0"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not (pool / "control.sock").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        base = [*owm, "--pool", str(pool)]
        subprocess.run([*base, "volume", "create", "v", "--size", "64M"], check=True,
                       capture_output=True, env=env, cwd="/")
        cases = [
            ("owm --version", [*owm, "--version"], False),
            ("owm status (terminal)", [*base, "status"], True),
            ("owm status | cat", [*base, "status"], False),
            ("owm status --json", [*base, "status", "--json"], False),
            ("owm preserve v", [*base, "preserve", "v"], False),
        ]
        print(f"{'command':<24} {'median':>8} {'fastest':>8} {'p90':>8} {'cpu':>8}   "
              f"({args.runs} runs, code of {args.src})")
        for label, cmd, tty in cases:
            runs = [run_once(cmd, env, tty) for _ in range(args.runs)]
            times = sorted(wall for wall, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
            print(f"{label:<24} {statistics.median(times) * 1000:>6.0f}ms "
                  f"{times[0] * 1000:>6.0f}ms {p90 * 1000:>6.0f}ms {cpu * 1000:>6.0f}ms")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
