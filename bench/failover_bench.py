#!/usr/bin/env python3
"""Failover time of an owm cluster: from kill -9 of a volume's owner to the first successful
read of that volume through the daemon that took it over.

On one throw-away Ceph cluster and etcd (owm.testbed), two ``owm serve --daemon-id`` daemons
share a pool.  Each round: a client writes to the volume through its owner with FUA, the owner
is killed with SIGKILL, and the other daemon's NBD socket is tried every 20 ms until a read of
the volume succeeds; the time from the kill to that read is the round's figure.  The killed
daemon is then restarted (as systemd would) and the next round kills the new owner.  The lease
ttl is the one daemons get by default (5 s) unless ``--lease-ttl`` says otherwise; the time is
at most the ttl plus one poll (0.5 s) plus fencing and recovery.

    .venv/bin/python bench/failover_bench.py [--kills 20] [--lease-ttl 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from owm.nbd.client import NbdClient  # noqa: E402
from owm.testbed import ceph as ceph_testbed  # noqa: E402
from owm.testbed import etcd as etcd_testbed  # noqa: E402

OWM = [sys.executable, "-m", "owm"]


class Daemon:
    def __init__(self, work: Path, ident: str, args: list[str]) -> None:
        self.pool = work / ident
        self.ident = ident
        self.pool.mkdir(parents=True, exist_ok=True)
        ready = self.pool / "ready"
        ready.unlink(missing_ok=True)
        log = work / f"{ident}-{time.time_ns()}.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*OWM, "--pool", str(self.pool), "serve", "--listen", "127.0.0.1:0",
                 "--ready-file", str(ready), "--daemon-id", ident, *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon {ident} did not start: {log.read_text()[-800:]}")
            time.sleep(0.05)

    @property
    def socket(self) -> str:
        return str(self.pool / "nbd.sock")

    def owm(self, *args: str) -> str:
        out = subprocess.run([*OWM, "--pool", str(self.pool), *args], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"owm {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def served(socket: str) -> bool:
    try:
        client = await NbdClient.connect(export="vol", unix_path=socket, timeout=2)
    except Exception:
        return False
    try:
        await client.read(0, 4096)
        return True
    except Exception:
        return False
    finally:
        client.abort()


async def one_kill(owner: Daemon, other: Daemon, n: int) -> float:
    client = await NbdClient.connect(export="vol", unix_path=owner.socket, timeout=10)
    await client.write(0, bytes([n % 256]) * 65536, fua=True)
    client.abort()
    owner.proc.kill()
    killed = time.monotonic()
    owner.proc.wait()
    while not await served(other.socket):
        if time.monotonic() - killed > 60:
            raise RuntimeError("no daemon took the volume over within 60 s")
        await asyncio.sleep(0.02)
    took = time.monotonic() - killed
    check = await NbdClient.connect(export="vol", unix_path=other.socket, timeout=10)
    data = await check.read(0, 65536)
    check.abort()
    if data != bytes([n % 256]) * 65536:
        raise RuntimeError("an acknowledged FUA write was lost in the failover")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--lease-ttl", type=int, default=5)
    opts = parser.parse_args()
    why = ceph_testbed.missing()
    if why:
        sys.exit(f"failover_bench: {why}")
    work = Path(tempfile.mkdtemp(prefix="owm-fo-", dir="/tmp"))
    ceph = ceph_testbed.start()
    etcd = etcd_testbed.start()
    daemons: dict[str, Daemon] = {}
    try:
        args = ["--etcd", etcd.url, "--etcd-prefix", f"/owm/bench-{uuid.uuid4().hex[:8]}/",
                "--ceph-conf", str(ceph.conf_path), "--rados-pool", ceph.pool,
                "--lease-ttl", str(opts.lease_ttl), "--grace", "2"]
        for ident in ("a", "b"):
            daemons[ident] = Daemon(work, ident, args)
        daemons["a"].owm("volume", "create", "vol", "--size", "64M")
        owner, other = "a", "b"
        times = []
        for n in range(opts.kills):
            took = asyncio.run(one_kill(daemons[owner], daemons[other], n))
            times.append(took)
            print(f"kill {n + 1}: served again after {took:.2f} s", flush=True)
            daemons[owner] = Daemon(work, owner, args)  # restarted, as systemd would
            owner, other = other, owner
        print(json.dumps({"kills": len(times), "lease_ttl": opts.lease_ttl,
                          "median_s": round(statistics.median(times), 2),
                          "worst_s": round(max(times), 2), "best_s": round(min(times), 2)}))
    finally:
        for d in daemons.values():
            d.stop(signal.SIGKILL)
        etcd.close()
        ceph.stop()


if __name__ == "__main__":
    main()
