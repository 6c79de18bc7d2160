"""The control API's endpoints for application locks ([0053]), and their OpenAPI description.

Workers in different processes share one lock space through the daemon: each opens a lease,
keeps it alive, and takes and releases locks under it (``owm.locks.app.LockService``).  Taking
locks is a long poll that answers once every lock is held, or 408 when its timeout passes; a
client that hangs up while waiting gives up its place in the queues.  The locks live in the
daemon's memory, outside every volume; they are never backed up and do not survive a restart
(nor should they: the transactions holding them did not survive it either).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from owm.control.body import Body
from owm.control.common import ShuttingDown, error_response_spec, json_content, name_arg, ok
from owm.control.context import CONTEXT

JSON = dict[str, Any]
routes = web.RouteTableDef()


def _owner(body: Body) -> str:
    owner = body.text("owner", required=True)
    assert owner is not None
    return owner


@routes.get("/v1/locks")
async def lock_status(request: web.Request) -> web.Response:
    return ok(request.app[CONTEXT].app_locks.status())


@routes.post("/v1/locks/leases")
async def open_lease(request: web.Request) -> web.Response:
    body = await Body.read(request)
    ttl = body.seconds("ttl")
    label = body.text("label", "") or ""
    body.done()
    return ok(request.app[CONTEXT].app_locks.open_lease(10.0 if ttl is None else ttl, label), 201)


@routes.post("/v1/locks/leases/{lease}/keepalive")
async def keepalive(request: web.Request) -> web.Response:
    (await Body.read(request)).done()
    return ok(request.app[CONTEXT].app_locks.keepalive(name_arg(request, "lease")))


@routes.delete("/v1/locks/leases/{lease}")
async def close_lease(request: web.Request) -> web.Response:
    (await Body.read(request)).done()
    lease = name_arg(request, "lease")
    released = request.app[CONTEXT].app_locks.close_lease(lease)
    return ok({"lease": lease, "released": released})


@routes.post("/v1/locks/leases/{lease}/acquire")
async def acquire(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    lease = name_arg(request, "lease")
    body = await Body.read(request)
    owner = _owner(body)
    names = body.text_list("names", required=True)
    timeout = body.seconds("timeout")
    body.done()
    assert names is not None
    taking = asyncio.ensure_future(ctx.app_locks.acquire(lease, owner, names, timeout))
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        await asyncio.wait({taking, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not taking.done():
            taking.cancel()  # the client hung up or the daemon stops: leave the queues
            await asyncio.wait({taking})
    if taking.cancelled():
        raise ShuttingDown("the daemon is shutting down; the locks were not taken")
    waited = taking.result()
    return ok({"lease": lease, "owner": owner, "names": sorted(set(names)),
               "waited_ms": round(waited * 1000, 3)})


@routes.post("/v1/locks/leases/{lease}/release")
async def release(request: web.Request) -> web.Response:
    body = await Body.read(request)
    owner = _owner(body)
    body.done()
    lease = name_arg(request, "lease")
    released = request.app[CONTEXT].app_locks.release(lease, owner)
    return ok({"lease": lease, "owner": owner, "released": released})


# ---------------------------------------------------------------------------- OpenAPI


_json = json_content
_error = error_response_spec
_LEASE_PARAM = {"name": "lease", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "Lease id from POST /v1/locks/leases."}
_NO_LEASE = _error("No such lease (never opened, closed, or expired).")
_BAD = _error("Bad request: bad JSON, a missing or mistyped field, a bad lock name.")

OPENAPI_SCHEMAS: JSON = {
    "Lease": {
        "type": "object",
        "properties": {"lease": {"type": "string"}, "label": {"type": "string"},
                       "ttl": {"type": "number", "description": "Seconds without a keepalive "
                                                              "before its locks are released."}},
    },
    "LockStatus": {
        "type": "object",
        "properties": {
            "leases": {"type": "array", "items": {"type": "object"}},
            "locks": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "holder": {"type": ["string", "null"]},
                "held_s": {"type": "number"},
                "waiting": {"type": "array", "items": {"type": "string"},
                            "description": "Owners in line, oldest first."}}}},
            "expired_leases": {"type": "integer"},
        },
    },
    "AcquireRequest": {
        "type": "object", "required": ["owner", "names"], "additionalProperties": False,
        "properties": {
            "owner": {"type": "string", "description": "The transaction; unique in the lease."},
            "names": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                      "description": "Every lock the transaction needs (taken in sorted order)."},
            "timeout": {"type": ["number", "null"], "minimum": 0},
        },
    },
    "Released": {
        "type": "object",
        "properties": {"lease": {"type": "string"}, "owner": {"type": "string"},
                       "released": {"type": "array", "items": {"type": "string"}}},
    },
}

OPENAPI_PATHS: JSON = {
    "/v1/locks": {"get": {
        "summary": "Application locks: leases, held locks and their queues.",
        "operationId": "lockStatus",
        "responses": {"200": _json({"$ref": "#/components/schemas/LockStatus"}, "The locks.")}}},
    "/v1/locks/leases": {"post": {
        "summary": "Open a lease under which a worker process takes locks.",
        "operationId": "openLease",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "properties": {"ttl": {"type": "number", "default": 10},
                           "label": {"type": "string"}}}}}},
        "responses": {"201": _json({"$ref": "#/components/schemas/Lease"}, "The lease."),
                      "400": _BAD}}},
    "/v1/locks/leases/{lease}": {
        "parameters": [_LEASE_PARAM],
        "delete": {"summary": "Close a lease, releasing every lock taken under it.",
                   "operationId": "closeLease",
                   "responses": {"200": _json({"$ref": "#/components/schemas/Released"},
                                              "Closed."), "404": _NO_LEASE}}},
    "/v1/locks/leases/{lease}/keepalive": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Keep a lease alive for another ttl seconds.",
                 "operationId": "keepLease",
                 "responses": {"200": _json({"$ref": "#/components/schemas/Lease"}, "Renewed."),
                               "404": _NO_LEASE}}},
    "/v1/locks/leases/{lease}/acquire": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Take every named lock for a transaction (FIFO per lock, sorted "
                            "order); answers once all are held.",
                 "operationId": "acquireLocks",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/AcquireRequest"}}}},
                 "responses": {"200": _json({"type": "object", "properties": {
                     "names": {"type": "array", "items": {"type": "string"}},
                     "waited_ms": {"type": "number"}}}, "All locks held."),
                     "400": _BAD, "404": _NO_LEASE,
                     "408": _error("The timeout passed; nothing is held."),
                     "409": _error("The owner already holds or waits for locks."),
                     "503": _error("The daemon is shutting down.")}}},
    "/v1/locks/leases/{lease}/release": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Release every lock a transaction holds (at its end).",
                 "operationId": "releaseLocks",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["owner"], "additionalProperties": False,
                     "properties": {"owner": {"type": "string"}}}}}},
                 "responses": {"200": _json({"$ref": "#/components/schemas/Released"},
                                            "Released."), "400": _BAD, "404": _NO_LEASE}}},
}
