"""Parsing and printing of byte sizes with K/M/G/T/P suffixes (binary multiples), and limits.

Parsing is exact (fractions, never a float): '9007199254740993' is that
number, '1.5K' is 1536, and a number with hundreds of digits is refused with a sentence instead
of overflowing.  A volume is at most ``MAX_VOLUME_SIZE`` bytes (4 PiB) and at most
``MAX_CHUNKS`` chunks, so its chunk tables stay addressable and cheap.
"""

from __future__ import annotations

import re
from fractions import Fraction

from owm.common.errors import InvalidRequest

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only: \d would take '٣'.
_PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:I?B)?\s*",
                      re.IGNORECASE | re.ASCII)
_MAX_DIGITS = 30  # more digits than any size owm accepts: refused before it becomes a number
MAX_SIZE = 1 << 64  # nothing owm handles (NBD offsets, file sizes) is longer than this

MAX_VOLUME_SIZE = 1 << 52  # 4 PiB: the largest volume owm creates
MAX_CHUNKS = 1 << 40  # 4 PiB of 4 KiB chunks: the most chunks a volume may have


def parse_size(text: str | int) -> int:
    """Turn '64K', '1G', '1.5M', '4096' into bytes; raise InvalidRequest for anything else."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidRequest("a size cannot be negative")
        if text > MAX_SIZE:
            raise InvalidRequest("the size is too large; owm handles at most 2**64 bytes")
        return text
    shown = text if len(text) <= 40 else text[:40] + "…"
    match = _PATTERN.fullmatch(text) if len(text) <= 1000 else None
    if not match:
        raise InvalidRequest(
            f"{shown!r} is not a size; use a number with an optional K, M, G, T or P suffix"
        )
    number, unit = match.groups()
    if len(number) > _MAX_DIGITS:
        raise InvalidRequest(f"the size {shown!r} is too large; owm handles at most 2**64 bytes")
    value = Fraction(number) * _UNITS[unit.upper()]
    if value.denominator != 1:
        raise InvalidRequest(f"size {text.strip()!r} is not a whole number of bytes")
    size = int(value)
    if size > MAX_SIZE:
        raise InvalidRequest("the size is too large; owm handles at most 2**64 bytes")
    return size


def check_volume_size(size: int, chunk_size: int) -> None:
    """InvalidRequest unless a volume of ``size`` bytes in ``chunk_size`` chunks is allowed."""
    if size > MAX_VOLUME_SIZE:
        raise InvalidRequest(
            f"a volume can be at most {format_size(MAX_VOLUME_SIZE)} ({MAX_VOLUME_SIZE} bytes)"
        )
    if chunk_size > 0 and -(-size // chunk_size) > MAX_CHUNKS:
        raise InvalidRequest(
            f"a volume can have at most {MAX_CHUNKS} chunks; choose a larger chunk size"
        )


def format_size(n: int) -> str:
    """Print bytes compactly: 65536 -> '64K', 1536 -> '1.5K', 100 -> '100B'."""
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"
