"""The aiohttp application of the control API: routes, error mapping and the bearer-token check.

Every failure a client can cause comes back as a 4xx with ``{"error": "one plain sentence"}``:
``OwmError`` subclasses map to their natural status, aiohttp's own errors (unknown path, wrong
method, oversized body) are rewritten into the same shape, and only a bug in the daemon is a
500 (logged with its traceback).
"""

from __future__ import annotations

import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from owm.common import errors
from owm.control.backup_routes import routes as backup_routes
from owm.control.common import ShuttingDown
from owm.control.context import CONTEXT, ControlContext
from owm.control.forward import forward_to_owner
from owm.control.group_routes import routes as group_routes
from owm.control.lock_routes import routes as lock_routes
from owm.control.openapi import routes as openapi_routes
from owm.control.repo_routes import routes as repo_routes
from owm.control.routes import routes as volume_routes
from owm.locks.app import LeaseGone, LockLimit

log = logging.getLogger("owm.control")

# Every route table the daemon serves. Application locks (served to transaction workers in
# other processes) and backup endpoints each bring their own table and join this tuple.
ROUTE_TABLES: tuple[web.RouteTableDef, ...] = (
    volume_routes, lock_routes, backup_routes, group_routes, openapi_routes, repo_routes,
)

# Most specific first: OutOfRange is an InvalidRequest, so order matters.
STATUS_FOR_ERROR: tuple[tuple[type[errors.OwmError], int], ...] = (
    (errors.NotFound, 404),
    (LeaseGone, 410),  # both are WrongState: before it
    (LockLimit, 429),
    (errors.AlreadyExists, 409),
    (errors.WrongState, 409),
    (errors.ReadOnly, 409),
    (errors.ImageBroken, 409),
    (errors.InvalidRequest, 400),
    (errors.Timeout, 408),
    (errors.NoSpace, 507),
    (ShuttingDown, 503),
    (errors.Unavailable, 503),
)


def status_for(exc: errors.OwmError) -> int:
    for cls, status in STATUS_FOR_ERROR:
        if isinstance(exc, cls):
            return status
    return 400


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"there is no endpoint {request.path}; GET /v1/openapi.json lists them"
    if exc.status == 405:
        return f"{request.path} does not accept {request.method}"
    if exc.status == 413:
        return "the request body is too large"
    return exc.reason.rstrip(".") if exc.reason else f"HTTP error {exc.status}"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into a JSON error answer with a fitting status."""
    try:
        return await handler(request)
    except errors.OwmError as exc:
        return error_response(status_for(exc), str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_message(request, exc))
    except ConnectionResetError:
        raise
    except Exception as exc:
        log.exception("internal error serving %s %s", request.method, request.path)
        message = f"internal error in the daemon ({type(exc).__name__}); see its log"
        return error_response(500, message)


def bearer_token_check(token: str) -> Middleware:
    """A middleware refusing every request that does not carry ``Authorization: Bearer TOKEN``."""
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="owm"'}
        if scheme.lower() != "bearer" or not given.strip():
            return error_response(
                401, "this control listener needs a bearer token (Authorization: Bearer TOKEN)",
                challenge,
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            return error_response(401, "the bearer token is wrong", challenge)
        return await handler(request)

    return check


def create_app(ctx: ControlContext, token: str | None = None) -> web.Application:
    """The control application over ``ctx``; with ``token``, every request must present it."""
    middlewares: list[Middleware] = [json_errors, forward_to_owner]
    if token is not None:
        middlewares.insert(0, bearer_token_check(token))
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
    app[CONTEXT] = ctx
    for table in ROUTE_TABLES:
        app.add_routes(table)
    return app
