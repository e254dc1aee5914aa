"""``/openapi.json`` describes every route the hub serves, and the hub keeps to it.

The document is compared with the router of the running hub, so a route added without its
description fails here. Then schemathesis sends generated requests (valid, and invalid on
purpose) to every operation, once with an admin token and once without one, and checks that no
answer is a 5xx and that every answer has a documented status, content type and body.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventhub.api.context import ALSO_ATTR, SCOPE_ATTR
from tests.support import FunctionServer, RunningHub

PROBLEM = "application/problem+json"
# POST routes that take no body: the path says it all.
BODILESS = {"pause", "resume", "resend", "cancel"}
# Per operation and per run: enough to cross every branch the generators reach, small enough
# for CI (the two runs take well under the test's timeout on a loaded machine).
MAX_EXAMPLES = 25
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)


async def _document(hub: RunningHub) -> dict[str, Any]:
    async with hub.http.get(f"{hub.base_url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        return await response.json()  # type: ignore[no-any-return]


def _app(hub: RunningHub) -> web.Application:
    assert hub.hub is not None
    return hub.hub._site.app  # type: ignore[union-attr,return-value]


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def _sample(path: str) -> str:
    """A concrete URL path for a document path: every parameter as a valid name."""
    return re.sub(r"{\w+}", "x1", path)


def _route_of(app: web.Application, method: str, path: str) -> web.AbstractRoute:
    """The route aiohttp serves ``method path`` with: the first one added that matches."""
    matches = [
        route
        for route in app.router.routes()
        if route.method == method
        and route.resource is not None
        and _matches(route.resource.get_info(), _sample(path))
    ]
    assert matches, f"{method} {path} is served by no route"
    return matches[0]


def _matches(info: dict[str, Any], sample: str) -> bool:
    if "path" in info:
        return bool(info["path"] == sample)
    return info["pattern"].fullmatch(sample) is not None


async def test_the_document_lists_exactly_the_routes_served(hub: RunningHub) -> None:
    doc = await _document(hub)
    assert doc["openapi"].startswith("3.1")
    app = _app(hub)
    served = {r for r in app.router.routes() if r.method != "HEAD"}
    described = {_route_of(app, method, path) for method, path, _ in _operations(doc)}
    assert described == served, {f"{r.method} {r.resource}" for r in served ^ described}
    # ... and a router path with a list of words appears once per word.
    paths = set(doc["paths"])
    for kind in ("functions", "sources", "bindings"):
        assert {f"/v1/{kind}", f"/v1/{kind}/{{name}}"} <= paths
    assert "/v1/{kind}" not in paths


async def test_every_operation_declares_its_scope_body_and_problems(hub: RunningHub) -> None:
    doc = await _document(hub)
    app = _app(hub)
    problems = doc["components"]["responses"]
    for method, path, op in _operations(doc):
        where = f"{method} {path}"
        assert not op.get("x-undescribed"), f"{where} has no description in openapi_ops"
        handler = _route_of(app, method, path).handler
        scope = getattr(handler, SCOPE_ATTR, None)
        responses = op["responses"]
        if scope is None:
            assert op.get("x-scopes") is None, where
            assert op["security"] in ([], [{"sourceToken": []}]), where
        else:
            scopes = [scope.value, *sorted(s.value for s in getattr(handler, ALSO_ATTR, ()))]
            assert op["x-scopes"] == scopes, where
            assert op["security"] == [{"token": [s]} for s in scopes], where
            assert {"401", "403"} <= set(responses), where
        if method in ("PUT", "POST") and path.rsplit("/", 1)[-1] not in BODILESS:
            assert "requestBody" in op, where
            assert "413" in responses, where
        if "{" in path:
            assert "404" in responses or "400" in responses, where
        for status, answer in responses.items():
            if int(status) < 400 or path == "/readyz":
                continue
            name = answer["$ref"].rsplit("/", 1)[-1]
            assert list(problems[name]["content"]) == [PROBLEM], where
    for name, answer in problems.items():
        assert answer["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
        if name == "Problem503":
            assert "Retry-After" in answer["headers"]


async def test_resource_schemas_come_from_the_models(hub: RunningHub) -> None:
    schemas = (await _document(hub))["components"]["schemas"]
    function = schemas["FunctionSpec"]["properties"]
    assert function["retry"]["$ref"] == "#/components/schemas/RetrySpec"
    assert schemas["RetrySpec"]["properties"]["maxAttempts"]["maximum"] == 100
    # Units are described as written, not as the number they are parsed into.
    assert {"type": "string"}.items() <= function["timeout"]["anyOf"][1].items()
    assert "cron" in str(schemas["SourceSpec"])
    assert schemas["BindingDocument"]["properties"]["spec"] == {
        "$ref": "#/components/schemas/BindingSpec"
    }


async def _schemathesis(hub: RunningHub, *, token: str | None, report: Path) -> tuple[int, str]:
    args = [
        "run",
        f"{hub.base_url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "8",
        # One worker: with several threads, Hypothesis describes lambdas with ast.parse at the
        # same time, which CPython 3.11.7 can fail at ("SystemError: AST constructor recursion
        # depth mismatch", a CPython bug; seen in CI).
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--no-shrink",
        "--mode",
        "all",
        "--suppress-health-check",
        "all",
        "--report",
        "ndjson",
        "--report-dir",
        str(report),
    ]
    if token is not None:
        args += ["--header", f"Authorization: Bearer {token}"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        cwd=report,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 240)
    return process.returncode or 0, output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("with_token", [True, False], ids=["admin-token", "no-token"])
async def test_generated_requests_get_documented_answers_and_no_5xx(
    hub: RunningHub, function: FunctionServer, with_token: bool
) -> None:
    # Something to find: a function, a binding, and a dead letter.
    await hub.function("hello", function.url("hello"), retry={"maxAttempts": 1})
    await hub.bind("to-hello", "hello")
    function.respond("hello", 400)
    response = await hub.post_event("e1")
    assert response.status == 202
    await hub.wait_dead_letters(1)
    with tempfile.TemporaryDirectory() as report:
        code, output = await _schemathesis(
            hub, token=hub.token if with_token else None, report=Path(report)
        )
    assert code == 0, output[-12000:]


async def test_inputs_the_generated_requests_found_get_a_4xx(hub: RunningHub) -> None:
    """Each of these once got a 500: a number PostgreSQL's JSON cannot hold, a duration that is a
    mapping, a structured event whose ``time`` is a list."""
    url = f"{hub.base_url}/v1/sources/big"
    yaml_body = "spec: {type: cron, schedule: '@hourly', highWaterMark: 45872136282726088704}\n"
    headers = {**hub.auth(), "Content-Type": "application/yaml"}
    async with hub.http.put(url, data=yaml_body, headers=headers) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["errors"][0]["field"] == "spec"
    spec = {"url": "http://127.0.0.1:9/x", "maxEventAge": {}}
    async with hub.http.put(
        f"{hub.base_url}/v1/functions/f", json={"spec": spec}, headers=hub.auth()
    ) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["errors"][0]["field"] == "spec.maxEventAge"
    event = {"specversion": "1.0", "id": "a", "source": "/s", "type": "t", "time": [1, 2, 3, 4]}
    headers = {**hub.auth(), "Content-Type": "application/cloudevents+json"}
    async with hub.http.post(
        f"{hub.base_url}/v1/events", data=json.dumps(event), headers=headers
    ) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == PROBLEM
