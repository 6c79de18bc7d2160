"""Parsing and printing of byte sizes with K/M/G/T suffixes (binary multiples)."""

from __future__ import annotations

import re

from owm.common.errors import InvalidRequest

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Turn '64K', '1G', '1.5M', '4096' into bytes; raise InvalidRequest for anything else."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidRequest(f"size {text} is negative")
        return text
    match = _PATTERN.match(text)
    if not match:
        raise InvalidRequest(
            f"'{text}' is not a size; use a number with an optional K, M, G or T suffix"
        )
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise InvalidRequest(f"size '{text}' is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Print bytes compactly: 65536 -> '64K', 1536 -> '1.5K', 100 -> '100B'."""
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"
