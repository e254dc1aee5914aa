"""Builds the aiohttp application from an :class:`ApiContext`."""

from __future__ import annotations

from aiohttp import web

from eventhub.api import deadletters, health, ingress, middleware, resources
from eventhub.api.context import CONTEXT, ApiContext


def build(ctx: ApiContext) -> web.Application:
    app = web.Application(
        middlewares=[middleware.errors, middleware.auth],
        client_max_size=ctx.settings.max_body_size,
    )
    app[CONTEXT] = ctx
    health.add_routes(app)
    ingress.add_routes(app)
    resources.add_routes(app)
    deadletters.add_routes(app)
    return app
