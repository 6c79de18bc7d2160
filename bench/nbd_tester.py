#!/usr/bin/env python3
"""The nbd project's own test client (nbd-tester-client) against owm and nbdkit, side by side.

Runs its write test (1 KiB writes over the whole export, as many in flight as the socket
holds), its flush test (the same with a FUA write and a FLUSH every 16 requests) and its
integrity test (a recorded transaction log of overlapping reads and writes, checked) against
an owm ``cow`` volume and nbdkit's file plugin on the same kind of disk, and prints each one's
wall time and the server's CPU time.  Aim (issue 11): owm within 2x nbdkit's time.

nbd-tester-client is a tool we run, not code we ship.  Build it once (Debian):

    apt-get install libglib2.0-dev libgnutls28-dev autoconf automake libtool bison flex \
        pkg-config autoconf-archive
    git clone https://github.com/NetworkBlockDevice/nbd /tmp/nbd-src
    cd /tmp/nbd-src && ./autogen.sh && ./configure --disable-manpages \
        && make -C tests/run nbd-tester-client

then run (``--client`` or $NBD_TESTER_CLIENT points at another build):

    .venv/bin/python bench/nbd_tester.py [--size 256M] [--only owm,nbdkit] [--dir /dev/shm]

Each test is bounded by ``--timeout`` seconds.  Figures on a shared machine are noisy.

``--suite tls`` runs instead the nbd project's three TLS tests (``tests/run/simple_test``'s
``tls``, ``tlshuge`` and ``tlswrongcert``, which the client runs over TCP with ``-C``/``-K``
for its certificate and key, ``-A`` for the CA and ``-H`` for the name to check) against
``owm serve --tls=require --tls-verify-peer`` and ``nbdkit --tls=require --tls-verify-peer``,
both on 127.0.0.1 with the same certificates, made for the run (``tests/test_tls.py``'s
``make_pki``, so the dev extras are needed):

* ``tls``: the integrity test (a recorded log of overlapping reads and writes, checked) over
  TLS on a 50 MiB export, with a client certificate the CA signed;
* ``tlshuge``: the same with ``integrityhuge-test.tr``, whose requests reach 47.5 MiB, and the
  server name given apart from the address (``-H localhost 127.0.0.1``);
* ``tlswrongcert``: a client certificate the server's CA did not sign; the client expects to
  be refused (``-F``) and passes when it is.

``--tests a,b`` picks some of a suite, ``--json`` prints the results as one JSON document, and
``--build SRC`` builds the client from an nbd source tree (a copy of it, in ``--build-dir``;
about 30 s) and prints where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_fio import OwmServer, cpu_seconds, peer_server

DEFAULT_CLIENT = "/tmp/nbd-src/tests/run/nbd-tester-client"
INTEGRITY_SIZE = 52428800  # the size the nbd project's own integrity test uses
CHUNK = 65536


def tests(client: Path, size: int) -> list[tuple[str, list[str], int]]:
    """(name, extra arguments, export size) of each test."""
    trace = client.parent / "integrity-test.tr"
    out = [("write", ["-w"], size), ("flush", ["-w", "-f"], size)]
    if trace.exists():
        out.append(("integrity", ["-i", "-t", str(trace)], INTEGRITY_SIZE))
    return out


def run_test(
    client: Path, sock: Path, export: str, args: list[str], pid: int, timeout: float
) -> tuple[str, float, float]:
    """(outcome, seconds, server CPU seconds) of one run of the client on a Unix socket."""
    return run_client([str(client), "-u", str(sock), "-N", export, *args], pid, timeout)


def run_client(argv: list[str], pid: int, timeout: float) -> tuple[str, float, float]:
    """(outcome, seconds, server CPU seconds) of one run of the client."""
    env = dict(os.environ, NBD_TEST_SILENT="1")
    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        outcome = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        if proc.returncode:
            print(proc.stderr.strip()[-800:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        outcome = f"TIMEOUT ({timeout:.0f} s)"
    elapsed = time.monotonic() - start
    return outcome, elapsed, cpu_seconds(pid) - cpu0


TLS_SIZE = 52428800  # the export size of simple_test's TLS tests
TLS_TESTS = ("tls", "tlshuge", "tlswrongcert")


@dataclass
class Credentials:
    """The certificates of a TLS run (made by tests/test_tls.py's make_pki)."""

    root: Path  # ca-cert.pem, server-cert.pem, server-key.pem: what nbdkit's directory holds
    serve_args: list[str]  # owm serve's --tls options

    def client(self, name: str) -> tuple[Path, Path]:
        return self.root / name / "client-cert.pem", self.root / name / "client-key.pem"


def make_credentials(root: Path) -> Credentials:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_tls import make_pki  # needs cryptography (the dev extras)

    pki = make_pki(root)
    return Credentials(pki.root, pki.serve_args("require", verify=True))


def tls_argv(client: Path, name: str, creds: Credentials, port: int) -> list[str]:
    """The client's command line of simple_test's TLS test ``name``, aimed at ``port``."""
    run = client.parent
    cert, key = creds.client("alice")  # signed by the CA the server trusts
    ca = str(creds.root / "ca-cert.pem")
    base = [str(client), "-N", "vol"]
    if name == "tls":
        return [*base, "-i", "-t", str(run / "integrity-test.tr"), "-C", str(cert),
                "-K", str(key), "-A", ca, "localhost", str(port)]
    if name == "tlshuge":
        return [*base, "-i", "-t", str(run / "integrityhuge-test.tr"), "-C", str(cert),
                "-K", str(key), "-A", ca, "-H", "localhost", "127.0.0.1", str(port)]
    if name == "tlswrongcert":
        cert, key = creds.client("mallory")  # signed by a CA the server does not trust
        return [*base, "-t", str(run / "integrity-test.tr"), "-C", str(cert), "-K", str(key),
                "-F", "localhost", str(port)]
    raise ValueError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def owm_tls_server(work: Path, creds: Credentials) -> Iterator[tuple[int, int]]:
    """A real ``owm serve --tls=require`` with one 50 MiB cow volume: (pid, TCP port)."""
    from tls_cost import owm, start_daemon

    pool = work / "pool"
    proc, address = start_daemon(pool, work / "daemon.log", creds.serve_args)
    try:
        owm(pool, "volume", "create", "vol", "--size", str(TLS_SIZE), "--chunk-size",
            str(CHUNK))
        yield proc.pid, int(address.rsplit(":", 1)[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nbdkit_tls_server(work: Path, creds: Credentials) -> Iterator[tuple[int, int]]:
    """nbdkit's file plugin on a 50 MiB file, TLS required, same certificates: (pid, port)."""
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(TLS_SIZE)
    port = free_port()
    pidfile = work / "nbdkit.pid"  # written once nbdkit listens
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
            "-P", str(pidfile), "--tls=require", f"--tls-certificates={creds.root}",
            "--tls-verify-peer", "file", f"file={disk}"]
    with peer_server(argv, pidfile) as pid:
        yield pid, port


def run_tls(args: argparse.Namespace, client: Path, work: Path,
            wanted: list[str]) -> dict[str, dict[str, tuple[str, float, float]]]:
    creds = make_credentials(work / "pki")
    servers = {"owm cow": owm_tls_server, "nbdkit file": nbdkit_tls_server}
    results: dict[str, dict[str, tuple[str, float, float]]] = {}
    for name in wanted:
        for target, server in servers.items():
            if target.split()[0] not in args.only_set:
                continue
            if target.startswith("nbdkit") and not shutil.which("nbdkit"):
                continue
            where = work / f"{target.split()[0]}-{name}"
            where.mkdir()
            with server(where, creds) as (pid, port):
                res = run_client(tls_argv(client, name, creds, port), pid, args.timeout)
            results.setdefault(target, {})[name] = res
            if not args.json:
                print(f"  {target:<12} {name:<13} {res[0]:<16} {res[1]:8.2f} s", flush=True)
    return results


def build(src: Path, build_dir: Path, timeout: float = 300.0) -> Path:
    """Build nbd-tester-client from the nbd sources ``src`` in a copy under ``build_dir``."""
    tree = build_dir / "nbd"
    client = tree / "tests" / "run" / "nbd-tester-client"
    if os.access(client, os.X_OK):
        return client
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "*.o", "nbd-tester-client", "config.status", "config.log", "Makefile"))
    deadline = time.monotonic() + timeout
    steps = [["./configure", "--disable-manpages"], ["make", "-C", "tests/run",
                                                      "nbd-tester-client"]]
    if not (tree / "configure").exists():
        steps.insert(0, ["./autogen.sh"])
    for step in steps:
        left = deadline - time.monotonic()
        done = subprocess.run(step, cwd=tree, capture_output=True, text=True,
                              timeout=max(1.0, left))
        if done.returncode != 0:
            raise SystemExit(f"building nbd-tester-client failed at {' '.join(step)}:\n"
                             f"{(done.stdout + done.stderr)[-1500:]}")
    return client


