"""The OpenAPI 3.1 description of the control API, and its route ``GET /v1/openapi.json``.

Kept by hand beside the routes: this module describes the volume and image endpoints itself and
takes the fragments of the other route modules (``lock_routes``, ``backup_routes``), which never
import it back. A test checks that every route is described and nothing described is missing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

import owm
from owm.control import backup_routes, group_routes, lock_routes, repo_routes
from owm.control.common import json_content as _json
from owm.control.common import ok
from owm.control.common import schema_ref as _ref

JSON = dict[str, Any]
routes = web.RouteTableDef()


def _errors(*statuses: int) -> dict[str, JSON]:
    meaning = {
        400: "Bad request: bad JSON, a missing or mistyped field, a bad name or size.",
        404: "No such volume or image.",
        409: "The volume or image is in the wrong state for this (e.g. release while draining).",
        503: "The daemon is shutting down.",
        507: "The pool's disk is full.",
    }
    return {str(s): _json(_ref("Error"), meaning[s]) for s in statuses}


_VOLUME_PARAM = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "Volume name."}
_IMAGE_PARAM = {"name": "image", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": "^.+@[0-9]+$"},
                "description": "Preserved image, NAME@N (N is the generation it froze)."}

_SCHEMAS: JSON = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string", "description": "One plain sentence."}},
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "starting", "closing"],
                       "description": "ok (200) once every listener serves; else 503."},
            "ready": {"type": "boolean"},
            "pool": {"type": "string"}, "pid": {"type": "integer"}, "version": {"type": "string"},
            "metrics": {"type": ["string", "null"],
                        "description": "HOST:PORT of --metrics-listen, or null."},
            "nbd": {"type": "object", "properties": {
                "tcp": {"type": ["string", "null"], "description": "HOST:PORT or null."},
                "unix": {"type": ["string", "null"]}}},
            "control": {"type": "object", "properties": {
                "unix": {"type": "string"}, "tcp": {"type": ["string", "null"]}}},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"}, "peer": {"type": "string"},
            "connected_since": {"type": "string", "format": "date-time"},
            "bytes_read": {"type": "integer"}, "bytes_written": {"type": "integer"},
            "generation": {"type": "integer", "description": "Only in 'holding' lists."},
        },
    },
    "Generation": {
        "type": "object",
        "properties": {"generation": {"type": "integer"},
                       "sessions": {"type": "array", "items": _ref("Session")}},
    },
    "Image": {
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "generation": {"type": "integer"},
            "state": {"enum": ["draining", "drained", "drained-unclean", "broken", "releasing",
                               "damaged"]},
            "sessions_left": {"type": "integer"}, "unclean_sessions": {"type": "integer"},
            "consistency": {"enum": ["transaction-consistent", "crash-consistent", "broken",
                                     "damaged"]},
            "preserved_at": {"type": "string"}, "drained_at": {"type": ["string", "null"]},
            "bytes_on_disk": {"type": "integer"}, "broken_reason": {"type": ["string", "null"]},
            "readers": {"type": "integer"},
            "release_progress": {"type": ["object", "null"], "properties": {
                "done": {"type": "integer"}, "total": {"type": "integer"}}},
            "holding": {"type": "array", "items": _ref("Session"),
                        "description": "Open sessions that keep it draining (GET only)."},
        },
    },
    "Volume": {
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "size": {"type": "integer"},
            "method": {"enum": ["cow", "log", "mirror"]}, "chunk_size": {"type": "integer"},
            "legs": {"type": "integer"}, "enospc_policy": {"type": "string"},
            "live_generation": {"type": "integer"},
            "uid": {"type": "string", "description": "Random id of this volume incarnation."},
            "restore": {"type": ["object", "null"], "description": "Set while a restore into "
                        "the volume is unfinished: {state: incomplete, from: REPO ID, since}."},
            "damaged": {"type": ["string", "null"],
                        "description": "Why the live volume cannot be trusted (I/O refused)."},
            "warnings": {"type": "array", "items": {"type": "string"},
                         "description": "What loading its tables found and repaired."},
            "generations": {"type": "array", "items": _ref("Generation")},
            "images": {"type": "array", "items": _ref("Image")},
            "resync_progress": {
                "type": ["object", "null"],
                "description": "A mirror's background resync of its in-sync legs after an "
                               "unclean stop (chunks of its write-intent map), while it runs.",
                "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}}},
        },
    },
    "CreateVolume": {
        "type": "object", "required": ["name", "size"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "size": {"type": ["integer", "string"], "description": "Bytes, or e.g. \"1G\"."},
            "method": {"enum": ["cow", "log", "mirror"], "default": "cow"},
            "chunk_size": {"type": ["integer", "string"], "default": 65536},
            "legs": {"type": "integer", "minimum": 1, "default": 2},
            "enospc_policy": {"enum": ["fail-write", "break-image"], "default": "fail-write"},
        },
    },
    "PreserveRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"instant": {
            "type": "boolean", "default": False,
            "description": "Cut over at once (a crash-consistent snapshot)."}},
    },
    "PreserveResult": {
        "type": "object",
        "properties": {"image": {"type": "string"}, "volume": {"type": "string"},
                       "instant": {"type": "boolean"},
                       "preserve_ms": {"type": "number", "description": "Time the split took."},
                       "status": _ref("Image")},
    },
    "WaitRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"timeout": {"type": ["number", "null"], "minimum": 0,
                                   "description": "Seconds; null waits for as long as it takes."}},
    },
    "WaitResult": {
        "type": "object",
        "properties": {"image": {"type": "string"}, "drained": {"type": "boolean"},
                       "status": _ref("Image"),
                       "holding": {"type": "array", "items": _ref("Session")}},
    },
    "CutoverResult": {
        "type": "object",
        "properties": {"image": {"type": "string"},
                       "rebound": {"type": "array", "items": _ref("Session")},
                       "status": _ref("Image")},
    },
    "ReleaseResult": {
        "type": "object",
        "properties": {"image": {"type": "string"}, "released": {"type": "boolean"},
                       "bytes_freed": {"type": "integer"}},
    },
}


def _paths() -> JSON:
    return {
        "/v1/health": {"get": {
            "summary": "Is the daemon up; where it serves NBD.", "operationId": "health",
            "responses": {"200": _json(_ref("Health"), "The daemon's facts; it is ready."),
                          "503": _json(_ref("Health"), "Starting or closing: not ready.")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text exposition format), also on --metrics-listen.",
            "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text format 0.0.4.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/": {"get": {
            "summary": "The web dashboard (also on --metrics-listen).", "operationId": "dashboard",
            "responses": {"200": {"description": "An HTML page.",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/dashboard.js": {"get": {
            "summary": "The dashboard's script.", "operationId": "dashboardScript",
            "responses": {"200": {"description": "JavaScript."}}}},
        "/dashboard.css": {"get": {
            "summary": "The dashboard's style sheet.", "operationId": "dashboardStyle",
            "responses": {"200": {"description": "CSS."}}}},
        "/v1/openapi.json": {"get": {
            "summary": "This document.", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1 document."}}}},
        "/v1/volumes": {
            "get": {"summary": "Status of every volume.", "operationId": "listVolumes",
                    "responses": {"200": _json({"type": "array", "items": _ref("Volume")},
                                               "One status object per volume.")}},
            "post": {"summary": "Create a volume.", "operationId": "createVolume",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref("CreateVolume")}}},
                     "responses": {"201": _json(_ref("Volume"), "The new volume."),
                                   **_errors(400, 409, 507)}},
        },
        "/v1/volumes/{name}": {
            "parameters": [_VOLUME_PARAM],
            "get": {"summary": "Status of one volume: sessions per generation, images.",
                    "operationId": "showVolume",
                    "responses": {"200": _json(_ref("Volume"), "The volume."), **_errors(404)}},
            "delete": {"summary": "Delete a volume with no open sessions or readers; refused "
                                  "while it has preserved images unless force is true.",
                       "operationId": "deleteVolume",
                       "requestBody": {"required": False, "content": {"application/json": {
                           "schema": {"type": "object", "properties": {
                               "force": {"type": "boolean", "default": False}},
                               "additionalProperties": False}}}},
                       "responses": {"200": _json({"type": "object", "properties": {
                           "deleted": {"type": "string"}}}, "Deleted."),
                           **_errors(400, 404, 409)}},
        },
        "/v1/volumes/{name}/preserve": {
            "parameters": [_VOLUME_PARAM],
            "post": {"summary": "Split the volume: open sessions keep the new image NAME@N, "
                                "new sessions get the live volume.",
                     "operationId": "preserve",
                     "requestBody": {"required": False, "content": {
                         "application/json": {"schema": _ref("PreserveRequest")}}},
                     "responses": {"201": _json(_ref("PreserveResult"), "The image."),
                                   **_errors(400, 404, 409, 507)}},
        },
        "/v1/images/{image}": {
            "parameters": [_IMAGE_PARAM],
            "get": {"summary": "State of a preserved image and the sessions holding it.",
                    "operationId": "showImage",
                    "responses": {"200": _json(_ref("Image"), "The image."),
                                  **_errors(400, 404)}},
        },
        "/v1/images/{image}/wait": {
            "parameters": [_IMAGE_PARAM],
            "post": {"summary": "Wait until the image is drained or the timeout passes.",
                     "operationId": "waitDrained",
                     "requestBody": {"required": False, "content": {
                         "application/json": {"schema": _ref("WaitRequest")}}},
                     "responses": {"200": _json(_ref("WaitResult"),
                                                "drained is false on timeout."),
                                   **_errors(400, 404, 409, 503)}},
        },
        "/v1/images/{image}/cutover": {
            "parameters": [_IMAGE_PARAM],
            "post": {"summary": "Rebind the sessions still holding the image to the next "
                                "generation; the image becomes crash-consistent.",
                     "operationId": "cutover",
                     "responses": {"200": _json(_ref("CutoverResult"), "Cut over."),
                                   **_errors(400, 404, 409)}},
        },
        "/v1/images/{image}/release": {
            "parameters": [_IMAGE_PARAM],
            "post": {"summary": "Discard a drained image and reclaim its storage. Progress "
                                "shows in GET /v1/images/{image} while it runs.",
                     "operationId": "release",
                     "responses": {"200": _json(_ref("ReleaseResult"), "Released."),
                                   **_errors(400, 404, 409)}},
        },
    }


def openapi_document() -> JSON:
    """The whole document, built fresh (callers may mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "owm control API",
            "version": owm.__version__,
            "description": (
                "HTTP/JSON over the Unix socket POOL/control.sock (mode 0600), or over an "
                "optional TCP listener that needs 'Authorization: Bearer TOKEN'. Every error "
                "is a 4xx (5xx only for daemon bugs or shutdown) with {\"error\": sentence}."
            ),
        },
        "paths": {**_paths(), **lock_routes.OPENAPI_PATHS, **backup_routes.OPENAPI_PATHS,
                  **group_routes.OPENAPI_PATHS, **repo_routes.OPENAPI_PATHS},
        "components": {
            "schemas": {**_SCHEMAS, **lock_routes.OPENAPI_SCHEMAS,
                        **backup_routes.OPENAPI_SCHEMAS, **repo_routes.OPENAPI_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only on the TCP listener."}},
        },
    }


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return ok(openapi_document())
