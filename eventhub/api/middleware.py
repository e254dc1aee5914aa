"""Authentication and error mapping, for every route.

Every ``/v1`` route needs ``Authorization: Bearer <token>`` with the route's scope (401 without a
known token, 403 without the scope). Every error is an RFC 9457 problem document
(``application/problem+json``) with ``status``, ``title``, ``detail`` and, where one field is at
fault, ``errors: [{field, message}]``. Unexpected exceptions are logged once and answered with a
bare 500; no traceback or secret reaches the client.

Two failures are the caller's or the moment's, never a 500: a request header that is not UTF-8
text is a 400 naming the header; PostgreSQL or Redis unreachable (refused, reset, timed out,
shutting down) is a 503 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import redis.exceptions
import structlog
from aiohttp import web

from eventhub.api.context import ALSO_ATTR, CALLER, CONTEXT, SCOPE_ATTR, Caller, caller_id
from eventhub.errors import (
    DependencyDown,
    EventhubError,
    FieldProblem,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from eventhub.settings import Scope

_DEPENDENCY_RETRY_AFTER = 5  # seconds
# PostgreSQL errors that say the server is away or refuses work for now, not that the query is
# wrong: connection lost or refused (class 08), shutting down or starting (57), too many clients.
_POSTGRES_DOWN = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

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
        _check_headers(request)
        _check_parameters(request)
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
    except _POSTGRES_DOWN as exc:
        return _dependency_down(request, "PostgreSQL", exc)
    except _REDIS_DOWN as exc:
        return _dependency_down(request, "Redis", exc)
    except OSError as exc:  # a connection refused or reset below a client library
        return _dependency_down(request, _raised_in(exc), exc)
    except Exception:
        # Logged once, here; the client learns nothing of the internals.
        log.exception("request_failed", method=request.method, path=request.path)
        return problem(EventhubError("the request could not be handled: see the hub's log"))


def _check_headers(request: web.Request) -> None:
    """aiohttp hands bytes that are not UTF-8 on as lone surrogates, which nothing downstream
    can encode: name the header instead. (ASCII, the usual case, is one check for them all.)"""
    headers = request.headers
    if "".join(headers.values()).isascii():
        return
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    f"the {name} header is not UTF-8 text",
                    problems=(FieldProblem(name, "is not UTF-8 text"),),
                ) from None


def _check_parameters(request: web.Request) -> None:
    """A NUL can be in no name and no stored value (PostgreSQL refuses it in text): a path
    parameter holding one names nothing there is, a query parameter is the caller's to fix."""
    if "\x00" in request.path:
        raise NotFound(f"nothing is at {request.path!r}")
    for name, value in request.query.items():
        if "\x00" in value:
            raise InvalidInput(
                f"the query parameter {name} holds a NUL character",
                problems=(FieldProblem(name, "must not hold a NUL character"),),
            )


def _raised_in(exc: BaseException) -> str:
    """Which client library a bare connection error came from, by its traceback."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith("asyncpg"):
            return "PostgreSQL"
        if module.startswith("redis"):
            return "Redis"
        tb = tb.tb_next
    return "a dependency"


def _dependency_down(request: web.Request, what: str, exc: Exception) -> web.Response:
    log.warning(
        "request_dependency_down",
        method=request.method,
        path=request.path,
        dependency=what,
        error=type(exc).__name__,
    )
    error = DependencyDown(
        f"{what} is unavailable ({type(exc).__name__}): try again later",
        retry_after=_DEPENDENCY_RETRY_AFTER,
    )
    request.app[CONTEXT].metrics.http_rejected.labels(str(error.status)).inc()
    return problem(error)


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
    instead: frozenset[Scope] = getattr(route_handler, ALSO_ATTR, frozenset())
    if scope not in scopes and not instead & scopes:
        also = "".join(f" (or '{s.value}')" for s in sorted(instead))
        raise Forbidden(f"this token lacks the '{scope.value}'{also} scope")
    request[CALLER] = Caller(caller_id(token.strip()), scopes)
    return await handler(request)
