"""The operators' page for dead letters: ``GET /ui`` and its static assets under ``/ui/``.

The page and its assets carry no data, so they are served without a token; the page asks the
operator for one and sends it as ``Authorization: Bearer`` on every ``/v1`` call it makes. The
assets are plain files shipped in the package (``eventhub/ui/``), read once when the routes are
added; only those files are served, by name, never a path built from the request. A strict
Content-Security-Policy allows scripts, styles and requests to this origin only, so even a value
that slipped past the page's escaping could not run or load anything.
"""

from __future__ import annotations

from importlib import resources

import structlog
from aiohttp import web

from eventhub.errors import NotFound

log = structlog.get_logger(__name__)

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page changes with the hub: revalidate rather than run an old script against a new API.
    "Cache-Control": "no-cache",
}

_ASSETS = web.AppKey("ui_assets", dict[str, tuple[bytes, str]])


def _load() -> dict[str, tuple[bytes, str]]:
    assets: dict[str, tuple[bytes, str]] = {}
    try:
        entries = list((resources.files("eventhub") / "ui").iterdir())
    except (FileNotFoundError, NotADirectoryError):
        # A package built without its data files: the API must still start; /ui answers 404.
        log.warning("ui_assets_missing", package_dir="eventhub/ui")
        return assets
    for entry in entries:
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            assets[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return assets


def _asset(request: web.Request, name: str) -> web.Response:
    found = request.app[_ASSETS].get(name)
    if found is None:
        raise NotFound(f"the page has no file '{name}'")
    body, content_type = found
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


async def page(request: web.Request) -> web.Response:
    return _asset(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    return _asset(request, request.match_info["name"])


def add_routes(app: web.Application) -> None:
    app[_ASSETS] = _load()
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", asset)
