"""``GET /v1/functions/{name}/stats``: a function's calls, failures, retries, dead letters and
latency per version over the last 5 minutes, hour and 24 hours, summed over every hub process,
and its backlog now (see :mod:`eventhub.stats`)."""

from __future__ import annotations

import orjson
from aiohttp import web

from eventhub.api.context import CONTEXT, requires
from eventhub.resources import Kind
from eventhub.settings import Scope
from eventhub.stats import Stats, report


@requires(Scope.ADMIN)
async def function_stats(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    # Any stored Function, even one that no longer validates: its past calls still count.
    resource = await ctx.store.lookup(Kind.FUNCTION, request.match_info["name"])
    # Reading needs no counts of this process: every process flushes its own each second.
    stats = Stats(ctx.redis, ctx.settings.namespace)
    doc = await report(stats, ctx.queue, resource.name)
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/functions/{name}/stats", function_stats)
