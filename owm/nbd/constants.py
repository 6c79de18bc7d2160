"""The numbers of the NBD protocol (magics, options, replies, commands, flags, errors).

Values are taken from the protocol document (doc/proto.md of the NetworkBlockDevice project).
Everything on the wire is big-endian.
"""

from __future__ import annotations

import errno as _errno
from typing import Final

# Magics.
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and option requests
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71  # only with NBD_OPT_EXTENDED_HEADERS (unsupported)

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD: Final = 1 << 12

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

OPTION_NAMES: Final = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# Option reply types.
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_ERR_BIT: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_ERR_BIT + 1
REP_ERR_POLICY: Final = REP_ERR_BIT + 2
REP_ERR_INVALID: Final = REP_ERR_BIT + 3
REP_ERR_PLATFORM: Final = REP_ERR_BIT + 4
REP_ERR_TLS_REQD: Final = REP_ERR_BIT + 5
REP_ERR_UNKNOWN: Final = REP_ERR_BIT + 6
REP_ERR_SHUTDOWN: Final = REP_ERR_BIT + 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_ERR_BIT + 8
REP_ERR_TOO_BIG: Final = REP_ERR_BIT + 9
REP_ERR_EXT_HEADER_REQD: Final = REP_ERR_BIT + 10

# NBD_REP_INFO information types.
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# Commands.
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8

COMMAND_NAMES: Final = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

# Command flags.
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4
CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5

# Structured reply flags and chunk types.
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6
REPLY_TYPE_ERROR_BIT: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_ERROR_BIT + 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_ERROR_BIT + 2

# base:allocation status flags.
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
BASE_ALLOCATION: Final = "base:allocation"

# Error values allowed on the wire.
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

WIRE_ERRORS: Final = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

# Local errno values (which differ between platforms) mapped to the wire values.
_LOCAL_TO_WIRE: Final = {
    _errno.EPERM: EPERM,
    _errno.EACCES: EPERM,
    _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC,
    _errno.EDQUOT: ENOSPC,
    _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP,
    _errno.EOPNOTSUPP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}


def wire_errno(local_errno: int | None) -> int:
    """The NBD error value for a local errno; anything without an NBD equivalent is EIO."""
    if local_errno is None:
        return EIO
    return _LOCAL_TO_WIRE.get(local_errno, EIO)


# Limits this implementation enforces.
MAX_STRING: Final = 4096  # export names, descriptions, queries, messages (protocol limit)
MAX_OPTION_DATA: Final = 64 * 1024  # option payloads parsed in memory
MAX_OPTION_DRAIN: Final = 16 * 1024 * 1024  # bigger option payloads end the connection
DEFAULT_MAX_BLOCK: Final = 32 * 1024 * 1024
# A WRITE longer than the advertised maximum is read and thrown away (so the stream stays in
# step) up to this size; a longer claim is treated as a hostile client and disconnected.
MAX_WRITE_DRAIN: Final = 64 * 1024 * 1024
