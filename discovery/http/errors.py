"""Errors as HTTP answers: one JSON shape, ``{"error": CODE, "message": ..., "parameter": ...}``,
with the status the gRPC door's code corresponds to (discovery/api/errors.py holds gRPC's)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from discovery.errors import (
    AuditFailed,
    DiscoveryError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RevisionNotReached,
    ShuttingDown,
    StoreUnavailable,
    Unauthenticated,
)

_STATUS: tuple[tuple[type[DiscoveryError], int, str], ...] = (
    (InvalidArgument, 400, "invalid_argument"),
    (Unauthenticated, 401, "unauthenticated"),
    (PermissionDenied, 403, "permission_denied"),
    (NotFound, 404, "not_found"),
    (ResourceExhausted, 429, "resource_exhausted"),
    (RevisionNotReached, 504, "revision_not_reached"),
    (ShuttingDown, 503, "shutting_down"),
    (AuditFailed, 503, "unavailable"),
    (StoreUnavailable, 503, "unavailable"),
)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_body(code: str, message: str, *, parameter: str = "", **extra: Any) -> dict[str, Any]:
    """Every HTTP error's JSON: ``{"error", "message"}``, the parameter named, and extras
    (``limit``, ``retry_after_seconds``)."""
    body: dict[str, Any] = {"error": code, "message": message}
    if parameter:
        body["parameter"] = parameter
    body.update(extra)
    return body


def error_response(status: int, code: str, message: str, *, parameter: str = "", **extra: Any) -> web.Response:
    body = error_body(code, message, parameter=parameter, **extra)
    headers = {}
    if "retry_after_seconds" in extra:
        headers["Retry-After"] = str(max(1, round(extra["retry_after_seconds"])))
    return json_response(body, status, headers)


def from_error(exc: DiscoveryError, *, rename: dict[str, str] | None = None) -> web.Response:
    """The answer to a domain error; ``rename`` maps a field to the parameter the caller used."""
    status, code = next(((s, c) for kind, s, c in _STATUS if isinstance(exc, kind)), (500, "internal"))
    if isinstance(exc, InvalidArgument):
        parameter = (rename or {}).get(exc.field, exc.field)
        return error_response(status, code, f"{parameter}: {exc.rule}", parameter=parameter)
    if isinstance(exc, ResourceExhausted):
        return error_response(status, code, str(exc), limit=exc.limit, retry_after_seconds=exc.retry_after)
    return error_response(status, code, str(exc))