def print_table(title: str, names: list[str],
                results: dict[str, dict[str, tuple[str, float, float]]]) -> None:
    print(f"\n{title} (wall s / server CPU s; shared machine: noisy)")
    header = f"{'target':<14}" + "".join(f"{n:>26}" for n in names)
    print(header)
    print("-" * len(header))
    for target, row in results.items():
        cells = ""
        for n in names:
            if n in row:
                outcome, wall, cpu = row[n]
                cell = f"{wall:.2f} s / {cpu:.2f} s" if outcome == "ok" else outcome
            else:
                cell = "-"
            cells += f"{cell:>26}"
        print(f"{target:<14}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", default=os.environ.get("NBD_TESTER_CLIENT", DEFAULT_CLIENT))
    parser.add_argument("--suite", choices=["plain", "tls", "all"], default="plain",
                        help="plain: write/flush/integrity on a Unix socket; tls: the TLS tests")
    parser.add_argument("--tests", help="comma-separated names of the suite's tests to run")
    parser.add_argument("--size", default="256M", help="export size of the write/flush tests")
    parser.add_argument("--dir", default="/dev/shm", help="where the disks live")
    parser.add_argument("--only", help="comma-separated: owm, nbdkit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--build", metavar="SRC", type=Path,
                        help="build the client from the nbd sources SRC, print its path, stop")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/owm-nbd-tester-build"))
    args = parser.parse_args()
    if args.build is not None:
        print(build(args.build, args.build_dir))
        return
    client = Path(args.client)
    if not os.access(client, os.X_OK):
        print(f"skipped: {client} is not built (see the top of {Path(__file__).name})")
        return
    args.only_set = set(args.only.split(",")) if args.only else {"owm", "nbdkit"}
    picked = set(args.tests.split(",")) if args.tests else None
    work = Path(tempfile.mkdtemp(prefix="owm-tester-", dir=args.dir))
    out: dict[str, dict[str, dict[str, tuple[str, float, float]]]] = {}
    try:
        if args.suite in ("plain", "all"):
            out["plain"] = run_plain(args, client, work, picked)
        if args.suite in ("tls", "all"):
            wanted = [t for t in TLS_TESTS if picked is None or t in picked]
            out["tls"] = run_tls(args, client, work, wanted)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({suite: {target: {n: {"outcome": r[0], "seconds": round(r[1], 3),
                                               "server_cpu_seconds": round(r[2], 3)}
                                           for n, r in row.items()}
                                  for target, row in res.items()}
                          for suite, res in out.items()}, indent=1))
        return
    if "plain" in out:
        names = [t[0] for t in tests(client, parse_size_arg(args.size))
                 if picked is None or t[0] in picked]
        print_table(f"nbd-tester-client, write/flush on {args.size}, disks in {args.dir}",
                    names, out["plain"])
        aims(names, out["plain"])
    if "tls" in out:
        names = [t for t in TLS_TESTS if picked is None or t in picked]
        print_table("nbd-tester-client TLS tests, 50 MiB exports on 127.0.0.1, TLS required, "
                    "client certificates verified", names, out["tls"])
        huge = out["tls"].get("owm cow", {}).get("tlshuge")
        if huge is not None and huge[0] != "ok":
            largest = largest_request(client.parent / "integrityhuge-test.tr")
            print(f"note: tlshuge sends requests of up to {largest / 2**20:.1f} MiB without "
                  "asking for block sizes (NBD_OPT_EXPORT_NAME); owm errors those over its "
                  "32 MiB maximum payload with EINVAL, as the NBD spec allows (servers SHOULD "
                  "take at least 32 MiB); nbdkit takes up to 64 MiB.")


