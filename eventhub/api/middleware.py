"""Authentication and error mapping, for every route.

Every ``/v1`` route needs ``Authorization: Bearer <token>`` with the route's scope (401 without a
known token, 403 without the scope). Every error is an RFC 9457 problem document
(``application/problem+json``) with ``status``, ``title``, ``detail`` and, where one field is at
fault, ``errors: [{field, message}]``. Unexpected exceptions are logged once and answered with a
bare 500; no traceback or secret reaches the client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import structlog
from aiohttp import web

from eventhub.api.context import CONTEXT, SCOPE_ATTR
from eventhub.errors import (
    EventhubError,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(error: EventhubError) -> web.Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if error.problems:
        body["errors"] = [{"field": p.field, "message": p.message} for p in error.problems]
    headers = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="eventhub"'
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EventhubError as exc:
        request.app[CONTEXT].metrics.http_rejected.labels(str(exc.status)).inc()
        return problem(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONTEXT].settings.max_body_size
        return problem(PayloadTooLarge(f"the request body is larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(_http_error(exc))
    except asyncpg.DataError as exc:
        # A value PostgreSQL cannot take (a NUL byte in a string...): the caller's to fix.
        return problem(InvalidInput(f"a value cannot be stored or searched: {exc}"[:300]))
    except Exception:
        # Logged once, here; the client learns nothing of the internals.
        log.exception("request_failed", method=request.method, path=request.path)
        return problem(EventhubError("the request could not be handled: see the hub's log"))


def _http_error(exc: web.HTTPException) -> EventhubError:
    error = EventhubError(exc.reason)
    error.status = exc.status
    error.title = exc.reason
    return error


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    scope = getattr(route_handler, SCOPE_ATTR, None)
    if scope is None:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthorized("send Authorization: Bearer <token>")
    scopes = request.app[CONTEXT].settings.scopes_of(token.strip())
    if scopes is None:
        raise Unauthorized("unknown token")
    if scope not in scopes:
        raise Forbidden(f"this token lacks the '{scope.value}' scope")
    return await handler(request)
