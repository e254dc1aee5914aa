"""The HTTP API's contract: auth, validation with named fields, limits, status codes."""

from __future__ import annotations

import asyncio
import json

import pytest

from eventhub.settings import Settings
from tests.support import FunctionServer, RunningHub

CE = {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The function server listens on 127.0.0.1: callbacks to it must be allowed."""
    return settings.model_copy(update={"callback_allow": ("127.0.0.1",)})


async def test_every_v1_route_needs_a_token(hub: RunningHub) -> None:
    for method, path in [
        ("GET", "/v1/functions"),
        ("POST", "/v1/events"),
        ("POST", "/v1/functions/f/invocations"),
        ("GET", "/v1/invocations/x"),
        ("GET", "/v1/dead-letters"),
        ("POST", "/async-function/f"),
    ]:
        async with hub.http.request(method, hub.base_url + path) as response:
            assert response.status == 401, path
            assert response.content_type == "application/problem+json"
            assert (await response.json())["status"] == 401
        async with hub.http.request(
            method, hub.base_url + path, headers={"Authorization": "Bearer wrong"}
        ) as response:
            assert response.status == 401, path
    # A token without the scope: 403.
    async with hub.http.get(f"{hub.base_url}/v1/functions", headers=hub.auth("events-only")) as r:
        assert r.status == 403
        assert "admin" in (await r.json())["detail"]
    # Health and metrics are open.
    for path in ("/healthz", "/readyz", "/metrics"):
        async with hub.http.get(hub.base_url + path) as response:
            assert response.status == 200, path


async def test_readyz_checks_each_dependency(hub: RunningHub) -> None:
    async with hub.http.get(f"{hub.base_url}/readyz") as response:
        body = await response.json()
    checks = {"postgres": "ok", "nats": "ok", "redis": "ok", "jetstream": "ok"}
    assert body == {"status": "ready", "checks": checks}


async def test_resource_crud_and_validation(hub: RunningHub, function: FunctionServer) -> None:
    url = f"{hub.base_url}/v1/functions/f1"
    async with hub.http.put(
        url, json={"spec": {"url": function.url("f1")}}, headers=hub.auth()
    ) as r:
        assert r.status == 201
        doc = await r.json()
        assert doc["metadata"]["name"] == "f1" and doc["kind"] == "Function"
    async with hub.http.put(
        url, json={"spec": {"url": function.url("f1"), "timeout": "5s"}}, headers=hub.auth()
    ) as r:
        assert r.status == 200
    async with hub.http.get(url, headers=hub.auth()) as r:
        assert (await r.json())["spec"]["timeout"] == "5s"
    async with hub.http.get(f"{hub.base_url}/v1/functions", headers=hub.auth()) as r:
        assert [d["metadata"]["name"] for d in (await r.json())["items"]] == ["f1"]

    bad = {"spec": {"url": function.url("f1"), "retry": {"maxAttempts": 0}}}
    async with hub.http.put(url, json=bad, headers=hub.auth()) as r:
        assert r.status == 400
        problem = await r.json()
        assert problem["errors"][0]["field"] == "spec.retry.maxAttempts"
    async with hub.http.put(url, json={"spec": {"url": "ftp://x"}}, headers=hub.auth()) as r:
        assert (await r.json())["errors"][0]["field"] == "spec.url"
    async with hub.http.put(
        url, json={"spec": {"url": function.url("f1"), "colour": "red"}}, headers=hub.auth()
    ) as r:
        assert (await r.json())["errors"][0]["field"] == "spec.colour"
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/b1",
        json={"spec": {"source": "api", "function": "nope"}},
        headers=hub.auth(),
    ) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0] == {
            "field": "spec.function",
            "message": "Function 'nope' does not exist",
        }
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/b1",
        json={"spec": {"source": "api", "function": "f1", "filter": [{"exactly": {}}]}},
        headers=hub.auth(),
    ) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["field"].startswith("spec.filter[0]")
    await hub.bind("b1", "f1")
    async with hub.http.delete(url, headers=hub.auth()) as r:
        assert r.status == 409  # still bound
    async with hub.http.delete(f"{hub.base_url}/v1/bindings/b1", headers=hub.auth()) as r:
        assert r.status == 204
    async with hub.http.delete(url, headers=hub.auth()) as r:
        assert r.status == 204
    async with hub.http.get(url, headers=hub.auth()) as r:
        assert r.status == 404


async def test_malformed_events_get_4xx_and_nothing_is_enqueued(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("f", function.url("f"))
    await hub.bind("all", "f")
    cases = [
        ({"content-type": "application/json"}, b"{}", 415, "ce-specversion"),
        ({**CE, "ce-type": ""}, b"", 400, "ce-type"),
        ({k: v for k, v in CE.items() if k != "ce-source"}, b"", 400, "ce-source"),
        ({**CE, "ce-specversion": "0.9"}, b"", 400, "ce-specversion"),
        ({"content-type": "application/cloudevents+json"}, b"{not json", 400, None),
        (
            {"content-type": "application/cloudevents+json"},
            json.dumps({"specversion": "1.0", "id": "1", "source": "/s"}).encode(),
            400,
            "type",
        ),
        (
            {"content-type": "application/cloudevents-batch+json"},
            json.dumps(
                [
                    {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"},
                    {"specversion": "1.0", "source": "/s", "type": "t"},
                ]
            ).encode(),
            400,
            "[1].id",
        ),
    ]
    for headers, body, status, field in cases:
        async with hub.http.post(
            f"{hub.base_url}/v1/events", data=body, headers={**headers, **hub.auth()}
        ) as r:
            problem = await r.json()
            assert r.status == status, (headers, problem)
            if field:
                assert problem["errors"][0]["field"] == field, problem
    await asyncio.sleep(0.5)
    assert function.calls == []  # not even the valid first event of the bad batch
    assert "f" not in await hub.hub.queue.depths()  # type: ignore[union-attr]


async def test_body_over_the_limit_is_413(hub: RunningHub) -> None:
    async with hub.http.post(
        f"{hub.base_url}/v1/events",
        data=b"x" * (hub.hub.settings.max_body_size + 1),  # type: ignore[union-attr]
        headers={**CE, **hub.auth()},
    ) as r:
        assert r.status == 413
        assert r.content_type == "application/problem+json"


async def test_structured_and_batch_events_are_routed(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("f", function.url("f"), eventFormat="structured")
    await hub.bind("all", "f")
    batch = [
        {"specversion": "1.0", "id": f"b{i}", "source": "/batch", "type": "t", "data": {"i": i}}
        for i in range(3)
    ]
    async with hub.http.post(
        f"{hub.base_url}/v1/events",
        data=json.dumps(batch),
        headers={"content-type": "application/cloudevents-batch+json", **hub.auth()},
    ) as r:
        assert r.status == 202
        assert (await r.json())["accepted"] == 3
    calls = await function.wait_for(3, "f")
    assert all(c.headers["content-type"] == "application/cloudevents+json" for c in calls)
    received = sorted((json.loads(c.body)["id"], json.loads(c.body)["data"]["i"]) for c in calls)
    assert received == [("b0", 0), ("b1", 1), ("b2", 2)]


async def test_direct_invocation_status_idempotency_and_callback(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("job", function.url("job"))
    invoke = f"{hub.base_url}/v1/functions/job/invocations"
    headers = {
        **hub.auth(),
        "Content-Type": "text/plain",
        "Idempotency-Key": "order-42",
        "X-Callback-Url": function.url("callback"),
    }
    async with hub.http.post(invoke, data=b"payload", headers=headers) as r:
        assert r.status == 202
        first = await r.json()
        assert r.headers["Location"] == f"/v1/invocations/{first['id']}"
    async with hub.http.post(invoke, data=b"payload", headers=headers) as r:
        assert r.status == 202
        assert (await r.json())["id"] == first["id"]  # same key, same invocation
    [call] = await function.wait_for(1, "job")
    assert call.body == b"payload"
    assert call.headers["content-type"] == "text/plain"
    assert call.headers["eventhub-invocation-id"] == first["id"]
    doc = await hub.wait_status(first["id"], "succeeded")
    assert doc["function"] == "job" and doc["attempts"] == 1 and doc["lastStatus"] == 200
    [callback] = await function.wait_for(1, "callback")
    assert callback.headers["eventhub-invocation-status"] == "succeeded"
    assert callback.headers["x-call-id"] == first["id"]
    assert callback.body == b"status 200"
    await asyncio.sleep(0.3)
    assert len(function.calls_to("job")) == 1

    async with hub.http.post(f"{hub.base_url}/async-function/job", headers=hub.auth()) as r:
        assert r.status == 202
        assert r.headers["X-Call-Id"]
    async with hub.http.post(
        f"{hub.base_url}/v1/functions/ghost/invocations", headers=hub.auth()
    ) as r:
        assert r.status == 404
    async with hub.http.post(invoke, headers={**hub.auth(), "X-Callback-Url": "not a url"}) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["field"] == "X-Callback-Url"
    async with hub.http.get(f"{hub.base_url}/v1/invocations/unknown", headers=hub.auth()) as r:
        assert r.status == 404


async def test_a_call_that_takes_a_while_is_shown_running(
    hub: RunningHub, function: FunctionServer
) -> None:
    """Calls still going after a moment are marked running, each of them; then their outcome."""
    await hub.function("slow", function.url("slow"))
    gate = function.gates["slow"] = asyncio.Event()
    ids = []
    for _ in range(3):
        async with hub.http.post(
            f"{hub.base_url}/v1/functions/slow/invocations", data=b"x", headers=hub.auth()
        ) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])
    await function.wait_for(3, "slow")
    for inv_id in ids:
        doc = await hub.wait_status(inv_id, "running")
        assert doc["attempts"] == 1
    gate.set()
    for inv_id in ids:
        await hub.wait_status(inv_id, "succeeded")
