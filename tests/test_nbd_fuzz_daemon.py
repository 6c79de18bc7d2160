"""A bounded NBD fuzz run against a real daemon (issue 9, "How it must be tested").

Several threads open connection after connection to a real ``owm serve`` and send random and
mutated handshakes, options and requests (lying lengths, unknown commands and flags, names
that are not names, payloads cut short, flipped bytes), reading whatever comes back and hanging
up in different ways.  Beside them a well-behaved client keeps writing and reading back its own
volume, checking every byte.  At the end the daemon must be alive, must not have logged a
traceback, its fd count and memory must be bounded, and it must stop promptly on SIGTERM.

The run is seeded (``OWM_FUZZ_SEED``, default 9) and bounded in connections and in time
(``OWM_FUZZ_SECONDS``, default 20).  ``bench/nbd_soak.py`` runs the same fuzzer for longer and
prints a summary table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest
from conftest import Daemon
from test_hostile_names import fd_count, make_volume, wait_fds_at_most
from test_slow_readers import status_kib

from owm.nbd import constants as c
from owm.nbd.client import NbdClient

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
FUZZ_SIZE = 16 * MIB
GOOD_SIZE = 4 * MIB
GOOD = "good-volume"  # never named by the fuzzer (a flipped bit cannot reach this name)
NAMES = ["v", "v@0", "", "v@00", "v@1", "x@²", "v@٠", "nope", "v\n", "v@0\n", "v@-1", "@",
         "v@99999999999999999999999", "a" * 4097, "ü" * 3]
OPTIONS = [c.OPT_EXPORT_NAME, c.OPT_ABORT, c.OPT_LIST, 4, c.OPT_STARTTLS, c.OPT_INFO, c.OPT_GO,
           c.OPT_STRUCTURED_REPLY, c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT,
           c.OPT_EXTENDED_HEADERS]
QUERIES = ["base:allocation", "base:", "qemu:dirty-bitmap:x", "", "base:allocation\0", "x" * 300]
COMMANDS = [c.CMD_READ] * 4 + [c.CMD_WRITE] * 4 + [c.CMD_FLUSH, c.CMD_TRIM, c.CMD_CACHE,
            c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS, c.CMD_DISC, c.CMD_RESIZE, 9, 0xFFFF]
LENGTHS = [0, 1, 511, 512, 4096, 65536, 65537, MIB, 4 * MIB, 32 * MIB, 32 * MIB + 1,
           64 * MIB, 2**31, 2**32 - 1]


@dataclass
class FuzzStats:
    """What the fuzz threads did (shared, guarded by ``lock``)."""

    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    closed_by_server: int = 0
    send_blocked: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


# ---------------------------------------------------------------------- message generators


def _string(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return rng.randbytes(rng.randrange(40))  # often not UTF-8
    return rng.choice(NAMES).encode()


def _option(rng: random.Random, opt: int | None = None) -> bytes:
    if opt is None:
        opt = rng.choice(OPTIONS) if rng.random() < 0.9 else rng.getrandbits(32)
    if opt in (c.OPT_INFO, c.OPT_GO):
        name = _string(rng)
        infos = [rng.choice([0, 1, 2, 3, rng.getrandbits(16)]) for _ in range(rng.randrange(4))]
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
    elif opt in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
        name = _string(rng)
        queries = [rng.choice(QUERIES).encode() for _ in range(rng.randrange(4))]
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        data += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    elif opt == c.OPT_EXPORT_NAME:
        data = _string(rng)
    elif rng.random() < 0.7:
        data = b""
    else:
        data = rng.randbytes(rng.randrange(64))
    length = len(data)
    roll = rng.random()
    if roll < 0.05:
        length = rng.getrandbits(32)  # a lying length
    elif roll < 0.1:
        length = max(0, length + rng.randrange(-8, 9))
    return struct.pack(">QII", c.IHAVEOPT, opt, length) + data


def _request(rng: random.Random) -> bytes:
    cmd = rng.choice(COMMANDS)
    flags = rng.choice([0, 0, c.CMD_FLAG_FUA, c.CMD_FLAG_REQ_ONE, c.CMD_FLAG_DF,
                        c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO, rng.getrandbits(16)])
    length = rng.choice(LENGTHS) if rng.random() < 0.7 else rng.randrange(2 * MIB)
    offset = rng.choice([0, rng.randrange(FUZZ_SIZE), FUZZ_SIZE - 1, FUZZ_SIZE,
                         rng.getrandbits(63), 2**64 - 1 - rng.randrange(4096)])
    magic = c.REQUEST_MAGIC if rng.random() < 0.97 else rng.getrandbits(32)
    header = struct.pack(">IHHQQI", magic, flags, cmd, rng.getrandbits(64), offset, length)
    if cmd != c.CMD_WRITE:
        return header
    if length <= 256 * 1024 and rng.random() < 0.95:
        return header + rng.randbytes(length)
    return header + rng.randbytes(rng.randrange(min(length, 256 * 1024) + 1))  # cut short


def _mutate(rng: random.Random, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        if not data:
            break
        at = rng.randrange(len(data))
        if roll < 0.5:
            data[at] ^= 1 << rng.randrange(8)
        elif roll < 0.7:
            del data[at:]
        elif roll < 0.85:
            data[at:at] = rng.randbytes(rng.randrange(1, 32))
        else:
            data[at:at] = data[at:at + rng.randrange(1, 64)]
    return bytes(data)


def conversation(rng: random.Random) -> bytes:
    """Everything one fuzz client sends after the greeting."""
    roll = rng.random()
    if roll < 0.04:
        return rng.randbytes(rng.randrange(64))
    if roll < 0.08:
        flags = rng.getrandbits(32)
    else:
        flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if rng.random() < 0.7 else 0)
    out = [struct.pack(">I", flags)]
    if rng.random() < 0.6:
        out.append(_option(rng, c.OPT_STRUCTURED_REPLY))
    if rng.random() < 0.3:
        out.append(_option(rng, c.OPT_SET_META_CONTEXT))
    out.extend(_option(rng) for _ in range(rng.randrange(4)))
    if rng.random() < 0.75:
        # Mostly an export that exists, so that most connections reach transmission.
        name = (rng.choice([b"v", b"v", b"v@0"]) if rng.random() < 0.75
                else rng.choice(NAMES).encode())
        if rng.random() < 0.8:
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            out.append(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(data)) + data)
        else:
            out.append(struct.pack(">QII", c.IHAVEOPT, c.OPT_EXPORT_NAME, len(name)) + name)
        out.extend(_request(rng) for _ in range(rng.randrange(40)))
        if rng.random() < 0.4:
            out.append(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 0, 0, 0))
    stream = b"".join(out)
    return _mutate(rng, stream) if rng.random() < 0.25 else stream


# --------------------------------------------------------------------------- fuzz clients


def fd_targets(pid: int) -> list[str]:
    """What the daemon's file descriptors point at (files, sockets, pipes)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _drain(sock: socket.socket) -> tuple[int, bool]:
    """Read what is there without waiting: (bytes, whether the server closed)."""
    got = 0
    timeout = sock.gettimeout()
    sock.settimeout(0)  # a socket with a timeout would wait for data first
    try:
        while True:
            try:
                block = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return got, False
            except OSError:
                return got, True
            if not block:
                return got, True
            got += len(block)
    finally:
        sock.settimeout(timeout)


