"""A longer NBD fuzz soak against a real daemon, with a summary table.

The same fuzzer as ``tests/test_nbd_fuzz_daemon.py`` (random and mutated handshakes, options
and requests from several threads, a well-behaved client checking its own volume beside them),
run for longer and for several seeds, each on a fresh daemon and pool:

    .venv/bin/python bench/nbd_soak.py --seconds 300 --seeds 1 2 3 --workers 6

A run fails (exit 1) if the daemon dies, logs a traceback, leaves sockets open, grows its memory
past the bound, the well-behaved client reads wrong data, or SIGTERM does not stop it promptly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from conftest import start_daemon  # noqa: E402
from test_nbd_fuzz_daemon import MIB, run_fuzz  # noqa: E402

RSS_BOUND = 600 * MIB


def soak(seed: int, seconds: float, workers: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="owm-soak-", dir="/tmp"))
    daemon = start_daemon(root / "pool")
    problems: list[str] = []
    row: dict[str, object] = {"seed": seed}
    try:
        result = run_fuzz(daemon, seed=seed, seconds=seconds, workers=workers)
        stats = result.stats
        _gone, new = result.fd_change
        storage = str(daemon.pool / "volumes") + "/"
        if stats.errors:
            problems.append(f"fuzzer errors: {stats.errors[:3]}")
        if any(not t.startswith(storage) for t in new):
            problems.append(f"new fds: {new}")
        growth = result.rss_peak - result.rss_before
        if growth > RSS_BOUND:
            problems.append(f"memory grew by {growth >> 20} MiB")
        if "Traceback" in daemon.log_text():
            problems.append("the daemon logged a traceback")
        row.update(connections=stats.connections, sent_mib=stats.bytes_sent >> 20,
                   recv_mib=stats.bytes_received >> 20, closed=stats.closed_by_server,
                   blocked=stats.send_blocked, good_rounds=result.good_rounds,
                   fds=f"{result.fds_before}->{result.fds_after}",
                   rss_mib=f"{result.rss_before >> 20}->{result.rss_peak >> 20}")
        started = time.monotonic()
        code = daemon.stop(timeout=15)
        row["stop_s"] = round(time.monotonic() - started, 2)
        if code != 0:
            problems.append(f"exit status {code} on SIGTERM")
    except AssertionError as exc:
        problems.append(str(exc).splitlines()[0][:200])
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        if problems:
            row["log"] = str(daemon.log)
        else:
            shutil.rmtree(root, ignore_errors=True)
    row["result"] = "ok" if not problems else "; ".join(problems)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="fuzzing time per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=4, help="fuzzing threads")
    args = parser.parse_args()
    rows = [soak(seed, args.seconds, args.workers) for seed in args.seeds]
    columns = ["seed", "connections", "sent_mib", "recv_mib", "closed", "blocked",
               "good_rounds", "fds", "rss_mib", "stop_s", "result"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
        if "log" in row:
            print(f"    daemon log kept at {row['log']}")
    return 0 if all(r["result"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
