"""Prometheus metrics of one daemon, and the read-only listener that serves them.

The I/O path only adds to plain integers (``owm.pool.volume.VolumeStats``, the engines' copy
counters, the NBD server's connection counts). Nothing is registered per request: at scrape time
:class:`OwmCollector` reads those counters and the pool's status through the callables of
:class:`MetricsSources` and builds the metric families from them. Each daemon has a registry of
its own (never prometheus_client's global one), holding this collector and the process, platform
and garbage-collector collectors.

``GET /metrics`` is served on the control socket (registered in ``owm.control.routes``) and, with
``owm serve --metrics-listen HOST:PORT``, on a TCP listener of its own that needs no token
and serves only what reads (``/metrics``, ``/v1/health``, the volumes' status and the
dashboard); the dashboard's preserve, cutover and release are accepted there only with the
control token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from owm.common.errors import InvalidRequest
from owm.control.context import CONTEXT, ControlContext

log = logging.getLogger("owm.control.metrics")

JSON = dict[str, Any]

IMAGE_STATES = ("draining", "drained", "drained-unclean", "broken", "damaged", "releasing")
OPS = ("read", "write", "zero", "flush", "image_read")


@dataclass
class MetricsSources:
    """Where the collector reads from; the daemon binds these to its pool and NBD server."""

    status: Callable[[], list[JSON]]  # owm.pool.Pool.status(): one dict per volume
    volumes: Callable[[], list[JSON]]  # owm.pool.volume.Volume.metrics() of every volume
    server: Callable[[], JSON]  # NBD server counters: connections, in flight, buffered bytes


def _histogram(
    family: HistogramMetricFamily, labels: list[str], snapshot: JSON
) -> None:
    """Add one histogram from an OpStats snapshot (per-bucket counts, last one +Inf)."""
    running = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip([*snapshot["bounds"], float("inf")], snapshot["buckets"],
                            strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    family.add_metric(labels, buckets, snapshot["seconds"])


class OwmCollector(Collector):
    """Builds owm's metric families from the daemon's counters at each scrape."""

    def __init__(self, sources: MetricsSources, info: JSON) -> None:
        self.sources = sources
        self.info = info  # the daemon's facts (version, ready), read at scrape time

    def describe(self) -> Iterable[Metric]:
        return []  # names are owm_*: no clash to check, and no scrape at registration

    def collect(self) -> Iterable[Metric]:
        yield from self._daemon()
        yield from self._status(self.sources.status())
        yield from self._counters(self.sources.volumes())

    def _daemon(self) -> Iterable[Metric]:
        build = GaugeMetricFamily("owm_build_info", "The owm version serving.", labels=["version"])
        build.add_metric([str(self.info.get("version", ""))], 1)
        yield build
        yield GaugeMetricFamily("owm_ready", "1 once every listener of the daemon is serving.",
                                value=1 if self.info.get("ready") else 0)
        server = self.sources.server()
        yield GaugeMetricFamily("owm_nbd_connections", "NBD connections open now.",
                                value=server.get("connections", 0))
        yield CounterMetricFamily("owm_nbd_connections_accepted",
                                  "NBD connections accepted since the daemon started.",
                                  value=server.get("accepted", 0))
        yield CounterMetricFamily("owm_nbd_connections_refused",
                                  "NBD connections refused for being over the limit.",
                                  value=server.get("refused", 0))
        yield GaugeMetricFamily("owm_nbd_inflight_requests",
                                "NBD requests received and not answered yet.",
                                value=server.get("inflight", 0))
        yield GaugeMetricFamily("owm_nbd_buffered_bytes",
                                "Bytes held for NBD requests in flight and replies not sent.",
                                value=server.get("buffered_bytes", 0))

    def _status(self, volumes: list[JSON]) -> Iterable[Metric]:
        v = ["volume"]
        vi = ["volume", "image"]
        info = GaugeMetricFamily("owm_volume_info", "One per volume, with its engine.",
                                 labels=["volume", "method"])
        size = GaugeMetricFamily("owm_volume_size_bytes", "The volume's size.", labels=v)
        live = GaugeMetricFamily("owm_volume_live_generation",
                                 "The generation new sessions are bound to.", labels=v)
        used = GaugeMetricFamily("owm_volume_storage_bytes",
                                 "Storage bytes used by the live volume.", labels=v)
        damaged = GaugeMetricFamily("owm_volume_damaged", "1 if the live volume is damaged.",
                                    labels=v)
        sessions = GaugeMetricFamily("owm_volume_sessions", "Open sessions per generation.",
                                     labels=["volume", "generation"])
        images = GaugeMetricFamily("owm_volume_images", "Preserved images by state.",
                                   labels=["volume", "state"])
        image_used = GaugeMetricFamily("owm_image_storage_bytes",
                                       "Storage bytes used by a preserved image alone.",
                                       labels=vi)
        left = GaugeMetricFamily("owm_image_sessions_left",
                                 "Sessions still holding a draining image.", labels=vi)
        unclean = GaugeMetricFamily("owm_image_unclean_sessions",
                                    "Sessions that held the image and ended uncleanly.",
                                    labels=vi)
        readers = GaugeMetricFamily("owm_image_readers", "Readers of the image open now.",
                                    labels=vi)
        release = GaugeMetricFamily("owm_image_release_progress_ratio",
                                    "How far the running release (or merge) of an image is, "
                                    "0 to 1.", labels=vi)
        resync = GaugeMetricFamily("owm_volume_resync_progress_ratio",
                                   "How far a mirror's background resync is, 0 to 1.", labels=v)
        for vol in volumes:
            name = str(vol.get("name"))
            info.add_metric([name, str(vol.get("method"))], 1)
            size.add_metric([name], vol.get("size", 0))
            live.add_metric([name], vol.get("live_generation", 0))
            used.add_metric([name], vol.get("bytes_on_disk", 0))
            damaged.add_metric([name], 1 if vol.get("damaged") else 0)
            by_gen = {g["generation"]: len(g.get("sessions", []))
                      for g in vol.get("generations", [])}
            by_gen.setdefault(vol.get("live_generation", 0), 0)
            for gen, count in sorted(by_gen.items()):
                sessions.add_metric([name, str(gen)], count)
            states = dict.fromkeys(IMAGE_STATES, 0)
            for image in vol.get("images", []):
                label = [name, str(image.get("name"))]
                state = str(image.get("state"))
                states[state] = states.get(state, 0) + 1
                image_used.add_metric(label, image.get("bytes_on_disk", 0))
                left.add_metric(label, image.get("sessions_left", 0))
                unclean.add_metric(label, image.get("unclean_sessions", 0))
                readers.add_metric(label, image.get("readers", 0))
                progress = image.get("release_progress")
                if progress and progress.get("total"):
                    release.add_metric(label, progress["done"] / progress["total"])
            for state, count in states.items():
                images.add_metric([name, state], count)
            progress = vol.get("resync_progress")
            if progress and progress.get("total"):
                resync.add_metric([name], progress["done"] / progress["total"])
        yield from (info, size, live, used, damaged, sessions, images, image_used, left,
                    unclean, readers, release, resync)

    def _counters(self, volumes: list[JSON]) -> Iterable[Metric]:
        v = ["volume"]
        vo = ["volume", "op"]
        requests = CounterMetricFamily(
            "owm_volume_requests", "Requests served, by kind: read, write, zero (write-zeroes "
            "and trim), flush on sessions; image_read on readers of preserved images.", labels=vo)
        nbytes = CounterMetricFamily("owm_volume_request_bytes",
                                     "Bytes read or written by the requests served.", labels=vo)
        errors = CounterMetricFamily("owm_volume_request_errors", "Requests that failed.",
                                     labels=vo)
        latency = HistogramMetricFamily("owm_volume_request_seconds",
                                        "Time to serve a request, in the volume.", labels=vo)
        inflight = GaugeMetricFamily("owm_volume_inflight_requests",
                                     "Session requests being served now.", labels=v)
        copies = CounterMetricFamily("owm_volume_cow_copies",
                                     "Chunks copied aside so that a preserved image keeps "
                                     "them (copy-on-write; the log engine's partial writes).",
                                     labels=v)
        copy_bytes = CounterMetricFamily("owm_volume_cow_copy_bytes",
                                         "Bytes of the chunks copied aside.", labels=v)
        opened = CounterMetricFamily("owm_volume_sessions_opened", "Sessions opened.", labels=v)
        unclean = CounterMetricFamily("owm_volume_sessions_unclean",
                                      "Sessions that ended without a clean disconnect.",
                                      labels=v)
        preserves = CounterMetricFamily("owm_volume_preserves", "Preserves done.", labels=v)
        cutovers = CounterMetricFamily("owm_volume_cutovers", "Cutovers done.", labels=v)
        releases = CounterMetricFamily("owm_volume_releases", "Releases finished.", labels=v)
        drain = GaugeMetricFamily("owm_volume_last_drain_seconds",
                                  "From preserve to drained, for the image that drained last "
                                  "(images preserved since the daemon started).",
                                  labels=["volume", "image"])
        backup_time = HistogramMetricFamily(
            "owm_backup_read_seconds", "Reader sessions of preserved images (a backup pulls "
            "through one), from open to close.", labels=v)
        backup_bytes = CounterMetricFamily("owm_backup_read_bytes",
                                           "Bytes read by finished reader sessions of preserved "
                                           "images.", labels=v)
        for vol in volumes:
            name = str(vol.get("name"))
            for op in OPS:
                snap = vol["ops"][op]
                requests.add_metric([name, op], snap["count"])
                nbytes.add_metric([name, op], snap["bytes"])
                errors.add_metric([name, op], snap["errors"])
                _histogram(latency, [name, op], snap)
            inflight.add_metric([name], vol.get("inflight", 0))
            copies.add_metric([name], vol.get("cow_copies", 0))
            copy_bytes.add_metric([name], vol.get("cow_copy_bytes", 0))
            opened.add_metric([name], vol.get("sessions_opened", 0))
            unclean.add_metric([name], vol.get("sessions_unclean", 0))
            preserves.add_metric([name], vol.get("preserves", 0))
            cutovers.add_metric([name], vol.get("cutovers", 0))
            releases.add_metric([name], vol.get("releases", 0))
            if vol.get("last_drain_seconds") is not None:
                drain.add_metric([name, f"{name}@{vol.get('last_drain_image')}"],
                                 vol["last_drain_seconds"])
            readers = vol["reader_sessions"]
            _histogram(backup_time, [name], readers)
            backup_bytes.add_metric([name], readers["bytes"])
        yield from (requests, nbytes, errors, latency, inflight, copies, copy_bytes, opened,
                    unclean, preserves, cutovers, releases, drain, backup_time, backup_bytes)


def build_registry(sources: MetricsSources, info: JSON) -> CollectorRegistry:
    """A registry of the daemon's own: owm's collector plus process/platform/gc metrics."""
    registry = CollectorRegistry()
    registry.register(OwmCollector(sources, info))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    if GC_COLLECTOR is not None:  # absent on interpreters without gc.get_stats
        GCCollector(registry=registry)
    return registry


def render(ctx: ControlContext) -> web.Response:
    registry = ctx.metrics
    if registry is None:
        raise InvalidRequest("this daemon was started without metrics")
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text exposition of the daemon's registry."""
    return render(request.app[CONTEXT])


