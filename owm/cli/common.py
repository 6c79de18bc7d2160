"""What every ``owm`` command shares: the exit type, per-invocation state, option types.

``main`` (the command group) and ``backup`` (the backup commands) both build on this module;
it imports neither of them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from owm.common.errors import InvalidRequest
from owm.common.names import parse_image_name as split_image
from owm.common.sizes import parse_size

if TYPE_CHECKING:
    from rich.console import Console

JSON = dict[str, Any]

DEFAULT_POOL = "owm-pool"
METHODS = ("cow", "log", "mirror")


class Fail(Exception):
    """End the command with ``code``, after printing ``message`` (if any) on stderr."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class State:
    """Per-invocation settings shared by the commands."""

    pool: Path

    # rich is imported when something is printed through it, not at start-up (see quick.py).
    @property
    def out(self) -> Console:
        from rich.console import Console

        # Piped output is read by scripts and people alike: don't wrap tables at rich's
        # 80-column default for files (COLUMNS, when set, still wins).
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        return Console(highlight=False, width=140 if wide else None)

    @property
    def err(self) -> Console:
        from rich.console import Console

        return Console(stderr=True, highlight=False)


# ----------------------------------------------------------------------------------------------
# Parameter types and shared options


class SizeType(click.ParamType[int]):
    """A byte count: 4096, 64K, 1G, 1.5T."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except InvalidRequest as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail(f"'{value}' is not a size greater than zero", param, ctx)
        return size


class ImageType(click.ParamType[str]):
    """A preserved image name, NAME@N."""

    name = "NAME@N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            split_image(str(value))
        except InvalidRequest as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


SIZE = SizeType()
IMAGE = ImageType()
F = TypeVar("F", bound=Callable[..., Any])


def set_pool(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).pool = Path(value)


def pool_option(f: F) -> F:
    """``--pool`` is global, and every subcommand accepts it too (``owm serve --pool DIR``)."""
    option = click.option(
        "--pool", metavar="DIR", expose_value=False, is_eager=True, callback=set_pool,
        help="Pool directory (overrides the global --pool).",
    )
    return option(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(f)


def state() -> State:
    return click.get_current_context().ensure_object(State)


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))
