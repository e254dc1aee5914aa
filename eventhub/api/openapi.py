"""``GET /openapi.json``: the OpenAPI 3.1 document of the HTTP API, generated from the router.

Every route the application serves is one operation of the document, so the two cannot drift:
- the path and the method come from the router; a path parameter that is a list of words
  (``{kind:functions|sources|bindings}``) becomes one path per word;
- the path parameters come from the route's pattern;
- the scope comes from the handler's ``@requires`` mark (``security`` and ``x-scopes``);
- what the route takes and answers comes from :data:`eventhub.api.openapi_ops.OPERATIONS`, keyed
  by the handler. A handler missing there is still listed, with ``x-undescribed: true``, and the
  test suite refuses that.

HEAD, which aiohttp answers for every GET route, is not listed separately. The document is built
on the first request (the router is frozen by then) and then served as is. It needs no token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from eventhub import __version__
from eventhub.api.context import ALSO_ATTR, SCOPE_ATTR
from eventhub.api.openapi_ops import OPERATIONS, PATH_PARAMS, Op, Schema
from eventhub.api.openapi_schemas import components
from eventhub.resources import Kind

PROBLEM = "application/problem+json"
UNDESCRIBED = "x-undescribed"
_GROUP = re.compile(r"\(\?P<(\w+)>((?:[^()\\]|\\.)*)\)")
_WORDS = re.compile(r"^(?:[\w]|\\.)+(?:\|(?:[\w]|\\.)+)*$")
_KINDS = {k.plural: k.value for k in Kind}
_DESCRIPTION = (
    "Every /v1 route and /async-function need `Authorization: Bearer <token>` with the scope in"
    " the operation's `x-scopes` (401 without a known token, 403 without the scope). Errors are"
    " RFC 9457 problem documents (application/problem+json). HEAD is answered for every GET."
)


def _expansions(resource: AbstractResource) -> list[tuple[str, dict[str, str]]]:
    """The document paths of one router resource, with the path parameters each one fixes."""
    info = resource.get_info()
    if "path" in info:
        return [(info["path"], {})]
    paths: list[tuple[str, dict[str, str]]] = [(info["formatter"], {})]
    for name, body in _GROUP.findall(info["pattern"].pattern):
        if not _WORDS.match(body):
            continue
        words = [re.sub(r"\\(.)", r"\1", w) for w in body.split("|")]
        paths = [
            (path.replace("{" + name + "}", word), {**fixed, name: word})
            for path, fixed in paths
            for word in words
        ]
    return paths


def _placeholders(text: str, fixed: dict[str, str]) -> str:
    plural = fixed.get("kind")
    if plural is None:
        return text
    return text.replace("{Kind}", _KINDS[plural]).replace("{kind}", plural)


def _schema(schema: str | Schema, fixed: dict[str, str]) -> Schema:
    if isinstance(schema, str):
        return {"$ref": "#/components/schemas/" + _placeholders(schema, fixed)}
    return schema


def _content(media: dict[str, str | Schema], fixed: dict[str, str]) -> Schema:
    return {kind: {"schema": _schema(s, fixed)} for kind, s in media.items()}


def _responses(op: Op, scoped: bool, fixed: dict[str, str]) -> Schema:
    responses: Schema = {}
    for status, media in op.ok.items():
        answer: Schema = {"description": HTTPStatus(status).phrase}
        if media is not None:
            answer["content"] = _content(media, fixed)
        headers = op.ok_headers.get(status)
        if headers:
            answer["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in headers.items()
            }
        responses[str(status)] = answer
    problems = set(op.problems) | ({401, 403} if scoped else set())
    for status in sorted(problems):
        responses[str(status)] = {"$ref": f"#/components/responses/Problem{status}"}
    return responses


def _operation(
    path: str, method: str, handler: Callable[..., Any], fixed: dict[str, str]
) -> Schema:
    op = OPERATIONS.get(handler) or _OWN.get(handler)
    described = op is not None
    if op is None:
        op = Op(getattr(handler, "__name__", "undescribed"), "undescribed", {200: None})
    scope = getattr(handler, SCOPE_ATTR, None)
    names = [n for n in re.findall(r"{(\w+)}", path) if n not in fixed]
    params = [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": op.path_params.get(n, PATH_PARAMS.get(n, {"type": "string"})),
        }
        for n in names
    ]
    operation: Schema = {
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{method} {path}").strip("_").lower(),
        "summary": _placeholders(op.summary, fixed),
        "tags": [op.tag],
        "parameters": params + [p.render() for p in op.params],
        "responses": _responses(op, scope is not None, fixed),
    }
    if op.description:
        operation["description"] = op.description
    if op.body is not None:
        operation["requestBody"] = {
            "required": op.body_required,
            "content": _content(op.body, fixed),
        }
    if scope is not None:  # any one of the scopes will do: alternatives, in OpenAPI terms
        scopes = [scope.value, *sorted(s.value for s in getattr(handler, ALSO_ATTR, ()))]
        operation["security"] = [{"token": [s]} for s in scopes]
        operation["x-scopes"] = scopes
    elif op.security is not None:
        operation["security"] = [{op.security: []}]
    else:
        operation["security"] = []
    if not described:
        operation[UNDESCRIBED] = True
    return operation


def _problem_responses() -> Schema:
    responses: Schema = {}
    for status in (400, 401, 403, 404, 409, 413, 415, 503):
        answer: Schema = {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 503:
            answer["headers"] = {
                "Retry-After": {"description": "seconds", "schema": {"type": "string"}}
            }
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[f"Problem{status}"] = answer
    return responses


def document(app: web.Application) -> Schema:
    """The OpenAPI 3.1 document of every route ``app`` serves."""
    paths: dict[str, Schema] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        for path, fixed in _expansions(route.resource):
            item = paths.setdefault(path, {})
            item[route.method.lower()] = _operation(path, route.method, route.handler, fixed)
    return {
        "openapi": "3.1.0",
        "info": {"title": "eventhub", "version": __version__, "description": _DESCRIPTION},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components(),
            "responses": _problem_responses(),
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a hub token; its scopes are the settings' tokens",
                },
                "sourceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the Source's authToken (the raw token is accepted too)",
                },
            },
        },
    }


class _Cached:
    body: bytes | None = None


_CACHE = web.AppKey("openapi_document", _Cached)


async def openapi_json(request: web.Request) -> web.Response:
    cached = request.app[_CACHE]
    if cached.body is None:
        cached.body = orjson.dumps(document(request.app))
    return web.Response(body=cached.body, content_type="application/json")


_OWN: dict[Callable[..., Any], Op] = {
    openapi_json: Op("This document", "health", {200: {"application/json": {"type": "object"}}})
}


def add_routes(app: web.Application) -> None:
    app[_CACHE] = _Cached()
    app.router.add_get("/openapi.json", openapi_json)