def largest_request(trace: Path) -> int:
    """The longest request in a transaction log of nbd-tester-client (requests and replies)."""
    import struct

    data = trace.read_bytes()
    magic = struct.pack(">I", 0x25609513)  # NBD_REQUEST_MAGIC starts each 28-byte request
    largest, at = 0, data.find(magic)
    while 0 <= at <= len(data) - 28:
        largest = max(largest, struct.unpack_from(">I", data, at + 24)[0])
        at = data.find(magic, at + 28)
    return largest


def parse_size_arg(text: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from owm.common.sizes import parse_size

    return parse_size(text)


def aims(names: list[str], results: dict[str, dict[str, tuple[str, float, float]]]) -> None:
    owm, peer = results.get("owm cow", {}), results.get("nbdkit file", {})
    for n in names:
        if n in owm and n in peer and owm[n][0] == peer[n][0] == "ok":
            ratio = owm[n][1] / peer[n][1]
            verdict = "ok" if ratio <= 2 else "BELOW"
            print(f"aim: {n} within 2x nbdkit: {verdict} ({ratio:.2f}x nbdkit's time)")


def run_plain(args: argparse.Namespace, client: Path, work: Path,
              picked: set[str] | None) -> dict[str, dict[str, tuple[str, float, float]]]:
    size = parse_size_arg(args.size)
    results: dict[str, dict[str, tuple[str, float, float]]] = {}
    for name, extra, export_size in tests(client, size):
        if picked is not None and name not in picked:
            continue
        if "owm" in args.only_set:
            server = OwmServer(work / f"owm-{name}")
            try:
                server.ask("create", "vol", str(export_size), "cow", str(CHUNK))
                res = run_test(client, server.sock, "vol", extra, server.proc.pid,
                               args.timeout)
            finally:
                server.close()
            results.setdefault("owm cow", {})[name] = res
            if not args.json:
                print(f"  owm cow      {name:<10} {res[0]:<16} {res[1]:8.2f} s", flush=True)
        if "nbdkit" in args.only_set and shutil.which("nbdkit"):
            disk = work / f"{name}.raw"
            with open(disk, "wb") as f:
                f.truncate(export_size)
            sock = work / "nbdkit.sock"
            argv = ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                    "file", f"file={disk}"]
            with peer_server(argv, sock) as pid:
                res = run_test(client, sock, "vol", extra, pid, args.timeout)
            disk.unlink()
            results.setdefault("nbdkit file", {})[name] = res
            if not args.json:
                print(f"  nbdkit file  {name:<10} {res[0]:<16} {res[1]:8.2f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
