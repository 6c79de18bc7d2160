"""The control API's endpoints for application locks ([0053]), and their OpenAPI description.

Workers in different processes share one lock space through the daemon: each opens a lease,
keeps it alive, and takes and releases locks under it (``owm.locks.app.LockService``).  Taking
locks is a long poll that answers once every lock is held, or 408 when its timeout passes; a
client that hangs up while waiting gives up its place in the queues.  The locks live in the
daemon's memory, outside every volume; they are never backed up and do not survive a restart
(nor should they: the transactions holding them did not survive it either).  What does survive
is the fencing-token counter: every grant answers with a token larger than any handed out
before, also by an earlier run of the daemon, and a lease id from an earlier run is 410 Gone.

Every limit is documented (OpenAPI ``maxLength``/``maxItems``/``maximum``) and the acquire
endpoint accepts a body large enough for the largest request within them, however its names
are escaped.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from aiohttp import web

from owm.common.errors import InvalidRequest
from owm.control.body import Body
from owm.control.common import ShuttingDown, error_response_spec, json_content, name_arg, ok
from owm.control.context import CONTEXT
from owm.locks.app import (
    MAX_LABEL,
    MAX_LEASES,
    MAX_LOCKS_PER_OWNER,
    MAX_NAME,
    MAX_OWNER,
    MAX_OWNERS_PER_LEASE,
    MAX_TIMEOUT,
    LockService,
)

JSON = dict[str, Any]
routes = web.RouteTableDef()

# The largest acquire body within the documented limits: JSON may escape a character as
# many as 12 bytes (an astral character as two \uXXXX escapes), plus quotes and commas.
MAX_ACQUIRE_BODY = MAX_LOCKS_PER_OWNER * (MAX_NAME * 12 + 4) + MAX_OWNER * 12 + 8192


def _owner(body: Body) -> str:
    owner = body.text("owner", required=True)
    assert owner is not None
    return owner


def _seconds(body: Body, key: str, most: float) -> float | None:
    """A duration field, refused with a sentence above ``most`` (even a 400-digit integer)."""
    try:
        value = body.seconds(key)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if value is not None and value > most:
        raise InvalidRequest(f"the field '{key}' must be at most {most:g} seconds")
    return value


@routes.get("/v1/locks")
async def lock_status(request: web.Request) -> web.Response:
    return ok(request.app[CONTEXT].app_locks.status())


@routes.post("/v1/locks/leases")
async def open_lease(request: web.Request) -> web.Response:
    body = await Body.read(request)
    ttl = _seconds(body, "ttl", LockService.MAX_TTL)
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
    body = await Body.read(request.clone(client_max_size=MAX_ACQUIRE_BODY))
    owner = _owner(body)
    names = body.text_list("names", required=True)
    timeout = _seconds(body, "timeout", MAX_TIMEOUT)
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
    grant = taking.result()
    # The lease may have ended between the grant and now (its locks went with it): say so
    # rather than answer that they are held.
    ctx.app_locks.require_lease(lease)
    return ok({"lease": lease, "owner": owner, "names": sorted(set(names)),
               "waited_ms": round(grant.waited * 1000, 3),
               "fencing_token": grant.fencing_token})


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
                "description": "Lease id from POST /v1/locks/leases (random; never reused, "
                               "also not across daemon restarts)."}
_GONE = _error("The lease is gone: closed, expired (not kept alive within its ttl), or opened "
               "before the daemon restarted. Nothing taken under it is held; the error names it.")
_BAD = _error("Bad request: bad JSON, a missing or mistyped field, a bad lock name, a value "
              "beyond its documented limit.")
_LIMIT = _error("A limit is reached (open leases, transactions holding or waiting for locks, "
                "locks held at once); try again when some are released.")
_TOKEN = {"type": "integer", "minimum": 1,
          "description": "Fencing token of this grant: larger than every token granted before "
                         "it, by this daemon or an earlier run on the same pool. Pass it with "
                         "the work done under the locks, so that a store that has seen a "
                         "larger token for the same data can refuse work from a holder whose "
                         "lease was lost."}

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
            "leases": {"type": "array", "maxItems": MAX_LEASES, "items": {"type": "object"}},
            "locks": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "holder": {"type": ["string", "null"]},
                "fencing_token": {"type": ["integer", "null"],
                                  "description": "The holder's token, once it holds all of "
                                                 "its locks."},
                "held_s": {"type": "number"},
                "waiting": {"type": "array", "items": {"type": "string"},
                            "description": "Owners in line, oldest first."}}}},
            "expired_leases": {"type": "integer"},
        },
    },
    "AcquireRequest": {
        "type": "object", "required": ["owner", "names"], "additionalProperties": False,
        "properties": {
            "owner": {"type": "string", "minLength": 1, "maxLength": MAX_OWNER,
                      "pattern": "^[^/]+$",
                      "description": "The transaction; unique in the lease. At most "
                                     f"{MAX_OWNERS_PER_LEASE} per lease hold or wait at once."},
            "names": {"type": "array", "minItems": 1, "maxItems": MAX_LOCKS_PER_OWNER,
                      "items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                      "description": "Every lock the transaction needs (taken in sorted "
                                     "order). Lengths count characters, not bytes; any "
                                     "request within these limits fits the body limit."},
            "timeout": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_TIMEOUT},
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
        "summary": f"Open a lease under which a worker process takes locks (at most "
                   f"{MAX_LEASES} open at once).",
        "operationId": "openLease",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "properties": {"ttl": {"type": "number", "default": 10,
                                   "minimum": LockService.MIN_TTL,
                                   "maximum": LockService.MAX_TTL},
                           "label": {"type": "string", "maxLength": MAX_LABEL}}}}}},
        "responses": {"201": _json({"$ref": "#/components/schemas/Lease"}, "The lease."),
                      "400": _BAD, "429": _LIMIT}}},
    "/v1/locks/leases/{lease}": {
        "parameters": [_LEASE_PARAM],
        "delete": {"summary": "Close a lease, releasing every lock taken under it.",
                   "operationId": "closeLease",
                   "responses": {"200": _json({"$ref": "#/components/schemas/Released"},
                                              "Closed."), "410": _GONE}}},
    "/v1/locks/leases/{lease}/keepalive": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Keep a lease alive for another ttl seconds.",
                 "operationId": "keepLease",
                 "responses": {"200": _json({"$ref": "#/components/schemas/Lease"}, "Renewed."),
                               "410": _GONE}}},
    "/v1/locks/leases/{lease}/acquire": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Take every named lock for a transaction (FIFO per lock, sorted "
                            "order); answers once all are held, with a fencing token.",
                 "operationId": "acquireLocks",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/AcquireRequest"}}}},
                 "responses": {"200": _json({"type": "object", "properties": {
                     "lease": {"type": "string"}, "owner": {"type": "string"},
                     "names": {"type": "array", "items": {"type": "string"}},
                     "waited_ms": {"type": "number"},
                     "fencing_token": _TOKEN}}, "All locks held."),
                     "400": _BAD,
                     "408": _error("The timeout passed; nothing is held."),
                     "409": _error("The owner already holds or waits for locks."),
                     "410": _GONE,
                     "413": _error(f"The body is larger than {MAX_ACQUIRE_BODY} bytes, more "
                                   "than any request within the limits needs."),
                     "429": _LIMIT,
                     "503": _error("The daemon is shutting down.")}}},
    "/v1/locks/leases/{lease}/release": {
        "parameters": [_LEASE_PARAM],
        "post": {"summary": "Release every lock a transaction holds (at its end).",
                 "operationId": "releaseLocks",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["owner"], "additionalProperties": False,
                     "properties": {"owner": {"type": "string"}}}}}},
                 "responses": {"200": _json({"$ref": "#/components/schemas/Released"},
                                            "Released."), "400": _BAD, "410": _GONE}}},
}
