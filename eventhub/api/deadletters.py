"""Dead letters for operators (scope ``dlq``).

=============================================  ================================================
``GET /v1/dead-letters``                       filters, keyset pages (``limit``, ``nextCursor``)
``GET /v1/dead-letters/stats``                 counts by function and error, oldest, newest,
                                               hourly counts of the last 24 h
``GET /v1/dead-letters/{id}``                  one dead letter
``POST /v1/dead-letters/replay``               ``{"ids"}`` or ``{"filter"}``, ``to``, ``rate``,
                                               ``dryRun``: 200 preview, or 202 with the job
``POST /v1/dead-letters/purge``                ``{"ids"}`` or ``{"filter"}``, ``dryRun``
``POST /v1/dead-letters/{id}/resend``          send it to the dead-letter function again
``GET /v1/replay-jobs[/{id}]``                 replay jobs and their progress
``POST /v1/replay-jobs/{id}/cancel``           stop a replay job
=============================================  ================================================

Filters, as query parameters or as the ``filter`` object of a body: ``function``, ``binding``,
``source``, ``status``, ``errorCode``, ``reason``, ``since``, ``until`` (RFC 3339).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from dlq.replay import ReplayPlan, check_target
from dlq.store import STATUSES, DeadLetterFilter, DeadLetterQuery, DeadLetterStore, record_of
from eventhub.api.context import CONTEXT, requires
from eventhub.errors import Conflict, FieldProblem, InvalidInput, NotFound
from eventhub.invocations import to_dead_letter_function
from eventhub.settings import Scope
from eventhub.units import parse_rate, parse_time
from eventhub.versions import Target

_MAX_LIMIT = 500
DEFAULT_REPLAY_RATE = "50/s"
_FILTER_FIELDS = {
    "function": "function",
    "version": "version",
    "binding": "binding",
    "source": "source",
    "status": "status",
    "errorCode": "error_code",
    "reason": "reason",
}


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _store(request: web.Request) -> DeadLetterStore:
    return request.app[CONTEXT].dead_letters


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", problems=(FieldProblem(field, message),))


def _time(raw: object, field: str) -> datetime | None:
    if raw is None:
        return None
    try:
        return parse_time(str(raw))
    except ValueError:
        raise _bad(field, "must be an RFC 3339 time such as 2024-05-01T12:00:00Z") from None


def filter_of(values: Mapping[str, Any], prefix: str = "") -> DeadLetterFilter:
    """A filter from query parameters or a body's ``filter``; ``prefix`` names the fields."""
    unknown = [k for k in values if k not in (*_FILTER_FIELDS, "since", "until")]
    if prefix and unknown:
        raise _bad(
            prefix + unknown[0],
            "is not a filter (function, version, binding, source, status, errorCode, reason,"
            " since, until)",
        )
    fields: dict[str, Any] = {}
    for name, attribute in _FILTER_FIELDS.items():
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            raise _bad(prefix + name, "must be a string")
        fields[attribute] = value
    if fields["status"] is not None and fields["status"] not in STATUSES:
        raise _bad(prefix + "status", f"must be one of {', '.join(STATUSES)}")
    return DeadLetterFilter(
        **fields,
        since=_time(values.get("since"), prefix + "since"),
        until=_time(values.get("until"), prefix + "until"),
    )


def _cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    try:
        failed_at, dl_id = base64.urlsafe_b64decode(raw.encode()).decode().split("|", 1)
        return datetime.fromisoformat(failed_at), str(uuid.UUID(dl_id))
    except (ValueError, UnicodeDecodeError):
        raise _bad("cursor", "is not a cursor this API returned") from None


def _uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _bad(field, f"'{value[:60]}' is not an id") from None


def query_of(request: web.Request) -> DeadLetterQuery:
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise _bad("limit", "must be an integer") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise _bad("limit", f"must be between 1 and {_MAX_LIMIT}")
    which = {k: v for k, v in q.items() if k not in ("limit", "cursor")}
    unknown = [k for k in which if k not in (*_FILTER_FIELDS, "since", "until")]
    if unknown:
        raise _bad(
            unknown[0],
            "is not a filter (function, binding, source, status, errorCode,"
            " reason, since, until, limit, cursor)",
        )
    return DeadLetterQuery(filter=filter_of(which), limit=limit, after=_cursor(q.get("cursor")))


@requires(Scope.DLQ)
async def list_dead_letters(request: web.Request) -> web.Response:
    query = query_of(request)
    items = await _store(request).page(query)
    next_cursor = None
    if len(items) == query.limit:
        last = items[-1]
        failed_at = datetime.fromisoformat(last["failedAt"].replace("Z", "+00:00"))
        next_cursor = base64.urlsafe_b64encode(
            f"{failed_at.isoformat()}|{last['id']}".encode()
        ).decode()
    return _json({"items": items, "nextCursor": next_cursor})


