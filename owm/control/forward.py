"""The control API's front door: requests about a volume owned by another daemon go there.

In a cluster (``ControlContext.directory`` set) any daemon answers the control API for any
volume.  A request whose route names one volume or one of its images (``/v1/volumes/{name}``
and everything below it, ``/v1/images/{image}`` and everything below it) is sent, unchanged,
to the owner's TCP control listener (``Remote.control``, the owner's ``--control-listen``) with
the cluster's control token, and the owner's answer is returned as it is (status, body, content
type).  An owner that cannot be reached is a 503 naming it.  ``GET /v1/volumes`` merges this
daemon's volumes with those of every owner (:func:`cluster_status`).

A forwarded request carries ``X-Owm-Forwarded``; a daemon never forwards such a request again,
so two daemons that briefly disagree about an owner (mid-failover) cannot bounce it between
them.  Creating volumes and the group routes stay local: where a new volume lives, and groups
whose members have different owners, are the cluster layer's business.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from owm.common.cluster import Remote
from owm.common.errors import InvalidRequest, Unavailable, WrongState
from owm.common.names import parse_image_name
from owm.control.context import CONTEXT, ControlContext

log = logging.getLogger("owm.control.forward")

FORWARDED = "X-Owm-Forwarded"
SERVED_BY = "X-Owm-Served-By"
CONNECT_TIMEOUT = 5.0  # reaching an owner; the request itself may take long (wait, release)
STATUS_TIMEOUT = 10.0  # each owner's part of a cluster-wide status
# Headers of the client's request that travel with it (the token is the cluster's own).
PASSED_HEADERS = ("Content-Type", "Accept", "User-Agent")

JSON = dict[str, Any]

# Routes that name a path on this host (a live restore's source socket): they cannot be
# forwarded, the owner would look for that path on its own host.
LOCAL_ONLY = {"/v1/volumes/{name}/restore/source": "attaching a live restore's source socket"}


def _volume_of(request: web.Request) -> str | None:
    """The volume a volume- or image-scoped route names, else None."""
    route = request.match_info.route
    resource = route.resource
    if request.match_info.http_exception is not None or resource is None:
        return None
    pattern = resource.canonical
    if pattern.startswith("/v1/volumes/{name}"):
        return request.match_info.get("name")
    if pattern.startswith("/v1/images/{image}"):
        try:
            return parse_image_name(request.match_info.get("image", ""))[0]
        except InvalidRequest:
            return None  # the handler answers the malformed name
    return None


def _reason(exc: BaseException) -> str:
    """A short reason for a failed connection (aiohttp's own messages are long)."""
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.strerror:
        return exc.os_error.strerror.lower()
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return (str(exc) or type(exc).__name__).rstrip(".")


def _where(remote: Remote) -> str:
    if remote.control is None:
        return f"daemon {remote.daemon}"
    host, port = remote.control
    return f"daemon {remote.daemon} at {host}:{port}"


async def _owner(ctx: ControlContext, volume: str) -> Remote | None:
    assert ctx.directory is not None
    try:
        return await ctx.directory.locate(volume)
    except Exception as exc:
        log.warning("locating volume %s failed: %s", volume, exc)
        raise Unavailable(f"the owner of volume {volume} cannot be looked up just now "
                          f"({type(exc).__name__}); try again") from None


def _session(timeout: float | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT))


def _headers(ctx: ControlContext, incoming: Any = None) -> dict[str, str]:
    headers = {FORWARDED: "1"}
    if incoming is not None:
        headers.update({k: incoming[k] for k in PASSED_HEADERS if k in incoming})
    if ctx.cluster_token:
        headers["Authorization"] = f"Bearer {ctx.cluster_token}"
    return headers


