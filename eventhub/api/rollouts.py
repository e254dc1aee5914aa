"""Canary rollouts on a function's alias (scope ``admin``; see :mod:`eventhub.rollout`).

==========================================  ===================================================
``POST /v1/functions/{name}/rollouts``      start one: ``alias``, ``to``, ``steps``,
                                            ``interval``, ``analysis``, ``onRollback``: 201
``GET /v1/rollouts``                        newest first; ``function``, ``state``, ``limit``
``GET /v1/rollouts/{id}``                   one, with the figures of each step ended
``POST /v1/rollouts/{id}/pause``            hold the canary's weight; nothing is judged
``POST /v1/rollouts/{id}/resume``           the current step starts over
``POST /v1/rollouts/{id}/abort``            the alias goes back to the stable version;
                                            optional body ``{"reason"}``
==========================================  ===================================================

A change refused by the rollout's state (pausing a promoted one, a second rollout on an alias)
is a 409. Once a change is answered, this process routes with it (read-your-writes, as for
resources); every other process follows by ``NOTIFY``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from eventhub.api.context import CONTEXT, requires
from eventhub.errors import FieldProblem, InvalidInput
from eventhub.rollout import Rollout, Rollouts, parse_request
from eventhub.rollout.store import state_of
from eventhub.settings import Scope

ROLLOUTS = web.AppKey("rollouts", Rollouts)
_MAX_LIMIT = 500
_MAX_REASON = 500
_QUERY = ("function", "state", "limit")


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", problems=(FieldProblem(field, message),))


async def _body(request: web.Request, *, required: bool) -> Any:
    raw = await request.read()
    if not raw.strip() and not required:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None


@requires(Scope.ADMIN)
async def start(request: web.Request) -> web.Response:
    body = parse_request(await _body(request, required=True))
    rollout = await request.app[ROLLOUTS].start(request.match_info["name"], body)
    await request.app[CONTEXT].router.reload()
    return _json(rollout.document(), 201, {"Location": f"/v1/rollouts/{rollout.id}"})


@requires(Scope.ADMIN)
async def list_rollouts(request: web.Request) -> web.Response:
    q = request.query
    for name in q:
        if name not in _QUERY:
            raise _bad(name, f"is not a parameter ({', '.join(_QUERY)})")
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise _bad("limit", "must be an integer") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise _bad("limit", f"must be between 1 and {_MAX_LIMIT}")
    state = q.get("state")
    if state is not None:
        state_of(state)
    items = await request.app[ROLLOUTS].listing(q.get("function"), state, limit)
    return _json({"items": [r.document() for r in items]})


@requires(Scope.ADMIN)
async def get_rollout(request: web.Request) -> web.Response:
    rollout = await request.app[ROLLOUTS].get(request.match_info["id"])
    return _json(rollout.document())


@requires(Scope.ADMIN)
async def pause(request: web.Request) -> web.Response:
    return await _changed(request, await request.app[ROLLOUTS].pause(request.match_info["id"]))


@requires(Scope.ADMIN)
async def resume(request: web.Request) -> web.Response:
    return await _changed(request, await request.app[ROLLOUTS].resume(request.match_info["id"]))


@requires(Scope.ADMIN)
async def abort(request: web.Request) -> web.Response:
    body = await _body(request, required=False)
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object (or empty)")
    for name in body:
        if name != "reason":
            raise _bad(str(name), "is not a field (reason)")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
        raise _bad("reason", f"must be text of at most {_MAX_REASON} characters")
    rollout = await request.app[ROLLOUTS].abort(request.match_info["id"], reason or None)
    return await _changed(request, rollout)


async def _changed(request: web.Request, rollout: Rollout) -> web.Response:
    await request.app[CONTEXT].router.reload()
    return _json(rollout.document())


def add_routes(app: web.Application, rollouts: Rollouts) -> None:
    app[ROLLOUTS] = rollouts
    app.router.add_post("/v1/functions/{name}/rollouts", start)
    app.router.add_get("/v1/rollouts", list_rollouts)
    app.router.add_get("/v1/rollouts/{id}", get_rollout)
    app.router.add_post("/v1/rollouts/{id}/pause", pause)
    app.router.add_post("/v1/rollouts/{id}/resume", resume)
    app.router.add_post("/v1/rollouts/{id}/abort", abort)