def fuzz_connection(rng: random.Random, path: str, stats: FuzzStats) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    received = sent = 0
    closed = blocked = False
    try:
        sock.connect(path)
        stream = conversation(rng)
        pos = 0
        while pos < len(stream) and not closed:
            # Odd pieces split messages anywhere; at most ~50 sends per connection.
            step = max(rng.choice([1, 7, 28, 512, 65536, len(stream)]), len(stream) // 50)
            try:
                sock.sendall(stream[pos:pos + step])
            except TimeoutError:
                blocked = True  # the server stopped reading (a pause or a lying length)
                break
            except OSError:
                closed = True
                break
            pos += step
            sent = min(pos, len(stream))
            got, closed = _drain(sock)
            received += got
        ending = rng.random()
        if not closed and ending < 0.5:
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline and not closed:
                time.sleep(0.02)
                got, closed = _drain(sock)
                received += got
        if not closed and ending < 0.2:
            sock.shutdown(socket.SHUT_WR)
            got, closed = _drain(sock)
            received += got
    except OSError:
        closed = True
    finally:
        if rng.random() < 0.3:  # an abortive close (RST on TCP; same as close on Unix)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    stats.add(connections=1, bytes_sent=sent, bytes_received=received,
              closed_by_server=int(closed), send_blocked=int(blocked))


def fuzz_worker(seed: int, path: str, deadline: float, max_connections: int,
                stats: FuzzStats) -> None:
    rng = random.Random(seed)
    for _ in range(max_connections):
        if time.monotonic() > deadline:
            return
        try:
            fuzz_connection(rng, path, stats)
        except Exception as exc:  # a bug in the fuzzer, not in the daemon: report it
            with stats.lock:
                stats.errors.append(repr(exc))
            return


# --------------------------------------------------------------------- well-behaved client


