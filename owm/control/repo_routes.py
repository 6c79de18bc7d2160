"""Read-only endpoints listing the backups of the repositories given to ``owm serve``.

``GET /v1/repos`` answers one summary per ``--backup-repo`` (its path, whether it is encrypted
and locked for want of a key, how many backups it holds) and ``GET /v1/repos/{n}/backups``
one page of repository ``n``'s backups, newest first (``?offset=&limit=``, at most 500 a page).
The daemon cannot read a repository itself (``owm.control`` may not import ``owm.backup``): the
CLI builds the listing (``owm.backup.listing.RepoListing``) and the daemon puts it in the
context as ``backup_repos``. A listing reads files, so it runs on a small pool of threads of
its own, never on the event loop, and at most two run at once however many pages are asked.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from aiohttp import web

from owm.common.errors import InvalidRequest, NotFound
from owm.control.common import error_response_spec, json_content, ok
from owm.control.context import CONTEXT, ControlContext

JSON = dict[str, Any]
routes = web.RouteTableDef()
DEFAULT_PAGE = 50
MAX_PAGE = 500


class BackupRepos(Protocol):
    """What the daemon is given to list repositories with (blocking calls, thread-safe)."""

    def repositories(self) -> list[JSON]: ...

    def backups(self, index: int, offset: int, limit: int) -> JSON: ...


_executor: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="owm-repo-list")
    return _executor


def _repos(ctx: ControlContext) -> BackupRepos | None:
    return ctx.backup_repos


def _int_query(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidRequest(f"the query parameter '{key}' must be a whole number from {low} "
                             f"to {high}")
    return int(text)


@routes.get("/v1/repos")
async def list_repos(request: web.Request) -> web.Response:
    repos = _repos(request.app[CONTEXT])
    if repos is None:
        return ok({"repos": []})
    found = await asyncio.get_running_loop().run_in_executor(_threads(), repos.repositories)
    return ok({"repos": found})


@routes.get("/v1/repos/{n}/backups")
async def list_backups(request: web.Request) -> web.Response:
    text = request.match_info["n"]
    if not text.isdigit() or len(text) > 6:
        raise InvalidRequest(f"'{text}' is not a repository number (GET /v1/repos lists them)")
    repos = _repos(request.app[CONTEXT])
    if repos is None:
        raise NotFound("this daemon shows no backup repository (owm serve --backup-repo PATH)")
    offset = _int_query(request, "offset", 0, 0, 1 << 31)
    limit = _int_query(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    page = await asyncio.get_running_loop().run_in_executor(
        _threads(), repos.backups, int(text), offset, limit)
    return ok(page)


_REPO = {
    "type": "object",
    "properties": {
        "index": {"type": "integer", "description": "n in /v1/repos/{n}/backups."},
        "path": {"type": "string"},
        "encrypted": {"type": "boolean"},
        "locked": {"type": "boolean",
                   "description": "Encrypted and no key was given: only its count is known."},
        "note": {"type": ["string", "null"], "description": "e.g. 'encrypted, no key given'."},
        "count": {"type": ["integer", "null"], "description": "Backups it holds."},
        "error": {"type": ["string", "null"], "description": "Why it cannot be listed now."},
    },
}
_BACKUP = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "volume": {"type": "string"}, "image": {"type": "string"},
        "state": {"enum": ["complete", "incomplete", "running", "damaged"]},
        "label": {"enum": ["transaction-consistent", "drained-unclean", "crash-consistent",
                           "broken", "damaged", "unknown"],
                  "description": "The weakest claim the manifest supports."},
        "consistency": {"type": "string"}, "image_state": {"type": "string"},
        "forced": {"type": "boolean"},
        "preserved_at": {"type": ["string", "null"]},
        "completed_at": {"type": ["string", "null"]}, "started_at": {"type": "string"},
        "size": {"type": "integer", "description": "Bytes of the image."},
        "stored_bytes": {"type": ["integer", "null"],
                         "description": "Bytes this backup added to the repository."},
        "incremental": {"type": "boolean"},
        "parent": {"type": ["string", "null"], "description": "The backup it is based on."},
        "verified": {"type": "boolean",
                     "description": "Its manifest is checksummed (checked on every read)."},
        "manifest": {"enum": ["checksummed", "unverified"]},
        "error": {"type": "string", "description": "Only for damaged manifests."},
    },
}
OPENAPI_SCHEMAS: JSON = {"BackupRepo": _REPO, "RepoBackup": _BACKUP}
OPENAPI_PATHS: JSON = {
    "/v1/repos": {
        "get": {
            "summary": "The backup repositories this daemon shows (owm serve --backup-repo).",
            "operationId": "listRepos",
            "responses": {"200": json_content({
                "type": "object", "properties": {"repos": {
                    "type": "array", "items": {"$ref": "#/components/schemas/BackupRepo"}}}},
                "One summary per repository.")},
        },
    },
    "/v1/repos/{n}/backups": {
        "parameters": [
            {"name": "n", "in": "path", "required": True,
             "schema": {"type": "integer", "minimum": 0}, "description": "Repository number."},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                         "default": 0}},
            {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                        "default": DEFAULT_PAGE}},
        ],
        "get": {
            "summary": "One page of the repository's backups, newest first (a locked "
                       "encrypted repository: its count and no rows).",
            "operationId": "listRepoBackups",
            "responses": {
                "200": json_content({"allOf": [{"$ref": "#/components/schemas/BackupRepo"}, {
                    "type": "object", "properties": {
                        "offset": {"type": "integer"}, "limit": {"type": "integer"},
                        "backups": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/RepoBackup"}}}}]},
                    "The page."),
                "400": error_response_spec("A bad repository number, offset or limit."),
                "404": error_response_spec("No such repository."),
                "503": error_response_spec("The repository cannot be read now."),
            },
        },
    },
}
