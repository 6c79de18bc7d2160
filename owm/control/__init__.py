"""The daemon's control API: HTTP/JSON over POOL/control.sock (and optionally token-guarded TCP).

``app`` builds the aiohttp application (routes, error mapping, the token check), ``server``
binds it to its listeners, ``client`` is what the CLI and the demo talk to it with, and
``openapi`` is the document the daemon serves at ``GET /v1/openapi.json``, assembled from the
route modules (``routes``, ``lock_routes``, ``backup_routes``), which share ``common``.

May import ``owm.common`` and ``owm.locks``; the pool reaches it only through ``context``.
"""
