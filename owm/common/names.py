"""Names: volumes (``NAME``), preserved images (``NAME@N``) and the exports that serve them.

This is the one parser every entry point uses (NBD options, the control API, the CLI, the
pool), so that a name means the same thing everywhere.  Only the canonical spelling is accepted:
a volume name is ASCII letters, digits, ``.``, ``_`` and ``-``; an image number is ASCII digits
without a sign, spaces or leading zeroes (``x@0``, ``x@12``; never ``x@00``, ``x@+1``, ``x@ 1``,
``x@²`` or ``x@٠``, all of which Python's ``int`` or ``str.isdigit`` would take).  Patterns are
matched with ``fullmatch``, so a trailing newline is never let through by ``$``.
"""

from __future__ import annotations

import re

from owm.common.errors import InvalidRequest

VOLUME_NAME_MAX = 64
_VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_NUMBER = re.compile(r"0|[1-9][0-9]{0,17}", re.ASCII)  # below 10**18: fits every 64-bit field


def is_volume_name(name: str) -> bool:
    """True if ``name`` is a valid volume name, exactly as written."""
    return _VOLUME.fullmatch(name) is not None


def check_volume_name(name: str) -> str:
    """``name`` itself if it is a valid volume name, else an InvalidRequest saying why."""
    if not is_volume_name(name):
        raise InvalidRequest(
            f"{name!r} is not a valid volume name; use letters, digits, '.', '_' and '-' "
            f"(no '@' or '/'; at most {VOLUME_NAME_MAX}, starting with a letter or digit)"
        )
    return name


def is_generation(text: str) -> bool:
    """True if ``text`` is an image number N of ``NAME@N`` in canonical form: '0', '7', '12'."""
    return _NUMBER.fullmatch(text) is not None


def parse_image_name(image: str) -> tuple[str, int]:
    """'vol@3' -> ('vol', 3); anything else is an InvalidRequest."""
    name, sep, number = image.rpartition("@")
    if not sep or not is_volume_name(name) or not is_generation(number):
        raise InvalidRequest(
            f"{image!r} is not an image name; preserved images are named NAME@N "
            "(N in plain digits, as 0 or 12)"
        )
    return name, int(number)


def parse_export_name(export: str) -> tuple[str, int | None]:
    """An NBD export name: 'vol' -> ('vol', None), 'vol@3' -> ('vol', 3); else InvalidRequest."""
    if "@" in export:
        return parse_image_name(export)
    return check_volume_name(export), None
