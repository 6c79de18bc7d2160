"""The control API's endpoint for incremental backups, and its OpenAPI description.

``GET /v1/images/{image}/changed-chunks?since=N`` answers the chunk numbers of ``image`` that
may differ from image ``NAME@N`` (the one an owm repository already holds), so that a backup
reads only those.  ``chunks`` is null when the daemon cannot tell (its change maps were lost in
a crash, or it keeps none): the backup then reads everything.  The backup itself runs in the
client (``owm.backup``), reading the image over NBD like any pull-mode backup tool.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp import web

from owm.common.errors import InvalidRequest
from owm.common.names import is_generation
from owm.common.names import parse_image_name as split_image
from owm.control.common import json_content, name_arg, ok
from owm.control.context import CONTEXT

JSON = dict[str, Any]
routes = web.RouteTableDef()


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
