"""The web dashboard: one HTML page, a script and a style sheet, served by the daemon itself.

No build step and nothing from a CDN: the three files in ``static/`` are read once and served
as they are. The page polls the existing JSON API (``GET /v1/volumes``) and ``/metrics`` and
draws each volume, its generation chain as a timeline and throughput/latency sparklines. Its
buttons (preserve, cutover, release) are plain API calls; on the metrics listener they are
refused unless the control token was entered (see ``owm.control.metrics``).

The handlers are registered in ``owm.control.routes`` (the control socket) and so are on the
metrics listener too, which serves a guarded copy of the same application.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web

STATIC = {
    "/": ("dashboard.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}

# The page is the daemon's own: it may run its script and talk to the daemon, nothing else.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _content(name: str) -> bytes:
    return files("owm.control").joinpath("static", name).read_bytes()


async def static_file(request: web.Request) -> web.Response:
    """``GET /``, ``/dashboard.js``, ``/dashboard.css``."""
    name, ctype = STATIC[request.path]
    return web.Response(body=_content(name), content_type=ctype, charset="utf-8",
                        headers=SECURITY_HEADERS)
