"""The control API's endpoints for consistency groups and their preserved sets ``G@N``.

``/v1/groups`` lists and creates groups, ``/v1/groups/{name}`` shows and deletes one,
``/v1/groups/{name}/preserve`` cuts every member at one instant; ``/v1/sets/{image}`` shows a
set, and its ``wait``, ``cutover`` and ``release`` act on every member image.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol, cast

from aiohttp import web

from owm.common.names import check_volume_name
from owm.control.body import Body
from owm.control.common import ShuttingDown, completed, ctx_of, name_arg, no_body, ok
from owm.control.context import ControlContext
from owm.control.routes import refuse_while_closing

log = logging.getLogger("owm.control")
routes = web.RouteTableDef()
JSON = dict[str, Any]


class GroupsAPI(Protocol):
    """The slice of ``owm.pool.groups.Groups`` these endpoints use."""

    def list(self) -> list[JSON]: ...

    def status(self, name: str) -> JSON: ...

    def set_status(self, image: str) -> JSON: ...

    async def create(self, name: str, members: Sequence[str]) -> JSON: ...

    async def delete(self, name: str) -> None: ...

    async def preserve(self, name: str, instant: bool = False) -> JSON: ...

    async def cutover(self, image: str) -> None: ...

    async def wait_drained(self, image: str, timeout: float | None) -> bool: ...

    async def release(self, image: str) -> None: ...


def groups_of(ctx: ControlContext) -> GroupsAPI:
    return cast(GroupsAPI, getattr(ctx.pool, "groups"))  # noqa: B009 (not in ControlledPool)


@routes.get("/v1/groups")
async def list_groups(request: web.Request) -> web.Response:
    return ok(groups_of(ctx_of(request)).list())


@routes.post("/v1/groups")
async def create_group(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await Body.read(request)
    name = body.text("name", required=True)
    members = body.text_list("members", required=True)
    body.done()
    assert name is not None and members is not None
    check_volume_name(name)
    refuse_while_closing(ctx, f"creating group {name}")
    status = await completed(groups_of(ctx).create(name, members))
    return ok(status, 201)


@routes.get("/v1/groups/{name}")
async def show_group(request: web.Request) -> web.Response:
    return ok(groups_of(ctx_of(request)).status(name_arg(request, "name")))


@routes.delete("/v1/groups/{name}")
async def delete_group(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    name = name_arg(request, "name")
    await no_body(request)
    groups_of(ctx).status(name)
    refuse_while_closing(ctx, f"deleting group {name}")
    await completed(groups_of(ctx).delete(name))
    return ok({"deleted": name})


@routes.post("/v1/groups/{name}/preserve")
async def preserve_group(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    name = name_arg(request, "name")
    body = await Body.read(request)
    instant = body.flag("instant")
    body.done()
    groups_of(ctx).status(name)
    refuse_while_closing(ctx, f"preserving group {name}")
    result = await completed(groups_of(ctx).preserve(name, instant=instant))
    log.info("preserved set=%s instant=%s", result.get("name"), instant)
    return ok(result, 201)


@routes.get("/v1/sets/{image}")
async def show_set(request: web.Request) -> web.Response:
    return ok(groups_of(ctx_of(request)).set_status(name_arg(request, "image")))


@routes.post("/v1/sets/{image}/wait")
async def wait_set(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    body = await Body.read(request)
    timeout = body.seconds("timeout")
    body.done()
    groups = groups_of(ctx)
    groups.set_status(image)
    waiter = asyncio.ensure_future(groups.wait_drained(image, timeout))
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not waiter.done():
            waiter.cancel()
    if not waiter.done() or waiter.cancelled():
        raise ShuttingDown("the daemon is shutting down; the set was not drained yet")
    return ok({"image": image, "drained": bool(waiter.result()),
               "status": groups.set_status(image)})


@routes.post("/v1/sets/{image}/cutover")
async def cutover_set(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    await no_body(request)
    groups = groups_of(ctx)
    before = groups.set_status(image)
    await completed(groups.cutover(image))
    after = groups.set_status(image)
    cut = before["state"] == "draining" and after["consistency"] == "crash-consistent"
    return ok({"image": image, "cut_over": cut, "status": after})


@routes.post("/v1/sets/{image}/release")
async def release_set(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    await no_body(request)
    groups = groups_of(ctx)
    entry = groups.set_status(image)
    refuse_while_closing(ctx, f"the release of {image}")
    await completed(groups.release(image))
    freed = sum(int(m.get("bytes_on_disk") or 0) for m in entry["members"])
    return ok({"image": image, "released": True, "bytes_freed": freed,
               "members": [m["name"] for m in entry["members"]]})


# -- OpenAPI: joined into the document by owm.control.openapi ----------------------------------

def _op(summary: str, op_id: str, ok_status: str, body: JSON | None = None) -> JSON:
    error = {"$ref": "#/components/schemas/Error"}
    out: JSON = {
        "summary": summary, "operationId": op_id,
        "responses": {
            ok_status: {"description": "Done.", "content": {"application/json": {
                "schema": {"type": "object"}}}},
            **{s: {"description": d, "content": {"application/json": {"schema": error}}}
               for s, d in (("400", "A bad name or field."), ("404", "No such group or set."),
                            ("409", "Wrong state (a set draining, a volume in a group)."),
                            ("503", "The daemon is shutting down."))},
        },
    }
    if body is not None:
        out["requestBody"] = {"content": {"application/json": {"schema": body}}}
    return out


_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "Group name."}]
_SET = [{"name": "image", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": "^.+@[0-9]+$"},
         "description": "A group's preserved set, G@N."}]
_CREATE = {"type": "object", "required": ["name", "members"],
           "properties": {"name": {"type": "string"},
                          "members": {"type": "array", "items": {"type": "string"}}}}
OPENAPI_PATHS: JSON = {
    "/v1/groups": {
        "get": _op("Every consistency group with its sets.", "listGroups", "200"),
        "post": _op("Create a group of volumes (a volume is in at most one group).",
                    "createGroup", "201", _CREATE),
    },
    "/v1/groups/{name}": {
        "parameters": _NAME,
        "get": _op("One group: its members and sets.", "showGroup", "200"),
        "delete": _op("Delete a group that has no sets left (its volumes stay).", "deleteGroup",
                      "200"),
    },
    "/v1/groups/{name}/preserve": {
        "parameters": _NAME,
        "post": _op("Preserve every member at one instant: set G@N.", "preserveGroup", "201",
                    {"type": "object", "properties": {"instant": {"type": "boolean"}}}),
    },
    "/v1/sets/{image}": {
        "parameters": _SET,
        "get": _op("A set: its rolled-up label and every member image.", "showSet", "200"),
    },
    "/v1/sets/{image}/wait": {
        "parameters": _SET,
        "post": _op("Wait until every member image is drained.", "waitSet", "200",
                    {"type": "object", "properties": {"timeout": {"type": ["number", "null"]}}}),
    },
    "/v1/sets/{image}/cutover": {
        "parameters": _SET,
        "post": _op("Cut over every member image still draining.", "cutoverSet", "200"),
    },
    "/v1/sets/{image}/release": {
        "parameters": _SET,
        "post": _op("Release every member image (all drained) and forget the set.",
                    "releaseSet", "200"),
    },
}
