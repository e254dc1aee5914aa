"""``/healthz`` (the process is up), ``/readyz`` (each dependency answers) and ``/metrics``.
These three need no token: orchestrators and Prometheus call them."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventhub.api.context import CONTEXT

_CHECK_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[CONTEXT].checks
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                await check()
            results[name] = "ok"
        except Exception as exc:  # a failed check is an answer, not an error
            results[name] = f"failed: {type(exc).__name__}"
    ready = all(v == "ok" for v in results.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": results}
    # Reported, yet still ready: every other resource routes, and every process sees the same rows.
    if invalid := request.app[CONTEXT].router.invalid:
        body["invalidResources"] = [
            {"kind": r.kind.value, "name": r.name, "error": r.error} for r in invalid
        ]
    return web.Response(
        status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json"
    )


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = generate_latest(ctx.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