async def good_client(path: str, stop: threading.Event, seed: int, max_rounds: int,
                      model: bytearray) -> int:
    """Writes and reads back its own volume until ``stop``; checks every read and, at the end,
    the whole volume against ``model`` (what it holds, kept up to date).  Returns the rounds."""
    rng = random.Random(seed)
    client = await NbdClient.connect(export=GOOD, unix_path=path)
    rounds = 0
    try:
        while not stop.is_set() and rounds < max_rounds:
            length = rng.choice([512, 4096, 65536, 200_000])
            offset = rng.randrange(GOOD_SIZE - length)
            block = rng.randbytes(length)
            await asyncio.wait_for(client.write(offset, block, fua=rng.random() < 0.3), 60)
            model[offset:offset + length] = block
            if rng.random() < 0.3:
                await asyncio.wait_for(client.flush(), 60)
            check = rng.randrange(GOOD_SIZE - 65536)
            got = await asyncio.wait_for(client.read(check, 65536), 60)
            assert got == model[check:check + 65536], f"round {rounds}: wrong data at {check}"
            rounds += 1
        await client.flush()
        whole = b"".join([await client.read(o, MIB) for o in range(0, GOOD_SIZE, MIB)])
        assert whole == model, "the volume does not hold what was written"
    finally:
        await client.disconnect()
    return rounds


async def touch(path: str, export: str) -> None:
    client = await NbdClient.connect(export=export, unix_path=path)
    try:
        await client.write(0, b"w" * 65536, fua=True)
        await client.read(FUZZ_SIZE - 65536, 65536)
    finally:
        await client.disconnect()


# -------------------------------------------------------------------------------- the run


@dataclass
class FuzzResult:
    stats: FuzzStats
    good_rounds: int
    seconds: float
    fds_before: int
    fds_after: int
    fd_change: tuple[list[str], list[str]]  # (gone, new) fd targets
    rss_before: int
    rss_peak: int


def run_fuzz(daemon: Daemon, *, seed: int, seconds: float, workers: int = 4,
             max_connections: int = 100_000) -> FuzzResult:
    """Set up the volumes, fuzz for ``seconds`` beside the good client, measure the daemon."""
    make_volume(daemon, "v", "16M")
    make_volume(daemon, GOOD, "4M")
    status, body = daemon.api("POST", "/v1/volumes/v/preserve", {})
    assert status == 201, body
    path = str(daemon.nbd_socket)
    pid = daemon.proc.pid
    model = bytearray(GOOD_SIZE)
    # Warm up what the daemon opens lazily (storage objects of both volumes and the image).
    asyncio.run(good_client(path, threading.Event(), seed, 20, model))
    asyncio.run(touch(path, "v"))
    fds_before = fd_count(pid)
    targets_before = fd_targets(pid)
    rss_before = status_kib(pid, "VmRSS")

    stats = FuzzStats()
    stop = threading.Event()
    good_rounds: list[int] = []
    good_errors: list[BaseException] = []

    def good() -> None:
        try:
            good_rounds.append(asyncio.run(good_client(path, stop, seed + 1, 10**6, model)))
        except BaseException as exc:
            good_errors.append(exc)

    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=fuzz_worker,
                                args=(seed * 1000 + i, path, deadline, max_connections, stats))
               for i in range(workers)]
    good_thread = threading.Thread(target=good)
    good_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    stop.set()
    good_thread.join(120)
    assert not good_thread.is_alive(), "the well-behaved client hung"
    if good_errors:
        raise good_errors[0]
    assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.log_text()[-4000:]}"
    fds_after = wait_fds_at_most(pid, fds_before)
    targets_after = fd_targets(pid)
    change = (sorted(set(targets_before) - set(targets_after)),
              sorted(set(targets_after) - set(targets_before)))
    return FuzzResult(stats, good_rounds[0], time.monotonic() - started, fds_before, fds_after,
                      change, rss_before, status_kib(pid, "VmHWM"))


def test_nbd_fuzz_against_a_real_daemon(daemon: Daemon) -> None:
    seed = int(os.environ.get("OWM_FUZZ_SEED", "9"))
    seconds = float(os.environ.get("OWM_FUZZ_SECONDS", "20"))
    result = run_fuzz(daemon, seed=seed, seconds=seconds, max_connections=1500)
    stats = result.stats
    assert not stats.errors, stats.errors
    assert stats.connections >= 100, stats
    assert result.good_rounds > 0
    # Storage objects a fuzz write may open for the first time are fine; sockets, pipes or
    # anything else left behind by the hundreds of fuzz connections are not.
    _gone, new = result.fd_change
    storage = str(daemon.pool / "volumes") + "/"
    assert all(t.startswith(storage) for t in new), result.fd_change
    assert result.fds_after <= result.fds_before + 4, result.fd_change
    assert result.rss_peak - result.rss_before < 600 * MIB, (result.rss_before, result.rss_peak)
    log = daemon.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    started = time.monotonic()
    assert daemon.stop(timeout=15) == 0
    assert time.monotonic() - started < 15
