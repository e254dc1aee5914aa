"""Builds the aiohttp application from an :class:`ApiContext`."""

from __future__ import annotations

from aiohttp import web

from eventhub.api import (
    deadletters,
    flows,
    health,
    ingress,
    middleware,
    openapi,
    resources,
    rollouts,
    stats,
    ui,
    webhooks,
)
from eventhub.api.context import CONTEXT, ApiContext
from eventhub.flows.runs import FlowRuns
from eventhub.rollout import Rollouts


def build(
    ctx: ApiContext,
    *,
    v1: bool = True,
    rollout_store: Rollouts | None = None,
    flow_runs: FlowRuns | None = None,
) -> web.Application:
    """Health, metrics and ``/openapi.json`` always; the ``/v1`` API (and its OpenFaaS alias)
    when ``v1``; the rollouts' and the flow runs' routes with it when their stores are given."""
    app = web.Application(
        middlewares=[middleware.errors, middleware.auth],
        client_max_size=ctx.settings.max_body_size,
    )
    app[CONTEXT] = ctx
    health.add_routes(app)
    openapi.add_routes(app)  # describes whatever routes the app ends up with
    if v1:
        ingress.add_routes(app)
        resources.add_routes(app)
        stats.add_routes(app)
        deadletters.add_routes(app)
        if rollout_store is not None:
            rollouts.add_routes(app, rollout_store)
        if flow_runs is not None:
            flows.add_routes(app, flow_runs)
        webhooks.add_routes(app)
        ui.add_routes(app)
    return app
