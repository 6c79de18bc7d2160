"""What every route table of the control API shares: answers, arguments, OpenAPI fragments.

The route modules (``routes``, ``lock_routes``, ``backup_routes``) and ``openapi`` import this
module; it imports none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from owm.common.errors import InvalidRequest, OwmError
from owm.common.names import check_volume_name, parse_image_name
from owm.control.body import Body
from owm.control.context import CONTEXT, ControlContext

T = TypeVar("T")
JSON = dict[str, Any]


class ShuttingDown(OwmError):
    """The daemon stopped while the request was waiting."""


async def completed(operation: Coroutine[Any, Any, T]) -> T:
    """Run a pool operation to its end even if the client hangs up half-way.

    Handlers are cancelled when their client disconnects (so that abandoned waits end);
    a change to the pool must never be interrupted that way.
    """
    return await asyncio.shield(asyncio.ensure_future(operation))


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def ctx_of(request: web.Request) -> ControlContext:
    return request.app[CONTEXT]


def name_arg(request: web.Request, key: str) -> str:
    value = request.match_info[key]  # aiohttp has percent-decoded it
    if not value:
        raise InvalidRequest(f"the {key} in the URL is empty")
    # Volume and image names go through the one parser, so that a name that is not one is a
    # 400 that says so (never a 404 quoting a newline, never a 500).
    if key == "name":
        check_volume_name(value)
    elif key == "image":
        parse_image_name(value)
    return value


async def no_body(request: web.Request) -> None:
    """Endpoints without parameters still refuse a body that is not JSON or has fields."""
    (await Body.read(request)).done()


# -- OpenAPI fragments --------------------------------------------------------------------------


def schema_ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: JSON, description: str) -> JSON:
    """A response (or request body) of JSON with ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_response_spec(description: str) -> JSON:
    return json_content(schema_ref("Error"), description)
