"""The control API's endpoints for volumes and preserved images.

Every handler validates its input into plain Python values, calls one pool operation and
answers JSON; errors are raised as ``OwmError`` and turned into 4xx answers by the app's
middleware. Later features (backups, application locks) add their own route tables beside this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

from aiohttp import web

from owm.common.names import check_volume_name
from owm.common.names import parse_image_name as split_image
from owm.common.sizes import check_volume_size
from owm.control.body import Body
from owm.control.common import ShuttingDown, completed, ctx_of, name_arg, no_body, ok
from owm.control.context import ControlContext, holding_sessions
from owm.control.dashboard import STATIC, static_file
from owm.control.forward import cluster_status, is_forwarded
from owm.control.metrics import health_answer, metrics_endpoint

log = logging.getLogger("owm.control")
routes = web.RouteTableDef()
T = TypeVar("T")

METHODS = ("cow", "log", "mirror")
ENOSPC_POLICIES = ("fail-write", "break-image")


def refuse_while_closing(ctx: ControlContext, what: str) -> None:
    """Changes to the pool are refused once SIGTERM arrived: the pool is about to close."""
    if ctx.closing.is_set():
        raise ShuttingDown(f"the daemon is shutting down; {what} was refused, try again once "
                           "it is back")


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    return health_answer(ctx_of(request))


# The Prometheus text of the daemon's registry (see owm.control.metrics).
routes.get("/metrics")(metrics_endpoint)
# The web dashboard (see owm.control.dashboard).
for _path in STATIC:
    routes.get(_path)(static_file)


@routes.get("/v1/volumes")
async def list_volumes(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    if ctx.directory is not None and not is_forwarded(request):
        return ok(await cluster_status(ctx, ctx.pool.status()))
    return ok(ctx.pool.status())


@routes.post("/v1/volumes")
async def create_volume(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await Body.read(request)
    name = body.text("name", required=True)
    assert name is not None
    check_volume_name(name)
    size = body.size("size", required=True)
    method = body.choice("method", METHODS, "cow")
    chunk_size = body.size("chunk_size", 65536)
    legs = body.whole("legs", 2, minimum=1)
    policy = body.choice("enospc_policy", ENOSPC_POLICIES, "fail-write")
    body.done()
    assert size is not None and chunk_size is not None and legs is not None
    refuse_while_closing(ctx, f"creating volume {name}")
    check_volume_size(size, chunk_size)
    status = await completed(ctx.pool.create_volume(
        name, size, method=method, chunk_size=chunk_size, legs=legs, enospc_policy=policy
    ))
    log.info("created volume size=%d method=%s", size, method, extra={"volume": name})
    return ok(status, 201)


@routes.get("/v1/volumes/{name}")
async def show_volume(request: web.Request) -> web.Response:
    return ok(ctx_of(request).volume(name_arg(request, "name")))


@routes.delete("/v1/volumes/{name}")
async def delete_volume(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    name = name_arg(request, "name")
    body = await Body.read(request)
    force = body.flag("force")
    body.done()
    ctx.volume(name)  # a clear NotFound before anything else
    refuse_while_closing(ctx, f"deleting volume {name}")
    await completed(ctx.pool.delete_volume(name, force=force))
    log.info("deleted volume force=%s", force, extra={"volume": name})
    return ok({"deleted": name})


@routes.post("/v1/volumes/{name}/preserve")
async def preserve(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    name = name_arg(request, "name")
    body = await Body.read(request)
    instant = body.flag("instant")
    body.done()
    ctx.volume(name)
    refuse_while_closing(ctx, f"preserving {name}")
    started = time.perf_counter()
    image = await completed(ctx.pool.preserve(name, instant=instant))
    elapsed_ms = (time.perf_counter() - started) * 1000
    log.info("preserved image=%s instant=%s in %.2f ms", image, instant, elapsed_ms,
             extra={"volume": name})
    _, entry = ctx.image(image)
    return ok({"image": image, "volume": name, "instant": instant,
               "preserve_ms": round(elapsed_ms, 3), "status": entry}, 201)


@routes.get("/v1/images/{image}")
async def show_image(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    volume, entry = ctx.image(image)
    _, generation = split_image(image)
    return ok({**entry, "holding": holding_sessions(volume, generation)})


@routes.post("/v1/images/{image}/wait")
async def wait_drained(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    body = await Body.read(request)
    timeout = body.seconds("timeout")
    body.done()
    ctx.image(image)
    waiter = asyncio.ensure_future(ctx.pool.wait_drained(image, timeout))
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not waiter.done():
            waiter.cancel()
    if not waiter.done() or waiter.cancelled():
        raise ShuttingDown("the daemon is shutting down; the image was not drained yet")
    drained = waiter.result()
    volume, entry = ctx.image(image)
    _, generation = split_image(image)
    return ok({"image": image, "drained": bool(drained), "status": entry,
               "holding": [] if drained else holding_sessions(volume, generation)})


@routes.post("/v1/images/{image}/cutover")
async def cutover(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    await no_body(request)
    volume, before = ctx.image(image)
    _, generation = split_image(image)
    rebound: list[dict[str, object]] = []
    if before.get("state") == "draining":
        rebound = holding_sessions(volume, generation)
        await completed(ctx.pool.cutover(image))
    _, entry = ctx.image(image)
    if before.get("state") != "draining" or entry.get("consistency") != "crash-consistent":
        # It had drained already (perhaps just now): nothing was cut over, the label stays.
        message = (f"{image} is already {entry.get('state')} ({entry.get('consistency')}); "
                   "nothing was cut over and its label is unchanged")
        return ok({"image": image, "rebound": [], "cut_over": False, "message": message,
                   "status": entry})
    log.info("cut over image=%s rebound=%d sessions", image, len(rebound),
             extra={"volume": volume.get("name")})
    return ok({"image": image, "rebound": rebound, "cut_over": True, "status": entry})


@routes.post("/v1/images/{image}/release")
async def release(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    image = name_arg(request, "image")
    await no_body(request)
    volume, entry = ctx.image(image)
    refuse_while_closing(ctx, f"the release of {image}")

    def progress(done: int, total: int) -> None:
        ctx.release_progress[image] = (done, total)

    # A client that hangs up must not interrupt a release half-way: shield it.
    task = asyncio.ensure_future(ctx.pool.release(image, progress=progress))
    try:
        await asyncio.shield(task)
    finally:
        if task.done():
            ctx.release_progress.pop(image, None)
        else:
            task.add_done_callback(lambda _: ctx.release_progress.pop(image, None))
    log.info("released image=%s", image, extra={"volume": volume.get("name")})
    return ok({"image": image, "released": True,
               "bytes_freed": entry.get("bytes_on_disk", 0)})
