"""``GET /v1/dead-letters`` (filters: function, binding, status, since, until; keyset pages of
``limit`` rows with ``nextCursor``) and ``GET /v1/dead-letters/{id}``."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
from aiohttp import web

from dlq.store import STATUSES, DeadLetterQuery, DeadLetterStore
from eventhub.api.context import CONTEXT, requires
from eventhub.errors import FieldProblem, InvalidInput
from eventhub.settings import Scope

_MAX_LIMIT = 500


def _store(request: web.Request) -> DeadLetterStore:
    return request.app[CONTEXT].dead_letters


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", problems=(FieldProblem(field, message),))


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(name, "must be an RFC 3339 time such as 2024-05-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    try:
        failed_at, dl_id = base64.urlsafe_b64decode(raw.encode()).decode().split("|", 1)
        return datetime.fromisoformat(failed_at), dl_id
    except (ValueError, UnicodeDecodeError):
        raise _bad("cursor", "is not a cursor this API returned") from None


def query_of(request: web.Request) -> DeadLetterQuery:
    q = request.query
    status = q.get("status")
    if status is not None and status not in STATUSES:
        raise _bad("status", f"must be one of {', '.join(STATUSES)}")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise _bad("limit", "must be an integer") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise _bad("limit", f"must be between 1 and {_MAX_LIMIT}")
    return DeadLetterQuery(
        function=q.get("function"),
        binding=q.get("binding"),
        source=q.get("source"),
        status=status,
        since=_time(request, "since"),
        until=_time(request, "until"),
        limit=limit,
        after=_cursor(q.get("cursor")),
    )


@requires(Scope.DLQ)
async def list_dead_letters(request: web.Request) -> web.Response:
    query = query_of(request)
    items = await _store(request).list(query)
    next_cursor = None
    if len(items) == query.limit:
        last = items[-1]
        failed_at = datetime.fromisoformat(last["failedAt"].replace("Z", "+00:00"))
        next_cursor = base64.urlsafe_b64encode(
            f"{failed_at.isoformat()}|{last['id']}".encode()
        ).decode()
    return web.Response(
        body=orjson.dumps({"items": items, "nextCursor": next_cursor}),
        content_type="application/json",
    )


@requires(Scope.DLQ)
async def get_dead_letter(request: web.Request) -> web.Response:
    doc = await _store(request).get(request.match_info["id"])
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_get("/v1/dead-letters/{id}", get_dead_letter)