@requires(Scope.DLQ)
async def get_dead_letter(request: web.Request) -> web.Response:
    return _json(await _store(request).get(_path_id(request)))


def _path_id(request: web.Request) -> str:
    try:
        return str(uuid.UUID(request.match_info["id"]))
    except ValueError:
        raise NotFound(f"'{request.match_info['id'][:60]}' is not an id this hub made") from None


@requires(Scope.DLQ)
async def stats(request: web.Request) -> web.Response:
    return _json(await _store(request).stats(datetime.now(UTC)))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


def _selection(body: Mapping[str, Any], allowed: tuple[str, ...]) -> DeadLetterFilter:
    """``{"ids": [...]}`` or ``{"filter": {...}}``, one of them given explicitly (``{"filter":
    {}}`` selects every dead letter); an unknown key is refused rather than ignored."""
    unknown = [k for k in body if k not in ("ids", "filter", "dryRun", *allowed)]
    if unknown:
        raise _bad(unknown[0], f"is not a field here (ids, filter, dryRun, {', '.join(allowed)})")
    if ("ids" in body) == ("filter" in body):
        raise _bad("ids", "give either ids or filter")
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _bad("ids", "must be a non-empty list of dead-letter ids")
        return DeadLetterFilter(ids=tuple(_uuid(i, "ids") for i in ids))
    which = body["filter"]
    if not isinstance(which, dict):
        raise _bad("filter", "must be an object")
    return filter_of(which, "filter.")


def _dry_run(body: Mapping[str, Any]) -> bool:
    value = body.get("dryRun", False)
    if not isinstance(value, bool):
        raise _bad("dryRun", "must be true or false")
    return value


@requires(Scope.DLQ)
async def replay(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await _body(request)
    which = _selection(body, ("to", "rate"))
    if which.ids is None and which.status is None:
        which = replace(which, status="dead")  # not what a replay already resolved
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise _bad("to", "must be a function name (f, f:version or f:alias)")
    try:
        rate = parse_rate(str(body.get("rate", DEFAULT_REPLAY_RATE)))
    except ValueError as exc:
        raise _bad("rate", str(exc)) from None
    if to is not None:
        check_target(to, ctx.router.routes.functions)
    if _dry_run(body):
        return _json(await ctx.replays.preview(which))
    plan = ReplayPlan(which=which, to=to, rate=rate.per_second)
    job = await ctx.replays.create(plan, ctx.router.routes.functions)
    ctx.metrics.replays.labels("started").inc(job["total"])
    return _json({"job": job}, 202, {"Location": f"/v1/replay-jobs/{job['id']}"})


@requires(Scope.DLQ)
async def purge(request: web.Request) -> web.Response:
    body = await _body(request)
    which = _selection(body, ())
    if _dry_run(body):
        return _json({"count": await _store(request).count(which)})
    return _json({"purged": await _store(request).purge(which)})


@requires(Scope.DLQ)
async def resend(request: web.Request) -> web.Response:
    """Send a dead letter to its dead-letter function again (after it failed, for example)."""
    ctx = request.app[CONTEXT]
    store = _store(request)
    record = record_of(await store.row(_path_id(request)))
    routes = ctx.router.routes
    target = record.dead_letter_function
    if not target or Target.parse(target).function not in routes.functions:
        raise Conflict(f"dead letter '{record.id}' has no dead-letter function to send it to")
    url = routes.call_url(record.function, record.version)
    await store.mark_dead_letter_function_pending(record.id)
    invocation = routes.aim(to_dead_letter_function(record, url, str(uuid.uuid4())))
    await ctx.ingress.enqueue(invocation)
    return _json(await store.get(record.id))


@requires(Scope.DLQ)
async def list_jobs(request: web.Request) -> web.Response:
    return _json({"items": await request.app[CONTEXT].replays.recent()})


@requires(Scope.DLQ)
async def get_job(request: web.Request) -> web.Response:
    return _json(await request.app[CONTEXT].replays.get(_path_id(request)))


@requires(Scope.DLQ)
async def cancel_job(request: web.Request) -> web.Response:
    return _json(await request.app[CONTEXT].replays.cancel(_path_id(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_get("/v1/dead-letters/stats", stats)
    app.router.add_post("/v1/dead-letters/replay", replay)
    app.router.add_post("/v1/dead-letters/purge", purge)
    app.router.add_get("/v1/dead-letters/{id}", get_dead_letter)
    app.router.add_post("/v1/dead-letters/{id}/resend", resend)
    app.router.add_get("/v1/replay-jobs", list_jobs)
    app.router.add_get("/v1/replay-jobs/{id}", get_job)
    app.router.add_post("/v1/replay-jobs/{id}/cancel", cancel_job)
