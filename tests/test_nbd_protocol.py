"""The NBD protocol state machine alone: every state, every option, every validation rule,
and a fuzz test that random, truncated and mutated conversations never make it raise anything
but ProtocolError nor buffer more than one message's worth of data."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owm.common.view import ExportInfo
from owm.nbd import constants as c
from owm.nbd import protocol as p

INFO = ExportInfo("vol", "live volume", 1 << 20, False, max_block=64 * 1024)
RO_INFO = ExportInfo("vol@0", "preserved image 0", 1 << 20, True, max_block=64 * 1024)


# ----------------------------------------------------------------------------- builders


def option(opt: int, data: bytes = b"", magic: int = c.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data)) + data


def info_data(name: str, *requests: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(requests))
        + b"".join(struct.pack(">H", r) for r in requests)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        pos += 20
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def events(conn: p.ServerConnection) -> list[object]:
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA or ev is p.PAUSED:
            out.append(ev)
            return out
        out.append(ev)


def negotiated(flags: int = c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES) -> p.ServerConnection:
    conn = p.ServerConnection()
    conn.initiate()
    conn.receive_data(struct.pack(">I", flags))
    assert conn.next_event() is p.NEED_DATA
    assert conn.state is p.State.OPTIONS
    return conn


def transmission(
    info: ExportInfo = INFO, structured: bool = True, meta: bool = True
) -> p.ServerConnection:
    conn = negotiated()
    if structured:
        conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
        assert isinstance(conn.next_event(), p.OptionHandled)
    if meta:
        conn.receive_data(option(c.OPT_SET_META_CONTEXT, meta_data(info.name, c.BASE_ALLOCATION)))
        ev = conn.next_event()
        if isinstance(ev, p.MetaContextRequest):
            conn.reply_meta_context(True)
    conn.receive_data(option(c.OPT_GO, info_data(info.name)))
    ev = conn.next_event()
    assert isinstance(ev, p.ExportInfoRequest) and ev.go
    conn.reply_info(info)
    assert conn.state is p.State.TRANSMISSION
    return conn


# ----------------------------------------------------------------------------- handshake


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = p.ServerConnection()
    assert conn.initiate() == struct.pack(
        ">QQH", c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES
    )
    assert conn.state is p.State.CLIENT_FLAGS
    assert conn.next_event() is p.NEED_DATA


def test_client_flags_arrive_byte_by_byte() -> None:
    conn = p.ServerConnection()
    for b in struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
        assert conn.next_event() is p.NEED_DATA
        conn.receive_data(bytes([b]))
    assert conn.next_event() is p.NEED_DATA
    assert conn.state is p.State.OPTIONS
    assert conn.no_zeroes


def test_unknown_client_flags_end_the_connection() -> None:
    conn = p.ServerConnection()
    conn.receive_data(struct.pack(">I", 1 << 5))
    with pytest.raises(p.ProtocolError):
        conn.next_event()
    assert conn.state is p.State.FAILED
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_option_with_bad_magic_ends_the_connection() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_LIST, magic=0x1234))
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_structured_reply_is_acknowledged() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ACK
    assert parse_option_replies(ev.data) == [(c.OPT_STRUCTURED_REPLY, c.REP_ACK, b"")]
    assert conn.structured
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY, b"x"))
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ERR_INVALID


@pytest.mark.parametrize(
    ("opt", "data", "reply"),
    [
        (c.OPT_STARTTLS, b"", c.REP_ERR_POLICY),
        (c.OPT_STARTTLS, b"x", c.REP_ERR_INVALID),
        (c.OPT_EXTENDED_HEADERS, b"", c.REP_ERR_UNSUP),
        (c.OPT_PEEK_EXPORT, b"", c.REP_ERR_UNSUP),
        (99, b"whatever", c.REP_ERR_UNSUP),
        (0, b"", c.REP_ERR_UNSUP),
        (0xFFFFFFFF, b"", c.REP_ERR_UNSUP),
        (c.OPT_LIST, b"x", c.REP_ERR_INVALID),
    ],
)
def test_options_answered_with_errors_keep_the_connection(
    opt: int, data: bytes, reply: int
) -> None:
    conn = negotiated()
    conn.receive_data(option(opt, data))
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled)
    assert ev.reply_type == reply
    ((o, rtype, _msg),) = parse_option_replies(ev.data)
    assert (o, rtype) == (opt, reply)
    assert conn.state is p.State.OPTIONS
    assert conn.next_event() is p.NEED_DATA


def test_list_pauses_until_answered() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_LIST) + option(c.OPT_STRUCTURED_REPLY))
    assert isinstance(conn.next_event(), p.ListExports)
    assert conn.next_event() is p.PAUSED
    assert conn.state is p.State.AWAIT_REPLY
    replies = parse_option_replies(conn.reply_list([("vol", "live volume"), ("vol@0", "")]))
    assert replies == [
        (c.OPT_LIST, c.REP_SERVER, struct.pack(">I", 3) + b"vol" + b"live volume"),
        (c.OPT_LIST, c.REP_SERVER, struct.pack(">I", 5) + b"vol@0"),
        (c.OPT_LIST, c.REP_ACK, b""),
    ]
    # The option queued behind it is parsed only now.
    assert isinstance(conn.next_event(), p.OptionHandled)


def test_answering_without_a_pending_option_is_a_caller_bug() -> None:
    conn = negotiated()
    with pytest.raises(RuntimeError):
        conn.reply_list([])
    with pytest.raises(RuntimeError):
        conn.reply_option_error(c.REP_ERR_UNKNOWN)


def test_abort_is_acknowledged_and_closes() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_ABORT, b"ignored"))
    ev = conn.next_event()
    assert isinstance(ev, p.AbortRequest)
    assert parse_option_replies(ev.data) == [(c.OPT_ABORT, c.REP_ACK, b"")]
    assert conn.state is p.State.CLOSED
    conn.receive_data(b"garbage after abort")
    assert conn.next_event() is p.NEED_DATA


def test_info_replies_with_what_was_asked() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_INFO, info_data("vol", c.INFO_NAME, c.INFO_DESCRIPTION, 77)))
    ev = conn.next_event()
    assert ev == p.ExportInfoRequest("vol", (c.INFO_NAME, c.INFO_DESCRIPTION, 77), False)
    replies = parse_option_replies(conn.reply_info(INFO))
    assert conn.state is p.State.OPTIONS
    kinds = {struct.unpack_from(">H", r[2])[0]: r[2] for r in replies if r[1] == c.REP_INFO}
    assert replies[-1] == (c.OPT_INFO, c.REP_ACK, b"")
    _, size, flags = struct.unpack(">HQH", kinds[c.INFO_EXPORT])
    assert size == INFO.size
    assert flags & c.FLAG_HAS_FLAGS and not flags & c.FLAG_READ_ONLY
    assert flags & c.FLAG_SEND_WRITE_ZEROES and flags & c.FLAG_SEND_TRIM
    assert kinds[c.INFO_NAME][2:] == b"vol"
    assert kinds[c.INFO_DESCRIPTION][2:] == b"live volume"
    assert struct.unpack(">HIII", kinds[c.INFO_BLOCK_SIZE])[1:] == (1, 4096, 64 * 1024)


def test_go_enters_transmission_with_the_export_flags() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY) + option(c.OPT_GO, info_data("vol@0")))
    conn.next_event()
    ev = conn.next_event()
    assert isinstance(ev, p.ExportInfoRequest) and ev.go
    replies = parse_option_replies(conn.reply_info(RO_INFO))
    assert all(r[0] == c.OPT_GO for r in replies)
    assert conn.state is p.State.TRANSMISSION
    flags = conn.transmission_flags
    assert flags & c.FLAG_READ_ONLY and flags & c.FLAG_SEND_DF and flags & c.FLAG_CAN_MULTI_CONN
    assert not flags & (c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES | c.FLAG_SEND_FAST_ZERO)
    assert conn.meta_context_id == 0  # none was selected


def test_go_without_structured_replies_does_not_offer_df() -> None:
    conn = transmission(structured=False, meta=False)
    assert not conn.transmission_flags & c.FLAG_SEND_DF
    single = ExportInfo("one", "", 4096, False, can_multi_conn=False)
    conn = negotiated()
    conn.receive_data(option(c.OPT_GO, info_data("one")))
    conn.next_event()
    conn.reply_info(single)
    assert not conn.transmission_flags & c.FLAG_CAN_MULTI_CONN


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0",
        struct.pack(">I", 100) + b"vol" + b"\0\0",  # name overruns
        struct.pack(">I", 3) + b"vol" + struct.pack(">H", 2) + b"\0\0",  # count too big
        struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0) + b"\0",  # trailing byte
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
        struct.pack(">I", 2) + b"a\0" + struct.pack(">H", 0),  # NUL in the name
    ],
)
def test_malformed_go_is_refused_politely(data: bytes) -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_GO, data))
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ERR_INVALID
    assert conn.state is p.State.OPTIONS


def test_go_for_an_unknown_export_fails_and_negotiation_goes_on() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_GO, info_data("nope")))
    assert isinstance(conn.next_event(), p.ExportInfoRequest)
    reply = conn.reply_option_error(c.REP_ERR_UNKNOWN, "There is no export named 'nope'.")
    assert parse_option_replies(reply) == [
        (c.OPT_GO, c.REP_ERR_UNKNOWN, b"There is no export named 'nope'.")
    ]
    assert conn.state is p.State.OPTIONS
    with pytest.raises(ValueError):
        conn.receive_data(option(c.OPT_GO, info_data("vol")))
        conn.next_event()
        conn.reply_option_error(c.REP_ACK)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_honours_no_zeroes(no_zeroes: bool) -> None:
    flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn = negotiated(flags)
    conn.receive_data(option(c.OPT_EXPORT_NAME, b"vol"))
    ev = conn.next_event()
    assert ev == p.ExportNameRequest("vol")
    reply = conn.reply_export_name(INFO)
    assert len(reply) == (10 if no_zeroes else 134)
    size, tflags = struct.unpack_from(">QH", reply)
    assert size == INFO.size and tflags == conn.transmission_flags
    assert conn.state is p.State.TRANSMISSION


def test_refused_export_name_closes() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_EXPORT_NAME, b"nope"))
    conn.next_event()
    conn.refuse_export_name()
    assert conn.state is p.State.CLOSED
    with pytest.raises(RuntimeError):
        conn.reply_option_error(c.REP_ERR_UNKNOWN)


def test_export_name_that_is_not_a_string_ends_the_connection() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_EXPORT_NAME, b"\xff"))
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_set_meta_context_needs_structured_replies() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_SET_META_CONTEXT, meta_data("vol", c.BASE_ALLOCATION)))
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ERR_INVALID


def test_set_meta_context_selects_base_allocation_for_that_export() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
    conn.next_event()
    conn.receive_data(option(c.OPT_SET_META_CONTEXT, meta_data("vol", "qemu:x", c.BASE_ALLOCATION)))
    ev = conn.next_event()
    assert ev == p.MetaContextRequest("vol", ("qemu:x", c.BASE_ALLOCATION), True)
    replies = parse_option_replies(conn.reply_meta_context(True))
    assert replies == [
        (c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (c.OPT_SET_META_CONTEXT, c.REP_ACK, b""),
    ]
    conn.receive_data(option(c.OPT_GO, info_data("vol")))
    conn.next_event()
    conn.reply_info(INFO)
    assert conn.meta_context_id == 1


def test_meta_context_for_another_export_is_not_active() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
    conn.next_event()
    conn.receive_data(option(c.OPT_SET_META_CONTEXT, meta_data("other", c.BASE_ALLOCATION)))
    conn.next_event()
    conn.reply_meta_context(True)
    conn.receive_data(option(c.OPT_GO, info_data("vol")))
    conn.next_event()
    conn.reply_info(INFO)
    assert conn.meta_context_id == 0


@pytest.mark.parametrize(
    ("queries", "found"),
    [((), True), (("base:",), True), ((c.BASE_ALLOCATION,), True), (("x-foo:bar",), False)],
)
def test_list_meta_context(queries: tuple[str, ...], found: bool) -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_LIST_META_CONTEXT, meta_data("vol", *queries)))
    assert isinstance(conn.next_event(), p.MetaContextRequest)
    replies = parse_option_replies(conn.reply_meta_context(True))
    expected = [(c.OPT_LIST_META_CONTEXT, c.REP_ACK, b"")]
    if found:
        ctx = (c.OPT_LIST_META_CONTEXT, c.REP_META_CONTEXT, b"\0\0\0\0base:allocation")
        expected.insert(0, ctx)
    assert replies == expected


def test_meta_context_for_unknown_export_and_malformed_requests() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_LIST_META_CONTEXT, meta_data("nope")))
    conn.next_event()
    ((_, rtype, _),) = parse_option_replies(conn.reply_meta_context(False))
    assert rtype == c.REP_ERR_UNKNOWN
    for bad in (
        b"",
        meta_data("vol")[:-1],
        meta_data("vol", "base:") + b"x",
        struct.pack(">I", 3) + b"vol" + struct.pack(">II", 1, 50) + b"short",
    ):
        conn.receive_data(option(c.OPT_LIST_META_CONTEXT, bad))
        ev = conn.next_event()
        assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ERR_INVALID


def test_option_split_byte_by_byte_gives_the_same_events() -> None:
    stream = option(c.OPT_STRUCTURED_REPLY) + option(c.OPT_INFO, info_data("vol", c.INFO_NAME))
    conn = negotiated()
    got: list[object] = []
    for b in stream:
        conn.receive_data(bytes([b]))
        got.extend(e for e in events(conn) if e is not p.NEED_DATA and e is not p.PAUSED)
    assert [type(e) for e in got] == [p.OptionHandled, p.ExportInfoRequest]
    assert conn.buffered == 0


def test_oversized_option_is_drained_and_refused() -> None:
    conn = negotiated()
    big = c.MAX_OPTION_DATA + 1
    conn.receive_data(struct.pack(">QII", c.IHAVEOPT, 99, big))
    sent = 0
    while sent < big:
        assert conn.next_event() is p.NEED_DATA
        assert conn.buffered < 64
        n = min(10000, big - sent)
        conn.receive_data(b"z" * n)
        sent += n
    ev = conn.next_event()
    assert isinstance(ev, p.OptionHandled) and ev.reply_type == c.REP_ERR_TOO_BIG
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
    assert isinstance(conn.next_event(), p.OptionHandled)


@pytest.mark.parametrize(
    ("opt", "length"), [(99, c.MAX_OPTION_DRAIN + 1), (c.OPT_EXPORT_NAME, c.MAX_OPTION_DATA + 1)]
)
def test_absurd_option_lengths_end_the_connection(opt: int, length: int) -> None:
    conn = negotiated()
    conn.receive_data(struct.pack(">QII", c.IHAVEOPT, opt, length))
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_eof_in_the_middle_of_a_message_is_reported() -> None:
    conn = negotiated()
    conn.receive_data(option(c.OPT_LIST)[:10])
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(b"")
    ev = conn.next_event()
    assert ev == p.ConnectionClosed(10)
    assert conn.next_event() is p.NEED_DATA


# ----------------------------------------------------------------------------- transmission


def test_read_request() -> None:
    conn = transmission()
    conn.receive_data(request(c.CMD_READ, 4096, 512, handle=99))
    ev = conn.next_event()
    assert ev == p.Request(99, c.CMD_READ, 0, 4096, 512, None)
    assert conn.next_event() is p.NEED_DATA


def test_write_payload_in_one_piece_is_not_copied() -> None:
    conn = transmission()
    payload = bytes(range(256)) * 16
    conn.receive_data(request(c.CMD_WRITE, 0, len(payload), c.CMD_FLAG_FUA) + payload)
    ev = conn.next_event()
    assert isinstance(ev, p.Request) and ev.flags == c.CMD_FLAG_FUA
    assert isinstance(ev.payload, memoryview) and ev.payload.readonly
    assert bytes(ev.payload) == payload


def test_write_payload_in_pieces_is_assembled() -> None:
    conn = transmission()
    payload = bytes(range(256)) * 200
    stream = request(c.CMD_WRITE, 100, len(payload)) + payload + request(c.CMD_FLUSH, handle=8)
    got: list[p.Request] = []
    for i in range(0, len(stream), 1000):
        conn.receive_data(stream[i : i + 1000])
        got.extend(e for e in events(conn) if isinstance(e, p.Request))
        assert conn.buffered <= INFO.max_block + p.REQUEST_SIZE
    write, flush = got
    assert write.payload is not None and bytes(write.payload) == payload
    assert (flush.command, flush.handle) == (c.CMD_FLUSH, 8)


def test_write_payload_received_in_place() -> None:
    conn = transmission()
    payload = random.randbytes(50000)
    conn.receive_data(request(c.CMD_WRITE, 0, len(payload)) + payload[:100])
    assert conn.next_event() is p.NEED_DATA
    received = 100
    while (view := conn.body_buffer()) is not None:
        n = min(len(view), 7000)
        view[:n] = payload[received : received + n]
        conn.body_received(n)
        received += n
        assert (conn.next_event() is p.NEED_DATA) == (received < len(payload))
    assert received == len(payload)
    with pytest.raises(ValueError):
        conn.body_received(1)


def test_body_received_must_match_a_body_buffer() -> None:
    conn = transmission()
    assert conn.body_buffer() is None
    with pytest.raises(ValueError):
        conn.body_received(10)


def rejected(conn: p.ServerConnection, data: bytes) -> p.RequestRejected:
    conn.receive_data(data)
    ev = conn.next_event()
    assert isinstance(ev, p.RequestRejected), ev
    # The stream is still in step: a following request parses.
    conn.receive_data(request(c.CMD_FLUSH, handle=1234))
    nxt = conn.next_event()
    assert isinstance(nxt, p.Request) and nxt.handle == 1234
    return ev


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (request(9, 0, 0), c.EINVAL),  # unknown command
        (request(c.CMD_RESIZE, 0, 0), c.EINVAL),
        (request(c.CMD_READ, 0, 512, flags=c.CMD_FLAG_REQ_ONE), c.EINVAL),
        (request(c.CMD_READ, 0, 512, flags=1 << 7), c.EINVAL),
        (request(c.CMD_READ, (1 << 20) - 100, 512), c.EINVAL),
        (request(c.CMD_READ, 1 << 40, 1), c.EINVAL),
        (request(c.CMD_READ, 0, 64 * 1024 + 1), c.EINVAL),
        (request(c.CMD_TRIM, (1 << 20) - 100, 512), c.EINVAL),
        (request(c.CMD_WRITE_ZEROES, (1 << 20) - 100, 512), c.ENOSPC),
        (request(c.CMD_WRITE_ZEROES, 0, 512, flags=c.CMD_FLAG_DF), c.EINVAL),
        (request(c.CMD_CACHE, 1 << 20, 1), c.EINVAL),
        (request(c.CMD_FLUSH, 4096, 0), c.EINVAL),
        (request(c.CMD_BLOCK_STATUS, 0, 0), c.EINVAL),
        (request(c.CMD_BLOCK_STATUS, 0, (1 << 20) + 1), c.EINVAL),
        (request(c.CMD_WRITE, (1 << 20) - 2, 4) + b"abcd", c.ENOSPC),
        (request(c.CMD_WRITE, 0, 4, flags=c.CMD_FLAG_REQ_ONE) + b"abcd", c.EINVAL),
    ],
)
def test_invalid_requests_are_refused_and_the_stream_stays_in_step(req: bytes, error: int) -> None:
    conn = transmission()
    ev = rejected(conn, req)
    assert ev.error == error
    assert ev.message
    assert ev.data == conn.reply_error(ev.handle, error, ev.message)


def test_df_without_structured_replies_and_block_status_without_context() -> None:
    conn = transmission(structured=False, meta=False)
    assert rejected(conn, request(c.CMD_READ, 0, 512, flags=c.CMD_FLAG_DF)).error == c.EINVAL
    assert rejected(conn, request(c.CMD_BLOCK_STATUS, 0, 512)).error == c.EINVAL
    # Simple replies carry just the error number.
    assert conn.reply_error(5, c.EINVAL, "x") == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 22, 5)


def test_writes_to_a_read_only_export_get_eperm() -> None:
    conn = transmission(RO_INFO)
    assert rejected(conn, request(c.CMD_WRITE, 0, 3) + b"abc").error == c.EPERM
    assert rejected(conn, request(c.CMD_TRIM, 0, 512)).error == c.EPERM
    assert rejected(conn, request(c.CMD_WRITE_ZEROES, 0, 512)).error == c.EPERM
    conn.receive_data(request(c.CMD_READ, 0, 512))
    assert isinstance(conn.next_event(), p.Request)


def test_oversize_write_payload_is_drained_without_buffering() -> None:
    conn = transmission()
    length = INFO.max_block * 3
    conn.receive_data(request(c.CMD_WRITE, 0, length, handle=5))
    sent = 0
    while sent < length:
        assert conn.next_event() is p.NEED_DATA
        assert conn.buffered <= p.REQUEST_SIZE
        n = min(20000, length - sent)
        conn.receive_data(b"w" * n)
        sent += n
    ev = conn.next_event()
    assert isinstance(ev, p.RequestRejected) and ev.error == c.EINVAL and ev.handle == 5
    conn.receive_data(request(c.CMD_READ, 0, 512, handle=6))
    nxt = conn.next_event()
    assert isinstance(nxt, p.Request) and nxt.handle == 6


def test_lying_write_length_ends_the_connection() -> None:
    conn = transmission()
    conn.receive_data(request(c.CMD_WRITE, 0, 0xFFFFFFFF))
    with pytest.raises(p.ProtocolError):
        conn.next_event()
    assert conn.buffered == 0


def test_bad_request_magic_ends_the_connection() -> None:
    conn = transmission()
    conn.receive_data(b"\x00" * 28)
    with pytest.raises(p.ProtocolError):
        conn.next_event()


def test_unaligned_requests_with_a_minimum_block_size() -> None:
    info = ExportInfo("vol", "", 1 << 20, False, min_block=512, max_block=64 * 1024)
    conn = transmission(info)
    assert rejected(conn, request(c.CMD_READ, 100, 512)).error == c.EINVAL
    assert rejected(conn, request(c.CMD_TRIM, 0, 100)).error == c.EINVAL
    conn.receive_data(request(c.CMD_READ, 512, 1024))
    assert isinstance(conn.next_event(), p.Request)


def test_large_trim_and_write_zeroes_are_allowed() -> None:
    info = ExportInfo("vol", "", 1 << 30, False, max_block=64 * 1024)
    conn = transmission(info)
    conn.receive_data(request(c.CMD_TRIM, 0, 1 << 29) + request(c.CMD_WRITE_ZEROES, 0, 1 << 29))
    assert isinstance(conn.next_event(), p.Request)
    assert isinstance(conn.next_event(), p.Request)


def test_disc_ends_reading() -> None:
    conn = transmission()
    conn.receive_data(request(c.CMD_READ, 0, 1) + request(c.CMD_DISC) + request(c.CMD_READ))
    assert isinstance(conn.next_event(), p.Request)
    assert isinstance(conn.next_event(), p.Disconnect)
    assert conn.state is p.State.CLOSED
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(b"anything")
    assert conn.next_event() is p.NEED_DATA


def test_truncated_header_then_eof() -> None:
    conn = transmission()
    conn.receive_data(request(c.CMD_READ, 0, 1)[:20])
    assert conn.next_event() is p.NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == p.ConnectionClosed(20)


# ----------------------------------------------------------------------------- replies


def test_simple_replies() -> None:
    conn = transmission(structured=False, meta=False)
    assert conn.reply_ok(3) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 3)
    bufs = conn.reply_read(3, 0, b"data")
    assert b"".join(bufs) == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 3) + b"data"
    # Zeroes go out as data: there is no hole in a simple reply.
    assert b"".join(conn.reply_read(3, 0, bytes(8192)))[16:] == bytes(8192)


def test_structured_read_replies() -> None:
    conn = transmission()
    header = b"".join(conn.reply_read(4, 512, b"xyz"))
    magic, flags, rtype, handle, length, offset = struct.unpack_from(">IHHQIQ", header)
    assert (magic, flags, rtype, handle, length, offset) == (
        c.STRUCTURED_REPLY_MAGIC,
        c.REPLY_FLAG_DONE,
        c.REPLY_TYPE_OFFSET_DATA,
        4,
        11,
        512,
    )
    assert header[28:] == b"xyz"
    hole = b"".join(conn.reply_read(4, 8192, memoryview(bytes(8192))))
    assert struct.unpack(">IHHQIQI", hole) == (
        c.STRUCTURED_REPLY_MAGIC,
        c.REPLY_FLAG_DONE,
        c.REPLY_TYPE_OFFSET_HOLE,
        4,
        12,
        8192,
        8192,
    )
    # Small zero reads and zero-length reads.
    assert len(b"".join(conn.reply_read(4, 0, bytes(100)))) == 28 + 100
    none = b"".join(conn.reply_read(4, 0, b""))
    assert struct.unpack(">IHHQI", none) == (
        c.STRUCTURED_REPLY_MAGIC,
        c.REPLY_FLAG_DONE,
        c.REPLY_TYPE_NONE,
        4,
        0,
    )


def test_structured_error_carries_the_message() -> None:
    conn = transmission()
    raw = conn.reply_error(9, c.ENOSPC, "disk full")
    _magic, _flags, rtype, handle, length, error, mlen = struct.unpack_from(">IHHQIIH", raw)
    assert (rtype, handle, length, error, mlen) == (c.REPLY_TYPE_ERROR, 9, 6 + 9, c.ENOSPC, 9)
    assert raw[26:] == b"disk full"
    # Errors without a wire value become EIO; long messages are cut to the string limit.
    raw = conn.reply_error(9, 16, "x" * 10000)
    assert struct.unpack_from(">IHHQIIH", raw)[5:] == (c.EIO, c.MAX_STRING)


def test_block_status_reply_merges_clips_and_honours_req_one() -> None:
    conn = transmission()

    def runs(raw: bytes) -> list[tuple[int, int]]:
        _, _, rtype, _, length = struct.unpack_from(">IHHQI", raw)
        assert rtype == c.REPLY_TYPE_BLOCK_STATUS and length == len(raw) - 20
        (ctx,) = struct.unpack_from(">I", raw, 20)
        assert ctx == conn.meta_context_id == 1
        vals = struct.unpack_from(f">{(length - 4) // 4}I", raw, 24)
        return list(zip(vals[0::2], vals[1::2], strict=True))

    ext = [(4096, 0), (4096, 0), (8192, 3), (0, 1), (1 << 20, 0)]
    assert runs(conn.reply_block_status(1, 20000, ext)) == [(8192, 0), (8192, 3), (3616, 0)]
    assert runs(conn.reply_block_status(1, 20000, ext, req_one=True)) == [(8192, 0)]
    assert runs(conn.reply_block_status(1, 100, [])) == [(100, 0)]


# ----------------------------------------------------------------------------- fuzzing

LIMIT = INFO.max_block + p.REQUEST_SIZE


def feed(conn: p.ServerConnection, chunk: bytes) -> None:
    """Give bytes to the machine the way the server does: straight into a body being
    collected where there is one (as recv_into would), the rest through receive_data."""
    while chunk:
        body = conn.body_buffer()
        if body is None:
            conn.receive_data(chunk)
            return
        n = min(len(body), len(chunk))
        body[:n] = chunk[:n]
        conn.body_received(n)
        chunk = chunk[n:]


def drive(conn: p.ServerConnection, chunks: list[bytes], answer_error: bool = False) -> None:
    """Feed chunks, answering every option; only ProtocolError may escape."""
    for chunk in chunks:
        feed(conn, chunk)
        while True:
            try:
                ev = conn.next_event()
            except p.ProtocolError:
                assert conn.buffered == 0
                return
            if ev is p.NEED_DATA:
                assert conn.buffered <= LIMIT
                break
            assert ev is not p.PAUSED
            if isinstance(ev, p.ListExports):
                conn.reply_list([("vol", "live")])
            elif isinstance(ev, p.ExportInfoRequest):
                if answer_error or ev.name != "vol":
                    conn.reply_option_error(c.REP_ERR_UNKNOWN, "no")
                else:
                    conn.reply_info(INFO)
            elif isinstance(ev, p.ExportNameRequest):
                if ev.name == "vol":
                    conn.reply_export_name(INFO)
                else:
                    conn.refuse_export_name()
            elif isinstance(ev, p.MetaContextRequest):
                conn.reply_meta_context(ev.export_name == "vol")
            elif isinstance(ev, p.Request):
                if ev.payload is not None:
                    assert len(ev.payload) == ev.length <= INFO.max_block
                assert ev.offset + ev.length <= INFO.size
            elif isinstance(ev, p.RequestRejected | p.OptionHandled | p.AbortRequest):
                assert ev.data
    conn.receive_data(b"")
    try:
        while conn.next_event() not in (p.NEED_DATA, p.PAUSED):
            pass
    except p.ProtocolError:
        pass


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(0, x), len(data)) for x in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


VALID_SESSION = (
    struct.pack(">I", 3)
    + option(c.OPT_STRUCTURED_REPLY)
    + option(c.OPT_LIST)
    + option(c.OPT_LIST_META_CONTEXT, meta_data("vol"))
    + option(c.OPT_SET_META_CONTEXT, meta_data("vol", c.BASE_ALLOCATION))
    + option(c.OPT_INFO, info_data("vol", c.INFO_NAME, c.INFO_BLOCK_SIZE))
    + option(c.OPT_GO, info_data("vol", c.INFO_BLOCK_SIZE))
    + request(c.CMD_WRITE, 0, 4096, c.CMD_FLAG_FUA)
    + b"p" * 4096
    + request(c.CMD_READ, 0, 4096, c.CMD_FLAG_DF)
    + request(c.CMD_WRITE_ZEROES, 0, 8192, c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO)
    + request(c.CMD_BLOCK_STATUS, 0, 1 << 20, c.CMD_FLAG_REQ_ONE)
    + request(c.CMD_TRIM, 4096, 4096)
    + request(c.CMD_CACHE, 0, 4096)
    + request(c.CMD_FLUSH)
    + request(c.CMD_WRITE, 1000, 70000)
    + b"q" * 70000
    + request(c.CMD_DISC)
)


def test_the_valid_session_runs_to_the_end() -> None:
    conn = p.ServerConnection()
    seen: list[object] = []
    conn.receive_data(VALID_SESSION)
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA:
            break
        seen.append(ev)
        if isinstance(ev, p.ListExports):
            conn.reply_list([])
        elif isinstance(ev, p.MetaContextRequest):
            conn.reply_meta_context(True)
        elif isinstance(ev, p.ExportInfoRequest):
            conn.reply_info(INFO)
    assert [type(e).__name__ for e in seen] == [
        "OptionHandled",
        "ListExports",
        "MetaContextRequest",
        "MetaContextRequest",
        "ExportInfoRequest",
        "ExportInfoRequest",
        "Request",
        "Request",
        "Request",
        "Request",
        "Request",
        "Request",
        "Request",
        "RequestRejected",
        "Disconnect",
    ]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_fuzz_random_bytes_in_handshake(data: bytes, cuts: list[int]) -> None:
    conn = p.ServerConnection()
    conn.initiate()
    drive(conn, split(struct.pack(">I", 3) + data, cuts))


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8))
def test_fuzz_random_bytes_in_transmission(data: bytes, cuts: list[int]) -> None:
    conn = transmission()
    drive(conn, split(data, cuts))


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_SESSION) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(VALID_SESSION)),
    st.lists(st.integers(0, len(VALID_SESSION)), max_size=10),
    st.booleans(),
)
def test_fuzz_mutated_and_truncated_sessions(
    flips: list[tuple[int, int]], cut: int, cuts: list[int], answer_error: bool
) -> None:
    data = bytearray(VALID_SESSION)
    for pos, value in flips:
        data[pos] = value
    conn = p.ServerConnection()
    drive(conn, split(bytes(data[:cut]), cuts), answer_error)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*range(10), 0xFFFF]),
            st.integers(0, 0x3F),
            st.one_of(st.integers(0, 1 << 21), st.just((1 << 64) - 1)),
            st.one_of(st.integers(0, 1 << 17), st.just(0xFFFFFFFF)),
        ),
        max_size=12,
    ),
    st.lists(st.integers(0, 300000), max_size=10),
)
def test_fuzz_request_headers(reqs: list[tuple[int, int, int, int]], cuts: list[int]) -> None:
    stream = b""
    for cmd, flags, offset, length in reqs:
        stream += request(cmd, offset, length, flags)
        if cmd == c.CMD_WRITE and length <= 1 << 17:
            stream += b"d" * length
    drive(transmission(), split(stream, cuts))