def health_answer(ctx: ControlContext) -> web.Response:
    """``GET /v1/health``: 200 once every listener is serving, 503 while starting or closing.

    ``owm serve`` sets ``ready`` in the daemon's facts; a context made without it (an embedded
    control API) is ready as soon as it answers.
    """
    if ctx.closing.is_set():
        status = "closing"
    elif ctx.daemon.get("ready", True):
        status = "ok"
    else:
        status = "starting"
    return web.json_response({**ctx.daemon, "status": status, "ready": status == "ok"},
                             status=200 if status == "ok" else 503)


# What the metrics listener serves: reading needs nothing, the dashboard's three actions need the
# control token. Routes are matched by their pattern, after aiohttp resolved the request.
READ_ONLY = frozenset({
    "/", "/dashboard.js", "/dashboard.css", "/metrics", "/v1/health", "/v1/openapi.json",
    "/v1/volumes", "/v1/volumes/{name}", "/v1/images/{image}",
    "/v1/repos", "/v1/repos/{n}/backups",
})
ACTIONS = frozenset({
    "/v1/volumes/{name}/preserve", "/v1/images/{image}/cutover", "/v1/images/{image}/release",
})


def readonly_guard(token: str | None) -> Middleware:
    """GET of READ_ONLY paths for anyone; POST of ACTIONS only with ``Bearer TOKEN``."""
    expected = token.encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        pattern = route.resource.canonical if route.resource is not None else None
        if request.match_info.http_exception is not None or pattern is None:
            return await handler(request)  # unknown path or method: the usual 404 / 405
        if request.method in ("GET", "HEAD") and pattern in READ_ONLY:
            return await handler(request)
        if request.method == "POST" and pattern in ACTIONS:
            if expected is None:
                return web.json_response({"error": (
                    "actions on the metrics listener need the control token, and this daemon "
                    "was started without --control-token-file")}, status=403)
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return web.json_response(
                    {"error": "this action needs the control token (Authorization: Bearer "
                              "TOKEN)"}, status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="owm"'})
            if not hmac.compare_digest(given.strip().encode(), expected):
                return web.json_response({"error": "the control token is wrong"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="owm"'})
            return await handler(request)
        return web.json_response(
            {"error": f"the metrics listener is read-only: {request.method} {request.path} "
                      "is served on the control socket only"}, status=403)

    return guard


class MetricsListener:
    """The optional TCP listener of ``/metrics`` and the dashboard: read-only, no token.

    It serves a copy of the control application (``app_factory``, normally
    ``owm.control.app.create_app``) behind :func:`readonly_guard`.
    """

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    async def start(
        self, host: str, port: int, app_factory: Callable[[ControlContext], web.Application],
        token: str | None = None,
    ) -> None:
        app = app_factory(self.ctx)
        app.middlewares.insert(0, readonly_guard(token))
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise InvalidRequest(
                f"cannot listen for metrics on {host}:{port}: {exc.strerror}"
            ) from None
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
