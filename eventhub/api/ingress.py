"""Ingress over HTTP: CloudEvents, direct (async) invocations, and invocation status."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from eventhub import callbackpolicy
from eventhub.api.context import CALLER, CONTEXT, requires
from eventhub.errors import FieldProblem, InvalidInput, NotFound
from eventhub.events import parse_http
from eventhub.ingress import Trace
from eventhub.invocations import Invocation
from eventhub.resources import API_SOURCE
from eventhub.settings import Scope

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_KEY_MAX = 256


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def trace_of(request: web.Request) -> Trace:
    parent = request.headers.get("traceparent", "").strip().lower()
    return Trace(
        traceparent=parent if _TRACEPARENT.match(parent) else None,
        tracestate=request.headers.get("tracestate") if _TRACEPARENT.match(parent) else None,
    )


@requires(Scope.EVENTS)
async def post_events(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await request.read()
    events = parse_http(request.headers, body)
    invocations = await ctx.ingress.submit(
        API_SOURCE, events, trace_of(request), caller=request[CALLER].id
    )
    return _json(
        {
            "accepted": len(events),
            "invocations": [
                {"id": i.id, "function": i.function, "binding": i.binding, "eventId": i.event.id}
                for i in invocations
            ],
        },
        status=202,
    )


async def _invoke(request: web.Request) -> Invocation:
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= _KEY_MAX:
        raise InvalidInput(
            "Idempotency-Key must be 1 to 256 characters",
            problems=(FieldProblem("Idempotency-Key", f"must be 1 to {_KEY_MAX} characters"),),
        )
    callback = request.headers.get("X-Callback-Url")
    if callback is not None:  # checked again when sent: see eventhub.callbackpolicy
        await callbackpolicy.check(callback, callbackpolicy.policy_of(ctx.settings.callback_allow))
    body = await request.read()
    return await ctx.ingress.invoke(
        name,
        body,
        request.headers.get("Content-Type"),
        idempotency_key=key,
        callback_url=callback,
        trace=trace_of(request),
        caller=request[CALLER].id,
    )


@requires(Scope.INVOKE)
async def post_invocation(request: web.Request) -> web.Response:
    invocation = await _invoke(request)
    location = f"/v1/invocations/{invocation.id}"
    return _json(
        {
            "id": invocation.id,
            "function": invocation.function,
            "version": invocation.version,
            "status": "queued",
        },
        status=202,
        headers={"Location": location},
    )


@requires(Scope.INVOKE)
async def post_async_function(request: web.Request) -> web.Response:
    """OpenFaaS-compatible alias: 202 with X-Call-Id."""
    invocation = await _invoke(request)
    return web.Response(status=202, headers={"X-Call-Id": invocation.id})


@requires(Scope.INVOKE, Scope.ADMIN)
async def get_invocation(request: web.Request) -> web.Response:
    """Readable with the token that created the invocation, or any ``admin`` token; to every
    other token it does not exist (404, as for an unknown id)."""
    ctx = request.app[CONTEXT]
    caller = request[CALLER]
    inv_id = request.match_info["id"]
    doc = await ctx.state.get(inv_id)
    owner = doc.pop("owner", None) if doc is not None else None
    if doc is None or (Scope.ADMIN not in caller.scopes and owner != caller.id):
        raise NotFound(f"invocation '{inv_id}' is unknown (or older than the state TTL)")
    return _json(doc)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/events", post_events)
    app.router.add_post("/v1/functions/{name}/invocations", post_invocation)
    app.router.add_post("/async-function/{name}", post_async_function)
    app.router.add_get("/v1/invocations/{id}", get_invocation)
