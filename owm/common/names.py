"""Names of preserved images: ``NAME@N`` is the image of generation N of volume NAME."""

from __future__ import annotations

from owm.common.errors import InvalidRequest


def parse_image_name(image: str) -> tuple[str, int]:
    """'vol@3' -> ('vol', 3); anything else is an InvalidRequest."""
    name, sep, number = image.rpartition("@")
    if not sep or not name or not number.isdigit():
        raise InvalidRequest(f"'{image}' is not an image name; preserved images are named NAME@N")
    return name, int(number)
