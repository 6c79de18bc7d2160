"""Counting the Python calls a piece of code makes, for the tests that hold a fast path to
its budget of calls (a count, unlike a time, is the same on a loaded machine)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def calls_in(path_part: str) -> Iterator[list[int]]:
    """Count the Python calls made in files whose path contains ``path_part``."""
    count = [0]

    def hook(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call" and path_part in frame.f_code.co_filename:
            count[0] += 1

    sys.setprofile(hook)
    try:
        yield count
    finally:
        sys.setprofile(None)
