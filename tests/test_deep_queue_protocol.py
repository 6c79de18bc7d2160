"""Deep queues in the protocol machine: receiving costs O(bytes), and a WRITE header does not
allocate its payload before the payload arrives."""

from __future__ import annotations

import random
import struct
import tracemalloc
from pathlib import Path

from owm.common.view import ExportInfo
from owm.nbd import constants as c
from owm.nbd import protocol as p

INFO = ExportInfo("vol", "", 64 << 20, False)


def transmission() -> p.ServerConnection:
    conn = p.ServerConnection()
    conn.initiate()
    conn.receive_data(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    assert conn.next_event() is p.NEED_DATA
    name = INFO.name.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    conn.receive_data(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(data)) + data)
    ev = conn.next_event()
    assert isinstance(ev, p.ExportInfoRequest)
    conn.reply_info(INFO)
    assert conn.state is p.State.TRANSMISSION
    return conn


def write_request(handle: int, offset: int, payload: bytes) -> bytes:
    header = struct.pack(
        ">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, handle, offset, len(payload)
    )
    return header + payload


def test_queued_input_is_not_copied_again_at_every_receive() -> None:
    """A client far ahead of the server (which parses nothing while it is at its in-flight
    limit) sends thousands of small writes in small pieces: the bytes allocated while they are
    received stay proportional to the bytes received, not to bytes x pieces."""
    conn = transmission()
    rng = random.Random(11)
    count = 3000
    stream = b"".join(
        write_request(i, (i % 64) * 1024, bytes([i % 251]) * 1024) for i in range(count)
    )
    pieces = []
    pos = 0
    while pos < len(stream):
        n = rng.randrange(1, 2000)
        pieces.append(stream[pos : pos + n])
        pos += n
    tracemalloc.start()
    try:
        allocated = 0
        for piece in pieces:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            conn.receive_data(piece)
            allocated += max(0, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    # Every piece is kept once; the old buffer re-copied the whole unparsed backlog at every
    # receive (about pieces/2 times the stream, here some 3 GB).
    assert allocated <= 3 * len(stream), f"{allocated} bytes allocated for {len(stream)}"
    assert conn.buffered == len(stream)
    for i in range(count):
        ev = conn.next_event()
        assert isinstance(ev, p.Request), ev
        assert ev.handle == i and ev.offset == (i % 64) * 1024
        assert ev.payload is not None and bytes(ev.payload) == bytes([i % 251]) * 1024
    assert conn.next_event() is p.NEED_DATA
    assert conn.buffered == 0


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_a_stalled_write_header_does_not_allocate_its_payload() -> None:
    """A 32 MiB WRITE header whose payload never comes costs (almost) nothing; its payload is
    provided as it arrives and comes out whole."""
    conn = transmission()
    length = c.DEFAULT_MAX_BLOCK
    header = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 9, 0, length)
    stalled = []
    before = _rss()
    # Eight connections stalled after their headers: 256 MiB if each allocated its payload.
    for _ in range(8):
        other = transmission()
        other.receive_data(header + b"x" * 100)
        assert other.next_event() is p.NEED_DATA
        assert other.buffered == 100  # what arrived, not what was announced
        stalled.append(other)
    grown = _rss() - before
    assert grown < 64 << 20, f"RSS grew by {grown} bytes for 8 stalled headers"
    # The payload arrives in pieces, some through the direct buffer, and comes out whole.
    conn.receive_data(header + b"a" * 1000)
    assert conn.next_event() is p.NEED_DATA
    filled = 1000
    pattern = bytes(range(256)) * 4
    while filled < length:
        view = conn.body_buffer()
        assert view is not None
        n = min(len(view), 1 << 20)
        if (filled // (1 << 20)) % 2:
            view[:n] = (pattern * (n // len(pattern) + 1))[:n]
            conn.body_received(n)
        else:
            conn.receive_data((pattern * (n // len(pattern) + 1))[:n])
        filled += n
        del view
        assert conn.buffered == filled
    ev = conn.next_event()
    assert isinstance(ev, p.Request) and ev.length == length and ev.payload is not None
    data = memoryview(ev.payload)
    assert bytes(data[:1000]) == b"a" * 1000
    assert bytes(data[1000:1000 + 1024]) == pattern
    assert len(data) == length
