"""MinIO's webhook notification target: ``POST /v1/sources/{name}/webhook``.

Point MinIO at it (``MINIO_NOTIFY_WEBHOOK_ENDPOINT_<ID>=https://hub/v1/sources/<name>/webhook``,
``MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_<ID>=<the source's authToken>``, and a ``QUEUE_DIR`` so that
MinIO keeps and re-posts what the hub could not take). The route carries no eventhub scope: MinIO
cannot send a hub token, it authenticates with the source's own ``authToken`` instead.

=======  ==========================================================================================
Status   When
=======  ==========================================================================================
200      every record is an invocation durably in JetStream (``{"accepted": <records>}``)
400      the body is not a MinIO notification (empty, not JSON, no ``Records``, a record without
         bucket, key or event name); nothing is enqueued
401      the source has an ``authToken`` and ``Authorization`` does not carry it
404      no Source of that name, or not a MinIO source in ``mode: webhook``
413      the body is above the source's ``maxMessageSize``
503      the source is paused, a bound function is above the source's ``highWaterMark``, or
         JetStream is full (``Retry-After``): MinIO posts it again later
=======  ==========================================================================================
"""

from __future__ import annotations

import orjson
from aiohttp import web

from connectors.common import Rejected
from connectors.minio import authorized, notification_events
from eventhub.api.context import CONTEXT
from eventhub.api.ingress import trace_of
from eventhub.errors import InvalidInput, NotFound, PayloadTooLarge, Unauthorized, Unavailable
from eventhub.sourcespecs import MinIOSpec

_PAUSED_RETRY_AFTER = 10  # seconds; MinIO's queue store retries on its own schedule anyway


async def post_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    resource = ctx.router.routes.sources.get(name)
    spec = resource.model if resource is not None else None
    if resource is None or not isinstance(spec, MinIOSpec) or spec.mode != "webhook":
        raise NotFound(f"Source '{name}' does not exist or is not a MinIO source in webhook mode")
    token = spec.auth_token.get_secret_value() if spec.auth_token is not None else None
    if token is not None and not authorized(request.headers.get("Authorization"), token):
        raise Unauthorized(f"send Source '{name}''s authToken: Authorization: Bearer <authToken>")
    if resource.paused:
        raise Unavailable(f"Source '{name}' is paused", retry_after=_PAUSED_RETRY_AFTER)
    if await ctx.ingress.above_high_water(name, spec.high_water_mark):
        raise Unavailable(
            f"a function bound to Source '{name}' is above its highWaterMark", retry_after=5
        )
    body = await request.read()
    if len(body) > spec.max_message_size:
        raise PayloadTooLarge(
            f"the notification is {len(body)} bytes, above maxMessageSize {spec.max_message_size}"
        )
    try:
        events = notification_events(body)
    except Rejected as exc:
        raise InvalidInput(f"the body is not a MinIO notification: {exc.reason}") from None
    if events:
        await ctx.ingress.submit(name, events, trace_of(request))
    return web.Response(
        body=orjson.dumps({"accepted": len(events)}), content_type="application/json"
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sources/{name}/webhook", post_webhook)
