"""Combinations of events, against the real services: the events of a binding with
``dependencies`` are collected in PostgreSQL per correlation key, and one invocation (or run)
fires when the condition holds within the window."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from eventhub.settings import Settings
from tests.support import FunctionServer, RunningHub, run_eventhub

DEPENDENCIES = [
    {"name": "a", "source": "api", "filter": [{"exact": {"type": "com.example.a"}}]},
    {"name": "b", "source": "api", "filter": [{"exact": {"type": "com.example.b"}}]},
    {"name": "c", "source": "api", "filter": [{"exact": {"type": "com.example.c"}}]},
]


async def send(hub: RunningHub, event_id: str, kind: str, order: str) -> list[str]:
    """Post one event of type com.example.<kind> for ``order``; the invocation ids answered."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/shop",
        "ce-type": f"com.example.{kind}",
        "content-type": "application/json",
        **hub.auth(),
    }
    async with hub.http.post(
        f"{hub.base_url}/v1/events",
        data=json.dumps({"orderId": order, "kind": kind}),
        headers=headers,
    ) as response:
        body = await response.json()
        assert response.status == 202, body
        return [i["id"] if isinstance(i, dict) else i for i in body.get("invocations", [])]


async def combine(
    hub: RunningHub, function: FunctionServer, condition: str, window: str = "10m"
) -> None:
    await hub.function("f", function.url("f"))
    await hub.put(
        "bindings",
        "orders",
        {
            "dependencies": DEPENDENCIES,
            "condition": condition,
            "correlate": "data.orderId",
            "window": window,
            "function": "f",
        },
    )
    await hub.wait_routed("f")
    assert hub.hub is not None
    deadline = time.monotonic() + 5
    while "orders" not in hub.hub.router.routes.combos:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def counted(hub: RunningHub, outcome: str) -> float:
    assert hub.hub is not None
    value = hub.hub.metrics.combinations.labels("orders", outcome)._value.get()
    return float(value)


async def test_a_then_b_fires_once_with_both_events(
    hub: RunningHub, function: FunctionServer
) -> None:
    await combine(hub, function, "a && (b || c)")
    assert await send(hub, "e1", "a", "o1") == []  # a alone: nothing yet
    assert await send(hub, "e2", "a", "o2") == []  # another order: a key of its own
    [inv] = await send(hub, "e3", "b", "o1")
    [call] = await function.wait_for(1, "f")
    assert call.ce["type"] == "eventhub.combination"
    assert call.ce["subject"] == "o1"
    body = json.loads(call.body)
    assert sorted(body) == ["a", "b"]
    assert body["a"]["id"] == "e1" and body["a"]["data"] == {"orderId": "o1", "kind": "a"}
    assert body["b"]["id"] == "e3" and body["b"]["type"] == "com.example.b"
    await hub.wait_status(inv, "succeeded")
    # The events of o1 were cleared: a c for o1 alone does not fire again.
    assert await send(hub, "e4", "c", "o1") == []
    # a redelivered: it answers the combination it fired (the same id, which JetStream drops),
    # and is not collected again, so a c for o1 still finds no a.
    assert await send(hub, "e1", "a", "o1") == [inv]
    assert await send(hub, "e5", "c", "o1") == []
    await asyncio.sleep(0.5)  # a second call, if there were one, would have come by now
    assert len(function.calls_to("f")) == 1
    assert counted(hub, "fired") == 1


async def test_or_fires_on_either_and_a_redelivered_event_does_not_fire_twice(
    hub: RunningHub, function: FunctionServer
) -> None:
    await combine(hub, function, "b || c")
    [first] = await send(hub, "e1", "c", "o1")
    # The same event again (a retry of the POST, a source's redelivery): the same id, once.
    assert await send(hub, "e1", "c", "o1") == [first]
    [second] = await send(hub, "e2", "b", "o2")
    assert second != first
    calls = await function.wait_for(2, "f")
    await hub.wait_status(first, "succeeded")
    await hub.wait_status(second, "succeeded")
    await asyncio.sleep(0.5)  # a second call, if there were one, would have come by now
    assert len(function.calls_to("f")) == len(calls) == 2
    assert sorted(json.loads(c.body).popitem()[0] for c in calls) == ["b", "c"]
    assert counted(hub, "fired") == 2


