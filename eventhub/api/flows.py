"""A flow's runs (scope ``admin``; see :mod:`eventhub.flows`). The Flow resource itself is
served by the generic resource routes (``/v1/flows/{name}``).

======================================  ===========================================================
``GET /v1/flows/{name}/runs``           newest first: ``status`` (running, succeeded, failed),
                                        ``limit`` (1-500, 50)
``GET /v1/flows/{name}/runs/{id}``      one run, with every step it entered (a parallel step's
                                        branches included): status, timing, attempts, the
                                        version called, the first KiB of its result, its error
======================================  ===========================================================

A flow that is not declared and has no runs is a 404; the runs of a deleted flow stay readable.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from eventhub.api.context import CONTEXT, requires
from eventhub.errors import FieldProblem, InvalidInput, NotFound
from eventhub.flows.runs import RUN_STATUSES, FlowRuns
from eventhub.resources import Kind
from eventhub.settings import Scope

RUNS = web.AppKey("flow_runs", FlowRuns)
_MAX_LIMIT = 500
_QUERY = ("status", "limit")


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", problems=(FieldProblem(field, message),))


@requires(Scope.ADMIN)
async def list_runs(request: web.Request) -> web.Response:
    q, name = request.query, request.match_info["name"]
    for key in q:
        if key not in _QUERY:
            raise _bad(key, f"is not a parameter ({', '.join(_QUERY)})")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise _bad("limit", "must be an integer") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise _bad("limit", f"must be between 1 and {_MAX_LIMIT}")
    status = q.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise _bad("status", f"must be one of {', '.join(RUN_STATUSES)}")
    runs = request.app[RUNS]
    items = await runs.listing(name, status, limit)
    if not items and not await runs.exists(name):
        try:
            await request.app[CONTEXT].store.lookup(Kind.FLOW, name)
        except NotFound:
            raise NotFound(f"Flow '{name}' does not exist") from None
    return _json({"items": items})


@requires(Scope.ADMIN)
async def get_run(request: web.Request) -> web.Response:
    run = await request.app[RUNS].get(request.match_info["id"], request.match_info["name"])
    return _json(run)


def add_routes(app: web.Application, runs: FlowRuns) -> None:
    app[RUNS] = runs
    app.router.add_get("/v1/flows/{name}/runs", list_runs)
    app.router.add_get("/v1/flows/{name}/runs/{id}", get_run)
