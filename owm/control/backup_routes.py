"""The control API's endpoints for backups and restores, and their OpenAPI description.

``GET /v1/images/{image}/changed-chunks?since=N`` answers the chunk numbers of ``image`` that
may differ from image ``NAME@N`` (the one an owm repository already holds), so that a backup
reads only those.  ``chunks`` is null when the daemon cannot tell (its change maps were lost in
a crash, or it keeps none): the backup then reads everything.  The backup itself runs in the
client (``owm.backup``), reading the image over NBD like any pull-mode backup tool.

A restore into a volume marks it from birth to end: ``POST /v1/volumes/{name}/restore``
creates the volume already marked ``"restore": {"state": "incomplete", "from": ...}`` (in the
catalog, so a crash keeps the mark), and ``DELETE /v1/volumes/{name}/restore`` clears the mark
once the restore has written and flushed its last byte.  While marked, the volume is flagged in
``volume show``/``status`` and refuses preserves (and so backups).

A *live* restore (``"live": true``) makes the volume usable at once and fills it from a source:
``POST /v1/volumes/{name}/restore/source`` connects it, over NBD, to the backup that the
restoring process serves on a Unix socket (``owm.pool.clone`` does the filling).  The restoring
process attaches the source again after a daemon restart, and clears the mark once every chunk
is filled.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from aiohttp import web

from owm.common.errors import InvalidRequest, WrongState
from owm.common.names import is_generation
from owm.common.names import parse_image_name as split_image
from owm.control.body import Body
from owm.control.common import completed, json_content, name_arg, ok
from owm.control.context import CONTEXT

JSON = dict[str, Any]
routes = web.RouteTableDef()
METHODS = ("cow", "log", "mirror")


class RestoringPool(Protocol):
    """The pool calls behind the restore endpoints (``owm.pool.Pool`` has them)."""

    async def create_volume(self, name: str, size: int, method: str = "cow",
                            chunk_size: int = 65536, legs: int = 2,
                            enospc_policy: str = "fail-write",
                            restore_from: str | None = None, live: bool = False) -> JSON: ...

    async def finish_restore(self, name: str, restore_from: str) -> JSON: ...

    def attach_restore_source(self, name: str, restore_from: str,
                              fetch: Callable[[int, int], Awaitable[bytes]],
                              pace: float = 0.0) -> JSON: ...

    def detach_restore_source(self, name: str,
                              fetch: Callable[[int, int], Awaitable[bytes]]) -> None: ...


# How to drop the source each live-restore volume reads from, by volume name.
_SOURCES: dict[str, Callable[[], None]] = {}


def _source(body: Body) -> str:
    source = body.text("from", required=True)
    assert source is not None
    if not source.strip() or len(source) > 4096:
        raise InvalidRequest("the field 'from' must name the restore's source (REPO ID)")
    return source


@routes.post("/v1/volumes/{name}/restore")
async def start_restore(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    name = name_arg(request, "name")
    body = await Body.read(request)
    size = body.size("size", required=True)
    method = body.choice("method", METHODS, "cow")
    chunk_size = body.size("chunk_size", 65536)
    source = _source(body)
    live = body.flag("live")
    body.done()
    assert size is not None and chunk_size is not None
    pool = cast(RestoringPool, ctx.pool)
    status = await completed(pool.create_volume(name, size, method=method,
                                                chunk_size=chunk_size, restore_from=source,
                                                live=live))
    return ok(status, 201)


@routes.post("/v1/volumes/{name}/restore/source")
async def attach_source(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    name = name_arg(request, "name")
    body = await Body.read(request)
    source = _source(body)
    socket_path = body.text("socket", required=True)
    export = body.text("export", "")
    pace = body.seconds("pace") or 0.0
    body.done()
    assert socket_path is not None and export is not None
    size = int(ctx.volume(name).get("size") or 0)  # a clear NotFound first
    pool = cast(RestoringPool, ctx.pool)
    if ctx.connect_source is None:
        raise WrongState("this daemon cannot attach restore sources")
    fetch, drop = await ctx.connect_source(socket_path, export, size)
    old = _SOURCES.pop(name, None)
    try:
        status = pool.attach_restore_source(name, source, fetch, pace)
    except BaseException:
        drop()
        raise
    _SOURCES[name] = drop
    if old is not None:
        old()
    return ok(status)


@routes.delete("/v1/volumes/{name}/restore")
async def finish_restore(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    name = name_arg(request, "name")
    body = await Body.read(request)
    source = _source(body)
    body.done()
    ctx.volume(name)  # a clear NotFound first
    pool = cast(RestoringPool, ctx.pool)
    return ok(await completed(pool.finish_restore(name, source)))


@routes.get("/v1/images/{image}/changed-chunks")
async def changed_chunks(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    image = name_arg(request, "image")
    _, generation = split_image(image)
    raw_since = request.query.get("since", "")
    if not is_generation(raw_since):
        raise InvalidRequest("the query parameter 'since' must be an image number (N of NAME@N)")
    since = int(raw_since)
    if since >= generation:
        raise InvalidRequest(f"since={since} is not older than {image}")
    volume, _ = ctx.image(image)
    finder = getattr(ctx.pool, "changed_chunks", None)
    chunks = None
    if finder is not None:
        found = finder(image, since=since)
        chunks = await found if inspect.isawaitable(found) else found
    return ok({"image": image, "since": since, "chunk_size": volume.get("chunk_size"),
               "chunks": None if chunks is None else sorted(int(c) for c in chunks)})


_json = json_content
_ERROR = {"$ref": "#/components/schemas/Error"}

OPENAPI_PATHS: JSON = {
    "/v1/images/{image}/changed-chunks": {
        "parameters": [
            {"name": "image", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^.+@[0-9]+$"},
             "description": "Preserved image, NAME@N."},
            {"name": "since", "in": "query", "required": True,
             "schema": {"type": "integer", "minimum": 0},
             "description": "An older image number of the same volume."},
        ],
        "get": {
            "summary": "Chunks of the image that may differ from image NAME@since (for an "
                       "incremental backup); null when unknown.",
            "operationId": "changedChunks",
            "responses": {
                "200": _json({"$ref": "#/components/schemas/ChangedChunks"},
                             "The changed chunks."),
                "400": _json(_ERROR, "A bad image name or since."),
                "404": _json(_ERROR, "No such volume or image."),
            },
        },
    },
}

_RESTORE_BODY = {
    "type": "object", "required": ["from"],
    "properties": {"from": {"type": "string", "description": "The source: REPO ID."}},
}
OPENAPI_PATHS["/v1/volumes/{name}/restore"] = {
    "parameters": [{"name": "name", "in": "path", "required": True,
                    "schema": {"type": "string"}}],
    "post": {
        "summary": "Create volume NAME as the target of a restore: it is marked as an "
                   "incomplete restore from its first byte until the restore finishes.",
        "operationId": "startRestore",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["size", "from"],
            "properties": {
                "size": {"type": ["integer", "string"]},
                "chunk_size": {"type": ["integer", "string"]},
                "method": {"type": "string", "enum": list(METHODS)},
                "from": {"type": "string", "description": "The source: REPO ID."},
                "live": {"type": "boolean", "description": "Usable at once, filled from a "
                                                          "source attached afterwards."},
            }}}}},
        "responses": {
            "201": _json({"$ref": "#/components/schemas/Volume"}, "The marked volume."),
            "400": _json(_ERROR, "A bad field."),
            "409": _json(_ERROR, "A volume of that name exists."),
        },
    },
    "delete": {
        "summary": "The restore into NAME has written and flushed every byte: clear its mark.",
        "operationId": "finishRestore",
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": _RESTORE_BODY}}},
        "responses": {
            "200": _json({"$ref": "#/components/schemas/Volume"}, "The volume, unmarked."),
            "404": _json(_ERROR, "No such volume."),
            "409": _json(_ERROR, "The volume is being restored from another source."),
        },
    },
}

OPENAPI_PATHS["/v1/volumes/{name}/restore/source"] = {
    "parameters": [{"name": "name", "in": "path", "required": True,
                    "schema": {"type": "string"}}],
    "post": {
        "summary": "Fill live-restore volume NAME from the NBD export at a Unix socket (the "
                   "backup its restore serves).",
        "operationId": "attachRestoreSource",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["from", "socket"],
            "properties": {
                "from": {"type": "string", "description": "The source: REPO ID."},
                "socket": {"type": "string", "description": "Unix socket of the source."},
                "export": {"type": "string", "description": "Its export name."},
                "pace": {"type": "number", "description": "Seconds between fill batches."},
            }}}}},
        "responses": {
            "200": _json({"$ref": "#/components/schemas/Volume"}, "The volume, filling."),
            "400": _json(_ERROR, "A bad field, or the source cannot be reached."),
            "404": _json(_ERROR, "No such volume."),
            "409": _json(_ERROR, "The volume is not being restored live from that source."),
        },
    },
}

OPENAPI_SCHEMAS: JSON = {
    "ChangedChunks": {
        "type": "object",
        "properties": {
            "image": {"type": "string"}, "since": {"type": "integer"},
            "chunk_size": {"type": "integer"},
            "chunks": {"type": ["array", "null"], "items": {"type": "integer"},
                       "description": "Chunk numbers in ascending order; null: unknown, "
                                      "read everything."},
        },
    },
}