async def test_a_combination_that_never_completes_times_out(
    hub: RunningHub, function: FunctionServer
) -> None:
    await combine(hub, function, "a && b", window="1s")
    assert await send(hub, "e1", "a", "o1") == []
    deadline = time.monotonic() + 20
    while counted(hub, "timed_out") < 1:  # the sweeper drops it once the window is past
        assert time.monotonic() < deadline, "the combination never timed out"
        await asyncio.sleep(0.1)
    assert await send(hub, "e2", "b", "o1") == []  # a is gone: b alone does not fire
    assert counted(hub, "timed_out") == 1
    assert counted(hub, "fired") == 0
    assert function.calls_to("f") == []


async def test_a_combination_starts_a_flow_run(hub: RunningHub, function: FunctionServer) -> None:
    await hub.function("f", function.url("f"))
    await hub.put("flows", "both", {"steps": [{"name": "one", "function": "f"}]})
    await hub.put(
        "bindings",
        "orders",
        {"dependencies": DEPENDENCIES[:2], "correlate": "data.orderId", "flow": "both"},
    )
    assert hub.hub is not None
    deadline = time.monotonic() + 5
    while "orders" not in hub.hub.router.routes.combos:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await send(hub, "e1", "b", "o9")
    await send(hub, "e2", "a", "o9")
    [call] = await function.wait_for(1, "f")
    assert sorted(json.loads(call.body)) == ["a", "b"]
    assert call.ce["eventhubflow"] == "both"


async def put_status(hub: RunningHub, spec: dict[str, Any]) -> tuple[int, Any]:
    async with hub.http.put(
        f"{hub.base_url}/v1/bindings/bad", json={"spec": spec}, headers=hub.auth()
    ) as response:
        return response.status, await response.json()


async def test_bad_combinations_are_refused_naming_the_field(
    hub: RunningHub, function: FunctionServer, settings: Settings, tmp_path: Path
) -> None:
    await hub.function("f", function.url("f"))
    base: dict[str, Any] = {"dependencies": DEPENDENCIES[:2], "function": "f"}
    cases = [
        ({**base, "condition": "a && x"}, "spec.condition", "'x' is not a dependency"),
        ({**base, "condition": "a && (b"}, "spec.condition", "ends too early"),
        ({**base, "condition": "a & b"}, "spec.condition", "'&' is not allowed"),
        ({**base, "correlate": "data.("}, "spec.correlate", "syntax error"),
        ({**base, "window": "soon"}, "spec.window", ""),
        ({**base, "window": "0s"}, "spec.window", "positive"),
        ({**base, "source": "api"}, "spec.source", "each of spec.dependencies"),
        ({"source": "api", "function": "f", "condition": "a"}, "spec.condition", "dependencies"),
        (
            {**base, "dependencies": [*DEPENDENCIES[:2], {"name": "a", "source": "api"}]},
            "spec.dependencies[2].name",
            "declared twice",
        ),
        (
            {**base, "dependencies": [{"name": "a", "source": "api", "filter": [{"bad": 1}]}]},
            "spec.dependencies[0].filter[0]",
            "",
        ),
    ]
    for spec, field, words in cases:
        status, body = await put_status(hub, spec)
        assert status == 400, (spec, body)
        fields = {e["field"]: e["message"] for e in body["errors"]}
        assert any(f.startswith(field) for f in fields), (spec, body)
        assert words in json.dumps(body), (spec, body)
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: eventhub/v1\nkind: Binding\nmetadata: {name: bad}\n"
        "spec:\n  function: f\n  dependencies: [{name: a, source: api}]\n"
        "  condition: 'a || b'\n"
    )
    result = await asyncio.to_thread(run_eventhub, settings, "apply", "-f", str(tmp_path))
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.endswith(
        "bad.yaml: Binding 'bad': spec.condition: at column 6: 'b' is not a dependency"
        " (declared: a)"
    ), line


async def test_a_dependency_source_must_exist_and_cannot_be_deleted_while_used(
    hub: RunningHub, function: FunctionServer
) -> None:
    await hub.function("f", function.url("f"))
    deps = [{"name": "a", "source": "api"}, {"name": "t", "source": "ticks"}]
    status, body = await put_status(hub, {"dependencies": deps, "function": "f"})
    assert status == 400 and body["errors"][0]["field"] == "spec.dependencies[1].source", body
    await hub.put("sources", "ticks", {"type": "cron", "schedule": "@yearly"})
    status, body = await put_status(hub, {"dependencies": deps, "function": "f"})
    assert status in (200, 201), body
    async with hub.http.delete(f"{hub.base_url}/v1/sources/ticks", headers=hub.auth()) as r:
        assert r.status == 409, await r.text()
        assert "Binding/bad" in await r.text()
