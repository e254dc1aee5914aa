"""``/v1/functions``, ``/v1/sources``, ``/v1/bindings``, ``/v1/flows``: list, get, PUT (create
or replace), DELETE. A PUT body is the resource document (JSON or YAML); ``metadata.name`` may
be left out and must otherwise equal the name in the path. A YAML body that sets a key twice
is refused.

A stored resource that no longer validates is listed and shown as stored, with
``status.invalid: true`` and ``status.error``; a PUT of a valid one replaces it."""

from __future__ import annotations

from typing import Any

import orjson
import yaml
from aiohttp import web

from eventhub import yamlload
from eventhub.api.context import CONTEXT, requires
from eventhub.errors import FieldProblem, InvalidInput
from eventhub.resources import Kind, parse_resource
from eventhub.settings import Scope
from eventhub.sources import read_status


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _kind(request: web.Request) -> Kind:
    return {k.plural: k for k in Kind}[request.match_info["kind"]]


@requires(Scope.ADMIN)
async def list_resources(request: web.Request) -> web.Response:
    resources = await request.app[CONTEXT].store.listing(_kind(request))
    return _json({"items": [r.document() for r in resources]})


@requires(Scope.ADMIN)
async def get_resource(request: web.Request) -> web.Response:
    resource = await request.app[CONTEXT].store.lookup(_kind(request), request.match_info["name"])
    return _json(resource.document())


@requires(Scope.ADMIN)
async def put_resource(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    doc = _read_document(await request.read(), request.content_type)
    metadata = doc.setdefault("metadata", {})
    if isinstance(metadata, dict):
        metadata.setdefault("name", name)
        if metadata["name"] != name:
            raise InvalidInput(
                "metadata.name differs from the name in the path",
                problems=(FieldProblem("metadata.name", f"must be '{name}' (the path's name)"),),
            )
    doc.setdefault("apiVersion", "eventhub/v1")
    doc.setdefault("kind", kind.value)
    resource = parse_resource(doc, "", kind=kind)
    ctx = request.app[CONTEXT]
    created = await ctx.store.put(resource)
    await ctx.router.reload()  # read-your-writes here; other processes follow by NOTIFY
    return _json(resource.document(), status=201 if created else 200)


@requires(Scope.ADMIN)
async def delete_resource(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    await ctx.store.delete(_kind(request), request.match_info["name"])
    await ctx.router.reload()
    return web.Response(status=204)


@requires(Scope.ADMIN)
async def pause_resource(request: web.Request) -> web.Response:
    return await _set_paused(request, paused=True)


@requires(Scope.ADMIN)
async def resume_resource(request: web.Request) -> web.Response:
    return await _set_paused(request, paused=False)


async def _set_paused(request: web.Request, *, paused: bool) -> web.Response:
    ctx = request.app[CONTEXT]
    resource = await ctx.store.set_paused(_kind(request), request.match_info["name"], paused)
    await ctx.router.reload()
    return _json(resource.document())


@requires(Scope.ADMIN)
async def source_status(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    resource = await ctx.store.get(Kind.SOURCE, request.match_info["name"])
    processes = await read_status(ctx.redis, ctx.settings.namespace, resource.name)
    if resource.paused:
        state = "paused"
    elif not processes:
        state = "unknown"  # no ingest process has reported it (yet)
    elif any(p["state"] == "running" for p in processes):
        state = "running"
    else:
        state = processes[0]["state"]
    return _json(
        {
            "name": resource.name,
            "type": resource.model.type,
            "paused": resource.paused,
            "state": state,
            "processes": processes,
        }
    )


@requires(Scope.ADMIN)
async def function_status(request: web.Request) -> web.Response:
    """A function's backlog across every process, as JetStream counts it."""
    ctx = request.app[CONTEXT]
    resource = await ctx.store.get(Kind.FUNCTION, request.match_info["name"])
    backlog = await ctx.queue.function_status(resource.name)
    return _json(
        {
            "name": resource.name,
            "paused": resource.paused,
            "maxConcurrency": resource.model.max_concurrency,
            **backlog,
        }
    )


def _read_document(body: bytes, content_type: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(body) if "json" in content_type else yamlload.load(body)
    except yamlload.DuplicateKey as exc:
        raise InvalidInput(
            f"the body sets {exc.path} twice: {exc.message}",
            problems=(FieldProblem(exc.path, exc.message),),
        ) from None
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"the body is not valid JSON or YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the body must be a resource document (a mapping)")
    return doc


def add_routes(app: web.Application) -> None:
    kinds = "{kind:functions|sources|bindings|flows}"
    app.router.add_get(f"/v1/{kinds}", list_resources)
    app.router.add_get(f"/v1/{kinds}/{{name}}", get_resource)
    app.router.add_put(f"/v1/{kinds}/{{name}}", put_resource)
    app.router.add_delete(f"/v1/{kinds}/{{name}}", delete_resource)
    pausable = "{kind:functions|sources|bindings}"
    app.router.add_post(f"/v1/{pausable}/{{name}}/pause", pause_resource)
    app.router.add_post(f"/v1/{pausable}/{{name}}/resume", resume_resource)
    app.router.add_get("/v1/sources/{name}/status", source_status)
    app.router.add_get("/v1/functions/{name}/status", function_status)
