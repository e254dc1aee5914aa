"""A sample function server for ``eventhub dev`` and the walkthrough.

``POST /hello`` answers 200; ``POST /fail`` answers 500 (so it is retried, then dead-lettered);
``POST /dead-letters`` answers 200 and is meant as a dead-letter function. Every call is printed
as one line: the path, the event's id and type, and its eventhub* extensions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from aiohttp import web


def build(say: Callable[[str], None]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        name = request.match_info["name"]
        ce = {k[3:].lower(): v for k, v in request.headers.items() if k.lower().startswith("ce-")}
        if request.content_type == "application/cloudevents+json":
            with contextlib.suppress(ValueError):
                ce = {k: str(v) for k, v in json.loads(body).items() if k != "data"}
        extras = " ".join(f"{k}={v}" for k, v in sorted(ce.items()) if k.startswith("eventhub"))
        attempt = request.headers.get("Eventhub-Attempt")
        line = f"sample function /{name}: id={ce.get('id')} type={ce.get('type')}"
        say(f"{line} attempt={attempt} bytes={len(body)} {extras}".rstrip())
        if name == "fail":
            return web.json_response({"error": "this function always fails"}, status=500)
        return web.json_response({"ok": True, "function": name})

    app = web.Application()
    app.router.add_post("/{name}", handle)
    return app