async def forward(request: web.Request, ctx: ControlContext, volume: str,
                  remote: Remote) -> web.Response:
    """Send ``request`` to the owner's control listener and return its answer as it is."""
    if remote.control is None:
        raise Unavailable(f"volume {volume} is served by {_where(remote)}, which has no TCP "
                          "control listener to forward the request to")
    host, port = remote.control
    url = f"http://{host}:{port}{request.rel_url}"
    body = await request.read()
    try:
        async with _session(None) as session, session.request(
            request.method, url, data=body or None, headers=_headers(ctx, request.headers),
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            content_type = answer.headers.get("Content-Type", "application/json")
            status = answer.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        reason = _reason(exc)
        log.warning("forwarding %s %s to %s failed: %s", request.method, request.path,
                    _where(remote), reason)
        raise Unavailable(f"volume {volume} is served by {_where(remote)}, which cannot be "
                          f"reached ({reason})") from None
    log.debug("forwarded %s %s to %s: %d", request.method, request.path, _where(remote), status)
    return web.Response(body=payload, status=status,
                        headers={"Content-Type": content_type, SERVED_BY: remote.daemon})


@web.middleware
async def forward_to_owner(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Volume- and image-scoped requests about a volume owned elsewhere go to its owner."""
    ctx = request.app[CONTEXT]
    if ctx.directory is None or FORWARDED in request.headers:
        return await handler(request)
    volume = _volume_of(request)
    if volume is None:
        return await handler(request)
    remote = await _owner(ctx, volume)
    if remote is None:
        return await handler(request)  # served here (or nowhere: the local 404)
    resource = request.match_info.route.resource
    what = LOCAL_ONLY.get(resource.canonical if resource is not None else "")
    if what is not None:
        raise WrongState(f"volume {volume} is served by {_where(remote)}; {what} must be done "
                         "on that daemon's host")
    return await forward(request, ctx, volume, remote)


def is_forwarded(request: web.Request) -> bool:
    return FORWARDED in request.headers


async def _owner_status(ctx: ControlContext, remote: Remote, names: list[str]) -> list[JSON]:
    """The status entries of ``names`` as their owner reports them, or one entry per volume
    saying plainly that its owner cannot be reached."""
    why = "it has no TCP control listener"
    if remote.control is not None:
        host, port = remote.control
        try:
            async with _session(STATUS_TIMEOUT) as session, session.get(
                f"http://{host}:{port}/v1/volumes", headers=_headers(ctx)
            ) as answer:
                data = await answer.json(content_type=None)
                if answer.status == 200 and isinstance(data, list):
                    wanted = set(names)
                    found = [{**v, "owner": remote.daemon} for v in data
                             if isinstance(v, dict) and v.get("name") in wanted]
                    missing = wanted - {v["name"] for v in found}
                    return found + [_unreachable(n, remote, "it does not list the volume")
                                    for n in sorted(missing)]
                why = f"it answered {answer.status}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            why = _reason(exc)
    return [_unreachable(n, remote, why) for n in names]


def _unreachable(name: str, remote: Remote, why: str) -> JSON:
    return {"name": name, "owner": remote.daemon, "unreachable": True,
            "warnings": [f"served by {_where(remote)}, whose status cannot be read: "
                         f"{why.rstrip('.')}"]}


async def cluster_status(ctx: ControlContext, local: list[JSON]) -> list[JSON]:
    """``local`` (this daemon's status) merged with the status of every volume owned by
    another daemon of the cluster, each marked with its ``owner``; sorted by name."""
    directory = ctx.directory
    assert directory is not None
    cluster = {n for n in await directory.exports() if "@" not in n}  # volumes, not images
    names = sorted({str(v.get("name")) for v in local} | cluster)
    owners = await asyncio.gather(*(_owner(ctx, n) for n in names))
    remote_names: dict[Remote, list[str]] = {}
    for name, remote in zip(names, owners, strict=True):
        if remote is not None:
            remote_names.setdefault(remote, []).append(name)
    remote_set = {n for group in remote_names.values() for n in group}
    merged = [v for v in local if v.get("name") not in remote_set]
    parts = await asyncio.gather(*(_owner_status(ctx, r, ns) for r, ns in remote_names.items()))
    for part in parts:
        merged.extend(part)
    return sorted(merged, key=lambda v: str(v.get("name")))
